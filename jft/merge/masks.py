"""Which entries of a task vector a merge keeps: sparsification and TIES sign consensus.

``magnitude`` keeps the ``max(1, int(density * n))`` largest |d|; ``random`` (DARE) keeps each
entry with probability ``density``; ``magnitude_outliers`` (breadcrumbs) drops the
``int(gamma * n)`` largest and the smallest so that ``int(density * n)`` remain; ``magprune``
(DELLA) keeps each entry with a probability that grows with its magnitude rank along the rows
(``density - epsilon`` for the smallest, ``density + epsilon`` for the largest, linear in the
rank between). Optionally the kept entries are rescaled to the L1 norm the task vector had.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array | np.ndarray

SPARSIFICATIONS = ("magnitude", "random", "magnitude_outliers", "magprune")


def _rescaled(delta: jax.Array, mask: jax.Array, rescale: bool, eps: float = 1e-7) -> jax.Array:
    """``delta * mask``, scaled back to the L1 norm of ``delta`` when ``rescale`` (and both norms > eps)."""
    kept = delta * mask
    if not rescale:
        return kept
    before, after = jnp.abs(delta).sum(), jnp.abs(kept).sum()
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, kept * (before / jnp.where(ok, after, 1.0)), kept)


def sparsify(
    delta: Array,
    density: float,
    method: str,
    rescale: bool = False,
    gamma: float = 0.01,
    rng: jax.Array | None = None,
    epsilon: float = 0.15,
) -> jax.Array:
    """Keep part of a task vector: ``magnitude`` (largest |d|), ``random`` (each entry with
    probability ``density``; needs ``rng``), ``magnitude_outliers`` (largest ``gamma`` dropped too)
    or ``magprune`` (probability ``density +- epsilon`` by magnitude rank, :func:`magprune_probabilities`;
    needs ``rng``; ``density +- epsilon`` must lie in (0, 1))."""
    delta = jnp.asarray(delta)
    if density >= 1:
        return delta
    n = delta.size
    flat = jnp.abs(delta).reshape(-1).astype(jnp.float32)
    if method == "magnitude":
        if density <= 0 or n == 0:
            return jnp.zeros_like(delta)
        mask = top_mask(flat, max(1, int(density * n))).reshape(delta.shape).astype(delta.dtype)
    elif method == "magnitude_outliers":
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        mask = (_bottom(flat, bottom + target) & ~_bottom(flat, bottom)).reshape(delta.shape).astype(delta.dtype)
    elif method == "random":
        if rng is None:
            raise ValueError("random sparsification (DARE) needs an rng key")
        mask = jax.random.bernoulli(rng, density, delta.shape).astype(delta.dtype)
    elif method == "magprune":
        if density <= 0:
            return jnp.zeros_like(delta)
        if rng is None:
            raise ValueError("magprune sparsification (DELLA) needs an rng key")
        probs = magprune_probabilities(delta, density, epsilon)
        mask = jax.random.bernoulli(rng, probs).astype(delta.dtype)
    else:
        raise ValueError(f"unknown sparsification {method!r}; use one of {', '.join(SPARSIFICATIONS)}")
    return _rescaled(delta, mask, rescale)


def magprune_probabilities(delta: Array, density: float, epsilon: float) -> jax.Array:
    """DELLA's keep probabilities, shaped like ``delta``: along axis 1 (a vector is one row),
    ``density - epsilon + 2 * epsilon * r / (n - 1)`` for the entry of magnitude rank ``r``
    (0 = smallest of the row's ``n``). Their mean is ``density``."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"magprune: density {density} +- epsilon {epsilon} must lie in (0, 1); lower epsilon or change density"
        )
    delta = jnp.asarray(delta)
    rows = delta if delta.ndim >= 2 else delta.reshape(1, -1)
    ranks = _ranks(jnp.abs(rows).astype(jnp.float32))
    rank_norm = ranks / max(rows.shape[1] - 1, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(delta.shape)


def _ranks(values: jax.Array) -> jax.Array:
    """Float32 rank (0 = smallest) of each entry along axis 1; on the host for concrete arrays."""
    if not isinstance(values, jax.core.Tracer):
        host = np.asarray(values)
        return jnp.asarray(np.argsort(np.argsort(host, axis=1, kind="stable"), axis=1), jnp.float32)
    return jnp.argsort(jnp.argsort(values, axis=1, stable=True), axis=1).astype(jnp.float32)


def _kth_largest(bits: jax.Array, k: int) -> jax.Array:
    """The k-th largest of non-negative float32 bit patterns (int32, ordered like the floats):
    a partial sort on the host for concrete arrays, else (under jit) bisection on the value, 32
    counting passes (XLA's CPU sort is much slower than either)."""
    if not isinstance(bits, jax.core.Tracer):
        host = np.asarray(bits)
        return jnp.int32(np.partition(host, host.size - k)[host.size - k])

    def step(_, bounds):
        lo, hi = bounds  # count(bits >= lo) >= k > count(bits >= hi)
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(bits >= mid) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, 32, step, (jnp.int32(0), jnp.int32(0x7F800001)))[0]


def top_mask(values: jax.Array, k: int) -> jax.Array:
    """Mask of exactly ``k`` largest of non-negative float32 ``values`` (ties: lower index first)."""
    if k <= 0:
        return jnp.zeros(values.shape, bool)
    if k >= values.size:
        return jnp.ones(values.shape, bool)
    bits = jax.lax.bitcast_convert_type(values, jnp.int32)
    t = _kth_largest(bits, k)
    return _with_ties(bits > t, bits == t, k)


def _bottom(values: jax.Array, m: int) -> jax.Array:
    """Mask of exactly ``m`` smallest of non-negative ``values`` (ties: lower index first)."""
    if m <= 0:
        return jnp.zeros(values.shape, bool)
    if m >= values.size:
        return jnp.ones(values.shape, bool)
    bits = jax.lax.bitcast_convert_type(values, jnp.int32)
    t = _kth_largest(bits, values.size - m + 1)
    return _with_ties(bits < t, bits == t, m)


def _with_ties(strict: jax.Array, tie: jax.Array, count: int) -> jax.Array:
    """``strict`` plus the first entries of ``tie`` (by index) that make ``count`` in all; the
    running count is only computed when values tie at the threshold (a scan is slow on CPU)."""
    need = count - strict.sum()
    return jax.lax.cond(tie.sum() == need, _all_ties, _first_ties, strict, tie, need)


def _all_ties(strict, tie, need):
    return strict | tie


def _first_ties(strict, tie, need):
    return strict | (tie & (jnp.cumsum(tie) <= need))


def consensus_mask(deltas: jax.Array, method: str = "sum") -> jax.Array:
    """TIES sign election over the model axis: True where an entry's sign equals the elected one,
    the sign of the sum of the (weighted) deltas (``sum``) or of the sign count (``count``); a
    zero total elects +."""
    sign = jnp.sign(deltas)
    if method == "sum":
        elected = jnp.where(deltas.sum(0) >= 0, 1.0, -1.0)
    elif method == "count":
        elected = jnp.where(sign.sum(0) >= 0, 1.0, -1.0)
    else:
        raise ValueError(f"unknown consensus {method!r}; use sum or count")
    return sign == elected
