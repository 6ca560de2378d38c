"""Supervised fine-tuning and continued pretraining (``task = "sft"``): weighted next-token cross
entropy over instruction, chat or raw-text records, packed into rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft import data as jdata
from jft import metrics as jmetrics
from jft import partition, sharding
from jft.data.mixture import Mixture, as_parts
from jft.losses import chunked_cross_entropy, token_log_probs
from jft.objectives.base import Objective, hidden_states, model_params, per_weight

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
        params = partition.join(trainable, frozen)
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
    mixes = True

    def rows(self, records, tokenizer, vocab):
        """The packed rows; the training records may be :class:`jft.data.mixture.Part` s (a
        ``data.mixture``, or sources the data cache's workers read), mixed at their weights."""
        cfg, (train, validation) = self.cfg, records
        parts = as_parts(train)
        rows, stats, self.train_counts = [], [], np.zeros(vocab, np.int64)  # the frequency slices
        for part in parts:
            part_rows, part_stats, counts = self._rows(part.data, tokenizer, vocab, cached=bool(cfg.data.cache_dir))
            rows.append(part_rows)
            stats.append(part_stats)
            self.train_counts += counts
        out = {"train": rows[0], "train_stats": stats[0]}
        if len(parts) > 1:
            out["train"] = Mixture(rows, [p.weight for p in parts], cfg.train.seed)
            out["train_stats"] = "; ".join(stats) + f" -> {out['train'].describe()}"
        out["validation"], out["validation_stats"], _ = self._rows(validation, tokenizer, vocab, cached=False)
        return out

    def _rows(self, data, tokenizer, vocab, cached: bool):
        """``(rows, stats line, [vocab] target counts)`` of pairs or a source: from the data cache
        (``data.cache_dir``) or tokenized in memory."""
        cfg = self.cfg
        counts = np.zeros(vocab, np.int64)  # how often each token is a target: only eval.slices asks
        if cached:  # tokenized once, rows read from disk
            rows = cached_rows(cfg, data, tokenizer, vocab)
            return rows, str(rows.cache.stats), rows.target_counts(vocab) if cfg.eval.slices else counts
        examples, stats = tokenize(cfg, data, tokenizer, vocab)
        if cfg.eval.slices:
            targets = [ids[1:][weights[1:] > 0] for ids, weights in examples]
            counts = np.bincount(np.concatenate([np.zeros(0, np.int64), *targets]), minlength=vocab)
        return jdata.pack(examples, cfg.data.seq_len, packed=cfg.data.pack), str(stats), counts

    def loss(self, model, mesh=None, rules=sharding.DEFAULT_RULES):
        return token_loss(model, mesh, rules)

    def summarize(self, sums):
        loss = sums["loss_sum"] / max(sums["weight_sum"], 1e-9)
        return {"loss": loss, "perplexity": jmetrics.perplexity(loss), **per_weight(sums)}

    def extra_eval(self, model, params, tokenizer, records):
        cfg = self.cfg
        template = jdata.TEMPLATES[cfg.data.template]
        generated = None
        out = {}
        if cfg.eval.num_examples:
            generated = generations(model, params, tokenizer, records[: cfg.eval.num_examples], template, cfg.eval)
            out = generation_metrics(generated, cfg.eval)
        if cfg.eval.slices:
            counts = getattr(self, "train_counts", None)
            out["slices"] = slice_report(model, params, tokenizer, records, cfg, counts, generated)
        return out


def cached_rows(cfg, data, tokenizer, vocab_size: int):
    """The packed rows of ``data`` (pairs, or a source) from the on-disk cache under
    ``data.cache_dir`` (built on first use, by ``data.num_proc`` processes): the rows
    :func:`tokenize` and ``pack`` would give."""
    from jft.data.cache import CachedRows, build_cache

    d = cfg.data
    cache = sharding.once_per_disk(
        d.cache_dir,
        lambda: build_cache(
            data,
            tokenizer,
            cache_root=d.cache_dir,
            vocab_size=vocab_size,
            **encoding(cfg),
            seq_len=d.seq_len,
            packed=d.pack,
            num_proc=d.num_proc,
            text_unit=d.text_unit,
            progress=jax.process_index() == 0,
        ),
    )  # a pod on a shared disk tokenizes once
    return CachedRows(cache, d.seq_len, d.pack)


def encoding(cfg) -> dict:
    """The keyword settings of :func:`jft.data.tokenize_records` that ``cfg.data`` gives."""
    d = cfg.data
    return dict(
        max_length=d.seq_len,
        overlong=d.overlong,
        template=jdata.TEMPLATES[d.template],
        prompt_loss_weight=d.prompt_loss_weight,
        response_loss_weight=d.response_loss_weight,
        fmt=d.format,
    )


def tokenize(cfg, pairs, tokenizer, vocab_size: int):
    """``(examples, stats)`` of ``(where, record)`` pairs as ``cfg.data`` says."""
    return jdata.tokenize_records(pairs, tokenizer, vocab_size=vocab_size, **encoding(cfg))


def generations(model, params, tokenizer, pairs, template, eval_cfg) -> dict:
    """Greedy answers to the records of ``pairs`` that have a reference: ``{"index"`` (position in
    ``pairs``), ``"prompts"``, ``"references"``, ``"predictions"}``, lists of one length (maybe 0)."""
    index, prompts, refs = [], [], []
    for i, (_, record) in enumerate(pairs):
        rendered = jdata.prompt_and_reference(record, tokenizer, template)
        if rendered is not None:
            index.append(i)
            prompts.append(rendered[0])
            refs.append(rendered[1])
    preds = []
    if prompts:
        preds = jmetrics.generate_predictions(
            model,
            model_params(params),
            tokenizer,
            prompts,
            max_new_tokens=eval_cfg.max_new_tokens,
            batch_size=eval_cfg.batch_size,
        )
    return {"index": index, "prompts": prompts, "references": refs, "predictions": preds}


def generation_metrics(generated: dict, eval_cfg) -> dict:
    """``eval_cfg.metrics`` of :func:`generations` and its first five examples; {} when none."""
    prompts, refs, preds = generated["prompts"], generated["references"], generated["predictions"]
    if not prompts:
        return {}
    out = jmetrics.text_metrics(preds, refs, names=tuple(eval_cfg.metrics))
    out["examples"] = [
        {"prompt": p, "reference": r, "prediction": y} for p, r, y in list(zip(prompts, refs, preds, strict=True))[:5]
    ]
    return out


def generation_report(model, params, tokenizer, pairs, template, eval_cfg) -> dict:
    """Greedy generation on validation records that have a reference answer; text metrics."""
    return generation_metrics(generations(model, params, tokenizer, pairs, template, eval_cfg), eval_cfg)


# ---------------------------------------------------------------------------- slices


def token_nll(model: Any) -> Callable:
    """``nll(params, batch) -> [rows, seq_len]`` float32 per-target negative log-likelihood (no
    dropout), the loss of :func:`token_loss` before it is weighted and summed."""

    def nll(params, batch):
        hidden, _ = hidden_states(
            model, params, batch["input_ids"], None, positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
        return -token_log_probs(hidden, head(model, params), batch["targets"], model.config.loss_chunk)

    return nll


def example_rows(cfg, pairs, tokenizer, vocab: int) -> tuple[list[int], list[int], list]:
    """``(index, prompt_lengths, examples)``: each record of ``pairs`` that training keeps
    (:func:`jft.data.pipeline.encode_example`: truncated or dropped as ``data.overlong`` says,
    dropped when nothing carries loss) as one example, with its position in
    ``pairs`` and its prompt length: its tokens that are not response (BOS, prompt; for chat the
    non-assistant turns)."""
    from jft.data.formats import RESPONSE
    from jft.data.pipeline import encode_example

    d = cfg.data
    index, lengths, examples = [], [], []
    for i, (where, record) in enumerate(pairs):
        ids, kinds, weights, _, drop = encode_example(
            where,
            record,
            tokenizer,
            vocab_size=vocab,
            max_length=d.seq_len,
            overlong=d.overlong,
            template=jdata.TEMPLATES[d.template],
            weights=(d.prompt_loss_weight, d.response_loss_weight),
            fmt=d.format,
        )
        if drop is None:
            index.append(i)
            lengths.append(int((kinds != RESPONSE).sum()))
            examples.append((ids, weights))
    return index, lengths, examples


def _interval(value, low, high) -> dict:
    return {"value": value, "low": low, "high": high}


def slice_report(model, params, tokenizer, pairs, cfg, train_counts=None, generated: dict | None = None) -> dict:
    """Loss, perplexity and generation metrics per slice of the validation records, with 95% intervals.

    Each record is scored as its own unpacked row, so its loss is its own. Slices: ``prompt_length``
    (buckets of prompt tokens at ``eval.length_edges``, () = quartiles), ``target_frequency`` (target
    tokens bucketed by how often they were training targets, ``train_counts [vocab]``; token-level:
    a record counts in every bucket it has tokens of, with the loss of those tokens only, and no
    generation metrics) and one per ``eval.slice_by`` record field.
    Per slice: ``count`` (records), ``tokens``, ``loss`` (token-weighted, as the validation loss) and
    ``perplexity`` with percentile-bootstrap intervals over records, ``example_loss`` (mean of the
    records' mean token losses) with a Student t interval, and for the generated records
    (``generated``, from :func:`generations`) ``generated`` and each metric with bootstrap intervals.
    ``per_example`` keeps the records' loss sums and weights for a paired comparison.
    """
    from jft import stats

    e = cfg.eval
    boot = dict(n_resamples=e.bootstrap_resamples, seed=e.seed)
    vocab = model.config.vocab_size
    index, prompt_lengths, examples = example_rows(cfg, pairs, tokenizer, vocab)
    if not examples:
        return {}
    width = min(cfg.data.seq_len, -(-max(len(ids) - 1 for ids, _ in examples) // 16) * 16)  # one compiled shape
    rows = jdata.pack(examples, width, packed=False)
    nll_fn = jax.jit(token_nll(model))
    params = model_params(params)
    nll = [
        np.asarray(jax.device_get(nll_fn(params, batch)), np.float64)[:real]
        for batch, real in jdata.in_batches(rows, cfg.train.batch_size)
    ]
    nll_nt = np.concatenate(nll)  # [examples, width]
    weights_nt = np.stack([r["loss_weights"] for r in rows]).astype(np.float64)
    targets_nt = np.stack([r["targets"] for r in rows])
    loss_sum, weight = (nll_nt * weights_nt).sum(1), weights_nt.sum(1)

    counts = np.zeros(vocab, np.int64) if train_counts is None else np.asarray(train_counts)
    freq_labels = np.array(stats.frequency_buckets(counts))  # [vocab]
    gen_at = {r: j for j, r in enumerate(generated["index"])} if generated and generated["index"] else {}
    metric_fns = {}
    if gen_at:
        metric_fns = jmetrics.metric_statistics(generated["predictions"], generated["references"], tuple(e.metrics))

    def summary(members: np.ndarray, ls: np.ndarray, w: np.ndarray, tokens: int, texts: bool = True) -> dict:
        """Slice of the examples ``members`` with per-example loss sums ``ls`` and weights ``w``."""
        ratio = lambda idx: float(ls[idx].sum() / max(w[idx].sum(), 1e-9))
        loss = stats.bootstrap_interval(ratio, n=len(members), **boot)
        out = {
            "count": len(members),
            "tokens": tokens,
            "loss": _interval(*loss),
            "perplexity": _interval(*(jmetrics.perplexity(x) for x in loss)),
            "example_loss": _interval(*stats.mean_interval(ls / np.maximum(w, 1e-9))),
        }
        gen = np.array([gen_at[index[m]] for m in members if index[m] in gen_at], np.int64)
        if metric_fns and texts:
            out["generated"] = len(gen)
        if len(gen) and texts:
            for name, fn in metric_fns.items():
                out[name] = _interval(*stats.bootstrap_interval(lambda idx, fn=fn: fn(gen[idx]), n=len(gen), **boot))
        return out

    def by_labels(labels: list[str], order=None) -> dict:
        found = stats.groups(labels)
        keys = sorted(found, key=order) if order else sorted(found)
        out = {}
        for k in keys:
            members = found[k]
            out[k] = summary(members, loss_sum[members], weight[members], int((weights_nt[members] > 0).sum()))
        return out

    freq_nt = freq_labels[np.clip(targets_nt, 0, vocab - 1)]
    frequency = {}
    for label in sorted(set(freq_nt[weights_nt > 0].tolist()), key=stats.frequency_order):
        mask_nt = (freq_nt == label) & (weights_nt > 0)
        members = np.flatnonzero(mask_nt.any(1))
        ls, w = (nll_nt * weights_nt * mask_nt).sum(1)[members], (weights_nt * mask_nt).sum(1)[members]
        frequency[label] = summary(members, ls, w, int(mask_nt.sum()), texts=False)  # a token slice: no texts

    records = [pairs[i][1] for i in index]
    slices = {
        "prompt_length": by_labels(
            stats.length_buckets(prompt_lengths, tuple(e.length_edges) or None), order=stats.length_order
        ),
        "target_frequency": frequency,
        **{f"field:{f}": by_labels(stats.field_slices(records, f)) for f in e.slice_by},
    }
    overall = summary(np.arange(len(index)), loss_sum, weight, int((weights_nt > 0).sum()))
    return {
        "overall": overall,
        "slices": slices,
        "confidence": 0.95,
        "bootstrap_resamples": e.bootstrap_resamples,
        "seed": e.seed,
        "per_example": {"record": index, "loss_sum": loss_sum.tolist(), "weight": weight.tolist()},
    }
