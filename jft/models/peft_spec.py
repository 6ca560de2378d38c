"""What a PEFT method adds to the model: frozen, hashable specs that the Flax modules read.

A :class:`Peft` holds at most one spec per method; methods combine (LoRA + BitFit, prompt
tuning + LoRA, ...). It lives on ``LlamaForCausalLM.peft``, so it is part of the (static)
model description, and :func:`jft.peft.inject` puts it there together with the new
parameter leaves.

Module names are those of Hugging Face and peft, relative to a decoder layer:
``self_attn.q_proj``, ``self_attn.k_proj``, ``self_attn.v_proj``, ``self_attn.o_proj``,
``mlp.gate_proj``, ``mlp.up_proj``, ``mlp.down_proj``, plus ``lm_head``. Targets are matched
as peft matches them: a name in a list matches a module whose full name
(``model.layers.3.self_attn.q_proj``) equals it or ends with ``.name``; a single string other
than ``"all-linear"`` is a regex that must ``re.fullmatch`` the full name. Layers are stacked
(one scanned layer), so a target must select the same modules in every layer.
"""

from __future__ import annotations

import dataclasses
import math
import re

LAYER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LINEARS = LAYER_LINEARS + ("lm_head",)
NONLINEARITIES = ("relu", "gelu", "silu", "tanh")


@dataclasses.dataclass(frozen=True)
class Lora:
    """LoRA: ``y = x W + s (dropout(x) A) B`` with ``A [in, r]``, ``B [r, out]`` (B starts at zero).

    ``s = alpha / r``, or ``alpha / sqrt(r)`` with ``rslora``. ``dora`` adds DoRA's learned
    magnitude per output column. ``init``: ``"uniform"`` (peft's default: A ~ U(+-1/sqrt(in)))
    or ``"gaussian"`` (A ~ N(0, 1/r)). ``rank_pattern`` / ``alpha_pattern``: ``(regex, value)``
    pairs that override r / alpha for the modules whose name they match (as in peft).
    """

    r: int = 8
    alpha: float = 16.0
    targets: str | tuple[str, ...] = "all-linear"
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "uniform"
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class IA3:
    """IA3: learned vectors (initialised to ones) that scale a projection's output, or its
    input for the modules listed in ``feedforward`` (which must also be targets)."""

    targets: str | tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward: tuple[str, ...] = ("down_proj",)


@dataclasses.dataclass(frozen=True)
class BitFit:
    """BitFit: train bias terms only. Llama-family projections have none, so zero biases are
    added to the projection groups in ``biases``: ``"attention"`` (q, k, v, o, the
    ``attention_bias`` of Hugging Face Llama) and ``"mlp"`` (gate, up, down, ``mlp_bias``).
    Every bias leaf of the model then trains (a Qwen2 model's own q/k/v biases too)."""

    biases: tuple[str, ...] = ("attention", "mlp")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """Bottleneck adapters ``h + up(f(down(h)))`` inside every decoder layer.

    ``kind``: ``"houlsby"`` (after the attention block and after the MLP) or ``"pfeiffer"``
    (after the MLP only); each sits on the block's output before the residual addition.
    The bottleneck is ``hidden // reduction_factor`` wide; ``up`` starts at zero, so the model
    starts unchanged. ``phm_dim > 0`` makes it a Compacter: ``down`` and ``up`` are PHM layers,
    ``W = sum_i kron(rule_i, s_i t_i)`` with the ``phm_dim`` rules ``[n, n]`` shared by all
    adapters of the model and rank-``phm_rank`` factors per layer (Compacter++ is
    ``kind="pfeiffer"`` with ``phm_dim``).
    """

    kind: str = "houlsby"
    reduction_factor: int = 16
    nonlinearity: str = "relu"
    phm_dim: int = 0
    phm_rank: int = 1


@dataclasses.dataclass(frozen=True)
class Prefix:
    """Prefix tuning: ``num_virtual_tokens`` learned keys and values in every layer, which every
    token attends to. ``projection_dim > 0`` reparametrises them through an MLP
    (``[n, kv_dim] -> Linear -> tanh -> Linear -> [n, layers * 2 * kv_dim]``), as peft's
    ``prefix_projection`` does; :func:`jft.peft.merge` folds it into the plain table."""

    num_virtual_tokens: int = 20
    projection_dim: int = 0


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings put before every sequence.

    ``init``: ``"random"`` (normal, with the standard deviation of the model's embedding
    table), ``"vocab"`` (embeddings of tokens sampled from the vocabulary) or ``"text"`` (the
    embeddings of ``init_token_ids``, repeated to fill ``num_virtual_tokens``, as peft does).
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class LinearPeft:
    """What one ``Linear`` computes beyond ``x W + b`` (resolved from :class:`Peft`)."""

    r: int = 0
    scale: float = 0.0
    dropout: float = 0.0
    dora: bool = False
    init: str = "uniform"
    ia3: str | None = None  # "out": scale the output; "in": scale the input


@dataclasses.dataclass(frozen=True)
class Peft:
    """All PEFT methods applied to one model. ``train`` lists extra ``(regex, label)``
    partition rules that come before the methods' own (e.g. ``(("lm_head/.*", "trainable"),)``
    to train the output layer too)."""

    lora: Lora | None = None
    ia3: IA3 | None = None
    bitfit: BitFit | None = None
    adapter: Adapter | None = None
    prefix: Prefix | None = None
    prompt: Prompt | None = None
    train: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        _check(self)

    @property
    def methods(self) -> tuple[str, ...]:
        """Names of the methods in use, e.g. ``("lora", "bitfit")``."""
        names = ("lora", "ia3", "bitfit", "adapter", "prefix", "prompt")
        return tuple(n for n in names if getattr(self, n) is not None)

    @property
    def prompt_tokens(self) -> int:
        """Virtual tokens put in front of the sequence (prompt tuning)."""
        return self.prompt.num_virtual_tokens if self.prompt else 0

    @property
    def prefix_tokens(self) -> int:
        """Virtual keys/values in front of every layer's attention (prefix tuning)."""
        return self.prefix.num_virtual_tokens if self.prefix else 0

    def resolve(self, num_layers: int) -> Peft:
        """This spec with targets expanded to names in ``LINEARS`` and rank/alpha patterns to
        one exact entry per module (idempotent). Raises ValueError for targets that select
        nothing, or a module in some layers only."""
        lora, ia3 = self.lora, self.ia3
        if lora is not None:
            targets = match_targets(lora.targets, num_layers, "lora")
            lora = dataclasses.replace(
                lora,
                targets=targets,
                rank_pattern=_resolve_pattern(lora.rank_pattern, targets, num_layers, "lora.rank_pattern"),
                alpha_pattern=_resolve_pattern(lora.alpha_pattern, targets, num_layers, "lora.alpha_pattern"),
            )
        if ia3 is not None:
            targets = match_targets(ia3.targets, num_layers, "ia3")
            feedforward = match_targets(ia3.feedforward, num_layers, "ia3.feedforward", allow_empty=True)
            ia3 = dataclasses.replace(ia3, targets=targets, feedforward=tuple(n for n in targets if n in feedforward))
        return dataclasses.replace(self, lora=lora, ia3=ia3)

    def linear(self, name: str) -> LinearPeft | None:
        """The extras of module ``name`` (one of ``LINEARS``) in a resolved spec; None when it
        is a plain linear."""
        out = {}
        lora = self.lora
        if lora is not None and name in lora.targets:
            r = _pattern(lora.rank_pattern, name, lora.r)
            alpha = _pattern(lora.alpha_pattern, name, lora.alpha)
            scale = alpha / math.sqrt(r) if lora.rslora else alpha / r
            out.update(r=r, scale=scale, dropout=lora.dropout, dora=lora.dora, init=lora.init)
        if self.ia3 is not None and name in self.ia3.targets:
            out["ia3"] = "in" if name in self.ia3.feedforward else "out"
        return LinearPeft(**out) if out else None


def full_names(name: str, num_layers: int) -> list[str]:
    """peft's module names for ``name`` in ``LINEARS``: one per layer (``lm_head`` once)."""
    return ["lm_head"] if name == "lm_head" else [f"model.layers.{i}.{name}" for i in range(num_layers)]


def match_targets(targets, num_layers: int, what: str, allow_empty: bool = False) -> tuple[str, ...]:
    """Expand peft-style ``targets`` to the names in ``LINEARS`` they select.

    ``"all-linear"``; a regex string (``re.fullmatch`` on full names); or a list of names, each
    matching full names equal to it or ending in ``.name`` (short names, or peft's per-layer
    names). Raises ValueError when nothing matches (unless ``allow_empty``), when a listed name
    matches no module, or when a module is selected in some layers only (layers are stacked).
    """
    if targets == "all-linear":
        return LAYER_LINEARS
    if isinstance(targets, str):
        try:
            select = re.compile(targets).fullmatch
        except re.error as e:
            raise ValueError(f"{what}: {targets!r} is not a valid regex ({e})") from None
    else:
        wanted = tuple(targets)

        def select(full):
            return any(full == t or full.endswith("." + t) for t in wanted)

        every = [f for n in LINEARS for f in full_names(n, num_layers)]
        unknown = [t for t in wanted if not any(f == t or f.endswith("." + t) for f in every)]
        if unknown:
            raise ValueError(f"{what}: no module named {unknown}; the linear modules are {list(LINEARS)}")
    selected = tuple(n for n in LINEARS if _in_every_layer(select, n, num_layers, f"{what} {targets!r}"))
    if not selected and not allow_empty:
        raise ValueError(f"{what} {targets!r} selects no module; the linear modules are {list(LINEARS)}")
    return selected


def _in_every_layer(select, name: str, num_layers: int, what: str) -> bool:
    hits = [bool(select(f)) for f in full_names(name, num_layers)]
    if any(hits) and not all(hits):
        layers = [i for i, h in enumerate(hits) if h]
        raise ValueError(
            f"{what} selects {name} in layers {layers} only; jft's decoder layers are stacked and share "
            "one structure, so a target or pattern must select a module in every layer"
        )
    return all(hits)


def _resolve_pattern(pairs, targets: tuple[str, ...], num_layers: int, what: str) -> tuple:
    r"""peft's ``rank_pattern`` semantics (first key with ``re.match(rf"(.*\.)?({key})$", full
    name)`` wins) turned into one exact ``(re.escape(module), value)`` pair per module."""
    out = []
    for name in targets:
        for key, value in pairs:
            regex = re.compile(rf"(.*\.)?({key})")
            if _in_every_layer(regex.fullmatch, name, num_layers, f"{what} key {key!r}"):
                out.append((re.escape(name), value))
                break
    return tuple(out)


def _pattern(pairs, name: str, default):
    for key, value in pairs:
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default


def _check(spec: Peft) -> None:
    lora, ad, pt = spec.lora, spec.adapter, spec.prompt
    if lora is not None:
        if lora.r <= 0 or any(r <= 0 for _, r in lora.rank_pattern):
            raise ValueError(f"lora.r must be positive, got {lora.r} (rank_pattern {lora.rank_pattern})")
        if not 0.0 <= lora.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
        if lora.init not in ("uniform", "gaussian"):
            raise ValueError(f"lora.init {lora.init!r} is not supported; use 'uniform' or 'gaussian'")
    if spec.bitfit is not None and not set(spec.bitfit.biases) <= {"attention", "mlp"}:
        raise ValueError(f"bitfit.biases {spec.bitfit.biases} may only name 'attention' and 'mlp'")
    if ad is not None:
        if ad.kind not in ("houlsby", "pfeiffer"):
            raise ValueError(f"adapter.kind {ad.kind!r} is not supported; use 'houlsby' or 'pfeiffer'")
        if ad.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"adapter.nonlinearity {ad.nonlinearity!r} is not one of {NONLINEARITIES}")
        if ad.reduction_factor < 1 or ad.phm_dim < 0 or ad.phm_rank < 1:
            raise ValueError("adapter.reduction_factor and adapter.phm_rank must be >= 1, adapter.phm_dim >= 0")
    for name in ("prefix", "prompt"):
        method = getattr(spec, name)
        if method is not None and method.num_virtual_tokens < 1:
            raise ValueError(f"{name}.num_virtual_tokens must be >= 1, got {method.num_virtual_tokens}")
    if pt is not None:
        if pt.init not in ("random", "vocab", "text"):
            raise ValueError(f"prompt.init {pt.init!r} is not supported; use 'random', 'vocab' or 'text'")
        if pt.init == "text" and not pt.init_token_ids:
            raise ValueError("prompt.init='text' needs init_token_ids (the tokenized init text)")
    for i, rule in enumerate(spec.train):
        if len(rule) != 2 or rule[1] not in ("trainable", "frozen"):
            raise ValueError(f"peft train rule {i} is {rule!r}; expected a (regex, 'trainable' | 'frozen') pair")
