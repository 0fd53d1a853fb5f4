"""The opt-in iterative scorers (nleep, pactran_dir, pactran_gamma) beyond pooled exactness:
opt-in, round counts and payloads, the agreed initialisation, and each federated step
(PCA, E-step sums, M-step) against scikit-learn."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

import fedmte
from fedmte.protocol import symmetric
from fedmte.protocol.catalogue import Batch, accumulate
from fedmte.protocol.errors import InvalidInputError, ScorerDomainError
from fedmte.protocol.inputs import check_inputs
from fedmte.protocol.local import InMemorySite
from fedmte.protocol.plan import default_scorers, execute, make_plan
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers import SCORERS, nleep, pactran
from fedmte.protocol.statistics import Statistics
from tests.datasets import DATASETS, make
from tests.refs import iterative

ITERATIVE = ("nleep", "pactran_dir", "pactran_gamma")


def close(got: float, want: float, rel: float = 1e-9) -> bool:
    return abs(got - want) <= rel * max(abs(want), 1e-12)


def batches(x: np.ndarray, labels: np.ndarray, size: int) -> list[Batch]:
    """Uneven batches, as a site streams them."""
    return [
        Batch(features=x[i : i + size], labels=labels[i : i + size], num_classes=int(labels.max()) + 1)
        for i in range(0, len(labels), size)
    ]


def sklearn_params(mixture: GaussianMixture) -> dict[str, np.ndarray]:
    return {
        "means": mixture.means_,
        "prec_chol": mixture.precisions_cholesky_,
        "log_weights": np.log(mixture.weights_),
    }


def test_iterative_scorers_are_opt_in() -> None:
    defaults = default_scorers(has_features=True, has_source_probs=True)
    planned = make_plan(None, has_features=True, has_source_probs=True).scorers
    for name in ITERATIVE:
        assert SCORERS[name].iterative
        assert name not in defaults and name not in planned
    assert make_plan(list(ITERATIVE), has_features=True, has_source_probs=True).scorers == ITERATIVE


@pytest.mark.parametrize("name", ["pactran_dir", "pactran_gamma"])
def test_pactran_takes_eleven_rounds_of_c_by_cs_floats(name: str) -> None:
    data = DATASETS["basic"]
    c, cs = data.num_classes, data.source_probs.shape[1]
    result = fedmte.score_detailed(None, data.labels, source_probs=data.source_probs, scorers=[name], sites=3)
    assert SCORERS[name].rounds == 11
    assert len(result.rounds) == 11
    assert result.rounds[0].nbytes == 8 * (c + c * cs)  # class counts and Y^T theta
    assert all(r.nbytes == 8 * c * cs and r.kinds == ["tilted_joint"] for r in result.rounds[1:10])
    assert "tilted_kl_sum" in result.rounds[10].kinds


@pytest.mark.parametrize("dataset", ["basic", "binary", "many_classes", "large_offset"])
def test_nleep_stops_at_scikit_learns_iteration(dataset: str) -> None:
    """Centring + PCA moments + one round per EM iteration + 2 LEEP rounds, with the EM
    iteration count equal to scikit-learn's from the same start."""
    data = DATASETS[dataset]
    mixture, reduced = iterative.nleep_mixture(data.features, data.labels)
    result = fedmte.score_detailed(data.features, data.labels, scorers=["nleep"], sites=3)
    assert mixture.converged_
    assert len(result.rounds) == 1 + 1 + mixture.n_iter_ + 2
    assert len(result.rounds) <= make_plan(["nleep"], has_features=True, has_source_probs=False).rounds == 104
    k, components = reduced.shape[1], mixture.n_components
    em_round = result.rounds[2]
    assert em_round.kinds == ["gmm_loglik", "gmm_moments"]
    assert em_round.nbytes == 8 * (components * (1 + k + k * (k + 1) // 2) + 1)


def _first_broadcast(
    features: np.ndarray, labels: np.ndarray, sites: Sequence[np.ndarray]
) -> tuple[dict[str, np.ndarray], float]:
    """The mixture the coordinator broadcasts in the first EM round, and the final score."""
    inputs = check_inputs(features, labels)
    members = [InMemorySite(inputs, np.asarray(rows)) for rows in sites]
    requests: list[Stat] = []

    def aggregate(stats: Sequence[Stat]) -> Statistics:
        requests.extend(stats)
        return sum((site.compute(stats) for site in members), Statistics.empty())

    plan = make_plan(["nleep"], has_features=True, has_source_probs=False)
    result = execute(plan, aggregate, dim=inputs.dim, num_classes=inputs.num_classes)
    first = next(stat for stat in requests if stat.kind == "gmm_moments")
    return first.arrays, result.scores["nleep"]


def test_nleep_initialisation_is_identical_for_one_and_many_sites() -> None:
    data = DATASETS["basic"]
    n = len(data.labels)
    one, score_one = _first_broadcast(data.features, data.labels, [np.arange(n)])
    rows = np.random.default_rng(7).permutation(n)
    many, score_many = _first_broadcast(data.features, data.labels, [rows[:5], rows[5:90], rows[90:]])
    for key in ("means", "prec_chol", "log_weights"):
        np.testing.assert_allclose(many[key], one[key], rtol=1e-12, atol=1e-12)
    assert close(score_many, score_one, 1e-12)
    # and it is the documented rule applied to scikit-learn's own PCA of the pooled rows
    pca = PCA(n_components=0.8, svd_solver="full").fit(data.features)
    weights, means, precisions = iterative.agreed_initialisation(pca.explained_variance_, 5 * data.num_classes)
    np.testing.assert_allclose(one["means"], means, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.exp(one["log_weights"]), weights, rtol=1e-14)
    prec = np.einsum("jab,jcb->jac", one["prec_chol"], one["prec_chol"])
    np.testing.assert_allclose(prec, precisions, rtol=1e-10)


@pytest.mark.parametrize("dataset", ["basic", "d_gt_n"])
def test_pca_from_moments_matches_scikit_learn(dataset: str) -> None:
    features = DATASETS[dataset].features
    n = len(features)
    pca = nleep.pca_from_moments(n, features.sum(axis=0), features.T @ features)
    want = PCA(n_components=0.8, svd_solver="full").fit(features)
    assert pca.basis.shape[1] == want.n_components_
    np.testing.assert_allclose(pca.basis.T, want.components_, atol=1e-9)
    np.testing.assert_allclose(pca.variances, want.explained_variance_, rtol=1e-10)
    np.testing.assert_allclose(pca.mean, want.mean_, rtol=1e-12)


def test_gmm_statistics_equal_row_by_row_sums_of_scikit_learn_posteriors() -> None:
    data = DATASETS["basic"]
    mixture, x = iterative.nleep_mixture(data.features, data.labels)
    params = sklearn_params(mixture)
    names = {
        "moments": Stat.of("gmm_moments", **params),
        "loglik": Stat.of("gmm_loglik", **params),
        "joint": Stat.of("gmm_soft_joint", **params),
    }
    sums = accumulate(list(names.values()), batches(x, data.labels, 37))
    got = {local: sums[stat.key] for local, stat in names.items()}
    resp = mixture.predict_proba(x)
    k = x.shape[1]
    for j, mean in enumerate(mixture.means_):
        centred = x - mean
        want = np.concatenate(
            [
                [resp[:, j].sum()],
                resp[:, j] @ centred,
                symmetric.pack(np.einsum("i,ia,ib->ab", resp[:, j], centred, centred)),
            ]
        )
        np.testing.assert_allclose(got["moments"][j], want, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(want).max()))
    assert got["moments"].shape == (mixture.n_components, 1 + k + k * (k + 1) // 2)
    assert close(float(got["loglik"]), float(mixture.score_samples(x).sum()), 1e-12)
    np.testing.assert_allclose(got["joint"], np.eye(data.num_classes)[data.labels].T @ resp, rtol=1e-10, atol=1e-12)


def test_m_step_equals_one_scikit_learn_iteration() -> None:
    """From the agreed start (far from a fixed point, so the step moves a lot)."""
    data = DATASETS["binary"]
    pca = PCA(n_components=0.8, svd_solver="full")
    x = pca.fit_transform(data.features)
    components = 5 * data.num_classes
    weights, means, precisions = iterative.agreed_initialisation(pca.explained_variance_, components)
    params = {"means": means, "prec_chol": np.sqrt(precisions), "log_weights": np.log(weights)}  # diagonal
    moments = accumulate([Stat.of("gmm_moments", **params)], batches(x, data.labels, 50))
    got = nleep.m_step(means, next(iter(moments.values())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        once = GaussianMixture(
            n_components=components, reg_covar=1e-6, max_iter=1,
            weights_init=weights, means_init=means, precisions_init=precisions,
        ).fit(x)
    assert np.abs(once.means_ - means).max() > 0.1, "the step should move the means"
    np.testing.assert_allclose(got.weights, once.weights_, rtol=1e-10)
    np.testing.assert_allclose(got.means, once.means_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.covariances, once.covariances_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.prec_chol, once.precisions_cholesky_, rtol=1e-8, atol=1e-9)


def test_nleep_stopped_by_max_iter_warns_and_keeps_the_last_mixture(monkeypatch: pytest.MonkeyPatch) -> None:
    data = DATASETS["basic"]
    monkeypatch.setattr(nleep, "MAX_ITER", 2)
    with pytest.warns(UserWarning, match="did not converge in 2 rounds"):
        result = fedmte.score_detailed(data.features, data.labels, scorers=["nleep"], sites=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture, reduced = iterative.nleep_mixture(data.features, data.labels, max_iter=2)
    assert not mixture.converged_
    assert len(result.rounds) == 1 + 1 + 2 + 2
    assert close(result.scores["nleep"], iterative.google_leep(mixture.predict_proba(reduced), data.labels))


def test_nleep_needs_five_rows_per_class() -> None:
    data = make("tiny", n=12, d=4, classes=3, seed=11)  # 5C = 15 components > 12 rows
    with pytest.raises(ScorerDomainError, match="needs at least that many rows"):
        fedmte.score(data.features, data.labels, scorers=["nleep"])
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        iterative.nleep(data.features, data.labels)


def test_nleep_refuses_constant_features() -> None:
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ScorerDomainError, match="needs features that vary"):
        fedmte.score(np.ones((20, 3)), labels, scorers=["nleep"], sites=2)


def test_class_missing_from_the_pooled_data() -> None:
    """Labels {0, 2}: class 1 is in the label space but has no rows anywhere."""
    data = DATASETS["basic"]
    keep = data.labels != 1
    features, labels, probs = data.features[keep], data.labels[keep], data.source_probs[keep]
    assert set(np.unique(labels)) == {0, 2, 3}
    for name in ITERATIVE:
        want = iterative.REFERENCES[name](features, labels, probs)
        got = fedmte.score(features, labels, source_probs=probs, scorers=[name], sites=3)[name]
        assert close(got, want), f"{name}: {got!r} vs {want!r}"


def test_pactran_alpha_option_matches_reference() -> None:
    data = DATASETS["binary"]
    for name in ("pactran_dir", "pactran_gamma"):
        want = iterative.REFERENCES[name](None, data.labels, data.source_probs, alpha=0.3)
        got = fedmte.score(None, data.labels, source_probs=data.source_probs, scorers=[name], sites=2,
                           options={name: {"alpha": 0.3}})[name]
        assert close(got, want)
        assert not close(got, iterative.REFERENCES[name](None, data.labels, data.source_probs), 1e-4)
    with pytest.raises(InvalidInputError, match="alpha must be a positive number"):
        fedmte.score(None, data.labels, source_probs=data.source_probs, scorers=["pactran_dir"],
                     options={"pactran_dir": {"alpha": 0.0}})


def test_pactran_value_functions_from_a_closed_form_case() -> None:
    """With a_w = a0 (no data) and KL = 0, PACTran-Dir's bound is 0 and Gamma's is
    (log_mass - n) / (n C) + 1, whatever the prior."""
    a0 = pactran.prior(np.array([3, 1, 4]), alpha=1.0)
    posterior = np.repeat(a0[:, None], 5, axis=1)
    assert pactran.pac_dir_value(a0, posterior, kl=0.0, n=8) == pytest.approx(0.0, abs=1e-12)
    gamma = pactran.pac_gamma_value(a0, posterior, kl=0.0, log_mass=2.0, n=8)
    assert gamma == pytest.approx((2.0 - 8) / 24 + 1.0, rel=1e-12)
