"""Sources -> records -> examples -> rows -> batches, in a deterministic, resumable order.

    pairs = load_records("train.jsonl")                     # [(where, record), ...]
    examples, stats = tokenize_records(pairs, tokenizer, vocab_size=V, max_length=L)
    rows = pack(examples, L)                                # dicts of [L] arrays
    batches = Batches(rows, batch_size=8, seed=0)
    batch = next(batches)                                   # dict of [8, L] arrays
    saved = batches.state()                                 # {"epoch": e, "index": i}

A batch holds ``input_ids``, ``targets`` and ``segment_ids``, ``positions`` (int32) and
``loss_weights`` (float32), all ``[batch, seq_len]``; padding is 0 in every array.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from jft.data.formats import ALPACA, RESPONSE, DataError, Template, encode_kinds

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
KEYS = ("input_ids", "targets", "loss_weights", "segment_ids", "positions")
Example = tuple[np.ndarray, np.ndarray]  # ids [n] int32, weights [n] float32

# ---------------------------------------------------------------------------- load


def _jsonl(path: Path) -> list[tuple[str, dict]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e
            out.append((f"{path}:{n}", record))
    return out


def _json(path: Path) -> list[tuple[str, dict]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    return [(f"{path} record {i}", r) for i, r in enumerate(records, 1)]


def _table(path: Path) -> list[tuple[str, dict]]:
    import datasets

    ds = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
    return [(f"{path} row {i}", r) for i, r in enumerate(ds, 1)]


def _file(path: Path) -> list[tuple[str, dict]]:
    readers = {".jsonl": _jsonl, ".json": _json, ".parquet": _table, ".csv": _table}
    if path.suffix not in readers:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {SUFFIXES}")
    return readers[path.suffix](path)


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


def load_records(source: str | Path, *, split: str = "train", data_dir: str | None = None) -> list[tuple[str, dict]]:
    """Read every record of a source as ``(where, record)`` pairs; ``where`` is ``file:line`` or alike.

    Sources: a ``.jsonl`` / ``.json`` (a list) / ``.parquet`` / ``.csv`` file; a folder of
    such files (its top level, in name order); ``tfds:NAME`` (TensorFlow Datasets, with
    ``data_dir``); anything else is a Hugging Face hub dataset name (with ``split``).
    Raises :class:`DataError` for a malformed line (naming ``file:line``), a missing or
    unsupported file, a record that is not an object, and a source with no records.
    """
    source = str(source)
    path = Path(source).expanduser()
    if source.startswith("tfds:"):
        pairs = _tfds(source[5:], split, data_dir)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and not p.name.startswith("."))
        if not files:
            raise DataError(f"{source}: folder has no {'/'.join(SUFFIXES)} files")
        pairs = [pair for f in files for pair in _file(f)]
    elif path.is_file():
        pairs = _file(path)
    elif path.suffix in SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file or folder")
    else:
        pairs = _hub(source, split)
    for where, record in pairs:
        if not isinstance(record, dict):
            raise DataError(f"{where}: record is a {type(record).__name__}, expected an object of fields")
    if not pairs:
        raise DataError(f"{source}: no records (the source is empty)")
    return pairs


def split_validation(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """``(train, validation)``: a seeded random ``fraction`` of ``items`` held out, order kept.

    At least one item is held out when ``fraction > 0``; none when it is 0.
    """
    n = len(items)
    if not 0 <= fraction < 1:
        raise DataError(f"validation fraction {fraction} must be in [0, 1)")
    k = min(max(1, round(fraction * n)), n - 1) if fraction > 0 else 0
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    if fraction > 0 and not held:
        raise DataError(f"cannot hold out a validation share of {n} record(s); give a validation source")
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# ---------------------------------------------------------------------------- tokenize


@dataclasses.dataclass
class Stats:
    """What tokenization kept and lost; ``str()`` is one log line."""

    records: int = 0  # records read
    truncated: int = 0  # kept, cut to max_length + 1 tokens
    dropped: int = 0  # not kept: over-long (overlong="drop") or nothing to learn
    no_loss: int = 0  # of dropped: zero total loss weight (after truncation)
    tokens: int = 0  # tokens of the kept examples
    response_tokens: int = 0  # of tokens: response tokens (and EOS)

    def __str__(self) -> str:
        return (
            f"{self.records} records, {self.truncated} truncated, {self.dropped} dropped "
            f"({self.no_loss} with no loss weight), {self.tokens} tokens ({self.response_tokens} response)"
        )


def encode_example(
    where: str,
    record: dict,
    tokenizer,
    *,
    vocab_size: int,
    max_length: int,
    overlong: str,
    template: Template,
    weights: tuple[float, float],
    fmt: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, str | None]:
    """One record as :func:`tokenize_records` treats it: ``(ids, kinds, loss weights, truncated, drop)``.

    ``ids`` int32, ``kinds`` (BOS / PROMPT / RESPONSE) and the loss weights float32 (from
    ``weights`` = ``(prompt, response)``) are ``[n]``, cut to ``max_length + 1`` tokens. ``drop`` is
    None for a kept example, ``"overlong"`` (too long, with ``overlong="drop"``) or ``"no_loss"`` (no
    target carries weight, after any truncation). Raises :class:`DataError` for a bad record or a
    token id the model's ``vocab_size`` cannot embed."""
    if overlong not in ("truncate", "drop"):
        raise DataError(f"overlong={overlong!r}; use 'truncate' or 'drop'")
    ids, kinds = encode_kinds(record, tokenizer, template=template, fmt=fmt, where=where)
    top = max(ids, default=0)
    if top >= vocab_size:
        raise DataError(
            f"{where}: token id {top} >= the model's vocab_size {vocab_size}; the tokenizer "
            f"({len(tokenizer)} tokens) does not fit the model. Use the model's own tokenizer"
        )
    too_long = len(ids) > max_length + 1
    ids, kinds = ids[: max_length + 1], np.asarray(kinds[: max_length + 1], np.int64)
    loss_weights = np.array([0.0, *weights], np.float32)[kinds]
    if too_long and overlong == "drop":
        return np.asarray(ids, np.int32), kinds, loss_weights, False, "overlong"
    drop = "no_loss" if loss_weights[1:].sum() <= 0 else None  # the first token is never a target
    return np.asarray(ids, np.int32), kinds, loss_weights, too_long, drop


def tokenize_records(
    pairs: Sequence[tuple[str, dict]],
    tokenizer,
    *,
    vocab_size: int,
    max_length: int,
    overlong: str = "truncate",
    template: Template = ALPACA,
    prompt_loss_weight: float = 0.0,
    response_loss_weight: float = 1.0,
    fmt: str = "auto",
) -> tuple[list[Example], Stats]:
    """Encode every record: ``(examples, stats)``, examples as ``(ids [n] int32, weights [n] f32)``.

    A training row of ``max_length`` positions holds ``max_length + 1`` tokens (inputs and
    targets are shifted by one), so longer examples are cut to that (``overlong="truncate"``)
    or left out (``"drop"``). Examples with zero loss weight are left out. Raises
    :class:`DataError` for a bad record (naming where), a token id the model's
    ``vocab_size`` cannot embed, or when no example is left.
    """
    stats = Stats()
    kept = encoded(
        pairs,
        tokenizer,
        stats,
        vocab_size=vocab_size,
        max_length=max_length,
        overlong=overlong,
        template=template,
        weights=(prompt_loss_weight, response_loss_weight),
        fmt=fmt,
    )
    examples = [(ids, weights) for ids, _, weights in kept]
    check_kept(pairs, stats)
    return examples, stats


def encoded(pairs: Sequence[tuple[str, dict]], tokenizer, stats: Stats, **settings) -> Iterator[tuple]:
    """The kept examples of ``pairs`` in order, ``(ids, kinds, weights)`` as :func:`encode_example`
    gives them (``settings`` are its keywords), each record counted into ``stats``."""
    for where, record in pairs:
        stats.records += 1
        ids, kinds, weights, truncated, drop = encode_example(where, record, tokenizer, **settings)
        stats.truncated += truncated
        stats.dropped += drop is not None
        stats.no_loss += drop == "no_loss"
        if drop:
            continue
        stats.tokens += len(ids)
        stats.response_tokens += int((kinds == RESPONSE).sum())
        yield ids, kinds, weights


def check_kept(pairs: Sequence[tuple[str, dict]], stats: Stats) -> None:
    """Raise :class:`DataError` when records were read and tokenization kept none of them."""
    if pairs and not stats.tokens:
        raise DataError(
            f"all {stats.records} records were dropped (the first: {pairs[0][0]}; {stats}); "
            "check max_length and the loss weights"
        )


# ---------------------------------------------------------------------------- rows


def _row(examples: list[Example], seq_len: int) -> dict[str, np.ndarray]:
    """Shifted examples side by side in one ``[seq_len]`` row; segments 1, 2, ..., padding 0."""
    row = {k: np.zeros(seq_len, np.float32 if k == "loss_weights" else np.int32) for k in KEYS}
    start = 0
    for segment, (ids, weights) in enumerate(examples, 1):
        n = len(ids) - 1
        span = slice(start, start + n)
        row["input_ids"][span] = ids[:-1]
        row["targets"][span] = ids[1:]
        row["loss_weights"][span] = weights[1:]  # the weight of predicting each target
        row["segment_ids"][span] = segment
        row["positions"][span] = np.arange(n)
        start += n
    return row


def pack(examples: Sequence[Example], seq_len: int, *, packed: bool = True) -> list[dict[str, np.ndarray]]:
    """Rows of ``seq_len`` positions: each a dict of ``KEYS`` -> ``[seq_len]`` arrays.

    ``packed``: whole examples go into the current row in order while they fit (next-fit),
    each its own segment, so attention and positions restart per example. Otherwise one
    example per row. An example of ``n + 1`` tokens fills ``n`` positions.
    """
    rows, current, used = [], [], 0
    for ids, weights in examples:
        n = len(ids) - 1
        if n > seq_len:
            raise DataError(f"an example of {n + 1} tokens does not fit seq_len {seq_len}; tokenize with max_length")
        if n < 1:
            continue
        if current and (not packed or used + n > seq_len):
            rows.append(_row(current, seq_len))
            current, used = [], 0
        current.append((ids, weights))
        used += n
    if current:
        rows.append(_row(current, seq_len))
    return rows


# ---------------------------------------------------------------------------- batches


def in_batches(rows: Sequence[dict], batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Every row once, in order, for evaluation: ``(batch, real)`` with ``batch`` a dict of
    ``[batch_size, ...]`` arrays whose first ``real`` rows are data; the last batch is filled with
    all-zero rows (weight 0), so every batch has one shape and one compiled program."""
    for i in range(0, len(rows), batch_size):
        chunk = list(rows[i : i + batch_size])
        real = len(chunk)
        chunk += [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (batch_size - real)
        yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}, real


class Batches:
    """Batches of rows in a seeded order per epoch, resumable from a small JSON state.

    Each epoch visits the rows in ``np.random.default_rng([seed, epoch]).permutation``
    order (or in order, ``shuffle=False``), so any batch follows from ``(seed, epoch,
    index)`` alone. Iterating never ends: it moves on to the next epoch. With
    ``drop_remainder=False`` the last batch of an epoch is filled with empty rows (weight 0),
    so every batch has the same shape.

        batches = Batches(rows, batch_size=8, seed=0)
        batch = next(batches)               # dict of [8, seq_len] arrays
        saved = batches.state()             # {"epoch": 0, "index": 1}
        Batches(rows, 8, 0).restore(saved)  # continues with the batch after
    """

    def __init__(
        self, rows: Sequence[dict], batch_size: int, seed: int, shuffle: bool = True, drop_remainder: bool = True
    ):
        if len(rows) < batch_size:
            raise DataError(
                f"{len(rows)} rows of data is fewer than batch_size {batch_size}; "
                "add data, lower the batch size or shorten seq_len"
            )
        # a list is stacked once ([rows, ...] per key); any other sequence (jft.data.cache.CachedRows)
        # is read a batch at a time, so host memory holds one batch of it
        self.rows = rows
        self.data = {k: np.stack([r[k] for r in rows]) for k in rows[0]} if isinstance(rows, list) else None
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_rows = len(rows)
        n = self.num_rows // batch_size if drop_remainder else math.ceil(self.num_rows / batch_size)
        self.steps_per_epoch = n
        self.epoch, self.index = 0, 0  # the next batch: batch `index` of `epoch`
        self._order = (None, None)

    def order(self, epoch: int) -> np.ndarray:
        """The row indices of ``epoch`` in visiting order ``[rows]``."""
        if self._order[0] != epoch:
            rows = np.arange(self.num_rows)
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(rows) if self.shuffle else rows)
        return self._order[1]

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``epoch``: a dict of ``[batch_size, seq_len]`` arrays."""
        take = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        pad = self.batch_size - len(take)
        if self.data is None:
            rows = [self.rows[int(i)] for i in take]
            picked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        else:
            picked = {k: v[take] for k, v in self.data.items()}
        return {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in picked.items()}

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Every batch of one epoch, in order (does not move the iterator)."""
        return (self.batch(epoch, i) for i in range(self.steps_per_epoch))

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        batch = self.batch(self.epoch, self.index)
        self.index += 1
        return batch

    def state(self) -> dict[str, int]:
        """Where the iterator is: ``{"epoch": e, "index": batches of epoch e already returned}``."""
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        """Continue from a :meth:`state`: the next batch is the one an unbroken run would see."""
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data position {state} is not {{'epoch': int, 'index': int}}") from e
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise DataError(
                f"data position {state} does not fit {self.steps_per_epoch} batches per epoch; "
                "the data or batch size changed since it was saved"
            )
        self.epoch, self.index = epoch, index
