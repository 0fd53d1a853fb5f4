"""The secure sum's guarantees over real Flower processes: forgeries, masking, dropout, abort.

One federation of five fedmte site runners (a SuperLink with TLS and SuperNode
authentication, loopback) serves the module. Every site pins the coordinator's key and the
five-site roster in its own ``secure.toml`` and audits to ``audit/``. ``site4`` runs the
dropout drill ``--drill-crash-on query.secure_upload``: its whole process (SuperNode
included) ends, unanswered, when its first masked upload is requested, which is after it
took part in the key setup and sent its Shamir shares.

In order, the tests show:

1. a forged signer, a tampered message and a replayed message are each refused by every
   site, which audits each refusal (a signed control message is accepted in between);
2. with ``site4`` crashing after key sharing, the job finishes with the threshold of 3 and
   its scores are ``fedmte.score`` on the four survivors' pooled rows; the coordinator's
   transcript holds, for every phase, one upload per survivor, and none of them is the
   site's statistics: each is ring words that match the fixed-point encoding of the site's
   own sums in almost no place;
3. with ``site4`` restarted and the threshold raised to 5, the same crash leaves four
   sites, the job aborts with nothing released (no reveal is ever asked for), and each of
   the four survivors records the abort in its audit log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from typer.testing import CliRunner

import fedmte
from fedmte.cli import app
from fedmte.client.audit_log import read_records
from fedmte.client.secure_site import site_statistics
from fedmte.protocol.errors import FederationError
from fedmte.protocol.fixed_point import FixedPointCodec
from fedmte.protocol.secure_rounds import DeclaredBounds
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.wire import Payload
from fedmte.server.job_runner import JobFile, JobReport, launch, read_report
from fedmte.server.secure_aggregation import SecureJobSpec, provision, read_transcript
from fedmte.trial.local_federation import LocalFederation, down, restart_site, up
from fedmte.trial.local_sites import toml_text
from tests.datasets import DATASETS, site_split_without_class
from tests.test_flower_federation import site_files

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
        return Path(self.state.sites[index].data).parent

    def job(self, out: Path, **updates: object) -> JobFile:
        return JobFile(
            connection=self.state.connection, flwr_home=Path(self.state.flwr_home), out=out,
            num_classes=DATA.num_classes, scorers=SCORERS, min_sites=SITES, round_timeout=ROUND_TIMEOUT,
            run_timeout=300, secure=self.spec, **updates,
        )

    def decisions(self, index: int, run_id: int | None) -> list[dict[str, object]]:
        lines = (self.home(index) / "decisions.jsonl").read_text().splitlines()
        return [d for d in map(json.loads, lines) if d["run_id"] == run_id]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("secure-dropout")
    rows = site_split_without_class(DATA, absent=0, sites=SITES)
    state = up(root / "local", SITES, data=site_files(root / "data", rows), runner="site",
               site_args={DROPPING: ["--drill-crash-on", CRASH_ON]})
    try:
        norm = float(np.max(np.linalg.norm(DATA.features, axis=1))) * 2
        spec = provision({site.name: Path(site.data).parent for site in state.sites},
                         Path(state.directory) / "secure" / "coordinator.pem",
                         bounds=DeclaredBounds(max_rows=1000, feature_norm=norm))
        yield Federation(state, spec, rows)
    finally:
        down(Path(state.directory))


def test_forged_tampered_and_replayed_requests_are_refused_at_every_site(federation: Federation, tmp_path: Path) -> None:
    """``fedmte probe JOB.toml``: every forgery refused for its own reason, at every site."""
    job_file = tmp_path / "job.toml"
    job_file.write_text(toml_text(federation.job(tmp_path / "unused.json").model_dump(mode="json", exclude_none=True)))
    result = CliRunner().invoke(app, ["probe", str(job_file), "--out", str(tmp_path / "probe.json")])
    assert result.exit_code == 0, result.output
    assert "every site refused every forged request" in result.output
    report = read_report(tmp_path / "probe.json")
    assert report.status == "finished" and report.probes is not None
    nodes = {site.node_id for site in federation.state.sites}
    by_probe: dict[str, dict[int, object]] = {}
    for result in report.probes:
        by_probe.setdefault(result.probe, {})[result.node] = result
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
        assert all(d["accepted"] for d in federation.decisions(index, report.run_id))


@pytest.fixture(scope="module")
def dropout_report(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> tuple[JobReport, Path]:
    out = tmp_path_factory.mktemp("dropout")
    return launch(federation.job(out / "report.json", transcript=out / "transcript.npz")), out / "transcript.npz"


def test_a_site_crashing_after_key_sharing_leaves_the_exact_sum_of_the_survivors(
    federation: Federation, dropout_report: tuple[JobReport, Path]
) -> None:
    report, _ = dropout_report
    survivors = np.concatenate(federation.rows[:DROPPING])
    expected = fedmte.score(DATA.features[survivors], DATA.labels[survivors],
                            source_probs=DATA.source_probs[survivors], scorers=SCORERS)
    everyone = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS)
    assert report.status == "finished" and report.secure is not None
    assert report.secure["sites"] == [f"site{k}" for k in range(DROPPING)] and report.secure["threshold"] == 3
    assert list(report.secure["failures"]) == [f"site{DROPPING}"]
    assert report.secure["failures"][f"site{DROPPING}"].startswith("secure_upload:")
    for name in SCORERS:
        assert report.scores[name] == pytest.approx(expected[name], rel=1e-6), name
    assert any(report.scores[n] != pytest.approx(everyone[n], rel=1e-6) for n in SCORERS)  # site4's rows are out
    crashed = federation.decisions(DROPPING, report.run_id)
    assert [d["message_type"] for d in crashed] == ["query.describe", "query.secure_advertise",
                                                    "query.secure_share", CRASH_ON]
    assert not crashed[-1]["accepted"] and "drill" in str(crashed[-1]["reason"])
    for index in range(DROPPING):  # the survivors revealed what recovers site4's masks, every phase
        kinds = [d["message_type"] for d in federation.decisions(index, report.run_id)]
        assert kinds.count("query.secure_reveal") == report.planned_rounds


def test_the_coordinator_received_only_masked_words(federation: Federation,
                                                    dropout_report: tuple[JobReport, Path]) -> None:
    report, transcript = dropout_report
    phases = read_transcript(transcript)
    assert sorted(phases) == list(range(report.planned_rounds))
    bits = []
    for phase in phases.values():
        assert sorted(phase.uploads) == [f"site{k}" for k in range(DROPPING)]
        for site, (words, spec) in phase.uploads.items():
            index = int(site.removeprefix("site"))
            plain = site_statistics(Path(federation.state.sites[index].data))(
                phase.inner_query, Payload(doc=phase.request.doc, arrays=phase.request.arrays), lambda reply: reply)
            codec = FixedPointCodec(spec, max_sites=SITES)
            encoded = codec.encode(Statistics.from_arrays(plain.arrays))
            assert words.dtype == np.uint64 and words.shape == encoded.shape
            assert np.mean(words == encoded) < 0.01, site  # not the site's sums, in (almost) no place
            bits.append(np.unpackbits(words.view(np.uint8)))
    assert abs(np.concatenate(bits).mean() - 0.5) < 0.02  # masked words look uniformly random


def test_below_the_threshold_the_job_aborts_and_the_survivors_audit_it(
    federation: Federation, dropout_report: tuple[JobReport, Path], tmp_path: Path
) -> None:
    restart_site(Path(federation.state.directory), f"site{DROPPING}")
    strict = federation.spec.model_copy(update={"threshold": SITES})
    out = tmp_path / "report.json"
    with pytest.raises(FederationError, match="secure sum aborted, nothing released"):
        launch(federation.job(out).model_copy(update={"secure": strict}))
    failed = read_report(out)
    assert failed.status == "failed" and failed.scores == {} and failed.secure is not None
    assert f"site{DROPPING}" in failed.failures and "threshold" in str(failed.error)
    job_id = failed.secure["job_id"]
    for index in range(DROPPING):
        kinds = [d["message_type"] for d in federation.decisions(index, failed.run_id)]
        assert "query.secure_reveal" not in kinds and kinds[-1] == "query.secure_abort"
        aborts = [r for r in read_records(federation.home(index) / "audit") if r.kind == "abort" and r.run_id == job_id]
        assert [r.reason_code for r in aborts] == ["secure:below_threshold"]
