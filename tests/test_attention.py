"""Attention implementations against the reference (whole scores), values and gradients; memory that
grows linearly with the length; the choice of implementation per backend."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft import peft
from jft.losses import chunked_cross_entropy
from jft.models.attention import Visibility, attention, describe, one_segment_rows, resolve

FULL = int(np.iinfo(np.int32).max)


def qkv(b=2, t=256, h=4, kv=2, d=16, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(b, kv, t, d)), jnp.float32) for _ in range(2))
    return q, k, v


def packed_segments(b, t):
    """Row 0: three packed sequences then padding (0); row 1: one sequence filling the row."""
    seg = np.zeros((b, t), np.int32)
    seg[0, : t // 3], seg[0, t // 3 : t // 2], seg[0, t // 2 : t - 20] = 1, 2, 3
    seg[1:] = 1
    return jnp.asarray(seg)


def loss_and_grads(impl, q, k, v, blocks_of, window, weights, chunk):
    """Σ w · out² and its gradients for q, k, v, with ``blocks_of(k, v)`` the key blocks."""

    def f(q, k, v):
        out = attention(q, blocks_of(k, v), window, windows=(window,), impl=impl, chunk=chunk)
        return jnp.sum(weights[:, :, None] * out**2)

    return jax.value_and_grad(f, (0, 1, 2))(q, k, v)


def assert_same(impl, q, k, v, blocks_of, window, weights, chunk=64):
    """Outputs at the weighted positions and all gradients equal the reference's."""
    ref = attention(q, blocks_of(k, v), window, impl="xla")
    out = attention(q, blocks_of(k, v), window, windows=(window,), impl=impl, chunk=chunk)
    keep = (weights > 0)[:, :, None]
    np.testing.assert_allclose(jnp.where(keep, out, 0), jnp.where(keep, ref, 0), atol=2e-5, rtol=0)
    (l_ref, g_ref), (l_new, g_new) = (
        loss_and_grads(i, q, k, v, blocks_of, window, weights, chunk) for i in ("xla", impl)
    )
    np.testing.assert_allclose(l_new, l_ref, rtol=1e-5)
    for name, a, b in zip("qkv", g_new, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", ["chunked", "splash"])
@pytest.mark.parametrize("window", [FULL, 37])
def test_implementations_match_the_reference_on_packed_rows(impl, window):
    """Causal, grouped-query heads, packed segments with padding, with and without a sliding window;
    splash runs in interpret mode on CPU."""
    q, k, v = qkv()
    seg = packed_segments(2, 256)
    vis = Visibility(q_seg=seg, k_seg=seg)
    assert_same(impl, q, k, v, lambda k, v: [(k, v, vis)], window, (seg != 0).astype(jnp.float32))


def test_chunked_matches_with_padding_prefix_keys_and_virtual_tokens():
    """Left padding (attention_mask), prefix-tuning keys seen by every query, prompt-tuning tokens
    (segment -1) seen by every segment, and lengths that are not whole chunks."""
    q, k, v = qkv(t=150, h=4, kv=4)
    b, t = 2, 150
    valid = jnp.arange(t)[None] >= jnp.asarray([[0], [17]])
    seg = jnp.where(jnp.arange(t) < 4, -1, jnp.where(jnp.arange(t) < 90, 1, 2))[None].repeat(b, 0)
    pk, pv = (jnp.asarray(np.random.default_rng(5).normal(size=(b, 4, 6, 16)), jnp.float32) for _ in range(2))

    def blocks_of(k, v):
        own = Visibility(q_seg=seg, k_seg=seg, k_valid=valid, shared=True)
        return [(pk, pv, Visibility(always=True)), (k, v, own)]

    weights = valid.astype(jnp.float32)
    for window in (FULL, 23):
        assert_same("chunked", q, k, v, blocks_of, window, weights, chunk=32)


def test_the_model_gives_the_same_logits_and_gradients_with_every_implementation():
    """A tiny Mistral-like model (sliding window on some layers, full on others: the kernels pick a
    window per layer) on packed rows: chunked and splash equal whole-score attention."""
    cfg = jft.LlamaConfig.tiny(
        num_hidden_layers=2, sliding_window=40, layer_types=("sliding_attention", "full_attention")
    )
    t = 128
    ids = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, size=(2, t)), jnp.int32)
    seg = packed_segments(2, t)
    weights = (seg != 0).astype(jnp.float32)

    def loss(params, impl):
        model = jft.LlamaForCausalLM(dataclasses.replace(cfg, attention=impl, attention_chunk=32))
        hidden = model.apply({"params": params}, ids, segment_ids=seg, hidden_only=True)
        head = lambda x: model.apply({"params": params}, x, method="head")
        return chunked_cross_entropy(hidden, head, ids, weights)[0]

    params = jft.LlamaForCausalLM(cfg).init_params(jax.random.key(0))
    ref_loss, ref_grads = jax.value_and_grad(loss)(params, "xla")
    for impl in ("chunked", "splash"):
        value, grads = jax.value_and_grad(loss)(params, impl)
        np.testing.assert_allclose(value, ref_loss, rtol=1e-5, err_msg=impl)
        for path, a, b in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True
        ):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4, err_msg=f"{impl} {jax.tree_util.keystr(path[0])}")


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_tuning_train_the_same_through_chunked_attention(method):
    cfg = jft.LlamaConfig.tiny(num_hidden_layers=2)
    spec = (
        peft.Peft(prefix=peft.Prefix(num_virtual_tokens=5)) if method == "prefix" else peft.Peft(prompt=peft.Prompt(5))
    )
    base = jft.LlamaForCausalLM(cfg)
    model, params = peft.inject(base, base.init_params(jax.random.key(0)), spec, jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(2).integers(3, cfg.vocab_size, size=(2, 70)), jnp.int32)
    seg = packed_segments(2, 70)

    def loss(params, impl):
        m = model.clone(config=dataclasses.replace(cfg, attention=impl, attention_chunk=16))
        logits = m.apply({"params": params}, ids, segment_ids=seg)
        return jnp.sum(jnp.where(seg[..., None] != 0, jax.nn.log_softmax(logits), 0.0)[..., 7])

    (ref, g_ref), (new, g_new) = (jax.value_and_grad(loss)(params, impl) for impl in ("xla", "chunked"))
    np.testing.assert_allclose(new, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4)


def test_generation_with_a_chunked_prefill_matches():
    """Left-padded prompts longer than a chunk: the prefill runs chunked, the decoding steps with the
    KV cache run whole-score attention; the tokens are the reference's."""
    cfg = jft.LlamaConfig.tiny(num_hidden_layers=2, sliding_window=9)
    params = jft.LlamaForCausalLM(cfg).init_params(jax.random.key(0))
    ids = np.asarray(np.random.default_rng(3).integers(3, cfg.vocab_size, size=(2, 21)), np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, :6] = False
    outs = [
        jft.generate(
            jft.LlamaForCausalLM(dataclasses.replace(cfg, attention=impl, attention_chunk=8)),
            params,
            ids,
            attention_mask=mask,
            max_new_tokens=6,
        )
        for impl in ("xla", "chunked")
    ]
    np.testing.assert_array_equal(outs[0], outs[1])


def train_step_temporaries(impl: str, length: int, mlp_chunk: int = 0) -> float:
    """MiB of temporaries of the compiled forward + backward of a 2-layer, 256-wide model."""
    cfg = jft.LlamaConfig.tiny(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        vocab_size=512,
        attention=impl,
        mlp_chunk=mlp_chunk,
    )
    model = jft.LlamaForCausalLM(cfg)
    params = jax.eval_shape(lambda: model.init_params(jax.random.key(0)))

    def loss(p, ids):
        hidden = model.apply({"params": p}, ids, segment_ids=jnp.ones_like(ids), hidden_only=True)
        head = lambda x: model.apply({"params": p}, x, method="head")
        return chunked_cross_entropy(hidden, head, ids, jnp.ones(ids.shape))[0]

    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.jit(jax.grad(loss)).lower(params, ids).compile().memory_analysis().temp_size_in_bytes / 2**20


def test_train_step_memory_grows_linearly_with_the_length():
    """Measured 2026-12-02: chunked 35 / 119 / 471 MiB at 1k / 4k / 16k tokens; whole scores 77 / 891 /
    12967 MiB (the quadratic growth this replaces)."""
    chunked = [train_step_temporaries("auto", n) for n in (1024, 4096, 16384)]
    assert chunked[1] / chunked[0] < 5 and chunked[2] / chunked[1] < 5, chunked
    whole = [train_step_temporaries("xla", n) for n in (4096, 16384)]
    assert whole[1] / whole[0] > 10 and whole[1] > 10 * chunked[2], (whole, chunked)


def test_the_tiled_mlp_gives_the_same_logits_and_gradients():
    """model.mlp_chunk: the MLP over 8 positions at a time (30 positions: the last chunk padded),
    with LoRA on its projections; same parameters, logits and gradients as whole rows."""
    cfg = jft.LlamaConfig.tiny(num_hidden_layers=2)
    spec = peft.Peft(lora=peft.Lora(r=4, alpha=8.0, targets=("gate_proj", "up_proj", "down_proj")))
    model, params = peft.inject(
        jft.LlamaForCausalLM(cfg), jft.LlamaForCausalLM(cfg).init_params(jax.random.key(0)), spec, jax.random.key(1)
    )
    params = jax.tree.map(lambda p: p + 0.01, params)  # LoRA's B starts at zero: make its gradient path count
    tiled = model.clone(config=dataclasses.replace(cfg, mlp_chunk=8))
    ids = jnp.asarray(np.random.default_rng(5).integers(3, cfg.vocab_size, size=(2, 30)), jnp.int32)
    shapes = jax.eval_shape(lambda: nn.unbox(tiled.init(jax.random.key(0), ids)["params"]))  # through the tiles
    assert jax.tree.structure(shapes) == jax.tree.structure(params)

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, ids) ** 2)

    (l0, g0), (l1, g1) = (jax.value_and_grad(loss, 1)(m, params) for m in (model, tiled))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_the_tiled_mlp_cuts_the_step_memory():
    """Measured 2026-12-02: 119 / 471 MiB of temporaries at 4k / 16k tokens whole, 77 / 297 MiB with
    mlp_chunk=256."""
    whole, tiled = train_step_temporaries("auto", 4096), train_step_temporaries("auto", 4096, mlp_chunk=256)
    assert tiled < 0.8 * whole, (tiled, whole)


def test_implementation_by_backend_and_clear_errors():
    assert [resolve("auto", p) for p in ("tpu", "gpu", "cpu")] == ["splash", "cudnn", "chunked"]
    assert resolve("splash", "cpu") == "splash" and resolve("xla", "gpu") == "xla"
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        resolve("cudnn", "cpu")
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        jft.LlamaConfig.tiny(attention="flash")
    assert "splash" in describe("auto", 512, "tpu") and "cuDNN" in describe("auto", 512, "gpu")
    assert describe("auto", 256, "cpu").startswith("chunked XLA flash attention (256-token blocks)")


def test_rows_that_cudnn_takes_exactly():
    """cuDNN gets rows of one segment then padding (lengths); anything else runs chunked."""
    ok, lengths = one_segment_rows(jnp.asarray([[1, 1, 1, 0], [2, 2, 2, 2], [0, 0, 0, 0]]))
    assert bool(ok) and lengths.tolist() == [3, 4, 1]
    for rows in ([[1, 1, 2, 0]], [[0, 1, 1, 1]], [[1, 0, 1, 0]]):  # packed, left-padded, gap
        assert not bool(one_segment_rows(jnp.asarray(rows))[0]), rows


def test_a_long_call_after_the_cache_is_filled_matches_one_pass():
    """A prefill, then a continuation longer than a chunk with the KV cache: chunked attention over
    the cached and the new keys together gives the logits of one pass over the whole sequence."""
    cfg = jft.LlamaConfig.tiny(num_hidden_layers=2, attention_chunk=8)
    model = jft.LlamaForCausalLM(cfg)
    params = model.init_params(jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(4).integers(3, cfg.vocab_size, size=(1, 26)), jnp.int32)
    whole = model.apply({"params": params}, ids)
    cache = model.init_cache(1, 32)
    first, cache = model.apply({"params": params}, ids[:, :6], cache=cache)
    rest, _ = model.apply({"params": params}, ids[:, 6:], cache=cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), whole, atol=2e-5, rtol=0)
