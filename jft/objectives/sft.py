"""Supervised fine-tuning and continued pretraining (``task = "sft"``): weighted next-token cross
entropy over instruction, chat or raw-text records, packed into rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jft import data as jdata
from jft import evaluate as jeval
from jft import partition, sharding
from jft.losses import chunked_cross_entropy
from jft.objectives.base import Objective, hidden_states, per_weight

Batch = Mapping[str, jax.Array]


def token_loss(model: Any, mesh: Any = None, rules: Any = sharding.DEFAULT_RULES) -> Callable:
    """``loss_fn(trainable, frozen, batch, rng) -> (loss_sum, weight_sum, {"tokens"})``.

    ``batch``: ``input_ids``, ``targets`` (next tokens), ``loss_weights`` (0 = not trained),
    ``segment_ids`` (packed rows; 0 = padding) and ``positions``, each ``[rows, seq_len]``.
    ``loss_sum`` is the weighted cross entropy summed over tokens (plus, in training, the
    model's own term, e.g. Mixtral's load balancing, times the weight), ``weight_sum`` the summed
    loss weights and ``tokens`` the count of weighted targets. The loss head runs in chunks of
    positions (:func:`jft.losses.chunked_cross_entropy`, ``model.config.loss_chunk``), so no
    ``[rows, seq_len, vocab]`` float32 logits are held. With a ``mesh`` the model is traced in
    :func:`jft.sharding.scope` (activation sharding constraints from ``rules``).
    """

    def loss_fn(trainable: Mapping, frozen: Mapping, batch: Batch, rng: jax.Array | None):
        params = partition.merge(trainable, frozen)
        train = rng is not None
        with sharding.scope(mesh, rules):
            hidden, collections = hidden_states(
                model, params, batch["input_ids"], rng, positions=batch["positions"], segment_ids=batch["segment_ids"]
            )
            loss_sum, weight_sum = chunked_cross_entropy(
                hidden,
                head(model, params),
                batch["targets"],
                batch["loss_weights"],
                model.config.loss_chunk,
                jax.random.fold_in(rng, 1) if train else None,
            )
        if train:
            loss_sum = loss_sum + model.training_loss(collections) * weight_sum
        return loss_sum, weight_sum, {"tokens": jnp.sum(batch["loss_weights"] > 0, dtype=jnp.int32)}

    return loss_fn


def head(model: Any, params: Mapping) -> Callable:
    """The loss head of :mod:`jft.losses`: ``f(h [b, c, embed], rng=None) -> [b, c, vocab]`` logits."""

    def logits(h, rng=None):
        return model.apply({"params": params}, h, method="head", rngs=None if rng is None else {"dropout": rng})

    return logits


class SFT(Objective):
    """Token cross entropy on tokenized, packed records; validation loss, perplexity and the
    generation metrics of ``eval``."""

    name = "sft"

    def rows(self, records, tokenizer, vocab):
        cfg, out = self.cfg, {}
        for split, pairs in zip(("train", "validation"), records, strict=True):
            examples, stats = tokenize(cfg, pairs, tokenizer, vocab)
            out[split] = jdata.pack(examples, cfg.data.seq_len, packed=cfg.data.pack)
            out[f"{split}_stats"] = str(stats)
        return out

    def loss(self, model, mesh=None, rules=sharding.DEFAULT_RULES):
        return token_loss(model, mesh, rules)

    def summarize(self, sums):
        loss = sums["loss_sum"] / max(sums["weight_sum"], 1e-9)
        return {"loss": loss, "perplexity": jeval.perplexity(loss), **per_weight(sums)}

    def extra_eval(self, model, params, tokenizer, records):
        cfg = self.cfg
        if not cfg.eval.num_examples:
            return {}
        template = jdata.TEMPLATES[cfg.data.template]
        return generation_report(model, params, tokenizer, records[: cfg.eval.num_examples], template, cfg.eval)


def tokenize(cfg, pairs, tokenizer, vocab_size: int):
    """``(examples, stats)`` of ``(where, record)`` pairs as ``cfg.data`` says."""
    return jdata.tokenize_records(
        pairs,
        tokenizer,
        vocab_size=vocab_size,
        max_length=cfg.data.seq_len,
        overlong=cfg.data.overlong,
        template=jdata.TEMPLATES[cfg.data.template],
        prompt_loss_weight=cfg.data.prompt_loss_weight,
        response_loss_weight=cfg.data.response_loss_weight,
        fmt=cfg.data.format,
    )


def generation_report(model, params, tokenizer, pairs, template, eval_cfg) -> dict:
    """Greedy generation on validation records that have a reference answer; text metrics."""
    prompts, refs = [], []
    for _, record in pairs:
        rendered = jdata.prompt_and_reference(record, tokenizer, template)
        if rendered is not None:
            prompts.append(rendered[0])
            refs.append(rendered[1])
    if not prompts:
        return {}
    preds = jeval.generate_predictions(
        model, params, tokenizer, prompts, max_new_tokens=eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size
    )
    out = jeval.text_metrics(preds, refs, names=tuple(eval_cfg.metrics))
    out["examples"] = [
        {"prompt": p, "reference": r, "prediction": y} for p, r, y in list(zip(prompts, refs, preds, strict=True))[:5]
    ]
    return out
