"""Reward models under LoRA / IA3 <-> peft SEQ_CLS adapters (the score head as modules_to_save):
the same scores both ways, peft's key and config conventions, clear errors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
from safetensors import safe_open
from test_peft_hf import edited, perturbed
from test_reward import PAD, hf_classifier, padded_batch, torch_scores

import jft
from jft import peft as jpeft
from jft.models.llama import last_token_scores
from jft.peft.hf_format import has_peft_format

SCORE = (("score/.*", "trainable"),)  # the reward objective's rule: the head trains with the adapter
SCORE_KEY = "base_model.model.score.weight"  # what peft's save_pretrained writes for modules_to_save
CASES = {
    "lora": (
        jpeft.Peft(lora=jpeft.Lora(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")), train=SCORE),
        lambda: hf_peft.LoraConfig(
            task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
    ),
    "ia3": (
        jpeft.Peft(ia3=jpeft.IA3(), train=SCORE),
        lambda: hf_peft.IA3Config(
            task_type="SEQ_CLS", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    ),
}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A transformers LlamaForSequenceClassification folder (num_labels=1) and jft's model of it."""
    folder = tmp_path_factory.mktemp("seq_cls") / "hf"
    hf_classifier(folder)
    model, params = jft.load_hf(folder, dtype="float32", remat="none")
    return folder, model, params


def hf_seq_cls(folder, **kw):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32, **kw).eval()


# Rows of 3, 7 and 5 real tokens, right-padded, then the same lengths left-padded: [6, 8].
IDS, MASK = (np.concatenate(x) for x in zip(padded_batch("right"), padded_batch("left"), strict=True))


@functools.partial(jax.jit, static_argnums=0)
def _scores(model, params, ids, mask):
    hidden = model.apply({"params": params}, ids, attention_mask=mask, hidden_only=True)
    return last_token_scores(model, params, hidden, mask)


def jft_scores(model, params):
    """``[6, 1]`` scores of IDS at each row's last real token (jitted: eager is slow on CPU)."""
    return np.asarray(_scores(model, params, jnp.asarray(IDS), jnp.asarray(MASK)))


def assert_same_scores(model, params, hf_model, label):
    ours, theirs = jft_scores(model, params), torch_scores(hf_model, IDS, MASK)
    print(f"{label}: max |score diff| = {np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def export(model, params, spec, out):
    """inject + perturb (LoRA B, IA3 vectors and the score head all move), then save_adapter."""
    pmodel, pparams = jpeft.inject(model, params, spec, jax.random.key(0))
    pparams = perturbed(pparams, pmodel.peft)
    moved = np.abs(jft_scores(pmodel, pparams) - jft_scores(model, params)).max()
    assert moved > 1e-2, "the perturbed adapter should change the scores"
    return pmodel, pparams, jpeft.save_adapter(pmodel, pparams, out)


@pytest.mark.parametrize("case", list(CASES))
def test_jft_to_peft(classifier, case, tmp_path):
    folder, model, params = classifier
    pmodel, pparams, out = export(model, params, CASES[case][0], tmp_path / "adapter")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_CLS" and conf["modules_to_save"] == ["classifier", "score"]  # as peft writes
    with safe_open(out / "adapter_model.safetensors", "numpy") as f:
        np.testing.assert_array_equal(f.get_tensor(SCORE_KEY), np.asarray(pparams["score"]["kernel"]).T)
    assert_same_scores(pmodel, pparams, hf_peft.PeftModel.from_pretrained(hf_seq_cls(folder), out).eval(), case)

    # And back: jft reads its own folder to the same spec and scores.
    lmodel, lparams = jpeft.load_adapter(model, params, out)
    assert lmodel.peft == pmodel.peft
    np.testing.assert_allclose(jft_scores(lmodel, lparams), jft_scores(pmodel, pparams), atol=1e-6, rtol=0)


def test_a_reward_model_started_from_a_causal_lm_folder(hf_base, tmp_path):
    """reward_llama's case: a new score head on a causal LM; peft puts the adapter's head on
    transformers' classifier of the same folder (whose own head is random)."""
    folder, _ = hf_base
    model, params = jft.load_hf(folder, num_labels=1, dtype="float32", remat="none")
    pmodel, pparams, out = export(model, params, CASES["lora"][0], tmp_path / "adapter")
    hf = hf_seq_cls(folder, num_labels=1, pad_token_id=PAD)
    assert_same_scores(pmodel, pparams, hf_peft.PeftModel.from_pretrained(hf, out).eval(), "causal-lm base")


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_jft(classifier, case, tmp_path):
    folder, model, params = classifier
    torch.manual_seed(0)
    pm = hf_peft.get_peft_model(hf_seq_cls(folder), CASES[case][1]())
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:  # lora_A/B or ia3_l, and score.modules_to_save.default.weight
                p.mul_(1 + 0.3 * torch.randn_like(p)) if "ia3" in name else p.add_(0.1 * torch.randn_like(p))
    pm.eval().save_pretrained(tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "numpy") as f:
        assert SCORE_KEY in f.keys()
    lmodel, lparams = jpeft.load_adapter(model, params, tmp_path / "adapter")
    assert lmodel.peft.train == SCORE and lmodel.peft.methods == (case,)
    assert np.abs(np.asarray(lparams["score"]["kernel"]) - np.asarray(params["score"]["kernel"])).max() > 1e-2
    assert_same_scores(lmodel, lparams, pm, case)


def test_only_the_score_head_goes_to_modules_to_save(classifier):
    """Other extra trainable (or frozen) leaves, or prompt learning on a classifier, keep jft's own format."""
    _, model, _ = classifier
    lora = jpeft.Lora(r=2, targets=("q_proj",))
    assert has_peft_format(jpeft.build(model, jpeft.Peft(lora=lora, train=SCORE)))
    assert has_peft_format(jpeft.build(model, jpeft.Peft(lora=lora)))  # the base's head, written as it is
    for spec in [
        jpeft.Peft(lora=lora, train=SCORE + (("model/norm/.*", "trainable"),)),
        jpeft.Peft(lora=lora, train=((".*/lora_b", "frozen"),) + SCORE),
        jpeft.Peft(prompt=jpeft.Prompt(2)),
    ]:
        assert not has_peft_format(jpeft.build(model, spec)), spec


# ---------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def seq_cls_dir(classifier, tmp_path_factory):
    _, model, params = classifier
    pmodel, pparams = jpeft.inject(model, params, CASES["lora"][0], jax.random.key(0))
    return jpeft.save_adapter(pmodel, pparams, tmp_path_factory.mktemp("seq_cls_lora") / "adapter")


@pytest.mark.parametrize(
    "config, tensors, match",
    [
        (
            lambda c: c.update(modules_to_save=["score", "pooler"]),
            None,
            r"modules_to_save \['pooler'\] is not supported",
        ),
        (lambda c: c.update(modules_to_save=["lm_head"]), None, r"modules_to_save \['lm_head'\] is not supported"),
        (None, lambda t: t.pop(SCORE_KEY), r"score\.weight' is missing.*modules_to_save lists 'score'"),
        (
            None,
            lambda t: t.update({SCORE_KEY: np.zeros((2, 64), np.float32)}),
            r"score\.weight' has shape \(2, 64\); the base model expects \(1, 64\)",
        ),
        (lambda c: c.update(peft_type="PROMPT_TUNING"), None, "SEQ_CLS LORA and IA3"),
    ],
    ids=["unknown_module", "lm_head", "missing_head", "head_shape", "prompt_tuning"],
)
def test_mismatches(classifier, seq_cls_dir, tmp_path, config, tensors, match):
    _, model, params = classifier
    bad = edited(seq_cls_dir, tmp_path, config=config, tensors=tensors)
    with pytest.raises(jft.CheckpointError, match=match):
        jpeft.load_adapter(model, params, bad)


def test_a_seq_cls_adapter_needs_a_classifier_base(hf_base, seq_cls_dir):
    model, params = jft.load_hf(hf_base[0], dtype="float32", remat="none")
    with pytest.raises(jft.CheckpointError, match=r"SEQ_CLS' needs a sequence-classification base.*num_labels"):
        jpeft.load_adapter(model, params, seq_cls_dir)
