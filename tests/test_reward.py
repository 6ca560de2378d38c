"""Reward models: the score head against transformers' sequence classifiers in both directions, and
the Bradley-Terry objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.models.llama import last_token_index, last_token_scores

PAD = 0


def hf_classifier(tmp_path, model_type="llama"):
    """A random transformers ``*ForSequenceClassification`` (num_labels=1) saved to ``tmp_path``."""
    import torch
    from conftest import BASE
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    extra = {"qwen3": dict(head_dim=24), "mistral": dict(sliding_window=5, head_dim=16)}.get(model_type, {})
    config = AutoConfig.for_model(model_type, **{**BASE, **extra}, num_labels=1, pad_token_id=PAD)
    model = AutoModelForSequenceClassification.from_config(config).float().eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)  # a visible score
    model.save_pretrained(tmp_path)
    return model


def padded_batch(side: str):
    """Rows of 3, 7 and 5 real tokens (ids >= 3), padded with PAD on ``side``."""
    rng = np.random.default_rng(0)
    ids, mask = np.full((3, 8), PAD, np.int64), np.zeros((3, 8), np.int64)
    for r, n in enumerate((3, 7, 5)):
        cols = slice(0, n) if side == "right" else slice(8 - n, 8)
        ids[r, cols], mask[r, cols] = rng.integers(3, 128, n), 1
    return ids, mask


def torch_scores(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def jft_scores(model, params, ids, mask):
    hidden = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), hidden_only=True)
    return np.asarray(last_token_scores(model, params, hidden, jnp.asarray(mask)))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_a_transformers_reward_model_scores_the_same_in_jft_and_back(tmp_path, model_type):
    hf = hf_classifier(tmp_path / "hf", model_type)
    model, params = jft.load_hf(tmp_path / "hf")
    assert model.config.num_labels == 1 and "score" in params and "lm_head" not in params
    for side in ("right", "left"):
        ids, mask = padded_batch(side)
        np.testing.assert_allclose(jft_scores(model, params, ids, mask), torch_scores(hf, ids, mask), atol=1e-5)
    jft.save_hf(model, params, tmp_path / "out")  # and back: transformers reads jft's export
    from transformers import AutoModelForSequenceClassification

    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").float().eval()
    assert type(back).__name__.endswith("ForSequenceClassification")
    ids, mask = padded_batch("right")
    np.testing.assert_allclose(torch_scores(back, ids, mask), jft_scores(model, params, ids, mask), atol=1e-5)


def test_a_reward_model_starts_from_a_causal_lm_folder(hf_model_dir):
    base, base_params = jft.load_hf(hf_model_dir("llama_gqa"))
    model, params = jft.load_hf(hf_model_dir("llama_gqa"), num_labels=1)
    assert params["score"]["kernel"].shape == (model.config.hidden_size, 1) and "lm_head" not in params
    for a, b in zip(jax.tree.leaves(params["model"]), jax.tree.leaves(base_params["model"]), strict=True):
        np.testing.assert_array_equal(a, b)  # the trunk is the causal LM's


def test_the_last_real_token_with_any_padding_and_pad_equal_to_eos():
    mask = jnp.asarray([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 2]


def pair_batch(model, pairs=3, t=6, seed=0):
    """Preference rows ``[pairs, 2, t]`` with uneven right padding, margins and one padding pair."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, model.config.vocab_size, (pairs, 2, t)).astype(np.int32)
    mask = np.ones((pairs, 2, t), np.int32)
    mask[0, 1, 4:] = 0
    mask[1, 0, 3:] = 0
    ids[mask == 0] = PAD
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "margin": np.asarray([0.0, 0.5, 0.0], np.float32)[:pairs],
        "weight": np.asarray([1.0, 1.0, 0.0], np.float32)[:pairs],
    }


def test_the_bradley_terry_loss_and_its_metrics_in_closed_form():
    from jft.objectives import bradley_terry_loss

    model = jft.LlamaForCausalLM(jft.LlamaConfig.tiny(num_labels=1, pad_token_id=PAD))
    params = model.init_params(jax.random.key(0))
    params["score"]["kernel"] = params["score"]["kernel"] * 50.0  # scores of order 1
    batch = pair_batch(model)
    scores = np.stack(
        [jft_scores(model, params, batch["input_ids"][:, s], batch["attention_mask"][:, s])[:, 0] for s in (0, 1)], 1
    )
    for coef in (0.0, 0.3):
        loss_sum, weight_sum, m = bradley_terry_loss(model, center_coef=coef)(params, {}, batch, None)
        diff = scores[:2, 0] - scores[:2, 1]
        want = np.log1p(np.exp(-(diff - batch["margin"][:2]))) + coef * (scores[:2, 0] + scores[:2, 1]) ** 2
        np.testing.assert_allclose(loss_sum, want.sum(), rtol=1e-5)
        assert float(weight_sum) == 2.0  # the padding pair weighs nothing
    np.testing.assert_allclose(m["accuracy"], np.sum(diff > 0), rtol=1e-6)
    np.testing.assert_allclose(m["margin"], diff.sum(), rtol=1e-5)
    np.testing.assert_allclose(m["chosen_reward"], scores[:2, 0].sum(), rtol=1e-5)
    assert int(m["tokens"]) == batch["attention_mask"].sum()


DEMO_OVERRIDES = [
    "model.path=",
    "tokenizer.train_on_data=True",
    "data.seq_len=48",
    "data.validation_fraction=0.2",
    "train.batch_size=16",
    "train.eval_every=0",
    "model.new.hidden_size=64",
    "model.new.intermediate_size=128",
    "model.new.num_hidden_layers=2",
]


def test_a_reward_model_learns_the_demo_pairs_and_exports_a_sequence_classifier(tmp_path):
    """configs/reward_llama.py on the shipped en->fr pairs, a tiny new model trained in full:
    held-out accuracy rises from chance (measured 0.48 -> 0.80 in 45 steps); the export is a
    transformers sequence classifier that scores like jft."""
    from pathlib import Path

    from jft.config import load_config
    from jft.train import fit

    data = Path(jft.__file__).parent / "assets" / "en_fr_preferences.jsonl"
    over = DEMO_OVERRIDES + [f"data.train={data}", "peft.methods=()", "train.epochs=3", "optim.learning_rate=1e-3"]
    report = fit(load_config("configs/reward_llama.py", over), tmp_path / "run")
    before, after = report["before"], report["after"]
    assert report["task"] == "reward" and abs(before["accuracy"] - 0.5) < 0.15
    assert after["accuracy"] >= 0.7 and after["margin"] > before["margin"] + 0.5, (before, after)
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "hf").float().eval()
    model, params = jft.load_hf(tmp_path / "run" / "hf")
    ids, mask = padded_batch("right")
    ids = np.where(mask > 0, ids % model.config.vocab_size, model.config.pad_token_id)
    np.testing.assert_allclose(torch_scores(hf, ids, mask), jft_scores(model, params, ids, mask), atol=1e-5)


def test_lora_trains_the_score_head_too(tmp_path):
    """Under PEFT the score head is trainable (the objective's rule): it is saved with the adapter
    (a peft SEQ_CLS adapter: the head is a modules_to_save tensor)."""
    from pathlib import Path

    import safetensors.numpy

    from jft.config import load_config
    from jft.train import fit

    data = Path(jft.__file__).parent / "assets" / "en_fr_preferences.jsonl"
    over = DEMO_OVERRIDES + [f"data.train={data}", "train.max_steps=3", "eval.num_examples=0"]
    report = fit(load_config("configs/reward_llama.py", over), tmp_path / "run")
    tensors = safetensors.numpy.load_file(next(Path(report["adapter"]).glob("*.safetensors")))
    assert "base_model.model.score.weight" in tensors and any("lora" in k for k in tensors), sorted(tensors)[:5]
    model, _ = jft.load_hf(tmp_path / "run" / "hf")
    assert model.config.num_labels == 1
