"""Evaluation: text metrics over generated answers, perplexity, and JSON reports.

    preds = generate_predictions(model, params, tokenizer, prompts, max_new_tokens=32)
    scores = text_metrics(preds, references)       # {"bleu": 41.2, "chrf": 63.0, ...}, all 0-100
    write_report("runs/x/report.json", {"validation": scores})

Every metric takes one reference per prediction and returns a percentage. BLEU and chrF are
corpus-level (sacrebleu); ROUGE and the match metrics are averaged over examples.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jft.safetensors_io import atomic_write

# Beyond this a loss means "untrained or diverged"; exp() of it would overflow float64 near 709.
_MAX_LOG_PERPLEXITY = 100.0


# ---------------------------------------------------------------------------- metrics


def _normalise(text: str) -> str:
    return " ".join(text.split())


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams, exponential smoothing of zero counts), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (character n-gram F-score, sacrebleu defaults), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


class _WordTokenizer:
    """Lower-cased Unicode words: rouge-score's own tokenizer drops every non-ASCII letter."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures averaged over examples, and their mean, 0-100.

    Returns ``{"rouge1", "rouge2", "rougeL", "rouge"}``; words are lower-cased ``\\w+`` runs, so
    accented text is scored on its real words, without stemming.
    """
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), tokenizer=_WordTokenizer())
    totals = dict.fromkeys(kinds, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for k in kinds:
            totals[k] += scores[k].fmeasure
    out = {k: 100.0 * v / len(predictions) for k, v in totals.items()}
    out["rouge"] = sum(out.values()) / len(kinds)
    return out


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percent of predictions equal to their reference after stripping and collapsing whitespace."""
    hits = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(predictions)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percent of predictions exactly equal to their reference (for class labels)."""
    hits = sum(p == r for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(predictions)


METRICS: dict[str, Callable] = {
    "bleu": bleu,
    "chrf": chrf,
    "rouge": rouge,
    "exact_match": exact_match,
    "accuracy": accuracy,
}


def text_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    names: Sequence[str] = ("bleu", "chrf", "rouge", "exact_match"),
) -> dict[str, float]:
    """Score ``predictions`` against ``references`` (one each); every value is 0-100.

    ``names`` picks from :data:`METRICS`; "rouge" contributes ``rouge1``, ``rouge2``, ``rougeL``
    and their mean ``rouge``. Raises ValueError for an unknown name, for lists of different
    lengths, or for empty lists (no score is meaningful then).
    """
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid names are {sorted(METRICS)}")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; need one each")
    if not predictions:
        raise ValueError("no predictions to score")
    out: dict[str, float] = {}
    for name in names:
        value = METRICS[name](predictions, references)
        out.update(value if isinstance(value, dict) else {name: value})
    return out


def metric_statistics(
    predictions: Sequence[str],
    references: Sequence[str],
    names: Sequence[str] = ("bleu", "chrf", "rouge", "exact_match"),
) -> dict[str, Callable[[np.ndarray], float]]:
    """``{metric: fn(indices) -> score}``: each :func:`text_metrics` value as a function of a subset
    (or a bootstrap resample, repeats allowed) of the examples, for :func:`jft.stats.bootstrap_interval`.

    Text is scored once: BLEU and chrF keep sacrebleu's per-sentence n-gram statistics and sum the
    chosen rows (exactly how sacrebleu computes a corpus score), the averaged metrics keep their
    per-example scores. ``fn(arange(n))`` equals :func:`text_metrics`.
    """
    import sacrebleu

    predictions, references = list(predictions), list(references)
    out: dict[str, Callable[[np.ndarray], float]] = {}

    def corpus(metric):
        stats = np.asarray(metric._extract_corpus_statistics(predictions, [references]))  # [n, k]
        return lambda idx: float(metric._compute_score_from_stats(stats[idx].sum(0).tolist()).score)

    def averaged(values):
        values = np.asarray(values, np.float64)
        return lambda idx: float(values[idx].mean())

    for name in names:
        if name == "bleu":
            out["bleu"] = corpus(sacrebleu.BLEU())
        elif name == "chrf":
            out["chrf"] = corpus(sacrebleu.CHRF())
        elif name == "rouge":
            per = [rouge([p], [r]) for p, r in zip(predictions, references, strict=True)]
            for key in ("rouge1", "rouge2", "rougeL", "rouge"):
                out[key] = averaged([s[key] for s in per])
        elif name in METRICS:
            out[name] = averaged([METRICS[name]([p], [r]) for p, r in zip(predictions, references, strict=True)])
        else:
            raise ValueError(f"unknown metric {name!r}; valid names are {sorted(METRICS)}")
    return out


def perplexity(loss: float) -> float:
    """``exp(loss)``, the mean per-token loss as a perplexity; capped at ``exp(100)`` (NaN stays NaN)."""
    loss = float(loss)
    if math.isnan(loss):
        return loss
    return math.exp(min(loss, _MAX_LOG_PERPLEXITY))


# ---------------------------------------------------------------------------- generation


def generate_predictions(
    model,
    params: dict,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    eos_token_id: int | Sequence[int] | None = None,
) -> list[str]:
    """Greedy answers to already-rendered ``prompts``: one stripped string per prompt, in order.

    Each prompt is encoded without special tokens and the tokenizer's BOS (when it has one) is
    put in front unless the text already began with it, as the training data pipeline does; so
    tokenizers that add BOS themselves and those that don't agree. Rows are left-padded per batch
    with the pad token (else EOS, else 0), and the last batch is filled up to ``batch_size`` with
    copies so that every batch, and every later call, reuses one compiled program.

    Args:
      eos_token_id: id(s) that end an answer; default the tokenizer's EOS and the model config's.

    Raises ValueError when a prompt encodes to no tokens at all.
    """
    from jft.data.formats import prompt_ids
    from jft.generate import generate, left_pad

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if eos_token_id is None:
        eos = set(model.config.eos_token_id or ())
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        eos_ids = sorted(eos)
    else:
        eos_ids = [int(i) for i in np.atleast_1d(eos_token_id)]
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(prompt, tokenizer)  # BOS once: a chat template may have written it already
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens; generation needs at least one")
        rows.append(ids)

    predictions = []
    for start in range(0, len(rows), batch_size):
        real = len(rows[start : start + batch_size])
        ids_bt, mask_bt = left_pad(rows[start : start + batch_size], pad_id, batch_size)  # [batch, length]
        out_bn = generate(
            model,
            params,
            ids_bt,
            max_new_tokens,
            attention_mask=mask_bt,
            eos_token_id=tuple(eos_ids),
            pad_token_id=pad_id,
        )
        for tokens in np.asarray(out_bn)[:real].tolist():
            # cut at the first EOS: what follows is padding, which may be an ordinary token id
            end = next((j for j, t in enumerate(tokens) if t in eos_ids), len(tokens))
            predictions.append(tokenizer.decode(tokens[:end], skip_special_tokens=True).strip())
    return predictions


# ---------------------------------------------------------------------------- reports


def _jsonable(x):
    """Plain JSON values: numpy/jax scalars and arrays become Python ones, NaN/inf become null."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy and jax values
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """Write ``report`` as indented JSON, atomically: a reader sees the old file or the new one.

    NumPy and JAX numbers are converted, and non-finite floats are written as ``null`` so the file
    stays strict JSON. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
    return path


# ---------------------------------------------------------------------------- slice reports


def compare_losses(before: dict, after: dict, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap of the validation loss of two slice reports (:func:`jft.objectives.sft.slice_report`)
    over the records both scored: :func:`jft.stats.paired_comparison` of the token-weighted loss,
    ``difference`` = after - before (negative: fine-tuning lowered the loss)."""
    from jft import stats

    b, a = before["per_example"], after["per_example"]
    where_a = {r: j for j, r in enumerate(a["record"])}
    both = [(i, where_a[r]) for i, r in enumerate(b["record"]) if r in where_a]
    if not both:
        raise ValueError("the two reports share no validation records")
    ib, ia = (np.array(x, np.int64) for x in zip(*both, strict=True))

    def loss(per, rows):
        ls, w = np.asarray(per["loss_sum"])[rows], np.asarray(per["weight"])[rows]
        return lambda idx: float(ls[idx].sum() / max(w[idx].sum(), 1e-9))

    out = stats.paired_comparison(loss(b, ib), loss(a, ia), n=len(both), n_resamples=n_resamples, seed=seed)
    return {"metric": "loss", "before": out.pop("a"), "after": out.pop("b"), **out}


def _cell(x) -> str:
    if isinstance(x, dict):
        value, low, high = x.get("value"), x.get("low"), x.get("high")
        if value is None:
            return "-"
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            return f"{value:.4g}"
        return f"{value:.4g} [{low:.4g}, {high:.4g}]"
    return "-" if x is None else str(x)


def slice_table(report: dict) -> str:
    """A Markdown table of a slice report (one row per slice; ``value [low, high]`` cells, 95%),
    with the ``comparison`` line when the report has one (``{"before", "after", "comparison"}``
    as ``jft train`` writes it: the table shows ``after``)."""
    if "after" in report or "before" in report:
        body = report.get("after") or report.get("before")
    else:
        body = report
    if not body:
        return "(no slice report)"
    metrics = [k for k, v in body["overall"].items() if isinstance(v, dict)]
    header = ["slice", "bucket", "count", "tokens", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [("overall", "all", body["overall"])]
    rows += [(name, key, entry) for name, buckets in body["slices"].items() for key, entry in buckets.items()]
    for name, key, entry in rows:
        cells = [name, key, str(entry["count"]), str(entry.get("tokens", "-")), *(_cell(entry.get(m)) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    c = report.get("comparison")
    if c:
        verdict = "significant" if c["significant"] else "not significant"
        lines.append(
            f"\nloss before {c['before']:.4g} -> after {c['after']:.4g}: change {c['difference']:+.4g} "
            f"[{c['low']:.4g}, {c['high']:.4g}], paired bootstrap p = {c['p_value']:.3g} ({verdict} at "
            f"{1 - c['confidence']:.2g}, {c['n']} records)"
        )
    return "\n".join(lines)


def slice_plot(report: dict, path: str | os.PathLike) -> Path:
    """A PNG of the loss per slice with its 95% interval (one panel per kind of slice; ``before``
    in grey beside ``after`` when the report has both). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(k, report[k]) for k in ("before", "after") if report.get(k)] or [("", report)]
    kinds = list(runs[-1][1]["slices"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        labels = list(runs[-1][1]["slices"][kind])
        for j, (name, body) in enumerate(runs):
            got = [body["slices"].get(kind, {}).get(k, {}).get("loss", {}) for k in labels]
            value = np.array([g.get("value", np.nan) for g in got], float)
            low = np.array([np.nan if g.get("low") is None else g["low"] for g in got], float)
            high = np.array([np.nan if g.get("high") is None else g["high"] for g in got], float)
            err = np.nan_to_num(np.stack([value - low, high - value]), nan=0.0)
            x = np.arange(len(labels)) + (j - (len(runs) - 1) / 2) * 0.35
            ax.bar(x, value, 0.35, yerr=err, capsize=3, label=name or None, color="0.7" if name == "before" else None)
        ax.set_xticks(np.arange(len(labels)), labels, rotation=45, ha="right")
        ax.set_title(kind)
        ax.set_ylabel("loss")
    if len(runs) > 1:
        axes[0][0].legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
