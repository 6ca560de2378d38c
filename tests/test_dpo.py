"""Preference optimization through the one loop: the reference policy, the losses on a model, and
DPO raising the held-out margin on the shipped pairs."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft import partition, peft
from jft.objectives import DPO, dpo_loss, response_log_probs
from jft.objectives.dpo import REFERENCE
from jft.objectives.preference_losses import KINDS, REFERENCE_FREE

CFG = jft.LlamaConfig.tiny(num_hidden_layers=2, pad_token_id=0)


def settings(loss="sigmoid", beta=0.1):
    return types.SimpleNamespace(
        loss=loss, beta=beta, label_smoothing=0.0, gamma=0.5, orpo_lambda=0.1, precompute_reference=False
    )


def pair_rows(pairs=3, t=10, seed=0):
    """Preference rows: a 4-token prompt (weight 0), responses of uneven length, one padding pair."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CFG.vocab_size, (pairs, 2, t)).astype(np.int32)
    mask = np.zeros((pairs, 2, t), np.int32)
    for p in range(pairs - 1):
        for side, n in enumerate((8, 6) if p % 2 else (7, 10)):
            mask[p, side, :n] = 1
    ids = ids * mask
    targets = np.concatenate([ids[..., 1:], np.zeros_like(ids[..., :1])], -1)
    weights = (np.concatenate([mask[..., 1:], np.zeros_like(mask[..., :1])], -1) > 0).astype(np.float32)
    weights[..., :3] = 0.0  # targets inside the prompt
    weight = np.ones(pairs, np.float32)
    weight[-1] = 0.0
    return {"input_ids": ids, "attention_mask": mask, "targets": targets, "loss_weights": weights,
            "margin": np.zeros(pairs, np.float32), "weight": weight}  # fmt: skip


def full_ft_state():
    model = jft.LlamaForCausalLM(CFG)
    params = model.init_params(jax.random.key(0))
    labels = jax.tree.map(lambda _: True, params)
    cfg = types.SimpleNamespace(dpo=settings())
    params, labels = DPO(cfg).add_frozen(model, params, labels)
    return model, params, labels


def test_policy_equal_to_reference_gives_log_2_and_a_gradient():
    model, params, labels = full_ft_state()
    assert REFERENCE in params and not any(jax.tree.leaves(labels[REFERENCE]))  # a frozen copy
    trainable, frozen = partition.split(params, labels)
    loss_fn = dpo_loss(model, settings())
    (loss_sum, (weight_sum, m)), grads = jax.value_and_grad(
        lambda tr: (lambda ls, ws, mm: (ls, (ws, mm)))(*loss_fn(tr, frozen, pair_rows(), jax.random.key(1))),
        has_aux=True,
    )(trainable)
    np.testing.assert_allclose(loss_sum / weight_sum, np.log(2.0), rtol=1e-6)
    assert float(weight_sum) == 2.0 and float(m["rewards/margins"]) == 0.0
    assert float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))) > 0


def test_response_log_probs_are_the_sum_over_response_tokens():
    model = jft.LlamaForCausalLM(CFG)
    params = model.init_params(jax.random.key(0))
    batch = pair_rows()
    logp, count, _ = response_log_probs(model, params, batch)
    for p, side in ((0, 0), (1, 1)):
        ids, mask = batch["input_ids"][p, side][None], batch["attention_mask"][p, side][None]
        logits = model.apply({"params": params}, ids, attention_mask=mask)
        per_token = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][p, side][None, :, None], -1)
        want = float(jnp.sum(per_token[0, :, 0] * batch["loss_weights"][p, side]))
        np.testing.assert_allclose(logp[p, side], want, rtol=1e-5)
        assert int(count[p, side]) == int(batch["loss_weights"][p, side].sum())


def test_under_lora_the_reference_is_the_base_with_the_adapters_off_and_no_copy():
    base = jft.LlamaForCausalLM(CFG)
    base_params = base.init_params(jax.random.key(0))
    model, params = peft.inject(base, base_params, peft.Peft(lora=peft.Lora(r=4)), jax.random.key(1))
    params["model"]["layers"]["self_attn"]["q_proj"]["lora_b"] += 0.5  # the policy differs from the base
    labels = peft.labels(params, model.peft)
    same, same_labels = DPO(types.SimpleNamespace(dpo=settings())).add_frozen(model, params, labels)
    assert same is params and same_labels is labels  # nothing added: no second copy of the base
    trainable, frozen = partition.split(params, labels)
    loss_sum, weight_sum, m = dpo_loss(model, settings())(trainable, frozen, pair_rows(), None)
    policy = response_log_probs(model, params, pair_rows())[0]
    reference = response_log_probs(base, base_params, pair_rows())[0]
    want = 0.1 * ((policy[:, 0] - reference[:, 0]) * pair_rows()["weight"]).sum()
    np.testing.assert_allclose(m["rewards/chosen"], want, rtol=1e-5)
    assert abs(float(want)) > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_every_loss_runs_on_the_model(kind):
    model, params, labels = full_ft_state()
    if kind in REFERENCE_FREE:
        params, labels = DPO(types.SimpleNamespace(dpo=settings(kind))).add_frozen(
            model, model.init_params(jax.random.key(0)), jax.tree.map(lambda _: True, model.param_shapes())
        )
        assert REFERENCE not in params  # reference-free: no reference at all
    trainable, frozen = partition.split(params, labels)
    loss_sum, weight_sum, m = dpo_loss(model, settings(kind))(trainable, frozen, pair_rows(), None)
    assert np.isfinite(float(loss_sum)) and float(weight_sum) == 2.0
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "tokens"} <= set(m)


def test_dpo_raises_the_held_out_margin_on_the_demo_pairs(tmp_path):
    """configs/dpo_llama.py on the shipped pairs, a tiny new model trained in full (the reference a
    frozen copy): measured 0 -> 0.17 margin, 0 -> 0.82 accuracy on held-out pairs in 30 steps."""
    from pathlib import Path

    from jft.config import load_config
    from jft.train import fit

    data = Path(jft.__file__).parent / "assets" / "en_fr_preferences.jsonl"
    over = [
        "model.path=", "tokenizer.train_on_data=True", f"data.train={data}", "data.seq_len=48",
        "data.validation_fraction=0.2", "train.batch_size=16", "train.max_steps=30", "optim.learning_rate=1e-3",
        "train.eval_every=0", "model.new.hidden_size=64", "model.new.intermediate_size=128",
        "model.new.num_hidden_layers=2", "peft.methods=()",
    ]  # fmt: skip
    report = fit(load_config("configs/dpo_llama.py", over), tmp_path / "run")
    before, after = report["before"], report["after"]
    assert abs(before["loss"] - np.log(2.0)) < 1e-5 and before["rewards/margins"] == 0.0
    assert after["rewards/margins"] > 0.05 and after["rewards/accuracies"] > 0.65, after
    _, exported = jft.load_hf(tmp_path / "run" / "hf")  # the policy alone: no reference tensors
    assert REFERENCE not in exported


def test_dpo_steps_accumulate_exactly():
    """Two micro-batches of pairs give the step one batch of them gives (LoRA, live reference)."""
    import optax

    from jft.train import TrainState, make_train_step

    base = jft.LlamaForCausalLM(CFG)
    model, params = peft.inject(
        base, base.init_params(jax.random.key(0)), peft.Peft(lora=peft.Lora(r=4)), jax.random.key(1)
    )
    labels = peft.labels(params, model.peft)
    tx = optax.sgd(0.1)
    step = jax.jit(make_train_step(dpo_loss(model, settings()), tx, lambda _: 0.1))
    rows = pair_rows(pairs=4)
    rows["weight"][:] = [1.0, 1.0, 1.0, 0.0]
    out = []
    for n in (1, 2):
        batch = {k: v.reshape(n, -1, *v.shape[1:]) for k, v in rows.items()}
        state, metrics = step(TrainState.create(params, labels, tx, jax.random.key(2)), batch)
        out.append((state.trainable, metrics))
    np.testing.assert_allclose(out[0][1]["loss"], out[1][1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(out[0][1]["rewards/margins"], out[1][1]["rewards/margins"], atol=1e-7)
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_precomputed_reference_equals_the_live_one_and_is_read_back(tmp_path, monkeypatch):
    import jft.objectives.dpo as dpo_module

    model = jft.LlamaForCausalLM(CFG)
    params = model.init_params(jax.random.key(0))
    rows = [{k: v[i] for k, v in pair_rows(pairs=3).items()} for i in range(3)]
    cfg = types.SimpleNamespace(dpo=types.SimpleNamespace(**{**vars(settings()), "precompute_reference": True}))
    cfg.train = types.SimpleNamespace(batch_size=2)
    objective = DPO(cfg)
    data = {"train": rows[:2], "validation": rows[2:]}
    prepared = objective.prepare_rows(model, params, data, tmp_path)
    assert (tmp_path / "reference_logps.npz").is_file()
    labels = jax.tree.map(lambda _: True, params)
    assert objective.add_frozen(model, params, labels)[0] is params  # no reference kept
    live_params, live_labels = DPO(types.SimpleNamespace(dpo=settings())).add_frozen(model, params, labels)
    batch = {k: np.stack([r[k] for r in prepared["train"]]) for k in prepared["train"][0]}
    trained = jax.tree.map(lambda x: x * 1.01, params)  # a policy that moved: rewards are not 0
    with_ref = dpo_loss(model, settings())(trained, {}, batch, None)
    live = dpo_loss(model, settings())(
        {**trained, "reference": live_params["reference"]},
        {},
        {k: v for k, v in batch.items() if k != "ref_logps"},
        None,
    )
    np.testing.assert_allclose(with_ref[0], live[0], rtol=1e-5)
    np.testing.assert_allclose(with_ref[2]["rewards/chosen"], live[2]["rewards/chosen"], rtol=1e-4)
    assert abs(float(live[2]["rewards/chosen"])) > 1e-5
    monkeypatch.setattr(dpo_module, "reference_log_probs", lambda *a: pytest.fail("recomputed on resume"))
    again = objective.prepare_rows(model, params, data, tmp_path)  # a resume reads the file
    np.testing.assert_array_equal(again["validation"][0]["ref_logps"], prepared["validation"][0]["ref_logps"])


def test_dpo_on_a_4_bit_base_uses_the_quantized_base_as_reference(hf_model_dir):
    """QLoRA: the reference is the NF4 base with the adapters off; at the start policy == reference."""
    base, base_params = jft.load_hf(hf_model_dir("llama_gqa"), quantize="nf4")
    model, params = peft.inject(base, base_params, peft.Peft(lora=peft.Lora(r=4)), jax.random.key(1))
    labels = peft.labels(params, model.peft)
    trainable, frozen = partition.split(params, labels)
    rows = pair_rows()
    rows["input_ids"] = rows["input_ids"] % base.config.vocab_size
    rows["targets"] = rows["targets"] % base.config.vocab_size
    loss_sum, weight_sum, m = dpo_loss(model, settings())(trainable, frozen, rows, None)
    np.testing.assert_allclose(loss_sum / weight_sum, np.log(2.0), rtol=1e-6)
    grads = jax.grad(lambda tr: dpo_loss(model, settings())(tr, frozen, rows, jax.random.key(0))[0])(trainable)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_a_preempted_dpo_run_resumes_exactly_and_jft_eval_scores_it_against_its_reference(
    hf_base, tmp_path, preempt_and_resume
):
    """LoRA DPO on a Hugging Face folder: a SIGTERM during step 4 checkpoints and stops, the same
    command resumes and ends where an uninterrupted run ends; ``jft eval`` then reproduces the
    final validation metrics from the exported model against ``--reference`` (the base folder), and
    from the base + adapter without one."""
    import json
    from pathlib import Path

    from jft.cli import main
    from jft.config import ConfigError, load_config
    from jft.train import evaluate, fit

    folder, _ = hf_base
    data = Path(jft.__file__).parent / "assets" / "en_fr_preferences.jsonl"
    over = [
        f"model.path={folder}", f"data.train={data}", "data.seq_len=40", "data.overlong=truncate",
        "data.validation_fraction=0.05", "model.compute_dtype=float32", "train.batch_size=4", "train.max_steps=6",
        "train.checkpoint_every=0", "train.log_every=1", "train.eval_every=0", "peft.lora.r=2",
        "optim.learning_rate=1e-2",
    ]  # fmt: skip
    config = lambda: load_config("configs/dpo_llama.py", over)
    straight = fit(config(), tmp_path / "straight")

    run = tmp_path / "run"
    first, resumed = preempt_and_resume(config, run, 4)
    assert first == {"status": "preempted", "step": 4, "resumed_from": 0, "steps_run": 4}
    assert (resumed["resumed_from"], resumed["steps_run"]) == (4, 2)
    after = resumed["after"]
    assert after["rewards/margins"] != 0.0  # the policy moved away from its reference
    for k, v in straight["after"].items():
        np.testing.assert_allclose(after[k], v, rtol=1e-5, atol=1e-6, err_msg=k)

    out = tmp_path / "eval.json"
    args = ["eval", "--config", "configs/dpo_llama.py", *(f"--config.{o}" for o in over), "--out", str(out)]
    assert main([*args, "--model", str(run / "hf"), "--reference", str(folder)]) == 0
    merged = json.loads(out.read_text())
    assert merged["reference"] == str(folder)
    with_adapter = evaluate(config(), folder, tmp_path / "eval2.json", adapter=run / "adapter")
    for got in (merged, with_adapter):
        for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
            np.testing.assert_allclose(got[k], after[k], rtol=1e-4, atol=1e-5, err_msg=k)
    with pytest.raises(ConfigError, match="pass --reference FOLDER"):
        evaluate(config(), run / "hf", out)
    with pytest.raises(ConfigError, match="reference-free; drop --reference"):
        evaluate(load_config("configs/dpo_llama.py", [*over, "dpo.loss=simpo"]), run / "hf", out, reference=folder)
