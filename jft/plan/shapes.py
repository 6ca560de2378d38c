"""Model shapes for the planner: a model folder's or the hub cache's config.json, or the built-in table."""

from __future__ import annotations

import re
from pathlib import Path

_LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
_QWEN25 = dict(model_type="qwen2", max_position_embeddings=32768, rope_theta=1000000.0)

# Architectural numbers of well-known models, as in their config.json (no weights, nothing else):
# enough for a plan without a model folder (``--size``).
SIZES: dict[str, dict] = {
    "llama-2-7b": dict(
        _LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
    "llama-2-13b": dict(
        _LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
    ),
    "llama-2-70b": dict(
        _LLAMA2,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "llama-3-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "llama-3-70b": dict(
        _LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "llama-3.2-1b": dict(
        _LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "mistral-7b": dict(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
    ),
    "qwen2.5-0.5b": dict(
        _QWEN25,
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        _QWEN25,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
    ),
}
# Hub names (lower case, organisation and -instruct / -chat / -hf dropped) whose shapes are a SIZES entry.
_HUB_NAMES = {
    "llama-2-7b": "llama-2-7b",
    "llama-2-13b": "llama-2-13b",
    "llama-2-70b": "llama-2-70b",
    "meta-llama-3-8b": "llama-3-8b",
    "llama-3-8b": "llama-3-8b",
    "llama-3.1-8b": "llama-3-8b",
    "meta-llama-3.1-8b": "llama-3-8b",
    "meta-llama-3-70b": "llama-3-70b",
    "llama-3-70b": "llama-3-70b",
    "llama-3.1-70b": "llama-3-70b",
    "llama-3.3-70b": "llama-3-70b",
    "llama-3.2-1b": "llama-3.2-1b",
    "mistral-7b-v0.1": "mistral-7b",
    "mistral-7b-v0.2": "mistral-7b",
    "mistral-7b-v0.3": "mistral-7b",
    "mistral-7b": "mistral-7b",
    "qwen2.5-0.5b": "qwen2.5-0.5b",
    "qwen2.5-7b": "qwen2.5-7b",
}


def _model_source(cfg, size, notes: list[str]) -> tuple[dict | None, str]:
    """``(hf config dict or None for a new model, where it came from)``."""
    from jft.config import ConfigError

    if isinstance(size, dict):
        return dict(size), "the given config.json fields"
    if size:
        key = size.lower()
        if key not in SIZES:
            raise ConfigError(f"unknown size {size!r}; choose from {list(SIZES)}")
        return dict(SIZES[key]), f"{key} (jft's table of shapes: architecture only)"
    if not cfg.model.path:
        return None, "a new model from model.new"
    return _hf_source(cfg.model.path, "model.path", notes)


def _hf_source(path: str, what: str, notes: list[str]) -> tuple[dict, str]:
    """``config.json`` of a local folder or of a hub id in the Hugging Face cache, else the table's
    shapes for a hub id it knows (no network either way)."""
    import json

    from jft.config import ConfigError

    local = Path(path).expanduser()
    file = local / "config.json" if local.is_dir() else None
    if file is None and not str(path).startswith((".", "/", "~")):
        file = _cached_config(path)
    if file is not None and file.is_file():
        try:
            return json.loads(file.read_text()), str(file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{file}: unreadable ({e})") from e
    name = _table_name(path)
    if name:
        notes.append(
            f"{what}={path}: no config.json here or in the Hugging Face cache; {name}'s shapes from jft's table"
        )
        return dict(SIZES[name]), f"{name} (jft's table of shapes for {path}: architecture only)"
    raise ConfigError(
        f"{what}={path!r}: no config.json there (nor in the Hugging Face cache); pass a model folder, "
        f"or --size with one of {list(SIZES)}"
    )


def _cached_config(repo: str) -> Path | None:
    """``config.json`` of a hub repo if the Hugging Face cache holds it (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "config.json")
    except Exception:  # not a repo id, or no huggingface_hub
        return None
    return Path(hit) if isinstance(hit, str) else None


def _table_name(repo: str) -> str | None:
    name = repo.rstrip("/").split("/")[-1].lower()
    name = re.sub(r"-(instruct|chat|hf)$", "", re.sub(r"-(chat-hf|instruct)$", "", name))
    return _HUB_NAMES.get(name)


def _new_vocab(cfg, notes: list[str]) -> int:
    if cfg.tokenizer.path:
        from jft.hf import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer.path)
        if tokenizer is not None:
            return len(tokenizer)
    from jft.tokenizer import DEFAULT_VOCAB_SIZE

    notes.append(
        f"new model: its tokenizer is built from the data, so the vocabulary is counted at its largest "
        f"({DEFAULT_VOCAB_SIZE} tokens)"
    )
    return DEFAULT_VOCAB_SIZE


class _NoTokenizer:
    """Stands in for the tokenizer where a PEFT spec reads one (prompt tuning's init text: the ids
    do not change any shape)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [0]}
