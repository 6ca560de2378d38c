"""Vocabulary extension: old tokens keep their logits, new rows start at the mean, transformers loads the
export; learned tokens; which rows train; the tokenizer.add_tokens / learn_tokens / train_rows settings."""

import shutil

import jax
import numpy as np
import pytest
import torch
from test_hf import tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import jft
from jft import partition
from jft.config import ConfigError, check, default_config
from jft.train import fit
from jft.vocab import extend_vocabulary, learn_tokens, new_row_labels, table_rules, tokens_per_word


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


def char_tokenizer():
    """Every lowercase letter one token (a BPE without merges): every word of two letters or more splits."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz"])}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_learned_tokens_are_the_most_frequent_split_words_ties_by_the_word():
    tokenizer = char_tokenizer()
    texts = ["cell, gene. bead cell", "cell gene bead x x dna", "(cell) a a"] * 3
    # cell 9, then bead = gene 6 (tie: bead first), dna 3; "x" and "a" are tokens already
    assert learn_tokens(tokenizer, texts, 3) == ["cell", "bead", "gene"]
    assert learn_tokens(tokenizer, texts, 10, skip=["bead"]) == ["cell", "gene", "dna"]
    assert learn_tokens(tokenizer, texts[1:2], 10) == []  # each word seen once: not frequent
    assert learn_tokens(tokenizer, texts, 0) == []
    before = tokens_per_word(tokenizer, texts)
    tokenizer.add_tokens(learn_tokens(tokenizer, texts, 3))
    assert tokens_per_word(tokenizer, texts) < before


def test_new_row_labels_train_the_new_rows_and_hold_the_old_ones_bit_identical():
    from test_train_step import accum, make_batch

    from jft.objectives import token_loss
    from jft.train import TrainState, make_optimizer, make_train_step

    config = jft.LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    model = jft.LlamaForCausalLM(config)
    params = model.init_params(jax.random.key(0))
    rules = (("model/norm/.*", "trainable"), ("lm_head/.*", "frozen"), (".*", "frozen"))
    extra = table_rules(params, rules, "new")
    assert extra == (("model/embed_tokens/embedding", "trainable"), ("lm_head/kernel", "trainable"))
    assert table_rules(params, partition.FULL, "new") == table_rules(params, rules, "rules") == ()
    new = [60, 61, 62, 63]
    labels = new_row_labels(partition.labels(params, extra + rules), params, new, extra)
    assert labels["model"]["embed_tokens"]["embedding"].shape == (64, 1)
    assert labels["lm_head"]["kernel"].shape == (1, 64)
    trainable, frozen = partition.split(params, labels)
    assert "embed_tokens" in trainable["model"] and "lm_head" in trainable and "layers" in frozen["model"]
    counted = 32 + 2 * len(new) * 32  # the final norm and four rows of each table
    assert f"trainable parameters: {counted:,} /" in partition.summary(params, labels)

    masks = partition.layer_masks(trainable, labels)
    tx, schedule = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0, weight_decay=0.1, masks=masks)
    step = jax.jit(make_train_step(token_loss(model), tx, schedule, masks))
    state = TrainState.create(params, labels, tx, jax.random.key(1))
    for i in range(3):
        state, _ = step(state, accum(make_batch(i, 4), 2))
    after = state.params
    for got, was, axis in (
        (after["model"]["embed_tokens"]["embedding"], params["model"]["embed_tokens"]["embedding"], 0),
        (after["lm_head"]["kernel"], params["lm_head"]["kernel"], 1),
    ):
        got, was = np.moveaxis(np.asarray(got), axis, 0), np.moveaxis(np.asarray(was), axis, 0)  # [vocab, embed]
        np.testing.assert_array_equal(got[:60], was[:60])  # weight decay included
        assert not np.any(np.all(got[60:] == was[60:], axis=1)), "a new row did not train"
    np.testing.assert_array_equal(
        after["model"]["layers"]["mlp"]["up_proj"]["kernel"], frozen["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    )


# ---------------------------------------------------------------------------- jft train


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("add_tokens", ("mRNA", 3), r"tokenizer.add_tokens\[1\] is 3; each token is a non-empty string"),
        ("add_tokens", ("",), r"tokenizer.add_tokens\[0\] is ''"),
        ("add_tokens", ("mRNA", "mRNA"), r"lists 'mRNA' twice"),
        ("learn_tokens", -1, r"tokenizer.learn_tokens=-1; use 0"),
        ("train_rows", "old", r"tokenizer.train_rows='old'; choose one of \('new', 'all', 'rules'\)"),
    ],
)
def test_bad_vocabulary_settings_are_config_errors(tmp_path, field, value, message):
    cfg = default_config()
    cfg.model.path = str(tmp_path)
    cfg.tokenizer[field] = value
    with pytest.raises(ConfigError, match=message):
        check(cfg)


def test_a_vocabulary_needs_a_pretrained_model(tmp_path):
    cfg = default_config()
    cfg.tokenizer.add_tokens = ("mRNA",)
    with pytest.raises(ConfigError, match="need model.path and tokenizer.train_on_data=False"):
        fit(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
