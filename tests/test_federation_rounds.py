"""The coordinator's job driver and the site agent's answers over precomputed features, without Flower.

Each site is a features-kind site file (``[data] kind = "features"``: an ``.npz`` of
features, labels and source probabilities) written by
:func:`fedmte.trial.local_sites.write_site`; the job scores them as a ``site_features``
candidate through :func:`fedmte.server.coordinator.execute_job`. The in-process exchange
(:class:`tests.job_helpers.AgentExchange`) hands each payload to the site agent through the
same wire form Flower carries (packed buffers + JSON), so these tests cover everything but the
Flower processes quickly; ``test_flower_federation.py`` covers those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import fedmte
from fedmte.client import site_agent
from fedmte.client.audit_log import read_records
from fedmte.client.site_agent import SiteFailed
from fedmte.client.site_config import load_site_config
from fedmte.protocol.audit_format import AbortRecord
from fedmte.protocol.errors import (
    FederationError,
    InvalidInputError,
    ProtocolError,
    RefusalError,
    StatisticsError,
    UnknownStatisticError,
)
from fedmte.protocol.job_messages import (
    SETUP,
    SITE_FEATURES,
    JobRoundRequest,
    ModelOffer,
    SetupRequest,
    block_key,
    encode_job_round,
    setup_payload,
    site_features_id,
)
from fedmte.protocol.keys import public_key_text
from fedmte.protocol.requests import Stat
from fedmte.protocol.wire import FINISH, INLINE_LIMIT, STATS, Payload, pack_arrays, unpack_arrays
from fedmte.server.coordinator import execute_job, load_candidates, sign_setup
from fedmte.server.job import JobSpec, job_from_dict
from fedmte.server.rounds import PlainSum
from fedmte.trial.local_sites import coordinator_key, write_site
from tests.datasets import DATASETS, site_split_without_class
from tests.job_helpers import AgentExchange

DATA = DATASETS["basic"]
LABELS = [f"k{c}" for c in range(DATA.num_classes)]  # the site files hold class indices into these
SCORERS = ["hscore", "leep", "gbc", "logme", "nce", "sfda"]
FEATURES = "site-features"
MODEL = site_features_id(FEATURES)


class FailingExchange(AgentExchange):
    """:class:`AgentExchange` where some nodes answer every message with an error."""

    def __init__(self, site_files: Sequence[Path], run_id: str, failing: Mapping[int, str]) -> None:
        super().__init__(site_files, run_id)
        self.failing = dict(failing)

    def reply(self, query: str, node: int, payload: Payload) -> Payload:
        if node in self.failing:
            raise RefusalError(self.failing[node], reason_code="test:refused", rule="policy")
        return super().reply(query, node, payload)


def write_sites(root: Path, rows: Sequence[np.ndarray], *, source_probs: bool = True
                ) -> tuple[Ed25519PrivateKey, list[Path]]:
    """(coordinator key, site files): one features-kind site per row set, DP off."""
    key, _ = coordinator_key(root / "coordinator")
    files = []
    for k, idx in enumerate(rows):
        arrays = {"features": DATA.features[idx], "labels": DATA.labels[idx]}
        if source_probs:
            arrays["source_probs"] = DATA.source_probs[idx]
        files.append(write_site(root / f"site{k}", f"site{k}", arrays, LABELS, coordinator=key, dp=False))
    return key, files


def features_job(root: Path, scorers: Sequence[str], labels: Sequence[str] = LABELS) -> JobSpec:
    return job_from_dict({"connection": "unused", "labels": list(labels), "scorers": list(scorers),
                          "privacy": {"dp": False}, "candidates": [{"name": FEATURES, "site_features": True}],
                          "output": str(root / "out"), "purpose": "federation rounds test"})


def set_up(site_file: Path, key: Ed25519PrivateKey, run_id: str, labels: Sequence[str] = LABELS) -> None:
    """One site accepts a site-features job (the setup execute_job sends, signed and stamped)."""
    request = SetupRequest(run_id=run_id, labels=list(labels), scorers=["hscore"], coordinator_key=public_key_text(key),
                           models=[ModelOffer(model_id=MODEL, label=FEATURES, kind=SITE_FEATURES)])
    reply = site_agent.answer(SETUP, setup_payload(sign_setup(request, key), {}), site_file, run_id=run_id)
    assert reply.doc["models"][MODEL]["status"] == "ready"


def round_payload(stats: Sequence[Stat], run_id: str, key: Ed25519PrivateKey, num_classes: int = DATA.num_classes,
                  round_index: int = 1) -> Payload:
    """A round request as execute_job sends it: signed by ``key`` over the document and its arrays."""
    request, arrays = encode_job_round({MODEL: list(stats)}, run_id=run_id, round_index=round_index,
                                       num_classes=num_classes)
    return Payload(doc=request.sign(key, arrays).model_dump(mode="json", by_alias=True), arrays=arrays)


def test_federated_scores_equal_pooled_scores_and_rounds_are_as_planned(tmp_path: Path) -> None:
    key, files = write_sites(tmp_path, site_split_without_class(DATA, absent=0, sites=3))
    exchange = AgentExchange(files, "401")
    job = features_job(tmp_path, SCORERS)
    outcome = execute_job(exchange, job, load_candidates(job), key, run_id="401")
    pooled = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS)
    record = outcome.models[MODEL]
    assert record.result is not None and not record.failures
    for name in SCORERS:
        assert record.result.scores[name] == pytest.approx(pooled[name], rel=1e-9), name
    # one setup round (no weights travel for site features), exactly the rounds the plan
    # stated, each one round trip, then finish
    assert exchange.sent[0] == (SETUP, "setup")
    assert [q for q, _ in exchange.sent[1:]] == [STATS] * outcome.planned_rounds + [FINISH]
    assert [r.name for r in outcome.rounds] == \
        ["setup"] + [f"round {k + 1}" for k in range(outcome.planned_rounds)] + ["finish"]
    assert len(outcome.sites) == 3 and record.dim == DATA.features.shape[1]
    assert record.num_source_classes == DATA.source_probs.shape[1]


def test_a_failing_site_stops_the_job_with_its_reason(tmp_path: Path) -> None:
    key, files = write_sites(tmp_path, np.array_split(np.arange(len(DATA.labels)), 3))
    exchange = FailingExchange(files, "402", failing={101: "refused by site: policy"})
    job = features_job(tmp_path, ["hscore"])
    with pytest.raises(FederationError, match="setup round setup failed") as caught:
        execute_job(exchange, job, load_candidates(job), key, run_id="402")
    assert caught.value.failures == {"101": "RefusalError: refused by site: policy"}
    assert STATS not in {q for q, _ in exchange.sent}


def test_sites_whose_data_disagree_in_shape_are_refused(tmp_path: Path) -> None:
    rows = np.array_split(np.arange(len(DATA.labels)), 2)
    key, files = write_sites(tmp_path, rows)
    odd = write_site(tmp_path / "odd", "odd", {"features": DATA.features[rows[1], :5], "labels": DATA.labels[rows[1]],
                                               "source_probs": DATA.source_probs[rows[1]]}, LABELS, coordinator=key,
                     dp=False)
    job = features_job(tmp_path, ["hscore"])
    with pytest.raises(FederationError, match=f"the sites disagree on the outputs of {FEATURES}"):
        execute_job(AgentExchange([files[0], odd], "403"), job, load_candidates(job), key, run_id="403")


def test_a_site_refuses_labels_outside_the_jobs_classes(tmp_path: Path) -> None:
    key, files = write_sites(tmp_path, [np.arange(len(DATA.labels))])
    # a job whose label space lacks one of the site's classes: the setup fails at the site
    job = features_job(tmp_path, ["hscore"], labels=LABELS[:-1])
    with pytest.raises(FederationError, match="setup round setup failed") as caught:
        execute_job(AgentExchange(files, "404"), job, load_candidates(job), key, run_id="404")
    # which labels the site holds is its data: the coordinator gets the one generic text, the
    # data owner the reason, in the site's audit log
    assert caught.value.failures["100"] == f"SiteFailed: {SiteFailed.MESSAGE}"
    aborts = [r for r in read_records(load_site_config(files[0]).audit.dir) if isinstance(r, AbortRecord)]
    assert any("integer labels must index the 3-name label space" in r.detail for r in aborts)
    # and a round asking for fewer classes than the job set up is refused
    set_up(files[0], key, "405")
    with pytest.raises(ProtocolError, match="the round asks for 3 classes; the job has 4 labels"):
        site_agent.answer(STATS, round_payload([Stat.of("class_counts")], "405", key, num_classes=3), files[0], run_id="405")


def test_a_site_refuses_a_statistic_outside_its_catalogue(tmp_path: Path) -> None:
    key, files = write_sites(tmp_path, [np.arange(len(DATA.labels))])
    set_up(files[0], key, "406")
    payload = round_payload([Stat.of("count")], "406", key)
    doc = dict(payload.doc)
    doc["models"] = {MODEL: [dict(doc["models"][MODEL][0], kind="raw_rows")]}
    signed = JobRoundRequest.parse(doc).model_copy(update={"nonce": ""}).sign(key, payload.arrays)  # signed as sent
    with pytest.raises(UnknownStatisticError, match="unknown statistic 'raw_rows'"):
        site_agent.answer(STATS, Payload(doc=signed.model_dump(mode="json", by_alias=True), arrays=payload.arrays),
                          files[0], run_id="406")


def test_plain_sum_adds_every_sites_statistics(tmp_path: Path) -> None:
    rows = np.array_split(np.arange(len(DATA.labels)), 3)
    key, files = write_sites(tmp_path, rows)
    for site_file in files:
        set_up(site_file, key, "407")
    stats = [Stat.of("count"), Stat.of("class_sums")]
    request, arrays = encode_job_round({MODEL: stats}, run_id="407", round_index=1, num_classes=DATA.num_classes)
    total = PlainSum().sum_round(AgentExchange(files, "407"), request.sign(key, arrays), arrays)
    assert int(total[block_key(MODEL, stats[0].key)]) == len(DATA.labels)
    expected = np.eye(DATA.num_classes)[DATA.labels].T @ DATA.features
    np.testing.assert_allclose(total[block_key(MODEL, stats[1].key)], expected, rtol=1e-12)


def test_site_file_without_source_probs_makes_source_scorers_unavailable(tmp_path: Path) -> None:
    key, files = write_sites(tmp_path, np.array_split(np.arange(len(DATA.labels)), 2), source_probs=False)
    job = features_job(tmp_path, ["leep", "hscore"])
    outcome = execute_job(AgentExchange(files, "408"), job, load_candidates(job), key, run_id="408")
    record = outcome.models[MODEL]
    assert record.num_source_classes == 0 and record.result is not None
    assert set(record.result.scores) == {"hscore"}
    assert "needs source-class probabilities" in record.failures["leep"]
    only = features_job(tmp_path, ["leep"])
    with pytest.raises(FederationError, match="no candidate can be scored by every site"):
        execute_job(AgentExchange(files, "409"), only, load_candidates(only), key, run_id="409")


def test_wire_packing_round_trips_and_refuses_a_forged_layout() -> None:
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(3, 4)), "n": np.asarray(7, dtype=np.int64), "c": np.arange(5), "e": np.zeros((0, 2))}
    layout, blob = pack_arrays(arrays)
    assert len(blob) == 8 * (12 + 1 + 5)  # every value once, nothing else
    back = unpack_arrays(layout, blob)
    assert back.keys() == arrays.keys()
    for name in arrays:
        assert back[name].dtype == arrays[name].dtype and np.array_equal(back[name], arrays[name])
    overlapping = [dict(layout[0]), dict(layout[0], name="a2")]
    with pytest.raises(StatisticsError, match="does not follow the previous one"):
        unpack_arrays(overlapping, blob)
    with pytest.raises(StatisticsError, match="40 bytes that no array claims"):
        unpack_arrays(layout[:2], blob)  # drop "c" and "e": the five int64 values of "c" dangle
    with pytest.raises(StatisticsError, match="not f8/i8"):
        unpack_arrays([dict(layout[0], dtype="O")], blob)
    with pytest.raises(StatisticsError, match="only float64 and int64 travel"):
        Payload(arrays={"x": np.zeros(2, dtype=np.float32)})


@pytest.mark.parametrize("rows", [3, 200_000], ids=["inline", "chunked"])
def test_flower_records_carry_payloads_both_ways_exactly(rows: int) -> None:
    from fedmte.flower_records import payload_from_record, payload_to_record

    rng = np.random.default_rng(1)
    payload = Payload(doc={"round": 2}, arrays={"x": rng.normal(size=(rows, 2)), "k": np.arange(3)})
    assert (16 * rows > INLINE_LIMIT) == (rows > 3)
    record = payload_to_record(payload)
    assert ("arrays" in record.array_records) == (rows > 3)
    back = payload_from_record(record)
    assert back.doc == payload.doc
    assert all(np.array_equal(back.arrays[k], v) and back.arrays[k].dtype == v.dtype for k, v in payload.arrays.items())


def test_job_file_paths_are_relative_to_it_and_errors_name_the_key(tmp_path: Path) -> None:
    from fedmte.server.coordinator import ServerJob, server_job_text
    from fedmte.server.job import load_job

    coordinator_key(tmp_path / "keys")
    path = tmp_path / "job.toml"
    path.write_text('connection = "local"\noutput = "out/report"\nlabels = ["a", "b", "c"]\nscorers = ["hscore"]\n'
                    'candidates = [{ name = "feats", site_features = true }]\n'
                    '[federation]\nflwr_home = "flwr"\ncoordinator_key = "keys/coordinator.pem"\n')
    job = load_job(path)
    assert job.output == tmp_path / "out" / "report" and job.federation.flwr_home == tmp_path / "flwr"
    assert job.federation.coordinator_key == tmp_path / "keys" / "coordinator.pem"
    server = ServerJob.model_validate_json(server_job_text(job))
    assert server.job["output"] == str(tmp_path / "out" / "report")
    assert server.coordinator_key == str(tmp_path / "keys" / "coordinator.pem")
    path.write_text('connection = "local"\noutput = "r"\nlabels = ["a"]\nscorerz = ["hscore"]\n'
                    'candidates = [{ name = "feats", site_features = true }]\n')
    with pytest.raises(InvalidInputError, match=r"labels: List should have at least 2 items.*scorerz"):
        load_job(path)
