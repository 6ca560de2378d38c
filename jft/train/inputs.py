"""What a run trains on, set up before the model: its records, its tokenizer and its vocabulary.

    train, validation = records(cfg, objective)        # pairs, or mixture parts left on disk
    tokenizer = run_tokenizer(cfg, workdir, train)     # the workdir's, the model's, or trained on the data
    model, params, tokenizer, added = vocabulary(cfg, workdir, model, params, tokenizer, records)

:func:`jft.train.fit` calls these in order; :func:`jft.train.evaluate` and ``jft distill`` read
the same records.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax

from jft import data as jdata
from jft import vocab as jvocab
from jft.config import ConfigError
from jft.data.mixture import Part, as_parts
from jft.data.sources import pieces, read_piece, source_files
from jft.hf import load_tokenizer
from jft.objectives import Objective
from jft.train.state import TrainingError


def records(cfg, objective: Objective):
    """``(train, validation)``. Validation: the records of ``data.validation``, or a seeded
    held-out share of each training source. Train: a list of ``(where, record)`` pairs, or, for an
    objective that ``mixes``, a list of :class:`jft.data.mixture.Part` s when ``data.mixture`` is
    set or a local source is left to the data cache's workers (``data.cache_dir`` with
    ``data.validation``: nothing is held out of it, so no process need read it whole)."""
    d = cfg.data
    load = lambda source: jdata.load_records(source, split=d.split, data_dir=d.data_dir or None, text_unit=d.text_unit)
    if bool(d.train) == bool(d.mixture):
        raise ConfigError("set one of data.train (a source) and data.mixture ((source, weight) pairs)")
    if d.mixture and not objective.mixes:
        raise ConfigError(f"data.mixture is read by task=sft, not task={cfg.task!r}; set data.train")
    try:
        sources = [(str(s), float(w)) for s, w in d.mixture] if d.mixture else [(d.train, 1.0)]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.mixture={d.mixture!r}: expected (source, weight) pairs ({e})") from None
    validation = load(d.validation) if d.validation else []
    parts = []
    for source, weight in sources:
        if objective.mixes and d.cache_dir and d.validation and source_files(source) is not None:
            parts.append(Part(source, weight))  # read in pieces by the cache's workers
            continue
        pairs = load(source)
        if not d.validation:
            pairs, held = jdata.split_validation(pairs, d.validation_fraction, cfg.train.seed)
            validation += held
        parts.append(Part(pairs, weight))
    if len(parts) == 1 and not isinstance(parts[0].data, str):
        return parts[0].data, validation
    return parts, validation


def training_records(cfg, train) -> Iterator[dict]:
    """The records of :func:`records`' train in order, read lazily (a source left on disk piece by piece)."""
    for part in as_parts(train):
        if isinstance(part.data, str):
            for piece in pieces(part.data, text_unit=cfg.data.text_unit):
                yield from (record for _, record in read_piece(piece))
        else:
            yield from (record for _, record in part.data)


def _in_memory(train) -> list:
    """The ``(where, record)`` pairs of :func:`records`' train, refusing sources left on disk."""
    parts = as_parts(train)
    if any(isinstance(p.data, str) for p in parts):
        raise ConfigError(
            "tokenizer.train_on_data reads every training record into memory, but data.cache_dir with "
            "data.validation leaves the training files on disk; train a tokenizer first "
            "(jft.tokenizer.train_bpe_tokenizer) and set tokenizer.path"
        )
    return [pair for p in parts for pair in p.data]


def run_tokenizer(cfg, workdir: Path, train_pairs):
    """The run's tokenizer: the one a first run saved in the workdir, else ``tokenizer.path`` (or
    ``model.path``)'s, else a BPE trained on the training records (``tokenizer.train_on_data``)."""
    saved = workdir / "tokenizer"
    if saved.is_dir():
        return load_tokenizer(saved)
    if cfg.tokenizer.train_on_data:
        from jft.tokenizer import train_bpe_tokenizer

        texts = [v for _, r in _in_memory(train_pairs) for v in _strings(r)]
        tokenizer = train_bpe_tokenizer(texts)
    else:
        source = cfg.tokenizer.path or cfg.model.path
        tokenizer = load_tokenizer(source) if source else None
        if tokenizer is None:
            raise ConfigError(
                f"no tokenizer: {source or 'model.path'} has none; set tokenizer.path, "
                "or tokenizer.train_on_data=True for a new model"
            )
    return tokenizer


VOCAB_RECORDS = 10_000  # training records read to learn tokens and measure tokens per word


def vocabulary(cfg, workdir: Path, model, params, tokenizer, records: Iterable[dict]):
    """``(model, params, tokenizer, added)`` with the vocabulary extended by ``tokenizer.add_tokens``
    and ``tokenizer.learn_tokens`` (:mod:`jft.vocab`); ``added`` (None without them) is what
    workdir/vocabulary.json keeps: the settings, the learned tokens, the new ids and the tokens per
    word of the first ``VOCAB_RECORDS`` training records before and after.

    Resume-safe: the extension is always computed from the base tokenizer (tokenizer.path or
    model.path; ``tokenizer`` may be the extended one a first run saved in the workdir) and the
    base model, with the tokens learned on the first run when workdir/vocabulary.json holds them
    for these settings, so that only a first run reads ``records``. A tokenizer saved in the
    workdir must have exactly the extended vocabulary, and the new ids must be those of the first
    run (TrainingError otherwise).
    """
    t = cfg.tokenizer
    if not (t.add_tokens or t.learn_tokens):
        return model, params, tokenizer, None
    source = t.path or cfg.model.path
    base = load_tokenizer(source)
    if base is None:
        raise ConfigError(
            f"tokenizer.add_tokens / learn_tokens: {source} has no tokenizer to extend; set tokenizer.path"
        )
    settings = {"add_tokens": list(t.add_tokens), "learn_tokens": t.learn_tokens}
    file, saved = workdir / "vocabulary.json", workdir / "tokenizer"
    added = json.loads(file.read_text()) if file.is_file() else {}

    def extend(learned):
        try:
            return jvocab.extend_vocabulary(model, params, base, [*t.add_tokens, *learned])
        except ValueError as e:  # a 4-bit lm_head
            raise ConfigError(
                f"tokenizer.add_tokens / learn_tokens: {e} (or keep lm_head in model.quantize_skip)"
            ) from e

    if {k: added.get(k) for k in settings} == settings:  # a resume: the first run's tokens, no data read
        model, params, extended, ids = extend(added["learned"])
        if ids != added["ids"]:
            raise TrainingError(
                f"{file}: the first run added ids {added['ids']}, this one {ids}: the tokenizer of {source} has "
                "changed since. Point tokenizer.path at the tokenizer of the first run, or use a new workdir."
            )
    else:
        sample = list(itertools.islice(records, VOCAB_RECORDS))
        texts = [s for r in sample for s in _strings(r)]
        learned = jvocab.learn_tokens(base, texts, t.learn_tokens, skip=t.add_tokens)
        before = jvocab.tokens_per_word(base, texts)
        model, params, extended, ids = extend(learned)
        after = jvocab.tokens_per_word(extended, texts)
        added = {**settings, "learned": learned, "ids": ids, "records": len(sample)}
        added.update(tokens_per_word_before=before, tokens_per_word_after=after)
    if saved.is_dir() and tokenizer.get_vocab() != extended.get_vocab():
        raise TrainingError(
            f"{saved} holds {len(tokenizer)} tokens, but the tokenizer of {source} with tokenizer.add_tokens and "
            f"the learned tokens has {len(extended)} (or other ids): a run with other tokens saved it. Use a new "
            f"workdir, or remove {saved} and {file} (and the checkpoints) to start this run afresh."
        )
    where = f"as ids {ids[0]}..{ids[-1]}" if ids else "(all known already)"
    _log(
        f"vocabulary: {len(ids)} tokens added {where}, {len(added['learned'])} of them learned; tokens per word on "
        f"{added['records']} training records: {added['tokens_per_word_before']:.3f} -> "
        f"{added['tokens_per_word_after']:.3f}",
    )
    return model, params, tokenizer if saved.is_dir() else extended, added


def row_rules(cfg, objective, params, added) -> tuple:
    """The partition rules that train the vocabulary tables which the run's own rules freeze
    (train.rules, or peft.train under PEFT) when ``tokenizer.train_rows`` says the new rows train."""
    if not added or not added["ids"]:
        return ()
    own = objective.train_rules + tuple(map(tuple, cfg.peft.train if cfg.peft.methods else cfg.train.rules))
    return jvocab.table_rules(params, own, cfg.tokenizer.train_rows)


def _strings(record: dict):
    for value in record.values():
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):  # chat messages
            yield from (m.get("content", "") for m in value if isinstance(m, dict))


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


__all__ = ["VOCAB_RECORDS", "records", "row_rules", "run_tokenizer", "training_records", "vocabulary"]
