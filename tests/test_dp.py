"""Gaussian-DP accounting against Google's dp-accounting, and the per-block sensitivities
against the catalogue's own accumulation with one adversarial record added."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmte.client.privacy import clip_rows
from fedmte.protocol import dp
from fedmte.protocol.catalogue import STATISTICS, Batch, accumulate
from fedmte.protocol.errors import InvalidInputError, UnknownStatisticError
from fedmte.protocol.requests import Stat, Transform

# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0, 4.0, 4.225, 8.0, 20.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-6, 1e-8])
def test_one_gaussian_release_matches_dp_accountings_analytic_gaussian(z: float, delta: float) -> None:
    # dp-accounting's get_epsilon_gaussian is the exact (Balle-Wang) curve of one Gaussian.
    expected = dp_accounting.get_epsilon_gaussian(z, delta)
    assert dp.gdp_epsilon(1.0 / z, delta) == pytest.approx(expected, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-6])
def test_calibrated_sigma_matches_dp_accounting(epsilon: float, delta: float) -> None:
    expected = dp_accounting.get_sigma_gaussian(epsilon, delta)
    assert dp.gaussian_sigma(1.0, epsilon, delta) == pytest.approx(expected, rel=1e-7)
    assert dp.gaussian_sigma(3.0, epsilon, delta) == pytest.approx(3.0 * expected, rel=1e-7)


@pytest.mark.parametrize("events", [
    [(3.0, 1), (5.0, 1)], [(1.0, 1), (2.0, 1), (4.0, 1), (8.0, 1)], [(6.54, 30)], [(10.0, 100), (2.0, 1)],
])
def test_composition_in_quadrature_matches_the_pld_accountant(events: list[tuple[float, int]]) -> None:
    delta = 1e-6
    accountant = pld.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), count) for z, count in events
    ]))
    expected = accountant.get_epsilon(delta)
    ours = dp.gdp_epsilon(dp.compose_mu(1.0 / z for z, count in events for _ in range(count)), delta)
    # PLD discretises pessimistically: its epsilon may only sit slightly above the exact one.
    assert ours <= expected + 1e-6
    assert ours == pytest.approx(expected, rel=1e-4)


def test_pinned_values_from_dp_accounting_pld() -> None:
    # Computed with dp-accounting 0.6.0's PLD accountant (research/PRIVACY.md section 4.6).
    assert dp.gdp_epsilon(0.25, 1e-3) == pytest.approx(0.59201, abs=1e-5)
    assert dp.gdp_epsilon(1 / 4.225, 1e-6) == pytest.approx(1.0000, abs=1e-3)
    assert dp.gdp_epsilon(dp.compose_mu([1 / 6.54] * 30), 1e-6) == pytest.approx(3.998, abs=2e-3)


def test_gdp_is_tighter_than_the_rdp_conversion() -> None:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(4.0), 10))
    assert dp.gdp_epsilon(dp.compose_mu([0.25] * 10), 1e-6) < accountant.get_epsilon(1e-6)


@settings(max_examples=60, deadline=None)
@given(epsilon=st.floats(0.01, 30.0), delta=st.sampled_from([1e-9, 1e-6, 1e-4, 1e-2]))
def test_mu_and_epsilon_invert_each_other(epsilon: float, delta: float) -> None:
    mu = dp.gdp_mu(epsilon, delta)
    assert dp.gdp_delta(mu, epsilon) == pytest.approx(delta, rel=1e-6)
    assert dp.gdp_epsilon(mu, delta) == pytest.approx(epsilon, rel=1e-6, abs=1e-8)


def test_gdp_delta_at_zero_epsilon_is_the_total_variation_of_two_gaussians() -> None:
    # delta(0) = Phi(mu/2) - Phi(-mu/2) = erf(mu / (2 sqrt 2)).
    for mu in (0.1, 0.5, 1.0, 3.0):
        assert dp.gdp_delta(mu, 0.0) == pytest.approx(math.erf(mu / (2 * math.sqrt(2))), rel=1e-12)
    assert dp.gdp_epsilon(0.01, 0.5) == 0.0


def test_equal_split_noise_gives_the_release_mu() -> None:
    sensitivities = [1.0, 2.0, 4.0, 16.0]
    z = dp.noise_multiplier(0.3, len(sensitivities))
    assert dp.release_mu(sensitivities, [z * s for s in sensitivities]) == pytest.approx(0.3, rel=1e-12)
    assert dp.release_mu([0.0, 1.0], [0.0, 2.0]) == pytest.approx(0.5)
    with pytest.raises(InvalidInputError, match="delta must lie"):
        dp.gdp_epsilon(0.5, 0.0)
    with pytest.raises(InvalidInputError, match="no privacy"):
        dp.gdp_mu(5000.0, 1e-6)


# --------------------------------------------------------------------------- sensitivities

def test_sensitivity_table_scales_with_the_clip_norm() -> None:
    c = 2.0
    expected = {
        "count": 1.0, "class_counts": 1.0, "sum": c, "class_sums": c, "gram": c ** 2, "class_sq_sums": c ** 2,
        "class_scatters": c ** 2, "norm4_sum": c ** 4, "norm2_weighted_sum": c ** 3, "soft_joint": 1.0,
        "hard_joint": 1.0, "true_class_prob_sum": 1.0,
    }
    for kind, value in expected.items():
        assert dp.sensitivity(kind, c) == pytest.approx(value), kind
    assert dp.sensitivity("count", c, "replace_one") == 0.0
    assert dp.sensitivity("class_sums", c, "replace_one") == pytest.approx(2 * c)
    with pytest.raises(InvalidInputError, match="unbounded"):
        dp.sensitivity("mixture_loglik", c)
    with pytest.raises(UnknownStatisticError, match="no sensitivity is known"):
        dp.sensitivity("made_up", c)


def test_every_catalogue_statistic_has_a_declared_sensitivity_or_a_reason_it_has_none() -> None:
    undeclared = sorted(set(STATISTICS) - set(dp.SENSITIVITY) - set(dp.UNBOUNDED))
    assert not undeclared, f"declare these in protocol/dp.py (SENSITIVITY or UNBOUNDED): {undeclared}"


def test_view_bounds() -> None:
    offset = Transform.of("offset", offset=np.array([3.0, 4.0]))
    basis = np.diag([2.0, 0.5])
    project = Transform.of("project", basis=basis)
    assert dp.row_bound((offset,), 1.0) == pytest.approx(6.0)
    assert dp.row_bound((offset, project), 1.0) == pytest.approx(12.0)
    assert dp.stat_sensitivity(Stat.of("gram", (offset,)), 1.0) == pytest.approx(36.0)
    assert dp.stat_sensitivity(Stat.of("class_counts"), 1.0) == 1.0


KINDS_WITH_ARGS = ("true_class_prob_sum", "class_prob_outer_sums", "tilted_joint", "gmm_soft_joint")


def _args(kind: str, d: int, c: int, cs: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if kind in ("true_class_prob_sum", "class_prob_outer_sums"):
        return {"coef": rng.normal(size=(c, d)) * 3, "bias": rng.normal(size=c)}
    if kind == "tilted_joint":
        return {"tilt": rng.normal(size=(c, cs)) * 2, "floor": np.array(1e-3)}
    if kind.startswith("probe_"):  # the linear probe's, on the training or held-back half of the rows
        return {"weights": rng.normal(size=(d + 1, c)) * 3, "seed": int(rng.integers(0, 1000)), "holdout": 0.5}
    if kind == "holdout_class_counts":
        return {"seed": int(rng.integers(0, 1000)), "holdout": 0.5, "part": int(rng.integers(0, 2))}
    if kind == "gmm_soft_joint":
        k = 2
        return {"means": rng.normal(size=(k, d)), "prec_chol": np.stack([np.eye(d)] * k),
                "log_weights": np.log(np.full(k, 1 / k))}
    return {}


def _stats(d: int, c: int, cs: int, rng: np.random.Generator, view: tuple = ()) -> list[Stat]:
    stats = []
    for kind in sorted(dp.SENSITIVITY):
        if kind not in STATISTICS:
            continue
        stats.append(Stat.of(kind, view if STATISTICS[kind].needs_features else (), **_args(kind, d, c, cs, rng)))
    return stats


def _batch(x: np.ndarray, y: np.ndarray, theta: np.ndarray, c: int, first_id: int = 0) -> Batch:
    return Batch(features=x, labels=y, num_classes=c, source_probs=theta, row_ids=first_id + np.arange(len(y)))


def _blocks(stats: list[Stat], batches: list[Batch]) -> dict[str, np.ndarray]:
    sums = accumulate(stats, batches)
    return {stat.key: np.asarray(sums[stat.key], dtype=np.float64) if stat.key in sums else None for stat in stats}


def _simplex(rng: np.random.Generator, rows: int, cs: int, one_hot: bool) -> np.ndarray:
    if one_hot:
        return np.eye(cs)[rng.integers(0, cs, rows)]
    return rng.dirichlet(np.full(cs, 0.3), size=rows)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 12), d=st.integers(1, 5), c=st.integers(1, 4), cs=st.integers(1, 4),
    clip=st.floats(0.1, 5.0), seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1.0, 1e3, 1e6, 1e200]), axis_aligned=st.booleans(), one_hot=st.booleans(),
    relation=st.sampled_from(["add_remove", "replace_one"]),
)
def test_one_adversarial_record_moves_each_block_by_at_most_its_sensitivity(
        n: int, d: int, c: int, cs: int, clip: float, seed: int, scale: float, axis_aligned: bool, one_hot: bool,
        relation: str) -> None:
    rng = np.random.default_rng(seed)
    x, _, _ = clip_rows(rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0), clip)
    y = rng.integers(0, c, n)
    theta = _simplex(rng, n, cs, one_hot=False)
    # The adversary picks its record's model output freely; the site clips it (clip_rows).
    raw = np.eye(d)[[rng.integers(0, d)]] if axis_aligned else rng.normal(size=(1, d))
    adversary, _, _ = clip_rows(raw * scale, clip)
    label = rng.integers(0, c, 1)
    probs = _simplex(rng, 1, cs, one_hot)
    stats = _stats(d, c, cs, rng)
    base = [_batch(x, y, theta, c)]
    if relation == "add_remove":
        neighbour = [_batch(x, y, theta, c), _batch(adversary, label, probs, c, first_id=n)]  # the added record's id
    else:  # replace-one: the last row of a non-empty set is swapped for the adversary's
        if n == 0:
            return
        base = [_batch(x, y, theta, c)]
        neighbour = [_batch(np.vstack([x[:-1], adversary]), np.concatenate([y[:-1], label]),
                            np.vstack([theta[:-1], probs]), c)]
    before, after = _blocks(stats, base), _blocks(stats, neighbour)
    for stat in stats:
        bound = dp.stat_sensitivity(stat, clip, relation)
        old = before[stat.key] if before[stat.key] is not None else np.zeros_like(after[stat.key])
        moved = float(np.linalg.norm(after[stat.key] - old))
        tolerance = 1e-9 * (n + 1) * max(1.0, clip) ** 4
        assert moved <= bound + tolerance, (stat.kind, moved, bound)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 10), d=st.integers(1, 4), clip=st.floats(0.1, 3.0), seed=st.integers(0, 2**32 - 1),
       view_kind=st.sampled_from(["offset", "project", "class_shift", "confmix", "offset+project"]))
def test_the_bound_holds_through_feature_views(n: int, d: int, clip: float, seed: int, view_kind: str) -> None:
    rng = np.random.default_rng(seed)
    c = 3
    steps = []
    for part in view_kind.split("+"):
        if part == "offset":
            steps.append(Transform.of("offset", offset=rng.normal(size=d) * 2))
        elif part == "project":
            steps.append(Transform.of("project", basis=rng.normal(size=(d, 2))))
        elif part == "class_shift":
            steps.append(Transform.of("class_shift", shift=rng.normal(size=(c, d))))
        else:
            steps.append(Transform.of("confmix", coef=rng.normal(size=(c, d)), bias=rng.normal(size=c),
                                      others_mean=rng.normal(size=(c, d)) * 3))
    view = tuple(steps)
    stats = [Stat.of(kind, view) for kind in ("sum", "class_sums", "gram", "class_sq_sums", "class_scatters",
                                              "norm4_sum", "norm2_weighted_sum")]
    x, _, _ = clip_rows(rng.normal(size=(n, d)), clip)
    y = rng.integers(0, c, n)
    adversary, _, _ = clip_rows(rng.normal(size=(1, d)) * 1e6, clip)
    label = rng.integers(0, c, 1)
    before = _blocks(stats, [Batch(x, y, c)])
    after = _blocks(stats, [Batch(x, y, c), Batch(adversary, label, c)])
    for stat in stats:
        bound = dp.stat_sensitivity(stat, clip)
        moved = float(np.linalg.norm(after[stat.key] - before[stat.key]))
        assert moved <= bound * (1 + 1e-9) + 1e-9, (stat.kind, view_kind, moved, bound)


def test_the_bounds_are_attained_by_an_axis_aligned_record() -> None:
    # f = C e_1 makes sum, gram and class_sq_sums move by exactly C, C^2, C^2: the table is tight.
    clip, d, c = 1.5, 3, 2
    x = np.zeros((0, d))
    stats = [Stat.of(kind) for kind in ("sum", "gram", "class_sq_sums", "class_counts")]
    empty = _blocks(stats, [Batch(x, np.zeros(0, dtype=np.int64), c)])
    record = np.array([[clip, 0.0, 0.0]])
    one = _blocks(stats, [Batch(record, np.array([1]), c)])
    for stat in stats:
        old = empty[stat.key] if empty[stat.key] is not None else 0.0
        assert np.linalg.norm(one[stat.key] - old) == pytest.approx(dp.stat_sensitivity(stat, clip))
