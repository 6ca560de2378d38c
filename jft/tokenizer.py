"""A small byte-level BPE tokenizer trained on the data itself, for models that start from scratch.

    tokenizer = train_bpe_tokenizer(texts, "runs/x/tokenizer")      # transformers tokenizer
    ids = tokenizer.encode("Le chat dort.", add_special_tokens=False)

Byte-level pre-tokenization means every string has an encoding (no ``<unk>`` in practice) and
``decode(encode(text)) == text`` exactly, accents, apostrophes and spacing before "?" included.
With a vocabulary near 1k and a corpus of a few hundred distinct words, almost every word of the
corpus becomes one token, which is what lets a tiny model learn it in minutes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0, 1, 2, 3
DEFAULT_VOCAB_SIZE = 1024


def train_bpe_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike | None = None, *, vocab_size: int | None = None
):
    """Train a byte-level BPE tokenizer on ``texts``; a ``transformers.PreTrainedTokenizerFast``.

    Args:
      texts: the training strings (read once, in order; the same texts give the same tokenizer).
      out_dir: when given, the tokenizer is also written there with ``save_pretrained``.
      vocab_size: the most tokens, special and 256 byte tokens included; default 1024. Training
        stops earlier when no pair of tokens occurs twice, so small corpora give smaller vocabularies.

    The special tokens are ``<unk>`` (0), ``<s>`` (1, BOS), ``</s>`` (2, EOS) and ``<pad>`` (3).
    Encoding adds none of them, even with ``add_special_tokens=True``: the data pipeline places BOS
    and EOS itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else int(vocab_size)
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        least = 256 + len(SPECIAL_TOKENS)  # every byte, then the specials
        raise ValueError(f"vocab_size must be at least {least}, got {vocab_size}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_bpe_tokenizer needs at least one non-empty text")

    tok = Tokenizer(models.BPE())
    # GPT-2 style split (words with their leading space, punctuation runs, digits), then bytes;
    # no prefix space, so a text's first word and its spacing survive decoding unchanged.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        # transformers would otherwise turn "Où est le chat ?" into "Où est le chat?" on decode
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer
