"""``jft plan``: the memory a run's config needs on each device, from shapes alone.

    from jft.config import load_config
    from jft.plan import format_plan, plan

    report = plan(load_config("configs/qlora_llama.py"), size="llama-3-8b")
    print(format_plan(report))              # params, bytes per device, fits / does not fit

Nothing is read but ``config.json`` (or a built-in table of shapes), and nothing is allocated or
compiled. Every number that the code decides comes from the code: parameter shapes from tracing
the model's init (:func:`jax.eval_shape`, PEFT leaves included), 4-bit kernels from tracing
:func:`jft.quant.quantize`, what trains from :mod:`jft.partition` / :mod:`jft.peft` labels, the
optimizer state from tracing the run's own optax chain, and each device's shard from
:func:`jft.sharding.param_shardings` on an abstract mesh of the config's sizes. Activations are a
model of what the train step keeps for its backward pass (``docs/memory.md``), held to XLA's
compiled memory analysis of the real step in ``tests/test_plan.py``.

The transient memory of a step has two phases that are never live at once: the backward pass
(activations, the gradients being written) and the optimizer update (gradients, one float32
buffer per trained parameter). The total is the persistent state plus the larger phase.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import jax
import numpy as np

from jft.tree import get_path, set_path, walk

GiB = 2**30

# name -> (bytes per device, platform); the memory a chip has, not what a runtime leaves free.
DEVICES: dict[str, tuple[int, str]] = {
    "T4": (16 * GiB, "gpu"),
    "A100-40GB": (40 * GiB, "gpu"),
    "A100-80GB": (80 * GiB, "gpu"),
    "H100": (80 * GiB, "gpu"),
    "v5e": (16 * GiB, "tpu"),
    "v4": (32 * GiB, "tpu"),
    "v5p": (95 * GiB, "tpu"),
}
# A plan fits when it needs at most this share of a device: the rest is for the runtime, XLA's own
# scratch (collectives, cuDNN workspaces), fragmentation and the error of the activation model.
HEADROOM = 0.9

_LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
_QWEN25 = dict(model_type="qwen2", max_position_embeddings=32768, rope_theta=1000000.0)

# Architectural numbers of well-known models, as in their config.json (no weights, nothing else):
# enough for a plan without a model folder (``--size``).
SIZES: dict[str, dict] = {
    "llama-2-7b": dict(
        _LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
    "llama-2-13b": dict(
        _LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
    ),
    "llama-2-70b": dict(
        _LLAMA2,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "llama-3-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "llama-3-70b": dict(
        _LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "llama-3.2-1b": dict(
        _LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "mistral-7b": dict(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
    ),
    "qwen2.5-0.5b": dict(
        _QWEN25,
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        _QWEN25,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
    ),
}
# Hub names (lower case, organisation and -instruct / -chat / -hf dropped) whose shapes are a SIZES entry.
_HUB_NAMES = {
    "llama-2-7b": "llama-2-7b",
    "llama-2-13b": "llama-2-13b",
    "llama-2-70b": "llama-2-70b",
    "meta-llama-3-8b": "llama-3-8b",
    "llama-3-8b": "llama-3-8b",
    "llama-3.1-8b": "llama-3-8b",
    "meta-llama-3.1-8b": "llama-3-8b",
    "meta-llama-3-70b": "llama-3-70b",
    "llama-3-70b": "llama-3-70b",
    "llama-3.1-70b": "llama-3-70b",
    "llama-3.3-70b": "llama-3-70b",
    "llama-3.2-1b": "llama-3.2-1b",
    "mistral-7b-v0.1": "mistral-7b",
    "mistral-7b-v0.2": "mistral-7b",
    "mistral-7b-v0.3": "mistral-7b",
    "mistral-7b": "mistral-7b",
    "qwen2.5-0.5b": "qwen2.5-0.5b",
    "qwen2.5-7b": "qwen2.5-7b",
}

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


def plan(
    config, size: str | dict | None = None, devices=None, *, num_devices: int | None = None, platform=None
) -> dict:
    """The memory the train step of ``config`` needs per device, without loading or compiling.

    Args:
      config: a run config (:func:`jft.config.load_config`, overrides applied).
      size: a name in :data:`SIZES` (``"llama-3-8b"``): that model's shapes instead of
        ``model.path``'s ``config.json``. Without it: ``model.path``'s ``config.json`` (a local
        folder, or the Hugging Face cache), else a hub id whose name is in the table, else the new
        model of ``model.new`` when ``model.path`` is empty.
      devices: names in :data:`DEVICES` to check (default all); ``"A100"`` means both A100s.
      num_devices: devices of the mesh, which fills the config's ``-1`` mesh size (default: the
        product of the fixed sizes, i.e. the ``-1`` size counts 1).
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``: estimate for this backend only (what
        ``model.compute_dtype="auto"`` and ``model.attention="auto"`` resolve to); default: the
        platforms of ``devices``.

    Returns a dict: ``model`` (shapes and where they came from), ``method``, ``params``
    (``total``, ``trainable``; ``with_state``: the parameters that carry gradients and optimizer
    state, which counts whole layer stacks that train in part), ``mesh``, ``batch``,
    ``estimates`` (per platform: bytes per device of ``weights``, ``optimizer``, ``batch``,
    ``gradients``, ``activations``, ``update`` and ``total``, with a ``detail`` of each),
    ``devices`` (name, memory, platform, needed bytes, ``fits``: "yes", "tight" or "no") and
    ``notes``. Raises :class:`jft.config.ConfigError` for a config the trainer would refuse
    (a batch or mesh that does not split, a 4-bit base without PEFT) or a model it cannot size.
    """
    from jft.config import ConfigError, check

    check(config, values=False)
    cfg = config
    chosen = _devices(devices)
    platforms = [platform] if platform else sorted({DEVICES[d][1] for d in chosen})
    for p in platforms:
        if p not in ("cpu", "gpu", "tpu"):
            raise ConfigError(f"platform={p!r}; choose cpu, gpu or tpu")
    notes: list[str] = []
    if cfg.model.quantize and not cfg.peft.methods:
        raise ConfigError("model.quantize (QLoRA) needs peft.methods to train: a 4-bit base is frozen")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not a multiple of grad_accum={cfg.train.grad_accum}"
        )

    hf, source = _model_source(cfg, size, notes)
    state = _state(cfg, hf, num_devices, notes)
    estimates = {p: _estimate(cfg, state, p, notes) for p in platforms}
    if cfg.distill.teacher and cfg.task != "distill":  # jft distill: the teacher answers first
        teacher = _teacher(cfg, state, notes)
        for p in platforms:
            estimates[p]["generation"] = _generation(cfg, state, teacher, p)
    out = {
        "model": {"source": source, **state["shape"]},
        "method": state["method"],
        "params": state["params"],
        "mesh": state["mesh"],
        "batch": state["batch"],
        "estimates": estimates,
        "devices": [],
        "notes": notes,
    }
    for name in chosen:
        memory, kind = DEVICES[name]
        est = out["estimates"][platform or kind]
        need = max(est["total"], est.get("generation", {}).get("total", 0))
        fits = "yes" if need <= HEADROOM * memory else "tight" if need <= memory else "no"
        out["devices"].append(
            {"name": name, "memory": memory, "platform": kind, "needed": need, "fits": fits, "free": memory - need}
        )
    if any(d["platform"] == "gpu" and d["needed"] > 0.75 * d["memory"] for d in out["devices"]):
        notes.append(
            "GPU: JAX takes 75% of the memory by default; for a plan above that, run with "
            "XLA_PYTHON_CLIENT_MEM_FRACTION=.95"
        )
    return out


# ---------------------------------------------------------------------------- model shapes


def _devices(devices) -> list[str]:
    from jft.config import ConfigError

    if devices is None:
        return list(DEVICES)
    if isinstance(devices, str):
        devices = [devices]
    names = []
    for want in devices:
        key = want.lower().replace("_", "-")
        hits = [n for n in DEVICES if n.lower() == key or n.lower().startswith(key + "-")]
        hits = hits or [n for n in DEVICES if n.lower().replace("gb", "") == key]
        if not hits:
            raise ConfigError(f"unknown device {want!r}; choose from {list(DEVICES)}")
        names += [n for n in hits if n not in names]
    return names


def _model_source(cfg, size, notes: list[str]) -> tuple[dict | None, str]:
    """``(hf config dict or None for a new model, where it came from)``."""
    from jft.config import ConfigError

    if isinstance(size, dict):
        return dict(size), "the given config.json fields"
    if size:
        key = size.lower()
        if key not in SIZES:
            raise ConfigError(f"unknown size {size!r}; choose from {list(SIZES)}")
        return dict(SIZES[key]), f"{key} (jft's table of shapes: architecture only)"
    if not cfg.model.path:
        return None, "a new model from model.new"
    return _hf_source(cfg.model.path, "model.path", notes)


def _hf_source(path: str, what: str, notes: list[str]) -> tuple[dict, str]:
    """``config.json`` of a local folder or of a hub id in the Hugging Face cache, else the table's
    shapes for a hub id it knows (no network either way)."""
    import json

    from jft.config import ConfigError

    local = Path(path).expanduser()
    file = local / "config.json" if local.is_dir() else None
    if file is None and not str(path).startswith((".", "/", "~")):
        file = _cached_config(path)
    if file is not None and file.is_file():
        try:
            return json.loads(file.read_text()), str(file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{file}: unreadable ({e})") from e
    name = _table_name(path)
    if name:
        notes.append(
            f"{what}={path}: no config.json here or in the Hugging Face cache; {name}'s shapes from jft's table"
        )
        return dict(SIZES[name]), f"{name} (jft's table of shapes for {path}: architecture only)"
    raise ConfigError(
        f"{what}={path!r}: no config.json there (nor in the Hugging Face cache); pass a model folder, "
        f"or --size with one of {list(SIZES)}"
    )


def _cached_config(repo: str) -> Path | None:
    """``config.json`` of a hub repo if the Hugging Face cache holds it (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "config.json")
    except Exception:  # not a repo id, or no huggingface_hub
        return None
    return Path(hit) if isinstance(hit, str) else None


def _table_name(repo: str) -> str | None:
    name = repo.rstrip("/").split("/")[-1].lower()
    name = re.sub(r"-(instruct|chat|hf)$", "", re.sub(r"-(chat-hf|instruct)$", "", name))
    return _HUB_NAMES.get(name)


def _new_vocab(cfg, notes: list[str]) -> int:
    if cfg.tokenizer.path:
        from jft.hf import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer.path)
        if tokenizer is not None:
            return len(tokenizer)
    from jft.tokenizer import DEFAULT_VOCAB_SIZE

    notes.append(
        f"new model: its tokenizer is built from the data, so the vocabulary is counted at its largest "
        f"({DEFAULT_VOCAB_SIZE} tokens)"
    )
    return DEFAULT_VOCAB_SIZE


class _NoTokenizer:
    """Stands in for the tokenizer where a PEFT spec reads one (prompt tuning's init text: the ids
    do not change any shape)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [0]}


# ---------------------------------------------------------------------------- params, labels, state


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

    count = lambda leaf: math.prod(getattr(leaf, "full_shape", np.shape(leaf)))  # noqa: E731
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


# ---------------------------------------------------------------------------- activations


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


# ---------------------------------------------------------------------------- the table


def format_plan(report: dict) -> str:
    """A plain-text table of :func:`plan`'s report: what is counted, bytes per device, fits."""
    m, p, mesh, b = report["model"], report["params"], report["mesh"], report["batch"]
    lines = [
        f"model: {m['model_type']}, {m['layers']} layers, hidden {m['hidden_size']}, MLP {m['intermediate_size']}, "
        f"heads {m['heads']}/{m['kv_heads']} (q/kv), vocab {m['vocab_size']}"
        + (", tied embeddings" if m["tied_embeddings"] else ""),
        f"  from: {m['source']}",
        f"method: {report['method']}",
        f"parameters: {p['total']:,} total, {p['trainable']:,} trainable "
        f"({100 * p['trainable'] / max(p['total'], 1):.2f}%)"
        + (f"; {p['with_state']:,} with gradients and optimizer state" if p["with_state"] != p["trainable"] else ""),
        f"mesh: data {mesh['data']} x fsdp {mesh['fsdp']} x tensor {mesh['tensor']} = {mesh['devices']} devices",
        f"batch: {b['rows_per_step']} rows per step in {b['grad_accum']} micro-batch(es) of {b['micro_batch']}; "
        f"{b['sequences_per_device']} sequences of {b['seq_len']} tokens per device",
        "",
    ]
    estimates = report["estimates"]
    names = list(estimates)
    rows = [
        ("compute dtype", lambda e: e["compute_dtype"]),
        ("attention", lambda e: e["attention"]),
        ("weights", lambda e: _size(e["weights"])),
        ("optimizer state", lambda e: _size(e["optimizer"])),
        ("gradients", lambda e: _size(e["gradients"])),
        ("activations (backward)", lambda e: _size(e["activations"])),
        ("  saved across layers", lambda e: _size(e["detail"]["saved_for_backward"])),
        ("optimizer update (transient)", lambda e: _size(e["update"])),
        ("batch", lambda e: _size(e["batch"])),
        ("total per device", lambda e: _size(e["total"])),
    ]
    if any("generation" in e for e in estimates.values()):  # jft distill: the teacher answers first
        gen = lambda key: lambda e: _size(e["generation"][key])  # noqa: E731
        rows += [
            ("jft distill, generation:", lambda e: ""),
            ("  teacher weights", gen("weights")),
            ("  KV cache", gen("kv_cache")),
            ("  prefill activations", gen("prefill")),
            ("  generation total", gen("total")),
        ]
    width = max(len(r[0]) for r in rows) + 2
    lines.append("per device".ljust(width) + "".join(f"{n:>16}" for n in names))
    for label, get in rows:
        lines.append(label.ljust(width) + "".join(f"{get(estimates[n]):>16}" for n in names))
    lines.append("(total = weights + optimizer state + batch + gradients + the larger of activations and update)")
    if any("generation" in e for e in estimates.values()):
        lines.append(
            f"(generation: teacher {next(iter(estimates.values()))['generation']['teacher']}; "
            "a device needs the larger phase)"
        )
    lines.append("")
    lines.append(f"{'device':<12}{'memory':>10}{'needs':>12}{'free':>12}  fits (at most {HEADROOM:.0%} of memory)")
    for dev in report["devices"]:
        sizes = f"{_size(dev['memory']):>10}{_size(dev['needed']):>12}{_size(dev['free']):>12}"
        lines.append(f"{dev['name']:<12}{sizes}  {dev['fits']}")
    if report["notes"]:
        lines.append("")
        lines += [f"note: {n}" for n in dict.fromkeys(report["notes"])]
    return "\n".join(lines)


def _size(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"
