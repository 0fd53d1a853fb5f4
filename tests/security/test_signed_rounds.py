"""Finding 6 (first half) of the security review: plain job requests carried no signature,
nonce or order, and a setup could be replayed after its run finished.

Now every coordinator request of a job (setup, stats, finish) carries the run id, its round, a
nonce and ``issued_at``, and is signed by the coordinator key that signed the job's setup, over
the request and the message's arrays. Against real site agents (features-kind site files, one
agent opened per message as under a stock SuperNode, so the site's memory of nonces is the one
on disk): an unsigned round, a round signed by another key, a round whose arrays changed after
signing, a replayed round, an out-of-order round, a stale round and a finished run's setup
replayed are each refused with a typed error naming its rule, and audited as a refusal. A job
driven by :func:`fedmte.server.coordinator.execute_job` still runs, and the secure sum's inner
round is checked the same way inside the masked upload.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import fedmte
from fedmte.client import site_agent
from fedmte.client.audit_log import read_records, verify
from fedmte.client.request_guard import NONCES_FILE, REQUEST_WINDOW
from fedmte.client.site_config import load_site_config
from fedmte.protocol.audit_format import IntentRecord, RefusalRecord
from fedmte.protocol.errors import FederationError, ProtocolError, VerificationError
from fedmte.protocol.job_messages import (
    SITE_FEATURES,
    FinishRequest,
    JobRoundRequest,
    ModelOffer,
    SetupRequest,
    block_key,
    encode_job_round,
    setup_payload,
    sign_setup,
    site_features_id,
)
from fedmte.protocol.keys import public_key_text
from fedmte.protocol.requests import Stat, Transform
from fedmte.protocol.wire import FINISH, SETUP, STATS, Payload
from fedmte.server.coordinator import execute_job, load_candidates
from fedmte.server.job import job_from_dict
from fedmte.trial.local_sites import coordinator_key, write_site
from tests.job_helpers import AgentExchange, signed_finish, signed_round

LABELS = ["a", "b", "c"]
DIM = 4
CANDIDATE = "site-features"
MODEL = site_features_id(CANDIDATE)
COUNT = [Stat.of("count"), Stat.of("class_counts")]
WITH_ARRAYS = [Stat.of("count"), Stat.of("sum", view=(Transform.of("offset", offset=np.full(DIM, 0.5)),))]


def rows(seed: int, n: int = 90) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    return {"features": rng.normal(size=(n, DIM)) + labels[:, None], "labels": labels}


@pytest.fixture
def key_and_sites(tmp_path: Path) -> tuple[Ed25519PrivateKey, list[Path]]:
    key, _ = coordinator_key(tmp_path / "coordinator")
    return key, [write_site(tmp_path / f"site{k}", f"site{k}", rows(k), LABELS, coordinator=key, dp=False)
                 for k in range(2)]


def setup_request(key: Ed25519PrivateKey, run_id: str) -> SetupRequest:
    return SetupRequest(run_id=run_id, labels=LABELS, scorers=["hscore"], coordinator_key=public_key_text(key),
                        models=[ModelOffer(model_id=MODEL, label=CANDIDATE, kind=SITE_FEATURES)])


def set_up(site_file: Path, key: Ed25519PrivateKey, run_id: str) -> Payload:
    """The site accepts a site-features job; returns the setup message it accepted."""
    payload = setup_payload(sign_setup(setup_request(key, run_id), key), {})
    reply = site_agent.answer(SETUP, payload, site_file, run_id=run_id)
    assert reply.doc["models"][MODEL]["status"] == "ready"
    return payload


def refusals(site_file: Path) -> list[RefusalRecord]:
    return [r for r in read_records(load_site_config(site_file).audit.dir) if isinstance(r, RefusalRecord)]


def refused(site_file: Path, query: str, payload: Payload, run_id: str, error: type[Exception], rule: str) -> str:
    """Send ``payload``; it must be refused with ``error`` naming ``rule``, and the refusal
    audited (the last refusal record, for this run and the request's round)."""
    before = len(refusals(site_file))
    with pytest.raises(error, match=rf"refused by site \[{rule}\]") as caught:
        site_agent.answer(query, payload, site_file, run_id=run_id)
    after = refusals(site_file)
    assert len(after) == before + 1, "the refusal was not audited"
    record = after[-1]
    assert (record.rule, record.reason_code, record.run_id) == (rule, rule, run_id)
    assert record.round == int(payload.doc.get("round", 0) if query != SETUP else 0)
    assert record.request_sha256 is not None and record.message in str(caught.value)
    return str(caught.value)


# --------------------------------------------------------------------------- signature


def test_an_unsigned_round_is_refused_and_audited(key_and_sites: tuple[Ed25519PrivateKey, list[Path]]) -> None:
    key, (site, _) = key_and_sites
    set_up(site, key, "1")
    request, arrays = encode_job_round({MODEL: COUNT}, run_id="1", round_index=1, num_classes=3)
    unsigned = Payload(doc=request.model_dump(mode="json", by_alias=True), arrays=arrays)
    text = refused(site, STATS, unsigned, "1", VerificationError, "request.signature")
    assert "not signed" in text
    # nor does a round stamped and signed, whose signature is then stripped
    stripped = dict(signed_round({MODEL: COUNT}, key, run_id="1").doc, signature="")
    refused(site, STATS, Payload(doc=stripped, arrays=arrays), "1", VerificationError, "request.signature")
    # the refusals used up nothing: the signed round is answered
    assert site_agent.answer(STATS, signed_round({MODEL: COUNT}, key, run_id="1"), site, run_id="1").arrays


def test_a_round_signed_by_another_key_is_refused(key_and_sites: tuple[Ed25519PrivateKey, list[Path]]) -> None:
    key, (site, _) = key_and_sites
    set_up(site, key, "2")
    other = Ed25519PrivateKey.generate()
    text = refused(site, STATS, signed_round({MODEL: COUNT}, other, run_id="2"), "2", VerificationError,
                   "request.signature")
    assert "does not verify under the coordinator key that signed this job's setup" in text


def test_a_round_whose_arrays_changed_after_signing_is_refused(
        key_and_sites: tuple[Ed25519PrivateKey, list[Path]]) -> None:
    key, (site, _) = key_and_sites
    set_up(site, key, "3")
    payload = signed_round({MODEL: WITH_ARRAYS}, key, run_id="3")
    assert payload.arrays  # the offset travels as an array, outside the document
    (name,) = payload.arrays
    changed = Payload(doc=payload.doc, arrays={name: payload.arrays[name] + 1e-9})
    refused(site, STATS, changed, "3", VerificationError, "request.signature")
    renamed = Payload(doc=payload.doc, arrays={name: payload.arrays[name], "extra": np.zeros(1)})
    refused(site, STATS, renamed, "3", VerificationError, "request.signature")
    # and so is a document changed after signing (here: its round)
    moved = Payload(doc=dict(payload.doc, round=5), arrays=payload.arrays)
    refused(site, STATS, moved, "3", VerificationError, "request.signature")
    reply = site_agent.answer(STATS, payload, site, run_id="3")
    assert block_key(MODEL, WITH_ARRAYS[1].key) in reply.arrays


def test_a_finish_must_be_signed_by_the_setups_key_too(key_and_sites: tuple[Ed25519PrivateKey, list[Path]]) -> None:
    key, (site, _) = key_and_sites
    set_up(site, key, "4")
    unsigned = Payload(doc=FinishRequest(run_id="4", round=1).model_dump(mode="json", by_alias=True))
    refused(site, FINISH, unsigned, "4", VerificationError, "request.signature")
    other = signed_finish(Ed25519PrivateKey.generate(), run_id="4", round_index=1)
    refused(site, FINISH, other, "4", VerificationError, "request.signature")
    assert "checkpoint" in site_agent.answer(FINISH, signed_finish(key, run_id="4", round_index=1), site, run_id="4").doc


# --------------------------------------------------------------------------- replay, order, freshness


def test_a_replayed_round_is_refused_even_by_a_restarted_site(
        key_and_sites: tuple[Ed25519PrivateKey, list[Path]]) -> None:
    key, (site, _) = key_and_sites
    set_up(site, key, "5")
    payload = signed_round({MODEL: COUNT}, key, run_id="5")
    first = site_agent.answer(STATS, payload, site, run_id="5")  # the agent closes after each message
    assert first.arrays
    text = refused(site, STATS, payload, "5", ProtocolError, "request.replay")
    assert "was seen before" in text
    nonces = load_site_config(site).site.cache_dir / "jobs" / NONCES_FILE
    assert payload.doc["nonce"] in nonces.read_text()  # on disk, so a restart does not reopen it
    # one release went out, not two
    intents = [r for r in read_records(load_site_config(site).audit.dir) if isinstance(r, IntentRecord) and r.round == 1]
    assert len([r for r in intents if r.purpose != "error reply"]) == 1


def test_an_out_of_order_round_is_refused(key_and_sites: tuple[Ed25519PrivateKey, list[Path]]) -> None:
    key, (site, _) = key_and_sites
    set_up(site, key, "6")
    site_agent.answer(STATS, signed_round({MODEL: COUNT}, key, run_id="6", round_index=2), site, run_id="6")
    text = refused(site, STATS, signed_round({MODEL: COUNT}, key, run_id="6", round_index=1), "6", ProtocolError,
                   "request.order")
    assert "already answered round 2" in text
    # the same round number again, freshly signed, is out of order too
    refused(site, STATS, signed_round({MODEL: COUNT}, key, run_id="6", round_index=2), "6", ProtocolError,
            "request.order")
    # a setup after the rounds began, and a finish numbered at the last round, as well
    refused(site, SETUP, setup_payload(sign_setup(setup_request(key, "6"), key), {}), "6", ProtocolError,
            "request.order")
    refused(site, FINISH, signed_finish(key, run_id="6", round_index=2), "6", ProtocolError, "request.order")
    site_agent.answer(STATS, signed_round({MODEL: COUNT}, key, run_id="6", round_index=3), site, run_id="6")
    site_agent.answer(FINISH, signed_finish(key, run_id="6", round_index=4), site, run_id="6")


def test_a_stale_round_is_refused(key_and_sites: tuple[Ed25519PrivateKey, list[Path]]) -> None:
    key, (site, _) = key_and_sites
    set_up(site, key, "7")
    now = int(time.time())
    old = signed_round({MODEL: COUNT}, key, run_id="7", issued_at=now - 3600)
    text = refused(site, STATS, old, "7", ProtocolError, "request.stale")
    assert f"within {REQUEST_WINDOW:g} s" in text
    ahead = signed_round({MODEL: COUNT}, key, run_id="7", issued_at=now + 2 * int(REQUEST_WINDOW))
    refused(site, STATS, ahead, "7", ProtocolError, "request.stale")
    stale_setup = sign_setup(setup_request(key, "7b").model_copy(update={"issued_at": now - 3600}), key)
    refused(site, SETUP, setup_payload(stale_setup, {}), "7b", ProtocolError, "request.stale")
    # the refused rounds consumed no round number: round 1, fresh, is answered
    assert site_agent.answer(STATS, signed_round({MODEL: COUNT}, key, run_id="7"), site, run_id="7").arrays


def test_a_signed_request_without_a_nonce_is_refused(key_and_sites: tuple[Ed25519PrivateKey, list[Path]]) -> None:
    import base64

    key, (site, _) = key_and_sites
    set_up(site, key, "8")
    request, arrays = encode_job_round({MODEL: COUNT}, run_id="8", round_index=1, num_classes=3)
    request = request.model_copy(update={"issued_at": int(time.time())})  # no nonce, signed as it is
    signature = base64.b64encode(key.sign(request.signing_bytes(arrays))).decode()
    bare = request.model_copy(update={"signature": signature})
    refused(site, STATS, Payload(doc=bare.model_dump(mode="json", by_alias=True), arrays=arrays), "8", ProtocolError,
            "request.nonce")


# --------------------------------------------------------------------------- a whole job


class KeepingExchange(AgentExchange):
    """:class:`AgentExchange` that keeps every payload it carried, for replaying them later."""

    def __init__(self, site_files: list[Path], run_id: str) -> None:
        super().__init__(site_files, run_id)
        self.payloads: list[tuple[str, str, Mapping[int, Payload]]] = []

    def exchange(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> dict[int, Payload]:
        self.payloads.append((query, group, dict(payloads)))
        return super().exchange(query, payloads, group=group)


def test_a_job_runs_and_its_setup_replayed_after_the_finish_is_refused(
        key_and_sites: tuple[Ed25519PrivateKey, list[Path]], tmp_path: Path) -> None:
    key, sites = key_and_sites
    job = job_from_dict({"connection": "unused", "labels": LABELS, "scorers": ["hscore", "gbc"],
                         "privacy": {"dp": False}, "candidates": [{"name": CANDIDATE, "site_features": True}],
                         "output": str(tmp_path / "out"), "purpose": "signed rounds"})
    exchange = KeepingExchange(sites, "9")
    outcome = execute_job(exchange, job, load_candidates(job), key, run_id="9")
    record = outcome.models[MODEL]
    assert record.result is not None and not record.failures
    data = [rows(k) for k in range(2)]
    pooled = fedmte.score(np.vstack([d["features"] for d in data]), np.concatenate([d["labels"] for d in data]),
                          scorers=["hscore", "gbc"])
    for name in ("hscore", "gbc"):
        assert record.result.scores[name] == pytest.approx(pooled[name], rel=1e-9)
    # every request was signed, stamped with its own nonce, in order
    sent = [(query, payloads[100]) for query, _, payloads in exchange.payloads]
    assert [q for q, _ in sent] == [SETUP] + [STATS] * outcome.planned_rounds + [FINISH]
    docs = [p.doc["request"] if q == SETUP else p.doc for q, p in sent]
    assert [d["round"] for d in docs] == list(range(outcome.planned_rounds + 2))
    assert len({d["nonce"] for d in docs}) == len(docs) and all(len(d["nonce"]) == 32 for d in docs)
    assert all(abs(time.time() - d["issued_at"]) < 60 for d in docs)
    JobRoundRequest.parse(sent[1][1].doc)  # what the secure sum's inner decoder parses
    for site in sites:
        assert not any(r.rule.startswith("request.") for r in refusals(site))
        assert verify(load_site_config(site).audit.dir).ok
    # the run is over: its setup, replayed as it was sent, is refused and audited at every site
    setups = exchange.payloads[0][2]  # each site's own signed setup
    for node, site in zip(sorted(exchange.files), sites, strict=True):
        refused(site, SETUP, setups[node], "9", ProtocolError, "request.replay")
    # and so, through the coordinator's exchange, with the rule in every site's answer
    with pytest.raises(FederationError) as caught:
        AgentExchange(sites, "9").exchange(SETUP, setups, group="replay")
    assert all("[request.replay]" in reason for reason in caught.value.failures.values())
    # a round or the finish replayed finds no session: the run is forgotten
    with pytest.raises(ProtocolError, match="has no accepted setup"):
        site_agent.answer(STATS, sent[1][1], sites[0], run_id="9")


# --------------------------------------------------------------------------- inside the secure sum


def test_the_secure_sums_inner_round_is_checked_inside_the_upload(tmp_path: Path) -> None:
    from tests.test_secure_rounds import Federation, job_round, site_rows

    federation = Federation(tmp_path, site_rows(3))
    federation.setup()
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 2)
    request, arrays = job_round()
    unsigned = request.model_copy(update={"signature": ""})  # type: ignore[attr-defined]
    with pytest.raises(FederationError, match="nothing released") as caught:
        aggregator.sum_round(federation.exchange, unsigned, arrays)
    assert caught.value.failures and all("[request.signature]" in reason for reason in caught.value.failures.values())
    for name in federation.names:
        assert [r.rule for r in federation.audit(name) if isinstance(r, RefusalRecord)] == ["request.signature"]
