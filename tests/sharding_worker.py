"""Run by tests/test_sharding.py in a fresh process with 8 CPU devices; prints JSON results."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jft  # noqa: E402
from jft import peft, sharding  # noqa: E402
from jft.train import TrainState, make_optimizer, make_train_step  # noqa: E402


def run(method: str) -> dict:
    cfg = jft.LlamaConfig.tiny(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    model = jft.LlamaForCausalLM(cfg)
    params = model.init_params(jax.random.key(0))
    if method == "lora":
        model, params = peft.inject(model, params, peft.Peft(lora=peft.Lora(r=4)), jax.random.key(1))
        labels = peft.labels(params, model.peft)
    else:
        labels = jax.tree.map(lambda _: True, params)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    tx, schedule = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)
    step = jax.jit(make_train_step(model, tx, schedule))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8, 17)).astype(np.int32)
    batch = {
        "input_ids": ids[..., :-1],
        "targets": ids[..., 1:],
        "loss_weights": np.ones((1, 8, 16), np.float32),
        "segment_ids": np.ones((1, 8, 16), np.int32),
        "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (1, 8, 16)),
    }
    one = TrainState.create(params, labels, tx, jax.random.key(2))
    sharded = TrainState.create(
        jax.device_put(params, sharding.param_shardings(model, mesh)), labels, tx, jax.random.key(2)
    )
    sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    losses = []
    for _ in range(3):
        one, m1 = step(one, batch)
        sharded, m8 = step(sharded, sharded_batch)
        losses.append((float(m1["loss"]), float(m8["loss"])))
    diff = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(one.trainable), jax.tree.leaves(sharded.trainable), strict=True)
    )
    # Bytes on device 0 against the whole, for params and optimizer state after the steps.
    leaves = jax.tree.leaves((sharded.trainable, sharded.frozen, sharded.opt_state))
    total = sum(x.nbytes for x in leaves)
    on_first = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == jax.devices()[0])
    up = sharded.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    return {"losses": losses, "diff": diff, "device0_share": on_first / total, "up_spec": str(up.sharding.spec)}


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


def fit_on_mesh(data_file: str, workdir: str, steps: str) -> dict:
    """``jft.train.fit`` of test_trainer's tiny config on a data=2 x fsdp=4 mesh."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_trainer import tiny_config

    from jft.train import fit

    cfg = tiny_config(data_file, train__max_steps=int(steps), train__batch_size=8, mesh__data=2, mesh__fsdp=4)
    report = fit(cfg, workdir)
    return {"loss": report["after"]["loss"], "steps": report["steps"]}


if __name__ == "__main__":
    if sys.argv[1] == "fit":
        print(json.dumps(fit_on_mesh(*sys.argv[2:5])))
    else:
        print(json.dumps(run(sys.argv[1]) if sys.argv[1] != "errors" else errors()))
