"""Bad input gets a clear, typed error that names the problem, never a NaN score."""

from __future__ import annotations

import numpy as np
import pytest

import fedmte
from fedmte.protocol.errors import InvalidInputError, NotFederableError, UnknownScorerError
from fedmte.protocol.scorers import SCORERS
from tests.datasets import make

DATA = make("bad", n=60, d=5, classes=3, seed=21)


def score(**overrides):
    args = dict(features=DATA.features, labels=DATA.labels, source_probs=DATA.source_probs)
    args.update(overrides)
    features = args.pop("features")
    labels = args.pop("labels")
    return fedmte.score(features, labels, **args)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(bad: float) -> None:
    features = DATA.features.copy()
    features[7, 2] = bad
    with pytest.raises(InvalidInputError, match=r"NaN or Inf in 1 rows \(first: \[7\]\)"):
        score(features=features)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.full(60, 1.5), "non-integer"),
        (np.where(np.arange(60) == 3, -1, np.arange(60) % 3), "0..C-1; found -1"),
        (np.array(["a", "b"] * 30), "integers 0..C-1, got dtype"),
        (np.zeros((60, 1), dtype=int), "1-D array"),
        (np.zeros(60, dtype=int), "at least two classes"),
    ],
)
def test_bad_labels(labels: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        score(labels=labels)


def test_mismatched_lengths() -> None:
    with pytest.raises(InvalidInputError, match="features have 60 rows but labels have 59"):
        score(labels=DATA.labels[:59], source_probs=None)
    with pytest.raises(InvalidInputError, match="source_probs must be"):
        score(source_probs=DATA.source_probs[:10])


def test_probabilities_must_be_probabilities() -> None:
    with pytest.raises(InvalidInputError, match="apply softmax"):
        score(source_probs=DATA.source_probs * 3)
    negative = DATA.source_probs.copy()
    negative[0, 0] = -0.1
    with pytest.raises(InvalidInputError, match="non-negative"):
        score(source_probs=negative)


def test_an_empty_site_adds_nothing_and_bad_splits_are_refused() -> None:
    rows = np.arange(60)
    assert score(sites=[rows, np.array([], dtype=int)]) == score(sites=[rows])
    with pytest.raises(InvalidInputError, match="no site holds a row"):
        score(sites=[np.array([], dtype=int)])
    with pytest.raises(InvalidInputError, match="exactly once"):
        score(sites=[rows[:30], rows[20:]])
    with pytest.raises(InvalidInputError, match="outside 0..59"):
        score(sites=[np.arange(61)])
    with pytest.raises(InvalidInputError, match="cannot split 60 rows into 61"):
        score(sites=61)


def test_unknown_and_unfederable_scorers() -> None:
    with pytest.raises(UnknownScorerError, match="unknown scorer 'logmee'; choose from: logme"):
        score(scorers=["logmee"])
    for name in ("parc", "knn"):
        with pytest.raises(NotFederableError, match=f"{name} cannot be federated"):
            score(scorers=[name])


@pytest.mark.parametrize("name", [n for n, s in SCORERS.items() if s.needs_source_probs])
def test_source_scorers_need_probabilities(name: str) -> None:
    with pytest.raises(InvalidInputError, match="needs the source model's class probabilities"):
        score(source_probs=None, scorers=[name])


def test_unknown_option() -> None:
    with pytest.raises(InvalidInputError, match=r"unknown options \['gaussian'\] for gbc"):
        score(scorers=["gbc"], options={"gbc": {"gaussian": "diagonal"}})


@pytest.mark.parametrize("name", list(SCORERS))
def test_a_single_row_class_still_gives_a_finite_score(name: str) -> None:
    labels = np.zeros(60, dtype=int)
    labels[0] = 1  # class 1 has one row: zero variance, a rank-one scatter
    result = score(labels=labels, scorers=[name])
    assert np.isfinite(result[name])
