"""Logit distillation: the generalised JSD against trl's own loss code and closed forms, the
top-k teacher against one renormalised by hand, and the chunked loss against the whole row's logits."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.losses import chunked_distillation_loss, generalized_jsd, weighted_cross_entropy

B, T, EMBED, TEACHER_EMBED, VOCAB = 2, 7, 8, 5, 11
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def logits_pair(seed=0, scale=3.0):
    """Student and teacher logits ``[B, T, VOCAB]`` float32, peaky enough that the two differ a lot."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(scale * rng.normal(size=(B, T, VOCAB)), jnp.float32) for _ in range(2))


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(logp, logq):
    """``KL(p || q)`` per position in float64; ``0 log 0 = 0`` where ``p`` is 0 (``logp = -inf``)."""
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def jsd_by_hand(logp_s, logp_t, beta):
    if beta == 0:
        return kl(logp_t, logp_s)
    if beta == 1:
        return kl(logp_s, logp_t)
    with np.errstate(divide="ignore"):
        logm = np.log(beta * np.exp(logp_t) + (1 - beta) * np.exp(logp_s))
    return beta * kl(logp_t, logm) + (1 - beta) * kl(logp_s, logm)


@functools.cache
def trl_jsd():
    """trl's ``GKDTrainer.generalized_jsd_loss`` (a static method); imported once (slow), skipped without trl."""
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_generalized_jsd_matches_trl(beta, temperature):
    torch = pytest.importorskip("torch")
    student, teacher = logits_pair()
    got = generalized_jsd(student, teacher, beta, temperature)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    s, t = (torch.from_numpy(np.array(x)) for x in (student, teacher))
    # reduction="none" is trl's elementwise [b, t, vocab] divergence: summed over the vocabulary per position
    want = trl_jsd()(s, t, beta=beta, temperature=temperature, reduction="none").sum(-1)
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-5, atol=1e-6)
    # trl's default: the mean over the positions whose label is not -100, from our sums
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB, size=(B, T)))
    labels[0, -3:] = -100
    weights = (labels != -100).numpy().astype(np.float32)
    batchmean = trl_jsd()(s, t, labels=labels, beta=beta, temperature=temperature)
    np.testing.assert_allclose(np.sum(got * weights) / weights.sum(), batchmean.item(), rtol=2e-5)


def test_generalized_jsd_closed_forms():
    student, teacher = logits_pair(seed=2)
    logp_s, logp_t = log_softmax(student), log_softmax(teacher)
    np.testing.assert_allclose(generalized_jsd(student, teacher, 0.0), kl(logp_t, logp_s), rtol=1e-5)  # forward
    np.testing.assert_allclose(generalized_jsd(student, teacher, 1.0), kl(logp_s, logp_t), rtol=1e-5)  # reverse
    for beta in BETAS:
        np.testing.assert_allclose(generalized_jsd(student, teacher, beta), jsd_by_hand(logp_s, logp_t, beta), 1e-5)
        np.testing.assert_allclose(generalized_jsd(student, student, beta), 0.0, atol=1e-6)
        assert np.all(np.asarray(generalized_jsd(student, teacher, beta)) >= 0)
    # beta 1/2 is the ordinary JSD: symmetric in its arguments and at most log 2
    half = generalized_jsd(student, teacher, 0.5)
    np.testing.assert_allclose(half, generalized_jsd(teacher, student, 0.5), rtol=1e-5)
    assert np.all(np.asarray(half) <= np.log(2) + 1e-6)
    # beta swaps with the roles: JSD_beta(s, t) = JSD_{1-beta}(t, s)
    np.testing.assert_allclose(generalized_jsd(student, teacher, 0.1), generalized_jsd(teacher, student, 0.9), 1e-5)
    # the temperature divides the logits, with no T**2 factor
    tempered = generalized_jsd(student, teacher, 0.5, temperature=2.0)
    np.testing.assert_allclose(tempered, generalized_jsd(student / 2, teacher / 2, 0.5), rtol=1e-6)


def test_the_teacher_gets_no_gradient():
    student, teacher = logits_pair(seed=3)
    for beta in BETAS:
        g_s, g_t = jax.grad(lambda s, t, b=beta: generalized_jsd(s, t, b).sum(), argnums=(0, 1))(student, teacher)
        np.testing.assert_array_equal(g_t, 0.0)
        assert np.all(np.isfinite(g_s)) and np.any(g_s != 0)


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_teacher_equals_a_teacher_renormalised_by_hand(k):
    student, teacher = logits_pair(seed=4)
    for temperature in (1.0, 2.0):
        logp_s = log_softmax(np.asarray(student) / temperature)
        z = np.asarray(teacher, np.float64) / temperature
        kept = np.argsort(-z, axis=-1)[..., :k]
        mask = np.zeros(z.shape, bool)
        np.put_along_axis(mask, kept, True, axis=-1)
        logp_t = log_softmax(np.where(mask, z, -np.inf))  # -inf, probability 0, off the top k
        assert np.all(np.isneginf(logp_t[~mask])) and np.allclose(np.exp(logp_t).sum(-1), 1.0)
        for beta in BETAS[:-1]:
            got = generalized_jsd(student, teacher, beta, temperature, teacher_top_k=k)
            np.testing.assert_allclose(got, jsd_by_hand(logp_s, logp_t, beta), rtol=1e-5, atol=1e-6)
            grads = jax.grad(lambda s, b=beta, t=temperature: generalized_jsd(s, teacher, b, t, k).sum())(student)
            assert np.all(np.isfinite(got)) and np.all(np.isfinite(grads))
    # still finite where the logits are extreme (probabilities that underflow to 0)
    for beta in BETAS[:-1]:
        extreme = generalized_jsd(100 * student, 100 * teacher, beta, teacher_top_k=k)
        grads = jax.grad(lambda s, b=beta: generalized_jsd(s, 100 * teacher, b, teacher_top_k=k).sum())(100 * student)
        assert np.all(np.isfinite(extreme)) and np.all(np.isfinite(grads))
    # k of the whole vocabulary (or more) keeps every token: no truncation
    full = generalized_jsd(student, teacher, 0.5)
    np.testing.assert_array_equal(generalized_jsd(student, teacher, 0.5, teacher_top_k=VOCAB), full)
    with pytest.raises(ValueError, match="reverse KL"):  # infinite off the teacher's top k
        generalized_jsd(student, teacher, 1.0, teacher_top_k=k)


def test_bad_arguments_raise():
    student, teacher = logits_pair()
    for kwargs, match in [
        (dict(beta=1.5), "beta"),
        (dict(beta=0.5, temperature=0.0), "temperature"),
        (dict(beta=0.5, teacher_top_k=-1), "teacher_top_k"),
    ]:
        with pytest.raises(ValueError, match=match):
            generalized_jsd(student, teacher, **kwargs)


def heads_and_batch(seed=5, teacher_vocab=VOCAB):
    """Linear heads ``h @ W`` (student ``[EMBED, VOCAB]``, teacher ``[TEACHER_EMBED, vocab]``), hidden states,
    targets (ignore ids, weight 0, at the end of row 0) and fractional weights."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    w_s, w_t = normal(EMBED, VOCAB), normal(TEACHER_EMBED, teacher_vocab)
    h_s, h_t = normal(B, T, EMBED), normal(B, T, TEACHER_EMBED)
    targets = rng.integers(0, VOCAB, size=(B, T)).astype(np.int32)
    targets[0, -2:] = -100
    weights = rng.choice(np.array([0.0, 0.3, 1.0], np.float32), size=(B, T))
    weights[0, -2:] = 0.0
    weights[1, 0] = 1.0  # some weight in every row
    return w_s, w_t, h_s, h_t, jnp.asarray(targets), jnp.asarray(weights)


@pytest.mark.parametrize("beta, temperature, top_k", [(0.5, 2.0, 0), (0.0, 1.0, 3)])
def test_chunked_distillation_equals_the_whole_rows_logits(beta, temperature, top_k):
    w_s, w_t, h_s, h_t, targets, weights = heads_and_batch()
    kwargs = dict(beta=beta, temperature=temperature, teacher_top_k=top_k)

    def reference(h_s, w_s, h_t, w_t):  # the whole [b, t, vocab] logits of both heads
        student, teacher = h_s @ w_s, jax.lax.stop_gradient(h_t @ w_t)
        divergence = jnp.sum(generalized_jsd(student, teacher, beta, temperature, top_k) * weights)
        out = (divergence, *weighted_cross_entropy(student, targets, weights))
        return sum(out[:2]), out

    def chunked(chunk, h_s, w_s, h_t, w_t, rng=None):
        # with rng the student head gets a key per chunk; this one ignores it, so nothing changes
        student_head = (lambda h: h @ w_s) if rng is None else (lambda h, key: h @ w_s)
        out = chunked_distillation_loss(
            h_s, student_head, h_t, lambda h: h @ w_t, targets, weights, chunk_size=chunk, rng=rng, **kwargs
        )
        return sum(out[:2]), out  # the divergence and the data loss both reach the student

    args = (h_s, w_s, h_t, w_t)
    want_grads, want = jax.jit(jax.grad(reference, argnums=(0, 1), has_aux=True))(*args)
    for chunk in (1, 3, 0):  # one position a time; two chunks and a remainder; the default (one chunk)
        step = jax.jit(jax.grad(functools.partial(chunked, chunk), argnums=(0, 1, 2, 3), has_aux=True))
        grads, got = step(*args, jax.random.key(0) if chunk == 3 else None)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"chunk={chunk}")
        assert all(x.shape == () and x.dtype == jnp.float32 for x in got)
        for name, g, r in zip(("hidden", "head"), grads[:2], want_grads, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=f"chunk={chunk} d{name}")
        np.testing.assert_array_equal(grads[2], 0.0)  # the teacher gets exactly nothing
        np.testing.assert_array_equal(grads[3], 0.0)
        # zero-weight positions (ignore ids among them) contribute no gradient ...
        np.testing.assert_array_equal(grads[0][0, -2:], 0.0)
    # ... and no value, whatever their hidden states
    moved = (h_s.at[0, -2:].add(5.0), w_s, h_t.at[0, -2:].add(-5.0), w_t)
    np.testing.assert_allclose(step(*moved, None)[1], want, rtol=1e-5, atol=1e-6)


def test_different_vocabularies_raise():
    w_s, w_t, h_s, h_t, targets, weights = heads_and_batch(teacher_vocab=VOCAB + 2)
    with pytest.raises(ValueError, match=r"vocabulary \(11\).*\(13\) differ.*jft distill"):
        chunked_distillation_loss(h_s, lambda h: h @ w_s, h_t, lambda h: h @ w_t, targets, weights, beta=0.5)
