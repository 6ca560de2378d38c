"""The memory planner (jft.plan) against XLA's memory analysis of the real compiled train step.

The measurements run in one subprocess (this file, run as a script) with 8 CPU devices, so the
mesh case can lay the step out over them and the flags never reach the test process:

    python tests/test_plan.py FOLDER CASES_JSON      # prints one JSON line per case

Each case is a list of ``--config.a.b=value`` overrides of a base config. The worker builds the
train step as ``jft.train.fit`` does (its ``_model``, ``_peft_spec``, ``TrainState.create``,
``optimizer_from_config``, the objective's loss, ``make_train_step``, ``jax.jit(...,
donate_argnums=0)``) and reads ``lower(...).compile().memory_analysis()`` per device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
MODEL = dict(  # a small Llama: 2 layers, hidden 128, grouped-query attention
    vocab_size=512,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
BASE = [  # float32 compute: XLA:CPU upcasts bfloat16 arithmetic, so bf16 compute is not what a GPU keeps
    "model.compute_dtype=float32",
    "model.attention=chunked",
    "model.attention_chunk=64",  # 256-token rows run the linear-memory flash path, as on GPU/TPU
    "data.seq_len=256",
    "train.batch_size=4",
    "mesh.data=1",
]
LORA = ["peft.methods=('lora',)", "peft.lora.r=8", "peft.lora.dropout=0.05"]
CASES = {  # name -> overrides (model.path is added)
    "full, remat nothing_saveable": [],
    "full, remat none": ["model.remat=none"],
    "LoRA r=8, dropout, grad_accum 2": LORA + ["train.grad_accum=2"],
    "QLoRA nf4, bf16 LoRA + kahan": LORA + ["model.quantize=nf4", "model.dtype=bfloat16", "optim.bf16_update=kahan"],
    "full, fsdp 4 x tensor 2 (8 devices)": ["mesh.fsdp=4", "mesh.tensor=2", "train.batch_size=8"],
}
DEVICES = {"full, fsdp 4 x tensor 2 (8 devices)": 8}
# Tolerances, plan / XLA per device. The state (weights, optimizer state, batch: XLA's arguments)
# comes from the same shapes and shardings, so it is exact up to a few scalars. Temporaries are a
# model of XLA's buffer assignment (docs/memory.md): on these cases it is within +3% .. +20%; the
# bound allows for XLA:CPU's fusion decisions, which differ from GPU and TPU. The plan errs high.
STATE_TOL = 0.02
TEMP_RANGE = (0.85, 1.25)
TOTAL_RANGE = (0.9, 1.2)


def config(folder, overrides):
    from jft.config import default_config, override

    cfg = default_config()
    for item in BASE + [f"model.path={folder}"] + list(overrides):
        override(cfg, item)
    return cfg


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    import jax

    import jft

    folder = tmp_path_factory.mktemp("plan_model")
    model = jft.LlamaForCausalLM(jft.LlamaConfig(**MODEL))
    jft.save_hf(model, model.init_params(jax.random.key(0)), folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def worker(model_folder):
    """The measuring process, started before this file's first test and read by its last ones, so
    the compiling runs while the planner's other tests do."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    env["JAX_PLATFORMS"] = "cpu"
    argv = [sys.executable, str(HERE), str(model_folder), json.dumps(CASES)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def measured(worker):
    """XLA's memory analysis of every case's compiled step (the worker's output)."""
    out, err = worker.communicate(timeout=900)
    assert worker.returncode == 0, err[-4000:]
    return {r["case"]: r for r in map(json.loads, out.strip().splitlines())}


# ---------------------------------------------------------------------------- arithmetic, no compiling

# Parameter counts of the Hugging Face models (transformers' num_parameters()).
KNOWN = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
}


@pytest.mark.parametrize("size", list(KNOWN))
def test_the_size_table_has_the_published_parameter_counts(size):
    from jft.config import default_config
    from jft.plan import plan

    assert plan(default_config(), size=size, devices=["H100"])["params"]["total"] == KNOWN[size]


def test_bytes_per_parameter_of_each_choice():
    from jft.config import default_config
    from jft.plan import plan

    cfg = default_config()  # full fine-tuning, float32 params and AdamW moments
    report = plan(cfg, size="llama-2-7b", devices=["H100"])
    n, est = report["params"]["total"], report["estimates"]["gpu"]
    assert report["params"]["trainable"] == n
    assert est["weights"] == 4 * n and abs(est["optimizer"] / n - 8) < 1e-6  # mu + nu (+ two counts)
    assert est["gradients"] == 4 * n

    cfg.model.dtype, cfg.optim.bf16_update, cfg.optim.mu_dtype = "bfloat16", "kahan", "bfloat16"
    est = plan(cfg, size="llama-2-7b", devices=["H100"])["estimates"]["gpu"]
    assert est["weights"] == 2 * n and abs(est["optimizer"] / n - 8) < 1e-6  # 2 mu + 4 nu + 2 compensation

    cfg = default_config()  # QLoRA: NF4 base with double-quantized scales, bf16 LoRA
    cfg.model.dtype, cfg.model.quantize, cfg.peft.methods = "bfloat16", "nf4", ("lora",)
    report = plan(cfg, size="llama-2-7b", devices=["T4"])
    base = report["estimates"]["gpu"]["detail"]["weights_by_dtype"]["4-bit"]
    quantized = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # every decoder linear, lm_head skipped
    assert 0.51 < base / quantized < 0.52  # 4 bits + an 8-bit scale per 64 + float32 per 256 blocks
    assert report["params"]["trainable"] == 32 * 8 * (4 * 2 * 4096 + 3 * (4096 + 11008))


def test_fsdp_divides_the_state_and_tensor_parallelism_the_activations():
    from jft.config import default_config
    from jft.plan import plan

    cfg = default_config()
    one = plan(cfg, size="llama-2-7b", devices=["v5e"])["estimates"]["tpu"]
    cfg.mesh.data, cfg.mesh.fsdp = 1, -1
    eight = plan(cfg, size="llama-2-7b", devices=["v5e"], num_devices=8)
    assert eight["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "devices": 8}
    e = eight["estimates"]["tpu"]
    assert e["weights"] == one["weights"] // 8 and e["gradients"] == one["gradients"] // 8
    assert abs(e["optimizer"] - one["optimizer"] / 8) < 64  # the step counts stay whole
    with pytest.raises(Exception, match="does not split"):
        cfg.train.batch_size = 4
        plan(cfg, size="llama-2-7b", num_devices=8)


def _named_device(doc: str) -> str | None:
    """The device a config's docstring names (the smallest that it says is enough)."""
    for words, device in (("A100", "A100-40GB"), ("H100", "H100"), ("T4", "T4"), ("v5e", "v5e"), ("v4", "v4")):
        if words in doc:
            return device
    return None


def test_every_shipped_config_that_names_a_device_fits_on_it():
    import ast

    from jft.config import load_config
    from jft.plan import plan

    checked = []
    for path in sorted((HERE.parents[1] / "configs").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        device = _named_device(doc)
        if device is None:
            continue
        report = plan(load_config(path), devices=[device])
        fits = {d["name"]: d["fits"] for d in report["devices"]}
        assert fits[device] == "yes", (path.name, report)
        checked.append(path.name)
    assert checked  # configs/distill_llama.py names an A100 / H100


def test_cli_prints_the_table(capsys):
    from jft.cli import main

    root = HERE.parents[1]
    argv = ["plan", "--config", str(root / "configs/qlora_llama.py"), "--size", "llama-2-7b", "--device", "T4"]
    assert main(argv + ["--config.data.seq_len=512"]) == 0
    out = capsys.readouterr().out
    assert "T4" in out and "total per device" in out and "nf4" in out
    assert main(["plan", "--config", str(root / "configs/lora_llama.py"), "--device", "T9"]) == 2
    assert "unknown device" in capsys.readouterr().err


# ---------------------------------------------------------------------------- XLA (last: the worker needs time)


def planned(model_folder, name):
    from jft.plan import plan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 params warn in load_config's checks
        return plan(config(model_folder, CASES[name]), platform="cpu", num_devices=DEVICES.get(name, 1))


@pytest.mark.parametrize("name", list(CASES))
def test_plan_matches_xla_memory_analysis(model_folder, measured, name):
    xla = measured[name]
    est = planned(model_folder, name)["estimates"]["cpu"]
    state = est["weights"] + est["optimizer"] + est["batch"]
    temp = est["detail"]["transient"]
    xla_total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    ratios = {"state": state / xla["argument"], "temp": temp / xla["temp"], "total": est["total"] / xla_total}
    print(f"{name}: plan / XLA " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    assert abs(ratios["state"] - 1) <= STATE_TOL, (xla, est)
    assert TEMP_RANGE[0] <= ratios["temp"] <= TEMP_RANGE[1], (xla, est)
    assert TOTAL_RANGE[0] <= ratios["total"] <= TOTAL_RANGE[1], (xla, est)


# ---------------------------------------------------------------------------- the worker


def _measure(folder: str, overrides: list[str], devices: int) -> dict:
    import jax

    from jft import partition, peft, sharding
    from jft.train import trainer
    from jft.train.optim import optimizer_from_config
    from jft.train.state import TrainState
    from jft.train.step import make_train_step

    cfg = config(folder, overrides)
    objective = trainer._objective(cfg)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.devices()[:devices])
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    model, params = trainer._model(cfg, None, mesh, rules, objective.model_overrides)
    if cfg.peft.methods:
        spec = trainer._peft_spec(cfg, None, objective.train_rules)
        model, params = peft.inject(model, params, spec, jax.random.key(cfg.train.seed + 1))
    params = jax.device_put(params, sharding.param_shardings(model, mesh, rules, params))
    if cfg.peft.methods:
        labels = peft.labels(params, model.peft)
    else:
        labels = partition.labels(params, tuple(map(tuple, cfg.train.rules)), model.config.num_hidden_layers)
    masks = partition.layer_masks(partition.split(params, labels)[0], labels)
    tx, schedule = optimizer_from_config(cfg.optim, 100, masks, seed=cfg.train.seed)
    state = sharding.on_mesh(TrainState.create(params, labels, tx, jax.random.key(cfg.train.seed)), mesh)
    step = jax.jit(make_train_step(objective.loss(model, mesh, rules), tx, schedule, masks), donate_argnums=0)
    accum, rows, t = cfg.train.grad_accum, cfg.train.batch_size // cfg.train.grad_accum, cfg.data.seq_len
    where = sharding.batch_sharding(mesh, rules)
    int32, float32 = jax.numpy.int32, jax.numpy.float32
    batch = {
        k: jax.ShapeDtypeStruct((accum, rows, t), float32 if k == "loss_weights" else int32, sharding=where)
        for k in ("input_ids", "targets", "loss_weights", "segment_ids", "positions")
    }
    analysis = step.lower(state, batch).compile().memory_analysis()
    return {
        "argument": analysis.argument_size_in_bytes,
        "output": analysis.output_size_in_bytes,
        "alias": analysis.alias_size_in_bytes,
        "temp": analysis.temp_size_in_bytes,
    }


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    folder, cases = sys.argv[1], json.loads(sys.argv[2])
    for case, overrides in cases.items():
        print(json.dumps({"case": case, **_measure(folder, overrides, DEVICES.get(case, 1))}), flush=True)
