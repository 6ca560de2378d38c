"""PPO / GRPO pieces against closed forms, plain Python loops, and trl's own GRPO loss code (run on the same
numbers through a stand-in trainer)."""

import functools
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.losses import token_log_probs
from jft.objectives import policy_gradient as pg
from jft.objectives.policy_gradient import AGGREGATIONS, KL_ESTIMATORS

# Jitted, as a train step runs them (on CPU also far quicker than op by op).
masked_mean = jax.jit(pg.masked_mean, static_argnames="axis")
masked_var = jax.jit(pg.masked_var, static_argnames="unbiased")
masked_whiten = jax.jit(pg.masked_whiten, static_argnames="shift_mean")
kl_penalty = jax.jit(pg.kl_penalty, static_argnames="kind")
adaptive_kl_coef = jax.jit(pg.adaptive_kl_coef)
gae = jax.jit(pg.gae)
group_advantages = jax.jit(pg.group_advantages, static_argnames=("group_size", "scale_rewards"))
clipped_policy_loss = jax.jit(
    pg.clipped_policy_loss, static_argnames=("eps_low", "eps_high", "dual_clip", "importance")
)
aggregate = jax.jit(pg.aggregate, static_argnames=("kind", "max_completion_length"))
clipped_value_loss = jax.jit(pg.clipped_value_loss)
explained_variance = jax.jit(pg.explained_variance)
entropy_from_logits = jax.jit(pg.entropy_from_logits)

B, T = 6, 7


def rollout(seed=0, empty_row=False):
    """Right-padded ``[B, T]`` completions of random lengths: log-probs of policy, old policy and reference,
    per-sequence advantages, and the mask (row 0 empty if ``empty_row``)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[1] = T
    if empty_row:
        lengths[0] = 0
    mask = np.arange(T) < lengths[:, None]
    logp = -rng.exponential(1.0, size=(B, T))
    old = logp + rng.normal(0.0, 0.3, size=(B, T))  # ratios well outside [0.8, 1.2] on some tokens
    ref = logp + rng.normal(0.0, 0.3, size=(B, T))
    adv = rng.normal(size=B)
    return dict(logp=logp, old=old, ref=ref, adv=adv, adv_bt=rng.normal(size=(B, T)), mask=mask)


# --- Masked statistics ---------------------------------------------------------------------------


def test_masked_whiten_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(4, 5))
    mask = rng.random((4, 5)) < 0.6
    x_bad = np.where(mask, x, np.nan)  # masked entries must not leak in
    sel = x[mask]
    n = sel.size
    mean, var = sel.mean(), sel.var() * n / (n - 1)
    np.testing.assert_allclose(masked_mean(x_bad, mask), mean, rtol=1e-6)
    np.testing.assert_allclose(masked_mean(x_bad, mask, axis=1), [x[i][mask[i]].mean() for i in range(4)], rtol=1e-6)
    np.testing.assert_allclose(masked_var(x_bad, mask), var, rtol=1e-5)
    np.testing.assert_allclose(masked_var(x_bad, mask, unbiased=False), sel.var(), rtol=1e-5)

    white = (x - mean) / np.sqrt(var + 1e-8)
    np.testing.assert_allclose(masked_whiten(x_bad, mask), np.where(mask, white, 0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        masked_whiten(x_bad, mask, shift_mean=False), np.where(mask, white + mean, 0.0), rtol=1e-5, atol=1e-6
    )
    w = np.asarray(masked_whiten(x, mask))[mask]
    np.testing.assert_allclose([w.mean(), w.std(ddof=1)], [0.0, 1.0], atol=1e-5)


def test_masked_stats_degenerate():
    x = np.array([[3.0, 1.0, 2.0]])
    assert float(masked_mean(x, np.zeros_like(x))) == 0.0
    one = np.array([[0, 1, 0]])
    assert float(masked_var(x, one)) == 0.0
    np.testing.assert_allclose(masked_whiten(x, one), [[0.0, 0.0, 0.0]])


# --- KL ------------------------------------------------------------------------------------------


def test_kl_estimators_closed_form():
    rng = np.random.default_rng(1)
    logp, ref = -rng.exponential(size=20), -rng.exponential(size=20)
    d = logp - ref
    expected = {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(ref - logp) - (ref - logp) - 1}
    for kind in KL_ESTIMATORS:
        np.testing.assert_allclose(kl_penalty(logp, ref, kind), expected[kind], rtol=1e-5, atol=1e-7)
    k3 = np.asarray(kl_penalty(logp, ref, "k3"))
    assert (k3 >= 0).all()
    assert (np.asarray(kl_penalty(logp, logp, "k3")) == 0).all()
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_are_unbiased():
    """Tokens sampled from π: the means of k1 and k3 approach KL(π || π_ref); k2's does not."""
    rng = np.random.default_rng(2)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    kl = float(np.sum(p * np.log(p / q)))
    x = rng.choice(4, size=200_000, p=p)
    logp, ref = np.log(p)[x], np.log(q)[x]
    k1, k2, k3 = (float(jnp.mean(kl_penalty(logp, ref, k))) for k in KL_ESTIMATORS)
    assert abs(k1 - kl) < 0.01 and abs(k3 - kl) < 0.01
    np.testing.assert_allclose(k2, 0.5 * np.sum(p * np.log(p / q) ** 2), rtol=0.02)
    assert abs(k2 - kl) > 0.02


def test_adaptive_kl_coef():
    coef, target, horizon = 0.1, 6.0, 10_000
    assert float(adaptive_kl_coef(coef, 7.0, 256, target, horizon)) > coef
    assert float(adaptive_kl_coef(coef, 5.0, 256, target, horizon)) < coef
    np.testing.assert_allclose(adaptive_kl_coef(coef, 6.6, 256, target, horizon), coef * (1 + 0.1 * 256 / horizon))
    # the error is clipped at ±0.2
    np.testing.assert_allclose(adaptive_kl_coef(coef, 60.0, 256, target, horizon), coef * (1 + 0.2 * 256 / horizon))
    np.testing.assert_allclose(adaptive_kl_coef(coef, 0.0, 256, target, horizon), coef * (1 - 0.2 * 256 / horizon))


# --- Advantages ----------------------------------------------------------------------------------


def gae_loop(rewards, values, mask, gamma, lam):
    adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        real = np.flatnonzero(mask[i])
        next_value = next_adv = 0.0
        for t in real[::-1]:
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[i, t]
            adv[i, t], ret[i, t] = next_adv, next_adv + values[i, t]
    return adv, ret


def test_gae_matches_loop():
    rng = np.random.default_rng(3)
    rewards, values = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    mask = np.ones((4, 8), bool)
    mask[0, 5:] = False  # right padding
    mask[1, 2:4] = False  # padding in the middle
    mask[2, 3] = False
    mask[2, 6:] = False  # both
    garbage = np.where(mask, 0.0, np.nan)  # padded entries must not leak in
    adv, ret = gae(rewards + garbage, values + garbage, mask, 0.9, 0.8)
    adv_ref, ret_ref = gae_loop(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(adv, adv_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, ret_ref, rtol=1e-5, atol=1e-6)
    assert (np.asarray(adv)[~mask] == 0).all() and (np.asarray(ret)[~mask] == 0).all()


def test_gae_gamma_lambda_one():
    rng = np.random.default_rng(4)
    rewards, values = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    mask = np.arange(6) < np.array([6, 4, 2])[:, None]
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    r = np.where(mask, rewards, 0.0)
    future = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(adv, np.where(mask, future - values, 0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, np.where(mask, future, 0.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_numpy(scale):
    rng = np.random.default_rng(5)
    rewards = rng.normal(size=12)
    adv, std = group_advantages(rewards, 4, scale)
    r = rewards.reshape(3, 4)
    centred = (r - r.mean(1, keepdims=True)).reshape(-1)
    group_std = np.repeat(r.std(1, ddof=1), 4)  # torch.std: unbiased
    expected = {
        "group": centred / (group_std + 1e-4),
        "batch": centred / (rewards.std(ddof=1) + 1e-4),
        "none": centred,
    }[scale]
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, group_std, rtol=1e-5)


def test_group_advantages_identical_group():
    rewards = np.array([0.1, 0.1, 0.1, 1.0, 0.0, 0.5])
    for scale in ("group", "batch", "none"):
        adv, std = group_advantages(rewards, 3, scale)
        assert (np.asarray(adv)[:3] == 0).all() and (np.asarray(std)[:3] == 0).all()
        assert (np.asarray(std)[3:] > 0).all()
    np.testing.assert_allclose(group_advantages(rewards, 1)[0], np.zeros(6))  # a group of one: no signal
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 3, "global")


# --- Policy loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("per_token_adv", [False, True])
def test_policy_loss_on_policy(per_token_adv):
    d = rollout(6)
    adv = np.random.default_rng(0).normal(size=(B, T)) if per_token_adv else d["adv"]
    adv_bt = adv if per_token_adv else np.broadcast_to(adv[:, None], (B, T))

    def total(logp):
        loss, clipped = clipped_policy_loss(logp, jax.lax.stop_gradient(logp), adv, d["mask"])
        return jnp.sum(loss), (loss, clipped)

    grad, (loss, clipped) = jax.jit(jax.grad(total, has_aux=True))(jnp.asarray(d["logp"], jnp.float32))
    expected = np.where(d["mask"], -adv_bt, 0.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(grad, expected, rtol=1e-6)
    assert not np.asarray(clipped).any()


@functools.partial(jax.jit, static_argnames=("eps_low", "eps_high", "dual_clip"))
def _one_token_value_and_grad(logp, adv, **kw):
    def f(logp):
        loss, clipped = pg.clipped_policy_loss(logp, jnp.zeros((1, 1)), adv, jnp.ones((1, 1)), **kw)
        return loss[0, 0], clipped[0, 0]

    return jax.value_and_grad(f, has_aux=True)(logp)


def _one_token(ratio, adv, **kw):
    """Loss, clipped flag and d loss / d logp of one token with ``exp(logp - old_logp) = ratio``."""
    logp = jnp.full((1, 1), np.log(ratio), jnp.float32)
    (loss, clipped), grad = _one_token_value_and_grad(logp, jnp.array([adv], jnp.float32), **kw)
    return float(loss), bool(clipped), float(grad[0, 0])


def test_policy_loss_clip():
    loss, clipped, grad = _one_token(1.5, 2.0)  # A > 0 past 1 + eps: the clipped branch, no gradient
    assert clipped and grad == 0.0
    np.testing.assert_allclose(loss, -1.2 * 2.0, rtol=1e-6)
    loss, clipped, grad = _one_token(1.5, -2.0)  # A < 0 above the range: the unclipped branch
    assert not clipped
    np.testing.assert_allclose([loss, grad], [1.5 * 2.0, 1.5 * 2.0], rtol=1e-5)
    loss, clipped, grad = _one_token(0.5, -2.0)  # A < 0 below 1 - eps: clipped
    assert clipped and grad == 0.0
    np.testing.assert_allclose(loss, 0.8 * 2.0, rtol=1e-6)
    loss, clipped, grad = _one_token(0.5, 2.0)
    assert not clipped
    np.testing.assert_allclose([loss, grad], [-0.5 * 2.0, -0.5 * 2.0], rtol=1e-5)


def test_policy_loss_clip_higher():
    loss, clipped, grad = _one_token(1.25, 1.0, eps_low=0.2, eps_high=0.28)  # inside the raised range
    assert not clipped
    np.testing.assert_allclose([loss, grad], [-1.25, -1.25], rtol=1e-5)
    loss, clipped, _ = _one_token(1.3, 1.0, eps_low=0.2, eps_high=0.28)
    assert clipped
    np.testing.assert_allclose(loss, -1.28, rtol=1e-6)
    loss, clipped, _ = _one_token(0.75, -1.0, eps_low=0.2, eps_high=0.28)  # low side keeps eps_low
    assert clipped
    np.testing.assert_allclose(loss, 0.8, rtol=1e-6)


def test_policy_loss_dual_clip():
    loss, clipped, grad = _one_token(5.0, -2.0, dual_clip=3.0)  # capped at -c A
    assert clipped and grad == 0.0
    np.testing.assert_allclose(loss, 3.0 * 2.0, rtol=1e-6)
    loss, clipped, grad = _one_token(2.5, -2.0, dual_clip=3.0)  # below c: ordinary PPO
    assert not clipped
    np.testing.assert_allclose([loss, grad], [2.5 * 2.0, 2.5 * 2.0], rtol=1e-5)
    loss, clipped, _ = _one_token(5.0, 2.0, dual_clip=3.0)  # A > 0: untouched
    np.testing.assert_allclose(loss, -1.2 * 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="dual_clip"):
        _one_token(1.0, 1.0, dual_clip=0.5)


def test_policy_loss_sequence_level():
    logp = np.log([[1.1, 1.3, 0.9, 7.0], [0.5, 0.6, 9.0, 9.0]])  # old_logp = 0; the masked 7 and 9 must not count
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv = np.array([1.0, 1.0])

    def f(lp):
        loss, clipped = clipped_policy_loss(lp, jnp.zeros_like(lp), adv, mask, importance="sequence")
        return jnp.sum(loss), (loss, clipped)

    grad, (loss, clipped) = jax.jit(jax.grad(f, has_aux=True))(jnp.asarray(logp, jnp.float32))
    s0 = np.exp(np.mean(np.log([1.1, 1.3, 0.9])))  # ≈ 1.087: inside the range
    s1 = np.exp(np.mean(np.log([0.5, 0.6])))  # ≈ 0.548: below it, but A > 0: unclipped
    np.testing.assert_allclose(loss, [[-s0] * 3 + [0], [-s1] * 2 + [0, 0]], rtol=1e-5)
    assert not np.asarray(clipped).any()
    # every token's loss depends on every token of its sequence: d(Σ loss) / d logp_u = n * (-A s / n)
    np.testing.assert_allclose(grad, [[-s0] * 3 + [0], [-s1] * 2 + [0, 0]], rtol=1e-5)
    _, clipped = clipped_policy_loss(logp, np.zeros_like(logp), -adv, mask, importance="sequence")
    np.testing.assert_array_equal(clipped, [[0, 0, 0, 0], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="importance"):
        clipped_policy_loss(logp, logp, adv, mask, importance="group")


def test_policy_loss_sequence_level_per_token_advantages():
    """Per-token advantages: the gradient goes through the sequence mean, d(Σ_t loss_t) / d logp_u = -s Σ_t A_t / n
    (trl's form; GSPO-token's stop-gradient form would give -s A_u)."""
    logp = np.log([[1.05, 1.1, 0.95]])
    adv = np.array([[1.0, -2.0, 0.5]])
    total = lambda lp: jnp.sum(
        clipped_policy_loss(lp, jnp.zeros_like(lp), adv, np.ones((1, 3)), importance="sequence")[0]
    )
    grad = jax.jit(jax.grad(total))(jnp.asarray(logp, jnp.float32))
    s = np.exp(np.log([1.05, 1.1, 0.95]).mean())
    np.testing.assert_allclose(grad, np.full((1, 3), -s * adv.sum() / 3), rtol=1e-5)


@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_padding_never_reaches_gradients(importance):
    d = rollout(12)
    nan = np.where(d["mask"], 0.0, np.nan)
    adv, old = d["adv_bt"] + nan, d["old"] + nan

    def total(logp, values):
        per_token, _ = clipped_policy_loss(logp, old, adv, d["mask"], importance=importance)
        loss_sum, _ = aggregate(per_token, d["mask"], "grpo")
        value_sum, _, _ = clipped_value_loss(values, old, adv, d["mask"], 0.2)
        return loss_sum + value_sum

    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(d["logp"] + nan), jnp.asarray(d["ref"] + nan))
    for g in grads:
        g = np.asarray(g)
        assert np.isfinite(g).all() and (g[~d["mask"]] == 0).all() and (g[d["mask"]] != 0).any()


# --- Against trl's GRPOTrainer -------------------------------------------------------------------


@functools.cache
def trl_grpo():
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    return GRPOTrainer


def trl_grpo_loss(d, adv, loss_type, importance, beta, eps_low, eps_high, max_len):
    """trl's ``GRPOTrainer._compute_loss`` on a stand-in trainer whose model returns ``d["logp"]``:
    the loss, its gradient w.r.t. the per-token log-probs, and trl's logged clip ratio."""
    import torch

    GRPOTrainer = trl_grpo()
    logp = torch.tensor(d["logp"], requires_grad=True)
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(
            num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x
        ),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    mask = torch.tensor(d["mask"], dtype=torch.long)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.tensor(adv),
        "old_per_token_logps": torch.tensor(d["old"]),
        "ref_per_token_logps": torch.tensor(d["ref"]),
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return loss.item(), logp.grad.numpy(), stub._metrics["train"]["clip_ratio/region_mean"][0]


GRPO_CASES = [(kind, level, False) for kind in AGGREGATIONS for level in ("token", "sequence")]
GRPO_CASES += [("grpo", "sequence", True), ("bnpo", "sequence", True), ("dapo", "token", True)]


@pytest.mark.parametrize("loss_type, importance, per_token_adv", GRPO_CASES)
def test_grpo_loss_matches_trl(loss_type, importance, per_token_adv):
    """Loss, gradient and clip ratio of clipped surrogate + β k3 KL + aggregation vs trl's own code; per-token
    advantages ``[b, t]`` as trl accepts them from subclasses."""
    d = rollout(7)
    adv = d["adv_bt"] if per_token_adv else d["adv"]
    beta, eps_low, eps_high, max_len = 0.04, 0.2, 0.28, T + 2

    def loss_fn(logp):
        per_token, clipped = clipped_policy_loss(logp, d["old"], adv, d["mask"], eps_low, eps_high, None, importance)
        per_token = per_token + beta * kl_penalty(logp, d["ref"], "k3")
        loss_sum, weight_sum = aggregate(per_token, d["mask"], loss_type, max_len)
        return loss_sum / weight_sum, clipped

    (loss, clipped), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jnp.asarray(d["logp"], jnp.float32))
    trl_loss, trl_grad, trl_clip = trl_grpo_loss(d, adv, loss_type, importance, beta, eps_low, eps_high, max_len)
    np.testing.assert_allclose(loss, trl_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, np.where(d["mask"], trl_grad, 0.0), rtol=1e-4, atol=1e-6)
    clipped = np.asarray(clipped)
    assert clipped.any() or importance == "sequence"
    # trl's clip ratio: over sequences when the ratio and advantage are one per sequence, else over tokens
    per_sequence = importance == "sequence" and not per_token_adv
    ours = clipped[:, 0].mean() if per_sequence else clipped[d["mask"]].mean()
    np.testing.assert_allclose(ours, trl_clip, rtol=1e-6)


def test_entropy_and_log_probs_match_trl():
    pytest.importorskip("trl")
    import torch
    from trl.trainer.utils import entropy_from_logits as trl_entropy
    from trl.trainer.utils import selective_log_softmax

    rng = np.random.default_rng(8)
    logits = rng.normal(0.0, 3.0, size=(3, 5, 50)).astype(np.float32)
    targets = rng.integers(0, 50, size=(3, 5))
    np.testing.assert_allclose(entropy_from_logits(logits), trl_entropy(torch.tensor(logits)).numpy(), atol=1e-5)
    # the log-probs the GRPO objective feeds in (identity head: the hidden states are the logits)
    trl_logp = selective_log_softmax(torch.tensor(logits), torch.tensor(targets)).numpy()
    logp = jax.jit(lambda z, y: token_log_probs(z, lambda h: h, y))(logits, targets)
    np.testing.assert_allclose(logp, trl_logp, atol=1e-5)


def test_entropy_filtered_logits():
    z = np.array([[1.0, -np.inf, 2.0, -np.inf]], np.float32)
    p = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    np.testing.assert_allclose(entropy_from_logits(z), [-(p * np.log(p)).sum()], rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x: entropy_from_logits(x).sum()))(jnp.asarray(z))
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(entropy_from_logits(np.zeros((2, 8))), np.full(2, np.log(8)), rtol=1e-6)


# --- Aggregation ---------------------------------------------------------------------------------


def test_aggregate_closed_forms():
    d = rollout(9, empty_row=True)
    x, mask = d["logp"], d["mask"]
    x_bad = np.where(mask, x, np.nan)
    n_tok = mask.sum(1)
    real = n_tok > 0
    seq_means = np.where(mask, x, 0).sum(1)[real] / n_tok[real]
    expected = {
        "grpo": seq_means.mean(),
        "bnpo": x[mask].mean(),
        "dr_grpo": x[mask].sum() / (real.sum() * 20),
        "dapo": x[mask].mean(),
    }
    for kind in AGGREGATIONS:
        loss_sum, weight_sum = aggregate(x_bad, mask, kind, max_completion_length=20)
        np.testing.assert_allclose(loss_sum / weight_sum, expected[kind], rtol=1e-5, err_msg=kind)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(x, mask, "dr_grpo")
    with pytest.raises(ValueError, match="grpo, bnpo"):
        aggregate(x, mask, "mean")


@pytest.mark.parametrize("kind", AGGREGATIONS)
def test_aggregate_micro_batches_are_exact(kind):
    d = rollout(10, empty_row=True)
    x, mask = d["logp"], d["mask"]
    full = np.asarray(aggregate(x, mask, kind, T))
    parts = [np.asarray(aggregate(x[rows], mask[rows], kind, T)) for rows in (slice(0, 2), slice(2, B))]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-6)
    # not the average of the micro-batches' own means (the rows have different lengths)
    assert not np.isclose(np.mean([s / w for s, w in parts]), full[0] / full[1])


# --- Value loss and metrics ----------------------------------------------------------------------


def test_clipped_value_loss():
    values = np.array([[1.0, 0.5, 2.0, 9.0]])
    old = np.array([[0.8, 0.8, 1.0, 0.0]])
    returns = np.array([[1.5, 0.0, 3.0, 0.0]])
    mask = np.array([[1, 1, 1, 0]])
    loss_sum, weight_sum, clipped = clipped_value_loss(values, old, returns, mask, 0.2)
    # token 0: v inside the range; token 1: v_c = 0.6, farther from R = 0 than v; token 2: v_c = 1.2 is farther
    expected = 0.5 * (0.5**2 + 0.6**2 + 1.8**2)
    np.testing.assert_allclose([loss_sum, weight_sum], [expected, 3.0], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[False, True, True, False]])


def test_explained_variance():
    rng = np.random.default_rng(11)
    returns, values = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    mask = rng.random((3, 5)) < 0.7
    r, v = returns[mask], values[mask]
    np.testing.assert_allclose(explained_variance(values, returns, mask), 1 - np.var(r - v) / np.var(r), rtol=1e-5)
    np.testing.assert_allclose(explained_variance(returns, returns, mask), 1.0)
    assert float(explained_variance(values, np.ones((3, 5)), mask)) == 0.0
