"""Vocabulary extension: old tokens keep their logits, new rows start at the mean, transformers loads the
export; learned tokens; which rows train; `jft train` with tokenizer.add_tokens / learn_tokens, resumed."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from test_hf import tiny_tokenizer
from test_trainer import _peft_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

import jft
from jft import partition
from jft.config import ConfigError, check, default_config, load_config
from jft.train import TrainingError, fit
from jft.tree import get_path
from jft.vocab import TABLES, extend_vocabulary, learn_tokens, new_row_labels, table_rules, tokens_per_word


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
    assert table_rules(params, rules, "all") == extra  # the same tables, trained whole (no new_row_labels)
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


def _texts_file(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _run_config(config: str, folder, data, steps: int, **tokenizer):
    """``configs/{config}.py`` on the tiny model ``folder``, a few steps, no generation."""
    overrides = _peft_overrides(folder, data, steps)
    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{config}.py", overrides)
    for k, v in tokenizer.items():
        cfg.tokenizer[k] = v
    return cfg


def test_lora_run_trains_only_the_new_rows_resumes_with_the_same_ids_and_exports_them(hf_base, tmp_path):
    folder, _ = hf_base  # untied Llama, the five-word tokenizer
    data = _texts_file(tmp_path / "train.jsonl", [f"hello mRNA world CRISPR {'hello ' * (i % 4)}" for i in range(40)])
    run = tmp_path / "run"
    config = lambda steps, **kw: _run_config("lora_llama", folder, data, steps, add_tokens=("mRNA", "CRISPR"), **kw)
    first = fit(config(2), run)
    vocabulary = json.loads((run / "vocabulary.json").read_text())
    assert vocabulary["ids"] == [5, 6] and vocabulary["learned"] == []
    assert first["vocabulary"]["added"] == 2 and first["vocabulary"]["tokens_per_word_after"] > 0
    resumed = fit(config(4), run)
    assert (resumed["steps"], resumed["resumed_from"], resumed["steps_run"]) == (4, 2, 2)
    assert json.loads((run / "vocabulary.json").read_text()) == vocabulary
    assert resumed["vocabulary"] == first["vocabulary"]

    # The old rows of both tables are the base's, bit for bit; the new ones trained away from the mean.
    base_model, base = jft.load_hf(folder)
    model, params = jft.load_hf(run / "hf")
    assert model.config.vocab_size == base_model.config.vocab_size == 128  # padded rows reused
    for path, axis in TABLES.items():  # [vocab, embed] rows of embed_tokens and lm_head
        ours, theirs = (np.moveaxis(np.asarray(get_path(p, path)), axis, 0) for p in (params, base))
        np.testing.assert_array_equal(np.delete(ours, [5, 6], 0), np.delete(theirs, [5, 6], 0), err_msg=str(path))
        assert not np.allclose(ours[5:7], theirs[:5].mean(0), atol=1e-6), path
    # The adapter holds the tables (jft's format: peft's cannot hold some rows of them); base + adapter = export.
    assert (run / "adapter" / "jft_adapter.json").is_file()
    adapted_model, adapted = jft.peft.load_adapter(base_model, base, run / "adapter")
    ids = np.array([[1, 3, 5, 6, 4, 5]])
    ours = np.asarray(model.apply({"params": params}, ids))
    np.testing.assert_allclose(np.asarray(adapted_model.apply({"params": adapted}, ids)), ours, atol=1e-4)

    # transformers loads the export with the extended tokenizer, and computes the same logits.
    tokenizer = AutoTokenizer.from_pretrained(run / "hf")
    assert tokenizer("hello mRNA CRISPR", add_special_tokens=False)["input_ids"] == [3, 5, 6]
    hf = AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5)

    # A workdir whose tokenizer holds other tokens is refused, before anything is written or trained.
    other = tmp_path / "other"
    shutil.copytree(run / "tokenizer", other / "tokenizer")
    with pytest.raises(TrainingError, match=r"tokenizer holds 7 tokens, but .* has 6"):
        fit(_run_config("lora_llama", folder, data, 2, add_tokens=("mRNA",)), other)
    assert sorted(p.name for p in other.iterdir()) == ["tokenizer"]


def test_learned_tokens_lower_tokens_per_word_and_only_their_rows_train(hf_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "base"  # a tied model whose tokenizer spells every word letter by letter
    shutil.copytree(hf_model_dir("llama_tied"), folder)
    model, params = jft.load_hf(folder)
    jft.save_hf(model, params, folder, tokenizer=char_tokenizer())
    texts = ["the cell binds the gene", "a gene in a cell", "the cell divides"] * 8
    data = _texts_file(tmp_path / "train.jsonl", texts)

    def config(steps):
        cfg = _run_config("partial_ft_llama", folder, data, steps, learn_tokens=2)
        cfg.train.rules = (("model/embed_tokens/.*", "frozen"), (".*", "trainable"))  # the old rows: frozen
        return cfg

    first = fit(config(2), tmp_path / "run")
    # A resume takes the learned tokens from workdir/vocabulary.json: it reads no corpus to learn them again.
    monkeypatch.setattr("jft.vocab.learn_tokens", lambda *a, **k: pytest.fail("learned again on resume"))
    report = fit(config(4), tmp_path / "run")
    assert (report["resumed_from"], report["steps_run"]) == (2, 2) and report["vocabulary"] == first["vocabulary"]
    vocabulary = json.loads((tmp_path / "run" / "vocabulary.json").read_text())
    # "cell" and "the" come three times in every three records, "gene" twice ("a" is a token already)
    assert vocabulary["learned"] == ["cell", "the"] and vocabulary["ids"] == [29, 30]
    fit_of = report["vocabulary"]
    assert fit_of["added"] == fit_of["learned"] == 2 and fit_of["records"] == len(texts) - 1  # one is validation
    assert fit_of["tokens_per_word_after"] < fit_of["tokens_per_word_before"]
    embed = np.asarray(jft.load_hf(tmp_path / "run" / "hf")[1]["model"]["embed_tokens"]["embedding"])
    base = np.asarray(params["model"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(np.delete(embed, [29, 30], 0), np.delete(base, [29, 30], 0))
    assert not np.allclose(embed[29:31], base[:29].mean(0), atol=1e-6)
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "hf")("the cell")["input_ids"] == [30, 29]


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


def test_the_continued_pretraining_config_streams_a_mixture_and_extends_the_vocabulary(hf_base, tmp_path):
    """configs/cpt_llama.py as its docstring runs it: a folder of .txt shards mixed 9:1 with
    instruction records, tokenized into data.cache_dir, with a domain token added."""
    folder, _ = hf_base
    corpus = tmp_path / "domain"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"part-{i}.txt").write_text("".join(f"hello mRNA world {'hello ' * (j % 4)}\n" for j in range(30)))
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text(json.dumps({"instruction": "hello", "output": "world mRNA"}) + "\n")
    validation = _texts_file(tmp_path / "validation.jsonl", ["hello mRNA world"] * 4)
    cfg = _run_config("cpt_llama", folder, "", 2, add_tokens=("mRNA",))
    cfg.data.mixture = ((str(corpus), 0.9), (str(instructions), 0.1))
    cfg.data.validation, cfg.data.cache_dir, cfg.data.num_proc = str(validation), str(tmp_path / "cache"), 1
    cfg.train.grad_accum = 1
    report = fit(cfg, tmp_path / "run")
    assert report["steps"] == 2 and report["vocabulary"]["added"] == 1
    assert "60 records" in report["train_data"] and "mixture of 2 sources (0.9: 11 rows" in report["train_data"]
    assert report["vocabulary"]["records"] == 61  # the first records of the mixture's sources, in order
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 2  # one per source
