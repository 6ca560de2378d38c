"""The chunked loss head against the whole row's logits: values and gradients, every kind of head."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft import peft, quant
from jft.losses import chunked_cross_entropy, loss_chunk_size, token_log_probs, weighted_cross_entropy

B, T, VOCAB = 2, 12, 96
CFG = jft.LlamaConfig.tiny(vocab_size=VOCAB, num_hidden_layers=1)


def head_model(kind: str):
    """``(model, params)`` whose head is a plain Linear, tied embeddings, LoRA on lm_head (non-zero
    factors) or a 4-bit lm_head with LoRA."""
    model = jft.LlamaForCausalLM(dataclasses.replace(CFG, tie_word_embeddings=True) if kind == "tied" else CFG)
    params = model.init_params(jax.random.key(0))
    if kind in ("lora", "quantized"):
        spec = peft.Peft(lora=peft.Lora(r=4, alpha=8.0, targets=("lm_head",)))
        model, params = peft.inject(model, params, spec, jax.random.key(1))
        lm_head = dict(params["lm_head"])
        lm_head["lora_b"] = 0.1 * jax.random.normal(jax.random.key(2), lm_head["lora_b"].shape)  # not a no-op
        if kind == "quantized":
            lm_head["kernel"] = quant.quantize(lm_head["kernel"])
        params = {**params, "lm_head": lm_head}
    return model, params


def batch(seed=3):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, T, CFG.hidden_size)), jnp.float32)
    targets = rng.integers(0, VOCAB, size=(B, T)).astype(np.int32)
    targets[0, -3:] = -100  # ignore ids, given weight 0 below
    weights = rng.choice(np.array([0.0, 0.3, 1.0], np.float32), size=(B, T))
    weights[0, -3:] = 0.0
    return hidden, jnp.asarray(targets), jnp.asarray(weights)


def trainable_head(params):
    """The head leaves that get gradients: all but a 4-bit kernel (a frozen base); tied: the embeddings."""
    if "lm_head" not in params:
        return {"embedding": params["model"]["embed_tokens"]["embedding"]}
    return {k: v for k, v in params["lm_head"].items() if not isinstance(v, quant.QuantizedWeight)}


def with_head(params, head_leaves):
    if "lm_head" in params:
        return {**params, "lm_head": {**params["lm_head"], **head_leaves}}
    model = {**params["model"], "embed_tokens": {"embedding": head_leaves["embedding"]}}
    return {**params, "model": model}


@pytest.mark.parametrize("kind", ["plain", "tied", "lora", "quantized"])
def test_chunked_loss_and_gradients_equal_the_whole_rows_logits(kind):
    model, params = head_model(kind)
    if kind == "tied":
        assert "lm_head" not in params
    hidden, targets, weights = batch()

    def loss(chunk, hidden, leaves):
        head = lambda h: model.apply({"params": with_head(params, leaves)}, h, method="head")
        if chunk is None:  # the reference: the whole [b, t, vocab] logits
            return weighted_cross_entropy(head(hidden), targets, weights)
        return chunked_cross_entropy(hidden, head, targets, weights, chunk)

    leaves = trainable_head(params)
    ref, ref_grads = jax.value_and_grad(lambda *a: loss(None, *a)[0], argnums=(0, 1))(hidden, leaves)
    assert float(loss(None, hidden, leaves)[1]) == pytest.approx(float(weights.sum()))
    # divides T, does not (a remainder chunk); one position a time and the default (one chunk here)
    for chunk in (4, 5) + ((1, 0) if kind == "plain" else ()):
        (value, weight), grads = jax.jit(
            jax.value_and_grad(lambda *a, c=chunk: loss(c, *a), argnums=(0, 1), has_aux=True)
        )(hidden, leaves)
        np.testing.assert_allclose(value, ref, rtol=1e-5)
        np.testing.assert_allclose(weight, weights.sum(), rtol=1e-6)
        for name, g, r in zip(
            ["hidden", *leaves],
            [grads[0], *grads[1].values()],
            [ref_grads[0], *ref_grads[1].values()],
            strict=True,
        ):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=f"{kind} chunk={chunk} d{name}")
    # zero-weight positions (ignore ids among them) get no gradient through the hidden states
    np.testing.assert_array_equal(grads[0][0, -3:], 0.0)


def test_token_log_probs_equal_log_softmax_gathered():
    model, params = head_model("plain")
    hidden, targets, _ = batch()
    logits = np.asarray(model.apply({"params": params}, hidden, method="head"), np.float64)
    log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    log_softmax -= logits.max(-1, keepdims=True)
    want = np.take_along_axis(log_softmax, np.clip(np.asarray(targets), 0, VOCAB - 1)[..., None], -1)[..., 0]
    head = lambda h: model.apply({"params": params}, h, method="head")
    for chunk in (5, 12):
        got = jax.jit(lambda h, c=chunk: token_log_probs(h, head, targets, c))(hidden)
        assert got.shape == (B, T) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_head_with_dropout_gets_a_different_key_per_chunk():
    def head(h, rng):  # logits that depend on the key alone, like a dropout mask
        noise = 10 * jax.random.normal(rng, h.shape[:2])
        return jnp.zeros(h.shape[:2] + (VOCAB,)).at[..., 0].set(noise)

    hidden, _, _ = batch()
    targets = jnp.zeros((B, T), jnp.int32)
    logp = np.asarray(jax.jit(lambda h: token_log_probs(h, head, targets, 4, rng=jax.random.key(0)))(hidden))
    chunks = logp.reshape(B, 3, 4)
    assert not np.allclose(chunks[:, 0], chunks[:, 1]) and not np.allclose(chunks[:, 1], chunks[:, 2])
    again = token_log_probs(hidden, head, targets, 4, rng=jax.random.key(0))
    np.testing.assert_array_equal(logp, again)  # the backward pass recomputes the same masks


def test_chunk_size_defaults_from_the_vocabulary():
    assert loss_chunk_size(1, 8192, 128256) == 2**24 // 128256
    assert loss_chunk_size(4, 8192, 32768) == 128
    assert loss_chunk_size(1, 100, 32768) == 100  # never more than the row
    assert loss_chunk_size(64, 8192, 2**20) == 1
    assert loss_chunk_size(1, 8192, 32768, chunk_size=300) == 300
    with pytest.raises(ValueError, match="loss_chunk"):
        dataclasses.replace(CFG, loss_chunk=-1)
