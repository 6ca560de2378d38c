"""Direct preference optimization and its variants (``task = "dpo"``): the policy's sequence
log-probabilities of chosen and rejected responses against a reference policy's
(:mod:`jft.objectives.preference_losses` holds the losses)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft import partition, sharding, tree
from jft.config import ConfigError
from jft.data.pipeline import in_batches
from jft.losses import sequence_log_probs
from jft.models.peft_spec import Peft
from jft.objectives.base import REFERENCE, Objective, hidden_states, model_params, per_weight
from jft.objectives.preference_losses import REFERENCE_FREE, preference_loss
from jft.objectives.sft import head
from jft.safetensors_io import atomic_write


def response_log_probs(model: Any, params: Mapping, batch: Mapping, rng=None) -> tuple[jax.Array, ...]:
    """``(logp_sum [pairs, 2], tokens [pairs, 2], collections)`` of the responses of preference rows
    (``input_ids``, ``attention_mask``, ``targets``, ``loss_weights`` ``[pairs, 2, t]``), chosen
    then rejected, from one forward over both sides through the memory-lean loss head."""
    pairs = batch["input_ids"].shape[0]
    flat = {k: batch[k].reshape(2 * pairs, -1) for k in ("input_ids", "attention_mask", "targets", "loss_weights")}
    hidden, collections = hidden_states(model, params, flat["input_ids"], rng, attention_mask=flat["attention_mask"])
    logp, count = sequence_log_probs(
        hidden, head(model, params), flat["targets"], flat["loss_weights"], model.config.loss_chunk
    )
    return logp.reshape(pairs, 2), count.reshape(pairs, 2), collections


def reference_of(model: Any) -> tuple[Any, Callable[[Mapping], dict]]:
    """``(reference model, params -> reference params)``: a frozen copy under ``params["reference"]``
    when there is one (full fine-tuning), otherwise the base model with the adapters off, which
    reads the base leaves of the same params (no second copy)."""
    base = model.clone(peft=Peft())
    paths = [p for p, _ in tree.walk(jax.eval_shape(base.init_params, jax.random.key(0)))]

    def params_of(params: Mapping) -> dict:
        if REFERENCE in params:
            return params[REFERENCE]
        out: dict = {}
        for path in paths:
            tree.set_path(out, path, tree.get_path(params, path))
        return out

    return base, params_of


def add_reference_copy(model: Any, params: Mapping, labels: Mapping) -> tuple[dict, dict]:
    """``(params, labels)`` with a reference policy: nothing added under PEFT when no base weight
    trains (the frozen base leaves are the reference, :func:`reference_of`), else a frozen copy of
    the starting base weights under ``params["reference"]`` (no gradients, no optimizer state, not
    checkpointed)."""
    base_trains = model.peft.methods and any(
        bool(jnp.any(tree.get_path(labels, p))) for p, _ in tree.walk(reference_of(model)[1](params))
    )
    if model.peft.methods and not base_trains:
        return params, labels
    ref = jax.tree.map(jnp.copy, reference_of(model)[1](params))
    return {**params, REFERENCE: ref}, {**labels, REFERENCE: jax.tree.map(lambda _: False, ref)}


def dpo_loss(model: Any, settings: Any, mesh: Any = None, rules: Any = sharding.DEFAULT_RULES) -> Callable:
    """``loss_fn(trainable, frozen, batch, rng)`` for ``settings.loss`` (a kind of
    :func:`jft.objectives.preference_losses.preference_loss`) with its ``beta``,
    ``label_smoothing``, ``gamma`` and ``orpo_lambda``. Sums over pairs weighted by ``weight``;
    metrics with trl's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (per pair), and ``tokens``."""
    kind = settings.loss
    free = kind in REFERENCE_FREE
    ref_model, ref_params_of = reference_of(model)

    def loss_fn(trainable, frozen, batch, rng):
        params = partition.join(trainable, frozen)
        policy = model_params(params)
        with sharding.scope(mesh, rules):
            logp, count, collections = response_log_probs(model, policy, batch, rng)
            if free:
                ref = (None, None)
            elif "ref_logps" in batch:  # precomputed before training (dpo.precompute_reference)
                ref = (batch["ref_logps"][:, 0], batch["ref_logps"][:, 1])
            else:
                ref_logp = response_log_probs(ref_model, jax.lax.stop_gradient(ref_params_of(params)), batch)[0]
                ref = (ref_logp[:, 0], ref_logp[:, 1])
        length = jnp.maximum(count, 1).astype(jnp.float32)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            kind,
            logp[:, 0],
            logp[:, 1],
            *ref,
            chosen_len=length[:, 0],
            rejected_len=length[:, 1],
            chosen_nll=-logp[:, 0] / length[:, 0],
            beta=settings.beta,
            label_smoothing=settings.label_smoothing,
            gamma=settings.gamma,
            orpo_lambda=settings.orpo_lambda,
        )
        w = batch["weight"].astype(jnp.float32)
        loss_sum, weight_sum = jnp.sum(losses * w), jnp.sum(w)
        if rng is not None:
            loss_sum = loss_sum + model.training_loss(collections) * weight_sum
        metrics = {
            "rewards/chosen": jnp.sum(chosen_rewards * w),
            "rewards/rejected": jnp.sum(rejected_rewards * w),
            "rewards/accuracies": jnp.sum((chosen_rewards > rejected_rewards) * w),
            "rewards/margins": jnp.sum((chosen_rewards - rejected_rewards) * w),
            "logps/chosen": jnp.sum(logp[:, 0] * w),
            "logps/rejected": jnp.sum(logp[:, 1] * w),
            "tokens": jnp.sum(batch["attention_mask"], dtype=jnp.int32),
        }
        return loss_sum, weight_sum, metrics

    return loss_fn


def reference_log_probs(score, params, rows: list[dict], batch_size: int) -> np.ndarray:
    """``[rows, 2]`` float32 ``score(params, batch)`` over ``rows`` in batches (the last one padded)."""
    out = [np.asarray(jax.device_get(score(params, batch)))[:real] for batch, real in in_batches(rows, batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 2), np.float32)


class DPO(Objective):
    """Preference optimization on ``{"prompt", "chosen", "rejected"}`` pairs (as for reward models).
    The reference policy: under PEFT the base with the adapters off (no second copy, as long as no
    base weight trains); under full or partial fine-tuning a frozen copy of the starting weights
    (no gradients, no optimizer state, not checkpointed: rebuilt from ``model.path`` on resume);
    none for the reference-free losses (``simpo``, ``orpo``)."""

    name = "dpo"

    def rows(self, records, tokenizer, vocab):
        from jft.objectives.reward import Reward

        return Reward(self.cfg).rows(records, tokenizer, vocab)

    def prepare_rows(self, model, params, data, workdir):
        """With ``dpo.precompute_reference``: the reference's log-probabilities of every pair, computed
        once before training (or read back on resume) from ``workdir/reference_logps.npz``, go into
        the rows as ``ref_logps [2]``; the reference is then not kept at all."""
        if not self.cfg.dpo.precompute_reference or self.cfg.dpo.loss in REFERENCE_FREE:
            return data
        file = Path(workdir) / "reference_logps.npz"
        sizes = {split: len(data[split]) for split in ("train", "validation")}
        saved = dict(np.load(file)) if file.is_file() else {}
        if {k: len(v) for k, v in saved.items()} != sizes:
            ref_model, ref_params_of = reference_of(model)
            score = jax.jit(lambda p, b: response_log_probs(ref_model, ref_params_of(p), b)[0])
            saved = {
                split: reference_log_probs(score, params, data[split], self.cfg.train.batch_size) for split in sizes
            }
            if jax.process_index() == 0:
                atomic_write(file, lambda tmp: np.savez(tmp, **saved))
        out = dict(data)
        for split in sizes:
            out[split] = [{**row, "ref_logps": ref} for row, ref in zip(data[split], saved[split], strict=True)]
        return out

    def add_frozen(self, model, params, labels, mesh=None, rules=sharding.DEFAULT_RULES):
        if self.cfg.dpo.loss in REFERENCE_FREE or self.cfg.dpo.precompute_reference:
            return params, labels
        return add_reference_copy(model, params, labels)

    def add_reference(self, model, params, reference):
        """``reference``: the params of the folder the policy started from (checked against the
        model's base tensors); without one the model's PEFT base with the adapters off is the
        reference, and a model without adapters has none (an error that says what to pass)."""
        kind = self.cfg.dpo.loss
        if kind in REFERENCE_FREE:
            if reference is not None:
                raise ConfigError(f"dpo.loss={kind!r} is reference-free; drop --reference")
            return params
        if reference is None:
            if model.peft.methods:
                return params  # the base with the adapters off
            raise ConfigError(
                f"dpo.loss={kind!r} scores the policy against a reference: pass --reference FOLDER (the model "
                "training started from), or --model BASE --adapter ADAPTER (the base is then the reference)"
            )
        want, got = (
            {"/".join(p): v.shape for p, v in tree.walk(t)} for t in (reference_of(model)[1](params), reference)
        )
        for name in sorted(want.keys() | got.keys()):
            if want.get(name) != got.get(name):
                raise ConfigError(
                    f"--reference: tensor {name} is {got.get(name, 'missing')} where the model's is "
                    f"{want.get(name, 'missing')}; pass the folder this policy was trained from"
                )
        return {**params, REFERENCE: reference}

    def loss(self, model, mesh=None, rules=sharding.DEFAULT_RULES):
        return dpo_loss(model, self.cfg.dpo, mesh, rules)

    def summarize(self, sums):
        return {"loss": sums["loss_sum"] / max(sums["weight_sum"], 1e-9), **per_weight(sums)}
