"""Stage 2: the top candidates confirmed on rows the sites hold back, and the decision.

Through the real site agents (in process): with exact sums each confirmed candidate's
validated accuracy equals the centralised probe's on the pooled held-back rows (the same
counts), and the decision is the best of them; under DP the closed-form LDA head validates
in two releases and every site's account covers both stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmte.client.audit_log import read_records
from fedmte.protocol import dp
from fedmte.protocol.audit_format import IntentRecord
from fedmte.protocol.requests import Stat, Transform
from fedmte.server.confirm import confirmation_candidates, decide, validation_of
from fedmte.server.coordinator import load_candidates, run_stages
from fedmte.server.report import decision_text, render_html
from tests.job_helpers import LABELS, AgentExchange
from tests.refs.linear_probe import held_back, lbfgs_fit, lda_head
from tests.test_linear_probe import site_features
from tests.test_site_agent import World

CANDIDATES = ["tanh-head", "gelu-head", "tanh-nohead", "gelu-deep"]


def _run(world: World, job, run_id: str):
    exchange = AgentExchange(world.site_files, run_id)
    return run_stages(exchange, job, load_candidates(job), world.key, run_id=run_id)


def _pooled(world: World, model: str, tmp: Path, seed: int, holdout: float):
    parts = site_features(world, model, tmp)
    backs = [held_back(np.arange(len(y)), seed, holdout) for _, y in parts]  # each site splits by its own row ids
    return (np.concatenate([f for f, _ in parts]), np.concatenate([y for _, y in parts]), np.concatenate(backs))


def test_with_exact_sums_the_decision_is_the_best_centralised_probe(tmp_path: Path) -> None:
    world = World(tmp_path, sites=3)
    job = world.job(CANDIDATES, scorers=["hscore", "logme"], ranking={"top_k": 2},
                    confirm={"top_k": 2, "seed": 7, "holdout": 0.25})
    report, outcomes = _run(world, job, "401")
    assert len(outcomes) == 2
    confirmed = [m for m in report.models if m.validation is not None]
    expected = confirmation_candidates(report.recommendation_groups, 2)
    assert sorted(m.name for m in confirmed) == sorted(expected) and len(confirmed) >= 2
    accuracy = {}
    for model in confirmed:
        x, y, back = _pooled(world, model.name, tmp_path, 7, 0.25)
        weights = lbfgs_fit(x[~back], y[~back], len(LABELS))
        correct = int(np.sum(np.argmax(x[back] @ weights[:-1] + weights[-1], axis=1) == y[back]))
        v = model.validation
        assert v is not None and not v.noisy and v.mode == "probe"
        assert (v.correct, v.rows) == (correct, int(back.sum()))  # the same counts, exactly
        assert v.accuracy == correct / int(back.sum()) and v.low <= v.accuracy <= v.high
        accuracy[model.name] = v.accuracy
    decision = report.decision
    assert decision is not None and decision.model == max(accuracy, key=lambda name: accuracy[name])
    assert set(decision.confirmed) == set(accuracy)
    assert {v.scorer for v in decision.scorers} == {"hscore", "logme"}
    assert decision.model in decision_text(report) and "held-back rows" in decision_text(report)
    html = render_html(report)
    assert 'id="confirmation-section"' in html and "Confirmed by transfer" in html


def test_under_dp_the_closed_form_head_validates_in_two_releases_and_the_account_covers_both_stages(
        tmp_path: Path) -> None:
    world = World(tmp_path, dp=True, sites=3)
    job = world.job(CANDIDATES[:3], scorers=["hscore", "logme"], ranking={"top_k": 2, "bootstrap": 20},
                    confirm={"top_k": 2, "mode": "lda"})
    report, outcomes = _run(world, job, "402")
    assert len(outcomes) == 2 and report.decision is not None and report.decision.model is not None
    for model in report.models:
        if model.validation is not None:
            assert model.validation.noisy and model.validation.mode == "lda" and model.validation.rounds == 2
            assert 0.0 <= model.validation.accuracy <= 1.0
    for site, site_file in zip(sorted(report.sites, key=lambda s: s.name), world.site_files, strict=True):
        intents = [r for r in read_records(site_file.parent / "audit") if isinstance(r, IntentRecord) and r.privacy]
        assert len(intents) == 3  # the scoring's one release, the confirmation's two
        mu_sq = float(intents[-1].privacy.mu_sq_after)
        assert site.privacy.epsilon_spent == pytest.approx(dp.gdp_epsilon(mu_sq ** 0.5, 1e-6))
        assert {s.kind for s in site.statistics} >= {"probe_correct", "holdout_class_counts"}


def test_lda_head_on_the_training_part_equals_its_definition() -> None:
    """The keep_part view zeroes the held-back rows, so the training part's sums are exact."""
    import fedmte

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 500)
    features = rng.normal(size=(500, 6)) + labels[:, None] * 0.7 + 50.0
    for sites in ([np.arange(500)], np.array_split(rng.permutation(500), 4)):
        got = fedmte.score(features, labels, scorers=["lda_probe"], sites=sites,
                           options={"lda_probe": {"seed": 3, "holdout": 0.3, "shrinkage": 0.2}})["lda_probe"]
        back = held_back(np.arange(500), 3, 0.3)
        w = lda_head(features[~back], labels[~back], 4, 0.2)
        want = float(np.mean(np.argmax(features[back] @ w[:-1] + w[-1], axis=1) == labels[back]))
        assert got == want


def test_keep_part_never_grows_a_row_so_the_sensitivities_stay() -> None:
    split = {"seed": np.asarray(1), "holdout": np.asarray(0.2), "part": np.asarray(0)}
    view = (Transform.of("keep_part", **split),)
    for kind in ("class_sums", "gram", "sum"):
        assert dp.stat_sensitivity(Stat.of(kind, view), 1.5) == dp.stat_sensitivity(Stat.of(kind), 1.5)


def test_the_decision_says_when_validation_cannot_separate_two_candidates() -> None:
    close = {"a": validation_of(91, 100, rounds=2, noisy=False), "b": validation_of(90, 100, rounds=2, noisy=False)}
    decision = decide(close, {"a": {"s": 1.0}, "b": {"s": 2.0}}, ["s"], ["b", "a"])
    assert decision.model == "a" and decision.runner_up == "b" and not decision.separated
    assert "cannot be told apart" in decision.summary and "the scores had put b first" in decision.summary
    assert decision.scorers[0].top1_regret == pytest.approx(0.01)
    apart = {"a": validation_of(950, 1000, rounds=2, noisy=False), "b": validation_of(500, 1000, rounds=2, noisy=False)}
    assert decide(apart, {}, [], ["a", "b"]).separated
    nothing = decide({"a": validation_of(0, 0, rounds=1, noisy=False)}, {}, [], ["a"])
    assert nothing.model is None and "unconfirmed" in nothing.summary
