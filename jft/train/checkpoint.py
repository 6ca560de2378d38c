"""Orbax checkpoints of the train state plus a JSON record of where the run stands.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
save interrupted mid-write never replaces the last good checkpoint. Two managers: ``ckpt/``
keeps the last few, ``best/`` keeps the one with the lowest validation loss. The root may be a
local folder or a ``gs://`` path (Orbax writes there directly); on a pod every host writes its
own shards of each array, in parallel, to the same root.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from jft.train.state import TrainState


class Checkpoints:
    def __init__(self, root: str | os.PathLike, keep: int):
        root = epath.Path(root).absolute()
        opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, enable_async_checkpointing=True)
        self.directory = root / "ckpt"
        self.last = ocp.CheckpointManager(self.directory, options=opts(max(keep, 1)))
        self.best = ocp.CheckpointManager(root / "best", options=opts(1))

    @property
    def latest_step(self) -> int | None:
        return self.last.latest_step()

    def save(self, step: int, state: TrainState, meta: dict, best: bool = False) -> None:
        """Start an asynchronous save of ``state`` and ``meta`` (JSON) at ``step``.

        The frozen params are not saved: they are the base model's (its files, or its seeded
        initialisation), which a resumed run loads again. A LoRA checkpoint is adapter-sized.
        """
        manager = self.best if best else self.last
        if step in manager.all_steps():
            return
        # One asynchronous save at a time: on a pod, two managers saving at once would share
        # Orbax's cross-host barriers (and fail); a manager already serialises its own saves.
        (self.last if best else self.best).wait_until_finished()
        state = state.replace(frozen={})
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        manager.save(step, args=args)

    def restore(self, state: TrainState, step: int | None = None, best: bool = False):
        """``(state, meta)`` of a checkpoint (default the latest), shaped and sharded like ``state``,
        whose frozen params are kept."""
        manager = self.best if best else self.last
        step = manager.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.replace(frozen={}))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        restored = manager.restore(step, args=args)
        return restored.state.replace(frozen=state.frozen), restored.meta

    def close(self) -> None:
        """Wait for pending saves, then release the managers."""
        for manager in (self.last, self.best):
            manager.wait_until_finished()
            manager.close()
