"""FSDP memory scaling: what one train step needs per device at mesh sizes 1, 2, 4, 8 (CPU, 8 virtual devices).

    python benchmarks/bench_sharding.py          # --sizes 1 2 4 8 --batch 8 --seq 128 --budget-gib 4

Part 1 (allocated and run): a random 125M Llama (vocab 32000, hidden 768, MLP 2048, 12 layers,
12 heads, 4 KV heads, default remat), float32, full fine-tuning with AdamW, on a data=1 x fsdp=N x
tensor=1 mesh. Params are created sharded (`model.init_params(rng, shardings)`), the TrainState as
the trainer makes it (optimizer state sharded like its params); the bytes of the shards on device 0
are summed and compared with N=1 bytes / N ("computed": the same from shapes). One train step
(batch 8 x 128 tokens, `jax.jit(make_train_step(token_loss(model, mesh=mesh), ...), donate_argnums=0)` as the trainer
builds it) is compiled and run. Printed per N: XLA's per-device memory analysis of the compiled step
(arguments, outputs, aliased = donated outputs written over their inputs, temporaries; total =
arguments + outputs - aliased + temporaries) and the collectives in its optimized HLO (all-reduce,
reduce-scatter, all-gather: op count and the largest operand).

Part 2 (compiled, nothing allocated): the same step compiled with abstract inputs
(`jax.ShapeDtypeStruct`s carrying the shardings) for the standard sizes and, for a hidden-2048
family, for candidate layer counts, to find the largest model whose measured per-device step total
fits the budget. Layer counts are searched by interpolation (the step scans over layers, so its
memory is close to linear in them; see `most_layers`); each mesh size stops at the first standard
model that does not fit. The shapes-only estimate (params + grads + AdamW mu, nu at 16 B/param
split over fsdp, no temporaries) is printed beside it for comparison.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jft
from jft import sharding
from jft.objectives import token_loss
from jft.train import TrainState, make_optimizer, make_train_step

MiB, GiB = 2**20, 2**30
# (hidden, MLP, layers, heads, KV heads), vocab 32000: GPT-2-small-like 125M, 350M, TinyLlama 1.1B,
# OpenLLaMA 3B, Llama-2 7B and 13B.
STANDARD = {
    "125M": (768, 2048, 12, 12, 4),
    "350M": (1024, 2816, 24, 16, 8),
    "1.1B": (2048, 5632, 22, 32, 4),
    "3B": (3200, 8640, 26, 32, 32),
    "7B": (4096, 11008, 32, 32, 32),
    "13B": (5120, 13824, 40, 40, 40),
}
FAMILY = lambda layers: (2048, 5632, layers, 16, 8)
BATCH_KEYS = ("input_ids", "targets", "loss_weights", "segment_ids", "positions")
DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
COLLECTIVE = re.compile(r"= (.+?) (all-reduce|reduce-scatter|all-gather)(?:-start)?\(")


ROW = "{:4d}" + " {:10.1f}" * 3 + " {:7.3f}" + " {:10.1f}" * 6 + " {:7.4f} {:9.1f} {:7.1f}  mu: {}"


def llama(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int) -> jft.LlamaForCausalLM:
    shape = dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads)
    return jft.LlamaForCausalLM(jft.LlamaConfig(vocab_size=32000, num_key_value_heads=kv_heads, **shape))


def fsdp_mesh(n: int):
    return sharding.make_mesh(data=1, fsdp=n, tensor=1, devices=jax.devices()[:n])


def bytes_on(tree, device) -> int:
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def shard_bytes(model, mesh) -> tuple[int, int]:
    """(params, bytes of one device's shard of all params), from shapes only."""
    shapes, shards = model.param_shapes(), sharding.param_shardings(model, mesh)
    leaves = zip(jax.tree.leaves(shapes), jax.tree.leaves(shards), strict=True)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    return count, sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in leaves)


def step_memory(compiled) -> dict | None:
    """Per-device bytes of a compiled step from XLA's memory analysis (None where not reported)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    r = {
        "args": m.argument_size_in_bytes,
        "out": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
    }
    r["total"] = r["args"] + r["out"] - r["alias"] + r["temp"]  # donated outputs reuse their inputs' buffers
    return r


def collectives(hlo: str) -> dict:
    """``{kind: (ops, largest operand bytes)}`` over the optimized HLO text (an op in the layer loop counts once)."""
    out = {k: (0, 0) for k in ("all-reduce", "reduce-scatter", "all-gather")}
    for m in COLLECTIVE.finditer(hlo):
        sizes = [
            DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", m.group(1))
        ]
        ops, largest = out[m.group(2)]
        out[m.group(2)] = (ops + 1, max([largest, *sizes]))
    return out


def batch_specs(mesh, b: int, t: int) -> dict:
    shard = sharding.batch_sharding(mesh)
    dtype = lambda k: jnp.float32 if k == "loss_weights" else jnp.int32
    return {k: jax.ShapeDtypeStruct((1, b, t), dtype(k), sharding=shard) for k in BATCH_KEYS}


def abstract_state(model, mesh, tx) -> TrainState:
    """The trainer's TrainState as ShapeDtypeStructs with its shardings: params and AdamW mu, nu
    sharded by the rules, step counters and rng replicated (as `sharding.on_mesh` leaves them)."""
    shards = sharding.param_shardings(model, mesh)
    like = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    params = jax.tree.map(like, model.param_shapes(), shards)
    labels = jax.tree.map(lambda _: True, params)
    state = jax.eval_shape(lambda p: TrainState.create(p, labels, tx, jax.random.key(1)), params)
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt = optax.tree_map_params(tx, like, state.opt_state, shards, transform_non_params=lambda x: like(x, whole))
    return state.replace(step=like(state.step, whole), trainable=params, opt_state=opt, rng=like(state.rng, whole))


def compile_step(model, mesh, state, batch, tx, schedule):
    step = jax.jit(make_train_step(token_loss(model, mesh=mesh), tx, schedule), donate_argnums=0)
    return step.lower(state, batch).compile()


def measure(model, n: int, batch: dict) -> dict:
    """Params + AdamW state of ``model`` created sharded on an fsdp=n mesh; one train step."""
    mesh, dev0 = fsdp_mesh(n), jax.devices()[0]
    shards = sharding.param_shardings(model, mesh)
    params = model.init_params(jax.random.key(0), shards)  # created on its shards
    labels = jax.tree.map(lambda _: True, params)
    tx, schedule = make_optimizer(learning_rate=1e-4, total_steps=1000, warmup_steps=0)
    # As the trainer does: AdamW's mu and nu are zeros like (so sharded like) their params.
    state = sharding.on_mesh(TrainState.create(params, labels, tx, jax.random.key(1)), mesh)
    del params
    held = lambda s: bytes_on((s.trainable, s.frozen, s.opt_state), dev0)
    r = {"bytes": held(state), "computed": 3 * shard_bytes(model, mesh)[1]}
    r["mu_spec"] = str(state.opt_state[1].mu["model"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec)
    batch = sharding.put_batch(batch, sharding.batch_sharding(mesh))
    start = time.perf_counter()
    compiled = compile_step(model, mesh, state, batch, tx, schedule)
    r["compile_s"] = time.perf_counter() - start
    r["mem"], r["collectives"] = step_memory(compiled), collectives(compiled.as_text())
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    r["loss"], r["step_s"] = float(metrics["loss"]), time.perf_counter() - start
    r["after"] = held(state)
    del state, metrics, batch, compiled
    gc.collect()
    return r


def step_total(size: tuple, n: int, b: int, t: int, cache: dict) -> int:
    """Per-device bytes (memory-analysis total) of one train step of a Llama on an fsdp=n mesh, compiled
    from abstract inputs."""
    if (size, n) not in cache:
        model, mesh = llama(*size), fsdp_mesh(n)
        tx, schedule = make_optimizer(learning_rate=1e-4, total_steps=1000, warmup_steps=0)
        compiled = compile_step(model, mesh, abstract_state(model, mesh, tx), batch_specs(mesh, b, t), tx, schedule)
        cache[size, n] = step_memory(compiled)["total"]
        del compiled
        gc.collect()
    return cache[size, n]


def most_layers(n: int, budget: float, b: int, t: int, cache: dict, limit: int = 256) -> int:
    """Most layers of the hidden-2048 family whose measured step fits ``budget`` on an fsdp=n mesh (0 if
    one layer does not). The step's memory is close to linear in layers, so each probe is where the line
    through the two nearest measured counts crosses the budget, and the next its neighbour (+1 after a
    fit, -1 after a miss); that settles it in a few compiles where halving the range would take ~8."""
    need = lambda layers: step_total(FAMILY(layers), n, b, t, cache)
    if need(1) > budget:
        return 0
    if need(2) > budget:
        return 1
    fits, fails, other = 2, None, 1  # need(fits) <= budget < need(fails); other: the fit before fits
    last, neighbour = fits, False
    while fits < limit and (fails is None or fails - fits > 1):
        if neighbour:
            probe = last + 1 if last == fits else last - 1
        else:
            x = other if fails is None else fails
            slope = (need(x) - need(fits)) / (x - fits)
            probe = fits + int((budget - need(fits)) // max(slope, 1))
        probe = min(max(probe, fits + 1), (limit + 1 if fails is None else fails) - 1)
        if need(probe) <= budget:
            other, fits = fits, probe
        else:
            fails = probe
        last, neighbour = probe, not neighbour
    return fits


def shapes_only_layers(n: int, budget: float, limit: int = 256) -> int:
    """Most family layers whose params + grads + AdamW mu, nu (16 B/param split over fsdp) fit, from shapes."""
    layers = 0
    while layers < limit and 4 * shard_bytes(llama(*FAMILY(layers + 1)), fsdp_mesh(n))[1] <= budget:
        layers += 1
    return layers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--budget-gib", type=float, default=4.0)
    args = parser.parse_args()
    b, t, sizes = args.batch, args.seq, args.sizes
    lo, hi = sizes[0], sizes[-1]
    started = time.perf_counter()

    model = llama(*STANDARD["125M"])
    ids = np.random.default_rng(0).integers(3, 32000, (1, b, t + 1)).astype(np.int32)
    batch = {
        "input_ids": ids[..., :-1],
        "targets": ids[..., 1:],
        "loss_weights": np.ones((1, b, t), np.float32),
        "segment_ids": np.ones((1, b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)),
    }
    count = shard_bytes(model, fsdp_mesh(1))[0]
    print(
        f"Part 1: {count / 1e6:.1f}M-param Llama, float32, AdamW, full fine-tuning, batch {b} x {t}; jax "
        f"{jax.__version__}, {len(jax.devices())} CPU devices on {os.cpu_count()} cores. MiB on device 0; "
        "step_* from XLA's memory analysis of the compiled step (total = args + out - alias + temp):"
    )
    print(
        "   N params+opt   computed      ideal  /ideal after_step  step_args   step_out step_alias  step_temp "
        "step_total    loss compile_s  step_s"
    )
    rows = {}
    for n in sizes:
        r = rows[n] = measure(model, n, batch)
        ideal = rows[lo]["bytes"] * lo / n
        mem = r["mem"] or dict.fromkeys(("args", "out", "alias", "temp", "total"), float("nan"))
        mib = [x / MiB for x in (r["bytes"], r["computed"], ideal)]
        step = [mem[k] / MiB for k in ("args", "out", "alias", "temp", "total")]
        print(ROW.format(n, *mib, r["bytes"] / ideal, r["after"] / MiB, *step, r["loss"], r["compile_s"],
                         r["step_s"], r["mu_spec"]))  # fmt: skip
    if any(r["mem"] is None for r in rows.values()):
        print("memory_analysis() returned None on this backend: step memory not available")
    print("collectives in the optimized HLO (ops, largest operand MiB; an op in the layer loop counted once):")
    for n in sizes:
        cells = [f"{k} {ops} ({big / MiB:.1f})" for k, (ops, big) in rows[n]["collectives"].items()]
        print(f"  N={n}: " + ", ".join(cells))
    share, ideal = rows[hi]["bytes"] / rows[lo]["bytes"], lo / hi
    verdict = "met" if share / ideal <= 1.10 else "not met"
    print(
        f"per-device params+opt at N={hi}: {share:.4f}x of N={lo} (ideal {ideal:.4f}x; "
        f"{share / ideal:.3f}x of ideal; goal <= 1.10x: {verdict})"
    )
    if rows[lo]["mem"] and rows[hi]["mem"]:
        total = rows[hi]["mem"]["total"] / rows[lo]["mem"]["total"]
        print(f"per-device step total at N={hi}: {total:.4f}x of N={lo} (ideal {ideal:.4f}x)")
    print(f"part 1: {time.perf_counter() - started:.0f} s")

    budget, cache = args.budget_gib * GiB, {}
    print(
        f"\nPart 2: GiB per device of one train step (memory-analysis total), batch {b} x {t}, compiled from "
        f"abstract inputs; * = fits {args.budget_gib:g} GiB, '-' = not compiled (a smaller size did not fit)"
    )
    print(f"{'model':>6s} {'params':>8s} " + " ".join(f"{'N=' + str(n):>8s}" for n in sizes))
    cells, fits = {}, {n: "none" for n in sizes}
    for n in sizes:
        for name, size in STANDARD.items():  # STANDARD grows: stop at the first that does not fit
            need = cells[name, n] = step_total(size, n, b, t, cache)
            if need > budget:
                break
            fits[n] = name
    for name, size in STANDARD.items():
        row = [f"{cells[name, n] / GiB:7.2f}{'*' if cells[name, n] <= budget else ' '}" if (name, n) in cells
               else f"{'-':>8s}" for n in sizes]  # fmt: skip
        print(f"{name:>6s} {shard_bytes(llama(*size), fsdp_mesh(1))[0] / 1e9:7.2f}B " + " ".join(row))
    print("largest standard size that fits: " + ", ".join(f"N={n}: {fits[n]}" for n in sizes))
    print("hidden-2048 family (MLP 5632, 16 heads, 8 KV heads), most layers whose step fits:")
    largest = {}
    for n in sizes:
        layers = most_layers(n, budget, b, t, cache)
        largest[n] = shard_bytes(llama(*FAMILY(layers)), fsdp_mesh(1))[0] if layers else 0
        need = f"{cache[FAMILY(layers), n] / GiB:.2f} GiB" if layers else "-"
        over = cache.get((FAMILY(layers + 1), n))
        gain = largest[n] / max(largest[lo], 1)
        print(
            f"  N={n}: {layers:3d} layers, {largest[n] / 1e9:.2f}B params ({gain:.2f}x N={lo}), step {need}"
            + (f" ({layers + 1} layers: {over / GiB:.2f} GiB)" if over else "")
            + f"; shapes-only estimate {shapes_only_layers(n, budget)} layers"
        )
    print(
        f"largest model within {args.budget_gib:g} GiB/device: N={lo} {largest[lo] / 1e9:.2f}B -> N={hi} "
        f"{largest[hi] / 1e9:.2f}B params ({largest[hi] / max(largest[lo], 1):.2f}x; mesh {hi // lo}x); "
        f"{len(cache)} steps compiled, {time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
