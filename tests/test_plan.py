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
