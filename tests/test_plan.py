"""Plans merge the scorers' rounds, send shared statistics once, and state rounds up front."""

from __future__ import annotations

import numpy as np
import pytest

import fedmte
from fedmte.protocol.plan import default_scorers, make_plan
from fedmte.protocol.scorers import SCORERS
from tests.datasets import make

DATA = make("plan", n=80, d=6, classes=3, offset=2.0, seed=31)
ONE_ROUND_MOMENT_SCORERS = ["logme", "hscore", "linear_mse"]


def detailed(scorers, **kwargs):
    return fedmte.score_detailed(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=scorers, **kwargs)


def test_scorers_share_rounds_and_identical_statistics() -> None:
    alone = {name: detailed([name]) for name in ONE_ROUND_MOMENT_SCORERS}
    together = detailed(ONE_ROUND_MOMENT_SCORERS)
    assert len(together.rounds) == max(len(r.rounds) for r in alone.values())
    # logme, hscore and linear_mse need the same moments: sending them for three scorers costs
    # exactly what it costs for one.
    assert together.bytes_sent_per_site == alone["hscore"].bytes_sent_per_site
    for name, result in alone.items():
        assert together.scores[name] == pytest.approx(result.scores[name], rel=1e-12)


def test_round_count_is_stated_up_front_and_kept() -> None:
    names = default_scorers(has_features=True, has_source_probs=True)
    plan = make_plan(names, has_features=True, has_source_probs=True)
    result = detailed(list(names))
    assert len(result.rounds) == plan.rounds
    assert plan.rounds == max(SCORERS[n].rounds for n in names) + 1  # + the centring round


def test_public_offset_skips_the_centring_round_and_keeps_the_scores() -> None:
    centred = detailed(["hscore", "gbc"])
    public = detailed(["hscore", "gbc"], offset=np.full(DATA.features.shape[1], 1.5))
    assert len(public.rounds) == len(centred.rounds) - 1
    assert centred.rounds[0].kinds == ["count", "sum"]
    for name in centred.scores:
        assert public.scores[name] == pytest.approx(centred.scores[name], rel=1e-10)


def test_source_only_scorers_need_no_centring_round() -> None:
    plan = make_plan(["nce", "leep"], has_features=False, has_source_probs=True)
    assert not plan.centring_round and plan.rounds == 2
    scores = fedmte.score(None, DATA.labels, source_probs=DATA.source_probs)
    assert set(scores) == set(default_scorers(has_features=False, has_source_probs=True))
    assert all(not SCORERS[name].needs_features for name in scores)


def test_default_set_follows_the_inputs() -> None:
    without = default_scorers(has_features=True, has_source_probs=False)
    assert "leep" not in without and "nce" not in without and "logme" in without
    assert set(fedmte.score(DATA.features, DATA.labels)) == set(without)
    assert not any(SCORERS[name].iterative for name in default_scorers(has_features=True, has_source_probs=True))


def test_rounds_do_not_depend_on_the_scorers_order() -> None:
    names = list(default_scorers(has_features=True, has_source_probs=True))
    forward = detailed(names)
    backward = detailed(names[::-1])
    assert len(forward.rounds) == len(backward.rounds)
    assert forward.bytes_sent_per_site == backward.bytes_sent_per_site
    for name in names:
        assert forward.scores[name] == backward.scores[name]


def test_many_models_share_rounds_and_each_equals_its_own_run() -> None:
    from fedmte.protocol.inputs import check_inputs
    from fedmte.protocol.local import InMemorySite
    from fedmte.protocol.plan import PlanRun, execute_many

    other = make("plan-b", n=80, d=9, classes=3, seed=32)
    models = {"a": DATA.features, "b": other.features[:, :9] * 3.0 + 1.0}
    names = ["hscore", "leep", "sfda", "logme"]
    plan = make_plan(names, has_features=True, has_source_probs=True)
    sites = {m: InMemorySite(check_inputs(f, DATA.labels, DATA.source_probs), np.arange(80)) for m, f in models.items()}
    runs = {m: PlanRun(plan, dim=f.shape[1], num_classes=3, num_source_classes=DATA.source_probs.shape[1]) for m, f in models.items()}
    calls = []

    def aggregate_many(pending):
        calls.append(sorted(pending))
        return {m: sites[m].compute(reqs) for m, reqs in pending.items()}

    results = execute_many(runs, aggregate_many)
    assert len(calls) == plan.rounds  # two models, the rounds of one
    assert all(c == ["a", "b"] for c in calls)
    for model, features in models.items():
        alone = fedmte.score(features, DATA.labels, source_probs=DATA.source_probs, scorers=names)
        for name in names:
            assert results[model].scores[name] == pytest.approx(alone[name], rel=1e-12)


def test_a_scorer_that_is_undefined_is_recorded_and_the_rest_go_on() -> None:
    from fedmte.protocol.inputs import check_inputs
    from fedmte.protocol.local import InMemorySite
    from fedmte.protocol.plan import PlanRun

    labels = DATA.labels.copy()
    labels[labels == 1] = 0  # class 1 of 3 has no rows: sfda is undefined, hscore is not
    inputs = check_inputs(DATA.features, labels, num_classes=3)
    site = InMemorySite(inputs, np.arange(len(labels)))
    plan = make_plan(["sfda", "hscore"], has_features=True, has_source_probs=False)
    run = PlanRun(plan, dim=inputs.dim, num_classes=3, record_failures=True)
    while (requests := run.pending()) is not None:
        run.feed(site.compute(requests))
    result = run.result()
    assert "hscore" in result.scores and "sfda" not in result.scores
    assert "classes [1] have none" in result.failures["sfda"]
