"""The optimizer: clip -> adamw | sgd | adafactor -> weight decay -> learning rate -> layer masks
-> low-precision update.

    tx, schedule = make_optimizer(learning_rate=2e-4, total_steps=1000, weight_decay=0.01, masks=masks)
    opt_state = tx.init(trainable)          # state exists for trainable leaves only

Weight decay is decoupled (AdamW style: ``update -= lr * weight_decay * param``) and applies
to matrices only: leaves whose per-layer ndim is >= 2. For leaves under ``model/layers``
the leading stacked ``[num_layers]`` axis does not count, so stacked norms and biases
(``[L, d]``) are not decayed, while kernels and the embedding table are.

Precision. Adam's moments live in ``mu_dtype`` / ``nu_dtype`` (None = each param's dtype, as
optax does). A bfloat16 weight of size 0.02 has a spacing of ~1.2e-4, so updates of ~1e-5 round
away when ``optax.apply_updates`` casts ``p + u`` back to bfloat16. Float32 params (with bfloat16
compute in the model) avoid that; for bfloat16 params :func:`low_precision_update` ("kahan" or
"stochastic") makes the rounding lose nothing on average.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jft import partition, tree

OPTIMIZERS = ("adamw", "sgd", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")
LOW_PRECISION_UPDATES = ("none", "kahan", "stochastic")


def make_optimizer(
    *,
    name: str = "adamw",
    learning_rate: float,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_fraction: float = 0.05,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    momentum: float = 0.9,
    clip_norm: float | None = 1.0,
    min_lr_ratio: float = 0.0,
    masks: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    bf16_update: str = "none",
    seed: int = 0,
) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """``(tx, schedule_fn)``: an optax transformation and ``step -> learning rate`` (float32).

    Args:
      name: "adamw" (``b1``, ``b2``, ``eps``); "sgd" (heavy-ball ``momentum``, 0 = none,
        no optimizer state); "adafactor" (factored second moments and update clipping at
        RMS 1, no first moment, ``b1``/``b2``/``eps`` unused).
      learning_rate: the peak learning rate.
      total_steps: optimizer steps of the run; the schedule ends there.
      warmup_steps: linear warmup from 0 to the peak; None means
        ``round(warmup_fraction * total_steps)``.
      schedule: after warmup, "cosine" or "linear" decay to ``min_lr_ratio * learning_rate``
        at ``total_steps``, or "constant".
      weight_decay: decoupled, scaled by the learning rate, on matrices only (module doc).
      clip_norm: clip gradients to this global norm; None or 0 disables.
      masks: :func:`jft.partition.layer_masks` of the trainable tree. The updates of
        the frozen layers of partially trainable stacked leaves are zeroed after the whole
        chain, so those layers stay bit-identical (weight decay included).
      mu_dtype: dtype of Adam's first moment and of SGD's momentum; None = each param's dtype
        (for Adam with ``nu_dtype`` set: ``nu_dtype``, as optax infers it from the copies).
      nu_dtype: dtype of Adam's second moment; None = each param's dtype. bfloat16 is risky
        there: with b2 = 0.999 a step changes nu by 0.1%, under half its bfloat16 spacing, so
        nu can stop following the gradients' scale.
      bf16_update: how updates reach bfloat16 / float16 params (:func:`low_precision_update`):
        "none" (round to nearest: small updates are lost), "kahan" (a compensation buffer per
        param carries what rounding dropped), "stochastic" (bfloat16 only; seeded by ``seed``
        and the step). Float32 leaves are never touched.

    Raises ValueError for an unknown name, schedule or bf16_update, or inconsistent step counts.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if bf16_update not in LOW_PRECISION_UPDATES:
        raise ValueError(f"unknown bf16_update {bf16_update!r}; choose one of {LOW_PRECISION_UPDATES}")
    if warmup_steps is None:
        warmup_steps = round(warmup_fraction * total_steps)
    schedule_fn = make_schedule(learning_rate, total_steps, warmup_steps, schedule, min_lr_ratio)

    chain = []
    if clip_norm:
        chain.append(optax.clip_by_global_norm(clip_norm))
    if name == "adamw":
        adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
        # optax keeps nu in the dtype of the params it is initialised with: hand it nu_dtype copies.
        chain.append(adam if nu_dtype is None else in_dtype(adam, nu_dtype))
    elif name == "sgd":
        if momentum:
            chain.append(optax.trace(decay=momentum, accumulator_dtype=mu_dtype))
    else:
        chain += [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0)]
    if weight_decay:
        chain.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    chain.append(optax.scale_by_learning_rate(schedule_fn))
    chain.append(mask_layers(masks))
    if bf16_update != "none":  # last: it turns the final update into what the params can hold
        chain.append(low_precision_update(bf16_update, seed=seed))
    return optax.chain(*chain), schedule_fn


def optimizer_from_config(optim: Any, total_steps: int, masks: Any = None, seed: int = 0, **overrides):
    """:func:`make_optimizer` from a config's ``optim`` section (:func:`jft.config.default_config`):
    every field in, ``clip_norm`` 0 and empty dtypes meaning off / the parameters' dtype;
    ``overrides`` replace single arguments."""
    kw = dict(
        name=optim.name,
        learning_rate=optim.learning_rate,
        total_steps=total_steps,
        warmup_fraction=optim.warmup_fraction,
        schedule=optim.schedule,
        weight_decay=optim.weight_decay,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        momentum=optim.momentum,
        clip_norm=optim.clip_norm or None,
        min_lr_ratio=optim.min_lr_ratio,
        masks=masks,
        mu_dtype=optim.mu_dtype or None,
        nu_dtype=optim.nu_dtype or None,
        bf16_update=optim.bf16_update,
        seed=seed,
    )
    return make_optimizer(**{**kw, **overrides})


def make_schedule(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> Callable[[Any], jax.Array]:
    """``step -> lr``: 0 at step 0, the peak at ``warmup_steps``, the end at ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be at least 1")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be between 0 and total_steps={total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be between 0 and 1")
    peak = float(learning_rate)
    end = peak * min_lr_ratio
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule_fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup_steps, 1)
        frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        if schedule == "cosine":
            after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        elif schedule == "linear":
            after = peak + (end - peak) * frac
        else:
            after = jnp.full_like(frac, peak)
        return jnp.where(step < warmup_steps, warm, after)

    return schedule_fn


def decay_mask(params: Any) -> dict:
    """True for leaves that are matrices per layer (weight decay applies), False otherwise."""

    def is_matrix(path: str, leaf) -> bool:
        stacked = path.startswith("/".join(partition.STACKED_PREFIX) + "/")
        return np.ndim(leaf) - int(stacked) >= 2

    return tree.map_with_path(is_matrix, params)


def mask_layers(masks: Any) -> optax.GradientTransformation:
    """Zero the updates of frozen layers inside partially trainable stacked leaves (stateless)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return partition.apply_layer_masks(updates, masks), state

    return optax.GradientTransformation(init_fn, update_fn)


def in_dtype(inner: optax.GradientTransformation, dtype: Any) -> optax.GradientTransformation:
    """``inner`` run on ``dtype`` copies of the params and updates, so the state it creates with
    ``zeros_like(params)`` (Adam's ``nu``) is in ``dtype``; its updates come out in ``dtype``."""
    dtype = jnp.dtype(dtype)
    cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)

    def init_fn(params):
        return inner.init(cast(params))

    def update_fn(updates, state, params=None):
        return inner.update(cast(updates), state, None if params is None else cast(params))

    return optax.GradientTransformation(init_fn, update_fn)


class LowPrecisionUpdateState(NamedTuple):
    """``count`` int32 (updates applied; stochastic rounding's rng stream), ``compensation``:
    per low-precision param, what rounding has dropped so far (``compensation_dtype``, same
    shape; a float32 scalar 0 for float32 params, which need none)."""

    count: jax.Array
    compensation: Any


def low_precision_update(
    mode: str = "kahan", *, seed: int = 0, compensation_dtype: Any = jnp.bfloat16
) -> optax.GradientTransformation:
    """Last transform of a chain for bfloat16 / float16 params: updates that are not lost to rounding.

    ``optax.apply_updates(params, updates)`` computes ``(p + u).astype(p.dtype)``: rounding to
    nearest, so an update under half the spacing of ``p`` (bfloat16: ~1.2e-4 at 0.02) vanishes
    every step. This transform decides the new low-precision value ``p_new`` itself and returns
    ``u' = float32(p_new) - float32(p)``, exact in float32, so ``apply_updates`` lands exactly on
    ``p_new`` (an ``optax.apply_updates`` after it is all that is needed).

    mode:
      "kahan": compensated summation. ``y = u + c``, ``p_new = round(p + y)``,
        ``c = y - (p_new - p)``: the part of the update rounding dropped is carried into the next
        step, so the sum of all updates reaches the params up to one rounding of the last step.
        Costs one ``compensation_dtype`` buffer per param (bfloat16: 2 bytes; float32: 4).
      "stochastic": bfloat16 only. ``p + u`` in float32 is rounded up or down with probability
        proportional to its distance from the two neighbours, so the update is right on average.
        No buffer; the random bits come from ``seed`` folded with the update count, so a run
        (and a resumed run) is deterministic.

    Float32 leaves pass through unchanged; updates must be float (any dtype; float32 keeps the
    most). Raises ValueError for another mode, and at init for float16 params under "stochastic".
    """
    if mode not in ("kahan", "stochastic"):
        raise ValueError(f"low_precision_update: mode {mode!r}; choose kahan or stochastic")
    compensation_dtype = jnp.dtype(compensation_dtype)

    def low(p) -> bool:
        return jnp.issubdtype(p.dtype, jnp.floating) and jnp.finfo(p.dtype).bits < 32

    def init_fn(params):
        def buffer(p):
            if mode == "stochastic" and low(p) and p.dtype != jnp.bfloat16:
                raise ValueError(f"stochastic rounding is for bfloat16 params; got {p.dtype} (use kahan)")
            if mode == "kahan" and low(p):
                return jnp.zeros_like(p, dtype=compensation_dtype)  # sharded like p
            return jnp.zeros((), jnp.float32)

        return LowPrecisionUpdateState(jnp.zeros((), jnp.int32), jax.tree.map(buffer, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("low_precision_update needs params (tx.update(grads, state, params))")
        leaves, treedef = jax.tree.flatten(params)
        flat_u, flat_c = treedef.flatten_up_to(updates), treedef.flatten_up_to(state.compensation)
        key = jax.random.fold_in(jax.random.key(seed), state.count)
        out_u, out_c = [], []
        for i, (p, u, c) in enumerate(zip(leaves, flat_u, flat_c, strict=True)):
            if not low(p):
                out_u.append(u)
                out_c.append(c)
                continue
            p32 = p.astype(jnp.float32)
            if mode == "kahan":
                y = u.astype(jnp.float32) + c.astype(jnp.float32)
                new = (p32 + y).astype(p.dtype).astype(jnp.float32)
                out_c.append((y - (new - p32)).astype(c.dtype))
            else:
                new = _round_stochastic(p32 + u.astype(jnp.float32), jax.random.fold_in(key, i))
                out_c.append(c)
            out_u.append(new - p32)
        return treedef.unflatten(out_u), LowPrecisionUpdateState(
            optax.safe_increment(state.count), treedef.unflatten(out_c)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _round_stochastic(x: jax.Array, key: jax.Array) -> jax.Array:
    """float32 ``x`` rounded to a bfloat16 neighbour (returned as float32), up with probability
    (x - down) / (up - down): add 16 random low bits to the float32 pattern, then truncate them."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
    return jnp.where(jnp.isfinite(x), out, x)  # inf and nan stay as they are
