"""QLoRA: 4-bit base weights in the model, LoRA on top, merge and export, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jft
from jft import peft, quant
from jft.models.layers import qdense
from jft.objectives import token_loss
from jft.train import TrainState, make_optimizer, make_train_step


@pytest.fixture(scope="module")
def folder(hf_model_dir):
    return hf_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def loaded(folder):
    return jft.load_hf(folder), jft.load_hf(folder, quantize="nf4")


def ids(seed=0, shape=(2, 9)):
    return jax.random.randint(jax.random.key(seed), shape, 0, 128)


def test_load_hf_quantizes_the_linear_kernels_tensor_by_tensor(loaded):
    (model, params), (qmodel, qparams) = loaded
    up = qparams["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert (
        isinstance(up, quant.QuantizedWeight)
        and up.full_shape == params["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape
    )
    assert not isinstance(qparams["lm_head"]["kernel"], quant.QuantizedWeight)  # skipped by default
    assert not isinstance(qparams["model"]["embed_tokens"]["embedding"], quant.QuantizedWeight)
    # each layer's codes are those of quantizing that layer's HF tensor on its own
    one = quant.quantize(params["model"]["layers"]["mlp"]["up_proj"]["kernel"][1])
    np.testing.assert_array_equal(up.codes[1], one.codes)
    kernels = [
        leaf
        for leaf in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, quant.QuantizedWeight))
        if isinstance(leaf, quant.QuantizedWeight)
    ]
    assert len(kernels) == 7
    q_bytes = sum(k.nbytes for k in kernels)
    bf16_bytes = sum(np.prod(k.full_shape) * 2 for k in kernels)
    assert q_bytes <= 0.27 * bf16_bytes


def test_quantized_forward_equals_the_dequantized_model(loaded):
    (model, params), (qmodel, qparams) = loaded

    def dequantized(tree):
        return jax.tree.map(
            lambda x: quant.dequantize(x) if isinstance(x, quant.QuantizedWeight) else x,
            tree,
            is_leaf=lambda x: isinstance(x, quant.QuantizedWeight),
        )

    x = ids()
    np.testing.assert_allclose(
        qmodel.apply({"params": qparams}, x), model.apply({"params": dequantized(qparams)}, x), atol=1e-5
    )
    assert not np.allclose(qmodel.apply({"params": qparams}, x), model.apply({"params": params}, x), atol=1e-3)


def test_qdense_backward_gives_the_input_gradient_and_saves_no_dequantized_weight():
    w = 0.02 * jax.random.normal(jax.random.key(0), (128, 192))
    q = quant.quantize(w)
    x = jax.random.normal(jax.random.key(1), (4, 128))
    g = jax.random.normal(jax.random.key(2), (4, 192))
    ours = jax.grad(lambda x: jnp.sum(qdense(x, q, jnp.float32, jnp.float32) * g))(x)
    plain = jax.grad(lambda x: jnp.sum((x @ quant.dequantize(q)) * g))(x)
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-6)
    _, f_vjp = jax.vjp(lambda x: qdense(x, q, jnp.float32, jnp.float32), x)
    saved = [leaf.shape for leaf in jax.tree.leaves(f_vjp) if hasattr(leaf, "shape")]
    assert (192, 128) not in saved and (128, 192) not in saved, saved


def test_qdora_trains_the_adapter_only_then_merges_and_exports(loaded, tmp_path):
    """DoRA on a 4-bit base (its column norms need the dequantized kernel); plain LoRA runs
    through configs/qlora_llama.py in test_trainer."""
    _, (qmodel, qparams) = loaded
    model, params = peft.inject(qmodel, qparams, peft.Peft(lora=peft.Lora(r=4, dora=True)), jax.random.key(0))
    labels = peft.labels(params, model.peft)
    tx, schedule = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)
    state = TrainState.create(params, labels, tx, jax.random.key(1))
    codes_before = np.array(state.frozen["model"]["layers"]["mlp"]["up_proj"]["kernel"].codes)
    step = jax.jit(make_train_step(token_loss(model), tx, schedule))
    x = ids(1, (4, 9))
    batch = {
        "input_ids": x[None],
        "targets": jnp.roll(x, -1, 1)[None],
        "loss_weights": jnp.ones((1, 4, 9)),
        "segment_ids": jnp.ones((1, 4, 9), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(9), (1, 4, 9)),
    }
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(state.frozen["model"]["layers"]["mlp"]["up_proj"]["kernel"].codes, codes_before)
    merged_model, merged = peft.fold(model, state.params)
    assert not any(isinstance(x, quant.QuantizedWeight) for x in jax.tree.leaves(merged))
    np.testing.assert_allclose(
        merged_model.apply({"params": merged}, x), model.apply({"params": state.params}, x), atol=1e-5
    )
    jft.save_hf(merged_model, merged, tmp_path / "hf")
    reloaded_model, reloaded = jft.load_hf(tmp_path / "hf")
    np.testing.assert_allclose(
        reloaded_model.apply({"params": reloaded}, x), model.apply({"params": state.params}, x), atol=1e-5
    )
    peft.save_adapter(model, state.params, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_quantized_params_round_trip_through_orbax_without_requantizing(loaded, tmp_path):
    _, (qmodel, qparams) = loaded
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "q", qparams)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "q", jax.tree.map(ocp.utils.to_shape_dtype_struct, qparams))
    up = restored["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(up, quant.QuantizedWeight) and up.codes.dtype == np.uint8
    jax.tree.map(np.testing.assert_array_equal, restored, qparams)


def test_bad_quantization_requests(folder):
    with pytest.raises(ValueError, match="quantize='int8' is not supported"):
        jft.load_hf(folder, quantize="int8")
    with pytest.raises(ValueError, match="quantize_skip names \\['embed_tokens'\\]"):
        jft.load_hf(folder, quantize="nf4", quantize_skip=("embed_tokens",))
    with pytest.raises(ValueError, match="block_size"):
        jft.load_hf(folder, quantize="nf4", block_size=7)
