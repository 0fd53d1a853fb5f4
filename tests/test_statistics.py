"""The statistics algebra: additive, identity, validated, and plain arrays on the wire."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmte.protocol import symmetric
from fedmte.protocol.catalogue import STATISTICS, Batch, accumulate, expected_shape
from fedmte.protocol.errors import InvalidInputError, StatisticsError, UnknownStatisticError
from fedmte.protocol.requests import Stat, Transform
from fedmte.protocol.statistics import Statistics

rng = np.random.default_rng(3)
N, D, C, CS = 50, 4, 3, 5
X = rng.normal(size=(N, D))
Y = np.sort(rng.integers(0, C, N))
P = rng.dirichlet(np.ones(CS), N)

OFFSET = (Transform.of("offset", offset=np.full(D, 0.5)),)
WEIGHTS = rng.uniform(0.1, 1.0, size=(C, CS))
REQUESTS = [
    Stat.of("count"),
    Stat.of("class_counts"),
    Stat.of("sum", OFFSET),
    Stat.of("class_sums", OFFSET),
    Stat.of("gram", OFFSET),
    Stat.of("class_sq_sums", OFFSET),
    Stat.of("class_scatters", OFFSET),
    Stat.of("norm4_sum", OFFSET),
    Stat.of("norm2_weighted_sum", OFFSET),
    Stat.of("soft_joint"),
    Stat.of("hard_joint"),
    Stat.of("mixture_loglik", weights=WEIGHTS),
    Stat.of("true_class_prob_sum", OFFSET, coef=rng.normal(size=(C, D)), bias=rng.normal(size=C), passes=2),
]


def batches(rows: np.ndarray, size: int = 8):
    for start in range(0, len(rows), size):
        idx = rows[start : start + size]
        yield Batch(features=X[idx], labels=Y[idx], num_classes=C, source_probs=P[idx])


def row_by_row(stat: Stat) -> np.ndarray:
    """The obvious loop over single rows, written without the catalogue's vectorisation."""
    x = X - 0.5
    out = None
    for i in range(N):
        xi, yi, pi = x[i], Y[i], P[i]
        onehot = np.eye(C)[yi]
        value = {
            "count": lambda: np.int64(1),
            "class_counts": lambda: onehot.astype(np.int64),
            "sum": lambda: xi,
            "class_sums": lambda: np.outer(onehot, xi),
            "gram": lambda: symmetric.pack(np.outer(xi, xi)),
            "class_sq_sums": lambda: np.outer(onehot, xi * xi),
            "class_scatters": lambda: np.outer(onehot, symmetric.pack(np.outer(xi, xi))),
            "norm4_sum": lambda: (xi @ xi) ** 2,
            "norm2_weighted_sum": lambda: (xi @ xi) * xi,
            "soft_joint": lambda: np.outer(onehot, pi),
            "hard_joint": lambda: np.outer(onehot, np.eye(CS)[np.argmax(pi)]).astype(np.int64),
            "mixture_loglik": lambda: np.log(pi @ WEIGHTS[yi]),
            "true_class_prob_sum": lambda: _double_softmax(xi @ stat.arrays["coef"].T + stat.arrays["bias"])[yi],
        }[stat.kind]()
        out = value if out is None else out + value
    return np.asarray(out)


def _double_softmax(z: np.ndarray) -> np.ndarray:
    for _ in range(2):
        z = np.exp(z - z.max())
        z = z / z.sum()
    return z


def test_catalogue_is_covered() -> None:
    assert {s.kind for s in REQUESTS} <= set(STATISTICS)


@pytest.mark.parametrize("stat", REQUESTS, ids=lambda s: s.kind)
def test_each_statistic_equals_a_row_by_row_loop(stat: Stat) -> None:
    got = accumulate([stat], batches(np.arange(N)))[stat.key]
    shape, dtype = expected_shape(stat, D, C, CS)
    assert got.shape == shape and got.dtype == dtype
    np.testing.assert_allclose(got, row_by_row(stat), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(owner=st.lists(st.integers(0, 3), min_size=N, max_size=N), size=st.integers(1, 60))
def test_any_split_and_batching_sums_to_the_pooled_statistics(owner: list[int], size: int) -> None:
    owner_arr = np.asarray(owner)
    pooled = accumulate(REQUESTS, batches(np.arange(N)))
    total = Statistics.empty()
    for site in range(4):  # some sites may be empty, and some lack classes
        total = total + accumulate(REQUESTS, batches(np.flatnonzero(owner_arr == site), size))
    assert total.keys() == pooled.keys()
    for key in pooled:
        np.testing.assert_allclose(total[key], pooled[key], rtol=1e-11, atol=1e-11)
        assert total[key].dtype == pooled[key].dtype


def test_empty_is_the_identity_and_addition_commutes() -> None:
    a = accumulate(REQUESTS, batches(np.arange(0, 20)))
    b = accumulate(REQUESTS, batches(np.arange(20, N)))
    assert (Statistics.empty() + a) is a and (a + Statistics.empty()) is a
    assert len(accumulate(REQUESTS, iter(()))) == 0  # a site with no rows sends the identity
    for key in a:
        np.testing.assert_array_equal((a + b)[key], (b + a)[key])


def test_values_are_read_only_copies() -> None:
    source = np.ones(3)
    stats = Statistics({"s": source})
    source[0] = 5
    assert stats["s"][0] == 1
    with pytest.raises(ValueError, match="read-only"):
        stats["s"][0] = 2


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ({"s": np.ones(3, dtype=np.float32)}, "only float64 and int64"),
        ({"s": np.array([1.0, np.nan])}, "NaN or Inf"),
        ({"s": np.array([np.inf])}, "NaN or Inf"),
        ({"": np.ones(1)}, "non-empty strings"),
        ({"s": np.array(["x"])}, "only float64 and int64"),
    ],
)
def test_invalid_blocks_are_refused(blocks: dict, message: str) -> None:
    with pytest.raises(StatisticsError, match=message):
        Statistics(blocks)


def test_mismatched_sums_are_refused() -> None:
    with pytest.raises(StatisticsError, match="different keys"):
        Statistics({"a": np.ones(2)}) + Statistics({"b": np.ones(2)})
    with pytest.raises(StatisticsError, match=r"\(2,\) float64 vs \(3,\) float64"):
        Statistics({"a": np.ones(2)}) + Statistics({"a": np.ones(3)})
    with pytest.raises(StatisticsError, match="should be"):
        Statistics({"a": np.ones(2)}).check_shapes({"a": ((3,), np.dtype(np.float64))})


def test_round_trip_through_npz_without_pickle() -> None:
    stats = accumulate(REQUESTS, batches(np.arange(N)))
    buffer = io.BytesIO()
    np.savez(buffer, **stats.to_arrays())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as loaded:
        back = Statistics.from_arrays({k: loaded[k] for k in loaded.files})
    for key in stats:
        np.testing.assert_array_equal(back[key], stats[key])


def test_identical_requests_share_a_key_and_different_ones_do_not() -> None:
    a = Stat.of("gram", (Transform.of("offset", offset=np.zeros(D)),))
    b = Stat.of("gram", (Transform.of("offset", offset=np.zeros(D)),))
    c = Stat.of("gram", (Transform.of("offset", offset=np.ones(D)),))
    assert a.key == b.key != c.key
    assert Stat.of("class_sums").key != Stat.of("class_sq_sums").key


def test_unknown_kinds_and_bad_arguments_are_refused() -> None:
    with pytest.raises(UnknownStatisticError, match="unknown statistic 'pickle'"):
        accumulate([Stat.of("pickle")], batches(np.arange(N)))
    with pytest.raises(UnknownStatisticError, match="unknown transform 'exec'"):
        expected_shape(Stat.of("sum", (Transform.of("exec"),)), D, C, CS)
    with pytest.raises(InvalidInputError, match="'offset' argument 'offset' should have shape"):
        expected_shape(Stat.of("sum", (Transform.of("offset", offset=np.zeros(D + 1)),)), D, C, CS)


def test_pack_round_trip() -> None:
    m = rng.normal(size=(5, 5))
    m = m + m.T
    assert symmetric.pack(m).shape == (15,)
    np.testing.assert_array_equal(symmetric.unpack(symmetric.pack(m)), m)
    with pytest.raises(ValueError, match="not the size of an upper triangle"):
        symmetric.unpack(np.ones(7))
