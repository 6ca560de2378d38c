"""PEFT on parameter trees: inject a method's leaves, label what trains, merge, switch adapters.

    spec = peft.Peft(lora=peft.Lora(r=8, alpha=16, targets="all-linear"))
    model, params = peft.inject(model, params, spec, jax.random.key(0))
    labels = peft.labels(params, model.peft)        # for jft.partition / TrainState
    print(peft.trainable_summary(params, labels))
    merged_model, merged = peft.merge(model, params)  # LoRA, DoRA and IA3 folded into the weights

An adapter is the tree of trainable leaves (``peft.adapter_of``); several adapters of one base
are kept as ``(spec, adapter)`` pairs and put on the shared base weights per call with
``peft.attach`` (no copy of the base weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft import partition, tree
from jft.models.layers import dora_column_norm
from jft.models.peft_spec import LINEARS, Peft
from jft.quant import QuantizedWeight, dequantize


def build(model: Any, spec: Peft) -> Any:
    """The model class of ``model`` with ``spec`` resolved and applied to its config.

    BitFit turns on the config's ``attention_bias`` / ``mlp_bias``, so the added biases are
    ordinary Llama biases (and export to Hugging Face as such).
    """
    cfg = model.config
    if model.peft.methods:
        raise ValueError(f"the model already has PEFT methods ({model.peft}); start from the base model")
    spec = spec.resolve(cfg.num_hidden_layers)
    targets = set(spec.lora.targets if spec.lora else ()) | set(spec.ia3.targets if spec.ia3 else ())
    if "lm_head" in targets and cfg.tie_word_embeddings:
        raise ValueError("lm_head is targeted, but this model ties it to the input embeddings (no lm_head module)")
    if spec.bitfit is not None:
        cfg = dataclasses.replace(
            cfg,
            attention_bias=cfg.attention_bias or "attention" in spec.bitfit.biases,
            mlp_bias=cfg.mlp_bias or "mlp" in spec.bitfit.biases,
        )
    ad = spec.adapter
    if ad is not None:
        width = cfg.hidden_size // ad.reduction_factor
        if width < 1:
            raise ValueError(f"adapter.reduction_factor={ad.reduction_factor} exceeds hidden_size={cfg.hidden_size}")
        if ad.phm_dim and (cfg.hidden_size % ad.phm_dim or width % ad.phm_dim):
            raise ValueError(
                f"adapter.phm_dim={ad.phm_dim} must divide hidden_size={cfg.hidden_size} and the bottleneck "
                f"width {width} (hidden_size // reduction_factor)"
            )
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
    out = partition.merge(params, {})
    for path in new_paths:
        tree.set_path(out, path, new["/".join(path)])
    spec = new_model.peft
    for name in LINEARS:
        layer = spec.linear(name)
        if layer is not None and layer.dora:
            mod = _module(out, name)
            norm = dora_column_norm
            if name != "lm_head":
                norm = jax.vmap(dora_column_norm, in_axes=(0, 0, 0, None))
            mod["lora_magnitude"] = norm(mod["kernel"], mod["lora_a"], mod["lora_b"], layer.scale).astype(
                mod["lora_magnitude"].dtype
            )
    if spec.prompt is not None:
        out["model"]["prompt"] = _prompt_init(spec.prompt, out["model"]["embed_tokens"]["embedding"], rng)
    return new_model, out


def rules(spec: Peft) -> tuple[tuple[str, str], ...]:
    """Partition rules of ``spec``: its ``train`` rules, then each method's leaves, the rest frozen."""
    out = list(spec.train)
    if spec.lora is not None:
        out.append((".*/lora_(a|b|magnitude)", "trainable"))
    if spec.ia3 is not None:
        out.append((".*/ia3", "trainable"))
    if spec.bitfit is not None:
        out.append((".*/bias", "trainable"))
    if spec.adapter is not None:
        out += [("model/layers/[0-9]+/(attn|mlp)_adapter/.*", "trainable"), ("model/phm_rule", "trainable")]
    if spec.prefix is not None:
        out.append(("model/prefix/.*", "trainable"))
    if spec.prompt is not None:
        out.append(("model/prompt", "trainable"))
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
    params = partition.merge(base_params, {})
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


def merge(model: Any, params: Mapping) -> tuple[Any, dict]:
    """Fold LoRA, DoRA and IA3 into the base weights (and a prefix MLP into its table).

    Returns ``(model, params)`` without those leaves; the merged model computes the same
    logits (up to float rounding). Quantized kernels (QLoRA) are dequantized first, so the
    merged model is full precision. BitFit biases become ordinary biases; adapters and
    prompt/prefix tables stay (``model.peft.methods`` then names them).
    """
    spec = model.peft
    out = partition.merge(params, {})
    for name in LINEARS:
        layer = spec.linear(name)
        if layer is None:
            continue
        mod = _module(out, name)
        kernel = mod["kernel"]
        if isinstance(kernel, QuantizedWeight):  # QLoRA: the merged kernel is full precision again
            w, dtype = dequantize(kernel, jnp.float32), jnp.dtype(kernel.dtype)
        else:
            w, dtype = kernel.astype(jnp.float32), kernel.dtype
        if layer.r:
            a, b = mod.pop("lora_a").astype(jnp.float32), mod.pop("lora_b").astype(jnp.float32)
            w = w + layer.scale * (a @ b)
            if layer.dora:
                m = mod.pop("lora_magnitude").astype(jnp.float32)
                w = w * (m / jnp.linalg.norm(w, axis=-2))[..., None, :]
        if layer.ia3 == "in":
            w = w * mod.pop("ia3").astype(jnp.float32)[..., :, None]
        elif layer.ia3 == "out":
            scale = mod.pop("ia3")
            w = w * scale.astype(jnp.float32)[..., None, :]
            if "bias" in mod:
                mod["bias"] = (mod["bias"] * scale).astype(mod["bias"].dtype)
        mod["kernel"] = w.astype(dtype)
    new_spec = dataclasses.replace(spec, lora=None, ia3=None, bitfit=None)  # BitFit biases are plain biases now
    if spec.prefix is not None and spec.prefix.projection_dim:
        keys, values = model.apply({"params": params}, method=lambda m: m.model.prefix())
        table = jnp.stack([keys, values], 1).transpose(2, 0, 1, 3, 4)  # [n, layers, 2, kv, d]
        dtype = params["model"]["prefix"]["embedding"].dtype
        out["model"]["prefix"] = {"embedding": table.reshape(table.shape[0], -1).astype(dtype)}
        new_spec = dataclasses.replace(new_spec, prefix=dataclasses.replace(spec.prefix, projection_dim=0))
    return type(model)(model.config, new_spec), out


def _module(params: dict, name: str) -> dict:
    if name == "lm_head":
        return params["lm_head"]
    group, proj = name.split(".")
    return params["model"]["layers"][group][proj]


def _prompt_init(spec, embedding: jax.Array, rng: jax.Array) -> jax.Array:
    n, vocab = spec.num_virtual_tokens, embedding.shape[0]
    if spec.init == "text":
        ids = np.resize(np.asarray(spec.init_token_ids), n)
        if ids.max() >= vocab or ids.min() < 0:
            raise ValueError(f"prompt.init_token_ids must be in [0, {vocab}); got {list(spec.init_token_ids)}")
        return embedding[ids]
    if spec.init == "vocab":
        return embedding[jax.random.randint(jax.random.fold_in(rng, 1), (n,), 0, vocab)]
    std = jnp.std(embedding.astype(jnp.float32))
    return (std * jax.random.normal(jax.random.fold_in(rng, 1), (n, embedding.shape[1]))).astype(embedding.dtype)


COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd")


def combine_lora(
    models: list[tuple[Any, Mapping]],
    weights: list[float],
    method: str = "svd",
    rank: int | None = None,
    density: float = 1.0,
    majority_sign: str = "total",
) -> tuple[Any, dict]:
    """Several LoRA adapters of one base combined into one, as peft's ``add_weighted_adapter``.

    ``models`` are ``(model, params)`` with LoRA on the same base weights and targets. The new
    adapter has ``alpha = r`` (scale 1), with per module (``s_i`` each adapter's scale):

    - ``linear``: ``A = sum_i sign_i sqrt|w_i s_i| A_i``, ``B = sum_i sqrt|w_i s_i| B_i`` (equal ranks);
    - ``cat``: ``A = [w_i s_i A_i]``, ``B = [B_i]`` stacked along the rank (exactly ``sum w_i dW_i``);
    - ``svd``: ``sum_i w_i dW_i`` truncated to ``rank`` (default: the largest rank) by SVD;
    - ``ties``: TIES (magnitude pruning to ``density``, ``majority_sign`` "total" or "frequency",
      mean of the agreeing entries) on the A and the B factors, weighted as ``linear``;
    - ``ties_svd``: TIES on the ``w_i dW_i``, then SVD.

    Returns ``(model, params)`` on the first model's base arrays.
    """
    if method not in COMBINATIONS:
        raise ValueError(f"combination {method!r} is not supported; choose from {COMBINATIONS}")
    specs = [m.peft for m, _ in models]
    if any(s.lora is None or s.lora.dora or s.methods != ("lora",) for s in specs):
        raise ValueError("combine_lora takes models whose only PEFT method is LoRA (not DoRA)")
    targets = specs[0].lora.targets
    if any(s.lora.targets != targets for s in specs):
        raise ValueError(f"the adapters target different modules: {[s.lora.targets for s in specs]}")
    ranks = [s.linear(t).r for s in specs for t in targets]
    if method in ("linear", "ties") and len(set(ranks)) > 1:
        raise ValueError(f"{method} needs adapters of one rank; got ranks {sorted(set(ranks))} (use cat or svd)")
    new_rank = {"cat": sum(s.linear(targets[0]).r for s in specs), "svd": rank, "ties_svd": rank}.get(method)
    new_rank = new_rank or max(ranks)
    base_model, base = models[0]
    out_params = partition.merge(base, {})
    for name in targets:
        scales = [s.linear(name).scale for s in specs]
        a = [_module(p, name)["lora_a"].astype(jnp.float32) for _, p in models]
        b = [_module(p, name)["lora_b"].astype(jnp.float32) for _, p in models]

        def ties(xs, ws, name=name):  # per layer, as peft sees each layer's module
            if name == "lm_head":
                return _ties(xs, ws, density, majority_sign)
            return jnp.stack([_ties([x[i] for x in xs], ws, density, majority_sign) for i in range(xs[0].shape[0])])

        if method in ("linear", "ties", "cat"):
            ws = [w * s for w, s in zip(weights, scales, strict=True)]
            if method == "cat":
                new_a = jnp.concatenate([w * x for w, x in zip(ws, a, strict=True)], axis=-1)
                new_b = jnp.concatenate(b, axis=-2)
            else:
                wa = [float(np.sign(w) or 1.0) * np.sqrt(abs(w)) for w in ws]
                wb = [np.sqrt(abs(w)) for w in ws]
                if method == "ties":
                    new_a, new_b = ties(a, wa), ties(b, wb)
                else:
                    new_a = sum(w * x for w, x in zip(wa, a, strict=True))
                    new_b = sum(w * x for w, x in zip(wb, b, strict=True))
        else:
            deltas = [s * (x @ y) for s, x, y in zip(scales, a, b, strict=True)]  # [..., in, out]
            if method == "svd":
                delta = sum(w * d for w, d in zip(weights, deltas, strict=True))
            else:
                delta = ties(deltas, list(weights))
            u, sv, vh = jnp.linalg.svd(jnp.swapaxes(delta, -1, -2), full_matrices=False)  # of [out, in], as peft
            new_b = jnp.swapaxes(u[..., :new_rank] * sv[..., None, :new_rank], -1, -2)  # [r, out]
            new_a = jnp.swapaxes(vh[..., :new_rank, :], -1, -2)  # [in, r]
        dtype = _module(models[0][1], name)["lora_a"].dtype
        mod = _module(out_params, name)
        mod["lora_a"], mod["lora_b"] = new_a.astype(dtype), new_b.astype(dtype)
    spec = dataclasses.replace(
        specs[0],
        lora=dataclasses.replace(
            specs[0].lora, r=new_rank, alpha=float(new_rank), rank_pattern=(), alpha_pattern=(), rslora=False
        ),
    )
    return type(base_model)(base_model.config, spec), out_params


def _ties(tensors: list, weights: list[float], density: float, majority_sign: str) -> jax.Array:
    """peft's TIES on a list of tensors: keep the ``int(density * n)`` largest |x| of each, elect
    the sign (sum of values: ``total``; of signs: ``frequency``), weight, and average the
    agreeing entries over how many agree."""
    from jft.merge import consensus_mask, top_mask

    if density < 1:
        tensors = [x * top_mask(jnp.abs(x).reshape(-1), int(density * x.size)).reshape(x.shape) for x in tensors]
    stacked = jnp.stack(tensors)
    agree = consensus_mask(stacked, "sum" if majority_sign == "total" else "count")  # before weighting, as peft
    weighted = stacked * jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (stacked.ndim - 1))
    return (weighted * agree).sum(0) / jnp.maximum(agree.sum(0), 1.0)
