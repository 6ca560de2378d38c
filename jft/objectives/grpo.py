"""Group relative policy optimization (``task = "grpo"``, Shao et al. 2024): for each prompt the
policy samples a group of completions, rewards score them, each completion's advantage is its
reward against its group's, and a clipped policy-gradient loss trains on them. No critic.

    loss_fn = grpo_loss(model, settings)        # rollout rows + advantages -> jft.train.make_train_step
    adv, _ = policy_gradient.group_advantages(rewards, num_generations)

The sampling, the rollout rows and the rewards are :mod:`jft.objectives.rl`'s; :class:`GRPO` makes
them a step of the one loop (:func:`jft.train.fit`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft import partition, sharding
from jft.config import ConfigError
from jft.objectives import policy_gradient as pg
from jft.objectives.base import model_params
from jft.objectives.dpo import add_reference_copy
from jft.objectives.rl import RLObjective, completion_log_probs


def grpo_loss(model: Any, settings: Any, mesh: Any = None, rules: Any = sharding.DEFAULT_RULES) -> Callable:
    """``loss_fn(trainable, frozen, batch, rng)`` of GRPO on rollout rows (:func:`completion_rows`
    plus ``advantages [n]``, and ``ref_logps [n, t]`` when ``settings.beta > 0``, ``old_logps [n, t]``
    when the completions are reused, ``num_iterations > 1``; otherwise the ratio is 1 with the
    policy's gradient, exactly on-policy).

    Per token: the clipped surrogate (:func:`~jft.objectives.policy_gradient.clipped_policy_loss`,
    ``epsilon`` / ``epsilon_high``, token or sequence importance) plus ``beta`` x the k3 KL to the
    reference, aggregated by ``loss_type`` (:func:`~jft.objectives.policy_gradient.aggregate`) in
    sums, so gradient accumulation is exact. Metrics, aggregated the same way: ``kl`` (with
    ``beta > 0``), ``entropy``, ``clipfrac``; ``tokens`` counts completion tokens."""
    eps_high = settings.epsilon_high or settings.epsilon

    def loss_fn(trainable, frozen, batch, rng):
        params = partition.join(trainable, frozen)
        policy = model_params(params)
        with sharding.scope(mesh, rules):
            (logp, entropy), collections = completion_log_probs(
                model, policy, batch, settings.temperature, rng, with_entropy=True
            )
        mask = batch["loss_weights"] > 0
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp)
        per_token, clipped = pg.clipped_policy_loss(
            logp,
            old,
            batch["advantages"],
            mask,
            eps_low=settings.epsilon,
            eps_high=eps_high,
            importance=settings.importance_sampling_level,
        )
        kl = pg.kl_penalty(logp, batch["ref_logps"], "k3") if settings.beta else jnp.zeros_like(logp)
        per_token = per_token + settings.beta * kl

        def agg(x):
            return pg.aggregate(jnp.where(mask, x, 0.0), mask, settings.loss_type, settings.max_completion_length)

        loss_sum, weight_sum = agg(per_token)
        if rng is not None:
            loss_sum = loss_sum + model.training_loss(collections) * weight_sum
        metrics = {
            **({"kl": agg(kl)[0]} if settings.beta else {}),  # no reference, no KL (as trl)
            "entropy": agg(entropy)[0],
            "clipfrac": agg(clipped.astype(jnp.float32))[0],
            "tokens": jnp.sum(mask, dtype=jnp.int32),
        }
        return loss_sum, weight_sum, metrics

    return loss_fn


class GRPO(RLObjective):
    """GRPO on prompt records: each loop step samples ``grpo.num_generations`` completions for each
    of ``train.batch_size`` prompts, normalises their rewards within each group
    (``grpo.scale_rewards``) and makes ``grpo.num_iterations`` updates on them. With ``beta > 0``
    the reference is, as for DPO, the base with the adapters off under PEFT or a frozen copy of the
    starting weights; ``beta = 0`` keeps none (:class:`~jft.objectives.rl.RLObjective` for the rest)."""

    name = section = "grpo"

    def __init__(self, cfg):
        super().__init__(cfg)
        g = self.settings
        if g.num_generations < 2:
            raise ConfigError(f"grpo.num_generations={g.num_generations}: a group needs at least 2 completions")
        for field, choices in (
            ("loss_type", pg.AGGREGATIONS),
            ("scale_rewards", pg.SCALE_REWARDS),
            ("importance_sampling_level", pg.IMPORTANCE_LEVELS),
        ):
            if getattr(g, field) not in choices:
                raise ConfigError(f"grpo.{field}={getattr(g, field)!r} is not one of {choices}")
        if g.num_iterations < 1:
            raise ConfigError(f"grpo.num_iterations={g.num_iterations} must be >= 1")
        self.samples_per_prompt = g.num_generations
        self.updates_per_step = g.num_iterations

    def add_frozen(self, model, params, labels, mesh=None, rules=sharding.DEFAULT_RULES):
        return (params, labels) if not self.settings.beta else add_reference_copy(model, params, labels)

    def loss(self, model, mesh=None, rules=sharding.DEFAULT_RULES):
        return grpo_loss(model, self.settings, mesh, rules)

    def jit_passes(self, model):
        temperature = self.settings.temperature
        self._policy_logps = jax.jit(lambda p, rows: completion_log_probs(model, model_params(p), rows, temperature)[0])

    def train_rows(self, params, sampled):
        g, out = self.settings, dict(sampled["rows"])
        advantages, group_std = pg.group_advantages(
            jnp.asarray(sampled["rewards"], jnp.float32), g.num_generations, g.scale_rewards
        )
        out["advantages"] = np.asarray(advantages, np.float32)
        if g.beta:
            out["ref_logps"] = np.asarray(self._ref_logps(params, out))
        if g.num_iterations > 1:  # the ratio is taken against the sampling policy
            out["old_logps"] = np.asarray(self._policy_logps(params, out))
        return out, {"frac_reward_zero_std": float(np.mean(np.asarray(group_std)[:: g.num_generations] == 0))}

    def update(self, state, rows, train_step, put, step):
        batch = put(rows)
        for _ in range(self.updates_per_step):
            state, metrics = train_step(state, batch)
        return state, metrics
