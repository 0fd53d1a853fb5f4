"""Real Flower processes on loopback: a SuperLink with TLS and node authentication, SuperNodes.

One federation of three site runners serves the module (started once, stopped in the
fixture's ``finally`` even when a test fails). Every site is a site agent driven by its
``site.toml`` (``--node-config 'site-file=...'``) whose data are precomputed features
(``[data] kind = "features"``), DP off; a job scores them as one ``site_features`` candidate.
It shows that such a job run over Flower equals ``fedmte.score`` on the pooled rows, that a SuperNode whose key was never registered
is refused, and that a Flower app bundle whose hash is not on the sites' allowlist is refused
at every site, visibly to the coordinator, without its client code ever running. A second,
small federation of stock ``flower-supernode`` sites shows the same ClientApp working when
Flower itself loads it from the bundle. The process tests are marked ``slow``; the
check of Flower's stock internals starts nothing and stay in the fast lane.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fedmte
from fedmte import flower_pin
from fedmte.cli import app
from fedmte.protocol.errors import FederationError
from fedmte.protocol.keys import load_private_key
from fedmte.server.coordinator import launch
from fedmte.server.job import JobSpec, job_from_dict
from fedmte.server.report import Report, RunStatus, read_report
from fedmte.trial.credentials import make_node_key
from fedmte.trial.local_federation import LocalFederation, down, free_port, online_nodes, up
from fedmte.trial.local_sites import write_site
from tests.datasets import DATASETS, site_split_without_class

DATA = DATASETS["basic"]
SCORERS = ["hscore", "leep", "gbc", "logme", "nce", "sfda"]
UNREGISTERED = b"Exit Code: 305"  # flwr's code when the SuperLink refuses to activate a SuperNode
SITE_FEATURES = "site-features"
"""The candidate that scores the features each site holds ([data] kind = "features")."""


def site_files(directory: Path, rows: list[np.ndarray]) -> list[Path]:
    """One ``.npz`` of precomputed features per site (``features``, ``labels``, ``source_probs``)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, idx in enumerate(rows):
        path = directory / f"site{k}.npz"
        np.savez(path, features=DATA.features[idx], labels=DATA.labels[idx], source_probs=DATA.source_probs[idx])
        paths.append(path)
    return paths


def job(state: LocalFederation, output: Path, scorers: list[str], *, min_sites: int | None = None,
        round_timeout: float = 90, secure: dict[str, object] | None = None) -> JobSpec:
    """A job that scores the sites' own features (one ``site_features`` candidate), DP off."""
    document: dict[str, object] = {
        "connection": state.connection, "output": str(output), "labels": list(state.labels),
        "purpose": "flower federation test", "candidates": [{"name": SITE_FEATURES, "site_features": True}],
        "scorers": scorers, "privacy": {"dp": False},
        "federation": {"flwr_home": state.flwr_home, "coordinator_key": state.coordinator_key,
                       "min_sites": min_sites or len(state.sites), "round_timeout": round_timeout, "run_timeout": 300},
    }
    if secure is not None:
        document["secure"] = secure
    return job_from_dict(document)


def site_home(state: LocalFederation, index: int) -> Path:
    """The site's folder: its site.toml, data, audit log and the runner's decision log."""
    return Path(state.sites[index].site_file).parent


def decisions(state: LocalFederation, index: int, run_id: int | None = None) -> list[dict[str, object]]:
    """What site ``index``'s runner decided for each message (of run ``run_id``, if given)."""
    lines = (site_home(state, index) / "decisions.jsonl").read_text().splitlines()
    return [d for d in map(json.loads, lines) if run_id is None or d["run_id"] == run_id]


def received(output: Path) -> list[dict[str, object]]:
    """``received.jsonl``: the coordinator's digest of every reply it received."""
    return [json.loads(line) for line in (output / "received.jsonl").read_text().splitlines()]


def site_features_scores(report: Report) -> dict[str, float]:
    [model] = [m for m in report.models if m.name == SITE_FEATURES]
    return dict(model.scores)


@dataclass(frozen=True)
class Scored:
    status: RunStatus
    report: Report
    output: Path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("federation")
    data = site_files(root / "data", site_split_without_class(DATA, absent=0, sites=3))
    state = up(root / "local", 3, data=data, runner="site", dp=False)
    try:
        yield state
    finally:
        down(Path(state.directory))


@pytest.fixture(scope="module")
def scoring_report(federation: LocalFederation, tmp_path_factory: pytest.TempPathFactory) -> Scored:
    output = tmp_path_factory.mktemp("reports")
    status = launch(job(federation, output, SCORERS))
    return Scored(status, read_report(output / "report.json"), output)


@pytest.mark.slow  # starts a SuperLink and SuperNodes
def test_federated_scores_equal_pooled_scores(scoring_report: Scored) -> None:
    pooled = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS)
    assert scoring_report.status.status == "finished" and scoring_report.status.sites == 3
    assert [s.name for s in scoring_report.report.sites] == ["site0", "site1", "site2"]
    assert list(scoring_report.report.scorers) == SCORERS
    scores = site_features_scores(scoring_report.report)
    for name in SCORERS:
        assert scores[name] == pytest.approx(pooled[name], rel=1e-6), name
    assert not scoring_report.report.privacy.secure_sum and not scoring_report.report.privacy.dp_applied


@pytest.mark.slow  # starts a SuperLink and SuperNodes
def test_rounds_are_one_setup_plus_the_planned_rounds(scoring_report: Scored) -> None:
    status = scoring_report.status
    stats_rounds = [r for r in status.rounds if r.kinds]
    assert status.planned_rounds == len(stats_rounds) == 4  # centring + sfda's three rounds
    assert [r.name for r in status.rounds] == ["setup", *(f"round {k}" for k in range(1, 5)), "finish"]
    print(f"\nseconds per round trip (3 site runners, loopback, TLS): {status.seconds_per_round_trip:.2f}; "
          + ", ".join(f"{r.name} {r.seconds:.2f}" for r in status.rounds))


@pytest.mark.slow  # starts a SuperLink and SuperNodes
def test_every_site_ran_the_job_and_recorded_it(federation: LocalFederation, scoring_report: Scored) -> None:
    installed = flower_pin.installed_fab_hash()
    status = scoring_report.status
    replies = received(scoring_report.output)
    for index, site in enumerate(federation.sites):
        mine = decisions(federation, index, status.run_id)
        assert [d["message_type"] for d in mine] == ["query.setup"] + ["query.stats"] * status.planned_rounds \
            + ["query.finish"]
        assert all(d["accepted"] and d["fab_hash"] == installed for d in mine)
        assert [r["query"] for r in replies if r["node"] == site.node_id] == \
            ["setup"] + ["stats"] * status.planned_rounds + ["finish"]


@pytest.mark.slow  # starts a SuperLink and SuperNodes
def test_an_unregistered_supernode_is_refused(federation: LocalFederation, tmp_path: Path) -> None:
    keys = make_node_key(tmp_path, "stranger")
    arrays = {"features": DATA.features[:10], "labels": DATA.labels[:10]}
    site_file = write_site(tmp_path / "stranger-site", "stranger", arrays, federation.labels,
                           coordinator=load_private_key(federation.coordinator_key), dp=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "fedmte.client.site_runner", "--root-certificates", federation.ca_cert,
         "--superlink", federation.address, "--auth-supernode-private-key", str(keys.private_key),
         "--port", str(free_port()), "--node-config", f'site-file="{site_file}"'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0, output.decode(errors="replace")[-2000:]
    assert UNREGISTERED in output and b"Failed to activate SuperNode" in output
    assert online_nodes(federation.env()) == {site.node_id for site in federation.sites}


@pytest.mark.slow  # starts a SuperLink and SuperNodes
def test_a_bundle_with_modified_client_code_is_refused_at_every_site(
    federation: LocalFederation, scoring_report: Scored, tmp_path: Path
) -> None:
    marker = tmp_path / "modified-code-ran"
    tampered = tmp_path / "tampered"
    shutil.copytree(flower_pin.FAB_DIR, tampered)
    pyproject = tampered / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"fedmte.client.flower_app:app"', '"sneaky_client:app"'))
    (tampered / "sneaky_client.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "import fedmte.client.flower_app\n"
        "app = fedmte.client.flower_app.app\n"
    )
    with pytest.raises(FederationError, match="not on this site's allowlist") as caught:
        launch(job(federation, tmp_path / "report", ["nce"]), fab_dir=tampered)
    assert set(caught.value.failures) == {str(site.node_id) for site in federation.sites}
    assert all("refused by site" in reason for reason in caught.value.failures.values())
    time.sleep(0.5)
    assert not marker.exists()
    installed = flower_pin.installed_fab_hash()
    for index in range(len(federation.sites)):
        refused = [d for d in decisions(federation, index) if not d["accepted"]]
        assert refused and refused[-1]["fab_hash"] != installed


def test_flower_internals_are_the_stock_ones_before_tuning() -> None:
    # The one pin (fedmte.flower_pin, tests/test_flower_pin.py) names the internals; here: the
    # stock values the site runner's and the ServerApp's tuning start from, in this process.
    flower_pin.check_flwr_internals()
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal

    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 1  # stock, before tuning
    assert start_client_internal.time is time  # the module the SuperNode loop sleeps through


@pytest.mark.slow  # fedmte local up --stock, fedmte run, fedmte local down
def test_cli_runs_a_job_on_stock_supernodes(tmp_path: Path) -> None:
    """``fedmte local up --stock --no-dp --data FEATURES.npz``, ``fedmte run JOB.toml``,
    ``fedmte local down``: stock SuperNodes load the same ClientApp from the bundle themselves,
    and their site agents (features-kind site files) score the sites' own features."""
    pooled_file = tmp_path / "pooled.npz"
    np.savez(pooled_file, features=DATA.features, labels=DATA.labels, source_probs=DATA.source_probs)
    directory = tmp_path / "stock"
    runner = CliRunner()
    started = runner.invoke(app, ["local", "up", "--sites", "2", "--dir", str(directory), "--stock", "--no-dp",
                                  "--data", str(pooled_file)])
    try:
        assert started.exit_code == 0, started.output + repr(started.exception)
        assert "2 site(s) online, runner: stock" in started.output
        job_file = directory / "job.toml"
        text = job_file.read_text()
        assert 'labels = ["0", "1", "2", "3"]' in text and "site_features = true" in text
        assert 'scorers = ["hscore", "gbc", "logme", "nce"]' in text
        job_file.write_text(text.replace('scorers = ["hscore", "gbc", "logme", "nce"]', 'scorers = ["nce", "logme"]'))
        result = runner.invoke(app, ["run", str(job_file)])
    finally:
        stopped = runner.invoke(app, ["local", "down", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    assert stopped.exit_code == 0 and "stopped 3 process(es)" in stopped.output, stopped.output
    report = read_report(directory / "report" / "report.json")
    scores = site_features_scores(report)
    pooled = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=["nce", "logme"])
    for name, value in pooled.items():
        assert scores[name] == pytest.approx(value, rel=1e-6), name
    assert f"{scores['nce']:.6g}" in result.output
    status = RunStatus.model_validate_json((directory / "report" / "run.json").read_text())
    print(f"\nseconds per round trip (2 stock SuperNodes): {status.seconds_per_round_trip:.2f}")
    with pytest.raises(FederationError, match="no local federation"):
        down(directory)
