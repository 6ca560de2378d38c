"""BitFit: train the bias terms only (no peft format: saved in jft's own, :mod:`jft.peft.native`).

Llama-family projections have no biases, so BitFit turns on the config's ``attention_bias`` /
``mlp_bias``: the added biases (zero at the start) are ordinary Llama biases, export to Hugging
Face as such, and stay ordinary biases after :func:`jft.peft.fold`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jft.models.peft_spec import Method


@dataclasses.dataclass(frozen=True)
class BitFit(Method):
    """BitFit: train bias terms only. Llama-family projections have none, so zero biases are
    added to the projection groups in ``biases``: ``"attention"`` (q, k, v, o, the
    ``attention_bias`` of Hugging Face Llama) and ``"mlp"`` (gate, up, down, ``mlp_bias``).
    Every bias leaf of the model then trains (a Qwen2 model's own q/k/v biases too)."""

    name: ClassVar[str] = "bitfit"

    biases: tuple[str, ...] = ("attention", "mlp")

    def check(self) -> None:
        if not set(self.biases) <= {"attention", "mlp"}:
            raise ValueError(f"bitfit.biases {self.biases} may only name 'attention' and 'mlp'")

    def rules(self) -> tuple[tuple[str, str], ...]:
        return ((".*/bias", "trainable"),)

    def configure(self, config: Any) -> Any:
        return dataclasses.replace(
            config,
            attention_bias=config.attention_bias or "attention" in self.biases,
            mlp_bias=config.mlp_bias or "mlp" in self.biases,
        )

    def fold(self, model: Any, params: dict, out: dict) -> None:
        return None  # the biases are plain biases of the config now
