"""Where records come from: local files and folders, the Hugging Face hub, TensorFlow Datasets.

    pairs = load_records("train.jsonl")                     # every record: [(where, record), ...]
    for piece in pieces("corpus/", piece_bytes=1 << 24):    # a folder cut into pieces ...
        for where, record in read_piece(piece):             # ... that workers read on their own
            ...

File types: ``.jsonl``, ``.json`` (a list of records), ``.parquet``, ``.csv``, ``.txt`` (one
``{"text": line}`` record per non-blank line, or one per file with ``text_unit="document"``),
and gzipped ``.jsonl.gz`` / ``.txt.gz``. ``where`` names a record for error messages:
``file:line`` (.jsonl, .txt), ``file record i`` (.json), ``file row i`` (.parquet, .csv).

A large corpus is read in :class:`Piece` s, so no process holds more than one piece of it:
``.jsonl`` and line ``.txt`` files are cut into byte ranges at line ends (one scan that counts
lines, so each piece knows the number of its first line), parquet files into runs of row groups;
a gzipped, ``.json`` or ``.csv`` file, or a ``.txt`` document, is one piece. Reading every piece
of a source in order gives exactly :func:`load_records` of it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jft.data.formats import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".jsonl.gz", ".txt.gz")
TEXT_UNITS = ("line", "document")
PIECE_BYTES = 1 << 24  # about 16 MiB of a file per piece
_BLOCK = 1 << 24  # bytes read at a time when counting lines


@dataclasses.dataclass(frozen=True)
class Piece:
    """Part of one file: bytes ``start:stop`` (.jsonl, .txt) or row groups ``start:stop`` (parquet);
    ``stop = -1`` reads to the end. ``line`` numbers its first line or row; ``size`` is its bytes
    on disk (for progress)."""

    path: str
    start: int = 0
    stop: int = -1
    line: int = 1
    text_unit: str = "line"
    size: int = 0


def suffix(path: Path) -> str:
    """A file's type: its suffix, both parts for a gzipped one (``.jsonl.gz``)."""
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


def source_files(source: str | Path) -> list[Path] | None:
    """The files of a local file or folder (a folder's top level, in name order, hidden files
    and other types left out), or None for a hub or TFDS name. Raises :class:`DataError` for a
    missing path, an unsupported file and a folder with no data files."""
    source = str(source)
    path = Path(source).expanduser()
    if source.startswith("tfds:"):
        return None
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if suffix(p) in SUFFIXES and not p.name.startswith("."))
        if not files:
            raise DataError(f"{source}: folder has no {'/'.join(SUFFIXES)} files")
        return files
    if path.is_file():
        if suffix(path) not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type {suffix(path)!r}; use one of {SUFFIXES}")
        return [path]
    if suffix(path) in SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file or folder")
    return None


def pieces(source: str | Path, *, piece_bytes: int = PIECE_BYTES, text_unit: str = "line") -> list[Piece]:
    """The pieces of a local file or folder, in record order (see the module docstring)."""
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text_unit={text_unit!r}; use one of {TEXT_UNITS}")
    files = source_files(source)
    if files is None:
        raise DataError(f"{source}: a hub or TFDS dataset is read whole (load_records), not in pieces")
    out = []
    for path in files:
        kind, size = suffix(path), path.stat().st_size
        if kind == ".jsonl" or (kind == ".txt" and text_unit == "line"):
            out += _line_pieces(path, size, piece_bytes, text_unit)
        elif kind == ".parquet":
            out += _parquet_pieces(path, piece_bytes)
        else:
            out.append(Piece(str(path), text_unit=text_unit, size=size))
    return out


def _line_pieces(path: Path, size: int, piece_bytes: int, text_unit: str) -> list[Piece]:
    """Byte ranges of about ``piece_bytes`` that end at line ends, each with its first line's number."""
    out, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            stop = start + max(piece_bytes, 1)
            if stop < size:
                f.seek(stop - 1)
                f.readline()  # on to the end of the line the cut falls in
                stop = f.tell()
            stop = min(stop, size)
            out.append(Piece(str(path), start, stop, line, text_unit, stop - start))
            f.seek(start)
            for at in range(start, stop, _BLOCK):
                line += f.read(min(_BLOCK, stop - at)).count(b"\n")
            start = stop
    return out


def _parquet_pieces(path: Path, piece_bytes: int) -> list[Piece]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    out, first, row, size = [], 0, 1, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= piece_bytes or g == meta.num_row_groups - 1:
            out.append(Piece(str(path), first, g + 1, row, size=size))
            row += sum(meta.row_group(i).num_rows for i in range(first, g + 1))
            first, size = g + 1, 0
    return out


def read_piece(piece: Piece) -> Iterator[tuple[str, dict]]:
    """The ``(where, record)`` pairs of a piece, in order; :class:`DataError` for a malformed line
    (naming ``file:line``) or a record that is not an object of fields."""
    path = Path(piece.path)
    kind = suffix(path)
    if kind in (".txt", ".txt.gz") and piece.text_unit == "document":
        text = _text(path)
        pairs = iter([(str(path), {"text": text})] if text.strip() else [])
    elif kind in (".jsonl", ".txt", ".jsonl.gz", ".txt.gz"):
        pairs = _lines(path, piece, kind.startswith(".txt"))
    elif kind == ".parquet":
        pairs = _parquet(path, piece)
    elif kind == ".json":
        pairs = _json(path)
    else:
        pairs = _csv(path)
    yield from _objects(pairs)


def _objects(pairs) -> Iterator[tuple[str, dict]]:
    """``pairs``, refusing a record that is not an object of fields (naming where it is)."""
    for where, record in pairs:
        if not isinstance(record, dict):
            raise DataError(f"{where}: record is a {type(record).__name__}, expected an object of fields")
        yield where, record


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _text(path: Path) -> str:
    with _open(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _lines(path: Path, piece: Piece, text: bool) -> Iterator[tuple[str, dict]]:
    """Lines of bytes ``piece.start:piece.stop`` as records: JSON objects, or ``{"text": line}``."""
    with _open(path) as f:
        if piece.start:
            f.seek(piece.start)
        at = piece.start
        for n, raw in enumerate(f, piece.line):
            if 0 <= piece.stop <= at:
                break
            at += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at column {e.start + 1})") from e
            if not line.strip():
                continue
            if text:
                yield f"{path}:{n}", {"text": line.rstrip("\r\n")}
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e


def _json(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        records = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    return ((f"{path} record {i}", r) for i, r in enumerate(records, 1))


def _parquet(path: Path, piece: Piece) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    groups = range(piece.start, file.metadata.num_row_groups if piece.stop < 0 else piece.stop)
    row = piece.line
    for batch in file.iter_batches(batch_size=4096, row_groups=list(groups)):
        for record in batch.to_pylist():
            yield f"{path} row {row}", record
            row += 1


def _csv(path: Path) -> Iterator[tuple[str, dict]]:
    import datasets

    ds = datasets.load_dataset("csv", data_files=str(path), split="train")
    return ((f"{path} row {i}", r) for i, r in enumerate(ds, 1))


def _hub(name: str, split: str) -> list[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name or split
        raise DataError(
            f"{name}: not a local file or folder, and not loadable as a Hugging Face dataset (split {split!r}): {e}"
        ) from e
    return [(f"{name}[{split}] row {i}", r) for i, r in enumerate(ds, 1)]


def _tfds(name: str, split: str, data_dir: str | None) -> list[tuple[str, dict]]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"tfds:{name}: tensorflow_datasets is not installed; pip install 'jft[tfds]'") from e

    def py(value):  # numpy bytes / scalars / arrays -> str / number / list
        if isinstance(value, bytes):
            return value.decode("utf-8")
        if isinstance(value, dict):
            return {k: py(v) for k, v in value.items()}
        if isinstance(value, np.ndarray):
            return [py(v) for v in value.tolist()] if value.ndim else py(value.item())
        return value.item() if isinstance(value, np.generic) else value

    try:
        ds = tfds.load(name, split=split, data_dir=data_dir)
    except Exception as e:
        raise DataError(f"tfds:{name}: could not be loaded (split {split!r}, data_dir {data_dir!r}): {e}") from e
    return [(f"tfds:{name}[{split}] row {i}", py(r)) for i, r in enumerate(tfds.as_numpy(ds), 1)]


def load_records(
    source: str | Path, *, split: str = "train", data_dir: str | None = None, text_unit: str = "line"
) -> list[tuple[str, dict]]:
    """Read every record of a source as ``(where, record)`` pairs.

    Sources: a file of a type in :data:`SUFFIXES`; a folder of such files (its top level, in
    name order); ``tfds:NAME`` (TensorFlow Datasets, with ``data_dir``); anything else is a
    Hugging Face hub dataset name (with ``split``). Raises :class:`DataError` for a malformed
    line (naming ``file:line``), a missing or unsupported file, a record that is not an object,
    and a source with no records.
    """
    source = str(source)
    files = source_files(source)
    if files is not None:
        pairs = [pair for f in files for pair in read_piece(Piece(str(f), text_unit=text_unit))]
    else:
        named = _tfds(source[5:], split, data_dir) if source.startswith("tfds:") else _hub(source, split)
        pairs = list(_objects(named))
    if not pairs:
        raise DataError(f"{source}: no records (the source is empty)")
    return pairs


def head_records(source: str | Path, n: int, *, text_unit: str = "line") -> list[tuple[str, dict]]:
    """The first ``n`` records of a local source, reading no further than they need."""
    out = []
    for piece in pieces(source, text_unit=text_unit):
        for pair in read_piece(piece):
            out.append(pair)
            if len(out) >= n:
                return out
    return out


__all__ = ["PIECE_BYTES", "SUFFIXES", "TEXT_UNITS", "Piece", "head_records", "load_records", "pieces", "read_piece"]
