"""Training data: records in four formats -> token ids + loss weights -> packed, resumable batches.

pairs = load_records("train.jsonl")      # or a folder, .json/.parquet/.csv/.txt(.gz), hub name, tfds:NAME
examples, stats = tokenize_records(pairs, tokenizer, vocab_size=V, max_length=L, template=ALPACA)
batches = Batches(pack(examples, L), batch_size=8, seed=0)
batch = next(batches)                    # input_ids, targets, loss_weights, segment_ids, positions
"""

from jft.data.formats import (
    ALPACA,
    FORMATS,
    SIMPLE,
    TEMPLATES,
    DataError,
    Template,
    detect_format,
    encode,
    prompt_and_reference,
    prompt_ids,
)
from jft.data.pipeline import (
    KEYS,
    Batches,
    Stats,
    in_batches,
    pack,
    split_validation,
    tokenize_records,
)
from jft.data.preference import PairStats, tokenize_pairs
from jft.data.sources import SUFFIXES, head_records, load_records

__all__ = [
    "ALPACA",
    "FORMATS",
    "KEYS",
    "SIMPLE",
    "SUFFIXES",
    "TEMPLATES",
    "Batches",
    "DataError",
    "PairStats",
    "Stats",
    "Template",
    "detect_format",
    "encode",
    "head_records",
    "in_batches",
    "load_records",
    "pack",
    "prompt_and_reference",
    "prompt_ids",
    "split_validation",
    "tokenize_pairs",
    "tokenize_records",
]
