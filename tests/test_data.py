"""Data pipeline: record formats -> tokens + weights, loading errors, packing, resumable batches."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.data import (
    ALPACA,
    SIMPLE,
    Batches,
    DataError,
    encode,
    in_batches,
    load_records,
    pack,
    prompt_and_reference,
    prompt_ids,
    split_validation,
    tokenize_records,
)
from jft.data.formats import render

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "### : , . Below is an instruction that describes a task paired with input provides further context Write "
    "response appropriately completes the request Instruction Input Response translate to french hello world "
    "bonjour le monde cat chat system user assistant SYSTEM USER ASSISTANT You are helpful thanks merci"
).split()
# A template that renders BOS itself and ends each assistant turn with EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }} : {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} {{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
INSTRUCTION = {"instruction": "translate to french", "input": "hello world", "output": "bonjour le monde"}
CHAT = {
    "messages": [
        {"role": "system", "content": "You are helpful"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "bonjour"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "merci"},
    ]
}


def word_tokenizer(chat_template=None, eos="</s>"):
    """A WordLevel tokenizer over WORDS (whitespace and punctuation split), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    out.chat_template = chat_template
    return out


TOK = word_tokenizer()


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


# ---------------------------------------------------------------------------- formats


def test_alpaca_text():
    _, pieces = render(INSTRUCTION, TOK, ALPACA)
    assert pieces[0][0] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\ntranslate to french\n\n"
        "### Input:\nhello world\n\n### Response:\n"
    )
    assert pieces[1][0] == "bonjour le monde"
    _, pieces = render({**INSTRUCTION, "input": ""}, TOK, ALPACA)
    assert pieces[0][0] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\ntranslate to french\n\n### Response:\n"
    )
    ids, _ = encode(INSTRUCTION, TOK, template=ALPACA)
    assert TOK.unk_token_id not in ids


def test_instruction_tokens_and_weights():
    ids, weights = encode(INSTRUCTION, TOK, template=SIMPLE, prompt_loss_weight=0.1, response_loss_weight=1.0)
    prompt = "### Instruction : translate to french ### Input : hello world ### Response :".split()
    assert tokens(TOK, ids) == ["<s>", *prompt, "bonjour", "le", "monde", "</s>"]
    np.testing.assert_allclose(weights, [0.0] + [0.1] * len(prompt) + [1.0] * 4)
    # no input: the input block disappears
    ids, _ = encode({"instruction": "translate to french", "output": "bonjour"}, TOK, template=SIMPLE)
    assert tokens(TOK, ids) == "<s> ### Instruction : translate to french ### Response : bonjour </s>".split()


def test_bos_once_when_the_tokenizer_adds_its_own():
    from tokenizers import processors

    tok = word_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    assert tok("hello")["input_ids"] == [2, tok.convert_tokens_to_ids("hello")]
    ids, _ = encode({"text": "hello"}, tok)
    assert tokens(tok, ids) == ["<s>", "hello", "</s>"]


def test_prompt_completion_is_completion_only_with_zero_prompt_weight():
    ids, weights = encode({"prompt": "hello world", "completion": "bonjour le monde"}, TOK, prompt_loss_weight=0.0)
    assert tokens(TOK, ids) == "<s> hello world bonjour le monde </s>".split()
    assert weights == [0, 0, 0, 1, 1, 1, 1]


def test_text_format_is_all_response():
    ids, weights = encode({"text": "hello world"}, TOK, prompt_loss_weight=0.0, response_loss_weight=0.5)
    assert tokens(TOK, ids) == "<s> hello world </s>".split()
    assert weights == [0, 0.5, 0.5, 0.5]


def test_forced_format_and_detection_errors():
    record = {"prompt": "hello", "completion": "monde", "text": "cat"}
    assert tokens(TOK, encode(record, TOK)[0]) == "<s> hello monde </s>".split()
    assert tokens(TOK, encode(record, TOK, fmt="text")[0]) == "<s> cat </s>".split()
    with pytest.raises(DataError, match=r"a\.jsonl:3: record has none of the fields"):
        encode({"question": "hello"}, TOK, where="a.jsonl:3")
    with pytest.raises(DataError, match=r"x:1: field 'output' is a int, expected a string"):
        encode({"instruction": "hello", "output": 3}, TOK, where="x:1")


def test_chat_with_tokenizer_template():
    tok = word_tokenizer(CHAT_TEMPLATE)
    ids, weights = encode(CHAT, tok, prompt_loss_weight=0.0, response_loss_weight=1.0)
    # BOS comes from the template, once; each assistant turn ends in the template's EOS.
    expected = "<s> SYSTEM : You are helpful USER : hello ASSISTANT : bonjour </s> USER : thanks ASSISTANT : merci </s>"
    assert tokens(tok, ids) == expected.split()
    trained = [t for t, w in zip(tokens(tok, ids), weights, strict=True) if w > 0]
    assert trained == ["bonjour", "</s>", "merci", "</s>"]


def test_chat_with_chatml_fallback():
    ids, weights = encode(CHAT, TOK, prompt_loss_weight=0.25)
    turn = lambda role, *words: ["<|im_start|>", role, *words, "<|im_end|>"]
    expected = [
        "<s>",
        *turn("system", "You", "are", "helpful"),
        *turn("user", "hello"),
        *turn("assistant", "bonjour"),
        *turn("user", "thanks"),
        *turn("assistant", "merci"),
        "</s>",  # the tokenizer's EOS is not ChatML's end of turn, so it closes the sequence
    ]
    assert tokens(TOK, ids) == expected
    response = [t for t, w in zip(tokens(TOK, ids), weights, strict=True) if w == 1.0]
    assert response == ["bonjour", "<|im_end|>", "merci", "<|im_end|>", "</s>"]
    assert weights[0] == 0 and set(weights[1:]) == {0.25, 1.0}
    # When EOS is the end-of-turn marker, nothing is appended.
    tok = word_tokenizer(eos="<|im_end|>")
    ids, _ = encode(CHAT, tok)
    assert tokens(tok, ids)[-3:] == ["assistant", "merci", "<|im_end|>"]


def test_chat_errors():
    with pytest.raises(DataError, match="no assistant message"):
        encode({"messages": [{"role": "user", "content": "hello"}]}, TOK)
    with pytest.raises(DataError, match=r"f:2: message 0 must be"):
        encode({"messages": [{"role": "bot", "content": "hello"}]}, TOK, where="f:2")


def test_prompt_for_generation_matches_training_prefix():
    chat_tok = word_tokenizer(CHAT_TEMPLATE)
    cases = [(INSTRUCTION, TOK, "bonjour le monde"), (CHAT, TOK, "merci"), (CHAT, chat_tok, "merci")]
    for record, tok, reference in cases:
        prompt, ref = prompt_and_reference(record, tok, SIMPLE)
        assert ref == reference
        ids, weights = encode(record, tok, template=SIMPLE, prompt_loss_weight=0.0)
        p = prompt_ids(prompt, tok)
        words = reference.split()
        assert ids[: len(p)] == p and tokens(tok, ids[len(p) : len(p) + len(words)]) == words
        assert weights[len(p) - 1] == 0.0 and set(weights[len(p) :]) == {1.0}  # the rest is the last response
        assert p.count(tok.bos_token_id) == 1
    assert prompt_and_reference({"text": "hello"}, TOK) is None


# ---------------------------------------------------------------------------- loading


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    good = json.dumps(INSTRUCTION)
    f = _write(tmp_path / "train.jsonl", [good, "", '{"instruction": "hello",'])
    with pytest.raises(DataError, match=r"train\.jsonl:3: not valid JSON"):
        load_records(f)


def test_missing_field_names_file_line_and_field(tmp_path):
    f = _write(tmp_path / "train.jsonl", [json.dumps(INSTRUCTION), "", json.dumps({"instruction": "hello"})])
    pairs = load_records(f)
    assert [w for w, _ in pairs] == [f"{f}:1", f"{f}:3"]  # blank lines skipped, numbers kept
    message = r"train\.jsonl:3: record has no 'output' field \(instruction format needs instruction, output; input"
    with pytest.raises(DataError, match=message):
        tokenize_records(pairs, TOK, vocab_size=100, max_length=64)


def test_sources_and_empty_errors(tmp_path):
    _write(tmp_path / "a.jsonl", [json.dumps({"text": "hello"})])
    (tmp_path / "b.json").write_text(json.dumps([{"text": "world"}, {"text": "cat"}]))
    pairs = load_records(tmp_path)
    assert [r["text"] for _, r in pairs] == ["hello", "world", "cat"]
    assert pairs[2][0].endswith("b.json record 2")
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_records(empty)
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "c.json").write_text(json.dumps({"text": "hello"}))
    with pytest.raises(DataError, match="expected a JSON list"):
        load_records(tmp_path / "c.json")
    _write(tmp_path / "d.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"d\.jsonl:1: record is a list"):
        load_records(tmp_path / "d.jsonl")


def test_csv_and_parquet_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = _write(tmp_path / "t.csv", ["prompt,completion", "hello,monde", "cat,chat"])
    pq.write_table(pa.table({"text": ["hello world", "le chat"]}), tmp_path / "t.parquet")
    pairs = load_records(f)
    assert [r["completion"] for _, r in pairs] == ["monde", "chat"] and pairs[0][1]["prompt"] == "hello"
    assert pairs[1][0] == f"{f} row 2"
    assert [r["text"] for _, r in load_records(tmp_path / "t.parquet")] == ["hello world", "le chat"]


# ---------------------------------------------------------------------------- tokenize


def test_truncate_and_drop_counts():
    pairs = [("r1", {"prompt": "hello", "completion": "monde"}), ("r2", {"prompt": "hello " * 10, "completion": "le"})]
    examples, stats = tokenize_records(pairs, TOK, vocab_size=100, max_length=6, prompt_loss_weight=0.5)
    assert [len(ids) for ids, _ in examples] == [4, 7]
    assert (stats.records, stats.truncated, stats.dropped, stats.tokens) == (2, 1, 0, 11)
    assert examples[0][0].dtype == np.int32 and examples[0][1].dtype == np.float32
    examples, stats = tokenize_records(pairs, TOK, vocab_size=100, max_length=6, overlong="drop")
    assert len(examples) == 1 and (stats.truncated, stats.dropped, stats.response_tokens) == (0, 1, 2)
    # truncated to prompt tokens only, with prompt weight 0: nothing to learn, dropped
    examples, stats = tokenize_records(pairs, TOK, vocab_size=100, max_length=6, prompt_loss_weight=0.0)
    assert len(examples) == 1 and (stats.truncated, stats.dropped, stats.no_loss) == (1, 1, 1)
    with pytest.raises(DataError, match="all 1 records were dropped"):
        tokenize_records(pairs[1:], TOK, vocab_size=100, max_length=6, overlong="drop")


def test_vocab_too_small_for_tokenizer():
    message = r"r1: token id \d+ >= the model's vocab_size 10; the tokenizer \(\d+ tokens\) does not fit the model"
    with pytest.raises(DataError, match=message):
        tokenize_records([("r1", {"text": "monde"})], TOK, vocab_size=10, max_length=8)


def test_split_validation_is_deterministic():
    items = list(range(100))
    train, val = split_validation(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and train == sorted(train)
    assert split_validation(items, 0.1, seed=3) == (train, val)
    assert split_validation(items, 0.1, seed=4)[1] != val
    assert split_validation(items, 0.0, seed=3) == (items, [])
    assert len(split_validation(items[:3], 0.01, seed=0)[1]) == 1


# ---------------------------------------------------------------------------- packing


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(3, 256, n).astype(np.int32), rng.choice([0.0, 0.3, 1.0], n).astype(np.float32)) for n in lengths
    ]


def test_pack_layout():
    examples = _examples([5, 9, 13, 6])
    rows = pack(examples, 16)
    assert len(rows) == 3  # next-fit: [4 + 8], [12], [5]
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1] * 4 + [2] * 8 + [0] * 4)
    np.testing.assert_array_equal(rows[0]["positions"], [*range(4), *range(8), *[0] * 4])
    ids, w = examples[1]
    np.testing.assert_array_equal(rows[0]["input_ids"][4:12], ids[:-1])
    np.testing.assert_array_equal(rows[0]["targets"][4:12], ids[1:])
    np.testing.assert_array_equal(rows[0]["loss_weights"][4:12], w[1:])
    assert rows[0]["loss_weights"][12:].sum() == 0 and rows[0]["input_ids"][12:].sum() == 0
    assert {k: v.dtype for k, v in rows[0].items()} == {
        "input_ids": np.int32,
        "targets": np.int32,
        "loss_weights": np.float32,
        "segment_ids": np.int32,
        "positions": np.int32,
    }
    single = pack(examples, 16, packed=False)
    assert len(single) == 4 and all(set(r["segment_ids"].tolist()) == {0, 1} for r in single)
    with pytest.raises(DataError, match="does not fit seq_len 8"):
        pack(examples, 8)


def _loss_sums(logits, targets, weights):
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return nll * weights


def test_packed_row_gives_each_example_its_own_loss():
    model = jft.LlamaForCausalLM(jft.LlamaConfig.tiny(remat="none"))
    params = model.init_params(jax.random.key(0))
    examples = _examples([6, 11, 9])
    (row,) = pack(examples, 32)
    b = {k: jnp.asarray(v[None]) for k, v in row.items()}  # a batch of the one packed row
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, b["input_ids"], positions=b["positions"], segment_ids=b["segment_ids"])
    per_token = np.asarray(_loss_sums(logits, b["targets"], b["loss_weights"]))[0]
    # Each example alone in its own row: padding after it cannot change a causal model's outputs.
    alone = np.zeros((3, 12), np.int32)
    for i, (ids, _) in enumerate(examples):
        alone[i, : len(ids)] = ids
    alone_logits = apply({"params": params}, jnp.asarray(alone[:, :-1]))
    for segment, (ids, weights) in enumerate(examples, 1):
        n = len(ids) - 1
        expected = _loss_sums(alone_logits[segment - 1, None, :n], jnp.asarray(ids[None, 1:]), weights[None, 1:])
        packed = per_token[row["segment_ids"] == segment].sum()
        np.testing.assert_allclose(packed, float(expected.sum()), atol=1e-5)


# ---------------------------------------------------------------------------- batches


def _rows(n, seq_len=4):
    """Rows whose every entry is the row number, so a batch shows which rows it holds."""
    dtype = lambda k: np.float32 if k == "loss_weights" else np.int32
    return [{k: np.full(seq_len, i, dtype(k)) for k in jft.data.KEYS} for i in range(n)]


def _ids(batch):
    return batch["input_ids"][:, 0].tolist()


def test_batches_are_deterministic_per_seed_and_epoch():
    rows = _rows(10)
    a, b = Batches(rows, 3, seed=0), Batches(rows, 3, seed=0)
    assert a.steps_per_epoch == 3
    first = [_ids(next(a)) for _ in range(6)]
    assert first == [_ids(next(b)) for _ in range(6)]
    assert first[:3] != first[3:]  # another epoch, another order
    assert len(set(sum(first[:3], []))) == 9  # no row twice in an epoch
    assert [_ids(x) for x in Batches(rows, 3, seed=1).epoch_batches(0)] != first[:3]
    assert next(a)["input_ids"].shape == (3, 4) and a.state() == {"epoch": 2, "index": 1}
    ordered = Batches(rows, 4, seed=0, shuffle=False, drop_remainder=False)
    assert [_ids(x) for x in ordered.epoch_batches(0)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
    assert ordered.batch(0, 2)["loss_weights"][2:].sum() == 0  # the remainder is padded with empty rows


@pytest.mark.parametrize("consumed", [2, 3, 4, 7])  # mid-epoch, at and across the epoch boundary
def test_batches_resume_exactly(consumed):
    rows = _rows(10)
    unbroken = Batches(rows, 3, seed=5)
    expected = [_ids(next(unbroken)) for _ in range(10)]
    first = Batches(rows, 3, seed=5)
    for _ in range(consumed):
        next(first)
    saved = json.loads(json.dumps(first.state()))
    resumed = Batches(rows, 3, seed=5)
    resumed.restore(saved)
    assert [_ids(next(resumed)) for _ in range(10 - consumed)] == expected[consumed:]


def test_batches_errors():
    with pytest.raises(DataError, match="2 rows of data is fewer than batch_size 3"):
        Batches(_rows(2), 3, seed=0)
    with pytest.raises(DataError, match="does not fit 3 batches per epoch"):
        Batches(_rows(10), 3, seed=0).restore({"epoch": 0, "index": 5})


def test_in_batches_visits_every_row_once_and_pads_the_last_with_zero_weight():
    rows = [{"input_ids": np.full(4, i, np.int32), "loss_weights": np.ones(4, np.float32)} for i in range(5)]
    got = list(in_batches(rows, 2))
    assert [real for _, real in got] == [2, 2, 1]
    assert all(b["input_ids"].shape == (2, 4) for b, _ in got)  # one shape: one compiled program
    assert np.concatenate([b["input_ids"][:real, 0] for b, real in got]).tolist() == [0, 1, 2, 3, 4]
    assert got[-1][0]["loss_weights"][1].sum() == 0  # the filler row weighs nothing
