"""Where a full fine-tuning train step spends its time: jft vs transformers + torch AdamW, part by part (CPU).

    python benchmarks/bench_step_parts.py              # 3 alternated rounds; add --hlo for the layer scan's ops

The model, shapes and optimizer of ``bench_train.py`` (the ~30M Llama of ``shapes.py``, float32,
batch 8 x 256, AdamW, no clipping). Each side is timed for:

- ``fwd+loss``: the forward pass and the cross entropy (torch with autograd recording, as in a step);
- ``fwd+bwd``: the same plus the gradients of every parameter;
- ``update``: the optimizer alone on given gradients (jft: the step's tail, i.e. the division by
  the token weight, the global norm and AdamW; torch: ``opt.step()``);
- ``step``: the whole step (jft: ``make_train_step``, donated state, as ``bench_train.py``).

jft variants, each against the same torch numbers: ``remat="none"`` (as bench_train) and the
default ``nothing_saveable``; the loss head as configured (at this shape the default chunk is the
whole 256-token row, one checkpointed chunk), in 4 chunks of 64, and as whole logits without a
checkpoint (``weighted_cross_entropy``); the layer scan unrolled (``flax.linen.scan`` patched with
``unroll`` while tracing); and at batch 2 x 1024 ``attention="xla"`` (whole scores) vs
``"chunked"`` (512-token blocks). At 256 tokens both attention settings run the same whole-score
code (calls of at most ``attention_chunk`` queries), so that pair is not timed there. And
``jax_softmax_custom_jvp=True`` while tracing (see ``SOFTMAX_JVP``).

Probes time single pieces, forward + backward, at the same shapes: the attention core of 8 layers
(torch: HF's sdpa call, ``is_causal`` and ``enable_gqa``), 8 SwiGLU MLP blocks (weights and input
gradients) and the loss head (lm_head matmul + cross entropy). The step's ``fwd+bwd`` minus the
probes is the rest (q/k/v/o projections, norms, RoPE, embeddings, residual adds).

Rounds alternate which side runs first; the tables give the median over rounds of each part's
per-call median.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import os
import re
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from bench_train import SIZE
from transformers import AutoModelForCausalLM, LlamaConfig

import jft
from jft import partition
from jft.losses import chunked_cross_entropy, weighted_cross_entropy
from jft.models.attention import Visibility, attention
from jft.models.layers import dense, swiglu
from jft.models.llama import LlamaForCausalLM
from jft.objectives import token_loss
from jft.train import TrainState, make_optimizer, make_train_step

PARTS = ("fwd+loss", "fwd+bwd", "update", "step")
# jax.nn.softmax is differentiated through exp / sum by default (the flag is off in jax 0.10), so
# each layer saves exp(s - max), 1/sum and 1/sum^2 for the backward pass; the custom JVP saves the
# probabilities only.
SOFTMAX_JVP = {"jax_softmax_custom_jvp": True}


def timed(fn, iters: int, prepare=None) -> float:
    """Median seconds of ``iters`` calls of ``fn`` (each call blocks until its result is ready),
    after one untimed ``prepare()``."""
    if prepare is not None:
        prepare()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_batch(rs, b: int, t: int) -> tuple[np.ndarray, dict]:
    ids = rs.randint(3, SIZE["vocab_size"], (b, t + 1))
    batch = {
        "input_ids": ids[None, :, :-1].astype(np.int32),
        "targets": ids[None, :, 1:].astype(np.int32),
        "loss_weights": np.ones((1, b, t), np.float32),
        "segment_ids": np.ones((1, b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)).copy(),
    }
    return ids, jax.tree.map(jnp.asarray, batch)


# ---------------------------------------------------------------------------- torch


class TorchSide:
    def __init__(self, hf, ids: np.ndarray):
        self.hf = hf
        self.opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.0)
        self.x, self.y = torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:])

    def loss(self):
        logits = self.hf(self.x).logits
        return torch.nn.functional.cross_entropy(logits.view(-1, SIZE["vocab_size"]), self.y.reshape(-1))

    def fwd(self):
        self.loss().item()

    def fwd_bwd(self):
        loss = self.loss()
        loss.backward()
        self.hf.zero_grad(set_to_none=True)
        return loss.item()

    def update(self):
        self.opt.step()

    def step(self):
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def compile(self, which):
        pass

    def prepare(self, part: str):
        if part == "update":  # gradients for opt.step() to read (the other parts clear them)
            self.loss().backward()

    def parts(self, which: tuple[str, ...]) -> dict:
        fns = {"fwd+loss": self.fwd, "fwd+bwd": self.fwd_bwd, "update": self.update, "step": self.step}
        return {p: fns[p] for p in which}


# ---------------------------------------------------------------------------- jft


@contextlib.contextmanager
def unrolled_scan():
    """``flax.linen.scan`` with the whole loop unrolled, for modules traced inside the context."""
    original = nn.scan
    nn.scan = lambda *a, **k: original(*a, **{**k, "unroll": k.get("length") or 1})
    try:
        yield
    finally:
        nn.scan = original


@contextlib.contextmanager
def jax_flags(flags: dict):
    """JAX config values while tracing (e.g. ``jax_softmax_custom_jvp``)."""
    old = {k: getattr(jax.config, k) for k in flags}
    for k, v in flags.items():
        jax.config.update(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)


class JftSide:
    """One jft configuration: compiled fwd+loss, fwd+bwd, update and step functions and their state."""

    def __init__(self, model, params, batch, plain_head=False, unroll=False, flags=None):
        self.model = model
        self.batch = batch
        labels = partition.labels(params, partition.FULL)
        self.tx, schedule = make_optimizer(name="adamw", learning_rate=1e-4, total_steps=1000, clip_norm=None)
        # Copies: a donated step must not consume the caller's (shared) parameter arrays.
        params = jax.tree.map(jnp.copy, params)
        self.state = TrainState.create(params, labels, self.tx, jax.random.key(0))
        self.micro = jax.tree.map(lambda a: a[0], dict(batch))
        self.plain_head = plain_head
        self.unroll = unroll
        self.flags = flags or {}
        self.compiled = {}
        self.loss_fn = token_loss(model)
        self._step_fn = make_train_step(self.loss_fn, self.tx, schedule)

    def loss_sum(self, trainable, frozen, micro):
        """The step's loss sum (``token_loss``, training mode), or the same with whole logits."""
        if not self.plain_head:
            return self.loss_fn(trainable, frozen, micro, jax.random.key(1))[0]
        params = partition.join(trainable, frozen)
        hidden = self.model.apply(
            {"params": params},
            micro["input_ids"],
            positions=micro["positions"],
            segment_ids=micro["segment_ids"],
            hidden_only=True,
        )
        logits = self.model.apply({"params": params}, hidden, method="head")
        return weighted_cross_entropy(logits, micro["targets"], micro["loss_weights"])[0]

    def tail(self, trainable, opt_state, grads, weight):
        """The step after the gradients (``make_train_step``): divide, global norm, AdamW, apply."""
        denom = jnp.where(weight > 0, weight, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
        norm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, norm

    def compile(self, which: tuple[str, ...]):
        s = self.state
        with unrolled_scan() if self.unroll else contextlib.nullcontext(), jax_flags(self.flags):
            if "fwd+loss" in which:
                self.compiled["fwd+loss"] = jax.jit(self.loss_sum).lower(s.trainable, s.frozen, self.micro).compile()
            if "fwd+bwd" in which or "update" in which:
                grad = jax.jit(jax.value_and_grad(self.loss_sum))
                self.compiled["fwd+bwd"] = grad.lower(s.trainable, s.frozen, self.micro).compile()
            if "update" in which:
                self.grads = self.compiled["fwd+bwd"](s.trainable, s.frozen, self.micro)[1]
                self.weight = jnp.sum(self.micro["loss_weights"])
                tail = jax.jit(self.tail, donate_argnums=(0, 1))
                self.compiled["update"] = tail.lower(s.trainable, s.opt_state, self.grads, self.weight).compile()
            if "step" in which:
                step = jax.jit(self._step_fn, donate_argnums=0)
                self.compiled["step"] = step.lower(s, self.batch).compile()

    def fwd(self):
        self.compiled["fwd+loss"](self.state.trainable, self.state.frozen, self.micro).block_until_ready()

    def fwd_bwd(self):
        jax.block_until_ready(self.compiled["fwd+bwd"](self.state.trainable, self.state.frozen, self.micro))

    def update(self):
        trainable, opt_state, norm = self.compiled["update"](
            self.state.trainable, self.state.opt_state, self.grads, self.weight
        )
        norm.block_until_ready()
        self.state = self.state.replace(trainable=trainable, opt_state=opt_state)

    def step(self):
        self.state, metrics = self.compiled["step"](self.state, self.batch)
        jax.block_until_ready(metrics)

    def prepare(self, part: str):
        pass

    def parts(self, which: tuple[str, ...]) -> dict:
        fns = {"fwd+loss": self.fwd, "fwd+bwd": self.fwd_bwd, "update": self.update, "step": self.step}
        return {p: fns[p] for p in which}


# ---------------------------------------------------------------------------- HLO of the layer scan


def hlo_summary(text: str) -> str:
    """Ops of the while loops' bodies (the layer scans) of a compiled module: copies, transposes, dots."""
    comps, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
        elif name and line.startswith("  ") and "=" in line:
            comps[name].append(line.strip())
    bodies = []
    for lines in comps.values():
        for ins in lines:
            m = re.search(r" while\(.*body=%?([\w.\-]+)", ins)
            if m:
                bodies.append(m.group(1))

    def opcode(ins):
        m = re.match(r"(?:ROOT )?%?[\w.\-]+ = (.+?) ([\w\-]+)\(", ins)
        return (m.group(2), m.group(1)) if m else (None, None)

    def called(ins):
        m = re.search(r"calls=%?([\w.\-]+)", ins)
        return m.group(1) if m else None

    out = []
    for body in bodies:
        ops = collections.Counter()
        moves = collections.Counter()  # (what, shape) of top-level copies/transposes and moving fusions
        for ins in comps.get(body, []):
            op, shape = opcode(ins)
            ops[op] += 1
            if op in ("copy", "transpose"):
                moves[(op, shape)] += 1
            elif op == "fusion" and called(ins):
                inner = collections.Counter(opcode(i)[0] for i in comps.get(called(ins), []))
                kinds = [k for k in ("transpose", "copy") if inner[k]]
                if kinds:
                    has_dot = "dot" in inner
                    moves[(f"fusion with {'+'.join(kinds)}{' (dot)' if has_dot else ''}", shape)] += 1
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
        out.append(f"while body {body}: {sum(ops.values())} ops ({top})")
        for (what, shape), n in moves.most_common(12):
            out.append(f"    {n} x {what} -> {shape}")
    return "\n".join(out)


# ---------------------------------------------------------------------------- probes: one piece, 8 layers


class Probe:
    """A piece of the step alone, forward + backward, as a ``fwd+bwd`` part."""

    def __init__(self, fn):
        self.fn = fn

    def compile(self, which):
        pass

    def prepare(self, part: str):
        pass

    def parts(self, which):
        return {"fwd+bwd": self.fn}


def probes(rs, b: int, t: int) -> dict:
    """``{name: [(label, Probe, parts)]}``: attention core, SwiGLU MLP and loss head, each side."""
    n, hd, m, vocab = SIZE["num_hidden_layers"], SIZE["hidden_size"], SIZE["intermediate_size"], SIZE["vocab_size"]
    h, kv = SIZE["num_attention_heads"], SIZE["num_key_value_heads"]
    d = hd // h
    f32 = lambda *shape, scale=1.0: (rs.standard_normal(shape) * scale).astype(np.float32)
    leaf = lambda a: torch.tensor(a, requires_grad=True)
    out = {}

    # Attention core (after RoPE, before o_proj), as each side's model calls it: HF's sdpa path
    # (is_causal, enable_gqa: torch's CPU flash kernel) and jft's attention() with segment ids.
    q, k, v, g = f32(n, b, t, h, d), f32(n, b, kv, t, d), f32(n, b, kv, t, d), f32(n, b, t, h * d)
    tq = [[leaf(a[i]) for i in range(n)] for a in (q, k, v)]

    def torch_attention():
        for i in range(n):
            o = torch.nn.functional.scaled_dot_product_attention(
                tq[0][i].transpose(1, 2), tq[1][i], tq[2][i], is_causal=True, enable_gqa=True
            )
            o.transpose(1, 2).reshape(b, t, h * d).backward(torch.tensor(g[i]))
        for a in tq:
            for x in a:
                x.grad = None

    seg = jnp.ones((b, t), jnp.int32)
    windows = jnp.full((n,), np.iinfo(np.int32).max, jnp.int32)

    def jft_attention(impl, flags=None):
        def loss(q, k, v):
            def body(total, xs):
                q, k, v, g, w = xs
                o = attention(q, [(k, v, Visibility(q_seg=seg, k_seg=seg))], w, impl=impl)
                return total + jnp.sum(o * g), None

            return jax.lax.scan(body, 0.0, (q, k, v, jnp.asarray(g), windows))[0]

        args = [jnp.asarray(a) for a in (q, k, v)]
        with jax_flags(flags or {}):
            f = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
        return lambda: jax.block_until_ready(f(*args))

    out[f"probe: attention core x{n}"] = [
        ("torch", Probe(torch_attention), ("fwd+bwd",)),
        ("jft", Probe(jft_attention("xla")), ("fwd+bwd",)),
        ("jft jax_softmax_custom_jvp", Probe(jft_attention("xla", SOFTMAX_JVP)), ("fwd+bwd",)),
    ]

    # SwiGLU MLP (gate, up, down), gradients of the input and the weights.
    x, wg, wu, wd, g = (
        f32(n, b, t, hd),
        f32(n, hd, m, scale=0.02),
        f32(n, hd, m, scale=0.02),
        f32(n, m, hd, scale=0.02),
        f32(n, b, t, hd),
    )
    tx_ = [leaf(x[i]) for i in range(n)]
    tw = [[leaf(np.ascontiguousarray(a[i].T)) for i in range(n)] for a in (wg, wu, wd)]  # torch [out, in]

    def torch_mlp():
        lin = torch.nn.functional.linear
        for i in range(n):
            hid = torch.nn.functional.silu(lin(tx_[i], tw[0][i])) * lin(tx_[i], tw[1][i])
            lin(hid, tw[2][i]).backward(torch.tensor(g[i]))
        for x_ in tx_ + tw[0] + tw[1] + tw[2]:
            x_.grad = None

    def mlp_loss(x, wg, wu, wd):
        def body(total, xs):
            x, wg, wu, wd, g = xs
            f = jnp.float32
            o = dense(swiglu(dense(x, wg, f), dense(x, wu, f)), wd, f)
            return total + jnp.sum(o * g), None

        return jax.lax.scan(body, 0.0, (x, wg, wu, wd, jnp.asarray(g)))[0]

    mlp = jax.jit(jax.grad(mlp_loss, argnums=(0, 1, 2, 3)))
    mlp_args = [jnp.asarray(a) for a in (x, wg, wu, wd)]
    out[f"probe: SwiGLU MLP x{n}"] = [
        ("torch", Probe(lambda: torch_mlp()), ("fwd+bwd",)),
        ("jft", Probe(lambda: jax.block_until_ready(mlp(*mlp_args))), ("fwd+bwd",)),
    ]

    # Loss head: lm_head matmul + cross entropy, gradients of the hidden states and the kernel.
    hid, w, y = f32(b, t, hd), f32(hd, vocab, scale=0.02), rs.randint(0, vocab, (b, t))
    th, tw_, ty = leaf(hid), leaf(np.ascontiguousarray(w.T)), torch.tensor(y).reshape(-1)

    def torch_head():
        logits = torch.nn.functional.linear(th, tw_)
        torch.nn.functional.cross_entropy(logits.view(-1, vocab), ty).backward()
        th.grad = tw_.grad = None

    weights = jnp.ones((b, t), jnp.float32)

    def head_loss(chunked, hid, w):
        head = lambda x, rng=None: dense(x, w, jnp.float32)
        if chunked:
            return chunked_cross_entropy(hid, head, jnp.asarray(y), weights)[0]
        return weighted_cross_entropy(head(hid), jnp.asarray(y), weights)[0]

    heads = {c: jax.jit(jax.grad(functools.partial(head_loss, c), argnums=(0, 1))) for c in (True, False)}
    head_args = [jnp.asarray(hid), jnp.asarray(w)]
    out["probe: loss head"] = [
        ("torch", Probe(torch_head), ("fwd+bwd",)),
        ("jft (chunked, default)", Probe(lambda: jax.block_until_ready(heads[True](*head_args))), ("fwd+bwd",)),
        ("jft whole logits", Probe(lambda: jax.block_until_ready(heads[False](*head_args))), ("fwd+bwd",)),
    ]
    return out


# ---------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per part per round (median)")
    parser.add_argument("--no-long", action="store_true", help="skip the batch 2 x 1024 attention comparison")
    parser.add_argument("--hlo", action="store_true", help="print the layer scans' ops of the compiled step")
    parser.add_argument("--probes-only", action="store_true", help="only the attention, MLP and loss head probes")
    args = parser.parse_args()
    rs = np.random.RandomState(0)

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**SIZE)).float().train()
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    model, params = jft.load_hf(folder, dtype="float32", remat="none")
    base_cfg = model.config

    def jft_side(batch, plain_head=False, unroll=False, flags=None, **overrides):
        cfg = dataclasses.replace(base_cfg, **overrides)
        return JftSide(LlamaForCausalLM(cfg), params, batch, plain_head=plain_head, unroll=unroll, flags=flags)

    groups = {}
    if not args.probes_only:
        ids, batch = make_batch(rs, 8, 256)
        # (label, side, parts); the first jft entry is the reference for the ratios of the variants.
        groups["batch 8 x 256"] = [("torch", TorchSide(hf, ids), PARTS), ("jft", jft_side(batch), PARTS)]
        groups["batch 8 x 256"] += [
            ("jft remat=nothing_saveable", jft_side(batch, remat="nothing_saveable"), ("fwd+bwd", "step")),
            ("jft loss_chunk=64", jft_side(batch, loss_chunk=64), ("fwd+loss", "fwd+bwd")),
            ("jft whole logits", jft_side(batch, plain_head=True), ("fwd+loss", "fwd+bwd")),
            ("jft scan unrolled", jft_side(batch, unroll=True), ("fwd+bwd", "step")),
            ("jft jax_softmax_custom_jvp", jft_side(batch, flags=SOFTMAX_JVP), ("fwd+bwd", "step")),
        ]
        if not args.no_long:
            ids_long, batch_long = make_batch(rs, 2, 1024)
            groups["batch 2 x 1024"] = [
                ("torch", TorchSide(hf, ids_long), ("fwd+bwd", "step")),
                ("jft attention=chunked", jft_side(batch_long, attention="chunked"), ("fwd+bwd", "step")),
                ("jft attention=xla", jft_side(batch_long, attention="xla"), ("fwd+bwd", "step")),
            ]
    groups.update(probes(rs, 8, 256))

    start = time.perf_counter()
    for entries in groups.values():
        for _label, side, which in entries:
            side.compile(which)
            for part, fn in side.parts(which).items():  # warm-up
                side.prepare(part)
                fn()
    print(f"compiled and warmed up in {time.perf_counter() - start:.0f} s; load average {os.getloadavg()}")

    results = collections.defaultdict(list)  # (group, label, part) -> per-round medians
    for r in range(args.rounds):
        for g, entries in groups.items():
            order = entries if r % 2 == 0 else entries[::-1]
            for label, side, which in order:
                for part, fn in side.parts(which).items():
                    results[(g, label, part)].append(timed(fn, args.iters, functools.partial(side.prepare, part)))
        print(f"round {r + 1}/{args.rounds} done; load average {os.getloadavg()}", flush=True)

    print(
        f"\nfloat32, AdamW; jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{os.cpu_count()} CPUs; median of {args.rounds} rounds x {args.iters} calls; seconds per call"
    )
    for g, entries in groups.items():
        torch_times = {p: statistics.median(results[(g, "torch", p)]) for p in entries[0][2]}
        print(f"\n{g:38s}" + "".join(f"{p:>10s} {'/torch':>6s}" for p in PARTS))
        for label, _, which in entries:
            row = f"{label:38s}"
            for p in PARTS:
                if p in which:
                    sec = statistics.median(results[(g, label, p)])
                    ratio = f"{sec / torch_times[p]:6.2f}" if p in torch_times and label != "torch" else f"{'':6s}"
                    row += f"{sec:10.3f} {ratio}"
                else:
                    row += f"{'-':>10s} {'':6s}"
            print(row)

    if args.probes_only:
        return
    print("\nwhere the time goes at 8 x 256 (s): forward+loss, backward = fwd+bwd - fwd+loss, update, rest of step")
    for label in ("torch", "jft"):
        m = {p: statistics.median(results[("batch 8 x 256", label, p)]) for p in PARTS}
        rest = m["step"] - m["fwd+bwd"] - m["update"]
        print(
            f"{label:6s} forward {m['fwd+loss']:.3f}  backward {m['fwd+bwd'] - m['fwd+loss']:.3f}  "
            f"update {m['update']:.3f}  rest {rest:+.3f}  step {m['step']:.3f}"
        )

    n = SIZE["num_hidden_layers"]
    print(
        "fwd+bwd split by the probes (s): attention core, SwiGLU MLP, loss head, rest (projections, norms, RoPE, ...)"
    )
    for label, head in (("torch", "torch"), ("jft", "jft (chunked, default)")):
        fb = statistics.median(results[("batch 8 x 256", label, "fwd+bwd")])
        att, mlp, hd = (
            statistics.median(results[(f"probe: {name}", lab, "fwd+bwd")])
            for name, lab in ((f"attention core x{n}", label), (f"SwiGLU MLP x{n}", label), ("loss head", head))
        )
        print(
            f"{label:6s} attention {att:.3f}  MLP {mlp:.3f}  head {hd:.3f}  "
            f"rest {fb - att - mlp - hd:+.3f}  fwd+bwd {fb:.3f}"
        )

    if args.hlo:
        side = groups["batch 8 x 256"][1][1]
        print("\ncompiled step (jft, remat=none), layer scans:\n" + hlo_summary(side.compiled["step"].as_text()))


if __name__ == "__main__":
    main()
