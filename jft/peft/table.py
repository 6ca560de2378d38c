"""peft-format name tables: each method family maps its leaves to peft's tensor names in one
table that :mod:`jft.peft.hf_format` reads both to save and to load.

A table is ``{peft tensor name: PeftTensor}``. PyTorch keeps Linear weights ``[out, in]``, so a
LoRA factor is ``transposed``; IA3 vectors are a ``row`` ``[1, n]`` (input scale) or a
``column`` ``[n, 1]`` (output scale); tables are the ``same``. ``layer`` picks one layer of a
stacked (scanned) leaf, None for the whole leaf. The helpers below are shared by the families'
``adapter_config.json`` readers and writers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jft.hf import CheckpointError

PREFIX = "base_model.model."
# adapter_config.json fields that describe where the adapter came from, not what it computes.
INFORMATIONAL = {
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
LAYOUTS = ("same", "transposed", "row", "column")


class PeftTensor(NamedTuple):
    """One peft tensor: the jft leaf it is (``path``, ``layer`` of a stacked leaf or None), the
    shape peft stores and how the two are laid out (one of ``LAYOUTS``)."""

    path: tuple[str, ...]
    layer: int | None
    shape: tuple[int, ...]
    layout: str = "same"

    def to_peft(self, x: np.ndarray) -> np.ndarray:
        """The jft value (this layer's) as peft stores it."""
        if self.layout == "transposed":
            return x.T
        if self.layout == "row":
            return x[None, :]
        if self.layout == "column":
            return x[:, None]
        return x

    def from_peft(self, t: np.ndarray) -> np.ndarray:
        """peft's tensor as the jft value (this layer's)."""
        if self.layout == "transposed":
            return t.T
        if self.layout in ("row", "column"):
            return t.reshape(-1)
        return t


def tensor(path: tuple[str, ...], layer: int | None, shape, layout: str = "same") -> PeftTensor:
    """A :class:`PeftTensor` from the jft shape of the (whole) leaf at ``path``."""
    shape = tuple(shape) if layer is None else tuple(shape)[1:]
    peft_shape = {"transposed": shape[::-1], "row": (1, *shape), "column": (*shape, 1)}.get(layout, shape)
    return PeftTensor(path, layer, peft_shape, layout)


def module_keys(name: str, num_layers: int) -> list[str]:
    """peft's tensor-name stems of module ``name`` (``self_attn.q_proj``): one per layer."""
    if name == "lm_head":
        return [f"{PREFIX}lm_head"]
    return [f"{PREFIX}model.layers.{i}.{name}" for i in range(num_layers)]


def module_path(name: str) -> tuple[str, ...]:
    """jft's param path of module ``name`` (``model/layers/self_attn/q_proj``, ``lm_head``)."""
    return ("lm_head",) if name == "lm_head" else ("model", "layers", *name.split("."))


def short(name: str) -> str:
    """``q_proj`` of ``self_attn.q_proj``: the target name peft writes."""
    return name.rsplit(".", 1)[-1]


def number(x: float) -> int | float:
    """``8`` for 8.0 (peft's configs keep integral alphas as integers)."""
    return int(x) if float(x).is_integer() else float(x)


def unsupported(conf: dict, handled: set[str], file: str) -> None:
    """Every field jft does not interpret must hold its neutral (off) value."""
    for key, value in sorted(conf.items()):
        if key in handled or key in INFORMATIONAL:
            continue
        if value in (None, False, {}, [], "none", ""):
            continue
        raise CheckpointError(f"{file}: option {key}={value!r} is not supported by jft's peft loader")


def targets_field(conf: dict, field: str, file: str):
    """A ``target_modules``-like field: a regex string or a tuple of names."""
    value = conf.get(field)
    if isinstance(value, str):
        return value
    if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
        raise CheckpointError(f"{file}: {field} must be a list of module names or a regex, got {value!r}")
    return tuple(value)


def resolved(make, cfg, file: str):
    """``make()`` (a :class:`jft.peft.Peft`) resolved against the base model config; a bad value
    becomes a CheckpointError naming the file."""
    try:
        return make().resolve(cfg.num_hidden_layers, cfg.num_local_experts)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from e
