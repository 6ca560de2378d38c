"""Reward models from ranking data (``task = "reward"``): a scalar score head read at each
sequence's last real token, trained with the Bradley-Terry loss on chosen / rejected pairs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jft import partition, sharding
from jft.models.llama import last_token_scores
from jft.objectives.base import Objective, hidden_states, per_weight


def pair_scores(model: Any, params: Mapping, batch: Mapping, rng=None) -> tuple[jax.Array, dict]:
    """``([pairs, 2] float32 scores of chosen and rejected, the collections of the forward)`` for a
    batch of preference rows (``input_ids`` / ``attention_mask`` ``[pairs, 2, t]``); one forward
    over both sides. ``rng``: dropout (and the model's training collections) in training."""
    pairs = batch["input_ids"].shape[0]
    ids = batch["input_ids"].reshape(2 * pairs, -1)
    mask = batch["attention_mask"].reshape(2 * pairs, -1)
    hidden, collections = hidden_states(model, params, ids, rng, attention_mask=mask)
    return last_token_scores(model, params, hidden, mask)[:, 0].reshape(pairs, 2), collections


def bradley_terry_loss(
    model: Any, mesh: Any = None, rules: Any = sharding.DEFAULT_RULES, center_coef: float = 0.0
) -> Callable:
    """``loss_fn(trainable, frozen, batch, rng)``: ``-log sigmoid(r_chosen - r_rejected - margin)``
    per pair, plus ``center_coef * (r_chosen + r_rejected)^2`` (reward centering, trl's
    ``center_rewards_coefficient``), summed over pairs weighted by ``batch["weight"]`` (0 = a
    padding pair). Metrics (sums over pairs): ``accuracy`` (chosen scored higher), ``margin``
    (``r_chosen - r_rejected``), ``chosen_reward``, ``rejected_reward``; ``tokens`` counts the
    real tokens of both sides."""

    def loss_fn(trainable, frozen, batch, rng):
        params = partition.join(trainable, frozen)
        with sharding.scope(mesh, rules):
            scores, collections = pair_scores(model, params, batch, rng)
        chosen, rejected = scores[:, 0], scores[:, 1]
        w = batch["weight"].astype(jnp.float32)
        per_pair = -jax.nn.log_sigmoid(chosen - rejected - batch["margin"]) + center_coef * (chosen + rejected) ** 2
        loss_sum, weight_sum = jnp.sum(per_pair * w), jnp.sum(w)
        if rng is not None:
            loss_sum = loss_sum + model.training_loss(collections) * weight_sum
        metrics = {
            "accuracy": jnp.sum((chosen > rejected) * w),
            "margin": jnp.sum((chosen - rejected) * w),
            "chosen_reward": jnp.sum(chosen * w),
            "rejected_reward": jnp.sum(rejected * w),
            "tokens": jnp.sum(batch["attention_mask"], dtype=jnp.int32),
        }
        return loss_sum, weight_sum, metrics

    return loss_fn


class Reward(Objective):
    """Bradley-Terry reward modelling on ``{"prompt", "chosen", "rejected"}`` records (or their
    conversational form; optional ``margin``), tokenized by :func:`jft.data.preference.tokenize_pairs`.
    The model gets a one-label score head (a new one on a causal-LM folder) that always trains,
    also under PEFT. The export (:meth:`Objective.export`) is a ``*ForSequenceClassification``
    folder in workdir/hf; under LoRA or IA3, workdir/adapter is a peft ``SEQ_CLS`` adapter with
    the trained head as ``modules_to_save`` (``peft.PeftModel.from_pretrained`` puts it on a
    ``*ForSequenceClassification`` of the base folder: ``num_labels=1`` for a causal-LM one)."""

    name = "reward"
    model_overrides = {"num_labels": 1}
    train_rules = (("score/.*", "trainable"),)

    def rows(self, records, tokenizer, vocab):
        from jft.data.preference import tokenize_pairs

        cfg, out = self.cfg, {}
        for split, pairs in zip(("train", "validation"), records, strict=True):
            rows, stats = tokenize_pairs(
                pairs, tokenizer, max_length=cfg.data.seq_len, overlong=cfg.data.overlong, vocab_size=vocab
            )
            out[split], out[f"{split}_stats"] = rows, str(stats)
        return out

    def loss(self, model, mesh=None, rules=sharding.DEFAULT_RULES):
        return bradley_terry_loss(model, mesh, rules, self.cfg.reward.center_coef)

    def summarize(self, sums):
        return {"loss": sums["loss_sum"] / max(sums["weight_sum"], 1e-9), **per_weight(sums)}
