"""Vocabulary fit for domain adaptation: add domain tokens to a model and its tokenizer.

    tokens = ["mRNA", "CRISPR"] + learn_tokens(tokenizer, texts, 100)   # given and learned from a corpus
    model, params, tokenizer, ids = extend_vocabulary(model, params, tokenizer, tokens)
    tokens_per_word(tokenizer, texts)          # the tokenizer's fit to a corpus, before and after
    jft.save_hf(model, params, "out/", tokenizer=tokenizer)   # transformers loads both

The new tokens join the tokenizer as whole tokens (``tokenizer.add_tokens``), the embedding table
and the lm_head (when not tied) grow to hold them, and every new row starts at the mean of the
rows of the existing tokens, as transformers' ``resize_token_embeddings(mean_resizing=True)``
starts them: the logits of the old tokens stay exactly what they were, and a new token starts
as an average word. Rows that a model pads its vocabulary with (ids at or past ``len(tokenizer)``)
are reused before the table grows.

``jft train`` does all this from ``tokenizer.add_tokens`` / ``tokenizer.learn_tokens``, and
``tokenizer.train_rows`` says which rows of the tables train (:func:`table_rules`,
:func:`new_row_labels`): by default the new rows always train, while the old ones train only where
the run's rules train the tables (full fine-tuning), so under PEFT they stay bit-identical.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from jft import partition
from jft.quant import QuantizedWeight
from jft.sharding import to_host
from jft.tree import get_path, has_path, set_path, walk

# The vocabulary's tables: param path -> the axis their rows (one per token id) lie along.
TABLES = {("model", "embed_tokens", "embedding"): 0, ("lm_head", "kernel"): 1}
# tokenizer.train_rows: which rows of the tables train once tokens are added (see table_rules).
TRAIN_ROWS = ("new", "all", "rules")


def extend_vocabulary(model, params: dict, tokenizer, tokens: Sequence[str]):
    """``(model, params, tokenizer, new_ids)`` with ``tokens`` added (those the tokenizer already
    has are left as they are; ``new_ids`` are the ids of the ones added). ``tokenizer`` is changed
    in place, as ``add_tokens`` does. Raises ValueError for a 4-bit embedding or lm_head."""
    old = len(tokenizer)
    tokenizer.add_tokens([t for t in tokens if t not in tokenizer.get_vocab()])
    new_ids = list(range(old, len(tokenizer)))
    if not new_ids:
        return model, params, tokenizer, new_ids
    vocab = max(model.config.vocab_size, len(tokenizer))
    params = {**params, "model": {**params["model"]}}
    embed = params["model"]["embed_tokens"]["embedding"]  # [vocab, embed]
    params["model"]["embed_tokens"] = {"embedding": _grown(embed, 0, old, vocab, new_ids, "embed_tokens")}
    if "lm_head" in params:  # untied: kernel [embed, vocab]
        kernel = params["lm_head"]["kernel"]
        params = {
            **params,
            "lm_head": {**params["lm_head"], "kernel": _grown(kernel, 1, old, vocab, new_ids, "lm_head")},
        }
    config = dataclasses.replace(model.config, vocab_size=vocab)
    return type(model)(config, model.peft), params, tokenizer, new_ids


def _grown(table, axis: int, old: int, vocab: int, new_ids: list[int], name: str) -> np.ndarray:
    """``table`` with ``vocab`` entries along ``axis``; the ``new_ids`` entries are the mean of the first ``old``."""
    if isinstance(table, QuantizedWeight):
        raise ValueError(f"{name} is 4-bit; extend the vocabulary of the unquantized model, then quantize it")
    x = np.asarray(to_host(table))  # on a pod, every host gathers the table (all hosts extend it)
    rows = np.moveaxis(x, axis, 0)  # [vocab, ...]
    mean = rows[:old].astype(np.float64).mean(0).astype(x.dtype)
    grown = np.concatenate([rows, np.broadcast_to(mean, (vocab - len(rows), *rows.shape[1:]))])
    grown[new_ids] = mean
    return np.moveaxis(grown, 0, axis)


def tokens_per_word(tokenizer, texts: Iterable[str]) -> float:
    """Tokens per whitespace-separated word over ``texts`` (no special tokens): lower fits better."""
    tokens = words = 0
    for text in texts:
        tokens += len(tokenizer.encode(text, add_special_tokens=False))
        words += len(re.findall(r"\S+", text))
    return tokens / max(words, 1)


def learn_tokens(tokenizer, texts: Iterable[str], n: int, skip: Iterable[str] = ()) -> list[str]:
    """Up to ``n`` domain tokens learned from ``texts``: their most frequent words (seen at least
    twice) that ``tokenizer`` splits into two or more tokens.

    A word is a whitespace-separated piece with the punctuation at its ends stripped (``"mRNA,"``
    counts as ``mRNA``), encoded alone without special tokens. Words that are already tokens of
    ``tokenizer``, or are in ``skip``, are passed over. Ties go to the word that sorts first, so
    the same texts always give the same list, most frequent first; it is shorter than ``n`` when
    fewer words qualify. Memory grows with the distinct words of ``texts``: pass a sample.
    """
    if n <= 0:
        return []
    counts = Counter(w for text in texts for piece in text.split() if (w := piece.strip(string.punctuation)))
    known = set(tokenizer.get_vocab()) | set(skip)
    out = []
    for word, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(out) == n or count < 2:
            break
        if word not in known and len(tokenizer.encode(word, add_special_tokens=False)) >= 2:
            out.append(word)
    return out


def table_rules(params: Mapping, rules: partition.Rules, which: str) -> tuple[tuple[str, str], ...]:
    """``(path, "trainable")`` partition rules, to go before ``rules``, for the vocabulary tables of
    ``params`` (:data:`TABLES`) that ``rules`` freeze but ``which`` trains.

    ``which`` (``tokenizer.train_rows``): ``"new"`` and ``"all"`` train every table ``rules``
    freeze (``"new"`` then narrows them to the new rows with :func:`new_row_labels`); a table the
    rules train already (full fine-tuning) keeps training whole. ``"rules"``: no rules, the
    run's own decide. Under PEFT pass the extra rules (``peft.train``): a method's own rules name
    only its own leaves. Raises ValueError for another ``which``.
    """
    if which not in TRAIN_ROWS:
        raise ValueError(f"train_rows={which!r}; choose one of {TRAIN_ROWS}")
    if which == "rules":
        return ()
    tables: dict = {}
    for path in TABLES:
        if has_path(params, path):
            set_path(tables, path, None)
    labels = partition.labels(tables, (*map(tuple, rules), (".*", "frozen")))
    return tuple(("/".join(path), "trainable") for path, label in walk(labels) if not label)


def new_row_labels(labels: Mapping, params: Mapping, ids: Sequence[int], rules: partition.Rules) -> dict:
    """``labels`` with each table that ``rules`` (from :func:`table_rules`) name trainable in the
    rows ``ids`` only: a bool label ``[vocab, 1]`` for ``embed_tokens``, ``[1, vocab]`` for
    ``lm_head``, which :func:`jft.partition.layer_masks` turns into masks that hold every other row
    bit-identical (the table lives whole in the trainable half, with optimizer state)."""
    out = partition.join(labels, {})  # a copy
    for name, _ in rules:
        path = tuple(name.split("/"))
        shape = [1, 1]
        shape[TABLES[path]] = np.shape(get_path(params, path))[TABLES[path]]
        rows = np.zeros(max(shape), bool)
        rows[list(ids)] = True
        set_path(out, path, rows.reshape(shape))
    return out


__all__ = [
    "TABLES",
    "TRAIN_ROWS",
    "extend_vocabulary",
    "learn_tokens",
    "new_row_labels",
    "table_rules",
    "tokens_per_word",
]
