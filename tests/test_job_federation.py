"""Multi-model scoring jobs over real Flower processes: a SuperLink with TLS and node
authentication on loopback, three site runners whose SuperNodes point at site files.

One federation serves the module (stopped in the fixture's ``finally``). Its sites hold raw
6-wide vectors; every candidate model travels as a signed package and runs at the sites. DP
is off in the sites' policies, so the federated scores must equal ``fedmte.score`` on the
pooled features that ``fedmte features`` gives at each site. Site 1's policy does not allow
the scorer ``ped``; site 2's allows features at most 20 wide, so it refuses ``too-wide``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedmte.cli import app
from fedmte.client.audit_log import read_records
from fedmte.protocol.audit_format import IntentRecord, RefusalRecord
from fedmte.protocol.errors import FederationError
from fedmte.protocol.scorers import SCORERS
from fedmte.server.coordinator import load_coordinator_key, run_job
from fedmte.server.job import JobSpec, job_from_dict
from fedmte.server.report import RunStatus, read_status
from fedmte.server.report import Report, read_report
from fedmte.trial.local_federation import LocalFederation, down, up
from fedmte.client.site_config import load_site_config, toml_text
from fedmte.trial.local_sites import example_packages
from tests.job_helpers import LABELS, MODELS, SCORERS as JOB_SCORERS, SOURCE_SCORERS, pooled_reference, site_arrays

pytestmark = pytest.mark.slow  # starts a SuperLink and SuperNodes

ACCEPTED = ["tanh-head", "gelu-head", "tanh-nohead", "gelu-deep"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("job-federation")
    files = []
    for k, arrays in enumerate(site_arrays(3)):
        files.append(root / f"site{k}.npz")
        np.savez(files[-1], **arrays)
    policies = {1: {"allowed_scorers": sorted(set(SCORERS) - {"ped"})}, 2: {"max_feature_dim": 20}}
    state = up(root / "local", 3, data=files, runner="site", dp=False, policies=policies)
    try:
        yield state
    finally:
        down(Path(state.directory))


@pytest.fixture(scope="module")
def packages(federation: LocalFederation) -> dict[str, Path]:
    assert federation.coordinator_key is not None
    key = load_coordinator_key(Path(federation.coordinator_key))
    return example_packages(Path(federation.directory) / "models", key, 6, MODELS)


def make_job(federation: LocalFederation, packages: dict[str, Path], output: Path, candidates: list[str],
             scorers: list[str] = JOB_SCORERS) -> JobSpec:
    return job_from_dict({
        "connection": federation.connection, "output": str(output), "labels": LABELS, "purpose": "federation test",
        "candidates": [{"name": c, "path": str(packages[c])} for c in candidates], "scorers": scorers,
        "constraints": {"licenses": ["Apache-2.0"], "action": "flag"},
        "federation": {"flwr_home": federation.flwr_home, "coordinator_key": federation.coordinator_key,
                       "min_sites": 3, "round_timeout": 120, "run_timeout": 300},
    })


@pytest.fixture(scope="module")
def main_job(federation: LocalFederation, packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Report, Path, float]:
    output = tmp_path_factory.mktemp("main-job")
    start = time.perf_counter()
    report = run_job(make_job(federation, packages, output, list(MODELS)))
    return report, output, time.perf_counter() - start


def status(output: Path) -> RunStatus:
    return read_status(output / "run.json")


def test_federated_scores_equal_fedmte_score_on_pooled_features(
    federation: LocalFederation, packages: dict[str, Path], main_job: tuple[Report, Path, float], tmp_path: Path
) -> None:
    report, output, seconds = main_job
    by_name = {m.name: m for m in report.models}
    site_files = [Path(s.site_file) for s in federation.sites if s.site_file]
    assert len(site_files) == 3 and [s.name for s in report.sites] == ["site0", "site1", "site2"]
    for name in ACCEPTED:
        scorers = [s for s in JOB_SCORERS if MODELS[name]["num_source_classes"] or s not in SOURCE_SCORERS]
        pooled = pooled_reference(site_files, packages[name], scorers, tmp_path)
        assert set(by_name[name].scores) == set(scorers), by_name[name].failures
        for scorer in scorers:
            assert by_name[name].scores[scorer] == pytest.approx(pooled[scorer], rel=1e-6), (name, scorer)
    assert not report.privacy.secure_sum and not report.privacy.dp_applied
    rounds = status(output).rounds
    print(f"\n3 sites x {len(MODELS)} candidates over Flower: {seconds:.1f} s end to end; "
          + ", ".join(f"{r.name} {r.seconds:.2f} s" for r in rounds))


def test_the_sites_measured_costs_drive_the_constraints(main_job: tuple[Report, Path, float]) -> None:
    report, _, _ = main_job
    by_name = {m.name: m for m in report.models}
    deep = by_name["gelu-deep"]
    assert deep.status == "flagged" and [v.rule for v in deep.violations] == ["licenses"]
    assert "gelu-deep" not in report.recommendation
    for name in ACCEPTED:
        meta = by_name[name].metadata
        assert set(meta.sites) == {"site0", "site1", "site2"} and meta.latency_ms is not None
        assert meta.manifest_sha256 is not None and meta.architecture == "mlp"


def test_a_model_one_site_refuses_is_reported_with_the_rule_and_site(
    federation: LocalFederation, main_job: tuple[Report, Path, float]
) -> None:
    report, output, _ = main_job
    wide = next(m for m in report.models if m.name == "too-wide")
    assert not wide.scores and wide.failures
    assert all(reason.startswith("refused by site2 [max_feature_dim]") for reason in wide.failures.values())
    assert any("too-wide" in note and "max_feature_dim" in note for note in report.notes)
    html = (output / "report.html").read_text()
    assert "too-wide" in html and "max_feature_dim" in html
    site2 = Path(federation.sites[2].site_file or "").parent
    run_id = str(status(output).run_id)
    assert any(r.rule == "max_feature_dim" and r.run_id == run_id
               for r in read_records(site2 / "audit") if isinstance(r, RefusalRecord))


def test_a_scorer_one_site_forbids_is_left_out_naming_the_site_and_rule(
    federation: LocalFederation, packages: dict[str, Path], tmp_path: Path
) -> None:
    job = make_job(federation, packages, tmp_path / "denied", ["gelu-head"], scorers=["ped", "hscore"])
    report = run_job(job)  # the job runs with the scorers every site allows
    (model,) = [m for m in report.models if m.name == "gelu-head"]
    assert set(model.scores) == {"hscore"}
    assert "[allowed_scorers] scorer(s) ['ped'] are not allowed here" in model.failures["ped"]
    assert any(note.startswith("ped was left out") for note in report.notes)
    # every scorer refused somewhere: the job cannot run, and the error names the rule
    job = make_job(federation, packages, tmp_path / "denied-all", ["gelu-head"], scorers=["ped"])
    with pytest.raises(FederationError, match="allowed_scorers") as caught:
        run_job(job)
    site1 = federation.sites[1]
    assert set(caught.value.failures) == {str(site1.node_id)}


def test_the_round_count_does_not_depend_on_the_number_of_models(
    federation: LocalFederation, packages: dict[str, Path], main_job: tuple[Report, Path, float], tmp_path: Path
) -> None:
    _, output, _ = main_job
    many = status(output)
    # this one through the CLI, from a job file: fedmte run JOB.toml
    job = make_job(federation, packages, tmp_path / "single", ["gelu-head"])
    job_file = tmp_path / "job.toml"
    job_file.write_text(toml_text(job.model_dump(mode="json", exclude_none=True)))
    result = CliRunner().invoke(app, ["run", str(job_file)])
    assert result.exit_code == 0, result.output
    assert "gelu-head" in result.output and "4 statistics rounds" in result.output
    single = read_report(tmp_path / "single" / "report.json")
    one = status(tmp_path / "single")
    stats_many = [r.name for r in many.rounds if r.kinds]
    stats_one = [r.name for r in one.rounds if r.kinds]
    assert stats_many == stats_one == ["round 1", "round 2", "round 3", "round 4"]
    assert many.planned_rounds == one.planned_rounds == 4
    # the packages were staged by the first job, so no weights travel: setup, 4 rounds, finish
    assert [r.name for r in one.rounds] == ["setup", *stats_one, "finish"]
    assert [r.name for r in many.rounds] == ["setup", "setup (weights)", *stats_many, "finish"]
    assert single.models[0].name == "gelu-head" and single.models[0].scores
    print(f"\nseconds per statistics round: {many.seconds_per_round_trip:.2f} (4 models), "
          f"{one.seconds_per_round_trip:.2f} (1 model)")


def test_every_byte_a_site_sent_has_its_audit_record_and_payload_copy(
    federation: LocalFederation, main_job: tuple[Report, Path, float]
) -> None:
    _, output, _ = main_job
    run_id = str(status(output).run_id)
    received = [json.loads(line) for line in (output / "received.jsonl").read_text().splitlines()]
    assert {r["query"] for r in received} == {"setup", "stats", "finish"}
    for site in federation.sites:
        audit = Path(site.site_file or "").parent / "audit"
        got = [r for r in received if r["node"] == site.node_id]
        intents = [r for r in read_records(audit) if isinstance(r, IntentRecord) and r.run_id == run_id]
        assert len(got) == 2 + 4 + 1  # setup, setup with weights, four rounds, finish
        assert Counter(r.payload.sha256 for r in intents) == Counter(r["sha256"] for r in got)
        sizes = {r["sha256"]: r["bytes"] for r in got}
        for record in intents:
            copy = (audit / "payloads" / f"{record.payload.sha256}.bin").read_bytes()
            assert len(copy) == record.payload.bytes == sizes[record.payload.sha256]


def test_fedmte_audit_verify_passes_at_every_site_with_the_coordinators_witness(
    federation: LocalFederation, main_job: tuple[Report, Path, float]
) -> None:
    _, output, _ = main_job
    runner = CliRunner()
    for site in federation.sites:
        home = Path(site.site_file or "").parent
        witness = output / "witnesses" / f"{site.name}.txt"
        assert witness.is_file()
        result = runner.invoke(app, ["audit", "verify", str(home / "audit"), "--witness", str(witness),
                                     "--ledger", str(home / "ledger")])
        assert result.exit_code == 0, result.output
        decisions = [json.loads(line) for line in (home / "decisions.jsonl").read_text().splitlines()]
        assert all(d["accepted"] for d in decisions if d["run_id"] == status(output).run_id)


def test_a_secure_job_equals_pooled_scores_and_says_the_secure_sum_was_on(
    federation: LocalFederation, packages: dict[str, Path], main_job: tuple[Report, Path, float], tmp_path: Path
) -> None:
    # `fedmte local up` put a [secure] table in each site file; its example job carries [secure]
    assert federation.secure is not None and sorted(federation.secure.roster) == ["site0", "site1", "site2"]
    configs = [load_site_config(s.site_file) for s in federation.sites]
    assert all(c.secure is not None and c.secure.roster == federation.secure.roster for c in configs)
    assert all(not (Path(s.site_file).parent / "secure.toml").exists() for s in federation.sites)
    names = ["tanh-head", "gelu-head"]
    scorers = ["hscore", "leep", "gbc", "logme"]
    job = make_job(federation, packages, tmp_path / "secure", names, scorers=scorers)
    report = run_job(job.model_copy(update={"secure": federation.secure}))
    assert report.privacy.secure_sum
    assert all(s.masked for site in report.sites for s in site.statistics)
    assert not any("plain sum" in note for note in report.notes)
    received = {json.loads(line)["query"] for line in (tmp_path / "secure" / "received.jsonl").read_text().splitlines()}
    assert "stats" not in received and {"secure_advertise", "secure_share", "secure_upload", "secure_reveal"} <= received
    site_files = [Path(s.site_file) for s in federation.sites if s.site_file]
    by_name = {m.name: m for m in report.models}
    for name in names:
        pooled = pooled_reference(site_files, packages[name], scorers, tmp_path)
        for scorer in scorers:
            assert by_name[name].scores[scorer] == pytest.approx(pooled[scorer], rel=1e-6), (name, scorer)
