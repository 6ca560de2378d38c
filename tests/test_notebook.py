"""colab/quickstart.ipynb runs top to bottom (through nbclient) on a shortened config and prints
what the run did: the report's numbers, the exported model's own translations, its loss plot."""

import base64
import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "colab" / "quickstart.ipynb"
PHRASES = ["The cat is sleeping.", "We see the small dog."]  # the notebook's last code cell translates these


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


def test_quickstart_notebook_runs(tmp_path):
    import jft
    from jft.data import TEMPLATES, prompt_ids

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    workdir = tmp_path / "run"
    params.source = f"MAX_STEPS = 3\nWORKDIR = {str(workdir)!r}"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    _, config_cell, fit_cell, translate_cell, plot_cell = code

    # The files the run writes (the later cells read them back).
    for name in ("report.json", "metrics.jsonl", "loss.png", "hf/config.json", "hf/model.safetensors"):
        assert (workdir / name).is_file(), name
    assert (workdir / "hf" / "tokenizer.json").is_file()
    report = json.loads((workdir / "report.json").read_text())
    assert report["status"] == "done" and report["steps"] == 3  # MAX_STEPS reached the config

    assert "template: compact" in stdout(config_cell) and "en_fr.jsonl" in stdout(config_cell)

    # "before  loss 6.872  BLEU 0.0  exact match 0.0%": the report's values, as printed.
    rows = re.findall(r"^(before|after) +loss (\S+) +BLEU (\S+) +exact match (\S+)%$", stdout(fit_cell), re.M)
    assert [r[0] for r in rows] == ["before", "after"], stdout(fit_cell)
    for when, loss, bleu, em in rows:
        m = report[when]
        assert float(loss) == pytest.approx(m["loss"], abs=5e-4)
        assert float(bleu) == pytest.approx(m["bleu"], abs=0.05)
        assert float(em) == pytest.approx(m["exact_match"], abs=0.05)
    assert report["after"]["loss"] < report["before"]["loss"] - 0.5  # 3 steps at the quickstart's rate
    val = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert val[-1]["step"] == 3 and val[-1]["val_loss"] == pytest.approx(report["after"]["loss"])

    # "english -> french": what the exported model generates for those prompts, recomputed here.
    printed = stdout(translate_cell).splitlines()
    model, params = jft.load_hf(workdir / "hf")
    tokenizer = jft.load_tokenizer(workdir / "hf")
    template = TEMPLATES["compact"]
    assert len(printed) == len(PHRASES)
    for line, english in zip(printed, PHRASES, strict=True):
        prompt = template.prompt_with_input.format(instruction="Translate to French.", input=english)
        new = jft.generate(model, params, np.asarray([prompt_ids(prompt, tokenizer)]), max_new_tokens=24)
        assert new.shape == (1, 24)
        assert line == f"{english} -> {tokenizer.decode(np.asarray(new[0]), skip_special_tokens=True).strip()}"

    # The plot shown is the run's loss.png.
    (image,) = [o["data"]["image/png"] for o in plot_cell.outputs if "image/png" in o.get("data", {})]
    assert base64.b64decode(image) == (workdir / "loss.png").read_bytes()
