"""Adapters in Hugging Face peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    peft.save_adapter(model, params, "out/")          # peft.PeftModel.from_pretrained(base, "out/")
    model, params = peft.load_adapter(base_model, base_params, "out/")   # a peft save_pretrained folder

peft stores one method per adapter, so the spec must hold exactly one of LoRA (rsLoRA, DoRA,
rank/alpha patterns), IA3, prefix tuning or prompt tuning. Tensor names are peft's
(``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``); PyTorch keeps Linear
weights ``[out, in]``, so ``lora_A [r, in]`` is ``lora_a[3].T`` and ``lora_B [out, r]`` is
``lora_b[3].T``. Prefix and prompt tuning store one table, ``prompt_embeddings``. Only
safetensors is read or written: jft never unpickles.

A sequence classifier (a reward model, ``num_labels > 0``) under LoRA or IA3 is a ``SEQ_CLS``
adapter: its ``score`` head is one of peft's ``modules_to_save`` (trained whole, stored whole
as ``base_model.model.score.weight [num_labels, hidden]``), so
``PeftModel.from_pretrained(LlamaForSequenceClassification..., folder)`` scores as jft does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jft import tree
from jft.hf import CheckpointError, _atomic
from jft.models.peft_spec import IA3, LINEARS, Lora, Peft, Prefix, Prompt, _pattern, match_targets
from jft.peft import core, native

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_PREFIX = "base_model.model."
_PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}
# Whole modules peft keeps as ``modules_to_save`` that jft holds: module -> {tensor name after
# base_model.model.: (jft param path, transposed)}. peft's save_pretrained drops the wrapper's
# ``modules_to_save.default.`` from the name, so the file has ``base_model.model.score.weight``.
_SAVED_MODULES = {"score": {"score.weight": (("score", "kernel"), True)}}
# What peft's SEQ_CLS task adds to modules_to_save by itself (and writes to adapter_config.json);
# ``classifier`` is no module of a Llama-family model, so peft and jft both pass over it.
_SEQ_CLS_MODULES = ("classifier", "score")
# adapter_config.json fields that describe where the adapter came from, not what it computes.
_INFORMATIONAL = {
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "task_type",
    "peft_type",
    "megatron_core",
    "qalora_group_size",
}
# Initialisations that only set the starting LoRA weights (the rest also change the base weights).
_PLAIN_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")


# ---------------------------------------------------------------------------- save


def save_adapter(
    model: Any, params: Mapping, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``model.peft``'s adapter as peft's ``save_pretrained`` does; return the folder.

    ``params`` are the full params of the PEFT model (base + adapter leaves). LoRA/DoRA/IA3
    tensors are written per layer under peft's names; on a sequence classifier (``num_labels``)
    the adapter is ``SEQ_CLS`` and holds the score head too (peft's ``modules_to_save``, the
    head as ``params`` have it, trained or not); prefix tuning writes its key/value table
    ``[n, layers * 2 * kv_heads * head_dim]`` (a projection MLP is evaluated first, and the
    config keeps ``prefix_projection: true``, exactly as peft saves it); prompt tuning writes
    its ``[n, hidden]`` table. Tensors keep the params' dtype. Each file is written under a
    temporary name and renamed.

    Adapters peft cannot express (BitFit, bottleneck adapters, Compacter, several methods at
    once, extra trainable leaves other than a classifier's score head, prefix or prompt tuning
    on a classifier) are written in jft's own format instead (:mod:`jft.peft.native`), which
    :func:`load_adapter` reads too.
    """
    cfg, spec = model.config, model.peft
    if not spec.methods:
        raise ValueError("the model has no PEFT method: there is no adapter to save")
    saved = _saved_modules(model)
    if saved is None:
        return native.save_native(model, params, out_dir)
    method = spec.methods[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    if method in ("lora", "ia3"):
        for name in LINEARS:
            layer = spec.linear(name)
            if layer is None:
                continue
            mod = core._module(params, name)
            for i, key in enumerate(_module_keys(name, cfg.num_hidden_layers)):
                at = (lambda x: x) if name == "lm_head" else (lambda x, i=i: x[i])
                if method == "lora":
                    tensors[f"{key}.lora_A.weight"] = _host(at(mod["lora_a"])).T
                    tensors[f"{key}.lora_B.weight"] = _host(at(mod["lora_b"])).T
                    if layer.dora:
                        tensors[f"{key}.lora_magnitude_vector"] = _host(at(mod["lora_magnitude"]))
                else:
                    vec = _host(at(mod["ia3"]))
                    tensors[f"{key}.ia3_l"] = vec[None, :] if layer.ia3 == "in" else vec[:, None]
    elif method == "prefix":
        if spec.prefix.projection_dim:
            prefix_only = type(model)(cfg, Peft(prefix=spec.prefix))
            _, merged = core.merge(prefix_only, params)
            # in the params' dtype (core.merge returns the MLP's float32 output)
            table = merged["model"]["prefix"]["embedding"].astype(params["model"]["prefix"]["embedding"].dtype)
        else:
            table = params["model"]["prefix"]["embedding"]
        tensors["prompt_embeddings"] = _host(table)
    else:
        tensors["prompt_embeddings"] = _host(params["model"]["prompt"])
    for module in saved:
        for name, (path, transpose) in _SAVED_MODULES[module].items():
            value = _host(tree.get_path(params, path))
            tensors[_PREFIX + name] = value.T if transpose else value
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _atomic(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    body = json.dumps(_config(spec, cfg, method, base_model_name_or_path, saved), indent=2, sort_keys=True)
    _atomic(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(body + "\n"))
    return out


def has_peft_format(model: Any) -> bool:
    """Whether peft can hold ``model.peft``'s adapter: one of LoRA, IA3, prefix or prompt tuning,
    alone, with no extra trainable leaves except whole modules peft keeps as ``modules_to_save``
    (a sequence classifier's score head, under LoRA or IA3)."""
    return _saved_modules(model) is not None


def _saved_modules(model: Any) -> tuple[str, ...] | None:
    """The ``modules_to_save`` of ``model``'s adapter in peft's format (``("score",)`` for a
    sequence classifier, else ``()``), or None when peft has no format for it."""
    spec = model.peft
    if len(spec.methods) != 1 or spec.methods[0] not in _PEFT_TYPES:
        return None
    saved = ("score",) if model.config.num_labels else ()
    if saved and spec.methods[0] not in ("lora", "ia3"):
        return None  # peft's prompt learning on a classifier is not held to jft's scores
    if not spec.train:
        return saved
    # What the extra rules change must lie inside the modules written whole.
    shapes = model.param_shapes()
    with_rules, without = dict(tree.walk(core.labels(shapes, spec))), core.labels(shapes, replace(spec, train=()))
    inside = {p for m in saved for p, _ in _SAVED_MODULES[m].values()}
    for path, label in tree.walk(without):
        if not np.array_equal(label, with_rules[path]) and path not in inside:
            return None
    return saved


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _module_keys(name: str, num_layers: int) -> list[str]:
    if name == "lm_head":
        return [f"{_PREFIX}lm_head"]
    return [f"{_PREFIX}model.layers.{i}.{name}" for i in range(num_layers)]


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _config(spec: Peft, cfg, method: str, base: str | None, saved: tuple[str, ...] = ()) -> dict:
    seq_cls = bool(cfg.num_labels)
    modules = sorted(set(saved) | set(_SEQ_CLS_MODULES if seq_cls else ()))  # as peft writes them
    common = {
        "base_model_name_or_path": base,
        "inference_mode": True,
        "modules_to_save": modules or None,
        "peft_type": _PEFT_TYPES[method],
        "revision": None,
        "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM",
    }
    if method == "lora":
        lora = spec.lora
        ranks, alphas = {}, {}
        for name in lora.targets:  # per-module values, keyed by names peft matches as we do
            layer = spec.linear(name)
            alpha = _pattern(lora.alpha_pattern, name, lora.alpha)
            if layer.r != lora.r:
                ranks[_short(name)] = layer.r
            if alpha != lora.alpha:
                alphas[_short(name)] = _number(alpha)
        return {
            **common,
            "alpha_pattern": alphas,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": "gaussian" if lora.init == "gaussian" else True,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": _number(lora.alpha),
            "lora_dropout": lora.dropout,
            "r": lora.r,
            "rank_pattern": ranks,
            "target_modules": [_short(n) for n in lora.targets],
            "use_dora": lora.dora,
            "use_rslora": lora.rslora,
        }
    if method == "ia3":
        return {
            **common,
            "fan_in_fan_out": False,
            "feedforward_modules": [_short(n) for n in spec.ia3.feedforward],
            "init_ia3_weights": True,
            "target_modules": [_short(n) for n in spec.ia3.targets],
        }
    if method == "prefix":
        kv_dim = cfg.num_key_value_heads * cfg.head_size
        return {
            **common,
            "encoder_hidden_size": spec.prefix.projection_dim or kv_dim,
            "num_attention_heads": cfg.num_key_value_heads,
            "num_layers": cfg.num_hidden_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": spec.prefix.num_virtual_tokens,
            "prefix_projection": bool(spec.prefix.projection_dim),
            "token_dim": kv_dim,
        }
    return {
        **common,
        "num_attention_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_hidden_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": spec.prompt.num_virtual_tokens,
        "prompt_tuning_init": "SAMPLE_VOCAB" if spec.prompt.init == "vocab" else "RANDOM",
        "prompt_tuning_init_text": None,
        "token_dim": cfg.hidden_size,
        "tokenizer_name_or_path": None,
    }


# ---------------------------------------------------------------------------- load


def load_adapter(model: Any, params: Mapping, adapter_dir: str | os.PathLike) -> tuple[Any, dict]:
    """Read a peft adapter folder (or one in jft's own format) onto the base ``(model, params)``.

    The :class:`jft.peft.Peft` spec is built from ``adapter_config.json`` and the tensors are
    put on the base with :func:`jft.peft.attach` (base arrays shared, not copied). Supported:
    LORA (rsLoRA, DoRA, rank/alpha patterns), IA3, PREFIX_TUNING and PROMPT_TUNING for
    CAUSAL_LM, and LORA and IA3 for SEQ_CLS onto a sequence classifier (``load_hf(...,
    num_labels=N)``): the adapter's score head (``modules_to_save``) replaces the base's and
    trains with the adapter (the spec gets ``train=(("score/.*", "trainable"),)``). Raises
    :class:`jft.CheckpointError` naming the file, key and mismatch for a missing file, an
    unsupported peft type, task or option, a target or ``modules_to_save`` entry that is no
    module of the model, a tensor of the wrong shape, a tensor that maps to no module, or a
    missing tensor.
    """
    folder = Path(adapter_dir)
    if (folder / native.CONFIG).is_file():
        return native.load_native(model, params, folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; expected a peft adapter folder with {CONFIG_NAME}")
    config_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; a peft adapter folder needs its {CONFIG_NAME}")
    if not weights.is_file():
        pickles = [n for n in _PICKLE_NAMES if (folder / n).is_file()]
        if pickles:
            raise CheckpointError(
                f"{folder}: only a pickle adapter ({', '.join(pickles)}); jft never unpickles. Convert it once with "
                "peft: PeftModel.from_pretrained(base, folder).save_pretrained(out, safe_serialization=True)"
            )
        raise CheckpointError(f"{weights}: missing; a peft adapter folder needs its {WEIGHTS_NAME}")
    try:
        conf = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: unreadable ({e})") from e
    if not isinstance(conf, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    cfg = model.config
    if model.peft != Peft():
        raise ValueError(f"the model already has PEFT methods ({model.peft}); load the adapter onto the base model")
    spec, read = _spec_from_config(conf, cfg, str(config_file))
    saved = _modules_to_save(conf, cfg, str(config_file))
    spec = replace(spec, train=tuple((f"{m}/.*", "trainable") for m in saved))
    try:
        new_model = core.build(model, spec)
    except ValueError as e:
        raise CheckpointError(f"{config_file}: the adapter does not fit this model: {e}") from e
    shapes = new_model.param_shapes()
    with safe_open(weights, framework="numpy") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    _check_base_copies(stored, params, cfg, str(weights))
    modules = _read_saved_modules(saved, shapes, stored, str(weights))
    adapter = read(new_model, shapes, stored, str(weights))
    for path, value in tree.walk(modules):
        tree.set_path(adapter, path, value)
    return core.attach(model, params, spec, adapter)


def _spec_from_config(conf: dict, cfg, file: str):
    peft_type = conf.get("peft_type")
    task = conf.get("task_type")
    if task == "SEQ_CLS":
        if peft_type not in ("LORA", "IA3"):
            raise CheckpointError(f"{file}: task_type 'SEQ_CLS' with {peft_type!r}: jft loads SEQ_CLS LORA and IA3")
        if not cfg.num_labels:
            raise CheckpointError(
                f"{file}: task_type 'SEQ_CLS' needs a sequence-classification base (a score head); this one is a "
                "causal LM. Load the base with jft.load_hf(path, num_labels=N)"
            )
    elif task not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{file}: task_type {task!r} is not supported; jft loads CAUSAL_LM and SEQ_CLS adapters")
    if peft_type == "LORA":
        return _lora_spec(conf, cfg, file), _read_linear
    if peft_type == "IA3":
        return _ia3_spec(conf, cfg, file), _read_linear
    if peft_type in ("PREFIX_TUNING", "PROMPT_TUNING"):
        return _prompt_learning_spec(conf, cfg, file, peft_type), _read_table
    raise CheckpointError(
        f"{file}: peft_type {peft_type!r} is not supported; jft reads LORA, IA3, PREFIX_TUNING and PROMPT_TUNING"
    )


def _unsupported(conf: dict, handled: set[str], file: str) -> None:
    """Every field jft does not interpret must hold its neutral (off) value."""
    for key, value in sorted(conf.items()):
        if key in handled or key in _INFORMATIONAL:
            continue
        if value in (None, False, {}, [], "none", ""):
            continue
        raise CheckpointError(f"{file}: option {key}={value!r} is not supported by jft's peft loader")


def _lora_spec(conf: dict, cfg, file: str) -> Peft:
    handled = {"r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "use_dora"}
    handled |= {"rank_pattern", "alpha_pattern", "init_lora_weights", "loftq_config", "eva_config", "modules_to_save"}
    _unsupported(conf, handled, file)
    init = conf.get("init_lora_weights", True)
    if init not in _PLAIN_LORA_INITS:
        raise CheckpointError(
            f"{file}: init_lora_weights={init!r} is not supported: such an adapter goes with changed base weights. "
            "Convert it with peft's save_pretrained(..., path_initial_model_for_weight_conversion=...) first"
        )
    return _resolved(
        lambda: Peft(
            lora=Lora(
                r=int(conf.get("r", 8)),
                alpha=float(conf.get("lora_alpha", 8)),
                targets=_targets(conf, "target_modules", file),
                dropout=float(conf.get("lora_dropout") or 0.0),
                rslora=bool(conf.get("use_rslora", False)),
                dora=bool(conf.get("use_dora", False)),
                init="gaussian" if init == "gaussian" else "uniform",
                rank_pattern=tuple((k, int(v)) for k, v in (conf.get("rank_pattern") or {}).items()),
                alpha_pattern=tuple((k, float(v)) for k, v in (conf.get("alpha_pattern") or {}).items()),
            )
        ),
        cfg,
        file,
    )


def _ia3_spec(conf: dict, cfg, file: str) -> Peft:
    _unsupported(conf, {"target_modules", "feedforward_modules", "init_ia3_weights", "modules_to_save"}, file)
    targets = _targets(conf, "target_modules", file)
    feedforward = tuple(conf.get("feedforward_modules") or ())
    spec = _resolved(lambda: Peft(ia3=IA3(targets=targets, feedforward=feedforward)), cfg, file)
    if set(match_targets(feedforward, cfg.num_hidden_layers, "feedforward_modules", True)) - set(spec.ia3.targets):
        raise CheckpointError(f"{file}: feedforward_modules {list(feedforward)} are not all in target_modules")
    return spec


def _modules_to_save(conf: dict, cfg, file: str) -> tuple[str, ...]:
    """The modules a LORA / IA3 adapter holds whole: its ``modules_to_save``, with those peft's
    SEQ_CLS task adds by itself; ``classifier`` (no module of these models) is passed over."""
    names = conf.get("modules_to_save") or []
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{file}: modules_to_save must be a list of module names, got {names!r}")
    seq_cls = conf.get("task_type") == "SEQ_CLS"
    names = set(names) | set(_SEQ_CLS_MODULES if seq_cls else ())
    unknown = sorted(n for n in names if n not in _SAVED_MODULES and not (seq_cls and n == "classifier"))
    if unknown:
        raise CheckpointError(
            f"{file}: modules_to_save {unknown} is not supported: jft's peft loader takes whole only the score "
            f"head of a SEQ_CLS adapter ({sorted(_SAVED_MODULES)}); use jft's own adapter format for other "
            "trained modules"
        )
    if "score" in names and not cfg.num_labels:
        raise CheckpointError(f"{file}: modules_to_save names 'score', but this base is a causal LM with no score head")
    return tuple(sorted(n for n in names if n in _SAVED_MODULES))


def _read_saved_modules(saved: tuple[str, ...], shapes: Mapping, stored: dict[str, np.ndarray], file: str) -> dict:
    """The tensors of the ``modules_to_save`` (popped from ``stored``) as jft leaves."""
    out: dict = {}
    for module in saved:
        for name, (path, transpose) in _SAVED_MODULES[module].items():
            key = _PREFIX + name
            if key not in stored:
                raise CheckpointError(
                    f"{file}: tensor {key!r} is missing; the adapter's modules_to_save lists {module!r}, "
                    "which peft saves whole"
                )
            tensor, want = stored.pop(key), tree.get_path(shapes, path)
            shape = tuple(want.shape)[::-1] if transpose else tuple(want.shape)
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}; the base model expects {shape} "
                    "(another num_labels or hidden size?)"
                )
            tree.set_path(out, path, (tensor.T if transpose else tensor).astype(want.dtype))
    return out


def _targets(conf: dict, field: str, file: str):
    value = conf.get(field)
    if isinstance(value, str):
        return value
    if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
        raise CheckpointError(f"{file}: {field} must be a list of module names or a regex, got {value!r}")
    return tuple(value)


def _resolved(make, cfg, file: str) -> Peft:
    """``make()`` resolved against the base model; a bad value becomes a CheckpointError."""
    try:
        return make().resolve(cfg.num_hidden_layers)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from e


def _prompt_learning_spec(conf: dict, cfg, file: str, peft_type: str) -> Peft:
    handled = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"}
    if peft_type == "PREFIX_TUNING":
        handled |= {"encoder_hidden_size", "prefix_projection", "init_weights"}
    else:
        handled |= {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"}
    _unsupported(conf, handled, file)
    n = conf.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise CheckpointError(f"{file}: num_virtual_tokens must be a positive integer, got {n!r}")
    if conf.get("num_transformer_submodules", 1) not in (1, None):
        raise CheckpointError(
            f"{file}: num_transformer_submodules={conf['num_transformer_submodules']} (an encoder-decoder adapter); "
            "jft's decoders need 1"
        )
    if peft_type == "PROMPT_TUNING":
        want = {"token_dim": cfg.hidden_size}
    else:
        kv = cfg.num_key_value_heads
        want = {"token_dim": kv * cfg.head_size, "num_attention_heads": kv, "num_layers": cfg.num_hidden_layers}
    for key, value in want.items():
        if conf.get(key) is not None and conf[key] != value:
            raise CheckpointError(
                f"{file}: {key}={conf[key]} does not match the base model ({value}); "
                "the adapter was made for another model"
            )
    # peft saves prefix tuning's computed table even with prefix_projection: the MLP is not kept.
    return Peft(prefix=Prefix(num_virtual_tokens=n)) if peft_type == "PREFIX_TUNING" else Peft(prompt=Prompt(n))


def _expected_linear(model, shapes: Mapping, num_layers: int) -> dict[str, tuple[tuple[str, ...], int | None, tuple]]:
    """peft key -> (jft param path, layer or None, peft shape)."""
    spec = model.peft
    out = {}
    for name in LINEARS:
        layer = spec.linear(name)
        if layer is None:
            continue
        base = ("lm_head",) if name == "lm_head" else ("model", "layers", *name.split("."))
        leaves = []
        if layer.r:
            leaves += [("lora_A.weight", "lora_a", True), ("lora_B.weight", "lora_b", True)]
            if layer.dora:
                leaves.append(("lora_magnitude_vector", "lora_magnitude", False))
        if layer.ia3:
            leaves.append(("ia3_l", "ia3", False))
        for i, key in enumerate(_module_keys(name, num_layers)):
            for suffix, leaf, transpose in leaves:
                path = (*base, leaf)
                shape = tree.get_path(shapes, path).shape
                shape = shape if name == "lm_head" else shape[1:]
                if transpose:
                    shape = shape[::-1]
                elif leaf == "ia3":
                    shape = (1, shape[0]) if layer.ia3 == "in" else (shape[0], 1)
                out[f"{key}.{suffix}"] = (path, None if name == "lm_head" else i, tuple(shape))
    return out


def _read_linear(model, shapes: Mapping, stored: dict[str, np.ndarray], file: str) -> dict:
    cfg = model.config
    expected = _expected_linear(model, shapes, cfg.num_hidden_layers)
    for key in stored:
        if key not in expected:
            raise CheckpointError(f"{file}: tensor {key!r} maps to no adapted module of {model.peft}; {_hint(key)}")
    missing = [k for k in expected if k not in stored]
    if missing:
        raise CheckpointError(f"{file}: {len(missing)} tensors are missing, e.g. {missing[:3]}")
    adapter: dict = {}
    bufs = {}
    for key, (path, layer, shape) in expected.items():
        tensor = stored[key]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}; the base model with {model.peft} "
                f"expects {shape}"
            )
        spec = tree.get_path(shapes, path)
        if path not in bufs:
            bufs[path] = np.empty(spec.shape, spec.dtype)
        value = tensor.T if path[-1] in ("lora_a", "lora_b") else tensor.reshape(-1)
        bufs[path][... if layer is None else layer] = value
    for path, buf in bufs.items():
        tree.set_path(adapter, path, buf)
    return adapter


def _read_table(model, shapes: Mapping, stored: dict[str, np.ndarray], file: str) -> dict:
    spec = model.peft
    path = ("model", "prefix", "embedding") if spec.prefix is not None else ("model", "prompt")
    extra = [k for k in stored if k != "prompt_embeddings"]
    if extra:
        raise CheckpointError(
            f"{file}: tensors {extra[:5]} map to nothing; a prompt-learning adapter holds only 'prompt_embeddings'"
        )
    if "prompt_embeddings" not in stored:
        raise CheckpointError(f"{file}: tensor 'prompt_embeddings' is missing")
    want = tree.get_path(shapes, path)
    tensor = stored["prompt_embeddings"]
    if tuple(tensor.shape) != tuple(want.shape):
        raise CheckpointError(
            f"{file}: tensor 'prompt_embeddings' has shape {tuple(tensor.shape)}; the base model with "
            f"{spec} expects {tuple(want.shape)}"
        )
    adapter: dict = {}
    tree.set_path(adapter, path, tensor.astype(want.dtype))
    return adapter


# Base weights peft adds to an adapter file when embeddings are targeted (lm_head counts) or
# were resized: key -> (jft param path, transposed).
_BASE_COPIES = {
    "lm_head.base_layer.weight": (("lm_head", "kernel"), True),
    "lm_head.weight": (("lm_head", "kernel"), True),
    "model.embed_tokens.base_layer.weight": (("model", "embed_tokens", "embedding"), False),
    "model.embed_tokens.weight": (("model", "embed_tokens", "embedding"), False),
}


def _check_base_copies(stored: dict[str, np.ndarray], params: Mapping, cfg, file: str) -> None:
    """Drop peft's copies of the base embeddings / lm_head when they equal the base's; refuse others."""
    for name, (path, transpose) in _BASE_COPIES.items():
        key = _PREFIX + name
        if key not in stored:
            continue
        tensor = stored.pop(key)
        if path[0] == "lm_head" and cfg.tie_word_embeddings:
            path, transpose = ("model", "embed_tokens", "embedding"), False
        base = np.asarray(jax.device_get(tree.get_path(params, path)))
        base = base.T if transpose else base
        same = base.shape == tensor.shape and np.allclose(
            base.astype(np.float32), tensor.astype(np.float32), rtol=1e-2, atol=1e-6
        )
        if not same:
            raise CheckpointError(
                f"{file}: tensor {key!r} (shape {tuple(tensor.shape)}) is a copy of base weights that differs from "
                f"this base model's {'/'.join(path)} (shape {tuple(base.shape)}); peft saves it when the embeddings "
                "were resized or trained. jft adapters hold no base weights: load the base model it was made for"
            )


def _hint(key: str) -> str:
    if not key.startswith(_PREFIX):
        return f"peft adapter tensors start with {_PREFIX!r}"
    return "check that adapter_config.json's target_modules belong to these tensors"
