"""The optimizer: clip -> adamw | sgd | adafactor -> weight decay -> learning rate -> layer masks.

    tx, schedule = make_optimizer(learning_rate=2e-4, total_steps=1000, weight_decay=0.01, masks=masks)
    opt_state = tx.init(trainable)          # state exists for trainable leaves only

Weight decay is decoupled (AdamW style: ``update -= lr * weight_decay * param``) and applies
to matrices only: leaves whose per-layer ndim is >= 2. For leaves under ``model/layers``
the leading stacked ``[num_layers]`` axis does not count, so stacked norms and biases
(``[L, d]``) are not decayed, while kernels and the embedding table are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jft.train import partition

OPTIMIZERS = ("adamw", "sgd", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")


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
      masks: :func:`jft.train.partition.layer_masks` of the trainable tree. The updates of
        the frozen layers of partially trainable stacked leaves are zeroed after the whole
        chain, so those layers stay bit-identical (weight decay included).

    Raises ValueError for an unknown name or schedule, or inconsistent step counts.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if warmup_steps is None:
        warmup_steps = round(warmup_fraction * total_steps)
    schedule_fn = make_schedule(learning_rate, total_steps, warmup_steps, schedule, min_lr_ratio)

    chain = []
    if clip_norm:
        chain.append(optax.clip_by_global_norm(clip_norm))
    if name == "adamw":
        chain.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    elif name == "sgd":
        if momentum:
            chain.append(optax.trace(decay=momentum))
    else:
        chain += [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0)]
    if weight_decay:
        chain.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    chain.append(optax.scale_by_learning_rate(schedule_fn))
    chain.append(mask_layers(masks))
    return optax.chain(*chain), schedule_fn


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

    return partition.map_with_path(is_matrix, params)


def mask_layers(masks: Any) -> optax.GradientTransformation:
    """Zero the updates of frozen layers inside partially trainable stacked leaves (stateless)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return partition.apply_layer_masks(updates, masks), state

    return optax.GradientTransformation(init_fn, update_fn)
