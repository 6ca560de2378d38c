"""Do small updates reach the weights? Mixed-precision settings of full fine-tuning, side by side.

    python benchmarks/bench_precision.py            # ~1-2 min on 2 CPU cores

The train step of a tiny random Llama (vocab 256, hidden 64, MLP 176, 2 layers, init std 0.02)
runs 30 steps with configs/full_fsdp_llama.py's optimizer settings (AdamW, peak lr 1e-5, cosine,
5% warmup, clip 1.0) on the same batch, once per precision setting. Printed per setting: how far
the weights moved against the float32 run (sum |w_30 - w_0| over the float32 run's, and the
relative error of the accumulated update, ||dw - dw_f32|| / ||dw_f32||), the share of the weights
that changed at all (of those that changed in float32) and the final loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

import jft
from jft import partition
from jft.config import load_config
from jft.objectives import token_loss
from jft.train import TrainState, make_train_step, optimizer_from_config

FSDP = Path(__file__).resolve().parent.parent / "configs" / "full_fsdp_llama.py"
# name: (param dtype, compute dtype, mu dtype, nu dtype, bf16_update); None = the param dtype
SETTINGS = {
    "float32": ("float32", "float32", None, None, "none"),
    "bf16 params + bf16 moments (old full_fsdp)": ("bfloat16", "bfloat16", None, None, "none"),
    "f32 masters + bf16 compute (full_fsdp)": ("float32", "bfloat16", "float32", "float32", "none"),
    "bf16 params + f32 moments + kahan": ("bfloat16", "bfloat16", "float32", "float32", "kahan"),
    "bf16 params + bf16 mu, f32 nu + kahan": ("bfloat16", "bfloat16", "bfloat16", "float32", "kahan"),
    "bf16 params + f32 moments + stochastic": ("bfloat16", "bfloat16", "float32", "float32", "stochastic"),
}


def run(setting, steps: int, batch: dict):
    param_dtype, compute_dtype, mu, nu, update = setting
    o = load_config(FSDP).optim
    config = jft.LlamaConfig.tiny(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        param_dtype=param_dtype,
        dtype=compute_dtype,
    )
    model = jft.LlamaForCausalLM(config)
    # the same start for every setting: float32 init, rounded to the param dtype
    init = jft.LlamaForCausalLM(dataclasses.replace(config, param_dtype="float32")).init_params(jax.random.key(0))
    params = jax.tree.map(lambda x: x.astype(param_dtype), init)
    labels = partition.labels(params, partition.FULL, config.num_hidden_layers)
    tx, schedule = optimizer_from_config(o, steps, mu_dtype=mu, nu_dtype=nu, bf16_update=update)
    step = jax.jit(make_train_step(token_loss(model), tx, schedule), donate_argnums=0)
    start = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
    state = TrainState.create(params, labels, tx, jax.random.key(1))
    for _ in range(steps):
        state, metrics = step(state, batch)
    end = [np.asarray(x, np.float32) for x in jax.tree.leaves(state.params)]
    return np.concatenate([(e - s).ravel() for e, s in zip(end, start, strict=True)]), float(metrics["loss"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (1, 8, 64)).astype(np.int32)
    batch = {
        "input_ids": ids,
        "targets": np.roll(ids, -1, -1),
        "loss_weights": np.ones(ids.shape, np.float32),
        "segment_ids": np.ones(ids.shape, np.int32),
        "positions": np.broadcast_to(np.arange(64, dtype=np.int32), ids.shape).copy(),
    }
    print(f"{args.steps} steps, lr {load_config(FSDP).optim.learning_rate:g} (configs/full_fsdp_llama.py optim)")
    print(f"{'setting':44s} {'moved vs f32':>12s} {'rel. error':>10s} {'changed':>8s} {'loss':>7s} {'s':>5s}")
    ref = None
    for name, setting in SETTINGS.items():
        t = time.perf_counter()
        delta, loss = run(setting, args.steps, batch)
        if ref is None:
            ref = delta
            moves = ref != 0  # embedding rows of tokens not in the batch get no gradient
        moved = np.abs(delta).sum() / np.abs(ref).sum()
        error = np.linalg.norm(delta - ref) / np.linalg.norm(ref)
        changed = np.mean(delta[moves] != 0)
        print(f"{name:44s} {moved:11.2f}x {error:10.3f} {changed:8.1%} {loss:7.4f} {time.perf_counter() - t:5.1f}")


if __name__ == "__main__":
    main()
