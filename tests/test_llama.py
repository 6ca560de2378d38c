"""Model invariants: logical axes, KV cache, padding, packing, scan, remat and dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.models.llama import REMAT_POLICIES, LlamaConfig, LlamaForCausalLM

AXES = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers"}


@functools.partial(jax.jit, static_argnums=0, static_argnames="last_only")
def apply(model, params, ids, **kw):
    return model.apply({"params": params}, ids, **kw)


def make(**overrides):
    model = LlamaForCausalLM(LlamaConfig.tiny(**overrides))
    return model, model.init_params(jax.random.key(0))


def ids_of(shape, seed=0, vocab=256):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


def test_every_param_has_logical_axes():
    model, params = make(qk_norm=True, qkv_bias=True)
    specs = jax.tree.leaves(model.logical_axes(), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(specs) == len(leaves)
    for (path, leaf), spec in zip(leaves, specs, strict=True):
        name = jax.tree_util.keystr(path)
        assert len(spec) == leaf.ndim and set(spec) <= AXES, name
        assert (spec[0] == "layers") == ("['layers']" in name), name


def test_layers_are_stacked_and_distinct():
    model, params = make(num_hidden_layers=3)
    kernel = params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.shape == (3, 64, 176)
    assert not np.allclose(kernel[0], kernel[1])


def test_kv_cache_decoding_equals_full_forward():
    model, params = make()
    ids = ids_of((2, 10))
    full = apply(model, params, ids)
    cache = model.init_cache(2, 16)
    logits, cache = apply(model, params, ids[:, :6], cache=cache)
    steps = [logits]
    for t in range(6, 10):
        logits, cache = apply(model, params, ids[:, t : t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)
    assert int(cache.index) == 10


def test_left_padded_batch_equals_each_row_alone():
    model, params = make()
    a, b = ids_of((1, 9), seed=1), ids_of((1, 5), seed=2)
    batch = jnp.concatenate([a, jnp.pad(b, ((0, 0), (4, 0)))])
    mask = jnp.asarray([[1] * 9, [0] * 4 + [1] * 5])
    out = apply(model, params, batch, attention_mask=mask)
    np.testing.assert_allclose(out[0], apply(model, params, a)[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[1, 4:], apply(model, params, b)[0], atol=1e-5, rtol=0)


def test_left_padded_cache_matches_unpadded_decoding():
    model, params = make(sliding_window=3)
    b = ids_of((1, 7), seed=2)
    padded = jnp.pad(b[:, :5], ((0, 0), (3, 0)))
    cache = model.init_cache(1, 12)
    _, cache = apply(model, params, padded, attention_mask=jnp.asarray([[0] * 3 + [1] * 5]), cache=cache)
    step = []
    for t in (5, 6):
        logits, cache = apply(model, params, b[:, t : t + 1], cache=cache)
        step.append(logits)
    np.testing.assert_allclose(jnp.concatenate(step, 1), apply(model, params, b)[:, 5:], atol=1e-5)


def test_packed_segments_equal_separate_sequences():
    model, params = make()
    a, b, c = ids_of((1, 4), 1), ids_of((1, 6), 2), ids_of((1, 3), 3)
    packed = jnp.concatenate([a, b, c, jnp.zeros((1, 3), jnp.int32)], axis=1)
    segments = jnp.asarray([[1] * 4 + [2] * 6 + [3] * 3 + [0] * 3])
    out = apply(model, params, packed, segment_ids=segments)
    for start, seq in ((0, a), (4, b), (10, c)):
        alone = apply(model, params, seq)
        np.testing.assert_allclose(out[:, start : start + seq.shape[1]], alone, atol=1e-5, rtol=0)


def test_scan_keeps_the_program_size_independent_of_depth():
    """A 16-layer forward lowers to the same program as a 4-layer one (scan, not unrolled)."""
    sizes = []
    for layers in (4, 16):
        model = LlamaForCausalLM(LlamaConfig.tiny(num_hidden_layers=layers))
        shapes = model.param_shapes()
        text = jax.jit(model.apply).lower({"params": shapes}, jax.ShapeDtypeStruct((2, 8), jnp.int32)).as_text()
        sizes.append(len(text))
    assert abs(sizes[1] - sizes[0]) < 0.01 * sizes[0]


@functools.cache
def remat_grads(remat):
    model, params = make(remat=remat)
    return jax.jit(jax.grad(lambda p: model.apply({"params": p}, ids_of((2, 8))).mean()))(params)


@pytest.mark.parametrize("policy", REMAT_POLICIES[1:])
def test_remat_policies_give_the_same_gradients(policy):
    ref, got = remat_grads("none"), remat_grads(policy)
    for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)


def test_float32_params_with_bfloat16_compute():
    import re

    model32, params = make()
    model16 = LlamaForCausalLM(LlamaConfig.tiny(dtype="bfloat16"))
    ids = ids_of((2, 8))

    def dot_operand_dtypes(model):
        """Element types of the operands of every matmul in the lowered forward (StableHLO)."""
        text = apply.lower(model, params, ids).as_text()
        dots = re.findall(r"stablehlo\.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
        return [re.fullmatch(r"tensor<(?:[0-9]+x)*(\w+)>", t).group(1) for pair in dots for t in pair]

    # q, k, v, o, the two attention products, gate, up, down (in the scanned layer body) and lm_head:
    # all take bf16 operands (the float32 kernels are cast first); the float32 model's are all f32
    dtypes16, dtypes32 = dot_operand_dtypes(model16), dot_operand_dtypes(model32)
    assert len(dtypes16) == len(dtypes32) == 2 * 10
    assert set(dtypes16) == {"bf16"} and set(dtypes32) == {"f32"}
    out = apply(model16, params, ids)
    ref = apply(model32, params, ids)
    assert out.dtype == jnp.float32 and params["lm_head"]["kernel"].dtype == jnp.float32
    diff = float(jnp.abs(out - ref).max())
    assert 1e-4 * float(jnp.abs(ref).max()) < diff < 0.05 * float(jnp.abs(ref).max())  # bf16 rounding, no more
    grads = jax.jit(jax.grad(lambda p: model16.apply({"params": p}, ids).mean()))(params)
    assert all(g.dtype == jnp.float32 and bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_last_only_returns_the_last_logits():
    model, params = make(tie_word_embeddings=True)
    ids = ids_of((2, 8))
    full = apply(model, params, ids)
    last = apply(model, params, ids, last_only=True)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_attention_heads=4, num_key_value_heads=3), "not a multiple"),
        (dict(remat="sometimes"), "unknown remat policy"),
        (dict(dtype="int8"), "dtype='int8' is not supported"),
        (dict(layer_types=("full_attention",)), "layer_types has 1 entries for 2 layers"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.tiny(**overrides)


def test_segment_ids_with_cache_is_rejected():
    model, params = make()
    with pytest.raises(ValueError, match="segment_ids"):
        apply(model, params, ids_of((1, 4)), segment_ids=jnp.ones((1, 4), jnp.int32), cache=model.init_cache(1, 8))


@pytest.mark.parametrize("dtype, out_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32)])
def test_dense_gradients_equal_autodiff_of_matmul(dtype, out_dtype):
    from jft.models.layers import dense

    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(2, 5, 8), dtype)
    k = jnp.asarray(rs.randn(8, 3), dtype)
    c = jnp.asarray(rs.randn(2, 5, 3), jnp.float32)
    ours = jax.grad(lambda x, k: (dense(x, k, jnp.dtype(out_dtype)) * c).sum(), argnums=(0, 1))(x, k)
    ref = jax.grad(lambda x, k: (jnp.matmul(x, k, preferred_element_type=out_dtype) * c).sum(), argnums=(0, 1))(x, k)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(
            np.asarray(a, np.float32),
            np.asarray(b, np.float32),
            rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5,
            atol=1e-2 if dtype == jnp.bfloat16 else 1e-5,
        )


def test_swiglu_gradients_match_autodiff():
    from jft.models.layers import swiglu

    gate, up, g = (jax.random.normal(jax.random.key(i), (3, 7)) * 3 for i in range(3))
    ours = jax.grad(lambda a, b: jnp.sum(swiglu(a, b) * g), argnums=(0, 1))(gate, up)
    plain = jax.grad(lambda a, b: jnp.sum(jax.nn.silu(a) * b * g), argnums=(0, 1))(gate, up)
    for x, y in zip(ours, plain, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
