"""Batched generation with a KV cache: one jitted prefill, one jitted decode loop.

Prompts are left-padded to a power-of-two length bucket and the number of new tokens is
rounded up to one too, so a session compiles once per (batch, prompt bucket, new-token
bucket, sampling settings) rather than once per length.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def left_pad(rows: Sequence[Sequence[int]], pad: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as :func:`generate` takes them: ``ids`` int32 and ``mask`` bool ``[size, width]``,
    each row right-aligned after ``pad`` tokens. With ``size`` the batch is filled up with copies of
    the last row, so every batch of a run has one shape (and one compiled program per length bucket)."""
    rows = list(rows)
    rows += [rows[-1]] * ((size or len(rows)) - len(rows))
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = True
    return ids, mask


def sample_logits(logits: Array, rng: Array, temperature: float, top_k: int | None, top_p: float | None) -> Array:
    """Next tokens ``[batch]`` from float32 logits ``[batch, vocab]``; greedy when temperature is 0."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _per_row(rng) -> bool:
    """Whether ``rng`` is a ``[batch]`` array of typed keys (``jax.random.key``), one per row."""
    return jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(model, params, ids, mask, cache_length):
    """Run the prompts ``[b, t]`` into a fresh cache of ``cache_length`` slots; last logits ``[b, vocab]``."""
    cache = model.init_cache(ids.shape[0], cache_length)
    logits, cache = model.apply({"params": params}, ids, attention_mask=mask, cache=cache, last_only=True)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0, 8, 9, 10, 11))
def _decode(model, params, first_logits, cache, rng, eos, pad, num_new, out_len, temperature, top_k, top_p):
    """Sample ``num_new`` tokens (``out_len`` is its static bucket); rows stop at an EOS."""
    batch = first_logits.shape[0]

    def pick(logits, step, done):
        if _per_row(rng):  # one key per row: a row's tokens do not depend on the rest of the batch
            keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, step)
            token = jax.vmap(lambda x, k: sample_logits(x[None], k, temperature, top_k, top_p)[0])(logits, keys)
        else:
            token = sample_logits(logits, jax.random.fold_in(rng, step), temperature, top_k, top_p)
        token = jnp.where(done, pad, token)
        return token, done | jnp.isin(token, eos)

    token, done = pick(first_logits, 0, jnp.zeros((batch,), bool))
    out = jnp.full((batch, out_len), pad, jnp.int32).at[:, 0].set(token)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < num_new) & ~jnp.all(done)

    def body(carry):
        step, token, cache, done, out = carry
        logits, cache = model.apply(
            {"params": params}, token[:, None], attention_mask=jnp.ones((batch, 1), bool), cache=cache
        )
        token, done = pick(logits[:, -1], step, done)
        return step + 1, token, cache, done, out.at[:, step].set(token)

    _, _, _, done, out = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, done, out))
    return out


def generate(
    model,
    params: dict,
    prompt_ids,
    max_new_tokens: int,
    *,
    attention_mask=None,
    rng: Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> Array:
    """Generate ``max_new_tokens`` tokens after each prompt.

    Args:
      prompt_ids: ``[batch, length]`` int token ids, left-padded when rows differ in length.
      attention_mask: ``[batch, length]``, 1 for prompt tokens and 0 for the left padding;
        default all ones.
      rng: a ``jax.random`` key; required when ``temperature > 0``. A ``[batch]`` array of typed
        keys (``jax.random.key``) gives each row its own, so a row's sample does not depend on
        which other rows share its batch.
      temperature: 0 (default) is greedy decoding; otherwise sample from softmax(logits / T),
        optionally restricted to the ``top_k`` most likely tokens and/or the smallest set
        whose probability reaches ``top_p``.
      eos_token_id: id(s) that end a row; default the model config's EOS ids. Pass ``()``
        to never stop early.
      pad_token_id: written after a row's EOS; default the config's pad id, else its first EOS, else 0.

    Returns:
      ``[batch, max_new_tokens]`` int32 new tokens; a row that produced EOS keeps the EOS
      and is padded after it.
    """
    cfg = model.config
    ids = np.asarray(prompt_ids, np.int32)
    if ids.ndim != 2:
        raise ValueError(f"prompt_ids must be [batch, length], got shape {ids.shape}")
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from prompt_ids shape {ids.shape}")
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any() or not mask[:, -1].all():
        raise ValueError("prompts must be left-padded: each attention_mask row is 0s, then at least one 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit rng, e.g. jax.random.key(0)")
    if rng is not None and _per_row(rng) and rng.shape[0] != ids.shape[0]:
        raise ValueError(f"rng holds {rng.shape[0]} keys for {ids.shape[0]} prompts; give one key, or one per row")
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
    eos = np.atleast_1d(np.asarray(eos_token_id, np.int32)) if np.size(eos_token_id) else np.full((1,), -1, np.int32)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if eos[0] >= 0 else 0)

    length = ids.shape[1]
    prompt_len, new_len = _bucket(length), _bucket(max_new_tokens)
    ids = np.pad(ids, ((0, 0), (prompt_len - length, 0)))
    mask = np.pad(mask, ((0, 0), (prompt_len - length, 0)))
    logits, cache = _prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), prompt_len + new_len)
    out = _decode(
        model,
        params,
        logits,
        cache,
        jax.random.key(0) if rng is None else rng,
        jnp.asarray(eos),
        jnp.int32(pad_token_id),
        jnp.int32(max_new_tokens),
        new_len,
        float(temperature),
        top_k,
        top_p,
    )
    return out[:, :max_new_tokens]
