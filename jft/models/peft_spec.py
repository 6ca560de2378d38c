"""What PEFT methods add to the model: frozen, hashable specs that the Flax modules read.

A :class:`Peft` holds at most one spec per method; methods combine (LoRA + BitFit, prompt
tuning + LoRA, ...). It lives on ``LlamaForCausalLM.peft``, so it is part of the (static)
model description, and :func:`jft.peft.inject` puts it there together with the new
parameter leaves. Each method's spec is a :class:`Method` defined in its family file under
``jft/peft/`` (``lora.py``, ``ia3.py``, ``bitfit.py``, ``adapters.py``, ``prompt.py``); this
file holds only what they share and what the modules ask: the module names, target matching,
the :class:`LinearPeft` a ``Linear`` reads and the :class:`Peft` container.

Module names are those of Hugging Face and peft, relative to a decoder layer:
``self_attn.q_proj``, ``self_attn.k_proj``, ``self_attn.v_proj``, ``self_attn.o_proj``,
``mlp.gate_proj``, ``mlp.up_proj``, ``mlp.down_proj``, plus ``lm_head``. A Mixtral model
(``num_local_experts > 0``) has no ``mlp.*``; its stacked experts are
``block_sparse_moe.experts.w1`` (gate), ``.w3`` (up) and ``.w2`` (down), jft's Hugging Face
names without the expert index. Targets are matched as peft matches them: a name in a list
matches a module whose full name (``model.layers.3.self_attn.q_proj``) equals it or ends with
``.name``; a single string other than ``"all-linear"`` is a regex that must ``re.fullmatch``
the full name. ``"all-linear"`` is every linear of a decoder layer (the attention projections
only in a Mixtral model: experts are stacked weights, not linear modules, in peft as in jft).
Layers are stacked (one scanned layer), so a target must select the same modules in every layer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPERT_LINEARS = ("block_sparse_moe.experts.w1", "block_sparse_moe.experts.w3", "block_sparse_moe.experts.w2")
LAYER_LINEARS = ATTENTION_LINEARS + MLP_LINEARS
LINEARS = LAYER_LINEARS + ("lm_head",)


def linears(num_experts: int = 0) -> tuple[str, ...]:
    """The linear modules of a model: ``LINEARS``, or with ``num_experts`` (Mixtral) the attention
    projections, the stacked expert linears and ``lm_head``."""
    return ATTENTION_LINEARS + EXPERT_LINEARS + ("lm_head",) if num_experts else LINEARS


@dataclasses.dataclass(frozen=True)
class LinearPeft:
    """What one ``Linear`` (or one stacked expert linear) computes beyond ``x W + b``, resolved from :class:`Peft`."""

    r: int = 0
    scale: float = 0.0
    dropout: float = 0.0
    dora: bool = False
    init: str = "uniform"
    ia3: str | None = None  # "out": scale the output; "in": scale the input


class Method:
    """The base of every method spec (a frozen dataclass in its family file under ``jft/peft/``).

    A method overrides the hooks it needs; the defaults do nothing. The model-side hooks:
    ``from_config`` (the spec from its config section), ``check`` (raise ValueError for a bad
    field), ``resolve`` (expand targets to module names), ``linear`` (the :class:`LinearPeft`
    fields it adds to a module), ``rules`` (partition rules of its leaves), ``configure`` (the
    model config it needs), ``init_leaves`` (leaves whose start depends on the base),
    ``fold_linear`` / ``fold`` (fold into the base weights). The peft-format hooks
    (``peft_type``, ``peft_tensors``, ``peft_config``, ``from_peft_config``, and ``peft_write`` /
    ``peft_read`` for tensors that are no one leaf's) are read by
    :mod:`jft.peft.hf_format`; a method with ``peft_type = None`` has no peft format.
    """

    name: ClassVar[str]  # its field in Peft
    peft_type: ClassVar[str | None] = None  # peft's PeftType, None: saved in jft's own format only
    seq_cls: ClassVar[bool] = False  # peft's format holds it on a sequence classifier (SEQ_CLS)

    @classmethod
    def from_config(cls, section: Any, tokenizer: Any = None) -> Method:
        """The spec from its ``jft.config`` section (``cfg.peft.<name>``, a ConfigDict); lists become tuples."""
        return cls(**_tuples(section.to_dict()))

    def check(self) -> None:
        """Raise ValueError for a field value the method does not support."""

    def resolve(self, num_layers: int, num_experts: int = 0) -> Method:
        """This spec with targets expanded to module names (idempotent)."""
        return self

    def linear(self, name: str) -> dict:
        """:class:`LinearPeft` fields this method gives module ``name`` of a resolved spec."""
        return {}

    def rules(self) -> tuple[tuple[str, str], ...]:
        """Partition rules that make this method's leaves trainable."""
        return ()

    def configure(self, config: Any) -> Any:
        """The model config with what the method needs (ValueError when it does not fit)."""
        return config

    def init_leaves(self, model: Any, params: dict, rng: Any) -> None:
        """Set, in place, new leaves whose initial value depends on the base params."""

    def fold_linear(self, name: str, layer: LinearPeft, module: dict, w: Any) -> Any:
        """Fold this method into module ``name``'s float32 kernel ``w``; pop its leaves from ``module``."""
        return w

    def fold(self, model: Any, params: dict, out: dict) -> Method | None:
        """After ``fold_linear``: fold other leaves of ``out`` (``params`` are the unfolded ones);
        return the spec that remains (None when the method is folded away)."""
        return self

    def peft_unsupported(self, model: Any) -> str | None:
        """Why peft's format cannot hold this spec of a ``peft_type`` method (None when it can)."""
        return None

    def peft_export(self, model: Any, params: Any) -> tuple[Any, Any]:
        """``(model, params)`` whose leaves ``peft_tensors`` names (prefix tuning: its MLP evaluated)."""
        return model, params

    def peft_write(self, model: Any, params: Any) -> dict:
        """peft tensors that are no one leaf's (beside the ``peft_tensors`` table): ``{name: array}``."""
        return {}

    def peft_read(self, model: Any, shapes: Any, stored: dict, file: str) -> dict:
        """The leaves of the tensors ``peft_write`` writes, popped from ``stored`` (``{}``: none)."""
        return {}


@dataclasses.dataclass(frozen=True)
class Peft:
    """All PEFT methods applied to one model (one field per method family, None when unused).
    ``train`` lists extra ``(regex, label)`` partition rules that come before the methods' own
    (e.g. ``(("lm_head/.*", "trainable"),)`` to train the output layer too)."""

    lora: Any = None  # jft.peft.Lora
    ia3: Any = None  # jft.peft.IA3
    bitfit: Any = None  # jft.peft.BitFit
    adapter: Any = None  # jft.peft.Adapter
    prefix: Any = None  # jft.peft.Prefix
    prompt: Any = None  # jft.peft.Prompt
    train: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for method in self.present():
            method.check()
        for i, rule in enumerate(self.train):
            if len(rule) != 2 or rule[1] not in ("trainable", "frozen"):
                raise ValueError(f"peft train rule {i} is {rule!r}; expected a (regex, 'trainable' | 'frozen') pair")

    def present(self) -> tuple[Method, ...]:
        """The specs of the methods in use, in field order."""
        return tuple(getattr(self, n) for n in self.methods)

    @property
    def methods(self) -> tuple[str, ...]:
        """Names of the methods in use, e.g. ``("lora", "bitfit")``."""
        return tuple(
            f.name for f in dataclasses.fields(self) if f.name != "train" and getattr(self, f.name) is not None
        )

    @property
    def prompt_tokens(self) -> int:
        """Virtual tokens put in front of the sequence (prompt tuning)."""
        return self.prompt.num_virtual_tokens if self.prompt else 0

    @property
    def prefix_tokens(self) -> int:
        """Virtual keys/values in front of every layer's attention (prefix tuning)."""
        return self.prefix.num_virtual_tokens if self.prefix else 0

    def resolve(self, num_layers: int, num_experts: int = 0) -> Peft:
        """This spec with targets expanded to module names (see :func:`linears`) and rank/alpha
        patterns to one exact entry per module (idempotent). Raises ValueError for targets that
        select nothing, or a module in some layers only."""
        return dataclasses.replace(self, **{n: getattr(self, n).resolve(num_layers, num_experts) for n in self.methods})

    def linear(self, name: str) -> LinearPeft | None:
        """The extras of module ``name`` (one of :func:`linears`) in a resolved spec; None when
        it is a plain linear."""
        out = {}
        for method in self.present():
            out.update(method.linear(name))
        return LinearPeft(**out) if out else None


def _tuples(x):
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return tuple(_tuples(v) for v in x)
    return x


def full_names(name: str, num_layers: int) -> list[str]:
    """peft's module names for a module name: one per layer (``lm_head`` once)."""
    return ["lm_head"] if name == "lm_head" else [f"model.layers.{i}.{name}" for i in range(num_layers)]


def match_targets(
    targets, num_layers: int, what: str, allow_empty: bool = False, num_experts: int = 0
) -> tuple[str, ...]:
    """Expand peft-style ``targets`` to the module names (:func:`linears`) they select.

    ``"all-linear"``; a regex string (``re.fullmatch`` on full names); or a list of names, each
    matching full names equal to it or ending in ``.name`` (short names, or peft's per-layer
    names). Raises ValueError when nothing matches (unless ``allow_empty``), when a listed name
    matches no module, or when a module is selected in some layers only (layers are stacked).
    """
    names = linears(num_experts)
    if targets == "all-linear":
        return ATTENTION_LINEARS if num_experts else LAYER_LINEARS
    if isinstance(targets, str):
        try:
            select = re.compile(targets).fullmatch
        except re.error as e:
            raise ValueError(f"{what}: {targets!r} is not a valid regex ({e})") from None
    else:
        wanted = tuple(targets)

        def select(full):
            return any(full == t or full.endswith("." + t) for t in wanted)

        every = [f for n in names for f in full_names(n, num_layers)]
        unknown = [t for t in wanted if not any(f == t or f.endswith("." + t) for f in every)]
        if unknown:
            raise ValueError(f"{what}: no module named {unknown}; the linear modules are {list(names)}")
    selected = tuple(n for n in names if in_every_layer(select, n, num_layers, f"{what} {targets!r}"))
    if not selected and not allow_empty:
        raise ValueError(f"{what} {targets!r} selects no module; the linear modules are {list(names)}")
    return selected


def in_every_layer(select, name: str, num_layers: int, what: str) -> bool:
    """Whether ``select`` holds for module ``name`` in every layer; ValueError when in some only."""
    hits = [bool(select(f)) for f in full_names(name, num_layers)]
    if any(hits) and not all(hits):
        layers = [i for i, h in enumerate(hits) if h]
        raise ValueError(
            f"{what} selects {name} in layers {layers} only; jft's decoder layers are stacked and share "
            "one structure, so a target or pattern must select a module in every layer"
        )
    return all(hits)
