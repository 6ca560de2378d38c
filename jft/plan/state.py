"""The planner's parameters, trainable labels, optimizer state and per-device shards, all traced from shapes."""

from __future__ import annotations

import math
import re
import warnings

import jax
import numpy as np

from jft.plan.shapes import _new_vocab, _NoTokenizer
from jft.tree import get_path, set_path, walk


def _state(cfg, hf: dict | None, num_devices: int | None, notes: list[str]) -> dict:
    """Everything that does not depend on the platform: shapes, labels, shards, optimizer state."""
    from jax.sharding import AbstractMesh, AxisType

    from jft import partition, peft, sharding
    from jft.config import ConfigError
    from jft.hf import _quantized_modules, config_from_hf
    from jft.models.llama import LlamaConfig, LlamaForCausalLM
    from jft.objectives import TASKS
    from jft.train.optim import optimizer_from_config
    from jft.train.trainer import _peft_spec

    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not one of {sorted(TASKS)}")
    task = TASKS[cfg.task]
    m = cfg.model
    fields = dict(
        **task.model_overrides,
        param_dtype=m.dtype,
        remat=m.remat,
        loss_chunk=m.loss_chunk,
        attention=m.attention,
        attention_chunk=m.attention_chunk,
        mlp_chunk=m.mlp_chunk,
    )
    try:
        if hf is None:
            mcfg = LlamaConfig(**m.new.to_dict(), vocab_size=_new_vocab(cfg, notes), **fields)
        else:
            mcfg = config_from_hf(hf, **fields)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    model = LlamaForCausalLM(mcfg)
    if cfg.peft.methods:
        try:
            model = peft.build(model, _peft_spec(cfg, _NoTokenizer(), task.train_rules))
        except ValueError as e:
            raise ConfigError(f"peft: {e}") from None
    params = model.param_shapes()
    quantized = set()
    if m.quantize:
        kinds = _quantized_modules(m.quantize, tuple(m.quantize_skip))
        for path, leaf in list(walk(params)):
            if path[-1] == "kernel" and _module_name(path) in kinds:
                set_path(params, path, _quantized_shape(leaf, m.quantize, m.quant_block_size, m.double_quant))
                quantized.add(path)

    # what trains: the trainer's rules, in the trainer's order
    layers = mcfg.num_hidden_layers
    try:
        if cfg.peft.methods:
            labels = peft.labels(params, model.peft)
        else:
            labels = partition.labels(params, task.train_rules + tuple(map(tuple, cfg.train.rules)), layers)
    except ValueError as e:
        raise ConfigError(f"train.rules: {e}") from None

    # the mesh: sizes as the config gives them, -1 filled from num_devices
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if num_devices is None:
        num_devices = fixed
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"mesh {sizes}: {num_devices} devices are not a multiple of {fixed}")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh data x fsdp x tensor = {sizes} is {math.prod(sizes)} devices, not {num_devices}")
    mesh = AbstractMesh(tuple(sizes), sharding.AXES, axis_types=(AxisType.Auto,) * 3)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    try:
        shardings = sharding.param_shardings(model, mesh, rules, params)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None

    leaves = {}  # path -> shape, dtype, bytes (in all, per device) and elements (in all, per device)
    for path, leaf in walk(params):
        where = get_path(shardings, path)
        leaves[path] = _sized(leaf, where)

    # what objectives keep beside the model (a reference policy's copy, a value head, a teacher)
    extra_frozen, extra_trainable = _objective_extras(cfg, model, labels, leaves, notes)

    trainable, _ = partition.split(params, labels)
    masks = partition.layer_masks(trainable, labels)
    for name, value in extra_trainable.items():
        trainable[name] = value
    tx, _ = optimizer_from_config(cfg.optim, 1000, masks, seed=cfg.train.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_shapes = jax.eval_shape(tx.init, trainable)

    train_paths = [p for p, _ in walk(trainable) if p in leaves]
    # Optimizer leaves shaped like their param are sharded like it; the rest (counts, scalars) are whole.
    opt_device = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_shapes)[0]:
        keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        owner = leaves.get(keys)
        if owner and tuple(leaf.shape) == tuple(owner["shape"]) and owner["elements"]:
            opt_device += size * owner["device_elements"] // owner["elements"]
        else:
            opt_device += size

    count = lambda leaf: math.prod(getattr(leaf, "full_shape", np.shape(leaf)))
    total = sum(count(leaf) for _, leaf in walk(params))
    learned = 0
    for path, leaf in walk(params):
        learned += round(count(leaf) * float(np.mean(get_path(labels, path))))
    with_state = sum(count(leaf) for _, leaf in walk(trainable))
    weights_dtype = {}
    for path in leaves:
        kind = "4-bit" if path in quantized else str(leaves[path]["dtype"])
        weights_dtype[kind] = weights_dtype.get(kind, 0) + leaves[path]["device_bytes"]

    extra_weights = sum(v["device_bytes"] for v in extra_frozen.values())
    extra_train = {path: _sized(leaf, None) for path, leaf in walk(extra_trainable)}  # replicated
    state = {
        "shape": {
            "model_type": mcfg.model_type,
            "layers": layers,
            "hidden_size": mcfg.hidden_size,
            "intermediate_size": mcfg.intermediate_size,
            "heads": mcfg.num_attention_heads,
            "kv_heads": mcfg.num_key_value_heads,
            "head_dim": mcfg.head_size,
            "vocab_size": mcfg.vocab_size,
            "tied_embeddings": mcfg.tie_word_embeddings,
        },
        "method": _method(cfg, model),
        "params": {"total": int(total), "trainable": int(learned), "with_state": int(with_state)},
        "mesh": {"data": sizes[0], "fsdp": sizes[1], "tensor": sizes[2], "devices": num_devices},
        "model_config": mcfg,
        "peft": model.peft,
        "rules": rules,
        "mesh_sizes": dict(zip(sharding.AXES, sizes, strict=True)),
        "abstract_mesh": mesh,
        "quantized": quantized,
        "leaves": leaves,
        "weights_device": sum(v["device_bytes"] for v in leaves.values()) + extra_weights,
        "weights_by_dtype": weights_dtype,
        "extra_weights": extra_weights,
        "trainable_paths": train_paths,
        "extra_trainable": extra_train,
        "opt_device": opt_device,
    }
    state["batch"] = _batch(cfg, state, notes)
    return state


def _module_name(path: tuple[str, ...]) -> str:
    """``self_attn.q_proj`` for a stacked layer's param, ``lm_head`` for ``lm_head/kernel`` (as load_hf names them)."""
    return ".".join(path[-3:-1]) if path[:2] == ("model", "layers") else path[0]


def _quantized_shape(leaf, kind: str, block_size: int, double_quant: bool):
    from jft.config import ConfigError
    from jft.quant import quantize

    try:
        return jax.eval_shape(lambda k: quantize(k, kind, block_size, double_quant), leaf)
    except ValueError as e:
        raise ConfigError(f"model.quantize: {e}") from None


def _sized(leaf, where) -> dict:
    """Bytes of a param (a QuantizedWeight counts its arrays) in all and on one device."""
    from jft.quant import QuantizedWeight

    if isinstance(leaf, QuantizedWeight):
        parts = [(a, getattr(where, n, None)) for n, a in _quant_arrays(leaf)]
        dtype = "4-bit"
    else:
        parts, dtype = [(leaf, where)], np.dtype(leaf.dtype)
    total = device = device_elements = 0
    for array, sharding in parts:
        shape = tuple(array.shape)
        local = sharding.shard_shape(shape) if sharding is not None else shape
        item = np.dtype(array.dtype).itemsize
        total += math.prod(shape) * item
        device += math.prod(local) * item
        device_elements += math.prod(local)
    shape = tuple(getattr(leaf, "full_shape", np.shape(leaf)))
    elements = math.prod(shape)
    if isinstance(leaf, QuantizedWeight):  # elements of the kernel it stands for, per device
        device_elements = elements * device // max(total, 1)
    return {
        "shape": shape,
        "dtype": dtype,
        "bytes": total,
        "device_bytes": device,
        "elements": elements,
        "device_elements": device_elements,
    }


def _quant_arrays(q):
    for name in ("codes", "scales", "scale_scales", "scale_offset"):
        array = getattr(q, name)
        if array is not None:
            yield name, array


def _objective_extras(cfg, model, labels, leaves, notes) -> tuple[dict, dict]:
    """``(frozen extras, trainable extras)`` an objective adds beside the model's params."""
    from jft.objectives.preference_losses import REFERENCE_FREE

    frozen, trainable = {}, {}
    base_trains = not model.peft.methods or any(
        bool(np.any(get_path(labels, p))) for p in leaves if not _is_peft_leaf(p, model.peft)
    )
    reference = False
    if cfg.task == "dpo":
        reference = cfg.dpo.loss not in REFERENCE_FREE and not cfg.dpo.precompute_reference
    elif cfg.task == "grpo":
        reference = bool(cfg.grpo.beta)
    elif cfg.task == "ppo":
        reference = bool(cfg.ppo.kl_coef)
        if cfg.ppo.value_model:
            notes.append("ppo.value_model: the separate critic's weights are not counted")
        d = model.config.hidden_size
        trainable["value_head"] = {
            "kernel": jax.ShapeDtypeStruct((d,), np.float32),
            "bias": jax.ShapeDtypeStruct((), np.float32),
        }
    elif cfg.task == "distill":
        notes.append(
            "task=distill: the teacher's weights and forward pass are not counted; plan the teacher "
            "alone with --config.model.path=TEACHER to add them"
        )
    if reference and base_trains:
        base = [p for p in leaves if not _is_peft_leaf(p, model.peft)]
        size = sum(leaves[p]["bytes"] for p in base)
        device = sum(leaves[p]["device_bytes"] for p in base)
        frozen["reference"] = {"bytes": size, "device_bytes": device}
        notes.append(f"task={cfg.task}: a frozen copy of the starting weights is the reference policy")
    return frozen, trainable


def _is_peft_leaf(path: tuple[str, ...], spec) -> bool:
    from jft.peft import rules

    name = "/".join(path)
    # the methods' own leaves: their rules, without spec.train's and the last one that freezes the rest
    own = rules(spec)[len(spec.train) : -1]
    return any(re.fullmatch(regex, name) for regex, _ in own)


def _method(cfg, model) -> str:
    spec = model.peft
    parts = []
    if cfg.model.quantize:
        parts.append(f"{cfg.model.quantize} base" + (" (double-quantized scales)" if cfg.model.double_quant else ""))
    if spec.lora is not None:
        lora = spec.lora
        kind = "DoRA" if lora.dora else "rsLoRA" if lora.rslora else "LoRA"
        parts.append(f"{kind} r={lora.r} on {', '.join(lora.targets)}")
    names = {
        "ia3": "IA3",
        "bitfit": "BitFit",
        "adapter": "adapters",
        "prefix": "prefix tuning",
        "prompt": "prompt tuning",
    }
    parts += [names[n] for n in spec.methods if n != "lora"]
    if not spec.methods:
        full = tuple(tuple(r) for r in cfg.train.rules) == ((".*", "trainable"),)
        parts.append("full fine-tuning" if full else "partial fine-tuning (train.rules)")
    return " + ".join(parts)


def _batch(cfg, state, notes) -> dict:
    from jft.config import ConfigError

    spec = state["peft"]
    rows = cfg.train.batch_size
    length = cfg.data.seq_len
    per_row = 1  # sequences the model runs per batch row
    if cfg.task in ("reward", "dpo"):
        per_row = 2  # chosen and rejected
    elif cfg.task == "grpo":
        rows, length = rows * cfg.grpo.num_generations, length + cfg.rl.max_completion_length
    elif cfg.task == "ppo":
        rows, length = rows // max(cfg.ppo.num_mini_batches, 1), length + cfg.rl.max_completion_length
    if cfg.task in ("grpo", "ppo"):
        notes.append(
            f"task={cfg.task}: sampling between steps (the KV cache of the rollouts) is not counted; "
            "only the train step is"
        )
    micro = rows // cfg.train.grad_accum
    split = state["mesh_sizes"]["data"] * state["mesh_sizes"]["fsdp"]
    if micro % split:
        raise ConfigError(
            f"micro-batch of {micro} rows does not split over data x fsdp = {split} devices; make "
            "train.batch_size / grad_accum a multiple of it"
        )
    return {
        "rows_per_step": rows,
        "grad_accum": cfg.train.grad_accum,
        "micro_batch": micro,
        "sequences_per_device": micro * per_row // split,
        "seq_len": length + spec.prompt_tokens,
        "global_sequences": micro * per_row,
        "tokens_per_device": micro * per_row // split * (length + spec.prompt_tokens),
    }
