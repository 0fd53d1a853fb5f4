"""SFDA and PED specifics: rounds, no mutation, ConfMix on the site, PED's options and descent."""

from __future__ import annotations

import numpy as np
import pytest

import fedmte
from fedmte.protocol.catalogue import Batch, accumulate, view_dim
from fedmte.protocol.errors import InvalidInputError, ScorerDomainError
from fedmte.protocol.requests import Stat, Transform
from fedmte.protocol.scorers.ped import potential_energy_descent
from fedmte.protocol.scorers.sfda import top_eigenvalue
from tests.datasets import DATASETS, make
from tests.refs import sfda as refs

RELATIVE = 1e-9
BASIC = DATASETS["basic"]


def close(got: float, want: float, rel: float = RELATIVE) -> bool:
    return abs(got - want) <= rel * max(abs(want), 1e-12)


def public_set(dim: int, seed: int = 21) -> np.ndarray:
    """A stand-in for the public reference set (ImageNet-val features in the paper)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(400, dim)) * rng.uniform(0.3, 3.0, size=dim) + rng.normal(size=dim)


# --------------------------------------------------------------------------- protocol shape

@pytest.mark.parametrize("name", ["sfda", "ped"])
def test_three_rounds_plus_centring(name: str) -> None:
    centred = fedmte.score_detailed(BASIC.features, BASIC.labels, scorers=[name], sites=3)
    assert len(centred.rounds) == 4
    assert centred.rounds[0].kinds == ["count", "sum"]  # the centring round
    assert centred.rounds[-1].kinds == ["true_class_prob_sum"]
    public = fedmte.score_detailed(BASIC.features, BASIC.labels, scorers=[name], sites=3, offset=BASIC.features[0])
    assert len(public.rounds) == 3
    assert close(public.scores[name], centred.scores[name], 1e-12)


def test_sfda_and_ped_run_in_lockstep() -> None:
    together = fedmte.score_detailed(BASIC.features, BASIC.labels, scorers=["sfda", "ped"])
    assert len(together.rounds) == 4
    for name in ("sfda", "ped"):
        assert together.scores[name] == fedmte.score(BASIC.features, BASIC.labels, scorers=[name])[name]
    assert not close(together.scores["sfda"], together.scores["ped"], 1e-3), "PED must move the classes here"


@pytest.mark.parametrize("name", ["sfda", "ped"])
def test_caller_arrays_are_not_modified(name: str) -> None:
    # The reference overwrites its feature array with the ConfMix-ed rows.
    features, labels = BASIC.features.copy(), BASIC.labels.copy()
    fedmte.score(features, labels, scorers=[name], sites=2)
    assert np.array_equal(features, BASIC.features) and np.array_equal(labels, BASIC.labels)


def _confmix_args(num_classes: int, dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "coef": rng.normal(size=(num_classes, dim)),
        "bias": rng.normal(size=num_classes),
        "others_mean": rng.normal(size=(num_classes, dim)),
    }


def test_confmix_transform_matches_rows_and_never_writes_its_input() -> None:
    data = make("confmix", n=50, d=4, classes=3, seed=8)
    features = data.features.copy()
    features.setflags(write=False)  # an in-place update would raise
    args = _confmix_args(3, 4)
    view = (Transform.of("confmix", passes=2, **args),)
    stat = Stat.of("class_sums", view)
    batches = [Batch(features[i : i + 16], data.labels[i : i + 16], 3) for i in range(0, 50, 16)]
    got = accumulate([stat], batches)[stat.key]

    want = np.zeros((3, 4))
    for x, y in zip(data.features, data.labels):
        logits = args["coef"] @ x + args["bias"]
        p = np.exp(logits) / np.exp(logits).sum()
        p = np.exp(p) / np.exp(p).sum()  # SFDA's second softmax
        want[y] += p[y] * x + (1 - p[y]) * args["others_mean"][y]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.array_equal(features, data.features)


def test_confmix_refuses_ill_shaped_arguments() -> None:
    args = _confmix_args(3, 4)
    args["others_mean"] = args["others_mean"][:, :2]
    with pytest.raises(InvalidInputError, match="'confmix' argument 'others_mean' should have shape"):
        view_dim((Transform.of("confmix", **args),), 4, 3)


# --------------------------------------------------------------------------- SFDA numerics

def test_power_iteration_finds_a_well_separated_top_eigenvalue() -> None:
    rng = np.random.default_rng(5)
    basis = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    matrix = (basis * np.array([9.0, 1.0, 0.8, 0.5, 0.2, 0.1])) @ basis.T
    assert close(top_eigenvalue(matrix), float(np.linalg.eigvalsh(matrix)[-1]), 1e-9)


def test_power_iteration_refuses_vanishing_row_sums() -> None:
    with pytest.raises(ScorerDomainError, match="row sums vanish"):
        top_eigenvalue(np.array([[1.0, -1.0], [-1.0, 1.0]]))


@pytest.mark.parametrize(("n", "d"), [(200, 8), (30, 50)])
def test_adaptive_shrinkage_regime_matches_reference(n: int, d: int) -> None:
    # The shared datasets all have lambda at its 1e-10 floor; small features give a real lambda.
    data = make("small", n=n, d=d, classes=4, seed=9)
    features = data.features * 0.05
    shrinkage = refs._fit_lda(features, data.labels)[2]
    assert 1e-3 < shrinkage < 0.999
    for name in ("sfda", "ped"):
        want = refs.REFERENCES[name](features, data.labels)
        got = fedmte.score(features, data.labels, scorers=[name], sites=3)[name]
        assert close(got, want), f"{name}: {got!r} vs {want!r}"


@pytest.mark.parametrize("name", ["sfda", "ped"])
def test_reference_is_translation_invariant(name: str) -> None:
    # Justifies centred=True: the reference's own value does not move under a common shift.
    shift = np.random.default_rng(4).normal(scale=5.0, size=BASIC.features.shape[1])
    before = refs.REFERENCES[name](BASIC.features, BASIC.labels)
    after = refs.REFERENCES[name](BASIC.features + shift, BASIC.labels)
    assert close(after, before, 1e-11)


def test_absent_class_is_refused() -> None:
    labels = BASIC.labels.copy()
    labels[labels == 1] = 2  # label space 0..3 with no row of class 1
    for name in ("sfda", "ped"):
        with pytest.raises(ScorerDomainError, match=r"classes \[1\] have none"):
            fedmte.score(BASIC.features, labels, scorers=[name])


# --------------------------------------------------------------------------- PED

@pytest.mark.parametrize("dataset", ["basic", "many_classes", "large_offset"])
def test_ped_with_reference_standardisation_matches_reference(dataset: str) -> None:
    data = DATASETS[dataset]
    public = public_set(data.features.shape[1])
    want = refs.ped(data.features, data.labels, reference_mean=public.mean(axis=0), reference_std=public.std(axis=0))
    options = {"ped": {"reference_std": public.std(axis=0)}}
    got = fedmte.score(data.features, data.labels, scorers=["ped"], sites=3, options=options)["ped"]
    assert close(got, want), f"{got!r} vs {want!r}"
    plain = fedmte.score(data.features, data.labels, scorers=["ped"], sites=3)["ped"]
    assert not close(got, plain, 1e-6), "the standardisation must change the descent"


def test_reference_mean_cancels_in_the_reference() -> None:
    # Why ped takes no reference_mean: the reference's result does not depend on it.
    std = public_set(BASIC.features.shape[1]).std(axis=0)
    means = [np.zeros_like(std), np.full_like(std, 3.0), BASIC.features.mean(axis=0)]
    scores = [refs.ped(BASIC.features, BASIC.labels, reference_mean=m, reference_std=std) for m in means]
    assert all(close(s, scores[0], 1e-12) for s in scores)


def test_reference_std_is_floored_like_the_reference() -> None:
    std = public_set(BASIC.features.shape[1]).std(axis=0)
    std[:3] = [0.0, 1e-5, 2e-3]
    want = refs.ped(BASIC.features, BASIC.labels, reference_std=std)
    got = fedmte.score(BASIC.features, BASIC.labels, scorers=["ped"], options={"ped": {"reference_std": std}})["ped"]
    assert close(got, want)
    floored = np.maximum(std, 1e-3)
    again = fedmte.score(BASIC.features, BASIC.labels, scorers=["ped"], options={"ped": {"reference_std": floored}})["ped"]
    assert close(again, got, 1e-12)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reference_std": np.ones(3)}, r"reference_std must have one entry per feature"),
        ({"reference_std": -np.ones(BASIC.features.shape[1])}, r"reference_std must be finite and non-negative"),
        ({"time_step": 0.0}, r"time_step \(> 0\)"),
    ],
)
def test_ped_option_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        fedmte.score(BASIC.features, BASIC.labels, scorers=["ped"], options={"ped": options})


def test_ped_refuses_coincident_class_means() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.integers(-4, 5, size=(5, 3)), rng.integers(-4, 5, size=(5, 3))  # integers: exact sums
    features = np.vstack([a, -a, 2 * b, -2 * b, rng.normal(size=(10, 3)) + 4.0])  # classes 0 and 1 both have mean 0
    labels = np.repeat([0, 1, 2], 10)
    with pytest.raises(ScorerDomainError, match="means coincide"):
        fedmte.score(features, labels, scorers=["ped"], offset=np.zeros(3))


def _two_classes_on_a_line(time_step: float) -> np.ndarray:
    # Means 0 and 1, radii 1, nsigma 1: overlap F = 2 - distance; each class moves
    # min(dt^2/2 F, F) away from the other per step.
    means, radius = np.array([[0.0], [1.0]]), np.array([1.0, 1.0])
    return potential_energy_descent(means, radius, nsigma=1.0, time_step=time_step, exit_ratio=0.5)


def test_descent_keeps_six_slow_steps() -> None:
    # dt = 0.1: F shrinks by 1% per step, every ratio stays above 1/2, all 6 steps are kept.
    half = (1.0 - 0.99**6) / 2.0
    np.testing.assert_allclose(_two_classes_on_a_line(0.1), [[-half], [half]], rtol=1e-12)


def test_descent_stops_when_the_displacement_halves() -> None:
    # dt^2/2 = 0.2: F goes 1, 0.6, 0.36; ratios 1, 0.6 (kept), 0.36 (stop). Distance 1.64.
    np.testing.assert_allclose(_two_classes_on_a_line(np.sqrt(0.4)), [[-0.32], [0.32]], rtol=1e-12)
    # dt = 1: the first step removes the overlap; the next moves nothing and is not applied.
    np.testing.assert_allclose(_two_classes_on_a_line(1.0), [[-0.5], [0.5]], rtol=1e-12)


def test_descent_does_nothing_without_overlap() -> None:
    means, radius = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]]), np.array([1.0, 1.0, 1.0])
    push = potential_energy_descent(means, radius, nsigma=0.6, time_step=0.1, exit_ratio=0.5)
    assert np.array_equal(push, np.zeros_like(means))


@pytest.mark.parametrize("options", [{"time_step": 1.0}, {"nsigma": 2.0, "exit_ratio": 0.9}])
def test_ped_options_match_reference(options: dict[str, float]) -> None:
    want = refs.ped(BASIC.features, BASIC.labels, **options)
    got = fedmte.score(BASIC.features, BASIC.labels, scorers=["ped"], sites=3, options={"ped": options})["ped"]
    assert close(got, want)
    assert not close(got, fedmte.score(BASIC.features, BASIC.labels, scorers=["ped"])["ped"], 1e-6)
