"""What an objective supplies to the one loop (:func:`jft.train.fit`), and the shared pieces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jft import peft, sharding
from jft.config import ConfigError
from jft.data.pipeline import in_batches
from jft.hf import save_hf

REFERENCE = "reference"  # a frozen reference policy's copy beside the model's params (DPO, GRPO, PPO)
VALUE_HEAD = "value_head"  # PPO's value head on the policy trunk (or its critic), beside the model's params
TEACHER = "teacher"  # logit distillation's frozen teacher, beside the student's params


def model_params(params: dict) -> dict:
    """The model's own params, without what an objective keeps beside them (a reference copy, a
    value head, a teacher): what the policy runs with and what is exported."""
    return {k: v for k, v in params.items() if k not in (REFERENCE, VALUE_HEAD, TEACHER)}


class Objective:
    """A task of the loop. ``fit`` owns setup (mesh, tokenizer, model, PEFT, partition, optimizer,
    shardings), the loop (checkpoints, exact resume, SIGTERM, non-finite loss, early stopping,
    TensorBoard, JSONL, progress bar, loss plot) and export; the objective supplies:

    - ``model_overrides``: :class:`jft.LlamaConfig` fields it needs (a score head: ``num_labels``)
      and ``train_rules``: partition rules for what it adds that must train (before the run's own);
    - :meth:`prepare_rows`: values computed once from the starting model into its rows;
    - :meth:`add_frozen`: frozen params it keeps beside the model (a reference policy), and
      :meth:`add_reference`: the same for evaluating a model folder against another one;
    - :meth:`rows`: its train and validation rows, each a dict of numpy arrays of any keys
      (:class:`jft.data.Batches` batches them); ``mixes``: whether it takes ``data.mixture`` and
      local training sources read by the data cache's workers (:class:`jft.data.mixture.Part` s)
      in place of the training records;
    - :meth:`loss`: ``loss_fn(trainable, frozen, batch, rng) -> (loss_sum, weight_sum, metrics)``,
      metrics as sums and always with ``tokens``, the count of tokens trained on;
    - :meth:`make_step`: the loop's step from the jitted train step (default: the train step on
      the batch; RL objectives sample and score completions first), and ``updates_per_step``,
      the optimizer updates one loop step makes (the schedule's length is ``max_steps`` times it);
      ``host_local``: whether its step takes each host's share of the batch only (the default
      step does; one that samples from the whole batch on the host does not);
    - :meth:`state` / :meth:`load_state`: host-side values the objective carries from step to step
      (PPO's adaptive KL coefficient), saved with each checkpoint's metadata as JSON;
    - :meth:`validate`: the validation report (with ``loss``, for early stopping), by default
      :meth:`summarize` of the eval step's sums over the validation rows; :meth:`extra_eval`:
      anything else it reports there;
    - :meth:`export`: what the run leaves (default: adapter + merged Hugging Face folder).
    """

    name = ""
    model_overrides: dict = {}
    train_rules: tuple = ()
    updates_per_step = 1
    mixes = False
    host_local = True

    def __init__(self, cfg):
        self.cfg = cfg  # the run's config (its section for this objective holds its settings)

    def prepare_rows(self, model, params, data: dict, workdir: Path) -> dict:
        """The rows of :meth:`rows` with anything computed once from the starting model (reference
        log-probabilities); default: unchanged."""
        return data

    def add_frozen(self, model, params, labels, mesh=None, rules=sharding.DEFAULT_RULES):
        """``(params, labels)`` with anything the objective keeps beside the model (a reference
        policy's copy, a value head), placed on ``mesh``; frozen leaves are never checkpointed
        (rebuilt on resume), trainable ones are."""
        return params, labels

    def add_reference(self, model, params, reference: dict | None):
        """Params to evaluate ``model`` with, given ``reference``: the params of a model folder the
        objective compares against (``jft eval --reference``; DPO's reference policy), or None.
        Default: the objective compares against nothing, so a reference is an error."""
        if reference is not None:
            raise ConfigError(f"task={self.name!r} compares against no reference model; drop --reference")
        return params

    def rows(self, records: tuple[list, list], tokenizer, vocab: int) -> dict:
        """``{"train": rows, "validation": rows, "train_stats": str, "validation_stats": str}``."""
        raise NotImplementedError

    def loss(self, model, mesh=None, rules=sharding.DEFAULT_RULES):
        raise NotImplementedError

    def make_step(self, model, train_step, put, tokenizer):
        """``step(state, rows, step) -> (state, metrics)``: one step of the loop on a batch of host
        rows (``put`` shapes them for gradient accumulation and places them on the mesh); ``step``
        is the loop's step number (0 first), e.g. to derive a sampling key that a resume repeats."""
        return lambda state, rows, step: train_step(state, put(rows))

    def state(self) -> dict:
        """JSON values to checkpoint beside the train state (default: none)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Take back :meth:`state` from a checkpoint on resume."""

    def validate(self, model, params, eval_step, rows: list[dict], batch_sharding: Any = None) -> dict:
        """The validation report of ``params`` on ``rows``: :meth:`summarize` of the eval step's sums."""
        return self.summarize(eval_sums(eval_step, params, rows, self.cfg.train.batch_size, batch_sharding))

    def summarize(self, sums: dict) -> dict:
        raise NotImplementedError

    def extra_eval(self, model, params, tokenizer, records: list) -> dict:
        return {}

    def export(self, model, params, tokenizer, workdir: Path, report: dict) -> None:
        """workdir/adapter (PEFT) and workdir/hf (the model, adapters merged); what the objective kept
        beside the model (a reference copy, a value head) is not exported."""
        cfg, export_model, params = self.cfg, model, model_params(params)
        if model.peft.methods:
            report["adapter"] = str(peft.save_adapter(model, params, workdir / "adapter"))
            export_model, params = peft.fold(model, params)
        if cfg.export.hf and export_model.peft.methods:
            left = export_model.peft.methods
            print(f"no HF export: {left} do not fold into the weights; the adapter is in {report['adapter']}")
        elif cfg.export.hf:
            save_hf(export_model, params, workdir / "hf", dtype=cfg.export.dtype or None, tokenizer=tokenizer)
            report["hf"] = str(workdir / "hf")


def hidden_states(model: Any, params, input_ids, rng=None, **inputs) -> tuple[jax.Array, dict]:
    """``(final hidden states [b, t, embed], collections)`` of one forward for a loss: in training
    (``rng`` given) with dropout and the model's training collections (:attr:`loss_collections`,
    for :meth:`training_loss`), in evaluation (``rng=None``) without either. ``inputs``: the
    model's other arguments (``positions``, ``segment_ids``, ``attention_mask``)."""
    train = rng is not None
    return model.apply(
        {"params": params},
        input_ids,
        **inputs,
        hidden_only=True,
        rngs={"dropout": rng} if train else {},
        mutable=list(model.loss_collections) if train else [],
    )


def eval_sums(eval_step, params, rows: list[dict], batch_size: int, batch_sharding: Any = None) -> dict:
    """The eval step's outputs summed over all ``rows`` (the last batch padded with all-zero rows,
    which every objective weighs 0), batches split over the mesh as ``batch_sharding`` says."""
    total: dict = {}
    for batch, _ in in_batches(rows, batch_size):
        if batch_sharding is not None:
            batch = sharding.put_batch(batch, batch_sharding)
        for k, v in jax.device_get(eval_step(params, batch)).items():
            total[k] = total.get(k, 0) + (int(v) if np.issubdtype(np.asarray(v).dtype, np.integer) else float(v))
    return total


def per_weight(sums: dict, skip=("loss_sum", "weight_sum")) -> dict:
    """Summed eval metrics as reported: counts as they are, float sums per unit weight."""
    weight = max(sums.get("weight_sum", 0.0), 1e-9)
    return {k: v if isinstance(v, int) else v / weight for k, v in sums.items() if k not in skip}
