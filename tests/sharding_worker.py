"""Run by tests/test_sharding.py in a fresh process with 8 CPU devices (4 per process for the
multi-host case); prints JSON results on its last line."""

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

COMMAND = sys.argv[1]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 if COMMAND.startswith('multihost') else 8}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jft  # noqa: E402
from jft import peft, sharding  # noqa: E402
from jft.models.layers import segment_positions  # noqa: E402
from jft.objectives import token_loss  # noqa: E402
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
    step = jax.jit(make_train_step(token_loss(model), tx, schedule))
    sharded_step = jax.jit(make_train_step(token_loss(model, mesh=mesh), tx, schedule))
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
    out = {k: report[k] for k in ("steps", "resumed_from", "steps_run")}
    return {"loss": report["after"]["loss"], "processes": jax.process_count(), **out}


def multihost(process_id: str, port: str, *fit_args: str) -> dict:
    """:func:`fit` as one of two processes (4 CPU devices each) joined by ``jax.distributed``."""
    sharding.initialize_distributed(f"localhost:{port}", 2, int(process_id))
    return fit(*fit_args)


def global_batches(rows, steps: int, restore_at: int, grad_accum: int = 2, batch_size: int = 16) -> list[str]:
    """sha256 of each of ``steps`` global batches of ``rows`` as the trainer builds them: this
    process reads only its rows (``host_rows``), ``put_batch`` joins the hosts' shares; then a
    fresh reader restored at step ``restore_at`` goes on. Every process returns the same list."""
    import hashlib

    from jax.experimental import multihost_utils

    from jft.data import Batches

    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    where = sharding.batch_sharding(mesh)
    local = sharding.host_rows(where, batch_size, grad_accum)

    def digest(batch) -> str:
        placed = sharding.put_batch(
            {k: v.reshape(grad_accum, -1, *v.shape[1:]) for k, v in batch.items()}, where, rows=batch_size // grad_accum
        )
        h = hashlib.sha256()
        for k in sorted(placed):
            whole = multihost_utils.process_allgather(placed[k], tiled=True)
            h.update(k.encode() + np.ascontiguousarray(np.asarray(whole).reshape(batch_size, -1)).tobytes())
        return h.hexdigest()

    reader = Batches(rows, batch_size, seed=7, positions=local)
    out = [digest(next(reader)) for _ in range(restore_at)]
    reader = Batches(rows, batch_size, seed=7, positions=local)
    reader.restore({"epoch": restore_at // reader.steps_per_epoch, "index": restore_at % reader.steps_per_epoch})
    out += [digest(next(reader)) for _ in range(steps - restore_at)]
    return out


def multihost_batches(process_id: str, port: str, seq_len: str, *folders: str) -> dict:
    """The global batches of a mixture of cached sources, read per host by two processes."""
    from jft.data.cache import CachedRows, TokenCache
    from jft.data.mixture import Mixture

    sharding.initialize_distributed(f"localhost:{port}", 2, int(process_id))
    rows = Mixture([CachedRows(TokenCache(f), int(seq_len)) for f in folders], [0.7, 0.3], seed=7)
    return {"processes": jax.process_count(), "local": len(jax.local_devices()), "batches": global_batches(rows, 9, 6)}


def multihost_cache(process_id: str, port: str, root: str, seq_len: str, data: str, tokenizer: str) -> dict:
    """``once_per_disk`` around ``build_cache`` as one of two processes: on a disk both see (one
    cache root), then on disks of their own (a root per process): which process tokenized."""
    from transformers import AutoTokenizer

    import jft.data.cache as cache_mod

    sharding.initialize_distributed(f"localhost:{port}", 2, int(process_id))
    tok = AutoTokenizer.from_pretrained(tokenizer)
    written = []
    write = cache_mod._write
    cache_mod._write = lambda tmp, *a, **k: written.append(1) or write(tmp, *a, **k)
    out = {}
    for disk, where in (("shared", Path(root) / "shared"), ("local", Path(root) / f"local-{process_id}")):
        build = lambda where=where: cache_mod.build_cache(
            data, tok, cache_root=where, vocab_size=len(tok), max_length=int(seq_len), progress=False
        )
        written.clear()
        folder = sharding.once_per_disk(where, build).folder
        out[disk] = {"wrote": len(written), "folder": folder.name, "left": sorted(p.name for p in where.iterdir())}
    return out


def peft_shardings() -> dict:
    """Every method of test_peft.METHODS on a data=2 x fsdp=2 x tensor=2 mesh: each leaf's shape,
    spec and shard on device 0 as placed by ``jax.device_put``, and a forward of the placed params
    on the mesh against the same forward on one device."""
    from test_peft import CFG as PEFT_CFG
    from test_peft import METHODS

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    base = jft.LlamaForCausalLM(PEFT_CFG)
    # Weights 5x the init scale (as test_peft's base) so the logits depend on every leaf.
    params = jax.tree.map(lambda x: 5 * x if x.ndim >= 2 else x, base.init_params(jax.random.key(0)))
    ids = np.random.default_rng(0).integers(0, PEFT_CFG.vocab_size, (4, 12)).astype(np.int32)
    noise = np.random.default_rng(1)

    def leaves(tree):
        out = {}
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            spec = [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
            shard = [s.data.shape for s in x.addressable_shards if s.device == jax.devices()[0]][0]
            name = "/".join(str(k.key) for k in path)
            out[name] = {"shape": x.shape, "spec": spec + [None] * (x.ndim - len(spec)), "shard": shard}
        return out

    models, one_device, placed = [base], [params], [jax.device_put(params, sharding.param_shardings(base, mesh))]
    for spec in METHODS.values():
        model, p = peft.inject(base, params, spec, jax.random.key(1))
        # Nonzero LoRA B, adapter up, ...: every new leaf acts on the logits. Noise from numpy, as
        # an eager jax.random call per leaf shape would compile hundreds of tiny programs.
        trains = jax.tree.leaves(peft.labels(p, model.peft))
        flat, treedef = jax.tree.flatten(p)
        flat = [
            x + 0.1 * noise.standard_normal(x.shape, np.float32) if t else x for x, t in zip(flat, trains, strict=True)
        ]
        p = jax.tree.unflatten(treedef, flat)
        models.append(model)
        one_device.append(p)
        placed.append(jax.device_put(p, sharding.param_shardings(model, mesh)))

    def forward(on_mesh):  # all models in one program: one compile per side, not one per method
        def f(ps, x):
            with sharding.scope(mesh if on_mesh else None):
                return [m.apply({"params": p}, x) for m, p in zip(models, ps, strict=True)]

        return jax.jit(f)

    base_logits, *ones = forward(False)(one_device, ids)
    _, *eights = forward(True)(placed, jax.device_put(ids, sharding.batch_sharding(mesh, accum=False)))
    out = {"base": leaves(placed[0])}
    for name, p, one, eight in zip(METHODS, placed[1:], ones, eights, strict=True):
        out[name] = {
            "leaves": leaves(p),
            "diff": float(np.abs(np.asarray(one) - np.asarray(eight)).max()),
            "scale": float(np.abs(np.asarray(one)).max()),
            "base_diff": float(np.abs(np.asarray(one) - np.asarray(base_logits)).max()),
            "logits_spec": str(eight.sharding.spec),
        }
    return out


def step_memory() -> dict:
    """XLA's per-device memory analysis of the compiled full fine-tuning step (AdamW) of a 16-layer
    tiny Llama on a data=1 x fsdp=8 mesh, as the trainer builds it, with the bytes of all params."""
    model = jft.LlamaForCausalLM(dataclasses.replace(CFG, num_hidden_layers=16))
    mesh = sharding.make_mesh(data=1, fsdp=8)
    params = model.init_params(jax.random.key(0), sharding.param_shardings(model, mesh))
    tx, schedule = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)
    state = sharding.on_mesh(
        TrainState.create(params, jax.tree.map(lambda _: True, params), tx, jax.random.key(2)), mesh
    )
    ids = np.zeros((1, 8, 16), np.int32)
    batch = {k: ids for k in ("input_ids", "targets", "segment_ids", "positions")} | {"loss_weights": ids + 1.0}
    batch = sharding.put_batch(batch, sharding.batch_sharding(mesh))
    step = jax.jit(make_train_step(token_loss(model, mesh=mesh), tx, schedule), donate_argnums=0)
    m = step.lower(state, batch).compile().memory_analysis()
    return {"params": sum(x.nbytes for x in jax.tree.leaves(params)), "args": m.argument_size_in_bytes,
            "temp": m.temp_size_in_bytes}  # fmt: skip


def kernel_on_mesh() -> dict:
    """Splash attention (interpret mode) inside a 2x2x2 mesh's train step, run per device through
    shard_map, against whole-score attention on one device: losses of three steps, packed rows."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    tx, schedule = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)
    ids = np.random.default_rng(0).integers(3, CFG.vocab_size, (1, 4, 129)).astype(np.int32)
    seg = np.ones((1, 4, 128), np.int32)
    seg[:, :2, 50:] = 2
    seg[:, :2, 120:] = 0
    batch = {"input_ids": ids[..., :-1], "targets": ids[..., 1:], "loss_weights": (seg != 0).astype(np.float32),
             "segment_ids": seg, "positions": np.asarray(segment_positions(seg[0]))[None]}  # fmt: skip
    losses = []
    for attention, on in (("xla", None), ("splash", mesh)):
        model = jft.LlamaForCausalLM(dataclasses.replace(CFG, attention=attention, attention_chunk=64))
        params = model.init_params(jax.random.key(0), None if on is None else sharding.param_shardings(model, on))
        state = TrainState.create(params, jax.tree.map(lambda _: True, params), tx, jax.random.key(2))
        step = jax.jit(make_train_step(token_loss(model, mesh=on), tx, schedule))
        run_batch = batch if on is None else sharding.put_batch(batch, sharding.batch_sharding(on))
        losses.append([])
        for _ in range(3):
            state, metrics = step(state, run_batch)
            losses[-1].append(float(metrics["loss"]))
    return {"losses": losses}


def dpo() -> dict:
    """DPO with LoRA (the reference: the base with the adapters off) on a 2x2x2 mesh against one
    device: losses and margins of three steps on preference rows [accum, pairs, 2, t]."""
    from jft.objectives import dpo_loss

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    settings = type("S", (), dict(loss="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.5, orpo_lambda=0.1))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CFG.vocab_size, (1, 8, 2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[..., 1, 9:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask, "targets": np.roll(ids * mask, -1, -1),
             "loss_weights": (mask * (np.arange(12) >= 4)).astype(np.float32),
             "margin": np.zeros((1, 8), np.float32), "weight": np.ones((1, 8), np.float32)}  # fmt: skip
    tx, schedule = make_optimizer(learning_rate=5e-2, total_steps=10, warmup_steps=0)
    out = []
    for on in (None, mesh):
        model = jft.LlamaForCausalLM(CFG)
        params = model.init_params(jax.random.key(0), None if on is None else sharding.param_shardings(model, on))
        model, params = peft.inject(model, params, peft.Peft(lora=peft.Lora(r=4)), jax.random.key(1))
        if on is not None:
            params = jax.device_put(params, sharding.param_shardings(model, on, params=params))
        state = TrainState.create(params, peft.labels(params, model.peft), tx, jax.random.key(2))
        step = jax.jit(make_train_step(dpo_loss(model, settings, mesh=on), tx, schedule))
        run_batch = batch if on is None else sharding.put_batch(batch, sharding.batch_sharding(on))
        out.append([])
        for _ in range(3):
            state, m = step(state, run_batch)
            out[-1].append((float(m["loss"]), float(m["rewards/margins"])))
    return {"one": out[0], "mesh": out[1]}


def grpo(workdir: str) -> dict:
    """Three GRPO steps of jft train on a 2x2x2 mesh (tests/test_grpo.py runs them on one device)."""
    from test_grpo import grpo_steps

    return {"mesh": grpo_steps(Path(workdir), (2, 2, 2))}


def ppo(workdir: str) -> dict:
    """Three PPO steps of jft train on a 2x2x2 mesh (tests/test_ppo.py runs them on one device)."""
    from test_ppo import ppo_steps

    return {"mesh": ppo_steps(Path(workdir), (2, 2, 2))}


if __name__ == "__main__":
    commands = {"full": run, "lora": run, "qlora": run, "errors": errors, "checkpoint": checkpoint}
    commands.update(fit=fit, multihost=multihost, multihost_batches=multihost_batches)
    commands.update(multihost_cache=multihost_cache)
    commands.update(step_memory=step_memory)
    commands.update(peft_shardings=peft_shardings, kernel_on_mesh=kernel_on_mesh, dpo=dpo, grpo=grpo, ppo=ppo)
    args = sys.argv[2:] if COMMAND not in ("full", "lora", "qlora") else [COMMAND]
    print(json.dumps(commands[COMMAND](*args)))
