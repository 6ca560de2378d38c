"""jft's own adapter format, for methods peft has no format for (bottleneck adapters, Compacter,
BitFit, LoRA on Mixtral experts, combinations): ``jft_adapter.json`` (the :class:`Peft` spec) + ``adapter.safetensors``
(the trainable leaves, keyed by their ``/``-joined param paths, stacked layers whole)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jft import tree
from jft.hf import CheckpointError
from jft.models.peft_spec import Peft
from jft.peft.core import adapter_of, attach
from jft.peft.registry import BY_NAME
from jft.safetensors_io import atomic_write, read_tensors, write_tensors

CONFIG = "jft_adapter.json"
WEIGHTS = "adapter.safetensors"


def save_native(model: Any, params: Mapping, out_dir: str | os.PathLike) -> Path:
    """Write the adapter of ``model.peft`` in jft's format; returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"/".join(p): np.asarray(x) for p, x in tree.walk(adapter_of(params, model.peft))}
    write_tensors(out / WEIGHTS, tensors)
    meta = {"format": "jft-adapter", "version": 1, "peft": spec_to_dict(model.peft)}
    atomic_write(out / CONFIG, lambda f: Path(f).write_text(json.dumps(meta, indent=2)))
    return out


def load_native(model: Any, params: Mapping, adapter_dir: str | os.PathLike) -> tuple[Any, dict]:
    """Put an adapter written by :func:`save_native` onto the base ``(model, params)``."""
    folder = Path(adapter_dir)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing; a jft adapter folder holds {CONFIG} and {WEIGHTS}")
    try:
        meta = json.loads((folder / CONFIG).read_text())
        spec = spec_from_dict(meta["peft"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG}: not a valid jft adapter config ({e})") from None
    adapter: dict = {}
    for key, value in read_tensors(folder / WEIGHTS).items():
        tree.set_path(adapter, tuple(key.split("/")), value)
    try:
        return attach(model, params, spec, adapter)
    except ValueError as e:
        raise CheckpointError(f"{folder / WEIGHTS}: {e}") from None


def spec_to_dict(spec: Peft) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(d: Mapping) -> Peft:
    kw = {name: cls(**_tuples(d[name])) for name, cls in BY_NAME.items() if d.get(name) is not None}
    return Peft(**kw, train=_tuples(d.get("train", ())))


def _tuples(x):
    if isinstance(x, Mapping):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return tuple(_tuples(v) for v in x)
    return x
