"""Generation: greedy parity with transformers, EOS handling, sampling and compile reuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import jft
from jft.generate import _decode, _prefill, sample_logits

PAD = 0


def hf_generate(folder, ids, mask, max_new, eos):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
        )
    new = out[:, ids.shape[1] :].numpy()
    return np.pad(new, ((0, 0), (0, max_new - new.shape[1])), constant_values=PAD)


def left_padded_batch(lengths, seed=0, vocab=128):
    rs = np.random.RandomState(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rs.randint(3, vocab, n)
        mask[row, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen3", "mistral_window", "llama3_rope"])
def test_greedy_matches_transformers(hf_model_dir, variant):
    folder = hf_model_dir(variant)
    model, params = jft.load_hf(folder)
    ids, mask = left_padded_batch([7, 3, 5])
    ours = jft.generate(model, params, ids, 20, attention_mask=mask, eos_token_id=(), pad_token_id=PAD)
    ref = hf_generate(folder, ids, mask, 20, eos=None)
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_rows_stop_at_eos_and_are_padded(hf_model_dir):
    folder = hf_model_dir("llama_gqa")
    model, params = jft.load_hf(folder)
    ids, mask = left_padded_batch([6, 4], seed=3)
    free = np.asarray(jft.generate(model, params, ids, 12, attention_mask=mask, eos_token_id=()))
    eos = int(free[0, 3])  # a token row 0 produces at step 3: make it the EOS
    ours = np.asarray(jft.generate(model, params, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=PAD))
    first = np.argmax(free[0] == eos)
    np.testing.assert_array_equal(ours[0, : first + 1], free[0, : first + 1])
    assert (ours[0, first + 1 :] == PAD).all()
    np.testing.assert_array_equal(ours, hf_generate(folder, ids, mask, 12, eos=eos))


def test_stops_early_when_every_row_is_done():
    model = jft.LlamaForCausalLM(jft.LlamaConfig.tiny())
    params = model.init_params(jax.random.key(1))
    ids = jnp.asarray([[5, 6, 7]])
    first = int(jft.generate(model, params, ids, 1, eos_token_id=())[0, 0])
    out = np.asarray(jft.generate(model, params, ids, 30, eos_token_id=first, pad_token_id=9))
    assert out[0, 0] == first and (out[0, 1:] == 9).all()


def test_sampling_is_reproducible_and_respects_top_k_and_top_p():
    model = jft.LlamaForCausalLM(jft.LlamaConfig.tiny())
    params = model.init_params(jax.random.key(1))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (4, 6)))
    greedy = np.asarray(jft.generate(model, params, ids, 8, eos_token_id=()))
    kw = dict(eos_token_id=(), temperature=1.0)
    a = np.asarray(jft.generate(model, params, ids, 8, rng=jax.random.key(0), **kw))
    b = np.asarray(jft.generate(model, params, ids, 8, rng=jax.random.key(0), **kw))
    c = np.asarray(jft.generate(model, params, ids, 8, rng=jax.random.key(1), **kw))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    top1 = jft.generate(model, params, ids, 8, rng=jax.random.key(0), top_k=1, **kw)
    np.testing.assert_array_equal(np.asarray(top1), greedy)
    tiny_p = jft.generate(model, params, ids, 8, rng=jax.random.key(0), top_p=1e-6, **kw)
    np.testing.assert_array_equal(np.asarray(tiny_p), greedy)


def test_sample_logits_top_k_and_top_p_masks():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: sample_logits(logits, k, 1.0, 2, None))(jax.random.split(jax.random.key(0), 2000))
    assert set(np.unique(draws)) == {0, 1}
    draws = jax.vmap(lambda k: sample_logits(logits, k, 1.0, None, 0.7))(jax.random.split(jax.random.key(0), 2000))
    assert set(np.unique(draws)) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    draws = jax.vmap(lambda k: sample_logits(logits, k, 1.0, None, 0.85))(jax.random.split(jax.random.key(0), 2000))
    assert set(np.unique(draws)) == {0, 1, 2}


def test_lengths_in_one_bucket_reuse_the_compiled_programs():
    model = jft.LlamaForCausalLM(jft.LlamaConfig.tiny())
    params = model.init_params(jax.random.key(1))
    jft.generate(model, params, jnp.ones((2, 5), jnp.int32), 10)
    before = _prefill._cache_size(), _decode._cache_size()
    for length, new in ((3, 12), (9, 16), (16, 9)):
        jft.generate(model, params, jnp.ones((2, length), jnp.int32), new)
    assert (_prefill._cache_size(), _decode._cache_size()) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(temperature=0.7), "needs an explicit rng"),
        (dict(attention_mask=np.asarray([[1, 1, 0]])), "left-padded"),
        (dict(attention_mask=np.ones((1, 2))), "differs from prompt_ids shape"),
    ],
)
def test_bad_arguments(kwargs, message):
    model = jft.LlamaForCausalLM(jft.LlamaConfig.tiny())
    params = model.init_params(jax.random.key(1))
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        jft.generate(model, params, np.asarray([[4, 5, 6]]), **kwargs)
