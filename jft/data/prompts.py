"""Prompt records -> rows for the RL objectives (GRPO): what the policy continues, and the columns
its reward functions read.

    rows, prompts, stats = tokenize_prompts(load_records("prompts.jsonl"), tokenizer, max_length=256)
    rows[0]["prompt_ids"]                         # [256] int32, left-padded (prompt_mask marks the real ones)
    prompts[0].prompt, prompts[0].columns         # what reward functions get for this row

Four record forms, as trl's GRPO users and jft's SFT users have them:

    standard        {"prompt": str, ...}: BOS + the prompt's tokens, no template
    conversational  {"prompt": [messages], ...}: rendered by the chat template with the generation prompt
    instruction     {"instruction": str, "input": str?, ...}: rendered by the data template without its
                    output (so a model fine-tuned on the template sees the same layout)
    chat            {"messages": [messages], ...}: an SFT chat record; the conversation before its last
                    assistant turn (all of it when it has none), rendered as a conversational prompt

Every other field of a record (an ``output``, an ``answer``, ...) is a column: reward functions get
it as a keyword argument, one value per completion (trl's convention).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jft.data.formats import ALPACA, DataError, Template, _render_chat, prompt_ids
from jft.data.preference import OVERLONG, _messages

FORMS = (
    "a prompt record is {'prompt': str}, {'prompt': [{'role': str, 'content': str}, ...]} (rendered by the "
    "chat template with the generation prompt), or an instruction record {'instruction': str, 'input': str} "
    "(input optional) rendered by data.template, or a chat record {'messages': [...]} (the conversation before "
    "its last assistant turn); its other fields are columns for the reward functions"
)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt as reward functions see it: ``prompt`` (the string, or the message list of a
    conversational record, as trl passes it) and the record's other fields (``columns``)."""

    prompt: Any
    columns: dict
    conversational: bool


@dataclasses.dataclass
class PromptStats:
    """What prompt tokenization kept and lost; ``str()`` is one log line."""

    records: int = 0  # prompt records read
    kept: int = 0  # made into rows
    dropped: int = 0  # longer than max_length with overlong="drop"
    truncated: int = 0  # kept, their first tokens cut (overlong="truncate")
    tokens: int = 0  # real prompt tokens of the kept rows

    def __str__(self) -> str:
        return (
            f"{self.records} prompts, {self.kept} kept, {self.truncated} truncated, {self.dropped} dropped, "
            f"{self.tokens} tokens"
        )


def split_prompt(record: dict, tokenizer, template: Template = ALPACA, where: str = "record") -> tuple[str, Prompt]:
    """``(text the model continues, Prompt)`` of a prompt record; :class:`DataError` naming
    ``where`` and the field for anything else."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}; {FORMS}")
    if "prompt" in record:
        prompt = record["prompt"]
        columns = {k: v for k, v in record.items() if k != "prompt"}
        if isinstance(prompt, str):
            return prompt, Prompt(prompt, columns, False)
        if isinstance(prompt, list):
            messages = _messages(prompt, "prompt", where)
            return _render_chat(tokenizer, messages, True, where), Prompt(messages, columns, True)
        raise DataError(f"{where}: field 'prompt' is a {type(prompt).__name__}; {FORMS}")
    if "instruction" in record:
        fields = {}
        for name in ("instruction", "input"):
            value = record.get(name, "")
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} is a {type(value).__name__}, expected a string")
            fields[name] = value
        text = (template.prompt_with_input if fields["input"].strip() else template.prompt).format(**fields)
        columns = {k: v for k, v in record.items() if k not in ("instruction", "input")}
        return text, Prompt(text, columns, False)
    if "messages" in record:
        messages = _messages(record["messages"], "messages", where)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        if not messages[:last]:
            raise DataError(f"{where}: field 'messages' has no message before its last assistant turn; {FORMS}")
        columns = {k: v for k, v in record.items() if k != "messages"}
        return _render_chat(tokenizer, messages[:last], True, where), Prompt(messages[:last], columns, True)
    raise DataError(
        f"{where}: record has no 'prompt' or 'instruction' field, nor 'messages' (its fields are {sorted(record)}); "
        f"{FORMS}"
    )


def prompt_tokens(
    record: dict, tokenizer, template: Template = ALPACA, where: str = "record", vocab_size: int | None = None
) -> tuple[list[int], Prompt]:
    """``(token ids, Prompt)`` of a prompt record (:func:`split_prompt`; BOS once, as training sees
    it); :class:`DataError` naming ``where`` for an empty prompt or an id at or above ``vocab_size``."""
    text, prompt = split_prompt(record, tokenizer, template, where)
    ids = prompt_ids(text, tokenizer)
    if not ids:
        raise DataError(f"{where}: the prompt has no tokens; {FORMS}")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise DataError(f"{where}: token id {max(ids)} is outside the model's vocabulary of {vocab_size}")
    return ids, prompt


def tokenize_prompts(
    records: list[tuple[str, dict]],
    tokenizer,
    *,
    max_length: int,
    template: Template = ALPACA,
    overlong: str = "drop",
    vocab_size: int | None = None,
) -> tuple[list[dict], list[Prompt], PromptStats]:
    """``(rows, prompts, stats)`` for ``(where, record)`` pairs (:func:`jft.data.load_records`).

    Each row: ``prompt_ids`` ``[max_length]`` int32 (BOS once, then the prompt's tokens, left-padded
    with 0), ``prompt_mask`` ``[max_length]`` int32 (1 = a prompt token) and ``index`` (the row's
    position in ``prompts``). A prompt longer than ``max_length`` is dropped or, with
    ``overlong="truncate"``, keeps its last ``max_length`` tokens (the end of a prompt is what the
    completion follows); both are counted. Token ids at or above ``vocab_size`` are an error.
    """
    if overlong not in OVERLONG:
        raise DataError(f"data.overlong={overlong!r}; use one of {OVERLONG}")
    rows, prompts, stats = [], [], PromptStats()
    for where, record in records:
        stats.records += 1
        ids, prompt = prompt_tokens(record, tokenizer, template, where, vocab_size)
        if len(ids) > max_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids, stats.truncated = ids[-max_length:], stats.truncated + 1
        pad = max_length - len(ids)
        rows.append(
            {
                "prompt_ids": np.asarray([0] * pad + ids, np.int32),
                "prompt_mask": np.asarray([0] * pad + [1] * len(ids), np.int32),
                "index": np.int32(len(prompts)),
            }
        )
        prompts.append(prompt)
        stats.kept += 1
        stats.tokens += len(ids)
    return rows, prompts, stats
