"""Records -> examples -> rows -> batches, in a deterministic, resumable order.

    pairs = load_records("train.jsonl")                     # jft.data.sources: [(where, record), ...]
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
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from jft.data.formats import ALPACA, RESPONSE, DataError, Template, encode_kinds

KEYS = ("input_ids", "targets", "loss_weights", "segment_ids", "positions")
Example = tuple[np.ndarray, np.ndarray]  # ids [n] int32, weights [n] float32

# ---------------------------------------------------------------------------- split


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
    check_kept(stats, pairs[0][0] if pairs else "")
    return examples, stats


def encoded(pairs: Iterable[tuple[str, dict]], tokenizer, stats: Stats, **settings) -> Iterator[tuple]:
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


def check_kept(stats: Stats, first: str) -> None:
    """Raise :class:`DataError` when records were read and tokenization kept none of them
    (``first``: where the first record is)."""
    if stats.records and not stats.tokens:
        raise DataError(
            f"all {stats.records} records were dropped (the first: {first}; {stats}); "
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
    so every batch has the same shape. ``positions`` (indices into a batch) makes every batch
    just those of its rows: on a pod each host builds only the rows its devices hold
    (:func:`jft.sharding.host_rows`), and the global batch is the same for any host count
    (Grain's sampler shards the records per host instead, so its global batches change with the
    host count: benchmarks/grain_host_order.py).

        batches = Batches(rows, batch_size=8, seed=0)
        batch = next(batches)               # dict of [8, seq_len] arrays
        saved = batches.state()             # {"epoch": 0, "index": 1}
        Batches(rows, 8, 0).restore(saved)  # continues with the batch after
    """

    def __init__(
        self,
        rows: Sequence[dict],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_remainder: bool = True,
        positions: Sequence[int] | None = None,
    ):
        if len(rows) < batch_size:
            raise DataError(
                f"{len(rows)} rows of data is fewer than batch_size {batch_size}; "
                "add data, lower the batch size or shorten seq_len"
            )
        # a list is stacked once ([rows, ...] per key); any other sequence (jft.data.cache.CachedRows,
        # jft.data.mixture.Mixture) is read a batch at a time, so host memory holds one batch of it
        self.rows = rows
        self.data = {k: np.stack([r[k] for r in rows]) for k in rows[0]} if isinstance(rows, list) else None
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.positions = None if positions is None else np.asarray(positions, np.int64)
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
        """Batch ``index`` of ``epoch``: a dict of ``[batch_size, seq_len]`` arrays, or with
        ``positions`` only those rows of it (``[len(positions), seq_len]``: a host's share)."""
        take = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        take = np.concatenate([take, np.full(self.batch_size - len(take), -1)])  # -1: an empty row
        if self.positions is not None:
            take = take[self.positions]
        if self.data is None:
            got = {int(i): self.rows[int(i)] for i in take if i >= 0}
            like = next(iter(got.values())) if got else self.rows[0]
            blank = {k: np.zeros_like(v) for k, v in like.items()}
            rows = [got[int(i)] if i >= 0 else blank for i in take]
            return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        real = take >= 0
        return {
            k: np.where(real.reshape(-1, *[1] * (v.ndim - 1)), v[np.maximum(take, 0)], 0) for k, v in self.data.items()
        }

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
