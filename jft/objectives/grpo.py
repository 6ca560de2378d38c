"""Group relative policy optimization (``task = "grpo"``, Shao et al. 2024): for each prompt the
policy samples a group of completions, rewards score them, each completion's advantage is its
reward against its group's, and a clipped policy-gradient loss trains on them. No critic.

The pieces are pure functions that research code can call one by one:

    comps = jft.generate(model, params, prompt_ids, C, attention_mask=prompt_mask, rng=key, temperature=T)
    mask, ended = completion_mask(comps, eos_ids)             # up to and including the first EOS
    rows = completion_rows(prompt_ids, prompt_mask, comps, mask)
    logp = completion_log_probs(model, params, rows, T)       # [n, P + C], aligned with rows["targets"]
    adv, _ = policy_gradient.group_advantages(rewards, G)
    loss_fn = grpo_loss(model, settings)                      # for jft.train.make_train_step

:class:`GRPO` composes them into a step of the one loop (:func:`jft.train.fit`).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft import partition, sharding
from jft.config import ConfigError
from jft.losses import token_log_probs
from jft.objectives import policy_gradient as pg
from jft.objectives.base import Objective, hidden_states
from jft.objectives.dpo import REFERENCE, add_reference_copy, reference_of
from jft.objectives.sft import head

Array = jax.Array


# ---------------------------------------------------------------------------- rollout pieces


def completion_mask(completions: Array, eos_ids: Sequence[int]) -> tuple[Array, Array]:
    """``(mask [n, C] int32, ended [n] bool)`` of sampled ``completions [n, C]``: 1 up to and
    including each row's first EOS (also when the pad id is an EOS id, since only the first counts),
    all ones for a row that never produced one (``ended`` False: it was cut at the length)."""
    completions = jnp.asarray(completions)
    is_eos = jnp.isin(completions, jnp.asarray(list(eos_ids) or [-1], jnp.int32))
    ended = jnp.any(is_eos, axis=-1)
    first = jnp.where(ended, jnp.argmax(is_eos, axis=-1), completions.shape[-1] - 1)
    mask = jnp.arange(completions.shape[-1])[None, :] <= first[:, None]
    return mask.astype(jnp.int32), ended


def completion_rows(prompt_ids: Array, prompt_mask: Array, completions: Array, mask: Array) -> dict:
    """Teacher-forcing rows ``[n, P + C]`` of left-padded prompts followed by their completions:
    ``input_ids``, ``attention_mask`` (prompt and completion tokens), ``targets`` (the next token)
    and ``loss_weights`` (1 where the target is a completion token, so the weighted log-probs are
    the completion's)."""
    n, p = prompt_ids.shape
    input_ids = jnp.concatenate([prompt_ids, completions], axis=1).astype(jnp.int32)
    zeros = jnp.zeros((n, 1), jnp.int32)
    return {
        "input_ids": input_ids,
        "attention_mask": jnp.concatenate([prompt_mask, mask], axis=1).astype(jnp.int32),
        "targets": jnp.concatenate([input_ids[:, 1:], zeros], axis=1),
        "loss_weights": jnp.concatenate(
            [jnp.zeros((n, p - 1), jnp.float32), mask.astype(jnp.float32), jnp.zeros((n, 1), jnp.float32)], axis=1
        ),
    }


def completion_log_probs(
    model: Any, params: Mapping, rows: Mapping, temperature: float = 1.0, rng=None, with_entropy: bool = False
):
    """Per-token ``log softmax(logits / temperature)[targets]`` ``[n, t]`` of :func:`completion_rows`
    (and the entropies with ``with_entropy``) through the chunked loss head, with the collections
    of the forward; ``rng``: dropout in training. The temperature is the sampling one, so the
    log-probs are those of the distribution the completions came from (before top-k / top-p)."""
    hidden, collections = hidden_states(model, params, rows["input_ids"], rng, attention_mask=rows["attention_mask"])
    logits = head(model, params)
    out = token_log_probs(
        hidden,
        lambda h, r=None: logits(h, r) / temperature,
        rows["targets"],
        model.config.loss_chunk,
        None if rng is None else jax.random.fold_in(rng, 1),
        with_entropy,
    )
    return out, collections


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
        params = partition.merge(trainable, frozen)
        policy = {k: v for k, v in params.items() if k != REFERENCE}
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


# ---------------------------------------------------------------------------- rewards


def load_reward_function(name: str) -> Callable:
    """The function a ``"module:function"`` name points at (trl's convention:
    ``fn(prompts, completions, **columns) -> list[float]``)."""
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"reward function {name!r} is not 'module:function' (e.g. 'jft.rewards:chrf')")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward function {name!r} cannot be loaded: {e}") from e
    if not callable(fn):
        raise ConfigError(f"reward function {name!r} is a {type(fn).__name__}, not a function")
    return fn


def call_reward_function(name: str, fn: Callable, n: int, **inputs) -> np.ndarray:
    """``fn(**inputs)`` as ``[n]`` float64, None entries (not applicable) as NaN; a function that
    raises or returns the wrong count or a non-number is an error naming it."""
    try:
        out = fn(**inputs)
    except Exception as e:
        raise RuntimeError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    out = list(out) if out is not None else None
    if out is None or len(out) != n:
        got = "None" if out is None else f"{len(out)} values"
        raise RuntimeError(f"reward function {name} returned {got} for {n} completions; return one float each")
    values = np.full(n, np.nan)
    for i, v in enumerate(out):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float | np.number) or not math.isfinite(float(v)):
            raise RuntimeError(f"reward function {name} returned {v!r} for completion {i}; expected a finite number")
        values[i] = float(v)
    return values


@dataclasses.dataclass
class RewardModel:
    """A sequence-classification folder (``task = "reward"``'s export, or a transformers
    ``*ForSequenceClassification`` one) scoring prompt + completion texts at the last token."""

    model: Any
    params: Any
    tokenizer: Any
    score_fn: Callable = None

    @classmethod
    def load(cls, folder: str, dtype: str, fallback_tokenizer) -> RewardModel:
        from jft.hf import load_hf, load_tokenizer

        model, params = load_hf(folder, dtype=dtype)
        if model.config.num_labels != 1:
            raise ConfigError(
                f"rl.reward_model={folder} has {model.config.num_labels or 'no'} score labels; a reward model "
                "has one (train one with task='reward', or pass a *ForSequenceClassification folder with num_labels=1)"
            )
        from jft.models.llama import last_token_scores

        def score(params, ids, mask):
            hidden, _ = hidden_states(model, params, ids, attention_mask=mask)
            return last_token_scores(model, params, hidden, mask)[:, 0]

        return cls(model, params, load_tokenizer(folder) or fallback_tokenizer, jax.jit(score))

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str]) -> np.ndarray:
        from jft.data.formats import _ids, _render_chat, prompt_ids

        tok, seqs = self.tokenizer, []
        for prompt, completion in zip(prompts, completions, strict=True):
            if prompt.conversational:
                messages = [*prompt.prompt, {"role": "assistant", "content": completion}]
                ids = prompt_ids(_render_chat(tok, messages, False, "reward model input"), tok)
            else:  # as the preference data put it: BOS + prompt, then the response + EOS
                ids = prompt_ids(prompt.prompt, tok) + _ids(tok, completion)
                ids += [] if tok.eos_token_id is None else [tok.eos_token_id]
            seqs.append(ids[-self.model.config.max_position_embeddings :])
        length = 1 << (max(map(len, seqs)) - 1).bit_length()  # a power-of-two bucket: few compiles
        ids = np.zeros((len(seqs), length), np.int32)
        mask = np.zeros((len(seqs), length), np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        return np.asarray(jax.device_get(self.score_fn(self.params, ids, mask)), np.float64)


# ---------------------------------------------------------------------------- the objective


class GRPO(Objective):
    """GRPO on prompt records (:mod:`jft.data.prompts`): each loop step samples
    ``grpo.num_generations`` completions for each of ``train.batch_size`` prompts with the KV cache,
    scores them with the reward functions and/or the reward model (weighted sum), normalises the
    rewards within each group, and makes ``grpo.num_iterations`` updates on them. With ``beta > 0``
    the reference is, as for DPO, the base with the adapters off under PEFT or a frozen copy of the
    starting weights; ``beta = 0`` keeps none.

    The sampling key of step ``s`` is derived from ``train.seed`` and ``s``, so a resumed run
    samples what an uninterrupted one would. Validation samples completions for the validation
    prompts with a fixed key and reports their rewards; its ``loss`` is ``-reward_mean`` (what early
    stopping watches)."""

    name = "grpo"

    def __init__(self, cfg):
        super().__init__(cfg)
        # one namespace of the sampling / reward settings (rl.*) and GRPO's own (grpo.*)
        self.settings = g = types.SimpleNamespace(**cfg.rl.to_dict(), **cfg.grpo.to_dict())
        if g.num_generations < 2:
            raise ConfigError(f"grpo.num_generations={g.num_generations}: a group needs at least 2 completions")
        for field, choices in (
            ("loss_type", pg.AGGREGATIONS),
            ("scale_rewards", ("group", "batch", "none")),
            ("importance_sampling_level", ("token", "sequence")),
        ):
            if getattr(g, field) not in choices:
                raise ConfigError(f"grpo.{field}={getattr(g, field)!r} is not one of {choices}")
        if not g.reward_funcs and not g.reward_model:
            raise ConfigError(
                "task=grpo needs rewards: set rl.reward_funcs ('module:function', ...) and/or rl.reward_model"
            )
        n_rewards = len(g.reward_funcs) + bool(g.reward_model)
        if g.reward_weights and len(g.reward_weights) != n_rewards:
            raise ConfigError(
                f"rl.reward_weights has {len(g.reward_weights)} entries for {n_rewards} rewards "
                "(the functions of rl.reward_funcs in order, then rl.reward_model)"
            )
        if g.num_iterations < 1:
            raise ConfigError(f"grpo.num_iterations={g.num_iterations} must be >= 1")
        self.updates_per_step = g.num_iterations
        self.prompts: dict[str, list] = {}

    def rows(self, records, tokenizer, vocab):
        from jft.data.formats import TEMPLATES
        from jft.data.prompts import tokenize_prompts

        cfg, out = self.cfg, {}
        self.tokenizer = tokenizer  # completions are decoded, and rewards read, with it
        for split, pairs in zip(("train", "validation"), records, strict=True):
            rows, prompts, stats = tokenize_prompts(
                pairs,
                tokenizer,
                max_length=cfg.data.seq_len,
                template=TEMPLATES[cfg.data.template],
                overlong=cfg.data.overlong,
                vocab_size=vocab,
            )
            out[split], out[f"{split}_stats"], self.prompts[split] = rows, str(stats), prompts
        return out

    def add_frozen(self, model, params, labels):
        return (params, labels) if not self.settings.beta else add_reference_copy(model, params, labels)

    def loss(self, model, mesh=None, rules=sharding.DEFAULT_RULES):
        return grpo_loss(model, self.settings, mesh, rules)

    # -- rollout

    def _setup(self, model):
        """Reward functions, the reward model and the jitted scoring passes, built once."""
        if getattr(self, "_ready", None) is model:
            return
        g, tokenizer = self.settings, self.tokenizer
        self.reward_funcs = [(name, load_reward_function(name)) for name in g.reward_funcs]
        self.reward_model = RewardModel.load(g.reward_model, "float32", tokenizer) if g.reward_model else None
        self.reward_names = [name.rpartition(":")[2] for name in g.reward_funcs] + (
            ["reward_model"] * bool(g.reward_model)
        )
        self.reward_weights = np.asarray(g.reward_weights or [1.0] * len(self.reward_names), np.float64)
        eos = model.config.eos_token_id or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
        self.eos = tuple(int(e) for e in eos)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos[0] if self.eos else 0)
        ref_model, ref_params_of = reference_of(model)
        temperature = g.temperature
        policy_of = lambda p: {k: v for k, v in p.items() if k != REFERENCE}  # noqa: E731
        self._policy_logps = jax.jit(lambda p, rows: completion_log_probs(model, policy_of(p), rows, temperature)[0])
        self._ref_logps = jax.jit(
            lambda p, rows: completion_log_probs(ref_model, ref_params_of(p), rows, temperature)[0]
        )
        self._ready = model

    def rewards(
        self, prompts: list, completions: list[str], completion_ids: list[list[int]]
    ) -> tuple[np.ndarray, dict]:
        """``(rewards [n], {name: [n] values})``: the weighted sum of every reward (NaN entries of a
        function that does not apply to a completion are skipped, as trl's nansum does)."""
        n = len(completions)
        columns: dict[str, list] = {}
        for p in prompts:
            for k in p.columns:
                columns.setdefault(k, [])
        for k in columns:
            columns[k] = [p.columns.get(k) for p in prompts]
        trl_prompts = [p.prompt for p in prompts]
        trl_completions = [
            [{"role": "assistant", "content": c}] if p.conversational else c
            for p, c in zip(prompts, completions, strict=True)
        ]
        values = [
            call_reward_function(
                name, fn, n, prompts=trl_prompts, completions=trl_completions, completion_ids=completion_ids, **columns
            )
            for name, fn in self.reward_funcs
        ]
        if self.reward_model is not None:
            values.append(self.reward_model(prompts, completions))
        table = np.stack(values, axis=1)  # [n, rewards]
        unscored = np.isnan(table).all(axis=1)
        if unscored.any():
            raise RuntimeError(
                f"completion {int(np.argmax(unscored))}: every reward function returned None for it "
                f"({', '.join(self.reward_names)}); at least one must score each completion"
            )
        total = np.nansum(table * self.reward_weights[None, :], axis=1)
        return total, dict(zip(self.reward_names, table.T, strict=True))

    def rollout(self, model, params, rows: Mapping, split: str, key) -> tuple[dict, dict, list]:
        """Sample, score and normalise one batch of prompt rows: ``(train rows, metrics, samples)``,
        samples being ``(prompt, completion, reward)`` triples for the log."""
        from jft.generate import generate

        g = self.settings
        n_gen = g.num_generations
        prompt_ids = np.repeat(np.asarray(rows["prompt_ids"]), n_gen, axis=0)
        prompt_mask = np.repeat(np.asarray(rows["prompt_mask"]), n_gen, axis=0)
        index = np.repeat(np.asarray(rows["index"]), n_gen)
        policy = {k: v for k, v in params.items() if k != REFERENCE}
        comps = generate(
            model,
            policy,
            prompt_ids,
            g.max_completion_length,
            attention_mask=prompt_mask,
            rng=key,
            temperature=g.temperature,
            top_k=g.top_k or None,
            top_p=g.top_p if g.top_p < 1 else None,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
        )
        mask, ended = (np.asarray(x) for x in completion_mask(comps, self.eos))
        comps = np.asarray(comps)
        ids = [c[: int(m.sum())].tolist() for c, m in zip(comps, mask, strict=True)]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        prompts = [self.prompts[split][i] for i in index]
        rewards, per_reward = self.rewards(prompts, texts, ids)
        rewards = rewards - g.missing_eos_penalty * ~ended
        advantages, group_std = (
            np.asarray(x) for x in pg.group_advantages(jnp.asarray(rewards, jnp.float32), n_gen, g.scale_rewards)
        )
        out = {k: np.asarray(v) for k, v in completion_rows(prompt_ids, prompt_mask, comps, mask).items()}
        if g.mask_truncated_completions:
            out["loss_weights"] = out["loss_weights"] * ended[:, None]
        out["advantages"] = advantages.astype(np.float32)
        if g.beta:
            out["ref_logps"] = np.asarray(self._ref_logps(params, out))
        if g.num_iterations > 1:
            out["old_logps"] = np.asarray(self._policy_logps(params, out))
        metrics = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(ddof=1)) if len(rewards) > 1 else 0.0,
            "frac_reward_zero_std": float(np.mean(group_std[::n_gen] == 0)),
            "completion_length": float(mask.sum(-1).mean()),
            "clipped_ratio": float(1 - ended.mean()),  # completions cut at max_completion_length
            **{f"rewards/{name}": float(np.nanmean(v)) for name, v in per_reward.items()},
        }
        samples = [(p.prompt, t, float(r)) for p, t, r in zip(prompts, texts, rewards, strict=True)]
        return out, metrics, samples

    def make_step(self, model, train_step, put, tokenizer):
        self._setup(model)
        seed = self.cfg.train.seed

        def step(state, rows, step):
            start = time.perf_counter()
            params = partition.merge(state.trainable, state.frozen)
            key = jax.random.fold_in(jax.random.key(seed + 2), step)
            batch, info, _ = self.rollout(model, params, rows, "train", key)
            rollout_s = time.perf_counter() - start
            batch = put(batch)
            for _ in range(self.updates_per_step):
                state, metrics = train_step(state, batch)
            jax.block_until_ready(metrics["loss"])  # the next rollout waits for these params anyway
            return state, {
                **metrics,
                **info,
                "rollout_s": rollout_s,
                "update_s": time.perf_counter() - start - rollout_s,
            }

        return step

    def validate(self, model, params, eval_step, rows, batch_sharding=None):
        """Rewards of completions sampled (fixed key) for the validation prompts; ``loss`` = -reward_mean."""
        self._setup(model)
        if not rows:
            return {"loss": 0.0}
        size = self.cfg.train.batch_size
        rewards, lengths, samples = [], [], []
        for i in range(0, len(rows), size):
            chunk = rows[i : i + size]
            batch = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
            key = jax.random.fold_in(jax.random.key(self.cfg.train.seed + 3), i)
            out, info, got = self.rollout(model, params, batch, "validation", key)
            rewards += [s[2] for s in got]
            lengths.append(info["completion_length"] * len(got))
            samples += got
        report = {
            "loss": -float(np.mean(rewards)),
            "reward_mean": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards, ddof=1)) if len(rewards) > 1 else 0.0,
            "completion_length": float(np.sum(lengths) / len(rewards)),
        }
        if jax.process_index() == 0:
            for prompt, text, reward in samples[: self.cfg.rl.log_completions]:
                print(f"  sample (reward {reward:.3f}): {str(prompt)[-80:]!r} -> {text[:120]!r}")
        return report
