"""Model merging and layer stacking, with mergekit's semantics.

Two levels:

* Pure functions per tensor (``jax.numpy``; they take numpy or jax arrays): :func:`linear`,
  :func:`task_arithmetic` (the family behind ``task_arithmetic``, ``ties``, ``dare_linear``,
  ``dare_ties``, ``breadcrumbs`` and ``breadcrumbs_ties``: sparsify each task vector, elect
  signs, weight, normalise), :func:`slerp` and :func:`model_stock`; :func:`merge_params`
  applies one to whole param pytrees, layer by layer.
* :func:`merge_folders`: a mergekit-style YAML (``merge_method``, ``base_model``, ``models`` or
  ``slices``, ``parameters`` with per-layer gradients and name filters, ``dtype``,
  ``tokenizer_source``) over Hugging Face folders, streamed tensor by tensor into a new folder
  (``jft merge merge.yaml --out DIR``). Slices of layers from one or more models, with the
  ``passthrough`` method, stack layers (frankenmerges, depth up-scaling).

Formulas follow mergekit 0.1.x: task vectors ``d_i = theta_i - base``; sparsified (``magnitude``
keeps the ``max(1, int(density * n))`` largest |d|; ``random`` keeps each entry with probability
``density``; ``magnitude_outliers`` drops the ``int(gamma * n)`` largest and the smallest so that
``int(density * n)`` remain), optionally rescaled to the L1 norm they had (``rescale``); weighted
``w_i d_i``; with ``consensus`` (TIES) an entry counts only where its sign agrees with the sign
of the sum over models (``sum``) or the majority (``count``); ``normalize`` divides by the sum
of the weights that count (of all weights without consensus); ``lambda`` scales the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

Array = Any

# ---------------------------------------------------------------------------- per-tensor methods


def _work_dtype(x) -> np.dtype:
    return np.float64 if np.dtype(x.dtype) == np.float64 else np.float32


def linear(tensors: Sequence[Array], weights: Sequence[float], normalize: bool = True) -> jax.Array:
    """Weighted average ``sum_i w_i x_i`` (divided by ``sum_i w_i`` when ``normalize``)."""
    dt = _work_dtype(tensors[0])
    out = sum(float(w) * jnp.asarray(x, dt) for w, x in zip(weights, tensors, strict=True))
    if normalize:
        out = out / sum(float(w) for w in weights)
    return out.astype(tensors[0].dtype)


def _rescaled(delta: jax.Array, mask: jax.Array, rescale: bool, eps: float = 1e-7) -> jax.Array:
    """``delta * mask``, scaled back to the L1 norm of ``delta`` when ``rescale`` (and both norms > eps)."""
    kept = delta * mask
    if not rescale:
        return kept
    before, after = jnp.abs(delta).sum(), jnp.abs(kept).sum()
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, kept * (before / jnp.where(ok, after, 1.0)), kept)


def sparsify(
    delta: Array, density: float, method: str, rescale: bool = False, gamma: float = 0.01, rng: jax.Array | None = None
) -> jax.Array:
    """Keep part of a task vector: ``magnitude`` (largest |d|), ``random`` (each entry with
    probability ``density``; needs ``rng``) or ``magnitude_outliers`` (largest ``gamma`` dropped too)."""
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
    else:
        raise ValueError(f"unknown sparsification {method!r}; use magnitude, random or magnitude_outliers")
    return _rescaled(delta, mask, rescale)


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
    """Mask of exactly ``k`` largest of non-negative ``values`` (ties: lower index first)."""
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
    rng: jax.Array | None = None,
) -> jax.Array:
    """``base + lam * combine_i(w_i * sparsify(theta_i - base))``: task arithmetic, TIES, DARE and
    breadcrumbs (see the module docstring for each step). ``rng`` is split per model."""
    dt = _work_dtype(base)
    b = jnp.asarray(base, dt)
    densities = densities or [1.0] * len(tensors)
    gammas = gammas or [0.01] * len(tensors)
    deltas = []
    for i, x in enumerate(tensors):
        d = jnp.asarray(x, dt) - b
        if sparsification:
            key = None if rng is None else jax.random.fold_in(rng, i)
            d = sparsify(d, densities[i], sparsification, rescale, gammas[i], key)
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


@dataclasses.dataclass(frozen=True)
class Method:
    """A merge method: how tensors combine, its parameters (shared and per model) and defaults."""

    needs_base: bool
    shared: dict  # parameter -> default (None = required)
    per_model: dict  # parameter -> default (None = required)
    sparsification: str | None = None
    consensus: str | None = None


def _family(sparsification, consensus, normalize, rescale, gamma=False) -> Method:
    per_model = {"weight": None, "density": 1.0, **({"gamma": 0.01} if gamma else {})}
    shared = {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}
    return Method(True, shared, per_model, sparsification, consensus)


METHODS: dict[str, Method] = {
    "linear": Method(False, {"normalize": True}, {"weight": None}),
    "task_arithmetic": _family(None, None, False, False),
    "ties": _family("magnitude", "sum", True, False),
    "dare_linear": _family("random", None, False, True),
    "dare_ties": _family("random", "sum", False, True),
    "breadcrumbs": _family("magnitude_outliers", None, False, False, gamma=True),
    "breadcrumbs_ties": _family("magnitude_outliers", "sum", False, False, gamma=True),
    "slerp": Method(True, {"t": None}, {}),
    "model_stock": Method(True, {"filter_wise": False}, {}),
    "passthrough": Method(False, {}, {"scale": 1.0}),
}


def merge_tensor(
    method: str, base: Array | None, tensors: Sequence[Array], shared: dict, per_model: Sequence[dict], rng=None
) -> jax.Array:
    """One tensor merged by ``method`` (a :data:`METHODS` key) with resolved parameters: ``shared``
    (e.g. ``{"normalize": True}``) and one dict per input of ``tensors`` (e.g. ``{"weight": 0.5}``)."""
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
        rng=rng,
    )


def merge_params(
    method: str, base: dict | None, models: Sequence[dict], shared: dict | None = None, per_model=None, seed: int = 0
) -> dict:
    """Merge whole jft param pytrees (same structure) leaf by leaf; stacked layer leaves (under
    ``layers``) layer by layer, as the per-tensor methods see HF tensors. Parameters are scalars
    here (per-layer gradients and name filters belong to the YAML form); defaults as in mergekit."""
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


# ---------------------------------------------------------------------------- YAML merges of HF folders


class MergeError(ValueError):
    """A merge config or input model that cannot be merged, naming the key, model or tensor."""


_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source")
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_SAFETENSORS_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
_ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|.*\.model|chat_template\..*"
    r"|generation_config\.json)$"
)


def evaluate_setting(setting, name: str, t: float):
    """A parameter's value for tensor ``name`` at depth ``t`` in [0, 1] (mergekit's rules): a
    scalar as is; a list of numbers interpolated linearly at ``t`` (a gradient; a list of other
    scalars picks ``values[int(t * (n - 1))]``); ``{filter, value}`` entries (or a list of them):
    the first whose filter is absent, ``*`` or a substring of ``name``. None when nothing applies."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting, list):
        raise MergeError(f"parameter value {setting!r}: use a number, a list (gradient) or {{filter, value}} entries")
    if not setting:
        return None
    if all(isinstance(v, (bool, int, float, str)) for v in setting):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"value", "filter"}:
            raise MergeError(f"parameter entry {cond!r}: each entry of a filtered parameter is {{filter, value}}")
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in name:
            return evaluate_setting(cond["value"], name, t)
    return None


@dataclasses.dataclass
class _Model:
    """An input model folder: its config, and its safetensors read one tensor at a time."""

    ref: str
    folder: Path
    config: dict
    files: dict  # tensor name -> file
    headers: dict = dataclasses.field(default_factory=dict)  # file -> (data start, header)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def tensor(self, name: str, dtype) -> np.ndarray:
        """Tensor ``name`` (cast to ``dtype`` unless None), read into a fresh array: no file stays
        mapped into memory, so a merge holds only the tensors it is working on."""
        shape, stored, file, start, begin = self._info(name)
        x = np.empty(shape, stored)
        with open(file, "rb") as f:
            f.seek(start + begin)
            if f.readinto(memoryview(x.reshape(-1).view(np.uint8))) != x.nbytes:
                raise MergeError(f"{file}: tensor {name!r} is truncated")
        return x if dtype is None else x.astype(dtype, copy=False)

    def spec(self, name: str, dtype=None) -> tuple[tuple, np.dtype]:
        """``(shape, dtype)`` of tensor ``name`` as :meth:`tensor` returns it, from the file header."""
        shape, stored = self._info(name)[:2]
        return shape, np.dtype(dtype or stored)

    def _info(self, name: str):
        if name not in self.files:
            raise MergeError(f"model {self.ref}: tensor {name!r} is missing ({self.folder})")
        file = self.files[name]
        if file not in self.headers:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self.headers[file] = (8 + size, json.loads(f.read(size)))
        start, header = self.headers[file]
        info = header[name]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise MergeError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which merges do not take")
        return tuple(info["shape"]), _SAFETENSORS_DTYPES[info["dtype"]], file, start, info["data_offsets"][0]


@dataclasses.dataclass
class _Slice:
    sources: list  # [(model ref, start, stop, parameters)]
    parameters: dict
    base: str | None


def load_merge_config(path: str | os.PathLike) -> dict:
    """Read a merge YAML file into a dict (checked by :func:`merge_folders`)."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise MergeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise MergeError(f"{path}: expected a mapping with merge_method, models or slices, ...")
    return config


def merge_folders(config: dict, out_dir: str | os.PathLike, seed: int = 0, max_shard_size: int | str = "5GB") -> Path:
    """Merge Hugging Face model folders as a mergekit-style ``config`` says, into ``out_dir``.

    Streams tensor by tensor: each output tensor is computed from the matching tensor of every
    input and written into the current shard, so host memory holds about one shard plus one
    tensor per input. ``seed`` makes the random methods (DARE) reproducible. Writes config.json
    (layer count updated), safetensors and the tokenizer (``tokenizer_source``: ``base``
    (default) or a model). Raises :class:`MergeError` for unknown keys or methods, missing
    parameters, models of different architectures or tensor shapes.
    """
    from jft.hf import _parse_size, _weight_map, resolve

    unknown = sorted(set(config) - set(_TOP_KEYS))
    if unknown:
        raise MergeError(f"unknown key(s) {unknown} in the merge config; jft reads {list(_TOP_KEYS)}")
    method = config.get("merge_method")
    if method not in METHODS:
        raise MergeError(f"merge_method {method!r} is not supported; choose from {sorted(METHODS)}")
    spec = METHODS[method]
    if config.get("tokenizer_source") == "union":
        raise MergeError("tokenizer_source: union is not supported; use base or a model")
    out = _check_out(out_dir)
    dtype = _dtype(config.get("dtype"), "dtype")
    slices = _slices(config)
    base_ref = config.get("base_model")
    refs = list(dict.fromkeys([*(s[0] for sl in slices for s in sl.sources), *([base_ref] if base_ref else [])]))
    models = {}
    for ref in refs:
        folder = resolve(ref)
        models[ref] = _Model(str(ref), folder, json.loads((folder / "config.json").read_text()), _weight_map(folder))
    for sl in slices:  # the models form covers every layer
        sl.sources = [(r, a, models[r].num_layers if b is None else b, p) for r, a, b, p in sl.sources]
        base = sl.base or base_ref
        if spec.needs_base and base is None:
            raise MergeError(f"merge_method {method} needs a base_model")
        if spec.needs_base and base not in [r for r, *_ in sl.sources]:
            raise MergeError(f"base_model {base} is not among the sources of slice {[s[:3] for s in sl.sources]}")
    reference = models[base_ref or slices[0].sources[0][0]]
    for m in models.values():
        diff = [k for k in _ARCH_KEYS if m.config.get(k) != reference.config.get(k)]
        if diff:
            raise MergeError(
                f"model {m.ref} differs from {reference.ref} in {diff} "
                f"({[m.config.get(k) for k in diff]} vs {[reference.config.get(k) for k in diff]}); "
                "merged models must share one architecture"
            )
    for sl in slices:
        for ref, start, stop, _ in sl.sources:
            if not 0 <= start < stop <= models[ref].num_layers:
                raise MergeError(
                    f"layer_range [{start}, {stop}] of {ref}: it has {models[ref].num_layers} layers; "
                    "use 0 <= start < stop <= layers"
                )
        if len({stop - start for _, start, stop, _ in sl.sources}) > 1:
            raise MergeError(f"slice {[s[:3] for s in sl.sources]}: every source of a slice needs as many layers")
    out_dtype = _dtype(config.get("out_dtype"), "out_dtype") or dtype

    # The plan: (output name, slice, [(model, input name)], t).
    layer_suffixes = list(dict.fromkeys(m.group(2) for n in reference.files if (m := _LAYER.match(n))))
    outer = [n for n in reference.files if not _LAYER.match(n) and not n.endswith("rotary_emb.inv_freq")]
    plan = [(n, slices[0], [(s[0], n) for s in slices[0].sources], 0.0) for n in outer if "embed_tokens" in n]
    layer = 0
    for sl in slices:
        length = sl.sources[0][2] - sl.sources[0][1]
        for idx in range(length):
            t = idx / (length - 1) if length > 1 else 1.0
            for suffix in layer_suffixes:
                inputs = [(s[0], f"model.layers.{s[1] + idx}.{suffix}") for s in sl.sources]
                plan.append((f"model.layers.{layer}.{suffix}", sl, inputs, t))
            layer += 1
    plan += [(n, slices[-1], [(s[0], n) for s in slices[-1].sources], 0.0) for n in outer if "embed_tokens" not in n]

    layout = []
    for name, _, inputs, _ in plan:
        shape, stored = models[inputs[0][0]].spec(inputs[0][1], dtype)
        layout.append((name, shape, out_dtype or stored))
    writer = _ShardWriter(out, _parse_size(max_shard_size), layout)
    key = jax.random.key(seed)
    with _filling(out), jax.default_device(jax.local_devices(backend="cpu")[0]):
        for (name, sl, inputs, t), (_, _, written) in zip(plan, layout, strict=True):
            base = sl.base or base_ref
            tensors = {ref: models[ref].tensor(n, dtype) for ref, n in inputs}
            shapes = {ref: x.shape for ref, x in tensors.items()}
            if len(set(shapes.values())) > 1:
                raise MergeError(f"tensor {name!r}: shapes differ between models: {shapes}")
            scopes = [sl.parameters, config.get("parameters")]
            shared = {p: _resolve(p, d, scopes, name, t, method) for p, d in spec.shared.items()}
            others = [r for r in tensors if not (spec.needs_base and r == base)]
            per_model = [
                {
                    p: _resolve(p, d, [_source_params(sl, r), *scopes], name, t, method, r)
                    for p, d in spec.per_model.items()
                }
                for r in others
            ]
            rng = jax.random.fold_in(key, zlib.crc32(name.encode()))
            merged = merge_tensor(
                method,
                tensors.get(base) if spec.needs_base else None,
                [tensors[r] for r in others],
                shared,
                per_model,
                rng,
            )
            writer.add(name, np.asarray(merged).astype(written, copy=False))
        writer.close()

    cfg = dict(reference.config)
    cfg["num_hidden_layers"] = layer
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = [
            models[s[0]].config["layer_types"][s[1] + i]
            for sl in slices
            for s in sl.sources[:1]
            for i in range(s[2] - s[1])
        ]
    if out_dtype is not None:
        cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = str(np.dtype(out_dtype).name)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    source = config.get("tokenizer_source") or "base"
    _copy_tokenizer(models[base_ref or reference.ref].folder if source == "base" else resolve(source), out)
    return out


def _check_out(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"{out} is not empty; merge into a new folder")
    return out


@contextlib.contextmanager
def _filling(out: Path):
    """Create the (new or empty) output folder; empty it again if the merge fails midway."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for f in out.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        raise


def _copy_tokenizer(folder: Path, out: Path) -> None:
    for f in folder.iterdir():
        if f.is_file() and _TOKENIZER_FILES.match(f.name):
            shutil.copy2(f, out / f.name)


def _dtype(name, key):
    if name is None:
        return None
    if name not in _DTYPES:
        raise MergeError(f"{key}: {name!r} is not supported; use one of {list(_DTYPES)}")
    return _DTYPES[name]


def _slices(config: dict) -> list[_Slice]:
    """The config's ``slices`` (or its ``models`` as one slice over all layers), checked."""
    has_models, has_slices = bool(config.get("models")), bool(config.get("slices"))
    if has_models == has_slices:
        raise MergeError("give either models or slices (not both, not neither)")
    if has_models:
        sources = []
        for i, m in enumerate(config["models"]):
            _keys(m, {"model", "parameters"}, f"models[{i}]")
            sources.append((m["model"], 0, None, m.get("parameters") or {}))
        base = config.get("base_model")
        if base and base not in [s[0] for s in sources]:
            sources.append((base, 0, None, {}))
        return [_Slice(sources, {}, None)]
    out = []
    for i, sl in enumerate(config["slices"]):
        _keys(sl, {"sources", "parameters", "base_model"}, f"slices[{i}]")
        sources = []
        for j, s in enumerate(sl.get("sources") or []):
            _keys(s, {"model", "layer_range", "parameters"}, f"slices[{i}].sources[{j}]")
            rng = s.get("layer_range")
            if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) for x in rng)):
                raise MergeError(f"slices[{i}].sources[{j}].layer_range: expected [start, stop], got {rng!r}")
            sources.append((s["model"], rng[0], rng[1], s.get("parameters") or {}))
        if not sources:
            raise MergeError(f"slices[{i}]: no sources")
        out.append(_Slice(sources, sl.get("parameters") or {}, sl.get("base_model")))
    return out


def _keys(entry, allowed: set, where: str) -> None:
    if not isinstance(entry, dict) or "model" in allowed and "model" not in entry:
        raise MergeError(
            f"{where}: expected a mapping with 'model'" if "model" in allowed else f"{where}: expected a mapping"
        )
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise MergeError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _source_params(sl: _Slice, ref: str) -> dict:
    return next((s[3] for s in sl.sources if s[0] == ref), {})


def _resolve(param, default, scopes, name, t, method, model=None):
    for scope in scopes:
        if scope and param in scope:
            value = evaluate_setting(scope[param], name, t)
            if value is not None:
                return value
    if default is None:
        where = f"model {model}, tensor {name!r}" if model else f"tensor {name!r}"
        raise MergeError(f"merge_method {method}: parameter {param!r} is missing for {where}")
    return default


class _ShardWriter:
    """Safetensors shards of at most ``limit`` bytes, laid out before anything is computed and
    written tensor by tensor, so no output tensor waits in memory; an index if several.
    ``layout``: ``(name, shape, dtype)`` of every output tensor, in the order :meth:`add` gets them."""

    def __init__(self, out: Path, limit: int, layout: list):
        self.out, self.shards, size = out, [[]], 0
        for name, shape, dtype in layout:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            if self.shards[-1] and size + nbytes > limit:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), np.dtype(dtype)))
            size += nbytes
        self.queue = [entry for shard in self.shards for entry in shard]
        self.done, self.file, self.files = 0, None, []

    def add(self, name: str, array: np.ndarray) -> None:
        expected = self.queue[self.done]
        if (name, array.shape, array.dtype) != expected:
            raise MergeError(f"internal: got {name} {array.shape} {array.dtype} to write, expected {expected}")
        if self.file is None:  # the first tensor of the next shard: its header first
            shard = self.shards[len(self.files)]
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for n, shape, dtype in shard:
                nbytes = math.prod(shape) * dtype.itemsize
                header[n] = {
                    "dtype": _SAFETENSORS_NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            body = json.dumps(header, separators=(",", ":")).encode()
            body += b" " * (-len(body) % 8)
            self.files.append(self.out / f".shard-{len(self.files):05d}.tmp")
            self.file = open(self.files[-1], "wb")  # noqa: SIM115 - closed with the shard's last tensor
            self.file.write(len(body).to_bytes(8, "little") + body)
            self.left = len(shard)
        self.file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self.done += 1
        self.left -= 1
        if not self.left:
            self.file.close()
            self.file = None

    def close(self) -> None:
        if self.done != len(self.queue):
            raise MergeError(f"internal: {len(self.queue) - self.done} planned tensors were not written")
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, name in zip(self.files, names, strict=True):
            os.replace(tmp, self.out / name)
        if n > 1:
            total = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.queue)
            weight_map = {entry[0]: names[i] for i, shard in enumerate(self.shards) for entry in shard}
            body = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(body, indent=2))


# ---------------------------------------------------------------------------- mixture of experts

_MOE_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "tokenizer_source")
_EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")


def merge_moe(config: dict, out_dir: str | os.PathLike, seed: int = 0, max_shard_size: int | str = "5GB") -> Path:
    """A Mixtral-style model from one dense base and several dense experts (mergekit-moe's YAML):
    attention, norms and embeddings from ``base_model``; in every layer, expert ``j``'s MLP is
    ``experts[j].source_model``'s (``gate_proj``, ``down_proj`` (times ``residual_scale``),
    ``up_proj``; plus ``noise_scale`` gaussian noise); ``experts_per_token`` (default 2) routed.

    Router rows (``gate_mode``): ``hidden`` (default) the base model's hidden state entering each
    layer at the last token of the expert's ``positive_prompts`` (``hidden_avg``: averaged over
    the prompt's tokens), averaged over prompts, minus the same for ``negative_prompts``, unit
    norm; ``cheap_embed`` the same from the summed token embeddings (one row for all layers);
    ``random`` normal, ``uniform_random`` U(+-1/sqrt(hidden)), seeded. Prompts are encoded with
    the base's tokenizer, BOS first. Writes a folder transformers loads as Mixtral.

    Differences from mergekit-moe: the base runs in float32 (mergekit-moe always uses
    bfloat16), and each prompt contributes its own last token (or its own tokens' mean) where
    mergekit-moe pads an expert's prompts to one length and reads pad positions for the shorter
    ones. With prompts of one length and float32 the rows agree to 1e-6.
    """
    from jft.hf import _parse_size, _weight_map, load_hf, load_tokenizer, resolve

    unknown = sorted(set(config) - set(_MOE_KEYS))
    if unknown:
        raise MergeError(f"unknown key(s) {unknown} in the MoE merge config; jft reads {list(_MOE_KEYS)}")
    experts = config.get("experts") or []
    mode = config.get("gate_mode", "hidden")
    k = config.get("experts_per_token", 2)
    if "base_model" not in config or not experts:
        raise MergeError("a MoE merge needs base_model and a list of experts")
    if mode not in GATE_MODES:
        raise MergeError(f"gate_mode {mode!r} is not supported; choose from {GATE_MODES}")
    if not 1 <= k <= len(experts):
        raise MergeError(f"experts_per_token={k} must be between 1 and the {len(experts)} experts")
    for j, e in enumerate(experts):
        if not isinstance(e, dict) or set(e) - set(_EXPERT_KEYS):
            raise MergeError(f"experts[{j}]: expected a mapping with keys from {list(_EXPERT_KEYS)}, got {e!r}")
        if "source_model" not in e:
            raise MergeError(f"experts[{j}]: source_model is missing")
        if mode not in ("random", "uniform_random") and not e.get("positive_prompts"):
            raise MergeError(f"experts[{j}] ({e['source_model']}): gate_mode {mode} needs positive_prompts")
    out = _check_out(out_dir)
    dtype = _dtype(config.get("dtype"), "dtype")
    base_folder = resolve(config["base_model"])
    base = _Model(
        str(config["base_model"]),
        base_folder,
        json.loads((base_folder / "config.json").read_text()),
        _weight_map(base_folder),
    )
    sources = {}
    for e in experts:
        ref = e["source_model"]
        if ref not in sources:
            folder = resolve(ref)
            sources[ref] = _Model(
                str(ref), folder, json.loads((folder / "config.json").read_text()), _weight_map(folder)
            )
    for m in sources.values():
        diff = [key for key in (*_ARCH_KEYS, "num_hidden_layers") if m.config.get(key) != base.config.get(key)]
        if diff:
            raise MergeError(
                f"expert {m.ref} differs from base {base.ref} in {diff}; experts must share its architecture"
            )
    if base.config.get("num_local_experts") or base.config.get("model_type") not in ("llama", "mistral"):
        raise MergeError(
            f"base {base.ref}: a MoE merge takes dense Llama or Mistral models, not {base.config.get('model_type')!r}"
        )
    if base.config.get("attention_bias") or base.config.get("mlp_bias"):
        raise MergeError(f"base {base.ref}: attention or MLP biases cannot be expressed by a Mixtral config")
    layers, hidden = base.num_layers, base.config["hidden_size"]
    gates = _router_rows(
        mode, experts, base, layers, hidden, seed, load_hf, load_tokenizer
    )  # [layers, experts, hidden]

    rng = np.random.default_rng(seed)

    def expert_weight(e: dict, name: str, proj: str) -> np.ndarray:
        raw = sources[e["source_model"]].tensor(name, None)
        x = raw.astype(np.float32)
        if e.get("noise_scale"):
            x = x + rng.normal(0.0, e["noise_scale"], x.shape).astype(np.float32)
        if proj == "down_proj" and e.get("residual_scale") is not None:
            x = x * e["residual_scale"]
        return x.astype(dtype or raw.dtype)

    # (output name, shape, dtype, how to compute it), in writing order.
    jobs = [
        (n, *base.spec(n, dtype), lambda n=n: base.tensor(n, dtype))
        for n in base.files
        if ".mlp." not in n and not n.endswith("rotary_emb.inv_freq")
    ]
    for i in range(layers):
        for j, e in enumerate(experts):
            for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                name = f"model.layers.{i}.mlp.{proj}.weight"
                shape, stored = sources[e["source_model"]].spec(name, dtype)
                job = lambda e=e, n=name, p=proj: expert_weight(e, n, p)  # noqa: E731
                jobs.append((f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight", shape, stored, job))
        gate = gates[i].astype(dtype or np.float32)
        jobs.append((f"model.layers.{i}.block_sparse_moe.gate.weight", gate.shape, gate.dtype, lambda g=gate: g))
    writer = _ShardWriter(out, _parse_size(max_shard_size), [job[:3] for job in jobs])
    with _filling(out):
        for name, _, _, compute in jobs:
            writer.add(name, compute())
        writer.close()
    cfg = {k_: v for k_, v in base.config.items() if k_ not in ("mlp_bias", "attention_bias", "pretraining_tp")}
    cfg.update(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_local_experts=len(experts),
        num_experts_per_tok=k,
        sliding_window=None,
        router_aux_loss_coef=0.001,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    if dtype is not None:
        cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = np.dtype(dtype).name
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _copy_tokenizer(resolve(config.get("tokenizer_source") or config["base_model"]), out)
    return out


def _router_rows(mode, experts, base, layers, hidden, seed, load_hf, load_tokenizer) -> np.ndarray:
    """``[layers, experts, hidden]`` router weights for ``gate_mode``."""
    n = len(experts)
    if mode == "random":
        return np.asarray(jax.random.normal(jax.random.key(seed), (layers, n, hidden)), np.float32)
    if mode == "uniform_random":
        bound = 1.0 / math.sqrt(hidden)
        return np.asarray(jax.random.uniform(jax.random.key(seed), (layers, n, hidden), minval=-bound, maxval=bound))
    tokenizer = load_tokenizer(base.folder)
    if tokenizer is None:
        raise MergeError(f"base {base.ref} has no tokenizer; gate_mode {mode} encodes the prompts with it")
    if mode == "cheap_embed":
        embed = base.tensor("model.embed_tokens.weight", np.float32)
    else:
        model, params = load_hf(base.folder, dtype="float32", remat="none")

    def vectors(prompts: list[str]) -> np.ndarray:
        """``[layers, hidden]``: the prompts' summary per layer, before normalising."""
        ids = [tokenizer((tokenizer.bos_token or "") + p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(len(x) for x in ids)
        tokens = np.zeros((len(ids), width), np.int32)
        mask = np.zeros((len(ids), width), np.int32)
        for r, x in enumerate(ids):  # left-padded, so the last position is every prompt's last token
            tokens[r, width - len(x) :], mask[r, width - len(x) :] = x, 1
        if mode == "cheap_embed":
            summed = (embed[tokens] * mask[..., None]).sum((0, 1))
            return np.broadcast_to(summed / max(np.linalg.norm(summed), 1e-8), (layers, hidden))
        _, state = model.apply({"params": params}, tokens, attention_mask=mask, mutable=["intermediates"])
        h = np.asarray(state["intermediates"]["model"]["layers"]["hidden"][0], np.float32)  # [layers, b, t, d]
        if mode == "hidden":
            per_prompt = h[:, :, -1]
        else:
            per_prompt = (h * mask[None, :, :, None]).sum(2) / mask.sum(1)[None, :, None]
        return per_prompt.mean(1)

    rows = []
    for e in experts:
        v = vectors(e["positive_prompts"])
        if e.get("negative_prompts"):
            v = v - vectors(e["negative_prompts"])
        rows.append(v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8))
    return np.stack(rows, axis=1).astype(np.float32)
