"""A score does not depend on how the rows are split among sites."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedmte
from fedmte.protocol.scorers import SCORERS
from tests.datasets import make

DATA = make("partitioned", n=90, d=7, classes=3, offset=5.0, seed=11)
SINGLE_SITE = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=list(SCORERS))


def partitions(sites: int) -> st.SearchStrategy[list[np.ndarray]]:
    """Uneven, random partitions of the rows into ``sites`` sites; the last site always holds
    no row (an empty site adds nothing), and any other may be empty too."""
    n = len(DATA.labels)

    def build(assignment: list[int]) -> list[np.ndarray]:
        owner = np.asarray(assignment)
        return [np.flatnonzero(owner == k) for k in range(sites)]

    return st.lists(st.integers(0, sites - 2), min_size=n, max_size=n).map(build)


@pytest.mark.parametrize("sites", [2, 3, 7])
@pytest.mark.parametrize("name", list(SCORERS))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_split_does_not_change_score(name: str, sites: int, data: st.DataObject) -> None:
    split = data.draw(partitions(sites))
    got = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=[name], sites=split)[name]
    want = SINGLE_SITE[name]
    assert abs(got - want) <= 1e-10 * max(abs(want), 1e-12), f"{name}: {sites} sites {got!r} vs 1 site {want!r}"


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_batch_size_does_not_change_score(batch_size: int) -> None:
    got = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=list(SCORERS), batch_size=batch_size)
    for name, value in got.items():
        assert abs(value - SINGLE_SITE[name]) <= 1e-10 * max(abs(SINGLE_SITE[name]), 1e-12), name


def test_integer_site_count_splits_unevenly() -> None:
    from fedmte.protocol.inputs import uneven_split

    parts = uneven_split(100, 4)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 100 and len(set(sizes)) == 4 and min(sizes) >= 1
    assert np.array_equal(np.concatenate(parts), np.arange(100))
