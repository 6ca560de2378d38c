"""Text metrics against hand-computed values, reports, and greedy prediction from a tiny model."""

import json
import math
import sys

import jax
import numpy as np
import pytest

import jft
from jft import metrics
from jft.tokenizer import train_bpe_tokenizer

SENTENCES = [
    "Le chat dort.",
    "Les filles mangent une pomme.",
    "Nous voyons le petit chien.",
    "Est-ce que tu as faim ?",
    "The cat is sleeping.",
    "We see the small dog.",
]


def test_exact_match_and_accuracy():
    preds = ["Le chat dort.", "  Les  filles\tmangent. ", "le chien"]
    refs = ["Le chat dort.", "Les filles mangent.", "Le chien"]
    assert metrics.exact_match(preds, refs) == pytest.approx(200 / 3)  # case still counts
    assert metrics.accuracy(["pos", "neg", "pos", "neg"], ["pos", "pos", "pos", "neg"]) == 75.0
    assert metrics.accuracy(["pos "], ["pos"]) == 0.0  # labels compare exactly


def test_bleu_and_chrf_bounds():
    refs = ["Les filles mangent une pomme rouge.", "Nous voyons le petit chien noir."]
    assert metrics.bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.chrf(refs, refs) == pytest.approx(100.0)
    disjoint = ["xyz qrs tuv wvu", "abc def ghi jkl"]
    assert metrics.bleu(disjoint, refs) == 0.0
    assert 0.0 < metrics.bleu(["Les filles mangent une pomme verte.", refs[1]], refs) < 100.0


def test_bleu_hand_computed():
    # 13a tokenisation splits the final "." off: hypothesis "the the the cat sat ." (6 tokens),
    # reference "the cat sat on the red mat ." (8). Clipped n-gram matches / hypothesis n-grams:
    #   1-grams: the (3, clipped to the reference's 2), cat, sat, "."       -> 5/6
    #   2-grams: "the cat", "cat sat" of 5                                  -> 2/5
    #   3-grams: "the cat sat" of 4                                         -> 1/4
    #   4-grams: none of 3; exponential smoothing (the first zero order)    -> 1/(2*3)
    # brevity penalty exp(1 - 8/6); BLEU = 100 bp (5/6 * 2/5 * 1/4 * 1/6)^(1/4) = 100 e^(-1/3) (1/72)^(1/4)
    hyp, ref = ["the the the cat sat."], ["the cat sat on the red mat."]
    assert metrics.bleu(hyp, ref) == pytest.approx(100 * math.exp(-1 / 3) * (1 / 72) ** 0.25, rel=1e-6)
    # Corpus level: the counts add up before the precisions are taken (no order is zero then,
    # so no smoothing), with an exact second pair of 4 tokens: 9/10, 5/8, 3/6, 1/4, bp exp(1 - 12/10).
    hyp, ref = hyp + ["le chien dort bien"], ref + ["le chien dort bien"]
    assert metrics.bleu(hyp, ref) == pytest.approx(100 * math.exp(-0.2) * (9 / 128) ** 0.25, rel=1e-6)


def test_chrf_hand_computed():
    # Whitespace is dropped: "lechat" against "leschats"; character n-grams of orders 1..6:
    #   order        1     2     3     4     5     6
    #   hypothesis   6     5     4     3     2     1
    #   reference    8     7     6     5     4     3
    #   matches      6     4     2     1     0     0   (le ch ha at; cha hat; chat)
    # chrF averages precision and recall over the orders, then F-beta with beta = 2.
    p = (6 / 6 + 4 / 5 + 2 / 4 + 1 / 3 + 0 + 0) / 6
    r = (6 / 8 + 4 / 7 + 2 / 6 + 1 / 5 + 0 + 0) / 6
    assert metrics.chrf(["le chat"], ["les chats"]) == pytest.approx(100 * 5 * p * r / (4 * p + r), rel=1e-6)


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
    import sacrebleu

    preds = ["Le chat dort.", "Les filles mangent une pomme verte.", "Nous voyons un chien.", "faim ?"]
    refs = ["Le chat dort bien.", "Les filles mangent une pomme rouge.", "Nous voyons le petit chien.", "J'ai faim !"]
    assert metrics.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, rel=1e-12)
    assert metrics.chrf(preds, refs) == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score, rel=1e-12)
    # Corpus scores, not means of sentence scores.
    sentences = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(preds, refs, strict=True)]
    assert abs(metrics.bleu(preds, refs) - sum(sentences) / len(sentences)) > 1.0


def test_rouge_hand_computed():
    same = metrics.rouge(["le chat dort"], ["le chat dort"])
    assert same == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rouge": 100.0})
    # unigrams 2/3 both ways, bigrams 1/2, longest common subsequence 2 of 3
    part = metrics.rouge(["the cat sat"], ["the cat ran"])
    assert part["rouge1"] == pytest.approx(200 / 3)
    assert part["rouge2"] == pytest.approx(50.0)
    assert part["rougeL"] == pytest.approx(200 / 3)
    assert part["rouge"] == pytest.approx((200 / 3 + 50 + 200 / 3) / 3)
    # accented words are whole words ("père" and "mère" share nothing), not ASCII fragments
    assert metrics.rouge(["père"], ["mère"])["rouge1"] == 0.0
    # averaged over examples
    assert metrics.rouge(["a b", "c d"], ["a b", "x y"])["rouge1"] == pytest.approx(50.0)


def test_text_metrics_keys_and_errors():
    out = metrics.text_metrics(["Le chat dort."], ["Le chat dort."])
    assert set(out) == {"bleu", "chrf", "rouge", "rouge1", "rouge2", "rougeL", "exact_match"}
    assert all(v == pytest.approx(100.0) for v in out.values())
    assert metrics.text_metrics(["a"], ["b"], names=("accuracy",)) == {"accuracy": 0.0}
    with pytest.raises(ValueError, match="valid names are .*'accuracy'.*'bleu'"):
        metrics.text_metrics(["a"], ["a"], names=("bleu", "meteor"))
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.text_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.text_metrics([], [])


def test_perplexity():
    assert metrics.perplexity(0.0) == 1.0
    assert metrics.perplexity(math.log(5.0)) == pytest.approx(5.0)
    assert metrics.perplexity(np.float32(math.log(7.0))) == pytest.approx(7.0, rel=1e-6)
    assert math.isfinite(metrics.perplexity(1e6))
    assert math.isnan(metrics.perplexity(float("nan")))


def test_write_report_is_strict_json(tmp_path):
    path = tmp_path / "sub" / "report.json"
    metrics.write_report(path, {"old": 1})
    report = {
        "loss": np.float32(0.5),
        "steps": np.int64(3),
        "curve": np.arange(3),
        "jax": jax.numpy.float32(2.0),
        "bad": float("nan"),
        "text": "Où est le chat ?",
    }
    assert metrics.write_report(path, report) == path
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert loaded == {"loss": 0.5, "steps": 3, "curve": [0, 1, 2], "jax": 2.0, "bad": None, "text": "Où est le chat ?"}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary file left behind


# ---------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(SENTENCES * 3, vocab_size=300)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    cfg = jft.LlamaConfig.tiny(vocab_size=len(tokenizer), eos_token_id=(tokenizer.eos_token_id,))
    model = jft.LlamaForCausalLM(cfg)
    return model, model.init_params(jax.random.key(0))


def test_generate_predictions_with_tiny_model(tiny, tokenizer):
    model, params = tiny
    prompts = ["Le chat", "Nous voyons le petit chien noir", "Est-ce que", "The cat", "We"]
    run = lambda ps: metrics.generate_predictions(model, params, tokenizer, ps, max_new_tokens=6, batch_size=5)
    preds = run(prompts)
    assert len(preds) == len(prompts) and all(isinstance(p, str) for p in preds)
    assert run(prompts) == preds
    # left padding does not change an answer: each prompt alone (filled up with copies of
    # itself, so unpadded) gives the same text; same shapes after bucketing, so no recompile
    assert [run([p])[0] for p in prompts] == preds


def test_generate_predictions_padding_bos_and_eos(monkeypatch, tokenizer):
    """The exact arrays handed to jft.generate, and decoding that stops at the first EOS."""
    seen = {}
    answer = tokenizer.encode("Le chat dort.", add_special_tokens=False)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def fake_generate(model, params, ids, max_new_tokens, *, attention_mask, eos_token_id, pad_token_id):
        seen.update(ids=np.asarray(ids), mask=np.asarray(attention_mask), eos=eos_token_id, pad=pad_token_id)
        word = tokenizer.encode(" chien", add_special_tokens=False)[0]  # an ordinary token after EOS
        row = (answer + [eos, word] + [pad] * max_new_tokens)[:max_new_tokens]
        return np.array([row] * ids.shape[0], np.int32)

    monkeypatch.setattr(sys.modules["jft.generate"], "generate", fake_generate)
    model = jft.LlamaForCausalLM(jft.LlamaConfig.tiny(vocab_size=len(tokenizer), eos_token_id=(7,)))
    prompts = ["Le chat", "Nous voyons le petit chien"]
    preds = metrics.generate_predictions(model, None, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    assert preds == ["Le chat dort.", "Le chat dort."]
    short, long = (tokenizer.encode(p, add_special_tokens=False) for p in prompts)
    ids, mask = seen["ids"], seen["mask"]
    assert ids.shape == (4, 1 + len(long))  # filled up to batch_size
    assert ids[1].tolist() == [bos, *long] and mask[1].all()
    pad_len = len(long) - len(short)
    assert ids[0].tolist() == [pad] * pad_len + [bos, *short]
    assert mask[0].tolist() == [False] * pad_len + [True] * (1 + len(short))
    assert seen["eos"] == (eos, 7) and seen["pad"] == pad
    metrics.generate_predictions(model, None, tokenizer, ["<s>Le chat"], max_new_tokens=4, batch_size=1)
    assert seen["ids"].tolist() == [[bos, *short]]  # a BOS already in the text is not doubled
    with pytest.raises(ValueError, match="prompt 0 encodes to no tokens"):
        tok = train_bpe_tokenizer(SENTENCES, vocab_size=300)
        tok.bos_token = None
        metrics.generate_predictions(model, None, tok, [""], max_new_tokens=4)
