"""How well a scorer ranks candidate models, judged against ground truth.

A transferability scorer is judged the way the model-transferability-estimation (MTE)
literature judges it: score every candidate model, fine-tune every candidate model, and
compare the two rankings. Here ``x`` is a scorer's score per model (higher = predicted to
transfer better) and ``y`` the ground truth per model (higher = better, e.g. fine-tuned
top-1 accuracy); both are indexed by model name, ``n`` models.

Notes
-----
``weighted_tau``
    Vigna's weighted Kendall tau with the additive hyperbolic weigher, the headline metric
    of LogME (You et al., ICML 2021), SFDA (Shao et al., ECCV 2022; ``TencentARC/SFDA``
    ``rank_correlation.py`` calls ``scipy.stats.weightedtau(score, acc)``) and Agostinelli
    et al. (ECCV 2022; ``google-research/stable_transfer`` calls it with the arguments
    swapped, which changes nothing because the default is symmetric). This is exactly
    ``scipy.stats.weightedtau(x, y)`` with its defaults (``rank=True``, ``weigher=None``,
    ``additive=True``). For a ranking ``r`` of the models (0 = most important) each pair
    gets the weight ``w_ij = 1/(r_i + 1) + 1/(r_j + 1)`` and::

        tau_r(x, y) = sum_{i<j} w_ij sgn(x_i - x_j) sgn(y_i - y_j)
                      / sqrt( sum_{i<j} w_ij [x_i != x_j] * sum_{i<j} w_ij [y_i != y_j] )

        weighted_tau = ( tau_{r(x, y)} + tau_{r(y, x)} ) / 2

    where ``r(x, y)`` orders the models by decreasing ``x``, ties by decreasing ``y``. A
    swap among the top models costs more than one among the bottom ones, which is what a
    user picking one model cares about. Models tied in both ``x`` and ``y`` may be ordered
    either way: their pairs with any third model carry the same sign, so the sum is the same.
``kendall_tau``
    Kendall's tau-b: the formula above with every ``w_ij = 1``
    (``scipy.stats.kendalltau``'s default).
``spearman``
    Spearman's rho: the Pearson correlation of the average ranks (``scipy.stats.spearmanr``).
``pearson``
    Pearson's r of the raw values (``scipy.stats.pearsonr``). Unlike the three rank metrics
    it changes under a monotone transform of the scores (LogME is a log evidence, NCE a
    log-likelihood), so compare it across scorers with care.
``top1_regret``
    Absolute top-1 regret, ``max_m y_m - y_picked``, in the units of the truth (accuracy
    points): what the user loses by fine-tuning the model the scorer ranks first rather than
    the truly best one (the regret of Renggli et al., "Which Model to Transfer? Finding the
    Needle in the Growing Haystack", CVPR 2022). 0 when the scorer picks a best model.
``top1_relative_regret``
    ``(max_m y_m - y_picked) / max_m y_m``, i.e. ``1 - Rel@1``, where Rel@1 =
    ``y_picked / max_m y_m`` is the relative top-1 accuracy of SFDA's ``rel_k`` (k = 1) and
    of ``stable_transfer``'s ``relative_top_accuracy``. Defined only when ``max_m y_m > 0``
    (accuracies are); otherwise ``None``.

When several models share the highest score, ``y_picked`` is the mean truth over them: the
expected truth of a uniformly random tie-break, so the result does not depend on the order
in which models are listed.

A scorer that gives every model the same score ranks nothing: its four correlations are
``None`` (undefined, 0/0), with a :class:`UserWarning`, and its regret is that of a random
pick. Ground truth that is the same for every model cannot judge a ranking and raises.

References
----------
S. Vigna, "A weighted correlation index for rankings with ties", WWW 2015.
K. You, Y. Liu, J. Wang, M. Long, "LogME: Practical Assessment of Pre-trained Models for
Transfer Learning", ICML 2021.
W. Shao et al., "Not All Models Are Equal: Predicting Model Transferability in a
Self-challenging Fisher Space", ECCV 2022.
A. Agostinelli et al., "How stable are Transferability Metrics evaluations?", ECCV 2022.
C. Renggli et al., "Which Model to Transfer? Finding the Needle in the Growing Haystack",
CVPR 2022.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping
from typing import Annotated

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    StringConstraints,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from fedmte.protocol.errors import InvalidInputError

__all__ = [
    "MIN_MODELS",
    "SINGLE_SCORER_NAME",
    "ModelValues",
    "ScorerTable",
    "ReportModel",
    "ScoreReport",
    "RankingMetrics",
    "parse_truth",
    "parse_scores",
    "evaluate_ranking",
    "evaluate_rankings",
]

MIN_MODELS = 2  # with two models every correlation is +-1, still defined
SINGLE_SCORER_NAME = "score"  # the label of a flat {model: score} mapping
_MAX_ERRORS_SHOWN = 3


def _real_number(value: object) -> object:
    """Pass any real number (Python or numpy, not a bool) on as a float; leave the rest to pydantic."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (bool, np.bool_)):
        raise PydanticCustomError("number_not_bool", "Input should be a number, not a boolean")
    return value


FiniteNumber = Annotated[float, BeforeValidator(_real_number), Field(strict=True, allow_inf_nan=False)]
Name = Annotated[str, StringConstraints(min_length=1)]


class ModelValues(RootModel[dict[Name, FiniteNumber]]):
    """``{model name: number}``: a ground-truth file, or the scores of a single scorer."""


class ScorerTable(RootModel[dict[Name, dict[Name, FiniteNumber]]]):
    """``{scorer name: {model name: score}}``: several scorers' scores of the same models."""


class ReportModel(BaseModel):
    """One model of a scoring report: its name and its score under each scorer."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    name: Name
    scores: dict[Name, FiniteNumber]


class ScoreReport(BaseModel):
    """A scoring report, ``{"models": [{"name": ..., "scores": {scorer: value}}, ...]}``;
    other keys (of the report or of a model) are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    models: list[ReportModel]


class RankingMetrics(BaseModel):
    """How one scorer's ranking of ``n_models`` models agrees with the ground truth.

    The four correlations lie in [-1, 1] (1: same order) and are ``None`` when the scorer
    gave every model the same score. ``picked`` are the models with the highest score,
    ``best`` those with the highest truth. See the module docstring for the definitions.
    """

    model_config = ConfigDict(frozen=True)
    n_models: int
    weighted_tau: float | None
    kendall_tau: float | None
    spearman: float | None
    pearson: float | None
    top1_regret: float
    top1_relative_regret: float | None
    picked: tuple[str, ...]
    best: tuple[str, ...]


def _one_line(error: ValidationError, what: str) -> str:
    """A pydantic error as one line: where (``what.key.key``) and what is wrong, first few only."""
    parts = []
    for item in error.errors()[:_MAX_ERRORS_SHOWN]:
        path = "".join("" if part == "[key]" else f"[{part!r}]" for part in item["loc"])
        subject = "a name in " if "[key]" in item["loc"] else ""
        parts.append(f"{subject}{what}{path}: {item['msg']}")
    more = len(error.errors()) - _MAX_ERRORS_SHOWN
    return "; ".join(parts) + (f" (and {more} more problems)" if more > 0 else "")


def parse_truth(data: object, what: str = "truth") -> dict[str, float]:
    """Validate ground truth given as ``{model name: finite number}`` (parsed JSON or a mapping).

    Raises
    ------
    InvalidInputError
        Not a mapping of names to finite numbers; ``what`` names it in the message.
    """
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"{what} must map model names to numbers, e.g. {{\"resnet50\": 84.6}}; got {type(data).__name__}")
    try:
        return dict(ModelValues.model_validate(dict(data)).root)
    except ValidationError as error:
        raise InvalidInputError(_one_line(error, what)) from None


def parse_scores(data: object, what: str = "scores") -> dict[str, dict[str, float]]:
    """Validate scores in any of the three accepted shapes; return ``{scorer: {model: score}}``.

    Shapes: ``{model: score}`` (one scorer, labelled :data:`SINGLE_SCORER_NAME`),
    ``{scorer: {model: score}}``, or a report ``{"models": [{"name": model, "scores":
    {scorer: score}}, ...]}``. In a report a scorer missing for some model leaves that model
    out of the scorer's mapping, which :func:`evaluate_rankings` then reports by name.

    Raises
    ------
    InvalidInputError
        None of the shapes, mixed shapes, non-finite values, a model named twice in a report.
    """
    if not isinstance(data, Mapping) or not data:
        kind = "an empty mapping" if isinstance(data, Mapping) else type(data).__name__
        raise InvalidInputError(
            f"{what} must be {{model: score}}, {{scorer: {{model: score}}}} or a report "
            f"{{\"models\": [...]}}; got {kind}"
        )
    try:
        if isinstance(data.get("models"), list):
            return _scores_from_report(ScoreReport.model_validate(dict(data)), what)
        nested = [isinstance(value, Mapping) for value in data.values()]
        if all(nested):
            return {name: dict(values) for name, values in ScorerTable.model_validate(dict(data)).root.items()}
        if not any(nested):
            return {SINGLE_SCORER_NAME: dict(ModelValues.model_validate(dict(data)).root)}
    except ValidationError as error:
        raise InvalidInputError(_one_line(error, what)) from None
    flat = [str(key) for key, is_nested in zip(data, nested) if not is_nested]
    raise InvalidInputError(
        f"{what} mixes {{model: score}} and {{scorer: {{model: score}}}} entries "
        f"(plain values at {flat[:_MAX_ERRORS_SHOWN]}); use one shape"
    )


def _scores_from_report(report: ScoreReport, what: str) -> dict[str, dict[str, float]]:
    if not report.models:
        raise InvalidInputError(f"{what}: the report lists no models")
    table: dict[str, dict[str, float]] = {}
    for entry in report.models:
        for scorer, value in entry.scores.items():
            per_model = table.setdefault(scorer, {})
            if entry.name in per_model:
                raise InvalidInputError(f"{what}: model {entry.name!r} appears twice in the report; keep one entry per model")
            per_model[entry.name] = value
    if not table:
        raise InvalidInputError(f"{what}: no model in the report has any score")
    return table


# --- the metrics, on aligned float64 arrays (n,) ------------------------------------------


def _pair_signs(v: np.ndarray) -> np.ndarray:
    """(n, n) matrix of sgn(v_i - v_j); comparisons, so no overflow for huge finite values."""
    return (v[:, None] > v[None, :]).astype(np.float64) - (v[:, None] < v[None, :]).astype(np.float64)


def _tau(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float | None:
    """sum w sgn sgn / sqrt(sum w [x differ] * sum w [y differ]) over pairs i < j; None if 0/0."""
    upper = np.triu(np.ones(weights.shape, dtype=bool), k=1)
    sx, sy = _pair_signs(x)[upper], _pair_signs(y)[upper]
    w = weights[upper]
    norm_x, norm_y = float(np.sum(w * (sx != 0))), float(np.sum(w * (sy != 0)))
    if norm_x == 0.0 or norm_y == 0.0:
        return None
    return float(np.clip(np.sum(w * sx * sy) / np.sqrt(norm_x) / np.sqrt(norm_y), -1.0, 1.0))


def _hyperbolic_pair_weights(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """w_ij = 1/(r_i+1) + 1/(r_j+1), r = rank by decreasing ``primary``, ties by decreasing ``secondary``."""
    order = np.lexsort((-secondary, -primary))  # last key sorts first
    rank = np.empty(len(order), dtype=np.float64)
    rank[order] = np.arange(len(order), dtype=np.float64)
    per_model = 1.0 / (rank + 1.0)
    return per_model[:, None] + per_model[None, :]


def _weighted_tau(x: np.ndarray, y: np.ndarray) -> float | None:
    by_x = _tau(x, y, _hyperbolic_pair_weights(x, y))
    by_y = _tau(x, y, _hyperbolic_pair_weights(y, x))
    if by_x is None or by_y is None:
        return None
    return (by_x + by_y) / 2.0


def _kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float | None:
    return _tau(x, y, np.ones((len(x), len(x))))


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if np.all(x == x[0]) or np.all(y == y[0]):
        return None
    # Divide by the largest magnitude first so that centring and squaring cannot overflow.
    xc = x / np.max(np.abs(x))
    yc = y / np.max(np.abs(y))
    xc = xc - xc.mean()
    yc = yc - yc.mean()
    denominator = np.sqrt(np.sum(xc * xc)) * np.sqrt(np.sum(yc * yc))
    if denominator == 0.0:
        return None
    return float(np.clip(np.sum(xc * yc) / denominator, -1.0, 1.0))


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts  # values strictly smaller than each distinct value
    return (below + (counts + 1) / 2.0)[inverse]


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    return _pearson(_average_ranks(x), _average_ranks(y))


# --- public API ------------------------------------------------------------------------


def _aligned(scores: dict[str, float], truth: dict[str, float], scorer: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    missing_truth = sorted(set(scores) - set(truth))
    missing_scores = sorted(set(truth) - set(scores))
    if missing_truth or missing_scores:
        problems = []
        if missing_scores:
            problems.append(f"no score for {missing_scores}")
        if missing_truth:
            problems.append(f"no truth for {missing_truth}")
        raise InvalidInputError(
            f"scorer {scorer!r} and the truth must cover the same models: {'; '.join(problems)}"
        )
    names = sorted(truth)
    x = np.array([scores[name] for name in names], dtype=np.float64)
    y = np.array([truth[name] for name in names], dtype=np.float64)
    return names, x, y


def _check_truth(truth: dict[str, float]) -> None:
    if len(truth) < MIN_MODELS:
        raise InvalidInputError(f"need at least {MIN_MODELS} models to judge a ranking; the truth has {len(truth)}")
    values = list(truth.values())
    if all(value == values[0] for value in values):
        raise InvalidInputError(
            f"every model has the same truth ({values[0]!r}), so there is no ranking to judge against; "
            "give each model its measured accuracy"
        )


def _metrics(names: list[str], x: np.ndarray, y: np.ndarray, scorer: str) -> RankingMetrics:
    top = x == np.max(x)
    best_truth = float(np.max(y))
    picked_truth = float(np.mean(y[top]))
    regret = max(best_truth - picked_truth, 0.0)
    if np.all(top):
        warnings.warn(
            f"scorer {scorer!r} gives all {len(names)} models the same score; it ranks nothing, "
            "so its correlations are None",
            UserWarning,
            stacklevel=3,
        )
    return RankingMetrics(
        n_models=len(names),
        weighted_tau=_weighted_tau(x, y),
        kendall_tau=_kendall_tau_b(x, y),
        spearman=_spearman(x, y),
        pearson=_pearson(x, y),
        top1_regret=regret,
        top1_relative_regret=regret / best_truth if best_truth > 0 else None,
        picked=tuple(name for name, flag in zip(names, top) if flag),
        best=tuple(name for name, value in zip(names, y) if value == best_truth),
    )


def evaluate_ranking(scores: Mapping[str, float], truth: Mapping[str, float]) -> RankingMetrics:
    """Judge one scorer's scores against the ground truth.

    Parameters
    ----------
    scores : mapping model name -> finite score (higher = predicted to transfer better)
    truth : mapping model name -> finite ground truth (higher = better), same model names

    Returns
    -------
    RankingMetrics
        Weighted tau, Kendall tau-b, Spearman, Pearson, absolute and relative top-1 regret.

    Raises
    ------
    InvalidInputError
        Different model names (each missing one is named), fewer than :data:`MIN_MODELS`
        models, a non-finite or non-numeric value, or a truth equal for every model.
    """
    return evaluate_rankings({SINGLE_SCORER_NAME: scores}, truth)[SINGLE_SCORER_NAME]


def evaluate_rankings(
    scores: Mapping[str, Mapping[str, float]], truth: Mapping[str, float]
) -> dict[str, RankingMetrics]:
    """Judge several scorers at once: ``{scorer: {model: score}}`` -> ``{scorer: RankingMetrics}``.

    Every scorer must score exactly the models of ``truth``; the order of scorers is kept.
    Raises :class:`InvalidInputError` as :func:`evaluate_ranking` does, naming the scorer.
    """
    truth_values = parse_truth(truth, "truth")
    _check_truth(truth_values)
    if not isinstance(scores, Mapping) or not scores:
        raise InvalidInputError("scores must map at least one scorer name to {model: score}")
    try:
        table = ScorerTable.model_validate(dict(scores)).root
    except ValidationError as error:
        raise InvalidInputError(_one_line(error, "scores")) from None
    result = {}
    for scorer, per_model in table.items():
        names, x, y = _aligned(per_model, truth_values, scorer)
        result[scorer] = _metrics(names, x, y, scorer)
    return result
