"""Parameter-efficient fine-tuning: each method adds leaves and labels what trains.

    from jft import peft
    model, params = peft.inject(model, params, peft.Peft(lora=peft.Lora(r=8)), rng)
    labels = peft.labels(params, model.peft)
    folded_model, folded = peft.fold(model, params)   # LoRA / DoRA / IA3 folded into the weights

One file per method family holds its spec and everything particular to it: :mod:`jft.peft.lora`
(LoRA, rsLoRA, DoRA, Mixtral experts; ``combine_lora``), :mod:`jft.peft.ia3`,
:mod:`jft.peft.bitfit`, :mod:`jft.peft.adapters` (Houlsby, Pfeiffer, Compacter) and
:mod:`jft.peft.prompt` (prefix and prompt tuning), listed in :mod:`jft.peft.registry`.
:mod:`jft.peft.core` holds the tree operations, :mod:`jft.peft.hf_format` peft's files and
:mod:`jft.peft.native` jft's own; :mod:`jft.models.peft_spec` the :class:`Peft` container the
model reads.
"""

from jft.models.peft_spec import LINEARS, Peft
from jft.peft.adapters import Adapter
from jft.peft.bitfit import BitFit
from jft.peft.core import adapter_of, attach, build, fold, inject, labels, rules, trainable_summary
from jft.peft.hf_format import load_adapter, save_adapter
from jft.peft.ia3 import IA3
from jft.peft.lora import Lora, combine_lora
from jft.peft.prompt import Prefix, Prompt
from jft.peft.registry import METHODS, from_config

__all__ = [
    "IA3",
    "LINEARS",
    "METHODS",
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
    "fold",
    "from_config",
    "inject",
    "labels",
    "load_adapter",
    "rules",
    "save_adapter",
    "trainable_summary",
]
