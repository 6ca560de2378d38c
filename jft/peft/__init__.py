"""Parameter-efficient fine-tuning: each method adds leaves and labels what trains.

    from jft import peft
    model, params = peft.inject(model, params, peft.Peft(lora=peft.Lora(r=8)), rng)
    labels = peft.labels(params, model.peft)

See :mod:`jft.models.peft_spec` for the methods and :mod:`jft.peft.core` for the tree operations.
"""

from jft.models.peft_spec import IA3, LINEARS, Adapter, BitFit, Lora, Peft, Prefix, Prompt
from jft.peft.core import adapter_of, attach, build, combine_lora, inject, labels, merge, rules, trainable_summary
from jft.peft.hf_format import load_adapter, save_adapter

__all__ = [
    "IA3",
    "LINEARS",
    "Adapter",
    "BitFit",
    "Lora",
    "Peft",
    "Prefix",
    "Prompt",
    "adapter_of",
    "attach",
    "build",
    "combine_lora",
    "inject",
    "labels",
    "load_adapter",
    "merge",
    "rules",
    "save_adapter",
    "trainable_summary",
]
