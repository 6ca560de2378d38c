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

from jft import sharding
from jft.losses import chunked_cross_entropy
from jft.models.llama import moe_aux_loss
from jft.train import partition
from jft.train.state import TrainState

Batch = Mapping[str, jax.Array]


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    schedule: Callable[[Any], jax.Array],
    masks: Any = None,
    mesh: Any = None,
    rules: Any = sharding.DEFAULT_RULES,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """``train_step(state, batch) -> (state, metrics)`` with gradient accumulation.

    ``jax.lax.scan`` runs the micro-batches (the leading batch axis) and sums the weighted
    loss, the weight and the gradients of the weighted loss *sum*; then both are divided by
    the total weight of the whole batch, so any ``grad_accum`` gives the same step as one
    big batch. Gradients are taken w.r.t. ``state.trainable`` only (frozen params are
    constants), accumulated in float32 and cast back to each leaf's dtype. ``masks``
    (:func:`partition.layer_masks`) zero the gradients of frozen layers of partially
    trainable stacked leaves, so ``grad_norm`` measures what trains. With a ``mesh`` the model is
    traced in :func:`jft.sharding.scope` (activation sharding constraints from ``rules``); the
    shardings of the state and batch passed in decide where everything else lives.

    The loss head runs in chunks of positions (:func:`jft.losses.chunked_cross_entropy`, chunk
    ``model.config.loss_chunk``), so no ``[micro_batch, seq_len, vocab]`` float32 logits are held;
    the backward pass recomputes each chunk's logits.

    For a mixture-of-experts model the loss adds ``router_aux_loss_coef`` times the
    load-balancing loss (:func:`jft.models.llama.moe_aux_loss`), as transformers' Mixtral does.

    Metrics (float32 scalars unless said): ``loss`` weighted mean CE of the batch (+ the MoE term),
    ``grad_norm`` global norm before clipping, ``lr`` at this step, ``tokens`` int32 count
    of weight > 0 targets, ``weight`` sum of loss weights. A batch with zero total weight
    gives loss 0 and zero gradients (the optimizer still steps, e.g. weight decay).
    """

    experts = getattr(model.config, "num_local_experts", 0)
    head = _head(model)

    def loss_sums(trainable, frozen, micro, rng):
        with sharding.scope(mesh, rules):
            out = model.apply(
                {"params": partition.merge(trainable, frozen)},
                micro["input_ids"],
                positions=micro["positions"],
                segment_ids=micro["segment_ids"],
                hidden_only=True,
                rngs={"dropout": rng},
                mutable=["router"] if experts else False,
            )
            hidden = out[0] if experts else out
            loss_sum, weight_sum = chunked_cross_entropy(
                hidden,
                head(partition.merge(trainable, frozen)),
                micro["targets"],
                micro["loss_weights"],
                getattr(model.config, "loss_chunk", 0),
                jax.random.fold_in(rng, 1),
            )
        if experts:  # Mixtral: + coef * load-balancing loss, weighted like the tokens
            aux = moe_aux_loss(out[1]["router"], experts)
            loss_sum = loss_sum + model.config.router_aux_loss_coef * aux * weight_sum
        return loss_sum, weight_sum

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        def micro_sums(i, micro):
            """Float32 gradients of one micro-batch's weighted loss sum, with its sums."""
            (loss_sum, weight_sum), grads = grad_fn(state.trainable, state.frozen, micro, jax.random.fold_in(rng, i))
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            return grads, loss_sum, weight_sum, jnp.sum(micro["loss_weights"] > 0, dtype=jnp.int32)

        def accumulate(carry, xs):
            return jax.tree.map(jnp.add, carry, micro_sums(*xs)), None

        accum = batch["input_ids"].shape[0]
        if accum == 1:  # no zero-filled accumulator: that would cost a pass over all params
            grads, loss_sum, weight_sum, tokens = micro_sums(0, jax.tree.map(lambda x: x[0], dict(batch)))
        else:
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


def make_eval_step(
    model: Any, mesh: Any = None, rules: Any = sharding.DEFAULT_RULES
) -> Callable[[Mapping, Batch], dict]:
    """``eval_step(params, batch) -> {loss_sum, weight_sum, tokens}`` over a ``[batch, seq_len]`` batch.

    Sums, so the caller adds them over batches: ``loss = loss_sum / weight_sum``,
    ``perplexity = exp(loss)``. ``mesh`` and ``rules`` as in :func:`make_train_step`.
    """

    def eval_step(params: Mapping, batch: Batch) -> dict:
        with sharding.scope(mesh, rules):
            hidden = model.apply(
                {"params": params},
                batch["input_ids"],
                positions=batch["positions"],
                segment_ids=batch["segment_ids"],
                hidden_only=True,
            )
            loss_sum, weight_sum = chunked_cross_entropy(
                hidden,
                _head(model)(params),
                batch["targets"],
                batch["loss_weights"],
                getattr(model.config, "loss_chunk", 0),
            )
        tokens = jnp.sum(batch["loss_weights"] > 0, dtype=jnp.int32)
        return {"loss_sum": loss_sum, "weight_sum": weight_sum, "tokens": tokens}

    return eval_step


def _head(model: Any) -> Callable:
    """``head(params)`` -> the loss head's ``f(h [b, c, embed], rng=None) -> [b, c, vocab]`` logits."""

    def head(params):
        def logits(h, rng=None):
            return model.apply({"params": params}, h, method="head", rngs=None if rng is None else {"dropout": rng})

        return logits

    return head
