"""What the RL objectives (GRPO, PPO) share: sampling completions for prompt records with the KV
cache, the rows that teacher-force them, their log-probabilities, and the rewards (Python
functions named ``module:function`` with trl's convention, and reward-model folders).

    comps = jft.generate(model, params, prompt_ids, C, attention_mask=prompt_mask, rng=key, temperature=T)
    mask, ended = completion_mask(comps, eos_ids)             # up to and including the first EOS
    rows = completion_rows(prompt_ids, prompt_mask, comps, mask)
    logp = completion_log_probs(model, params, rows, T)[0]    # [n, P + C], aligned with rows["targets"]

:class:`RLObjective` composes them for an objective of the one loop; the objective supplies its
advantages, its loss and its update (:mod:`jft.objectives.grpo`, :mod:`jft.objectives.ppo`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft import partition
from jft.config import ConfigError, load_callable
from jft.losses import token_log_probs
from jft.objectives.base import Objective, hidden_states, model_params
from jft.objectives.dpo import reference_of
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


def tempered_log_probs(
    model: Any, params: Mapping, hidden: Array, targets: Array, temperature: float = 1.0, rng=None, with_entropy=False
):
    """Per-token ``log softmax(head(hidden) / temperature)[targets]`` ``[n, t]`` (and the entropies
    with ``with_entropy``) through the chunked loss head; ``rng``: dropout in the head."""
    logits = head(model, params)
    return token_log_probs(
        hidden,
        lambda h, r=None: logits(h, r) / temperature,
        targets,
        model.config.loss_chunk,
        None if rng is None else jax.random.fold_in(rng, 1),
        with_entropy,
    )


def completion_log_probs(
    model: Any, params: Mapping, rows: Mapping, temperature: float = 1.0, rng=None, with_entropy: bool = False
):
    """Per-token ``log softmax(logits / temperature)[targets]`` ``[n, t]`` of :func:`completion_rows`
    (and the entropies with ``with_entropy``) through the chunked loss head, with the collections
    of the forward; ``rng``: dropout in training. The temperature is the sampling one, so the
    log-probs are those of the distribution the completions came from (before top-k / top-p)."""
    hidden, collections = hidden_states(model, params, rows["input_ids"], rng, attention_mask=rows["attention_mask"])
    return tempered_log_probs(model, params, hidden, rows["targets"], temperature, rng, with_entropy), collections


# ---------------------------------------------------------------------------- rewards


def load_reward_function(name: str) -> Callable:
    """The function a ``"module:function"`` name points at (trl's convention:
    ``fn(prompts, completions, **columns) -> list[float]``)."""
    return load_callable(name, "reward function")


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


# ---------------------------------------------------------------------------- the shared objective


class RLObjective(Objective):
    """An objective that trains on the policy's own samples. Each loop step: sample completions for
    a batch of prompt rows (:mod:`jft.data.prompts`) with the KV cache, score them (the weighted
    sum of ``rl.reward_funcs`` and ``rl.reward_model``), let the objective turn them into train rows
    (:meth:`train_rows`) and update on them (:meth:`update`). The sampling key of step ``s`` comes
    from ``train.seed`` and ``s``, so a resumed run samples what an uninterrupted one would.
    Validation samples completions for the held-out prompts with a fixed key and reports their
    rewards; its ``loss`` is ``-reward_mean`` (what early stopping watches).

    ``settings``: one namespace of ``rl.*`` and the objective's own section; ``samples_per_prompt``:
    completions per prompt."""

    section = ""
    samples_per_prompt = 1
    host_local = False  # every host samples completions for the whole batch of prompts

    def __init__(self, cfg):
        super().__init__(cfg)
        self.settings = s = types.SimpleNamespace(**cfg.rl.to_dict(), **cfg[self.section].to_dict())
        if not s.reward_funcs and not s.reward_model:
            raise ConfigError(
                f"task={self.name} needs rewards: set rl.reward_funcs ('module:function', ...) and/or rl.reward_model"
            )
        n_rewards = len(s.reward_funcs) + bool(s.reward_model)
        if s.reward_weights and len(s.reward_weights) != n_rewards:
            raise ConfigError(
                f"rl.reward_weights has {len(s.reward_weights)} entries for {n_rewards} rewards "
                "(the functions of rl.reward_funcs in order, then rl.reward_model)"
            )
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

    def setup(self, model):
        """Reward functions, the reward model and the jitted scoring passes, built once per model;
        objectives add their own passes (:meth:`jit_passes`)."""
        if getattr(self, "_ready", None) is model:
            return
        s, tokenizer = self.settings, self.tokenizer
        self.reward_funcs = [(name, load_reward_function(name)) for name in s.reward_funcs]
        self.reward_model = RewardModel.load(s.reward_model, "float32", tokenizer) if s.reward_model else None
        self.reward_names = [name.rpartition(":")[2] for name in s.reward_funcs]
        self.reward_names += ["reward_model"] * bool(s.reward_model)
        self.reward_weights = np.asarray(s.reward_weights or [1.0] * len(self.reward_names), np.float64)
        eos = model.config.eos_token_id or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
        self.eos = tuple(int(e) for e in eos)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos[0] if self.eos else 0)
        ref_model, ref_params_of = reference_of(model)
        temperature = s.temperature
        self._ref_logps = jax.jit(
            lambda p, rows: completion_log_probs(ref_model, ref_params_of(p), rows, temperature)[0]
        )
        self.jit_passes(model)
        self._ready = model

    def jit_passes(self, model) -> None:
        """The objective's own jitted passes over rollout rows (old log-probs, values)."""

    def rewards(
        self, prompts: list, completions: list[str], completion_ids: list[list[int]]
    ) -> tuple[np.ndarray, dict]:
        """``(rewards [n], {name: [n] values})``: the weighted sum of every reward (NaN entries of a
        function that does not apply to a completion are skipped, as trl's nansum does)."""
        n = len(completions)
        names = sorted({k for p in prompts for k in p.columns})
        columns = {k: [p.columns.get(k) for p in prompts] for k in names}
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

    def sample(self, model, params, rows: Mapping, split: str, key) -> dict:
        """Completions for prompt rows (``samples_per_prompt`` each, consecutive), scored:
        ``rows`` (:func:`completion_rows`, loss weights off for cut completions with
        ``rl.mask_truncated_completions``), ``mask``, ``ended``, ``rewards`` (``rl.missing_eos_penalty``
        applied), ``per_reward``, ``prompts``, ``texts`` and the step's ``metrics``."""
        from jft.generate import generate

        s, n = self.settings, self.samples_per_prompt
        prompt_ids = np.repeat(np.asarray(rows["prompt_ids"]), n, axis=0)
        prompt_mask = np.repeat(np.asarray(rows["prompt_mask"]), n, axis=0)
        index = np.repeat(np.asarray(rows["index"]), n)
        comps = generate(
            model,
            model_params(params),
            prompt_ids,
            s.max_completion_length,
            attention_mask=prompt_mask,
            rng=key,
            temperature=s.temperature,
            top_k=s.top_k or None,
            top_p=s.top_p if s.top_p < 1 else None,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
        )
        mask, ended = (np.asarray(x) for x in completion_mask(comps, self.eos))
        comps = np.asarray(comps)
        ids = [c[: int(m.sum())].tolist() for c, m in zip(comps, mask, strict=True)]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        prompts = [self.prompts[split][i] for i in index]
        rewards, per_reward = self.rewards(prompts, texts, ids)
        rewards = rewards - s.missing_eos_penalty * ~ended
        out = {k: np.asarray(v) for k, v in completion_rows(prompt_ids, prompt_mask, comps, mask).items()}
        if s.mask_truncated_completions:
            out["loss_weights"] = out["loss_weights"] * ended[:, None]
        metrics = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(ddof=1)) if len(rewards) > 1 else 0.0,
            "completion_length": float(mask.sum(-1).mean()),
            "clipped_ratio": float(1 - ended.mean()),  # completions cut at max_completion_length
            **{f"rewards/{name}": float(np.nanmean(v)) for name, v in per_reward.items()},
        }
        return dict(rows=out, mask=mask, ended=ended, rewards=rewards, prompts=prompts, texts=texts, metrics=metrics)

    def train_rows(self, params, sampled: dict) -> tuple[dict, dict]:
        """``(train rows, metrics)`` from :meth:`sample`'s output: the objective's advantages etc."""
        raise NotImplementedError

    def update(self, state, rows: dict, train_step, put, step: int):
        """``(state, metrics)`` after the objective's optimizer updates on one rollout's rows."""
        raise NotImplementedError

    def make_step(self, model, train_step, put, tokenizer):
        self.setup(model)
        seed = self.cfg.train.seed

        def step(state, rows, step):
            start = time.perf_counter()
            params = partition.join(state.trainable, state.frozen)
            sampled = self.sample(model, params, rows, "train", jax.random.fold_in(jax.random.key(seed + 2), step))
            batch, info = self.train_rows(params, sampled)
            rollout_s = time.perf_counter() - start
            state, metrics = self.update(state, batch, train_step, put, step)
            jax.block_until_ready(metrics["loss"])  # the next rollout waits for these params anyway
            update_s = time.perf_counter() - start - rollout_s
            return state, {**metrics, **sampled["metrics"], **info, "rollout_s": rollout_s, "update_s": update_s}

        return step

    def validate(self, model, params, eval_step, rows, batch_sharding=None):
        """Rewards of completions sampled (fixed key) for the validation prompts; ``loss`` = -reward_mean."""
        self.setup(model)
        if not rows:
            return {"loss": 0.0}
        size = self.cfg.train.batch_size
        rewards, lengths, samples = [], [], []
        for i in range(0, len(rows), size):
            chunk = rows[i : i + size]
            batch = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
            got = self.sample(
                model, params, batch, "validation", jax.random.fold_in(jax.random.key(self.cfg.train.seed + 3), i)
            )
            rewards += got["rewards"].tolist()
            lengths += got["mask"].sum(-1).tolist()
            samples += list(zip(got["prompts"], got["texts"], got["rewards"], strict=True))
        report = {
            "loss": -float(np.mean(rewards)),
            "reward_mean": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards, ddof=1)) if len(rewards) > 1 else 0.0,
            "completion_length": float(np.mean(lengths)),
        }
        if jax.process_index() == 0:
            for prompt, text, reward in samples[: self.settings.log_completions]:
                print(f"  sample (reward {reward:.3f}): {str(prompt.prompt)[-80:]!r} -> {text[:120]!r}")
        return report
