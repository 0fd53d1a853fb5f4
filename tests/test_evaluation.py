"""Ranking evaluation: agreement with scipy, the properties a ranking metric must have, the
input shapes, the errors and the ``fedmte evaluate`` command."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as st
from hypothesis import given, settings
from hypothesis import strategies as hs
from typer.testing import CliRunner

import fedmte
from fedmte.cli import app
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.evaluation import SINGLE_SCORER_NAME, evaluate_ranking, evaluate_rankings, parse_scores, parse_truth

RANK_METRICS = ("weighted_tau", "kendall_tau", "spearman")
CORRELATIONS = (*RANK_METRICS, "pearson")

# Fine-tuned accuracies on Aircraft from SFDA's tw_group1.py (TencentARC/SFDA), 11 models.
AIRCRAFT = {
    "resnet34": 84.06, "resnet50": 84.64, "resnet101": 85.53, "resnet152": 86.29,
    "densenet121": 84.66, "densenet169": 84.19, "densenet201": 85.38, "mnasnet1_0": 66.48,
    "mobilenet_v2": 79.68, "googlenet": 80.32, "inception_v3": 80.15,
}
# Made-up scores for those models: a rough, imperfect ranking with one tie.
AIRCRAFT_SCORES = {
    "resnet34": -0.71, "resnet50": -0.62, "resnet101": -0.60, "resnet152": -0.64,
    "densenet121": -0.58, "densenet169": -0.66, "densenet201": -0.55, "mnasnet1_0": -0.93,
    "mobilenet_v2": -0.80, "googlenet": -0.80, "inception_v3": -0.69,
}

HAND_CASES = {
    "aircraft": (AIRCRAFT_SCORES, AIRCRAFT),
    "two_models": ({"a": 0.3, "b": 0.1}, {"a": 50.0, "b": 60.0}),
    "ties_in_scores": ({"a": 1, "b": 1, "c": 2, "d": 3, "e": 3}, {"a": 10, "b": 30, "c": 20, "d": 50, "e": 40}),
    "ties_in_both": ({"a": 1, "b": 1, "c": 2, "d": 0}, {"a": 5, "b": 5, "c": 7, "d": 7}),
    "negative_truth": ({"a": 3.0, "b": 1.0, "c": 2.0}, {"a": -0.2, "b": -0.9, "c": -0.4}),
}


def scipy_metrics(scores: dict[str, float], truth: dict[str, float]) -> dict[str, float]:
    """The four correlations as the MTE papers compute them, in one fixed model order."""
    names = list(truth)
    x = np.array([scores[name] for name in names], dtype=float)
    y = np.array([truth[name] for name in names], dtype=float)
    return {
        "weighted_tau": st.weightedtau(x, y).statistic,
        "kendall_tau": st.kendalltau(x, y).statistic,
        "spearman": st.spearmanr(x, y).statistic,
        "pearson": st.pearsonr(x, y).statistic,
    }


# --- agreement with scipy ------------------------------------------------------------------


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_correlations_equal_scipy_on_hand_built_cases(case: str) -> None:
    scores, truth = HAND_CASES[case]
    got = evaluate_ranking(scores, truth)
    want = scipy_metrics(scores, truth)
    for metric in CORRELATIONS:
        assert getattr(got, metric) == pytest.approx(want[metric], abs=1e-12), metric


@settings(max_examples=150, deadline=None)
@given(
    pairs=hs.lists(
        hs.tuples(hs.integers(-3, 3), hs.integers(0, 4)), min_size=2, max_size=9
    ).filter(lambda pairs: len({truth for _, truth in pairs}) > 1 and len({score for score, _ in pairs}) > 1)
)
def test_correlations_equal_scipy_on_drawn_ties(pairs: list[tuple[int, int]]) -> None:
    """Small integer values make ties in scores, in truth and in both at once."""
    scores = {f"m{i}": float(score) for i, (score, _) in enumerate(pairs)}
    truth = {f"m{i}": float(value) for i, (_, value) in enumerate(pairs)}
    got = evaluate_ranking(scores, truth)
    want = scipy_metrics(scores, truth)
    for metric in CORRELATIONS:
        assert getattr(got, metric) == pytest.approx(want[metric], abs=1e-12), metric


def test_weighted_tau_is_scipys_default_on_continuous_values() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(3, 30))
        x, y = rng.normal(size=n), rng.normal(size=n) + 0.5 * np.arange(n)
        names = [f"m{i}" for i in range(n)]
        got = evaluate_ranking(dict(zip(names, x)), dict(zip(names, y))).weighted_tau
        assert got == pytest.approx(st.weightedtau(x, y).statistic, abs=1e-12)
        # scipy's default averages the two rankings, so the value is symmetric in x and y.
        assert got == pytest.approx(st.weightedtau(y, x).statistic, abs=1e-12)


# --- properties ------------------------------------------------------------------------------


def test_perfect_ranking_gives_one_and_no_regret() -> None:
    scores = {name: math.exp(value / 10.0) for name, value in AIRCRAFT.items()}  # monotone, not linear
    got = evaluate_ranking(scores, AIRCRAFT)
    for metric in RANK_METRICS:
        assert getattr(got, metric) == pytest.approx(1.0, abs=1e-12), metric
    assert 0.9 < got.pearson < 1.0  # monotone but not linear
    assert got.top1_regret == 0.0 and got.top1_relative_regret == 0.0
    assert got.picked == got.best == ("resnet152",)


def test_reversed_ranking_gives_minus_one_and_the_worst_regret() -> None:
    scores = {name: -value for name, value in AIRCRAFT.items()}
    got = evaluate_ranking(scores, AIRCRAFT)
    for metric in CORRELATIONS:
        assert getattr(got, metric) == pytest.approx(-1.0, abs=1e-12), metric
    assert got.picked == ("mnasnet1_0",)
    assert got.top1_regret == pytest.approx(86.29 - 66.48, abs=1e-12)
    assert got.top1_relative_regret == pytest.approx((86.29 - 66.48) / 86.29, abs=1e-12)


@pytest.mark.parametrize(
    "transform",
    [lambda v: 3.0 * v + 7.0, lambda v: math.exp(5.0 * v), lambda v: v**3, lambda v: math.atan(v)],
    ids=["affine", "exp", "cube", "atan"],
)
def test_rank_metrics_and_regret_are_invariant_to_monotone_transforms(transform) -> None:
    base = evaluate_ranking(AIRCRAFT_SCORES, AIRCRAFT)
    moved = evaluate_ranking({name: transform(v) for name, v in AIRCRAFT_SCORES.items()}, AIRCRAFT)
    for metric in (*RANK_METRICS, "top1_regret", "top1_relative_regret", "picked"):
        assert getattr(moved, metric) == pytest.approx(getattr(base, metric), abs=1e-12), metric


def test_pearson_is_not_rank_based() -> None:
    base = evaluate_ranking(AIRCRAFT_SCORES, AIRCRAFT)
    moved = evaluate_ranking({name: math.exp(20.0 * v) for name, v in AIRCRAFT_SCORES.items()}, AIRCRAFT)
    assert abs(moved.pearson - base.pearson) > 1e-3


def test_weighted_tau_punishes_a_swap_at_the_top_more_than_at_the_bottom() -> None:
    truth = {f"m{i}": float(i) for i in range(8)}
    swap_top = dict(truth, m7=6.0, m6=7.0)
    swap_bottom = dict(truth, m0=1.0, m1=0.0)
    top, bottom = evaluate_ranking(swap_top, truth), evaluate_ranking(swap_bottom, truth)
    assert top.kendall_tau == pytest.approx(bottom.kendall_tau, abs=1e-12)
    assert top.weighted_tau < bottom.weighted_tau - 0.05
    assert top.top1_regret == 1.0 and bottom.top1_regret == 0.0


def test_result_does_not_depend_on_the_order_of_the_models() -> None:
    reordered_scores = dict(reversed(list(AIRCRAFT_SCORES.items())))
    reordered_truth = dict(sorted(AIRCRAFT.items()))
    assert evaluate_ranking(reordered_scores, reordered_truth) == evaluate_ranking(AIRCRAFT_SCORES, AIRCRAFT)


def test_regret_is_absolute_and_relative_is_one_minus_rel_at_1() -> None:
    scores, truth = AIRCRAFT_SCORES, AIRCRAFT
    picked = max(scores, key=scores.__getitem__)  # densenet201, no tie at the top
    best = max(truth.values())
    got = evaluate_ranking(scores, truth)
    assert got.picked == (picked,)
    assert got.top1_regret == pytest.approx(best - truth[picked], abs=1e-12)
    rel_at_1 = truth[picked] / best  # SFDA's rel_k with k = 1
    assert got.top1_relative_regret == pytest.approx(1.0 - rel_at_1, abs=1e-12)


def test_a_tie_at_the_top_costs_the_mean_regret_of_the_tied_models() -> None:
    got = evaluate_ranking({"a": 5.0, "b": 5.0, "c": 1.0}, {"a": 90.0, "b": 80.0, "c": 95.0})
    assert got.picked == ("a", "b")
    assert got.top1_regret == pytest.approx(95.0 - (90.0 + 80.0) / 2.0, abs=1e-12)


def test_relative_regret_is_none_without_a_positive_best_truth() -> None:
    scores, truth = HAND_CASES["negative_truth"]
    got = evaluate_ranking(scores, truth)
    assert got.top1_relative_regret is None
    assert got.picked == ("a",) and got.top1_regret == 0.0


def test_huge_finite_values_do_not_overflow() -> None:
    scores = {"a": 1e308, "b": -1e308, "c": 1.7e308}
    truth = {"a": 2.0, "b": 1.0, "c": 3.0}
    got = evaluate_ranking(scores, truth)
    want = scipy_metrics({k: v / 1e300 for k, v in scores.items()}, truth)
    for metric in CORRELATIONS:
        assert getattr(got, metric) == pytest.approx(want[metric], abs=1e-12), metric


def test_constant_scores_rank_nothing_and_warn() -> None:
    with pytest.warns(UserWarning, match="same score; it ranks nothing"):
        got = evaluate_ranking({"a": 2.0, "b": 2.0, "c": 2.0}, {"a": 1.0, "b": 2.0, "c": 6.0})
    assert all(getattr(got, metric) is None for metric in CORRELATIONS)
    assert got.picked == ("a", "b", "c")
    assert got.top1_regret == pytest.approx(6.0 - 3.0, abs=1e-12)


# --- several scorers and input shapes ------------------------------------------------------


def test_several_scorers_match_one_at_a_time_and_keep_their_order() -> None:
    table = {
        "zeta": AIRCRAFT_SCORES,
        "alpha": {name: -v for name, v in AIRCRAFT.items()},
        "mid": {name: (v - 80.0) ** 2 for name, v in AIRCRAFT.items()},
    }
    got = evaluate_rankings(table, AIRCRAFT)
    assert list(got) == ["zeta", "alpha", "mid"]
    for scorer, scores in table.items():
        assert got[scorer] == evaluate_ranking(scores, AIRCRAFT)


def test_top_level_api_exports() -> None:
    assert fedmte.evaluate_ranking is evaluate_ranking
    assert fedmte.evaluate_rankings is evaluate_rankings
    assert isinstance(evaluate_ranking(*HAND_CASES["two_models"]), fedmte.RankingMetrics)


def test_numpy_scalars_are_accepted() -> None:
    scores = {"a": np.float32(0.5), "b": np.int64(2), "c": np.float64(-1.0)}
    truth = {"a": 2.0, "b": 3.0, "c": 1.0}
    assert evaluate_ranking(scores, truth).kendall_tau == pytest.approx(1.0, abs=1e-12)


def test_parse_scores_accepts_three_shapes() -> None:
    flat = {"a": 1.0, "b": 2.0}
    assert parse_scores(flat) == {SINGLE_SCORER_NAME: flat}
    nested = {"logme": flat, "hscore": {"a": 3, "b": 1}}
    assert parse_scores(nested) == {"logme": flat, "hscore": {"a": 3.0, "b": 1.0}}
    report = {
        "schema": "anything",
        "models": [
            {"name": "a", "scores": {"logme": 1.0, "hscore": 3}, "rank": 2},
            {"name": "b", "scores": {"logme": 2.0, "hscore": 1}},
        ],
    }
    assert parse_scores(report) == nested


def test_report_with_a_scorer_missing_for_one_model_names_it() -> None:
    report = {"models": [{"name": "a", "scores": {"logme": 1.0, "gbc": 2.0}}, {"name": "b", "scores": {"logme": 2.0}}]}
    with pytest.raises(InvalidInputError, match=r"scorer 'gbc'.*no score for \['b'\]"):
        evaluate_rankings(parse_scores(report), {"a": 1.0, "b": 2.0})


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "truth", "match"),
    [
        ({"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3}, r"no score for \['c'\]"),
        ({"a": 1, "b": 2, "x": 3}, {"a": 1, "b": 2}, r"no truth for \['x'\]"),
        ({"a": 1, "y": 2}, {"a": 1, "b": 2}, r"no score for \['b'\]; no truth for \['y'\]"),
        ({"a": 1}, {"a": 1}, "at least 2 models"),
        ({"a": 1, "b": float("nan")}, {"a": 1, "b": 2}, r"scores\['score'\]\['b'\]: Input should be a finite number"),
        ({"a": 1, "b": 2}, {"a": 1, "b": float("inf")}, r"truth\['b'\]: Input should be a finite number"),
        ({"a": True, "b": 2}, {"a": 1, "b": 2}, "not a boolean"),
        ({"a": "1", "b": 2}, {"a": 1, "b": 2}, "valid number"),
        ({"a": 1, "b": 2}, {"a": 70, "b": 70}, "same truth"),
        ({"": 1, "b": 2}, {"a": 1, "b": 2}, "a name in scores"),
    ],
    ids=["missing_score", "missing_truth", "both_missing", "one_model", "nan_score", "inf_truth", "bool", "string", "constant_truth", "empty_name"],
)
def test_bad_inputs_raise_typed_errors(scores: dict, truth: dict, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        evaluate_ranking(scores, truth)


def test_evaluate_rankings_wants_nested_scores() -> None:
    with pytest.raises(InvalidInputError, match=r"scores\['a'\]: Input should be a valid dictionary"):
        evaluate_rankings({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0})
    with pytest.raises(InvalidInputError, match="at least one scorer"):
        evaluate_rankings({}, {"a": 1.0, "b": 2.0})


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2], "got list"),
        ({}, "got an empty mapping"),
        ({"a": 1.0, "b": {"a": 1.0}}, r"mixes .*plain values at \['a'\]"),
        ({"models": []}, "lists no models"),
        ({"models": [{"name": "a", "scores": {}}]}, "no model in the report has any score"),
        ({"models": [{"name": "a", "scores": {"s": 1}}, {"name": "a", "scores": {"s": 2}}]}, "'a' appears twice"),
        ({"models": [{"scores": {"s": 1}}]}, r"\['models'\]\[0\]\['name'\]: Field required"),
    ],
    ids=["list", "empty", "mixed", "empty_report", "no_scores", "duplicate_model", "no_name"],
)
def test_parse_scores_errors(data: object, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        parse_scores(data)


def test_parse_truth_rejects_nested_mappings() -> None:
    with pytest.raises(InvalidInputError, match=r"TRUTH\['logme'\]: Input should be a valid number"):
        parse_truth({"logme": {"a": 1.0}}, "TRUTH")
    with pytest.raises(InvalidInputError, match="must map model names to numbers"):
        parse_truth([("a", 1.0)], "TRUTH")


# --- the command line ------------------------------------------------------------------------


def write(tmp_path: Path, name: str, content: object | str) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def run_cli(*args: str):
    return CliRunner().invoke(app, ["evaluate", *map(str, args)])


def test_cli_json_matches_scipy(tmp_path: Path) -> None:
    reversed_scores = {name: -v for name, v in AIRCRAFT.items()}
    scores = write(tmp_path, "scores.json", {"sfda": AIRCRAFT_SCORES, "bad": reversed_scores})
    truth = write(tmp_path, "truth.json", AIRCRAFT)
    result = run_cli(scores, truth, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert list(got) == ["sfda", "bad"]
    want = scipy_metrics(AIRCRAFT_SCORES, AIRCRAFT)
    for metric in CORRELATIONS:
        assert got["sfda"][metric] == pytest.approx(want[metric], abs=1e-12)
    assert got["bad"]["kendall_tau"] == pytest.approx(-1.0, abs=1e-12)
    assert got["bad"]["picked"] == ["mnasnet1_0"]


def test_cli_table_for_a_flat_scores_file(tmp_path: Path) -> None:
    scores = write(tmp_path, "scores.json", AIRCRAFT_SCORES)
    truth = write(tmp_path, "truth.json", AIRCRAFT)
    result = run_cli(scores, truth)
    assert result.exit_code == 0, result.output
    want = scipy_metrics(AIRCRAFT_SCORES, AIRCRAFT)
    assert "truth.json" in result.stdout and SINGLE_SCORER_NAME in result.stdout
    assert f"{want['weighted_tau']:.4f}" in result.stdout
    assert f"{want['kendall_tau']:.4f}" in result.stdout


def test_cli_reads_a_report_and_warns_about_constant_scores(tmp_path: Path) -> None:
    report = {"models": [{"name": name, "scores": {"flat": 1.0, "good": v}} for name, v in AIRCRAFT.items()]}
    result = run_cli(write(tmp_path, "report.json", report), write(tmp_path, "truth.json", AIRCRAFT), "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["flat"]["weighted_tau"] is None and got["good"]["weighted_tau"] == pytest.approx(1.0, abs=1e-12)
    assert "warning: scorer 'flat' gives all 11 models the same score" in result.stderr


@pytest.mark.parametrize(
    ("scores_text", "match"),
    [
        ('{"a": 1, ', "scores.json is not valid JSON"),
        ('{"a": 1, "a": 2, "b": 3}', r"key\(s\) \['a'\] appear more than once"),
        ('{"a": NaN, "b": 2}', r"scores.json\['a'\]: Input should be a finite number"),
        ('{"a": 1, "c": 2}', r"no score for \['b'\]; no truth for \['c'\]"),
        ('"text"', "got str"),
    ],
    ids=["broken_json", "duplicate_key", "nan", "other_models", "not_a_mapping"],
)
def test_cli_bad_scores_file_gives_one_line_error(tmp_path: Path, scores_text: str, match: str) -> None:
    truth = write(tmp_path, "truth.json", {"a": 1.0, "b": 2.0})
    result = run_cli(write(tmp_path, "scores.json", scores_text), truth)
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert message.startswith("error:") and "Traceback" not in result.output
    assert re.search(match, " ".join(message.split())), message


def test_cli_missing_truth_file(tmp_path: Path) -> None:
    scores = write(tmp_path, "scores.json", {"a": 1.0, "b": 2.0})
    result = run_cli(scores, tmp_path / "absent.json")
    assert result.exit_code == 2
    assert "absent.json does not exist" in result.stderr


def test_cli_evaluate_is_registered() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "evaluate" in result.stdout


def test_no_warning_for_a_proper_ranking() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_ranking(AIRCRAFT_SCORES, AIRCRAFT)
