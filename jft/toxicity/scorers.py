"""Toxicity scorers: each maps texts to a probability of toxicity (jft.toxicity.load_scorer picks one)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from jft.config import ConfigError, load_callable
from jft.generate import _bucket
from jft.models.llama import last_token_scores

SCORER_SPECS = (
    "a scorer is 'lexicon' (the built-in demo word list), 'module:function' (fn(texts) -> list of toxicities "
    "in [0, 1]), 'hf:FOLDER_OR_HUB_ID' (a transformers text-classification model, needs torch), "
    "'jft:FOLDER_OR_HUB_ID' (a *ForSequenceClassification folder jft loads), or a local classifier folder "
    "(jft loads it when it can, transformers otherwise)"
)


def _pick_label(id2label: dict, num_labels: int, label: str | int | None, source: str) -> int:
    """The index of the toxic label: ``label`` (a name, any case, or an index), else a one-label
    model's only one, else the one named ``toxic`` / ``toxicity`` / ``LABEL_1`` (any case)."""
    names = {int(i): str(name) for i, name in (id2label or {}).items()}
    if label is not None:
        if str(label).isdigit() and int(label) < num_labels:
            return int(label)
        for i, name in names.items():
            if name.lower() == str(label).lower():
                return i
        raise ConfigError(f"{source}: no label {label!r}; its labels are {list(names.values())} (or an index)")
    if num_labels == 1:
        return 0
    for wanted in ("toxic", "toxicity", "label_1"):
        for i, name in names.items():
            if name.lower() == wanted:
                return i
    raise ConfigError(
        f"{source}: none of its labels {list(names.values())} is named 'toxic', 'toxicity' or 'LABEL_1'; "
        "say which one is the toxic class with label=NAME (jft toxicity --label NAME)"
    )


DEMO_LEXICON = (
    "idiot", "idiots", "stupid", "dumb", "moron", "morons", "loser", "losers", "jerk", "jerks",
    "fool", "fools", "ugly", "pathetic", "worthless", "disgusting", "hate", "hateful", "trash", "crap",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LexiconScorer:
    """A DEMO stand-in, not a toxicity classifier: ``1 - exp(-rate * share)`` where ``share`` is
    the fraction of a text's words found in a short built-in list of insults (``DEMO_LEXICON``).
    One listed word among ten gives 0.55; a text with no words gives 0. It needs no download, so
    tests and offline demos run; it misses everything a real classifier (``hf:...``) catches."""

    words: frozenset = frozenset(DEMO_LEXICON)
    rate: float = 8.0
    name: str = "lexicon (demo word list, not a toxicity classifier)"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for text in texts:
            words = re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())
            share = sum(w in self.words for w in words) / len(words) if words else 0.0
            out.append(1.0 - math.exp(-self.rate * share))
        return np.asarray(out, np.float64)


@dataclasses.dataclass(frozen=True)
class FunctionScorer:
    """A Python function ``fn(texts: list[str]) -> list[float]`` named ``module:function``."""

    fn: Callable
    name: str

    @classmethod
    def load(cls, spec: str) -> FunctionScorer:
        return cls(load_callable(spec, "scorer"), spec)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.fn(list(texts))


@functools.partial(jax.jit, static_argnums=0)
def _classifier_logits(model, params, ids, mask):
    """``[b, num_labels]`` float32 logits of a classifier at each row's last real token."""
    hidden = model.apply({"params": params}, ids, attention_mask=mask, hidden_only=True)
    return last_token_scores(model, params, hidden, mask)


class ClassifierScorer:
    """A ``*ForSequenceClassification`` folder that :func:`jft.load_hf` reads (Llama, Mistral, Qwen2,
    Qwen3; jft's ``task = "reward"`` export too), scored at each text's last token: a one-label
    model's ``sigmoid(logit)``, a multi-label one's ``sigmoid`` of the toxic label's logit, otherwise
    the ``softmax`` probability of the toxic label (:func:`_pick_label`). Texts are tokenized as
    transformers' pipeline does (the tokenizer's special tokens, cut to the model's length); a text
    with no tokens scores 0."""

    def __init__(self, folder, label: str | int | None = None, batch_size: int = 64, dtype: str = "float32"):
        from jft.hf import load_hf, load_tokenizer, resolve

        self.folder = resolve(folder)
        self.model, self.params = load_hf(self.folder, dtype=dtype)
        cfg = self.model.config
        if not cfg.num_labels:
            raise ConfigError(f"{folder}: a causal LM, not a sequence classifier; {SCORER_SPECS}")
        self.tokenizer = load_tokenizer(self.folder)
        if self.tokenizer is None:
            raise ConfigError(f"{folder}: no tokenizer files; a classifier scorer needs its tokenizer")
        hf = json.loads((self.folder / "config.json").read_text())
        self.index = _pick_label(hf.get("id2label"), cfg.num_labels, label, str(folder))
        self.sigmoid = cfg.num_labels == 1 or hf.get("problem_type") == "multi_label_classification"
        self.batch_size = batch_size
        self.name = f"jft classifier {folder}" + ("" if cfg.num_labels == 1 else f" (label {self.index})")

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        limit = self.model.config.max_position_embeddings
        seqs = self.tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"]
        out = np.zeros(len(seqs), np.float64)
        # texts with tokens, shortest first: similar lengths share a batch
        order = sorted((i for i, s in enumerate(seqs) if s), key=lambda i: len(seqs[i]))
        rows = min(self.batch_size, _bucket(len(order), 1)) if order else 0
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            length = min(_bucket(max(len(seqs[i]) for i in chunk)), limit)
            ids, mask = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
            mask[:, 0] = 1  # the padding rows read one token, then are dropped
            for r, i in enumerate(chunk):
                ids[r, : len(seqs[i])], mask[r, : len(seqs[i])] = seqs[i], 1
            logits = np.asarray(jax.device_get(_classifier_logits(self.model, self.params, ids, mask)), np.float64)
            logits = logits[: len(chunk)]
            if self.sigmoid:
                probs = 1 / (1 + np.exp(-logits[:, self.index]))
            else:
                z = np.exp(logits - logits.max(axis=1, keepdims=True))
                probs = z[:, self.index] / z.sum(axis=1)
            out[chunk] = probs
        return out


class PipelineScorer:
    """A transformers ``pipeline("text-classification", model=folder, top_k=None)`` (any
    architecture transformers has; BERT- and RoBERTa-based toxicity classifiers included): the
    probability the pipeline gives the toxic label (:func:`_pick_label`; sigmoid for one-label and
    multi-label models, softmax otherwise). Needs torch (``pip install torch``). ``device``: the
    pipeline's (default: the first GPU torch sees, else the CPU)."""

    def __init__(self, folder, label: str | int | None = None, batch_size: int = 64, device=None):
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                f"scorer hf:{folder} runs a transformers pipeline, which needs torch: pip install torch "
                "(the CPU build is enough), or use a jft-loadable classifier folder (jft:FOLDER)"
            ) from e
        from transformers import pipeline

        self.pipe = pipeline("text-classification", model=str(folder), top_k=None, device=device)
        config, tokenizer = self.pipe.model.config, self.pipe.tokenizer
        self.label = config.id2label[_pick_label(config.id2label, config.num_labels, label, str(folder))]
        self.batch_size = batch_size
        if tokenizer.pad_token is None:  # batching pads; a decoder's tokenizer may have no pad token
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id
        if tokenizer.pad_token is None:
            self.batch_size = 1
        self.name = f"transformers pipeline {folder} (label {self.label})"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = self.pipe(list(texts), batch_size=self.batch_size, truncation=True)
        return np.asarray([next(d["score"] for d in row if d["label"] == self.label) for row in out], np.float64)


def _classifier_kind(folder: Path) -> str:
    """``"jft"`` or ``"hf"``: who reads a local classifier folder."""
    from jft.hf import SUPPORTED_MODEL_TYPES

    file = folder / "config.json"
    try:
        hf = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: missing or unreadable ({e}); a classifier folder needs its config.json") from e
    architectures = hf.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(
            f"{file}: architectures {architectures} is not a *ForSequenceClassification model; {SCORER_SPECS}"
        )
    return "jft" if hf.get("model_type") in SUPPORTED_MODEL_TYPES else "hf"


def load_scorer(spec: str = "lexicon", *, label: str | int | None = None, batch_size: int = 64) -> Callable:
    """A scorer ``fn(texts) -> [n] toxicities`` with a ``name``, from a spec (see ``SCORER_SPECS``):
    ``lexicon``, ``module:function``, ``hf:FOLDER`` (:class:`PipelineScorer`), ``jft:FOLDER``
    (:class:`ClassifierScorer`) or a local folder (jft's when its ``model_type`` is one jft loads).
    ``label``: the toxic class of a classifier (default: named toxic / toxicity / LABEL_1).
    Raises :class:`jft.config.ConfigError` for a spec that names nothing usable."""
    spec = str(spec)
    if spec == "lexicon":
        return LexiconScorer()
    if spec.startswith("hf:"):
        return PipelineScorer(spec[3:], label, batch_size)
    if spec.startswith("jft:"):
        return ClassifierScorer(spec[4:], label, batch_size)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        kind = _classifier_kind(folder)
        return (ClassifierScorer if kind == "jft" else PipelineScorer)(folder, label, batch_size)
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        return FunctionScorer.load(spec)
    raise ConfigError(f"scorer {spec!r}: not a folder, nor a known spec; {SCORER_SPECS}")


def score_texts(scorer: Callable, texts: Sequence[str]) -> np.ndarray:
    """``scorer(texts)`` as ``[n]`` float64, checked: one finite value in [0, 1] per text."""
    name = getattr(scorer, "name", getattr(scorer, "__name__", type(scorer).__name__))
    if not texts:
        return np.zeros(0, np.float64)
    values = scorer(list(texts))
    try:
        values = None if values is None else np.asarray(values, np.float64).ravel()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"scorer {name} returned non-numbers ({e}); return one float per text") from e
    if values is None or values.shape != (len(texts),):
        got = "None" if values is None else f"{values.size} values"
        raise ConfigError(f"scorer {name} returned {got} for {len(texts)} texts; it must return one toxicity each")
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        i = int(np.argmax(bad))
        text = texts[i][:60]
        raise ConfigError(f"scorer {name} returned {float(values[i])} for text {i} ({text!r}); expected [0, 1]")
    return values
