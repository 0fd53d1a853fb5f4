"""The secure sum over real Flower processes on loopback.

One federation serves the module: a SuperLink with TLS and SuperNode authentication, three
fedmte site runners, started once and stopped in the fixture's ``finally``. Each site is a
site agent whose ``site.toml`` holds precomputed features (``[data] kind = "features"``, DP
off) and a ``[secure]`` table (identity key, roster, floors on the declared bounds) that
requires the secure sum, so the site refuses plain statistics. A secure job scoring the
sites' features (one ``site_features`` candidate) then gives the scores ``fedmte.score``
gives on the pooled rows, with the round trips the protocol states, and a plain job is
refused at every site. Forgeries, masked uploads, a site crashing after key sharing and an
abort below the threshold are shown over five real site runners in
``test_secure_dropout.py``; every corner of the protocol in-process in ``test_secure_rounds.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import fedmte
from fedmte.client.audit_log import read_records
from fedmte.client.site_config import load_site_config
from fedmte.protocol.audit_format import IntentRecord, OutcomeRecord
from fedmte.protocol.errors import FederationError
from fedmte.protocol.secure_rounds import DeclaredBounds
from fedmte.server.coordinator import launch
from fedmte.server.report import Report, RunStatus, read_report
from fedmte.server.secure_aggregation import SecureJobSpec
from fedmte.trial.local_federation import LocalFederation, down, up
from fedmte.trial.local_sites import provision
from tests.datasets import DATASETS, site_split_without_class
from tests.test_flower_federation import decisions, job, received, site_features_scores, site_files, site_home

pytestmark = pytest.mark.slow  # starts a SuperLink and SuperNodes

DATA = DATASETS["basic"]
SCORERS = ["hscore", "leep", "gbc", "logme", "nce"]


def require_secure_sum(state: LocalFederation, bounds: DeclaredBounds) -> SecureJobSpec:
    """Provision the sites' ``[secure]`` tables again, now requiring the secure sum (``up``
    provisions it with plain jobs still allowed); the identity keys stay. Done before any
    job reaches the sites, which read their site files on the first message."""
    return provision({site.name: Path(site.site_file) for site in state.sites}, Path(state.coordinator_key),
                     bounds=bounds, require_secure_sum=True)


@dataclass(frozen=True)
class Secured:
    status: RunStatus
    report: Report
    output: Path


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFederation, SecureJobSpec]]:
    root = tmp_path_factory.mktemp("secure-federation")
    data = site_files(root / "data", site_split_without_class(DATA, absent=0, sites=3))
    state = up(root / "local", 3, data=data, runner="site", dp=False)
    try:
        bounds = DeclaredBounds(max_rows=1000, feature_norm=float(np.max(np.linalg.norm(DATA.features, axis=1))) * 2)
        spec = require_secure_sum(state, bounds)
        for site in state.sites:
            config = load_site_config(site.site_file)
            assert config.data.kind == "features" and config.secure is not None and config.secure.require_secure_sum
        yield state, spec
    finally:
        down(Path(state.directory))


@pytest.fixture(scope="module")
def secure_report(secure_federation: tuple[LocalFederation, SecureJobSpec],
                  tmp_path_factory: pytest.TempPathFactory) -> Secured:
    state, spec = secure_federation
    output = tmp_path_factory.mktemp("secure-reports")
    status = launch(job(state, output, SCORERS, secure=spec.model_dump(mode="json")))
    return Secured(status, read_report(output / "report.json"), output)


def test_secure_job_scores_equal_pooled_scores(secure_report: Secured) -> None:
    pooled = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS)
    status, report = secure_report.status, secure_report.report
    assert status.status == "finished" and status.sites == 3
    scores = site_features_scores(report)
    for name in SCORERS:
        assert scores[name] == pytest.approx(pooled[name], rel=1e-6), name
    assert report.privacy.secure_sum and [s.name for s in report.sites] == ["site0", "site1", "site2"]
    assert all(stat.masked for site in report.sites for stat in site.statistics)
    assert not any("secure sum left out" in note for note in report.notes)  # every site is in every sum
    # The round trips the coordinator made, from its digest of every reply: the job's setup, the
    # secure setup (advertise, share), then upload + reveal per phase (self masks), and finish;
    # every site answered each one.
    rounds = status.planned_rounds
    groups: dict[str, set[str]] = {}
    for reply in received(secure_report.output):
        groups.setdefault(f"{reply['query']} {reply['group']}", set()).add(str(reply["site"]))
    assert list(groups) == ["setup setup", "secure_advertise secure-setup-1", "secure_share secure-setup-2",
                            *(f"secure_{step} {k}-{step}" for k in range(1, rounds + 1) for step in ("upload", "reveal")),
                            "finish finish"]
    assert all(sites == {"site0", "site1", "site2"} for sites in groups.values())
    stats = [r for r in status.rounds if r.kinds]
    assert len(stats) == rounds
    summary = status.secure  # the secure sum's own account: who summed, under which threshold, each step
    assert summary is not None and summary["sites"] == ["site0", "site1", "site2"] and summary["threshold"] == 2
    assert summary["self_masks"] and summary["phases"] == summary["phases_run"] == rounds and not summary["failures"]
    assert summary["active"] == ["site0", "site1", "site2"] and summary["dropped"] == []  # fixed by phase 0
    assert [step["name"] for step in summary["steps"]][:2] == ["secure setup (advertise)", "secure setup (share)"]
    print(f"\nsecure job over 3 site runners: {status.seconds_per_round_trip:.2f} s per statistics round "
          f"(upload + reveal), {status.total_seconds:.1f} s in all, of which "
          f"{status.total_seconds - sum(r.seconds for r in status.rounds):.2f} s outside the job's rounds "
          "(the secure setup's two round trips and the ServerApp's start)")


def test_every_site_answered_only_signed_secure_steps(secure_federation: tuple[LocalFederation, SecureJobSpec],
                                                      secure_report: Secured) -> None:
    state, _ = secure_federation
    status = secure_report.status
    for index in range(len(state.sites)):
        mine = decisions(state, index, status.run_id)
        assert [d["message_type"] for d in mine] == ["query.setup", "query.secure_advertise", "query.secure_share"] \
            + ["query.secure_upload", "query.secure_reveal"] * status.planned_rounds + ["query.finish"]
        assert all(d["accepted"] for d in mine)


def test_every_reply_the_coordinator_received_is_in_its_sites_audit_log(
    secure_federation: tuple[LocalFederation, SecureJobSpec], secure_report: Secured
) -> None:
    """Byte for byte, over real processes: each digest in ``received.jsonl`` (the job's setup,
    the secure setup's advertisements and shares, the masked uploads, the reveals, finish) is
    a payload copy in the answering site's audit log, with an intent sent before it and an
    outcome after; a masked upload is recorded once (by the site agent that sealed it)."""
    state, _ = secure_federation
    homes = {site.name: site_home(state, index) for index, site in enumerate(state.sites)}
    replies = received(secure_report.output)
    assert {str(r["query"]) for r in replies} >= {"secure_advertise", "secure_share", "secure_upload", "secure_reveal"}
    for name, home in homes.items():
        records = read_records(home / "audit")
        intents = [r for r in records if isinstance(r, IntentRecord)]
        sent = {r.intent_seq for r in records if isinstance(r, OutcomeRecord) and r.status == "sent"}
        for reply in (r for r in replies if r["site"] == name):
            sha = str(reply["sha256"])
            copy = (home / "audit" / "payloads" / f"{sha}.bin").read_bytes()
            assert hashlib.sha256(copy).hexdigest() == sha and len(copy) == reply["bytes"], reply
            matching = [r for r in intents if r.payload.sha256 == sha]
            assert matching and all(r.seq in sent for r in matching), reply
            if reply["query"] == "secure_upload":
                assert len(matching) == 1, reply
            if reply["query"] == "secure_reveal":
                assert all("active ['site0', 'site1', 'site2'] and of the mask keys of dropped []" in r.purpose
                           for r in matching), reply


def test_a_plain_job_is_refused_by_sites_that_require_the_secure_sum(
    secure_federation: tuple[LocalFederation, SecureJobSpec], secure_report: Secured, tmp_path: Path
) -> None:
    state, _ = secure_federation
    with pytest.raises(FederationError, match="releases statistics only through the secure sum") as caught:
        launch(job(state, tmp_path / "plain", ["nce"]))
    assert set(caught.value.failures) == {str(site.node_id) for site in state.sites}
    assert not (tmp_path / "plain" / "report.json").exists()
