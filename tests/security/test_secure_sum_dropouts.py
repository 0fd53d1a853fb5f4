"""Finding 2 of the security review (faked dropouts unmask single sites in the secure sum) and
the secure-sum part of finding 5 (replies that left without an audit record), reproduced
against real :class:`~fedmte.client.secure_site.SecureSite` objects, in process.

Each site is a features-kind site file with a ``[secure]`` table
(:func:`fedmte.trial.local_sites.write_site` and :func:`~fedmte.trial.local_sites.provision`,
DP off so that any leak would be exact), answering through its site agent and auditing to
the agent's log, every message through its wire form (:mod:`tests.test_secure_rounds`). The
coordinator is either the honest :class:`~fedmte.server.secure_aggregation.SecureAggregator`
or :class:`ForgingCoordinator`: the party the guarantees are about, holding the key every
site trusts, signing whatever it likes and running the protocol's arithmetic itself.

The attacks, and what the sites now do:

(a) a job with ``self_masks = false`` (declaring an uploaded site dropped then reads it): every
    site refuses it by default, naming the rule ``secure.require_self_masks``;
(b) a dropout after the first masked upload, real or declared: the job aborts, nothing of
    the phase is unmasked, and every site audits the abort;
(c) the same statistics in three phases with another site declared dropped in each
    (``a + b``, ``b + c``, ``a + c``): the coordinator gets the first phase's sum over the
    active set fixed by it and nothing else; a reused job id is refused too;
(d) every byte of every secure-sum reply, error replies included, has an intent with a
    payload copy in the site's audit log before it leaves, and an outcome after; the
    masked upload exactly once; the active and dropped lists a site acted on are recorded.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from fedmte.client.audit_log import verify
from fedmte.client.errors import reply_text
from fedmte.client.secure_site import SecureSite, secure_config
from fedmte.client.site_config import load_site_config
from fedmte.protocol.audit_format import IntentRecord, OutcomeRecord
from fedmte.protocol.errors import (
    BoundExceededError,
    FederationError,
    ProtocolError,
    RefusalError,
    ThresholdError,
)
from fedmte.protocol.fixed_point import FixedPointCodec, SumSpec
from fedmte.protocol.job_messages import wire_bytes
from fedmte.protocol.keys import fingerprint
from fedmte.protocol.secure_rounds import (
    AbortBody,
    AdvertiseBody,
    Envelope,
    RevealBody,
    ShareBody,
    UploadBody,
    sign_request,
)
from fedmte.protocol.secure_sum import (
    Advertisement,
    CoordinatorSecureSum,
    MaskedUpload,
    Reveal,
    SecureSumParams,
    ShareBundle,
)
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.wire import (
    SECURE_ABORT,
    SECURE_ADVERTISE,
    SECURE_REVEAL,
    SECURE_SHARE,
    SECURE_UPLOAD,
    STATS,
    Payload,
)
from fedmte.server.secure_aggregation import load_roster
from tests.test_secure_rounds import (
    DATA,
    ROUND_STATS,
    RUN,
    Federation,
    SecureWireExchange,
    _ring_sum,
    allow_one_round,
    assert_exact_sum,
    job_round,
)

ACTIVE_SET = "secure:active_set_changed"


def split(sites: int) -> list[np.ndarray]:
    return np.array_split(np.arange(len(DATA.labels)), sites)


def aborts(federation: Federation, name: str, job_id: str) -> list[tuple[str, str]]:
    return [(r.reason_code, r.detail) for r in federation.audit(name) if r.kind == "abort" and r.run_id == job_id]


class RecordingExchange(SecureWireExchange):
    """:class:`SecureWireExchange` that also keeps every error reply a site sent (the text the
    site runner puts into Flower's error reply)."""

    def __init__(self, sites: Sequence[SecureSite], site_files: Sequence[Path]) -> None:
        super().__init__(sites, site_files)
        self.errors: list[tuple[str, int, str]] = []

    def gather(self, query: str, payloads: Mapping[int, Payload], *, group: str
               ) -> tuple[dict[int, Payload], dict[str, str]]:
        replies, failures = super().gather(query, payloads, group=group)
        for node, reason in failures.items():
            if int(node) not in self.failing and self.failing_at.get(int(node)) != query:  # the site answered
                self.errors.append((query, int(node), reason))
        return replies, failures


class ForgingCoordinator:
    """A coordinator the sites trust that runs the secure sum by hand: it signs any request
    (with the key of ``[trust.coordinators]``) and computes sums with a fresh
    :class:`CoordinatorSecureSum` per phase, so none of the coordinator's own rules bind it."""

    def __init__(self, federation: Federation, *, phases: int, self_masks: bool = True, job_id: str | None = None):
        self.federation = federation
        self.sites = dict(zip(federation.names, federation.sites))
        self.params = SecureSumParams(job_id=job_id or f"forged-{os.urandom(4).hex()}", sites=tuple(federation.names),
                                      threshold=len(federation.names) // 2 + 1, phases=phases, self_masks=self_masks)
        self.roster = load_roster(federation.spec.roster)
        self.advertisements: list[Advertisement] = []
        self.bundles: list[ShareBundle] = []
        self.routed: dict[str, tuple[ShareBundle, ...]] = {}
        self.uploads: dict[int, dict[str, tuple[SumSpec, np.ndarray]]] = {}
        self.replies: list[tuple[str, str, bytes]] = []
        """(site, step, bytes) of every reply a site sent, error replies included."""

    def send(self, step: str, site: str, body: object, round_: int = 0,
             arrays: Mapping[str, np.ndarray] | None = None) -> Payload:
        key = self.federation.key
        envelope = Envelope(step=step, job_id=self.params.job_id, round=round_, nonce=os.urandom(16).hex(),
                            issued_at=time.time(), signer=fingerprint(key.public_key()),
                            body=body.model_dump(mode="json", by_alias=True))  # type: ignore[attr-defined]
        request = Payload.from_wire(*sign_request(key, envelope, arrays).to_wire())
        try:
            reply = Payload.from_wire(*self.sites[site].handle(step, request).to_wire())
        except Exception as error:
            self.replies.append((site, step, reply_text(error).encode("utf-8")))
            raise
        self.replies.append((site, step, wire_bytes(reply)))
        return reply

    def advertise_body(self) -> AdvertiseBody:
        return AdvertiseBody(params=self.params.model_dump_json(by_alias=True), bounds=self.federation.bounds)

    def setup(self) -> None:
        self.advertisements = [Advertisement.model_validate_json(self.send(SECURE_ADVERTISE, site, self.advertise_body())
                                                                 .doc["advertisement"]) for site in self.sites]
        share = ShareBody(advertisements=[a.model_dump_json(by_alias=True) for a in self.advertisements])
        for site in self.sites:
            self.bundles += [ShareBundle.model_validate_json(text) for text in self.send(SECURE_SHARE, site, share)
                             .doc["bundles"]]
        coordinator = CoordinatorSecureSum(self.params, known_sites=self.roster)
        coordinator.collect_advertisements(self.advertisements)
        self.routed = coordinator.route_shares(self.bundles)

    def coordinator(self) -> CoordinatorSecureSum:
        """A fresh coordinator past the key setup (it remembers no earlier phase)."""
        coordinator = CoordinatorSecureSum(self.params, known_sites=self.roster)
        coordinator.collect_advertisements(self.advertisements)
        coordinator.route_shares(self.bundles)
        return coordinator

    def upload(self, phase: int, stats: Sequence[object] = ROUND_STATS) -> None:
        """Ask every site for the same statistics (the job round of phase 0) in ``phase``."""
        # signed rounds (issue 11): sites answer each round of RUN once, in order; 100 + phase comes
        # after the rounds an honest aggregator ran in RUN before the forger
        request, arrays = job_round(100 + phase, stats=stats)  # type: ignore[arg-type]
        self.uploads[phase] = {}
        for site in self.sites:
            bundles = [b.model_dump_json(by_alias=True) for b in self.routed[site]] if phase == 0 else None
            body = UploadBody(phase=phase, inner_query=STATS, inner_doc=request.model_dump(mode="json", by_alias=True),
                              bundles=bundles)
            reply = self.send(SECURE_UPLOAD, site, body, phase + 1, arrays)
            self.uploads[phase][site] = (SumSpec.model_validate(reply.doc["spec"]),
                                         np.ascontiguousarray(reply.arrays["words"]).view(np.uint64))

    def unmask(self, phase: int, dropped: str) -> tuple[Statistics | None, dict[str, str], list[Reveal]]:
        """Sum every upload but ``dropped``'s, declare it dropped to every site and unmask:
        the sum (``None`` if it could not be unmasked), each site's refusal, the reveals."""
        spec = self.uploads[phase][self.federation.names[0]][0]
        coordinator = self.coordinator()
        coordinator.open_phase(phase, spec)
        for site, (_, words) in self.uploads[phase].items():
            if site != dropped:
                coordinator.add_upload(MaskedUpload(job_id=self.params.job_id, phase=phase, site_id=site,
                                                    spec_digest=spec.digest(), words=words))
        request = coordinator.unmask_request(phase)
        assert request is not None and request.dropped == (dropped,)
        body = RevealBody(unmask=request.model_dump_json(by_alias=True), request_digest=spec.context)
        reveals, refusals = [], {}
        for site in self.sites:
            try:
                reveals.append(Reveal.model_validate_json(self.send(SECURE_REVEAL, site, body, phase + 1).doc["reveal"]))
            except ProtocolError as error:
                refusals[site] = reply_text(error)
        try:
            return coordinator.finish(phase, reveals), refusals, reveals
        except ThresholdError:
            return None, refusals, reveals


# --------------------------------------------------------------------------- (a) self masks


def test_a_job_without_self_masks_is_refused_by_default(tmp_path: Path) -> None:
    federation = Federation(tmp_path, split(3))
    assert all(config.require_self_masks for config in federation.configs.values())  # the default, not written
    assert all("require_self_masks" not in path.read_text() for path in federation.files)
    aggregator = federation.aggregator(self_masks=False)
    with pytest.raises(FederationError, match="only 0 of 3 sites advertised keys") as caught:
        aggregator.begin_job(federation.exchange, 1)
    assert all("require_self_masks = true" in reason for reason in caught.value.failures.values())
    for name, site in zip(federation.names, federation.sites):
        refusals = [r for r in federation.audit(name) if r.kind == "refusal"]
        assert [(r.reason_code, r.rule, r.run_id) for r in refusals] == [
            ("secure:self_masks_required", "secure.require_self_masks", aggregator.job_id)]
        assert not site.jobs
    forger = ForgingCoordinator(federation, phases=1, self_masks=False)
    with pytest.raises(RefusalError) as refused:
        forger.send(SECURE_ADVERTISE, "site0", forger.advertise_body())
    assert refused.value.rule == "secure.require_self_masks" and refused.value.reason_code == "secure:self_masks_required"
    # the data owner's explicit opt-in in the site file is the only way in
    allow_one_round(federation.files[1])
    forger.sites["site1"] = federation.fresh_site("site1", secure_config(load_site_config(federation.files[1])))
    assert "advertisement" in forger.send(SECURE_ADVERTISE, "site1", forger.advertise_body()).doc
    with_self_masks = ForgingCoordinator(federation, phases=1)
    assert "advertisement" in with_self_masks.send(SECURE_ADVERTISE, "site2", with_self_masks.advertise_body()).doc


# --------------------------------------------------------------------------- (b) dropouts after the first upload


def test_a_site_lost_after_the_first_upload_aborts_the_job_and_every_site_audits_it(tmp_path: Path) -> None:
    federation = Federation(tmp_path, split(5))
    federation.setup()
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 2)
    request, arrays = job_round()
    first = aggregator.sum_round(federation.exchange, request, arrays)
    assert_exact_sum(first, federation.files, ROUND_STATS, aggregator.uploads_received[0][3], 5)
    assert aggregator.summary()["active"] == federation.names and aggregator.summary()["dropped"] == []
    lost = federation.exchange.node_of("site2")
    federation.exchange.failing_at[lost] = SECURE_UPLOAD  # four uploads: above the threshold of 3
    request, arrays = job_round(2)
    with pytest.raises(FederationError, match=r"nothing released: \['site2'\] did not upload phase 1") as caught:
        aggregator.sum_round(federation.exchange, request, arrays)
    assert "secure_upload: no reply" in caught.value.failures["site2"]  # the first reason stays
    sent = [query for query, _ in federation.exchange.sent]
    assert sent.count(SECURE_UPLOAD) == 2 and sent.count(SECURE_REVEAL) == 1  # phase 1 was never unmasked
    assert sent[-1] == SECURE_ABORT
    for name, site in zip(federation.names, federation.sites):  # site2 included: it still holds the job's keys
        assert [code for code, _ in aborts(federation, name, aggregator.job_id)] == [ACTIVE_SET], name
        assert aggregator.job_id not in site.jobs
        assert verify(federation.dirs[name] / "audit").ok
    with pytest.raises(ProtocolError, match="was aborted"):
        aggregator.sum_round(federation.exchange, request, arrays)


def test_a_site_lost_at_the_first_reveal_stops_the_job_before_the_next_phase_is_asked(tmp_path: Path) -> None:
    # Its upload is in phase 0's sum (the others reveal its seed); the next phase would sum
    # one site fewer, so the coordinator aborts before any site computes anything for it.
    federation = Federation(tmp_path, split(5))
    federation.setup()
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 2)
    federation.exchange.failing_at[federation.exchange.node_of("site4")] = SECURE_REVEAL
    request, arrays = job_round()
    aggregator.sum_round(federation.exchange, request, arrays)
    request, arrays = job_round(2)
    with pytest.raises(FederationError, match=r"\['site4'\] failed after the job's active set was fixed"):
        aggregator.sum_round(federation.exchange, request, arrays)
    assert [query for query, _ in federation.exchange.sent].count(SECURE_UPLOAD) == 1
    for name in federation.names:
        assert [code for code, _ in aborts(federation, name, aggregator.job_id)] == [ACTIVE_SET], name


def test_a_dropout_the_coordinator_declares_after_the_first_upload_aborts_at_every_site(tmp_path: Path) -> None:
    # Phase 0 ran with everyone; in phase 1 every site uploads, but the (forged) unmask
    # request declares site2 dropped. Each site refuses it, audits the refusal with both
    # lists, aborts the job and forgets its keys; nothing of phase 1 is unmasked.
    federation = Federation(tmp_path, split(3))
    federation.setup()
    forger = ForgingCoordinator(federation, phases=2)
    forger.setup()
    forger.upload(0)
    coordinator = forger.coordinator()
    spec = forger.uploads[0]["site0"][0]
    coordinator.open_phase(0, spec)
    for site, (_, words) in forger.uploads[0].items():
        coordinator.add_upload(MaskedUpload(job_id=forger.params.job_id, phase=0, site_id=site,
                                            spec_digest=spec.digest(), words=words))
    everyone = coordinator.unmask_request(0)
    body = RevealBody(unmask=everyone.model_dump_json(by_alias=True), request_digest=spec.context)
    reveals = [Reveal.model_validate_json(forger.send(SECURE_REVEAL, site, body, 1).doc["reveal"]) for site in forger.sites]
    assert_exact_sum(coordinator.finish(0, reveals), federation.files, ROUND_STATS, spec, 3)
    forger.upload(1)
    total, refusals, got = forger.unmask(1, dropped="site2")
    assert total is None and not got and set(refusals) == set(federation.names)
    for name, site in zip(federation.names, federation.sites):
        assert "ActiveSetError" in refusals[name] and "would change sides" in refusals[name]
        refusal = [r for r in federation.audit(name) if r.kind == "refusal" and r.run_id == forger.params.job_id]
        assert [(r.reason_code, r.rule) for r in refusal] == [(ACTIVE_SET, "active_set_fixed")]
        assert "names active ['site0', 'site1'], dropped ['site2']" in refusal[0].message
        assert "fixed at active ['site0', 'site1', 'site2'], dropped []" in refusal[0].message
        [(code, detail)] = aborts(federation, name, forger.params.job_id)
        assert code == ACTIVE_SET and "dropped ['site2']" in detail
        assert forger.params.job_id not in site.jobs
    with pytest.raises(ProtocolError, match="no secure-sum state"):  # the job is gone at every site
        forger.send(SECURE_REVEAL, "site0", body, 1)


# --------------------------------------------------------------------------- (c) three phases, three dropped sites


def test_three_phases_with_another_site_declared_dropped_give_only_the_first_sum(tmp_path: Path) -> None:
    federation = Federation(tmp_path, split(3))
    federation.setup()
    a, b, c = federation.names
    forger = ForgingCoordinator(federation, phases=3)
    forger.setup()
    for phase in range(3):  # the same statistics, three times, every site uploading each time
        forger.upload(phase)
    # P0 = a + b: site2 declared dropped although its upload arrived. That is the first
    # phase's sum over the active set it fixes, which the protocol releases.
    p0, refused0, _ = forger.unmask(0, dropped=c)
    assert p0 is not None and set(refused0) == {c} and "this site is listed as dropped" in refused0[c]
    assert_exact_sum(p0, [federation.files[0], federation.files[1]], ROUND_STATS, forger.uploads[0][a][0], 3)
    # P1 = b + c (with P2 = a + c, every site's statistics): a and b refuse and leave the
    # job; c's lone reveal is one share of each secret, below the threshold of 2.
    p1, refused1, got1 = forger.unmask(1, dropped=a)
    assert p1 is None and set(refused1) == {a, b} and [r.site_id for r in got1] == [c]
    assert all("ActiveSetError" in refused1[name] for name in (a, b))
    # P2 = a + c: a and b hold nothing of the job any more, and c refuses a second active set.
    p2, refused2, got2 = forger.unmask(2, dropped=b)
    assert p2 is None and not got2 and set(refused2) == {a, b, c}
    assert all("no secure-sum state" in refused2[name] for name in (a, b)) and "ActiveSetError" in refused2[c]
    # What the coordinator holds of phases 1 and 2 does not decode, not even all three uploads
    # added up: the self masks stay in, and no t sites revealed their seeds.
    for phase in (1, 2):
        spec = forger.uploads[phase][a][0]
        with pytest.raises(BoundExceededError, match="a mask was not removed"):
            FixedPointCodec(spec, max_sites=3).decode(_ring_sum([w for _, w in forger.uploads[phase].values()]),
                                                      summed=3)
    for name in federation.names:  # every site audited the abort, naming the active set change
        assert [code for code, _ in aborts(federation, name, forger.params.job_id)] == [ACTIVE_SET], name
    assert all(forger.params.job_id not in site.jobs for site in federation.sites)
    # The same job id cannot be set up again to ask the same phases under other lists
    # (fresh masks, same request digests): every site refuses it, restarted or not.
    again = ForgingCoordinator(federation, phases=3, job_id=forger.params.job_id)
    for name in federation.names:
        with pytest.raises(RefusalError, match="a job id is accepted once") as caught:
            again.send(SECURE_ADVERTISE, name, again.advertise_body())
        assert caught.value.rule == "job_id"
    again.sites[a] = federation.fresh_site(a)  # the ids survive a restart (state_dir)
    with pytest.raises(RefusalError, match="accepted once"):
        again.send(SECURE_ADVERTISE, a, again.advertise_body())


def test_the_honest_coordinator_sums_later_phases_over_the_first_phases_survivors(tmp_path: Path) -> None:
    # A dropout *in* the first phase is what the secure sum tolerates: the later phases go on
    # with exactly that active set, and the sites' reveals name it every time.
    federation = Federation(tmp_path, split(5))
    federation.setup()
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 3)
    federation.exchange.failing.add(federation.exchange.node_of("site1"))
    for round_index in (1, 2, 3):
        request, arrays = job_round(round_index)
        total = aggregator.sum_round(federation.exchange, request, arrays)
        survivors = [path for name, path in zip(federation.names, federation.files) if name != "site1"]
        assert_exact_sum(total, survivors, ROUND_STATS, aggregator.uploads_received[-1][3], 5)
    active = [name for name in federation.names if name != "site1"]
    assert aggregator.summary()["active"] == active and aggregator.summary()["dropped"] == ["site1"]
    for name in active:
        reveals = [r for r in federation.audit(name)
                   if isinstance(r, IntentRecord) and r.purpose.startswith("secure sum reveal")]
        assert len(reveals) == 3 and all(f"active {active}" in r.purpose and "dropped ['site1']" in r.purpose
                                         for r in reveals)


# --------------------------------------------------------------------------- (d) every reply audited


def _audited(federation: Federation, name: str) -> tuple[dict[str, list[IntentRecord]], dict[int, str]]:
    """The site's intents by payload sha256, and the outcome status of each intent."""
    intents: dict[str, list[IntentRecord]] = {}
    outcomes: dict[int, str] = {}
    for record in federation.audit(name):
        if isinstance(record, IntentRecord):
            intents.setdefault(record.payload.sha256, []).append(record)
        elif isinstance(record, OutcomeRecord):
            outcomes[record.intent_seq] = record.status
    return intents, outcomes


def _assert_audited(federation: Federation, name: str, data: bytes, *, once: bool = False) -> IntentRecord:
    sha = hashlib.sha256(data).hexdigest()
    intents, outcomes = _audited(federation, name)
    assert sha in intents, f"{name}: a reply of {len(data)} bytes left without an audit intent"
    copy = (federation.dirs[name] / "audit" / "payloads" / f"{sha}.bin").read_bytes()
    assert copy == data  # the payload copy is the exact bytes that left
    assert all(outcomes.get(intent.seq) == "sent" for intent in intents[sha])  # and an outcome after
    if once:
        assert len(intents[sha]) == 1, f"{name}: recorded {len(intents[sha])} times"
    return intents[sha][0]


def test_every_byte_of_every_secure_sum_reply_is_in_the_sites_audit_log(tmp_path: Path) -> None:
    federation = Federation(tmp_path, split(3))
    federation.exchange = exchange = RecordingExchange(federation.sites, federation.files)
    federation.setup()
    aggregator = federation.aggregator()
    aggregator.begin_job(exchange, 2)
    for round_index in (1, 2):
        request, arrays = job_round(round_index)
        aggregator.sum_round(exchange, request, arrays)
    # error replies: a replayed request, a reveal for an unknown job, a forged declared dropout
    replayed = sign_request(federation.key, Envelope(
        step=SECURE_ABORT, job_id=aggregator.job_id, round=0, nonce=os.urandom(16).hex(), issued_at=time.time(),
        signer=fingerprint(federation.key.public_key()), body=AbortBody(reason_code="test").model_dump(mode="json")))
    node = exchange.node_of("site0")
    exchange.gather(SECURE_ABORT, {node: replayed}, group="abort-1")
    exchange.gather(SECURE_ABORT, {node: replayed}, group="abort-replayed")
    forger = ForgingCoordinator(federation, phases=2)
    forger.setup()
    forger.upload(0)
    forger.upload(1)
    forger.unmask(0, dropped="site2")
    forger.unmask(1, dropped="site0")
    queries = {query for query, _, _ in exchange.received}
    assert {SECURE_ADVERTISE, SECURE_SHARE, SECURE_UPLOAD, SECURE_REVEAL, SECURE_ABORT} <= queries
    assert {query for query, _, _ in exchange.errors} == {SECURE_ABORT}
    names = {node: site.config.site_id for node, site in exchange.sites.items()}
    for query, node, reply in exchange.received:
        if query.startswith("secure_"):
            intent = _assert_audited(federation, names[node], wire_bytes(reply), once=query == SECURE_UPLOAD)
            # the upload's intent is the site agent's, under the job's run; the others the secure job's
            assert intent.run_id == (RUN if query == SECURE_UPLOAD else aggregator.job_id)
            assert intent.requester == fingerprint(federation.key.public_key())
            assert intent.recipient == "coordinator:coordinator"
            if query == SECURE_REVEAL:
                assert reply.doc["active"] == federation.names and reply.doc["dropped"] == []
                assert f"active {federation.names} and of the mask keys of dropped []" in intent.purpose
            if query == SECURE_UPLOAD:
                assert reply.doc["masked_with"] == federation.names
    for query, node, reason in exchange.errors:
        assert "was seen before" in reason
        _assert_audited(federation, names[node], reason.encode("utf-8"))
    assert {step for _, step, _ in forger.replies} == {SECURE_ADVERTISE, SECURE_SHARE, SECURE_UPLOAD, SECURE_REVEAL}
    for site, step, data in forger.replies:  # the forged job's replies and error replies alike
        _assert_audited(federation, site, data, once=step == SECURE_UPLOAD)
    # the forged job's replies and refusals, seen from the site that answered them
    for name in federation.names:
        purposes = [r.purpose for r in federation.audit(name)
                    if isinstance(r, IntentRecord) and r.run_id == forger.params.job_id]
        assert any(p.startswith("secure sum setup: signed public keys") for p in purposes)
        assert any(p.startswith("secure sum setup: Shamir shares") for p in purposes)
        assert any(p == "secure sum secure_reveal: error reply" for p in purposes)
    site0 = [r for r in federation.audit("site0") if isinstance(r, IntentRecord) and r.run_id == forger.params.job_id]
    reveal = next(r for r in site0 if r.purpose.startswith("secure sum reveal"))
    assert "active ['site0', 'site1'] and of the mask keys of dropped ['site2']" in reveal.purpose
    for name in federation.names:
        assert verify(federation.dirs[name] / "audit").ok
