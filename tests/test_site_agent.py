"""Multi-model scoring jobs against site agents, in process (no Flower: see test_job_federation.py).

Three sites, each a site file with its own data, its one list of trusted coordinator keys
(``[trust.coordinators]``), policy, audit log and cache; the site agent opens and closes per
message, as under a stock SuperNode. The coordinator is
:func:`fedmte.server.coordinator.execute_job`. Site 1's policy does not allow the scorer
``ped``; site 2's allows features at most 20 wide, so it refuses the candidate ``too-wide``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedmte.cli import app
from fedmte.client import site_agent
from fedmte.client.audit_log import read_records
from fedmte.client.secure_site import SecureSite, _agent_audit, agent_statistics, secure_config
from fedmte.client.site_config import load_site_config
from fedmte.protocol import dp
from fedmte.protocol.audit_format import IntentRecord, RefusalRecord
from fedmte.protocol.errors import FederationError, ProtocolError, RefusalError, VerificationError
from fedmte.protocol.job_messages import SETUP, JobRoundRequest, encode_job_round, parse_setup, setup_payload
from fedmte.protocol.keys import fingerprint, public_key_text
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers import SCORERS
from fedmte.protocol.secure_rounds import AdvertiseBody, DeclaredBounds, Envelope, sign_request
from fedmte.protocol.secure_sum import SecureSumParams
from fedmte.protocol.wire import SECURE_ADVERTISE, STATS, Payload
from fedmte.server.coordinator import (
    JobOutcome,
    SetupRequest,
    build_job_report,
    execute_job,
    load_candidates,
    sign_setup,
)
from fedmte.server.job import JobSpec, job_from_dict
from fedmte.trial.local_sites import coordinator_key, example_packages, provision, write_site
from tests.job_helpers import LABELS, MODELS, SCORERS as JOB_SCORERS, SOURCE_SCORERS, AgentExchange, pooled_reference, site_arrays

ACCEPTED = ["tanh-head", "gelu-head", "tanh-nohead", "gelu-deep"]


class World:
    def __init__(self, root: Path, *, dp: bool = False, sites: int = 3) -> None:
        self.root = root
        self.key, self.key_path = coordinator_key(root / "coordinator")
        self.packages = example_packages(root / "models", self.key, 6, MODELS)
        policies = {1: {"allowed_scorers": sorted(set(SCORERS) - {"ped"})}, 2: {"max_feature_dim": 20}}
        self.site_files = [
            write_site(root / f"site{k}", f"site{k}", arrays, LABELS, coordinator=self.key, dp=dp,
                       clip_norm=None if not dp else 5.0, policy=policies.get(k))
            for k, arrays in enumerate(site_arrays(sites))
        ]

    def job(self, candidates: list[str], scorers: list[str] = JOB_SCORERS, **extra: object) -> JobSpec:
        return job_from_dict({"connection": "local", "labels": LABELS, "scorers": scorers, "purpose": "unit test",
                              "candidates": [{"name": c, "path": str(self.packages[c])} for c in candidates],
                              "output": str(self.root / "out"), **extra})

    def run(self, job: JobSpec, run_id: str, key: Ed25519PrivateKey | None = None) -> tuple[JobOutcome, AgentExchange]:
        exchange = AgentExchange(self.site_files, run_id)
        return execute_job(exchange, job, load_candidates(job), key or self.key, run_id=run_id), exchange


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("sites"))


@pytest.fixture(scope="module")
def first_job(world: World) -> tuple[JobOutcome, AgentExchange]:
    return world.run(world.job(list(MODELS)), "101")


def test_federated_scores_equal_pooled_features(world: World, first_job: tuple[JobOutcome, AgentExchange],
                                                tmp_path: Path) -> None:
    outcome, _ = first_job
    report = build_job_report(world.job(list(MODELS)), outcome)
    by_name = {m.name: m for m in report.models}
    for name in ACCEPTED:
        scorers = [s for s in JOB_SCORERS if MODELS[name]["num_source_classes"] or s not in SOURCE_SCORERS]
        pooled = pooled_reference(world.site_files, world.packages[name], scorers, tmp_path)
        assert set(by_name[name].scores) == set(scorers), by_name[name].failures
        for scorer in scorers:
            assert by_name[name].scores[scorer] == pytest.approx(pooled[scorer], rel=1e-6), (name, scorer)
    assert any("asked for DP, but the policies of site0, site1, site2 release exact sums" in n for n in report.notes)
    no_head = by_name["tanh-nohead"].failures
    assert set(no_head) == SOURCE_SCORERS and "no source classifier head" in no_head["leep"]
    # the sites measured each model's cost and the ranking saw it (no row counts travel)
    meta = by_name["gelu-head"].metadata
    assert set(meta.sites) == {"site0", "site1", "site2"} and meta.latency_ms is not None and meta.latency_ms > 0
    assert meta.parameter_count == 6 * 12 + 12 + 12 * 5 + 5 and meta.license == "Apache-2.0"


def test_a_model_a_site_refuses_is_left_out_with_the_rule_named(world: World,
                                                               first_job: tuple[JobOutcome, AgentExchange]) -> None:
    outcome, _ = first_job
    wide = next(r for r in outcome.models.values() if r.package.label == "too-wide")
    assert wide.run is None and wide.result is None
    assert len(wide.refusals) == 1 and wide.refusals[0].startswith("refused by site2 [max_feature_dim]")
    assert "feature dimension 24 exceeds this site's maximum 20" in wide.refusals[0]
    report = build_job_report(world.job(list(MODELS)), outcome)
    row = next(m for m in report.models if m.name == "too-wide")
    assert not row.scores and all("[max_feature_dim]" in reason for reason in row.failures.values())
    site2 = next(s for s in report.sites if s.name == "site2")
    assert any(r.startswith("too-wide: [max_feature_dim]") for r in site2.refusals)
    refusals = [r for r in read_records(world.site_files[2].parent / "audit") if isinstance(r, RefusalRecord)]
    assert any(r.rule == "max_feature_dim" and r.run_id == "101" for r in refusals)


def test_rounds_do_not_depend_on_the_number_of_models(world: World, first_job: tuple[JobOutcome, AgentExchange]) -> None:
    outcome, exchange = first_job
    one, one_exchange = world.run(world.job(["gelu-head"]), "102")
    stats_many = [group for query, group in exchange.sent if query == STATS]
    stats_one = [group for query, group in one_exchange.sent if query == STATS]
    assert len(stats_many) == len(stats_one) == outcome.planned_rounds == one.planned_rounds == 4
    # four models in the first job, one here: one message per site per round either way
    assert len([r for r in outcome.rounds if r.kinds]) == len([r for r in one.rounds if r.kinds]) == 4
    # every package was staged by the first job: no weights travel again
    assert [q for q, _ in one_exchange.sent].count(SETUP) == 1
    assert [q for q, _ in exchange.sent].count(SETUP) == 2


def test_every_byte_a_site_sent_has_its_audit_record_and_payload_copy(
    world: World, first_job: tuple[JobOutcome, AgentExchange]
) -> None:
    outcome, _ = first_job
    for node, site_file in zip(sorted(outcome.sites), world.site_files, strict=True):
        received = Counter(r.sha256 for r in outcome.receipts if r.node == node)
        sizes = {r.sha256: r.nbytes for r in outcome.receipts if r.node == node}
        intents = [r for r in read_records(site_file.parent / "audit") if isinstance(r, IntentRecord) and r.run_id == "101"]
        assert Counter(r.payload.sha256 for r in intents) == received
        assert len(received) >= 1 + 1 + 4 + 1  # setup twice, four rounds, finish
        for record in intents:
            copy = (site_file.parent / "audit" / "payloads" / f"{record.payload.sha256}.bin").read_bytes()
            assert len(copy) == record.payload.bytes == sizes[record.payload.sha256]
        stats_intents = [r for r in intents if r.statistics]
        assert len(stats_intents) == 4 and all(r.privacy is not None and r.privacy.mechanism == "none" for r in stats_intents)


def test_a_scorer_the_policy_denies_is_left_out_with_its_rule_and_the_rest_runs(world: World) -> None:
    outcome, _ = world.run(world.job(["gelu-head"], scorers=["ped", "hscore"]), "103")
    (record,) = outcome.models.values()
    assert record.result is not None and set(record.result.scores) == {"hscore"}  # the allowed scorer still runs
    assert "refused by site1 [allowed_scorers] scorer(s) ['ped'] are not allowed here" in record.failures["ped"]
    assert any("ped was left out" in note and "site1" in note for note in outcome.notes)
    refusals = [r for r in read_records(world.site_files[1].parent / "audit") if isinstance(r, RefusalRecord)]
    assert refusals[-1].run_id == "103" and refusals[-1].rule == "scorers" and "ped" in refusals[-1].message
    # a job whose every scorer a site refuses cannot run at all: refused at setup, naming each
    with pytest.raises(FederationError, match="setup round setup failed") as caught:
        world.run(world.job(["gelu-head"], scorers=["ped"]), "106")
    assert set(caught.value.failures) == {"101"} and "ped: [allowed_scorers]" in caught.value.failures["101"]


def test_an_unpinned_coordinator_is_refused_everywhere(world: World) -> None:
    with pytest.raises(FederationError, match="setup round setup failed") as caught:
        world.run(world.job(["gelu-head"]), "104", key=Ed25519PrivateKey.generate())
    assert set(caught.value.failures) == {"100", "101", "102"}
    assert all("[coordinator_keys] coordinator key" in reason for reason in caught.value.failures.values())


def test_tampered_weights_are_refused_before_the_model_is_built(world: World, tmp_path: Path) -> None:
    job = world.job(["tanh-head"])
    (package,) = load_candidates(job)
    weights = bytearray((package.directory / "weights.safetensors").read_bytes())
    weights[-3] ^= 0x01
    root = tmp_path / "fresh-site"
    site_file = write_site(root, "fresh", site_arrays(1)[0], LABELS, coordinator=world.key, dp=False)
    request = SetupRequest(run_id="105", labels=LABELS, scorers=["hscore"], coordinator_key=public_key_text(world.key),
                           models=[package.offer(attach=True)])
    # weights changed after the setup was signed: the setup's signature (over its arrays) fails
    honest = {package.model_id: (package.directory / "weights.safetensors").read_bytes()}
    swapped = setup_payload(sign_setup(request, world.key, honest), {package.model_id: bytes(weights)})
    with pytest.raises(RefusalError, match="signature does not verify under the pinned coordinator key"):
        site_agent.answer(SETUP, swapped, site_file, run_id="105")
    # weights the coordinator signed into the setup but not into the package: the package check fails
    payload = setup_payload(sign_setup(request, world.key, {package.model_id: bytes(weights)}),
                            {package.model_id: bytes(weights)})
    reply = site_agent.answer(SETUP, payload, site_file, run_id="105")
    status = reply.doc["models"][package.model_id]
    assert status["status"] == "refused" and status["rule"] == "package.signature"
    assert "WeightsHashMismatchError" in status["reason"] and "altered after signing" in status["reason"]
    assert not (root / "cache" / "packages" / package.model_id).exists()


def test_a_forged_setup_signature_and_a_round_without_setup_are_refused(world: World) -> None:
    job = world.job(["tanh-head"])
    (package,) = load_candidates(job)
    request = SetupRequest(run_id="106", labels=LABELS, scorers=["hscore"], coordinator_key=public_key_text(world.key),
                           models=[package.offer(attach=False)])
    signed = sign_setup(request, world.key)
    forged = signed.model_copy(update={"request": request.model_copy(update={"scorers": ["hscore", "leep"]})})
    with pytest.raises(Exception, match="signature does not verify under the pinned coordinator key"):
        site_agent.answer(SETUP, setup_payload(forged, {}), world.site_files[0], run_id="106")
    round_request, arrays = encode_job_round({package.model_id: [Stat.of("count")]}, run_id="107", round_index=1,
                                             num_classes=3)
    payload = Payload(doc=round_request.sign(world.key, arrays).model_dump(mode="json", by_alias=True), arrays=arrays)
    with pytest.raises(ProtocolError, match="run 107 has no accepted setup at this site"):
        site_agent.answer(STATS, payload, world.site_files[0], run_id="107")
    with pytest.raises(ProtocolError, match="this message belongs to run 108"):
        site_agent.answer(STATS, payload, world.site_files[0], run_id="108")
    assert JobRoundRequest.parse(payload.doc).run_id == "107"
    assert parse_setup(setup_payload(signed, {}))[0].request.run_id == "106"


def test_the_audit_logs_verify_with_the_coordinators_witness(world: World, first_job: tuple[JobOutcome, AgentExchange],
                                                            tmp_path: Path) -> None:
    outcome, _ = first_job
    runner = CliRunner()
    for node, site_file in zip(sorted(outcome.sites), world.site_files, strict=True):
        witness = tmp_path / f"{node}.txt"
        witness.write_text(outcome.sites[node].checkpoint or "")
        result = runner.invoke(app, ["audit", "verify", str(site_file.parent / "audit"), "--witness", str(witness),
                                     "--ledger", str(site_file.parent / "ledger")])
        assert result.exit_code == 0, result.output


def test_with_dp_on_the_report_states_what_each_site_spent(tmp_path: Path) -> None:
    world = World(tmp_path, dp=True, sites=2)
    job = world.job(["gelu-head", "tanh-nohead"], scorers=["hscore", "gbc"])
    outcome, _ = world.run(job, "201")
    report = build_job_report(job, outcome)
    assert not report.privacy.secure_sum and report.privacy.dp_applied
    for site, site_file in zip(report.sites, world.site_files, strict=True):
        intents = [r for r in read_records(site_file.parent / "audit") if isinstance(r, IntentRecord) and r.privacy]
        # under DP the sums are uncentred and centred at the coordinator: one round, one release for both models
        assert len(intents) == 1
        mu_sq = float(intents[-1].privacy.mu_sq_after)
        assert site.privacy.dp and site.privacy.epsilon_spent == pytest.approx(dp.gdp_epsilon(mu_sq ** 0.5, 1e-6))
        assert site.privacy.epsilon_spent == pytest.approx(1.0) and site.privacy.epsilon_budget == 4.0
        assert all(s.noised and not s.masked for s in site.statistics)
    exact = World(tmp_path / "exact", sites=2)
    exact_outcome, _ = exact.run(exact.job(["gelu-head"], scorers=["hscore"]), "202")
    noisy = outcome.models[next(m for m, r in outcome.models.items() if r.package.label == "gelu-head")].result
    plain = next(iter(exact_outcome.models.values())).result
    assert noisy is not None and plain is not None and noisy.scores["hscore"] != plain.scores["hscore"]
    # the first job on these data: all the data source has spent is this job's
    assert report.sites[0].privacy.epsilon_total == pytest.approx(report.sites[0].privacy.epsilon_spent)


def test_the_trial_federations_files_make_a_job_that_runs(tmp_path: Path) -> None:
    """What ``fedmte local up`` writes (site files, example packages, job.toml) runs as a job."""
    from fedmte.server.job import load_job
    from fedmte.trial.local_federation import LocalFederation, SiteProcess, write_example_job
    from fedmte.trial.local_sites import demo_site_inputs, label_space

    key, key_path = coordinator_key(tmp_path / "coordinator")
    parts = demo_site_inputs(2, n=400)
    labels = label_space([p["labels"] for p in parts])
    assert labels == ["c0", "c1", "c2"]
    files = [write_site(tmp_path / "sites" / f"site{k}", f"site{k}", p, labels, coordinator=key, dp=True)
             for k, p in enumerate(parts)]
    state = LocalFederation(
        directory=str(tmp_path), runner="site", address="127.0.0.1:1", superlink_pid=0, superlink_log="",
        ca_cert="", flwr_home=str(tmp_path / "flwr"), coordinator_key=str(key_path), labels=labels,
        sites=[SiteProcess(name=f.parent.name, node_id=k, pid=0, runtime_port=0, 
                           site_file=str(f), private_key="", public_key="", flwr_home="", log="")
               for k, f in enumerate(files)],
    )
    job = load_job(write_example_job(state))
    assert job.federation.coordinator_key == key_path and job.federation.min_sites == 2
    assert [c.label for c in job.candidates] == ["mlp-small", "mlp-wide", "mlp-deep"]
    exchange = AgentExchange(files, "301")
    outcome = execute_job(exchange, job, load_candidates(job), key, run_id="301")
    report = build_job_report(job, outcome)
    assert report.privacy.dp_applied and all(s.privacy.dp for s in report.sites)
    assert {m.name for m in report.models} == {"mlp-small", "mlp-wide", "mlp-deep"}
    assert all(m.scores.get("hscore") is not None for m in report.models)


def test_one_coordinator_key_drives_packages_jobs_and_the_secure_sum(tmp_path: Path) -> None:
    """``[trust.coordinators]`` is the one list of keys: a site file written by write_site and
    provision lists the coordinator's key once, and replacing that one entry moves the trust
    for package signatures, job setups and secure-sum requests together."""
    old, old_path = coordinator_key(tmp_path / "old")
    new, _ = coordinator_key(tmp_path / "new")
    files = {f"site{k}": write_site(tmp_path / f"site{k}", f"site{k}", arrays, LABELS, coordinator=old, dp=False)
             for k, arrays in enumerate(site_arrays(3, n=300))}
    bounds = DeclaredBounds(max_rows=1000, feature_norm=100.0)
    provision(files, old_path, bounds=bounds)
    site_file = files["site0"]
    text = site_file.read_text()
    assert text.count(public_key_text(old)) == 1  # listed once, in [trust.coordinators]
    config = load_site_config(site_file)
    assert config.trust.coordinators == {"coordinator": public_key_text(old)} and config.secure is not None
    assert config.require_policy().coordinator_keys == {"coordinator": fingerprint(old)}  # filled in from [trust]
    assert secure_config(config).coordinators == {"coordinator": public_key_text(old)}
    packages = {**example_packages(tmp_path / "old-models", old, 6, {"tanh-head": MODELS["tanh-head"]}),
                **example_packages(tmp_path / "new-models", new, 6, {"gelu-head": MODELS["gelu-head"]})}
    job = job_from_dict({"connection": "unused", "labels": LABELS, "scorers": ["hscore"],
                         "candidates": [{"name": name, "path": str(path)} for name, path in packages.items()]})
    candidates = load_candidates(job)
    ids = {p.label: p.model_id for p in candidates}

    def setup(key: Ed25519PrivateKey, run_id: str) -> dict[str, dict[str, object]]:
        request = SetupRequest(run_id=run_id, labels=LABELS, scorers=["hscore"], coordinator_key=public_key_text(key),
                               models=[p.offer(attach=True) for p in candidates])
        weights = {p.model_id: p.weights() for p in candidates}
        payload = setup_payload(sign_setup(request, key, weights), weights)
        return site_agent.answer(SETUP, payload, site_file, run_id=run_id).doc["models"]

    def advertise(key: Ed25519PrivateKey, job_id: str) -> Payload:
        params = SecureSumParams(job_id=job_id, sites=tuple(sorted(files)), threshold=2, phases=1)
        envelope = Envelope(step=SECURE_ADVERTISE, job_id=job_id, round=0, nonce=os.urandom(16).hex(),
                            issued_at=time.time(), signer=fingerprint(key),
                            body=AdvertiseBody(params=params.model_dump_json(by_alias=True), bounds=bounds)
                            .model_dump(mode="json"))
        site = SecureSite(secure_config(load_site_config(site_file)), compute=agent_statistics(site_file),
                          audit=_agent_audit(site_file))  # made afresh: it reads the site file as it is now
        return site.handle(SECURE_ADVERTISE, sign_request(key, envelope))

    # the old key drives all three
    statuses = setup(old, "601")
    assert statuses[ids["tanh-head"]]["status"] == "ready"
    assert statuses[ids["gelu-head"]]["status"] == "refused" and statuses[ids["gelu-head"]]["rule"] == "trust.coordinators"
    assert "advertisement" in advertise(old, "job-old-1").doc

    # the data owner replaces the one key; nothing else in the file changes
    site_file.write_text(text.replace(public_key_text(old), public_key_text(new)))
    # (a) the package the old key signed is refused, even though this site staged it before
    statuses = setup(new, "602")
    assert statuses[ids["tanh-head"]]["status"] == "refused" and statuses[ids["tanh-head"]]["rule"] == "trust.coordinators"
    assert statuses[ids["gelu-head"]]["status"] == "ready"
    # (b) a job setup the old key signed is refused
    with pytest.raises(RefusalError) as caught:
        setup(old, "603")
    assert caught.value.rule == "coordinator_keys"
    # (c) a secure-sum request the old key signed is refused; the new key's is accepted
    with pytest.raises(VerificationError, match="unknown coordinator key"):
        advertise(old, "job-old-2")
    assert "advertisement" in advertise(new, "job-new").doc
    refusals = [r for r in read_records(site_file.parent / "audit") if isinstance(r, RefusalRecord)]
    assert [(r.run_id, r.rule) for r in refusals] == [
        ("601", "trust.coordinators"), ("602", "trust.coordinators"), ("603", "coordinator_keys"),
        ("job-old-2", "trust.coordinators"),
    ]
