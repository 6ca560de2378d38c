"""Losses over model outputs. Each returns sums, so callers can normalise across micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def weighted_cross_entropy(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
    """Token cross entropy, weighted: ``(sum(w * nll), sum(w))``, both float32 scalars.

    Args:
      logits: ``[b, t, vocab]``, upcast to float32.
      targets: ``[b, t]`` int, the next token ids. Ids outside ``[0, vocab)`` (such as a
        ``-100`` ignore id) are clipped into range, so give those positions weight 0.
      weights: ``[b, t]``: 0 = not trained (padding), 1 = trained, fractions in between.

    The mean loss is ``weighted_sum / weight_sum``; dividing by the weight of the whole
    accumulated batch (not per micro-batch) makes gradient accumulation exact.
    """
    logits = logits.astype(jnp.float32)
    targets = jnp.clip(targets, 0, logits.shape[-1] - 1)
    lse_bt = jax.nn.logsumexp(logits, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    return jnp.sum((lse_bt - target_logit_bt) * weights), jnp.sum(weights)
