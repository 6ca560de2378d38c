"""Proximal policy optimization for language models (``task = "ppo"``; Schulman et al. 2017, in the
RLHF form of Ziegler et al. 2019 and Ouyang et al. 2022): one completion per prompt, a per-token
reward of ``-kl_coef x KL`` to the reference plus the score at the last completion token, GAE
advantages from a value head on the policy trunk, then several epochs of clipped policy and value
updates over shuffled minibatches of the rollout.

    loss_fn = ppo_loss(model, settings)                     # -> jft.train.make_train_step
    ppo_step = make_ppo_step(train_step, epochs, minibatches, grad_accum)
    state, metrics = ppo_step(state, rollout, rng)          # every update of one rollout, pure

The sampling and rewards are :mod:`jft.objectives.rl`'s; :class:`PPO` makes them a step of the
one loop (:func:`jft.train.fit`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft import partition, sharding
from jft.config import ConfigError
from jft.objectives import policy_gradient as pg
from jft.objectives.base import VALUE_HEAD, hidden_states, model_params
from jft.objectives.dpo import add_reference_copy
from jft.objectives.rl import RLObjective, tempered_log_probs

Array = jax.Array


def token_values(value_head: Mapping, hidden: Array) -> Array:
    """``[n, t]`` float32 values of the positions' hidden states ``[n, t, embed]``: the value at a
    position estimates the return from predicting its target (the next token) on."""
    return jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), value_head["kernel"]) + value_head["bias"]


def critic_values(critic: Any, params: Mapping, rows: Mapping) -> Array:
    """``[n, t]`` float32 values from a separate critic: a sequence-classification model
    (``num_labels = 1``, e.g. a reward model) whose score head reads every position of the rollout
    rows, not only the last (the value of a position, as for :func:`token_values`)."""
    hidden, _ = hidden_states(critic, params, rows["input_ids"], attention_mask=rows["attention_mask"])
    return critic.apply({"params": params}, hidden, method="head")[..., 0].astype(jnp.float32)


def policy_and_values(
    model: Any, params: Mapping, rows: Mapping, temperature: float, rng=None, with_entropy=False, critic=None
):
    """``(log-probs [n, t] (, entropies), values [n, t], collections)`` from one forward of the
    policy over rollout rows (:func:`jft.objectives.rl.completion_rows`); the values come from a
    value head on the policy trunk (``params[VALUE_HEAD]`` = ``{kernel, bias}``) or, given the
    ``critic`` model, from the critic's params under ``params[VALUE_HEAD]`` (:func:`critic_values`)."""
    policy = model_params(params)
    hidden, collections = hidden_states(model, policy, rows["input_ids"], rng, attention_mask=rows["attention_mask"])
    logp = tempered_log_probs(model, policy, hidden, rows["targets"], temperature, rng, with_entropy)
    if critic is None:
        return logp, token_values(params[VALUE_HEAD], hidden), collections
    return logp, critic_values(critic, params[VALUE_HEAD], rows), collections


def ppo_loss(
    model: Any, settings: Any, mesh: Any = None, rules: Any = sharding.DEFAULT_RULES, critic: Any = None
) -> Callable:
    """``loss_fn(trainable, frozen, batch, rng)`` on rollout rows with ``old_logps``, ``old_values``,
    ``advantages`` and ``returns`` ``[n, t]``: summed over completion tokens, the clipped policy loss
    (``cliprange``, optional ``dual_clip``) plus ``vf_coef`` x the clipped value loss
    (``cliprange_value``), per token (the weight is the token count). Metrics per token:
    ``policy_loss``, ``value_loss``, ``clipfrac``, ``value_clipfrac``, ``entropy``, ``approx_kl``
    (``0.5 (log r)^2`` against the sampling policy); ``tokens``. ``critic``: the model of a
    separate critic (:func:`policy_and_values`); None = the value head on the policy trunk."""

    def loss_fn(trainable, frozen, batch, rng):
        params = partition.join(trainable, frozen)
        with sharding.scope(mesh, rules):
            (logp, entropy), values, collections = policy_and_values(
                model, params, batch, settings.temperature, rng, with_entropy=True, critic=critic
            )
        mask = batch["loss_weights"] > 0
        per_token, clipped = pg.clipped_policy_loss(
            logp,
            batch["old_logps"],
            batch["advantages"],
            mask,
            eps_low=settings.cliprange,
            dual_clip=settings.dual_clip or None,
        )
        value_sum, _, value_clipped = pg.clipped_value_loss(
            values, batch["old_values"], batch["returns"], mask, settings.cliprange_value
        )
        masked = lambda x: jnp.sum(jnp.where(mask, x, 0.0))
        policy_sum = masked(per_token)
        loss_sum, weight_sum = policy_sum + settings.vf_coef * value_sum, jnp.sum(mask, dtype=jnp.float32)
        if rng is not None:
            loss_sum = loss_sum + model.training_loss(collections) * weight_sum
        metrics = {
            "policy_loss": policy_sum,
            "value_loss": value_sum,
            "clipfrac": masked(clipped.astype(jnp.float32)),
            "value_clipfrac": masked(value_clipped.astype(jnp.float32)),
            "entropy": masked(entropy),
            "approx_kl": masked(0.5 * (logp - batch["old_logps"]) ** 2),
            "tokens": jnp.sum(mask, dtype=jnp.int32),
        }
        return loss_sum, weight_sum, metrics

    return loss_fn


def make_ppo_step(train_step: Callable, num_epochs: int, num_mini_batches: int, grad_accum: int = 1) -> Callable:
    """``ppo_step(state, rollout, rng) -> (state, metrics)``: ``num_epochs`` passes over the rollout
    (arrays ``[rows, ...]``, or ``[grad_accum, rows / grad_accum, ...]`` as the loop places them),
    each shuffled by ``rng`` and cut into ``num_mini_batches`` minibatches, each one ``train_step``
    (which accumulates its ``grad_accum`` micro-batches exactly). Pure and jittable: one compiled
    program for a rollout's updates. Metrics: float ones averaged over all updates, counts summed
    over the first epoch's minibatches (the rollout's)."""

    def ppo_step(state, rollout, rng):
        accumulated = rollout["advantages"].ndim == 3  # [grad_accum, rows / grad_accum, t] from the loop
        data = {k: v.reshape(-1, *v.shape[2:]) for k, v in rollout.items()} if accumulated else dict(rollout)
        n = data["advantages"].shape[0]
        if n % (num_mini_batches * grad_accum):
            raise ValueError(f"{n} rollout rows do not split into {num_mini_batches} minibatches x {grad_accum}")
        size = n // num_mini_batches

        def epoch(state, key):
            order = jax.random.permutation(key, n)
            batches = {
                k: v[order].reshape(num_mini_batches, grad_accum, size // grad_accum, *v.shape[1:])
                for k, v in data.items()
            }
            return jax.lax.scan(lambda s, b: train_step(s, b), state, batches)

        state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, num_epochs))  # [epochs, minibatches]
        out = {k: v[0].sum() if jnp.issubdtype(v.dtype, jnp.integer) else v.mean() for k, v in metrics.items()}
        out["lr"] = metrics["lr"][-1, -1]
        return state, out

    return ppo_step


class PPO(RLObjective):
    """PPO on prompt records: each loop step samples one completion for each of ``train.batch_size``
    prompts, scores it (``rl.*``), computes per-token rewards (``-kl_coef`` x the ``kl_estimator``
    KL to the reference, with a fixed ``kl_coef`` or one adapted towards ``kl_target`` (Ziegler et
    al.; checkpointed), plus the score at the last completion token; ``whiten_rewards``), GAE
    (``gamma``, ``lam``) on the values of a value head on the policy trunk (zero-initialised) or of
    a separate critic (``value_model``: a sequence-classification folder, ``"reward_model"`` =
    ``rl.reward_model``'s, as trl initialises its value model; same tokenizer as the policy; all
    its weights train). Either always trains, also under PEFT, and is checkpointed. Then whitened
    advantages and
    ``num_ppo_epochs`` x ``num_mini_batches`` updates. ``kl_coef = 0`` keeps no reference; the
    reference is, as for DPO, the base with the adapters off under PEFT or a frozen copy."""

    name = section = "ppo"

    def __init__(self, cfg):
        super().__init__(cfg)
        p = self.settings
        if p.kl_estimator not in pg.KL_ESTIMATORS:
            raise ConfigError(f"ppo.kl_estimator={p.kl_estimator!r} is not one of {pg.KL_ESTIMATORS}")
        if p.num_ppo_epochs < 1 or p.num_mini_batches < 1:
            raise ConfigError(
                f"ppo.num_ppo_epochs={p.num_ppo_epochs} and num_mini_batches={p.num_mini_batches} must be >= 1"
            )
        micro = cfg.train.batch_size // p.num_mini_batches
        if cfg.train.batch_size % p.num_mini_batches or micro % cfg.train.grad_accum:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} does not split into ppo.num_mini_batches="
                f"{p.num_mini_batches} minibatches of train.grad_accum={cfg.train.grad_accum} micro-batches"
            )
        if p.dual_clip and p.dual_clip <= 1:
            raise ConfigError(f"ppo.dual_clip={p.dual_clip} must be > 1 (or 0: off)")
        if p.kl_target < 0 or p.kl_horizon <= 0:
            raise ConfigError(f"ppo.kl_target={p.kl_target} must be >= 0 and ppo.kl_horizon={p.kl_horizon} > 0")
        if p.value_model == "reward_model" and not p.reward_model:
            raise ConfigError("ppo.value_model='reward_model' starts the critic from rl.reward_model, which is not set")
        self.updates_per_step = p.num_ppo_epochs * p.num_mini_batches
        self.critic = None  # the separate critic's model (ppo.value_model), set by add_frozen
        self.kl_coef = float(p.kl_coef)  # adapted after every rollout when ppo.kl_target > 0

    def state(self):
        return {"kl_coef": self.kl_coef}

    def load_state(self, state):
        self.kl_coef = float(state.get("kl_coef", self.settings.kl_coef))

    def add_frozen(self, model, params, labels, mesh=None, rules=sharding.DEFAULT_RULES):
        p = self.settings
        if p.kl_coef:
            params, labels = add_reference_copy(model, params, labels)
        if p.value_model:
            self.critic, value_head = self._load_critic(model, mesh, rules)
        else:
            embed = model.config.hidden_size
            value_head = {"kernel": jnp.zeros((embed,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}
        return {**params, VALUE_HEAD: value_head}, {**labels, VALUE_HEAD: jax.tree.map(lambda _: True, value_head)}

    def _load_critic(self, model, mesh, rules):
        from jft.config import resolve_compute_dtype
        from jft.hf import load_hf

        p, cfg = self.settings, self.cfg
        folder = p.reward_model if p.value_model == "reward_model" else p.value_model
        critic, params = load_hf(
            folder, dtype=cfg.model.dtype, compute_dtype=resolve_compute_dtype(cfg), mesh=mesh, rules=rules
        )
        if critic.config.num_labels != 1:
            raise ConfigError(
                f"ppo.value_model: {folder} has {critic.config.num_labels or 'no'} score labels; a critic is a "
                "sequence-classification model with one (a reward model of task='reward', or num_labels=1)"
            )
        if critic.config.vocab_size != model.config.vocab_size:
            raise ConfigError(
                f"ppo.value_model: {folder} has a vocabulary of {critic.config.vocab_size} tokens, the policy "
                f"{model.config.vocab_size}; the critic reads the policy's tokens, so it needs the same tokenizer"
            )
        return critic, params

    def loss(self, model, mesh=None, rules=sharding.DEFAULT_RULES):
        return ppo_loss(model, self.settings, mesh, rules, self.critic)

    def jit_passes(self, model):
        temperature, critic = self.settings.temperature, self.critic
        self._policy_values = jax.jit(lambda p, rows: policy_and_values(model, p, rows, temperature, critic=critic)[:2])

    def train_rows(self, params, sampled):
        p, out = self.settings, dict(sampled["rows"])
        logp, values = (np.asarray(x) for x in self._policy_values(params, out))
        mask = out["loss_weights"] > 0
        if p.kl_coef:
            ref = np.asarray(self._ref_logps(params, out))
            kl = np.where(mask, np.asarray(pg.kl_penalty(jnp.asarray(logp), jnp.asarray(ref), p.kl_estimator)), 0.0)
        else:
            kl = np.zeros_like(logp)
        coef = self.kl_coef
        rewards = -coef * kl
        has = mask.any(-1)
        last = np.where(has, mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=-1), 0)
        rewards[np.arange(len(last)), last] += np.where(has, sampled["rewards"], 0.0)
        if p.whiten_rewards:
            rewards = np.asarray(pg.masked_whiten(jnp.asarray(rewards), jnp.asarray(mask), shift_mean=False))
        advantages, returns = pg.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), p.gamma, p.lam)
        advantages = pg.masked_whiten(advantages, jnp.asarray(mask))
        out.update(
            old_logps=logp.astype(np.float32),
            old_values=values.astype(np.float32),
            advantages=np.asarray(advantages, np.float32),
            returns=np.asarray(returns, np.float32),
        )
        mean_kl = float(kl.sum(-1).mean())  # per completion, summed over its tokens (trl's objective/kl)
        if p.kl_target:  # Ziegler et al.'s controller, on this rollout's KL
            self.kl_coef = float(pg.adaptive_kl_coef(coef, mean_kl, len(kl), p.kl_target, p.kl_horizon))
        info = {
            "kl": mean_kl,
            "kl_coef": coef,
            "non_score_reward": float((-coef * kl).sum(-1).mean()),
            "explained_variance": float(pg.explained_variance(jnp.asarray(values), returns, jnp.asarray(mask))),
        }
        return out, info

    def make_step(self, model, train_step, put, tokenizer):
        p = self.settings
        self._ppo_step = jax.jit(
            make_ppo_step(train_step, p.num_ppo_epochs, p.num_mini_batches, self.cfg.train.grad_accum), donate_argnums=0
        )
        return super().make_step(model, train_step, put, tokenizer)

    def update(self, state, rows, train_step, put, step):
        key = jax.random.fold_in(jax.random.key(self.cfg.train.seed + 4), step)
        return self._ppo_step(state, put(rows), key)
