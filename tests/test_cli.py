"""The `jft` command: help, generation from a model folder, and clear errors."""

import shutil
import subprocess
import sys

import pytest
from test_hf import tiny_tokenizer

import jft
from jft.cli import main


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "jft.cli", "--help"], capture_output=True, text=True, check=True)
    assert "generate" in out.stdout


def test_a_machine_without_torch_sees_no_transformers_notice():
    # torch is only a test dependency: block it, as on a user's machine without it
    code = "import sys; sys.modules['torch'] = None; import jft, transformers; transformers.AutoConfig"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "PyTorch was not found" not in out.stderr + out.stdout
    unfiltered = subprocess.run([sys.executable, "-c", code.replace("jft, ", "")], capture_output=True, text=True)
    assert "PyTorch was not found" in unfiltered.stderr  # the test would see the notice if jft did not drop it


def test_generate_prints_the_continuations(hf_model_dir, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(hf_model_dir("llama_gqa"), folder)
    model, params = jft.load_hf(folder)
    jft.save_hf(model, params, folder, tokenizer=tiny_tokenizer())
    assert (
        main(
            [
                "generate",
                "--model",
                str(folder),
                "--prompt",
                "hello world",
                "--prompt",
                "world",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("hello world") and lines[1].startswith("world")


def test_generate_with_an_adapter_matches_python(hf_model_dir, tmp_path, capsys):
    """`jft generate --adapter` puts a saved adapter on the base, as peft.load_adapter does."""
    import jax
    import numpy as np

    folder = tmp_path / "m"
    shutil.copytree(hf_model_dir("llama_gqa"), folder)
    model, params = jft.load_hf(folder)
    tokenizer = tiny_tokenizer()
    jft.save_hf(model, params, folder, tokenizer=tokenizer)
    pmodel, pparams = jft.peft.inject(model, params, jft.peft.Peft(prefix=jft.peft.Prefix(4)), jax.random.key(0))
    pparams["model"]["prefix"]["embedding"] = 50 * pparams["model"]["prefix"]["embedding"]
    jft.peft.save_adapter(pmodel, pparams, tmp_path / "adapter")
    args = ["generate", "--model", str(folder), "--prompt", "hello world", "--max-new-tokens", "5"]
    assert main([*args, "--adapter", str(tmp_path / "adapter")]) == 0
    printed = capsys.readouterr().out.strip()
    ids = np.asarray(tokenizer(["hello world"])["input_ids"])
    expect = jft.generate(pmodel, pparams, ids, 5)
    assert not np.array_equal(expect, jft.generate(model, params, ids, 5))  # the adapter matters
    assert printed == "hello world" + tokenizer.decode(np.asarray(expect)[0], skip_special_tokens=True)


def test_generate_without_tokenizer_says_so(hf_model_dir, capsys):
    assert main(["generate", "--model", str(hf_model_dir("llama_gqa")), "--prompt", "hi"]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err


def test_bad_model_folder_is_a_clean_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "config.json: missing" in capsys.readouterr().err


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
