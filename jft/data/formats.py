"""Records -> token ids + per-token loss weights, for four record formats.

    instruction        {"instruction", "input" (optional), "output"}, rendered by a Template
    chat               {"messages": [{"role": "system" | "user" | "assistant", "content"}, ...]}
    prompt_completion  {"prompt", "completion"}
    text               {"text"}  (continued pretraining: every token is a response token)

A record becomes pieces of text, each either prompt or response; the pieces are tokenized
one by one (``add_special_tokens=False``), so the response spans are exact token spans.
BOS is added once at the start, EOS after the response, so the model learns to stop.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FORMATS = ("auto", "instruction", "chat", "prompt_completion", "text")
# Token kinds: BOS (never predicted, weight 0), prompt, response.
BOS, PROMPT, RESPONSE = 0, 1, 2


class DataError(ValueError):
    """A data source or record jft cannot train on: where (file:line) and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Template:
    """How an instruction record becomes text: ``str.format`` strings over the record's fields.

    ``prompt`` is used when ``input`` is empty, ``prompt_with_input`` otherwise; both see
    ``{instruction}`` and ``{input}``. ``response`` sees ``{output}``.
    """

    prompt: str
    prompt_with_input: str
    response: str = "{output}"


_PREAMBLE = (
    "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
)
_INSTRUCTION = "### Instruction:\n{instruction}\n\n"
_INPUT = "### Input:\n{input}\n\n"
_RESPONSE = "### Response:\n"

_WITH_INPUT = ", paired with an input that provides further context"

ALPACA = Template(
    prompt=_PREAMBLE.format("") + _INSTRUCTION + _RESPONSE,
    prompt_with_input=_PREAMBLE.format(_WITH_INPUT) + _INSTRUCTION + _INPUT + _RESPONSE,
)
SIMPLE = Template(prompt=_INSTRUCTION + _RESPONSE, prompt_with_input=_INSTRUCTION + _INPUT + _RESPONSE)
# One line each: the fewest tokens per record, for small models and short sequences.
COMPACT = Template(prompt="{instruction}\nOutput: ", prompt_with_input="{instruction}\nInput: {input}\nOutput: ")
TEMPLATES = {"alpaca": ALPACA, "simple": SIMPLE, "compact": COMPACT}

# Used when the tokenizer has no chat template of its own.
CHATML = "<|im_start|>{role}\n{content}<|im_end|>\n"
CHATML_GENERATION_PROMPT = "<|im_start|>assistant\n"
_ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------- records


def detect_format(record: dict, where: str = "record") -> str:
    """The format a record's fields imply: chat, instruction, prompt_completion or text."""
    keys = record.keys()
    if "messages" in keys:
        return "chat"
    if "instruction" in keys or "output" in keys:
        return "instruction"
    if "prompt" in keys or "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{where}: record has none of the fields of a known format (instruction/output, messages, "
        f"prompt/completion or text); its fields are {sorted(keys)}"
    )


def _field(record: dict, name: str, where: str, fmt: str, needs: str, optional: bool = False) -> str:
    value = record.get(name)
    if value is None and optional:
        return ""
    if name not in record or value is None:
        raise DataError(f"{where}: record has no {name!r} field ({fmt} format needs {needs})")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} is a {type(value).__name__}, expected a string")
    return value


def _messages(record: dict, where: str) -> list[dict[str, str]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: message {i} must be {{'role': one of {_ROLES}, 'content': str}}, got {str(m)[:80]}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: chat record has no assistant message, so nothing to learn")
    return out


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    """The conversation as text, by the tokenizer's chat template or else ChatML."""
    if getattr(tokenizer, "chat_template", None) is None:
        text = "".join(CHATML.format(**m) for m in messages)
        return text + (CHATML_GENERATION_PROMPT if add_generation_prompt else "")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template's own checks (role order, system support)
        raise DataError(f"{where}: the tokenizer's chat template rejected this conversation ({e})") from e


def _chat_pieces(record: dict, tokenizer, where: str) -> list[tuple[str, int]]:
    """Render the conversation one message at a time, so each piece is exactly one span.

    Each assistant turn is the text its generation prompt (the header, a prompt piece) leaves
    to render: the content and the end-of-turn marker. Messages after the last assistant turn
    are left out: they have no answer to learn.
    """
    messages = _messages(record, where)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    pieces, done = [], ""

    def extend(text: str, kind: int) -> None:
        nonlocal done
        if not text.startswith(done):
            raise DataError(
                f"{where}: the chat template renders earlier messages differently once later ones are added, "
                "so response spans cannot be found; use a tokenizer whose template renders incrementally"
            )
        pieces.append((text[len(done) :], kind))
        done = text

    for i in range(last + 1):
        if messages[i]["role"] == "assistant":
            extend(_render_chat(tokenizer, messages[:i], True, where), PROMPT)
            extend(_render_chat(tokenizer, messages[: i + 1], False, where), RESPONSE)
        else:
            extend(_render_chat(tokenizer, messages[: i + 1], False, where), PROMPT)
    return pieces


def render(record: dict, tokenizer, template: Template = ALPACA, fmt: str = "auto", where: str = "record"):
    """A record as ``(format, [(text, kind), ...])`` pieces; kind is PROMPT or RESPONSE."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; use one of {FORMATS}")
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}, expected an object of fields")
    fmt = detect_format(record, where) if fmt == "auto" else fmt
    if fmt == "instruction":
        needs = "instruction, output; input is optional"
        fields = {
            "instruction": _field(record, "instruction", where, fmt, needs),
            "input": _field(record, "input", where, fmt, needs, optional=True),
        }
        output = _field(record, "output", where, fmt, needs)
        prompt = template.prompt_with_input if fields["input"].strip() else template.prompt
        return fmt, [(prompt.format(**fields), PROMPT), (template.response.format(output=output), RESPONSE)]
    if fmt == "prompt_completion":
        needs = "prompt, completion"
        prompt = _field(record, "prompt", where, fmt, needs)
        return fmt, [(prompt, PROMPT), (_field(record, "completion", where, fmt, needs), RESPONSE)]
    if fmt == "text":
        return fmt, [(_field(record, "text", where, fmt, "text"), RESPONSE)]
    return fmt, _chat_pieces(record, tokenizer, where)


# ---------------------------------------------------------------------------- tokens


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def encode_kinds(
    record: dict, tokenizer, *, template: Template = ALPACA, fmt: str = "auto", where: str = "record"
) -> tuple[list[int], list[int]]:
    """Token ids of a record and the kind of each (BOS, PROMPT or RESPONSE), both ``[n]``.

    BOS starts the sequence once when the tokenizer has one (a chat template that renders it
    itself is not given a second). EOS follows the response; for chat, the template's
    end-of-turn marker plays that role, and EOS is appended at the end only when the last
    assistant turn does not contain it.
    """
    fmt, pieces = render(record, tokenizer, template, fmt, where)
    ids, kinds, piece = [], [], []
    for text, kind in pieces:
        piece = _ids(tokenizer, text)
        ids += piece
        kinds += [kind] * len(piece)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids, kinds = [bos, *ids], [BOS, *kinds]
    elif ids[:1] == [bos]:
        kinds[0] = BOS
    if eos is not None and not (fmt == "chat" and eos in piece):  # piece: the last assistant turn
        ids, kinds = [*ids, eos], [*kinds, RESPONSE]
    return ids, kinds


def encode(
    record: dict,
    tokenizer,
    *,
    template: Template = ALPACA,
    prompt_loss_weight: float = 0.0,
    response_loss_weight: float = 1.0,
    fmt: str = "auto",
    where: str = "record",
) -> tuple[list[int], list[float]]:
    """One record as ``(ids, weights)``, both length ``n``: the tokens and how much predicting each counts.

    Prompt tokens weigh ``prompt_loss_weight`` (0 = completion-only), response tokens and EOS
    ``response_loss_weight``, BOS 0 (it is never predicted). Raises :class:`DataError`
    naming ``where`` for a record with missing or mistyped fields.
    """
    ids, kinds = encode_kinds(record, tokenizer, template=template, fmt=fmt, where=where)
    table = np.array([0.0, prompt_loss_weight, response_loss_weight], np.float32)
    return ids, table[np.asarray(kinds, np.int64)].tolist()


def prompt_and_reference(record: dict, tokenizer, template: Template = ALPACA) -> tuple[str, str] | None:
    """``(prompt text, reference answer)`` for generation metrics, or None for text records.

    The prompt is the text training puts before the (last) response; tokenize it with
    :func:`prompt_ids` so generation sees the same tokens training did.
    """
    fmt, pieces = render(record, tokenizer, template)
    if fmt == "text":
        return None
    if fmt == "chat":
        messages = _messages(record, "record")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return "".join(text for text, _ in pieces[:-1]), messages[last]["content"]
    return pieces[0][0], pieces[1][0]


def prompt_ids(text: str, tokenizer) -> list[int]:
    """A prompt's token ids exactly as training saw them: BOS once, then the text, no EOS."""
    ids = _ids(tokenizer, text)
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


__all__ = [
    "ALPACA",
    "FORMATS",
    "SIMPLE",
    "COMPACT",
    "TEMPLATES",
    "DataError",
    "Template",
    "detect_format",
    "encode",
    "encode_kinds",
    "prompt_and_reference",
    "prompt_ids",
]
