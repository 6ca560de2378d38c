"""The colab notebooks beside the quickstart (LoRA / QLoRA, merging, DPO / GRPO, distillation) run top to
bottom through nbclient on their tiny settings (TINY = True: a random 2-layer model built in the notebook,
3 steps a run), and what they print is what their runs wrote."""

import ast
import json
import os
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent
STEPS = 3
PHRASES = ["The cat is sleeping.", "We see the small dog."]  # lora_qlora translates these


@pytest.fixture(scope="module", autouse=True)
def kernel_env(tmp_path_factory):
    """Every kernel shares one JAX compilation cache (the notebooks' tiny LoRA runs are the same program)
    and compiles without XLA's backend optimisations: with 3 steps of a tiny model, compiling is the cost."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        mp.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip())
        yield


def run(name: str, tmp_path: Path, **params) -> tuple[list, Path]:
    """Execute colab/``name``.ipynb with ``params`` appended to its parameters cell; its code cells, the workdir."""
    nb = nbformat.read(ROOT / "colab" / f"{name}.ipynb", as_version=4)
    workdir = tmp_path / "run"
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    given = {"MAX_STEPS": STEPS, "WORKDIR": str(workdir), "TINY": True, **params}
    cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in given.items())
    try:
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        nbformat.write(nb, tmp_path / f"{name}.out.ipynb")  # what ran, outputs included, to read when a check fails
    return [c for c in nb.cells if c.cell_type == "code"], workdir


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


def cell_with(cells, text: str):
    """The one code cell whose source contains ``text``."""
    (found,) = [c for c in cells if text in c.source]
    return found


def report(folder: Path) -> dict:
    out = json.loads((folder / "report.json").read_text())
    assert out["status"] == "done" and out["steps"] == STEPS, out  # MAX_STEPS reached the config
    return out


def check_accelerator(cells) -> None:
    """The accelerator cell names the runtime and the JAX build for it: one of the pyproject extras."""
    out = stdout(cells[1])
    (found,) = re.findall(r'^accelerator: (\w+); JAX for it: pip install -U "(\S+)"', out, re.M)
    extras = dict(re.findall(r'^(tpu|cuda) = \["(jax\[\w+\])', (ROOT / "pyproject.toml").read_text(), re.M))
    assert found[1] == {"cpu": "jax", "gpu": extras["cuda"], "tpu": extras["tpu"]}[found[0]], (found, extras)
    assert re.search(r"^devices: \[\w*Device", out, re.M), out


def check_before_after(text: str, label: str, metrics: dict, key: str = "loss") -> dict:
    """``label before  loss x`` / ``label after   loss y`` lines: the report's values; returns them."""
    rows = dict(re.findall(rf"^{re.escape(label)} +(before|after) +{key} (\S+)", text, re.M))
    assert set(rows) == {"before", "after"}, text
    for when, value in rows.items():
        assert float(value) == pytest.approx(metrics[when][key], abs=5e-5)
    return {k: float(v) for k, v in rows.items()}


def table(text: str, header: str = "") -> dict:
    """Rows of ``name  x  y ...`` (numbers at the end) -> {name: [x, y, ...]}, after the first line that
    starts with ``header``."""
    rows, lines = {}, text.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith(header)) :]
    for line in lines:
        m = re.match(r"^ *(\S.*?)((?: +-?\d+\.\d+)+)$", line)
        if m:
            rows[m.group(1).strip()] = [float(x) for x in m.group(2).split()]
    return rows


# ---------------------------------------------------------------------------- the notebooks


def check_lora_qlora(cells, workdir: Path) -> None:
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (workdir / "tiny-base").iterdir()}
    for name, label, config in (("lora", "LoRA", "lora_llama.py"), ("qlora", "QLoRA", "qlora_llama.py")):
        got = report(workdir / name)
        losses = check_before_after(stdout(cell_with(cells, f'"{config}"')), label, got)
        assert losses["after"] < losses["before"] - 0.05, losses  # 3 steps at 1e-2 on a random model
        adapter = json.loads((workdir / name / "adapter" / "adapter_config.json").read_text())
        assert (adapter["peft_type"], adapter["r"], adapter["lora_alpha"]) == ("LORA", 16, 32)
        assert (workdir / name / "adapter" / "adapter_model.safetensors").is_file()
        assert (workdir / name / "hf" / "model.safetensors").is_file()
    assert json.loads((workdir / "qlora" / "config.json").read_text())["model"]["quantize"] == "nf4"

    memory = stdout(cell_with(cells, "quantized_bytes"))
    (counts,) = re.findall(r"([\d,]+) weights; bfloat16 ([\d,]+) bytes, nf4 ([\d,]+) bytes", memory)
    weights, bf16, nf4 = (int(x.replace(",", "")) for x in counts)
    assert bf16 == 2 * weights and nf4 < 0.27 * bf16
    bits = float(re.search(r"bits per weight: (\S+)", memory).group(1))
    assert bits == pytest.approx(8 * nf4 / weights, abs=1e-3) and 4.0 < bits < 4.25

    adapter = stdout(cell_with(cells, "save_adapter"))
    assert "['adapter_config.json', 'adapter_model.safetensors']" in adapter
    assert re.search(r"tensors: \d+ identical after load \+ save: True", adapter), adapter
    assert float(re.search(r"logits\(merged\)\|: (\S+)", adapter).group(1)) < 1e-4  # the adapter is the merge
    assert (workdir / "lora" / "adapter-copy" / "adapter_model.safetensors").is_file()

    lines = stdout(cell_with(cells, "jft.generate")).splitlines()
    assert [re.match(r"^(\w+) +(.+?) -> ", x).groups() for x in lines] == [
        (name, phrase) for name in ("LoRA", "QLoRA") for phrase in PHRASES
    ]


def check_merging(cells, workdir: Path) -> None:
    en_fr = [json.loads(x) for x in (ROOT / "jft" / "assets" / "en_fr.jsonl").read_text().splitlines()]
    fr_en = [json.loads(x) for x in (workdir / "fr_en.jsonl").read_text().splitlines()]
    assert [(r["input"], r["output"]) for r in fr_en] == [(r["output"], r["input"]) for r in en_fr]
    fits = stdout(cell_with(cells, "lora_llama.py"))
    for task in ("en-fr", "fr-en"):
        losses = check_before_after(fits, f"fine-tune {task}", report(workdir / task))
        assert losses["after"] < losses["before"], losses

    rows = {}
    for marker in ("BATCHES =", "merge_params(", "merge_folders"):  # the cells that print a loss table
        rows.update(table(stdout(cell_with(cells, marker)), "model "))
    names = ["base", "tuned en-fr", "tuned fr-en", "linear (weights 0.5)", "task_arithmetic", "ties (density 0.5)"]
    names += ["dare_ties (density 0.5)", "slerp (t=0.5)", "ties (yaml, folder)"]
    assert list(rows) == names and all(len(v) == 2 and np.isfinite(v).all() for v in rows.values()), rows
    assert rows["tuned en-fr"][0] < rows["base"][0] and rows["tuned fr-en"][1] < rows["base"][1]
    assert rows["ties (yaml, folder)"] == rows["ties (density 0.5)"]  # the folder merge is the in-memory one
    assert float(re.search(r"merge_params ties\|: (\S+)", stdout(cell_with(cells, "merge_folders"))).group(1)) < 1e-6

    # The merged folder: the tokenizer copied from the base; tensors LoRA left alone are the base's,
    # the attention weights a combination of the two fine-tunes (neither one, nor the base).
    from safetensors.numpy import load_file

    merged = workdir / "merged-ties"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    tensors = {n: load_file(f / "model.safetensors") for n, f in [("merged", merged), ("base", workdir / "tiny-base")]}
    tensors.update({t: load_file(workdir / t / "hf" / "model.safetensors") for t in ("en-fr", "fr-en")})
    np.testing.assert_array_equal(tensors["merged"]["model.norm.weight"], tensors["base"]["model.norm.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert all(not np.allclose(tensors["merged"][q], tensors[k][q], atol=1e-6) for k in ("base", "en-fr", "fr-en"))


def check_dpo_grpo(cells, workdir: Path) -> None:
    dpo = report(workdir / "dpo")
    rows = table(stdout(cell_with(cells, "dpo_llama.py")))
    keys = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
    for when in ("before", "after"):
        np.testing.assert_allclose(rows[when], [dpo[when][k] for k in keys], atol=5e-5)
    assert dpo["before"]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # the policy starts as its reference
    assert dpo["after"]["loss"] < dpo["before"]["loss"] and dpo["after"]["rewards/margins"] > 0, dpo["after"]

    grpo_out = stdout(cell_with(cells, "grpo_llama.py"))
    assert "reward functions: ('jft.rewards:chrf',)" in grpo_out
    grpo = report(workdir / "grpo")
    rows = table(grpo_out)
    for when in ("before", "after"):
        keys = ("reward_mean", "reward_std", "completion_length")
        np.testing.assert_allclose(rows[when], [grpo[when][k] for k in keys], atol=5e-5)
    # The logged samples' rewards are the chrF of the completion against the record's output.
    import jft.rewards

    outputs = {r["input"]: r["output"] for r in map(json.loads, (ROOT / "jft/assets/en_fr.jsonl").open())}
    samples = re.findall(r"sample \(reward (\S+)\): ('.*') -> ('.*')$", grpo_out, re.M)
    assert samples
    for reward, prompt, completion in samples:
        english = re.search(r"Input: (.*)\nOutput: $", ast.literal_eval(prompt)).group(1)
        want = jft.rewards.chrf([prompt], [ast.literal_eval(completion)], output=[outputs[english]])[0]
        assert float(reward) == pytest.approx(want, abs=5e-4)
    # The per-step table is metrics.jsonl's.
    logged = [json.loads(x) for x in (workdir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "reward_mean" in r and "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    printed = table(stdout(cell_with(cells, "metrics.jsonl")))
    keys = ("loss", "reward_mean", "rewards/chrf", "frac_reward_zero_std", "entropy", "clipfrac")
    for r in logged:
        np.testing.assert_allclose(printed[str(r["step"])], [r[k] for k in keys], atol=5e-5)
        assert 0 <= r["reward_mean"] <= 1


def check_distillation(cells, workdir: Path) -> None:
    import jft.distill

    out = workdir / "sequence" / "distill"
    assert {"generations.jsonl", "data.jsonl", "stats.json", "report.json", "settings.json"} <= {
        p.name for p in out.iterdir()
    }
    got = json.loads((out / "report.json").read_text())
    assert got["status"] == "done" and got["fit"]["steps"] == STEPS and got["same_tokenizer"]
    data = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert got["data"]["generated"] == 2 * 32 and got["data"]["kept"] == len(data) > 0  # 2 answers a prompt
    assert {r["provenance"]["teacher"] for r in data} == {str(workdir / "tiny-teacher")}
    assert jft.distill.table(got) in stdout(cell_with(cells, "distill.distill("))  # the table printed is the report's
    student = got["student"]
    assert student["after"]["loss"] < student["before"]["loss"]
    assert got["teacher"]["parameters"] > student["parameters"]

    logit = report(workdir / "logit")
    assert logit["task"] == "distill"
    text = stdout(cell_with(cells, "task=distill"))
    rows = re.findall(r"^(before|after) +divergence (\S+) +ce (\S+) +loss (\S+)$", text, re.M)
    assert [r[0] for r in rows] == ["before", "after"], text
    for when, *values in rows:
        want = [logit[when][k] for k in ("divergence", "ce", "loss")]
        np.testing.assert_allclose([float(v) for v in values], want, atol=5e-5)
    assert logit["after"]["loss"] < logit["before"]["loss"] and logit["after"]["ce"] < logit["before"]["ce"]


NOTEBOOKS = {
    "lora_qlora": ({}, check_lora_qlora),
    "merging": ({}, check_merging),
    "dpo_grpo": ({}, check_dpo_grpo),
    "distillation": ({"NUM_PROMPTS": 32}, check_distillation),
}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_prints_what_its_runs_wrote(name, tmp_path):
    params, check = NOTEBOOKS[name]
    cells, workdir = run(name, tmp_path, **params)
    check_accelerator(cells)
    check(cells, workdir)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    """Saved without outputs, valid nbformat 4, with a tagged parameters cell that has MAX_STEPS, WORKDIR, TINY."""
    nb = nbformat.read(ROOT / "colab" / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is None and not c.outputs for c in code)
    (params,) = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    names = {t.id for t in ast.walk(ast.parse(params.source)) if isinstance(t, ast.Name)}
    assert {"MAX_STEPS", "WORKDIR", "TINY"} <= names, params.source
