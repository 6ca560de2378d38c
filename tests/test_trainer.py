"""fit(): end to end on a tiny new model, resume after SIGKILL, SIGTERM, early stop, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jft
from jft.config import ConfigError, default_config, load_config
from jft.data import DataError
from jft.train import TrainingError, fit

WORDS = ["red", "blue", "green", "cat", "dog", "bird", "big", "small", "runs", "sleeps"]


def write_data(path: Path, n: int = 48) -> Path:
    rs = np.random.RandomState(0)
    with open(path, "w") as f:
        for _ in range(n):
            words = list(rs.choice(WORDS, 3))
            f.write(
                json.dumps(
                    {"instruction": "Reverse the words.", "input": " ".join(words), "output": " ".join(words[::-1])}
                )
                + "\n"
            )
    return path


def tiny_config(data: Path, **train):
    c = default_config()
    c.model.remat = "none"
    c.model.new.hidden_size = 32
    c.model.new.intermediate_size = 64
    c.model.new.num_hidden_layers = 2
    c.model.new.num_attention_heads = 2
    c.model.new.num_key_value_heads = 1
    c.tokenizer.train_on_data = True
    c.data.train = str(data)
    c.data.validation_fraction = 0.25
    c.data.template = "compact"
    c.data.seq_len = 64
    c.train.batch_size = 4
    c.train.epochs = 2
    c.train.eval_every = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.optim.learning_rate = 3e-3
    c.eval.num_examples = 4
    c.eval.max_new_tokens = 8
    for k, v in train.items():
        section, key = k.split("__")
        c[section][key] = v
    return c


def params_of(workdir: Path):
    return jft.load_hf(workdir / "hf")[1]


def test_fit_end_to_end_writes_everything(tmp_path):
    data = write_data(tmp_path / "train.jsonl")
    report = fit(tiny_config(data), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "loss.png", "report.json", "hf/config.json", "tokenizer"):
        assert (run / name).exists(), name
    assert list((run / "tb").iterdir()), "no TensorBoard events"
    assert report["after"]["loss"] < report["before"]["loss"]
    assert {"bleu", "chrf", "exact_match", "perplexity"} <= set(report["after"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "lr", "tokens", "tokens_per_s"} <= set(rows[0])
    assert rows[-1]["step"] == report["steps"] > 0
    assert jft.load_tokenizer(run / "hf") is not None


def test_partial_rules_keep_frozen_layers_bit_identical(tmp_path):
    data = write_data(tmp_path / "train.jsonl")
    rules = (("model/layers/1/.*", "trainable"), (".*", "frozen"))
    cfg = tiny_config(data, train__rules=rules, train__max_steps=4)
    cfg.export.hf = True
    fit(cfg, tmp_path / "a")
    trained = params_of(tmp_path / "a")
    # the same seed initialises the same model: compare with the untouched init
    model = jft.LlamaForCausalLM(jft.load_hf(tmp_path / "a" / "hf")[0].config)
    init = model.init_params(jax.random.key(0))
    up = ("model", "layers", "mlp", "up_proj", "kernel")
    get = lambda p: np.asarray(p[up[0]][up[1]][up[2]][up[3]][up[4]])
    np.testing.assert_array_equal(get(trained)[0], get(init)[0])
    assert not np.array_equal(get(trained)[1], get(init)[1])
    np.testing.assert_array_equal(
        trained["model"]["embed_tokens"]["embedding"], init["model"]["embed_tokens"]["embedding"]
    )


RUNNER = """
import sys
from jft.config import load_config
from jft.train import fit
fit(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2])
"""


def _config_file(tmp_path: Path, data: Path, steps: int, every: int) -> Path:
    file = tmp_path / "cfg.py"
    here = str(Path(__file__).parent)
    file.write_text(
        f"import sys\nsys.path.insert(0, {here!r})\nfrom test_trainer import tiny_config\n"
        "def get_config():\n"
        f"    c = tiny_config({str(data)!r}, train__max_steps={steps}, train__checkpoint_every={every})\n"
        "    c.train.eval_every = 0\n    c.eval.num_examples = 0\n    return c\n"
    )
    return file


def _start(cfg_file: Path, workdir: Path):
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(cfg_file), str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )


def _finished_checkpoints(ckpt: Path) -> list[int]:
    """Steps Orbax has committed in ``ckpt``. It writes a step into ``<step>.orbax-checkpoint-tmp-*``,
    adds commit_success.txt and a commit time in _CHECKPOINT_METADATA, then renames it ``<step>``."""
    steps = []
    for p in ckpt.iterdir() if ckpt.is_dir() else ():
        if not p.name.isdigit():
            continue
        try:
            meta = json.loads((p / "_CHECKPOINT_METADATA").read_text())
            if (p / "commit_success.txt").is_file() and meta.get("commit_timestamp_nsecs"):
                steps.append(int(p.name))
        except (OSError, ValueError):  # deleted meanwhile (train.keep_checkpoints)
            pass
    return sorted(steps)


def _wait_for_checkpoint(workdir: Path, proc, timeout=120) -> int:
    """Once the run ``proc`` has finished a checkpoint in ``workdir``: its latest finished step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = _finished_checkpoints(workdir / "ckpt")
        if steps:
            return steps[-1]
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    data = write_data(tmp_path / "train.jsonl", n=200)
    total, killed = 120, tmp_path / "killed"
    cfg_file = _config_file(tmp_path, data, steps=total, every=10)
    straight = fit(load_config(cfg_file), tmp_path / "straight")
    assert (straight["resumed_from"], straight["steps_run"]) == (0, total)
    proc = _start(cfg_file, killed)
    seen = _wait_for_checkpoint(killed, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "report.json").exists(), "the run finished before it was killed"
    logged = (killed / "metrics.jsonl").stat().st_size
    report = fit(load_config(cfg_file), killed)
    # A resume (not a fresh run, which the same seed would end alike): from a checkpoint the killed
    # process finished, running and logging only the steps after it.
    assert report["resumed_from"] >= seen > 0
    assert report["steps_run"] == total - report["resumed_from"]
    assert json.loads((killed / "report.json").read_text())["resumed_from"] == report["resumed_from"]
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_bytes()[logged:].decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(report["resumed_from"] + 2, total + 1, 2))
    a, b = params_of(tmp_path / "straight"), params_of(killed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    data = write_data(tmp_path / "train.jsonl", n=200)
    cfg_file = _config_file(tmp_path, data, steps=100_000, every=10_000)
    proc = _start(cfg_file, tmp_path / "run")
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    steps = [int(p.name) for p in (tmp_path / "run" / "ckpt").iterdir() if p.name.isdigit()]
    assert steps and max(steps) > 0


def test_early_stopping_on_validation_loss(tmp_path):
    data = write_data(tmp_path / "train.jsonl")
    cfg = tiny_config(data, train__eval_every=1, train__patience=2, train__epochs=20, optim__learning_rate=0.0)
    cfg.train.min_delta = 1.0  # nothing improves by a whole nat
    report = fit(cfg, tmp_path / "run")
    assert report["status"].startswith("early stop") and report["steps"] == 3


def test_non_finite_loss_names_the_step(tmp_path):
    data = write_data(tmp_path / "train.jsonl")
    cfg = tiny_config(data, optim__learning_rate=1e30, optim__clip_norm=0.0, optim__warmup_fraction=0.0)
    cfg.optim.schedule = "constant"
    with pytest.raises(TrainingError, match=r"loss is (nan|inf|-inf) at step \d+; resume from"):
        fit(cfg, tmp_path / "run")


def test_resume_refuses_a_changed_data_config(tmp_path):
    data = write_data(tmp_path / "train.jsonl")
    run, new = tmp_path / "run", tmp_path / "new"
    fit(tiny_config(data, train__max_steps=4), run)
    with pytest.raises(TrainingError, match=r"differs in \['data.seq_len'\]"):
        fit(tiny_config(data, train__max_steps=8, data__seq_len=32), run)
    # Checkpoints under train.checkpoint_dir (a bucket on a pod) are checked against the config saved
    # beside them, also from a new workdir (a pod host recreated after preemption); nothing is written.
    with pytest.raises(TrainingError, match=r"differs in \['data.seq_len'\]"):
        fit(tiny_config(data, train__max_steps=8, data__seq_len=32, train__checkpoint_dir=str(run)), new)
    assert not new.exists()
    # Without the config that saved them the checkpoints cannot be checked: refused, not trusted.
    os.replace(run / "config.json", tmp_path / "config.json")
    with pytest.raises(TrainingError, match=r"holds a checkpoint \(step 4\) but .*config.json.* is missing"):
        fit(tiny_config(data, train__max_steps=6, train__checkpoint_dir=str(run)), new)
    assert not new.exists()
    # A run saved before the schema gained a section resumes: missing keys count as defaults.
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["peft"]
    saved["model"]["compute_dtype"] = ""  # before "auto": the params' dtype, float32 here as "auto" is on a CPU
    (run / "config.json").write_text(json.dumps(saved))
    report = fit(tiny_config(data, train__max_steps=6), run)
    assert (report["steps"], report["resumed_from"], report["steps_run"]) == (6, 4, 2)


def test_bad_input_fails_before_writing(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        fit(tiny_config(data), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError):
        fit(tiny_config(empty), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_lists_valid_keys(tmp_path):
    file = tmp_path / "c.py"
    file.write_text("from jft.config import default_config\ndef get_config():\n    return default_config()\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'optim\.lr' \(did you mean 'optim\.learning_rate'\?\); valid keys: "
    ):
        load_config(file, ["optim.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"'train\.learning_rate' \(did you mean 'optim\.learning_rate'\?\)"):
        load_config(file, ["train.learning_rate=1e-3"])  # the right name in the wrong section
    with pytest.raises(ConfigError, match="expected int"):
        load_config(file, ["train.epochs=1.5"])
    file.write_text(
        file.read_text().replace("return default_config()", "c = default_config(); c.model.dtyp = 1; return c")
    )
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.dtyp' \(did you mean 'model\.dtype'\?\)"):
        load_config(file)  # a misspelt key in the file itself


def test_partial_config_on_a_hugging_face_folder_then_jft_eval(hf_model_dir, tmp_path, capsys):
    """configs/partial_ft_llama.py on a real (tiny) HF folder, then `jft eval` on the result."""
    import shutil

    from test_hf import tiny_tokenizer

    from jft.cli import main

    folder = tmp_path / "base"
    shutil.copytree(hf_model_dir("llama_gqa"), folder)
    model, params = jft.load_hf(folder)
    jft.save_hf(model, params, folder, tokenizer=tiny_tokenizer())
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "hello world " * (i % 5 + 1)}) + "\n" for i in range(40)))
    config = Path(__file__).parent.parent / "configs" / "partial_ft_llama.py"
    overrides = [
        f"--config.model.path={folder}",
        f"--config.data.train={data}",
        "--config.data.seq_len=32",
        "--config.train.batch_size=4",
        "--config.train.max_steps=3",
        "--config.train.eval_every=0",
        "--config.eval.num_examples=0",
        """--config.train.rules=(("model/layers/1/.*", "trainable"), (".*", "frozen"))""",
    ]
    assert main(["train", "--config", str(config), "--workdir", str(tmp_path / "run"), *overrides]) == 0
    assert "attention: chunked XLA flash attention (512-token blocks)" in capsys.readouterr().out  # the run log says
    trained = jft.load_hf(tmp_path / "run" / "hf")[1]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    base = params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_array_equal(trained[0], base[0])
    assert not np.array_equal(trained[1], base[1])
    out = tmp_path / "eval.json"
    assert (
        main(
            ["eval", "--config", str(config), "--model", str(tmp_path / "run" / "hf"), "--out", str(out), *overrides]
            + ["--baseline", str(folder), "--config.eval.bootstrap_resamples=200"]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["loss"] > 0 and report["perplexity"] == pytest.approx(np.exp(report["loss"]), rel=1e-6)
    # --baseline: the base scored on the same records, the paired comparison of the two losses
    c, base = report["comparison"], report["baseline"]
    assert base["model"] == str(folder) and base["loss"] > 0
    assert c["before"] == pytest.approx(base["loss"], rel=1e-4)
    assert c["after"] == pytest.approx(report["loss"], rel=1e-4)
    assert c["low"] <= c["difference"] <= c["high"] and 0 < c["p_value"] <= 1
    slices = json.loads(out.with_suffix(".slices.json").read_text())
    assert slices["comparison"] == c and set(slices) == {"before", "after", "comparison"}
    assert out.with_suffix(".slices.png").is_file()
    assert "paired bootstrap p =" in capsys.readouterr().out
    assert main(["train", "--config", str(config), "--workdir", str(tmp_path / "x"), "--config.optim.lr=1"]) == 2
    assert "unknown config key 'optim.lr'" in capsys.readouterr().err


def _peft_overrides(folder, data, steps=3):
    return [
        f"--config.model.path={folder}",
        f"--config.data.train={data}",
        "--config.model.compute_dtype=float32",
        "--config.data.seq_len=32",
        "--config.train.batch_size=4",
        f"--config.train.max_steps={steps}",
        "--config.train.eval_every=0",
        f"--config.train.checkpoint_every={steps}",
        "--config.eval.num_examples=0",
    ]


def test_lora_config_exports_a_peft_adapter_and_the_merged_model(hf_base, tmp_path):
    from jft.cli import main

    folder, data = hf_base
    config = Path(__file__).parent.parent / "configs" / "lora_llama.py"
    run = tmp_path / "run"
    overrides = [*_peft_overrides(folder, data), "--config.peft.lora.r=2"]
    assert main(["train", "--config", str(config), "--workdir", str(run), *overrides]) == 0
    conf = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 2
    # Checkpoints hold the adapter and its optimizer state, not the frozen base.
    ckpt_bytes = sum(f.stat().st_size for f in (run / "ckpt").rglob("*") if f.is_file())
    assert ckpt_bytes < (folder / "model.safetensors").stat().st_size  # the frozen base alone would be more
    # The merged export and base + adapter give the same logits; training moved them.
    base_model, base_params = jft.load_hf(folder)
    model, params = jft.peft.load_adapter(base_model, base_params, run / "adapter")
    merged_model, merged = jft.load_hf(run / "hf")
    ids = np.arange(10)[None] % base_model.config.vocab_size
    with_adapter = model.apply({"params": params}, ids)
    np.testing.assert_allclose(merged_model.apply({"params": merged}, ids), with_adapter, atol=1e-4)
    assert not np.allclose(base_model.apply({"params": base_params}, ids), with_adapter, atol=1e-4)
    # Resuming with a longer budget continues from the adapter checkpoint.
    more = [*_peft_overrides(folder, data, steps=5), "--config.peft.lora.r=2"]
    assert main(["train", "--config", str(config), "--workdir", str(run), *more]) == 0
    report = json.loads((run / "report.json").read_text())
    assert (report["steps"], report["resumed_from"], report["steps_run"]) == (5, 3, 2)
    out = tmp_path / "eval.json"
    args = ["eval", "--config", str(config), "--model", str(folder), "--adapter", str(run / "adapter")]
    assert main([*args, "--out", str(out), *overrides]) == 0
    assert json.loads(out.read_text())["adapter"] == str(run / "adapter")


@pytest.mark.parametrize("name", ["compacter_llama", "prompt_llama"])
def test_adapter_configs_train_and_save_their_adapter(hf_base, tmp_path, name):
    folder, data = hf_base
    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{name}.py", _peft_overrides(folder, data))
    cfg.peft.adapter.reduction_factor = 4  # hidden 64 -> bottleneck 16, divisible by phm_dim 4
    report = fit(cfg, tmp_path / "run")
    assert report["after"]["loss"] < report["before"]["loss"]
    model, params = jft.peft.load_adapter(*jft.load_hf(folder), tmp_path / "run" / "adapter")
    assert model.peft.methods == (("adapter",) if name == "compacter_llama" else ("prompt",))
    assert "hf" not in report  # neither folds into the weights: the adapter is the export


def test_peft_config_errors(hf_base, tmp_path):
    folder, data = hf_base
    config = Path(__file__).parent.parent / "configs" / "lora_llama.py"
    with pytest.raises(ConfigError, match="peft.methods: unknown \\['loha'\\]"):
        fit(load_config(config, [*_peft_overrides(folder, data), "--config.peft.methods=('loha',)"]), tmp_path / "a")
    with pytest.raises(ConfigError, match="train.rules and peft.methods"):
        rules = """--config.train.rules=(("lm_head/.*", "trainable"), (".*", "frozen"))"""
        fit(load_config(config, [*_peft_overrides(folder, data), rules]), tmp_path / "b")
    with pytest.raises(ValueError, match="no module named \\['c_attn'\\]"):
        fit(
            load_config(config, [*_peft_overrides(folder, data), "--config.peft.lora.targets=('c_attn',)"]),
            tmp_path / "c",
        )
    assert not (tmp_path / "c").exists()


def test_qlora_config_on_a_hugging_face_folder(hf_base, tmp_path):
    folder, data = hf_base
    config = Path(__file__).parent.parent / "configs" / "qlora_llama.py"
    overrides = [*_peft_overrides(folder, data), "--config.model.dtype=float32", "--config.export.dtype=float32"]
    report = fit(load_config(config, overrides), tmp_path / "run")
    assert report["after"]["loss"] < report["before"]["loss"]
    # base (4-bit, as trained) + adapter == the exported merged model (dequantized)
    base_model, base_params = jft.load_hf(folder, quantize="nf4")
    model, params = jft.peft.load_adapter(base_model, base_params, tmp_path / "run" / "adapter")
    merged_model, merged = jft.load_hf(tmp_path / "run" / "hf")
    ids = np.arange(10)[None] % base_model.config.vocab_size
    np.testing.assert_allclose(
        merged_model.apply({"params": merged}, ids), model.apply({"params": params}, ids), atol=1e-4
    )
    with pytest.raises(ConfigError, match="model.quantize .* needs a model.path"):
        fit(load_config(config, ["--config.data.train=" + str(data)]), tmp_path / "bad")
