"""The PEFT method families, in one list.

Each family file defines its spec (a :class:`jft.models.peft_spec.Method`) with everything that
is particular to it: fields and checks, labels, the leaves' start, fold, and peft's name table
and config. :mod:`jft.peft.core`, :mod:`jft.peft.hf_format` and :mod:`jft.peft.native` only
loop over the specs, and :func:`from_config` builds a spec from the config. Adding a method:
one family file, one entry here, its field in :class:`jft.models.peft_spec.Peft` and its section
in :mod:`jft.config` (the forward code, when the method adds some, goes into the model's modules).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jft.models.peft_spec import Peft
from jft.peft.adapters import Adapter
from jft.peft.bitfit import BitFit
from jft.peft.ia3 import IA3
from jft.peft.lora import Lora
from jft.peft.prompt import Prefix, Prompt

METHODS = (Lora, IA3, BitFit, Adapter, Prefix, Prompt)
BY_NAME = {m.name: m for m in METHODS}
BY_PEFT_TYPE = {m.peft_type: m for m in METHODS if m.peft_type}


def from_config(section: Any, tokenizer: Any = None, train_rules=()) -> Peft:
    """The :class:`Peft` that a ``jft.config`` ``peft`` section describes: each method of
    ``section.methods`` from its own section (a Prompt's ``init_text`` is tokenized with
    ``tokenizer``), ``train_rules`` then ``section.train`` as extra rules. Raises ValueError for
    an unknown method or a bad value."""
    unknown = sorted(set(section.methods) - set(BY_NAME))
    if unknown:
        raise ValueError(f"peft.methods: unknown {unknown}; choose from {tuple(BY_NAME)}")
    methods = {name: BY_NAME[name].from_config(section[name], tokenizer) for name in section.methods}
    return Peft(**methods, train=tuple(train_rules) + tuple(tuple(r) for r in section.train))


assert tuple(BY_NAME) == tuple(f.name for f in dataclasses.fields(Peft) if f.name != "train"), "Peft's fields"
