"""Merge methods on one tensor (``jax.numpy``; numpy or jax arrays in, the first input's dtype
out; the arithmetic runs in float32, or float64 for float64 inputs).

Formulas follow mergekit 0.1.x: task vectors ``d_i = theta_i - base``, sparsified
(:mod:`jft.merge.masks`), weighted ``w_i d_i``; with ``consensus`` (TIES) an entry counts only
where its sign agrees with the elected one; ``normalize`` divides by the sum of the weights
that count; ``lambda`` scales the result. :func:`slerp` and :func:`nuslerp` interpolate on the
sphere, :func:`karcher` takes the weighted Riemannian mean of the directions, :func:`sce`
weights task vectors by their mean square, :func:`model_stock` by the angle between them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft.merge.masks import consensus_mask, sparsify, top_mask

Array = Any


def _work_dtype(x) -> np.dtype:
    return np.float64 if np.dtype(x.dtype) == np.float64 else np.float32


def linear(tensors: Sequence[Array], weights: Sequence[float], normalize: bool = True) -> jax.Array:
    """Weighted average ``sum_i w_i x_i`` (divided by ``sum_i w_i`` when ``normalize``)."""
    dt = _work_dtype(tensors[0])
    out = sum(float(w) * jnp.asarray(x, dt) for w, x in zip(weights, tensors, strict=True))
    if normalize:
        out = out / sum(float(w) for w in weights)
    return out.astype(tensors[0].dtype)


def task_arithmetic(
    base: Array,
    tensors: Sequence[Array],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    sparsification: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """``base + lam * combine_i(w_i * sparsify(theta_i - base))``: task arithmetic, TIES, DARE,
    breadcrumbs and DELLA (see the module docstring for each step). ``rng`` is split per model."""
    dt = _work_dtype(base)
    b = jnp.asarray(base, dt)
    densities = densities or [1.0] * len(tensors)
    gammas = gammas or [0.01] * len(tensors)
    epsilons = epsilons or [0.15] * len(tensors)
    deltas = []
    for i, x in enumerate(tensors):
        d = jnp.asarray(x, dt) - b
        if sparsification:
            key = None if rng is None else jax.random.fold_in(rng, i)
            d = sparsify(d, densities[i], sparsification, rescale, gammas[i], key, epsilons[i])
        deltas.append(d)
    deltas = jnp.stack(deltas)
    w = jnp.asarray(weights, dt).reshape((-1,) + (1,) * b.ndim)
    deltas = deltas * w
    if consensus:
        mask = consensus_mask(deltas, consensus)
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (b + mixed).astype(base.dtype)


def slerp(t: float, v0: Array, v1: Array, dot_threshold: float = 0.9995, eps: float = 1e-8) -> jax.Array:
    """Spherical interpolation from ``v0`` (t=0) to ``v1`` (t=1), each tensor taken as one
    vector: the angle comes from the normalised tensors, the result combines the originals;
    linear interpolation where they are nearly colinear (``|cos| > dot_threshold``)."""
    dt = _work_dtype(v0)
    a, b = jnp.asarray(v0, dt).reshape(-1), jnp.asarray(v1, dt).reshape(-1)
    na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
    na, nb = jnp.where(na > eps, na, 1.0), jnp.where(nb > eps, nb, 1.0)
    dot = jnp.clip(jnp.sum((a / na) * (b / nb)), -1.0, 1.0)
    lin = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(lin, 0.0, dot))
    sin = jnp.where(lin, 1.0, jnp.sin(theta))
    ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / sin)
    cb = jnp.where(lin, t, jnp.sin(t * theta) / sin)
    return (ca * a + cb * b).reshape(v0.shape).astype(v0.dtype)


def nuslerp(
    t: float, v0: Array, v1: Array, row_wise: bool = False, flatten: bool = True, eps: float = 1e-8
) -> jax.Array:
    """mergekit's NuSLERP interpolation: :func:`slerp` over the whole tensor (``flatten``), else
    per row (the last axis as vectors) or, with ``row_wise``, per column (axis 0 as vectors);
    linear only where a pair is exactly colinear (``1 - cos^2 <= eps^2``)."""
    dt = _work_dtype(v0)
    a, b = jnp.asarray(v0, dt), jnp.asarray(v1, dt)
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = jnp.swapaxes(a, 0, -1), jnp.swapaxes(b, 0, -1)

    def unit(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)

    cos = jnp.clip(jnp.sum(unit(a) * unit(b), axis=-1, keepdims=True), -1.0, 1.0)
    colinear = (1 - cos**2) <= eps**2
    theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
    sin = jnp.where(colinear, 1.0, jnp.sin(theta))
    out = jnp.where(colinear, (1 - t) * a + t * b, (jnp.sin((1 - t) * theta) * a + jnp.sin(t * theta) * b) / sin)
    if row_wise and not flatten:
        out = jnp.swapaxes(out, 0, -1)
    return out.reshape(np.shape(v0)).astype(v0.dtype)


def model_stock(base: Array, tensors: Sequence[Array], filter_wise: bool = False) -> jax.Array:
    """Model Stock: ``t * mean(theta_i) + (1 - t) * base`` with ``t = k cos / (1 + (k - 1) cos)``,
    ``cos`` the mean pairwise cosine of the task vectors (per row with ``filter_wise``); the base
    where the denominator vanishes. Needs at least two models besides the base."""
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    dt = _work_dtype(base)
    w0 = jnp.asarray(base, dt)
    shape = w0.shape
    flat = (lambda x: x.reshape(1, -1) if x.ndim == 1 else x) if filter_wise else (lambda x: x.reshape(-1))
    w0f = flat(w0)
    ws = [flat(jnp.asarray(x, dt)) for x in tensors]
    offsets = [w - w0f for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
            cos.append(jnp.clip((a * b).sum(-1) / jnp.maximum(norms, 1e-6), -1.0, 1.0))
    cos = jnp.stack(cos).mean(0)[..., None]
    k = len(ws)
    denom = 1 + (k - 1) * cos
    singular = jnp.abs(denom) < 1e-6
    t = jnp.where(singular, 0.0, k * cos / jnp.where(singular, 1.0, denom))
    return (t * (sum(ws) / k) + (1 - t) * w0f).reshape(shape).astype(base.dtype)


def karcher(
    tensors: Sequence[Array], weights: Sequence[float] | None = None, max_iter: int = 10, tol: float = 1e-5
) -> jax.Array:
    """Weighted Karcher (Riemannian) mean on the unit sphere, each tensor one vector: the
    directions ``u_i = x_i / |x_i|`` are averaged by up to ``max_iter`` steps along the mean of
    their log maps (``theta_i / sin(theta_i) (u_i - cos(theta_i) m)``, weights normalised over the
    tensors of norm > ``tol``) until that step is shorter than ``tol``; the result is the mean
    direction times ``sum_i w_i |x_i|``. Weights default to ``1 / len(tensors)``; zero when every
    norm is below ``tol``."""
    if len(tensors) == 1:
        return jnp.asarray(tensors[0])
    k, dtype = len(tensors), tensors[0].dtype
    dt = _work_dtype(tensors[0])
    xs = jnp.stack([jnp.asarray(x, dt).reshape(-1) for x in tensors])  # [models, n]
    alphas = jnp.asarray([1.0 / k] * k if weights is None else weights, dt)
    return _karcher(xs, alphas, int(max_iter), float(tol)).reshape(np.shape(tensors[0])).astype(dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _karcher(xs: jax.Array, alphas: jax.Array, max_iter: int, tol: float) -> jax.Array:
    """:func:`karcher` on ``xs`` ``[models, n]``, compiled once per shape."""

    def norm(x):
        return jnp.linalg.norm(x)

    norms = jnp.linalg.norm(xs, axis=1)
    units = xs / jnp.where(norms == 0, 1.0, norms)[:, None]
    valid = norms > tol
    a = jnp.where(valid, alphas, 0.0)
    a = a / jnp.where(valid.any(), a.sum(), 1.0)
    mean = (a[:, None] * units).sum(0)
    mean = jnp.where(norm(mean) < tol, units[jnp.argmax(valid)], mean / jnp.maximum(norm(mean), tol))

    def step(_, carry):
        mean, done = carry
        dot = jnp.clip(units @ mean, -1.0, 1.0)  # [models]
        theta = jnp.arccos(dot)
        use = valid & (theta >= tol)
        coef = jnp.where(use, a * theta / jnp.where(use, jnp.sin(theta), 1.0), 0.0)
        tangent = (coef[:, None] * (units - dot[:, None] * mean)).sum(0)
        length = norm(tangent)
        done = done | (length < tol)
        moved = jnp.cos(length) * mean + jnp.sin(length) * tangent / jnp.where(length > 0, length, 1.0)
        moved = jnp.where(norm(moved) > tol, moved / jnp.maximum(norm(moved), tol), moved)
        return jnp.where(done, mean, moved), done

    mean, _ = jax.lax.fori_loop(0, max_iter, step, (mean, jnp.asarray(False)))
    return jnp.where(valid.any(), (alphas * norms).sum() * mean, 0.0)


def sce(base: Array, tensors: Sequence[Array], select_topk: float = 1.0) -> jax.Array:
    """SCE: task vectors ``d_i`` restricted (``select_topk < 1``) to the ``int(select_topk * m)``
    entries of largest variance across models (``m`` entries of nonzero variance), TIES signs
    elected from their sum, then ``base + sum_i c_i d_i / sum_i c_i`` over the agreeing entries,
    with ``c_i`` proportional to ``mean(d_i^2)`` (equal when those all vanish). The count of
    nonzero variances is taken on the host: not for use under ``jax.jit`` with ``select_topk < 1``."""
    dt = _work_dtype(base)
    b = jnp.asarray(base, dt)
    deltas = jnp.stack([jnp.asarray(x, dt) - b for x in tensors])  # [models, *shape]
    if select_topk < 1:
        deltas = deltas * sce_mask(deltas, select_topk).astype(dt)
    erase = consensus_mask(deltas, "sum")
    square = (deltas**2).reshape(len(tensors), -1).mean(1)
    total = square.sum()
    small = jnp.abs(total) < 1e-6
    c = jnp.where(small, 1.0 / len(tensors), square / jnp.where(small, 1.0, total))
    c = c.reshape((-1,) + (1,) * b.ndim) * erase
    mixed = (deltas * c).sum(0) / jnp.maximum(c.sum(0), 1e-6)
    return (b + mixed).astype(base.dtype)


def sce_mask(deltas: jax.Array, density: float) -> jax.Array:
    """SCE's selection, one mask for all models: the ``int(density * m)`` entries whose variance
    across models (``deltas``: ``[models, *shape]``) is largest, ``m`` the entries of nonzero variance."""
    var = jnp.var(deltas, axis=0)
    if density <= 0:
        return jnp.zeros(var.shape, bool)
    if density >= 1:
        return jnp.ones(var.shape, bool)
    k = int(int(np.count_nonzero(np.asarray(var))) * density)
    return top_mask(jnp.abs(var).reshape(-1).astype(jnp.float32), k).reshape(var.shape)
