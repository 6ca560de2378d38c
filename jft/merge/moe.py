"""Mixture-of-experts merges (mergekit-moe's YAML): dense experts into one Mixtral folder."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import numpy as np

from jft import safetensors_io as sio
from jft.hf import load_hf, load_tokenizer, resolve
from jft.merge.config import MergeError, dtype_of
from jft.merge.folders import ARCH_KEYS, Model, check_out, copy_tokenizer, filling

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
    out = check_out(out_dir)
    dtype = dtype_of(config.get("dtype"), "dtype")
    base = Model.open(config["base_model"])
    sources = {ref: Model.open(ref) for ref in dict.fromkeys(e["source_model"] for e in experts)}
    for m in sources.values():
        diff = [key for key in (*ARCH_KEYS, "num_hidden_layers") if m.config.get(key) != base.config.get(key)]
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
    gates = _router_rows(mode, experts, base, layers, hidden, seed)  # [layers, experts, hidden]

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
                job = lambda e=e, n=name, p=proj: expert_weight(e, n, p)
                jobs.append((f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight", shape, stored, job))
        gate = gates[i].astype(dtype or np.float32)
        jobs.append((f"model.layers.{i}.block_sparse_moe.gate.weight", gate.shape, gate.dtype, lambda g=gate: g))
    writer = sio.ShardWriter(out, sio.parse_size(max_shard_size), [job[:3] for job in jobs])
    with filling(out):
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
    copy_tokenizer(resolve(config.get("tokenizer_source") or config["base_model"]), out)
    return out


def _router_rows(mode, experts, base: Model, layers, hidden, seed) -> np.ndarray:
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
