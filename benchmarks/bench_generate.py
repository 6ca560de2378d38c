"""jft vs transformers (torch, CPU) on one random ~30M-parameter Llama: prefill and greedy decode.

    python benchmarks/bench_generate.py            # prints a table and the ratios

Both sides load the same safetensors folder, run the same left-to-right greedy decode of
``--new`` tokens for ``--batch`` prompts of ``--prompt`` tokens (no early EOS), in float32.
Compile time (jft) is measured separately and excluded from throughput; each timing is the
best of ``--repeats`` runs. Also reports the jit compile time of the forward pass at 4 and
16 layers (scan over layers keeps it flat).
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
from jft.generate import _bucket, _prefill

SIZE = LLAMA_30M


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def weight_stream_seconds(params, batch: int, repeats: int) -> float:
    """Time to read every matmul weight once, as a decode step must: a chain of [batch, in] x
    [in, out] products over separate per-layer buffers (no attention, no copies). Decoding
    cannot beat this floor on a memory-bound machine."""
    layers = params["model"]["layers"]
    mats = [np.asarray(k[i]) for k in jax.tree.leaves(layers) if k.ndim == 3 for i in range(k.shape[0])]
    mats = [jnp.asarray(m) for m in mats] + [params["lm_head"]["kernel"]]

    @jax.jit
    def chain(mats):
        acc = jnp.zeros((), jnp.float32)
        for w in mats:  # each product waits for the last, like the layers of a decode step
            acc = acc + ((jnp.ones((batch, w.shape[0])) + acc * 1e-9) @ w).sum()
        return acc

    jax.block_until_ready(chain(mats))
    return best(lambda: jax.block_until_ready(chain(mats)), repeats * 5)


def compile_seconds(layers: int, batch: int, length: int) -> float:
    cfg = jft.LlamaConfig(**{**SIZE, "num_hidden_layers": layers})
    model = jft.LlamaForCausalLM(cfg)
    shapes = {"params": model.param_shapes()}
    lowered = jax.jit(model.apply).lower(shapes, jax.ShapeDtypeStruct((batch, length), jnp.int32))
    start = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    b, t, n = args.batch, args.prompt, args.new

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**SIZE)).float().eval()
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    model, params = jft.load_hf(folder, dtype="float32")
    nparams = sum(x.size for x in jax.tree.leaves(params))
    ids = np.random.RandomState(0).randint(3, SIZE["vocab_size"], (b, t))
    tids = torch.tensor(ids)

    # --- transformers
    with torch.no_grad():
        hf_prefill = best(lambda: hf(tids, use_cache=True, logits_to_keep=1), args.repeats)
        gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        hf_out = hf.generate(tids, **gen)
        hf_total = best(lambda: hf.generate(tids, **gen), args.repeats)

    # --- jft (first call compiles; it is timed apart)
    mask = jnp.ones((b, t), bool)
    run_prefill = lambda: jax.block_until_ready(
        _prefill(model, params, jnp.asarray(ids), mask, _bucket(t) + _bucket(n))
    )
    start = time.perf_counter()
    run_prefill()
    jft_out = jax.block_until_ready(jft.generate(model, params, ids, n, eos_token_id=()))
    compile_s = time.perf_counter() - start
    jft_prefill = best(run_prefill, args.repeats)
    jft_total = best(lambda: jax.block_until_ready(jft.generate(model, params, ids, n, eos_token_id=())), args.repeats)
    same = np.array_equal(np.asarray(jft_out), hf_out[:, t:].numpy())

    rows = [
        ("prefill tokens/s", b * t / hf_prefill, b * t / jft_prefill),
        ("decode tokens/s", b * n / (hf_total - hf_prefill), b * n / (jft_total - jft_prefill)),
        ("generate end-to-end tokens/s", b * n / hf_total, b * n / jft_total),
    ]
    print(
        f"model: {nparams / 1e6:.1f}M params, float32; batch {b}, prompt {t}, new tokens {n}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs"
    )
    print(f"greedy tokens identical to transformers: {same}")
    print(f"{'metric':32s} {'transformers':>14s} {'jft':>14s} {'jft/hf':>8s}")
    for name, ref, ours in rows:
        print(f"{name:32s} {ref:14.1f} {ours:14.1f} {ours / ref:8.2f}x")
    floor = weight_stream_seconds(params, b, args.repeats)
    print(
        f"memory floor: reading all matmul weights once takes {floor * 1e3:.1f} ms, so no float32 decoder "
        f"exceeds {b / floor:.0f} tokens/s here ({b / floor / rows[1][1]:.2f}x transformers)"
    )
    print(f"jft first-call compile (prefill + decode loop): {compile_s:.1f} s")
    c4, c16 = compile_seconds(4, b, t), compile_seconds(16, b, t)
    print(f"forward compile: 4 layers {c4:.2f} s, 16 layers {c16:.2f} s, ratio {c16 / c4:.2f}")


if __name__ == "__main__":
    main()
