"""Bottleneck adapters: Houlsby, Pfeiffer and Compacter (no peft format: saved in jft's own,
:mod:`jft.peft.native`).

The modules (:class:`jft.models.layers.Bottleneck`, :class:`jft.models.layers.PHMLinear`) sit in
every decoder layer as ``attn_adapter`` / ``mlp_adapter``; Compacter's rules shared by all
layers are ``model/phm_rule``. Adapters are not folded into the base weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jft.models.peft_spec import Method

NONLINEARITIES = ("relu", "gelu", "silu", "tanh")


@dataclasses.dataclass(frozen=True)
class Adapter(Method):
    """Bottleneck adapters ``h + up(f(down(h)))`` inside every decoder layer.

    ``kind``: ``"houlsby"`` (after the attention block and after the MLP) or ``"pfeiffer"``
    (after the MLP only); each sits on the block's output before the residual addition.
    The bottleneck is ``hidden // reduction_factor`` wide; ``up`` starts at zero, so the model
    starts unchanged. ``phm_dim > 0`` makes it a Compacter: ``down`` and ``up`` are PHM layers,
    ``W = sum_i kron(rule_i, s_i t_i)`` with the ``phm_dim`` rules ``[n, n]`` shared by all
    adapters of the model and rank-``phm_rank`` factors per layer (Compacter++ is
    ``kind="pfeiffer"`` with ``phm_dim``).
    """

    name: ClassVar[str] = "adapter"

    kind: str = "houlsby"
    reduction_factor: int = 16
    nonlinearity: str = "relu"
    phm_dim: int = 0
    phm_rank: int = 1

    def check(self) -> None:
        if self.kind not in ("houlsby", "pfeiffer"):
            raise ValueError(f"adapter.kind {self.kind!r} is not supported; use 'houlsby' or 'pfeiffer'")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"adapter.nonlinearity {self.nonlinearity!r} is not one of {NONLINEARITIES}")
        if self.reduction_factor < 1 or self.phm_dim < 0 or self.phm_rank < 1:
            raise ValueError("adapter.reduction_factor and adapter.phm_rank must be >= 1, adapter.phm_dim >= 0")

    def rules(self) -> tuple[tuple[str, str], ...]:
        return (("model/layers/[0-9]+/(attn|mlp)_adapter/.*", "trainable"), ("model/phm_rule", "trainable"))

    def configure(self, config: Any) -> Any:
        width = config.hidden_size // self.reduction_factor
        if width < 1:
            raise ValueError(
                f"adapter.reduction_factor={self.reduction_factor} exceeds hidden_size={config.hidden_size}"
            )
        if self.phm_dim and (config.hidden_size % self.phm_dim or width % self.phm_dim):
            raise ValueError(
                f"adapter.phm_dim={self.phm_dim} must divide hidden_size={config.hidden_size} and the bottleneck "
                f"width {width} (hidden_size // reduction_factor)"
            )
        return config
