"""The tokenized data cache: the same examples, stats and rows as the in-memory pipeline; reuse, keys, damage."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from test_data import CHAT, CHAT_TEMPLATE, INSTRUCTION, word_tokenizer

import jft.data.cache as cache_mod
from jft.data import ALPACA, SIMPLE, DataError, load_records, pack, tokenize_records
from jft.data.cache import TokenCache, build_cache, pack_bounds
from jft.data.formats import COMPACT
from jft.tokenizer import train_bpe_tokenizer

EN_FR = Path(cache_mod.__file__).parents[1] / "assets" / "en_fr.jsonl"
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def bpe():
    texts = [json.dumps(r) for _, r in load_records(EN_FR)[:200]]
    return train_bpe_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def pairs():
    """en_fr instruction records, some too long for MAX_LENGTH, plus text and prompt_completion."""
    extra = [
        ("mem:1", {"text": "A black dog is walking today. " * 6}),
        ("mem:2", {"prompt": "The flowers are", "completion": " blue."}),
        ("mem:3", {"prompt": "The small dog is sleeping. " * 12, "completion": " nothing to learn after truncation"}),
    ]
    return load_records(EN_FR)[:300] + extra


def same_examples(got, want):
    assert len(got) == len(want)
    for (ids, w), (ids0, w0) in zip(got, want, strict=True):
        assert ids.dtype == np.int32 and w.dtype == np.float32
        np.testing.assert_array_equal(ids, ids0)
        np.testing.assert_array_equal(w, w0)


def same_rows(got, want):
    assert len(got) == len(want)
    for r, r0 in zip(got, want, strict=True):
        assert r.keys() == r0.keys()
        for k in r:
            assert r[k].dtype == r0[k].dtype
            np.testing.assert_array_equal(r[k], r0[k])


SETTINGS = dict(vocab_size=400, max_length=MAX_LENGTH, template=COMPACT, prompt_loss_weight=0.1)


@pytest.mark.parametrize("overlong, prompt_loss_weight", [("truncate", 0.0), ("drop", 0.25)])
def test_examples_stats_and_rows_match_the_pipeline(tmp_path, bpe, pairs, overlong, prompt_loss_weight):
    kw = {**SETTINGS, "overlong": overlong, "prompt_loss_weight": prompt_loss_weight}
    want, stats = tokenize_records(pairs, bpe, **kw)
    cache = build_cache(pairs, bpe, cache_root=tmp_path, chunk_records=32, shard_tokens=3000, **kw)
    assert cache.stats == stats and stats.dropped > 0 and (stats.truncated > 0 or overlong == "drop")
    assert stats.no_loss > 0 or overlong == "drop"
    assert len(cache) == len(want) and len(cache.manifest["shards"]) >= 3
    same_examples(cache.examples(), want)
    for seq_len, packed in [(MAX_LENGTH, True), (MAX_LENGTH, False), (100, True)]:
        rows = pack(want, seq_len, packed=packed)
        bounds = cache.rows(seq_len, packed)
        assert len(bounds) == len(rows) + 1
        same_rows([cache.row(r, seq_len, packed) for r in range(len(rows))], rows)


def test_chat_and_a_file_source(tmp_path):
    tok = word_tokenizer(CHAT_TEMPLATE)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [CHAT, INSTRUCTION, {"text": "hello world"}] * 3))
    want, stats = tokenize_records(load_records(data), tok, vocab_size=len(tok), max_length=64, template=SIMPLE)
    cache = build_cache(data, tok, cache_root=tmp_path / "c", vocab_size=len(tok), max_length=64, template=SIMPLE)
    same_examples(cache.examples(), want)
    assert cache.stats == stats
    data.write_text(data.read_text() + json.dumps(INSTRUCTION) + "\n")  # new content: a new key
    again = build_cache(data, tok, cache_root=tmp_path / "c", vocab_size=len(tok), max_length=64, template=SIMPLE)
    assert again.folder != cache.folder and len(again) == len(cache) + 1


def test_second_build_reuses_the_cache(tmp_path, bpe, pairs, monkeypatch):
    first = build_cache(pairs, bpe, cache_root=tmp_path, **SETTINGS)
    calls = []
    encode = cache_mod.encoded
    monkeypatch.setattr(cache_mod, "encoded", lambda *a, **k: calls.append(1) or encode(*a, **k))
    second = build_cache(pairs, bpe, cache_root=tmp_path, **SETTINGS)
    assert calls == [] and second.folder == first.folder
    assert [p.name for p in tmp_path.iterdir()] == [first.folder.name]  # no temporary folder left
    same_examples(second.examples(), first.examples())


def test_any_change_gives_a_new_key(tmp_path, bpe, pairs):
    base = build_cache(pairs[:50], bpe, cache_root=tmp_path, **SETTINGS).folder.name
    other_tok = train_bpe_tokenizer([json.dumps(r) for _, r in pairs[:100]], vocab_size=300)
    changes = [
        dict(tokenizer=other_tok),
        dict(template=ALPACA),
        dict(max_length=MAX_LENGTH + 1),
        dict(overlong="drop"),
        dict(prompt_loss_weight=0.0),
        dict(response_loss_weight=2.0),
        dict(vocab_size=401),
        dict(fmt="instruction"),
        dict(data=pairs[:49]),
        dict(data=[(w, {**r, "output": r["output"] + "!"}) for w, r in pairs[:50]]),
    ]
    keys = set()
    for change in changes:
        kw = {**SETTINGS, "tokenizer": bpe, "data": pairs[:50], **change}
        keys.add(
            build_cache(kw.pop("data"), kw.pop("tokenizer"), cache_root=tmp_path, progress=False, **kw).folder.name
        )
    assert base not in keys and len(keys) == len(changes)
    assert build_cache(pairs[:50], bpe, cache_root=tmp_path, num_proc=2, **SETTINGS).folder.name == base


def test_damaged_cache_is_a_clear_error(tmp_path, bpe, pairs):
    folder = build_cache(pairs, bpe, cache_root=tmp_path, chunk_records=50, shard_tokens=3000, **SETTINGS).folder
    ids = folder / "shard-00001.ids.npy"
    ids.write_bytes(ids.read_bytes()[:-10])  # truncated
    with pytest.raises(DataError, match=r"shard-00001\.ids\.npy.*Delete the folder"):
        TokenCache(folder)
    ids.unlink()
    with pytest.raises(DataError, match=r"shard-00001\.ids\.npy: missing.*Delete the folder"):
        TokenCache(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: malformed manifest.*Delete the folder"):
        TokenCache(folder)


# None: fork while no JAX backend runs in this process, else spawn (forking a live JAX can deadlock)
@pytest.mark.parametrize("start_method", [None, "spawn"])
def test_two_processes_write_the_same_cache(tmp_path, bpe, pairs, start_method):
    kw = dict(chunk_records=40, shard_tokens=4000, **SETTINGS)
    one = build_cache(pairs, bpe, cache_root=tmp_path / "one", **kw)
    two = build_cache(pairs, bpe, cache_root=tmp_path / "two", num_proc=2, start_method=start_method, **kw)
    assert one.folder.name == two.folder.name
    names = sorted(p.name for p in one.folder.iterdir())
    assert names == sorted(p.name for p in two.folder.iterdir())
    for name in names:
        assert (one.folder / name).read_bytes() == (two.folder / name).read_bytes(), name


def test_all_dropped_and_pack_bounds_errors(tmp_path, bpe, pairs):
    with pytest.raises(DataError, match="all 10 records were dropped"):
        build_cache(
            pairs[:10], bpe, cache_root=tmp_path, **{**SETTINGS, "prompt_loss_weight": 0.0, "response_loss_weight": 0.0}
        )
    assert not list(tmp_path.iterdir())  # nothing half-written is left to trust
    with pytest.raises(DataError, match="does not fit seq_len 4"):
        pack_bounds(np.array([3, 6]), 4)
    np.testing.assert_array_equal(pack_bounds(np.array([3, 3, 4, 2]), 5), [0, 2, 4])


def test_a_bad_record_in_a_worker_names_where(tmp_path, bpe, pairs):
    bad = [*pairs[:100], ("bad.jsonl:7", {"instruction": "x"}), *pairs[100:200]]
    with pytest.raises(DataError, match=r"bad\.jsonl:7: record has no 'output' field"):
        build_cache(bad, bpe, cache_root=tmp_path, chunk_records=20, num_proc=2, **SETTINGS)
    assert not list(tmp_path.iterdir())


def test_fit_from_the_cache_trains_exactly_as_from_memory_and_reuses_it(tmp_path):
    """data.cache_dir: the same batches, so the same losses and weights; the second run (and a
    resume with another data.num_proc) tokenizes nothing and finds the one cache folder."""
    from test_trainer import params_of, tiny_config, write_data

    from jft.train import fit

    data = write_data(tmp_path / "train.jsonl")
    common = dict(train__max_steps=4, train__eval_every=0, eval__num_examples=0)
    memory = fit(tiny_config(data, **common), tmp_path / "memory")
    cache_dir = tmp_path / "cache"
    cached = fit(tiny_config(data, data__cache_dir=str(cache_dir), **common), tmp_path / "cached")
    assert cached["after"]["loss"] == memory["after"]["loss"]
    a, b = params_of(tmp_path / "memory"), params_of(tmp_path / "cached")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    folders = sorted(p for p in cache_dir.iterdir() if not p.name.startswith("."))
    assert len(folders) == 1 and (folders[0] / "manifest.json").is_file()
    more = dict(common, train__max_steps=6, data__cache_dir=str(cache_dir), data__num_proc=2)
    resumed = fit(tiny_config(data, **more), tmp_path / "cached")  # resumes; num_proc may change
    assert resumed["steps"] == 6 and sorted(p for p in cache_dir.iterdir() if not p.name.startswith(".")) == folders


def test_fit_streams_a_mixture_from_disk_and_resumes_exactly(tmp_path, monkeypatch):
    """data.mixture of a folder of .txt shards (75%) and an instruction file, with data.cache_dir and
    data.validation: the training files are read only by the cache's workers, and a run resumed
    from step 3 of 6 (mid-epoch) ends with the weights of the unbroken run."""
    from test_trainer import WORDS, params_of, tiny_config, write_data

    import jft.data
    from jft.train import fit

    data, val = write_data(tmp_path / "train.jsonl"), write_data(tmp_path / "val.jsonl", n=8)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        lines = (" ".join(rng.choice(WORDS, rng.integers(4, 20))) for _ in range(40))
        (corpus / f"part-{i}.txt").write_text("\n".join(lines) + "\n")
    texts = [json.dumps(r) for _, r in load_records(data)] + [r["text"] for _, r in load_records(corpus)]
    train_bpe_tokenizer(texts, vocab_size=300).save_pretrained(tmp_path / "tok")
    loaded = []
    real = jft.data.load_records
    monkeypatch.setattr(jft.data, "load_records", lambda source, **kw: loaded.append(str(source)) or real(source, **kw))
    common = dict(
        tokenizer__train_on_data=False,
        tokenizer__path=str(tmp_path / "tok"),
        data__train="",
        data__mixture=((str(corpus), 0.75), (str(data), 0.25)),
        data__validation=str(val),
        data__cache_dir=str(tmp_path / "cache"),
        train__eval_every=0,
        train__checkpoint_every=3,
        eval__num_examples=0,
    )
    whole = fit(tiny_config(data, train__max_steps=6, **common), tmp_path / "whole")
    assert loaded == [str(val)]  # the training sources were read by the cache's workers only
    assert "mixture of 2 sources (0.75: " in whole["train_data"]
    part = tmp_path / "part"  # the unbroken run as it was at step 3 (mid-epoch), killed there
    shutil.copytree(tmp_path / "whole", part, ignore=shutil.ignore_patterns("6", "hf", "best", "report.json"))
    resumed = fit(tiny_config(data, train__max_steps=6, data__num_proc=2, **common), part)
    assert (resumed["resumed_from"], resumed["steps_run"]) == (3, 3)
    assert abs(resumed["after"]["loss"] - whole["after"]["loss"]) < 1e-6
    a, b = params_of(tmp_path / "whole"), params_of(tmp_path / "part")
    assert all(np.allclose(x, y, atol=1e-6) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    with pytest.raises(Exception, match="tokenizer.train_on_data reads every training record"):
        fit(tiny_config(data, **{**common, "tokenizer__train_on_data": True}), tmp_path / "refused")
