"""Preference-optimization losses (DPO and its variants) on per-pair sequence log-probabilities.

Pure ``jnp`` functions of ``[pairs]`` arrays: the objective computes the log-probabilities (with
:func:`jft.losses.sequence_log_probs`) and this module turns them into a loss per pair. The inputs
are *summed* log-probabilities of each response's tokens; the kinds that use per-token averages
(``ipo``, ``sigmoid_norm``, ``simpo``, ``orpo``) divide by ``max(length, 1)`` themselves, so they
need ``chosen_len`` / ``rejected_len`` (the token counts).

Notation: ``πc, πr`` the policy's summed log-probs of the chosen / rejected response, ``ρc, ρr``
the reference model's, ``ac = πc / len_c`` and ``ar = πr / len_r`` the policy's average
log-probs, ``σ`` the logistic function, ``ε`` ``label_smoothing``.

Kinds (``KINDS``), each documented on its function below:

=================  ==========================================================================
``sigmoid``        DPO: ``-log σ(β x)``, ``x = (πc - ρc) - (πr - ρr)``; conservative with ε
``robust``         robust DPO: the unbiased loss under a label-flip rate ε
``hinge``          SLiC: ``relu(1 - β x)``
``ipo``            IPO: ``(x_n - 1 / (2β))^2`` on length-normalised log-ratios ``x_n``
``sigmoid_norm``   DPO on length-normalised log-ratios: ``-log σ(β x_n)``
``simpo``          SimPO (reference-free): ``-log σ(β (ac - ar) - γ)``
``orpo``           ORPO (reference-free): ``nll_c - λ log σ(log odds(ac) - log odds(ar))``
=================  ==========================================================================
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

KINDS = ("sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "simpo", "orpo")
REFERENCE_FREE = frozenset({"simpo", "orpo"})  # no reference model: its log-probs are not read
LENGTH_NORMALISED = frozenset({"ipo", "sigmoid_norm", "simpo", "orpo"})  # need chosen_len / rejected_len
LABEL_SMOOTHED = frozenset({"sigmoid", "robust", "sigmoid_norm", "simpo"})  # the others reject label_smoothing > 0


def _smoothed_sigmoid(z: Array, eps: float) -> Array:
    """``-(1 - ε) log σ(z) - ε log σ(-z)``: the logistic loss against a soft label ``1 - ε``."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def sigmoid_loss(x: Array, beta: float, label_smoothing: float) -> Array:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization"), Eq. 7:
    ``-log σ(β x)`` with ``x = (πc - ρc) - (πr - ρr)``.

    With ``ε > 0`` it is conservative DPO (cDPO, Mitchell 2023): ``-(1 - ε) log σ(β x) - ε log σ(-β x)``,
    the preference labels taken as flipped with probability ε. Defaults ``β = 0.1``, ``ε = 0``.

    Difference from trl: trl's DPOTrainer (1.x) ignores ``label_smoothing`` for ``"sigmoid"`` (it uses
    it only for ``"robust"`` and ``"exo_pair"``); jft applies the cDPO form, which is what trl's CPO
    ``"sigmoid"`` and earlier trl DPO releases compute. At ``ε = 0`` the two agree.
    """
    return _smoothed_sigmoid(beta * x, label_smoothing)


def robust_loss(x: Array, beta: float, label_smoothing: float) -> Array:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), as trl's ``"robust"``:
    ``(-(1 - ε) log σ(β x) + ε log σ(-β x)) / (1 - 2ε)``, an unbiased estimate of the clean DPO loss
    when labels flip with probability ``ε ∈ [0, 0.5)``; ``ε = 0`` is plain DPO. Defaults ``β = 0.1``, ``ε = 0``.
    """
    clean = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * x)
    flipped = -label_smoothing * jax.nn.log_sigmoid(-beta * x)
    return (clean - flipped) / (1.0 - 2.0 * label_smoothing)


def hinge_loss(x: Array, beta: float) -> Array:
    """SLiC-HF's calibration loss (Zhao et al. 2023, "SLiC-HF") on DPO's log-ratio, as trl's
    ``"hinge"``: ``relu(1 - β x)``, i.e. a margin of ``1/β`` on ``x``. Default ``β = 0.1``.
    No label smoothing."""
    return jax.nn.relu(1.0 - beta * x)


def ipo_loss(x_norm: Array, beta: float) -> Array:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences"), Eq. 17: ``(x_n - 1 / (2β))^2`` with β the paper's τ and
    ``x_n = (πc - ρc) / len_c - (πr - ρr) / len_r`` the log-ratios averaged per token (the form the
    IPO authors intend and trl's DPOTrainer uses; trl's CPO ``"ipo"`` averages too). Its minimum, 0,
    is at ``x_n = 1/(2β)``. Default ``β = 0.1``. No label smoothing."""
    return (x_norm - 1.0 / (2.0 * beta)) ** 2


def sigmoid_norm_loss(x_norm: Array, beta: float, label_smoothing: float) -> Array:
    """DPO on length-normalised log-ratios, as trl's ``"sigmoid_norm"``: ``-log σ(β x_n)`` with
    ``x_n`` as for :func:`ipo_loss`, so long responses do not dominate the margin. Default ``β = 0.1``.

    Difference from trl: with ``ε > 0`` jft applies the cDPO smoothing of :func:`sigmoid_loss`;
    trl ignores ``label_smoothing`` here. At ``ε = 0`` the two agree."""
    return _smoothed_sigmoid(beta * x_norm, label_smoothing)


def simpo_loss(avg_chosen: Array, avg_rejected: Array, beta: float, gamma: float, label_smoothing: float) -> Array:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward"): ``-log σ(β (ac - ar) - γ)``, reference-free, on the average log-probs, with a
    target reward margin γ. With ``ε > 0``: ``-(1 - ε) log σ(z) - ε log σ(-z)``, ``z`` the argument
    above, as trl's CPO ``loss_type="simpo"``.

    ``gamma`` is the paper's γ, the margin in reward units, as trl's ``simpo_gamma`` (trl computes
    ``β ((ac - ar) - simpo_gamma / β)``, the same thing). Configurations that give the ratio ``γ/β``
    instead must be multiplied by ``beta``. Defaults ``γ = 0.5`` (trl's) and the shared ``β = 0.1``;
    the paper's β is one to two orders of magnitude larger (it scales average, not summed, log-probs).
    """
    return _smoothed_sigmoid(beta * (avg_chosen - avg_rejected) - gamma, label_smoothing)


_LN_HALF = -math.log(2.0)


def log1mexp(x: Array) -> Array:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate everywhere (Mächler 2012): ``log1p(-exp(x))``
    for ``x < -log 2`` and ``log(-expm1(x))`` above. Each branch gets an input clamped to its own
    range, so the branch not taken cannot put a NaN into the gradient (clamped with ``where``: at
    ``x = -log 2`` a min / max would split the gradient between the branches)."""
    below = x < _LN_HALF
    low = jnp.where(below, x, _LN_HALF)
    high = jnp.where(below, _LN_HALF, x)
    return jnp.where(below, jnp.log1p(-jnp.exp(low)), jnp.log(-jnp.expm1(high)))


# Cap on the average log-prob inside the odds: an empty response (a padding pair) averages 0, p = 1,
# whose infinite odds would make the loss's gradient NaN, and NaN times a zero pair weight is NaN.
MAX_AVG_LOGP = -1e-7


def log_odds(avg_logp: Array) -> Array:
    """``log(p / (1 - p))`` of ``p = exp(avg_logp)``, the odds ORPO defines on the average log-prob;
    ``avg_logp`` is capped at ``MAX_AVG_LOGP`` (log odds about 16) so that the odds stay finite."""
    a = jnp.where(avg_logp < MAX_AVG_LOGP, avg_logp, MAX_AVG_LOGP)
    return a - log1mexp(a)


def orpo_loss(avg_chosen: Array, avg_rejected: Array, chosen_nll: Array, orpo_lambda: float) -> Array:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"):
    ``nll_c - λ log σ(log odds(ac) - log odds(ar))``, reference-free, with
    ``odds(a) = exp(a) / (1 - exp(a))`` of the average log-probs (:func:`log_odds`). Default
    ``λ = 0.1`` (the paper's and trl's ``beta``). No label smoothing.

    ``chosen_nll`` is the SFT term; by default ``-ac``, the mean NLL of the chosen response's tokens
    (the paper's ``L_SFT``). Difference from trl: trl's ORPOTrainer takes the NLL over the chosen
    prompt *and* response tokens, averaged over the batch's tokens; pass ``chosen_nll`` for that.
    jft also caps the average log-probs just below 0 (:func:`log_odds`), where trl's odds are infinite."""
    return chosen_nll - orpo_lambda * jax.nn.log_sigmoid(log_odds(avg_chosen) - log_odds(avg_rejected))


def _per_token(logps: Array, length: Array | None, kind: str, name: str) -> Array:
    if length is None:
        raise ValueError(f"preference loss {kind!r} averages log-probs per token: give {name}")
    return logps / jnp.maximum(jnp.asarray(length, jnp.float32), 1.0)


def preference_loss(
    kind: str,
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    chosen_len: Array | None = None,
    rejected_len: Array | None = None,
    chosen_nll: Array | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    orpo_lambda: float = 0.1,
) -> tuple[Array, Array, Array]:
    """``(loss, chosen_rewards, rejected_rewards)``, each ``[pairs]`` float32, for one of ``KINDS``.

    Args:
      kind: the loss (module docstring; each kind's formula on its ``*_loss`` function).
      chosen_logps / rejected_logps: the policy's summed log-probs of each response's tokens.
      ref_chosen_logps / ref_rejected_logps: the reference model's; required unless ``kind`` is in
        ``REFERENCE_FREE`` (then not read).
      chosen_len / rejected_len: each response's token count, for the kinds in ``LENGTH_NORMALISED``.
      chosen_nll: ``orpo`` only: the SFT term per pair (default: the chosen response's mean NLL).
      beta: DPO's β (IPO's τ, SimPO's β); not used by ``orpo``.
      label_smoothing: ε, for the kinds in ``LABEL_SMOOTHED``; non-zero raises for the others.
      gamma: SimPO's target margin γ, in reward units (trl's ``simpo_gamma``).
      orpo_lambda: ORPO's λ, the weight of the odds-ratio term.

    Rewards (metrics, no gradient), as trl logs them: ``β (π - ρ)`` of the summed log-probs for the
    reference kinds (also for ``ipo`` / ``sigmoid_norm``), ``β a`` of the average log-probs for
    ``simpo`` and ``λ a`` for ``orpo`` (trl's ORPO calls λ ``beta``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown preference loss {kind!r}; expected one of {', '.join(KINDS)}")
    if label_smoothing and kind not in LABEL_SMOOTHED:
        raise ValueError(f"preference loss {kind!r} has no label smoothing; set label_smoothing = 0")
    if kind == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust preference loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen = jnp.asarray(chosen_logps, jnp.float32)
    rejected = jnp.asarray(rejected_logps, jnp.float32)

    if kind in REFERENCE_FREE:
        avg_c = _per_token(chosen, chosen_len, kind, "chosen_len")
        avg_r = _per_token(rejected, rejected_len, kind, "rejected_len")
        if kind == "simpo":
            loss = simpo_loss(avg_c, avg_r, beta, gamma, label_smoothing)
            scale = beta
        else:
            nll = -avg_c if chosen_nll is None else jnp.asarray(chosen_nll, jnp.float32)
            loss = orpo_loss(avg_c, avg_r, nll, orpo_lambda)
            scale = orpo_lambda
        return loss, jax.lax.stop_gradient(scale * avg_c), jax.lax.stop_gradient(scale * avg_r)

    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(
            f"preference loss {kind!r} needs the reference log-probs (ref_chosen_logps, ref_rejected_logps)"
        )
    chosen_ratio = chosen - jnp.asarray(ref_chosen_logps, jnp.float32)
    rejected_ratio = rejected - jnp.asarray(ref_rejected_logps, jnp.float32)
    if kind in LENGTH_NORMALISED:
        x_norm = _per_token(chosen_ratio, chosen_len, kind, "chosen_len") - _per_token(
            rejected_ratio, rejected_len, kind, "rejected_len"
        )
        loss = ipo_loss(x_norm, beta) if kind == "ipo" else sigmoid_norm_loss(x_norm, beta, label_smoothing)
    else:
        x = chosen_ratio - rejected_ratio
        if kind == "sigmoid":
            loss = sigmoid_loss(x, beta, label_smoothing)
        elif kind == "robust":
            loss = robust_loss(x, beta, label_smoothing)
        else:
            loss = hinge_loss(x, beta)
    return loss, jax.lax.stop_gradient(beta * chosen_ratio), jax.lax.stop_gradient(beta * rejected_ratio)
