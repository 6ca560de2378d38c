"""Toxicity as RealToxicityPrompts measures it: the metrics against hand-computed values, prompt
files and their errors, every kind of scorer (classifiers against transformers), the reward
function, and a report end to end from Python and from the CLI."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from test_hf import tiny_tokenizer

import jft
from jft import stats
from jft.config import ConfigError
from jft.data import DataError
from jft.toxicity import (
    ClassifierScorer,
    LexiconScorer,
    PipelineScorer,
    load_scorer,
    make_reward,
    nontoxicity,
    read_prompts,
    sample_continuations,
    score_texts,
    toxicity_metrics,
    toxicity_report,
    toxicity_table,
)

SAMPLE = Path(jft.__file__).parent / "assets" / "rtp_sample.jsonl"


def hello_share(texts):
    """A ``module:function`` scorer for the tests: the share of a text's words that are "hello"."""
    return [t.split().count("hello") / len(t.split()) if t.split() else 0.0 for t in texts]


def twice_too_many(texts):
    return [0.0] * (2 * len(texts))


def out_of_range(texts):
    return [1.5] * len(texts)


# ---------------------------------------------------------------------------- metrics

SCORES = np.array(
    [
        [0.1, 0.2, 0.6],  # max 0.6: toxic
        [0.0, 0.1, 0.3],  # max 0.3
        [0.5, 0.4, 0.2],  # max 0.5: toxic (the cut is >= 0.5)
        [0.9, 0.8, 0.7],  # max 0.9: toxic
    ]
)
PROMPT_TOXICITY = [0.8, 0.1, None, 0.5]  # toxic prompts: 0 and 3 (0.5 counts); 2 has no score
CHALLENGING = [True, False, None, True]


def test_metrics_match_hand_computed_values():
    m = toxicity_metrics(SCORES, PROMPT_TOXICITY, CHALLENGING)
    assert list(m) == ["overall", "toxic", "nontoxic", "challenging"]
    overall = m["overall"]
    assert (overall["prompts"], overall["continuations"]) == (4, 12)
    assert overall["expected_max_toxicity"]["value"] == pytest.approx(0.575)  # (0.6 + 0.3 + 0.5 + 0.9) / 4
    assert overall["expected_max_toxicity"]["std"] == pytest.approx(0.25)  # sqrt(0.1875 / 3)
    assert overall["toxicity_probability"]["value"] == pytest.approx(0.75)
    assert overall["mean_toxicity"]["value"] == pytest.approx(0.4)  # 4.8 / 12
    toxic = m["toxic"]
    assert toxic["prompts"] == 2
    assert toxic["expected_max_toxicity"]["value"] == pytest.approx(0.75)
    assert toxic["expected_max_toxicity"]["std"] == pytest.approx(math.sqrt(2 * 0.15**2))
    assert toxic["toxicity_probability"]["value"] == 1.0
    nontoxic = m["nontoxic"]  # one prompt: no spread, no interval
    assert nontoxic["prompts"] == 1 and nontoxic["expected_max_toxicity"]["value"] == pytest.approx(0.3)
    assert nontoxic["expected_max_toxicity"]["std"] is None and nontoxic["toxicity_probability"]["low"] is None
    assert nontoxic["toxicity_probability"]["value"] == 0.0
    assert m["challenging"]["prompts"] == 2
    assert m["challenging"]["expected_max_toxicity"]["value"] == pytest.approx(0.75)


def test_intervals_are_the_stats_bootstrap_over_prompts():
    m = toxicity_metrics(SCORES, n_resamples=200, seed=3)
    assert list(m) == ["overall"]  # no prompt scores or flags: no splits
    worst = SCORES.max(axis=1)
    emt = m["overall"]["expected_max_toxicity"]
    assert (emt["value"], emt["low"], emt["high"]) == stats.bootstrap_interval(worst, n_resamples=200, seed=3)
    prob = m["overall"]["toxicity_probability"]
    expect = stats.bootstrap_interval((worst >= 0.5).astype(float), n_resamples=200, seed=3)
    assert (prob["value"], prob["low"], prob["high"]) == expect
    assert emt["low"] <= emt["value"] <= emt["high"]


def test_an_empty_split_has_counts_only_and_the_table_shows_it():
    m = toxicity_metrics(SCORES, [0.9, 0.9, 0.9, 0.9])
    assert m["nontoxic"] == {
        "prompts": 0,
        "continuations": 0,
        "expected_max_toxicity": None,
        "toxicity_probability": None,
        "mean_toxicity": None,
    }
    table = toxicity_table({"metrics": m})
    assert "| nontoxic | 0 | - | - | - |" in table
    assert "| overall | 4 | 0.575 (std 0.250) [" in table


def test_bad_score_matrices_are_refused():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        toxicity_metrics([[0.2, 1.2]])
    with pytest.raises(ValueError, match="matrix"):
        toxicity_metrics([0.2, 0.3])
    with pytest.raises(ValueError, match="3 values of prompt_toxicity for 4 prompts"):
        toxicity_metrics(SCORES, [0.1, 0.2, 0.3])


# ---------------------------------------------------------------------------- prompt files


def test_the_shipped_sample_reads_in_the_rtp_layout():
    prompts = read_prompts(SAMPLE)
    assert len(prompts) == 12
    assert prompts[0].where == f"{SAMPLE}:1" and prompts[0].toxicity == 0.04 and prompts[0].challenging is False
    scored = [p.toxicity for p in prompts if p.toxicity is not None]
    assert 0 < sum(t >= 0.5 for t in scored) < len(scored)  # both splits are populated
    assert any(p.toxicity is None for p in prompts) and sum(bool(p.challenging) for p in prompts) >= 2
    assert len(read_prompts(SAMPLE, limit=3)) == 3


def test_plain_layouts(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "hello"}\n\n{"text": "world", "toxicity": 0.7, "challenging": true}\n')
    a, b = read_prompts(jsonl)
    assert (a.text, a.toxicity, a.challenging, a.where) == ("hello", None, None, f"{jsonl}:1")
    assert (b.text, b.toxicity, b.challenging, b.where) == ("world", 0.7, True, f"{jsonl}:3")
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second one \n")
    expect = [("first prompt", f"{txt}:1"), ("  second one ", f"{txt}:3")]
    assert [(p.text, p.where) for p in read_prompts(txt)] == expect


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "p.jsonl:2: not valid JSON"),
        ('{"input": "x"}', "p.jsonl:2: record has no 'prompt' or 'text' field (its fields are ['input'])"),
        ('{"prompt": {"toxicity": 0.1}}', "p.jsonl:2: field 'prompt' has no 'text'"),
        ('{"prompt": {"text": ""}}', "p.jsonl:2: field 'prompt.text' is empty"),
        ('{"prompt": {"text": "x", "toxicity": "high"}}', "p.jsonl:2: field 'prompt.toxicity' is 'high'; use a number"),
        ('{"prompt": "x", "challenging": "yes"}', "p.jsonl:2: field 'challenging' is 'yes'; use true or false"),
        ('{"prompt": 3}', "p.jsonl:2: field 'prompt' is a int"),
    ],
)
def test_bad_records_name_the_line_and_field(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_prompts(path)
    assert message in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_prompts(tmp_path / "none.txt")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(tmp_path / "blank.txt")
    with pytest.raises(DataError, match="limit=0"):
        read_prompts(SAMPLE, limit=0)


# ---------------------------------------------------------------------------- scorers


def test_lexicon_scorer():
    scorer = load_scorer("lexicon")
    assert isinstance(scorer, LexiconScorer) and "not a toxicity classifier" in scorer.name
    got = score_texts(scorer, ["you are an IDIOT!", "", "a nice sunny day", "stupid stupid"])
    np.testing.assert_allclose(got, [1 - math.exp(-8 / 4), 0.0, 0.0, 1 - math.exp(-8)])
    assert got[0] >= 0.5  # one insult in a short text crosses the cut


def test_function_scorer_and_its_errors():
    scorer = load_scorer("test_toxicity:hello_share")
    np.testing.assert_allclose(score_texts(scorer, ["hello world", "world", ""]), [0.5, 0.0, 0.0])
    with pytest.raises(ConfigError, match="returned 4 values for 2 texts"):
        score_texts(load_scorer("test_toxicity:twice_too_many"), ["a", "b"])
    with pytest.raises(ConfigError, match="returned 1.5 for text 0"):
        score_texts(load_scorer("test_toxicity:out_of_range"), ["a"])
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_scorer("test_toxicity:missing")
    with pytest.raises(ConfigError, match="not a folder, nor a known spec"):
        load_scorer("no such scorer")


def seq_cls_folder(path, id2label: dict, **config):
    """A random transformers LlamaForSequenceClassification with the tiny tokenizer, saved."""
    import torch
    from conftest import BASE
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", **BASE, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    for key, value in config.items():
        setattr(cfg, key, value)
    model = AutoModelForSequenceClassification.from_config(cfg).float().eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 2.0)  # scores far from 0.5
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


def torch_logits(model, tokenizer, texts):
    """Each text alone (no padding) through the transformers model: ``[n, num_labels]``."""
    import torch

    with torch.no_grad():
        return np.concatenate(
            [model(input_ids=torch.tensor([tokenizer(t)["input_ids"]])).logits.numpy() for t in texts]
        ).astype(np.float64)


TEXTS = ["hello world", "world", "hello hello world world hello", "world hello"]


@pytest.fixture(scope="module")
def two_labels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tox_cls2")
    model = seq_cls_folder(folder, {0: "non-toxic", 1: "toxic"})
    logits = torch_logits(model, tiny_tokenizer(), TEXTS)
    return folder, np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)  # transformers' softmax, label "toxic"


def test_jft_classifier_matches_transformers_softmax(two_labels):
    folder, expect = two_labels
    scorer = load_scorer(str(folder), batch_size=3)  # a llama folder: jft loads it; batches of 3 pad the last
    assert isinstance(scorer, ClassifierScorer) and scorer.index == 1
    assert 0.05 < expect.std()  # the texts score differently
    np.testing.assert_allclose(score_texts(scorer, TEXTS), expect, atol=1e-5)
    assert score_texts(scorer, [""])[0] == 0.0  # no tokens: nothing to score
    by_name = load_scorer(f"jft:{folder}", label="NON-TOXIC")
    np.testing.assert_allclose(score_texts(by_name, TEXTS), 1 - expect, atol=1e-5)


def test_jft_classifier_with_one_label_is_a_sigmoid(tmp_path):
    model = seq_cls_folder(tmp_path, {0: "LABEL_0"})
    logits = torch_logits(model, tiny_tokenizer(), TEXTS)[:, 0]
    got = score_texts(load_scorer(f"jft:{tmp_path}"), TEXTS)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-logits)), atol=1e-5)


def test_the_transformers_pipeline_scorer_matches_torch(two_labels):
    folder, expect = two_labels
    scorer = load_scorer(f"hf:{folder}", batch_size=2)  # batched: the pipeline pads
    assert isinstance(scorer, PipelineScorer) and scorer.label == "toxic"
    np.testing.assert_allclose(score_texts(scorer, TEXTS), expect, atol=1e-5)


def test_a_classifier_without_a_toxic_label_asks_for_one(tmp_path):
    seq_cls_folder(tmp_path, {0: "neutral", 1: "offensive"})
    with pytest.raises(ConfigError, match="label=NAME"):
        load_scorer(str(tmp_path))
    with pytest.raises(ConfigError, match="no label 'rude'"):
        load_scorer(str(tmp_path), label="rude")


def test_a_causal_lm_folder_is_not_a_scorer(hf_base):
    with pytest.raises(ConfigError, match="not a \\*ForSequenceClassification"):
        load_scorer(str(hf_base[0]))


# ---------------------------------------------------------------------------- reward


def test_reward_is_one_minus_the_toxicity(monkeypatch):
    from jft.objectives.rl import load_reward_function

    completions = ["you idiot", "a calm reply", [{"role": "assistant", "content": "stupid"}]]
    prompts = ["p"] * 3
    reward = load_reward_function("jft.toxicity:nontoxicity")
    monkeypatch.delenv("JFT_TOXICITY_SCORER", raising=False)
    lexicon = LexiconScorer()(["you idiot", "a calm reply", "stupid"])
    np.testing.assert_allclose(reward(prompts, completions, answer=["x"] * 3), 1 - lexicon)
    monkeypatch.setenv("JFT_TOXICITY_SCORER", "test_toxicity:hello_share")
    np.testing.assert_allclose(reward(prompts, ["hello world", "world"]), [0.5, 1.0])
    custom = make_reward("test_toxicity:hello_share")
    assert custom.__name__ == "nontoxicity" and custom(prompts, ["hello hello world world"]) == [0.5]
    assert nontoxicity is reward


# ---------------------------------------------------------------------------- end to end


def word_tokenizer(vocab_size: int):
    """A WordLevel tokenizer with a word for every id of the model (``<s>`` 1, ``</s>`` 2, then
    ``hello``, ``world``, ``w5`` ...), so every sampled token decodes to a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "hello", "world"] + [f"w{i}" for i in range(5, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def policy(hf_base):
    model, params = jft.load_hf(hf_base[0])
    return hf_base[0], model, params


# batches of 5 rows in every generation below: one compiled shape for the whole module
BATCH = 5


def test_report_end_to_end_and_metrics_from_the_generations(policy, tmp_path):
    _, model, params = policy
    tokenizer = word_tokenizer(model.config.vocab_size)
    prompts = read_prompts(SAMPLE, limit=3)  # toxicity 0.04, 0.06, 0.71 (challenging)
    report = toxicity_report(
        model,
        params,
        tokenizer,
        prompts,
        "test_toxicity:hello_share",
        samples=3,
        max_new_tokens=4,
        batch_size=BATCH,
        n_resamples=100,
        out=tmp_path,
        meta={"model": "tiny"},
    )
    assert [(k, m["prompts"]) for k, m in report["metrics"].items()] == [
        ("overall", 3),
        ("toxic", 1),
        ("nontoxic", 2),
        ("challenging", 1),
    ]
    assert report["scorer"] == "test_toxicity:hello_share" and report["settings"]["top_p"] == 0.9
    saved = json.loads((tmp_path / "toxicity.json").read_text())
    assert saved["meta"] == {"model": "tiny"} and "generations" not in saved
    lines = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in lines] == [p.text for p in prompts]
    for g in lines:
        assert len(g["continuations"]) == 3 and len(g["toxicity"]) == 3
        assert g["toxicity"] == hello_share(g["continuations"]) and g["max_toxicity"] == max(g["toxicity"])
        for text in g["continuations"]:  # 1 to 4 sampled words (the prompt is all <unk>: it decodes to "")
            assert re.fullmatch(r" ?(hello|world|w\d+)( (hello|world|w\d+)){0,3}", text), text
    assert len({c for g in lines for c in g["continuations"]}) > 3  # sampled, not greedy
    again = toxicity_metrics(
        [g["toxicity"] for g in lines],
        [g["prompt_toxicity"] for g in lines],
        [g["challenging"] for g in lines],
        n_resamples=100,
    )
    assert json.loads(json.dumps(again)) == saved["metrics"]
    # sample j of prompt i depends on the seed, i and j only: not on the batching nor on `samples`
    texts = [p.text for p in prompts]
    fewer = sample_continuations(model, params, tokenizer, texts, 2, max_new_tokens=4, batch_size=BATCH)
    assert fewer == [g["continuations"][:2] for g in lines]


def test_cli_writes_the_report_and_prints_the_table(policy, tmp_path, capsys):
    from jft.cli import main

    folder = str(policy[0])
    args = ["toxicity", "--model", folder, "--prompts", str(SAMPLE), "--limit", "3", "--samples", "3"]
    assert main([*args, "--max-new-tokens", "4", "--batch-size", str(BATCH), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| overall | 3 |" in out and "| toxic | 1 |" in out and "scorer: lexicon" in out
    report = json.loads((tmp_path / "toxicity.json").read_text())
    assert report["meta"]["prompts"] == str(SAMPLE) and report["settings"]["samples"] == 3
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 3


def test_cli_bad_prompts_is_a_clean_error(policy, tmp_path, capsys):
    from jft.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": {"text": "x", "toxicity": 2}}\n')
    args = ["toxicity", "--model", str(policy[0]), "--prompts", str(bad), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "bad.jsonl:1: field 'prompt.toxicity' is 2" in capsys.readouterr().err
