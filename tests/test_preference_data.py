"""Preference pairs: token layout, conversational prompts, margins, over-long pairs, errors, the shipped demo set."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

import jft
from jft.data import DataError, load_records, tokenize_pairs
from jft.data.formats import COMPACT, encode_kinds
from jft.data.preference import PAIR_KEYS, encode_pair

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0-5
WORDS = "translate to french : hello world bonjour le monde salut USER ASSISTANT SYSTEM ; be brief LAST".split()
ID = {w: i for i, w in enumerate(SPECIALS + WORDS)}  # translate 6, ..., LAST 22
# Each message "ROLE : content ;", then "ASSISTANT :" as the generation prompt; renders no BOS or EOS.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }} : {{ m['content'] }} ; {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
# Renders BOS and ends each assistant turn with EOS itself.
EOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }} : {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} {{ eos_token }}{% endif %} ; {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
# Marks the last message, so a prompt renders differently once the answer follows it.
LAST_TEMPLATE = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }} ; {% endfor %}"

PAIR = {"prompt": "translate to french : hello world", "chosen": "bonjour le monde", "rejected": "salut"}
USER = {"role": "user", "content": "hello"}
SYSTEM = {"role": "system", "content": "be brief"}
BONJOUR = {"role": "assistant", "content": "bonjour"}
SALUT = {"role": "assistant", "content": "salut"}


def word_tokenizer(bos="<s>", chat_template=None, adds_bos=False):
    """A WordLevel tokenizer over WORDS (whitespace and punctuation split), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:  # like most hub tokenizers: encode() puts BOS first by default
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ID["<s>"])])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    out.chat_template = chat_template
    return out


TOK = word_tokenizer()


def ids(text):
    return [ID[w] for w in text.split()]


def one(record, tok=TOK, max_length=12, **kw):
    rows, stats = tokenize_pairs([("p.jsonl:1", record)], tok, max_length, **kw)
    assert stats.kept == 1
    return rows[0]


# ---------------------------------------------------------------------------- layout


def test_layout_with_bos():
    row = one(PAIR)
    assert sorted(row) == sorted(PAIR_KEYS)
    # <s> translate to french : hello world | bonjour le monde </s>  and  ... | salut </s>
    np.testing.assert_array_equal(row["input_ids"][0], [2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 3, 0])
    np.testing.assert_array_equal(row["input_ids"][1], [2, 6, 7, 8, 9, 10, 11, 15, 3, 0, 0, 0])
    np.testing.assert_array_equal(row["attention_mask"], [[1] * 11 + [0], [1] * 9 + [0] * 3])
    np.testing.assert_array_equal(row["targets"][0], [6, 7, 8, 9, 10, 11, 12, 13, 14, 3, 0, 0])
    np.testing.assert_array_equal(row["targets"][1], [6, 7, 8, 9, 10, 11, 15, 3, 0, 0, 0, 0])
    # Weight 1 where the target is bonjour / le / monde / </s>, or salut / </s>.
    np.testing.assert_array_equal(row["loss_weights"][0], [0] * 6 + [1] * 4 + [0] * 2)
    np.testing.assert_array_equal(row["loss_weights"][1], [0] * 6 + [1] * 2 + [0] * 4)
    for key, dtype in [("input_ids", np.int32), ("attention_mask", np.int32), ("targets", np.int32)]:
        assert row[key].dtype == dtype and row[key].shape == (2, 12)
    assert row["loss_weights"].dtype == np.float32
    assert row["margin"].dtype == np.float32 and row["margin"] == 0 and row["weight"] == 1


def test_layout_without_bos():
    row = one(PAIR, tok=word_tokenizer(bos=None))
    np.testing.assert_array_equal(row["input_ids"][0], [6, 7, 8, 9, 10, 11, 12, 13, 14, 3, 0, 0])
    np.testing.assert_array_equal(row["targets"][0], [7, 8, 9, 10, 11, 12, 13, 14, 3, 0, 0, 0])
    np.testing.assert_array_equal(row["loss_weights"][0], [0] * 5 + [1] * 4 + [0] * 3)
    np.testing.assert_array_equal(row["targets"][1], [7, 8, 9, 10, 11, 15, 3, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["loss_weights"][1], [0] * 5 + [1] * 2 + [0] * 5)


def test_response_log_probability():
    """sum(log p(targets) * loss_weights) over the row is log p(response | prompt), EOS included."""
    row = one(PAIR)
    logp = np.log(np.random.default_rng(0).dirichlet(np.ones(len(ID)), size=12))  # [positions, vocab]
    side = row["input_ids"][0]
    got = (logp[np.arange(12), row["targets"][0]] * row["loss_weights"][0]).sum()
    # Prompt <s> + 6 words (positions 0-6); response tokens at 7-10 are predicted from positions 6-9.
    want = sum(logp[i - 1, side[i]] for i in range(7, 11))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(
    "adds_bos, rule, first",
    [(False, "always", [2, 6]), (False, "tokenizer", [6, 7]), (True, "tokenizer", [2, 6]), (True, "always", [2, 6])],
)
def test_bos_rules(adds_bos, rule, first):
    prompt_ids, chosen, _ = encode_pair(PAIR, word_tokenizer(adds_bos=adds_bos), bos=rule)
    assert prompt_ids[:2] == first and prompt_ids.count(2) == (first[0] == 2)  # BOS at most once
    assert chosen == [12, 13, 14, 3]


def test_matches_sft_encoding():
    """The chosen side is tokenized exactly as SFT data tokenizes the same prompt and answer."""
    prompt_ids, chosen, _ = encode_pair(PAIR, TOK)
    record = {"prompt": PAIR["prompt"], "completion": PAIR["chosen"]}
    sft_ids, kinds = encode_kinds(record, TOK)
    assert prompt_ids + chosen == sft_ids
    assert kinds.count(2) == len(chosen)  # RESPONSE kinds: the response tokens and EOS


# ---------------------------------------------------------------------------- conversations


def chat_ids(text):  # the template's text, BOS first (the template renders none)
    return [2, *ids(text)]


def test_conversation_explicit_prompt():
    tok = word_tokenizer(chat_template=TEMPLATE)
    record = {"prompt": [SYSTEM, USER], "chosen": [BONJOUR], "rejected": [SALUT]}
    prompt_ids, chosen, rejected = encode_pair(record, tok)
    assert prompt_ids == chat_ids("SYSTEM : be brief ; USER : hello ; ASSISTANT :")
    assert chosen == ids("bonjour ;") + [3]
    assert rejected == ids("salut ;") + [3]
    row = one(record, tok=tok, max_length=16)
    n = len(prompt_ids)
    np.testing.assert_array_equal(row["input_ids"][0][: n + 3], prompt_ids + chosen)
    np.testing.assert_array_equal(row["loss_weights"][0], [0] * (n - 1) + [1] * 3 + [0] * (16 - n - 2))


def test_conversation_implicit_prompt():
    """Without a prompt, the messages both sides start with are the prompt."""
    tok = word_tokenizer(chat_template=TEMPLATE)
    explicit = {"prompt": [SYSTEM, USER], "chosen": [BONJOUR], "rejected": [SALUT]}
    implicit = {"chosen": [SYSTEM, USER, BONJOUR], "rejected": [SYSTEM, USER, SALUT]}
    assert encode_pair(implicit, tok) == encode_pair(explicit, tok)
    # Shared turns beyond the first user message belong to the prompt too.
    turns = [USER, BONJOUR, {"role": "user", "content": "hello world"}]
    prompt_ids, chosen, rejected = encode_pair({"chosen": [*turns, BONJOUR], "rejected": [*turns, SALUT]}, tok)
    assert prompt_ids == chat_ids("USER : hello ; ASSISTANT : bonjour ; USER : hello world ; ASSISTANT :")
    assert (chosen, rejected) == (ids("bonjour ;") + [3], ids("salut ;") + [3])


def test_conversation_template_bos_and_eos_not_doubled():
    tok = word_tokenizer(chat_template=EOS_TEMPLATE)
    prompt_ids, chosen, rejected = encode_pair({"prompt": [USER], "chosen": [BONJOUR], "rejected": [SALUT]}, tok)
    assert prompt_ids == chat_ids("USER : hello ; ASSISTANT :")
    assert chosen == [ID["bonjour"], 3, ID[";"]] and rejected == [ID["salut"], 3, ID[";"]]


def test_chat_template_argument_and_chatml_fallback():
    record = {"prompt": [USER], "chosen": [BONJOUR], "rejected": [SALUT]}
    with_arg = encode_pair(record, TOK, chat_template=TEMPLATE)
    assert with_arg == encode_pair(record, word_tokenizer(chat_template=TEMPLATE))
    # No template anywhere: ChatML, whose end-of-turn marker is not EOS, so EOS follows it.
    prompt_ids, chosen, _ = encode_pair(record, TOK)
    assert prompt_ids == [2, 4, ID["<unk>"], ID["hello"], 5, 4, ID["<unk>"]]  # "user"/"assistant" are unknown
    assert chosen == [ID["bonjour"], 5, 3]


# ---------------------------------------------------------------------------- margin, over-long pairs


def test_margin():
    assert one({**PAIR, "margin": 0.5})["margin"] == np.float32(0.5)
    assert one({**PAIR, "margin": 2})["margin"] == np.float32(2.0)
    assert one({**PAIR, "margin": None})["margin"] == 0
    for bad in ("big", True, float("nan")):
        with pytest.raises(DataError, match=r"p\.jsonl:1: field 'margin'"):
            one({**PAIR, "margin": bad})


LONG_PROMPT = {**PAIR, "prompt": "translate to french : hello world hello world hello world hello"}  # 12 with BOS
LONG_CHOSEN = {**PAIR, "chosen": "bonjour le monde le monde"}  # 7 + 6 = 13 tokens


def test_drop_counts():
    pairs = [(f"p.jsonl:{i}", r) for i, r in enumerate([PAIR, LONG_CHOSEN, LONG_PROMPT, PAIR], 1)]
    rows, stats = tokenize_pairs(pairs, TOK, 12, overlong="drop")
    assert len(rows) == 2
    assert (stats.records, stats.kept, stats.dropped, stats.truncated, stats.no_response) == (4, 2, 2, 0, 0)
    assert stats.tokens == 2 * (11 + 9)
    assert str(stats) == "4 pairs, 2 kept, 0 truncated, 2 dropped (0 with no response within max_length), 40 tokens"


def test_truncate_counts_and_layout():
    pairs = [(f"p.jsonl:{i}", r) for i, r in enumerate([PAIR, LONG_CHOSEN, LONG_PROMPT], 1)]
    rows, stats = tokenize_pairs(pairs, TOK, 12, overlong="truncate")
    assert (stats.records, stats.kept, stats.dropped, stats.truncated, stats.no_response) == (3, 2, 1, 1, 1)
    row = rows[1]  # chosen cut to its first 12 tokens: no EOS; rejected whole
    np.testing.assert_array_equal(row["input_ids"][0], [2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 13, 14])
    np.testing.assert_array_equal(row["targets"][0], [6, 7, 8, 9, 10, 11, 12, 13, 14, 13, 14, 0])
    np.testing.assert_array_equal(row["loss_weights"][0], [0] * 6 + [1] * 5 + [0])
    np.testing.assert_array_equal(row["input_ids"][1], [2, 6, 7, 8, 9, 10, 11, 15, 3, 0, 0, 0])
    assert stats.tokens == 20 + 12 + 9


def test_prompt_one_short_of_max_length_is_kept():
    """A prompt of max_length - 1 tokens leaves room for one response token, the only weighted target."""
    row = one(LONG_PROMPT, max_length=13, overlong="truncate")
    np.testing.assert_array_equal(row["loss_weights"], [[0] * 11 + [1, 0]] * 2)
    np.testing.assert_array_equal(row["targets"][:, 11], [ID["bonjour"], ID["salut"]])


# ---------------------------------------------------------------------------- errors


def errors_of(tmp_path, *records):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path, load_records(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "hello", "chosen": "bonjour"}, r"no 'rejected' field.*\['chosen', 'prompt'\].*either \{'prompt'"),
        ({"prompt": "hello", "chosen": 3, "rejected": "salut"}, r"'chosen' is a int and field 'rejected' is a str"),
        ({"chosen": "bonjour", "rejected": "salut"}, r"field 'prompt' is missing, but chosen/rejected are strings"),
        ({"prompt": "hello", "chosen": [BONJOUR], "rejected": [SALUT]}, r"'prompt' is a str, but .* message lists"),
        ({"chosen": [USER, {"role": "assistant"}], "rejected": [SALUT]}, r"'chosen' message 1 must be"),
        ({"chosen": [], "rejected": [SALUT]}, r"'chosen' is an empty message list"),
        ({"prompt": [USER], "chosen": [BONJOUR, USER], "rejected": [SALUT]}, r"'chosen' ends with a 'user' message"),
        ({"chosen": [USER, BONJOUR], "rejected": [USER, BONJOUR]}, r"'chosen' has no messages beyond"),
    ],
)
def test_bad_records(tmp_path, record, message):
    path, pairs = errors_of(tmp_path, PAIR, record)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: .*{message}"):
        tokenize_pairs(pairs, TOK, 16)


def test_template_that_does_not_render_incrementally(tmp_path):
    path, pairs = errors_of(tmp_path, {"prompt": [USER], "chosen": [BONJOUR], "rejected": [SALUT]})
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:1: .*not how the whole chosen conversation starts"):
        tokenize_pairs(pairs, TOK, 16, chat_template=LAST_TEMPLATE)


def test_vocab_size_and_arguments(tmp_path):
    path, pairs = errors_of(tmp_path, PAIR)
    tokenize_pairs(pairs, TOK, 16, vocab_size=len(ID))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:1: token id 15 >= the model's vocab_size 15"):
        tokenize_pairs(pairs, TOK, 16, vocab_size=15)  # salut is id 15
    with pytest.raises(DataError, match="overlong='cut'"):
        tokenize_pairs(pairs, TOK, 16, overlong="cut")
    with pytest.raises(DataError, match=rf"all 1 pairs were dropped \(the first: {re.escape(str(path))}:1"):
        tokenize_pairs(pairs, TOK, 8)


# ---------------------------------------------------------------------------- the shipped demo set

ASSETS = Path(jft.__file__).parent / "assets"


def test_demo_pairs_follow_the_quickstart_records():
    """Prompts are en_fr records rendered by the quickstart's compact template; chosen is their answer."""
    records = [json.loads(line) for line in (ASSETS / "en_fr.jsonl").open(encoding="utf-8")]
    answers = {COMPACT.prompt_with_input.format(**r): r["output"] for r in records}
    pairs = load_records(ASSETS / "en_fr_preferences.jsonl")
    assert 100 <= len(pairs) <= 500
    assert len({r["prompt"] for _, r in pairs}) == len(pairs)
    for where, pair in pairs:
        assert sorted(pair) == ["chosen", "prompt", "rejected"], where
        assert answers[pair["prompt"]] == pair["chosen"], where
        assert pair["rejected"] != pair["chosen"], where
    copies = sum(pair["rejected"] in pair["prompt"] for _, pair in pairs)
    assert 0.1 * len(pairs) < copies < 0.5 * len(pairs)  # English copied back is one kind of four


def test_demo_script_reproduces_the_asset():
    spec = importlib.util.spec_from_file_location(
        "make_preference_demo", Path(__file__).parents[1] / "scripts" / "make_preference_demo.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    records = [json.loads(line) for line in (ASSETS / "en_fr.jsonl").open(encoding="utf-8")]
    shipped = [json.loads(line) for line in (ASSETS / "en_fr_preferences.jsonl").open(encoding="utf-8")]
    assert script.make_pairs(records) == shipped


def test_demo_pairs_tokenize_as_sft_sees_them():
    """With the quickstart's data-trained tokenizer, the chosen side is the SFT example of the same record."""
    from jft.tokenizer import train_bpe_tokenizer

    records = [json.loads(line) for line in (ASSETS / "en_fr.jsonl").open(encoding="utf-8")]
    tok = train_bpe_tokenizer([v for r in records for v in r.values()])
    by_prompt = {COMPACT.prompt_with_input.format(**r): r for r in records}
    pairs = load_records(ASSETS / "en_fr_preferences.jsonl")[:20]
    rows, stats = tokenize_pairs(pairs, tok, 64, vocab_size=len(tok))
    assert stats.kept == 20
    for (_, pair), row in zip(pairs, rows, strict=True):
        sft_ids, kinds = encode_kinds(by_prompt[pair["prompt"]], tok, template=COMPACT)
        n = len(sft_ids)
        np.testing.assert_array_equal(row["input_ids"][0, :n], sft_ids)
        assert row["attention_mask"][0].sum() == n
        np.testing.assert_array_equal(row["loss_weights"][0, : n - 1], np.asarray(kinds[1:]) == 2)
