"""PEFT methods: zero-init invariants, training only what they add, merge, adapters, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft import peft, tree
from jft.objectives import token_loss
from jft.peft.native import load_native, save_native
from jft.train import TrainState, make_optimizer, make_train_step

T = 12
CFG = jft.LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)

METHODS = {
    "lora": peft.Peft(lora=peft.Lora(r=4, alpha=8.0)),
    "rslora_patterns": peft.Peft(
        lora=peft.Lora(
            r=4,
            alpha=8.0,
            rslora=True,
            init="gaussian",
            targets=("q_proj", "v_proj", "lm_head"),
            rank_pattern=(("v_proj", 2),),
            alpha_pattern=(("lm_head", 3.0),),
        )
    ),
    "dora": peft.Peft(lora=peft.Lora(r=4, alpha=8.0, dora=True, targets=r".*\.(k_proj|up_proj)")),
    "ia3": peft.Peft(ia3=peft.IA3()),
    "bitfit": peft.Peft(bitfit=peft.BitFit()),
    "houlsby": peft.Peft(adapter=peft.Adapter(reduction_factor=4)),
    "pfeiffer": peft.Peft(adapter=peft.Adapter(kind="pfeiffer", reduction_factor=4, nonlinearity="gelu")),
    "compacter": peft.Peft(adapter=peft.Adapter(reduction_factor=4, phm_dim=4)),
    "prefix": peft.Peft(prefix=peft.Prefix(3)),
    "prefix_mlp": peft.Peft(prefix=peft.Prefix(3, projection_dim=8)),
    "prompt": peft.Peft(prompt=peft.Prompt(3, init="vocab")),
    "lora_bitfit": peft.Peft(lora=peft.Lora(r=2, targets=("o_proj",)), bitfit=peft.BitFit(("mlp",))),
}
VIRTUAL = ("prefix", "prefix_mlp", "prompt")  # change the output from the first step, by design


@pytest.fixture(scope="module")
def base():
    model = jft.LlamaForCausalLM(CFG)
    params = model.init_params(jax.random.key(0))
    # Weights 5x the init scale: a model whose outputs depend on its inputs, so every method's
    # few parameters can move the loss within a few steps.
    return model, jax.tree.map(lambda x: x if x.ndim < 2 or np.all(x == 1) else 5 * x, params)


def ids(seed=0, shape=(2, T)):
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def perturb(params, labels, seed=1):
    """Random values in every trainable leaf, so merge and save tests are not vacuous."""
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(jax.tree.map(lambda x: bool(np.any(x)), labels))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [x + 0.1 * jax.random.normal(k, x.shape) if f else x for x, f, k in zip(leaves, flags, keys, strict=True)]
    return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("name", [n for n in METHODS if n not in VIRTUAL])
def test_zero_initialised_methods_reproduce_the_base(base, name):
    model, params = base
    x = ids()
    model2, params2 = peft.inject(model, params, METHODS[name], jax.random.key(1))
    np.testing.assert_allclose(
        model2.apply({"params": params2}, x), model.apply({"params": params}, x), atol=2e-6, rtol=0
    )
    for path, leaf in tree.walk(params):  # the base leaves are the same arrays
        assert tree.get_path(params2, path) is leaf


def make_batch(rows=4, seed=0):
    rng = np.random.default_rng(seed)
    segment_ids = np.ones((rows, T), np.int32)
    segment_ids[:, T // 2 :] = 2
    positions = np.concatenate([np.arange(T // 2)] * 2)[None].repeat(rows, 0).astype(np.int32)
    input_ids = rng.integers(0, CFG.vocab_size, (rows, T)).astype(np.int32)
    return {
        "input_ids": input_ids[None],
        "targets": np.roll(input_ids, -1, axis=1)[None],
        "loss_weights": np.ones((1, rows, T), np.float32),
        "segment_ids": segment_ids[None],
        "positions": positions[None],
    }


@pytest.mark.parametrize("name", list(METHODS))
def test_training_changes_only_the_method_leaves_and_lowers_the_loss(base, name):
    model, params = peft.inject(*base, METHODS[name], jax.random.key(1))
    labels = peft.labels(params, model.peft)
    tx, schedule = make_optimizer(learning_rate=3e-2, total_steps=10, warmup_steps=0, clip_norm=None)
    state = TrainState.create(jax.tree.map(jnp.array, params), labels, tx, jax.random.key(2))
    frozen_before = jax.tree.map(np.array, state.frozen)
    trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(state.trainable))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    assert 2 * trainable_bytes <= opt_bytes <= 2 * trainable_bytes + 64  # Adam mu, nu (+ step counters) only
    assert trainable_bytes < 0.25 * sum(x.nbytes for x in jax.tree.leaves(params))
    step = jax.jit(make_train_step(token_loss(model), tx, schedule), donate_argnums=0)
    batch = make_batch()
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.02, losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state.frozen), frozen_before)


@pytest.mark.parametrize("name", ["lora", "rslora_patterns", "dora", "ia3", "lora_bitfit", "prefix_mlp"])
def test_merge_equals_unmerged(base, name):
    model, params = peft.inject(*base, METHODS[name], jax.random.key(1))
    params = perturb(params, peft.labels(params, model.peft))
    merged_model, merged = peft.fold(model, params)
    x = ids(3)
    np.testing.assert_allclose(
        merged_model.apply({"params": merged}, x), model.apply({"params": params}, x), atol=1e-5, rtol=0
    )
    assert jax.tree.structure(merged) == jax.tree.structure(merged_model.param_shapes())
    assert merged_model.peft.methods == (("prefix",) if name == "prefix_mlp" else ())


def test_dora_magnitude_starts_at_the_column_norms_and_its_norm_is_constant_in_backward(base):
    model, params = peft.inject(
        *base, peft.Peft(lora=peft.Lora(r=2, dora=True, targets=("q_proj",))), jax.random.key(1)
    )
    q = params["model"]["layers"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(q["lora_magnitude"], jnp.linalg.norm(q["kernel"], axis=1), rtol=1e-6)
    # With the norm a constant, d out / d magnitude = (x W_eff) / norm per column: the gradient
    # of sum(y * g) w.r.t. the magnitude is sum over tokens of g * (x (W + sAB)) / norm.
    x = jax.random.normal(jax.random.key(5), (3, CFG.hidden_size))
    spec = model.peft.linear("self_attn.q_proj")
    lin = jft.models.layers.Linear(q["kernel"].shape[-1], ("embed", "heads"), peft=spec)
    one = {k: v[0] for k, v in q.items()}
    one["lora_b"] = 0.3 * jax.random.normal(jax.random.key(6), one["lora_b"].shape)
    g = jax.random.normal(jax.random.key(7), (3, one["kernel"].shape[1]))
    grad = jax.grad(lambda m: jnp.sum(lin.apply({"params": {**one, "lora_magnitude": m}}, x) * g))(
        one["lora_magnitude"]
    )
    w = one["kernel"] + spec.scale * one["lora_a"] @ one["lora_b"]
    expect = jnp.sum(g * (x @ w), axis=0) / jnp.linalg.norm(w, axis=0)
    np.testing.assert_allclose(grad, expect, rtol=1e-4, atol=1e-6)


def test_lora_dropout_only_with_a_dropout_rng(base):
    model, params = peft.inject(*base, peft.Peft(lora=peft.Lora(r=4, dropout=0.5)), jax.random.key(1))
    params = perturb(params, peft.labels(params, model.peft))
    x = ids(4)
    plain = model.apply({"params": params}, x)
    np.testing.assert_array_equal(plain, model.apply({"params": params}, x))
    dropped = [model.apply({"params": params}, x, rngs={"dropout": jax.random.key(s)}) for s in (0, 1)]
    assert not np.allclose(dropped[0], plain, atol=1e-4) and not np.allclose(dropped[0], dropped[1], atol=1e-4)


@pytest.mark.parametrize("name", VIRTUAL)
def test_virtual_tokens_with_packing_and_the_kv_cache(base, name):
    model, params = peft.inject(*base, METHODS[name], jax.random.key(1))
    a, b = ids(5, (1, 5)), ids(6, (1, 4))
    alone = [model.apply({"params": params}, x) for x in (a, b)]
    packed = model.apply({"params": params}, jnp.concatenate([a, b], 1), segment_ids=jnp.array([[1] * 5 + [2] * 4]))
    np.testing.assert_allclose(packed[:, :5], alone[0], atol=1e-5)
    np.testing.assert_allclose(packed[:, 5:], alone[1], atol=1e-5)
    # Greedy generation (prefill + cached decode) equals re-running the whole sequence.
    prompt = ids(7, (2, 4))
    out = jft.generate(model, params, prompt, max_new_tokens=4)
    seq = prompt
    for _ in range(4):
        seq = jnp.concatenate([seq, model.apply({"params": params}, seq)[:, -1:].argmax(-1)], 1)
    np.testing.assert_array_equal(out, seq[:, 4:])


def test_prompt_init_from_text(base):
    model, params = peft.inject(*base, peft.Peft(prompt=peft.Prompt(5, "text", (3, 9))), jax.random.key(1))
    emb = params["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(params["model"]["prompt"], emb[np.array([3, 9, 3, 9, 3])])


def test_several_adapters_on_one_base(base, tmp_path):
    """Two adapters share the base arrays; switching per call gives each one's own logits."""
    model, params = base
    adapters = {}
    for i, spec in enumerate([METHODS["lora"], METHODS["houlsby"]]):
        m, p = peft.inject(model, params, spec, jax.random.key(i))
        p = perturb(p, peft.labels(p, m.peft), seed=i)
        adapters[i] = (m.peft, peft.adapter_of(p, m.peft), m.apply({"params": p}, ids(8)))
    for spec, adapter, logits in adapters.values():
        m, p = peft.attach(model, params, spec, adapter)
        np.testing.assert_allclose(m.apply({"params": p}, ids(8)), logits, atol=1e-6)
        assert p["model"]["embed_tokens"]["embedding"] is params["model"]["embed_tokens"]["embedding"]
    # jft's own format round trip (the bottleneck adapter has no peft format)
    spec, adapter, logits = adapters[1]
    m, p = peft.attach(model, params, spec, adapter)
    save_native(m, p, tmp_path)
    m2, p2 = load_native(model, params, tmp_path)
    assert m2.peft == m.peft
    np.testing.assert_allclose(m2.apply({"params": p2}, ids(8)), logits, atol=1e-6)


def test_trainable_counts_and_summary(base):
    model, params = peft.inject(*base, METHODS["lora"], jax.random.key(1))
    h, m, kv, layers = CFG.hidden_size, CFG.intermediate_size, CFG.num_key_value_heads * CFG.head_size, 2
    per_layer = 4 * ((h + h) + (h + kv) + (h + kv) + (h + h)) + 4 * ((h + m) + (h + m) + (m + h))
    summary = peft.trainable_summary(params, peft.labels(params, model.peft))
    assert summary.startswith(f"trainable parameters: {layers * per_layer:,} / ")


@pytest.mark.parametrize(
    "spec, match",
    [
        (peft.Peft(lora=peft.Lora(targets=("qq_proj",))), "no module named"),
        (peft.Peft(lora=peft.Lora(targets=r"model\.layers\.0\.self_attn\.q_proj")), "in layers \\[0\\] only"),
        (peft.Peft(lora=peft.Lora(targets="[")), "not a valid regex"),
        (peft.Peft(adapter=peft.Adapter(reduction_factor=4, phm_dim=3)), "phm_dim=3 must divide"),
    ],
)
def test_bad_specs_fail_clearly(base, spec, match):
    with pytest.raises(ValueError, match=match):
        peft.inject(*base, spec, jax.random.key(0))


def test_unresolved_specs_and_peft_style_names(base):
    """A spec given straight to the model is resolved; peft's per-layer names and full-name
    patterns select the same modules as short names."""
    short = peft.Peft(
        lora=peft.Lora(r=4, targets=("q_proj",), rank_pattern=((r"model\.layers\.\d+\.self_attn\.q_proj", 2),))
    )
    model = jft.LlamaForCausalLM(CFG, short)
    assert model.peft.linear("self_attn.q_proj").r == 2 and model.peft.linear("self_attn.k_proj") is None
    full = [f"model.layers.{i}.self_attn.q_proj" for i in range(CFG.num_hidden_layers)]
    assert jft.LlamaForCausalLM(CFG, peft.Peft(lora=peft.Lora(targets=full))).peft.lora.targets == ("self_attn.q_proj",)
    ia3 = jft.LlamaForCausalLM(CFG, peft.Peft(ia3=peft.IA3(targets=("k_proj", "v_proj")))).peft.ia3
    assert ia3.feedforward == ()


def test_spec_checks():
    with pytest.raises(ValueError, match="lora.r must be positive"):
        peft.Lora(r=0) and peft.Peft(lora=peft.Lora(r=0))
    with pytest.raises(ValueError, match="adapter.kind"):
        peft.Peft(adapter=peft.Adapter(kind="lowrank"))
    tied = jft.LlamaForCausalLM(dataclasses.replace(CFG, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="ties it"):
        peft.build(tied, peft.Peft(lora=peft.Lora(targets=("lm_head",))))


def test_attach_rejects_a_mismatched_adapter(base):
    model, params = peft.inject(*base, METHODS["lora"], jax.random.key(1))
    adapter = peft.adapter_of(params, model.peft)
    adapter["model"]["layers"]["self_attn"]["q_proj"]["lora_a"] = np.zeros((2, 5, 4), np.float32)
    with pytest.raises(ValueError, match="q_proj/lora_a' has shape \\(2, 5, 4\\)"):
        peft.attach(*base, model.peft, adapter)


MOE = dataclasses.replace(CFG, num_local_experts=4, num_experts_per_tok=2)
EXPERT_LORA = peft.Peft(lora=peft.Lora(r=2, alpha=4.0, targets=("q_proj", "w1", "w2", "w3")))


@pytest.fixture(scope="module")
def moe_base():
    model = jft.LlamaForCausalLM(MOE)
    return model, jax.tree.map(lambda x: 5 * x if x.ndim >= 2 else x, model.init_params(jax.random.key(0)))


def test_lora_on_mixtral_experts_trains_and_folds(moe_base, tmp_path):
    """LoRA on the stacked experts: per-expert A and B, zero at the start, gradients on every
    expert's factors, folded into the expert kernels with the same logits, saved in peft's format
    (jft's own, with a warning, when peft cannot hold it: dropout) and read back."""
    model, params = peft.inject(*moe_base, EXPERT_LORA, jax.random.key(1))
    experts = params["model"]["layers"]["block_sparse_moe"]["experts"]
    assert experts["w1"]["lora_a"].shape == (2, 4, 32, 2) and experts["w2"]["lora_b"].shape == (2, 4, 2, 32)
    x, apply = ids(9), jax.jit(model.apply)
    base_logits = jax.jit(moe_base[0].apply)({"params": moe_base[1]}, x)
    np.testing.assert_allclose(apply({"params": params}, x), base_logits, atol=2e-6)
    labels = peft.labels(params, model.peft)
    rng = np.random.default_rng(0)
    for path, leaf in tree.walk(peft.adapter_of(params, model.peft)):
        tree.set_path(params, path, leaf + 0.1 * rng.standard_normal(leaf.shape, np.float32))
    trainable, frozen = jft.partition.split(params, labels)
    g = rng.standard_normal((*x.shape, CFG.vocab_size), np.float32)
    grads = jax.jit(jax.grad(lambda t: jnp.sum(model.apply({"params": jft.partition.join(t, frozen)}, x) * g)))
    grads = grads(trainable)["model"]["layers"]["block_sparse_moe"]["experts"]
    for name in ("w1", "w2", "w3"):
        for leaf in ("lora_a", "lora_b"):
            per_expert = np.abs(np.asarray(grads[name][leaf])).sum(axis=(0, 2, 3))
            assert np.all(per_expert > 0), (name, leaf, per_expert)
    logits = apply({"params": params}, x)
    folded_model, folded = peft.fold(model, params)
    assert folded_model.peft.methods == ()
    assert jax.tree.structure(folded) == jax.tree.structure(folded_model.param_shapes())
    np.testing.assert_allclose(jax.jit(folded_model.apply)({"params": folded}, x), logits, atol=1e-4, rtol=1e-5)
    peft.save_adapter(model, params, tmp_path / "peft")  # peft's format: LoRA on the fused expert tensors
    loaded_model, loaded = peft.load_adapter(*moe_base, tmp_path / "peft")
    # peft's gate_up has one A: w1 and w3 come back sharing A [in, 4], B block-diagonal (same function)
    assert loaded_model.peft.linear("block_sparse_moe.experts.w1").r == 4
    np.testing.assert_allclose(jax.jit(loaded_model.apply)({"params": loaded}, x), logits, atol=1e-5)
    dropout = dataclasses.replace(model.peft, lora=dataclasses.replace(model.peft.lora, dropout=0.1))
    with pytest.warns(UserWarning, match="no dropout"):  # peft's expert LoRA has none: jft's own format
        peft.save_adapter(type(model)(model.config, dropout), params, tmp_path / "jft")
    loaded_model, loaded = peft.load_adapter(*moe_base, tmp_path / "jft")
    assert loaded_model.peft == dropout
    np.testing.assert_allclose(apply({"params": loaded}, x), logits, atol=1e-6)  # without a dropout rng


def test_expert_targets_need_experts():
    assert jft.LlamaForCausalLM(MOE, peft.Peft(lora=peft.Lora())).peft.lora.targets == (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    )  # all-linear: the linear modules, not the stacked experts (as peft's all-linear)
    with pytest.raises(ValueError, match=r"no module named \['w1'\]"):
        jft.LlamaForCausalLM(CFG, peft.Peft(lora=peft.Lora(targets=("w1",))))
    with pytest.raises(ValueError, match="dora on Mixtral experts"):
        jft.LlamaForCausalLM(MOE, peft.Peft(lora=peft.Lora(dora=True, targets=("w2",))))


def test_specs_from_the_config():
    """``peft.from_config`` (each family's ``from_config``) builds the spec the config describes."""
    from jft.config import default_config

    cfg = default_config()
    cfg.peft.methods = ("lora", "ia3", "bitfit", "adapter", "prefix", "prompt")
    cfg.peft.lora.targets = ("q_proj", "w1")
    cfg.peft.lora.rank_pattern = (("q_proj", 2),)
    cfg.peft.prompt.init, cfg.peft.prompt.init_text = "text", "hi"
    cfg.peft.train = (("lm_head/.*", "trainable"),)

    def tokenizer(text, add_special_tokens):
        return {"input_ids": [3, 4] if not add_special_tokens else [1, 3, 4]}

    rules = (("score/.*", "trainable"),)
    spec = peft.from_config(cfg.peft, tokenizer, rules)
    assert spec.lora == peft.Lora(
        r=cfg.peft.lora.r, alpha=cfg.peft.lora.alpha, targets=("q_proj", "w1"), rank_pattern=(("q_proj", 2),)
    )
    assert spec.ia3 == peft.IA3() and spec.bitfit == peft.BitFit() and spec.adapter == peft.Adapter()
    assert spec.prefix == peft.Prefix() and spec.prompt.init_token_ids == (3, 4)  # tokenized without BOS
    assert spec.train == (("score/.*", "trainable"), ("lm_head/.*", "trainable"))
    with pytest.raises(ValueError, match=r"unknown \['lorra'\]"):
        cfg.peft.methods = ("lorra",)
        peft.from_config(cfg.peft)
    cfg.peft.methods = ("lora",)
    cfg.peft.lora.target_regex = r".*\.v_proj"
    assert peft.from_config(cfg.peft, tokenizer).lora.targets == r".*\.v_proj"
