"""The planner's activation model: what the train step keeps for its backward pass (docs/memory.md)."""

from __future__ import annotations

import math

import jax
import numpy as np

from jft.plan.shapes import _hf_source
from jft.plan.state import _module_name, _quantized_shape, _sized
from jft.tree import get_path, set_path, walk

# The activation model's factors (docs/memory.md, "How activations are counted"), measured on
# XLA's compiled train step (tests/test_plan.py): the backward pass of one layer holds 1.8 times
# what the layer reads when it recomputes it (the values and their gradients), 1.35 times when the
# forward kept it; whole attention scores cost 1.5 float32 score arrays in a layer's backward and
# 2.25 per layer kept; the loss head two float32 logit chunks (recomputed logits, their gradient).
_BACKWARD_RECOMPUTED = 1.8
_BACKWARD_SAVED = 1.35
_DENSE_SCORES = 1.5
_DENSE_SCORES_SAVED = 2.25
_LOSS_CHUNKS = 2.0


def _estimate(cfg, state, platform: str, notes: list[str]) -> dict:
    """Bytes per device on ``platform``: state, gradients, activations, update, total."""
    from jft.losses import loss_chunk_size
    from jft.models import attention as attention_lib

    mcfg, spec, batch = state["model_config"], state["peft"], state["batch"]
    mesh = state["mesh_sizes"]
    split = _splitter(state)
    compute = _compute_dtype(cfg, platform)
    bc = np.dtype(jax.numpy.dtype(compute)).itemsize
    bp = np.dtype(jax.numpy.dtype(cfg.model.dtype)).itemsize

    r, t = batch["sequences_per_device"], batch["seq_len"]
    n = r * t  # tokens per device per micro-batch
    L, d, inter = mcfg.num_hidden_layers, mcfg.hidden_size, mcfg.intermediate_size
    hd = mcfg.head_size
    heads = mcfg.num_attention_heads // split("heads")
    qd = heads * hd
    kvd = mcfg.num_key_value_heads * hd // split("kv_heads")
    mlp = inter // split("mlp")
    vocab = mcfg.vocab_size // split("vocab")
    experts = mcfg.num_local_experts
    if experts:
        mlp *= mcfg.num_experts_per_tok  # each token runs k experts' MLPs
        notes.append("Mixtral: the MLP activations are counted for the top-k experts of every token")

    # attention: which implementation the training call runs on this platform
    impl = attention_lib.resolve(cfg.model.attention, platform if platform != "cpu" else "cpu")
    keys = t + spec.prefix_tokens
    kernel_ok = not spec.prefix_tokens and not (spec.prompt_tokens and cfg.data.pack)
    if impl == "splash" and not (kernel_ok and t % 128 == 0):
        impl = "chunked"
    if impl == "cudnn" and not (kernel_ok and compute in ("bfloat16", "float16") and hd % 8 == 0 and hd <= 128):
        impl = "chunked"
    chunk = cfg.model.attention_chunk
    if impl == "chunked" and t <= chunk:
        impl = "xla"
    scores = r * heads * t * keys * 4 if impl == "xla" else 0  # one float32 score array of a layer
    attention = {"xla": "whole scores (t^2)", "chunked": "chunked flash", "splash": "splash", "cudnn": "cuDNN flash"}

    # per token, per layer: what the backward pass of a layer reads (saved with remat "none",
    # recomputed otherwise): x, normed x (+ its float32 copy), q, k, v, the attention output, the
    # residual, the second norm (+ float32), gate, up and their product
    mlp_tok = 3 * mlp * bc
    chunked_mlp = cfg.model.mlp_chunk and t > cfg.model.mlp_chunk
    per_tok = bc * (4 * d + 2 * qd + 2 * kvd) + 8 * d + (0 if chunked_mlp else mlp_tok)
    if impl in ("splash", "cudnn"):
        per_tok += heads * 4  # the kernel's log-sum-exp
    if mcfg.qk_norm:
        per_tok += (qd + kvd) * bc
    extra_tok, transient_tok = _peft_tokens(spec, d, qd, kvd, mlp, bc, cfg)
    per_tok += extra_tok
    layer_acts = n * per_tok + _DENSE_SCORES * scores  # what the backward of a layer reads

    # weights cast to the compute dtype where they are used (float32 masters, bf16 compute): one
    # layer's worth while it runs; every layer's with remat "none" (the backward reads the copies)
    layer_weights = sum(
        v["device_elements"] for p, v in state["leaves"].items() if p[:2] == ("model", "layers") and len(p) > 2
    ) // max(L, 1)
    casts = layer_weights * bc if bc != bp else 0
    # the backward of a layer reads its weights in the compute dtype (the cast, or the transposed
    # copy the input-gradient matmul reads): one layer's worth
    layer_copy = layer_weights * bc
    gathered = 0
    if mesh["fsdp"] > 1:  # FSDP: a layer's weights are gathered whole (over fsdp) while it runs
        gathered = layer_weights * split("embed") * bc
    dequant = 0
    if state["quantized"]:  # a 4-bit kernel is dequantized (float32 values, then the compute dtype)
        biggest = max(v["device_elements"] for p, v in state["leaves"].items() if p in state["quantized"])
        dequant = biggest // max(L, 1) * (4 + bc) * split("embed")

    remat = cfg.model.remat
    if remat == "none":
        saved = L * (n * per_tok + _DENSE_SCORES_SAVED * scores + casts)
    elif remat == "nothing_saveable":
        saved = L * n * d * bc
    else:  # dots saveable: the layer input and the projections' outputs (estimated, see docs/memory.md)
        dots = (qd + 2 * kvd + 2 * d + 2 * mlp) * bc
        saved = L * (n * (d * bc + dots) + (_DENSE_SCORES * scores if remat == "dots_saveable" else 0))
        notes.append(f"model.remat={remat!r}: the saved dots are estimated (not checked against XLA)")
    factor = _BACKWARD_SAVED if remat == "none" else _BACKWARD_RECOMPUTED
    backward = factor * layer_acts + layer_copy + gathered + dequant
    if remat != "none":  # recomputed LoRA branches exist apart from the base outputs
        backward += n * transient_tok
    if impl == "chunked":
        backward += 4 * r * heads * chunk * min(chunk, keys) * 4  # score blocks of the online softmax
    if chunked_mlp:
        backward += _BACKWARD_RECOMPUTED * r * cfg.model.mlp_chunk * mlp_tok

    # the loss head: one chunk of float32 logits and their gradient, the final hidden states and
    # their float32 gradient, and the head's weights cast to the compute dtype
    positions = loss_chunk_size(batch["global_sequences"], t, mcfg.vocab_size, cfg.model.loss_chunk)
    logits = r * positions * vocab * 4
    head = state["leaves"].get(("lm_head", "kernel")) or state["leaves"][("model", "embed_tokens", "embedding")]
    head_cast = (
        head["device_elements"] * split("embed") * bc
        if (bc != bp or ("lm_head", "kernel") in state["quantized"])
        else 0
    )
    if mcfg.num_labels:  # a sequence classifier (reward model): per-token scores, no vocabulary
        logits, head_cast = n * mcfg.num_labels * 4, 0
    loss = _LOSS_CHUNKS * logits + 2 * n * d * 4 + head_cast
    outside = n * d * (2 * bc + 4)  # embeddings, the last layer's output, the final norm

    activations = int(saved + outside + max(backward, loss))

    # gradients (trainable leaves only, the params' dtype; a float32 accumulator with grad_accum)
    leaves = state["leaves"]
    train_elems = sum(leaves[p]["device_elements"] for p in state["trainable_paths"])
    train_elems += sum(v["device_elements"] for v in state["extra_trainable"].values())
    grads = sum(leaves[p]["device_elements"] * np.dtype(leaves[p]["dtype"]).itemsize for p in state["trainable_paths"])
    grads += sum(v["device_bytes"] for v in state["extra_trainable"].values())
    accumulator = train_elems * 4 if cfg.train.grad_accum > 1 else 0
    update = train_elems * 4  # the normalised, clipped gradient (or float32 update) the optimizer makes
    # the backward phase holds the gradients being written (and the accumulator), the update phase
    # the summed gradients (the accumulator, if any) and the update
    backward_phase = grads + accumulator + activations
    update_phase = (accumulator or grads) + update

    inputs = 5 * 4 * n * cfg.train.grad_accum  # the step's batch arrays (ids, targets, weights, segments, positions)
    weights = state["weights_device"] + sum(v["device_bytes"] for v in state["extra_trainable"].values())
    optimizer = state["opt_device"]
    persistent = weights + optimizer + inputs
    transient = max(backward_phase, update_phase)
    return {
        "compute_dtype": compute,
        "attention": attention[impl],
        "weights": int(weights),
        "optimizer": int(optimizer),
        "batch": int(inputs),
        "gradients": int(grads + accumulator),
        "activations": int(activations),
        "update": int(update),
        "total": int(persistent + transient),
        "detail": {
            "weights_by_dtype": {k: int(v) for k, v in state["weights_by_dtype"].items()},
            "reference_copy": int(state["extra_weights"]),
            "saved_for_backward": int(saved),
            "layer_backward": int(backward),
            "loss_head": int(loss),
            "outside_layers": int(outside),
            "loss_chunk_positions": int(positions),
            "gradient_accumulator": int(accumulator),
            "state": int(persistent),
            "transient": int(transient),
        },
    }


def _compute_dtype(cfg, platform: str) -> str:
    """``model.compute_dtype`` on ``platform`` (as :func:`jft.config.resolve_compute_dtype` resolves it there)."""
    compute = cfg.model.compute_dtype
    if compute == "auto":
        compute = "bfloat16" if platform in ("gpu", "tpu") else "float32"
    return compute or cfg.model.dtype


def _splitter(state):
    """``split(logical axis) -> shards`` of that axis on the plan's mesh, from the rules table."""
    table, mesh = dict(state["rules"]), state["mesh_sizes"]

    def split(logical: str) -> int:
        target = table.get(logical)
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        return math.prod(mesh[a] for a in axes)

    return split


def _teacher(cfg, state, notes) -> dict:
    """``distill.teacher``'s config and weights per device (jft distill's generation phase)."""
    from jft import sharding
    from jft.config import ConfigError
    from jft.hf import _quantized_modules, config_from_hf
    from jft.models.llama import LlamaForCausalLM

    m, d = cfg.model, cfg.distill
    hf, source = _hf_source(d.teacher, "distill.teacher", notes)
    try:
        teacher = config_from_hf(hf, param_dtype=m.dtype, remat="none")
    except ValueError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    model = LlamaForCausalLM(teacher)
    params = model.param_shapes()
    if d.teacher_quant:
        kinds = _quantized_modules(d.teacher_quant, tuple(m.quantize_skip))
        for path, leaf in list(walk(params)):
            if path[-1] == "kernel" and _module_name(path) in kinds:
                set_path(params, path, _quantized_shape(leaf, d.teacher_quant, m.quant_block_size, m.double_quant))
    shardings = sharding.param_shardings(model, state["abstract_mesh"], state["rules"], params)
    weights = sum(_sized(leaf, get_path(shardings, path))["device_bytes"] for path, leaf in walk(params))
    return {"config": teacher, "source": source, "weights": weights}


def _generation(cfg, state, teacher, platform: str) -> dict:
    """jft distill's first phase, before the student trains: the teacher's weights, its KV cache
    (``generate_batch_size x num_samples`` rows of ``seq_len + max_new_tokens`` slots, in the
    compute dtype) and one layer's activations of the prefill (prompts of at most ``seq_len -
    max_new_tokens`` tokens)."""
    t, d, split = teacher["config"], cfg.distill, _splitter(state)
    bc = np.dtype(jax.numpy.dtype(_compute_dtype(cfg, platform))).itemsize
    rows, slots = d.generate_batch_size * d.num_samples, cfg.data.seq_len + d.max_new_tokens
    kvd = t.num_key_value_heads * t.head_size // split("kv_heads")
    qd = t.num_attention_heads * t.head_size // split("heads")
    cache = t.num_hidden_layers * 2 * rows * slots * kvd * bc
    width = 3 * t.hidden_size + 2 * qd + 2 * kvd + 3 * t.intermediate_size // split("mlp")
    prefill = rows * max(cfg.data.seq_len - d.max_new_tokens, 1) * width * bc
    return {
        "teacher": teacher["source"],
        "weights": int(teacher["weights"]),
        "kv_cache": int(cache),
        "prefill": int(prefill),
        "total": int(teacher["weights"] + cache + prefill),
    }


def _peft_tokens(spec, d, qd, kvd, mlp, bc, cfg) -> tuple[float, float]:
    """Bytes per token per layer a PEFT method adds: ``(kept like activations, transient in the
    backward of a layer)``."""
    dims = {
        "self_attn.q_proj": (d, qd),
        "self_attn.k_proj": (d, kvd),
        "self_attn.v_proj": (d, kvd),
        "self_attn.o_proj": (qd, d),
        "mlp.gate_proj": (d, mlp),
        "mlp.up_proj": (d, mlp),
        "mlp.down_proj": (mlp, d),
    }
    kept = transient = 0.0
    for name, (n_in, n_out) in dims.items():
        layer = spec.linear(name)
        if layer is None:
            continue
        if layer.r:
            kept += layer.r * bc  # x A, the input of B
            transient += n_out * bc  # the base output and the LoRA output exist apart before their sum
            if layer.dropout:
                kept += n_in * bc  # the dropped-out input
                transient += n_in * 5  # its random bits and mask
            if layer.dora:
                kept += n_out * bc  # the base output, rescaled by the magnitude
        if layer.ia3:
            kept += (n_in if layer.ia3 == "in" else n_out) * bc
    if spec.adapter is not None:
        width = d // spec.adapter.reduction_factor
        count = 2 if spec.adapter.kind == "houlsby" else 1
        kept += count * (2 * width + d) * bc
    return kept, transient
