"""Logit distillation (``task = "distill"``; Hinton et al. 2015, in the generalised form of GKD,
Agarwal et al. 2024): the student learns the teacher's next-token distributions on the SFT data,
mixed with the data's own cross entropy, the teacher frozen beside the student's params.

    loss_fn = distill_loss(student, teacher, settings)      # -> jft.train.make_train_step
    loss_sum, weight_sum, metrics = loss_fn(trainable, frozen, batch, rng)

Per trained token (weighted by the rows' loss weights, so padding and prompt masking hold):
``alpha * JSD_beta(teacher || student)`` at ``temperature`` (:func:`jft.losses.generalized_jsd`)
``+ (1 - alpha) * cross entropy``. Neither model's ``[b, t, vocab]`` logits exist at once
(:func:`jft.losses.chunked_distillation_loss`). With ``lmbda > 0`` a share of the steps trains on
the student's own completions of the records' prompts, scored by the teacher (GKD's on-policy
mixing). Sequence-level distillation, where the teacher's answers become SFT data and no shared
vocabulary is needed, is :mod:`jft.distill` (``jft distill``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft import metrics as jmetrics
from jft import partition, sharding
from jft.config import ConfigError
from jft.losses import chunked_distillation_loss
from jft.objectives.base import TEACHER, hidden_states, model_params, per_weight
from jft.objectives.sft import SFT, head

Array = jax.Array


def _inputs(batch: Mapping) -> dict:
    """The model's position inputs of packed SFT rows or of completion rows (on-policy samples)."""
    if "segment_ids" in batch:
        return {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
    return {"attention_mask": batch["attention_mask"]}


def distill_loss(
    model: Any, teacher: Any, settings: Any, mesh: Any = None, rules: Any = sharding.DEFAULT_RULES
) -> Callable:
    """``loss_fn(trainable, frozen, batch, rng)``: the student ``model`` against the ``teacher``
    model, whose params sit under ``frozen[TEACHER]``, on SFT rows (or :func:`completion_rows`).
    ``settings``: ``alpha``, ``beta``, ``temperature``, ``teacher_top_k`` (``distill.*``).
    Metrics (sums per weight): ``divergence`` (the JSD), ``ce`` (the student's cross entropy of the
    data); ``tokens``."""

    def loss_fn(trainable, frozen, batch, rng):
        params = partition.join(trainable, frozen)
        student, teacher_params = model_params(params), params[TEACHER]
        train, inputs = rng is not None, _inputs(batch)
        with sharding.scope(mesh, rules):
            hidden, collections = hidden_states(model, student, batch["input_ids"], rng, **inputs)
            teacher_hidden, _ = hidden_states(teacher, teacher_params, batch["input_ids"], **inputs)
            divergence, ce, weight_sum = chunked_distillation_loss(
                hidden,
                head(model, student),
                jax.lax.stop_gradient(teacher_hidden),
                head(teacher, teacher_params),
                batch["targets"],
                batch["loss_weights"],
                beta=settings.beta,
                temperature=settings.temperature,
                teacher_top_k=settings.teacher_top_k,
                chunk_size=model.config.loss_chunk,
                rng=jax.random.fold_in(rng, 1) if train else None,
            )
        loss_sum = settings.alpha * divergence + (1 - settings.alpha) * ce
        if train:
            loss_sum = loss_sum + model.training_loss(collections) * weight_sum
        tokens = jnp.sum(batch["loss_weights"] > 0, dtype=jnp.int32)
        return loss_sum, weight_sum, {"divergence": divergence, "ce": ce, "tokens": tokens}

    return loss_fn


class Distill(SFT):
    """Logit distillation on SFT records (their rows, packing and loss weights as for ``sft``): the
    teacher (``distill.teacher``, optionally with ``teacher_adapter`` and 4-bit ``teacher_quant``;
    :func:`jft.distill.load_teacher`) is frozen beside the student (no gradients, no optimizer
    state, not checkpointed: it is read again on resume) and must share the student's tokenizer.
    Validation reports ``divergence`` (what the student still differs from the teacher), ``ce``
    and ``perplexity`` of the data, and ``loss`` (the mixed objective)."""

    name = "distill"
    host_local = False  # on-policy steps sample as many prompts as the whole batch has rows

    def __init__(self, cfg):
        super().__init__(cfg)
        d = self.settings = cfg.distill
        if not d.teacher:
            raise ConfigError("task='distill' needs distill.teacher, the teacher's model folder or hub id")
        if not 0 <= d.alpha <= 1 or not 0 <= d.beta <= 1 or not 0 <= d.lmbda <= 1:
            raise ConfigError(f"distill.alpha={d.alpha}, beta={d.beta} and lmbda={d.lmbda} must each lie in [0, 1]")
        if d.temperature <= 0 or d.teacher_top_k < 0:
            raise ConfigError(
                f"distill.temperature={d.temperature} must be > 0 and teacher_top_k={d.teacher_top_k} >= 0"
            )
        if d.beta == 1 and d.teacher_top_k:
            raise ConfigError("distill.teacher_top_k needs beta < 1: reverse KL to a truncated teacher is infinite")
        self.teacher = None  # the teacher's model, set by add_frozen

    def rows(self, records, tokenizer, vocab):
        self.tokenizer = tokenizer
        out = super().rows(records, tokenizer, vocab)
        if self.settings.lmbda:  # the prompts the student completes on its on-policy steps
            from jft.data.formats import TEMPLATES
            from jft.data.prompts import tokenize_prompts

            cfg = self.cfg
            self.prompt_rows, _, stats = tokenize_prompts(
                records[0],
                tokenizer,
                max_length=cfg.data.seq_len,
                template=TEMPLATES[cfg.data.template],
                overlong="truncate",
                vocab_size=vocab,
            )
            out["train_stats"] += f"; on-policy prompts: {stats}"
        return out

    def add_frozen(self, model, params, labels, mesh=None, rules=sharding.DEFAULT_RULES):
        from jft.distill import load_teacher

        teacher, teacher_params, teacher_tokenizer = load_teacher(self.cfg, mesh, rules)
        ours, theirs = model.config.vocab_size, teacher.config.vocab_size
        same = ours == theirs
        if same and getattr(self, "tokenizer", None) is not None:
            same = teacher_tokenizer.get_vocab() == self.tokenizer.get_vocab()
        if not same:
            raise ConfigError(
                f"distill.teacher={self.settings.teacher} has another vocabulary than the student (teacher "
                f"{theirs} rows / tokenizer vocabulary, student {ours}); logit distillation compares "
                "distributions over one vocabulary. Use sequence-level distillation (jft distill), which "
                "trains on the teacher's text"
            )
        self.teacher = teacher
        return {**params, TEACHER: teacher_params}, {**labels, TEACHER: jax.tree.map(lambda _: False, teacher_params)}

    def loss(self, model, mesh=None, rules=sharding.DEFAULT_RULES):
        return distill_loss(model, self.teacher, self.settings, mesh, rules)

    def summarize(self, sums):
        out = per_weight(sums)
        out["loss"] = sums["loss_sum"] / max(sums["weight_sum"], 1e-9)
        out["perplexity"] = jmetrics.perplexity(out["ce"])
        return out

    def make_step(self, model, train_step, put, tokenizer):
        d, seed = self.settings, self.cfg.train.seed
        if not d.lmbda:
            return super().make_step(model, train_step, put, tokenizer)
        from jft.generate import generate
        from jft.objectives.rl import completion_mask, completion_rows

        eos = tuple(model.config.eos_token_id or ()) or (tokenizer.eos_token_id,)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

        def step(state, rows, step):
            key = jax.random.fold_in(jax.random.key(seed + 5), step)
            pick, sample = jax.random.split(key)
            if float(jax.random.uniform(pick)) >= d.lmbda:
                state, metrics = train_step(state, put(rows))
                return state, {**metrics, "on_policy": 0}
            n = len(next(iter(rows.values())))  # as many on-policy rows as the batch has
            chosen = np.asarray(jax.random.choice(pick, len(self.prompt_rows), (n,)))
            prompt_ids = np.stack([self.prompt_rows[i]["prompt_ids"] for i in chosen])
            prompt_mask = np.stack([self.prompt_rows[i]["prompt_mask"] for i in chosen])
            params = model_params(partition.join(state.trainable, state.frozen))
            comps = generate(
                model,
                params,
                prompt_ids,
                d.max_new_tokens,
                attention_mask=prompt_mask,
                rng=sample,
                temperature=d.sample_temperature,
                top_k=d.sample_top_k or None,
                top_p=d.sample_top_p if d.sample_top_p < 1 else None,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            mask, _ = completion_mask(comps, eos)
            on_policy = completion_rows(prompt_ids, prompt_mask, comps, mask)
            state, metrics = train_step(state, put({k: np.asarray(v) for k, v in on_policy.items()}))
            return state, {**metrics, "on_policy": 1}

        return step
