"""Logit distillation (task = "distill") through the one loop: the loss's endpoints, the teacher
frozen beside the student, the student's divergence from the teacher falling, GKD's on-policy steps."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import jft
from jft.config import ConfigError, load_config
from jft.objectives.base import TEACHER
from jft.objectives.distill import Distill, distill_loss
from jft.objectives.sft import token_loss

DATA = Path(jft.__file__).parent / "assets" / "en_fr.jsonl"
SMALL = ["model.new.hidden_size=32", "model.new.intermediate_size=64", "model.new.num_hidden_layers=1"]
COMMON = [
    "model.path=", f"data.train={DATA}", "data.template=compact", "data.seq_len=32", "data.validation_fraction=0.1",
    "train.batch_size=8", "train.eval_every=0", "train.checkpoint_every=0", "peft.methods=()", "eval.num_examples=0",
    "export.hf=False", "optim.learning_rate=1e-2", "optim.warmup_fraction=0.0",
]  # fmt: skip


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A teacher trained for 40 steps on the translation pairs (its own word-level tokenizer)."""
    from jft.train import fit

    workdir = tmp_path_factory.mktemp("teacher")
    over = [*COMMON, "export.hf=True", "tokenizer.train_on_data=True", "train.max_steps=40"]
    over += ["model.new.hidden_size=64", "model.new.intermediate_size=128", "model.new.num_hidden_layers=2"]
    fit(load_config("configs/quickstart.py", over), workdir)
    return workdir / "hf"


def test_alpha_0_is_the_data_cross_entropy_and_a_student_equal_to_its_teacher_diverges_by_0():
    cfg = jft.LlamaConfig.tiny(num_hidden_layers=1)
    model = jft.LlamaForCausalLM(cfg)
    params = model.init_params(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(0, cfg.vocab_size, (2, 9)),
        "targets": rng.integers(0, cfg.vocab_size, (2, 9)),
        "loss_weights": (rng.random((2, 9)) > 0.3).astype(np.float32),
        "segment_ids": np.ones((2, 9), np.int32),
        "positions": np.tile(np.arange(9), (2, 1)),
    }
    frozen = {TEACHER: params}
    settings = load_config("configs/quickstart.py", ["distill.teacher=x", "distill.alpha=0.0"]).distill
    loss, weight, metrics = distill_loss(model, model, settings)(params, frozen, batch, None)
    ce, ce_weight, _ = token_loss(model)(params, {}, batch, None)
    np.testing.assert_allclose([loss, weight], [ce, ce_weight], rtol=1e-6)
    assert abs(float(metrics["divergence"])) < 1e-6  # the teacher is the student
    other = model.init_params(jax.random.key(1))
    settings.alpha = 1.0
    loss, _, metrics = distill_loss(model, model, settings)(params, {TEACHER: other}, batch, None)
    assert float(loss) == pytest.approx(float(metrics["divergence"])) and float(loss) > 0.01


def test_distillation_moves_the_student_towards_the_teacher_and_the_teacher_stays_frozen(tmp_path, teacher):
    """A smaller new student with the teacher's tokenizer, divergence only (alpha = 1), 30 steps:
    the held-out JSD to the teacher falls (measured 0.38 -> 0.14), the data's perplexity with it; the
    export is the student alone. With lmbda = 0.5 some steps train on the student's own samples."""
    from jft.train import fit

    over = [*COMMON, *SMALL, f"tokenizer.path={teacher}", f"distill.teacher={teacher}", "distill.alpha=1.0"]
    report = fit(load_config("configs/quickstart.py", ["task=distill", *over, "train.max_steps=30"]), tmp_path / "a")
    before, after = report["before"], report["after"]
    assert after["divergence"] < 0.5 * before["divergence"], (before, after)
    assert after["perplexity"] < before["perplexity"]
    over += ["distill.lmbda=0.5", "distill.max_new_tokens=8", "distill.sample_temperature=1.0"]
    fit(
        load_config("configs/quickstart.py", ["task=distill", *over, "train.max_steps=4", "train.log_every=1"]),
        tmp_path / "b",
    )
    logged = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert {r["on_policy"] for r in logged if "on_policy" in r} == {0, 1}


def test_distill_config_errors(tmp_path, teacher):
    with pytest.raises(ConfigError, match="needs distill.teacher"):
        Distill(load_config("configs/quickstart.py", ["task=distill"]))
    with pytest.raises(ConfigError, match="beta < 1"):
        Distill(
            load_config("configs/quickstart.py", ["distill.teacher=x", "distill.beta=1.0", "distill.teacher_top_k=5"])
        )
    other = jft.LlamaForCausalLM(jft.LlamaConfig.tiny(num_hidden_layers=1, vocab_size=50))
    params = other.init_params(jax.random.key(0))
    objective = Distill(load_config("configs/quickstart.py", [f"distill.teacher={teacher}"]))
    with pytest.raises(ConfigError, match="another vocabulary.*jft distill"):
        objective.add_frozen(other, params, jax.tree.map(lambda _: True, params))
