"""Honest uncertainty: scorer ranges and clamping, the parametric bootstrap's coverage, tie groups."""

from __future__ import annotations

import numpy as np
import pytest

import fedmte
from fedmte.protocol import symmetric
from fedmte.protocol.dp_postprocess import clean_block
from fedmte.protocol.errors import FedmteError
from fedmte.protocol.inputs import check_inputs
from fedmte.protocol.local import InMemorySite
from fedmte.protocol.plan import PlanRun, ScoringPlan, make_plan
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers import SCORERS
from fedmte.protocol.scorers.base import Context
from fedmte.protocol.scorers.hscore import symmetric_pinv
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.uncertainty import NoisyRelease, bootstrap_scores, interval, kind_of, score_bounds
from fedmte.server.job import RankingSettings
from fedmte.server.ranking import ModelMetadata, rank_models
from tests.datasets import DATASETS, make


def _release(features: np.ndarray | None, labels: np.ndarray, scorers: list[str], source_probs: np.ndarray | None = None):
    """Exact pooled sums of one site, as the coordinator's plan received them (offset zero, as
    under DP), with the plan and its exact scores."""
    inputs = check_inputs(features, labels, source_probs)
    plan = make_plan(scorers, has_features=features is not None, has_source_probs=source_probs is not None,
                     public_offset=True)
    run = PlanRun(plan, dim=inputs.dim, num_classes=inputs.num_classes, num_source_classes=inputs.num_source_classes,
                  offset=np.zeros(inputs.dim))
    site = InMemorySite(inputs, np.arange(len(labels)))
    blocks: dict[str, np.ndarray] = {}
    while (requests := run.pending()) is not None:
        sums = site.compute(requests)
        blocks.update(sums.to_arrays())
        run.feed(sums)
    return plan, Statistics(blocks), run.result(), inputs


def _noised(sums: Statistics, sigma: float, rng: np.random.Generator) -> Statistics:
    """One simulated DP release: N(0, sigma^2) per entry, counts rounded, cleaned."""
    out = {}
    for key in sorted(sums):
        value = sums[key] + rng.normal(0.0, sigma, size=sums[key].shape)
        if sums[key].dtype.kind == "i":
            value = np.rint(value).astype(np.int64)
        out[key] = clean_block(kind_of(key), value, sigma)
    return Statistics(out)


# --------------------------------------------------------------------------- ranges and clamping

@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_exact_scores_lie_in_their_declared_range_and_are_never_clamped(dataset: str) -> None:
    data = DATASETS[dataset]
    bounded = [name for name, spec in SCORERS.items() if spec.bounds is not None and not spec.iterative]
    checked = 0
    for name in bounded:
        try:
            result = fedmte.score_detailed(data.features, data.labels, source_probs=data.source_probs, scorers=[name])
        except FedmteError:
            continue  # undefined on this data (e.g. an empty class): nothing to bound
        ctx = Context(data.num_classes, data.features.shape[1], data.source_probs.shape[1], np.zeros(1))
        low, high = SCORERS[name].bounds(ctx)  # type: ignore[misc]
        value = result.scores[name]
        assert result.clamped == {}, (name, result.clamped)
        assert (low is None or value >= low - 1e-9) and (high is None or value <= high + 1e-9), (name, value, low, high)
        checked += 1
    assert checked >= 8


def test_an_hscore_past_c_minus_1_is_clamped_and_its_raw_value_kept() -> None:
    data = make("clamp", n=300, d=5, classes=4, seed=11)
    plan, exact, result, inputs = _release(data.features, data.labels, ["hscore"])
    # What noise can do: a Gram whose feature covariance is smaller than the class signal
    # (cov_f = 0.1 cov_g + a little), so tr(pinv(cov_f) cov_g) ~ 10 (C - 1), impossible for exact sums.
    counts = exact[Stat.of("class_counts").key].astype(np.float64)
    class_sums = exact[Stat.of("class_sums", Context(4, 5, 0, np.zeros(5)).centred_view).key]
    n, mean = counts.sum(), class_sums.sum(axis=0) / counts.sum()
    diff = class_sums / counts[:, None] - mean
    between = (diff * counts[:, None]).T @ diff
    gram = n * np.outer(mean, mean) + 0.1 * between + 1e-3 * np.eye(5)
    sums = {key: exact[key] for key in exact}
    gram_key = next(key for key in sums if kind_of(key) == "gram")
    sums[gram_key] = symmetric.pack(gram)
    run = PlanRun(plan, dim=5, num_classes=4, offset=np.zeros(5), record_failures=True)
    run.feed(Statistics({s.key: sums[s.key] for s in run.pending() or []}))
    clamped = run.result()
    raw = float(np.sum(symmetric_pinv(0.1 * between / (n - 1) + 1e-3 * np.eye(5) / (n - 1)) * between / (n - 1)))
    assert raw > 3 * 1.5
    assert clamped.scores["hscore"] == 3.0
    assert clamped.clamped["hscore"] == pytest.approx(raw, rel=1e-9)
    assert result.clamped == {} and 0 <= result.scores["hscore"] <= 3


# --------------------------------------------------------------------------- the bootstrap

def test_replicates_of_exact_sums_are_all_the_score_and_their_interval_is_a_point() -> None:
    data = make("exact", n=200, d=6, classes=3, seed=12)
    plan, exact, result, _ = _release(data.features, data.labels, ["logme", "hscore", "gbc"])
    reps = bootstrap_scores(plan, NoisyRelease(exact, {key: 0.0 for key in exact}), dim=6, num_classes=3,
                            replicates=50, rng=np.random.default_rng(0))
    for name, values in reps.items():
        assert values.shape == (50,)
        assert np.all(values == result.scores[name])
        assert interval(result.scores[name], values) == (result.scores[name], result.scores[name])


def test_a_scorer_whose_later_round_needs_new_statistics_is_nan_and_the_others_resample() -> None:
    data = make("leep", n=300, d=4, classes=3, seed=13)
    plan, exact, _, inputs = _release(None, data.labels, ["nce", "leep"], source_probs=data.source_probs)
    sigma = {key: 2.0 for key in exact}
    rng = np.random.default_rng(1)
    reps = bootstrap_scores(plan, NoisyRelease(_noised(exact, 2.0, rng), sigma), dim=0, num_classes=3,
                            num_source_classes=inputs.num_source_classes, replicates=20, rng=rng)
    assert np.all(np.isnan(reps["leep"]))  # round 2's weights follow the noisy joint: a request never answered
    assert np.all(np.isfinite(reps["nce"])) and np.ptp(reps["nce"]) > 0


def test_the_same_seed_gives_the_same_replicates() -> None:
    data = make("seed", n=200, d=4, classes=3, seed=14)
    plan, exact, _, _ = _release(data.features, data.labels, ["logme"])
    release = NoisyRelease(_noised(exact, 3.0, np.random.default_rng(2)), {key: 3.0 for key in exact})
    first, second = (bootstrap_scores(plan, release, dim=4, num_classes=3, replicates=10, rng=np.random.default_rng(7))
                     for _ in range(2))
    assert np.array_equal(first["logme"], second["logme"])


def test_nominal_90_percent_intervals_cover_the_exact_score_in_85_to_95_percent_of_noisy_releases() -> None:
    """Known truth: the scores of the exact sums. Each trial is a fresh DP release of them
    (noise large enough to move the scores by several times their rounding, small enough
    that they stay defined); its bootstrap interval must cover the truth at the nominal rate."""
    rng = np.random.default_rng(2024)
    n, d, classes, sigma, trials, replicates = 400, 6, 3, 4.0, 240, 120
    labels = rng.integers(0, classes, n)
    features = rng.normal(scale=0.8, size=(classes, d))[labels] + rng.normal(size=(n, d))
    scorers = ["logme", "hscore"]
    plan, exact, truth, _ = _release(features, labels, scorers)
    noise = {key: sigma for key in exact}
    covered = {name: 0 for name in scorers}
    spread = {name: [] for name in scorers}
    for _ in range(trials):
        released = _noised(exact, sigma, rng)
        point = bootstrap_scores(plan, NoisyRelease(released, {k: 0.0 for k in exact}), dim=d, num_classes=classes,
                                 replicates=1, rng=rng)
        reps = bootstrap_scores(plan, NoisyRelease(released, noise), dim=d, num_classes=classes,
                                replicates=replicates, rng=rng)
        for name in scorers:
            found = interval(float(point[name][0]), reps[name], 0.9)
            assert found is not None
            covered[name] += found[0] <= truth.scores[name] <= found[1]
            spread[name].append(float(point[name][0]))
    for name in scorers:
        assert np.std(spread[name]) > 1e-3 * abs(truth.scores[name]), "the noise must matter for the test to mean anything"
        assert 0.85 <= covered[name] / trials <= 0.95, (name, covered[name] / trials)


def test_intervals_stay_inside_the_scorers_range() -> None:
    bounds = score_bounds(["hscore", "logme"], dim=64, num_classes=10)
    assert bounds == {"hscore": (0.0, 9.0)}
    low, high = interval(8.9, np.array([8.0, 8.2, 8.5, 8.7, 9.0]), 0.9, bounds=bounds["hscore"])  # type: ignore[misc]
    assert high == 9.0 and low < 8.9


# --------------------------------------------------------------------------- the ranking

def _ranking(points: dict[str, float], draws: dict[str, np.ndarray], **kwargs):
    scores = {name: {"s": value} for name, value in points.items()}
    replicates = {name: {"s": values} for name, values in draws.items()}
    return rank_models(scores, {name: ModelMetadata() for name in points}, scorers=["s"], replicates=replicates, **kwargs)


def test_candidates_the_noise_cannot_separate_are_tied_and_separated_ones_are_not() -> None:
    rng = np.random.default_rng(3)
    same = rng.normal(0.0, 1.0, size=(2, 400))
    draws = {"A": 5.0 + same[0], "B": 5.0 + same[1], "C": 1.0 + rng.normal(0.0, 0.2, 400)}
    ranking = _ranking({"A": 5.1, "B": 5.0, "C": 1.0}, draws)
    by = {m.name: m for m in ranking.models}
    assert ranking.uncertainty is not None and ranking.uncertainty.assessed and not ranking.uncertainty.exact
    assert ranking.uncertainty.tie_groups == [["A", "B"], ["C"]]
    assert by["A"].uncertainty.tied_with == ["B"] and by["C"].uncertainty.tied_with == []  # type: ignore[union-attr]
    assert [by[n].uncertainty.shown_rank for n in "ABC"] == ["1=", "1=", "3"]  # type: ignore[union-attr]
    assert sum(m.uncertainty.p_best for m in ranking.models) == pytest.approx(1.0)  # type: ignore[union-attr]
    assert 0.3 < by["A"].uncertainty.p_best < 0.7 and by["C"].uncertainty.p_best == 0.0  # type: ignore[union-attr]
    assert "A and B cannot be told apart" in ranking.uncertainty.summary


def test_the_recommendation_keeps_a_noise_tie_at_the_cut_whole() -> None:
    rng = np.random.default_rng(4)
    draws = {"A": 9.0 + rng.normal(0, 0.1, 300), "B": 5.0 + rng.normal(0, 1, 300), "C": 5.0 + rng.normal(0, 1, 300)}
    ranking = _ranking({"A": 9.0, "B": 5.2, "C": 5.0}, draws, settings=RankingSettings(top_k=2))
    assert ranking.recommendation == ["A", "B", "C"]
    assert ranking.recommendation_groups == [["A"], ["B", "C"]]
    assert any("B and C cannot be told apart" in note for note in ranking.notes)


def test_exact_replicates_collapse_intervals_and_make_p_best_one_or_zero() -> None:
    points = {"A": 3.0, "B": 2.0, "C": 1.0}
    ranking = _ranking(points, {name: np.full(100, value) for name, value in points.items()})
    assert ranking.uncertainty.exact and ranking.uncertainty.replicates == 100  # type: ignore[union-attr]
    for model in ranking.models:
        u = model.uncertainty
        assert u is not None and u.intervals["s"].low == u.intervals["s"].high == points[model.name]  # type: ignore[union-attr]
        assert u.p_best == (1.0 if model.name == "A" else 0.0) and u.rank_interval.low == u.rank_interval.high == model.rank
    assert "exact" in ranking.uncertainty.summary  # type: ignore[union-attr]
    plain = rank_models({n: {"s": v} for n, v in points.items()}, {n: ModelMetadata() for n in points}, scorers=["s"])
    assert not plain.uncertainty.assessed and [m.uncertainty.p_best for m in plain.models] == [1.0, 0.0, 0.0]  # type: ignore[union-attr]
    assert plain.recommendation == ranking.recommendation == ["A", "B", "C"]


def test_a_scorer_without_any_finite_replicate_is_held_at_its_point_and_listed() -> None:
    rng = np.random.default_rng(5)
    scores = {"A": {"s": 2.0, "t": 1.0}, "B": {"s": 1.0, "t": 2.0}}
    replicates = {"A": {"s": 2.0 + rng.normal(0, 0.01, 50), "t": np.full(50, np.nan)},
                  "B": {"s": 1.0 + rng.normal(0, 0.01, 50), "t": np.full(50, np.nan)}}
    ranking = rank_models(scores, {n: ModelMetadata() for n in scores}, scorers=["s", "t"], replicates=replicates)
    assert ranking.uncertainty.held_at_point == {"A": ["t"], "B": ["t"]}  # type: ignore[union-attr]
    by = {m.name: m for m in ranking.models}
    assert by["A"].uncertainty.intervals["t"].low == 1.0  # type: ignore[union-attr]


def test_clamped_scores_are_flagged_on_the_model() -> None:
    ranking = rank_models({"A": {"hscore": 9.0}, "B": {"hscore": 2.0}}, {"A": ModelMetadata(), "B": ModelMetadata()},
                          scorers=["hscore"], clamped={"A": {"hscore": 86.8}})
    by = {m.name: m for m in ranking.models}
    assert by["A"].clamped["hscore"].raw == 86.8 and by["A"].clamped["hscore"].value == 9.0
    assert by["B"].clamped == {}


def test_replicates_of_unequal_length_are_refused() -> None:
    with pytest.raises(FedmteError, match="differ in length"):
        _ranking({"A": 1.0, "B": 2.0}, {"A": np.zeros(10), "B": np.zeros(11)})


def test_a_release_without_the_centring_sums_needs_the_offset() -> None:
    plan = ScoringPlan(scorers=("hscore",), centring_round=True)
    with pytest.raises(FedmteError, match="offset"):
        bootstrap_scores(plan, NoisyRelease(Statistics(), {}), dim=3, num_classes=2, rng=np.random.default_rng(0))
