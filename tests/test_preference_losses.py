"""Preference losses against trl's own loss code (run on the same numbers through a stand-in
trainer), closed forms, and the per-sequence log-probs they are fed with."""

import functools
import math
import os
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.losses import sequence_log_probs
from jft.objectives.preference_losses import KINDS, REFERENCE_FREE, log_odds, preference_loss

PAIRS, T = 6, 9
DPO_FAMILY = tuple(k for k in KINDS if k not in REFERENCE_FREE)


@functools.cache
def trl_trainers():
    """``(DPOTrainer, CPOTrainer, ORPOTrainer)``; imported once (slow), skipped where trl is absent."""
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the CPO / ORPO trainers live in trl.experimental
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer

    return DPOTrainer, CPOTrainer, ORPOTrainer


def pairs(seed=0, empty=True):
    """Per-token log-probs ``[2, pairs, T]`` (chosen, rejected) of policy and reference on response
    masks of random lengths (one empty chosen response if ``empty``), and their per-sequence sums and counts."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=(2, PAIRS))
    if empty:  # its average divides by max(0, 1)
        lengths[0, 0] = 0
    mask = np.arange(T) < lengths[..., None]
    policy = np.where(mask, -rng.exponential(1.5, size=(2, PAIRS, T)), 0.0)
    ref = np.where(mask, policy + rng.normal(0, 0.4, size=policy.shape), 0.0)
    return dict(policy_tok=policy, ref_tok=ref, mask=mask, logps=policy.sum(-1), ref_logps=ref.sum(-1), lengths=lengths)


def jft_loss(kind, d, logps=None, **kw):
    """``preference_loss`` on the sums of :func:`pairs`; ``logps`` overrides the policy's ``[2, pairs]``."""
    logps = d["logps"] if logps is None else logps
    return preference_loss(
        kind,
        logps[0],
        logps[1],
        None if kind in REFERENCE_FREE else d["ref_logps"][0],
        None if kind in REFERENCE_FREE else d["ref_logps"][1],
        chosen_len=d["lengths"][0],
        rejected_len=d["lengths"][1],
        **kw,
    )


def trl_dpo(loss_type, d, beta, label_smoothing=0.0):
    """trl's ``DPOTrainer._compute_loss`` on a stand-in trainer whose model returns the per-token
    log-probs of :func:`pairs` (reference log-probs precomputed): per pair ``(loss, chosen reward,
    rejected reward)`` and the gradient of the pairs' mean loss w.r.t. the policy's summed log-probs."""
    import torch

    DPOTrainer = trl_trainers()[0]
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _total_train_tokens=0,
        _tp_size=1,
        args=types.SimpleNamespace(),
    )

    def run(rows):
        n = len(rows)
        # batch rows are [chosen..., rejected...]; completion tokens follow one prompt token
        per_token = torch.tensor(
            np.concatenate([d["policy_tok"][0, rows], d["policy_tok"][1, rows]]), requires_grad=True
        )
        completion = np.concatenate([d["mask"][0, rows], d["mask"][1, rows]])
        completion = torch.tensor(np.concatenate([np.zeros((2 * n, 1), bool), completion], axis=1), dtype=torch.long)
        outputs = types.SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros(2 * n, T),
            mean_logits=torch.zeros(2 * n, T),
            is_top1=torch.zeros(2 * n, T, dtype=torch.bool),
        )
        inputs = {
            "input_ids": torch.zeros(2 * n, T + 1, dtype=torch.long),
            "attention_mask": torch.ones(2 * n, T + 1, dtype=torch.long),
            "completion_mask": completion,
            "ref_chosen_logps": torch.tensor(d["ref_logps"][0, rows]),
            "ref_rejected_logps": torch.tensor(d["ref_logps"][1, rows]),
        }
        stub._metrics = defaultdict(lambda: defaultdict(list))
        loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, return_outputs=False)
        return loss, per_token, stub._metrics["train"]

    per_pair = []
    for i in range(PAIRS):
        loss, _, metrics = run([i])
        per_pair.append((loss.item(), metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]))
    loss, per_token, _ = run(list(range(PAIRS)))
    loss.backward()
    # trl sums every position (the fused head gives 0 at ignored labels), so the gradient at any
    # token, even of an empty response, is d loss / d (summed log-prob)
    return np.array(per_pair).T, per_token.grad[:, 0].numpy().reshape(2, PAIRS)


@pytest.mark.parametrize(
    "kind, label_smoothing", [("sigmoid", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0), ("sigmoid_norm", 0.0)]
)
def test_dpo_family_matches_trl_dpo_trainer(kind, label_smoothing):
    d = pairs()
    beta = 0.7  # large enough that the hinge is active for some pairs and not for others
    (ref_loss, ref_chosen, ref_rejected), ref_grad = trl_dpo(kind, d, beta, label_smoothing)

    def mean_loss(logps):
        loss, chosen, rejected = jft_loss(kind, d, logps, beta=beta, label_smoothing=label_smoothing)
        return loss.mean(), (loss, chosen, rejected)

    grad, (loss, chosen, rejected) = jax.grad(mean_loss, has_aux=True)(jnp.asarray(d["logps"], jnp.float32))
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(chosen, ref_chosen, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(rejected, ref_rejected, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=2e-5, atol=1e-7)
    if kind == "hinge":
        assert 0 < np.count_nonzero(ref_loss) < PAIRS


def cpo_stub(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    import torch

    return types.SimpleNamespace(
        alpha=0.0,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_simpo_matches_trl_cpo_simpo(label_smoothing):
    import torch

    CPOTrainer = trl_trainers()[1]
    d = pairs(1)
    beta, gamma = 2.0, 0.8
    avg = torch.tensor(d["logps"] / np.maximum(d["lengths"], 1))  # trl's CPO feeds simpo average log-probs
    stub = cpo_stub("simpo", beta, label_smoothing, gamma)
    ref = [t.numpy() for t in CPOTrainer.cpo_loss(stub, avg[0], avg[1])]
    got = jft_loss("simpo", d, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-6)


def test_conservative_dpo_matches_trl_cpo_sigmoid_on_log_ratios():
    """trl's DPOTrainer no longer smooths ``"sigmoid"``; its CPO ``"sigmoid"`` computes the cDPO form
    on whatever it is given, so given the log-ratios ``π - ρ`` it is conservative DPO (rewards too)."""
    import torch

    CPOTrainer = trl_trainers()[1]
    d = pairs(2)
    beta, eps = 0.5, 0.2
    ratios = torch.tensor(d["logps"] - d["ref_logps"])
    ref = [t.numpy() for t in CPOTrainer.cpo_loss(cpo_stub("sigmoid", beta, eps), ratios[0], ratios[1])]
    got = jft_loss("sigmoid", d, beta=beta, label_smoothing=eps)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-6)


def test_orpo_matches_trl_odds_ratio_loss():
    """trl's ORPO loss is ``nll - mean(odds_ratio_loss)``: per pair ``nll_c - losses``, its
    ``beta`` being λ; the NLL is the caller's, given here explicitly and also by default (``-ac``)."""
    import torch

    ORPOTrainer = trl_trainers()[2]
    d = pairs(3, empty=False)  # trl's odds of an empty response (p = 1) are infinite
    lam = 0.25
    avg = d["logps"] / np.maximum(d["lengths"], 1)
    stub = types.SimpleNamespace(beta=lam, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, ref_chosen, ref_rejected, _, _ = ORPOTrainer.odds_ratio_loss(
        stub, torch.tensor(avg[0]), torch.tensor(avg[1])
    )
    nll = np.random.default_rng(4).uniform(0.5, 3.0, PAIRS)
    loss, chosen, rejected = jft_loss("orpo", d, orpo_lambda=lam, chosen_nll=nll, beta=123.0)  # beta: not used
    np.testing.assert_allclose(loss, nll - losses.numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(chosen, ref_chosen.numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(rejected, ref_rejected.numpy(), rtol=2e-5, atol=1e-6)
    default_loss, _, _ = jft_loss("orpo", d, orpo_lambda=lam)
    np.testing.assert_allclose(default_loss, -avg[0] - losses.numpy(), rtol=2e-5, atol=1e-6)


def test_log_odds_is_accurate_and_finite_at_both_ends():
    """``log(p / (1 - p))`` by the float64 formula, where float32 ``log(1 - exp(a))`` fails: ``a``
    near 0 (p -> 1 cancels) and very negative (exp underflows); gradients finite everywhere."""
    a = np.array([-1e-6, -1e-3, -0.5, -math.log(2.0), -0.9, -5.0, -30.0, -120.0])
    ref = a - np.log(-np.expm1(a))
    value, grad = jax.jit(jax.vmap(jax.value_and_grad(log_odds)))(jnp.asarray(a, jnp.float32))
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    np.testing.assert_allclose(grad, 1.0 / -np.expm1(a), rtol=1e-4)  # d/da log odds = 1 / (1 - p)


def test_orpo_is_finite_for_an_empty_response():
    """A padding pair has empty responses (average log-prob 0, p = 1): its loss and gradients stay
    finite, so a zero pair weight removes it instead of turning the batch's sums into NaN."""
    d = pairs(11)
    d["lengths"][1, 1] = 0
    d["logps"][1, 1] = 0.0
    grads = jax.grad(lambda logps: jft_loss("orpo", d, logps)[0].sum())(jnp.asarray(d["logps"], jnp.float32))
    assert np.all(np.isfinite(jft_loss("orpo", d)[0])) and np.all(np.isfinite(grads))


@pytest.mark.parametrize("kind", DPO_FAMILY)
def test_policy_equal_to_reference(kind):
    """x = 0: ``log 2`` for the logistic kinds (any smoothing), 1 for the hinge, ``1/(4β²)`` for IPO;
    the gradient w.r.t. the policy's log-probs is not zero: ``∓β/2`` per pair for DPO."""
    d = pairs(5)
    beta = 0.3
    eps = 0.1 if kind in ("sigmoid", "robust", "sigmoid_norm") else 0.0
    d["ref_logps"] = d["logps"].copy()

    def mean_loss(logps):
        loss, chosen, rejected = jft_loss(kind, d, logps, beta=beta, label_smoothing=eps)
        return loss.mean(), (loss, chosen, rejected)

    grad, (loss, chosen, rejected) = jax.grad(mean_loss, has_aux=True)(jnp.asarray(d["logps"], jnp.float32))
    expected = {"hinge": 1.0, "ipo": 1.0 / (4 * beta**2)}.get(kind, math.log(2.0))
    np.testing.assert_allclose(loss, np.full(PAIRS, expected), rtol=1e-6)
    np.testing.assert_array_equal(chosen, 0.0)
    np.testing.assert_array_equal(rejected, 0.0)
    assert np.all(np.asarray(grad[0]) < 0) and np.all(np.asarray(grad[1]) > 0)
    if kind in ("sigmoid", "robust"):  # d/dx at 0: cDPO -β(1 - 2ε)/2, robust -β/(2(1 - 2ε))
        slope = -beta / 2 * ((1 - 2 * eps) if kind == "sigmoid" else 1 / (1 - 2 * eps))
        np.testing.assert_allclose(grad, np.stack([np.full(PAIRS, slope), np.full(PAIRS, -slope)]) / PAIRS, rtol=1e-5)


def test_ipo_is_zero_with_zero_gradient_at_its_optimum():
    d = pairs(6)
    beta = 0.25
    n = np.maximum(d["lengths"], 1)
    # put each pair's per-token log-ratio margin at 1/(2β): chosen ratio / n_c - rejected ratio / n_r = 2
    d["ref_logps"][1] = d["logps"][1] - np.random.default_rng(7).normal(size=PAIRS) * n[1]
    d["ref_logps"][0] = d["logps"][0] - n[0] * ((d["logps"][1] - d["ref_logps"][1]) / n[1] + 1 / (2 * beta))

    def mean_loss(logps):
        return jft_loss("ipo", d, logps, beta=beta)[0].mean()

    value, grad = jax.value_and_grad(mean_loss)(jnp.asarray(d["logps"], jnp.float32))
    assert float(value) == pytest.approx(0.0, abs=1e-8)
    np.testing.assert_allclose(grad, 0.0, atol=1e-5)
    off = d["logps"] + np.array([[0.5], [0.0]]) * n  # half a nat per token past the optimum: (0.5)^2
    np.testing.assert_allclose(jft_loss("ipo", d, off, beta=beta)[0], 0.25, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_raising_chosen_or_lowering_rejected_lowers_the_loss(kind):
    d = pairs(8, empty=False)  # for orpo, see test_orpo_is_finite_for_an_empty_response
    d["ref_logps"] = d["logps"] + 0.5  # x = 0 for the DPO family: hinge active, IPO below its optimum
    loss_fn = lambda logps: jft_loss(kind, d, logps)[0].sum()
    grad = np.asarray(jax.grad(loss_fn)(jnp.asarray(d["logps"], jnp.float32)))
    assert np.all(grad[0] < 0) and np.all(grad[1] > 0)
    loss = np.asarray(jft_loss(kind, d)[0])
    step = np.array([[0.1], [0.0]]) * np.maximum(d["lengths"], 1)  # raise chosen by 0.1 nat per token
    assert np.all(np.asarray(jft_loss(kind, d, d["logps"] + step)[0]) < loss)


def test_reference_free_kinds_ignore_the_reference_and_the_others_need_it():
    d = pairs(9)
    for kind in REFERENCE_FREE:
        base = jft_loss(kind, d)
        with_ref = preference_loss(kind, d["logps"][0], d["logps"][1], d["ref_logps"][0] + 5.0, d["ref_logps"][1],
                                   chosen_len=d["lengths"][0], rejected_len=d["lengths"][1])  # fmt: skip
        for a, b in zip(base, with_ref, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="reference"):
        preference_loss("sigmoid", d["logps"][0], d["logps"][1])
    with pytest.raises(ValueError, match="chosen_len"):
        preference_loss("simpo", d["logps"][0], d["logps"][1])


def test_argument_errors():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="sigmoid, robust, hinge, ipo, sigmoid_norm, simpo, orpo"):
        preference_loss("dpo", x, x, x, x)
    with pytest.raises(ValueError, match="label smoothing"):
        preference_loss("ipo", x, x, x, x, chosen_len=x, rejected_len=x, label_smoothing=0.1)
    with pytest.raises(ValueError, match="0.5"):
        preference_loss("robust", x, x, x, x, label_smoothing=0.5)


def test_sequence_log_probs_equal_the_whole_rows_log_softmax():
    """Sums and counts over the positions with weight > 0 (fractions count whole), values and
    gradients (hidden states, head kernel), against ``log_softmax`` of the whole ``[b, t, vocab]`` logits.
    The tiny model's head alone: its kernel is drawn here (a whole-model init costs seconds)."""
    config = jft.LlamaConfig.tiny(num_hidden_layers=1)
    model = jft.LlamaForCausalLM(config)
    rng = np.random.default_rng(10)
    b, t = 3, 11
    kernel = jnp.asarray(rng.normal(0, 0.3, size=(config.hidden_size, config.vocab_size)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(b, t, config.hidden_size)), jnp.float32)
    targets = rng.integers(0, config.vocab_size, size=(b, t)).astype(np.int32)
    weights = rng.choice(np.array([0.0, 0.5, 1.0], np.float32), size=(b, t))
    weights[2] = 0.0  # a sequence with no response tokens: sum 0, count 0
    targets[0, :3] = -100  # ignore ids at weight 0
    weights[0, :3] = 0.0
    mask = weights > 0

    def objective(chunk, hidden, kernel):  # weighted over the sequences, so each one's gradient counts
        head = lambda h: model.apply({"params": {"lm_head": {"kernel": kernel}}}, h, method="head")
        if chunk is None:  # the reference: the whole logits
            logp = jax.nn.log_softmax(head(hidden).astype(jnp.float32), axis=-1)
            logp = jnp.take_along_axis(logp, jnp.clip(targets, 0)[..., None], axis=-1)[..., 0]
            logp_sum, count = jnp.sum(jnp.where(mask, logp, 0.0), axis=-1), jnp.sum(mask, axis=-1)
        else:
            logp_sum, count = sequence_log_probs(hidden, head, jnp.asarray(targets), jnp.asarray(weights), chunk)
        return jnp.sum(logp_sum * jnp.arange(1.0, b + 1)), (logp_sum, count)

    ref_grads, (ref_sum, ref_count) = jax.jit(jax.grad(lambda *a: objective(None, *a), argnums=(0, 1), has_aux=True))(
        hidden, kernel
    )
    assert float(ref_sum[2]) == 0.0 and np.all(np.asarray(ref_sum[:2]) < 0)
    # chunks of 4: scanned chunks and a remainder (the chunking itself is tested in test_losses.py)
    grads, (logp_sum, count) = jax.jit(jax.grad(lambda *a: objective(4, *a), argnums=(0, 1), has_aux=True))(
        hidden, kernel
    )
    np.testing.assert_allclose(logp_sum, ref_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(count, mask.sum(-1))
    assert count.dtype == jnp.float32
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
