"""The secure sum's guarantees over real Flower processes: forgeries, masking, dropout, abort.

One federation of five fedmte site runners (a SuperLink with TLS and SuperNode
authentication, loopback) serves the module. Every site is a site agent whose ``site.toml``
holds precomputed features (``[data] kind = "features"``, DP off), pins the coordinator's key
in ``[trust.coordinators]`` and has a ``[secure]`` table with the five-site roster that
requires the secure sum; it audits to ``audit/`` beside its site file. ``site4`` runs the
dropout drill ``--drill-crash-on query.secure_upload``: its whole process (SuperNode
included) ends, unanswered, when its first masked upload is requested, which is after it
took part in the key setup and sent its Shamir shares.

In order, the tests show:

1. a forged signer, a tampered message and a replayed message are each refused by every
   site, which audits each refusal (a signed control message is accepted in between);
2. with ``site4`` crashing after key sharing, the job finishes with the threshold of 3 and
   its scores are ``fedmte.score`` on the four survivors' pooled rows; the coordinator
   received, for every phase, one upload per survivor (its digests, ``received.jsonl``, are
   those of the payload copies in each survivor's audit log, so those copies are the bytes
   it held), and none of them is the site's statistics: each is ring words that match, in
   almost no place, the fixed-point encoding of the site's own sums for the same request
   (replayed in-process at a copy of the site), and whose bits look uniformly random;
3. with ``site4`` restarted and the threshold raised to 5, the same crash leaves four
   sites, the job aborts with nothing released (no reveal is ever asked for), and each of
   the four survivors records the abort in its audit log;
4. with ``site4`` restarted to crash on its first *reveal* instead (after its first masked
   upload), the first phase is summed over all five, and the job then aborts before the
   second phase is asked for: the active set is fixed by the first phase, and a job never
   goes on with a smaller one (the difference of the two sums would be ``site4``'s
   statistics). Each survivor records the abort.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fedmte
from fedmte.cli import app
from fedmte.client.audit_log import read_records
from fedmte.client.site_config import toml_text
from fedmte.protocol.errors import FederationError
from fedmte.protocol.fixed_point import FixedPointCodec, SumSpec
from fedmte.protocol.job_messages import WIRE_MAGIC
from fedmte.protocol.keys import load_private_key
from fedmte.protocol.secure_rounds import DeclaredBounds
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.wire import Payload
from fedmte.server.coordinator import execute_job, launch, load_candidates
from fedmte.server.job import JobSpec
from fedmte.server.report import Report, RunStatus, read_report, read_status
from fedmte.server.secure_aggregation import SecureJobSpec
from fedmte.trial.local_federation import STATE_FILE, LocalFederation, down, load_state, restart_site, up
from tests.datasets import DATASETS, site_split_without_class
from tests.job_helpers import AgentExchange
from tests.test_flower_federation import decisions, job, received, site_features_scores, site_files, site_home
from tests.test_secure_federation import require_secure_sum

pytestmark = pytest.mark.slow  # starts a SuperLink and SuperNodes

DATA = DATASETS["basic"]
SCORERS = ["hscore", "gbc", "logme", "nce"]
SITES = 5
DROPPING = SITES - 1
CRASH_ON = "query.secure_upload"
ROUND_TIMEOUT = 12.0  # how long the coordinator waits for the crashed site before counting it dropped


@dataclass
class Federation:
    state: LocalFederation
    spec: SecureJobSpec
    rows: list[np.ndarray]

    def home(self, index: int) -> Path:
        return site_home(self.state, index)

    def job(self, output: Path, spec: SecureJobSpec | None = None) -> JobSpec:
        return job(self.state, output, SCORERS, min_sites=SITES, round_timeout=ROUND_TIMEOUT,
                   secure=(spec or self.spec).model_dump(mode="json"))

    def decisions(self, index: int, run_id: int | None) -> list[dict[str, object]]:
        return decisions(self.state, index, run_id)


def from_wire_bytes(data: bytes) -> Payload:
    """The payload whose :func:`~fedmte.protocol.job_messages.wire_bytes` are ``data``."""
    assert data.startswith(WIRE_MAGIC)
    at = len(WIRE_MAGIC)
    size = int.from_bytes(data[at:at + 8], "big")
    doc = data[at + 8:at + 8 + size].decode("utf-8")
    at += 8 + size
    size = int.from_bytes(data[at:at + 8], "big")
    layout = data[at + 8:at + 8 + size].decode("utf-8")
    return Payload.from_wire(doc, layout, data[at + 8 + size:])


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("secure-dropout")
    rows = site_split_without_class(DATA, absent=0, sites=SITES)
    state = up(root / "local", SITES, data=site_files(root / "data", rows), runner="site", dp=False,
               site_args={DROPPING: ["--drill-crash-on", CRASH_ON]})
    try:
        norm = float(np.max(np.linalg.norm(DATA.features, axis=1))) * 2
        spec = require_secure_sum(state, DeclaredBounds(max_rows=1000, feature_norm=norm))
        yield Federation(state, spec, rows)
    finally:
        down(Path(state.directory))


def test_forged_tampered_and_replayed_requests_are_refused_at_every_site(federation: Federation, tmp_path: Path) -> None:
    """``fedmte probe JOB.toml``: every forgery refused for its own reason, at every site."""
    job_file = tmp_path / "job.toml"
    job_file.write_text(toml_text(federation.job(tmp_path / "unused").model_dump(mode="json", exclude_none=True)))
    result = CliRunner().invoke(app, ["probe", str(job_file), "--out", str(tmp_path / "probe")])
    assert result.exit_code == 0, result.output
    assert "every site refused every forged request" in result.output
    status = read_status(tmp_path / "probe" / "run.json")
    assert status.status == "finished" and status.probes is not None
    nodes = {site.node_id for site in federation.state.sites}
    by_probe: dict[str, dict[int, object]] = {}
    for probe in status.probes:
        by_probe.setdefault(probe.probe, {})[probe.node] = probe
    assert set(by_probe) == {"unknown_signer", "tampered", "control", "replayed"}
    for probe, results in by_probe.items():
        assert set(results) == nodes, probe
    assert all(not r.refused for r in by_probe["control"].values())
    assert all("unknown coordinator key" in r.reason for r in by_probe["unknown_signer"].values())
    assert all("signature does not verify" in r.reason for r in by_probe["tampered"].values())
    assert all("was seen before" in r.reason for r in by_probe["replayed"].values())
    for index in range(SITES):
        records = read_records(federation.home(index) / "audit")
        refusals = {r.reason_code for r in records if r.kind == "refusal"}
        assert {"secure:unknown_signer", "secure:bad_request", "secure:replay"} <= refusals
        assert any(r.kind == "abort" and r.reason_code == "secure:probe_finished" for r in records)
        assert all(d["accepted"] for d in federation.decisions(index, status.run_id))


@dataclass(frozen=True)
class Dropout:
    status: RunStatus
    report: Report
    output: Path


@pytest.fixture(scope="module")
def dropout_report(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> Dropout:
    output = tmp_path_factory.mktemp("dropout")
    status = launch(federation.job(output))
    return Dropout(status, read_report(output / "report.json"), output)


def test_a_site_crashing_after_key_sharing_leaves_the_exact_sum_of_the_survivors(
    federation: Federation, dropout_report: Dropout
) -> None:
    status, report = dropout_report.status, dropout_report.report
    survivors = np.concatenate(federation.rows[:DROPPING])
    expected = fedmte.score(DATA.features[survivors], DATA.labels[survivors],
                            source_probs=DATA.source_probs[survivors], scorers=SCORERS)
    everyone = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS)
    assert status.status == "finished" and report.privacy.secure_sum
    left_out = [note for note in report.notes if "secure sum left out" in note]
    assert len(left_out) == 1 and f"left out site{DROPPING} " in left_out[0] and "secure_upload:" in left_out[0]
    scores = site_features_scores(report)
    for name in SCORERS:
        assert scores[name] == pytest.approx(expected[name], rel=1e-6), name
    assert any(scores[n] != pytest.approx(everyone[n], rel=1e-6) for n in SCORERS)  # site4's rows are out
    crashed = federation.decisions(DROPPING, status.run_id)
    assert [d["message_type"] for d in crashed] == ["query.setup", "query.secure_advertise",
                                                    "query.secure_share", CRASH_ON]
    assert not crashed[-1]["accepted"] and "drill" in str(crashed[-1]["reason"])
    for index in range(DROPPING):  # the survivors revealed what recovers site4's masks, every phase
        kinds = [d["message_type"] for d in federation.decisions(index, status.run_id)]
        assert kinds.count("query.secure_reveal") == status.planned_rounds
    # 3 of 5 unmask (a strict majority): the survivors, four, are enough
    assert federation.spec.threshold is None and SITES // 2 + 1 == 3 < DROPPING


class _RecordingAgents(AgentExchange):
    """In-process site agents that keep every reply (the plain statistics a site computes)."""

    def __init__(self, site_files: list[Path], run_id: str) -> None:
        super().__init__(site_files, run_id)
        self.replies: dict[tuple[str, str], dict[int, Payload]] = {}

    def exchange(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> dict[int, Payload]:
        replies = super().exchange(query, payloads, group=group)
        self.replies[(query, group)] = replies
        return replies


def _plain_first_round(federation: Federation, job_spec: JobSpec, tmp: Path) -> dict[str, Payload]:
    """Each survivor's plain reply to the job's first statistics round, computed by a site agent
    at a copy of its site (site file, data, keys; fresh audit log and cache) over the plain
    sum. The first round's request depends only on the plan, so it asks what the secure job's
    first phase asked."""
    copies = []
    for index in range(DROPPING):
        home, copy = federation.home(index), tmp / f"site{index}"
        copy.mkdir(parents=True)
        shutil.copy(home / "site.toml", copy / "site.toml")
        shutil.copy(home / "data.npz", copy / "data.npz")
        shutil.copytree(home / "keys", copy / "keys")
        copies.append(copy / "site.toml")
    agents = _RecordingAgents(copies, "replay")
    plain = job_spec.model_copy(update={"secure": None})
    execute_job(agents, plain, load_candidates(plain), load_private_key(federation.state.coordinator_key),
                run_id="replay")
    return {f"site{node - 100}": reply for node, reply in agents.replies[("stats", "1")].items()}


def test_the_coordinator_received_only_masked_words(federation: Federation, dropout_report: Dropout,
                                                    tmp_path: Path) -> None:
    status = dropout_report.status
    uploads = [r for r in received(dropout_report.output) if r["query"] == "secure_upload"]
    phases: dict[str, dict[str, Payload]] = {}
    for reply in uploads:
        index = int(str(reply["site"]).removeprefix("site"))
        copy = (federation.home(index) / "audit" / "payloads" / f"{reply['sha256']}.bin").read_bytes()
        assert hashlib.sha256(copy).hexdigest() == reply["sha256"] and len(copy) == reply["bytes"]
        phases.setdefault(str(reply["group"]), {})[str(reply["site"])] = from_wire_bytes(copy)
    assert list(phases) == [f"{k}-upload" for k in range(1, status.planned_rounds + 1)]
    plain = _plain_first_round(federation, federation.job(dropout_report.output), tmp_path)
    bits = []
    for group, sites in phases.items():
        assert sorted(sites) == [f"site{k}" for k in range(DROPPING)], group  # site4 crashed before uploading
        for site, upload in sites.items():
            assert set(upload.arrays) == {"words"} and upload.doc["phase"] == int(group.split("-")[0]) - 1
            words = np.asarray(upload.arrays["words"]).view(np.uint64)
            spec = SumSpec.model_validate(upload.doc["spec"])
            assert words.shape == (spec.limbs, sum(block.size for block in spec.blocks)), site
            if group == "1-upload":  # the same request as the replay: compare with the site's own sums
                encoded = FixedPointCodec(spec, max_sites=SITES).encode(Statistics.from_arrays(plain[site].arrays))
                assert words.dtype == np.uint64 and words.shape == encoded.shape
                assert np.mean(words == encoded) < 0.01, site  # not the site's sums, in (almost) no place
            bits.append(np.unpackbits(words.view(np.uint8)))
    assert abs(np.concatenate(bits).mean() - 0.5) < 0.02  # masked words look uniformly random


def test_below_the_threshold_the_job_aborts_and_the_survivors_audit_it(
    federation: Federation, dropout_report: Dropout, tmp_path: Path
) -> None:
    restart_site(Path(federation.state.directory), f"site{DROPPING}")
    strict = federation.spec.model_copy(update={"threshold": SITES})
    output = tmp_path / "strict"
    with pytest.raises(FederationError, match="secure sum aborted, nothing released"):
        launch(federation.job(output, strict))
    failed = read_status(output / "run.json")
    assert failed.status == "failed" and not (output / "report.json").exists()
    assert f"site{DROPPING}" in failed.failures and "threshold" in str(failed.error)
    for index in range(DROPPING):
        kinds = [d["message_type"] for d in federation.decisions(index, failed.run_id)]
        assert "query.secure_reveal" not in kinds and "query.secure_abort" in kinds, kinds
        assert kinds[:kinds.index("query.secure_abort")] == ["query.setup", "query.secure_advertise",
                                                              "query.secure_share", "query.secure_upload"], kinds
        aborts = [r for r in read_records(federation.home(index) / "audit")
                  if r.kind == "abort" and r.run_id.startswith(f"run-{failed.run_id}-")]
        assert [r.reason_code for r in aborts] == ["secure:below_threshold"]


def _crash_site_on(federation: Federation, index: int, message_type: str) -> None:
    """Restart the (crashed) site with its dropout drill on another message type: its
    recorded command line, as ``restart_site`` reuses it, with the drill's argument changed."""
    directory = Path(federation.state.directory)
    state = load_state(directory)
    command = state.sites[index].command
    command[command.index("--drill-crash-on") + 1] = message_type
    (directory / STATE_FILE).write_text(state.model_dump_json(by_alias=True, indent=2), encoding="utf-8")
    restart_site(directory, state.sites[index].name)


def test_a_site_lost_after_its_first_upload_aborts_the_job_before_the_next_phase(
    federation: Federation, dropout_report: Dropout, tmp_path: Path
) -> None:
    assert dropout_report.status.planned_rounds > 1  # a second phase exists to be refused
    _crash_site_on(federation, DROPPING, "query.secure_reveal")
    output = tmp_path / "after-first-upload"
    with pytest.raises(FederationError, match="secure sum aborted, nothing released") as caught:
        launch(federation.job(output))
    failed = read_status(output / "run.json")
    assert failed.status == "failed" and not (output / "report.json").exists()
    assert "active set was fixed" in str(caught.value) and "site4" in str(failed.error)
    assert f"site{DROPPING}" in failed.failures and "secure_reveal" in failed.failures[f"site{DROPPING}"]
    crashed = [d["message_type"] for d in federation.decisions(DROPPING, failed.run_id)]
    assert crashed == ["query.setup", "query.secure_advertise", "query.secure_share", "query.secure_upload",
                       "query.secure_reveal"], crashed
    for index in range(DROPPING):
        kinds = [d["message_type"] for d in federation.decisions(index, failed.run_id)]
        assert kinds[:kinds.index("query.secure_abort") + 1] == [
            "query.setup", "query.secure_advertise", "query.secure_share", "query.secure_upload",
            "query.secure_reveal", "query.secure_abort"], kinds
        assert kinds.count("query.secure_upload") == 1, kinds  # phase 2 was never asked for
        aborts = [r for r in read_records(federation.home(index) / "audit")
                  if r.kind == "abort" and r.run_id.startswith(f"run-{failed.run_id}-")]
        assert [r.reason_code for r in aborts] == ["secure:active_set_changed"]
        assert "site4" in aborts[0].detail
