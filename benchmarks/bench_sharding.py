"""FSDP memory scaling: per-device params + optimizer state at mesh sizes 1, 2, 4, 8 (CPU, 8 virtual devices).

    python benchmarks/bench_sharding.py          # --sizes 1 2 4 8 --batch 8 --seq 128 --budget-gib 4

Part 1 (measured): a random 125M Llama (vocab 32000, hidden 768, MLP 2048, 12 layers, 12 heads,
4 KV heads, default remat), float32, full fine-tuning with AdamW, on a data=1 x fsdp=N x tensor=1
mesh. Params are created sharded (`model.init_params(rng, shardings)`), the TrainState as the
trainer makes it (optimizer state sharded like its params); the bytes of the shards on device 0 are
summed and compared with N=1 bytes / N ("computed": the same from shapes, as in part 2). One train
step (batch 8 x 128 tokens, `make_train_step(..., mesh=mesh)`) is compiled and run; XLA's
per-device memory analysis of it (arguments, temporaries) is printed, and the state's bytes after.

Part 2 (computed, nothing allocated): for a per-device budget, the largest Llama whose params +
grads + AdamW mu and nu (float32: 16 bytes per param, all split over fsdp) fit on one device,
from `model.param_shapes()` and each sharding's `shard_shape`. Activations are not counted.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jft  # noqa: E402
from jft import sharding  # noqa: E402
from jft.train import TrainState, make_optimizer, make_train_step  # noqa: E402

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
FAMILY = lambda layers: (2048, 5632, layers, 16, 8)  # noqa: E731


ROW = "{:4d}" + " {:10.1f}" * 3 + " {:7.3f}" + " {:10.1f}" * 3 + " {:7.4f} {:10.1f} {:7.1f}  mu: {}"


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
    held = lambda s: bytes_on((s.trainable, s.frozen, s.opt_state), dev0)  # noqa: E731
    r = {"bytes": held(state), "computed": 3 * shard_bytes(model, mesh)[1]}
    r["mu_spec"] = str(state.opt_state[1].mu["model"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec)
    batch = sharding.put_batch(batch, sharding.batch_sharding(mesh))
    start = time.perf_counter()
    step = jax.jit(make_train_step(model, tx, schedule, mesh=mesh), donate_argnums=0)
    compiled = step.lower(state, batch).compile()
    r["compile_s"] = time.perf_counter() - start
    r["mem"] = compiled.memory_analysis()  # None where the backend does not report it
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    r["loss"], r["step_s"] = float(metrics["loss"]), time.perf_counter() - start
    r["after"] = held(state)
    del state, metrics, batch
    gc.collect()
    return r


def state_bytes(size: tuple, n: int) -> tuple[int, int]:
    """(params, per-device bytes of params + grads + AdamW mu, nu) of a Llama on an fsdp=n mesh."""
    count, per_device = shard_bytes(llama(*size), fsdp_mesh(n))
    return count, 4 * per_device


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--budget-gib", type=float, default=4.0)
    args = parser.parse_args()
    b, t, sizes = args.batch, args.seq, args.sizes
    lo, hi = sizes[0], sizes[-1]

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
        f"{jax.__version__}, {len(jax.devices())} CPU devices on {os.cpu_count()} cores. MiB on device 0:"
    )
    print("   N params+opt   computed      ideal  /ideal after_step  step_args  step_temp    loss  compile_s  step_s")
    rows = {}
    for n in sizes:
        r = rows[n] = measure(model, n, batch)
        ideal = rows[lo]["bytes"] * lo / n
        mem = r["mem"]  # nan where memory_analysis() is None
        step_mem = (mem.argument_size_in_bytes, mem.temp_size_in_bytes) if mem else (float("nan"),) * 2
        mib = [x / MiB for x in (r["bytes"], r["computed"], ideal)]
        print(ROW.format(n, *mib, r["bytes"] / ideal, r["after"] / MiB, *(x / MiB for x in step_mem), r["loss"],
                         r["compile_s"], r["step_s"], r["mu_spec"]))  # fmt: skip
    if any(r["mem"] is None for r in rows.values()):
        print("memory_analysis() returned None on this backend: step args/temp not available")
    share, ideal = rows[hi]["bytes"] / rows[lo]["bytes"], lo / hi
    verdict = "met" if share / ideal <= 1.10 else "not met"
    print(
        f"per-device params+opt at N={hi}: {share:.4f}x of N={lo} (ideal {ideal:.4f}x; "
        f"{share / ideal:.3f}x of ideal; goal <= 1.10x: {verdict})"
    )

    budget = args.budget_gib * GiB
    print(
        f"\nPart 2: GiB per device of params + grads + AdamW mu, nu (float32, 16 B/param, split over fsdp), "
        f"* = fits {args.budget_gib:g} GiB"
    )
    print(f"{'model':>6s} {'params':>8s} " + " ".join(f"{'N=' + str(n):>8s}" for n in sizes))
    fits = {n: "none" for n in sizes}
    for name, size in STANDARD.items():
        cells = []
        for n in sizes:
            count, need = state_bytes(size, n)
            cells.append(f"{need / GiB:7.2f}{'*' if need <= budget else ' '}")
            fits[n] = name if need <= budget else fits[n]  # STANDARD grows, so the last fit is the largest
        print(f"{name:>6s} {count / 1e9:7.2f}B " + " ".join(cells))
    print("largest standard size that fits: " + ", ".join(f"N={n}: {fits[n]}" for n in sizes))
    print("hidden-2048 family (MLP 5632, 16 heads, 8 KV heads), most layers that fit:")
    largest = {}
    for n in sizes:
        layers = 0
        while layers < 256 and state_bytes(FAMILY(layers + 1), n)[1] <= budget:
            layers += 1
        largest[n] = state_bytes(FAMILY(layers), n)[0] if layers else 0
        gain = largest[n] / max(largest[lo], 1)
        print(f"  N={n}: {layers:3d} layers, {largest[n] / 1e9:.2f}B params ({gain:.2f}x N={lo})")
    print(
        f"largest model within {args.budget_gib:g} GiB/device: N={lo} {largest[lo] / 1e9:.2f}B -> N={hi} "
        f"{largest[hi] / 1e9:.2f}B params ({largest[hi] / max(largest[lo], 1):.2f}x; mesh {hi // lo}x)"
    )


if __name__ == "__main__":
    main()
