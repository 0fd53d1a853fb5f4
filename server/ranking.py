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
   4a. **Under noise** (``replicates`` given and ``weigh_by_noise``, the default), the mean
   rank weighs each scorer by rho / (1 - rho), rho the mean Kendall tau-b between its ranking
   and its ranking in each bootstrap replicate (:func:`_reliability_weights`): DP noise
   scrambles some scorers (TransRate's per-class scatters) far more than others (NCE's
   joint counts), and an equal vote would let the scrambled ones decide. The replicates are
   aggregated with the same weights. Without noise every weight is equal (the plain mean).
5. **Final rank.** Competition ranking of the aggregate (1, 2, 2, 4); models with equal
   aggregates share a rank and are listed by name. Filtered models follow, unranked.
6. **Recommendation.** The first ``top_k`` ranked models that are not flagged and have at
   least one successful score; a model tied (equal aggregate) with the k-th is included
   too, so a tie never hides an equally good model (the list may then exceed k).

7. **Uncertainty** (``replicates``: bootstrap scores of the DP-noised sums,
   :func:`fedmte.protocol.uncertainty.bootstrap_scores`). Steps 2 to 5 are re-run on each
   replicate with the same settings and the same screening (the pool and the ranked
   scorers are the point ranking's), replicate r of every model from the same draw index.
   Each candidate gets a ``level`` interval per scorer (basic bootstrap, see
   :func:`fedmte.protocol.uncertainty.interval`), an interval of its final rank (the
   replicate ranks' percentiles: ranks are bounded integers, with no pivot to reflect),
   ``p_best`` (the share of replicates where it ranks first; a replicate tie for first
   counts 1/k to each of the k, so the p_best of the pool sum to 1) and ``p_top_k``.
   **Tie groups** from the pairwise chances P(i above j) (a replicate tie counts half):
   walking the point order, the next candidate joins the current group unless *every*
   member ranks above it in at least ``SEPARATION`` (90%) of replicates. A group is a set
   of candidates the noise cannot order; the recommendation keeps a group whole (like an
   exact tie at the cut), and the report shows its ranks as ``1=``. A scorer whose
   replicates all failed for a model while its point is finite could not be resampled (a
   later round of it asks for statistics the release lacks): it is held at its point in
   every replicate, and listed, since its noise is then not counted. No replicates (or
   replicates all equal: no noise) give collapsed intervals, p_best 1 or 0, and tie groups
   of exact ties only; ``uncertainty.assessed`` says which.

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
from scipy import stats

from fedmte.protocol.encoding import StrictModel
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.evaluation import evaluate_ranking
from fedmte.protocol.scorers import SCORERS, ScorerSpec
from fedmte.protocol.scorers.base import Bounds
from fedmte.protocol.uncertainty import interval
from fedmte.server.confirm import Validation
from fedmte.server.job import Constraints, RankingSettings

MIB = 2**20  # the "MB" of max_peak_memory_mb
SEPARATION = 0.9
"""A candidate is ranked below a tie group only when every member beats it in this share of
replicates; otherwise the noise cannot separate it from them and it joins the group."""
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


class Interval(StrictModel):
    """A ``level`` confidence interval (see :class:`UncertaintySummary`)."""

    low: float
    high: float


class ClampedScore(StrictModel):
    """A score that fell outside its scorer's provable range and was clamped to the bound:
    the raw value is impossible for exact sums, an effect of DP noise."""

    raw: float
    value: float


class CandidateUncertainty(StrictModel):
    """What the noise leaves uncertain about one ranked candidate."""

    intervals: dict[str, Interval | None] = Field(
        description="per ranked scorer; None: too few replicates were defined to give one")
    rank_interval: Interval = Field(description="of the final rank (percentiles of the replicate ranks)")
    p_best: float = Field(ge=0, le=1, description="chance of ranking first in the aggregate")
    p_top_k: float = Field(ge=0, le=1, description="chance of a final rank <= top_k")
    tie_group: int = Field(ge=1, description="1 for the first group of candidates the noise cannot order, ...")
    tie_rank: int = Field(ge=1, description="the group's rank: the final rank of its first member")
    tied_with: list[str] = Field(default_factory=list, description="the other members of its tie group")
    failed_replicates: dict[str, float] = Field(default_factory=dict, description="per scorer, share of replicates that failed")
    held_at_point: list[str] = Field(default_factory=list, description="scorers that could not be resampled for it")

    @property
    def shown_rank(self) -> str:
        """``"1="`` inside a tie group, else the plain rank."""
        return f"{self.tie_rank}=" if self.tied_with else str(self.tie_rank)


class UncertaintySummary(StrictModel):
    """How the ranking's uncertainty was assessed."""

    assessed: bool = Field(description="replicates were given; False: no resampling was done")
    exact: bool = Field(description="no replicate differs from another: there is no noise to show")
    replicates: int = Field(ge=0)
    level: float = Field(gt=0, lt=1)
    separation: float = Field(default=SEPARATION, gt=0, le=1)
    method: str = "basic bootstrap of the DP noise (parametric: the noise std is public)"
    tie_groups: list[list[str]] = Field(default_factory=list, description="the ranked candidates, grouped, in rank order")
    held_at_point: dict[str, list[str]] = Field(default_factory=dict, description="model: scorers not resampled")
    summary: str = ""


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
    clamped: dict[str, ClampedScore] = Field(default_factory=dict, description="scores clamped into their range")
    uncertainty: CandidateUncertainty | None = Field(default=None, description="ranked candidates only")
    validation: Validation | None = Field(default=None, description="confirmed candidates only (stage 2)")


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
    recommendation_groups: list[list[str]] = Field(
        default_factory=list, description="the recommendation split into its tie groups, in rank order")
    uncertainty: UncertaintySummary | None = None
    scorer_weights: dict[str, float] = Field(
        default_factory=dict, description="each scorer's weight in the mean rank under noise (step 4a); empty: equal")


RELIABILITY_CAP = 0.99
"""The most a scorer's bootstrap rank agreement counts as (weight 99): keeps the weights finite."""

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
    weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Step 4: one number per pooled model from its ranks under the scorers in ``use``
    (``weights``: a weighted mean rank, step 4a)."""
    aggregate: dict[str, float] = {}
    if not (use and pool):
        return aggregate
    w = None if weights is None else np.array([weights[s] for s in use], dtype=np.float64)
    for name in pool:
        ranks = np.array([per_scorer[s][name] for s in use], dtype=np.float64)
        if how == "mean_rank":
            aggregate[name] = float(ranks.mean() if w is None else (w @ ranks) / w.sum())
        elif how == "median_rank":
            aggregate[name] = float(np.median(ranks))
        elif how == "borda":
            aggregate[name] = float(sum(len(pool) - per_scorer[s][name] for s in use if table[name][s] is not None))
        else:
            aggregate[name] = float(ranks[0])
    return aggregate


def _recommend(
    order: Sequence[str],
    groups: Sequence[Sequence[str]],
    scored: set[str],
    flagged: set[str],
    top_k: int,
) -> tuple[list[str], list[list[str]], list[str]]:
    """Step 6: the top ``top_k`` unflagged, scored models, widened to keep the tie group at
    the cut whole (so a tie, exact or under noise, never hides an equally good model);
    returns them, the same split by tie group, and notes."""
    recommendable = [name for name in order if name not in flagged and name in scored]
    recommendation = recommendable[:top_k]
    group_of = {name: i for i, group in enumerate(groups) for name in group}
    if recommendation:
        last = group_of[recommendation[-1]]
        recommendation += [n for n in recommendable[top_k:] if group_of[n] == last]
    chosen = set(recommendation)
    split = [[n for n in group if n in chosen] for group in groups]
    notes: list[str] = []
    if len(recommendation) > top_k:
        notes.append(f"{len(recommendation)} models recommended for top_k = {top_k}: a tie at the cut")
    for name in sorted(set(order) - scored):
        notes.append(f"{name} has no successful score, so it is not recommended")
    return recommendation, [g for g in split if g], notes


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
    clamped: Mapping[str, Mapping[str, float]],
    uncertain: Mapping[str, CandidateUncertainty],
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
            clamped={s: ClampedScore(raw=float(raw), value=float(table[name][s]))  # type: ignore[arg-type]
                     for s, raw in clamped.get(name, {}).items() if s in table[name] and table[name][s] is not None},
            uncertainty=uncertain.get(name),
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


# --------------------------------------------------------------------------- uncertainty

def _replicate_scores(
    scores: Mapping[str, Mapping[str, float | None]],
    replicates: Mapping[str, Mapping[str, np.ndarray]],
    count: int,
) -> tuple[list[dict[str, dict[str, float | None]]], dict[str, list[str]], dict[str, dict[str, float]]]:
    """``scores`` as each replicate has them, with the (model, scorer) pairs held at their
    point (no finite replicate while the point is finite: not resampled) and the share of
    failed replicates per pair. A model or scorer without replicates keeps its point (exact)."""
    held: dict[str, list[str]] = {}
    failed_share: dict[str, dict[str, float]] = {}
    columns: dict[str, dict[str, np.ndarray | None]] = {}
    for name, row in scores.items():
        columns[name] = {}
        for s, point in row.items():
            values = replicates.get(name, {}).get(s)
            if values is None:
                columns[name][s] = None
                continue
            values = np.asarray(values, dtype=np.float64)
            if values.shape != (count,):
                raise InvalidInputError(f"replicates of {name}/{s} have shape {values.shape}; every array needs ({count},)")
            finite = np.isfinite(values)
            if not finite.any() and _finite(point):
                held.setdefault(name, []).append(s)
                columns[name][s] = None
                continue
            failed_share.setdefault(name, {})[s] = float(1.0 - finite.mean())
            columns[name][s] = values
    per_replicate = [
        {name: {s: (_clean(row[s]) if columns[name][s] is None else _clean(float(columns[name][s][r])))  # type: ignore[index]
                for s in row} for name, row in scores.items()}
        for r in range(count)
    ]
    return per_replicate, held, failed_share


def _tie_groups(order: Sequence[str], above: np.ndarray, index: Mapping[str, int], separation: float) -> list[list[str]]:
    """Walk ``order``: the next candidate joins the current group unless every member ranks
    above it in at least ``separation`` of the replicates (``above[i, j]`` = P(i above j))."""
    groups: list[list[str]] = []
    for name in order:
        j = index[name]
        if groups and not all(above[index[member], j] >= separation for member in groups[-1]):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _plain_summary(groups: Sequence[Sequence[str]], p_best: Mapping[str, float], exact: bool, assessed: bool,
                   count: int, level: float) -> str:
    """One sentence on what the noise leaves open at the top of the ranking."""
    if not assessed:
        return "No resampling was done, so the ranking shows no noise uncertainty."
    if exact:
        return ("The sums were exact (no DP noise), so there is no noise uncertainty: the intervals collapse to "
                "the scores and the order is certain.")
    if not groups:
        return f"{count} resamples of the noisy sums; no model was ranked."
    top = list(groups[0])
    chances = " and ".join(f"{p_best[n]:.2f}" for n in top)
    if len(top) == 1:
        return (f"Under this noise {top[0]} is ranked first apart from the rest (chance of being best {chances}; "
                f"{count} resamples of the noisy sums, {level:.0%} intervals).")
    names = ", ".join(top[:-1]) + f" and {top[-1]}"
    return (f"{names} cannot be told apart under this noise: {chances} chance of being best "
            f"({count} resamples of the noisy sums, {level:.0%} intervals).")


@dataclass(frozen=True)
class _Replicated:
    """Every bootstrap replicate's score table and per-scorer ranks, computed once for both
    the scorers' weights (step 4a) and the uncertainty (step 7)."""

    tables: list[dict[str, dict[str, float | None]]]
    ranks: list[dict[str, dict[str, float]]]
    held: dict[str, list[str]]
    failed_share: dict[str, dict[str, float]]


def _replicate(
    scores: Mapping[str, Mapping[str, float | None]],
    replicates: Mapping[str, Mapping[str, np.ndarray]] | None,
    *,
    scorers: Sequence[str],
    use: Sequence[str],
    screening: _Screening,
    ties: str,
) -> _Replicated | None:
    """The replicates' tables and ranks (same screening and ties as the point); None without
    replicates. Arrays of unequal length are refused: replicate r must be one draw for all."""
    counts = {len(v) for row in (replicates or {}).values() for v in row.values()}
    if len(counts) > 1:
        raise InvalidInputError(f"replicate arrays differ in length {sorted(counts)}; replicate r must be one draw for all")
    count = counts.pop() if counts else 0
    if count == 0:
        return None
    draws, held, failed_share = _replicate_scores(scores, replicates or {}, count)
    tables = [_score_table(draw, scorers, screening, {}) for draw in draws]
    ranks = [{s: rank_scores({name: table_r[name][s] for name in screening.pool}, ties) for s in use}
             for table_r in tables]
    return _Replicated(tables=tables, ranks=ranks, held=held, failed_share=failed_share)


def _reliability_weights(
    replicated: _Replicated | None,
    replicates: Mapping[str, Mapping[str, np.ndarray]],
    *,
    use: Sequence[str],
    screening: _Screening,
    per_scorer: Mapping[str, Mapping[str, float]],
) -> dict[str, float] | None:
    """Step 4a: each ranking scorer's weight in the mean rank under noise, from how well its
    ranking survives the noise: rho_s, the mean Kendall tau-b between its point ranks and its
    ranks in each bootstrap replicate (a reliability: the correlation of two noisy copies of
    one measurement), weighs rho / (1 - rho), the ratio of signal to noise variance it implies,
    so a scorer the noise scrambles (rho 0.4: 0.67) counts far less than one it barely moves
    (rho 0.9: 9); rho is taken in [0, RELIABILITY_CAP]. None (plain mean) without replicates,
    without noise (every rho 1) or with fewer than three ranked models. A scorer without
    replicates (held at its point, or not resampled) gets the average weight of the others:
    its noise is unknown, neither trusted nor doubted."""
    pool = screening.pool
    if replicated is None or len(use) < 2 or len(pool) < 3:
        return None
    held = replicated.held

    def resampled(scorer: str) -> bool:  # some pooled model has replicates of it (or of its helpers) that vary
        keys = [scorer, *(SCORERS[scorer].helper_scorers if scorer in SCORERS else ())]
        return any(key in replicates.get(name, {}) and key not in held.get(name, []) for name in pool for key in keys)

    agreement: dict[str, list[float]] = {s: [] for s in use if resampled(s)}
    point = {s: np.array([per_scorer[s][name] for name in pool]) for s in use}
    for ranks_r in replicated.ranks:
        for s in agreement:
            values = np.array([ranks_r[s][name] for name in pool])
            if np.all(values == values[0]) or np.all(point[s] == point[s][0]):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tau = stats.kendalltau(point[s], values).statistic
            if math.isfinite(tau):
                agreement[s].append(float(tau))
    rho = {s: min(max(float(np.mean(v)), 0.0), RELIABILITY_CAP) for s, v in agreement.items() if v}
    if not rho or all(value >= RELIABILITY_CAP for value in rho.values()):
        return None  # nothing resampled, or no noise moved any ranking: the plain mean
    raw = {s: value / (1.0 - value) for s, value in rho.items()}
    neutral = float(np.mean(list(raw.values())))
    raw = {s: raw.get(s, neutral) for s in use}  # not resampled: unknown noise, the average weight
    total = sum(raw.values())
    if total <= 0:
        return None
    return {s: len(use) * value / total for s, value in raw.items()}  # scaled to sum to the number of scorers


def _assess(
    replicated: _Replicated | None,
    *,
    per_scorer: Mapping[str, Mapping[str, float]],
    level: float,
    scorers: Sequence[str],
    use: Sequence[str],
    screening: _Screening,
    table: Mapping[str, Mapping[str, float | None]],
    order: Sequence[str],
    final: Mapping[str, int],
    settings: RankingSettings,
    better: str,
    bounds: Mapping[str, Mapping[str, Bounds]],
    weights: Mapping[str, float] | None = None,
) -> tuple[dict[str, CandidateUncertainty], UncertaintySummary, list[list[str]]]:
    """Step 7: re-rank every replicate as the point was ranked; per-candidate intervals,
    chances and tie groups (see the module docstring)."""
    pool, ranked = screening.pool, list(order)
    assessed = replicated is not None
    tables, draw_ranks = (replicated.tables, replicated.ranks) if replicated is not None else ([table], [per_scorer])
    held, failed_share = (replicated.held, replicated.failed_share) if replicated is not None else ({}, {})
    count = len(tables) if assessed else 0
    index = {name: i for i, name in enumerate(ranked)}
    ranks = np.zeros((len(tables), len(ranked)))
    values = {s: np.full((len(tables), len(ranked)), np.nan) for s in scorers}
    above = np.zeros((len(ranked), len(ranked)))
    sign = 1.0 if better == "lower" else -1.0
    for r, (table_r, ranks_r) in enumerate(zip(tables, draw_ranks)):
        aggregate = _aggregate(table_r, ranks_r, use, pool, settings.aggregate, weights)
        final_r = _competition_ranks(aggregate, better) if aggregate else {}
        if not ranked:
            continue
        agg = np.array([sign * aggregate[name] for name in ranked])
        above += (agg[:, None] < agg[None, :]) + 0.5 * (agg[:, None] == agg[None, :])
        ranks[r] = [final_r[name] for name in ranked]
        for s in scorers:
            values[s][r] = [np.nan if table_r[name][s] is None else table_r[name][s] for name in ranked]
    above /= len(tables)
    exact = all(np.all(v == v[0]) or np.all(np.isnan(v)) for v in (*values.values(), ranks)) if ranked else True
    firsts = ranks == 1
    p_best = firsts / np.maximum(firsts.sum(axis=1, keepdims=True), 1)
    groups = _tie_groups(ranked, above, index, SEPARATION)
    group_of = {name: g for g, group in enumerate(groups) for name in group}
    uncertain: dict[str, CandidateUncertainty] = {}
    for name in ranked:
        i = index[name]
        intervals: dict[str, Interval | None] = {}
        for s in use:
            point = table[name][s]
            found = None if point is None else interval(point, values[s][:, i], level, bounds=bounds.get(name, {}).get(s))
            intervals[s] = None if found is None else Interval(low=found[0], high=found[1])
        low, high = np.quantile(ranks[:, i], [(1 - level) / 2, (1 + level) / 2])
        group = groups[group_of[name]]
        uncertain[name] = CandidateUncertainty(
            intervals=intervals,
            rank_interval=Interval(low=float(math.floor(low)), high=float(math.ceil(high))),
            p_best=float(p_best[:, i].mean()),
            p_top_k=float((ranks[:, i] <= settings.top_k).mean()),
            tie_group=group_of[name] + 1,
            tie_rank=final[group[0]],
            tied_with=[n for n in group if n != name],
            failed_replicates={s: v for s, v in failed_share.get(name, {}).items() if v > 0},
            held_at_point=held.get(name, []),
        )
    summary = UncertaintySummary(
        assessed=assessed, exact=exact, replicates=count, level=level, tie_groups=groups, held_at_point=held,
        summary=_plain_summary(groups, {n: u.p_best for n, u in uncertain.items()}, exact, assessed, count, level),
    )
    return uncertain, summary, groups


# --------------------------------------------------------------------------- the ranking

def rank_models(
    scores: Mapping[str, Mapping[str, float | None]],
    metadata: Mapping[str, ModelMetadata],
    *,
    scorers: Sequence[str],
    settings: RankingSettings | None = None,
    constraints: Constraints | None = None,
    failures: Mapping[str, Mapping[str, str]] | None = None,
    replicates: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    level: float = 0.9,
    clamped: Mapping[str, Mapping[str, float]] | None = None,
    bounds: Mapping[str, Mapping[str, Bounds]] | None = None,
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
    replicates : ``{model: {scorer: (R,) scores}}`` from
        :func:`fedmte.protocol.uncertainty.bootstrap_scores`, aligned across models (replicate
        r of every model from the same draw index; NaN: that replicate failed); helper
        scores of a cross-model scorer included. A model or scorer without replicates is
        exact. None: no uncertainty assessed (step 7).
    level : the confidence level of every interval.
    clamped : ``{model: {scorer: raw value}}``, the scores the plan clamped into their range
        (:attr:`fedmte.protocol.plan.ScoringResult.clamped`), flagged in the report.
    bounds : ``{model: {scorer: (low, high)}}``, each scorer's range for that model
        (:func:`fedmte.protocol.uncertainty.score_bounds`), so no interval reaches past it.

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
    replicated = _replicate(scores, replicates, scorers=scorers, use=use, screening=screening, ties=settings.ties)
    weights = (_reliability_weights(replicated, replicates or {}, use=use, screening=screening, per_scorer=per_scorer)
               if settings.aggregate == "mean_rank" and settings.weigh_by_noise else None)
    if weights is not None:
        notes.append("under the noise each scorer counts in the mean rank by how reproducible its ranking is "
                     "(weight rho / (1 - rho), rho its bootstrap rank agreement): "
                     + ", ".join(f"{s} {weights[s]:.2f}" for s in use))
    aggregate = _aggregate(table, per_scorer, use, pool, settings.aggregate, weights)
    if pool and not aggregate:
        notes.append(f"none of the ranking scorers ({', '.join(use or scorers)}) succeeded for any ranked model, "
                     "so there is no ranking")
    if not pool:
        notes.append("every candidate was filtered out by the business constraints")
    better: Literal["lower", "higher"] = "higher" if settings.aggregate == "borda" else "lower"
    final = _competition_ranks(aggregate, better)  # step 5

    order = sorted(final, key=lambda name: (final[name], name))
    scored = {name for name in order if any(table[name][s] is not None for s in use)}
    if not 0 < level < 1:
        raise InvalidInputError(f"level must lie in (0, 1), got {level}")
    uncertain, summary, groups = _assess(
        replicated, per_scorer=per_scorer, level=level, scorers=scorers, use=use, screening=screening, table=table,
        order=order, final=final, settings=settings, better=better, bounds=bounds or {}, weights=weights)
    recommendation, recommendation_groups, recommend_notes = _recommend(
        order, groups, scored, screening.flagged, settings.top_k)
    for group in groups if summary.assessed and not summary.exact else []:
        if len(group) > 1 and any(name in recommendation for name in group):
            names = ", ".join(group[:-1]) + f" and {group[-1]}"
            chances = " and ".join(f"{uncertain[name].p_best:.2f}" for name in group)
            recommend_notes.append(f"{names} cannot be told apart under this noise: {chances} chance of being best")
    return Ranking(
        aggregate=settings.aggregate if settings.aggregate != "single" else f"single:{settings.scorer}",
        better=better,
        ties=settings.ties,
        scorers=scorers,
        ranked_scorers=use,
        dropped_scorers=dropped,
        top_k=settings.top_k,
        recommendation=recommendation,
        models=_entries(scores, metadata, scorers, screening, table, per_scorer, aggregate, final, recommendation, failed,
                        clamped or {}, uncertain),
        agreement=scorer_agreement({name: table[name] for name in pool}, ranked_scorers),
        notes=notes + recommend_notes,
        recommendation_groups=recommendation_groups,
        uncertainty=summary,
        scorer_weights=weights or {},
    )


__all__ = [
    "Agreement",
    "CandidateUncertainty",
    "ClampedScore",
    "Interval",
    "UncertaintySummary",
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
