"""Mixtures of sources: the rows of several sources at given weights, as one sequence of rows.

    rows = Mixture([domain_rows, instruction_rows], weights=[0.9, 0.1], seed=0)
    batches = Batches(rows, batch_size=8, seed=0)      # about 90% domain rows in each batch

One epoch of a mixture is the fewest rows in which every row of every source comes at least once
at these weights: ``n = max_s ceil(rows_s / w_s)`` rows (weights normalized), of which source ``s``
fills ``max(rows_s, round(w_s * n))``. A source with more places than rows repeats: each full pass
over it visits all of its rows, and the last, partial pass a seeded spread of them (an affine
permutation ``(a * r + b) mod rows_s``). Position ``i`` maps to its source row in O(1), so
:class:`~jft.data.Batches` shuffles, batches and resumes a mixture as any sequence of rows, and
the order depends on the seed alone. Rows never mix sources (each source is packed on its own).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jft.data.formats import DataError


@dataclasses.dataclass(frozen=True)
class Part:
    """One training source of a run: its ``(where, record)`` pairs, or a local file or folder that
    the data cache's workers read (``data.cache_dir``), and its weight in the mixture."""

    data: list | str
    weight: float = 1.0


def as_parts(train) -> list[Part]:
    """A run's training data as parts: a list of :class:`Part` s as it is, records as one part."""
    return train if train and isinstance(train[0], Part) else [Part(train)]


class Mixture(Sequence):
    """Rows of ``parts`` (sequences of row dicts) at ``weights`` (see the module docstring)."""

    def __init__(self, parts: Sequence[Sequence[dict]], weights: Sequence[float], seed: int):
        if len(parts) != len(weights) or not parts:
            raise DataError(f"a mixture needs one weight per source: {len(parts)} sources, {len(weights)} weights")
        if any(not w > 0 for w in weights):
            raise DataError(f"mixture weights {list(weights)} must all be > 0")
        for i, part in enumerate(parts):
            if not len(part):
                raise DataError(f"mixture source {i} has no rows")
        total = float(sum(weights))
        self.parts, self.seed = list(parts), seed
        self.weights = [w / total for w in weights]
        n = max(math.ceil(len(p) / w - 1e-9) for p, w in zip(parts, self.weights, strict=True))
        self.counts = [max(len(p), round(w * n)) for p, w in zip(parts, self.weights, strict=True)]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])  # [sources + 1]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def source_row(self, i: int) -> tuple[int, int]:
        """``(source, row)`` of position ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of a mixture of {len(self)}")
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        size = len(self.parts[s])
        cycle, r = divmod(i - int(self.starts[s]), size)
        if cycle == 0:
            return s, r
        rng = np.random.default_rng([self.seed, s, cycle])
        a = int(rng.integers(1, max(size, 2)))
        while math.gcd(a, size) != 1:
            a = a % size + 1
        return s, (a * r + int(rng.integers(size))) % size

    def __getitem__(self, i):
        s, r = self.source_row(i)
        return self.parts[s][r]

    def describe(self) -> str:
        """One line: each source's weight, rows and places per epoch."""
        shares = (
            f"{w:.3g}: {len(p)} rows in {c}" for p, w, c in zip(self.parts, self.weights, self.counts, strict=True)
        )
        return f"mixture of {len(self.parts)} sources ({'; '.join(shares)} places per epoch)"


__all__ = ["Mixture", "Part", "as_parts"]
