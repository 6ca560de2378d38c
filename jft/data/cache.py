"""A tokenized, packed, memory-mapped data cache: tokenize once, in parallel, then read rows from disk.

    cache = build_cache("train.jsonl", tokenizer, cache_root="~/.cache/jft", vocab_size=V,
                        max_length=L, num_proc=8)           # or a list of (where, record) pairs
    ids, weights = cache[0]                                 # example 0: [n] int32, [n] float32
    bounds = cache.rows(L)                                  # [rows + 1] int64: row r = examples
    row = cache.row(3, L)                                   #   bounds[r]:bounds[r + 1]; a dict as pack's
    print(cache.stats)                                      # the same counts as tokenize_records

Every record is encoded by :func:`jft.data.pipeline.encode_example`, the rule
:func:`~jft.data.pipeline.tokenize_records` uses, so the kept examples, their loss weights and
the :class:`~jft.data.pipeline.Stats` are those of the in-memory pipeline; ``cache.rows(seq_len)``
is the row layout :func:`~jft.data.pipeline.pack` gives (next-fit in example order needs only the
example lengths, so it streams and is computed once per ``seq_len``, then stored in the cache).

On disk, ``cache_root/<key>/`` holds ``manifest.json`` (settings, counts, shards) and per shard
``shard-00000.ids.npy`` (int32 ``[tokens]``, the examples end to end), ``.kinds.npy`` (uint8
``[tokens]``: BOS / PROMPT / RESPONSE) and ``.offsets.npy`` (int64 ``[examples + 1]``). The loss
weight of a token is ``weights[kind]`` with the float32 ``(0, prompt, response)`` table of the
manifest: one byte per token and exact for any weights, where a float16 copy would round them.

``key`` hashes the data (in-memory records: their JSON; files: path, size and mtime, or the
content of small files), the tokenizer (its serialized vocabulary, merges, added tokens and chat
template), the template and every setting, but not ``num_proc``, which changes nothing written.
The same inputs reuse the cache; any change builds a new folder. A cache is built in a hidden
temporary folder renamed into place when complete, so a crash never leaves a folder that looks
finished; a damaged one (missing or truncated file, bad manifest) is a :class:`DataError` naming
the file and saying to delete the folder.

Workers are ``multiprocessing`` processes that encode the pieces of local files (which they read
themselves, :mod:`jft.data.sources`) or chunks of in-memory records, with ``encode_example``, one
record at a time, and send back arrays; the main process writes them, in order, as shards.
Workers fork on Linux while JAX has no backend running (nothing multithreaded to inherit), else
spawn. ``datasets.map(num_proc=...)`` was measured against it (``benchmarks/bench_data.py
--records 760000 --words 200 --num-proc 2 --train --compare-datasets``: 201M tokens, a 2-core VM,
imports included): 581k tokens/s per core against datasets.map's 204k and tokenize_records' 372k
(one process), with a main process of 705 MiB against 6.9 GB and 3.5 GB; a resumed run reaches
its first batch 5.8 s after it starts, at 1.15 GB RSS, the same as at a tenth of the size
(benchmarks/RESULTS.md). ``datasets.map`` also first copies every record into Arrow and writes an
Arrow cache per worker, and ``Dataset.from_list`` takes its columns from the first record, so in a
mix of formats it silently turns ``{"instruction", "output"}`` records into ``{"text": None}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jft.data.formats import ALPACA, DataError, Template
from jft.data.pipeline import Stats, _row, check_kept, encoded
from jft.data.sources import PIECE_BYTES, Piece, load_records, pieces, read_piece, source_files
from jft.safetensors_io import atomic_write

log = logging.getLogger(__name__)

VERSION = 1  # of the on-disk layout; part of the key
MANIFEST = "manifest.json"
SMALL_FILE = 1 << 22  # files up to 4 MiB are keyed by content, larger ones by size and mtime
PARTS = ("ids", "kinds", "offsets")
DTYPES = {"ids": np.int32, "kinds": np.uint8, "offsets": np.int64}

# ---------------------------------------------------------------------------- key


def _sources(data) -> list | None:
    """``data`` as a list of sources (paths or names), or None for in-memory ``(where, record)`` pairs."""
    if isinstance(data, (str, os.PathLike)):
        return [data]
    if data and all(isinstance(d, (str, os.PathLike)) for d in data):
        return list(data)
    return None


def _hash_data(data) -> dict:
    """What identifies the records: a content hash for in-memory pairs, file stats for sources."""
    sources = _sources(data)
    if sources is not None:
        out = []
        for source in sources:
            files = source_files(source)
            if files is None:  # a hub or tfds name: only the name identifies it
                out.append({"name": str(source)})
                continue
            for f in files:
                st = f.stat()
                entry = {"path": str(f.resolve()), "size": st.st_size}
                if st.st_size <= SMALL_FILE:
                    entry["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
                else:
                    entry["mtime_ns"] = st.st_mtime_ns
                out.append(entry)
        return {"sources": out}
    h = hashlib.sha256()
    for where, record in data:
        h.update(json.dumps([where, record], sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return {"records": len(data), "sha256": h.hexdigest()}


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: its serialized form (or saved files), BOS/EOS, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: hash the files it saves
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for f in sorted(Path(tmp).iterdir()):
                h.update(f.name.encode() + b"\0" + f.read_bytes())
    extra = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id]
    h.update(json.dumps([*extra, getattr(tokenizer, "chat_template", None)], default=str).encode())
    return h.hexdigest()


def cache_key(data, tokenizer, settings: dict) -> str:
    """The folder name of a cache: 24 hex digits of sha256 over data, tokenizer and settings."""
    blob = {"version": VERSION, "data": _hash_data(data), "tokenizer": tokenizer_hash(tokenizer), **settings}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------- workers

_WORKER: dict = {}  # per process: the tokenizer and encode_example's settings


def _init_worker(tokenizer, settings: dict) -> None:
    _WORKER.update(tokenizer=tokenizer, settings=settings)


def _encode_task(task: Piece | Sequence[tuple[str, dict]]) -> dict:
    """Encode a piece of a file (read here) or a chunk of records: the kept examples end to end
    (``ids``, ``kinds``), their lengths, the counts and where the first record is."""
    tokenizer, s = _WORKER["tokenizer"], _WORKER["settings"]
    stats, ids, kinds, lengths, first = Stats(), [], [], [], []
    pairs = read_piece(task) if isinstance(task, Piece) else task

    def noted(pairs):  # remember where the first record is, for the all-dropped error
        for pair in pairs:
            if not first:
                first.append(pair[0])
            yield pair

    kept = encoded(
        noted(pairs),
        tokenizer,
        stats,
        vocab_size=s["vocab_size"],
        max_length=s["max_length"],
        overlong=s["overlong"],
        template=Template(**s["template"]),
        weights=(s["prompt_loss_weight"], s["response_loss_weight"]),
        fmt=s["fmt"],
    )
    for one_ids, one_kinds, _ in kept:
        ids.append(one_ids)
        kinds.append(one_kinds.astype(np.uint8))
        lengths.append(len(one_ids))
    return {
        "ids": np.concatenate(ids) if ids else np.zeros(0, np.int32),
        "kinds": np.concatenate(kinds) if kinds else np.zeros(0, np.uint8),
        "lengths": np.asarray(lengths, np.int64),
        "stats": stats,
        "first": first[0] if first else "",
        "size": task.size if isinstance(task, Piece) else len(task),
    }


class _Shards:
    """Chunks in record order -> shard files of about ``shard_tokens`` tokens (a shard ends after
    the chunk that reaches it), so the layout depends on the data and settings only."""

    def __init__(self, folder: Path, shard_tokens: int):
        self.folder, self.shard_tokens = folder, shard_tokens
        self.shards, self.pending, self.tokens = [], [], 0

    def add(self, chunk: dict) -> None:
        self.pending.append(chunk)
        self.tokens += len(chunk["ids"])
        if self.tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.shards):05d}"
        lengths = np.concatenate([c["lengths"] for c in self.pending])
        arrays = {
            "ids": np.concatenate([c["ids"] for c in self.pending]),
            "kinds": np.concatenate([c["kinds"] for c in self.pending]),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]),
        }
        for part, array in arrays.items():
            np.save(self.folder / f"{name}.{part}.npy", array.astype(DTYPES[part]))
        self.shards.append({"name": name, "examples": len(lengths), "tokens": len(arrays["ids"])})
        self.pending, self.tokens = [], 0


# ---------------------------------------------------------------------------- build


def build_cache(
    data,
    tokenizer,
    *,
    cache_root: str | os.PathLike,
    vocab_size: int,
    max_length: int,
    overlong: str = "truncate",
    template: Template = ALPACA,
    prompt_loss_weight: float = 0.0,
    response_loss_weight: float = 1.0,
    fmt: str = "auto",
    seq_len: int | None = None,
    packed: bool = True,
    num_proc: int = 1,
    start_method: str | None = None,
    chunk_records: int = 1024,
    piece_bytes: int = PIECE_BYTES,
    text_unit: str = "line",
    shard_tokens: int = 1 << 24,
    progress: bool = True,
) -> TokenCache:
    """Tokenize ``data`` into ``cache_root/<key>/`` (or reuse it) and open it.

    ``data``: ``(where, record)`` pairs, or a source or list of sources for
    :func:`~jft.data.sources.load_records`. The settings are those of
    :func:`~jft.data.pipeline.tokenize_records`; ``seq_len`` (default ``max_length``) and
    ``packed`` choose the row layout stored with it (others are added on first use of
    :meth:`TokenCache.rows`). ``num_proc`` processes encode the tasks: pieces of about
    ``piece_bytes`` of local files (:func:`~jft.data.sources.pieces`, ``text_unit`` for .txt),
    which each worker reads itself, so the main process never holds the records; or chunks of
    ``chunk_records`` in-memory records (pairs, hub and TFDS datasets). The results are written
    in order as shards of about ``shard_tokens`` tokens (5 bytes each); the files do not depend
    on ``num_proc``. ``start_method`` (multiprocessing's) defaults to ``fork`` on Linux
    before JAX has started a backend, else ``spawn``, which re-imports the caller's main module
    in every worker: a script then needs ``if __name__ == "__main__":``. Raises :class:`DataError`
    for a bad record (naming where), a token id ``vocab_size`` cannot embed, or when every record
    is dropped.
    """
    if overlong not in ("truncate", "drop"):
        raise DataError(f"overlong={overlong!r}; use 'truncate' or 'drop'")
    settings = {
        "vocab_size": int(vocab_size),
        "max_length": int(max_length),
        "overlong": overlong,
        "template": dataclasses.asdict(template),
        "prompt_loss_weight": float(prompt_loss_weight),
        "response_loss_weight": float(response_loss_weight),
        "fmt": fmt,
        "chunk_records": int(chunk_records),
        "piece_bytes": int(piece_bytes),
        "text_unit": text_unit,
        "shard_tokens": int(shard_tokens),
    }
    root = Path(cache_root).expanduser()
    key = cache_key(data, tokenizer, settings)
    folder = root / key
    if not (folder / MANIFEST).exists():
        tasks, unit = _tasks(data, settings)
        root.mkdir(parents=True, exist_ok=True)
        write = lambda tmp: _write(tmp, tasks, unit, tokenizer, settings, key, num_proc, start_method, progress)
        try:
            atomic_write(folder, write)
        except OSError:
            if not (folder / MANIFEST).exists():
                raise
            # another process finished the same cache first; theirs is as good as ours
        log.info("tokenized data cache written to %s", folder)
    else:
        log.info("reusing the tokenized data cache %s", folder)
    cache = TokenCache(folder)
    cache.rows(max_length if seq_len is None else seq_len, packed=packed)
    return cache


def _tasks(data, settings: dict) -> tuple[list, str]:
    """``(tasks, unit)``: pieces of local files (unit bytes), else chunks of records (unit records)."""
    sources = _sources(data)
    if sources is not None and all(source_files(s) is not None for s in sources):
        size, text_unit = settings["piece_bytes"], settings["text_unit"]
        return [p for s in sources for p in pieces(s, piece_bytes=size, text_unit=text_unit)], "B"
    if sources is not None:
        data = [pair for s in sources for pair in load_records(s, text_unit=settings["text_unit"])]
    n = settings["chunk_records"]
    return [data[i : i + n] for i in range(0, len(data), n)], "rec"


def _start_method() -> str:
    """``fork`` on Linux while no JAX backend runs (nothing multithreaded to inherit), else ``spawn``."""
    try:
        from jax._src import xla_bridge

        live = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        live = True
    return "fork" if sys.platform == "linux" and not live else "spawn"


def _write(tmp: Path, tasks, unit, tokenizer, settings: dict, key: str, num_proc: int, start_method, progress) -> None:
    from tqdm.auto import tqdm

    if tmp.exists():  # left by a crashed build with this process id
        shutil.rmtree(tmp)
    tmp.mkdir()
    writer, stats, first = _Shards(tmp, settings["shard_tokens"]), [], ""
    total = sum(t.size for t in tasks) if unit == "B" else sum(map(len, tasks))
    bar = tqdm(total=total, desc="tokenize", unit=unit, unit_scale=True, dynamic_ncols=True, disable=not progress)
    pool = None
    try:
        if num_proc <= 1 or len(tasks) <= 1:
            _init_worker(tokenizer, settings)
            results = map(_encode_task, tasks)
        else:
            ctx = multiprocessing.get_context(start_method or _start_method())
            pool = ctx.Pool(min(num_proc, len(tasks)), _init_worker, (tokenizer, settings))
            results = pool.imap(_encode_task, tasks)  # in order, so the shards are too
        for result in results:
            stats.append(result.pop("stats"))
            first = first or result.pop("first")
            bar.update(result.pop("size"))
            writer.add(result)
        writer.flush()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    shards = writer.shards
    stats = Stats(**{f.name: sum(getattr(s, f.name) for s in stats) for f in dataclasses.fields(Stats)})
    if not stats.records:
        where = tasks[0].path if tasks and isinstance(tasks[0], Piece) else "the data"
        raise DataError(f"{where}: no records (the source is empty)")
    check_kept(stats, first)
    manifest = {
        "version": VERSION,
        "key": key,
        "settings": settings,
        "weights": [0.0, settings["prompt_loss_weight"], settings["response_loss_weight"]],
        "stats": dataclasses.asdict(stats),
        "examples": sum(s["examples"] for s in shards),
        "shards": shards,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


# ---------------------------------------------------------------------------- read


def _damaged(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}; the data cache is damaged. Delete the folder {path.parent} to rebuild it")


class TokenCache:
    """An opened cache folder: ``len`` examples, ``cache[i] -> (ids [n] int32, weights [n] float32)``.

    Every array is memory-mapped (``np.load(mmap_mode="r")``): opening reads the manifest and the
    file headers, so it takes the same time and memory for any corpus, and an example is three
    slices. Raises :class:`DataError` naming
    the file when the manifest or a shard is missing, malformed or of the wrong size.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
            shards = self.manifest["shards"]
            self.stats = Stats(**self.manifest["stats"])
            self.weights = np.asarray(self.manifest["weights"], np.float32)  # [3]: by token kind
        except FileNotFoundError as e:
            raise _damaged(path, "no manifest") from e
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise _damaged(path, f"malformed manifest ({e})") from e
        if self.manifest.get("version") != VERSION:
            raise _damaged(path, f"layout version {self.manifest.get('version')}, expected {VERSION}")
        self.settings = self.manifest["settings"]
        self._ids, self._kinds, self._offsets = [], [], []
        for shard in shards:
            arrays = {}
            for part in PARTS:
                file = self.folder / f"{shard['name']}.{part}.npy"
                size = shard["examples"] + 1 if part == "offsets" else shard["tokens"]
                try:
                    arrays[part] = np.load(file, mmap_mode="r")
                except FileNotFoundError as e:
                    raise _damaged(file, "missing") from e
                except (ValueError, OSError, EOFError) as e:  # a truncated or garbled .npy
                    raise _damaged(file, f"unreadable ({e})") from e
                got, want = arrays[part], np.dtype(DTYPES[part])
                if got.shape != (size,) or got.dtype != want:
                    raise _damaged(file, f"{got.dtype} {got.shape}, the manifest says {want} ({size},)")
            offsets = arrays["offsets"]
            if offsets[0] != 0 or offsets[-1] != shard["tokens"]:
                raise _damaged(self.folder / f"{shard['name']}.offsets.npy", "offsets do not match the tokens")
            self._ids.append(arrays["ids"])
            self._kinds.append(arrays["kinds"])
            self._offsets.append(offsets)
        counts = [len(o) - 1 for o in self._offsets]
        self._first = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # [shards + 1]

    @property
    def lengths(self) -> np.ndarray:
        """``[examples]`` int64 token counts (read from every shard's offsets: O(examples))."""
        return np.concatenate([np.diff(o) for o in self._offsets]) if self._offsets else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example ``i``: ``(ids [n] int32, loss weights [n] float32)``, as tokenize_records gives it."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of a cache of {len(self)}")
        i %= len(self)
        s = int(np.searchsorted(self._first, i, side="right")) - 1  # the shard; few shards, so cheap
        lo, hi = self._offsets[s][i - self._first[s]], self._offsets[s][i - self._first[s] + 1]
        return np.asarray(self._ids[s][lo:hi]), self.weights[self._kinds[s][lo:hi]]

    def examples(self, start: int = 0, stop: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Examples ``start:stop`` as a list (for tests and small data)."""
        return [self[i] for i in range(start, len(self) if stop is None else stop)]

    def rows(self, seq_len: int, packed: bool = True) -> np.ndarray:
        """The row layout :func:`~jft.data.pipeline.pack` gives: ``[rows + 1]`` int64 example bounds.

        Row ``r`` holds examples ``bounds[r]:bounds[r + 1]``. Computed from the lengths once per
        ``(seq_len, packed)`` and stored in the folder (atomically) for the next run.
        """
        file = self.folder / f"rows-{seq_len}-{'packed' if packed else 'single'}.npy"
        bounds = self._stored(file, lambda: pack_bounds(self.lengths, seq_len, packed=packed))
        if bounds.ndim != 1 or bounds[0] != 0 or bounds[-1] != len(self):
            raise _damaged(file, "its rows do not cover the examples")
        return bounds

    def _stored(self, file: Path, compute) -> np.ndarray:
        """An array computed from the cache once, then read from ``file`` in the folder."""
        if file.exists():
            try:
                return np.load(file, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:
                raise _damaged(file, f"unreadable ({e})") from e
        array = compute()
        atomic_write(file, lambda tmp: np.save(tmp, array))
        return array

    def row(self, r: int, seq_len: int, packed: bool = True) -> dict[str, np.ndarray]:
        """Packed row ``r``: a dict of ``KEYS`` -> ``[seq_len]`` arrays, equal to ``pack(...)[r]``."""
        bounds = self.rows(seq_len, packed)
        return _row([self[i] for i in range(bounds[r], bounds[r + 1])], seq_len)


class CachedRows(Sequence):
    """The packed rows of a :class:`TokenCache` as a read-only sequence: ``rows[r]`` is the dict
    ``pack(...)[r]`` would hold, built from the memory-mapped shards when it is read, so a corpus
    of any size costs host memory for the rows of one batch (:class:`jft.data.Batches` reads them so)."""

    def __init__(self, cache: TokenCache, seq_len: int, packed: bool = True):
        self.cache, self.seq_len, self.packed = cache, seq_len, packed
        self.bounds = cache.rows(seq_len, packed)  # [rows + 1]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, r):
        if not 0 <= r < len(self):
            raise IndexError(f"row {r} of {len(self)}")
        lo, hi = int(self.bounds[r]), int(self.bounds[r + 1])
        return _row([self.cache[i] for i in range(lo, hi)], self.seq_len)

    def target_counts(self, vocab: int) -> np.ndarray:
        """``[vocab]``: how often each token is a weighted training target (as the SFT objective
        counts), over the whole cache; computed once, then stored in its folder."""
        cache = self.cache

        def count():
            counts = np.zeros(vocab, np.int64)
            for ids, kinds, offsets in zip(cache._ids, cache._kinds, cache._offsets, strict=True):
                target = cache.weights[np.asarray(kinds)] > 0
                target[offsets[:-1]] = False  # an example's first token is never a target
                counts += np.bincount(np.asarray(ids)[target], minlength=vocab)
            return counts

        return cache._stored(cache.folder / f"targets-{vocab}.npy", count)


def pack_bounds(lengths: np.ndarray, seq_len: int, *, packed: bool = True) -> np.ndarray:
    """Next-fit packing over example lengths (tokens): ``[rows + 1]`` example bounds.

    The same rule as :func:`~jft.data.pipeline.pack`: an example of ``n + 1`` tokens fills ``n``
    positions; it starts a new row when it does not fit the current one (or always, unpacked).
    Cached examples always have 2+ tokens, so no example is skipped as pack skips 1-token ones.
    """
    if len(lengths) and int(lengths.min()) < 2:
        raise DataError("an example of fewer than 2 tokens has no target; the cache cannot hold it")
    if len(lengths) and int(lengths.max()) - 1 > seq_len:
        raise DataError(
            f"an example of {int(lengths.max())} tokens does not fit seq_len {seq_len}; tokenize with max_length"
        )
    starts, used = [0], 0
    for i, n in enumerate((np.asarray(lengths, np.int64) - 1).tolist()):
        if i and (not packed or used + n > seq_len):
            starts.append(i)
            used = 0
        used += n
    starts.append(len(lengths))
    return np.asarray(starts if len(lengths) else [0], np.int64)
