"""Write jft/assets/en_fr_preferences.jsonl: preference pairs derived from the shipped en_fr phrases.

    python scripts/make_preference_demo.py            # rewrites the asset; deterministic (fixed seed)

Each pair is ``{"prompt", "chosen", "rejected"}``. The prompt is the en_fr record rendered by the
"compact" template, exactly the text the quickstart SFT model (configs/quickstart.py) sees before
its answer, so a reward model or DPO run on top of it compares answers to familiar prompts. Chosen
is the reference translation; rejected is a plausible mistake, one of:

    other     the translation of a different phrase of about the same length
    shuffle   the right French words in a wrong order (final punctuation kept last)
    drop      the right translation with one word left out
    copy      the English phrase copied back untranslated
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing jft

from jft.data.formats import COMPACT  # noqa: E402  (the quickstart config's data.template)

SEED = 0
NUM_PAIRS = 300
SOURCE = ROOT / "jft" / "assets" / "en_fr.jsonl"
OUT = ROOT / "jft" / "assets" / "en_fr_preferences.jsonl"
KINDS = ("other", "shuffle", "drop", "copy")


def prompt_text(record: dict) -> str:
    """The prompt as the quickstart's SFT data renders it (``render`` in jft/data/formats.py)."""
    template = COMPACT.prompt_with_input if record.get("input", "").strip() else COMPACT.prompt
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def _split_final(text: str) -> tuple[list[str], str]:
    """Words, and the sentence's final punctuation token ("." / "?" / "!") or ""."""
    words = text.split()
    if words and words[-1] in (".", "?", "!"):
        return words[:-1], " " + words[-1]
    if words and words[-1][-1:] in ".?!":
        return words[:-1] + [words[-1][:-1]], words[-1][-1]
    return words, ""


def _shuffle(text: str, rng: random.Random) -> str | None:
    words, end = _split_final(text)
    if len(set(words)) < 2:
        return None
    order = list(range(len(words)))
    while [words[i] for i in order] == words:
        rng.shuffle(order)
    # Sentence case stays with the first position, so the word order is the only tell.
    out = [words[i] if i else words[0][:1].lower() + words[0][1:] for i in order]
    return " ".join([out[0][:1].upper() + out[0][1:], *out[1:]]) + end


def _drop(text: str, rng: random.Random) -> str | None:
    words, end = _split_final(text)
    if len(words) < 2:
        return None
    i = rng.randrange(len(words))
    return " ".join(words[:i] + words[i + 1 :]) + end


def _other(record: dict, records: list[dict], rng: random.Random) -> str:
    """A different phrase's translation, among the five nearest in length."""
    out = record["output"]
    others = sorted({r["output"] for r in records if r["output"] != out}, key=lambda o: (abs(len(o) - len(out)), o))
    return rng.choice(others[:5])


def rejected(record: dict, records: list[dict], kind: str, rng: random.Random) -> str:
    if kind == "shuffle":
        text = _shuffle(record["output"], rng)
    elif kind == "drop":
        text = _drop(record["output"], rng)
    elif kind == "copy":
        text = record["input"]
    else:
        text = None
    if text is None or text == record["output"]:  # too short to shuffle or cut: another phrase instead
        text = _other(record, records, rng)
    return text


def make_pairs(records: list[dict], num_pairs: int = NUM_PAIRS, seed: int = SEED) -> list[dict]:
    """``num_pairs`` pairs from distinct records in a seeded order, kinds in turn."""
    rng = random.Random(seed)
    picks = rng.sample(range(len(records)), min(num_pairs, len(records)))
    pairs = []
    for n, i in enumerate(picks):
        record = records[i]
        pairs.append(
            {
                "prompt": prompt_text(record),
                "chosen": record["output"],
                "rejected": rejected(record, records, KINDS[n % len(KINDS)], rng),
            }
        )
    return pairs


def main() -> None:
    with open(SOURCE, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    pairs = make_pairs(records)
    with open(OUT, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    print(f"wrote {len(pairs)} pairs to {OUT}")


if __name__ == "__main__":
    main()
