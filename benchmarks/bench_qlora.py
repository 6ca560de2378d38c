"""QLoRA vs LoRA on bfloat16 weights: bytes of the weights, peak memory and time of a train step.

    python benchmarks/bench_qlora.py            # --layers 4 --hidden 1024 --mlp 4096 --batch 2 --seq 64

A random Llama whose linear weights dominate its memory is saved once as a bfloat16 Hugging Face
folder. Then two fresh processes each load it (`jft.load_hf`, NF4 with double quantization for
QLoRA: quantized tensor by tensor while loading), add LoRA r=8 on every decoder linear, and run
train steps (AdamW, float32 compute). Each reports the bytes of its params, its step time and
its peak resident memory (Linux VmHWM, reset with /proc/self/clear_refs after start-up): of the
load, and of the train steps after the first (compiling) one: the params plus everything the
steps add.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

CHILD = "child"


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """Reset the peak resident set size (Linux: clear_refs 5); returns the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def child(folder: str, quantize: str, batch: int, seq: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jft
    from jft import peft, quant
    from jft.train import TrainState, make_optimizer, make_train_step

    jnp.zeros(1).block_until_ready()  # the runtime itself is part of the baseline
    base = reset_peak()
    model, params = jft.load_hf(folder, compute_dtype="float32", remat="none", quantize=quantize or None)
    is_q = lambda x: isinstance(x, quant.QuantizedWeight)  # noqa: E731
    kernels = [
        x
        for path, x in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_q)
        if "layers" in jax.tree_util.keystr(path) and jax.tree_util.keystr(path).endswith("['kernel']")
    ]
    result = {
        "linear_bytes": sum(quant.quantized_bytes(k) for k in kernels),
        "model_bytes": quant.quantized_bytes(params),
        "load_peak_mb": peak_mb() - base,
    }

    model, params = peft.inject(model, params, peft.Peft(lora=peft.Lora(r=8, alpha=16.0)), jax.random.key(0))
    tx, schedule = make_optimizer(learning_rate=1e-4, total_steps=1000, clip_norm=None)
    state = TrainState.create(params, peft.labels(params, model.peft), tx, jax.random.key(1))
    del params
    step = jax.jit(make_train_step(model, tx, schedule), donate_argnums=0)
    ids = np.random.RandomState(0).randint(3, model.config.vocab_size, (batch, seq + 1)).astype(np.int32)
    batch_ = {
        "input_ids": ids[None, :, :-1],
        "targets": ids[None, :, 1:],
        "loss_weights": np.ones((1, batch, seq), np.float32),
        "segment_ids": np.ones((1, batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)),
    }
    state, metrics = step(state, batch_)  # compiles: XLA's working memory is not the step's
    jax.block_until_ready(metrics)
    base = reset_peak() - result["model_bytes"] / 1e6  # the steps' peak, counting the params they hold
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch_)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return dict(result, step_s=min(times), peak_mb=peak_mb() - base)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import jax

    import jft

    cfg = jft.LlamaConfig(
        vocab_size=8192,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128,
        param_dtype="bfloat16",
        dtype="bfloat16",
    )
    model = jft.LlamaForCausalLM(cfg)
    folder = tempfile.mkdtemp()
    jft.save_hf(model, model.init_params(jax.random.key(0)), folder)
    results = {}
    for name, quantize in (("lora_bf16", ""), ("qlora_nf4", "nf4")):
        cmd = [sys.executable, __file__, CHILD, folder, quantize, str(args.batch), str(args.seq), str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    lora, qlora = results["lora_bf16"], results["qlora_nf4"]
    print(
        f"Llama {args.layers} layers, hidden {args.hidden}, MLP {args.mlp}, vocab 8192, bfloat16 weights; "
        f"LoRA r=8 on all decoder linears; batch {args.batch} x {args.seq}, float32 compute; jax {jax.__version__}"
    )
    print(f"{'':12s} {'linear MB':>10s} {'model MB':>9s} {'load peak MB':>13s} {'step peak MB':>13s} {'s/step':>7s}")
    for name, r in results.items():
        print(
            f"{name:12s} {r['linear_bytes'] / 1e6:10.1f} {r['model_bytes'] / 1e6:9.1f} {r['load_peak_mb']:13.0f} "
            f"{r['peak_mb']:13.0f} {r['step_s']:7.3f}"
        )
    print(
        f"quantized linear bytes / bf16: {qlora['linear_bytes'] / lora['linear_bytes']:.3f}x (goal <= 0.27); "
        f"whole model: {qlora['model_bytes'] / lora['model_bytes']:.3f}x"
    )
    print(f"peak memory of the train step QLoRA / LoRA: {qlora['peak_mb'] / lora['peak_mb']:.2f}x (goal <= 0.45)")
    print(f"step time QLoRA / LoRA: {qlora['step_s'] / lora['step_s']:.2f}x (goal <= 1.3)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        folder, quantize, batch, seq, steps = sys.argv[2:7]
        print(json.dumps(child(folder, quantize, int(batch), int(seq), int(steps))))
    else:
        main()
