"""Policy-gradient pieces for PPO and GRPO, as pure ``jnp`` functions of rollout arrays.

Nothing here runs a model: the objective computes the policy's per-token log-probs (with
:func:`jft.losses.token_log_probs`); the old policy's and the reference model's log-probs, the rewards
and the values come from the rollout, outside the gradient, and arrive in the batch. The losses return
``(loss_sum, weight_sum)`` so that summing both over the micro-batches of a step and dividing once gives
the full batch's loss exactly.

Conventions: ``[b, t]`` arrays are per completion token (``b`` sequences, ``t`` completion positions);
``mask`` is ``[b, t]``, nonzero on real tokens and 0 on padding. Masked positions never leak into a
result (they are selected away with ``where``, so even a NaN there is harmless) and come back as 0.
All math is float32.

Sources: PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"); GAE (Schulman et al.
2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"); the adaptive KL
controller and reward whitening (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"); GRPO (Shao et al. 2024, "DeepSeekMath"); Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
Training"); DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale");
GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"); dual-clip PPO (Ye et al. 2020, "Mastering
Complex Control in MOBA Games with Deep Reinforcement Learning"). Where trl has the same quantity, the
formulas follow trl 1.16 (``GRPOTrainer``, and the classic ``PPOTrainer`` for whitening and value
clipping); each function says where it differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

KL_ESTIMATORS = ("k1", "k2", "k3")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _bool(mask) -> Array:
    return jnp.asarray(mask) > 0


def _safe_divide(num: Array, den: Array) -> Array:
    """``num / den`` where ``den > 0``, else 0 (the division never sees a zero, so no NaN in a gradient)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# --- Masked statistics ---------------------------------------------------------------------------


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Mean of ``x`` over the entries where ``mask`` is nonzero, along ``axis`` (all axes if None).

    ``x`` and ``mask`` have the same shape (or broadcast); the result has ``axis`` reduced. An empty
    selection gives 0 (trl gives NaN)."""
    m = _bool(mask)
    x = jnp.where(m, _f32(x), 0.0)
    return _safe_divide(jnp.sum(x, axis=axis), jnp.sum(m, axis=axis, dtype=jnp.float32))


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance of ``x`` over all the entries where ``mask`` is nonzero, a float32 scalar.

    ``mean((x - mean)^2)`` over the ``n`` selected entries, times ``n / (n - 1)`` (Bessel's correction)
    when ``unbiased``, as trl's classic ``masked_var``. With ``n <= 1`` the correction is undefined and
    the result is 0 (trl raises); the whitening below then leaves such an ``x`` at its mean."""
    m = _bool(mask)
    mean = masked_mean(x, m)
    var = masked_mean(jnp.square(_f32(x) - mean), m)
    if unbiased:
        n = jnp.sum(m, dtype=jnp.float32)
        var = jnp.where(n > 1, var * n / jnp.maximum(n - 1, 1.0), 0.0)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """``(x - mean) * rsqrt(var + eps)`` with the mean and unbiased variance of the masked entries
    (:func:`masked_mean`, :func:`masked_var`), as trl's classic PPO ``masked_whiten``; same shape as ``x``.

    With ``shift_mean=False`` the mean is added back, ``x`` is only rescaled (how PPO whitens rewards
    and keeps their sign). ``eps`` is added to the variance, not the std. Masked positions are 0 (trl
    leaves them whitened)."""
    m = _bool(mask)
    x = _f32(x)
    mean = masked_mean(x, m)
    whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, m) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(m, whitened, 0.0)


# --- KL to the reference model -------------------------------------------------------------------


def kl_penalty(logp: Array, ref_logp: Array, kind: str) -> Array:
    """Per-token estimate of ``KL(π || π_ref)`` from the sampled tokens' log-probs, same shape as
    ``logp`` (float32; no masking: weight it with the mask when summing).

    With ``d = logp - ref_logp`` for a token sampled from ``π`` (Schulman 2020, "Approximating KL
    Divergence"):

    - ``"k1"``: ``d``. Unbiased, high variance, can be negative (PPO's reward penalty, Ziegler et al.).
    - ``"k2"``: ``d^2 / 2``. Biased (its mean tends to KL only as the two policies meet), low variance.
    - ``"k3"``: ``exp(-d) - 1 + d``. Unbiased and ``>= 0``, low variance; the GRPO paper's
      (Shao et al., Eq. 4) and trl's ``GRPOTrainer`` estimator. Computed as ``expm1(-d) + d``, the
      same value, accurate for small ``d``.
    """
    d = _f32(logp) - _f32(ref_logp)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * jnp.square(d)
    if kind == "k3":
        return jnp.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def adaptive_kl_coef(coef: float | Array, kl: float | Array, n_steps: int, target: float, horizon: float) -> Array:
    """The next KL coefficient of Ziegler et al.'s adaptive controller (Sec. 2.2), as trl's
    ``AdaptiveKLController``: with ``e = clip(kl / target - 1, -0.2, 0.2)``, ``coef * (1 + e * n_steps / horizon)``.

    ``kl`` is the measured KL of the batch, ``n_steps`` the samples (or steps) since the last update,
    ``horizon`` the controller's time constant. Pure: the caller keeps the coefficient in its state."""
    error = jnp.clip(_f32(kl) / target - 1.0, -0.2, 0.2)
    return _f32(coef) * (1.0 + error * n_steps / horizon)


# --- Advantages ----------------------------------------------------------------------------------


def gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16): ``(advantages, returns)``, ``[b, t]`` float32.

    Args:
      rewards: ``[b, t]`` per-token rewards (in RLHF: ``-β KL`` per token plus the score on the last token).
      values: ``[b, t]`` the value head's predictions at the rollout.
      mask: ``[b, t]``, nonzero on real steps.
      gamma, lam: the discount γ and GAE's λ.

    Backward over time (``lax.scan``, reverse): ``δ_t = r_t + γ V_next - V_t``, ``A_t = δ_t + γ λ A_next``,
    where ``V_next`` and ``A_next`` are those of the next *real* step: a masked step is skipped (both carry
    over it unchanged) and its own advantage and return are 0. After the last real step the episode ends:
    ``V_next = A_next = 0``. ``returns = advantages + values`` on real steps (the value target).
    With ``γ = λ = 1``, ``A_t`` is the sum of the real rewards from ``t`` on minus ``V_t``.

    Difference from trl's classic ``PPOTrainer``: trl runs over every position and relies on the rewards and
    values being 0 after the end; skipping masked steps also handles padding in the middle of a row.
    Whiten the advantages afterwards with :func:`masked_whiten` if wanted.
    """
    m_tb = _bool(mask).T
    r_tb = jnp.where(m_tb, _f32(rewards).T, 0.0)
    v_tb = jnp.where(m_tb, _f32(values).T, 0.0)

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, m = xs
        adv = r + gamma * next_value - v + gamma * lam * next_adv
        carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
        return carry, jnp.where(m, adv, 0.0)

    zeros = jnp.zeros(m_tb.shape[1], jnp.float32)
    _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r_tb, v_tb, m_tb), reverse=True)
    advantages = adv_tb.T
    returns = jnp.where(m_tb.T, advantages + v_tb.T, 0.0)
    return advantages, returns


def _std(x: Array, axis: int | None) -> Array:
    """Unbiased (Bessel-corrected) std along ``axis``, as ``torch.std``; 0 for a single entry.
    Centred on the first entry before summing, so identical entries give exactly mean = entry, std = 0."""
    n = x.size if axis is None else x.shape[axis]
    if n <= 1:
        return jnp.zeros_like(jnp.mean(x, axis=axis, keepdims=True))
    first = x.reshape(-1)[0] if axis is None else jax.lax.index_in_dim(x, 0, axis, keepdims=True)
    d = x - first
    d = d - jnp.mean(d, axis=axis, keepdims=True)
    return jnp.sqrt(jnp.sum(jnp.square(d), axis=axis, keepdims=True) / (n - 1))


def group_advantages(
    rewards: Array, group_size: int, scale_rewards: str = "group", eps: float = 1e-4
) -> tuple[Array, Array]:
    """GRPO's group-relative advantages (Shao et al. 2024, Sec. 4.1.2): ``(advantages, group_std)``, both
    ``[n * group_size]`` float32.

    ``rewards`` is ``[n * group_size]``, ordered group by group (the ``group_size`` completions of one prompt
    are consecutive). The advantage is the reward minus its group's mean, then, by ``scale_rewards``
    (trl 1.16's ``GRPOTrainer`` option of the same name):

    - ``"group"``: divided by ``group std + eps`` (the GRPO paper);
    - ``"batch"``: divided by ``std of all the rewards + eps`` (still centred on the group mean);
    - ``"none"``: not scaled (Dr. GRPO, Liu et al. 2025, which finds the std scaling biases towards
      questions that are too easy or too hard).

    The std is torch's default, unbiased (``n - 1``; trl's ``nanstd`` applies Bessel's correction); a group
    (or batch) of one has std 0, as trl. ``eps`` is added to the std, not the variance. ``group_std`` is each
    entry's group std in every mode, so ``mean(group_std == 0)`` is trl's ``frac_reward_zero_std`` (trl
    computes that from the batch std when ``scale_rewards="batch"``). A group of identical rewards has
    advantage and std exactly 0. Rewards must be finite (trl's NaN handling for unscorable completions is
    not reproduced).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected one of {', '.join(SCALE_REWARDS)}")
    r = _f32(rewards)
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards must be [n * group_size] with group_size={group_size}, got shape {r.shape}")
    r_ng = r.reshape(-1, group_size)
    first = r_ng[:, :1]
    mean_ng = first + jnp.mean(r_ng - first, axis=1, keepdims=True)
    std_ng = jnp.broadcast_to(_std(r_ng, axis=1), r_ng.shape)
    advantages = (r_ng - mean_ng).reshape(-1)
    group_std = std_ng.reshape(-1)
    if scale_rewards == "group":
        advantages = advantages / (group_std + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (_std(r, axis=None) + eps)
    return advantages, group_std


# --- Policy and value losses ---------------------------------------------------------------------


def clipped_policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    importance: str = "token",
) -> tuple[Array, Array]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7) as a per-token loss: ``(per_token_loss, clipped)``,
    ``[b, t]`` float32 and ``[b, t]`` bool.

    Args:
      logp: ``[b, t]`` the policy's log-probs of the sampled tokens (differentiated).
      old_logp: ``[b, t]`` the sampling policy's (constants, from the rollout).
      advantages: ``[b]`` one per sequence (GRPO) or ``[b, t]`` per token (PPO, from :func:`gae`).
      mask: ``[b, t]``, nonzero on completion tokens.
      eps_low, eps_high: the clip range ``[1 - eps_low, 1 + eps_high]``; ``eps_high`` defaults to
        ``eps_low``. DAPO (Yu et al. 2025, "clip-higher") raises ``eps_high`` (e.g. 0.28) alone.
      dual_clip: ``c > 1`` for dual-clip PPO (Ye et al. 2020), or None.
      importance: ``"token"``: ``r_t = exp(logp_t - old_logp_t)``. ``"sequence"``: GSPO (Zheng et al. 2025),
        one ratio per sequence ``s = exp(mean over the sequence's masked tokens of (logp - old_logp))``,
        used at every token of the sequence.

    Loss per masked token, ``A`` the token's advantage: ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``.
    With ``dual_clip = c``, tokens with ``A < 0`` are further capped: ``min(that, -c A)``, i.e.
    ``-A min(max(r, 1 - eps_low), c)``, so a very off-policy token (``r > c``) with a negative advantage
    cannot push the loss without bound. Masked tokens give 0.

    ``clipped`` marks the masked tokens whose loss is a clipped constant (no gradient): ``r > 1 + eps_high``
    with ``A > 0``, or ``r < 1 - eps_low`` with ``A < 0`` (trl's ``clip_ratio/high`` and ``clip_ratio/low``
    metrics), or, with a dual clip, ``r > c`` with ``A < 0``.

    The sequence level mirrors trl 1.16's ``importance_sampling_level="sequence"``: the log-ratio is the
    plain masked mean over the sequence, and the gradient flows through that mean into every token (no
    stop-gradient rewriting): each unclipped token's loss has ``∂/∂logp_u = -A_t s / |y|`` for every token
    ``u`` of its sequence, GSPO's gradient ``s A ∇(mean log π)``. With one advantage per sequence this
    equals the gradient of GSPO-token's ``sg(s) exp(logp_t - sg(logp_t))`` under any of :func:`aggregate`'s
    kinds (they weigh a sequence's tokens alike); with per-token advantages the two differ, and this is
    trl's. A sequence with no tokens gets ``s = 1`` (trl clamps the token count at 1).

    Differences from trl: trl's optional ``delta`` (an upper cap on the ratio, applied to both branches)
    and its ``cispo`` / ``sapo`` / ``vespo`` losses are not here; trl has no dual clip. The KL term
    (``β`` times :func:`kl_penalty` ``"k3"``) is added by the caller.
    """
    if importance not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance level {importance!r}; expected one of {', '.join(IMPORTANCE_LEVELS)}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    eps_high = eps_low if eps_high is None else eps_high
    m = _bool(mask)
    log_ratio = jnp.where(m, _f32(logp) - _f32(old_logp), 0.0)
    if importance == "sequence":
        count = jnp.sum(m, axis=-1, keepdims=True, dtype=jnp.float32)
        log_ratio = jnp.broadcast_to(jnp.sum(log_ratio, axis=-1, keepdims=True) / jnp.maximum(count, 1.0), m.shape)
    ratio = jnp.exp(log_ratio)
    adv = _f32(advantages)
    adv = jnp.where(m, adv[:, None] if adv.ndim == 1 else adv, 0.0)  # padding's values never reach a gradient

    low, high = 1.0 - eps_low, 1.0 + eps_high
    loss = -jnp.minimum(ratio * adv, jnp.clip(ratio, low, high) * adv)
    clipped = ((ratio > high) & (adv > 0)) | ((ratio < low) & (adv < 0))
    if dual_clip is not None:
        negative = adv < 0
        loss = jnp.where(negative, jnp.minimum(loss, -dual_clip * adv), loss)
        clipped = clipped | (negative & (ratio > dual_clip))
    return jnp.where(m, loss, 0.0), clipped & m


def aggregate(
    per_token: Array, mask: Array, kind: str, max_completion_length: int | None = None
) -> tuple[Array, Array]:
    """A per-token loss ``[b, t]`` reduced as trl 1.16's ``GRPOTrainer`` ``loss_type``, in sum form:
    ``(loss_sum, weight_sum)``, float32 scalars, with the loss ``loss_sum / weight_sum``.

    Summing both over the micro-batches of a step and dividing once gives the full batch's value exactly
    (each kind's weight is additive over rows):

    - ``"grpo"`` (Shao et al. 2024): the mean over sequences of each sequence's token mean:
      ``(Σ_i mean_t loss_it, number of sequences with at least one token)``. Long completions' tokens
      weigh less.
    - ``"bnpo"``: the token mean: ``(Σ_it loss_it, number of tokens)``.
    - ``"dr_grpo"`` (Liu et al. 2025): ``(Σ_it loss_it, number of sequences with at least one token *
      max_completion_length)``, a constant normaliser free of length bias.
    - ``"dapo"`` (Yu et al. 2025, token-level policy gradient): ``(Σ_it loss_it, number of tokens)``.

    Deliberate differences from trl: trl normalises ``"bnpo"`` by each micro-batch's own token count and
    averages the micro-batches, and ``"dapo"`` by the token count of the whole accumulated batch; with exact
    sums both are the whole batch's token mean here, so the two kinds coincide. trl's ``"grpo"`` and
    ``"dr_grpo"`` also count rows without tokens (they add 0 to the loss but 1 to the count); here such a
    row is padding and does not count. On batches without empty rows, in one micro-batch, all four agree
    with trl.
    """
    m = _bool(mask)
    x = jnp.where(m, _f32(per_token), 0.0)
    count_b = jnp.sum(m, axis=-1, dtype=jnp.float32)
    n_seqs = jnp.sum(count_b > 0, dtype=jnp.float32)
    if kind == "grpo":
        return jnp.sum(_safe_divide(jnp.sum(x, axis=-1), count_b)), n_seqs
    if kind in ("bnpo", "dapo"):
        return jnp.sum(x), jnp.sum(count_b)
    if kind == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("aggregation 'dr_grpo' divides by max_completion_length: give it")
        return jnp.sum(x), n_seqs * max_completion_length
    raise ValueError(f"unknown aggregation {kind!r}; expected one of {', '.join(AGGREGATIONS)}")


def clipped_value_loss(
    values: Array, old_values: Array, returns: Array, mask: Array, clip_range: float
) -> tuple[Array, Array, Array]:
    """PPO's clipped value loss (as trl's classic ``PPOTrainer``): ``(loss_sum, weight_sum, clipped)``,
    two float32 scalars and ``[b, t]`` bool.

    ``values`` ``[b, t]`` the value head now (differentiated), ``old_values`` its predictions at the rollout,
    ``returns`` the targets (from :func:`gae`), ``mask`` ``[b, t]``. Per masked token, with
    ``v_c = old_v + clip(v - old_v, -clip_range, clip_range)``: ``0.5 * max((v - R)^2, (v_c - R)^2)``;
    ``loss_sum`` is their sum and ``weight_sum`` the token count. ``clipped`` marks the masked tokens where
    the clipped term is the larger (trl's ``vf_clipfrac``)."""
    m = _bool(mask)
    v, old, ret = (jnp.where(m, _f32(a), 0.0) for a in (values, old_values, returns))
    v_clipped = old + jnp.clip(v - old, -clip_range, clip_range)
    unclipped_sq = jnp.square(v - ret)
    clipped_sq = jnp.square(v_clipped - ret)
    loss = 0.5 * jnp.maximum(unclipped_sq, clipped_sq)
    return jnp.sum(jnp.where(m, loss, 0.0)), jnp.sum(m, dtype=jnp.float32), (clipped_sq > unclipped_sq) & m


# --- Metrics -------------------------------------------------------------------------------------


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
    """``1 - var(returns - values) / var(returns)`` over the masked entries, a float32 scalar (a value-head
    metric: 1 is perfect, 0 no better than a constant, negative worse).

    Both variances over the same entries (biased or not, the ratio is the same). When ``var(returns)`` is 0
    there is nothing to explain and the result is 0 (not NaN)."""
    m = _bool(mask)
    var_returns = masked_var(returns, m, unbiased=False)
    var_error = masked_var(_f32(returns) - _f32(values), m, unbiased=False)
    return jnp.where(var_returns > 0, 1.0 - _safe_divide(var_error, var_returns), 0.0)


def entropy_from_logits(logits: Array) -> Array:
    """Entropy of ``softmax(logits)`` over the last axis, in nats: ``[..., vocab] -> [...]`` float32.

    ``logsumexp(z) - Σ p z``, stable for any finite logits; ``-inf`` logits (tokens filtered out by top-k /
    top-p) contribute 0, also to the gradient. Same value as trl's ``entropy_from_logits``."""
    z = _f32(logits)
    p = jax.nn.softmax(z, axis=-1)
    z_safe = jnp.where(p > 0, z, 0.0)  # 0 * -inf would be NaN
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(p * z_safe, axis=-1)
