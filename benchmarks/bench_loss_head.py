"""The loss head's share of the train step's temporary memory: whole-row logits vs chunks.

    python benchmarks/bench_loss_head.py          # compiles only (XLA memory analysis); ~1-2 min on CPU

Random Llama, hidden 256, MLP 688, 2 layers, 4 heads, 2 KV heads, float32, one row of 4096 tokens,
full fine-tuning with AdamW (``make_train_step``). For vocabularies of 32k and 128k it compiles the
step three ways and reads ``temp_size_in_bytes`` of XLA's memory analysis:

- ``base``: the same model with a 256-token vocabulary (what attention and the layers need);
- ``whole row``: ``loss_chunk = 4096``, one chunk of the whole row, i.e. the ``[t, vocab]`` float32
  logits and their gradient at once, as the head was computed before it was chunked;
- ``chunked``: the default chunk (``jft.losses.loss_chunk_size``: about 2**24 logits per chunk).

The head's share is a line's temporaries minus ``base`` (XLA reuses buffers, so the logits can
share space with attention's; the share also holds the vocab-sized parameter gradients). A second
table compiles the head alone: gradients of the CE w.r.t. hidden states and a plain kernel.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jft
from jft.losses import chunked_cross_entropy, loss_chunk_size
from jft.objectives import token_loss
from jft.train import TrainState, make_optimizer, make_train_step

MiB = 2**20


def temp_bytes(vocab: int, seq: int, loss_chunk: int) -> int:
    cfg = jft.LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
        loss_chunk=loss_chunk,
    )
    model = jft.LlamaForCausalLM(cfg)
    tx, schedule = make_optimizer(learning_rate=1e-4, total_steps=10)
    state = jax.eval_shape(
        lambda p: TrainState.create(p, jax.tree.map(lambda _: True, p), tx, jax.random.key(0)), model.param_shapes()
    )
    keys = ("input_ids", "targets", "loss_weights", "segment_ids", "positions")
    batch = {k: jax.ShapeDtypeStruct((1, 1, seq), jnp.float32 if k == "loss_weights" else jnp.int32) for k in keys}
    step = jax.jit(make_train_step(token_loss(model), tx, schedule), donate_argnums=0)
    return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def head_temp_bytes(vocab: int, seq: int, chunk: int) -> int:
    """Temporaries of the loss head alone: gradients of the chunked CE w.r.t. hidden states and kernel."""
    hidden = jax.ShapeDtypeStruct((1, seq, 256), jnp.float32)
    kernel = jax.ShapeDtypeStruct((256, vocab), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def loss(hidden, kernel, targets, weights):
        head = lambda h: jnp.matmul(h, kernel)
        return chunked_cross_entropy(hidden, head, targets, weights, chunk)[0]

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(hidden, kernel, ids, jax.ShapeDtypeStruct((1, seq), jnp.float32)).compile().memory_analysis()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072])
    args = ap.parse_args()
    print(f"backend {jax.default_backend()}, seq {args.seq}, hidden 256, 2 layers, float32, AdamW")
    base = temp_bytes(256, args.seq, 0)
    print(f"base (vocab 256): temporaries {base / MiB:.0f} MiB")
    print("| vocab | [t, vocab] f32 logits | chunk | whole row: temps / head | chunked: temps / head | head ratio |")
    print("|---|---|---|---|---|---|")
    for vocab in args.vocabs:
        row = args.seq * vocab * 4
        whole = temp_bytes(vocab, args.seq, args.seq)
        chunked = temp_bytes(vocab, args.seq, 0)
        chunk = loss_chunk_size(1, args.seq, vocab)
        print(
            f"| {vocab} | {row / MiB:.0f} MiB | {chunk} | {whole / MiB:.0f} / {(whole - base) / MiB:.0f} MiB "
            f"| {chunked / MiB:.0f} / {(chunked - base) / MiB:.0f} MiB | {(whole - base) / (chunked - base):.1f}x |"
        )
    print("\nthe head alone (grad of the CE w.r.t. hidden [1, t, 256] and kernel [256, vocab]), temporaries:")
    print("| vocab | whole row | chunked | ratio |")
    print("|---|---|---|---|")
    for vocab in args.vocabs:
        whole = head_temp_bytes(vocab, args.seq, args.seq).temp_size_in_bytes
        chunked = head_temp_bytes(vocab, args.seq, 0).temp_size_in_bytes
        print(f"| {vocab} | {whole / MiB:.0f} MiB | {chunked / MiB:.0f} MiB | {whole / chunked:.1f}x |")


if __name__ == "__main__":
    main()
