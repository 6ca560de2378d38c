"""Intervals, paired significance and slices for evaluation reports; NumPy and the standard library only.

    mean, low, high = mean_interval(per_example_losses)                 # Student t, closed form
    bleu, low, high = bootstrap_interval(lambda idx: corpus_bleu(idx), n=len(preds))
    paired_comparison(loss_before, loss_after)     # {"difference", "low", "high", "p_value", "significant"}
    length_buckets([3, 12, 40], edges=(12, 20))    # ["<=12", "<=12", ">20"]

Every resampling function takes a ``seed`` and draws the same index sets for the same ``n``,
``n_resamples`` and seed, so a report is reproducible and two statistics bootstrapped with the
same seed are resampled identically (paired).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np

# ---------------------------------------------------------------------------- Student t


def _t_abs_cdf(t: float, df: int) -> float:
    """P(|T| < t) for integer ``df`` >= 1, t >= 0 (Abramowitz & Stegun 26.7.3-4, exact)."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df == 1:
        return 2 * theta / math.pi
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= (2 * k) / (2 * k + 1) * c * c
            total += term
        return 2 / math.pi * (theta + s * c * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, (df - 2) // 2 + 1):
        term *= (2 * k - 1) / (2 * k) * c * c
        total += term
    return s * total


def _t_pdf(t: float, df: int) -> float:
    log = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log - (df + 1) / 2 * math.log1p(t * t / df))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (0 < p < 1, integer df >= 1).

    Start from the Cornish-Fisher expansion around the normal quantile (A&S 26.7.5; relative
    error < 0.2% at p = 0.975 for df >= 3), then Newton steps on the exact CDF of A&S 26.7.3-4:
    the result matches tables (scipy.stats.t.ppf) to ~1e-10. df = 1, 2 are closed forms.
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    df = int(df)
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    if p < 0.5:
        return -t_quantile(1 - p, df)
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    t = z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    for _ in range(8):  # Newton on F(t) = 1/2 + P(|T| < t) / 2
        step = (0.5 + _t_abs_cdf(t, df) / 2 - p) / _t_pdf(t, df)
        t -= step
        if abs(step) < 1e-12 * max(1.0, abs(t)):
            break
    return t


# ---------------------------------------------------------------------------- intervals


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of per-example ``values`` and its Student t interval,
    ``mean -/+ t_{(1+confidence)/2, n-1} * s / sqrt(n)`` (``s`` the sample standard deviation).

    One value gives ``(v, nan, nan)`` (no spread to estimate); no values raise ValueError.
    """
    x = np.asarray(values, np.float64).ravel()
    if x.size == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = t_quantile((1 + confidence) / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def resample_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """``[n_resamples, n]`` int indices drawn with replacement, a fixed function of its arguments."""
    if n < 1:
        raise ValueError("no examples to resample")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _as_fn(values_or_fn, n: int | None) -> tuple[Callable[[np.ndarray], float], int]:
    if callable(values_or_fn):
        if n is None:
            raise ValueError("a statistic given as fn(indices) needs n, the number of examples")
        return values_or_fn, int(n)
    x = np.asarray(values_or_fn, np.float64)
    return (lambda idx: float(x[idx].mean())), len(x)


def bootstrap_interval(
    values_or_fn, n: int | None = None, *, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(statistic, low, high)``: a percentile bootstrap interval over examples.

    ``values_or_fn``: per-example values (the statistic is their mean), or ``fn(indices) -> float``
    for any corpus-level statistic of the examples at ``indices`` (an int array, repeats allowed;
    corpus BLEU from summed n-gram counts), with ``n`` the number of examples. The statistic is
    ``fn(arange(n))``; the bounds are the ``(1 -/+ confidence) / 2`` quantiles of ``fn`` over
    ``n_resamples`` resamples of ``n`` examples with replacement (deterministic for a ``seed``).
    """
    fn, n = _as_fn(values_or_fn, n)
    stat = float(fn(np.arange(n)))
    if n < 2:
        return stat, math.nan, math.nan
    draws = np.array([fn(idx) for idx in resample_indices(n, n_resamples, seed)], np.float64)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return stat, float(low), float(high)


def paired_comparison(
    a, b, n: int | None = None, *, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict:
    """Paired bootstrap (Koehn 2004) of ``statistic(b) - statistic(a)`` for two systems scored on the
    same examples.

    ``a``, ``b``: per-example values (statistic = mean) or ``fn(indices) -> float`` (then ``n``).
    Both are evaluated on the same resampled index sets. Returns ``a``, ``b``, ``difference``
    (b - a), ``low``/``high`` (its percentile interval), ``p_value``: two-sided, twice the smaller
    share of resamples whose difference is <= 0 or >= 0, each count + 1 over ``n_resamples`` + 1
    (so never 0; capped at 1), and ``significant``: p_value < 1 - confidence. Identical systems
    give differences all 0, so p_value = 1.
    """
    fa, n_a = _as_fn(a, n)
    fb, n_b = _as_fn(b, n)
    if n_a != n_b:
        raise ValueError(f"paired systems need the same examples: {n_a} vs {n_b}")
    full = np.arange(n_a)
    stat_a, stat_b = float(fa(full)), float(fb(full))
    diffs = np.array([fb(idx) - fa(idx) for idx in resample_indices(n_a, n_resamples, seed)], np.float64)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    tail = min(int((diffs <= 0).sum()), int((diffs >= 0).sum()))
    p = min(1.0, 2 * (tail + 1) / (n_resamples + 1))
    return {
        "a": stat_a,
        "b": stat_b,
        "difference": stat_b - stat_a,
        "low": float(low),
        "high": float(high),
        "p_value": p,
        "significant": bool(p < 1 - confidence),
        "confidence": confidence,
        "n": n_a,
        "n_resamples": n_resamples,
    }


# ---------------------------------------------------------------------------- slices


def bucket_edges(values: Sequence[float], quantiles: Sequence[float] = (0.25, 0.5, 0.75)) -> tuple[int, ...]:
    """Increasing integer edges at the ``quantiles`` of ``values`` (repeats dropped)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return ()
    return tuple(sorted({int(math.floor(q)) for q in np.quantile(x, quantiles)}))


def length_buckets(
    lengths: Sequence[int], edges: Sequence[int] | None = None, quantiles: Sequence[float] = (0.25, 0.5, 0.75)
) -> list[str]:
    """A label per length: with edges ``e1 < e2 < ... < ek``: ``"<=e1"``, ``"e1+1-e2"`` (both ends
    included; ``"e2"`` when that range is one value), ..., ``">ek"``. A length equal to an edge is in
    the bucket that edge closes. ``edges=None`` (or empty) takes them from the ``quantiles`` of
    ``lengths`` (:func:`bucket_edges`).
    """
    edges = tuple(sorted(set(int(e) for e in edges))) if edges else bucket_edges(lengths, quantiles)
    if not edges:
        return ["all"] * len(lengths)
    names = [f"<={edges[0]}"]
    for lo, hi in itertools.pairwise(edges):
        names.append(f"{hi}" if lo + 1 == hi else f"{lo + 1}-{hi}")
    names.append(f">{edges[-1]}")
    where = np.searchsorted(np.asarray(edges), np.asarray(lengths), side="left")  # == edge -> that bucket
    return [names[i] for i in where]


def frequency_bucket(count: int) -> str:
    """The bucket of a token seen ``count`` times in training (compare-mt's powers of two):
    ``"0"`` (unseen), ``"1"``, ``"2-3"``, ``"4-7"``, ..., ``"512-1023"``, then ``">=1024"``."""
    count = int(count)
    if count <= 0:
        return "0"
    if count == 1:
        return "1"
    if count >= 1024:
        return ">=1024"
    lo = 1 << (count.bit_length() - 1)
    return f"{lo}-{2 * lo - 1}"


def frequency_buckets(target_token_counts_in_training: Sequence[int]) -> list[str]:
    """:func:`frequency_bucket` of each training count (a token's count, 0 for one never seen)."""
    return [frequency_bucket(c) for c in np.asarray(target_token_counts_in_training).ravel()]


def frequency_order(label: str) -> int:
    """Sort key of :func:`frequency_bucket` labels: rarest first."""
    return 1 << 30 if label.startswith(">=") else int(label.split("-")[0])


def length_order(label: str) -> float:
    """Sort key of :func:`length_buckets` labels: shortest first."""
    if label.startswith("<="):
        return -math.inf
    if label.startswith(">"):
        return math.inf
    return float(label.split("-")[0]) if label[0].isdigit() else 0.0


def field_slices(records: Sequence[dict], field: str, missing: str = "(missing)") -> list[str]:
    """``str(record[field])`` per record, ``missing`` where the record lacks the field (or it is None)."""
    out = []
    for record in records:
        value = record.get(field) if isinstance(record, dict) else None
        out.append(missing if value is None else str(value))
    return out


def groups(labels: Sequence[str]) -> dict[str, np.ndarray]:
    """``{label: indices of the examples with that label}``, labels in first-seen order."""
    out: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        out.setdefault(label, []).append(i)
    return {k: np.asarray(v, np.int64) for k, v in out.items()}


__all__ = [
    "bootstrap_interval",
    "bucket_edges",
    "field_slices",
    "frequency_bucket",
    "frequency_buckets",
    "groups",
    "length_buckets",
    "mean_interval",
    "paired_comparison",
    "resample_indices",
    "t_quantile",
]
