"""PEFT on parameter trees: inject a method's leaves, label what trains, fold, switch adapters.

    spec = peft.Peft(lora=peft.Lora(r=8, alpha=16, targets="all-linear"))
    model, params = peft.inject(model, params, spec, jax.random.key(0))
    labels = peft.labels(params, model.peft)        # for jft.partition / TrainState
    print(peft.trainable_summary(params, labels))
    folded_model, folded = peft.fold(model, params)  # LoRA, DoRA and IA3 folded into the weights

An adapter is the tree of trainable leaves (``peft.adapter_of``); several adapters of one base
are kept as ``(spec, adapter)`` pairs and put on the shared base weights per call with
``peft.attach`` (no copy of the base weights). Nothing here knows a method: each operation asks
the specs in ``model.peft`` (their hooks, see :class:`jft.models.peft_spec.Method`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft import partition, tree
from jft.models.peft_spec import Peft, linears
from jft.peft.lora import module
from jft.quant import QuantizedWeight, dequantize


def build(model: Any, spec: Peft) -> Any:
    """The model class of ``model`` with ``spec`` resolved and applied to its config (each
    method's ``configure``: BitFit turns on the config's biases, adapters check their width).
    Raises ValueError when the spec does not fit the model."""
    cfg = model.config
    if model.peft.methods:
        raise ValueError(f"the model already has PEFT methods ({model.peft}); start from the base model")
    spec = spec.resolve(cfg.num_hidden_layers, cfg.num_local_experts)
    if cfg.tie_word_embeddings and spec.linear("lm_head") is not None:
        raise ValueError("lm_head is targeted, but this model ties it to the input embeddings (no lm_head module)")
    for method in spec.present():
        cfg = method.configure(cfg)
    return type(model)(cfg, spec)


def inject(model: Any, params: Mapping, spec: Peft, rng: jax.Array) -> tuple[Any, dict]:
    """Add the leaves of the methods in ``spec`` to ``params``; return ``(model, params)``.

    Base leaves are kept as they are (same arrays); new leaves are initialised so that the
    model computes what the base computed, except prompt and prefix tuning, whose virtual
    tokens change the output by design. Only the new leaves are computed (the rest of the
    initialisation is dead code that XLA drops). DoRA magnitudes start at the column norms
    of the base weights. Raises ValueError for a bad spec or one that does not fit the model.
    """
    new_model = build(model, spec)
    shapes = new_model.param_shapes()
    new_paths = [p for p, _ in tree.walk(shapes) if not tree.has_path(params, p)]
    for path, _ in tree.walk(params):
        if not tree.has_path(shapes, path):
            raise ValueError(f"parameter {'/'.join(path)!r} is not part of the model with {spec}")

    def fresh(rng):
        init = new_model.init_params(rng)
        return {"/".join(p): tree.get_path(init, p) for p in new_paths}

    new = jax.jit(fresh)(rng)
    out = partition.join(params, {})
    for path in new_paths:
        tree.set_path(out, path, new["/".join(path)])
    for method in new_model.peft.present():
        method.init_leaves(new_model, out, rng)
    return new_model, out


def rules(spec: Peft) -> tuple[tuple[str, str], ...]:
    """Partition rules of ``spec``: its ``train`` rules, then each method's leaves, the rest frozen."""
    out = list(spec.train)
    for method in spec.present():
        out += method.rules()
    return tuple(out) + ((".*", "frozen"),)


def labels(params: Mapping, spec: Peft) -> dict:
    """``partition.labels(params, rules(spec))``: True for the leaves that train."""
    return partition.labels(params, rules(spec))


def trainable_summary(params: Mapping, labels: Mapping) -> str:
    """``trainable parameters: N / total (p%)``."""
    return partition.summary(params, labels)


def adapter_of(params: Mapping, spec: Peft) -> dict:
    """The trainable leaves of ``params`` under ``spec``: what an adapter checkpoint holds."""
    return partition.split(params, labels(params, spec))[0]


def attach(base_model: Any, base_params: Mapping, spec: Peft, adapter: Mapping) -> tuple[Any, dict]:
    """Put ``adapter`` (from :func:`adapter_of`) onto the base: ``(model, params)``.

    The base arrays are shared, not copied, so many adapters can serve from one base. Raises
    ValueError naming the leaf when the adapter does not fit (missing, extra, wrong shape).
    """
    model = build(base_model, spec)
    shapes = model.param_shapes()
    params = partition.join(base_params, {})
    for path, leaf in tree.walk(adapter):
        name = "/".join(path)
        if not tree.has_path(shapes, path):
            raise ValueError(f"adapter leaf {name!r} is not part of the model with {model.peft}")
        want = tree.get_path(shapes, path).shape
        if tuple(np.shape(leaf)) != tuple(want):
            raise ValueError(f"adapter leaf {name!r} has shape {tuple(np.shape(leaf))}; the model expects {want}")
        tree.set_path(params, path, leaf)
    missing = [p for p, _ in tree.walk(shapes) if not tree.has_path(params, p)]
    if missing:
        raise ValueError(f"the adapter lacks {['/'.join(p) for p in missing][:5]} (and the base has no such leaves)")
    return model, params


def fold(model: Any, params: Mapping) -> tuple[Any, dict]:
    """Fold LoRA, DoRA and IA3 into the base weights (and a prefix MLP into its table).

    Returns ``(model, params)`` without those leaves; the folded model computes the same
    logits (up to float rounding). Each adapted kernel is folded in float32 (quantized kernels,
    QLoRA, dequantized first, so the folded model is full precision) and cast back once. BitFit
    biases become ordinary biases; adapters and prompt/prefix tables stay (``model.peft.methods``
    then names them). (``jft.merge`` is another thing: merging whole models.)
    """
    spec, cfg = model.peft, model.config
    out = partition.join(params, {})
    for name in linears(cfg.num_local_experts):
        layer = spec.linear(name)
        if layer is None:
            continue
        mod = module(out, name)
        kernel = mod["kernel"]
        if isinstance(kernel, QuantizedWeight):  # QLoRA: the folded kernel is full precision again
            w, dtype = dequantize(kernel, jnp.float32), jnp.dtype(kernel.dtype)
        else:
            w, dtype = kernel.astype(jnp.float32), kernel.dtype
        for method in spec.present():
            w = method.fold_linear(name, layer, mod, w)
        mod["kernel"] = w.astype(dtype)
    kept = {method.name: method.fold(model, params, out) for method in spec.present()}
    return type(model)(cfg, dataclasses.replace(spec, **kept)), out
