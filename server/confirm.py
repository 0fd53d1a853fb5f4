"""Stage 2 of a job: confirm the top candidates by real transfer, then decide.

A transferability score only ranks; the careful practice is to take the top few and check
them by actually transferring. With a ``[confirm]`` table a job's top ``top_k`` candidates
(the ranking's recommendation, tie groups kept whole) are fitted a classifier head over the
sites' data and validated on rows the sites hold back (:mod:`fedmte.protocol.scorers.linear_probe`):
``mode = "probe"``, the exact federated logistic-regression probe (Newton rounds on the summed
loss, gradient and Hessian), or ``mode = "lda"``, a shrunk LDA head in closed form (two
rounds, no Hessian to noise: the mode for DP), then the held-back correct-prediction counts.
It runs as a second job over the same federation, through the same policy, secure sum, DP,
ledger and audit as the scoring.

:func:`validations` reads each confirmed model's held-back counts from what the sums
released; :func:`decide` picks the model with the best validated accuracy and says how
each scorer's ranking of the confirmed models compared with the validated order.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import Field
from scipy import stats

from fedmte.protocol.encoding import StrictModel
from fedmte.protocol.evaluation import evaluate_ranking
from fedmte.protocol.requests import Stat
from fedmte.server.job import JobSpec

SCORER_OF_MODE = {"probe": "linear_probe", "lda": "lda_probe"}
"""The registry program each ``[confirm] mode`` runs (:mod:`fedmte.protocol.scorers.linear_probe`)."""
LEVEL = 0.95


class Validation(StrictModel):
    """A confirmed candidate's accuracy on the sites' held-back rows."""

    accuracy: float | None = Field(description="correct / rows over every site's held-back rows")
    low: float | None = Field(default=None, description=f"{LEVEL:.0%} Clopper-Pearson interval, lower end")
    high: float | None = Field(default=None, description=f"{LEVEL:.0%} Clopper-Pearson interval, upper end")
    correct: float = Field(description="held-back rows predicted right (summed over sites; noisy under DP)")
    rows: float = Field(description="held-back rows (summed over sites; noisy under DP)")
    mode: Literal["probe", "lda"] = "probe"
    rounds: int = Field(description="statistics rounds of the confirmation job")
    noisy: bool = Field(default=False, description="the counts carry DP noise (the interval is the binomial one only)")
    failure: str | None = None


class ScorerVerdict(StrictModel):
    """How one scorer's ranking of the confirmed candidates compares with the validated order."""

    scorer: str
    weighted_tau: float | None
    top1_regret: float = Field(description="validated accuracy of the best minus that of the scorer's pick")
    picked: list[str]


class Decision(StrictModel):
    """The job's choice after confirmation, and why."""

    model: str | None
    runner_up: str | None = None
    margin: float | None = Field(default=None, description="the chosen model's validated accuracy minus the runner-up's")
    separated: bool = Field(default=False, description="the two intervals do not overlap")
    confirmed: list[str] = Field(default_factory=list)
    scores_put_first: str | None = Field(default=None, description="the candidate the scores ranked first")
    scorers: list[ScorerVerdict] = Field(default_factory=list)
    summary: str = ""


def confirmation_candidates(recommendation_groups: Sequence[Sequence[str]], top_k: int) -> list[str]:
    """The first ``top_k`` recommended candidates, a tie group at the cut kept whole."""
    chosen: list[str] = []
    for group in recommendation_groups:
        if len(chosen) >= top_k:
            break
        chosen.extend(group)
    return chosen


def confirmation_job(job: JobSpec, recommendation_groups: Sequence[Sequence[str]]) -> JobSpec | None:
    """The stage-2 job: the confirmed candidates, the linear probe with the ``[confirm]``
    options, no constraints (they were applied when recommending) and no bootstrap."""
    settings = job.confirm
    if settings is None:
        return None
    names = confirmation_candidates(recommendation_groups, settings.top_k)
    if not names:
        return None
    scorer = SCORER_OF_MODE[settings.mode]
    options: dict[str, object] = {"holdout": settings.holdout, "seed": settings.seed}
    options.update({"l2": settings.l2, "max_rounds": settings.max_rounds} if settings.mode == "probe" else
                   {"shrinkage": settings.shrinkage})
    ranking = job.ranking.model_copy(update={"bootstrap": 0, "top_k": 1, "aggregate": "mean_rank", "scorer": None})
    return job.model_copy(update={
        "candidates": [c for c in job.candidates if c.label in names],
        "scorers": [scorer], "scorer_options": {scorer: options}, "ranking": ranking,
        "constraints": type(job.constraints)(), "confirm": None,
        "purpose": (job.purpose + " (confirmation: a linear probe on held-back rows)").strip(),
    })


def held_back_counts(blocks: Mapping[str, np.ndarray], stats_by_key: Mapping[str, Stat]) -> tuple[float, float] | None:
    """(correct, rows) on the held-back rows from a probe's released sums, or None."""
    correct = [blocks[k] for k, s in stats_by_key.items() if s.kind == "probe_correct" and k in blocks]
    held = [blocks[k] for k, s in stats_by_key.items()
            if s.kind == "holdout_class_counts" and int(np.asarray(s.arrays.get("part", 0))) == 1 and k in blocks]
    if not correct or not held:
        return None
    return float(np.sum(correct[-1])), float(np.sum(held[-1]))


def validation_of(correct: float, rows: float, *, rounds: int, noisy: bool, mode: str = "probe",
                  failure: str | None = None) -> Validation:
    """A validation from its counts, with a Clopper-Pearson interval (counts rounded and put
    in [0, rows]: DP noise can push them outside)."""
    n = max(int(round(rows)), 0)
    k = min(max(int(round(correct)), 0), n)
    if n == 0 or failure is not None:
        return Validation(accuracy=None, correct=correct, rows=rows, rounds=rounds, noisy=noisy, mode=mode,
                          failure=failure or "no held-back rows")
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=LEVEL, method="exact")
    return Validation(accuracy=k / n, low=float(interval.low), high=float(interval.high), correct=correct, rows=rows,
                      rounds=rounds, noisy=noisy, mode=mode)


def decide(validated: Mapping[str, Validation], scores: Mapping[str, Mapping[str, float]],
           ranked_scorers: Sequence[str], order: Sequence[str]) -> Decision:
    """The best validated candidate; the runner-up and the margin; each scorer's ranking of
    the confirmed candidates against the validated accuracies (weighted tau, top-1 regret)."""
    accuracy = {name: v.accuracy for name, v in validated.items() if v.accuracy is not None}
    confirmed = list(validated)
    first = next((name for name in order if name in validated), None)
    if not accuracy:
        return Decision(model=None, confirmed=confirmed, scores_put_first=first,
                        summary="no confirmed candidate could be validated; the ranking stands unconfirmed")
    ranked = sorted(accuracy, key=lambda name: (-accuracy[name], order.index(name) if name in order else len(order)))
    chosen, runner = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    margin = None if runner is None else accuracy[chosen] - accuracy[runner]
    best, second = validated[chosen], validated[runner] if runner else None
    separated = bool(second is not None and best.low is not None and second.high is not None and best.low > second.high)
    verdicts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for scorer in ranked_scorers:
            values = {name: scores[name][scorer] for name in accuracy if scorer in scores.get(name, {})}
            if len(values) < 2:
                continue
            metrics = evaluate_ranking(values, {name: accuracy[name] for name in values})
            verdicts.append(ScorerVerdict(scorer=scorer, weighted_tau=metrics.weighted_tau,
                                          top1_regret=metrics.top1_regret, picked=list(metrics.picked)))
    rows = int(round(best.rows))
    agreed = "the scores had put it first" if chosen == first else f"the scores had put {first} first"
    text = (f"chosen: {chosen}; confirmed at {best.accuracy:.2f} ({best.low:.2f} to {best.high:.2f}) on {rows:,} "
            f"held-back rows; {agreed}")
    if runner is not None and margin is not None:
        text += (f"; runner-up {runner} at {accuracy[runner]:.2f}, "
                 + (f"{margin:.2f} behind, clearly apart" if separated else
                    f"{margin:.2f} behind, within the intervals: they cannot be told apart on these rows"))
    return Decision(model=chosen, runner_up=runner, margin=margin, separated=separated, confirmed=confirmed,
                    scores_put_first=first, scorers=verdicts, summary=text)


__all__ = ["SCORER_OF_MODE", "Decision", "ScorerVerdict", "Validation", "confirmation_candidates", "confirmation_job", "decide",
           "held_back_counts", "validation_of"]
