"""Meshes and logical sharding rules on 8 CPU devices (a fresh process per case, since the
device count is fixed when JAX starts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sharding_worker.py")


def worker(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_2x2x2_mesh_trains_like_one_device_with_an_eighth_of_the_state_per_device(method):
    result = worker(method)
    for one, eight in result["losses"]:
        assert abs(one - eight) < 1e-5 * max(1.0, abs(one))
    assert result["diff"] < 1e-4
    assert result["up_spec"] == "P(None, 'fsdp', 'tensor')"
    # fsdp x tensor = 4 shards of every matrix: about a quarter per device (norms, biases and
    # LoRA's rank axis are replicated), against the whole on one device.
    assert result["device0_share"] < 0.35


def test_bad_meshes_and_rules_fail_before_compiling():
    errors = worker("errors")
    assert "data=3 x fsdp=2 x tensor=1 = 6 devices, but there are 8" in errors["mesh"]
    assert "at most one -1" in errors["two_rest"]
    assert "logical axis" in errors["no_rule"] and "has no sharding rule" in errors["no_rule"]
    assert "of size 132 does not divide into 8 shards" in errors["indivisible"]


def test_fit_on_a_mesh_then_resume_on_one_device(tmp_path):
    """fit() for 4 steps on data=2 x fsdp=4 and on one device end at the same loss; both resumed
    to 6 steps on one device (the mesh run's checkpoint restored onto another mesh) agree too."""
    from test_trainer import tiny_config, write_data

    from jft.train import fit

    data = write_data(tmp_path / "train.jsonl")
    on_mesh = worker("fit", str(data), str(tmp_path / "mesh"), "4")
    on_one = fit(tiny_config(data, train__max_steps=4, train__batch_size=8), tmp_path / "one")
    assert on_mesh["steps"] == on_one["steps"] == 4
    assert abs(on_mesh["loss"] - on_one["after"]["loss"]) < 1e-3
    resumed = [fit(tiny_config(data, train__max_steps=6, train__batch_size=8), tmp_path / d) for d in ("mesh", "one")]
    assert resumed[0]["steps"] == resumed[1]["steps"] == 6
    assert abs(resumed[0]["after"]["loss"] - resumed[1]["after"]["loss"]) < 1e-3


def test_every_peft_method_has_shardings():
    """Leaves created without logical axes (Compacter's PHM factors) are replicated, not an error."""
    import jax
    from test_peft import CFG, METHODS

    import jft
    from jft import peft, sharding

    mesh = sharding.make_mesh()
    base = jft.LlamaForCausalLM(CFG)
    for name, spec in METHODS.items():
        model = peft.build(base, spec)
        shardings = sharding.param_shardings(model, mesh)
        assert jax.tree.structure(shardings) == jax.tree.structure(model.param_shapes()), name
