"""Losses over model outputs. Each returns sums, so callers can normalise across micro-batches."""

from __future__ import annotations

import functools
from collections.abc import Callable

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


# Default chunk: about this many float32 logits (64 MiB) per chunk, so a chunk's logits and their
# gradient stay small next to the model while each chunk's matmul is still large.
CHUNK_LOGITS = 2**24


def loss_chunk_size(batch: int, length: int, vocab: int, chunk_size: int = 0) -> int:
    """Sequence positions per chunk: ``chunk_size`` if set, else ``CHUNK_LOGITS / (batch * vocab)``,
    at most ``length`` and at least 1."""
    size = chunk_size or CHUNK_LOGITS // max(1, batch * vocab)
    return max(1, min(length, size))


def token_log_probs(
    hidden: Array,
    head: Callable,
    targets: Array,
    chunk_size: int = 0,
    rng: Array | None = None,
    with_entropy: bool = False,
) -> Array | tuple[Array, Array]:
    """``log softmax(head(hidden))[targets]`` as ``[b, t]`` float32, a chunk of positions at a time;
    with ``with_entropy`` also the entropy of each position's distribution ``[b, t]`` (a metric:
    no gradient flows through it).

    Args:
      hidden: ``[b, t, embed]`` final hidden states (``model.apply(..., hidden_only=True)``).
      head: ``head(h) -> [b, c, vocab]`` logits of a chunk ``h [b, c, embed]`` (e.g.
        ``lambda h: model.apply(variables, h, method="head")``); with ``rng``, ``head(h, rng)``
        gets a different key per chunk (dropout in the head).
      targets: ``[b, t]`` int; ids outside ``[0, vocab)`` are clipped into range (give them weight 0).
      chunk_size: positions per chunk; 0 sizes it from the vocabulary (:func:`loss_chunk_size`).

    Only one chunk's logits ``[b, chunk, vocab]`` exist at a time: each chunk is checkpointed,
    so the backward pass recomputes its logits instead of keeping them, and the head's
    parameter gradients accumulate over the chunks. Values and gradients equal those of the
    whole row's logits (up to float rounding).
    """
    b, t, _ = hidden.shape
    vocab = jax.eval_shape(lambda h: head(h) if rng is None else head(h, rng), hidden[:, :1]).shape[-1]
    size = loss_chunk_size(b, t, vocab, chunk_size)
    n, rest = divmod(t, size)
    keys = None if rng is None else jax.random.split(rng, n + 1)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_log_probs(h, y, key):
        logits = (head(h) if key is None else head(h, key)).astype(jnp.float32)
        y = jnp.clip(y, 0, vocab - 1)
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0] - lse
        if not with_entropy:
            return logp
        probs = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
        return logp, jax.lax.stop_gradient(lse) - jnp.sum(probs * jax.lax.stop_gradient(logits), axis=-1)

    def body(carry, xs):
        return carry, chunk_log_probs(*xs)

    parts = []
    if n:
        split = lambda a: jnp.moveaxis(a[:, : n * size].reshape(b, n, size, *a.shape[2:]), 1, 0)  # noqa: E731
        _, out_nbc = jax.lax.scan(body, None, (split(hidden), split(targets), None if keys is None else keys[:n]))
        parts.append(jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * size), out_nbc))
    if rest:  # the remainder as one smaller chunk, not padded to a full one
        parts.append(chunk_log_probs(hidden[:, n * size :], targets[:, n * size :], None if keys is None else keys[n]))
    return parts[0] if len(parts) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *parts)


def chunked_cross_entropy(
    hidden: Array, head: Callable, targets: Array, weights: Array, chunk_size: int = 0, rng: Array | None = None
) -> tuple[Array, Array]:
    """:func:`weighted_cross_entropy` of ``head(hidden)`` without the ``[b, t, vocab]`` logits:
    ``(sum(w * nll), sum(w))`` from :func:`token_log_probs` (same arguments)."""
    weights = weights.astype(jnp.float32)
    logp_bt = token_log_probs(hidden, head, targets, chunk_size, rng)
    return -jnp.sum(logp_bt * weights), jnp.sum(weights)


def sequence_log_probs(
    hidden: Array, head: Callable, targets: Array, weights: Array, chunk_size: int = 0, rng: Array | None = None
) -> tuple[Array, Array]:
    """Per-sequence ``(sum of log p(target), number of positions)`` over the positions with
    ``weights > 0`` (a response's tokens), both ``[b]`` float32, from :func:`token_log_probs`
    (same arguments, no ``[b, t, vocab]`` logits). The mean log-prob is ``sum / max(count, 1)``.

    The weights only select positions (a fractional weight counts as a whole token): the
    preference losses compare sequence likelihoods, which have no per-token weighting."""
    mask_bt = weights > 0
    logp_bt = token_log_probs(hidden, head, targets, chunk_size, rng)
    # where, not a product: a masked position can never leak into the sum, whatever its value
    logp_sum = jnp.sum(jnp.where(mask_bt, logp_bt, 0.0), axis=-1)
    return logp_sum, jnp.sum(mask_bt, axis=-1).astype(jnp.float32)
