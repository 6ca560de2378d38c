"""Adapters in Hugging Face peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    peft.save_adapter(model, params, "out/")          # peft.PeftModel.from_pretrained(base, "out/")
    model, params = peft.load_adapter(base_model, base_params, "out/")   # a peft save_pretrained folder

peft stores one method per adapter, so the spec must hold exactly one method with a
``peft_type`` (:data:`jft.peft.registry.METHODS`: LoRA with rsLoRA, DoRA, rank/alpha patterns;
IA3; prefix tuning; prompt tuning). What the files hold comes from the method's family file:
its ``peft_config`` / ``from_peft_config`` (the config) and its ``peft_tensors`` name table
(:mod:`jft.peft.table`), one table that both saving and loading read. Tensor names are peft's
(``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``); PyTorch keeps Linear
weights ``[out, in]``, so ``lora_A [r, in]`` is ``lora_a[3].T``. Only safetensors is read or
written: jft never unpickles.

A sequence classifier (a reward model, ``num_labels > 0``) under LoRA or IA3 is a ``SEQ_CLS``
adapter: its ``score`` head is one of peft's ``modules_to_save`` (trained whole, stored whole
as ``base_model.model.score.weight [num_labels, hidden]``), so
``PeftModel.from_pretrained(LlamaForSequenceClassification..., folder)`` scores as jft does.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jft import tree
from jft.hf import CheckpointError
from jft.models.peft_spec import Peft
from jft.peft import core, native
from jft.peft.registry import BY_PEFT_TYPE
from jft.peft.table import PREFIX as _PREFIX
from jft.safetensors_io import atomic_write, read_tensors, write_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# Whole modules peft keeps as ``modules_to_save`` that jft holds: module -> {tensor name after
# base_model.model.: (jft param path, transposed)}. peft's save_pretrained drops the wrapper's
# ``modules_to_save.default.`` from the name, so the file has ``base_model.model.score.weight``.
_SAVED_MODULES = {"score": {"score.weight": (("score", "kernel"), True)}}
# What peft's SEQ_CLS task adds to modules_to_save by itself (and writes to adapter_config.json);
# ``classifier`` is no module of a Llama-family model, so peft and jft both pass over it.
_SEQ_CLS_MODULES = ("classifier", "score")


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

    LoRA on Mixtral's experts is written as peft's LoRA on the fused expert tensors
    (``target_parameters``, see :class:`jft.peft.Lora`). Adapters peft cannot express (BitFit,
    bottleneck adapters, Compacter, several methods at once, extra trainable leaves other than a
    classifier's score head, prefix or prompt tuning on a classifier, and, with a warning, expert
    LoRA with dropout) are written in jft's own format instead (:mod:`jft.peft.native`), which
    :func:`load_adapter` reads too.
    """
    spec = model.peft
    if not spec.methods:
        raise ValueError("the model has no PEFT method: there is no adapter to save")
    problem = spec.present()[0].peft_unsupported(model) if len(spec.methods) == 1 else None
    if problem:
        warnings.warn(problem, stacklevel=2)
    saved = _saved_modules(model)
    if saved is None:
        return native.save_native(model, params, out_dir)
    method = spec.present()[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = json.dumps(_config(model, params, method, base_model_name_or_path, saved), indent=2, sort_keys=True)
    export_model, export = method.peft_export(model, params)
    tensors: dict[str, np.ndarray] = {}
    for key, t in method.peft_tensors(export_model, export).items():
        value = _host(tree.get_path(export, t.path))
        tensors[key] = t.to_peft(value if t.layer is None else value[t.layer])
    tensors.update(method.peft_write(export_model, export))
    for module in saved:
        for name, (path, transpose) in _SAVED_MODULES[module].items():
            value = _host(tree.get_path(params, path))
            tensors[_PREFIX + name] = value.T if transpose else value
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    write_tensors(out / WEIGHTS_NAME, tensors)
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(body + "\n"))
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
    if len(spec.methods) != 1 or spec.present()[0].peft_type is None:
        return None
    method = spec.present()[0]
    if method.peft_unsupported(model):
        return None
    saved = ("score",) if model.config.num_labels else ()
    if saved and not method.seq_cls:
        return None  # e.g. peft's prompt learning on a classifier is not held to jft's scores
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


def _config(model: Any, params: Mapping, method: Any, base: str | None, saved: tuple[str, ...] = ()) -> dict:
    seq_cls = bool(model.config.num_labels)
    modules = sorted(set(saved) | set(_SEQ_CLS_MODULES if seq_cls else ()))  # as peft writes them
    common = {
        "base_model_name_or_path": base,
        "inference_mode": True,
        "modules_to_save": modules or None,
        "peft_type": method.peft_type,
        "revision": None,
        "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM",
    }
    return {**common, **method.peft_config(model, params)}


# ---------------------------------------------------------------------------- load


def load_adapter(model: Any, params: Mapping, adapter_dir: str | os.PathLike) -> tuple[Any, dict]:
    """Read a peft adapter folder (or one in jft's own format) onto the base ``(model, params)``.

    The :class:`jft.peft.Peft` spec is built from ``adapter_config.json`` and the tensors are
    put on the base with :func:`jft.peft.attach` (base arrays shared, not copied). Supported:
    LORA (rsLoRA, DoRA, rank/alpha patterns, Mixtral experts as ``target_parameters``), IA3,
    PREFIX_TUNING and PROMPT_TUNING for CAUSAL_LM, and LORA and IA3 for SEQ_CLS onto a sequence
    classifier (``load_hf(..., num_labels=N)``): the adapter's score head (``modules_to_save``) replaces the base's and
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
    spec = _spec_from_config(conf, cfg, str(config_file))
    saved = _modules_to_save(conf, cfg, str(config_file))
    spec = replace(spec, train=tuple((f"{m}/.*", "trainable") for m in saved))
    try:
        new_model = core.build(model, spec)
    except ValueError as e:
        raise CheckpointError(f"{config_file}: the adapter does not fit this model: {e}") from e
    shapes = new_model.param_shapes()
    stored = read_tensors(weights)
    _check_base_copies(stored, params, cfg, str(weights))
    modules = _read_saved_modules(saved, shapes, stored, str(weights))
    adapter = _read(new_model, shapes, stored, str(weights))
    for path, value in tree.walk(modules):
        tree.set_path(adapter, path, value)
    return core.attach(model, params, spec, adapter)


def _spec_from_config(conf: dict, cfg, file: str) -> Peft:
    """The resolved spec of an ``adapter_config.json``, read by its method's ``from_peft_config``."""
    peft_type = conf.get("peft_type")
    task = conf.get("task_type")
    method = BY_PEFT_TYPE.get(peft_type)
    if task == "SEQ_CLS":
        if method is None or not method.seq_cls:
            seq_cls = " and ".join(t for t, m in BY_PEFT_TYPE.items() if m.seq_cls)
            raise CheckpointError(f"{file}: task_type 'SEQ_CLS' with {peft_type!r}: jft loads SEQ_CLS {seq_cls}")
        if not cfg.num_labels:
            raise CheckpointError(
                f"{file}: task_type 'SEQ_CLS' needs a sequence-classification base (a score head); this one is a "
                "causal LM. Load the base with jft.load_hf(path, num_labels=N)"
            )
    elif task not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{file}: task_type {task!r} is not supported; jft loads CAUSAL_LM and SEQ_CLS adapters")
    if method is None:
        *most, last = BY_PEFT_TYPE
        raise CheckpointError(
            f"{file}: peft_type {peft_type!r} is not supported; jft reads {', '.join(most)} and {last}"
        )
    return method.from_peft_config(conf, cfg, file)


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


def _read(model, shapes: Mapping, stored: dict[str, np.ndarray], file: str) -> dict:
    """The adapter leaves of ``stored`` (peft's tensors) by the method's name table."""
    method = model.peft.present()[0]
    adapter = method.peft_read(model, shapes, stored, file)  # tensors that are no one leaf's (pops them)
    table = method.peft_tensors(model, shapes)
    for key in stored:
        if key not in table:
            raise CheckpointError(f"{file}: tensor {key!r} maps to no adapted module of {model.peft}; {_hint(key)}")
    missing = [k for k in table if k not in stored]
    if missing:
        raise CheckpointError(f"{file}: {len(missing)} tensors are missing, e.g. {missing[:3]}")
    bufs = {}
    for key, t in table.items():
        tensor = stored[key]
        if tuple(tensor.shape) != t.shape:
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}; the base model with {model.peft} "
                f"expects {t.shape}"
            )
        if t.path not in bufs:
            leaf = tree.get_path(shapes, t.path)
            bufs[t.path] = np.empty(leaf.shape, leaf.dtype)
        bufs[t.path][... if t.layer is None else t.layer] = t.from_peft(tensor)
    for path, buf in bufs.items():
        tree.set_path(adapter, path, buf)
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
    if key == "prompt_embeddings" or not key.startswith(_PREFIX):
        return f"peft adapter tensors start with {_PREFIX!r}; a prompt-learning adapter holds only 'prompt_embeddings'"
    return "check that adapter_config.json's target_modules belong to these tensors"
