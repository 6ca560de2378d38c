"""Run by tests/test_sharding.py in a fresh process with 8 CPU devices (4 per process for the
multi-host case); prints JSON results on its last line."""

import json
import os
import sys
import tempfile

COMMAND = sys.argv[1]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 if COMMAND == 'multihost' else 8}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jft  # noqa: E402
from jft import peft, sharding  # noqa: E402
from jft.train import TrainState, make_optimizer, make_train_step  # noqa: E402
from jft.train.checkpoint import Checkpoints  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
CFG = jft.LlamaConfig.tiny(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def max_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True)
    return max(float(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).max()) for x, y in pairs)


def models(method: str, mesh):
    """``(model, params on one device, params created/loaded onto the mesh, labels)``."""
    model = jft.LlamaForCausalLM(CFG)
    if method == "qlora":  # a HF folder, read quantized: once whole, once onto the mesh's shards
        folder = tempfile.mkdtemp()
        jft.save_hf(model, model.init_params(jax.random.key(0)), folder)
        model, one = jft.load_hf(folder, quantize="nf4")
        sharded = jft.load_hf(folder, quantize="nf4", mesh=mesh)[1]
    else:
        one = model.init_params(jax.random.key(0))
        sharded = model.init_params(jax.random.key(0), sharding.param_shardings(model, mesh))
    init_diff = max_diff(one, sharded)
    if method == "full":
        return model, one, sharded, jax.tree.map(lambda _: True, one), init_diff
    spec = peft.Peft(lora=peft.Lora(r=4))
    model, one = peft.inject(model, one, spec, jax.random.key(1))
    sharded = peft.inject(jft.LlamaForCausalLM(CFG), sharded, spec, jax.random.key(1))[1]
    sharded = jax.device_put(sharded, sharding.param_shardings(model, mesh, params=sharded))
    return model, one, sharded, peft.labels(one, model.peft), init_diff


def run(method: str) -> dict:
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model, params, sharded_params, labels, init_diff = models(method, mesh)
    tx, schedule = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)
    step = jax.jit(make_train_step(model, tx, schedule))
    sharded_step = jax.jit(make_train_step(model, tx, schedule, mesh=mesh))
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 8, 17)).astype(np.int32)
    batch = {
        "input_ids": ids[..., :-1],
        "targets": ids[..., 1:],
        "loss_weights": np.ones((1, 8, 16), np.float32),
        "segment_ids": np.ones((1, 8, 16), np.int32),
        "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (1, 8, 16)),
    }
    one = TrainState.create(params, labels, tx, jax.random.key(2))
    sharded = TrainState.create(sharded_params, labels, tx, jax.random.key(2))
    sharded_batch = sharding.put_batch(batch, sharding.batch_sharding(mesh))
    losses = []
    for _ in range(3):
        one, m1 = step(one, batch)
        sharded, m8 = sharded_step(sharded, sharded_batch)
        losses.append((float(m1["loss"]), float(m8["loss"])))
    # Bytes on device 0 against the whole, for params and optimizer state after the steps.
    leaves = jax.tree.leaves((sharded.trainable, sharded.frozen, sharded.opt_state))
    total = sum(x.nbytes for x in leaves)
    on_first = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == jax.devices()[0])
    up = sharded.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    up = getattr(up, "codes", up)
    return {
        "losses": losses,
        "diff": max_diff(one.trainable, sharded.trainable),
        "init_diff": init_diff,
        "device0_share": on_first / total,
        "up_spec": str(up.sharding.spec),
    }


def checkpoint(root: str) -> dict:
    """A train state saved from a data=2 x fsdp=4 mesh, restored onto fsdp=8 and onto one device."""
    model = jft.LlamaForCausalLM(CFG)
    tx, _ = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)

    def state(mesh):
        params = model.init_params(jax.random.key(0), sharding.param_shardings(model, mesh))
        return TrainState.create(params, jax.tree.map(lambda _: True, params), tx, jax.random.key(2))

    saved = state(sharding.make_mesh(data=2, fsdp=4))
    saved = saved.replace(trainable=jax.tree.map(lambda x: x + 1.0, saved.trainable))
    ckpts = Checkpoints(root, keep=1)
    ckpts.save(3, saved, {"note": "2x4"})
    ckpts.close()
    out = {}
    for name, mesh in {
        "8x1": sharding.make_mesh(data=1, fsdp=8),
        "one": sharding.make_mesh(devices=jax.devices()[:1]),
    }.items():
        restored, meta = Checkpoints(root, keep=1).restore(state(mesh))
        embed = restored.trainable["model"]["embed_tokens"]["embedding"]
        out[name] = {
            "diff": max_diff(saved.trainable, restored.trainable),
            "opt_diff": max_diff(saved.opt_state, restored.opt_state),
            "embed_spec": str(embed.sharding.spec),
            "devices": len(embed.sharding.device_set),
            "meta": meta["note"],
        }
    return out


def errors() -> dict:
    out = {}
    cfg = jft.LlamaConfig.tiny(hidden_size=64, intermediate_size=132, num_attention_heads=4, num_key_value_heads=2)
    for name, fn in {
        "mesh": lambda: sharding.make_mesh(data=3, fsdp=2, tensor=1),
        "two_rest": lambda: sharding.make_mesh(data=-1, fsdp=-1),
        "no_rule": lambda: sharding.param_shardings(
            jft.LlamaForCausalLM(cfg), sharding.make_mesh(), rules=(("embed", "fsdp"),)
        ),
        "indivisible": lambda: sharding.param_shardings(
            jft.LlamaForCausalLM(cfg), sharding.make_mesh(data=1, fsdp=1, tensor=8)
        ),
    }.items():
        try:
            fn()
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


def fit(data_file: str, workdir: str, steps: str, data: str, fsdp: str, checkpoint_dir: str = "") -> dict:
    """``jft.train.fit`` of test_trainer's tiny config on a data x fsdp mesh."""
    from test_trainer import tiny_config

    from jft.train import fit

    cfg = tiny_config(data_file, train__max_steps=int(steps), train__batch_size=8, train__checkpoint_dir=checkpoint_dir)
    cfg.mesh.data, cfg.mesh.fsdp = int(data), int(fsdp)
    report = fit(cfg, workdir)
    return {"loss": report["after"]["loss"], "steps": report["steps"], "processes": jax.process_count()}


def multihost(process_id: str, port: str, *fit_args: str) -> dict:
    """:func:`fit` as one of two processes (4 CPU devices each) joined by ``jax.distributed``."""
    sharding.initialize_distributed(f"localhost:{port}", 2, int(process_id))
    return fit(*fit_args)


if __name__ == "__main__":
    commands = {"full": run, "lora": run, "qlora": run, "errors": errors, "checkpoint": checkpoint}
    commands.update(fit=fit, multihost=multihost)
    args = sys.argv[2:] if COMMAND not in ("full", "lora", "qlora") else [COMMAND]
    print(json.dumps(commands[COMMAND](*args)))
