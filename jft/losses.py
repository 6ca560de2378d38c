"""Losses over model outputs. Each returns sums, so callers can normalise across micro-batches."""

from __future__ import annotations

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

    def chunk_log_probs(h, y, key):
        logits = (head(h) if key is None else head(h, key)).astype(jnp.float32)
        y = jnp.clip(y, 0, vocab - 1)
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0] - lse
        if not with_entropy:
            return logp
        probs = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
        return logp, jax.lax.stop_gradient(lse) - jnp.sum(probs * jax.lax.stop_gradient(logits), axis=-1)

    return _over_chunks(chunk_log_probs, (hidden, targets), loss_chunk_size(b, t, vocab, chunk_size), rng)


def _over_chunks(fn: Callable, xs: tuple[Array, ...], size: int, rng: Array | None):
    """``fn(*chunks, key)`` on ``size`` positions of each ``[b, t, ...]`` array of ``xs`` at a time, its
    outputs (``[b, c]`` arrays, or a tuple of them) joined back into ``[b, t]``.

    Each chunk is checkpointed, so the backward pass recomputes a chunk's ``[b, c, vocab]`` logits
    instead of keeping them. Full chunks run in one ``lax.scan`` (one compiled body, whatever the
    length); a remainder runs as one smaller chunk, not padded to a full one. ``key`` is None
    without ``rng``, else a different key per chunk.
    """
    b, t = xs[0].shape[:2]
    n, rest = divmod(t, size)
    keys = None if rng is None else jax.random.split(rng, n + 1)
    fn = jax.checkpoint(fn, prevent_cse=False)
    parts = []
    if n:
        split = lambda a: jnp.moveaxis(a[:, : n * size].reshape(b, n, size, *a.shape[2:]), 1, 0)
        chunks = (*(split(x) for x in xs), None if keys is None else keys[:n])
        _, out_nbc = jax.lax.scan(lambda carry, chunk: (carry, fn(*chunk)), None, chunks)
        parts.append(jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * size), out_nbc))
    if rest:
        parts.append(fn(*(x[:, n * size :] for x in xs), None if keys is None else keys[n]))
    return parts[0] if len(parts) == 1 else jax.tree.map(lambda *ps: jnp.concatenate(ps, axis=1), *parts)


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


def generalized_jsd(
    student_logits: Array, teacher_logits: Array, beta: float, temperature: float = 1.0, teacher_top_k: int = 0
) -> Array:
    """Generalised Jensen-Shannon divergence of each position's student and teacher distributions,
    ``[...]`` float32 for logits ``[..., vocab]`` (GKD, https://arxiv.org/abs/2306.13649, Eq. 1).

    With ``S = softmax(student / T)``, ``P = softmax(teacher / T)`` and ``M = beta P + (1 - beta) S``:
    ``beta KL(P || M) + (1 - beta) KL(S || M)``; at the endpoints, exactly, ``beta == 0`` is the forward
    KL ``KL(P || S)`` and ``beta == 1`` the reverse KL ``KL(S || P)``. The same definition, endpoints and
    temperature as trl's ``GKDTrainer.generalized_jsd_loss`` (its elementwise ``reduction="none"``
    summed over the vocabulary): the logits are divided by ``T`` and the divergence is NOT multiplied
    by ``T**2`` (the Hinton-style gradient rescale), as in trl; scale the loss yourself if you want it.

    Args:
      student_logits: ``[..., vocab]``, upcast to float32; gradients flow into these.
      teacher_logits: ``[..., vocab]``, the same shape; no gradient flows into them.
      beta: a Python float in ``[0, 1]`` (the endpoints pick a branch, as in trl).
      temperature: ``T > 0``.
      teacher_top_k: if ``0 < k < vocab``, the teacher keeps only its ``k`` most likely tokens,
        renormalised (the rest get probability exactly 0; ties at the k-th value are broken by
        ``lax.top_k``, so exactly ``k`` are kept). Not in trl. Every ``0 log 0`` term counts 0, so the
        forward KL sums over the kept tokens only. Raises ValueError with ``beta == 1``: the reverse
        KL against a distribution with zeros is infinite wherever the student has mass outside the
        top k (any ``beta < 1`` is finite, as ``M`` then covers the student's support).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if teacher_top_k < 0:
        raise ValueError(f"teacher_top_k must be >= 0 (0 = the whole vocabulary), got {teacher_top_k}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} differ")
    vocab = student_logits.shape[-1]
    top_k = teacher_top_k if 0 < teacher_top_k < vocab else 0
    if top_k and beta == 1.0:
        raise ValueError(
            "beta=1 (reverse KL) with teacher_top_k is infinite wherever the student puts mass outside the"
            " teacher's top k; use beta < 1 or teacher_top_k=0"
        )
    logp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    if top_k:
        _, top = jax.lax.top_k(teacher, top_k)
        keep = jnp.put_along_axis(jnp.zeros(teacher.shape, bool), top, True, axis=-1, inplace=False)
        lse = jax.nn.logsumexp(jnp.where(keep, teacher, -jnp.inf), axis=-1, keepdims=True)
        # finite (0) log-probs where the teacher's probability is 0: no inf or nan enters any sum
        logp_t = jnp.where(keep, teacher - lse, 0.0)
        p_t = jnp.where(keep, jnp.exp(logp_t), 0.0)
    else:
        keep = True
        logp_t = jax.nn.log_softmax(teacher, axis=-1)
        p_t = jnp.exp(logp_t)

    def kl_from_teacher(logq):  # KL(P || Q), 0 log 0 = 0 on the dropped tokens
        return jnp.sum(jnp.where(keep, p_t * (logp_t - logq), 0.0), axis=-1)

    if beta == 0.0:
        return kl_from_teacher(logp_s)
    p_s = jnp.exp(logp_s)
    if beta == 1.0:
        return jnp.sum(p_s * (logp_s - logp_t), axis=-1)
    # log M = logaddexp(log beta + log P, log(1 - beta) + log S); just the student's term where P = 0
    logm_s = logp_s + jnp.log1p(-beta)
    logm = jnp.where(keep, jnp.logaddexp(logp_t + jnp.log(beta), logm_s), logm_s)
    return beta * kl_from_teacher(logm) + (1 - beta) * jnp.sum(p_s * (logp_s - logm), axis=-1)


def chunked_distillation_loss(
    student_hidden: Array,
    student_head: Callable,
    teacher_hidden: Array,
    teacher_head: Callable,
    targets: Array,
    weights: Array,
    *,
    beta: float,
    temperature: float = 1.0,
    teacher_top_k: int = 0,
    chunk_size: int = 0,
    rng: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Logit distillation without any ``[b, t, vocab]`` logits: ``(sum(w * jsd), sum(w * nll), sum(w))``,
    float32 scalars, a chunk of positions at a time (as :func:`token_log_probs`).

    ``jsd`` is :func:`generalized_jsd` of the student's and teacher's logits at each position (``beta``,
    ``temperature``, ``teacher_top_k`` as there); ``nll`` is the student's cross entropy of ``targets``
    at temperature 1 (the data loss, to mix in or to log). Both are sums: divide by the weight of the
    whole accumulated batch.

    Args:
      student_hidden: ``[b, t, embed]`` the student's final hidden states.
      student_head: ``student_head(h) -> [b, c, vocab]`` (``student_head(h, rng)`` with ``rng``, a key
        per chunk, as in :func:`token_log_probs`).
      teacher_hidden: ``[b, t, teacher_embed]``, the teacher's, at the same positions (its width may differ).
      teacher_head: ``teacher_head(h) -> [b, c, vocab]``, never given a key (the teacher runs as in eval).
      targets: ``[b, t]`` int; ids outside ``[0, vocab)`` are clipped into range (give them weight 0).
      weights: ``[b, t]``: 0 = not trained, 1 = trained, fractions in between.
      chunk_size: positions per chunk; 0 sizes it so both heads' logits fit the usual budget.

    Gradients flow into ``student_hidden`` and the student head only: the teacher's hidden states
    and logits are behind ``stop_gradient``. Each chunk's backward pass recomputes both heads.
    Raises ValueError if the two heads' vocabularies differ.
    """
    b, t, _ = student_hidden.shape
    if teacher_hidden.shape[:2] != (b, t):
        raise ValueError(f"teacher hidden {teacher_hidden.shape} and student hidden {student_hidden.shape} differ")
    student_vocab = jax.eval_shape(
        lambda h: student_head(h) if rng is None else student_head(h, rng), student_hidden[:, :1]
    ).shape[-1]
    teacher_vocab = jax.eval_shape(teacher_head, teacher_hidden[:, :1]).shape[-1]
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"the student's vocabulary ({student_vocab}) and the teacher's ({teacher_vocab}) differ: logit"
            " distillation compares distributions token by token; sequence-level distillation (`jft distill`)"
            " trains on the teacher's generated text and does not need a shared vocabulary"
        )
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)

    def chunk_losses(h_s, h_t, y, key):
        student = (student_head(h_s) if key is None else student_head(h_s, key)).astype(jnp.float32)
        divergence = generalized_jsd(student, teacher_head(h_t), beta, temperature, teacher_top_k)
        y = jnp.clip(y, 0, student_vocab - 1)
        nll = jax.nn.logsumexp(student, axis=-1) - jnp.take_along_axis(student, y[..., None], axis=-1)[..., 0]
        return divergence, nll

    size = loss_chunk_size(b, t, 2 * student_vocab, chunk_size)  # two heads' logits per chunk
    divergence_bt, nll_bt = _over_chunks(chunk_losses, (student_hidden, teacher_hidden, targets), size, rng)
    weights = weights.astype(jnp.float32)
    return jnp.sum(divergence_bt * weights), jnp.sum(nll_bt * weights), jnp.sum(weights)
