"""Real Flower processes on loopback: a SuperLink with TLS and node authentication, SuperNodes.

One federation of three site runners serves the module (started once, stopped in the
fixture's ``finally`` even when a test fails). It shows that a scoring job run over Flower
equals ``fedmte.score`` on the pooled rows, that a SuperNode whose key was never registered
is refused, and that a Flower app bundle whose hash is not on the sites' allowlist is refused
at every site, visibly to the coordinator, without its client code ever running. A second,
small federation of stock ``flower-supernode`` sites shows the same ClientApp working when
Flower itself loads it from the bundle.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fedmte
from fedmte.cli import app
from fedmte.client import site_runner
from fedmte.protocol.errors import FederationError
from fedmte.server import flower_exchange
from fedmte.server.job_runner import FAB_DIR, JobFile, JobReport, launch
from fedmte.trial.credentials import make_node_key
from fedmte.trial.local_federation import LocalFederation, down, free_port, online_nodes, up
from tests.datasets import DATASETS, site_split_without_class

DATA = DATASETS["basic"]
SCORERS = ["hscore", "leep", "gbc", "logme", "nce", "sfda"]
UNREGISTERED = b"Exit Code: 305"  # flwr's code when the SuperLink refuses to activate a SuperNode


def site_files(directory: Path, rows: list[np.ndarray]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, idx in enumerate(rows):
        path = directory / f"site{k}.npz"
        np.savez(path, features=DATA.features[idx], labels=DATA.labels[idx], source_probs=DATA.source_probs[idx])
        paths.append(path)
    return paths


def job(state: LocalFederation, out: Path, scorers: list[str]) -> JobFile:
    return JobFile(
        connection=state.connection, flwr_home=Path(state.flwr_home), out=out, num_classes=DATA.num_classes,
        scorers=scorers, min_sites=len(state.sites), round_timeout=90, run_timeout=300,
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("federation")
    data = site_files(root / "data", site_split_without_class(DATA, absent=0, sites=3))
    state = up(root / "local", 3, data=data, runner="site")
    try:
        yield state
    finally:
        down(Path(state.directory))


@pytest.fixture(scope="module")
def scoring_report(federation: LocalFederation, tmp_path_factory: pytest.TempPathFactory) -> JobReport:
    return launch(job(federation, tmp_path_factory.mktemp("reports") / "report.json", SCORERS))


@pytest.mark.slow  # starts a SuperLink and SuperNodes
def test_federated_scores_equal_pooled_scores(scoring_report: JobReport) -> None:
    pooled = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS)
    assert scoring_report.status == "finished" and scoring_report.sites == 3
    assert list(scoring_report.scores) == SCORERS
    for name in SCORERS:
        assert scoring_report.scores[name] == pytest.approx(pooled[name], rel=1e-6), name


@pytest.mark.slow  # starts a SuperLink and SuperNodes
def test_rounds_are_one_setup_plus_the_planned_rounds(scoring_report: JobReport) -> None:
    stats_rounds = [r for r in scoring_report.rounds if r.kinds]
    assert len(scoring_report.rounds) == 1 + scoring_report.planned_rounds
    assert len(stats_rounds) == scoring_report.planned_rounds == 4  # centring + sfda's three rounds
    print(f"\nseconds per round trip (3 site runners, loopback, TLS): {scoring_report.seconds_per_round_trip:.2f}; "
          + ", ".join(f"{r.name} {r.seconds:.2f}" for r in scoring_report.rounds))


@pytest.mark.slow  # starts a SuperLink and SuperNodes
def test_every_site_ran_the_job_and_recorded_it(federation: LocalFederation, scoring_report: JobReport) -> None:
    installed = site_runner.installed_fab_hash()
    for site in federation.sites:
        decisions = [json.loads(line) for line in (Path(site.data).parent / "decisions.jsonl").read_text().splitlines()]
        mine = [d for d in decisions if d["run_id"] == scoring_report.run_id]
        assert [d["message_type"] for d in mine] == ["query.describe"] + ["query.stats"] * scoring_report.planned_rounds
        assert all(d["accepted"] and d["fab_hash"] == installed for d in mine)


@pytest.mark.slow  # starts a SuperLink and SuperNodes
def test_an_unregistered_supernode_is_refused(federation: LocalFederation, tmp_path: Path) -> None:
    keys = make_node_key(tmp_path, "stranger")
    data = site_files(tmp_path / "data", [np.arange(10)])[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "fedmte.client.site_runner", "--root-certificates", federation.ca_cert,
         "--superlink", federation.address, "--auth-supernode-private-key", str(keys.private_key),
         "--port", str(free_port()), "--node-config", f'data-path="{data}"'],
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
    federation: LocalFederation, scoring_report: JobReport, tmp_path: Path
) -> None:
    marker = tmp_path / "modified-code-ran"
    tampered = tmp_path / "tampered"
    shutil.copytree(FAB_DIR, tampered)
    pyproject = tampered / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"fedmte.client.flower_app:app"', '"sneaky_client:app"'))
    (tampered / "sneaky_client.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "import fedmte.client.flower_app\n"
        "app = fedmte.client.flower_app.app\n"
    )
    with pytest.raises(FederationError, match="not on this site's allowlist") as caught:
        launch(job(federation, tmp_path / "report.json", ["nce"]), fab_dir=tampered)
    assert set(caught.value.failures) == {str(site.node_id) for site in federation.sites}
    assert all("refused by site" in reason for reason in caught.value.failures.values())
    time.sleep(0.5)
    assert not marker.exists()
    installed = site_runner.installed_fab_hash()
    for site in federation.sites:
        decisions = [json.loads(line) for line in (Path(site.data).parent / "decisions.jsonl").read_text().splitlines()]
        refused = [d for d in decisions if not d["accepted"]]
        assert refused and refused[-1]["fab_hash"] != installed


def test_flower_internals_are_the_pinned_ones() -> None:
    # Fails when flwr changes: the site runner and the ServerApp's backoff tuning reach into
    # the modules below, and both refuse to start on another version.
    site_runner.check_flwr_internals()
    flower_exchange.check_flwr_internals()
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal

    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 1  # stock, before tuning
    assert start_client_internal.time is time  # the module the SuperNode loop sleeps through


def test_a_different_flower_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(site_runner.FlowerVersionError, match="pinned to flwr==1.42.0, found 1.43.0"):
        site_runner.check_flwr_internals()
    with pytest.raises(FederationError, match="pinned to flwr==1.42.0, found 1.43.0"):
        flower_exchange.check_flwr_internals()


@pytest.mark.slow  # fedmte local up --stock, fedmte run, fedmte local down
def test_cli_runs_a_job_on_stock_supernodes(tmp_path: Path) -> None:
    """``fedmte local up --stock``, ``fedmte run JOB.toml``, ``fedmte local down``: stock
    SuperNodes load the same ClientApp from the bundle themselves."""
    pooled_file = tmp_path / "pooled.npz"
    np.savez(pooled_file, features=DATA.features, labels=DATA.labels, source_probs=DATA.source_probs)
    directory = tmp_path / "stock"
    runner = CliRunner()
    started = runner.invoke(app, ["local", "up", "--sites", "2", "--dir", str(directory), "--stock",
                                  "--data", str(pooled_file)])
    try:
        assert started.exit_code == 0, started.output
        assert "2 site(s) online, runner: stock" in started.output
        job_file = directory / "job.toml"
        text = job_file.read_text()
        assert f"num_classes = {DATA.num_classes}" in text
        job_file.write_text(text.replace('scorers = ["hscore", "leep", "gbc"]', 'scorers = ["nce", "logme"]'))
        result = runner.invoke(app, ["run", str(job_file)])
    finally:
        stopped = runner.invoke(app, ["local", "down", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    assert stopped.exit_code == 0 and "stopped 3 process(es)" in stopped.output, stopped.output
    report = JobReport.model_validate_json((directory / "report.json").read_text())
    pooled = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=["nce", "logme"])
    for name, value in pooled.items():
        assert report.scores[name] == pytest.approx(value, rel=1e-6), name
    assert f"{report.scores['nce']:.6g}" in result.output
    print(f"\nseconds per round trip (2 stock SuperNodes): {report.seconds_per_round_trip:.2f}")
    with pytest.raises(FederationError, match="no local federation"):
        down(directory)
