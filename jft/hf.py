"""Hugging Face checkpoints in and out: config.json <-> LlamaConfig, safetensors <-> params.

Parameter paths map to HF tensor names by a plain rule (``model/layers/mlp/up_proj/kernel``
at layer 3 is ``model.layers.3.mlp.up_proj.weight``, transposed), so the same map serves
every module of the model, with no table to keep up. Only safetensors is read: jft never unpickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jft import quant as jft_quant
from jft import safetensors_io as sio
from jft import sharding as jft_sharding
from jft.models.llama import LlamaConfig, LlamaForCausalLM
from jft.models.peft_spec import LAYER_LINEARS
from jft.quant import QuantizedWeight, dequantize
from jft.safetensors_io import CheckpointError
from jft.tree import get_path, set_path, walk

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_DTYPES = sio.FLOAT_DTYPES
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Buffers some checkpoints carry that are recomputed, not learned.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------- config


def config_from_hf(hf: dict, source: str = "config.json", **overrides) -> LlamaConfig:
    """Translate a transformers config dict (4.x or 5.x form) into a :class:`LlamaConfig`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; jft supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise CheckpointError(f"{source}: required key {key!r} is missing")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    # 5.x: rope_parameters holds rope_theta and the scaling; 4.x: rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise CheckpointError(f"{source}: rope_parameters per layer type are not supported by these model types")
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope or dict(hf.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:  # the oldest spelling
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor is not supported")
    scaling.pop("partial_rotary_factor", None)
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise CheckpointError(
            f"{source}: rope_type {rope_type!r} is not supported; jft supports 'default', 'linear', 'llama3'"
        )
    if hf.get("router_jitter_noise"):
        raise CheckpointError(f"{source}: router_jitter_noise is not supported; set it to 0")
    sliding, layer_types = hf.get("sliding_window"), hf.get("layer_types")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        sliding, layer_types = None, None
    elif model_type in ("qwen2", "qwen3") and layer_types is None:
        n, first = hf["num_hidden_layers"], hf.get("max_window_layers", hf["num_hidden_layers"])
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    eos = hf.get("eos_token_id")
    classifier = any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ())
    num_labels = (hf.get("num_labels") or len(hf.get("id2label") or {}) or 2) if classifier else 0
    kw = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(scaling.items())) if rope_type != "default" else None,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False) if model_type in ("llama", "qwen3") else False,
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        mlp_bias=hf.get("mlp_bias", False) if model_type == "llama" else False,
        sliding_window=sliding,
        layer_types=tuple(layer_types) if layer_types else None,
        num_local_experts=hf.get("num_local_experts", 0) if model_type == "mixtral" else 0,
        num_experts_per_tok=hf.get("num_experts_per_tok", 2),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        pad_token_id=hf.get("pad_token_id"),
        num_labels=num_labels,
    )
    return LlamaConfig(**{**kw, **overrides})


def config_to_hf(cfg: LlamaConfig, dtype: str) -> dict:
    """A config.json dict that transformers 4.x and 5.x both read (rope in both forms)."""
    t = cfg.model_type
    if t not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"model_type {t!r} cannot be written; use one of {SUPPORTED_MODEL_TYPES}")
    expressible = {
        "qkv_bias": t == "qwen2",
        "qk_norm": t == "qwen3",
        "attention_bias": t in ("llama", "qwen3") or not cfg.attention_bias,
        "mlp_bias": t == "llama" or not cfg.mlp_bias,
    }
    for field, ok in expressible.items():
        if getattr(cfg, field) and not ok:
            raise CheckpointError(f"{field}=True cannot be expressed by a {t!r} config.json; change model_type")
    if (t == "mixtral") != bool(cfg.num_local_experts):
        raise CheckpointError("experts (num_local_experts > 0) are written as, and only as, model_type 'mixtral'")
    if t == "qwen3" and not cfg.qk_norm:
        raise CheckpointError("a 'qwen3' config.json implies q/k norms, but qk_norm=False; change model_type")
    if t == "qwen2" and not cfg.qkv_bias:
        raise CheckpointError("a 'qwen2' config.json implies q/k/v biases, but qkv_bias=False; change model_type")
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    eos = list(cfg.eos_token_id)
    arch = _ARCHITECTURES[t].replace("ForCausalLM", "ForSequenceClassification" if cfg.num_labels else "ForCausalLM")
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": t,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})},
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if cfg.num_labels:
        hf["num_labels"] = cfg.num_labels
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    if t in ("llama", "qwen3"):
        hf["attention_bias"] = cfg.attention_bias
    if t == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    if t in ("mistral", "mixtral"):
        hf["sliding_window"] = cfg.sliding_window
        if cfg.layer_types and any(x != "sliding_attention" for x in cfg.layer_types):
            raise CheckpointError(f"a {t!r} config.json cannot express per-layer attention types")
    if t == "mixtral":
        hf.update(
            num_local_experts=cfg.num_local_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            router_jitter_noise=0.0,
            output_router_logits=False,
        )
    if t in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf["sliding_window"] = cfg.sliding_window
        hf["max_window_layers"] = cfg.num_hidden_layers
        hf["layer_types"] = list(cfg.layer_types or ("full_attention",) * cfg.num_hidden_layers)
    elif cfg.sliding_window is not None and t not in ("mistral", "mixtral"):
        raise CheckpointError(f"a {t!r} config.json cannot express sliding_window; use model_type 'mistral'")
    return hf


# ---------------------------------------------------------------------------- names


def hf_names(path: tuple[str, ...], num_layers: int, num_experts: int = 0) -> list[str]:
    """HF tensor names for one jft param path: one per layer for stacked (scanned) params, one per
    layer and expert (layer-major) for stacked expert kernels (``.../experts/w1/kernel``)."""
    *modules, leaf = path
    if leaf not in _LEAF_TO_HF:
        raise CheckpointError(f"param {'/'.join(path)} has no Hugging Face name (unknown leaf {leaf!r})")
    tail = _LEAF_TO_HF[leaf]
    if "layers" not in modules:
        return [".".join([*modules, tail])]
    i = modules.index("layers")
    names = [".".join([*modules[: i + 1], str(n), *modules[i + 1 :], tail]) for n in range(num_layers)]
    if "experts" in modules:  # model.layers.3.block_sparse_moe.experts.5.w1.weight
        names = [n.replace(".experts.", f".experts.{j}.") for n in names for j in range(num_experts)]
    return names


def _stacked_axes(path: tuple[str, ...]) -> int:
    """Leading axes of a param that HF keeps as separate tensors: layers (and experts)."""
    return ("layers" in path[:-1]) + ("experts" in path[:-1])


# ---------------------------------------------------------------------------- load


def resolve(path: str | os.PathLike) -> Path:
    """A local model folder, or a hub repo id downloaded (config, safetensors, tokenizer only)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or str(path).startswith((".", "/", "~")):
        raise CheckpointError(f"{path}: not a model folder (expected a directory with config.json)")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        return Path(snapshot_download(str(path), allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, no access
        raise CheckpointError(
            f"{path}: not a local folder and could not be downloaded from the Hugging Face hub ({e}); "
            "pass the path of a downloaded model folder"
        ) from e


def read_config_json(folder: Path) -> dict:
    """The ``config.json`` of a model folder as a dict. Raises :class:`CheckpointError` naming the
    file when it is missing, unreadable, not JSON or not a JSON object."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a Hugging Face model folder needs its config.json")
    try:
        hf = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e}); restore the file from the model's source") from e
    if not isinstance(hf, dict):
        raise CheckpointError(
            f"{file}: expected a JSON object of model settings, got {type(hf).__name__}; "
            "restore the file from the model's source"
        )
    return hf


def read_config(folder: Path, **overrides) -> LlamaConfig:
    """Read ``config.json`` (and EOS ids from ``generation_config.json``) of a model folder.

    Parameters default to the checkpoint's stored dtype (float32 when it names none) and
    compute defaults to the parameter dtype; ``overrides`` set any :class:`LlamaConfig` field.
    """
    hf = read_config_json(folder)
    file = folder / "config.json"
    gen = folder / "generation_config.json"
    if gen.is_file() and "eos_token_id" not in overrides:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                overrides["eos_token_id"] = tuple(eos if isinstance(eos, list) else [eos])
    if overrides.get("param_dtype") is None:
        stored = hf.get("dtype") or hf.get("torch_dtype")
        overrides["param_dtype"] = stored if stored in _DTYPES else "float32"
    if overrides.get("dtype") is None:
        overrides["dtype"] = overrides["param_dtype"]
    return config_from_hf(hf, str(file), **overrides)


def load_hf(
    path: str | os.PathLike,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    quantize: str | None = None,
    quantize_skip: tuple[str, ...] = ("lm_head",),
    block_size: int = 64,
    double_quant: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    rules=jft_sharding.DEFAULT_RULES,
    **config_overrides,
) -> tuple[LlamaForCausalLM, dict]:
    """Load a Hugging Face model folder (or hub id) into ``(model, params)``.

    Args:
      path: folder with config.json and safetensors weights (single or sharded).
      dtype: parameter dtype ("float32", "bfloat16", "float16"); default: the checkpoint's
        own dtype (config ``dtype``/``torch_dtype``), float32 when it names none.
      compute_dtype: activation/matmul dtype; default ``dtype``. Logits are always float32.
      quantize: ``"nf4"`` or ``"int4"`` to store the linear kernels in 4 bits
        (:mod:`jft.quant`, QLoRA's frozen base), each matrix quantized as it is read.
      quantize_skip: linear modules kept in ``dtype`` (names as in ``jft.peft.LINEARS``, short
        names match too); embeddings and norms are never quantized.
      block_size, double_quant: see :func:`jft.quant.quantize`.
      mesh, rules: place every param on its shards (:func:`jft.sharding.param_shardings`) as it
        is read, so no device ever holds the whole model; default: the default device.
      config_overrides: any other :class:`LlamaConfig` field, e.g. ``remat="none"``.

    A sequence-classification folder (``LlamaForSequenceClassification`` and the Mistral, Qwen2,
    Qwen3 equivalents) loads with its ``score`` head (``num_labels`` from its config); with
    ``num_labels=1`` a causal-LM folder starts a reward model: the trunk is read, the score head is
    new (normal(0, 0.02), a fixed key) and the lm_head is not read.

    Tensors are converted one parameter at a time (a layer stack is filled layer by layer),
    so host memory stays near one model's size. Raises :class:`CheckpointError` naming the
    file and tensor for a missing config, unsupported model, missing or misshapen tensor,
    tensors the config does not explain, or a pickle-only checkpoint.
    """
    folder = resolve(path)
    cfg = read_config(folder, param_dtype=dtype, dtype=compute_dtype, **config_overrides)
    model = LlamaForCausalLM(cfg)
    quantized = _quantized_modules(quantize, quantize_skip)
    shardings = None if mesh is None else jft_sharding.param_shardings(model, mesh, rules)
    files = sio.weight_map(folder)
    used = set()
    params: dict = {}
    fused = _fused_expert_names(files, cfg)  # Mixtral experts stored as stacked tensors
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="numpy")) for f in set(files.values())}
        last: dict = {}  # the stacked expert tensor being read (one at a time)

        def get(name: str) -> np.ndarray:
            if name not in fused:
                used.add(name)
                return handles[files[name]].get_tensor(name)
            source, pick = fused[name]
            if source not in last:
                last.clear()
                last[source] = handles[files[source]].get_tensor(source)
                used.add(source)
            return pick(last[source])

        def read(path_, spec) -> jax.Array:
            """One param: its HF tensors (one per layer if stacked) checked and copied into place."""
            lead = _stacked_axes(path_)
            stacked = lead > 0
            per_layer = spec.shape[lead:]
            stored = per_layer[::-1] if path_[-1] == "kernel" else per_layer  # HF keeps [out, in]
            module = ".".join(path_[-3:-1]) if stacked else path_[0]
            quantized_kernel = path_[-1] == "kernel" and module in quantized
            buf = [] if quantized_kernel else np.empty(spec.shape, _DTYPES[cfg.param_dtype])
            rows = buf if quantized_kernel else buf.reshape(-1, *per_layer)  # a view: one row per HF tensor
            for i, name in enumerate(hf_names(path_, cfg.num_hidden_layers, cfg.num_local_experts)):
                if name not in files and name not in fused:
                    raise CheckpointError(
                        f"{folder}: tensor {name!r} is missing from the checkpoint; "
                        "check that config.json belongs to these weights"
                    )
                tensor = get(name)
                if tensor.shape != tuple(stored):
                    raise CheckpointError(
                        f"{files.get(name, folder)}: tensor {name!r} has shape {tensor.shape}, config.json implies "
                        f"{tuple(stored)}; check that config.json belongs to these weights"
                    )
                if quantized_kernel:  # only this matrix is ever in full precision
                    w = jnp.asarray(tensor.T, _DTYPES[cfg.param_dtype])
                    buf.append(jax.device_get(jft_quant.quantize(w, quantize, block_size, double_quant)))
                    continue
                rows[i if stacked else 0] = tensor.T if path_[-1] == "kernel" else tensor
            where = None if shardings is None else get_path(shardings, path_)
            if quantized_kernel:
                buf = jax.tree.map(lambda *x: np.stack(x), *buf) if stacked else buf[0]
                if mesh is not None:
                    where = jft_sharding.quantized_sharding(buf, mesh, rules, "/".join(path_))
            return jax.block_until_ready(jax.device_put(buf, where))  # placed before buf is released

        for path_, spec in walk(model.param_shapes()):
            if path_ == ("score", "kernel") and "score.weight" not in files:
                continue  # a classifier started from a causal LM folder: its score head is new
            set_path(params, path_, read(path_, spec))
    if cfg.num_labels and "score" not in params:
        shape = model.param_shapes()["score"]["kernel"]
        score = 0.02 * jax.random.normal(jax.random.key(0), shape.shape, jnp.float32)
        where = None if shardings is None else shardings["score"]["kernel"]
        params["score"] = {"kernel": jax.device_put(score.astype(_DTYPES[cfg.param_dtype]), where)}
    unknown = sorted(n for n in files if n not in used and not _IGNORED.match(n))
    if cfg.tie_word_embeddings or cfg.num_labels:  # tied, or a classifier read from a causal LM folder
        unknown = [n for n in unknown if n != "lm_head.weight"]
    if unknown:
        raise CheckpointError(
            f"{folder}: {len(unknown)} tensors are not explained by config.json, e.g. {unknown[:5]}; "
            "check that config.json belongs to these weights"
        )
    return model, params


def _fused_expert_names(files: dict, cfg: LlamaConfig) -> dict:
    """Per-expert names (``...block_sparse_moe.experts.J.w1.weight``) -> (stacked tensor, slice) for
    checkpoints that keep Mixtral's experts stacked (transformers 5's in-memory layout, which
    mergekit-moe writes): ``mlp.gate.weight``, ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate
    rows first), ``mlp.experts.down_proj`` ``[E, H, I]``. Empty for per-expert checkpoints."""
    if not cfg.num_local_experts or "model.layers.0.mlp.experts.gate_up_proj" not in files:
        return {}
    mlp, out = cfg.intermediate_size, {}
    for i in range(cfg.num_hidden_layers):
        old, new = f"model.layers.{i}.block_sparse_moe", f"model.layers.{i}.mlp"
        out[f"{old}.gate.weight"] = (f"{new}.gate.weight", lambda t: t)
        for j in range(cfg.num_local_experts):
            out[f"{old}.experts.{j}.w1.weight"] = (f"{new}.experts.gate_up_proj", lambda t, j=j: t[j, :mlp])
            out[f"{old}.experts.{j}.w3.weight"] = (f"{new}.experts.gate_up_proj", lambda t, j=j: t[j, mlp:])
            out[f"{old}.experts.{j}.w2.weight"] = (f"{new}.experts.down_proj", lambda t, j=j: t[j])
    return out


def _quantized_modules(kind: str | None, skip: tuple[str, ...]) -> set[str]:
    """Names (``self_attn.q_proj``, ``lm_head``) of the linear modules ``load_hf`` quantizes."""
    if kind is None:
        return set()
    if kind not in jft_quant.TABLES:
        raise ValueError(f"quantize={kind!r} is not supported; use one of {sorted(jft_quant.TABLES)} or None")
    names = set(LAYER_LINEARS + ("lm_head",))
    unknown = [s for s in skip if not any(n == s or n.endswith("." + s) for n in names)]
    if unknown:
        raise ValueError(f"quantize_skip names {unknown}, which are not linear modules; choose from {sorted(names)}")
    return {n for n in names if not any(n == s or n.endswith("." + s) for s in skip)}


def load_tokenizer(path: str | os.PathLike):
    """The folder's tokenizer via ``transformers.AutoTokenizer``, or None when it has none."""
    folder = resolve(path)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------------- save


def save_hf(
    model: LlamaForCausalLM,
    params: dict,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer=None,
) -> Path:
    """Write config.json + safetensors (sharded past ``max_shard_size``) that transformers loads.

    ``dtype`` defaults to the params' dtype. Each file is written under a temporary name and
    renamed, and shards of an earlier save into the same folder that the new one does not
    use are removed. ``tokenizer`` (a transformers tokenizer) is saved beside the weights.
    """
    cfg = model.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    leaves = list(walk(params))
    dtype = dtype or str(jnp.dtype(leaves[0][1].dtype))  # the embedding table's (never quantized)
    if dtype not in _DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {list(_DTYPES)}")
    np_dtype = _DTYPES[dtype]
    # Plan: (hf name, param path, layer or None, bytes), grouped into shards by size.
    plan = []
    for path_, leaf in leaves:
        names = hf_names(path_, cfg.num_hidden_layers, cfg.num_local_experts)
        lead = _stacked_axes(path_)
        stacked = lead > 0
        for i, name in enumerate(names):
            shape = getattr(leaf, "full_shape", leaf.shape)
            nbytes = int(np.prod(shape[lead:])) * np.dtype(np_dtype).itemsize
            plan.append((name, path_, i if stacked else None, nbytes))
    shards = [
        [plan[i] for i in shard] for shard in sio.plan_shards([e[3] for e in plan], sio.parse_size(max_shard_size))
    ]
    n = len(shards)
    names = sio.shard_names(n)
    lookup = dict(leaves)
    for fname, shard in zip(names, shards, strict=True):
        tensors = {}
        for name, path_, layer, _ in shard:
            value = lookup[path_]
            if layer is not None:  # one layer (and expert) of a stack
                lead = _stacked_axes(path_)
                value = jax.tree.map(lambda x, i=layer, n=lead: x.reshape(-1, *x.shape[n:])[i], value)
            if isinstance(value, QuantizedWeight):  # a QLoRA base: written dequantized, one matrix at a time
                value = dequantize(value, jnp.float32)
            array = np.asarray(jax.device_get(value)).astype(np_dtype)
            tensors[name] = np.ascontiguousarray(array.T if path_[-1] == "kernel" else array)
        sio.write_tensors(out / fname, tensors)
        del tensors
    index = out / sio.INDEX
    if n > 1:
        weight_map = {e[0]: f for f, shard in zip(names, shards, strict=True) for e in shard}
        sio.write_index(out, weight_map, sum(e[3] for e in plan))
    for stale in out.glob("model*.safetensors*"):
        if stale.name not in names and not (n > 1 and stale == index):
            stale.unlink()
    body = json.dumps(config_to_hf(cfg, dtype), indent=2)
    sio.atomic_write(out / "config.json", lambda tmp: tmp.write_text(body))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
