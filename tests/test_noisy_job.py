"""The coordinator under DP noise: one uncentred round, the sites' declared noise pooled, the
sums cleaned, the ranking's uncertainty bootstrapped, scorers weighed by how reproducible the
noise leaves their rankings; and with exact sums, all of it out of the way."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedmte.client.audit_log import read_records
from fedmte.protocol.audit_format import IntentRecord
from fedmte.protocol import symmetric
from fedmte.protocol.dp_postprocess import eigen_floor
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.inputs import check_inputs
from fedmte.protocol.local import InMemorySite
from fedmte.protocol.plan import PlanRun, make_plan
from fedmte.protocol.projection import projection_seed, random_basis
from fedmte.server.coordinator import build_job_report, execute_job, load_candidates
from fedmte.server.job import RankingSettings
from fedmte.server.ranking import ModelMetadata, rank_models
from fedmte.trial.local_sites import coordinator_key, example_packages, write_site
from tests.job_helpers import LABELS, MODELS, AgentExchange, site_arrays
from tests.test_site_agent import World

CANDIDATES = ["gelu-head", "tanh-head", "tanh-nohead"]
SCORERS = ["hscore", "gbc", "logme"]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory):
    world = World(tmp_path_factory.mktemp("noisy"), dp=True, sites=3)
    job = world.job(CANDIDATES, scorers=SCORERS, ranking={"bootstrap": 60})
    outcome, exchange = world.run(job, "301")
    return world, job, outcome, exchange


def _intents(site_file: Path) -> list[IntentRecord]:
    return [r for r in read_records(site_file.parent / "audit") if isinstance(r, IntentRecord) and r.privacy]


def test_under_dp_the_job_takes_one_uncentred_round(noisy) -> None:
    world, job, outcome, exchange = noisy
    assert [r.name for r in outcome.rounds if r.kinds] == ["round 1"] and outcome.planned_rounds == 1
    for record in outcome.models.values():
        assert record.run is not None and not record.run.plan.centring_round
        assert np.array_equal(record.run.ctx.offset, np.zeros(record.dim))  # centred at the coordinator
    for site_file in world.site_files:
        assert len(_intents(site_file)) == 1  # one release charged, not a centring round and a second one


def test_the_pooled_noise_is_what_the_sites_declared_and_the_sums_are_cleaned(noisy) -> None:
    world, job, outcome, exchange = noisy
    declared: dict[str, float] = {}  # block name -> summed variance over the sites' audit records
    for site_file in world.site_files:
        (intent,) = _intents(site_file)
        for block in intent.statistics:
            declared[block.key] = declared.get(block.key, 0.0) + float(block.noise_std) ** 2
    for record in outcome.models.values():
        sha = record.package.manifest.weights_sha256
        released = record.released
        assert released.noisy and set(released.sigma) == set(released.blocks)
        for key, sigma in released.sigma.items():
            assert sigma == pytest.approx(math.sqrt(declared[f"{sha}/{key}"]), rel=1e-12)
        gram_key = next(key for key in released.blocks if key.startswith("gram"))
        gram = released.blocks[gram_key]
        floor = eigen_floor(released.sigma[gram_key], record.dim)
        assert np.linalg.eigvalsh(symmetric.unpack(gram)).min() >= floor * (1 - 1e-9)  # cleaned: no noise-sized eigenvalue
        counts = next(v for k, v in released.blocks.items() if k.startswith("class_counts"))
        assert (counts >= 1).all()


def test_the_report_carries_the_noise_uncertainty_and_the_scorers_weights(noisy) -> None:
    world, job, outcome, exchange = noisy
    report = build_job_report(job, outcome)
    assert report.uncertainty is not None and report.uncertainty.assessed and not report.uncertainty.exact
    assert report.uncertainty.replicates == 60
    ranked = [m for m in report.models if m.rank is not None]
    assert sum(m.uncertainty.p_best for m in ranked) == pytest.approx(1.0)  # type: ignore[union-attr]
    for model in ranked:
        for scorer in SCORERS:
            found = model.uncertainty.intervals.get(scorer)  # type: ignore[union-attr]
            assert found is not None and found.low <= found.high


def test_the_same_run_gives_the_same_report(noisy) -> None:
    world, job, outcome, exchange = noisy
    first, second = build_job_report(job, outcome), build_job_report(job, outcome)
    assert first.models == second.models and first.uncertainty == second.uncertainty  # seeded by the run id
    assert first.scorer_weights == second.scorer_weights and set(first.scorer_weights) == set(SCORERS)


def test_centring_at_the_sites_brings_the_centring_round_back(tmp_path: Path) -> None:
    world = World(tmp_path, dp=True, sites=3)
    job = world.job(CANDIDATES[:1], scorers=["hscore"], privacy={"dp": True, "centre": "sites"}, ranking={"bootstrap": 0})
    outcome, _ = world.run(job, "302")
    assert outcome.planned_rounds == 2 and len(_intents(world.site_files[0])) == 2
    assert build_job_report(job, outcome).uncertainty.assessed is False  # bootstrap = 0: not assessed


def test_exact_sums_keep_the_centring_round_and_collapse_the_uncertainty(tmp_path: Path) -> None:
    key, key_path = coordinator_key(tmp_path / "coordinator")
    packages = example_packages(tmp_path / "models", key, 6, {c: MODELS[c] for c in CANDIDATES})
    files = [write_site(tmp_path / f"site{k}", f"site{k}", arrays, LABELS, coordinator=key, dp=False)
             for k, arrays in enumerate(site_arrays(3))]
    from fedmte.server.job import job_from_dict

    job = job_from_dict({"connection": "local", "labels": LABELS, "scorers": SCORERS, "purpose": "exact",
                         "candidates": [{"name": c, "path": str(packages[c])} for c in CANDIDATES],
                         "output": str(tmp_path / "out"), "privacy": {"dp": False}})
    outcome = execute_job(AgentExchange(files, "303"), job, load_candidates(job), key, run_id="303")
    assert outcome.planned_rounds == 2  # a centring round: the digits of exact sums
    assert not any(r.released.noisy for r in outcome.models.values())
    report = build_job_report(job, outcome)
    assert report.uncertainty is not None and not report.uncertainty.assessed
    assert report.scorer_weights == {}


# --------------------------------------------------------------------------- weights

def _three_scorers(rng: np.random.Generator, replicates: int = 300):
    """Six models; 'steady' and 'fair' rank them by the truth with little and some noise,
    'scrambled' has the reverse point order and replicates the noise reshuffles at will."""
    truth = np.arange(6, 0, -1).astype(float)
    names = [f"m{k}" for k in range(6)]
    points = {"steady": truth, "fair": truth + rng.normal(0, 0.3, 6), "scrambled": truth[::-1].copy()}
    spread = {"steady": 0.05, "fair": 0.6, "scrambled": 50.0}
    scores = {n: {s: float(points[s][k]) for s in points} for k, n in enumerate(names)}
    draws = {n: {s: points[s][k] + rng.normal(0, spread[s], replicates) for s in points} for k, n in enumerate(names)}
    return names, scores, draws


def test_a_scorer_the_noise_scrambles_counts_less_in_the_mean_rank() -> None:
    names, scores, draws = _three_scorers(np.random.default_rng(11))
    metadata = {n: ModelMetadata() for n in names}
    weighed = rank_models(scores, metadata, scorers=["steady", "fair", "scrambled"], replicates=draws)
    equal = rank_models(scores, metadata, scorers=["steady", "fair", "scrambled"], replicates=draws,
                        settings=RankingSettings(weigh_by_noise=False))
    weights = weighed.scorer_weights
    assert weights["steady"] > weights["fair"] > weights["scrambled"]
    assert sum(weights.values()) == pytest.approx(3.0)
    assert equal.scorer_weights == {}
    assert [m.name for m in weighed.models][0] == "m0"  # the steady scorers decide
    assert any("reproducible" in note for note in weighed.notes)
    # the weighted mean rank is the weighted mean of the per-scorer ranks
    for model in weighed.models:
        expected = sum(weights[s] * model.ranks[s] for s in weights) / sum(weights.values())
        assert model.aggregate == pytest.approx(expected)


def test_without_noise_every_scorer_counts_the_same() -> None:
    names, scores, _ = _three_scorers(np.random.default_rng(12))
    exact = {n: {s: np.full(50, v) for s, v in row.items()} for n, row in scores.items()}
    metadata = {n: ModelMetadata() for n in names}
    ranking = rank_models(scores, metadata, scorers=["steady", "fair", "scrambled"], replicates=exact)
    plain = rank_models(scores, metadata, scorers=["steady", "fair", "scrambled"])
    assert ranking.scorer_weights == {}
    assert [(m.name, m.aggregate) for m in ranking.models] == [(m.name, m.aggregate) for m in plain.models]


# --------------------------------------------------------------------------- projection

def _scores(run: PlanRun, site: InMemorySite) -> dict[str, float]:
    while (requests := run.pending()) is not None:
        run.feed(site.compute(requests))
    return run.result().scores


@pytest.mark.parametrize("centring", [False, True])
def test_a_projected_plan_scores_the_projected_features_exactly(centring: bool) -> None:
    """PlanRun(projection=B) on features X equals the plain plan on X @ B: the site applies the
    basis, the programs never see it."""
    rng = np.random.default_rng(21)
    labels = np.repeat(np.arange(3), 40)
    features = rng.normal(size=(len(labels), 12)) + labels[:, None] + 5.0
    basis = random_basis(12, 4, projection_seed("run", "model"))
    assert np.allclose(basis.T @ basis, np.eye(4))  # orthonormal: clipped rows stay clipped
    plan = make_plan(["hscore", "logme", "gbc", "transrate"], has_features=True, has_source_probs=False,
                     public_offset=not centring)
    projected = PlanRun(plan, dim=12, num_classes=3, projection=basis,
                        offset=None if centring else np.zeros(4))
    site = InMemorySite(check_inputs(features, labels), np.arange(len(labels)))
    plain = PlanRun(plan, dim=4, num_classes=3, offset=None if centring else np.zeros(4))
    reference = InMemorySite(check_inputs(features @ basis, labels), np.arange(len(labels)))
    got, want = _scores(projected, site), _scores(plain, reference)
    assert set(got) == set(want) == set(plan.scorers)
    for name in plan.scorers:
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12)


def test_a_projection_wider_than_the_features_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        random_basis(4, 5, 1)
    plan = make_plan(["hscore"], has_features=True, has_source_probs=False, public_offset=True)
    with pytest.raises(InvalidInputError):
        PlanRun(plan, dim=4, num_classes=3, projection=np.ones((3, 2)))


def test_a_dp_job_with_project_dim_reads_every_model_through_its_basis(tmp_path: Path) -> None:
    world = World(tmp_path, dp=True, sites=3)
    job = world.job(CANDIDATES[:2], scorers=["hscore", "logme"], privacy={"dp": True, "project_dim": 3},
                    ranking={"bootstrap": 20})
    outcome, _ = world.run(job, "304")
    for record in outcome.models.values():
        assert record.projection is not None and record.projection.shape == (record.dim, 3)
        assert record.run is not None and record.run.work_dim == 3
        assert record.result is not None and set(record.result.scores) == {"hscore", "logme"}
    report = build_job_report(job, outcome)
    assert any("projected to k = 3" in note for note in report.notes)
    assert report.uncertainty is not None and report.uncertainty.assessed


def test_a_scorer_dp_cannot_noise_is_left_out_with_its_reason_and_the_rest_is_scored(tmp_path: Path) -> None:
    """LEEP's second round sums log-likelihoods, which have no bounded sensitivity: every DP
    site refuses it at setup, with that reason, and the job scores what it can."""
    world = World(tmp_path, dp=True, sites=3)
    job = world.job(["gelu-head"], scorers=["leep", "hscore"], ranking={"bootstrap": 0})
    outcome, _ = world.run(job, "305")
    (record,) = outcome.models.values()
    assert record.result is not None and set(record.result.scores) == {"hscore"}
    reason = record.failures["leep"]
    assert "dp.bounded_statistics" in reason and "mixture_loglik" in reason
    assert all(f"site{k}" in reason for k in range(3))  # every site said why
    report = build_job_report(job, outcome)
    assert any(note.startswith("leep was left out") for note in report.notes)
