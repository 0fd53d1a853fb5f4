"""Every federable scorer equals its independent reference on awkward pooled data."""

from __future__ import annotations

import numpy as np
import pytest

import fedmte
from fedmte.protocol.scorers import SCORERS
from tests.datasets import DATASETS, site_split_without_class
from tests.refs import REFERENCES, TOLERANCES

RELATIVE = 1e-9


def close(got: float, want: float, rel: float) -> bool:
    return abs(got - want) <= rel * max(abs(want), 1e-12)


def test_every_registered_scorer_has_a_reference() -> None:
    assert set(SCORERS) == set(REFERENCES)


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("name", list(SCORERS))
def test_federated_score_equals_reference(name: str, dataset: str) -> None:
    data = DATASETS[dataset]
    want = REFERENCES[name](data.features.copy(), data.labels.copy(), data.source_probs.copy())
    got = fedmte.score(data.features, data.labels, source_probs=data.source_probs, scorers=[name], sites=3)[name]
    rel, _why = TOLERANCES.get((name, dataset), (RELATIVE, ""))
    assert np.isfinite(want), f"the reference itself is undefined on {dataset}"
    assert close(got, want, rel), f"{name} on {dataset}: federated {got!r} vs reference {want!r}"


@pytest.mark.parametrize("name", list(SCORERS))
def test_class_absent_from_one_site(name: str) -> None:
    data = DATASETS["basic"]
    sites = site_split_without_class(data, absent=0)
    assert not np.any(data.labels[sites[0]] == 0)
    want = REFERENCES[name](data.features.copy(), data.labels.copy(), data.source_probs.copy())
    got = fedmte.score(data.features, data.labels, source_probs=data.source_probs, scorers=[name], sites=sites)[name]
    assert close(got, want, RELATIVE), f"{name}: {got!r} vs {want!r}"


def test_gbc_diagonal_option_matches_reference() -> None:
    data = DATASETS["basic"]
    want = REFERENCES["gbc"](data.features, data.labels, gaussian_type="diagonal")
    got = fedmte.score(data.features, data.labels, scorers=["gbc"], sites=2, options={"gbc": {"gaussian_type": "diagonal"}})["gbc"]
    assert close(got, want, RELATIVE)
    assert not close(got, REFERENCES["gbc"](data.features, data.labels), 1e-3), "diagonal must differ from spherical"


def test_logme_ignores_dead_feature_columns_whatever_the_split() -> None:
    """Dead ReLU units give exactly-zero columns: null directions of F^T F whose rounding
    noise must not enter the score (it would change with the site split). The reference
    keeps them as noise with negligible weight, which equals dropping the dead columns."""
    data = DATASETS["basic"]
    features = np.maximum(data.features, 0.0)
    dead = [1, 4, 7]
    features[:, dead] = 0.0
    live = [j for j in range(features.shape[1]) if j not in dead]
    scores = [fedmte.score(features, data.labels, scorers=["logme"], sites=k)["logme"] for k in (1, 2, 3, 7)]
    assert max(scores) - min(scores) <= 1e-10 * abs(scores[0])
    assert close(scores[0], REFERENCES["logme"](features.copy(), data.labels.copy()), RELATIVE)
    assert close(scores[0], REFERENCES["logme"](features[:, live].copy(), data.labels.copy()), RELATIVE)


def test_dp_noised_counts_stay_in_the_scorers_domain() -> None:
    """DP noise can make a released count negative; NCE and LogME must not turn that into NaN,
    and their exact-data values must not move."""
    from fedmte.protocol.scorers.logme import logme_from_moments
    from fedmte.protocol.scorers.source_label import nce_from_counts

    joint = np.array([[5.0, 0.0, 2.0], [1.0, 4.0, 0.0]])
    noisy = joint.copy()
    noisy[0, 1] = -2.0  # noise on an empty cell
    assert nce_from_counts(noisy) == nce_from_counts(joint)
    data = DATASETS["basic"]
    f, y = data.features, data.labels
    counts = np.bincount(y).astype(float)
    class_sums = np.stack([f[y == c].sum(axis=0) for c in range(len(counts))])
    exact = logme_from_moments(f.T @ f, class_sums, counts)
    assert close(exact, REFERENCES["logme"](f.copy(), y.copy()), RELATIVE)
    counts_noisy = counts.copy()
    counts_noisy[0] = 1.0  # far below ||U^T y_0||^2: the residual would go negative
    assert np.isfinite(logme_from_moments(f.T @ f, class_sums, counts_noisy))
