"""Mixtures of sources: counts per epoch, every row visited, seeded and resumable batches; a host's
share of each batch."""

import numpy as np
import pytest

from jft.data import Batches, DataError
from jft.data.mixture import Mixture


def rows(source: int, n: int) -> list[dict]:
    ids = lambda i: np.full(4, 100 * source + i, np.int32)
    return [{"input_ids": ids(i), "loss_weights": np.ones(4, np.float32)} for i in range(n)]


@pytest.mark.parametrize("sizes, weights", [((90, 7), (0.9, 0.1)), ((10, 500), (0.5, 0.5)), ((3, 4, 40), (1, 1, 2))])
def test_every_row_at_least_once_at_the_weights(sizes, weights):
    mix = Mixture([rows(s, n) for s, n in enumerate(sizes)], weights, seed=3)
    seen = [mix.source_row(i) for i in range(len(mix))]
    share = np.bincount([s for s, _ in seen], minlength=len(sizes)) / len(mix)
    np.testing.assert_allclose(share, np.asarray(weights) / sum(weights), atol=0.02 + 2 / len(mix))
    for s, n in enumerate(sizes):
        counts = np.bincount([r for t, r in seen if t == s], minlength=n)
        assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # repeats spread evenly
    assert [mix[i]["input_ids"][0] for i in range(len(mix))] == [100 * s + r for s, r in seen]
    again = Mixture([rows(s, n) for s, n in enumerate(sizes)], weights, seed=3)
    assert [again.source_row(i) for i in range(len(mix))] == seen
    assert "mixture of" in mix.describe()


def test_mixture_errors():
    with pytest.raises(DataError, match="one weight per source"):
        Mixture([rows(0, 3)], [0.5, 0.5], 0)
    with pytest.raises(DataError, match="must all be > 0"):
        Mixture([rows(0, 3), rows(1, 3)], [1.0, 0.0], 0)
    with pytest.raises(DataError, match="source 1 has no rows"):
        Mixture([rows(0, 3), []], [1.0, 1.0], 0)
    with pytest.raises(IndexError):
        Mixture([rows(0, 3)], [1.0], 0)[3]


def test_batches_of_a_mixture_resume_and_split_over_hosts():
    mix = Mixture([rows(0, 30), rows(1, 5)], [0.8, 0.2], seed=0)
    whole = Batches(mix, batch_size=8, seed=1, drop_remainder=False)
    want = [next(whole) for _ in range(2 * whole.steps_per_epoch + 1)]  # into a third epoch
    resumed = Batches(mix, batch_size=8, seed=1, drop_remainder=False)
    resumed.restore({"epoch": 1, "index": 2})
    got = [next(resumed) for _ in range(len(want) - whole.steps_per_epoch - 2)]
    for a, b in zip(got, want[whole.steps_per_epoch + 2 :], strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    # two hosts of two accumulation steps: host h holds micro-batch rows [2h, 2h + 2) of each step
    shares = [np.asarray([a * 4 + 2 * h + m for a in range(2) for m in range(2)]) for h in range(2)]
    hosts = [Batches(mix, batch_size=8, seed=1, drop_remainder=False, positions=p) for p in shares]
    for batch in want:
        for host, p in zip(hosts, shares, strict=True):
            mine = next(host)
            for k in batch:
                np.testing.assert_array_equal(mine[k], batch[k][p])
    assert (want[whole.steps_per_epoch - 1]["loss_weights"][-1] == 0).all()  # the last batch's filler rows
