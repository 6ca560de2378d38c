"""Meshes and logical sharding rules on 8 CPU devices (a fresh process per case, since the
device count is fixed when JAX starts)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sharding_worker.py")


def worker(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_a_2x2x2_mesh_trains_like_one_device_with_an_eighth_of_the_state_per_device(method):
    result = worker(method)
    assert result["init_diff"] == 0.0  # created (or read) onto the mesh's shards: the same values
    for one, eight in result["losses"]:
        assert abs(one - eight) < 1e-5 * max(1.0, abs(one))
    assert result["diff"] < 1e-4
    if method == "qlora":  # 4-bit codes split over fsdp along the flattened values
        assert result["up_spec"] == "P(None, 'fsdp')"
        assert result["device0_share"] < 0.6  # LoRA factors, norms and embeddings dominate this tiny model
    else:
        assert result["up_spec"] == "P(None, 'fsdp', 'tensor')"
        # fsdp x tensor = 4 shards of every matrix: about a quarter per device (norms, biases and
        # LoRA's rank axis are replicated), against the whole on one device.
        assert result["device0_share"] < 0.35


def test_a_checkpoint_saved_on_2x4_restores_onto_8x1_and_onto_one_device(tmp_path):
    result = worker("checkpoint", str(tmp_path / "run"))
    for name, devices, spec in (("8x1", 8, "P('tensor', 'fsdp')"), ("one", 1, "P('tensor', 'fsdp')")):
        assert result[name]["diff"] == 0.0 and result[name]["opt_diff"] == 0.0
        assert result[name]["devices"] == devices and result[name]["embed_spec"] == spec
        assert result[name]["meta"] == "2x4"


def test_bad_meshes_and_rules_fail_before_compiling():
    errors = worker("errors")
    assert "data=3 x fsdp=2 x tensor=1 = 6 devices, but there are 8" in errors["mesh"]
    assert "at most one -1" in errors["two_rest"]
    assert "logical axis" in errors["no_rule"] and "has no sharding rule" in errors["no_rule"]
    assert "of size 132 does not divide into 8 shards" in errors["indivisible"]


def test_fit_on_two_hosts_then_resume_on_another_mesh(tmp_path):
    """fit() for 4 steps as two processes x 4 devices (jax.distributed on localhost), as one
    process x 8 devices and on one device end at the same loss; the two-host run's checkpoint,
    resumed to 6 steps on a data=1 x fsdp=8 mesh, matches the one-device run resumed to 6.
    The two-host run keeps its checkpoints apart from its workdir (train.checkpoint_dir, which
    may be a gs:// path), where all processes write and the resumed run finds them."""
    from test_trainer import tiny_config, write_data

    from jft.train import fit

    data = write_data(tmp_path / "train.jsonl")
    bucket = str(tmp_path / "bucket")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    logs = [open(tmp_path / f"host{i}.log", "w+") for i in range(2)]  # noqa: SIM115 - pipes could fill and block
    hosts = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "multihost",
                str(i),
                port,
                str(data),
                str(tmp_path / "hosts"),
                "4",
                "2",
                "4",
                bucket,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, log in enumerate(logs)
    ]
    two_hosts = []
    for host, log in zip(hosts, logs, strict=True):
        host.wait(timeout=600)
        log.seek(0)
        out = log.read()
        log.close()
        assert host.returncode == 0, out[-3000:]
        two_hosts.append(json.loads(out.strip().splitlines()[-1]))
    eight = worker("fit", str(data), str(tmp_path / "eight"), "4", "2", "4")
    one = fit(tiny_config(data, train__max_steps=4, train__batch_size=8), tmp_path / "one")
    assert [r["processes"] for r in two_hosts] == [2, 2] and eight["processes"] == 1
    assert two_hosts[0]["steps"] == eight["steps"] == one["steps"] == 4
    for loss in (two_hosts[0]["loss"], two_hosts[1]["loss"], eight["loss"]):
        assert abs(loss - one["after"]["loss"]) < 1e-3
    assert (tmp_path / "hosts" / "hf" / "model.safetensors").is_file()  # process 0 exported the gathered model
    assert (tmp_path / "bucket" / "ckpt" / "4").is_dir() and not (tmp_path / "hosts" / "ckpt").exists()
    resumed = worker("fit", str(data), str(tmp_path / "hosts"), "6", "1", "8", bucket)
    one = fit(tiny_config(data, train__max_steps=6, train__batch_size=8), tmp_path / "one")
    assert resumed["steps"] == one["steps"] == 6
    assert abs(resumed["loss"] - one["after"]["loss"]) < 1e-3


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
