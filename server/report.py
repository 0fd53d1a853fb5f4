"""The scoring report: ``report.json`` (a :class:`Report`) and a self-contained ``report.html``.

``report.json`` holds at least::

    {"schema": "fedmte.report.v1",
     "models": [{"name", "scores": {scorer: value}, "ranks": {scorer: rank}, "rank",
                 "aggregate", "status", "violations", "failures", "metadata"}, ...],
     "scorers": [...], "sites": [...], "privacy": {...}, "job": {...}, ...}

Under DP noise each ranked model also carries ``uncertainty`` (``intervals`` per scorer,
``rank_interval``, ``p_best``, ``p_top_k``, ``tie_group``, ``tie_rank``, ``tied_with``) and
``clamped`` (scores outside their scorer's range, clamped, with the raw value); the top level
has ``uncertainty`` (whether and how it was assessed, the tie groups, a plain summary) and
``recommendation_groups`` (the recommendation by tie group).

``models`` lists the ranked models in rank order, then the filtered ones (``rank`` null). A
score that failed is absent from ``scores`` and explained in ``failures``, so the file reads
directly as the scores input of ``fedmte evaluate``
(:func:`fedmte.protocol.evaluation.parse_scores`).

``report.html`` needs no network: CSS is inline, plots are inline SVG drawn here, and there
is no script. It shows the ranking table (``<table id="ranking">``, one row per candidate
in rank order, filtered models last), a heatmap of each model's scores scaled to [0, 1]
per scorer, the agreement between scorers (pairwise Kendall tau-b), the business
constraints and which model broke which rule, and what each site disclosed (statistics
kinds with shapes and bytes, privacy spent). Every string that comes from the job, a model
manifest, a site or a score failure is HTML-escaped (:func:`html.escape`, quotes too).
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import ConfigDict, Field

from fedmte.protocol.durable import replace_file
from fedmte.protocol.encoding import StrictModel
from fedmte.protocol.errors import FederationError
from fedmte.server.confirm import Decision
from fedmte.server.job import Constraints, JobSpec, PrivacyRequest
from fedmte.server.ranking import Agreement, RankedModel, Ranking, UncertaintySummary
from fedmte.server.site_probe import ProbeResult

REPORT_SCHEMA: Final = "fedmte.report.v1"
RUN_STATUS_SCHEMA: Final = "fedmte.run_status.v1"
JSON_NAME = "report.json"
HTML_NAME = "report.html"

# Plot geometry (pixels) and colours.
_CELL_W, _CELL_H, _LABEL_CHAR_W, _MAX_LABEL_CHARS = 92, 26, 7.2, 32
_LOW, _HIGH = (239, 243, 255), (8, 69, 148)  # sequential blue: worst -> best
_NEG, _MID, _POS = (202, 0, 32), (247, 247, 247), (5, 113, 176)  # diverging: -1, 0, +1
_FAILED = "#d9d9d9"


class DisclosedStatistic(StrictModel):
    """One statistics block a site sent: its kind, shape and size, for which model and round.

    ``masked``: it went into the secure sum, so the coordinator saw only the sum over sites.
    ``noised``: the site added DP noise before masking.
    """

    kind: str
    shape: list[int]
    nbytes: int = Field(ge=0)
    model: str | None = None
    round: int | None = Field(default=None, ge=0)
    masked: bool = True
    noised: bool = False


class SitePrivacy(StrictModel):
    """What one job cost a site in privacy, by the site's own ledger."""

    dp: bool
    epsilon_spent: float | None = Field(default=None, ge=0, description="this job")
    delta: float | None = Field(default=None, ge=0)
    epsilon_total: float | None = Field(default=None, ge=0, description="the data source so far, this job included")
    epsilon_budget: float | None = Field(default=None, ge=0)


class SiteDisclosure(StrictModel):
    """Everything one site released during the job, and what refused requests it refused."""

    name: str
    statistics: list[DisclosedStatistic] = Field(default_factory=list)
    privacy: SitePrivacy
    refusals: list[str] = Field(default_factory=list)
    audit_head: str | None = Field(default=None, description="the site's audit-log head after the job")

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.statistics)


class PrivacySummary(StrictModel):
    """The privacy asked for and what the sites applied."""

    requested: PrivacyRequest
    secure_sum: bool = True
    dp_applied: bool
    epsilon_spent_max: float | None


class RoundInfo(StrictModel):
    """One round trip of the job (the job runner's round report)."""

    name: str
    seconds: float = Field(ge=0)
    kinds: list[str] = Field(default_factory=list)
    bytes_per_site: int = Field(default=0, ge=0)


class Report(StrictModel):
    """``report.json``: see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["fedmte.report.v1"] = Field(default=REPORT_SCHEMA, alias="schema")
    created: str
    fedmte_version: str
    models: list[RankedModel]
    scorers: list[str]
    ranked_scorers: list[str]
    dropped_scorers: dict[str, str] = Field(default_factory=dict)
    aggregate: str
    better: Literal["lower", "higher"]
    ties: str
    top_k: int
    recommendation: list[str]
    recommendation_groups: list[list[str]] = Field(default_factory=list)
    agreement: list[Agreement]
    uncertainty: UncertaintySummary | None = None
    scorer_weights: dict[str, float] = Field(default_factory=dict)
    decision: Decision | None = Field(default=None, description="stage 2: the choice after confirmation")
    constraints: Constraints
    sites: list[SiteDisclosure]
    privacy: PrivacySummary
    rounds: list[RoundInfo] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    job: dict[str, Any]

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)

    @property
    def noise_shown(self) -> bool:
        """The report has resampled noise to show (intervals and chances that mean something)."""
        return self.uncertainty is not None and self.uncertainty.assessed and not self.uncertainty.exact

    @property
    def noise_unassessed(self) -> bool:
        """DP noise was added but not resampled: the ranking's uncertainty is unknown."""
        return self.privacy.dp_applied and (self.uncertainty is None or not self.uncertainty.assessed)


def uncertainty_text(report: Report) -> str:
    """The plain-language account of the noise's effect on the ranking, for every view."""
    u = report.uncertainty
    if report.noise_unassessed:
        return ("DP noise was added to the sums but not resampled (ranking.bootstrap = 0), so the ranking's "
                "uncertainty is unknown: close scores may be in the wrong order.")
    if u is None or u.exact or not report.privacy.dp_applied and not u.assessed:
        return ("The sums were exact (no DP noise), so there is no noise uncertainty: the intervals collapse to "
                "the scores and the order is certain.")
    return (f"{u.summary} Intervals: {u.level:.0%}, {u.method}; a candidate is ranked apart from the ones above it "
            f"only when each of them ranks above it in at least {u.separation:.0%} of the resamples.")


def clamp_text(model: RankedModel, scorer: str) -> str:
    """Why a shown score is a bound and not a measurement."""
    c = model.clamped[scorer]
    side = "maximum" if c.raw > c.value else "minimum"
    return (f"{scorer} clamped from {c.raw:.4g} to its {side} {c.value:.4g}: the raw value is outside {scorer}'s "
            "range, an effect of DP noise, not a real score")


def decision_text(report: Report) -> str:
    """Stage 2 in plain words: what was chosen after confirmation, on how many held-back rows,
    whether the scores agreed; empty without a confirmation stage."""
    decision = report.decision
    if decision is None:
        return ""
    text = decision.summary
    verdicts = [v for v in decision.scorers if v.weighted_tau is not None]
    if verdicts:
        text += ("; each scorer's order of the confirmed candidates against the validated one (weighted tau): "
                 + ", ".join(f"{v.scorer} {v.weighted_tau:+.2f}" for v in verdicts))
    return text


def validation_text(model: RankedModel) -> str:
    """One confirmed candidate's validated accuracy, e.g. ``0.93 (0.91 to 0.95) on 1,436 rows``."""
    v = model.validation
    if v is None:
        return ""
    if v.accuracy is None:
        return f"not validated: {v.failure}"
    return f"{v.accuracy:.2f} ({v.low:.2f} to {v.high:.2f}) on {int(round(v.rows)):,} held-back rows, {v.mode}"


def recommendation_text(report: Report) -> str:
    """The recommendation with its tie groups: ``A = B (tied under the noise), C``."""
    groups = report.recommendation_groups or [[name] for name in report.recommendation]
    parts = [" = ".join(group) + (" (tied under the noise)" if len(group) > 1 and report.noise_shown else
                                   " (tied)" if len(group) > 1 else "") for group in groups]
    return ", ".join(parts)


def shown_rank(model: RankedModel) -> str:
    """The rank as displayed: ``1=`` for a member of a tie group, ``—`` when unranked."""
    if model.rank is None:
        return "—"
    return model.uncertainty.shown_rank if model.uncertainty is not None else str(model.rank)


def _version() -> str:
    try:
        return importlib_metadata.version("fedmte")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def build_report(
    job: JobSpec,
    ranking: Ranking,
    sites: Sequence[SiteDisclosure],
    *,
    rounds: Sequence[RoundInfo] = (),
    created: dt.datetime | None = None,
) -> Report:
    """Assemble the report of a finished job from its ranking and the sites' disclosures."""
    spent = [s.privacy.epsilon_spent for s in sites if s.privacy.epsilon_spent is not None]
    return Report(
        created=(created or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds"),
        fedmte_version=_version(),
        models=ranking.models,
        scorers=ranking.scorers,
        ranked_scorers=ranking.ranked_scorers,
        dropped_scorers=ranking.dropped_scorers,
        aggregate=ranking.aggregate,
        better=ranking.better,
        ties=ranking.ties,
        top_k=ranking.top_k,
        recommendation=ranking.recommendation,
        recommendation_groups=ranking.recommendation_groups,
        agreement=ranking.agreement,
        uncertainty=ranking.uncertainty,
        scorer_weights=ranking.scorer_weights,
        constraints=job.constraints,
        sites=list(sites),
        privacy=PrivacySummary(
            requested=job.privacy,
            dp_applied=any(s.privacy.dp for s in sites),
            epsilon_spent_max=max(spent) if spent else None,
        ),
        rounds=list(rounds),
        notes=ranking.notes,
        job=job.to_json_dict(),
    )


class RoundStatus(StrictModel):
    name: str
    seconds: float
    kinds: list[str] = Field(default_factory=list)
    bytes_per_site: int = 0


class RunStatus(StrictModel):
    """``run.json``: how a run over Flower ended, written by the ServerApp last (the launcher
    waits for it): finished with a summary, or failed with the error and each site's reason.
    The job's results are in ``report.json``; a probe run's verdicts are in ``probes``."""

    schema_: Literal["fedmte.run_status.v1"] = Field(default=RUN_STATUS_SCHEMA, alias="schema")
    status: Literal["finished", "failed"]
    run_id: int | None = None
    sites: int = 0
    planned_rounds: int = 0
    rounds: list[RoundStatus] = Field(default_factory=list)
    seconds_per_round_trip: float | None = Field(default=None, description="mean over the statistics rounds")
    total_seconds: float = 0.0
    error: str | None = None
    failures: dict[str, str] = Field(default_factory=dict)
    secure: dict[str, Any] | None = Field(default=None, description="a secure-sum job: who summed, the threshold, "
                                          "each secure step's round trip (SecureAggregator.summary)")
    probes: list[ProbeResult] | None = Field(default=None, description="a probe run: what each site did with each probe")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def write_status(status: RunStatus, path: Path) -> None:
    """Write ``run.json`` atomically, so the launcher never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, status.model_dump_json(by_alias=True, indent=2).encode("utf-8"))


def read_status(path: Path) -> RunStatus:
    try:
        return RunStatus.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FederationError(f"the run status {path} is unreadable: {error}") from None


def write_report(report: Report, directory: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` under ``directory`` (each atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, html_path = directory / JSON_NAME, directory / HTML_NAME
    replace_file(json_path, (report.to_json() + "\n").encode("utf-8"))
    replace_file(html_path, render_html(report).encode("utf-8"))
    return json_path, html_path


def read_report(path: Path) -> Report:
    """Load a ``report.json`` written by :func:`write_report`."""
    return Report.model_validate_json(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- HTML helpers

def _e(value: object) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def _num(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> str:
    t = min(max(t, 0.0), 1.0)
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b))


def _ink(t: float) -> str:
    """Text colour readable on the sequential scale at ``t``."""
    return "#ffffff" if t > 0.55 else "#111111"


def _short(name: str) -> str:
    return name if len(name) <= _MAX_LABEL_CHARS else name[: _MAX_LABEL_CHARS - 1] + "…"


def _label_width(names: Sequence[str]) -> float:
    return 12 + _LABEL_CHAR_W * max((len(_short(n)) for n in names), default=4)


def _normalised(models: Sequence[RankedModel], scorer: str) -> dict[str, float]:
    """Scores of one scorer min-max scaled to [0, 1] over the models that have one."""
    values = {m.name: m.scores[scorer] for m in models if scorer in m.scores}
    if not values:
        return {}
    low, high = min(values.values()), max(values.values())
    return {name: (0.5 if high == low else (v - low) / (high - low)) for name, v in values.items()}


# --------------------------------------------------------------------------- plots

def _heatmap_svg(models: Sequence[RankedModel], scorers: Sequence[str]) -> str:
    """Models (rows, rank order) x scorers (columns), colour = score scaled per scorer."""
    left = _label_width([m.name for m in models])
    top = 34
    width = left + _CELL_W * len(scorers) + 8
    height = top + _CELL_H * len(models) + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="scores-heatmap" role="img" width="{width:.0f}" height="{height}" '
        f'viewBox="0 0 {width:.0f} {height}" aria-label="scores per model and scorer">'
    ]
    for j, scorer in enumerate(scorers):
        x = left + _CELL_W * j + _CELL_W / 2
        parts.append(f'<text x="{x:.1f}" y="{top - 10}" text-anchor="middle" class="axis">{_e(_short(scorer))}</text>')
    scaled = {scorer: _normalised(models, scorer) for scorer in scorers}
    for i, model in enumerate(models):
        y = top + _CELL_H * i
        parts.append(f'<text x="{left - 6:.1f}" y="{y + _CELL_H * 0.65:.1f}" text-anchor="end" class="axis">'
                     f'<title>{_e(model.name)}</title>{_e(_short(model.name))}</text>')
        for j, scorer in enumerate(scorers):
            x = left + _CELL_W * j
            if scorer in model.scores:
                t = scaled[scorer][model.name]
                fill, ink, text = _mix(_LOW, _HIGH, t), _ink(t), _num(model.scores[scorer])
                tip = f"{model.name} · {scorer}: {model.scores[scorer]!r} (scaled {t:.2f})"
            else:
                fill, ink, text = _FAILED, "#444444", "failed"
                tip = f"{model.name} · {scorer}: {model.failures.get(scorer, 'no score')}"
            parts.append(
                f'<g><title>{_e(tip)}</title><rect x="{x + 1:.1f}" y="{y + 1}" width="{_CELL_W - 2}" height="{_CELL_H - 2}" '
                f'fill="{fill}"/><text x="{x + _CELL_W / 2:.1f}" y="{y + _CELL_H * 0.65:.1f}" text-anchor="middle" '
                f'fill="{ink}" class="cell">{_e(text)}</text></g>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _aggregate_bars_svg(models: Sequence[RankedModel], better: str, title: str) -> str:
    """One horizontal bar per ranked model: longer = better aggregate."""
    ranked = [m for m in models if m.aggregate is not None]
    if not ranked:
        return ""
    values = [float(m.aggregate) for m in ranked]  # type: ignore[arg-type]
    worst, best = (max(values), min(values)) if better == "lower" else (min(values), max(values))
    left, bar_w, row_h = _label_width([m.name for m in ranked]), 320, 22
    width, height = left + bar_w + 80, 10 + row_h * len(ranked)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="aggregate-bars" role="img" width="{width:.0f}" '
             f'height="{height}" viewBox="0 0 {width:.0f} {height}" aria-label="{_e(title)}">']
    for i, (model, value) in enumerate(zip(ranked, values)):
        goodness = 1.0 if worst == best else (value - worst) / (best - worst)
        length = 12 + (bar_w - 12) * goodness  # the worst still gets a visible stub
        y = 5 + row_h * i
        parts.append(
            f'<g><title>{_e(model.name)}: {_e(_num(value))}</title>'
            f'<text x="{left - 6:.1f}" y="{y + 15}" text-anchor="end" class="axis">{_e(_short(model.name))}</text>'
            f'<rect x="{left:.1f}" y="{y + 2}" width="{length:.1f}" height="{row_h - 6}" '
            f'fill="{"#9e9e9e" if model.status == "flagged" else _mix(_LOW, _HIGH, 0.35 + 0.65 * goodness)}"/>'
            f'<text x="{left + length + 6:.1f}" y="{y + 15}" class="axis">{_e(_num(value))}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _agreement_svg(scorers: Sequence[str], agreement: Sequence[Agreement]) -> str:
    """Symmetric matrix of Kendall tau-b, red (-1) to white (0) to blue (+1)."""
    tau = {(p.a, p.b): p.kendall_tau for p in agreement} | {(p.b, p.a): p.kendall_tau for p in agreement}
    cell = 58
    left = _label_width(list(scorers))
    top = 22
    size = len(scorers)
    width, height = left + cell * size + 8, top + cell * size + 8
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="agreement-matrix" role="img" width="{width:.0f}" '
             f'height="{height}" viewBox="0 0 {width:.0f} {height}" aria-label="Kendall tau between scorers">']
    for j, name in enumerate(scorers):
        parts.append(f'<text x="{left + cell * j + cell / 2:.1f}" y="{top - 6}" text-anchor="middle" class="axis">'
                     f'{_e(_short(name)[:9])}<title>{_e(name)}</title></text>')
    for i, a in enumerate(scorers):
        y = top + cell * i
        parts.append(f'<text x="{left - 6:.1f}" y="{y + cell * 0.56:.1f}" text-anchor="end" class="axis">{_e(_short(a))}</text>')
        for j, b in enumerate(scorers):
            value = 1.0 if a == b else tau.get((a, b))
            if value is None:
                fill, text = _FAILED, "n/a"
            else:
                fill = _mix(_MID, _POS, value) if value >= 0 else _mix(_MID, _NEG, -value)
                text = f"{value:+.2f}"
            ink = "#ffffff" if value is not None and abs(value) > 0.6 else "#111111"
            parts.append(
                f'<g><title>{_e(a)} vs {_e(b)}: {_e(text)}</title><rect x="{left + cell * j + 1:.1f}" y="{y + 1}" '
                f'width="{cell - 2}" height="{cell - 2}" fill="{fill}"/><text x="{left + cell * j + cell / 2:.1f}" '
                f'y="{y + cell * 0.56:.1f}" text-anchor="middle" fill="{ink}" class="cell">{_e(text)}</text></g>'
            )
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- sections

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#1b1b1b;background:#fff}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem}h3{font-size:1rem;margin-bottom:.3rem}
.meta{color:#555}.reco{background:#eef5ff;border-left:4px solid #08458f;padding:.6rem 1rem;margin:1rem 0}
table{border-collapse:collapse;margin:.5rem 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.num{text-align:right}
tr.status-recommended td{background:#eef8ee}tr.status-flagged td{background:#fff6e0}
tr.status-filtered td{background:#f3f3f3;color:#777}
.badge{display:inline-block;border-radius:3px;padding:0 .35rem;font-size:.8rem;border:1px solid #bbb}
.badge.recommended{background:#d8f0d8;border-color:#7bb07b}.badge.flagged{background:#ffe7a8;border-color:#d0a530}
.badge.filtered{background:#e0e0e0}.small{font-size:.85rem;color:#555}.clamped{color:#a40000}
.uncertainty{background:#fff8e6;border-left:4px solid #c08a00;padding:.6rem 1rem;margin:1rem 0}
svg text.axis{font:12px system-ui,sans-serif;fill:#222}svg text.cell{font:11px system-ui,sans-serif}
ul.tight{margin:.2rem 0;padding-left:1.2rem}code{font-size:.9em}
"""

_AGGREGATE_TEXT = {
    "mean_rank": "mean rank over the scorers (lower is better)",
    "median_rank": "median rank over the scorers (lower is better)",
    "borda": "Borda count, n − rank points per scorer (higher is better)",
}


def _aggregate_text(report: Report) -> str:
    if report.aggregate.startswith("single:"):
        return f"the rank under {report.aggregate.removeprefix('single:')} alone (lower is better)"
    text = _AGGREGATE_TEXT.get(report.aggregate, report.aggregate)
    if report.scorer_weights:
        weights = ", ".join(f"{s} {w:.2f}" for s, w in report.scorer_weights.items())
        text += (f", each scorer weighed by how reproducible the noise leaves its ranking ({weights})")
    return text


def _interval_html(model: RankedModel, scorer: str, level: float) -> str:
    u = model.uncertainty
    if u is None or scorer not in u.intervals:
        return ""
    found = u.intervals[scorer]
    if found is None:
        return '<br><span class="small interval">no interval: the noise left it undefined too often</span>'
    return (f'<br><span class="small interval" title="{_e(f"{level:.0%}")} interval">'
            f'[{_e(_num(found.low, 3))}, {_e(_num(found.high, 3))}]</span>')


def _ranking_table(report: Report) -> str:
    noisy = report.noise_shown
    level = report.uncertainty.level if report.uncertainty is not None else 0.9
    under = f"score (rank){f'<br>{level:.0%} interval' if noisy else ''}"
    head = "".join(f'<th scope="col">{_e(s)}<br><span class="small">{under}</span></th>' for s in report.scorers)
    chance_head = (f'<th scope="col">rank {_e(f"{level:.0%}")} interval</th><th scope="col">p(best)</th>'
                   f'<th scope="col">p(top {_e(report.top_k)})</th>' if noisy else "")
    rows = []
    for model in report.models:
        cells = []
        for scorer in report.scorers:
            if scorer in model.scores:
                rank = model.ranks.get(scorer)
                suffix = f" ({_num(rank)})" if rank is not None else ""
                mark = ('<span class="clamped" title="clamped: outside the scorer\'s range">*</span>'
                        if scorer in model.clamped else "")
                band = _interval_html(model, scorer, level) if noisy else ""
                cells.append(f'<td class="num" data-scorer="{_e(scorer)}">{_e(_num(model.scores[scorer]))}{mark}{_e(suffix)}{band}</td>')
            elif model.status == "filtered" and scorer not in model.failures:
                cells.append('<td class="num">—</td>')
            else:
                rank = model.ranks.get(scorer)
                reason = model.failures.get(scorer, "no score")
                suffix = f" ({_num(rank)})" if rank is not None else ""
                cells.append(f'<td class="num" title="{_e(reason)}">failed{_e(suffix)}</td>')
        remarks = [f"[{_e(v.rule)}: {_e(v.action)}] {_e(v.message)}" for v in model.violations]
        remarks += [f"{_e(s)} failed: {_e(r)}" for s, r in model.failures.items()]
        remarks += [f'<span class="clamped">{_e(clamp_text(model, s))}</span>' for s in model.clamped]
        u = model.uncertainty
        if noisy and u is not None and u.tied_with:
            remarks.append(f"cannot be told apart from {_e(', '.join(u.tied_with))} under this noise")
        if u is not None and u.held_at_point:
            remarks.append(f"not resampled (held at its score): {_e(', '.join(u.held_at_point))}")
        remark_html = '<ul class="tight">' + "".join(f"<li>{r}</li>" for r in remarks) + "</ul>" if remarks else ""
        rank_text = "—" if model.rank is None else str(model.rank)
        chances = ""
        if noisy:
            chances = ('<td class="num">—</td>' * 3 if u is None else
                       f'<td class="num">{_e(_num(u.rank_interval.low))}–{_e(_num(u.rank_interval.high))}</td>'
                       f'<td class="num p-best">{u.p_best:.2f}</td><td class="num p-top-k">{u.p_top_k:.2f}</td>')
        tie = f' data-tie-group="{u.tie_group}"' if u is not None else ""
        rows.append(
            f'<tr class="status-{_e(model.status)}" data-model="{_e(model.name)}" data-rank="{_e(rank_text)}"{tie} '
            f'data-status="{_e(model.status)}"><td class="num">{_e(shown_rank(model))}</td><th scope="row">{_e(model.name)}</th>'
            f'<td class="num">{_e(_num(model.aggregate))}</td>{"".join(cells)}{chances}'
            f'<td><span class="badge {_e(model.status)}">{_e(model.status)}</span></td><td>{remark_html}</td></tr>'
        )
    return (
        f'<table id="ranking"><caption class="small">Aggregate: {_e(_aggregate_text(report))}; per-scorer ties: '
        f'{_e(report.ties)} rank; a failed score ranks below every model with one.'
        f'{" A rank n= marks candidates the noise cannot order; * marks a clamped score." if noisy else ""}</caption>'
        f'<thead><tr><th scope="col">rank</th><th scope="col">model</th><th scope="col">aggregate</th>{head}{chance_head}'
        f'<th scope="col">status</th><th scope="col">why</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _agreement_table(report: Report) -> str:
    rows = "".join(
        f"<tr><td>{_e(p.a)}</td><td>{_e(p.b)}</td><td class=\"num\">{_e(_num(p.kendall_tau, 3))}</td>"
        f"<td class=\"num\">{p.models}</td></tr>"
        for p in report.agreement
    )
    return (f'<table id="agreement"><thead><tr><th>scorer</th><th>scorer</th><th>Kendall tau-b</th>'
            f"<th>models</th></tr></thead><tbody>{rows}</tbody></table>")


def _constraints_section(report: Report) -> str:
    c = report.constraints
    limits = {
        "max_latency_ms": (c.max_latency_ms, "median single-sample latency, worst site (ms)"),
        "max_parameters": (c.max_parameters, "parameter count (manifest)"),
        "max_peak_memory_mb": (c.max_peak_memory_mb, "peak memory of the pass, worst site (MiB)"),
        "licenses": (", ".join(c.licenses) if c.licenses is not None else None, "license allowlist (manifest)"),
    }
    rule_rows = "".join(
        f"<tr><td><code>{_e(rule)}</code></td><td>{_e(what)}</td><td>{_e(_num(value) if not isinstance(value, str) else value)}</td>"
        f"<td>{_e(c.action_for(rule))}</td></tr>"
        for rule, (value, what) in limits.items() if value is not None
    )
    if not rule_rows:
        rule_rows = '<tr><td colspan="4">The job sets no business constraints.</td></tr>'
    model_rows = []
    for m in report.models:
        md = m.metadata
        broken = ", ".join(f"{v.rule} ({v.action})" for v in m.violations) or "none"
        model_rows.append(
            f'<tr data-model="{_e(m.name)}"><th scope="row">{_e(m.name)}</th><td>{_e(md.license or "—")}</td>'
            f'<td class="num">{_e(_num(md.parameter_count))}</td><td class="num">{_e(_num(md.latency_ms))}</td>'
            f'<td class="num">{_e(_num(md.peak_memory_mb))}</td><td>{_e(md.architecture or "—")}</td>'
            f"<td>{_e(broken)}</td><td>{_e(md.description or '')}</td></tr>"
        )
    return (
        '<table id="constraint-rules"><thead><tr><th>rule</th><th>on</th><th>limit</th><th>on violation</th></tr></thead>'
        f"<tbody>{rule_rows}</tbody></table>"
        '<p class="small">flag: ranked but never recommended; filter: left out of the ranking. '
        "A value that was not measured counts as a violation.</p>"
        '<table id="constraints"><thead><tr><th>model</th><th>license</th><th>parameters</th><th>latency (ms)</th>'
        "<th>peak memory (MiB)</th><th>architecture</th><th>rules broken</th><th>description</th></tr></thead>"
        f"<tbody>{''.join(model_rows)}</tbody></table>"
    )


def _sites_section(report: Report) -> str:
    if not report.sites:
        return "<p>No site disclosures were recorded for this job.</p>"
    blocks = []
    for site in report.sites:
        p = site.privacy
        if p.dp:
            budget = f" of a budget of {_num(p.epsilon_budget)}" if p.epsilon_budget is not None else ""
            total = f"; {_num(p.epsilon_total)} so far{budget}" if p.epsilon_total is not None else budget
            privacy = f"DP on: ε = {_num(p.epsilon_spent)} spent by this job (δ = {_num(p.delta)}){total}"
        else:
            privacy = ("DP off: exact statistics (still masked by the secure sum)" if report.privacy.secure_sum else
                       "DP off: exact statistics, added in the clear (plain sum): the coordinator saw this site's sums")
        rows = "".join(
            f"<tr><td class=\"num\">{_e(_num(s.round))}</td><td>{_e(s.model or '—')}</td><td><code>{_e(s.kind)}</code></td>"
            f"<td>{_e('×'.join(str(d) for d in s.shape) or 'scalar')}</td><td class=\"num\">{s.nbytes:,}</td>"
            f"<td>{'yes' if s.masked else 'no'}</td><td>{'yes' if s.noised else 'no'}</td></tr>"
            for s in site.statistics
        )
        refusals = (
            '<p><strong>Refused:</strong></p><ul class="tight">' + "".join(f"<li>{_e(r)}</li>" for r in site.refusals) + "</ul>"
            if site.refusals else ""
        )
        head = f'<p class="small">audit-log head: <code>{_e(site.audit_head)}</code></p>' if site.audit_head else ""
        blocks.append(
            f'<section class="site" data-site="{_e(site.name)}"><h3>{_e(site.name)}</h3><p>{_e(privacy)}; '
            f"{len(site.statistics)} blocks, {site.total_bytes:,} bytes in all.</p>{head}{refusals}"
            '<table><thead><tr><th>round</th><th>model</th><th>statistic</th><th>shape</th><th>bytes</th>'
            f"<th>masked</th><th>noised</th></tr></thead><tbody>{rows}</tbody></table></section>"
        )
    return "".join(blocks)


def _privacy_text(report: Report) -> str:
    asked = report.privacy.requested
    if asked.dp:
        eps = "each site's default ε" if asked.epsilon is None else f"ε = {_num(asked.epsilon)} per release"
        delta = "its default δ" if asked.delta is None else f"δ = {_num(asked.delta)}"
        request = f"differential privacy with {eps} and {delta}"
    else:
        request = "no differential privacy"
    applied = (f"the largest ε any site spent on this job was {_num(report.privacy.epsilon_spent_max)}"
               if report.privacy.dp_applied else "no site added noise")
    secure = "on: the coordinator saw only sums over all sites" if report.privacy.secure_sum else "off"
    return f"Asked for {request}; {applied}. Secure sum {secure}. Each site's own policy decides what it releases."


def _confirmation_section(report: Report) -> str:
    """Stage 2 beside stage 1: each confirmed candidate's rank by the scores and its
    validated accuracy on the sites' held-back rows."""
    confirmed = [m for m in report.models if m.validation is not None]
    if report.decision is None or not confirmed:
        return ""
    rows = "".join(f'<tr><td>{_e(shown_rank(m))}</td><td>{_e(m.name)}</td><td>{_e(validation_text(m))}</td>'
                   f'<td>{"chosen" if m.name == report.decision.model else ""}</td></tr>' for m in confirmed)
    return ('<section id="confirmation-section"><h2>Confirmation by transfer</h2>'
            '<p>The top candidates by the scores (stage 1) were fitted a classifier head over the sites\' data and '
            'measured on rows each site held back (stage 2); the decision follows the measurement.</p>'
            '<table id="confirmation"><thead><tr><th>rank by scores</th><th>model</th>'
            '<th>validated accuracy (95% interval)</th><th></th></tr></thead>'
            f'<tbody>{rows}</tbody></table></section>')


def render_html(report: Report) -> str:
    """The self-contained HTML page of ``report`` (no script, no external resource)."""
    job = report.job
    ranked = [m for m in report.models if m.status != "filtered"]
    reco = _e(recommendation_text(report)) or "none (see the notes)"
    labels = job.get("labels", [])
    label_text = ", ".join(str(x) for x in labels[:20]) + (f", … ({len(labels)} in all)" if len(labels) > 20 else "")
    notes = "".join(f"<li>{_e(n)}</li>" for n in report.notes)
    rounds = "".join(
        f"<tr><td>{_e(r.name)}</td><td class=\"num\">{r.seconds:.2f}</td><td>{_e(', '.join(r.kinds))}</td>"
        f"<td class=\"num\">{r.bytes_per_site:,}</td></tr>"
        for r in report.rounds
    )
    dropped = "".join(f"<li>{_e(s)}: {_e(why)}</li>" for s, why in report.dropped_scorers.items())
    shown = report.ranked_scorers if report.ranked_scorers else report.scorers
    agreement = (
        _agreement_svg(report.ranked_scorers, report.agreement) + _agreement_table(report)
        if len(report.ranked_scorers) >= 2 else "<p>Agreement needs at least two scorers that ranked models.</p>"
    )
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
        f"<title>fedmte report: {_e(job.get('connection', ''))}</title><style>{_CSS}</style></head><body>",
        "<header><h1>fedmte model ranking</h1>",
        f'<p class="meta">{_e(len(ranked))} ranked of {_e(len(report.models))} candidates · {_e(len(report.sites))} sites · '
        f"scorers: {_e(', '.join(report.scorers))} · connection <code>{_e(job.get('connection', ''))}</code> · "
        f"{_e(report.created)} · fedmte {_e(report.fedmte_version)}</p>",
        f'<p class="meta">Labels: {_e(label_text)}</p>',
        f'<div class="reco" id="recommendation"><strong>Recommended (top {_e(report.top_k)}):</strong> {reco}</div>',
        f'<div class="uncertainty" id="uncertainty"><strong>Uncertainty:</strong> {_e(uncertainty_text(report))}</div>'
        + (f'<div class="reco" id="decision"><strong>Confirmed by transfer:</strong> {_e(decision_text(report))}</div>'
           if report.decision is not None else "") + "</header>",
        _confirmation_section(report),
        f'<section id="ranking-section"><h2>Ranking</h2>{_ranking_table(report)}',
        _aggregate_bars_svg(ranked, report.better, "aggregate per model"),
        f'{"<ul class=tight>" + dropped + "</ul>" if dropped else ""}</section>',
        '<section id="scores-section"><h2>Scores per model and scorer</h2>'
        '<p class="small">Each column is scaled to [0, 1] over the ranked models (dark = best under that scorer); '
        "the cell shows the raw score. Grey: the scorer failed for that model.</p>",
        _heatmap_svg(ranked, shown) if ranked else "<p>No model was ranked.</p>", "</section>",
        '<section id="agreement-section"><h2>How much the scorers agree</h2>'
        '<p class="small">Kendall tau-b between the scorers\' orderings of the ranked models: +1 same order, '
        "0 unrelated, −1 reversed. Low agreement means the recommendation depends on the choice of scorer.</p>",
        agreement, "</section>",
        f'<section id="constraints-section"><h2>Business constraints</h2>{_constraints_section(report)}</section>',
        f'<section id="privacy-section"><h2>Privacy</h2><p>{_e(_privacy_text(report))}</p></section>',
        f'<section id="sites-section"><h2>What each site disclosed</h2>{_sites_section(report)}</section>',
        ('<section id="rounds-section"><h2>Rounds</h2><table id="rounds"><thead><tr><th>round</th><th>seconds</th>'
         f"<th>statistics</th><th>bytes per site</th></tr></thead><tbody>{rounds}</tbody></table></section>" if rounds else ""),
        f'<section id="notes-section"><h2>Notes</h2><ul>{notes}</ul></section>' if notes else "",
        "</body></html>\n",
    ])


__all__ = [
    "DisclosedStatistic",
    "PrivacySummary",
    "Report",
    "RoundInfo",
    "SiteDisclosure",
    "SitePrivacy",
    "build_report",
    "clamp_text",
    "read_report",
    "decision_text",
    "recommendation_text",
    "validation_text",
    "shown_rank",
    "uncertainty_text",
    "render_html",
    "write_report",
]
