"""LoRA train-step throughput: jft vs transformers + peft (torch CPU) vs google-tunix + qwix, side by side.

    python benchmarks/bench_lora.py --steps 5    # tokens/s of each side, the ratios and jft's memory

Same ~30M Llama shape on every side (benchmarks/shapes.py), float32, batch 8 x 256 tokens,
LoRA r=8, alpha=16, no dropout, on q/k/v/o/gate/up/down (every linear but lm_head), AdamW
(no weight decay) over the LoRA weights only, no activation checkpointing. Steps are
synchronous; the first one (compile included) is reported apart, then the best of --steps.
A side that cannot be imported or run prints why and is skipped. tunix needs google-tunix
and qwix; google-tunix 0.1.7 pins safetensors<0.8, so a plain pip install downgrades
transformers: install it with --no-deps plus the packages its `import tunix` asks for.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from shapes import LLAMA_30M

SIZE = LLAMA_30M
RANK, ALPHA = 8, 16.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def time_steps(step, steps: int) -> dict:
    """``first``: seconds of the first call of ``step`` (which must block; compiles), ``sec``: best of
    the ``steps`` calls after it."""
    start = time.perf_counter()
    step()
    first, times = time.perf_counter() - start, []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(first=first, sec=min(times))


def tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def bench_peft(ids: np.ndarray, steps: int) -> dict:
    """``sec`` per step, ``trainable`` params and ``opt_bytes`` of transformers + peft + torch AdamW."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**SIZE)).float()
    lora = LoraConfig(r=RANK, lora_alpha=int(ALPHA), lora_dropout=0.0, target_modules=list(TARGETS))
    model = get_peft_model(base, lora).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    x, y = torch.tensor(ids[:, :-1]).long(), torch.tensor(ids[:, 1:]).long()

    def step():
        loss = torch.nn.functional.cross_entropy(model(x).logits.view(-1, SIZE["vocab_size"]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    timing = time_steps(step, steps)
    opt_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values())
    return dict(timing, trainable=sum(p.numel() for p in trainable), opt_bytes=opt_bytes)


def bench_tunix(ids: np.ndarray, steps: int) -> dict:
    """tunix's Llama3 + qwix LoRA, stepped the way tunix's PeftTrainer._train_step does it."""
    import qwix
    from flax import nnx
    from tunix.models.llama3 import model as llama3
    from tunix.sft import utils

    h, heads = SIZE["hidden_size"], SIZE["num_attention_heads"]
    config = llama3.ModelConfig(
        num_layers=SIZE["num_hidden_layers"],
        vocab_size=SIZE["vocab_size"],
        embed_dim=h,
        hidden_dim=SIZE["intermediate_size"],
        num_heads=heads,
        head_dim=h // heads,
        num_kv_heads=SIZE["num_key_value_heads"],
        rope_theta=10_000,
        norm_eps=1e-6,
    )
    model = llama3.Llama3(config, rngs=nnx.Rngs(0))
    # tunix initialises the MLP kernels to zeros, where LoRA (B = 0 too) would never leave zero:
    # draw every matrix from normal(0.02) as the other sides do.
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(params))))
    draw = lambda p: 0.02 * jax.random.normal(next(keys), p.shape) if p.ndim > 1 else p
    nnx.update(model, jax.tree.map(draw, params))
    provider = qwix.LoraProvider(module_path=f".*({'|'.join(TARGETS)})", rank=RANK, alpha=ALPHA)
    model = qwix.apply_lora_to_model(model, provider, **model.get_model_input(), rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.0), wrt=nnx.LoRAParam)

    x, y = jnp.asarray(ids[:, :-1], jnp.int32), jnp.asarray(ids[:, 1:], jnp.int32)
    input_mask = jnp.ones(x.shape, jnp.bool_)
    inputs = dict(
        x=x,
        y=y,
        positions=utils.build_positions_from_mask(input_mask),
        attention_mask=utils.make_causal_attn_mask(input_mask),
    )

    def loss_fn(model, x, y, positions, attention_mask):
        logits, _ = model(x, positions, None, attention_mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(model, optimizer, inputs):
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
        loss, grads = grad_fn(model, **inputs)
        optimizer.update(model, grads)
        return loss

    step = functools.partial(nnx.jit(train_step, donate_argnames=("optimizer",)), model, optimizer)
    timing = time_steps(lambda: step(inputs).block_until_ready(), steps)
    trainable = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    return dict(timing, trainable=trainable, opt_bytes=tree_bytes(nnx.state(optimizer, nnx.OptState)))


def bench_jft(ids: np.ndarray, steps: int) -> dict:
    """jft's LoRA: peft.inject, then the same train step as full fine-tuning (bench_train.py);
    also the bytes of the trainable, frozen and optimizer-state trees."""
    from jft import peft
    from jft.models.llama import LlamaConfig, LlamaForCausalLM
    from jft.objectives import token_loss
    from jft.train import optim
    from jft.train import step as step_lib
    from jft.train.state import TrainState

    model = LlamaForCausalLM(LlamaConfig(**SIZE, remat="none"))
    params = model.init_params(jax.random.key(0))
    spec = peft.Peft(lora=peft.Lora(r=RANK, alpha=ALPHA, targets="all-linear"))
    model, params = peft.inject(model, params, spec, jax.random.key(1))
    labels = peft.labels(params, spec)
    tx, schedule = optim.make_optimizer(name="adamw", learning_rate=1e-4, total_steps=1000, clip_norm=None)
    state = TrainState.create(params, labels, tx, jax.random.key(0))
    result = dict(
        trainable=sum(leaf.size for leaf in jax.tree.leaves(state.trainable)),
        trainable_bytes=tree_bytes(state.trainable),
        frozen_bytes=tree_bytes(state.frozen),
        opt_bytes=tree_bytes(state.opt_state),
    )
    step = jax.jit(step_lib.make_train_step(token_loss(model), tx, schedule), donate_argnums=0)
    b, t = ids.shape[0], ids.shape[1] - 1
    batch = {
        "input_ids": ids[None, :, :-1],
        "targets": ids[None, :, 1:],
        "loss_weights": np.ones((1, b, t), np.float32),
        "segment_ids": np.ones((1, b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)),
    }
    batch = jax.tree.map(jnp.asarray, batch)

    def one_step():
        nonlocal state
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)

    return dict(result, **time_steps(one_step, steps))


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    b, t = args.batch, args.seq
    ids = np.random.RandomState(0).randint(3, SIZE["vocab_size"], (b, t + 1)).astype(np.int32)

    results = {}
    for name, bench in (("peft", bench_peft), ("tunix", bench_tunix), ("jft", bench_jft)):
        try:
            results[name] = bench(ids, args.steps)
        except Exception as e:  # a missing or unfinished side must not stop the others
            print(f"{name}: skipped ({type(e).__name__}: {e})")

    print(
        f"LoRA r={RANK} alpha={ALPHA:g} on {', '.join(TARGETS)}; float32; batch {b} x {t} tokens; AdamW; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {version('transformers')}, peft {version('peft')}, jax {jax.__version__}, "
        f"flax {version('flax')}, google-tunix {version('google-tunix')}, qwix {version('qwix')}"
    )
    print(f"{'':8s} {'s/step':>8s} {'tokens/s':>10s} {'1st step s':>11s} {'trainable':>10s} {'opt state MB':>13s}")
    for name, r in results.items():
        mb = r["opt_bytes"] / 2**20
        print(f"{name:8s} {r['sec']:8.3f} {b * t / r['sec']:10.0f} {r['first']:11.1f} {r['trainable']:10,d} {mb:13.2f}")
    for other in ("peft", "tunix"):
        missing = " and ".join(s for s in ("jft", other) if s not in results)
        if missing:
            print(f"jft / {other} tokens/s: n/a ({missing} did not run)")
        else:
            print(f"jft / {other} tokens/s: {results[other]['sec'] / results['jft']['sec']:.2f}x")
    if "jft" in results:
        r = results["jft"]
        ratio = r["opt_bytes"] / r["trainable_bytes"]
        verdict = "ok" if 1.9 <= ratio <= 2.1 else "expected ~2x: AdamW mu + nu over the trainable leaves only"
        print(
            f"jft memory: trainable {r['trainable_bytes']:,d} bytes, gradients {r['trainable_bytes']:,d} bytes "
            f"(the same tree), frozen {r['frozen_bytes']:,d} bytes"
        )
        print(f"jft optimizer state: {r['opt_bytes']:,d} bytes = {ratio:.2f}x trainable bytes ({verdict})")


if __name__ == "__main__":
    main()
