"""Full fine-tuning train-step throughput: jft vs transformers + torch AdamW (CPU), side by side.

    python benchmarks/bench_train.py             # prints tokens/s, the ratio and achieved FLOP/s

Same random ~30M Llama on both sides (vocab 8192, hidden 512, MLP 1408, 8 layers, 8 heads,
4 KV heads), float32, batch 8 x 256 tokens, AdamW, no activation checkpointing on either side.
Also times float32 matmuls at the model's own shapes to give this CPU's matmul peak, and
reports the fraction of it each side achieves (model FLOPs: 6 x matmul params x tokens plus
attention).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from shapes import LLAMA_30M
from transformers import AutoModelForCausalLM, LlamaConfig

import jft
from jft import partition
from jft.objectives import token_loss
from jft.train import TrainState, make_optimizer, make_train_step

SIZE = LLAMA_30M


def model_flops_per_step(batch: int, seq: int) -> float:
    h, m, n_layers, v = SIZE["hidden_size"], SIZE["intermediate_size"], SIZE["num_hidden_layers"], SIZE["vocab_size"]
    kv = h * SIZE["num_key_value_heads"] // SIZE["num_attention_heads"]
    matmul_params = n_layers * (2 * h * h + 2 * h * kv + 3 * h * m) + h * v
    attention = n_layers * 2 * 2 * seq * h  # q.k and p.v per token, forward
    return 3 * batch * seq * (2 * matmul_params + attention)  # backward = 2 x forward


def matmul_peak(batch: int, seq: int) -> float:
    """Best float32 FLOP/s of XLA on the model's matmul shapes (forward-style [tokens, in] x [in, out])."""
    h, m, v = SIZE["hidden_size"], SIZE["intermediate_size"], SIZE["vocab_size"]
    shapes = [(h, h), (h, m), (m, h), (h, v)]
    t = batch * seq
    best = 0.0
    for k, n in shapes:
        a, b = jnp.ones((t, k)), jnp.ones((k, n))
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()
        start = time.perf_counter()
        for _ in range(10):
            f(a, b).block_until_ready()
        best = max(best, 2 * t * k * n * 10 / (time.perf_counter() - start))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    b, t = args.batch, args.seq
    rs = np.random.RandomState(0)
    ids = rs.randint(3, SIZE["vocab_size"], (b, t + 1))

    # --- transformers + torch AdamW
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**SIZE)).float().train()
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.0)
    x, y = torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:])

    def hf_step():
        loss = torch.nn.functional.cross_entropy(hf(x).logits.view(-1, SIZE["vocab_size"]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    hf_step()
    start = time.perf_counter()
    for _ in range(args.steps):
        hf_step()
    hf_time = (time.perf_counter() - start) / args.steps

    # --- jft
    model, params = jft.load_hf(folder, dtype="float32", remat="none")
    labels = partition.labels(params, partition.FULL)
    tx, schedule = make_optimizer(name="adamw", learning_rate=1e-4, total_steps=1000, clip_norm=None)
    state = TrainState.create(params, labels, tx, jax.random.key(0))
    step = jax.jit(make_train_step(token_loss(model), tx, schedule), donate_argnums=0)
    batch = {
        "input_ids": ids[None, :, :-1].astype(np.int32),
        "targets": ids[None, :, 1:].astype(np.int32),
        "loss_weights": np.ones((1, b, t), np.float32),
        "segment_ids": np.ones((1, b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)).copy(),
    }
    batch = jax.tree.map(jnp.asarray, batch)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    jft_time = (time.perf_counter() - start) / args.steps

    flops = model_flops_per_step(b, t)
    peak = matmul_peak(b, t)
    print(
        f"model: {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params, float32; batch {b} x {t} tokens, "
        f"AdamW; jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'':14s} {'s/step':>8s} {'tokens/s':>10s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for name, sec in (("transformers", hf_time), ("jft", jft_time)):
        print(f"{name:14s} {sec:8.3f} {b * t / sec:10.0f} {flops / sec / 1e9:8.1f} {flops / sec / peak:8.2f}")
    print(
        f"jft / transformers tokens/s: {hf_time / jft_time:.2f}x; f32 matmul peak at the model's shapes: "
        f"{peak / 1e9:.1f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
