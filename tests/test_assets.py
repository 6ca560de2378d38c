"""The shipped English -> French phrase set and the BPE tokenizer trained on it."""

import json
import re
from pathlib import Path

import pytest

import jft
from jft.tokenizer import SPECIAL_TOKENS, train_bpe_tokenizer

DATA = Path(jft.__file__).parent / "assets" / "en_fr.jsonl"

# Checked by hand: agreement, elision, conjugation, partitive after a negation, questions.
KNOWN_PAIRS = {
    "I am hungry.": "J'ai faim.",
    "We are hot.": "Nous avons chaud.",
    "An old man swims today.": "Un vieil homme nage aujourd'hui.",
    "There are two cats in the house.": "Il y a deux chats dans la maison.",
    "I do not have horses.": "Je n'ai pas de chevaux.",
    "The women do not have a cat.": "Les femmes n'ont pas de chat.",
    "Are the girls at home?": "Est-ce que les filles sont à la maison ?",
    "Where are my letters?": "Où sont mes lettres ?",
}


@pytest.fixture(scope="module")
def records():
    with open(DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def texts(records):
    return [v for r in records for v in r.values()]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_bpe_tokenizer(texts)


def test_records_are_plain_and_complete(records):
    assert 600 <= len(records) <= 1000
    for r in records:
        assert set(r) == {"instruction", "input", "output"}
        assert r["instruction"] == "Translate to French."
        assert r["input"].strip() == r["input"] and r["output"].strip() == r["output"]
        assert 3 <= len(r["input"].rstrip(".?").split()) <= 8
        assert r["input"][-1] in ".?" and r["output"][-1] in ".?"


def test_no_duplicates(records):
    inputs = [r["input"] for r in records]
    assert len(set(inputs)) == len(inputs)


def test_known_pairs_present(records):
    pairs = {r["input"]: r["output"] for r in records}
    for en, fr in KNOWN_PAIRS.items():
        assert pairs.get(en) == fr, en


def test_french_elision_and_questions(records):
    outputs = [r["output"] for r in records]
    # le/la/je/ne/que/de never stand before a vowel (or the silent h of "homme")
    missed = [o for o in outputs if re.search(r"\b(le|la|je|ne|que|de) [aeiouéèêâîôœh]", o, re.I)]
    assert not missed, missed[:5]
    for r in records:
        assert r["output"].endswith(" ?") == r["input"].endswith("?"), r


def test_vocabulary_is_small(records):
    words = lambda key: {w.lower() for r in records for w in re.findall(r"[\w-]+", r[key])}
    assert len(words("input")) <= 200
    assert len(words("output")) <= 260


def test_tokenizer_round_trips_every_sentence(tokenizer, texts):
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    prompt = "### Instruction:\nTranslate to French.\n\n### Input:\nThe cat is big.\n\n### Response:\n"
    assert tokenizer.decode(tokenizer.encode(prompt)) == prompt  # unseen characters survive too


def test_tokenizer_special_tokens_and_size(tokenizer, texts):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert len(tokenizer) <= 1024
    ids = tokenizer("Le chat dort.")["input_ids"]  # add_special_tokens=True by default
    assert not set(ids) & {0, 1, 2, 3}
    # a small vocabulary covers the corpus: most words are one token
    assert sum(len(tokenizer.encode(t)) for t in texts) / len(texts) < 8


def test_tokenizer_is_deterministic(tokenizer, texts):
    again = train_bpe_tokenizer(texts)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_saves_and_loads(texts, tmp_path):
    train_bpe_tokenizer(texts[:200], tmp_path, vocab_size=400)
    loaded = jft.load_tokenizer(tmp_path)
    assert len(loaded) <= 400
    for text in ("Où est le chat ?", "Est-ce qu'elle a soif ?", "Les sœurs mangent des œufs."):
        assert loaded.decode(loaded.encode(text)) == text
    assert loaded.encode("Le chat.", add_special_tokens=True) == loaded.encode("Le chat.", add_special_tokens=False)


def test_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["a b"], vocab_size=100)
    with pytest.raises(ValueError, match="non-empty"):
        train_bpe_tokenizer(["", ""])
