"""Preference pairs -> rows for reward-model and DPO objectives: a chosen and a rejected answer per prompt.

    pairs = load_records("prefs.jsonl")                 # [(where, record), ...]
    rows, stats = tokenize_pairs(pairs, tokenizer, max_length=L)
    rows[0]["input_ids"]                                # [2, L] int32: row 0 chosen, row 1 rejected

Two record forms, as in the usual preference datasets:

    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"chosen": [messages], "rejected": [messages]}, with an optional "prompt": [messages];
                    without it the messages both sides start with are the prompt (their longest
                    common prefix). The last message of each side is the assistant's answer.

Either form may carry a ``margin`` (a number: how much better chosen is, for margin losses).

Standard pairs are tokenized as BOS, the prompt's tokens, then the response's tokens and EOS;
prompt and response are tokenized separately, so the response span is exact. A conversation is
rendered by the chat template: the prompt with the generation prompt added, the response being
the rest of the whole conversation's text. A row's ``loss_weights`` are 1 where the *target* is
a response token (EOS included), so ``sum(log p(targets) * loss_weights)`` is the response's
log-probability under the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jft.data.formats import DataError, _ids, _render_chat

PAIR_KEYS = ("input_ids", "attention_mask", "targets", "loss_weights", "margin", "weight")
OVERLONG = ("drop", "truncate")
# "always": BOS whenever the tokenizer has one, as jft's SFT data places it (so a DPO reference
# model trained by SFT sees the same layout); "tokenizer": only when the tokenizer itself adds it.
BOS_RULES = ("always", "tokenizer")
FORMS = (
    "a preference record is either {'prompt': str, 'chosen': str, 'rejected': str}, or 'chosen' and "
    "'rejected' as message lists [{'role': str, 'content': str}, ...] with an optional 'prompt' message "
    "list (without it the messages both sides share are the prompt); 'margin' (a number) is optional"
)


@dataclasses.dataclass
class PairStats:
    """What pair tokenization kept and lost; ``str()`` is one log line."""

    records: int = 0  # pairs read
    kept: int = 0  # pairs made into rows
    dropped: int = 0  # not kept: over-long (overlong="drop") or no response token fits
    truncated: int = 0  # kept, with one side or both cut to max_length
    no_response: int = 0  # of dropped: a side with no response token within max_length
    tokens: int = 0  # real (unpadded) tokens of the kept pairs, both sides

    def __str__(self) -> str:
        return (
            f"{self.records} pairs, {self.kept} kept, {self.truncated} truncated, {self.dropped} dropped "
            f"({self.no_response} with no response within max_length), {self.tokens} tokens"
        )


# ---------------------------------------------------------------------------- records


def _type(value) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"


def _messages(value, name: str, where: str) -> list[dict[str, str]]:
    if not value:
        raise DataError(f"{where}: field {name!r} is an empty message list; {FORMS}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: field {name!r} message {i} must be {{'role': str, 'content': str}}, got {str(m)[:80]}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _margin(record: dict, where: str) -> float:
    value = record.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{where}: field 'margin' is {_type(value)} ({value!r}), expected a finite number")
    return float(value)


def split_pair(record: dict, where: str = "record"):
    """A preference record as ``(prompt, chosen, rejected)``: three strings, or three message lists.

    For conversations without a ``prompt``, the prompt is the longest message prefix both sides
    share and chosen / rejected are what follows it. Raises :class:`DataError` naming ``where``
    and the field for a missing field, a wrong type, or a side that does not end with the
    assistant's answer.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}; {FORMS}")
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise DataError(f"{where}: record has no {name!r} field (its fields are {sorted(record)}); {FORMS}")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise DataError(f"{where}: field 'prompt' is {_type(prompt)}, but chosen/rejected are strings; {FORMS}")
        return prompt, chosen, rejected
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(
            f"{where}: field 'chosen' is {_type(chosen)} and field 'rejected' is {_type(rejected)}; "
            f"they must be both strings or both message lists; {FORMS}"
        )
    chosen, rejected = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
    if prompt is None:
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not chosen or not rejected:
            raise DataError(
                f"{where}: field {'chosen' if not chosen else 'rejected'!r} has no messages beyond the ones both "
                "sides share (the implicit prompt), so there is no response to compare"
            )
    elif isinstance(prompt, list):
        prompt = _messages(prompt, "prompt", where)
    else:
        raise DataError(f"{where}: field 'prompt' is {_type(prompt)}, but chosen/rejected are message lists; {FORMS}")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if side[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: field {name!r} ends with a {side[-1]['role']!r} message; its last message must be "
                "the assistant's response"
            )
    return prompt, chosen, rejected


# ---------------------------------------------------------------------------- tokens


def _render(tokenizer, messages, add_generation_prompt: bool, where: str, chat_template: str | None) -> str:
    if chat_template is None:
        return _render_chat(tokenizer, messages, add_generation_prompt, where)
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # the template's own checks (role order, system support)
        raise DataError(f"{where}: the chat template rejected this conversation ({e})") from e


def _adds_bos(tokenizer) -> bool:
    """Whether encoding with special tokens (the tokenizer's default) puts its BOS first."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]


def encode_pair(
    record: dict, tokenizer, *, chat_template: str | None = None, bos: str = "always", where: str = "record"
) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)``: BOS + prompt tokens, and each response's tokens + EOS.

    ``bos``: "always" puts the tokenizer's BOS first whenever it has one (as jft's SFT data
    does), "tokenizer" only when the tokenizer adds it by default; never twice (a chat template
    may render it). EOS ends each response; for conversations only when the rendered response
    does not already contain it (the template's end of turn).
    """
    if bos not in BOS_RULES:
        raise DataError(f"bos={bos!r}; use one of {BOS_RULES}")
    prompt, chosen, rejected = split_pair(record, where)
    conversational = isinstance(prompt, list)
    if conversational:
        prompt_text = _render(tokenizer, prompt, True, where, chat_template)
        responses = []
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            full = _render(tokenizer, prompt + side, False, where, chat_template)
            if not full.startswith(prompt_text):
                raise DataError(
                    f"{where}: the chat template renders the prompt (with the generation prompt) as {prompt_text!r}, "
                    f"which is not how the whole {name} conversation starts ({full[: len(prompt_text) + 20]!r}...), "
                    "so the response cannot be separated from the prompt; use a template that renders incrementally"
                )
            responses.append(full[len(prompt_text) :])
        chosen, rejected = responses
    else:
        prompt_text = prompt
    prompt_ids = _ids(tokenizer, prompt_text)
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos_id is not None and prompt_ids[:1] != [bos_id] and (bos == "always" or _adds_bos(tokenizer)):
        prompt_ids = [bos_id, *prompt_ids]
    out = []
    for text in (chosen, rejected):
        ids = _ids(tokenizer, text)
        if eos_id is not None and not (conversational and eos_id in ids):
            ids.append(eos_id)
        out.append(ids)
    return prompt_ids, out[0], out[1]


def _side(prompt_ids: list[int], response_ids: list[int], max_length: int) -> dict[str, np.ndarray]:
    """One sequence as ``[max_length]`` arrays; the weight at position i is that of predicting token i + 1."""
    ids = (prompt_ids + response_ids)[:max_length]
    n = len(ids)
    side = {
        "input_ids": np.zeros(max_length, np.int32),
        "attention_mask": np.zeros(max_length, np.int32),
        "targets": np.zeros(max_length, np.int32),
        "loss_weights": np.zeros(max_length, np.float32),
    }
    side["input_ids"][:n] = ids
    side["attention_mask"][:n] = 1
    side["targets"][: n - 1] = ids[1:]
    side["loss_weights"][max(len(prompt_ids) - 1, 0) : n - 1] = 1.0  # targets that are response tokens
    return side


def tokenize_pairs(
    pairs: Sequence[tuple[str, dict]],
    tokenizer,
    max_length: int,
    *,
    overlong: str = "drop",
    chat_template: str | None = None,
    vocab_size: int | None = None,
    bos: str = "always",
) -> tuple[list[dict[str, np.ndarray]], PairStats]:
    """Encode every preference pair: ``(rows, stats)``, one row per pair.

    A row holds ``input_ids``, ``attention_mask``, ``targets`` (the next token at each position;
    0 at the last real position and in padding) as int32 ``[2, max_length]`` and ``loss_weights``
    as float32 ``[2, max_length]`` (1 where the target is a response token), row 0 the chosen
    side and row 1 the rejected one, right-padded with 0; and float32 scalars ``margin`` (0 when
    the record has none) and ``weight`` (1; an all-zero padding row has weight 0).

    A pair with a side longer than ``max_length`` tokens is left out (``overlong="drop"``) or has
    that side cut to its first ``max_length`` tokens (``"truncate"``: the prompt is kept and the
    response cut, so it has no EOS). A pair with a side whose response has no token within
    ``max_length`` (the prompt alone fills it) is left out. ``chat_template`` overrides the
    tokenizer's own for conversational pairs (with neither, ChatML). Raises :class:`DataError`
    for a bad record (naming where and the field), a token id ``vocab_size`` cannot embed, or
    when no pair is left.
    """
    if overlong not in OVERLONG:
        raise DataError(f"overlong={overlong!r}; use one of {OVERLONG}")
    if max_length < 2:
        raise DataError(f"max_length {max_length} leaves no room for a prompt and a response; use 2 or more")
    rows, stats = [], PairStats()
    for where, record in pairs:
        stats.records += 1
        prompt_ids, chosen_ids, rejected_ids = encode_pair(
            record, tokenizer, chat_template=chat_template, bos=bos, where=where
        )
        margin = _margin(record, where)
        top = max(prompt_ids + chosen_ids + rejected_ids, default=0)
        if vocab_size is not None and top >= vocab_size:
            raise DataError(
                f"{where}: token id {top} >= the model's vocab_size {vocab_size}; the tokenizer "
                f"({len(tokenizer)} tokens) does not fit the model. Use the model's own tokenizer"
            )
        longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
        if longest > max_length and overlong == "drop":
            stats.dropped += 1
            continue
        sides = [_side(prompt_ids, r, max_length) for r in (chosen_ids, rejected_ids)]
        if any(s["loss_weights"].sum() == 0 for s in sides):
            stats.dropped += 1
            stats.no_response += 1
            continue
        stats.truncated += longest > max_length
        row = {k: np.stack([s[k] for s in sides]) for k in sides[0]}
        row["margin"] = np.float32(margin)
        row["weight"] = np.float32(1.0)
        rows.append(row)
        stats.kept += 1
        stats.tokens += int(row["attention_mask"].sum())
    if pairs and not rows:
        raise DataError(f"all {stats.records} pairs were dropped (the first: {pairs[0][0]}; {stats}); check max_length")
    return rows, stats


__all__ = ["BOS_RULES", "FORMS", "PAIR_KEYS", "PairStats", "encode_pair", "split_pair", "tokenize_pairs"]
