"""Longest sequence whose LoRA train step fits a memory budget: jft vs transformers + peft (CPU), side by side.

    python benchmarks/bench_longest.py            # --budget-gib 3 --max-len 65536: longest length per side, ratio
    python benchmarks/bench_longest.py --budget-gib 0.5   # benchmarks/RESULTS.md's run: ~15 min on 2 cores

Same ~30M Llama shape on both sides (benchmarks/shapes.py, max_position_embeddings raised to
--max-len), float32, batch 1, LoRA r=8, alpha=16 on q/k/v/o/gate/up/down, AdamW over the LoRA
weights. Each side gets its best memory setting: transformers recomputes every decoder layer in
the backward pass (activation checkpointing, `activation_checkpointing_enable()`, the new name of
`gradient_checkpointing_enable()`) with sdpa attention; jft runs its defaults (remat
"nothing_saveable" per layer, attention "auto" = chunked flash attention off TPU/GPU, the loss
head in chunks) plus its long-context setting `model.mlp_chunk` = 512 (each layer's MLP over 512
positions at a time).

Every tested length runs in a fresh process that builds the model, runs one real train step and
reports its peak: the peak resident set size during the step (Linux VmHWM, reset through
/proc/self/clear_refs once the model is built, jft's step compiled ahead and freed heap pages
handed back) minus the resident size at that point. The same measure on both sides: what the
step adds to a process that holds the model (activations, gradients, AdamW state of the LoRA
weights, a few MiB). A length fits when the step ran and that peak stayed under the budget; the
parent watches each child and stops it once it is over the budget by 5% (it would not fit), or
after --step-timeout seconds (then the search of that side ends there). Lengths are searched by
doubling from 1024, then bisected to 256 tokens; the two sides search at the same time (memory is
per process; the printed step times then share the CPUs). MiB = 2**20 bytes.

glibc's malloc serves requests below its mmap threshold from heaps it keeps resident; the threshold
grows with every freed large block, up to 32 MiB, so activations of a few MiB to 32 MiB (torch's at
a few thousand tokens of this model) leave the peak inflated by freed, fragmented heap memory. The
children therefore run with MALLOC_MMAP_THRESHOLD_ = 1 MiB (a fixed threshold: larger blocks are
mapped and unmapped exactly), the better setting for both sides; --mmap-threshold 0 keeps glibc's default.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time

from shapes import LLAMA_30M

CHILD = "child"
MIB = 2**20
RANK, ALPHA = 8, 16.0
MLP_CHUNK = 512
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _status_mib(field: str, pid: str = "self") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB meaning KiB
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_peak() -> float:
    """Hand freed heap pages back (malloc_trim), reset VmHWM (clear_refs 5); the RSS in MiB."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def size(max_len: int) -> dict:
    return dict(LLAMA_30M, max_position_embeddings=max_len)


def jft_step(length: int, max_len: int, base_file: str) -> dict:
    """One jft LoRA train step of ``length`` tokens: the step's peak over the built model (MiB)."""
    import jax
    import numpy as np

    from jft import peft
    from jft.models.llama import LlamaConfig, LlamaForCausalLM
    from jft.objectives import token_loss
    from jft.train import TrainState, make_optimizer, make_train_step

    model = LlamaForCausalLM(LlamaConfig(**size(max_len), mlp_chunk=MLP_CHUNK))  # remat per layer, attention auto
    params = model.init_params(jax.random.key(0))
    spec = peft.Peft(lora=peft.Lora(r=RANK, alpha=ALPHA, targets=TARGETS))
    model, params = peft.inject(model, params, spec, jax.random.key(1))
    tx, schedule = make_optimizer(name="adamw", learning_rate=1e-4, total_steps=1000, clip_norm=None)
    state = TrainState.create(params, peft.labels(params, model.peft), tx, jax.random.key(2))
    del params
    ids = np.random.RandomState(0).randint(3, LLAMA_30M["vocab_size"], (1, 1, length + 1)).astype(np.int32)
    batch = {
        "input_ids": ids[..., :-1],
        "targets": ids[..., 1:],
        "loss_weights": np.ones((1, 1, length), np.float32),
        "segment_ids": np.ones((1, 1, length), np.int32),
        "positions": np.arange(length, dtype=np.int32)[None, None],
    }
    batch = jax.device_put(batch)
    step = jax.jit(make_train_step(token_loss(model), tx, schedule), donate_argnums=0).lower(state, batch).compile()
    mem = step.memory_analysis()
    base = _mark(base_file)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    loss = float(jax.block_until_ready(metrics)["loss"])
    return dict(
        step_s=time.perf_counter() - start,
        peak_mib=_status_mib("VmHWM") - base,
        loss=loss,
        xla_temp_mib=mem.temp_size_in_bytes / MIB,
        attention=_attention(model.config),
    )


def _attention(cfg) -> str:
    from jft.models import attention

    return attention.describe(cfg.attention, cfg.attention_chunk) + f"; MLP over {cfg.mlp_chunk}-position chunks"


def peft_step(length: int, max_len: int, base_file: str) -> dict:
    """One transformers + peft LoRA train step (activation checkpointing, sdpa): its peak (MiB)."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**size(max_len)), attn_implementation="sdpa").float()
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias) to this
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable()
    lora = LoraConfig(r=RANK, lora_alpha=int(ALPHA), lora_dropout=0.0, target_modules=list(TARGETS))
    model = get_peft_model(base, lora).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    ids = torch.tensor(np.random.RandomState(0).randint(3, LLAMA_30M["vocab_size"], (1, length + 1))).long()
    x, y = ids[:, :-1], ids[:, 1:]
    base_mib = _mark(base_file)
    start = time.perf_counter()
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, LLAMA_30M["vocab_size"]), y.reshape(-1))
    del logits
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return dict(
        step_s=time.perf_counter() - start,
        peak_mib=_status_mib("VmHWM") - base_mib,
        loss=loss.item(),
        attention=f"sdpa ({model.base_model.model.config._attn_implementation}), activation checkpointing on",
    )


def _mark(base_file: str) -> float:
    """Reset the peak and tell the watching parent the baseline (MiB) it is measured from."""
    base = reset_peak()
    with open(base_file, "w") as f:
        f.write(str(base))
    return base


SIDES = {"jft": jft_step, "peft": peft_step}


def run_child(side: str, length: int, args) -> dict:
    """Run one length in a fresh process, watching its resident memory: a dict with ``fits``."""
    base_file = tempfile.mktemp(prefix="bench_longest_")
    cmd = [sys.executable, __file__, CHILD, side, str(length), str(args.max_len), base_file]
    out = tempfile.TemporaryFile("w+")
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        why = _watch(proc, base_file, args)
    finally:
        if proc.poll() is None:  # interrupted: the child goes with its parent
            proc.kill()
            proc.wait()
    if os.path.exists(base_file):
        os.remove(base_file)
    out.seek(0)
    text = out.read()
    if why:
        return dict(fits=False, why=why, timeout="step-timeout" in why)
    if proc.returncode:
        return dict(fits=False, why=f"failed (exit {proc.returncode}): {text.strip().splitlines()[-1:]}")
    r = json.loads(text.strip().splitlines()[-1])
    r["fits"] = r["peak_mib"] <= args.budget_gib * 1024
    r["why"] = "" if r["fits"] else "over the budget"
    if "xla_temp_mib" in r:
        r["why"] += f" (XLA's plan: {r['xla_temp_mib']:.0f} MiB of temporaries)"
    return r


def _watch(proc, base_file: str, args) -> str:
    """Poll the child until it exits; kill it once it is over the budget or the time limit (why, else "")."""
    start, worst, why = time.perf_counter(), 0.0, ""
    limit = args.budget_gib * 1024 * 1.05
    while proc.poll() is None:
        time.sleep(0.1)
        try:
            base = float(open(base_file).read())
            worst = max(worst, _status_mib("VmRSS", str(proc.pid)) - base)
        except (OSError, ValueError, RuntimeError):  # not started measuring yet, or just exited
            base = None
        if base is not None and worst > limit:
            why = f"stopped over the budget ({worst:.0f} MiB resident over the baseline)"
        elif time.perf_counter() - start > args.step_timeout:
            why = f"stopped after {args.step_timeout:.0f} s (--step-timeout)"
        if why:
            proc.kill()
            proc.wait()
    return why


def search(side: str, args) -> dict:
    """Doubling from 1024 then bisection to 256 tokens: the longest length that fits (0: none)."""
    tried = {}

    def fits(length: int) -> bool:
        r = run_child(side, length, args)
        tried[length] = r
        peak = f"{r['peak_mib']:6.0f} MiB" if "peak_mib" in r else "     - MiB"
        step = f"{r['step_s']:6.1f} s" if "step_s" in r else "     - s"
        print(f"  {side:5s} {length:6d} tokens: {'fits' if r['fits'] else 'no  '} {peak} {step} {r['why']}")
        sys.stdout.flush()
        return r["fits"]

    lo, hi, length = 0, None, 1024
    while length <= args.max_len:
        if not fits(length):
            hi = length
            break
        lo, length = length, length * 2
    while hi is not None and hi - lo > 256 and not tried[hi].get("timeout"):
        mid = (lo + hi) // 2 // 256 * 256
        if fits(mid):
            lo = mid
        else:
            hi = mid
    capped = hi is None
    stopped = hi is not None and tried[hi].get("timeout", False)
    return dict(longest=lo, capped=capped, stopped=stopped, best=tried.get(lo, {}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=3.0, help="memory budget of the train step")
    parser.add_argument("--max-len", type=int, default=65536, help="longest length tried")
    parser.add_argument("--step-timeout", type=float, default=900.0, help="seconds per child before giving up")
    parser.add_argument("--sides", default="jft,peft")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=2**20,
        help="children's MALLOC_MMAP_THRESHOLD_ in bytes (0: glibc's default, a threshold that grows to 32 MiB)",
    )
    args = parser.parse_args()

    import torch

    print(
        f"LoRA r={RANK} alpha={ALPHA:g} on {', '.join(TARGETS)}; ~30M Llama (benchmarks/shapes.py), float32, "
        f"batch 1, AdamW; budget {args.budget_gib:g} GiB over the built model (peak RSS during the step); "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; lengths up to {args.max_len}; children's "
        f"MALLOC_MMAP_THRESHOLD_ {args.mmap_threshold or 'glibc default'}"
    )
    sides = args.sides.split(",")
    with concurrent.futures.ThreadPoolExecutor(len(sides)) as pool:  # each side's children run side by side
        results = dict(zip(sides, pool.map(lambda side: search(side, args), sides), strict=True))
    for side, r in results.items():
        note = " (the --max-len cap: longer may fit)" if r["capped"] else ""
        note += " (the search stopped at --step-timeout)" if r["stopped"] else ""
        how = r["best"].get("attention", "")
        print(f"{side:5s} longest fitting length: {r['longest']} tokens{note}; {how}")
    if {"jft", "peft"} <= results.keys() and results["peft"]["longest"]:
        ratio = results["jft"]["longest"] / results["peft"]["longest"]
        print(f"jft / peft longest length: {ratio:.2f}x (goal >= 2)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        side, length, max_len, base_file = sys.argv[2:6]
        print(json.dumps(SIDES[side](int(length), int(max_len), base_file)))
    else:
        main()
