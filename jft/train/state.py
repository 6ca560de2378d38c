"""``TrainState``: everything a train step reads and returns, as one pytree; ``TrainingError``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jft import partition


@flax.struct.dataclass
class TrainState:
    """``step`` int32 scalar (optimizer steps taken), ``trainable`` and ``frozen`` params
    (nested dicts, see :mod:`jft.partition`), ``opt_state`` over ``trainable`` only,
    and ``rng`` (a PRNG key; each step folds ``step`` into it).
    """

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: optax.OptState
    rng: jax.Array

    @classmethod
    def create(cls, params: Mapping, labels: Mapping, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
        """Split ``params`` by ``labels`` and initialise the optimizer on the trainable half."""
        trainable, frozen = partition.split(params, labels)
        return cls(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            frozen=frozen,
            opt_state=tx.init(trainable),
            rng=rng,
        )

    @property
    def params(self) -> dict:
        """The full parameter tree (``partition.join(trainable, frozen)``)."""
        return partition.join(self.trainable, self.frozen)


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a workdir of another run), with what to do."""
