"""jft.stats: t quantiles, intervals, paired bootstrap, buckets; and the SFT slice report end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_trainer import tiny_config, write_data

from jft import metrics as jmetrics
from jft import stats
from jft.train import fit

# ---------------------------------------------------------------------------- t quantile + closed form

# two-sided 95% Student t critical values from printed tables (df: t_{0.975, df})
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042, 120: 1.980}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_tables(df):
    assert stats.t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=6e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-T_TABLE[df], abs=6e-4)


def test_t_quantile_matches_scipy_when_present():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 25, 200):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)


def test_mean_interval_hand_computed_n5():
    # mean 3, sample sd sqrt(2.5), half width 2.776445 * sqrt(2.5) / sqrt(5) = 1.963243
    mean, low, high = stats.mean_interval([1, 2, 3, 4, 5])
    assert mean == 3
    assert (low, high) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-5)
    mean, low, high = stats.mean_interval([2.0, 4.0])  # df 1: 12.7062 * sqrt(2) / sqrt(2)
    assert (low, high) == pytest.approx((3 - 12.7062, 3 + 12.7062), abs=1e-3)
    assert math.isnan(stats.mean_interval([7.0])[1])
    with pytest.raises(ValueError):
        stats.mean_interval([])


# ---------------------------------------------------------------------------- bootstrap


def test_bootstrap_of_a_mean_agrees_with_the_closed_form():
    """n = 2000 normal values: the percentile bootstrap bounds are within 10% of the t interval's
    half width (0.0044 sd here) of the closed-form bounds."""
    x = np.random.default_rng(1).normal(5.0, 2.0, 2000)
    mean, low, high = stats.mean_interval(x)
    b_mean, b_low, b_high = stats.bootstrap_interval(x, n_resamples=2000, seed=0)
    half = (high - low) / 2
    assert b_mean == pytest.approx(mean)
    assert abs(b_low - low) < 0.1 * half and abs(b_high - high) < 0.1 * half


def test_bootstrap_is_deterministic_for_a_seed_and_takes_a_statistic_fn():
    x = np.random.default_rng(2).exponential(size=50)
    assert stats.bootstrap_interval(x, seed=3) == stats.bootstrap_interval(x, seed=3)
    assert stats.bootstrap_interval(x, seed=3) != stats.bootstrap_interval(x, seed=4)
    num, den = x, np.arange(1, 51.0)
    ratio = lambda idx: num[idx].sum() / den[idx].sum()
    value, low, high = stats.bootstrap_interval(ratio, n=50, n_resamples=300)
    assert value == pytest.approx(num.sum() / den.sum()) and low < value < high
    with pytest.raises(ValueError, match="needs n"):
        stats.bootstrap_interval(ratio)


def test_bootstrap_of_corpus_bleu_is_sacrebleus_score():
    preds = ["the cat sat on the mat", "a dog runs", "hello world there", "le chat noir est là"]
    refs = ["the cat sat on a mat", "the dog runs", "hello world", "le chat est noir"]
    fns = jmetrics.metric_statistics(preds, refs, ("bleu", "chrf", "rouge", "exact_match"))
    full = jmetrics.text_metrics(preds, refs)
    for name, fn in fns.items():
        assert fn(np.arange(4)) == pytest.approx(full[name]), name
    value, low, high = stats.bootstrap_interval(fns["bleu"], n=4, n_resamples=200)
    assert value == pytest.approx(full["bleu"]) and 0 <= low <= high <= 100


def test_paired_comparison_clear_difference_and_identical_systems():
    rng = np.random.default_rng(0)
    a = rng.normal(2.0, 1.0, 100)
    b = a - 0.5 + rng.normal(0.0, 0.1, 100)  # b is clearly lower on every example
    out = stats.paired_comparison(a, b, seed=0)
    assert out["significant"] and out["p_value"] < 0.01
    assert out["difference"] == pytest.approx(b.mean() - a.mean()) and out["high"] < 0
    same = stats.paired_comparison(a, a.copy(), seed=0)
    assert not same["significant"] and same["p_value"] == 1.0 and same["difference"] == 0
    noise = stats.paired_comparison(a, a + rng.normal(0, 1e-3, 100) * rng.choice([-1, 1], 100))
    assert noise["low"] <= 0 <= noise["high"]
    with pytest.raises(ValueError, match="same examples"):
        stats.paired_comparison(a, b[:10])


# ---------------------------------------------------------------------------- buckets


def test_length_buckets_edges_and_boundaries():
    labels = stats.length_buckets([1, 12, 13, 20, 21, 40, 41, 500], edges=(12, 20, 40))
    # a length equal to an edge is in the bucket that edge closes
    assert labels == ["<=12", "<=12", "13-20", "13-20", "21-40", "21-40", ">40", ">40"]
    assert stats.length_buckets([5, 6, 7], edges=(5, 6)) == ["<=5", "6", ">6"]
    quart = stats.length_buckets(list(range(1, 101)))  # edges at the quartiles 25, 50, 75
    assert quart[24] == "<=25" and quart[25] == "26-50" and quart[74] == "51-75" and quart[75] == ">75"
    assert {quart.count(k) for k in set(quart)} == {25}
    assert stats.length_buckets([3, 3, 3]) == ["<=3", "<=3", "<=3"]
    assert sorted(["26-50", ">75", "<=25", "51-75"], key=stats.length_order) == ["<=25", "26-50", "51-75", ">75"]


def test_frequency_buckets_unseen_and_powers_of_two():
    got = stats.frequency_buckets([0, 1, 2, 3, 4, 7, 8, 1023, 1024, 10**6])
    assert got == ["0", "1", "2-3", "2-3", "4-7", "4-7", "8-15", "512-1023", ">=1024", ">=1024"]
    assert sorted(set(got), key=stats.frequency_order)[0] == "0"  # unseen first


def test_field_slices_and_groups():
    records = [{"topic": "a"}, {"topic": "b"}, {}, {"topic": 3}]
    labels = stats.field_slices(records, "topic")
    assert labels == ["a", "b", "(missing)", "3"]
    assert {k: v.tolist() for k, v in stats.groups(["x", "y", "x"]).items()} == {"x": [0, 2], "y": [1]}


# ---------------------------------------------------------------------------- end to end


def test_fit_writes_slice_report_with_counts_summing_to_total(tmp_path, capsys):
    data = write_data(tmp_path / "train.jsonl", n=32)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    for i, r in enumerate(records):
        r["topic"] = ("colors", "animals", "misc")[i % 3]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = tiny_config(data, train__max_steps=4, train__eval_every=0, train__checkpoint_every=0)
    cfg.export.hf = False
    cfg.eval.num_examples = 4
    cfg.eval.max_new_tokens = 4
    cfg.eval.metrics = ("bleu", "exact_match")
    cfg.eval.slices = True
    cfg.eval.slice_by = ("topic",)
    cfg.eval.length_edges = (10,)
    cfg.eval.bootstrap_resamples = 200
    report = fit(cfg, tmp_path / "run")
    path = Path(report["slices"])
    assert path == tmp_path / "run" / "slices.json"
    assert (tmp_path / "run" / "slices.png").is_file()
    slices = json.loads(path.read_text())
    after, total = slices["after"], slices["after"]["overall"]["count"]
    assert total == 8  # the held-out quarter of 32 records
    for name in ("prompt_length", "field:topic"):
        assert sum(v["count"] for v in after["slices"][name].values()) == total, name
        assert sum(v["tokens"] for v in after["slices"][name].values()) == after["overall"]["tokens"]
    assert set(after["slices"]["field:topic"]) <= {"colors", "animals", "misc"}
    assert sum(v["tokens"] for v in after["slices"]["target_frequency"].values()) == after["overall"]["tokens"]
    # scored unpacked, the overall loss is the validation loss of the packed rows
    assert after["overall"]["loss"]["value"] == pytest.approx(report["after"]["loss"], rel=1e-4)
    loss = after["overall"]["loss"]
    assert loss["low"] <= loss["value"] <= loss["high"]
    assert after["overall"]["generated"] == 4 and "bleu" in after["overall"]
    c = slices["comparison"]
    assert c["before"] == pytest.approx(report["before"]["loss"], rel=1e-4) and c["difference"] < 0
    table = jmetrics.slice_table(slices)
    assert table.splitlines()[0].startswith("| slice | bucket | count | tokens | loss |")
    assert "| field:topic |" in table and "paired bootstrap p =" in table
    assert table in capsys.readouterr().out
