"""Loss, partition, optimizer and the pure train / eval steps on a tiny random Llama."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jft
from jft import partition
from jft.losses import weighted_cross_entropy
from jft.objectives import token_loss
from jft.train import TrainState, make_eval_step, make_optimizer, make_train_step

T = 12  # sequence length
CFG = jft.LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)


@pytest.fixture(scope="module")
def model_params():
    model = jft.LlamaForCausalLM(CFG)
    return model, model.init_params(jax.random.key(0))


@pytest.fixture(scope="module")
def eval_step(model_params):
    return jax.jit(make_eval_step(token_loss(model_params[0])))


def make_batch(seed: int, rows: int) -> dict:
    """``[rows, T]`` packed rows with padding and uneven loss weights (0, 0.1 prompts, 1)."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((rows, T), np.int32)
    positions = np.zeros((rows, T), np.int32)
    for r in range(rows):
        cut, end = rng.integers(2, T // 2), rng.integers(T // 2 + 1, T + 1)
        segment_ids[r, :cut], segment_ids[r, cut:end] = 1, 2
        positions[r, :cut], positions[r, cut:end] = np.arange(cut), np.arange(end - cut)
    weights = rng.choice(np.array([0.0, 0.1, 1.0], np.float32), size=(rows, T))
    weights[0, :] = 0.0
    weights[0, 3] = 1.0  # a micro-batch with almost no weight: per-micro-batch means would differ
    weights[segment_ids == 0] = 0.0
    return {
        "input_ids": rng.integers(0, CFG.vocab_size, (rows, T)).astype(np.int32),
        "targets": rng.integers(0, CFG.vocab_size, (rows, T)).astype(np.int32),
        "loss_weights": weights,
        "segment_ids": segment_ids,
        "positions": positions,
    }


def accum(batch: dict, n: int) -> dict:
    return {k: v.reshape(n, -1, *v.shape[1:]) for k, v in batch.items()}


FULL_FT = dict(learning_rate=3e-3, total_steps=20, weight_decay=0.1)
_STEPS = {}  # one jitted step per (rules, optimizer) setting, so tests share compilations


def setup(model, params, rules=partition.FULL, **optim):
    labels = partition.labels(params, rules, CFG.num_hidden_layers)
    key = repr((rules, sorted(optim.items())))
    if key not in _STEPS:
        masks = partition.layer_masks(partition.split(params, labels)[0], labels)
        kw = dict(learning_rate=1e-3, total_steps=100, warmup_steps=0) | optim
        tx, schedule = make_optimizer(masks=masks, **kw)
        _STEPS[key] = tx, jax.jit(make_train_step(token_loss(model), tx, schedule, masks), donate_argnums=0)
    tx, step = _STEPS[key]
    # A copy: the step donates the state, which would delete the shared fixture's buffers.
    return TrainState.create(jax.tree.map(jnp.array, params), labels, tx, jax.random.key(1)), step


def eval_loss(eval_step, params, batch, n):
    """Mean loss over ``n`` micro-batches of ``batch``, each evaluated separately, and the per-micro means."""
    micros = accum(batch, n)
    sums = [eval_step(params, {k: v[i] for k, v in micros.items()}) for i in range(n)]
    total = sum(float(s["loss_sum"]) for s in sums) / sum(float(s["weight_sum"]) for s in sums)
    return total, [float(s["loss_sum"] / s["weight_sum"]) for s in sums], sum(int(s["tokens"]) for s in sums)


def copy(tree):
    return jax.tree.map(np.array, tree)


def at(tree, path):
    """The leaf of nested dict ``tree`` at a ``tree_flatten_with_path`` key path."""
    for key in path:
        tree = tree[key.key]
    return tree


def test_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 5)).astype(np.int32)
    weights = rng.choice(np.array([0.0, 0.1, 1.0], np.float32), size=(2, 5))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    loss_sum, weight_sum = weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(loss_sum, (nll * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(weight_sum, weights.sum(), rtol=1e-6)


def test_grad_accumulation_equals_one_big_batch(model_params, eval_step):
    model, params = model_params
    params = {**params, "lm_head": {"kernel": 30 * params["lm_head"]["kernel"]}}  # peaky, so token losses vary
    batch = make_batch(0, 8)
    results = []
    for n in (4, 1):
        state, step = setup(model, params, **FULL_FT)
        state, metrics = step(state, accum(batch, n))
        results.append((copy(state.trainable), jax.tree.map(float, metrics)))
    (p4, m4), (p1, m1) = results
    assert m4.keys() == m1.keys() == {"loss", "grad_norm", "lr", "tokens", "weight"}
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p4, p1)
    assert m1["tokens"] == (batch["loss_weights"] > 0).sum()
    np.testing.assert_allclose(m1["weight"], batch["loss_weights"].sum(), rtol=1e-6)

    # The weights are uneven enough that averaging per-micro-batch means would be wrong.
    eval_step = jax.jit(make_eval_step(token_loss(model)))
    sums = [
        eval_step(params, micro) for micro in (jax.tree.map(lambda x, i=i: x[i], accum(batch, 4)) for i in range(4))
    ]
    assert abs(np.mean([s["loss_sum"] / s["weight_sum"] for s in sums]) - m1["loss"]) > 0.01  # >> the 1e-5 tolerance
    np.testing.assert_allclose(sum(s["loss_sum"] for s in sums) / m1["weight"], m1["loss"], rtol=1e-5)


def test_frozen_leaves_and_layers_stay_bit_identical(model_params):
    model, params = model_params
    state, step = setup(model, params, partition.last_layers(1, 2), learning_rate=1e-2, weight_decay=0.1)
    # No gradient buffer and no optimizer state for the frozen embedding table.
    assert "embed_tokens" not in state.trainable["model"]
    assert set(state.frozen["model"]) == {"embed_tokens"}
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
    assert len(adam) == 1
    assert jax.tree.structure(adam[0].mu) == jax.tree.structure(state.trainable)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    assert paths and not any("embed_tokens" in p for p in paths)

    before = copy(params)
    batch = accum(make_batch(1, 4), 2)
    for _ in range(3):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = state.params
    assert np.array_equal(after["model"]["embed_tokens"]["embedding"], before["model"]["embed_tokens"]["embedding"])
    assert not np.allclose(after["lm_head"]["kernel"], before["lm_head"]["kernel"])
    for path, leaf in jax.tree_util.tree_flatten_with_path(after["model"]["layers"])[0]:
        old = at(before["model"]["layers"], path)
        assert np.array_equal(leaf[0], old[0]), f"frozen layer 0 changed: {jax.tree_util.keystr(path)}"
        assert not np.allclose(leaf[1], old[1]), f"trainable layer 1 did not change: {jax.tree_util.keystr(path)}"


def test_partition_rules_errors_and_summary(model_params):
    _, params = model_params
    with pytest.raises(ValueError, match="model/embed_tokens/embedding"):
        partition.labels(params, (("lm_head/.*", "trainable"), ("model/layers/.*", "frozen")), 2)
    rules = (("lm_head/.*|model/(embed_tokens|norm)/.*", "trainable"), ("model/layers/0/.*", "frozen"))
    with pytest.raises(ValueError, match="model/layers/1/"):
        partition.labels(params, rules, 2)
    with pytest.raises(ValueError, match="'train'"):
        partition.labels(params, ((".*", "train"),), 2)
    with pytest.raises(ValueError, match="leading axis of 3"):
        partition.labels(params, partition.FULL, 3)

    labels = partition.labels(params, (("model/embed_tokens/.*", "frozen"), *partition.FULL), 2)
    trainable, frozen = partition.split(params, labels)
    assert frozen == {"model": {"embed_tokens": params["model"]["embed_tokens"]}}
    merged = partition.join(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a is b, merged, params)))
    with pytest.raises(ValueError, match="both"):
        partition.join(params, frozen)
    total = sum(x.size for x in jax.tree.leaves(params))
    embed = params["model"]["embed_tokens"]["embedding"].size
    assert f"{total - embed:,} / {total:,}" in partition.summary(params, labels)


def test_schedules():
    peak = 1e-3
    _, lr = make_optimizer(learning_rate=peak, total_steps=200, min_lr_ratio=0.1)  # warmup 5%: 10 steps
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, peak / 2, peak], rtol=1e-6)
    np.testing.assert_allclose([lr(105), lr(200), lr(250)], [0.55 * peak, 0.1 * peak, 0.1 * peak], rtol=1e-5)
    assert lr(50) > lr(150)
    _, lr = make_optimizer(learning_rate=peak, total_steps=200, warmup_steps=0, schedule="linear")
    np.testing.assert_allclose([lr(0), lr(100), lr(200)], [peak, peak / 2, 0.0], rtol=1e-6, atol=1e-12)
    _, lr = make_optimizer(learning_rate=peak, total_steps=200, schedule="constant")
    np.testing.assert_allclose([lr(10), lr(150), lr(200)], [peak] * 3, rtol=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        make_optimizer(learning_rate=peak, total_steps=10, schedule="exp")
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(name="lion", learning_rate=peak, total_steps=10)


@pytest.mark.parametrize("name", ["sgd", "adafactor"])
def test_other_optimizers_step(model_params, name):
    model, params = model_params
    state, step = setup(model, params, name=name, learning_rate=0.1, weight_decay=0.01)
    state, metrics = step(state, accum(make_batch(2, 4), 2))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), state.params, params)
    assert all(jax.tree.leaves(changed))


def test_weight_decay_touches_matrices_only():
    model = jft.LlamaForCausalLM(dataclasses.replace(CFG, attention_bias=True, mlp_bias=True))
    params = model.init_params(jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.5, params)  # biases start at 0: make them decayable
    tx, _ = make_optimizer(learning_rate=0.1, total_steps=10, warmup_steps=0, schedule="constant", weight_decay=0.5)

    @jax.jit
    def step_with_zero_grads(params):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = step_with_zero_grads(params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
        name = jax.tree_util.keystr(path)
        old = at(params, path)
        if name.endswith("['kernel']") or "embed_tokens" in name:
            np.testing.assert_allclose(leaf, old * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=name)
        else:  # norm scales and biases, stacked [L, d] or not
            assert np.array_equal(leaf, old), name


def test_loss_decreases_and_eval_step_agrees(model_params, eval_step):
    model, params = model_params
    state, step = setup(model, params, **FULL_FT)
    batch = make_batch(3, 8)
    first, _, tokens = eval_loss(eval_step, params, batch, 4)
    losses = []
    for _ in range(20):
        state, metrics = step(state, accum(batch, 4))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 20
    np.testing.assert_allclose(losses[0], first, rtol=1e-5)
    assert tokens == (batch["loss_weights"] > 0).sum()
    assert losses[-1] < 0.7 * losses[0], losses
    final, _, _ = eval_loss(eval_step, state.params, batch, 4)
    assert final < losses[-1]  # the last step improved on the loss it reported


def test_a_mixture_of_experts_trains_with_its_load_balancing_loss():
    """Mixtral: the step's loss is CE + coef * aux (aux from the router statistics), and it falls."""
    from jft.models.llama import moe_aux_loss

    cfg = dataclasses.replace(CFG, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5)
    model = jft.LlamaForCausalLM(cfg)
    params = model.init_params(jax.random.key(0))
    batch = {k: v[None] for k, v in make_batch(3, 4).items()}
    micro = {k: v[0] for k, v in batch.items()}
    logits, state = model.apply(
        {"params": params},
        micro["input_ids"],
        micro["positions"],
        None,
        micro["segment_ids"],
        mutable=["router"],
    )
    loss_sum, weight_sum = weighted_cross_entropy(logits, micro["targets"], micro["loss_weights"])
    expected = loss_sum / weight_sum + 0.5 * moe_aux_loss(state["router"], 4)
    tx, schedule = make_optimizer(learning_rate=3e-3, total_steps=20, warmup_steps=0)
    step = jax.jit(make_train_step(token_loss(model), tx, schedule))
    s = TrainState.create(params, jax.tree.map(lambda _: True, params), tx, jax.random.key(1))
    losses = []
    for _ in range(8):
        s, metrics = step(s, batch)
        losses.append(float(metrics["loss"]))
    assert abs(losses[0] - float(expected)) < 1e-5
    assert losses[-1] < losses[0] - 0.1
    assert (
        float(
            jnp.abs(
                s.trainable["model"]["layers"]["block_sparse_moe"]["gate"]["kernel"]
                - params["model"]["layers"]["block_sparse_moe"]["gate"]["kernel"]
            ).max()
        )
        > 0
    )  # the router learns


def test_the_chunked_loss_head_gives_the_whole_rows_loss_and_gradients(model_params):
    """The step (head in chunks of 5 of 12 positions) against CE of the full logits: same loss and gradients."""
    model, params = model_params
    chunked = jft.LlamaForCausalLM(dataclasses.replace(CFG, loss_chunk=5))
    micro = make_batch(5, 4)

    def reference(params):
        logits = model.apply({"params": params}, micro["input_ids"], micro["positions"], None, micro["segment_ids"])
        loss_sum, weight_sum = weighted_cross_entropy(logits, micro["targets"], micro["loss_weights"])
        return loss_sum / weight_sum

    want_loss, want_grads = jax.value_and_grad(reference)(params)
    tx = optax.sgd(1.0)  # new params = params - grads
    step = jax.jit(make_train_step(token_loss(chunked), tx, lambda _: 1.0))
    state = TrainState.create(params, jax.tree.map(lambda _: True, params), tx, jax.random.key(1))
    state, metrics = step(state, {k: v[None] for k, v in micro.items()})
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    grads = jax.tree.map(lambda old, new: old - new, params, state.trainable)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), grads, want_grads)
    eval_sums = jax.jit(make_eval_step(token_loss(chunked)))(params, micro)
    np.testing.assert_allclose(eval_sums["loss_sum"] / eval_sums["weight_sum"], want_loss, rtol=1e-5)


def test_the_train_steps_temporaries_hold_a_chunk_of_logits_not_the_row():
    """XLA's memory analysis of the compiled step at vocab 32768 x 2048 positions: beyond what the same
    model with a 256-token vocabulary needs (attention), the head adds one chunk's logits (128
    positions) and their gradient, not the row's 256 MiB of float32 logits."""
    t, vocab = 2048, 32768
    row_logits = t * vocab * 4

    def temp_bytes(vocab, loss_chunk):
        cfg = dataclasses.replace(CFG, vocab_size=vocab, hidden_size=64, num_hidden_layers=1, loss_chunk=loss_chunk)
        model = jft.LlamaForCausalLM(cfg)
        tx, schedule = make_optimizer(learning_rate=1e-3, total_steps=10)
        state = jax.eval_shape(
            lambda p: TrainState.create(p, jax.tree.map(lambda _: True, p), tx, jax.random.key(0)), model.param_shapes()
        )
        batch = {k: jax.ShapeDtypeStruct((1, 1, t), v.dtype) for k, v in make_batch(0, 1).items()}
        step = jax.jit(make_train_step(token_loss(model), tx, schedule), donate_argnums=0)
        return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    base = temp_bytes(256, 128)
    whole_row = temp_bytes(vocab, t) - base  # one chunk of the whole row: the head as computed before
    chunked = temp_bytes(vocab, 128) - base
    assert whole_row > row_logits, (whole_row, row_logits)
    assert chunked < row_logits / 4, (chunked, row_logits)


def test_any_objective_plugs_into_the_step_with_exact_accumulation_and_its_own_metrics():
    """A loss that is not token cross entropy (a pairwise objective on any batch keys) through the
    same step: accumulated over 3 micro-batches it gives one big batch's step; its float metric
    sums are reported per unit weight, its integer sums as counts."""
    w = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4,)), jnp.float32)}
    rng = np.random.default_rng(1)
    batch = {"left": rng.normal(size=(6, 4)).astype(np.float32), "right": rng.normal(size=(6, 4)).astype(np.float32)}
    batch["keep"] = np.array([1, 1, 0, 1, 1, 1], np.float32)

    def pair_loss(trainable, frozen, b, rng):
        margin = (b["left"] - b["right"]) @ trainable["w"]
        return (
            jnp.sum(-jax.nn.log_sigmoid(margin) * b["keep"]),
            jnp.sum(b["keep"]),
            {"accuracy": jnp.sum((margin > 0) * b["keep"]), "tokens": jnp.sum(b["keep"] > 0, dtype=jnp.int32)},
        )

    tx = optax.sgd(0.5)
    step = jax.jit(make_train_step(pair_loss, tx, lambda _: 0.5))
    states = []
    for n in (1, 3):
        state, metrics = step(TrainState.create(w, {"w": True}, tx, jax.random.key(0)), accum(batch, n))
        states.append(state)
        margin = (batch["left"] - batch["right"]) @ np.asarray(w["w"])
        keep = batch["keep"] > 0
        np.testing.assert_allclose(metrics["loss"], np.mean(np.log1p(np.exp(-margin[keep]))), rtol=1e-5)
        np.testing.assert_allclose(metrics["accuracy"], np.mean(margin[keep] > 0), rtol=1e-6)
        assert metrics["tokens"] == 5 and metrics["tokens"].dtype == jnp.int32
        assert set(metrics) == {"loss", "grad_norm", "lr", "weight", "accuracy", "tokens"}
    np.testing.assert_allclose(states[0].trainable["w"], states[1].trainable["w"], rtol=1e-6)
    assert not np.allclose(states[0].trainable["w"], w["w"])


def test_the_model_and_peft_load_without_the_trainer_or_orbax():
    import subprocess
    import sys

    code = (
        "import sys, jft.models.llama, jft.peft; "
        "print(sorted(m for m in sys.modules if m.startswith(('orbax', 'jft.train', 'optax'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
