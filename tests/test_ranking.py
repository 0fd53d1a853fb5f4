"""Ranking: per-scorer ranks, aggregates, failures, constraints, cross-model scores (NCTI), top-k."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmte.api import score
from fedmte.client.extract import ModelMetrics
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.scorers import SCORERS, ScorerSpec
from fedmte.protocol.scorers.ncti import TERMS as NCTI_TERMS
from fedmte.server.job import Constraints, RankingSettings, parse_job
from fedmte.server.ranking import (
    MIB,
    ModelMetadata,
    SiteMeasurement,
    check_constraints,
    rank_models,
    rank_scores,
    scorer_agreement,
)


def _meta(names: list[str] | dict[str, object]) -> dict[str, ModelMetadata]:
    return {name: ModelMetadata() for name in names}


def _reference_ranks(values: dict[str, float | None], method: str) -> dict[str, float]:
    """scipy's rankdata on negated scores, failures as -inf (so they tie at the bottom)."""
    names = list(values)
    x = np.array([v if v is not None and math.isfinite(v) else -np.inf for v in values.values()], dtype=np.float64)
    return dict(zip(names, scipy.stats.rankdata(-x, method=method).astype(float)))


scores_with_failures = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.one_of(st.none(), st.just(float("nan")), st.sampled_from([-1.0, 0.0, 0.5, 2.0]), st.floats(-1e6, 1e6)),
    min_size=1,
    max_size=9,
)


@settings(max_examples=150, deadline=None)
@given(scores_with_failures, st.sampled_from(["average", "min"]))
def test_rank_scores_matches_scipy_rankdata_with_failures_at_the_bottom(values: dict[str, float | None], ties: str) -> None:
    assert rank_scores(values, ties) == pytest.approx(_reference_ranks(values, ties))


@settings(max_examples=60, deadline=None)
@given(scores_with_failures)
def test_average_ranks_of_every_scorer_sum_to_the_same_total(values: dict[str, float | None]) -> None:
    n = len(values)
    assert sum(rank_scores(values, "average").values()) == pytest.approx(n * (n + 1) / 2)


def test_rank_scores_examples_of_both_tie_rules() -> None:
    values = {"a": 3.0, "b": 2.0, "c": 2.0, "d": None, "e": 1.0, "f": float("nan")}
    assert rank_scores(values, "average") == {"a": 1.0, "b": 2.5, "c": 2.5, "e": 4.0, "d": 5.5, "f": 5.5}
    assert rank_scores(values, "min") == {"a": 1.0, "b": 2.0, "c": 2.0, "e": 4.0, "d": 5.0, "f": 5.0}
    with pytest.raises(InvalidInputError, match="ties must be 'average' or 'min'"):
        rank_scores(values, "dense")


# Three scorers, four models: A wins twice and comes last once; B is second twice and first once.
SPLIT = {
    "A": {"s1": 4.0, "s2": 4.0, "s3": 1.0},
    "B": {"s1": 3.0, "s2": 3.0, "s3": 4.0},
    "C": {"s1": 2.0, "s2": 2.0, "s3": 3.0},
    "D": {"s1": 1.0, "s2": 1.0, "s3": 2.0},
}


def test_mean_rank_is_the_mean_of_the_per_scorer_ranks() -> None:
    ranking = rank_models(SPLIT, _meta(SPLIT), scorers=["s1", "s2", "s3"])
    by_name = {m.name: m for m in ranking.models}
    for name in SPLIT:
        expected = np.mean([_reference_ranks({m: SPLIT[m][s] for m in SPLIT}, "average")[name] for s in ("s1", "s2", "s3")])
        assert by_name[name].aggregate == pytest.approx(expected)
    assert [m.name for m in ranking.models] == ["B", "A", "C", "D"]  # B: 5/3, A: 2, C: 8/3, D: 11/3
    assert [m.rank for m in ranking.models] == [1, 2, 3, 4]
    assert ranking.better == "lower" and ranking.aggregate == "mean_rank"


def test_median_rank_forgives_one_dissenting_scorer() -> None:
    ranking = rank_models(SPLIT, _meta(SPLIT), scorers=["s1", "s2", "s3"], settings=RankingSettings(aggregate="median_rank"))
    assert [m.name for m in ranking.models][:2] == ["A", "B"]  # A: median(1, 1, 4) = 1; B: median(2, 2, 1) = 2
    assert ranking.models[0].aggregate == 1.0


def test_borda_counts_points_and_orders_like_mean_rank_without_failures() -> None:
    borda = rank_models(SPLIT, _meta(SPLIT), scorers=["s1", "s2", "s3"], settings=RankingSettings(aggregate="borda"))
    mean = rank_models(SPLIT, _meta(SPLIT), scorers=["s1", "s2", "s3"])
    assert [m.name for m in borda.models] == [m.name for m in mean.models]
    assert borda.better == "higher"
    n = len(SPLIT)
    for model in borda.models:
        assert model.aggregate == pytest.approx(sum(n - r for r in model.ranks.values()))


def test_borda_gives_a_failed_score_no_points_where_mean_rank_shares_the_bottom() -> None:
    scores = {"A": {"s": 3.0, "t": 1.0}, "B": {"s": 2.0, "t": None}, "C": {"s": 1.0, "t": None}, "D": {"s": 0.0, "t": 2.0}}
    borda = {m.name: m for m in rank_models(scores, _meta(scores), scorers=["s", "t"], settings=RankingSettings(aggregate="borda")).models}
    mean = {m.name: m for m in rank_models(scores, _meta(scores), scorers=["s", "t"]).models}
    assert mean["B"].ranks["t"] == 3.5 and mean["C"].ranks["t"] == 3.5  # the two failures tie below A and D
    assert borda["B"].aggregate == pytest.approx(4 - 2)  # points from s only
    assert borda["C"].aggregate == pytest.approx(4 - 3)


def test_single_ranks_by_one_scorer_alone() -> None:
    named = {m: {"logme": r["s1"], "hscore": r["s2"], "gbc": r["s3"]} for m, r in SPLIT.items()}
    ranking = rank_models(named, _meta(named), scorers=["logme", "hscore", "gbc"],
                          settings=RankingSettings(aggregate="single", scorer="gbc"))
    assert [m.name for m in ranking.models] == ["B", "C", "D", "A"]
    assert ranking.aggregate == "single:gbc" and ranking.ranked_scorers == ["gbc"]


def test_equal_aggregates_share_a_rank_and_are_listed_by_name() -> None:
    scores = {"z": {"s": 1.0}, "y": {"s": 1.0}, "x": {"s": 0.0}}
    ranking = rank_models(scores, _meta(scores), scorers=["s"], settings=RankingSettings(top_k=1))
    assert [(m.name, m.rank) for m in ranking.models] == [("y", 1), ("z", 1), ("x", 3)]
    assert ranking.recommendation == ["y", "z"]  # a tie at the cut keeps both
    assert any("tie at the cut" in note for note in ranking.notes)


def test_a_failed_score_ranks_last_and_is_reported_with_its_reason() -> None:
    scores = {"A": {"s": 1.0, "t": 2.0}, "B": {"s": 3.0}, "C": {"s": 2.0, "t": float("inf")}}
    ranking = rank_models(scores, _meta(scores), scorers=["s", "t"], failures={"B": {"t": "ScorerDomainError: empty class"}})
    by_name = {m.name: m for m in ranking.models}
    assert by_name["B"].failures == {"t": "ScorerDomainError: empty class"}
    assert by_name["C"].failures == {"t": "no score returned"}
    assert by_name["A"].ranks["t"] == 1.0 and by_name["B"].ranks["t"] == 2.5 and by_name["C"].ranks["t"] == 2.5
    assert "t" not in by_name["B"].scores and "t" not in by_name["C"].scores
    assert by_name["B"].aggregate == pytest.approx((1.0 + 2.5) / 2)


def test_a_scorer_that_failed_everywhere_is_dropped_and_changes_nothing() -> None:
    with_dead = {name: {**row, "dead": None} for name, row in SPLIT.items()}
    ranking = rank_models(with_dead, _meta(SPLIT), scorers=["s1", "s2", "s3", "dead"])
    without = rank_models(SPLIT, _meta(SPLIT), scorers=["s1", "s2", "s3"])
    assert ranking.dropped_scorers == {"dead": "failed for every ranked model"}
    assert ranking.ranked_scorers == ["s1", "s2", "s3"]
    assert [(m.name, m.aggregate) for m in ranking.models] == [(m.name, m.aggregate) for m in without.models]
    assert any("dead failed for every ranked model" in note for note in ranking.notes)


def test_nothing_to_rank_by_gives_no_ranks_and_no_recommendation() -> None:
    scores = {"A": {"s": None}, "B": {"s": None}}
    ranking = rank_models(scores, _meta(scores), scorers=["s"])
    assert all(m.rank is None and m.aggregate is None for m in ranking.models)
    assert ranking.recommendation == []
    assert any("none of the ranking scorers (s) succeeded" in note for note in ranking.notes)


# --------------------------------------------------------------------------- constraints

def test_check_constraints_names_each_rule_and_treats_unmeasured_as_violated() -> None:
    constraints = Constraints(max_latency_ms=10, max_parameters=1000, max_peak_memory_mb=100, licenses=["MIT"],
                              actions={"licenses": "filter"})
    ok = ModelMetadata(latency_ms=10.0, parameter_count=1000, peak_memory_mb=100.0, license="MIT")
    assert check_constraints(ok, constraints) == []  # limits are inclusive
    bad = ModelMetadata(latency_ms=10.5, parameter_count=1001, license="GPL-3.0")
    found = {v.rule: v for v in check_constraints(bad, constraints)}
    assert set(found) == {"max_latency_ms", "max_parameters", "max_peak_memory_mb", "licenses"}
    assert found["max_latency_ms"].message == "latency 10.5 ms exceeds the limit of 10 ms"
    assert "peak memory was not measured" in found["max_peak_memory_mb"].message
    assert "license 'GPL-3.0' is not on the allowlist ['MIT']" == found["licenses"].message
    assert found["licenses"].action == "filter" and found["max_parameters"].action == "flag"
    assert check_constraints(ModelMetadata(), Constraints(licenses=["MIT"]))[0].message.startswith("no license")


def test_a_flagged_model_stays_ranked_but_is_never_recommended() -> None:
    metadata = _meta(SPLIT) | {"B": ModelMetadata(latency_ms=50.0)}
    for name in ("A", "C", "D"):
        metadata[name] = ModelMetadata(latency_ms=1.0)
    ranking = rank_models(SPLIT, metadata, scorers=["s1", "s2", "s3"], constraints=Constraints(max_latency_ms=10),
                          settings=RankingSettings(top_k=2))
    by_name = {m.name: m for m in ranking.models}
    assert by_name["B"].rank == 1 and by_name["B"].status == "flagged"
    assert [v.rule for v in by_name["B"].violations] == ["max_latency_ms"]
    assert ranking.recommendation == ["A", "C"]
    assert by_name["A"].status == "recommended" and by_name["D"].status == "eligible"


def test_a_filtered_model_leaves_the_ranking_as_if_it_had_never_been_scored() -> None:
    metadata = {name: ModelMetadata(license="MIT") for name in SPLIT} | {"B": ModelMetadata(license="proprietary")}
    ranking = rank_models(SPLIT, metadata, scorers=["s1", "s2", "s3"],
                          constraints=Constraints(licenses=["MIT"], action="filter"))
    without_b = {k: v for k, v in SPLIT.items() if k != "B"}
    reference = rank_models(without_b, _meta(without_b), scorers=["s1", "s2", "s3"])
    ranked = [m for m in ranking.models if m.status != "filtered"]
    assert [(m.name, m.ranks, m.aggregate, m.rank) for m in ranked] == [
        (m.name, m.ranks, m.aggregate, m.rank) for m in reference.models
    ]
    last = ranking.models[-1]
    assert last.name == "B" and last.status == "filtered" and last.rank is None and last.ranks == {}
    assert last.scores == SPLIT["B"]  # the raw scores stay visible
    assert "B" not in ranking.recommendation


def test_everything_filtered_is_a_report_not_a_crash() -> None:
    ranking = rank_models(SPLIT, _meta(SPLIT), scorers=["s1"], constraints=Constraints(max_parameters=5, action="filter"))
    assert all(m.status == "filtered" for m in ranking.models) and ranking.recommendation == []
    assert any("every candidate was filtered out" in note for note in ranking.notes)


def test_metadata_from_site_measurements_takes_the_worst_site() -> None:
    metrics = ModelMetrics(device="cpu", threads=2, batch_size=64, samples=100, seconds=1.0, throughput=100.0,
                           forward_seconds=0.5, batch_latency_ms=20.0, latency_ms=3.0, peak_rss_bytes=300 * MIB,
                           peak_device_bytes=None)
    gpu = {"device": "cuda", "latency_ms": 0.5, "peak_rss_bytes": 900 * MIB, "peak_device_bytes": 200 * MIB}
    md = ModelMetadata.from_sites({"site0": metrics.model_dump(), "site1": gpu, "site2": SiteMeasurement()},
                                  license="MIT", parameter_count=42)
    assert md.latency_ms == 3.0
    assert md.peak_memory_mb == 300.0  # site1 ran on a device: its 200 MiB of device memory count, not its RSS
    assert md.license == "MIT" and md.parameter_count == 42 and set(md.sites) == {"site0", "site1", "site2"}
    assert ModelMetadata.from_sites({}).latency_ms is None


# --------------------------------------------------------------------------- NCTI

def _terms(seli: float, ncc: float, vc: float) -> dict[str, float]:
    return dict(zip(NCTI_TERMS, (seli, ncc, vc))) | {"ncti": seli + ncc - vc}


def _paper_ncti(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """minmax(ncc) + minmax(seli) - minmax(vc) over the given models, written out by hand."""
    def scaled(term: str) -> dict[str, float]:
        values = {m: r[term] for m, r in rows.items()}
        lo, hi = min(values.values()), max(values.values())
        return {m: (v - lo) / (hi - lo) for m, v in values.items()}
    ncc, seli, vc = scaled("ncti_ncc"), scaled("ncti_seli"), scaled("ncti_vc")
    return {m: ncc[m] + seli[m] - vc[m] for m in rows}


NCTI_ROWS = {
    "A": _terms(900.0, 0.30, 2.0),  # huge seli: first by the unscaled sum
    "B": _terms(500.0, 0.90, 1.0),
    "C": _terms(100.0, 0.60, 1.5),
    "D": _terms(800.0, 0.10, 2.2),
}


def test_ncti_is_ranked_by_the_papers_cross_model_mix_not_the_unscaled_sum() -> None:
    ranking = rank_models(NCTI_ROWS, _meta(NCTI_ROWS), scorers=["ncti"])
    expected = _paper_ncti(NCTI_ROWS)
    by_name = {m.name: m for m in ranking.models}
    for name, value in expected.items():
        assert by_name[name].scores["ncti"] == pytest.approx(value)
        assert by_name[name].auxiliary["ncti_unscaled"] == NCTI_ROWS[name]["ncti"]
    assert ranking.models[0].name == max(expected, key=expected.get)  # B, although A has the largest sum
    assert ranking.models[0].name == "B"


def test_ncti_is_scaled_over_the_models_left_after_filtering() -> None:
    metadata = {name: ModelMetadata(parameter_count=10**5) for name in NCTI_ROWS} | {"B": ModelMetadata(parameter_count=10**9)}
    ranking = rank_models(NCTI_ROWS, metadata, scorers=["ncti"], constraints=Constraints(max_parameters=10**6, action="filter"))
    pool = {k: v for k, v in NCTI_ROWS.items() if k != "B"}
    expected = _paper_ncti(pool)
    by_name = {m.name: m for m in ranking.models}
    for name, value in expected.items():
        assert by_name[name].scores["ncti"] == pytest.approx(value)
    assert "ncti" not in by_name["B"].scores and "ncti" not in by_name["B"].failures


def test_a_model_missing_an_ncti_term_fails_ncti_and_the_others_are_mixed_without_it() -> None:
    rows = {k: dict(v) for k, v in NCTI_ROWS.items()}
    rows["D"]["ncti_vc"] = None  # type: ignore[assignment]
    ranking = rank_models(rows, _meta(rows), scorers=["ncti"])
    by_name = {m.name: m for m in ranking.models}
    assert "ncti" not in by_name["D"].scores
    assert by_name["D"].failures["ncti"] == "a term (seli, ncc or vc) failed for this model"
    expected = _paper_ncti({k: v for k, v in NCTI_ROWS.items() if k != "D"})
    for name, value in expected.items():
        assert by_name[name].scores["ncti"] == pytest.approx(value)
    assert ranking.models[-1].name == "D"


def test_ncti_without_its_terms_is_refused_with_the_fix() -> None:
    scores = {"A": {"ncti": 3.0}, "B": {"ncti": 2.0}}
    with pytest.raises(InvalidInputError, match=r"ncti is a cross-model score .*JobSpec\.scorers_to_run adds them"):
        rank_models(scores, _meta(scores), scorers=["ncti"])


def test_any_scorer_declaring_a_combine_step_is_run_with_its_helpers_and_ranked_by_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in the job or the ranking is NCTI's own: a new cross-model scorer gets the same treatment."""
    base = SCORERS["logme"]
    monkeypatch.setitem(SCORERS, "gap_a", dataclasses.replace(base, name="gap_a"))
    monkeypatch.setitem(SCORERS, "gap_b", dataclasses.replace(base, name="gap_b"))
    monkeypatch.setitem(SCORERS, "gap", dataclasses.replace(
        base, name="gap", helper_scorers=("gap_a", "gap_b"),
        combine=lambda rows: {m: r["gap_a"] - r["gap_b"] - min(x["gap_a"] - x["gap_b"] for x in rows.values()) for m, r in rows.items()},
    ))
    job = parse_job('connection = "local"\nlabels = ["a", "b"]\ncandidates = ["m"]\nscorers = ["logme", "gap"]\n')
    assert job.scorers_to_run == ("logme", "gap", "gap_a", "gap_b") and job.auxiliary_scorers == ("gap_a", "gap_b")
    rows = {
        "A": {"gap": 100.0, "gap_a": 1.0, "gap_b": 0.5},
        "B": {"gap": 0.0, "gap_a": 3.0, "gap_b": 0.5},
        "C": {"gap": 50.0, "gap_a": 2.0, "gap_b": None},
    }
    ranking = rank_models(rows, _meta(rows), scorers=["gap"])
    by_name = {m.name: m for m in ranking.models}
    assert [m.name for m in ranking.models] == ["B", "A", "C"]  # by the combined value, not the per-model one
    assert by_name["B"].scores["gap"] == 2.0 and by_name["A"].scores["gap"] == 0.0
    assert by_name["A"].auxiliary == {"gap_a": 1.0, "gap_b": 0.5, "gap_unscaled": 100.0}
    assert by_name["C"].failures["gap"] == "a term (a or b) failed for this model"
    with pytest.raises(InvalidInputError, match=r"gap is a cross-model score and needs the terms \['gap_a', 'gap_b'\]"):
        rank_models({"A": {"gap": 1.0}}, _meta(["A"]), scorers=["gap"])


def test_a_combine_step_without_helper_scorers_is_refused() -> None:
    with pytest.raises(ValueError, match="combine needs the helper_scorers"):
        dataclasses.replace(SCORERS["logme"], name="bad", combine=lambda rows: {})
    assert isinstance(SCORERS["ncti"], ScorerSpec) and SCORERS["ncti"].helper_scorers == NCTI_TERMS


# --------------------------------------------------------------------------- agreement and errors

def test_agreement_is_kendall_tau_b_over_the_models_both_scorers_scored() -> None:
    rng = np.random.default_rng(7)
    table = {f"m{i}": {"a": float(rng.integers(0, 4)), "b": float(rng.normal()), "c": 1.0} for i in range(9)}
    table["m0"]["b"] = None  # type: ignore[assignment]
    pairs = {(p.a, p.b): p for p in scorer_agreement(table, ["a", "b", "c"])}
    both = [m for m in table if table[m]["b"] is not None]
    expected = scipy.stats.kendalltau([table[m]["a"] for m in both], [table[m]["b"] for m in both]).statistic
    assert pairs[("a", "b")].kendall_tau == pytest.approx(expected)
    assert pairs[("a", "b")].models == 8
    assert pairs[("a", "c")].kendall_tau is None and pairs[("b", "c")].kendall_tau is None  # c is constant


def test_rank_models_refuses_inputs_it_cannot_rank() -> None:
    with pytest.raises(InvalidInputError, match="no models to rank"):
        rank_models({}, {}, scorers=["s"])
    with pytest.raises(InvalidInputError, match="no scorers to rank by"):
        rank_models(SPLIT, _meta(SPLIT), scorers=[])
    with pytest.raises(InvalidInputError, match=r"no metadata for models \['D'\]"):
        rank_models(SPLIT, _meta(["A", "B", "C"]), scorers=["s1"])
    with pytest.raises(InvalidInputError, match=r"ranking\.scorer 's9' is not among the scorers"):
        rank_models(SPLIT, _meta(SPLIT), scorers=["s1"], settings=RankingSettings(aggregate="single", scorer="logme").model_copy(update={"scorer": "s9"}))


def test_real_scores_rank_the_better_separated_features_first() -> None:
    """Four 'models' whose features separate the classes more and more: the moment scorers agree."""
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    noise = rng.normal(size=(300, 10))
    scorers = ["logme", "hscore", "gbc", "ncti"]
    run = [*scorers, *NCTI_TERMS]
    scores = {
        f"sep{sep}": score(noise + sep * np.eye(3, 10)[labels], labels, scorers=run) for sep in (0.0, 0.5, 1.0, 3.0)
    }
    ranking = rank_models(scores, _meta(scores), scorers=scorers, settings=RankingSettings(top_k=1))
    assert [m.name for m in ranking.models] == ["sep3.0", "sep1.0", "sep0.5", "sep0.0"]
    assert ranking.recommendation == ["sep3.0"]
    assert all(p.kendall_tau == pytest.approx(1.0) for p in ranking.agreement if "ncti" not in (p.a, p.b))
    by_name = {m.name: m for m in ranking.models}
    for name, value in _paper_ncti(scores).items():  # the real terms go through combine()
        assert by_name[name].scores["ncti"] == pytest.approx(value)
