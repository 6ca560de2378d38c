"""QLoRA vs LoRA on bfloat16 weights: bytes of the weights, peak memory and time of a train step.

    python benchmarks/bench_qlora.py            # --layers 4 --hidden 1024 --mlp 4096 --batch 2 --seq 64
    python benchmarks/bench_qlora.py --compute float32 --repeats 2   # the float32-compute variant

A random Llama whose linear weights dominate its memory is saved once as a bfloat16 Hugging Face
folder. Then fresh processes each load it (`jft.load_hf`, NF4 with double quantization for
QLoRA: quantized tensor by tensor while loading), add LoRA r=8 on every decoder linear, and run
train steps (AdamW). Both sides compute in bfloat16 by default, as configs/lora_llama.py and
configs/qlora_llama.py do (float32 compute on bf16 weights, --compute float32, converts every
weight to float32: not how LoRA is run). The two sides alternate, --repeats times each, and the
fastest step and largest resident peak of each side are reported (the machine may be shared: the 1-minute load average
before each child is printed, and the CPU time of a step beside its wall time). Each child
reports the bytes of its params, its step time, its peak resident memory (Linux VmHWM, reset
with /proc/self/clear_refs after start-up) of the load and of the train steps after a first,
warm-up one (the params plus everything the steps add), and XLA's own plan of the step's
memory (arguments + outputs - donated aliases + temporaries, from the compiled step's
memory_analysis). All memory is in MiB (2**20 bytes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = "child"


MIB = 2**20


def _status_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # the kernel reports kB meaning KiB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """Reset the peak resident set size (Linux: clear_refs 5); returns the current RSS in MiB.

    Freed heap pages are first handed back to the kernel (glibc malloc_trim), so memory that
    compiling freed but kept resident is neither counted in the baseline nor silently reused."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def peak_mib() -> float:
    return _status_mib("VmHWM")


def child(folder: str, quantize: str, compute: str, batch: int, seq: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jft
    from jft import peft, quant
    from jft.objectives import token_loss
    from jft.train import TrainState, make_optimizer, make_train_step

    jnp.zeros(1).block_until_ready()  # the runtime itself is part of the baseline
    base = reset_peak()
    model, params = jft.load_hf(folder, compute_dtype=compute, remat="none", quantize=quantize or None)
    is_q = lambda x: isinstance(x, quant.QuantizedWeight)
    kernels = [
        x
        for path, x in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_q)
        if "layers" in jax.tree_util.keystr(path) and jax.tree_util.keystr(path).endswith("['kernel']")
    ]
    result = {
        "linear_bytes": sum(quant.quantized_bytes(k) for k in kernels),
        "model_bytes": quant.quantized_bytes(params),
        "load_peak_mib": peak_mib() - base,
    }

    model, params = peft.inject(model, params, peft.Peft(lora=peft.Lora(r=8, alpha=16.0)), jax.random.key(0))
    tx, schedule = make_optimizer(learning_rate=1e-4, total_steps=1000, clip_norm=None)
    state = TrainState.create(params, peft.labels(params, model.peft), tx, jax.random.key(1))
    del params
    step = jax.jit(make_train_step(token_loss(model), tx, schedule), donate_argnums=0)
    ids = np.random.RandomState(0).randint(3, model.config.vocab_size, (batch, seq + 1)).astype(np.int32)
    batch_ = {
        "input_ids": ids[None, :, :-1],
        "targets": ids[None, :, 1:],
        "loss_weights": np.ones((1, batch, seq), np.float32),
        "segment_ids": np.ones((1, batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)),
    }
    step = step.lower(state, batch_).compile()  # XLA's working memory while compiling is not the step's
    mem = step.memory_analysis()  # XLA's buffer plan: deterministic, unlike the resident set
    xla_bytes = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    xla_bytes += mem.temp_size_in_bytes
    state, metrics = step(state, batch_)
    jax.block_until_ready(metrics)
    base = reset_peak() - result["model_bytes"] / MIB  # the steps' peak, counting the params they hold
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        state, metrics = step(state, batch_)
        jax.block_until_ready(metrics)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return dict(result, step_s=min(wall), step_cpu_s=min(cpu), peak_mib=peak_mib() - base, xla_mib=xla_bytes / MIB)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compute", default="bfloat16", help="compute dtype of both sides")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per side, alternating")
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
    sides = (("lora_bf16", ""), ("qlora_nf4", "nf4"))
    runs = {name: [] for name, _ in sides}
    print(
        f"Llama {args.layers} layers, hidden {args.hidden}, MLP {args.mlp}, vocab 8192, bfloat16 weights; "
        f"LoRA r=8 on all decoder linears; batch {args.batch} x {args.seq}, {args.compute} compute; "
        f"jax {jax.__version__}; MiB = 2**20 bytes"
    )
    for repeat in range(args.repeats):
        for name, quantize in sides:
            load = os.getloadavg()[0]
            cmd = [sys.executable, __file__, CHILD, folder, quantize, args.compute]
            cmd += [str(args.batch), str(args.seq), str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            runs[name].append(r)
            print(
                f"  run {repeat + 1} {name:10s} load average {load:5.2f}: {r['step_s']:.3f} s/step, "
                f"{r['step_cpu_s']:.3f} CPU s/step, step peak {r['peak_mib']:.0f} MiB resident, "
                f"{r['xla_mib']:.0f} MiB XLA plan"
            )
    # Bytes and XLA's plan are deterministic. Of the noisy measures, each side reports its fastest
    # step (the least disturbed by other load on a shared machine) and its largest resident peak.
    results = {}
    for name, rs in runs.items():
        results[name] = dict(rs[0], step_s=min(r["step_s"] for r in rs), peak_mib=max(r["peak_mib"] for r in rs))
        results[name]["step_cpu_s"] = min(r["step_cpu_s"] for r in rs)
    lora, qlora = results["lora_bf16"], results["qlora_nf4"]
    print(
        f"{'':10s} {'linear MiB':>10s} {'model MiB':>9s} {'load peak MiB':>13s} {'step peak MiB':>13s} "
        f"{'XLA plan MiB':>12s} {'s/step':>7s} {'CPU s/step':>10s}"
    )
    for name, r in results.items():
        print(
            f"{name:10s} {r['linear_bytes'] / MIB:10.1f} {r['model_bytes'] / MIB:9.1f} {r['load_peak_mib']:13.0f} "
            f"{r['peak_mib']:13.0f} {r['xla_mib']:12.0f} {r['step_s']:7.3f} {r['step_cpu_s']:10.3f}"
        )
    print(
        f"quantized linear bytes / bf16: {qlora['linear_bytes'] / lora['linear_bytes']:.3f}x (goal <= 0.27); "
        f"whole model: {qlora['model_bytes'] / lora['model_bytes']:.3f}x"
    )
    print(
        f"peak memory of the train step QLoRA / LoRA: {qlora['peak_mib'] / lora['peak_mib']:.2f}x resident, "
        f"{qlora['xla_mib'] / lora['xla_mib']:.2f}x XLA plan (goal <= 0.45)"
    )
    print(
        f"step time QLoRA / LoRA: {qlora['step_s'] / lora['step_s']:.2f}x wall, "
        f"{qlora['step_cpu_s'] / lora['step_cpu_s']:.2f}x CPU (goal <= 1.3)"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        folder, quantize, compute, batch, seq, steps = sys.argv[2:8]
        print(json.dumps(child(folder, quantize, compute, int(batch), int(seq), int(steps))))
    else:
        main()
