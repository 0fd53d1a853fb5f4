"""The secure sum inside the federation, without Flower processes.

Sites are :class:`~fedmte.client.secure_site.SecureSite` objects configured from their own
``secure.toml`` files (identity keys, pinned coordinator key, roster, audit log), and every
message passes through the wire form Flower carries (``Payload.to_wire``/``from_wire``), as
in ``test_federation_rounds.py``. A site that raises answers with an error, which the
coordinator sees as that site failing the step, exactly as over Flower.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedmte.client.audit_log import read_records, verify
from fedmte.client.queries import answer
from fedmte.client.secure_site import (
    SecureSite,
    check_plain_statistics_allowed,
    load_secure_config,
    site_statistics,
)
from fedmte.protocol.errors import (
    BoundExceededError,
    FederationError,
    FedmteError,
    ProtocolError,
    RefusalError,
    VerificationError,
)
from fedmte.protocol.fixed_point import FixedPointCodec, SumSpec
from fedmte.protocol.inputs import check_inputs
from fedmte.protocol.local import InMemorySite
from fedmte.protocol.messages import encode_round
from fedmte.protocol.plan import execute, make_plan
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers import NOT_FEDERABLE, SCORERS
from fedmte.protocol.keys import fingerprint
from fedmte.protocol.secure_rounds import (
    AdvertiseBody,
    DeclaredBounds,
    Envelope,
    RevealBody,
    round_sum_spec,
    sign_request,
)
from fedmte.protocol.secure_sum import SecureSumParams, UnmaskRequest
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.wire import (
    DESCRIBE,
    SECURE_ADVERTISE,
    SECURE_REVEAL,
    SECURE_SHARE,
    SECURE_UPLOAD,
    STATS,
    Payload,
)
from fedmte.server.rounds import run_scoring
from fedmte.server.secure_aggregation import (
    SecureAggregator,
    load_coordinator_key,
    load_roster,
    provision,
)

from fedmte.server.site_probe import probe_sites

import fedmte
from tests.datasets import DATASETS, site_split_without_class

DATA = DATASETS["basic"]
SCORERS_USED = ["hscore", "leep", "gbc", "logme", "nce", "sfda"]
ROUND_STATS = [Stat.of("count"), Stat.of("class_counts"), Stat.of("class_sums"), Stat.of("gram")]

Intercept = Callable[[str, int, Payload], Payload]


class SecureWireExchange:
    """Nodes 100, 101, ... answering through the wire form; any node can be made to fail."""

    def __init__(self, sites: Sequence[SecureSite], data: Sequence[Path]) -> None:
        self.sites = {100 + k: site for k, site in enumerate(sites)}
        self.data = {100 + k: path for k, path in enumerate(data)}
        self.failing: set[int] = set()
        self.failing_at: dict[int, str] = {}  # node -> the one query it does not answer
        self.intercept: Intercept | None = None
        self.sent: list[tuple[str, str]] = []
        self.received: list[tuple[str, int, Payload]] = []

    @property
    def nodes(self) -> Sequence[int]:
        return sorted(self.sites)

    def node_of(self, site_id: str) -> int:
        return next(node for node, site in self.sites.items() if site.config.site_id == site_id)

    def gather(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> tuple[dict[int, Payload], dict[str, str]]:
        self.sent.append((query, group))
        replies, failures = {}, {}
        for node, payload in payloads.items():
            if node in self.failing or self.failing_at.get(node) == query:
                failures[str(node)] = "no reply within 5 s"
                continue
            if self.intercept is not None:
                payload = self.intercept(query, node, payload)
            received = Payload.from_wire(*payload.to_wire())
            try:
                if query.startswith("secure_"):
                    reply = self.sites[node].handle(query, received)
                else:
                    reply = answer(query, received, self.data[node])
            except FedmteError as error:
                failures[str(node)] = f"{type(error).__name__}: {error}"
                continue
            replies[node] = Payload.from_wire(*reply.to_wire())
            self.received.append((query, node, replies[node]))
        return replies, failures

    def exchange(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> dict[int, Payload]:
        replies, failures = self.gather(query, payloads, group=group)
        if failures:
            raise FederationError(f"round {group} failed", failures=failures)
        return replies


class Federation:
    """N sites with their own files, a coordinator key and the roster, on disk under ``root``."""

    def __init__(self, root: Path, rows: Sequence[np.ndarray], *, self_masks: bool = True,
                 bounds: DeclaredBounds | None = None) -> None:
        self.names = [f"site{k}" for k in range(len(rows))]
        self.dirs = {name: root / name for name in self.names}
        self.data: list[Path] = []
        for name, idx in zip(self.names, rows):
            self.dirs[name].mkdir(parents=True)
            path = self.dirs[name] / "data.npz"
            np.savez(path, features=DATA.features[idx], labels=DATA.labels[idx], source_probs=DATA.source_probs[idx])
            self.data.append(path)
        norm = float(np.max(np.linalg.norm(DATA.features, axis=1)))
        self.bounds = bounds or DeclaredBounds(max_rows=len(DATA.labels), feature_norm=norm)
        self.spec = provision(self.dirs, root / "coordinator.pem", bounds=self.bounds, self_masks=self_masks)
        self.configs = {name: load_secure_config(self.dirs[name] / "secure.toml") for name in self.names}
        self.sites = [SecureSite(self.configs[name], compute=site_statistics(path))
                      for name, path in zip(self.names, self.data)]
        self.exchange = SecureWireExchange(self.sites, self.data)
        self.key = load_coordinator_key(self.spec.signing_key)

    def aggregator(self, **overrides: object) -> SecureAggregator:
        settings: dict[str, object] = {"signing_key": self.key, "roster": load_roster(self.spec.roster),
                                       "bounds": self.bounds, "self_masks": self.spec.self_masks, "keep_uploads": True}
        settings.update(overrides)
        return SecureAggregator(**settings)  # type: ignore[arg-type]

    def audit(self, name: str) -> list[object]:
        return read_records(self.dirs[name] / "audit")


def site_rows(sites: int) -> list[np.ndarray]:
    return site_split_without_class(DATA, absent=0, sites=sites)


def plain_statistics(paths: Sequence[Path], stats: Sequence[Stat]) -> Statistics:
    request, arrays = encode_round(stats, round_index=1, num_classes=DATA.num_classes)
    payload = Payload(doc=request.model_dump(mode="json"), arrays=arrays)
    total = Statistics.empty()
    for path in paths:
        total = total + Statistics.from_arrays(answer(STATS, payload, path).arrays)
    return total


def assert_exact_sum(total: Statistics, paths: Sequence[Path], stats: Sequence[Stat], spec: SumSpec, sites: int) -> None:
    """Int blocks equal; float blocks within the codec's bound of the exactly rounded sum (fsum)."""
    parts = []
    request, arrays = encode_round(stats, round_index=1, num_classes=DATA.num_classes)
    payload = Payload(doc=request.model_dump(mode="json"), arrays=arrays)
    for path in paths:
        parts.append(Statistics.from_arrays(answer(STATS, payload, path).arrays))
    codec = FixedPointCodec(spec, max_sites=sites)
    assert set(total) == {stat.key for stat in stats}
    for key in total:
        if total[key].dtype == np.int64:
            assert np.array_equal(total[key], sum(part[key] for part in parts)), key
            continue
        exact = np.array([math.fsum(values) for values in zip(*(part[key].ravel() for part in parts))])
        error = np.abs(total[key].ravel() - exact)
        assert np.all(error <= codec.error_bound(key, summed=len(parts), value=exact)), key


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("self_masks", [True, False], ids=["self-masks", "one-round"])
def test_secure_scores_equal_pooled_scores_with_the_stated_round_trips(tmp_path: Path, self_masks: bool) -> None:
    federation = Federation(tmp_path, site_rows(3), self_masks=self_masks)
    aggregator = federation.aggregator()
    outcome = run_scoring(federation.exchange, scorers=SCORERS_USED, num_classes=DATA.num_classes, aggregator=aggregator)
    pooled = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS_USED)
    for name in SCORERS_USED:
        assert outcome.result.scores[name] == pytest.approx(pooled[name], rel=1e-6), name
    rounds = outcome.plan.rounds
    per_phase = [SECURE_UPLOAD, SECURE_REVEAL] if self_masks else [SECURE_UPLOAD]
    assert [query for query, _ in federation.exchange.sent] == \
        [DESCRIBE, SECURE_ADVERTISE, SECURE_SHARE] + per_phase * rounds
    assert aggregator.failures == {} and set(aggregator.sites) == set(federation.names)


def test_every_statistic_of_every_scorer_fits_its_public_bound() -> None:
    # Rows at the declared norm and a site at the declared row count are the worst case the
    # bounds must hold for; every request of every federable scorer (iterative ones included)
    # is encoded at each site and the decoded sum equals the plain one.
    features = DATA.features / np.linalg.norm(DATA.features, axis=1, keepdims=True) * 3.0
    inputs = check_inputs(features, DATA.labels, source_probs=DATA.source_probs)
    rows = site_rows(3)
    sites = [InMemorySite(inputs, idx) for idx in rows]
    bounds = DeclaredBounds(max_rows=max(len(idx) for idx in rows), feature_norm=3.0)
    checked: set[str] = set()

    def aggregate(requests: Sequence[Stat]) -> Statistics:
        stats = list({stat.key: stat for stat in requests}.items())
        parts = [site.compute(requests) for site in sites]
        spec = round_sum_spec(stats, parts[0], bounds, context="")
        codec = FixedPointCodec(spec, max_sites=len(sites))
        total = sum(parts[1:], parts[0])
        decoded = codec.decode(_ring_sum([codec.encode(part) for part in parts]), summed=len(parts))
        for key in total:
            np.testing.assert_allclose(decoded[key], total[key], rtol=1e-9, atol=1e-9 * (1 + np.abs(total[key]).max()))
        checked.update(stat.kind for _, stat in stats)
        return total

    names = [name for name in SCORERS if name not in NOT_FEDERABLE]
    plan = make_plan(names, has_features=True, has_source_probs=True)
    execute(plan, aggregate, dim=inputs.dim, num_classes=inputs.num_classes, num_source_classes=inputs.num_source_classes)
    assert len(checked) >= 15, sorted(checked)


def _ring_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    from fedmte.protocol.fixed_point import ring_add

    total = np.array(vectors[0], copy=True)
    for vector in vectors[1:]:
        ring_add(total, vector)
    return total


# --------------------------------------------------------------------------- what the coordinator sees


def test_the_coordinator_receives_only_masked_uploads(tmp_path: Path) -> None:
    federation = Federation(tmp_path, site_rows(3))
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 1)
    request, arrays = encode_round(ROUND_STATS, round_index=1, num_classes=DATA.num_classes)
    total = aggregator.sum_round(federation.exchange, request, arrays)
    assert_exact_sum(total, federation.data, ROUND_STATS, aggregator.uploads_received[0][3], 3)
    uploads = aggregator.uploads_received
    assert sorted(site for site, *_ in uploads) == federation.names
    for site, phase, words, spec in uploads:
        node = federation.exchange.node_of(site)
        plain = plain_statistics([federation.exchange.data[node]], ROUND_STATS)
        codec = FixedPointCodec(spec, max_sites=3)
        encoded = codec.encode(plain)
        assert words.shape == encoded.shape and phase == 0
        assert np.mean(words == encoded) < 0.01  # uniformly random words: a match is a 2^-64 event
        with pytest.raises(BoundExceededError, match="a mask was not removed"):
            codec.decode(words, summed=1)
    # every message the coordinator received: nothing but masked words, specs and key material
    for query, _, reply in federation.exchange.received:
        if query == SECURE_UPLOAD:
            assert set(reply.arrays) == {"words"} and reply.arrays["words"].dtype == np.int64
        elif query.startswith("secure_"):
            assert not reply.arrays
    # and the sum of the uploads alone, without the sites' reveals, does not decode either
    codec = FixedPointCodec(uploads[0][3], max_sites=3)
    with pytest.raises(BoundExceededError, match="a mask was not removed"):
        codec.decode(_ring_sum([words for _, _, words, _ in uploads]), summed=3)


# --------------------------------------------------------------------------- dropout and abort


@pytest.mark.parametrize("self_masks", [True, False], ids=["self-masks", "one-round"])
def test_a_dropout_after_key_sharing_gives_the_exact_sum_of_the_survivors(tmp_path: Path, self_masks: bool) -> None:
    federation = Federation(tmp_path, np.array_split(np.arange(len(DATA.labels)), 5), self_masks=self_masks)
    aggregator = federation.aggregator()
    assert aggregator.threshold == 3
    aggregator.begin_job(federation.exchange, 2)
    dropped = federation.exchange.node_of("site2")
    federation.exchange.failing.add(dropped)
    request, arrays = encode_round(ROUND_STATS, round_index=1, num_classes=DATA.num_classes)
    total = aggregator.sum_round(federation.exchange, request, arrays)
    survivors = [path for node, path in sorted(federation.exchange.data.items()) if node != dropped]
    assert_exact_sum(total, survivors, ROUND_STATS, aggregator.uploads_received[0][3], 5)
    assert int(total[ROUND_STATS[0].key]) == sum(len(np.load(p)["labels"]) for p in survivors)
    assert set(aggregator.failures) == {"site2"} and "no reply" in aggregator.failures["site2"]
    # the recovery step ran (it is the only way the masks shared with site2 leave the sum)
    assert [q for q, _ in federation.exchange.sent[-2:]] == [SECURE_UPLOAD, SECURE_REVEAL]
    # the next phase goes on without site2, and is exact again
    request, arrays = encode_round(ROUND_STATS, round_index=2, num_classes=DATA.num_classes)
    again = aggregator.sum_round(federation.exchange, request, arrays)
    assert_exact_sum(again, survivors, ROUND_STATS, aggregator.uploads_received[-1][3], 5)


def test_a_site_lost_between_upload_and_reveal_is_still_in_the_sum(tmp_path: Path) -> None:
    # Its upload arrived, so the others reveal its self-mask seed (never its mask key).
    federation = Federation(tmp_path, np.array_split(np.arange(len(DATA.labels)), 5))
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 1)
    federation.exchange.failing_at[federation.exchange.node_of("site4")] = SECURE_REVEAL
    request, arrays = encode_round(ROUND_STATS, round_index=1, num_classes=DATA.num_classes)
    total = aggregator.sum_round(federation.exchange, request, arrays)
    assert_exact_sum(total, federation.data, ROUND_STATS, aggregator.uploads_received[0][3], 5)
    assert set(aggregator.failures) == {"site4"}


def test_below_the_threshold_the_job_aborts_releases_nothing_and_survivors_audit_it(tmp_path: Path) -> None:
    federation = Federation(tmp_path, np.array_split(np.arange(len(DATA.labels)), 5))
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 1)
    lost = {"site0", "site3", "site4"}
    federation.exchange.failing |= {federation.exchange.node_of(name) for name in lost}
    request, arrays = encode_round(ROUND_STATS, round_index=1, num_classes=DATA.num_classes)
    with pytest.raises(FederationError, match="secure sum aborted, nothing released: only 2 of 5 sites uploaded") as caught:
        aggregator.sum_round(federation.exchange, request, arrays)
    assert set(caught.value.failures) == lost
    assert federation.exchange.sent[-1][0] == "secure_abort"
    for name, site in zip(federation.names, federation.sites):
        aborts = [r for r in federation.audit(name) if r.kind == "abort"] if (federation.dirs[name] / "audit").exists() else []
        if name in lost:
            assert not aborts and aggregator.job_id in site.jobs  # never heard of the abort
        else:
            assert [(r.run_id, r.reason_code) for r in aborts] == [(aggregator.job_id, "secure:below_threshold")]
            assert "only 2 of 5 sites uploaded" in aborts[0].detail
            assert aggregator.job_id not in site.jobs  # keys and shares forgotten
            assert verify(federation.dirs[name] / "audit").ok
    with pytest.raises(ProtocolError, match="was aborted"):
        aggregator.sum_round(federation.exchange, request, arrays)


def test_too_few_sites_at_setup_abort_before_any_statistics(tmp_path: Path) -> None:
    federation = Federation(tmp_path, site_rows(3))
    federation.exchange.failing |= {100, 101}
    aggregator = federation.aggregator()
    with pytest.raises(FederationError, match="only 1 of 3 sites advertised keys"):
        aggregator.begin_job(federation.exchange, 1)
    assert SECURE_UPLOAD not in {q for q, _ in federation.exchange.sent}
    assert [r.reason_code for r in federation.audit("site2") if r.kind == "abort"] == ["secure:below_threshold"]


def test_a_site_beyond_the_declared_rows_refuses_with_a_bound_error(tmp_path: Path) -> None:
    rows = site_rows(3)
    bounds = DeclaredBounds(max_rows=min(len(idx) for idx in rows[1:]) - 1, feature_norm=100.0)
    federation = Federation(tmp_path, rows, bounds=bounds)
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 1)
    request, arrays = encode_round(ROUND_STATS, round_index=1, num_classes=DATA.num_classes)
    with pytest.raises(FederationError, match="nothing released") as caught:
        aggregator.sum_round(federation.exchange, request, arrays)
    reasons = caught.value.failures
    assert {"site1", "site2"} <= set(reasons)
    assert all("BoundExceededError" in reasons[name] and "beyond its public bound" in reasons[name]
               for name in ("site1", "site2"))


# --------------------------------------------------------------------------- refusals


def _advertise(federation: Federation, key: Ed25519PrivateKey, *, issued_at: float | None = None,
               job_id: str = "job-refusals") -> Payload:
    import time

    params = SecureSumParams(job_id=job_id, sites=tuple(federation.names), threshold=2, phases=1)
    envelope = Envelope(step=SECURE_ADVERTISE, job_id=job_id, round=0, nonce=os.urandom(16).hex(),
                        issued_at=time.time() if issued_at is None else issued_at,
                        signer=fingerprint(key.public_key()),
                        body=AdvertiseBody(params=params.model_dump_json(by_alias=True),
                                           bounds=federation.bounds).model_dump(mode="json"))
    return sign_request(key, envelope)


def test_replayed_tampered_stale_and_unknown_signer_requests_are_refused_and_audited(tmp_path: Path) -> None:
    federation = Federation(tmp_path, site_rows(3))
    site = federation.sites[0]
    first = _advertise(federation, federation.key)
    assert "advertisement" in site.handle(SECURE_ADVERTISE, first).doc
    with pytest.raises(ProtocolError, match="was seen before: a replayed request is refused"):
        site.handle(SECURE_ADVERTISE, Payload.from_wire(*first.to_wire()))

    tampered = _advertise(federation, federation.key, job_id="job-tampered")
    doc = {"envelope": dict(tampered.doc["envelope"], job_id="job-other"), "signature": tampered.doc["signature"]}
    with pytest.raises(VerificationError, match="does not verify: the message was altered"):
        site.handle(SECURE_ADVERTISE, Payload(doc=doc))
    extra_array = Payload(doc=tampered.doc, arrays={"x": np.zeros(2)})
    with pytest.raises(VerificationError, match="does not verify"):
        site.handle(SECURE_ADVERTISE, extra_array)

    stranger = Ed25519PrivateKey.generate()
    with pytest.raises(VerificationError, match="unknown coordinator key"):
        site.handle(SECURE_ADVERTISE, _advertise(federation, stranger, job_id="job-stranger"))

    with pytest.raises(ProtocolError, match="accepts requests within 600 s"):
        site.handle(SECURE_ADVERTISE, _advertise(federation, federation.key, issued_at=1.0e9, job_id="job-old"))

    with pytest.raises(ProtocolError, match="arrived as 'secure_share'"):
        site.handle(SECURE_SHARE, _advertise(federation, federation.key, job_id="job-wrong-step"))

    refusals = [r for r in federation.audit("site0") if r.kind == "refusal"]
    assert [r.reason_code for r in refusals] == [
        "secure:replay", "secure:bad_request", "secure:bad_request", "secure:unknown_signer", "secure:stale",
        "secure:bad_request",
    ]
    assert refusals[3].rule == "coordinators"
    assert site.jobs == ("job-refusals",)  # only the genuine request set anything up
    # the nonce survives a restart of the site (state_dir), so the replay stays refused
    restarted = SecureSite(federation.configs["site0"], compute=site_statistics(federation.data[0]))
    with pytest.raises(ProtocolError, match="replayed"):
        restarted.handle(SECURE_ADVERTISE, first)


def test_a_job_declaring_bounds_below_a_sites_floors_is_refused_before_any_data_is_read(tmp_path: Path) -> None:
    # Floors stop a coordinator from learning a site's row count by declaring ever smaller
    # max_rows: whether the site takes part depends on public values only.
    federation = Federation(tmp_path, site_rows(3))
    probing = federation.aggregator(bounds=federation.bounds.model_copy(update={"max_rows": 10}))
    with pytest.raises(FederationError, match="advertised keys") as caught:
        probing.begin_job(federation.exchange, 1)
    assert all("declares max_rows = 10, below this site's floor 240" in r for r in caught.value.failures.values())
    refusals = [r for r in federation.audit("site0") if r.kind == "refusal"]
    assert [(r.reason_code, r.rule) for r in refusals] == [("secure:bounds_below_floor", "min_declared_rows")]


def test_a_job_naming_a_site_outside_the_sites_own_roster_is_refused(tmp_path: Path) -> None:
    federation = Federation(tmp_path, site_rows(3))
    outsider = Ed25519PrivateKey.generate()
    roster = load_roster(federation.spec.roster)
    roster["site9"] = outsider.public_key()
    aggregator = federation.aggregator(roster=roster)
    with pytest.raises(FederationError, match="sites advertised keys") as caught:
        aggregator.begin_job(federation.exchange, 1)
    assert all("does not know: ['site9']" in reason for reason in caught.value.failures.values())


def test_requests_that_differ_between_sites_cannot_be_summed(tmp_path: Path) -> None:
    # A coordinator that signs another statistics request for one site: that site masks under
    # another request digest, so its masks would not cancel; the honest aggregator leaves it
    # out (a dropout, recovered) and the site refuses to reveal shares for the other digest.
    federation = Federation(tmp_path, site_rows(3))
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 1)
    victim = federation.exchange.node_of("site1")

    def equivocate(query: str, node: int, payload: Payload) -> Payload:
        if query != SECURE_UPLOAD or node != victim:
            return payload
        envelope = Envelope.model_validate(payload.doc["envelope"])
        body = dict(envelope.body)
        body["inner_doc"] = dict(body["inner_doc"], stats=body["inner_doc"]["stats"][:2] + body["inner_doc"]["stats"][3:])
        forged = envelope.model_copy(update={"body": body, "nonce": os.urandom(16).hex()})
        return sign_request(federation.key, forged, payload.arrays)

    federation.exchange.intercept = equivocate
    request, arrays = encode_round(ROUND_STATS, round_index=1, num_classes=DATA.num_classes)
    total = aggregator.sum_round(federation.exchange, request, arrays)
    assert "another request" in aggregator.failures["site1"]
    honest = [path for node, path in sorted(federation.exchange.data.items()) if node != victim]
    assert int(total[ROUND_STATS[0].key]) == sum(len(np.load(p)["labels"]) for p in honest)
    # the victim masked phase 0 under another digest and refuses an unmask naming the coordinator's
    import time

    unmask = UnmaskRequest(job_id=aggregator.job_id, phase=0, active=tuple(federation.names), dropped=())
    envelope = Envelope(step=SECURE_REVEAL, job_id=aggregator.job_id, round=1, nonce=os.urandom(16).hex(),
                        issued_at=time.time(), signer=fingerprint(federation.key.public_key()),
                        body=RevealBody(unmask=unmask.model_dump_json(by_alias=True),
                                        request_digest=aggregator.uploads_received[0][3].context).model_dump(mode="json"))
    with pytest.raises(ProtocolError, match="the sites did not all receive the same request"):
        federation.sites[1].handle(SECURE_REVEAL, sign_request(federation.key, envelope))


def test_a_site_that_requires_the_secure_sum_refuses_plain_statistics(tmp_path: Path) -> None:
    federation = Federation(tmp_path, site_rows(3))
    node_config = {"data-path": str(federation.data[0])}
    with pytest.raises(RefusalError, match="releases statistics only through the secure sum"):
        check_plain_statistics_allowed(node_config)
    check_plain_statistics_allowed({"data-path": str(tmp_path / "elsewhere" / "data.npz")})  # no secure.toml: plain ok
    relaxed = federation.dirs["site1"] / "secure.toml"
    relaxed.write_text(relaxed.read_text().replace("require_secure_sum = true", "require_secure_sum = false"))
    check_plain_statistics_allowed({"data-path": str(federation.data[1])})


def test_a_job_file_with_a_secure_table_resolves_the_coordinator_key_beside_it(tmp_path: Path) -> None:
    from fedmte.server.job_runner import load_job_file, server_job

    federation = Federation(tmp_path / "sites", site_rows(3))
    roster = "".join(f'{name} = "{key}"\n' for name, key in federation.spec.roster.items())
    path = tmp_path / "job.toml"
    path.write_text('connection = "local"\nout = "report.json"\nnum_classes = 4\nscorers = ["hscore"]\n\n'
                    '[secure]\nsigning_key = "sites/coordinator.pem"\nself_masks = false\n\n'
                    '[secure.bounds]\nmax_rows = 1000\nfeature_norm = 50.0\n\n'
                    f"[secure.roster]\n{roster}")
    spec = server_job(load_job_file(path)).secure
    assert spec is not None and spec.signing_key == tmp_path / "sites" / "coordinator.pem"
    aggregator = SecureAggregator.from_spec(spec)
    assert aggregator.threshold == 2 and not aggregator.self_masks and aggregator.bounds.max_rows == 1000
    path.write_text(path.read_text().replace("[secure.roster]\n", "[secure.roster]\nsite9 = \"ed25519:AAAA\"\n"))
    with pytest.raises(VerificationError, match="is not base64 of 32 bytes"):
        SecureAggregator.from_spec(server_job(load_job_file(path)).secure)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- site probe


def test_the_site_probe_passes_sites_that_refuse_every_forgery(tmp_path: Path) -> None:
    federation = Federation(tmp_path, site_rows(3))
    report = probe_sites(federation.exchange, federation.spec)
    assert report.passed and report.failures() == {}
    assert {(r.probe, r.node) for r in report.results} == {
        (probe, node) for probe in ("unknown_signer", "tampered", "control", "replayed") for node in federation.exchange.nodes
    }
    for name in federation.names:  # the probe job is forgotten again, and each site says so
        assert not federation.sites[federation.names.index(name)].jobs
        codes = [(r.kind, getattr(r, "reason_code", None)) for r in federation.audit(name)]
        assert ("refusal", "secure:replay") in codes and ("abort", "secure:probe_finished") in codes
    assert not any(query.startswith("secure_upload") for query, _ in federation.exchange.sent)


def test_the_site_probe_fails_a_site_that_forgets_nonces_between_messages(tmp_path: Path) -> None:
    """A site whose agent starts afresh for every message and keeps no ``state_dir`` (a stock
    SuperNode's ClientApp process per message) accepts a replayed request: the probe says so."""
    federation = Federation(tmp_path, site_rows(3))
    forgetful = federation.exchange.node_of("site1")
    config = federation.configs["site1"].model_copy(update={"state_dir": None})

    def fresh_site(query: str, node: int, payload: Payload) -> Payload:
        if node == forgetful:
            federation.exchange.sites[node] = SecureSite(config, compute=site_statistics(federation.data[1]))
        return payload

    federation.exchange.intercept = fresh_site
    report = probe_sites(federation.exchange, federation.spec)
    assert not report.passed
    assert report.failures() == {str(forgetful): "accepted the replayed probe"}
