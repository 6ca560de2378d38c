"""The merge methods by name (mergekit's ``merge_method``): their parameters with defaults, and
how one tensor or whole param pytrees are merged with them."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jft.merge.tensors import Array, karcher, linear, model_stock, nuslerp, sce, slerp, task_arithmetic


@dataclasses.dataclass(frozen=True)
class Method:
    """A merge method: how tensors combine, its parameters (shared and per model) and defaults.
    ``needs_base``: a base model is required and is not one of the merged inputs;
    ``optional_base``: a base, when given, is subtracted first (task vectors) and not merged."""

    needs_base: bool
    shared: dict  # parameter -> default (None = required)
    per_model: dict  # parameter -> default (None = required)
    sparsification: str | None = None
    consensus: str | None = None
    optional_base: bool = False


def _family(sparsification, consensus, normalize, rescale, extra=None) -> Method:
    per_model = {"weight": None, "density": 1.0, **(extra or {})}
    shared = {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}
    return Method(True, shared, per_model, sparsification, consensus)


METHODS: dict[str, Method] = {
    "linear": Method(False, {"normalize": True}, {"weight": None}),
    "task_arithmetic": _family(None, None, False, False),
    "ties": _family("magnitude", "sum", True, False),
    "dare_linear": _family("random", None, False, True),
    "dare_ties": _family("random", "sum", False, True),
    "breadcrumbs": _family("magnitude_outliers", None, False, False, {"gamma": 0.01}),
    "breadcrumbs_ties": _family("magnitude_outliers", "sum", False, False, {"gamma": 0.01}),
    "della": _family("magprune", "sum", True, True, {"epsilon": 0.15}),
    "della_linear": _family("magprune", None, False, True, {"epsilon": 0.15}),
    "slerp": Method(True, {"t": None}, {}),
    "nuslerp": Method(
        False, {"nuslerp_row_wise": False, "nuslerp_flatten": True}, {"weight": None}, optional_base=True
    ),
    "karcher": Method(False, {"max_iter": 10, "tol": 1e-5}, {}),
    "sce": Method(True, {"int8_mask": False, "select_topk": 1.0}, {}),
    "model_stock": Method(True, {"filter_wise": False}, {}),
    "passthrough": Method(False, {}, {"scale": 1.0}),
}


def merge_tensor(
    method: str, base: Array | None, tensors: Sequence[Array], shared: dict, per_model: Sequence[dict], rng=None
) -> jax.Array:
    """One tensor merged by ``method`` (a :data:`METHODS` key) with resolved parameters: ``shared``
    (e.g. ``{"normalize": True}``) and one dict per input of ``tensors`` (e.g. ``{"weight": 0.5}``).
    ``base`` is None for methods without one. Raises ValueError for a wrong number of inputs."""
    m = METHODS[method]
    if method == "linear":
        return linear(tensors, [p["weight"] for p in per_model], shared["normalize"])
    if method == "passthrough":
        if len(tensors) != 1:
            raise ValueError(f"passthrough takes one input per tensor, got {len(tensors)}")
        scale = per_model[0]["scale"]
        return jnp.asarray(tensors[0]) if scale == 1.0 else (jnp.asarray(tensors[0]) * scale).astype(tensors[0].dtype)
    if method == "slerp":
        if len(tensors) != 1:
            raise ValueError(f"slerp merges the base with exactly one other model, got {len(tensors)} others")
        return slerp(float(shared["t"]), base, tensors[0])
    if method == "nuslerp":
        return _nuslerp(base, tensors, [float(p["weight"]) for p in per_model], shared)
    if method == "karcher":
        return karcher(tensors, max_iter=int(shared["max_iter"]), tol=float(shared["tol"]))
    if method == "sce":
        return sce(base, tensors, float(shared["select_topk"])) if tensors else jnp.asarray(base)
    if method == "model_stock":
        return model_stock(base, tensors, bool(shared["filter_wise"]))
    return task_arithmetic(
        base,
        tensors,
        [p["weight"] for p in per_model],
        [p["density"] for p in per_model],
        sparsification=m.sparsification,
        consensus=m.consensus,
        normalize=bool(shared["normalize"]),
        rescale=bool(shared["rescale"]),
        lam=float(shared["lambda"]),
        gammas=[p.get("gamma", 0.01) for p in per_model],
        epsilons=[p.get("epsilon", 0.15) for p in per_model],
        rng=rng,
    )


def _nuslerp(base, tensors, weights, shared) -> jax.Array:
    """NuSLERP of two models at ``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to ~0), on
    their task vectors when a base is given."""
    if len(tensors) != 2:
        raise ValueError(f"nuslerp merges exactly two models (besides any base), got {len(tensors)}")
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    row_wise, flatten = bool(shared["nuslerp_row_wise"]), bool(shared["nuslerp_flatten"])
    if base is None:
        return nuslerp(t, tensors[0], tensors[1], row_wise, flatten)
    dt = jnp.float64 if base.dtype == jnp.float64 else jnp.float32
    b = jnp.asarray(base, dt)
    mixed = nuslerp(t, jnp.asarray(tensors[0], dt) - b, jnp.asarray(tensors[1], dt) - b, row_wise, flatten)
    return (b + mixed).astype(base.dtype)


def merge_params(
    method: str, base: dict | None, models: Sequence[dict], shared: dict | None = None, per_model=None, seed: int = 0
) -> dict:
    """Merge whole jft param pytrees (same structure) leaf by leaf; stacked layer leaves (under
    ``layers``) layer by layer, as the per-tensor methods see HF tensors. Parameters are scalars
    here (per-layer gradients and name filters belong to the YAML form); defaults as in mergekit.
    ``base`` is None for methods without one; methods that merge every input (``karcher``,
    ``linear``) merge ``models`` only."""
    m = METHODS[method]
    shared = {**m.shared, **(shared or {})}
    per_model = [{**m.per_model, **p} for p in (per_model or [{}] * len(models))]
    _required(method, shared, per_model, "merge_params")
    key = jax.random.key(seed)

    def leaf(path, *xs):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        b, others = (xs[0], xs[1:]) if base is not None else (None, xs)
        rng = jax.random.fold_in(key, zlib.crc32(name.encode()))
        if "layers" not in name.split("/")[:-1]:
            return merge_tensor(method, b, others, shared, per_model, rng)
        layers = [
            merge_tensor(
                method,
                None if b is None else b[i],
                [o[i] for o in others],
                shared,
                per_model,
                jax.random.fold_in(rng, i),
            )
            for i in range(others[0].shape[0])
        ]
        return jnp.stack(layers)

    trees = ([base] if base is not None else []) + list(models)
    return jax.tree_util.tree_map_with_path(leaf, *trees)


def _required(method: str, shared: dict, per_model: Sequence[dict], where: str) -> None:
    missing = [k for k, v in shared.items() if v is None] + sorted(
        {k for p in per_model for k, v in p.items() if v is None}
    )
    if missing:
        raise ValueError(f"{where}: merge_method {method} needs parameter(s) {missing}")
