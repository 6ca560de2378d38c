"""LoRA, rsLoRA and DoRA: the spec, its leaves' labels and start, fold, peft-format table, and
combining several LoRA adapters into one.

``y = x W + s (dropout(x) A) B`` with ``A [in, r]`` and ``B [r, out]`` (zero at the start) on
every targeted ``Linear`` (:class:`jft.models.layers.Linear` computes it); on a Mixtral model the
stacked experts take LoRA too when the targets name them (``w1``, ``w2``, ``w3``; see
:class:`Lora`). The peft-format tensors are ``...{module}.lora_A.weight [r, in]``,
``.lora_B.weight [out, r]`` and DoRA's ``.lora_magnitude_vector [out]``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jft import partition, tree
from jft.hf import CheckpointError
from jft.models.layers import dora_column_norm
from jft.models.peft_spec import EXPERT_LINEARS, Method, Peft, in_every_layer, match_targets
from jft.peft.table import (
    PREFIX,
    module_keys,
    module_path,
    number,
    resolved,
    short,
    targets_field,
    tensor,
    unsupported,
)

# Initialisations that only set the starting LoRA weights (the rest also change the base weights).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclasses.dataclass(frozen=True)
class Lora(Method):
    """LoRA: ``y = x W + s (dropout(x) A) B`` with ``A [in, r]``, ``B [r, out]`` (B starts at zero).

    ``s = alpha / r``, or ``alpha / sqrt(r)`` with ``rslora``. ``dora`` adds DoRA's learned
    magnitude per output column. ``init``: ``"uniform"`` (peft's default: A ~ U(+-1/sqrt(in)))
    or ``"gaussian"`` (A ~ N(0, 1/r)). ``rank_pattern`` / ``alpha_pattern``: ``(regex, value)``
    pairs that override r / alpha for the modules whose name they match (as in peft).

    Mixtral experts: targets ``w1`` (gate), ``w3`` (up), ``w2`` (down), or their full names
    ``block_sparse_moe.experts.w1``, give every expert its own ``A [in, r]`` and ``B [r, out]``
    (leaves ``experts/w1/lora_a [layers, experts, in, r]``, ...); ``"all-linear"`` leaves the
    experts alone, as peft's does. In peft's format they are LoRA on transformers' fused expert
    tensors (``target_parameters=["gate_up_proj", "down_proj"]``): ``w2`` is ``down_proj``
    (``...mlp.experts.lora_A.weight [experts * r, in]``, ``.lora_B.weight [out, r * experts]``),
    and ``w1`` and ``w3`` together are ``gate_up_proj`` (``...mlp.experts.base_layer.lora_A.weight``
    when down_proj is adapted too), whose gate and up halves share one ``A``: jft writes the two
    as one LoRA of rank ``r_w1 + r_w3`` (block-diagonal ``B``), or of rank ``r`` when they share
    ``A`` (as an adapter read from peft does), and reads peft's as ``w1`` and ``w3`` with that
    shared ``A``. DoRA on experts is not supported; with dropout, peft's format has no expert
    LoRA, so such an adapter is saved in jft's own format (:mod:`jft.peft.native`), with a warning.
    """

    name: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    seq_cls: ClassVar[bool] = True

    r: int = 8
    alpha: float = 16.0
    targets: str | tuple[str, ...] = "all-linear"
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "uniform"
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    # ---------------------------------------------------------------- the model side

    @classmethod
    def from_config(cls, section: Any, tokenizer: Any = None) -> Lora:
        """``targets`` (a tuple, or ``("all-linear",)``) or ``target_regex`` (a regex string) decide the targets."""
        kw = section.to_dict()
        regex, targets = kw.pop("target_regex"), tuple(kw.pop("targets"))
        kw["targets"] = regex or ("all-linear" if targets == ("all-linear",) else targets)
        kw["rank_pattern"] = tuple(tuple(x) for x in kw["rank_pattern"])
        kw["alpha_pattern"] = tuple(tuple(x) for x in kw["alpha_pattern"])
        return cls(**kw)

    def check(self) -> None:
        if self.r <= 0 or any(r <= 0 for _, r in self.rank_pattern):
            raise ValueError(f"lora.r must be positive, got {self.r} (rank_pattern {self.rank_pattern})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("uniform", "gaussian"):
            raise ValueError(f"lora.init {self.init!r} is not supported; use 'uniform' or 'gaussian'")

    def resolve(self, num_layers: int, num_experts: int = 0) -> Lora:
        targets = match_targets(self.targets, num_layers, "lora", num_experts=num_experts)
        if self.dora and set(targets) & set(EXPERT_LINEARS):
            raise ValueError("lora.dora on Mixtral experts is not supported; target the experts without DoRA")
        return dataclasses.replace(
            self,
            targets=targets,
            rank_pattern=_resolve_pattern(self.rank_pattern, targets, num_layers, "lora.rank_pattern"),
            alpha_pattern=_resolve_pattern(self.alpha_pattern, targets, num_layers, "lora.alpha_pattern"),
        )

    def linear(self, name: str) -> dict:
        if name not in self.targets:
            return {}
        r = _pattern(self.rank_pattern, name, self.r)
        alpha = _pattern(self.alpha_pattern, name, self.alpha)
        scale = alpha / math.sqrt(r) if self.rslora else alpha / r
        return dict(r=r, scale=scale, dropout=self.dropout, dora=self.dora, init=self.init)

    def rules(self) -> tuple[tuple[str, str], ...]:
        return ((".*/lora_(a|b|magnitude)", "trainable"),)

    def init_leaves(self, model: Any, params: dict, rng: Any) -> None:
        """DoRA magnitudes start at the column norms of the base weights."""
        if not self.dora:
            return
        for name in self.targets:
            layer = model.peft.linear(name)
            mod = module(params, name)
            norm = dora_column_norm if name == "lm_head" else jax.vmap(dora_column_norm, in_axes=(0, 0, 0, None))
            value = norm(mod["kernel"], mod["lora_a"], mod["lora_b"], layer.scale)
            mod["lora_magnitude"] = value.astype(mod["lora_magnitude"].dtype)

    def fold_linear(self, name: str, layer, mod: dict, w: Any) -> Any:
        if not layer.r:
            return w
        a, b = mod.pop("lora_a").astype(jnp.float32), mod.pop("lora_b").astype(jnp.float32)
        w = w + layer.scale * (a @ b)
        if layer.dora:
            m = mod.pop("lora_magnitude").astype(jnp.float32)
            w = w * (m / jnp.linalg.norm(w, axis=-2))[..., None, :]
        return w

    def fold(self, model: Any, params: dict, out: dict) -> None:
        return None

    # ---------------------------------------------------------------- peft's format

    def peft_unsupported(self, model: Any) -> str | None:
        """Why peft's format cannot hold this adapter (None when it can)."""
        if self.dropout and _experts(self.targets):
            return (
                f"LoRA on Mixtral experts with lora.dropout={self.dropout}: peft's LoRA on expert tensors has no "
                "dropout, so the adapter is saved in jft's own format instead (jft.peft.load_adapter reads it)"
            )
        return None

    def peft_tensors(self, model: Any, shapes: Any) -> dict:
        """The name table: ``{peft tensor name: PeftTensor}`` for every layer of every target."""
        out = {}
        for name in self.targets:
            if name in EXPERT_LINEARS:
                continue  # peft_write / peft_read: peft fuses the experts' gate and up
            layer = model.peft.linear(name)
            leaves = [("lora_A.weight", "lora_a", "transposed"), ("lora_B.weight", "lora_b", "transposed")]
            if layer.dora:
                leaves.append(("lora_magnitude_vector", "lora_magnitude", "same"))
            for i, key in enumerate(module_keys(name, model.config.num_hidden_layers)):
                for suffix, leaf, layout in leaves:
                    path = (*module_path(name), leaf)
                    at = None if name == "lm_head" else i
                    out[f"{key}.{suffix}"] = tensor(path, at, _shape(shapes, path), layout)
        return out

    def peft_write(self, model: Any, params: Any) -> dict:
        """peft's tensors of the expert LoRA (``{}`` without): per layer ``gate_up_proj`` (w1, w3)
        and ``down_proj`` (w2), ``lora_A [experts * r, in]`` (rows expert-major) and
        ``lora_B [out, r * experts]`` (columns rank-major), as peft reshapes them."""
        out = {}
        fused = self._gate_up(model, params)
        for i, keys in enumerate(_expert_keys(self.targets, model.config.num_hidden_layers)):
            parts = {}
            if fused is not None:
                parts["gate_up_proj"] = (fused[0][i], fused[1][i])
            if _W2 in self.targets:
                mod = module(params, _W2)
                parts["down_proj"] = (_host(mod["lora_a"])[i], _host(mod["lora_b"])[i])
            for param, (a, b) in parts.items():
                out[f"{keys[param]}.lora_A.weight"] = np.swapaxes(a, -1, -2).reshape(-1, a.shape[-2])
                out[f"{keys[param]}.lora_B.weight"] = np.transpose(b, (2, 1, 0)).reshape(b.shape[2], -1)
        return out

    def peft_read(self, model: Any, shapes: Any, stored: dict, file: str) -> dict:
        """The expert LoRA leaves from peft's tensors (popped from ``stored``): ``gate_up_proj``'s
        shared ``A`` becomes both ``w1``'s and ``w3``'s, its ``B`` splits into the gate and up halves."""
        cfg, adapter = model.config, {}
        n, mlp = cfg.num_local_experts, cfg.intermediate_size
        bufs = {}
        for i, keys in enumerate(_expert_keys(self.targets, cfg.num_hidden_layers)):
            for param, key in keys.items():
                names = (_W1, _W3) if param == "gate_up_proj" else (_W2,)
                names = [m for m in names if m in self.targets]
                r = model.peft.linear(names[0]).r
                a_key, b_key = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
                out = 2 * mlp if param == "gate_up_proj" else cfg.hidden_size
                width = cfg.hidden_size if param == "gate_up_proj" else mlp
                for k, shape in ((a_key, (n * r, width)), (b_key, (out, r * n))):
                    if k not in stored:
                        raise CheckpointError(f"{file}: tensor {k!r} is missing (the adapter's {param} LoRA)")
                    if tuple(stored[k].shape) != shape:
                        raise CheckpointError(
                            f"{file}: tensor {k!r} has shape {tuple(stored[k].shape)}; the base model with "
                            f"{model.peft} expects {shape}"
                        )
                a = stored.pop(a_key).reshape(n, r, width).swapaxes(-1, -2)  # [experts, in, r]
                b = stored.pop(b_key).reshape(out, r, n).transpose(2, 1, 0)  # [experts, r, out]
                halves = {_W1: b[..., :mlp], _W3: b[..., mlp:]} if param == "gate_up_proj" else {_W2: b}
                for name in names:
                    for leaf, value in (("lora_a", a), ("lora_b", halves[name])):
                        path = (*module_path(name), leaf)
                        if path not in bufs:
                            want = tree.get_path(shapes, path)
                            bufs[path] = np.empty(want.shape, want.dtype)
                        bufs[path][i] = value
        for path, buf in bufs.items():
            tree.set_path(adapter, path, buf)
        return adapter

    def _gate_up(self, model: Any, params: Any) -> tuple[np.ndarray, np.ndarray] | None:
        """w1 and w3 as one LoRA of the fused gate_up: ``A [layers, experts, in, R]``,
        ``B [layers, experts, R, 2 * mlp]`` with peft's scale (that of the first)."""
        names = [m for m in (_W1, _W3) if m in self.targets]
        if not names:
            return None
        layers = {m: model.peft.linear(m) for m in names}
        a = {m: _host(module(params, m)["lora_a"]).astype(np.float32) for m in names}
        b = {m: _host(module(params, m)["lora_b"]).astype(np.float32) for m in names}
        dtype = module(params, names[0])["lora_a"].dtype
        mlp = model.config.intermediate_size
        first = layers[names[0]]
        if self._shared(model, params):  # one A (an adapter read from peft): rank r, B = [B_gate, B_up]
            return a[_W1].astype(dtype), np.concatenate([b[_W1], b[_W3]], axis=-1).astype(dtype)
        # block-diagonal B, each block rescaled to the first's scale (peft has one per module)
        rank = sum(layers[m].r for m in names)
        fused_b = np.zeros((*b[names[0]].shape[:2], rank, 2 * mlp), np.float32)
        at = 0
        for m in names:
            r, cols = layers[m].r, slice(0, mlp) if m == _W1 else slice(mlp, 2 * mlp)
            fused_b[..., at : at + r, cols] = b[m] * (layers[m].scale / first.scale)
            at += r
        return np.concatenate([a[m] for m in names], axis=-1).astype(dtype), fused_b.astype(dtype)

    def _shared(self, model: Any, params: Any) -> bool:
        """Whether w1 and w3 are adapted alike with one A (peft's gate_up at rank r)."""
        if not (_W1 in self.targets and _W3 in self.targets):
            return False
        a1, a3 = (_host(module(params, m)["lora_a"]) for m in (_W1, _W3))
        return model.peft.linear(_W1) == model.peft.linear(_W3) and np.array_equal(a1, a3)

    def peft_config(self, model: Any, params: Any) -> dict:
        ranks, alphas = {}, {}
        plain = [n for n in self.targets if n not in EXPERT_LINEARS]
        for name in plain:  # per-module values, keyed by names peft matches as we do
            layer = model.peft.linear(name)
            alpha = _pattern(self.alpha_pattern, name, self.alpha)
            if layer.r != self.r:
                ranks[short(name)] = layer.r
            if alpha != self.alpha:
                alphas[short(name)] = number(alpha)
        parameters = []
        for param, names in (("gate_up_proj", (_W1, _W3)), ("down_proj", (_W2,))):
            layers = [model.peft.linear(m) for m in names if m in self.targets]
            if not layers:
                continue
            parameters.append(param)
            shared = param == "gate_up_proj" and self._shared(model, params)
            rank = layers[0].r if shared else sum(x.r for x in layers)
            alpha = layers[0].scale * (math.sqrt(rank) if self.rslora else rank)  # peft's scale: the first's
            if rank != self.r:
                ranks[param] = rank
            if not math.isclose(alpha, self.alpha):
                alphas[param] = number(alpha)
        out = {
            "alpha_pattern": alphas,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": "gaussian" if self.init == "gaussian" else True,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": number(self.alpha),
            "lora_dropout": self.dropout,
            "r": self.r,
            "rank_pattern": ranks,
            "target_modules": [short(n) for n in plain],
            "use_dora": self.dora,
            "use_rslora": self.rslora,
        }
        if parameters:
            out["target_parameters"] = parameters
        return out

    @classmethod
    def from_peft_config(cls, conf: dict, cfg: Any, file: str) -> Peft:
        handled = {"r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "use_dora"}
        handled |= {"rank_pattern", "alpha_pattern", "init_lora_weights", "loftq_config", "eva_config"}
        handled |= {"target_parameters"}
        unsupported(conf, handled | {"modules_to_save"}, file)
        init = conf.get("init_lora_weights", True)
        if init not in _PLAIN_INITS:
            raise CheckpointError(
                f"{file}: init_lora_weights={init!r} is not supported: such an adapter goes with changed base "
                "weights. Convert it with peft's save_pretrained(..., path_initial_model_for_weight_conversion=...) "
                "first"
            )
        experts = _expert_targets(conf.get("target_parameters") or [], cfg, file)
        targets = () if experts and conf.get("target_modules") is None else targets_field(conf, "target_modules", file)
        ranks = tuple((k, int(v)) for k, v in (conf.get("rank_pattern") or {}).items())
        alphas = tuple((k, float(v)) for k, v in (conf.get("alpha_pattern") or {}).items())
        if experts:  # peft's fused expert tensors -> jft's w1, w3 (gate_up_proj) and w2 (down_proj)
            if isinstance(targets, str):
                raise CheckpointError(f"{file}: a regex target_modules with target_parameters is not supported")
            names = {n: m for p, m in experts for n in ("gate_up_proj", "down_proj") if p == n}
            ranks = tuple((m, v) for k, v in ranks if k in names for m in names[k]) + ranks
            alphas = tuple((m, v) for k, v in alphas if k in names for m in names[k]) + alphas
            targets = tuple(targets) + tuple(m for _, ms in experts for m in ms)
        return resolved(
            lambda: Peft(
                lora=cls(
                    r=int(conf.get("r", 8)),
                    alpha=float(conf.get("lora_alpha", 8)),
                    targets=targets,
                    dropout=float(conf.get("lora_dropout") or 0.0),
                    rslora=bool(conf.get("use_rslora", False)),
                    dora=bool(conf.get("use_dora", False)),
                    init="gaussian" if init == "gaussian" else "uniform",
                    rank_pattern=ranks,
                    alpha_pattern=alphas,
                )
            ),
            cfg,
            file,
        )


_W1, _W3, _W2 = EXPERT_LINEARS


def _experts(targets) -> list[str]:
    return [n for n in targets if n in EXPERT_LINEARS]


def _expert_keys(targets, num_layers: int) -> list[dict[str, str]]:
    """peft's tensor-name stems of the expert LoRA per layer: ``{"gate_up_proj": ..., "down_proj": ...}``
    (the adapted ones). peft nests one wrapper per adapted tensor, gate_up_proj innermost."""
    params = [p for p, ms in (("gate_up_proj", (_W1, _W3)), ("down_proj", (_W2,))) if set(ms) & set(targets)]
    out = []
    for i in range(num_layers):
        stem = f"{PREFIX}model.layers.{i}.mlp.experts"
        inner = ".base_layer" if len(params) == 2 else ""
        out.append({p: stem + (inner if p == "gate_up_proj" else "") for p in params})
    return out


def _expert_targets(parameters, cfg: Any, file: str) -> list[tuple[str, tuple[str, ...]]]:
    """peft's ``target_parameters`` as ``[(peft tensor, jft expert linears)]``."""
    if not isinstance(parameters, list | tuple) or not all(isinstance(p, str) for p in parameters):
        raise CheckpointError(f"{file}: target_parameters must be a list of parameter names, got {parameters!r}")
    out = []
    for p in parameters:
        if not cfg.num_local_experts:
            raise CheckpointError(f"{file}: target_parameters {list(parameters)} need a Mixtral base (experts)")
        if p == "gate_up_proj" or p.endswith(".gate_up_proj"):
            out.append(("gate_up_proj", (_W1, _W3)))
        elif p == "down_proj" or p.endswith(".down_proj"):
            out.append(("down_proj", (_W2,)))
        else:
            raise CheckpointError(
                f"{file}: target_parameters entry {p!r} is not supported; jft reads Mixtral's experts.gate_up_proj "
                "and experts.down_proj"
            )
    return out


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def module(params: dict, name: str) -> dict:
    """The param dict of module ``name`` (``self_attn.q_proj``, ``block_sparse_moe.experts.w1``, ``lm_head``)."""
    out = params
    for key in module_path(name):
        out = out[key]
    return out


def _shape(shapes: Any, path: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(tree.get_path(shapes, path).shape)


def _resolve_pattern(pairs, targets: tuple[str, ...], num_layers: int, what: str) -> tuple:
    r"""peft's ``rank_pattern`` semantics (first key with ``re.match(rf"(.*\.)?({key})$", full
    name)`` wins) turned into one exact ``(re.escape(module), value)`` pair per module."""
    out = []
    for name in targets:
        for key, value in pairs:
            regex = re.compile(rf"(.*\.)?({key})")
            if in_every_layer(regex.fullmatch, name, num_layers, f"{what} key {key!r}"):
                out.append((re.escape(name), value))
                break
    return tuple(out)


def _pattern(pairs, name: str, default):
    for key, value in pairs:
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default


# ---------------------------------------------------------------------------- combining adapters

COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd")


def combine_lora(
    models: list[tuple[Any, Any]],
    weights: list[float],
    method: str = "svd",
    rank: int | None = None,
    density: float = 1.0,
    majority_sign: str = "total",
) -> tuple[Any, dict]:
    """Several LoRA adapters of one base combined into one, as peft's ``add_weighted_adapter``.

    ``models`` are ``(model, params)`` with LoRA on the same base weights and targets. The new
    adapter has ``alpha = r`` (scale 1), with per module (``s_i`` each adapter's scale):

    - ``linear``: ``A = sum_i sign_i sqrt|w_i s_i| A_i``, ``B = sum_i sqrt|w_i s_i| B_i`` (equal ranks);
    - ``cat``: ``A = [w_i s_i A_i]``, ``B = [B_i]`` stacked along the rank (exactly ``sum w_i dW_i``);
    - ``svd``: ``sum_i w_i dW_i`` truncated to ``rank`` (default: the largest rank) by SVD;
    - ``ties``: TIES (magnitude pruning to ``density``, ``majority_sign`` "total" or "frequency",
      mean of the agreeing entries) on the A and the B factors, weighted as ``linear``;
    - ``ties_svd``: TIES on the ``w_i dW_i``, then SVD.

    Returns ``(model, params)`` on the first model's base arrays.
    """
    if method not in COMBINATIONS:
        raise ValueError(f"combination {method!r} is not supported; choose from {COMBINATIONS}")
    specs = [m.peft for m, _ in models]
    if any(s.lora is None or s.lora.dora or s.methods != ("lora",) for s in specs):
        raise ValueError("combine_lora takes models whose only PEFT method is LoRA (not DoRA)")
    targets = specs[0].lora.targets
    if any(s.lora.targets != targets for s in specs):
        raise ValueError(f"the adapters target different modules: {[s.lora.targets for s in specs]}")
    ranks = [s.linear(t).r for s in specs for t in targets]
    if method in ("linear", "ties") and len(set(ranks)) > 1:
        raise ValueError(f"{method} needs adapters of one rank; got ranks {sorted(set(ranks))} (use cat or svd)")
    new_rank = {"cat": sum(s.linear(targets[0]).r for s in specs), "svd": rank, "ties_svd": rank}.get(method)
    new_rank = new_rank or max(ranks)
    base_model, base = models[0]
    out_params = partition.join(base, {})
    for name in targets:
        scales = [s.linear(name).scale for s in specs]
        a = [module(p, name)["lora_a"].astype(jnp.float32) for _, p in models]
        b = [module(p, name)["lora_b"].astype(jnp.float32) for _, p in models]

        def ties(xs, ws, name=name):  # per layer, as peft sees each layer's module
            if name == "lm_head":
                return _ties(xs, ws, density, majority_sign)
            return jnp.stack([_ties([x[i] for x in xs], ws, density, majority_sign) for i in range(xs[0].shape[0])])

        if method in ("linear", "ties", "cat"):
            ws = [w * s for w, s in zip(weights, scales, strict=True)]
            if method == "cat":
                new_a = jnp.concatenate([w * x for w, x in zip(ws, a, strict=True)], axis=-1)
                new_b = jnp.concatenate(b, axis=-2)
            else:
                wa = [float(np.sign(w) or 1.0) * np.sqrt(abs(w)) for w in ws]
                wb = [np.sqrt(abs(w)) for w in ws]
                if method == "ties":
                    new_a, new_b = ties(a, wa), ties(b, wb)
                else:
                    new_a = sum(w * x for w, x in zip(wa, a, strict=True))
                    new_b = sum(w * x for w, x in zip(wb, b, strict=True))
        else:
            deltas = [s * (x @ y) for s, x, y in zip(scales, a, b, strict=True)]  # [..., in, out]
            if method == "svd":
                delta = sum(w * d for w, d in zip(weights, deltas, strict=True))
            else:
                delta = ties(deltas, list(weights))
            u, sv, vh = jnp.linalg.svd(jnp.swapaxes(delta, -1, -2), full_matrices=False)  # of [out, in], as peft
            new_b = jnp.swapaxes(u[..., :new_rank] * sv[..., None, :new_rank], -1, -2)  # [r, out]
            new_a = jnp.swapaxes(vh[..., :new_rank, :], -1, -2)  # [in, r]
        dtype = module(models[0][1], name)["lora_a"].dtype
        mod = module(out_params, name)
        mod["lora_a"], mod["lora_b"] = new_a.astype(dtype), new_b.astype(dtype)
    spec = dataclasses.replace(
        specs[0],
        lora=dataclasses.replace(
            specs[0].lora, r=new_rank, alpha=float(new_rank), rank_pattern=(), alpha_pattern=(), rslora=False
        ),
    )
    return type(base_model)(base_model.config, spec), out_params


def _ties(tensors: list, weights: list[float], density: float, majority_sign: str) -> jax.Array:
    """peft's TIES on a list of tensors: keep the ``int(density * n)`` largest |x| of each, elect
    the sign (sum of values: ``total``; of signs: ``frequency``), weight, and average the
    agreeing entries over how many agree."""
    from jft.merge import consensus_mask, top_mask

    if density < 1:
        tensors = [x * top_mask(jnp.abs(x).reshape(-1), int(density * x.size)).reshape(x.shape) for x in tensors]
    stacked = jnp.stack(tensors)
    agree = consensus_mask(stacked, "sum" if majority_sign == "total" else "count")  # before weighting, as peft
    weighted = stacked * jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (stacked.ndim - 1))
    return (weighted * agree).sum(0) / jnp.maximum(agree.sum(0), 1.0)
