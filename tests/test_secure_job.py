"""A multi-model job summed with the secure sum, in process: three site agents behind their
:class:`~fedmte.client.secure_site.SecureSite` (a ``[secure]`` table in each ``site.toml``,
as ``fedmte local up`` and ``fedmte demo`` provision them), every message through its wire
form. With DP off the secure scores equal ``fedmte.score`` on the pooled features, the
coordinator holds only masked words, and the report says the secure sum was on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from fedmte.client.secure_site import SecureSite, secure_config, site_for
from fedmte.client.site_config import load_site_config
from fedmte.protocol.keys import public_key_text
from fedmte.protocol.secure_rounds import DeclaredBounds
from fedmte.protocol.wire import SECURE_QUERIES, Payload
from fedmte.server.coordinator import build_job_report, execute_job, job_aggregator, load_candidates
from fedmte.server.job import job_from_dict
from fedmte.server.report import render_html
from fedmte.server.secure_aggregation import SecureAggregator
from fedmte.trial.local_sites import coordinator_key, example_packages, provision, write_site
from tests.job_helpers import LABELS, MODELS, AgentExchange, pooled_reference, site_arrays

CANDIDATES = ["tanh-head", "gelu-head"]
SCORERS = ["hscore", "leep", "gbc", "logme"]


class SecureAgentExchange(AgentExchange):
    """:class:`AgentExchange` whose ``secure_*`` queries go to each site's :class:`SecureSite`
    (made from the ``[secure]`` table of its site file, as a SuperNode with ``site-file`` makes it)."""

    def __init__(self, site_files: Sequence[Path], run_id: str) -> None:
        super().__init__(site_files, run_id)
        self.secure: dict[int, SecureSite] = {}
        for node, site_file in self.files.items():
            self.secure[node] = site_for(site_file)  # computes through the agent, audits to its log
            assert self.secure[node].config.site_id == load_site_config(site_file).site.name
        self.plain_stats = 0

    def reply(self, query: str, node: int, payload: Payload) -> Payload:
        if query in SECURE_QUERIES:
            return self.secure[node].handle(query, payload)
        self.plain_stats += query == "stats"
        return super().reply(query, node, payload)


def test_a_secure_multi_model_job_equals_pooled_scores(tmp_path: Path) -> None:
    key, key_path = coordinator_key(tmp_path / "coordinator")
    parts = site_arrays(3, n=600)
    homes = {f"site{k}": tmp_path / "sites" / f"site{k}" for k in range(3)}
    files = [write_site(home, name, part, LABELS, coordinator=key, dp=False)
             for (name, home), part in zip(homes.items(), parts)]
    bounds = DeclaredBounds(max_rows=10_000, feature_norm=100.0)
    spec = provision(dict(zip(homes, files)), key_path, bounds=bounds, require_secure_sum=True)
    # one site file holds it all: the secure sum's settings and the one trusted coordinator key
    assert all(not (f.parent / "secure.toml").exists() for f in files)
    for name, site_file in zip(homes, files):
        config = load_site_config(site_file)
        assert config.secure is not None and set(config.secure.roster) == set(homes)
        assert config.secure.min_declared_rows == 10_000 and config.secure.require_secure_sum
        assert config.trust.keys == (public_key_text(key),)  # listed once, for packages, jobs and the sum
        assert secure_config(config).coordinators == dict(config.trust.coordinators)
    packages = example_packages(tmp_path / "models", key, 6, {c: MODELS[c] for c in CANDIDATES})
    job = job_from_dict({
        "connection": "unused", "output": str(tmp_path / "report"), "labels": LABELS, "purpose": "secure job test",
        "candidates": [{"name": c, "path": str(packages[c])} for c in CANDIDATES], "scorers": SCORERS,
        "privacy": {"dp": False}, "federation": {"coordinator_key": str(key_path), "min_sites": 3},
        "secure": spec.model_dump(mode="json"),
    })
    aggregator = job_aggregator(job, "r1")
    assert isinstance(aggregator, SecureAggregator)
    aggregator.keep_uploads = True
    exchange = SecureAgentExchange(files, "r1")
    outcome = execute_job(exchange, job, load_candidates(job), key, run_id="r1", aggregator=aggregator)
    report = build_job_report(job, outcome)

    assert exchange.plain_stats == 0  # every round went through secure_upload
    assert aggregator.summary()["phases_run"] == outcome.planned_rounds and aggregator.failures == {}
    assert report.privacy.secure_sum and outcome.secure_sum
    assert all(s.masked for site in report.sites for s in site.statistics)
    assert not any("plain sum" in note for note in report.notes)
    html = render_html(report)
    assert "Secure sum on" in html and "added in the clear" not in html
    # what the coordinator held: ring words, not one site's sums
    assert aggregator.uploads_received and all(words.dtype == np.uint64 for _, _, words, _ in aggregator.uploads_received)
    scores = {m.name: m.scores for m in report.models}
    for name in CANDIDATES:
        reference = pooled_reference(files, packages[name], SCORERS, tmp_path)
        for scorer in SCORERS:
            assert scores[name][scorer] == pytest.approx(reference[scorer], rel=1e-6, abs=1e-9), f"{name}/{scorer}"


def test_a_secure_job_with_dp_stays_within_the_declared_bounds(tmp_path: Path) -> None:
    """With DP on the sites clip rows to the declared norm and add noise before masking; the
    noisy sums still fit the public bounds, so the job finishes and spends privacy."""
    key, key_path = coordinator_key(tmp_path / "coordinator")
    homes = {f"site{k}": tmp_path / "sites" / f"site{k}" for k in range(3)}
    files = [write_site(home, name, part, LABELS, coordinator=key, dp=True, clip_norm=5.0)
             for (name, home), part in zip(homes.items(), site_arrays(3, n=600))]
    spec = provision(dict(zip(homes, files)), key_path, bounds=DeclaredBounds(max_rows=1000, feature_norm=5.0))
    packages = example_packages(tmp_path / "models", key, 6, {"tanh-head": MODELS["tanh-head"]})
    job = job_from_dict({
        "connection": "unused", "output": str(tmp_path / "report"), "labels": LABELS, "candidates": [str(packages["tanh-head"])],
        "scorers": ["hscore", "gbc"], "federation": {"coordinator_key": str(key_path), "min_sites": 3},
        "secure": spec.model_dump(mode="json"),
    })
    outcome = execute_job(SecureAgentExchange(files, "r2"), job, load_candidates(job), key, run_id="r2",
                          aggregator=job_aggregator(job, "r2"))
    report = build_job_report(job, outcome)
    assert report.privacy.secure_sum and report.privacy.dp_applied
    assert all(site.privacy.dp and (site.privacy.epsilon_spent or 0.0) > 0 for site in report.sites)
    assert set(report.models[0].scores) == {"hscore", "gbc"}
