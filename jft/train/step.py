"""Pure train and eval steps around an objective's loss. The caller jits them:

    loss_fn = jft.objectives.token_loss(model)                  # or any objective's loss
    train_step = jax.jit(make_train_step(loss_fn, tx, schedule, masks), donate_argnums=0)
    state, metrics = train_step(state, batch)      # batch arrays [grad_accum, micro_batch, ...]
    eval_step = jax.jit(make_eval_step(loss_fn))
    sums = eval_step(params, batch)                # batch arrays [batch, ...]

``loss_fn(trainable, frozen, batch, rng) -> (loss_sum, weight_sum, metrics)`` returns sums
(:mod:`jft.objectives`); the batch is whatever dict of arrays the objective reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jft import partition
from jft.train.state import TrainState

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Mapping, Mapping, Batch, Any], tuple[jax.Array, jax.Array, dict]]


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: Callable[[Any], jax.Array],
    masks: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """``train_step(state, batch) -> (state, metrics)`` with gradient accumulation, for any objective.

    ``jax.lax.scan`` runs the micro-batches (the leading axis of every batch array) and adds up
    ``loss_fn``'s sums and the gradients of its loss *sum*; then both are divided by the total
    weight of the whole batch, so any ``grad_accum`` gives the same step as one big batch.
    Gradients are taken w.r.t. ``state.trainable`` only (frozen params are constants),
    accumulated in float32 and cast back to each leaf's dtype. ``masks``
    (:func:`jft.partition.layer_masks`) zero the gradients of frozen layers of partially
    trainable stacked leaves, so ``grad_norm`` measures what trains.

    Metrics (scalars): ``loss`` the batch's loss per unit weight, ``grad_norm`` global norm
    before clipping, ``lr`` at this step, ``weight`` the summed weight, and each of the
    objective's metrics: integer sums (counts such as ``tokens``) as they are, float sums
    divided by the weight. A batch with zero total weight gives loss 0 and zero gradients (the
    optimizer still steps, e.g. weight decay).
    """

    def loss_and_sums(trainable, frozen, batch, rng):
        loss_sum, weight_sum, metrics = loss_fn(trainable, frozen, batch, rng)
        return loss_sum, (weight_sum, metrics)

    grad_fn = jax.value_and_grad(loss_and_sums, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        def micro_sums(i, micro):
            """Float32 gradients of one micro-batch's loss sum, with its sums."""
            (loss_sum, (weight_sum, metrics)), grads = grad_fn(
                state.trainable, state.frozen, micro, jax.random.fold_in(rng, i)
            )
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            return grads, loss_sum, weight_sum, metrics

        def accumulate(carry, xs):
            return jax.tree.map(jnp.add, carry, micro_sums(*xs)), None

        batch = dict(batch)
        accum = jax.tree.leaves(batch)[0].shape[0]
        first = jax.tree.map(lambda x: x[0], batch)
        if accum == 1:  # no zero-filled accumulator: that would cost a pass over all params
            grads, loss_sum, weight_sum, sums = micro_sums(0, first)
        else:
            shapes = jax.eval_shape(micro_sums, 0, first)
            init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (grads, loss_sum, weight_sum, sums), _ = jax.lax.scan(accumulate, init, (jnp.arange(accum), batch))

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
            "weight": weight_sum,
            **per_weight(sums, denom),
        }
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    return train_step


def per_weight(sums: Mapping, denom: jax.Array) -> dict:
    """An objective's metric sums as reported: integer counts as they are, float sums per unit weight."""
    return {k: v if jnp.issubdtype(v.dtype, jnp.integer) else v / denom for k, v in sums.items()}


def make_eval_step(loss_fn: LossFn) -> Callable[[Mapping, Batch], dict]:
    """``eval_step(params, batch) -> {loss_sum, weight_sum, **metric sums}`` over one ``[batch, ...]``
    batch: ``loss_fn`` without gradients, dropout or training-only terms (``rng=None``).

    Sums, so the caller adds them over batches (:func:`jft.train.trainer.evaluate_loss`): for token
    cross entropy ``loss = loss_sum / weight_sum``, ``perplexity = exp(loss)``.
    """

    def eval_step(params: Mapping, batch: Batch) -> dict:
        loss_sum, weight_sum, metrics = loss_fn(params, {}, batch, None)
        return {"loss_sum": loss_sum, "weight_sum": weight_sum, **metrics}

    return eval_step
