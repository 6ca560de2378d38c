"""Accelerator training throughput: ~1B full fine-tuning and 8B QLoRA, jft vs transformers + peft, side by side.

    python benchmarks/bench_accel.py                # on a GPU/TPU: the two cases below, each side in a fresh process
    python benchmarks/bench_accel.py --seq 4096     # full fine-tuning at 4k tokens (batch 16384 // seq rows)
    python benchmarks/bench_accel.py --small        # a tiny shape of both cases, any backend (the default on CPU)

Cases (random weights, built on the device; the 8B base is quantized one layer at a time inside
jit, never held in float32, nor on the host):

- ``full``: a Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocab
  128256, tied embeddings), every weight trained, float32 master weights and AdamW moments, bfloat16 compute,
  --seq tokens (default 2048) x 16384 // seq rows.
- ``qlora``: a Llama-3-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab
  128256), decoder linears in NF4 with double quantization (blocks of 64), LoRA r=16, alpha=32
  on q/k/v/o/gate/up/down, bfloat16 compute, 2 x 2048 tokens.

jft runs as configs/full_ft_llama.py and configs/qlora_llama.py do (QLoRA: bfloat16 LoRA weights
with the Kahan-compensated update and float32 moments), attention "auto" (cuDNN flash attention
on GPU, splash on TPU, chunked flash attention in XLA on CPU) and its chunked loss head.
transformers runs eager PyTorch with sdpa attention, torch.autocast(bfloat16) over float32
weights (full) or bitsandbytes Linear4bit NF4 layers with peft LoRA (float32 LoRA weights, as
peft makes them), torch AdamW (fused on CUDA). No clipping, no weight decay, no dropout; neither
side recomputes activations unless --remat layer (jft remat "nothing_saveable", transformers
activation checkpointing). On CPU the torch side runs --small only (QLoRA
where bitsandbytes imports); a side that cannot run says why and is skipped.

Per case and side: tokens/s of the best of --steps steps after the first (which compiles),
MFU = model FLOPs per step / (step time x the chip's dense bf16 peak, table PEAK_BF16; n/a for
chips not in it, CPUs included), the formula used, the peak memory (jax: device memory_stats
peak_bytes_in_use since process start, or where a backend has no such counter the compiled step's
memory_analysis: arguments + outputs - donated aliases + temporaries; torch:
torch.cuda.max_memory_allocated after the model is built; n/a on CPU), and what attention and
loss head ran. MiB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

CHILD = "child"
MIB = 2**20
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_theta=500000.0,
    tie_word_embeddings=True,  # as Llama-3.2-1B: the lm_head is the embedding table
)
LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
SMALL = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
LORA_R, LORA_ALPHA = 16, 32.0

# Dense bfloat16 peak FLOP/s per chip (vendor figures, no sparsity), matched against the device name.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 SXM", 989e12),
    ("H100 80GB HBM3", 989e12),  # the SXM part's device name
    ("A100", 312e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops(kind: str) -> float | None:
    for name, flops in PEAK_BF16:
        if name.lower() in kind.lower():
            return flops
    if kind.strip() == "TPU v5":  # v5p reports itself as "TPU v5"
        return 459e12
    return None


def cases(args) -> dict:
    """name -> the shape, method, batch, length and attention block of each case."""
    if args.small:
        # 128-token attention blocks, so that 256 tokens take the blockwise path (not the one-block one)
        small = dict(shape=SMALL, batch=2, seq=256, chunk=128, small=True, title="tiny Llama (--small)")
        return {"full": dict(small, method="full"), "qlora": dict(small, method="qlora")}
    return {
        "full": dict(
            shape=LLAMA_1B,
            method="full",
            batch=max(1, 16384 // args.seq),
            seq=args.seq,
            chunk=512,
            title="Llama-3.2-1B",
        ),
        "qlora": dict(shape=LLAMA_8B, method="qlora", batch=2, seq=2048, chunk=512, title="Llama-3-8B"),
    }


def matmul_params(shape: dict) -> int:
    """Weights that enter a matmul per token: the decoder linears and the head (tied or not; not the lookup)."""
    h, m, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    q = h  # heads x head_dim
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return n * (2 * h * q + 2 * h * kv + 3 * h * m) + h * shape["vocab_size"]


def lora_params(shape: dict, r: int) -> int:
    h, m, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    dims = [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]
    return n * r * sum(i + o for i, o in dims)


def model_flops(case: dict) -> tuple[float, str]:
    """Model FLOPs of one train step and the formula, in words (PaLM's convention: attention counted
    over the whole seq x seq score matrix, the causal mask's half included; no recomputation)."""
    shape, b, t = case["shape"], case["batch"], case["seq"]
    tokens, n, layers, h = b * t, matmul_params(shape), shape["num_hidden_layers"], shape["hidden_size"]
    attention = 12 * layers * t * h * tokens
    head = f"12 x {layers} layers x {t} seq x {h} hidden x {tokens:,d} tokens (attention, fwd+bwd)"
    if case["method"] == "full":
        return 6 * n * tokens + attention, f"6 x {n:,d} matmul params x {tokens:,d} tokens + {head}"
    n_lora = lora_params(shape, LORA_R)
    text = (
        f"4 x {n:,d} frozen matmul params x {tokens:,d} tokens (forward + input gradients; their weight "
        f"gradients are not computed, so not counted, nor is dequantization) + 6 x {n_lora:,d} LoRA params "
        f"x {tokens:,d} tokens + {head}"
    )
    return 4 * n * tokens + 6 * n_lora * tokens + attention, text


def batch_ids(case: dict):
    import numpy as np

    b, t = case["batch"], case["seq"]
    return np.random.RandomState(0).randint(3, case["shape"]["vocab_size"], (b, t + 1)).astype(np.int32)


def time_steps(step, steps: int) -> dict:
    """``first``: seconds of the first (compiling) call of the blocking ``step``; ``sec``: best of ``steps`` after."""
    start = time.perf_counter()
    step()
    first, times = time.perf_counter() - start, []
    for _ in range(max(1, steps)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(first=first, sec=min(times))


# ---------------------------------------------------------------------------- jft


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal_nf4(key, shape, dtype):
    """A stack ``[layers, in, out]`` of random kernels in NF4, drawn and quantized a layer at a time."""
    from jft import quant

    def one(k):
        w = (0.02 * jax.random.normal(k, shape[1:], jnp.float32)).astype(dtype)
        return quant.quantize(w, "nf4", 64, True)

    return jax.lax.map(one, jax.random.split(key, shape[0]))


def random_params(model, key, quantize: bool) -> dict:
    """normal(0.02) weights and unit norms, a leaf at a time on the default device; decoder
    kernels quantized to NF4 (double quant) when ``quantize``, as jft.load_hf(quantize="nf4") stores them."""
    import flax

    out = {}
    for i, (path, spec) in enumerate(flax.traverse_util.flatten_dict(model.param_shapes()).items()):
        k = jax.random.fold_in(key, i)
        if path[-1] == "scale":
            out[path] = jnp.ones(spec.shape, spec.dtype)
        elif quantize and path[-1] == "kernel" and "layers" in path:
            out[path] = jax.block_until_ready(_normal_nf4(k, spec.shape, spec.dtype))
        else:
            out[path] = jax.block_until_ready(_normal(k, spec.shape, spec.dtype))
    return flax.traverse_util.unflatten_dict(out)


def bench_jft(case: dict, steps: int, remat: bool) -> dict:
    """jft's train step (make_train_step) on the case: timing, memory, what attention and loss ran."""
    import numpy as np

    import jft
    from jft import losses, partition, peft
    from jft.models import attention
    from jft.objectives import token_loss
    from jft.train import TrainState, make_optimizer, make_train_step

    qlora = case["method"] == "qlora"
    cfg = jft.LlamaConfig(
        **case["shape"],
        max_position_embeddings=max(8192, case["seq"]),
        dtype="bfloat16",
        param_dtype="bfloat16" if qlora else "float32",
        remat="nothing_saveable" if remat else "none",
        attention_chunk=case["chunk"],
    )
    model = jft.LlamaForCausalLM(cfg)
    params = random_params(model, jax.random.key(0), quantize=qlora)
    if qlora:
        spec = peft.Peft(lora=peft.Lora(r=LORA_R, alpha=LORA_ALPHA, targets=TARGETS))
        model, params = peft.inject(model, params, spec, jax.random.key(1))
        labels = peft.labels(params, model.peft)
        opt = dict(learning_rate=2e-4, mu_dtype=jnp.float32, nu_dtype=jnp.float32, bf16_update="kahan")
    else:
        labels = partition.labels(params, partition.FULL)
        opt = dict(learning_rate=1e-5)
    tx, schedule = make_optimizer(name="adamw", total_steps=1000, clip_norm=None, **opt)
    state = TrainState.create(params, labels, tx, jax.random.key(2))
    del params
    trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
    ids, (b, t) = batch_ids(case), (case["batch"], case["seq"])
    batch = {
        "input_ids": ids[None, :, :-1],
        "targets": ids[None, :, 1:],
        "loss_weights": np.ones((1, b, t), np.float32),
        "segment_ids": np.ones((1, b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)),
    }
    batch = jax.device_put(batch)
    start = time.perf_counter()
    step = jax.jit(make_train_step(token_loss(model), tx, schedule), donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    plan = step.memory_analysis()
    losses_seen = []

    def one_step():
        nonlocal state
        state, metrics = step(state, batch)
        losses_seen.append(float(jax.block_until_ready(metrics)["loss"]))

    timing = time_steps(one_step, steps)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        mem, how = stats["peak_bytes_in_use"], "device memory_stats peak_bytes_in_use, since process start"
    else:
        mem = plan.argument_size_in_bytes + plan.output_size_in_bytes - plan.alias_size_in_bytes
        mem += plan.temp_size_in_bytes
        how = (
            f"no device memory stats on {device.platform}: compiled step's memory_analysis, "
            "arguments + outputs - donated aliases + temporaries"
        )
    chunk = losses.loss_chunk_size(b, t, cfg.vocab_size, cfg.loss_chunk)
    return dict(
        timing,
        compile_s=compile_s,
        loss=losses_seen[-1],
        mem_bytes=int(mem),
        mem_how=how,
        chip=device.device_kind,
        trainable=trainable,
        attention=attention.describe(cfg.attention, cfg.attention_chunk),
        loss_head=(
            f"chunked cross-entropy (jft.losses.chunked_cross_entropy), {chunk} of {t} positions x "
            f"{cfg.vocab_size} vocab float32 logits per chunk, recomputed in the backward pass"
        ),
        versions=f"jax {jax.__version__}",
    )


# ---------------------------------------------------------------------------- transformers + peft


def _to_nf4(model, torch):
    """Replace every decoder linear by a bitsandbytes NF4 (double quant) Linear4bit, layer by layer."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, old in list(parent.named_children()):
                if name not in TARGETS:
                    continue
                new = bnb.nn.Linear4bit(
                    old.in_features,
                    old.out_features,
                    bias=old.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                new.weight = bnb.nn.Params4bit(
                    old.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=new
                )
                new.weight.to(old.weight.device)  # quantizes in place (Params4bit._quantize)
                setattr(parent, name, new)
                del old
        torch.cuda.empty_cache()


def bench_torch(case: dict, steps: int, remat: bool) -> dict:
    """transformers (eager, sdpa) + torch AdamW, under torch.autocast(bfloat16); QLoRA with
    bitsandbytes Linear4bit layers and peft LoRA."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    qlora = case["method"] == "qlora"
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda and not case.get("small"):
        raise RuntimeError("no CUDA device for torch (torch.cuda.is_available() is False): its CPU runs --small only")
    if qlora:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:
            raise RuntimeError(f"bitsandbytes is not importable ({type(e).__name__}: {e})") from e
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(**case["shape"], max_position_embeddings=max(8192, case["seq"]))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            hf_cfg, attn_implementation="sdpa", dtype=torch.bfloat16 if qlora else torch.float32
        )
    if qlora:
        from peft import LoraConfig, get_peft_model

        _to_nf4(model, torch)
        lora = LoraConfig(r=LORA_R, lora_alpha=int(LORA_ALPHA), lora_dropout=0.0, target_modules=list(TARGETS))
        model = get_peft_model(model, lora)
    if remat:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4 if qlora else 1e-5, weight_decay=0.0, fused=cuda)
    ids = torch.tensor(batch_ids(case)).long().to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    vocab = case["shape"]["vocab_size"]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses_seen = []

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1))
        del logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses_seen.append(loss.item())  # synchronises

    timing = time_steps(step, steps)
    mem, how = None, "n/a: no device memory counter on CPU"
    if cuda:
        mem, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated, after the model is built"
    return dict(
        timing,
        compile_s=0.0,
        trainable=sum(p.numel() for p in trainable),
        loss=losses_seen[-1],
        mem_bytes=mem,
        mem_how=how,
        chip=torch.cuda.get_device_name(0) if cuda else "cpu",
        attention="sdpa (torch.nn.functional.scaled_dot_product_attention)",
        loss_head=f"whole [rows, seq, {vocab}] logits, upcast to float32, torch cross_entropy",
        versions=f"torch {torch.__version__}, transformers {transformers.__version__}",
    )


SIDES = {"jft": bench_jft, "transformers": bench_torch}


def run_side(side: str, case: dict, args, isolate: bool) -> dict:
    """One side of one case: in this process, or in a fresh one (so each peak is the case's own)."""
    if not isolate:
        try:
            return SIDES[side](case, args.steps, args.remat == "layer")
        finally:
            gc.collect()  # the side's model and optimizer state go before the next case
            if side == "jft":
                jax.clear_caches()
            elif "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
                sys.modules["torch"].cuda.empty_cache()
    cmd = [sys.executable, __file__, CHILD, side, json.dumps(case), str(args.steps), args.remat]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"child exited {proc.returncode}: {tail}")
    r = json.loads(lines[-1])
    if "error" in r:
        raise RuntimeError(r["error"])
    return r


def fmt_mem(r: dict) -> str:
    return "n/a" if r["mem_bytes"] is None else f"{r['mem_bytes'] / MIB:.1f} MiB"


def report(name: str, case: dict, results: dict, args) -> None:
    shape, b, t = case["shape"], case["batch"], case["seq"]
    tokens = b * t
    flops, formula = model_flops(case)
    what = (
        "full fine-tuning, float32 master weights and moments, bfloat16 compute"
        if case["method"] == "full"
        else f"QLoRA: NF4 double-quantized decoder linears, LoRA r={LORA_R} alpha={LORA_ALPHA:g} on "
        f"{', '.join(TARGETS)}, bfloat16 compute"
    )
    print(
        f"case {name}: {case['title']} shape (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads, {shape['num_key_value_heads']} KV heads, MLP "
        f"{shape['intermediate_size']}, vocab {shape['vocab_size']}); {what}; AdamW; batch {b} x {t} tokens; "
        f"activation recomputation: {'per layer' if args.remat == 'layer' else 'none'}"
    )
    print(f"  model FLOPs per step = {formula} = {flops:.3e}")
    for side, r in results.items():
        if "skipped" in r:
            print(f"  {side:12s} skipped ({r['skipped']})")
            continue
        peak = peak_flops(r["chip"])
        mfu = f"{flops / (r['sec'] * peak):.3f}" if peak else "n/a"
        peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "not in PEAK_BF16"
        print(
            f"  {side:12s} tokens/s {tokens / r['sec']:.1f} | s/step {r['sec']:.4f} | first step {r['first']:.1f} s "
            f"(+ compile {r['compile_s']:.1f} s) | loss {r['loss']:.3f} | trainable {r['trainable']:,d} | "
            f"MFU {mfu} ({r['chip']}: {peak_text}) | "
            f"peak memory {fmt_mem(r)} ({r['mem_how']})"
        )
        print(f"  {side:12s} attention: {r['attention']}")
        print(f"  {side:12s} loss head: {r['loss_head']}")
    if all("sec" in results.get(s, {}) for s in SIDES):
        j, h = results["jft"], results["transformers"]
        line = f"  jft / transformers tokens/s: {h['sec'] / j['sec']:.2f}x"
        if j["mem_bytes"] and h["mem_bytes"]:
            line += f"; peak memory jft / transformers: {j['mem_bytes'] / h['mem_bytes']:.2f}x"
        print(line)
    else:
        print("  jft / transformers: n/a (a side did not run)")


CHILD_ENV = dict(os.environ)  # children start as this process was started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (the default on CPU)")
    parser.add_argument("--full-size", action="store_true", help="the real shapes even on CPU")
    parser.add_argument("--seq", type=int, default=2048, help="full fine-tuning length (2048 or 4096)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    parser.add_argument("--cases", default="full,qlora")
    parser.add_argument("--sides", default="jft,transformers")
    parser.add_argument("--remat", choices=("none", "layer"), default="none", help="recompute activations per layer")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto", help="a process per side and case")
    args = parser.parse_args(argv)

    # This process only asks for the backend; the cases run in children that take the device whole.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    backend = jax.default_backend()
    if backend == "cpu" and not args.full_size:
        args.small = True
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.small)
    print(
        f"backend {backend} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs; jax {jax.__version__}; "
        f"{'small shapes' if args.small else 'full shapes'}; best of {args.steps} steps after the first; "
        f"{'a fresh process per side and case' if isolate else 'one process'}; MiB = 2**20 bytes"
    )
    print(f"peak bf16 FLOP/s used for MFU: {', '.join(f'{n} {f / 1e12:.0f}T' for n, f in PEAK_BF16)}; others n/a")
    all_cases = cases(args)
    for name in args.cases.split(","):
        case, results = all_cases[name], {}
        for side in args.sides.split(","):
            try:
                results[side] = run_side(side, case, args, isolate)
            except Exception as e:  # a side that cannot run must not stop the others
                results[side] = dict(skipped=f"{type(e).__name__}: {e}"[:400])
        report(name, case, results, args)
        sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        side, case, steps, remat = sys.argv[2:6]
        try:
            out = SIDES[side](json.loads(case), int(steps), remat == "layer")
        except Exception as e:
            out = dict(error=f"{type(e).__name__}: {e}")
        print(json.dumps(out))
    else:
        main()
