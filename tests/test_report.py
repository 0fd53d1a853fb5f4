"""The report: report.json's shape and round trip, an escaped self-contained report.html,
and the page rendered by headless Chromium with the ranking table in rank order."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from fedmte.protocol.evaluation import parse_scores
from fedmte.server.job import NCTI_TERMS, job_from_dict
from fedmte.server.ranking import ModelMetadata, rank_models
from fedmte.server.report import (
    DisclosedStatistic,
    Report,
    RoundInfo,
    SiteDisclosure,
    SitePrivacy,
    build_report,
    read_report,
    render_html,
    write_report,
)

EVIL = '<script>alert("x")</script>'
EVIL_ATTR = '"><img src=x onerror=alert(1)>'
CHROMIUM_TIMEOUT = 90
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _report(*, evil: bool = False, dp: bool = True, replicates: dict | None = None, clamped: dict | None = None) -> Report:
    """Five candidates, four scorers (NCTI via its terms), one failure, one flag, one filter."""
    labels = ["zero", "one", "two"] + ([EVIL] if evil else [])
    job = job_from_dict({
        "connection": "local" if not evil else f"local{EVIL}",
        "labels": labels,
        "candidates": ["alpha", "beta", "gamma", "delta", "omega"],
        "scorers": ["logme", "hscore", "gbc", "ncti"],
        "constraints": {"max_latency_ms": 20.0, "licenses": ["MIT", "Apache-2.0"], "actions": {"licenses": "filter"}},
        "ranking": {"top_k": 2},
        "privacy": {"dp": True, "epsilon": 1.0, "delta": 1e-6},
    })
    rows = {
        "alpha": (2.0, 1.4, -0.5, (60.0, 0.9, 1.0)),
        "beta": (1.0, 1.1, -0.9, (50.0, 0.7, 1.2)),
        "gamma": (0.5, 0.2, None, (20.0, 0.4, 1.9)),
        "delta": (-0.5, 0.1, -2.0, (10.0, 0.3, 2.1)),
        "omega": (3.0, 2.0, 0.0, (70.0, 0.95, 0.9)),
    }
    scores: dict[str, dict[str, float | None]] = {}
    for name, (logme, hscore, gbc, terms) in rows.items():
        scores[name] = {"logme": logme, "hscore": hscore, "gbc": gbc, "ncti": sum(terms[:2]) - terms[2],
                        **dict(zip(NCTI_TERMS, terms))}
    odd_name = "alpha" if not evil else EVIL
    if evil:
        scores[EVIL] = scores.pop("alpha")
    metadata = {
        name: ModelMetadata.from_sites(
            {"site-a": {"latency_ms": 5.0 + i, "peak_rss_bytes": (200 + i) * 2**20}},
            license="MIT", parameter_count=10_000 * (i + 1), architecture="mlp", description=f"model {i}",
        )
        for i, name in enumerate(scores)
    }
    metadata["delta"] = metadata["delta"].model_copy(update={"latency_ms": 45.0})  # flagged
    metadata["omega"] = metadata["omega"].model_copy(update={"license": EVIL_ATTR if evil else "proprietary"})  # filtered
    if evil:
        metadata[odd_name] = metadata[odd_name].model_copy(update={"description": EVIL, "architecture": EVIL_ATTR})
    ranking = rank_models(
        scores, metadata, scorers=job.scorers, settings=job.ranking, constraints=job.constraints,
        failures={"gamma": {"gbc": f"ScorerDomainError: a class has no samples{EVIL if evil else ''}"}},
        replicates=replicates, clamped=clamped,
    )
    sites = [
        SiteDisclosure(
            name=f"site-{letter}" + (EVIL if evil and letter == "b" else ""),
            statistics=[
                DisclosedStatistic(kind="class_sums", shape=[3, 16], nbytes=3 * 16 * 8, model="beta", round=1, noised=True),
                DisclosedStatistic(kind="gram" + (EVIL_ATTR if evil else ""), shape=[136], nbytes=136 * 8, model="beta", round=1, noised=True),
            ],
            privacy=(SitePrivacy(dp=True, epsilon_spent=0.5 + 0.25 * k, delta=1e-6, epsilon_total=1.0, epsilon_budget=4.0)
                     if dp else SitePrivacy(dp=False)),
            refusals=[f"policy:min_count refused{EVIL if evil else ''}"] if letter == "c" else [],
            audit_head="ab" * 32,
        )
        for k, letter in enumerate("abc")
    ]
    return build_report(job, ranking, sites, rounds=[RoundInfo(name="setup", seconds=0.4),
                                                     RoundInfo(name="round-1", seconds=0.8, kinds=["gram"], bytes_per_site=1472)])


def test_report_json_has_the_documented_shape_and_rank_order(tmp_path: Path) -> None:
    report = _report()
    json_path, html_path = write_report(report, tmp_path / "out")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert {"models", "scorers", "sites", "privacy", "job"} <= set(data)
    assert data["schema"] == "fedmte.report.v1" and data["job"]["schema"] == "fedmte.job.v1"
    assert data["scorers"] == ["logme", "hscore", "gbc", "ncti"]
    for entry in data["models"]:
        assert {"name", "scores", "ranks", "rank", "metadata"} <= set(entry)
    names = [m["name"] for m in data["models"]]
    ranks = [m["rank"] for m in data["models"]]
    assert names[-1] == "omega" and ranks[-1] is None  # filtered: last, unranked
    assert ranks[:-1] == sorted(ranks[:-1]) and ranks[0] == 1
    assert data["recommendation"] == ["alpha", "beta"]  # delta is flagged; the top two unflagged
    by_name = {m["name"]: m for m in data["models"]}
    assert "gbc" not in by_name["gamma"]["scores"] and "gbc" in by_name["gamma"]["failures"]
    assert by_name["delta"]["status"] == "flagged" and by_name["omega"]["status"] == "filtered"
    assert {"dp": True, "epsilon": 1.0, "delta": 1e-6}.items() <= data["privacy"]["requested"].items()
    assert data["privacy"]["epsilon_spent_max"] == pytest.approx(1.0)
    assert [s["name"] for s in data["sites"]] == ["site-a", "site-b", "site-c"]
    assert read_report(json_path) == report
    assert html_path.read_text(encoding="utf-8") == render_html(report)


def _noisy_replicates() -> dict[str, dict[str, np.ndarray]]:
    """alpha and beta drawn alike (the noise cannot order them), gamma and delta well below."""
    rng = np.random.default_rng(8)
    centre = {"alpha": 2.0, "beta": 2.0, "gamma": 0.5, "delta": -0.5, "omega": 3.0}
    return {name: {"logme": c + rng.normal(0, 0.5, 200), "hscore": c + rng.normal(0, 0.5, 200),
                   "gbc": -1.0 + rng.normal(0, 0.01, 200)} for name, c in centre.items()}


def test_report_shows_intervals_chances_tie_groups_and_clamped_scores(tmp_path: Path) -> None:
    report = _report(replicates=_noisy_replicates(), clamped={"alpha": {"hscore": 86.8}})
    json_path, html_path = write_report(report, tmp_path)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["uncertainty"]["assessed"] and not data["uncertainty"]["exact"]
    assert data["uncertainty"]["replicates"] == 200 and data["uncertainty"]["level"] == 0.9
    assert data["uncertainty"]["tie_groups"][0] == ["alpha", "beta"]
    assert data["recommendation_groups"] == [["alpha", "beta"]]
    by_name = {m["name"]: m for m in data["models"]}
    alpha = by_name["alpha"]["uncertainty"]
    assert set(alpha["intervals"]) == {"logme", "hscore", "gbc", "ncti"}
    assert alpha["intervals"]["logme"]["low"] < by_name["alpha"]["scores"]["logme"] < alpha["intervals"]["logme"]["high"]
    assert alpha["tied_with"] == ["beta"] and alpha["tie_rank"] == 1
    assert sum(m["uncertainty"]["p_best"] for m in data["models"] if m["uncertainty"]) == pytest.approx(1.0)
    assert 0 < alpha["p_best"] < 1 and 0 < alpha["p_top_k"] <= 1
    assert by_name["omega"]["uncertainty"] is None  # filtered: not ranked, so nothing to be uncertain about
    assert by_name["alpha"]["clamped"] == {"hscore": {"raw": 86.8, "value": 1.4}}
    page = html_path.read_text(encoding="utf-8")
    assert "alpha and beta cannot be told apart under this noise" in page
    assert "p(best)" in page and ">1=<" in page and "90% interval" in page
    assert "hscore clamped from 86.8 to its maximum 1.4" in page
    assert "alpha = beta (tied under the noise)" in page
    assert read_report(json_path) == report


def test_without_noise_the_report_says_the_intervals_collapse() -> None:
    report = _report(dp=False)
    assert report.uncertainty is not None and not report.uncertainty.assessed
    assert all(m.uncertainty is None or m.uncertainty.p_best in (0.0, 1.0) for m in report.models)
    page = render_html(report)
    assert "The sums were exact (no DP noise), so there is no noise uncertainty" in page
    assert "p(best)" not in page


def test_noise_without_resampling_is_said_to_leave_the_uncertainty_unknown() -> None:
    page = render_html(_report(dp=True))
    assert "not resampled" in page and "uncertainty is unknown" in page and "p(best)" not in page


def test_report_json_is_readable_by_fedmte_evaluate(tmp_path: Path) -> None:
    report = _report()
    json_path, _ = write_report(report, tmp_path)
    table = parse_scores(json.loads(json_path.read_text(encoding="utf-8")))
    assert set(table) == {"logme", "hscore", "gbc", "ncti"}
    assert "gamma" not in table["gbc"]  # the failed score is absent, as evaluate expects
    by_name = {m.name: m for m in report.models}
    assert table["logme"] == {name: m.scores["logme"] for name, m in by_name.items()}


def test_html_is_self_contained_with_no_script_and_no_fetch() -> None:
    page = render_html(_report())
    lowered = page.lower()
    for forbidden in ("<script", "<link", "<img", "<iframe", "<object", "<embed", "@import", "url(", " src=", " href="):
        assert forbidden not in lowered, forbidden
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {"http://www.w3.org/2000/svg"}  # the SVG namespace only
    for section in ("ranking", "scores-heatmap", "agreement-matrix", "constraints", "sites-section", "recommendation"):
        assert f'id="{section}"' in page


def test_every_string_from_the_job_manifests_and_sites_is_escaped() -> None:
    page = render_html(_report(evil=True))
    assert "<script" not in page.lower()
    assert EVIL_ATTR not in page and "<img" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page


class _DomRanking(HTMLParser):
    """Rows of <table id="ranking">'s tbody and the rects of the heatmap, from a DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.in_ranking = self.in_body = self.in_heatmap = False
        self.heatmap_rects = 0
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            self.scripts += 1
        if tag == "table" and a.get("id") == "ranking":
            self.in_ranking = True
        elif tag == "tbody" and self.in_ranking:
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.rows.append(a)
        elif tag == "svg" and a.get("id") == "scores-heatmap":
            self.in_heatmap = True
        elif tag == "rect" and self.in_heatmap:
            self.heatmap_rects += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_ranking = self.in_body = False
        elif tag == "svg":
            self.in_heatmap = False


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "headless Chromium is needed to check report.html renders, and it is not installed: "
            "run `sudo apt-get update && sudo apt-get install -y chromium` (Debian/Ubuntu; .ci/run does this)"
        )
    return found


@pytest.mark.slow  # headless Chromium
def test_report_html_renders_in_headless_chromium_with_the_ranking_table(tmp_path: Path) -> None:
    report = _report(evil=True)
    _, html_path = write_report(report, tmp_path / "report")
    done = subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", html_path.resolve().as_uri()],
        capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dom = _DomRanking()
    dom.feed(done.stdout)
    assert dom.rows, f"no <table id=\"ranking\"> rows in the rendered DOM; stderr: {done.stderr[-1000:]}"
    assert [row["data-model"] for row in dom.rows] == [m.name for m in report.models]
    assert len(dom.rows) == 5
    ranks = [int(row["data-rank"]) for row in dom.rows if row["data-rank"] != "—"]
    assert ranks == sorted(ranks) and ranks[0] == 1 and len(ranks) == 4
    assert dom.rows[-1]["data-status"] == "filtered"
    assert dom.rows[0]["data-model"] == EVIL  # the hostile name is text, not markup
    assert dom.scripts == 0
    ranked = [m for m in report.models if m.status != "filtered"]
    assert dom.heatmap_rects == len(ranked) * len(report.ranked_scorers)
