"""IA3: learned vectors that scale a projection's output, or its input for the feedforward ones.

The vectors (``ia3 [out]`` or ``ia3 [in]`` on the targeted ``Linear``, ones at the start) are
computed by :class:`jft.models.layers.Linear`. peft-format tensors: ``...{module}.ia3_l``,
``[out, 1]`` for an output scale and ``[1, in]`` for an input scale.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from jft.hf import CheckpointError
from jft.models.peft_spec import EXPERT_LINEARS, Method, Peft, match_targets
from jft.peft.table import module_keys, module_path, resolved, short, targets_field, tensor, unsupported


@dataclasses.dataclass(frozen=True)
class IA3(Method):
    """IA3: learned vectors (initialised to ones) that scale a projection's output, or its
    input for the modules listed in ``feedforward`` (which must also be targets). Mixtral's
    stacked experts take no IA3."""

    name: ClassVar[str] = "ia3"
    peft_type: ClassVar[str] = "IA3"
    seq_cls: ClassVar[bool] = True

    targets: str | tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward: tuple[str, ...] = ("down_proj",)

    def resolve(self, num_layers: int, num_experts: int = 0) -> IA3:
        targets = match_targets(self.targets, num_layers, "ia3", num_experts=num_experts)
        if set(targets) & set(EXPERT_LINEARS):
            raise ValueError(f"ia3 targets {self.targets!r} select Mixtral experts, which take no IA3")
        feedforward = match_targets(self.feedforward, num_layers, "ia3.feedforward", True, num_experts)
        return dataclasses.replace(self, targets=targets, feedforward=tuple(n for n in targets if n in feedforward))

    def linear(self, name: str) -> dict:
        if name not in self.targets:
            return {}
        return {"ia3": "in" if name in self.feedforward else "out"}

    def rules(self) -> tuple[tuple[str, str], ...]:
        return ((".*/ia3", "trainable"),)

    def fold_linear(self, name: str, layer, mod: dict, w: Any) -> Any:
        if layer.ia3 == "in":
            return w * mod.pop("ia3").astype(jnp.float32)[..., :, None]
        if layer.ia3 == "out":
            scale = mod.pop("ia3")
            if "bias" in mod:
                mod["bias"] = (mod["bias"] * scale).astype(mod["bias"].dtype)
            return w * scale.astype(jnp.float32)[..., None, :]
        return w

    def fold(self, model: Any, params: dict, out: dict) -> None:
        return None

    def peft_tensors(self, model: Any, shapes: Any) -> dict:
        """The name table: ``{peft tensor name: PeftTensor}`` for every layer of every target."""
        out = {}
        for name in self.targets:
            layout = "row" if name in self.feedforward else "column"
            path = (*module_path(name), "ia3")
            leaf = shapes
            for key in path:
                leaf = leaf[key]
            for i, key in enumerate(module_keys(name, model.config.num_hidden_layers)):
                out[f"{key}.ia3_l"] = tensor(path, None if name == "lm_head" else i, leaf.shape, layout)
        return out

    def peft_config(self, model: Any, params: Any) -> dict:
        return {
            "fan_in_fan_out": False,
            "feedforward_modules": [short(n) for n in self.feedforward],
            "init_ia3_weights": True,
            "target_modules": [short(n) for n in self.targets],
        }

    @classmethod
    def from_peft_config(cls, conf: dict, cfg: Any, file: str) -> Peft:
        unsupported(conf, {"target_modules", "feedforward_modules", "init_ia3_weights", "modules_to_save"}, file)
        targets = targets_field(conf, "target_modules", file)
        feedforward = tuple(conf.get("feedforward_modules") or ())
        spec = resolved(lambda: Peft(ia3=cls(targets=targets, feedforward=feedforward)), cfg, file)
        n, experts = cfg.num_hidden_layers, cfg.num_local_experts
        if set(match_targets(feedforward, n, "feedforward_modules", True, experts)) - set(spec.ia3.targets):
            raise CheckpointError(f"{file}: feedforward_modules {list(feedforward)} are not all in target_modules")
        return spec
