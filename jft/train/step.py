"""Pure train and eval steps. The caller jits them:

    train_step = jax.jit(make_train_step(model, tx, schedule, masks), donate_argnums=0)
    state, metrics = train_step(state, batch)      # batch arrays [grad_accum, micro_batch, seq_len]
    eval_step = jax.jit(make_eval_step(model))
    sums = eval_step(params, batch)                # batch arrays [batch, seq_len]

A batch is a dict of ``input_ids`` int32, ``targets`` int32 (next tokens), ``loss_weights``
float32 (0 = not trained), ``segment_ids`` int32 (packed rows; 0 = padding) and ``positions``
int32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jft.losses import weighted_cross_entropy
from jft.train import partition
from jft.train.state import TrainState

Batch = Mapping[str, jax.Array]


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    schedule: Callable[[Any], jax.Array],
    masks: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """``train_step(state, batch) -> (state, metrics)`` with gradient accumulation.

    ``jax.lax.scan`` runs the micro-batches (the leading batch axis) and sums the weighted
    loss, the weight and the gradients of the weighted loss *sum*; then both are divided by
    the total weight of the whole batch, so any ``grad_accum`` gives the same step as one
    big batch. Gradients are taken w.r.t. ``state.trainable`` only (frozen params are
    constants), accumulated in float32 and cast back to each leaf's dtype. ``masks``
    (:func:`partition.layer_masks`) zero the gradients of frozen layers of partially
    trainable stacked leaves, so ``grad_norm`` measures what trains.

    Metrics (float32 scalars unless said): ``loss`` weighted mean CE of the batch,
    ``grad_norm`` global norm before clipping, ``lr`` at this step, ``tokens`` int32 count
    of weight > 0 targets, ``weight`` sum of loss weights. A batch with zero total weight
    gives loss 0 and zero gradients (the optimizer still steps, e.g. weight decay).
    """

    def loss_sums(trainable, frozen, micro, rng):
        logits = model.apply(
            {"params": partition.merge(trainable, frozen)},
            micro["input_ids"],
            positions=micro["positions"],
            segment_ids=micro["segment_ids"],
            rngs={"dropout": rng},
        )
        loss_sum, weight_sum = weighted_cross_entropy(logits, micro["targets"], micro["loss_weights"])
        return loss_sum, weight_sum

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        def accumulate(carry, xs):
            grads_acc, loss_acc, weight_acc, tokens_acc = carry
            i, micro = xs
            (loss_sum, weight_sum), grads = grad_fn(state.trainable, state.frozen, micro, jax.random.fold_in(rng, i))
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            tokens = jnp.sum(micro["loss_weights"] > 0, dtype=jnp.int32)
            return (grads_acc, loss_acc + loss_sum, weight_acc + weight_sum, tokens_acc + tokens), None

        accum = batch["input_ids"].shape[0]
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, loss_sum, weight_sum, tokens), _ = jax.lax.scan(accumulate, init, (jnp.arange(accum), dict(batch)))

        denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.trainable)
        grads = partition.apply_layer_masks(grads, masks)
        grad_norm = optax.global_norm(grads)

        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
            "tokens": tokens,
            "weight": weight_sum,
        }
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: Any) -> Callable[[Mapping, Batch], dict]:
    """``eval_step(params, batch) -> {loss_sum, weight_sum, tokens}`` over a ``[batch, seq_len]`` batch.

    Sums, so the caller adds them over batches: ``loss = loss_sum / weight_sum``,
    ``perplexity = exp(loss)``.
    """

    def eval_step(params: Mapping, batch: Batch) -> dict:
        logits = model.apply(
            {"params": params},
            batch["input_ids"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
        )
        loss_sum, weight_sum = weighted_cross_entropy(logits, batch["targets"], batch["loss_weights"])
        tokens = jnp.sum(batch["loss_weights"] > 0, dtype=jnp.int32)
        return {"loss_sum": loss_sum, "weight_sum": weight_sum, "tokens": tokens}

    return eval_step
