"""Rule-based reward functions for GRPO and PPO (``rl.reward_funcs = ("jft.rewards:chrf",)``).

Each follows trl's convention, ``fn(prompts, completions, **columns) -> list[float]``: one value
per completion, the columns being the prompt records' other fields (one value per completion).
A completion is a string, or for conversational prompts a list holding the assistant message.
These score a completion against a reference answer in the record (``output``, as instruction
records have it, or ``answer``), so they need no model: a verifiable reward for demos and tests.
"""

from __future__ import annotations

from collections.abc import Sequence

from jft import metrics


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _references(n: int, output: Sequence | None, answer: Sequence | None) -> list[str]:
    refs = output if output is not None else answer
    if refs is None:
        raise ValueError(
            "these rewards compare with a reference: the prompt records need an 'output' or 'answer' field"
        )
    if len(refs) != n:
        raise ValueError(f"{len(refs)} references for {n} completions")
    return ["" if r is None else str(r) for r in refs]


def chrf(prompts, completions, output=None, answer=None, **_) -> list[float]:
    """Sentence chrF of each completion against its record's ``output`` (or ``answer``), in [0, 1]."""
    refs = _references(len(completions), output, answer)
    return [metrics.chrf([_text(c).strip()], [r]) / 100 for c, r in zip(completions, refs, strict=True)]


def exact_match(prompts, completions, output=None, answer=None, **_) -> list[float]:
    """1.0 where the completion equals its reference (whitespace-normalised), else 0.0."""
    refs = _references(len(completions), output, answer)
    same = lambda a, b: " ".join(a.split()) == " ".join(b.split())
    return [float(same(_text(c), r)) for c, r in zip(completions, refs, strict=True)]


def lowercase(prompts, completions, **_) -> list[float]:
    """A format rule: the share of a completion's letters that are lower case (1.0 with no letters)."""
    out = []
    for c in completions:
        letters = [ch for ch in _text(c) if ch.isalpha()]
        out.append(sum(ch.islower() for ch in letters) / len(letters) if letters else 1.0)
    return out
