"""scripts/launch_tpu_pod.sh: the gcloud commands it prints with --dry-run, and its errors (no gcloud needed)."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "launch_tpu_pod.sh"
BASH = shutil.which("bash")
TRICKY = "--config.data.train=/mnt/my data/it's.jsonl"


def launch(*args, env=None):
    return subprocess.run([BASH, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env)


def commands(*args):
    out = launch("--dry-run", *args)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(line.startswith("+ gcloud compute tpus tpu-vm ") for line in lines)
    return [shlex.split(line[2:]) for line in lines]


def remote(cmd):
    """The --command=... of an ssh command."""
    (arg,) = [a for a in cmd if a.startswith("--command=")]
    return arg.removeprefix("--command=")


def test_create_install_run(tmp_path):
    create, install, scp, run = commands(
        "--tpu", "pod", "--zone", "us-central2-b", "--project", "proj", "--create", "--accelerator-type", "v4-32",
        "--spot", "--repo", "https://github.com/o/jft", "--ref", "v1", "--", "configs/lora_llama.py", TRICKY,
    )  # fmt: skip
    where = ["--zone=us-central2-b", "--project=proj"]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", *where, "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base", "--spot"]  # fmt: skip
    for ssh in install, run:
        assert ssh[4:9] == ["ssh", "pod", *where, "--worker=all"]
    assert "pip install -U 'jax[tpu]'" in remote(install)
    assert shlex.split(remote(install))[-1] == "git+https://github.com/o/jft@v1"
    assert scp[4:] == ["scp", "configs/lora_llama.py", "pod:lora_llama.py", *where, "--worker=all"]
    # Run the remote command in a shell with a stub jft: every argument arrives intact, ~ expanded.
    stub = tmp_path / ".local" / "bin" / "jft"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    got = subprocess.run([BASH, "-c", remote(run)], capture_output=True, text=True, env={"HOME": str(tmp_path)})
    assert got.stdout.splitlines() == ["train", "--config", "lora_llama.py", "--workdir", f"{tmp_path}/jft-run", TRICKY]


def test_skip_install_runs_only_jft():
    (run,) = commands("--tpu=pod", "--zone=z", "--skip-install", "--workdir", "/data/run 1", "--", "/remote/c.py")
    assert run[4:] == ["ssh", "pod", "--zone=z", "--worker=all", run[-1]]
    assert "pip" not in remote(run)
    assert shlex.split(remote(run))[-5:] == ["train", "--config", "/remote/c.py", "--workdir", "/data/run 1"]


@pytest.mark.parametrize(
    "args, flag",
    [
        ("--zone z --repo r -- c", "--tpu"),
        ("--tpu p --repo r -- c", "--zone"),
        ("--tpu p --zone z --repo r", "CONFIG"),
        ("--tpu p --zone z --repo r --", "CONFIG"),
        ("--tpu p --zone z -- c", "--repo"),
        ("--tpu p --zone z --create --repo r -- c", "--accelerator-type"),
        ("--tpu p --zone z --bogus -- c", "--bogus"),
        ("--tpu p --zone z --repo r -- c --workdir w", "--config.a.b=value"),
    ],
)
def test_bad_input(args, flag):
    out = launch("--dry-run", *args.split())
    assert out.returncode == 2
    assert out.stdout == "" and flag in out.stderr.splitlines()[0]


def test_help():
    out = launch("--help")
    assert out.returncode == 0 and "--accelerator-type" in out.stdout and "gs://" in out.stdout


def test_without_gcloud_fails_before_running_anything(tmp_path):
    out = launch("--tpu", "p", "--zone", "z", "--skip-install", "--", "c", env={"PATH": str(tmp_path)})
    assert out.returncode != 0 and "gcloud" in out.stderr and "+ gcloud" not in out.stderr


def test_runs_the_commands_with_gcloud(tmp_path):
    log = tmp_path / "log"
    fake = tmp_path / "gcloud"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = launch("--tpu", "p", "--zone", "z", "--repo", "jft==0.1.0", "--", "c", env=env)
    assert out.returncode == 0, out.stderr
    assert [line.split()[3] for line in log.read_text().splitlines()] == ["ssh", "ssh"]
    assert out.stderr.count("+ gcloud") == 2
