"""Sequence-level distillation (jft.distill, `jft distill`): prompts -> teacher answers -> SFT records ->
the student. The teacher is a tiny Llama wired as a bigram model over a word-level vocabulary: it
continues "a" with "b c d e f g h" and EOS, so what it writes is known exactly."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import jft
from jft import data as jdata
from jft import distill as jd
from jft.config import ConfigError, load_config
from jft.data import DataError
from jft.train import TrainingError

WORDS = ["<unk>", "<s>", "</s>", "<pad>", *"abcdefghijkl"]  # ids 0-15
CHAIN = "abcdefgh"  # the teacher continues each letter of the chain with the next one; "h" with EOS
CONFIG = str(Path(__file__).parent.parent / "configs" / "distill_llama.py")


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def next_word(i: int) -> int:
    """The teacher's answer to token ``i``: the next letter of the chain, EOS after "h", else "a"."""
    word = WORDS[i]
    if word in CHAIN:
        return WORDS.index(CHAIN[CHAIN.index(word) + 1]) if word != CHAIN[-1] else 2
    return WORDS.index("a")


def bigram_teacher(folder, strength: float):
    """Save a 2-layer Llama whose next token depends on the last one only (one-hot embeddings, an
    lm_head row per token): logit ``strength * sqrt(hidden)`` for :func:`next_word`, about 0 for the rest."""
    config = jft.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=1,
        eos_token_id=(2,),
        pad_token_id=3,
    )
    model = jft.LlamaForCausalLM(config)
    rng = np.random.default_rng(0)

    def init(path, x):  # as HF initialises: norms 1, matrices normal(0, 0.02)
        return (
            np.ones(x.shape, np.float32) if path[-1].key == "scale" else rng.normal(0, 0.02, x.shape).astype(np.float32)
        )

    params = jax.tree_util.tree_map_with_path(init, model.param_shapes())
    embed = np.zeros((len(WORDS), 32), np.float32)
    embed[np.arange(len(WORDS)), np.arange(len(WORDS))] = 1.0
    head = np.zeros((32, len(WORDS)), np.float32)
    for i in range(len(WORDS)):
        head[i, next_word(i)] = strength
    params["model"]["embed_tokens"]["embedding"] = embed
    params["lm_head"]["kernel"] = head
    jft.save_hf(model, params, folder, tokenizer=word_tokenizer())
    return folder


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """``{"sharp": folder, "soft": folder}``: the bigram teacher nearly deterministic, and one whose
    top answer has probability ~0.4 (so sampled answers differ)."""
    root = tmp_path_factory.mktemp("teachers")
    return {"sharp": bigram_teacher(root / "sharp", 4.0), "soft": bigram_teacher(root / "soft", 0.4)}


def config(teacher, prompts, *over):
    return load_config(
        CONFIG,
        [
            f"distill.teacher={teacher}",
            f"distill.prompts={prompts}",
            "model.path=",
            "model.dtype=float32",
            "model.compute_dtype=float32",
            "optim.bf16_update=none",
            "peft.methods=()",
            *over,
        ],
    )


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def letters(rng, n, alphabet="abcdefghijkl"):
    return " ".join(rng.choice(list(alphabet), n))


PROMPTS = [
    {"instruction": "Continue.", "input": "k l", "output": "ignored"},  # ends in "Output:" (unknown words)
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}]},  # x is dropped
    {"prompt": "j k f"},  # ends in "f": answer "g h"
    {"prompt": [{"role": "user", "content": "b"}]},  # a conversational prompt: answered as a chat record
]


# ---------------------------------------------------------------------------- prompts and records


def test_prompts_in_each_form_and_the_chat_turn_dropped():
    tok = word_tokenizer()
    pairs = [(f"p.jsonl:{i}", r) for i, r in enumerate(PROMPTS, 1)] + [("p.jsonl:5", {"prompt": "a " * 30})]
    items, stats = jd.read_prompts(pairs, tok, max_length=20, template=jdata.TEMPLATES["compact"])
    assert (stats.records, stats.kept, stats.dropped) == (5, 4, 1)  # the 31-token prompt is too long
    assert [p.index for p in items] == [0, 1, 2, 3] and items[1].where == "p.jsonl:2"
    assert items[0].part == {"instruction": "Continue.", "input": "k l"}
    assert items[1].part == {"messages": [{"role": "user", "content": "a"}]}  # before the last assistant turn
    assert items[2].part == {"prompt": "j k f"} and items[2].ids.tolist() == [1, 13, 14, 9]
    assert items[3].part == {"messages": [{"role": "user", "content": "b"}]}
    # split_prompt keeps its forms and names the record it cannot read
    with pytest.raises(DataError, match="p.jsonl:9: record has no 'prompt' or 'instruction' field, nor 'messages'"):
        jd.read_prompts([("p.jsonl:9", {"text": "a"})], tok, max_length=20)
    only_answer = {"messages": [{"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match="no message before its last assistant turn"):
        jd.read_prompts([("p.jsonl:9", only_answer)], tok, max_length=20)


def test_generated_records_keep_the_prompt_form_and_tokenize_for_sft(teachers, tmp_path):
    """Greedy answers, exactly the bigram's; the records (with provenance) read by the SFT pipeline."""
    cfg = config(teachers["sharp"], "")
    model, params, tok = jd.load_teacher(cfg)
    pairs = [(f"p.jsonl:{i}", r) for i, r in enumerate(PROMPTS, 1)]
    items, _ = jd.read_prompts(pairs, tok, max_length=20, template=jdata.TEMPLATES["compact"])
    out = tmp_path / "gen.jsonl"
    made = jd.generate_responses(
        model, params, tok, items, out, max_new_tokens=12, batch_size=4, settings={"teacher": "T"}, progress=False
    )
    assert (made["lines"], made["new_lines"]) == (4, 4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["record"] for r in rows][0]["output"] == "a b c d e f g h"
    records = [{k: v for k, v in r["record"].items() if k != "provenance"} for r in rows]
    assert records == [
        {"instruction": "Continue.", "input": "k l", "output": "a b c d e f g h"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "a b c d e f g h"}]},
        {"prompt": "j k f", "completion": "g h"},
        {"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "a b c d e f g h"}]},
    ]
    assert [(r["eos"], r["tokens"]) for r in rows] == [(True, 9), (True, 9), (True, 3), (True, 9)]
    assert rows[2]["record"]["provenance"] == {
        "teacher": "T",
        "adapter": None,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "max_new_tokens": 12,
        "seed": 0,
        "source": "p.jsonl:3",
        "sample": 0,
    }
    counts = jd.filter_generations(out, tmp_path / "data.jsonl")
    assert counts == {"generated": 4, "kept": 4, "dropped": {"empty": 0, "truncated": 0, "duplicate": 0}}
    pairs = jdata.load_records(tmp_path / "data.jsonl")
    examples, stats = jdata.tokenize_records(
        pairs, tok, vocab_size=len(WORDS), max_length=32, template=jdata.TEMPLATES["compact"]
    )
    assert (stats.records, stats.dropped) == (4, 0)
    ids, weights = examples[2]  # BOS "j k f" "g h" EOS: the answer (and EOS) is what trains
    assert ids.tolist() == [1, 13, 14, 9, 10, 11, 2] and weights.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_filters_count_empty_truncated_and_duplicate_answers(teachers, tmp_path):
    """Greedy with 2 samples: every second answer is a duplicate; "h" is answered with EOS alone
    (empty), "a" needs 8 tokens and EOS (truncated at 4), "f" is "g h" EOS."""
    model, params, tok = jd.load_teacher(config(teachers["sharp"], ""))
    pairs = [(f"p:{i}", {"prompt": p}) for i, p in enumerate(["k h", "k a", "k f"], 1)]
    items, _ = jd.read_prompts(pairs, tok, max_length=20)
    out = tmp_path / "gen.jsonl"
    jd.generate_responses(model, params, tok, items, out, num_samples=2, max_new_tokens=4, batch_size=2, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["sample"], r["eos"]) for r in rows] == [
        (0, 0, True),
        (0, 1, True),
        (1, 0, False),
        (1, 1, False),
        (2, 0, True),
        (2, 1, True),
    ]
    counts = jd.filter_generations(out, tmp_path / "data.jsonl")
    assert counts == {"generated": 6, "kept": 1, "dropped": {"empty": 2, "truncated": 2, "duplicate": 1}}
    assert jdata.load_records(tmp_path / "data.jsonl")[0][1]["completion"] == "g h"
    kept = jd.filter_generations(out, tmp_path / "all.jsonl", drop_empty=False, drop_truncated=False)
    assert kept == {"generated": 6, "kept": 3, "dropped": {"empty": 0, "truncated": 0, "duplicate": 3}}
    none = dict(drop_empty=False, drop_truncated=False, drop_duplicates=False)
    assert jd.filter_generations(out, tmp_path / "all.jsonl", **none)["kept"] == 6


# ---------------------------------------------------------------------------- resume


def _sampled(teacher, tmp_path, n=7):
    model, params, tok = jd.load_teacher(config(teacher, ""))
    rng = np.random.default_rng(0)
    pairs = [(f"p:{i}", {"prompt": letters(rng, 3)}) for i in range(n)]
    items, _ = jd.read_prompts(pairs, tok, max_length=20)
    settings = {"teacher": str(teacher), "adapter": None}
    kw = dict(num_samples=2, max_new_tokens=6, temperature=1.0, top_k=8, seed=3, batch_size=2, settings=settings)

    def run(path, **more):
        return jd.generate_responses(model, params, tok, items, path, progress=False, **kw | more)

    run.teacher, run.kw = (model, params, tok), kw
    return run, items


def test_resumed_generation_writes_what_an_uninterrupted_run_writes(teachers, tmp_path):
    run, items = _sampled(teachers["soft"], tmp_path)
    straight = tmp_path / "a" / "gen.jsonl"
    assert run(straight)["lines"] == 14  # 7 prompts x 2 samples, in 4 batches of 2 prompts
    lines = straight.read_bytes().splitlines(keepends=True)
    texts = [json.loads(line)["record"]["completion"] for line in lines]
    assert len(set(texts)) > 7  # sampled: the two answers to a prompt mostly differ
    broken = tmp_path / "b" / "gen.jsonl"
    first = run(broken, stop_after=1)  # 1 batch, then "killed" halfway through writing the next one
    assert (first["lines"], first["new_lines"]) == (4, 4)
    with open(broken, "ab") as f:
        f.write(lines[4] + lines[5][:20])  # one complete line of batch 2, one torn line
    resumed = run(broken)
    assert (resumed["resumed_lines"], resumed["new_lines"]) == (4, 10)  # batch 2 again, from its first prompt
    assert broken.read_bytes() == straight.read_bytes()
    assert run(broken)["new_lines"] == 0  # complete: nothing more to do
    # Per-row keys: a prompt's answers do not depend on its batch or its place in it
    reverse = tmp_path / "c" / "gen.jsonl"
    jd.generate_responses(*run.teacher, items[::-1], reverse, progress=False, **run.kw)
    by_key = lambda path: {line.split(b', "record"')[0]: line for line in path.read_bytes().splitlines()}
    assert by_key(reverse) == by_key(straight)


def test_other_settings_on_an_existing_file_are_refused(teachers, tmp_path):
    run, items = _sampled(teachers["soft"], tmp_path, n=2)
    path = tmp_path / "gen.jsonl"
    run(path, stop_after=1)
    before = path.read_bytes()
    with pytest.raises(TrainingError, match=r"other settings \(temperature: 1.0 -> 0.5\).*Use a new workdir"):
        run(path, temperature=0.5)
    with pytest.raises(TrainingError, match=r"teacher: .* -> 'other'"):
        run(path, settings={"teacher": "other", "adapter": None})
    with pytest.raises(TrainingError, match="prompts_sha256"):
        jd.generate_responses(None, None, None, items[:1], path, num_samples=2, max_new_tokens=6, temperature=1.0,
                              top_k=8, seed=3, batch_size=2, settings={"teacher": "x"}, progress=False)  # fmt: skip
    assert path.read_bytes() == before  # nothing was written


def test_teacher_loading_errors_and_a_4bit_teacher(teachers, tmp_path):
    with pytest.raises(ConfigError, match="distill.teacher is empty"):
        jd.load_teacher(config("", ""))
    with pytest.raises(ConfigError, match=r"distill.teacher='/nope/teacher': .*not a model folder"):
        jd.load_teacher(config("/nope/teacher", ""))
    with pytest.raises(ConfigError, match="distill.teacher_quant='int8'"):
        jd.load_teacher(config(teachers["sharp"], "", "distill.teacher_quant=int8"))
    with pytest.raises(ConfigError, match="teacher_adapter='/nope/adapter': no such adapter folder"):
        jd.load_teacher(config(teachers["sharp"], "", "distill.teacher_adapter=/nope/adapter"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((teachers["sharp"] / f).read_bytes())
    with pytest.raises(ConfigError, match="has no tokenizer"):
        jd.load_teacher(config(bare, ""))
    model, params, _ = jd.load_teacher(config(teachers["sharp"], "", "distill.teacher_quant=nf4"))
    assert type(params["model"]["layers"]["mlp"]["up_proj"]["kernel"]).__name__ == "QuantizedWeight"
    assert jd.parameter_count(params) == jd.parameter_count(jd.load_teacher(config(teachers["sharp"], ""))[1])
    logits = jax.jit(model.apply)({"params": params}, np.asarray([[1, 4, 5, 6]]))  # "a b c": 4-bit, same answers
    assert np.argmax(logits[0], -1).tolist() == [4, 5, 6, 7]


# ---------------------------------------------------------------------------- jft distill


def test_jft_distill_end_to_end_the_student_learns_the_teacher(teachers, tmp_path, capsys):
    """`jft distill` with configs/distill_llama.py: a smaller new student (full fine-tuning) trains on
    the bigram teacher's answers to prompts of every form; its held-out loss falls well below the
    untrained student's, towards the teacher's."""
    from jft.cli import main

    rng = np.random.default_rng(1)
    forms = [
        lambda s: {"instruction": "Continue.", "input": s},
        lambda s: {"messages": [{"role": "user", "content": s}]},
        lambda s: {"prompt": s},
    ]
    prompts = write(tmp_path / "prompts.jsonl", [forms[i % 3](letters(rng, 2, "abcdefgijkl")) for i in range(40)])
    over = [
        f"distill.teacher={teachers['sharp']}",
        f"distill.prompts={prompts}",
        "distill.num_samples=1",
        "distill.max_new_tokens=12",
        "distill.sample_temperature=0.0",
        "distill.generate_batch_size=4",
        "model.path=",
        f"tokenizer.path={teachers['sharp']}",  # the teacher's vocabulary: losses compare token for token
        "model.new.hidden_size=16",
        "model.new.intermediate_size=32",
        "model.new.num_hidden_layers=1",
        "model.new.num_attention_heads=2",
        "model.new.num_key_value_heads=1",
        "model.dtype=float32",
        "model.compute_dtype=float32",
        "model.remat=none",
        "optim.bf16_update=none",
        "peft.methods=()",
        "data.template=compact",
        "data.seq_len=32",
        "data.validation_fraction=0.2",
        "train.batch_size=8",
        "train.max_steps=30",
        "train.eval_every=0",
        "train.checkpoint_every=30",
        "optim.learning_rate=3e-2",
        "optim.schedule=constant",
        "eval.num_examples=0",  # loss and perplexity only: no generation metrics
        "export.dtype=float32",
    ]
    run = tmp_path / "run"
    assert main(["distill", "--config", CONFIG, "--workdir", str(run), *(f"--config.{o}" for o in over)]) == 0
    printed = capsys.readouterr().out
    assert "student after" in printed and "distill report:" in printed
    out = run / "distill"
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["prompts"], stats["generated"], stats["kept"]) == (40, 40, 40)
    data = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert {next(k for k in ("instruction", "messages", "prompt") if k in r) for r in data} == {
        "instruction",
        "messages",
        "prompt",
    }
    report = json.loads((out / "report.json").read_text())
    teacher, student = report["teacher"], report["student"]
    before, after = student["before"]["loss"], student["after"]["loss"]
    # The distilled student beats the same student trained on nothing, on held-out answers of the teacher
    assert after < 0.5 * before, (before, after)
    assert report["same_tokenizer"] and report["fit"]["steps"] == 30
    assert teacher["parameters"] > student["parameters"] > 0
    assert teacher["tokens_per_s"] > 0 and student["tokens_per_s"] > 0
    student_model, student_params = jft.load_hf(run / "hf")  # the trained student, exported
    assert student_model.config.hidden_size == 16 and jd.parameter_count(student_params) == student["parameters"]
