"""Rank candidate models from their scores, apply business constraints, recommend the top k.

Pure: scores and measured metadata in, a :class:`Ranking` out; no I/O.

Steps of :func:`rank_models`:

1. **Constraints.** Each rule the job sets (``max_latency_ms``, ``max_parameters``,
   ``max_peak_memory_mb``, ``licenses``) is checked on the model's metadata. A rule whose
   metadata is missing is violated (compliance cannot be shown). A violation *filters* the
   model (left out of the ranking: no ranks, no aggregate, listed with the rule that removed
   it) or *flags* it (ranked as usual, never recommended), per the job's action for that rule.
2. **Cross-model scores.** A scorer whose registry entry has a ``combine`` step
   (:class:`fedmte.protocol.scorers.base.ScorerSpec`) is replaced by that step over its
   ``helper_scorers`` of the models still in the ranking (any scaling across models is
   over the candidate pool the user chooses among, so it is taken after filtering). A
   model missing any helper score has no value (a failure); a filtered model gets none.
   The scorer's own per-model value is never ranked and is kept as
   ``auxiliary["<name>_unscaled"]``. NCTI is the one such scorer: ``ncti`` is replaced by
   the paper's NCTI, :func:`fedmte.protocol.scorers.ncti.combine` over the terms
   ``ncti_seli``, ``ncti_ncc``, ``ncti_vc``; the per-model ``ncti`` (seli + ncc - vc,
   unscaled) is never ranked, since its seli term grows with n and dominates (see the ncti
   module), and is kept as ``auxiliary["ncti_unscaled"]``.
3. **Per-scorer ranks.** Higher score = better = rank 1. Ties share a rank: ``average``
   (default; the mean of the positions they span, 2.5 for two models tied for places 2
   and 3, so the ranks of every scorer sum to n(n+1)/2 and no scorer weighs more in a mean
   rank) or ``min`` (competition ranking: both get 2, the next gets 4). A score that failed
   (``None``, NaN or infinite) ranks below every model that has one; failed models tie with
   each other under the same rule. This keeps every scorer's ranks on the same 1..n scale,
   so a model cannot climb the aggregate because a scorer failed on it. A scorer that failed
   for every model carries no information and is dropped from the aggregate (with a note).
4. **Aggregate.** ``mean_rank`` (default): the mean of the model's ranks over the scorers,
   lower is better. ``median_rank``: their median, robust to one scorer that disagrees.
   ``borda``: Borda count, each scorer awarding n - rank points (the number of models the
   model beats, ties counting half under average ties), summed, higher is better; a failed
   score awards 0 points. Without failures Borda orders models exactly as mean rank (it is
   k n - k mean rank); with failures it punishes a failure harder than mean rank.
   ``single``: the named scorer's rank alone.
5. **Final rank.** Competition ranking of the aggregate (1, 2, 2, 4); models with equal
   aggregates share a rank and are listed by name. Filtered models follow, unranked.
6. **Recommendation.** The first ``top_k`` ranked models that are not flagged and have at
   least one successful score; a model tied (equal aggregate) with the k-th is included
   too, so a tie never hides an equally good model (the list may then exceed k).

Agreement between scorers is Kendall's tau-b of each pair of scorers' scores over the ranked
models where both succeeded (:func:`fedmte.protocol.evaluation.evaluate_ranking`, one
scorer taken as the "truth"; tau-b is symmetric). It is None with fewer than two such
models or when either scorer gives them all one score.

Reference: J.-C. de Borda (1781), the Borda count; M. G. Kendall, "The treatment of ties in
ranking problems", Biometrika 1945 (tau-b).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedmte.protocol.encoding import StrictModel
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.evaluation import evaluate_ranking
from fedmte.protocol.scorers import SCORERS, ScorerSpec
from fedmte.server.job import Constraints, RankingSettings

MIB = 2**20  # the "MB" of max_peak_memory_mb
Status = Literal["recommended", "eligible", "flagged", "filtered"]


class SiteMeasurement(BaseModel):
    """One model's cost at one site, as the site measured it during its extraction pass.

    Accepts a dump of the site agent's ``ModelMetrics`` (unknown keys are ignored).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    device: str | None = None
    latency_ms: float | None = Field(default=None, ge=0, description="median single-sample forward pass")
    batch_latency_ms: float | None = Field(default=None, ge=0)
    throughput: float | None = Field(default=None, ge=0, description="samples per second over the pass")
    peak_rss_bytes: int | None = Field(default=None, ge=0)
    peak_device_bytes: int | None = Field(default=None, ge=0)

    @property
    def peak_memory_bytes(self) -> int | None:
        """Device memory when the model ran on an accelerator, else the process's peak RSS."""
        return self.peak_device_bytes if self.peak_device_bytes is not None else self.peak_rss_bytes


class ModelMetadata(StrictModel):
    """What the constraints and the report know about one model.

    ``license``, ``parameter_count`` and the descriptive fields come from the signed
    manifest; ``latency_ms`` and ``peak_memory_mb`` are the worst over the sites that
    measured them (a deployment must meet its limits on every site's hardware).
    """

    license: str | None = None
    parameter_count: int | None = Field(default=None, ge=0)
    latency_ms: float | None = Field(default=None, ge=0)
    peak_memory_mb: float | None = Field(default=None, ge=0)
    architecture: str | None = None
    version: str | None = None
    description: str | None = None
    manifest_sha256: str | None = None
    sites: dict[str, SiteMeasurement] = Field(default_factory=dict)

    @classmethod
    def from_sites(cls, sites: Mapping[str, SiteMeasurement | Mapping[str, object]], **manifest: object) -> ModelMetadata:
        """Worst-site latency and memory from per-site measurements, plus manifest fields."""
        measured = {name: SiteMeasurement.model_validate(m) for name, m in sites.items()}
        latencies = [m.latency_ms for m in measured.values() if m.latency_ms is not None]
        memories = [m.peak_memory_bytes for m in measured.values() if m.peak_memory_bytes is not None]
        return cls(
            latency_ms=max(latencies) if latencies else None,
            peak_memory_mb=max(memories) / MIB if memories else None,
            sites=measured,
            **manifest,  # type: ignore[arg-type]
        )


class Violation(StrictModel):
    """One business rule a model breaks, and what that does to it."""

    rule: str
    action: Literal["flag", "filter"]
    message: str


class RankedModel(StrictModel):
    """One candidate in the ranking (or filtered out of it)."""

    name: str
    scores: dict[str, float] = Field(description="successful scores only; a failed one is in ``failures``")
    ranks: dict[str, float] = Field(description="rank under each ranked scorer (failed: the shared bottom rank)")
    aggregate: float | None
    rank: int | None
    status: Status
    violations: list[Violation] = Field(default_factory=list)
    failures: dict[str, str] = Field(default_factory=dict)
    auxiliary: dict[str, float | None] = Field(default_factory=dict)
    metadata: ModelMetadata = Field(default_factory=ModelMetadata)


class Agreement(StrictModel):
    """Kendall's tau-b between two scorers' scores over ``models`` models both scored."""

    a: str
    b: str
    kendall_tau: float | None
    models: int


class Ranking(StrictModel):
    """The outcome of :func:`rank_models`: models in rank order, then the filtered ones."""

    aggregate: str
    better: Literal["lower", "higher"]
    ties: str
    scorers: list[str]
    ranked_scorers: list[str]
    dropped_scorers: dict[str, str] = Field(default_factory=dict)
    top_k: int
    recommendation: list[str]
    models: list[RankedModel]
    agreement: list[Agreement]
    notes: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------- pieces

def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _clean(value: object) -> float | None:
    """A finite score as float; None for a failure (None, NaN, infinite, not a number)."""
    return float(value) if _finite(value) else None  # type: ignore[arg-type]


def rank_scores(values: Mapping[str, float | None], ties: str = "average") -> dict[str, float]:
    """Ranks 1..n (1 = highest score) of one scorer; failed scores tie below the rest.

    See the module docstring for the tie rules. ``values`` maps model name to score or None.
    """
    if ties not in ("average", "min"):
        raise InvalidInputError(f"ties must be 'average' or 'min', got {ties!r}")
    names = list(values)
    good = [name for name in names if _finite(values[name])]
    failed = [name for name in names if not _finite(values[name])]
    ranks: dict[str, float] = {}
    ordered = sorted(good, key=lambda name: -float(values[name]))  # type: ignore[arg-type]
    start = 0
    while start < len(ordered):
        stop = start
        while stop + 1 < len(ordered) and values[ordered[stop + 1]] == values[ordered[start]]:
            stop += 1
        shared = (start + stop) / 2 + 1 if ties == "average" else start + 1
        for name in ordered[start:stop + 1]:
            ranks[name] = float(shared)
        start = stop + 1
    if failed:
        m, f = len(good), len(failed)
        shared = m + (f + 1) / 2 if ties == "average" else m + 1
        for name in failed:
            ranks[name] = float(shared)
    return ranks


def check_constraints(metadata: ModelMetadata, constraints: Constraints) -> list[Violation]:
    """Every rule the job sets that ``metadata`` breaks (or cannot show it meets)."""
    violations: list[Violation] = []

    def limit(rule: str, measured: float | None, cap: float | None, unit: str, what: str) -> None:
        if cap is None:
            return
        if measured is None:
            message = f"{what} was not measured, so the limit of {cap:g} {unit} cannot be checked"
        elif measured > cap:
            message = f"{what} {measured:g} {unit} exceeds the limit of {cap:g} {unit}"
        else:
            return
        violations.append(Violation(rule=rule, action=constraints.action_for(rule), message=message))

    limit("max_latency_ms", metadata.latency_ms, constraints.max_latency_ms, "ms", "latency")
    limit("max_parameters", metadata.parameter_count, constraints.max_parameters, "parameters", "parameter count")
    limit("max_peak_memory_mb", metadata.peak_memory_mb, constraints.max_peak_memory_mb, "MiB", "peak memory")
    if constraints.licenses is not None and metadata.license not in constraints.licenses:
        found = "no license" if metadata.license is None else f"license {metadata.license!r}"
        violations.append(Violation(
            rule="licenses", action=constraints.action_for("licenses"),
            message=f"{found} is not on the allowlist {constraints.licenses}",
        ))
    return violations


def _cross_model(scorers: Sequence[str]) -> dict[str, ScorerSpec]:
    """The scorers among ``scorers`` whose registry entry combines helper scores across models."""
    return {s: SCORERS[s] for s in scorers if s in SCORERS and SCORERS[s].combine is not None}


def _combined(spec: ScorerSpec, pool: Sequence[str], raw: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    """``spec.combine`` over ``pool``, on the models whose helper scores are all finite."""
    assert spec.combine is not None
    complete = {
        name: {helper: float(raw[name][helper]) for helper in spec.helper_scorers}  # type: ignore[arg-type]
        for name in pool
        if all(_finite(raw[name].get(helper)) for helper in spec.helper_scorers)
    }
    combined = spec.combine(complete) if complete else {}
    return {name: combined.get(name) for name in pool}


def _helper_failure(name: str, helpers: Sequence[str]) -> str:
    """Why a cross-model score is missing: ``a term (seli, ncc or vc) failed ...`` for ``ncti``."""
    terms = [helper.removeprefix(f"{name}_") for helper in helpers]
    listed = terms[0] if len(terms) == 1 else f"{', '.join(terms[:-1])} or {terms[-1]}"
    return f"a term ({listed}) failed for this model"


def scorer_agreement(scores: Mapping[str, Mapping[str, float | None]], scorers: Sequence[str]) -> list[Agreement]:
    """Kendall tau-b for each pair of scorers, over the models both scored (``scores[model][scorer]``)."""
    pairs: list[Agreement] = []
    for i, a in enumerate(scorers):
        for b in scorers[i + 1:]:
            both = [m for m in scores if _finite(scores[m].get(a)) and _finite(scores[m].get(b))]
            tau: float | None = None
            if len(both) >= 2:
                x = {m: float(scores[m][a]) for m in both}  # type: ignore[arg-type]
                y = {m: float(scores[m][b]) for m in both}  # type: ignore[arg-type]
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)  # a constant scorer: tau is None
                        tau = evaluate_ranking(x, y).kendall_tau
                except InvalidInputError:
                    tau = None  # b gives every model one score: no ranking to agree with
            pairs.append(Agreement(a=a, b=b, kendall_tau=tau, models=len(both)))
    return pairs


def _competition_ranks(values: Mapping[str, float], better: str) -> dict[str, int]:
    sign = 1.0 if better == "lower" else -1.0
    ordered = sorted(values, key=lambda name: (sign * values[name], name))
    ranks: dict[str, int] = {}
    for position, name in enumerate(ordered):
        previous = ordered[position - 1] if position else None
        ranks[name] = ranks[previous] if previous is not None and values[previous] == values[name] else position + 1
    return ranks


# --------------------------------------------------------------------------- the steps

def _check_inputs(
    scores: Mapping[str, Mapping[str, float | None]],
    metadata: Mapping[str, ModelMetadata],
    scorers: Sequence[str],
    settings: RankingSettings,
) -> None:
    """Refuse what cannot be ranked before any step runs, so no error comes half way."""
    if not scores:
        raise InvalidInputError("no models to rank; the job's candidates returned no scores")
    if not scorers:
        raise InvalidInputError("no scorers to rank by; name at least one in the job")
    missing_meta = sorted(set(scores) - set(metadata))
    if missing_meta:
        raise InvalidInputError(f"no metadata for models {missing_meta}; pass ModelMetadata() for each model (empty if unknown)")
    if settings.aggregate == "single" and settings.scorer not in scorers:
        raise InvalidInputError(f"ranking.scorer {settings.scorer!r} is not among the scorers {scorers}")
    for s, spec in _cross_model(scorers).items():
        if not any(helper in row for row in scores.values() for helper in spec.helper_scorers):
            raise InvalidInputError(
                f"{s} is a cross-model score and needs the terms {list(spec.helper_scorers)} of every model; "
                "run them with the job (JobSpec.scorers_to_run adds them)"
            )


@dataclass(frozen=True)
class _Screening:
    """Step 1's verdict: who breaks which rule, who is filtered out, who stays (the pool)."""

    violations: dict[str, list[Violation]]
    filtered: list[str]
    pool: list[str]
    flagged: set[str]


def _screen(names: Sequence[str], metadata: Mapping[str, ModelMetadata], constraints: Constraints) -> _Screening:
    """Step 1: the business constraints. Done first, since cross-model scores are scaled over
    the pool that survives them."""
    violations = {name: check_constraints(metadata[name], constraints) for name in names}
    filtered = [name for name in names if any(v.action == "filter" for v in violations[name])]
    pool = [name for name in names if name not in filtered]
    return _Screening(violations, filtered, pool, {name for name in pool if violations[name]})


def _score_table(
    scores: Mapping[str, Mapping[str, float | None]],
    scorers: Sequence[str],
    screening: _Screening,
    failed: dict[str, dict[str, str]],
) -> dict[str, dict[str, float | None]]:
    """Step 2: ``{model: {scorer: clean score or None}}``, cross-model scores taken across the pool.

    Records in ``failed`` why each missing score is missing, so the report can say so; a
    filtered model gets no cross-model score and no reason for it (it was never combined).
    """
    cross = _cross_model(scorers)
    table: dict[str, dict[str, float | None]] = {
        name: {s: (None if s in cross else _clean(row.get(s))) for s in scorers}
        for name, row in scores.items()
    }
    if screening.pool:
        for s, spec in cross.items():
            for name, value in _combined(spec, screening.pool, scores).items():
                table[name][s] = value
                if value is None and s not in failed.get(name, {}):
                    failed.setdefault(name, {})[s] = _helper_failure(s, spec.helper_scorers)
    for name in table:
        for s in scorers:
            if s in cross and name in screening.filtered:
                continue  # never combined: a cross-model score is taken over the ranked pool only
            if table[name][s] is None and s not in failed.get(name, {}):
                failed.setdefault(name, {})[s] = "no score returned"
    return table


def _rank_each_scorer(
    table: Mapping[str, Mapping[str, float | None]], scorers: Sequence[str], pool: Sequence[str], ties: str,
) -> tuple[dict[str, dict[str, float]], dict[str, str], list[str]]:
    """Step 3: ranks under each scorer over the pool, so every scorer counts on one 1..n scale.

    Returns ``({scorer: {model: rank}}`` for the ranked scorers in order, the dropped scorers
    with why, and notes); a scorer that failed for every model carries no information.
    """
    per_scorer: dict[str, dict[str, float]] = {}
    dropped: dict[str, str] = {}
    notes: list[str] = []
    for s in scorers:
        if pool and not any(table[name][s] is not None for name in pool):
            dropped[s] = "failed for every ranked model"
            notes.append(f"{s} failed for every ranked model and does not count in the ranking")
            continue
        per_scorer[s] = rank_scores({name: table[name][s] for name in pool}, ties)
    return per_scorer, dropped, notes


def _aggregate(
    table: Mapping[str, Mapping[str, float | None]],
    per_scorer: Mapping[str, Mapping[str, float]],
    use: Sequence[str],
    pool: Sequence[str],
    how: str,
) -> dict[str, float]:
    """Step 4: one number per pooled model from its ranks under the scorers in ``use``."""
    aggregate: dict[str, float] = {}
    if not (use and pool):
        return aggregate
    for name in pool:
        ranks = np.array([per_scorer[s][name] for s in use], dtype=np.float64)
        if how == "mean_rank":
            aggregate[name] = float(ranks.mean())
        elif how == "median_rank":
            aggregate[name] = float(np.median(ranks))
        elif how == "borda":
            aggregate[name] = float(sum(len(pool) - per_scorer[s][name] for s in use if table[name][s] is not None))
        else:
            aggregate[name] = float(ranks[0])
    return aggregate


def _recommend(
    order: Sequence[str],
    aggregate: Mapping[str, float],
    scored: set[str],
    flagged: set[str],
    top_k: int,
) -> tuple[list[str], list[str]]:
    """Step 6: the top ``top_k`` unflagged, scored models, widened to keep a tie at the cut
    together (so a tie never hides an equally good model); returns them and notes."""
    recommendable = [name for name in order if name not in flagged and name in scored]
    recommendation = recommendable[:top_k]
    if recommendation:
        last = aggregate[recommendation[-1]]
        recommendation += [n for n in recommendable[top_k:] if aggregate[n] == last]
    notes: list[str] = []
    if len(recommendation) > top_k:
        notes.append(f"{len(recommendation)} models recommended for top_k = {top_k}: a tie at the cut")
    for name in sorted(set(order) - scored):
        notes.append(f"{name} has no successful score, so it is not recommended")
    return recommendation, notes


def _entries(
    scores: Mapping[str, Mapping[str, float | None]],
    metadata: Mapping[str, ModelMetadata],
    scorers: Sequence[str],
    screening: _Screening,
    table: Mapping[str, Mapping[str, float | None]],
    per_scorer: Mapping[str, Mapping[str, float]],
    aggregate: Mapping[str, float],
    final: Mapping[str, int],
    recommendation: Sequence[str],
    failed: Mapping[str, Mapping[str, str]],
) -> list[RankedModel]:
    """The report's rows: ranked models in rank order, then the unranked ones by name."""

    cross = _cross_model(scorers)

    def entry(name: str, status: Status) -> RankedModel:
        auxiliary = {k: _clean(v) for k, v in scores[name].items() if k not in scorers}
        for s in cross:
            if s in scores[name]:
                auxiliary[f"{s}_unscaled"] = _clean(scores[name][s])
        return RankedModel(
            name=name,
            scores={s: v for s, v in table[name].items() if v is not None},
            ranks={s: per_scorer[s][name] for s in scorers if s in per_scorer and name in per_scorer[s]},
            aggregate=aggregate.get(name),
            rank=final.get(name),
            status=status,
            violations=screening.violations[name],
            failures=dict(failed.get(name, {})),
            auxiliary=auxiliary,
            metadata=metadata[name],
        )

    flagged = screening.flagged
    models = []
    for name in sorted(final, key=lambda name: (final[name], name)):
        status: Status = "flagged" if name in flagged else "recommended" if name in recommendation else "eligible"
        models.append(entry(name, status))
    for name in sorted(scores):
        if name not in final:  # filtered, or nothing to rank by
            models.append(entry(name, "filtered" if name in screening.filtered else "flagged" if name in flagged else "eligible"))
    return models


# --------------------------------------------------------------------------- the ranking

def rank_models(
    scores: Mapping[str, Mapping[str, float | None]],
    metadata: Mapping[str, ModelMetadata],
    *,
    scorers: Sequence[str],
    settings: RankingSettings | None = None,
    constraints: Constraints | None = None,
    failures: Mapping[str, Mapping[str, str]] | None = None,
) -> Ranking:
    """Rank the candidates; see the module docstring for every rule.

    Parameters
    ----------
    scores : ``{model: {scorer: value or None}}``, everything the federation returned
        (the job's scorers and, for a cross-model scorer such as ``ncti``, the helper scores
        its registry entry names in ``helper_scorers``). A scorer missing for a model counts
        as failed for it.
    metadata : ``{model: ModelMetadata}``, one entry per model in ``scores``.
    scorers : the job's scorers (ranked); any other key in ``scores`` is kept as auxiliary.
    settings, constraints : the job's ``[ranking]`` and ``[constraints]`` (defaults if None).
    failures : ``{model: {scorer: reason}}`` for scores that failed, shown in the report.

    Raises
    ------
    InvalidInputError
        No models or scorers, metadata missing for a model, a cross-model scorer asked
        without its helper scores in ``scores``, or a ``single`` scorer not among ``scorers``.
    """
    settings = settings or RankingSettings()
    constraints = constraints or Constraints()
    failed: dict[str, dict[str, str]] = {m: dict(r) for m, r in (failures or {}).items()}
    scorers = list(dict.fromkeys(scorers))
    _check_inputs(scores, metadata, scorers, settings)

    screening = _screen(sorted(scores), metadata, constraints)
    pool = screening.pool
    table = _score_table(scores, scorers, screening, failed)
    per_scorer, dropped, notes = _rank_each_scorer(table, scorers, pool, settings.ties)
    ranked_scorers = list(per_scorer)

    if settings.aggregate == "single":
        use = [settings.scorer] if settings.scorer in ranked_scorers else []
    else:
        use = ranked_scorers
    aggregate = _aggregate(table, per_scorer, use, pool, settings.aggregate)
    if pool and not aggregate:
        notes.append(f"none of the ranking scorers ({', '.join(use or scorers)}) succeeded for any ranked model, "
                     "so there is no ranking")
    if not pool:
        notes.append("every candidate was filtered out by the business constraints")
    better: Literal["lower", "higher"] = "higher" if settings.aggregate == "borda" else "lower"
    final = _competition_ranks(aggregate, better)  # step 5

    order = sorted(final, key=lambda name: (final[name], name))
    scored = {name for name in order if any(table[name][s] is not None for s in use)}
    recommendation, recommend_notes = _recommend(order, aggregate, scored, screening.flagged, settings.top_k)
    return Ranking(
        aggregate=settings.aggregate if settings.aggregate != "single" else f"single:{settings.scorer}",
        better=better,
        ties=settings.ties,
        scorers=scorers,
        ranked_scorers=use,
        dropped_scorers=dropped,
        top_k=settings.top_k,
        recommendation=recommendation,
        models=_entries(scores, metadata, scorers, screening, table, per_scorer, aggregate, final, recommendation, failed),
        agreement=scorer_agreement({name: table[name] for name in pool}, ranked_scorers),
        notes=notes + recommend_notes,
    )


__all__ = [
    "Agreement",
    "ModelMetadata",
    "RankedModel",
    "Ranking",
    "SiteMeasurement",
    "Violation",
    "check_constraints",
    "rank_models",
    "rank_scores",
    "scorer_agreement",
]
