"""GRPO through the one loop: prompt records, the rollout pieces, rewards, the loss on-policy,
mean reward rising on a verifiable toy reward, and an exact resume after preemption."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft import partition, peft
from jft.config import ConfigError, load_config
from jft.data.formats import DataError
from jft.data.prompts import tokenize_prompts
from jft.objectives.dpo import REFERENCE
from jft.objectives.grpo import GRPO, grpo_loss
from jft.objectives.rl import (
    call_reward_function,
    completion_log_probs,
    completion_mask,
    completion_rows,
    load_reward_function,
)

CFG = jft.LlamaConfig.tiny(num_hidden_layers=2, eos_token_id=(2,), pad_token_id=0)
EN_FR = Path(jft.__file__).parent / "assets" / "en_fr.jsonl"


def low_ids(prompts, completions, completion_ids, **_):
    """A verifiable toy reward: the share of a completion's tokens with an id below 300."""
    return [sum(i < 300 for i in c) / max(len(c), 1) for c in completion_ids]


def test_completion_mask_ends_at_the_first_eos_also_when_pad_is_eos():
    comps = jnp.asarray([[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2], [4, 9, 3, 2]])
    mask, ended = completion_mask(comps, (2, 3))
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert ended.tolist() == [True, False, True, True]


def test_prompt_records_in_three_forms_with_their_columns(tmp_path):
    from test_hf import tiny_tokenizer

    tok = tiny_tokenizer()
    records = [
        ("a.jsonl:1", {"prompt": "hello world", "answer": "world"}),
        ("a.jsonl:2", {"prompt": [{"role": "user", "content": "hello"}], "level": 3}),
        ("a.jsonl:3", {"instruction": "hello", "input": "world", "output": "hello"}),
        ("a.jsonl:4", {"prompt": "hello " * 40}),
    ]
    rows, prompts, stats = tokenize_prompts(records, tok, max_length=40)  # the 4th: 41 tokens
    assert (stats.kept, stats.dropped) == (3, 1) and [int(r["index"]) for r in rows] == [0, 1, 2]
    assert rows[0]["prompt_ids"].tolist() == [0] * 37 + [1, 3, 4]  # left-padded BOS + prompt
    assert rows[0]["prompt_mask"].tolist() == [0] * 37 + [1] * 3
    assert prompts[0].columns == {"answer": "world"} and not prompts[0].conversational
    assert prompts[1].conversational and prompts[1].prompt == [{"role": "user", "content": "hello"}]
    assert prompts[2].columns == {"output": "hello"}
    truncated = tokenize_prompts(records[3:], tok, max_length=8, overlong="truncate")[0]
    assert truncated[0]["prompt_ids"].tolist() == [3] * 8  # the prompt's end is kept
    with pytest.raises(DataError, match=r"b.jsonl:7: record has no 'prompt' or 'instruction' field"):
        tokenize_prompts([("b.jsonl:7", {"text": "x"})], tok, max_length=8)


def test_reward_functions_are_loaded_by_name_and_bad_ones_are_named():
    fn = load_reward_function("jft.rewards:chrf")
    assert fn([""], ["Le chat."], output=["Le chat."]) == [1.0]
    with pytest.raises(ConfigError, match="not 'module:function'"):
        load_reward_function("jft.rewards.chrf")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_reward_function("jft.rewards:nope")
    with pytest.raises(RuntimeError, match="reward function r returned 1 values for 2 completions"):
        call_reward_function("r", lambda **_: [1.0], 2, prompts=["a", "b"])
    with pytest.raises(RuntimeError, match="reward function r raised ZeroDivisionError"):
        call_reward_function("r", lambda **_: 1 / 0, 2)
    with pytest.raises(RuntimeError, match=r"returned 'x' for completion 1"):
        call_reward_function("r", lambda **_: [1.0, "x"], 2)
    assert np.isnan(call_reward_function("r", lambda **_: [1.0, None], 2)[1])


def test_rollout_log_probs_match_a_forward_and_an_on_policy_step_at_lr_0_changes_nothing():
    """LoRA, beta > 0: the reference is the base with the adapters off (no copy); on-policy the
    ratio is 1, so clipfrac and kl are 0, and a zero learning rate leaves every param as it was."""
    import optax

    from jft.generate import generate
    from jft.objectives.policy_gradient import group_advantages
    from jft.train import TrainState, make_train_step

    base = jft.LlamaForCausalLM(CFG)
    model, params = peft.inject(
        base, base.init_params(jax.random.key(0)), peft.Peft(lora=peft.Lora(r=4)), jax.random.key(1)
    )
    labels = peft.labels(params, model.peft)
    cfg = load_config("configs/grpo_llama.py", ["grpo.beta=0.04", "rl.max_completion_length=6", "rl.temperature=0.7"])
    with_ref, _ = GRPO(cfg).add_frozen(model, params, labels)
    assert REFERENCE not in with_ref  # the frozen base is the reference
    prompt_ids = jnp.asarray([[0, 0, 1, 7, 8], [1, 9, 10, 11, 12], [0, 0, 1, 7, 8], [1, 9, 10, 11, 12]])
    prompt_mask = (prompt_ids > 0).astype(jnp.int32)
    temperature = 0.7
    comps = generate(
        model, params, prompt_ids, 6, attention_mask=prompt_mask, rng=jax.random.key(3), temperature=temperature
    )
    mask, _ = completion_mask(comps, (2,))
    rows = completion_rows(prompt_ids, prompt_mask, comps, mask)
    logp = completion_log_probs(model, params, rows, temperature)[0]
    full = model.apply({"params": params}, rows["input_ids"], attention_mask=rows["attention_mask"])
    want = jnp.take_along_axis(jax.nn.log_softmax(full / temperature), rows["targets"][..., None], -1)[..., 0]
    keep = rows["loss_weights"] > 0
    np.testing.assert_allclose(jnp.where(keep, logp, 0), jnp.where(keep, want, 0), atol=2e-5)
    batch = {**rows, "advantages": group_advantages(jnp.asarray([1.0, 0.0, 0.5, 2.0]), 2)[0]}
    from jft.objectives.dpo import reference_of

    ref_model, ref_of = reference_of(model)
    batch["ref_logps"] = completion_log_probs(ref_model, ref_of(params), rows, temperature)[0]
    tx = optax.adam(0.0)
    step = jax.jit(make_train_step(grpo_loss(model, GRPO(cfg).settings), tx, lambda _: 0.0))
    state = TrainState.create(params, labels, tx, jax.random.key(2))
    new, metrics = step(state, jax.tree.map(lambda x: x[None], batch))
    assert float(metrics["clipfrac"]) == 0.0 and abs(float(metrics["kl"])) < 1e-7 and float(metrics["grad_norm"]) > 0
    for a, b in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(state.trainable), strict=True):
        np.testing.assert_array_equal(a, b)
    trainable, frozen = partition.split(params, labels)
    assert float(grpo_loss(model, GRPO(cfg).settings)(trainable, frozen, batch, None)[2]["clipfrac"]) == 0.0


OVERRIDES = [
    "model.path=", "tokenizer.train_on_data=True", f"data.train={EN_FR}", "data.template=compact",
    "data.seq_len=32", "data.validation_fraction=0.05", "rl.max_completion_length=8", "grpo.num_generations=4",
    "train.batch_size=4", "train.max_steps=10", "peft.methods=()", "model.new.hidden_size=64",
    "model.new.intermediate_size=128", "model.new.num_hidden_layers=2", "optim.learning_rate=3e-2",
    "rl.reward_funcs=('test_grpo:low_ids',)", "train.eval_every=0", "train.checkpoint_every=0",
]  # fmt: skip


def grpo_steps(workdir: Path, mesh=(1, 1, 1)) -> list:
    """Per-step (loss, mean reward, KL) of three GRPO steps (LoRA, beta > 0) on a data x fsdp x tensor mesh."""
    from jft.train import fit

    over = [*OVERRIDES, "train.max_steps=3", "peft.methods=('lora',)", "grpo.beta=0.04"]
    over += [f"mesh.{axis}={n}" for axis, n in zip(("data", "fsdp", "tensor"), mesh, strict=True)]
    fit(load_config(Path(__file__).parent.parent / "configs" / "grpo_llama.py", over), workdir)
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["reward_mean"], r["kl"]) for r in rows if "reward_mean" in r]


def test_grpo_raises_the_mean_reward_and_a_preempted_run_resumes_exactly(tmp_path, preempt_and_resume):
    """A tiny new model, full fine-tuning, the toy reward: measured 0.31 -> 0.52 mean held-out reward
    in 10 steps. A SIGTERM during step 6 checkpoints and stops; the same command resumes (the
    sampling keys come from the step) and ends where the uninterrupted run ends."""
    from jft.train import fit

    straight = fit(load_config("configs/grpo_llama.py", OVERRIDES), tmp_path / "straight")
    before, after = straight["before"], straight["after"]
    assert after["reward_mean"] > before["reward_mean"] + 0.1, (before, after)
    logged = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in logged if "reward_mean" in r]
    assert {"entropy", "clipfrac", "completion_length", "frac_reward_zero_std", "rollout_s", "update_s"} <= set(
        train_rows[0]
    )
    run = tmp_path / "run"
    first, resumed = preempt_and_resume(lambda: load_config("configs/grpo_llama.py", OVERRIDES), run, 6)
    assert first["status"] == "preempted"
    assert (resumed["resumed_from"], resumed["steps_run"]) == (6, 4)
    for k, v in after.items():
        np.testing.assert_allclose(resumed["after"][k], v, rtol=1e-5, err_msg=k)
    a, b = (jft.load_hf(d / "hf")[1] for d in (tmp_path / "straight", run))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_grpo_config_errors():
    with pytest.raises(ConfigError, match="needs rewards"):
        GRPO(load_config("configs/grpo_llama.py", ["rl.reward_funcs=()"]))
    with pytest.raises(ConfigError, match="at least 2 completions"):
        GRPO(load_config("configs/grpo_llama.py", ["grpo.num_generations=1"]))
    with pytest.raises(ConfigError, match=r"reward_weights has 2 entries for 1 rewards"):
        GRPO(load_config("configs/grpo_llama.py", ["rl.reward_weights=(1.0, 2.0)"]))
    with pytest.raises(ConfigError, match=r"grpo.loss_type='mean' is not one of"):
        GRPO(load_config("configs/grpo_llama.py", ["grpo.loss_type=mean"]))


def test_a_reward_model_folder_scores_prompt_and_completion_as_preference_rows_hold_them(tmp_path, hf_base):
    """BOS + prompt, then the completion + EOS, scored at the last token; a causal LM is refused."""
    from test_hf import tiny_tokenizer

    from jft.data.prompts import Prompt
    from jft.models.llama import last_token_scores
    from jft.objectives.rl import RewardModel

    model = jft.LlamaForCausalLM(jft.LlamaConfig.tiny(num_labels=1))
    params = model.init_params(jax.random.key(0))
    jft.save_hf(model, params, tmp_path / "rm", tokenizer=tiny_tokenizer())
    rm = RewardModel.load(str(tmp_path / "rm"), "float32", None)
    got = rm([Prompt("hello", {}, False), Prompt("hello hello", {}, False)], ["world", "world world"])
    for i, ids in enumerate(([1, 3, 4, 2], [1, 3, 3, 4, 4, 2])):
        x = jnp.asarray([ids])
        hidden = model.apply({"params": params}, x, hidden_only=True)
        want = last_token_scores(model, params, hidden, jnp.ones_like(x))[0, 0]
        np.testing.assert_allclose(got[i], want, rtol=1e-5)
    with pytest.raises(ConfigError, match="has no score labels"):
        RewardModel.load(str(hf_base[0]), "float32", None)
