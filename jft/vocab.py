"""Vocabulary fit for domain adaptation: add domain tokens to a model and its tokenizer.

    model, params, tokenizer, ids = extend_vocabulary(model, params, tokenizer, ["mRNA", "CRISPR"])
    tokens_per_word(tokenizer, texts)          # the tokenizer's fit to a corpus, before and after
    jft.save_hf(model, params, "out/", tokenizer=tokenizer)   # transformers loads both

The new tokens join the tokenizer as whole tokens (``tokenizer.add_tokens``), the embedding table
and the lm_head (when not tied) grow to hold them, and every new row starts at the mean of the
rows of the existing tokens, as transformers' ``resize_token_embeddings(mean_resizing=True)``
starts them: the logits of the old tokens stay exactly what they were, and a new token starts
as an average word. Rows that a model pads its vocabulary with (ids at or past ``len(tokenizer)``)
are reused before the table grows. The new rows train with the embeddings: full fine-tuning
trains them; under PEFT add ``("model/embed_tokens/.*", "trainable")`` (and ``lm_head/.*``) to
``peft.train``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import numpy as np

from jft.quant import QuantizedWeight


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
    x = np.asarray(table)
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


__all__ = ["extend_vocabulary", "tokens_per_word"]
