"""Vocabulary extension: old tokens keep their logits, new rows start at the mean, transformers loads the export."""

import shutil

import numpy as np
import pytest
import torch
from test_hf import tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import jft
from jft.vocab import extend_vocabulary, tokens_per_word


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_tied"])
def test_extended_model_keeps_old_logits_and_transformers_loads_it(hf_model_dir, tmp_path, variant):
    folder = tmp_path / "base"
    shutil.copytree(hf_model_dir(variant), folder)
    model, params = jft.load_hf(folder)
    tokenizer = tiny_tokenizer()
    ids = np.array([[1, 3, 4, 3, 2]])
    old_logits = np.asarray(model.apply({"params": params}, ids))

    model2, params2, tokenizer, new = extend_vocabulary(model, params, tokenizer, ["mRNA", "CRISPR", "hello"])
    assert new == [5, 6] and model2.config.vocab_size == max(model.config.vocab_size, 7)
    embed = np.asarray(params2["model"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(embed[5], np.asarray(params["model"]["embed_tokens"]["embedding"])[:5].mean(0), 1e-6)
    logits = np.asarray(model2.apply({"params": params2}, ids))
    np.testing.assert_array_equal(logits[..., :5], old_logits[..., :5])  # the old tokens' logits, exactly

    out = tmp_path / "extended"
    jft.save_hf(model2, params2, out, tokenizer=tokenizer)
    hf_tok = AutoTokenizer.from_pretrained(out)
    enc = hf_tok("hello mRNA CRISPR", add_special_tokens=False)["input_ids"]
    assert enc == [3, 5, 6]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = np.array([[1, 3, 5, 6, 4]])
    with torch.no_grad():
        theirs = hf(torch.tensor(x)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model2.apply({"params": params2}, x)), theirs, atol=2e-5)

    many = [f"t{i}" for i in range(125)]  # past the model's 128 rows: the tables grow
    model3, params3, _, more = extend_vocabulary(model2, params2, tokenizer, many)
    assert more == list(range(7, 132)) and model3.config.vocab_size == 132
    grown = np.asarray(params3["model"]["embed_tokens"]["embedding"])
    assert grown.shape[0] == 132 and np.allclose(grown[131], embed[:7].mean(0), atol=1e-6)
    if "lm_head" in params3:
        assert np.asarray(params3["lm_head"]["kernel"]).shape[1] == 132
    np.testing.assert_array_equal(np.asarray(model3.apply({"params": params3}, ids))[..., :5], old_logits[..., :5])


def test_domain_tokens_lower_tokens_per_word_and_known_ones_change_nothing():
    from jft.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["the cat sat on the mat"] * 20, vocab_size=300)
    texts = ["the CRISPR screen", "CRISPR on the mat"]
    before = tokens_per_word(tokenizer, texts)
    tokenizer.add_tokens(["CRISPR"])
    assert tokens_per_word(tokenizer, texts) < before  # a domain word, one token instead of its bytes
    model = type("M", (), {})()  # nothing to add: the model is not looked at
    params = {"model": {}}
    got = extend_vocabulary(model, params, tokenizer, ["CRISPR", "the"])
    assert got[0] is model and got[1] is params and got[3] == []
