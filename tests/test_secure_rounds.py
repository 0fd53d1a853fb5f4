"""The secure sum inside the federation, without Flower processes.

Each site is a features-kind site file (``[data] kind = "features"``) with a ``[secure]``
table (identity key, roster, floors; the coordinator key it accepts is the one in
``[trust.coordinators]``), written by :func:`fedmte.trial.local_sites.write_site` and
:func:`~fedmte.trial.local_sites.provision`. Its :class:`~fedmte.client.secure_site.SecureSite`
computes through the site agent (:func:`~fedmte.client.secure_site.agent_statistics`) and
audits to the agent's log. Every message passes through the wire form Flower carries
(``Payload.to_wire``/``from_wire``), as in ``test_federation_rounds.py``. A site that raises
answers with an error, which the coordinator sees as that site failing the step, exactly as
over Flower.
"""

from __future__ import annotations

import itertools
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import fedmte
from fedmte.client import site_agent
from fedmte.client.audit_log import read_records, verify
from fedmte.client.secure_site import (
    SecureSite,
    SecureSiteConfig,
    _agent_audit,
    agent_statistics,
    check_plain_statistics_allowed,
    secure_config,
    site_for,
)
from fedmte.client.site_config import load_site_config, site_file_text
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
from fedmte.protocol.job_messages import (
    FINISH,
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
from fedmte.protocol.keys import fingerprint, public_key_text
from fedmte.protocol.local import InMemorySite
from fedmte.protocol.plan import execute, make_plan
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers import NOT_FEDERABLE, SCORERS
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
    SECURE_ADVERTISE,
    SECURE_REVEAL,
    SECURE_SHARE,
    SECURE_UPLOAD,
    STATS,
    Payload,
)
from fedmte.server.coordinator import execute_job, load_candidates, sign_setup
from fedmte.server.job import job_from_dict, load_job
from fedmte.server.secure_aggregation import SecureAggregator, load_roster
from fedmte.server.site_probe import probe_sites
from fedmte.trial.local_sites import coordinator_key, provision, write_site
from tests.datasets import DATASETS, site_split_without_class

DATA = DATASETS["basic"]
LABELS = [f"k{c}" for c in range(DATA.num_classes)]  # the site files hold class indices into these
FEATURES = "site-features"
MODEL = site_features_id(FEATURES)
SCORERS_USED = ["hscore", "leep", "gbc", "logme", "nce", "sfda"]
ROUND_STATS = [Stat.of("count"), Stat.of("class_counts"), Stat.of("class_sums"), Stat.of("gram")]
RUN = "r1"

Intercept = Callable[[str, int, Payload], Payload]


def keys_of(stats: Sequence[Stat]) -> list[str]:
    """The keys a one-model job round's statistics travel under."""
    return [block_key(MODEL, stat.key) for stat in stats]


class SecureWireExchange:
    """Nodes 100, 101, ... answering through the wire form: ``secure_*`` queries to each
    site's :class:`SecureSite`, the job's own queries to its site agent; any node can be made
    to fail."""

    def __init__(self, sites: Sequence[SecureSite], site_files: Sequence[Path]) -> None:
        self.sites = {100 + k: site for k, site in enumerate(sites)}
        self.files = {100 + k: path for k, path in enumerate(site_files)}
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
                    reply = site_agent.answer(query, received, self.files[node])
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
    """N features-kind sites, each one site file (data, the coordinator key, policy, audit log
    and ``[secure]``), a coordinator key and the roster, on disk under ``root``."""

    def __init__(self, root: Path, rows: Sequence[np.ndarray], *, self_masks: bool = True,
                 bounds: DeclaredBounds | None = None) -> None:
        self.names = [f"site{k}" for k in range(len(rows))]
        self.dirs = {name: root / name for name in self.names}
        self.key, self.key_path = coordinator_key(root)
        _SIGNER[:] = [self.key]  # signed rounds (issue 11): job_round signs with this federation's key
        self.files = [
            write_site(self.dirs[name], name, {"features": DATA.features[idx], "labels": DATA.labels[idx],
                                                "source_probs": DATA.source_probs[idx]}, LABELS,
                       coordinator=self.key, dp=False)
            for name, idx in zip(self.names, rows)
        ]
        norm = float(np.max(np.linalg.norm(DATA.features, axis=1)))
        self.bounds = bounds or DeclaredBounds(max_rows=len(DATA.labels), feature_norm=norm)
        self.spec = provision(dict(zip(self.names, self.files)), self.key_path, bounds=self.bounds,
                              self_masks=self_masks)
        if not self_masks:  # sites refuse jobs without self masks unless their owner allows them
            for path in self.files:
                allow_one_round(path)
        self.configs = {name: secure_config(load_site_config(path)) for name, path in zip(self.names, self.files)}
        self.sites = [site_for(path) for path in self.files]  # as a site runner makes them
        self.exchange = SecureWireExchange(self.sites, self.files)

    def fresh_site(self, name: str, config: SecureSiteConfig | None = None) -> SecureSite:
        """The site's SecureSite made again, as after a restart of its process."""
        path = self.files[self.names.index(name)]
        return SecureSite(config or self.configs[name], compute=agent_statistics(path), audit=_agent_audit(path))

    def aggregator(self, **overrides: object) -> SecureAggregator:
        settings: dict[str, object] = {"signing_key": self.key, "roster": load_roster(self.spec.roster),
                                       "bounds": self.bounds, "self_masks": self.spec.self_masks, "keep_uploads": True}
        settings.update(overrides)
        return SecureAggregator(**settings)  # type: ignore[arg-type]

    def setup(self, run_id: str = RUN) -> None:
        """Every site accepts job ``run_id`` over its own features (what execute_job's setup does)."""
        request = SetupRequest(run_id=run_id, labels=LABELS, scorers=["hscore"], coordinator_key=public_key_text(self.key),
                               models=[ModelOffer(model_id=MODEL, label=FEATURES, kind=SITE_FEATURES)])
        payload = setup_payload(sign_setup(request, self.key), {})
        for path in self.files:
            reply = site_agent.answer(SETUP, payload, path, run_id=run_id)
            assert reply.doc["models"][MODEL]["status"] == "ready"

    def audit(self, name: str) -> list[object]:
        return read_records(self.dirs[name] / "audit")

    def rows(self, node: int) -> int:
        with np.load(self.exchange.files[node].parent / "data.npz") as data:
            return len(data["labels"])


def allow_one_round(site_file: Path) -> None:
    """The data owner's opt-in to jobs without self masks: ``require_self_masks = false``."""
    document = tomllib.loads(site_file.read_text(encoding="utf-8"))
    document["secure"]["require_self_masks"] = False
    site_file.write_text(site_file_text(document), encoding="utf-8")


def site_rows(sites: int) -> list[np.ndarray]:
    return site_split_without_class(DATA, absent=0, sites=sites)


# --- signed rounds (issue 11): a site answers only rounds signed by the key that signed the
# job's setup, each round of a run once and in order. job_round signs with the coordinator key
# of the Federation made last; site_parts asks its plain round in a run of its own.
_SIGNER: list[Ed25519PrivateKey] = []
_PLAIN_RUNS = itertools.count(1)


def job_round(round_index: int = 1, stats: Sequence[Stat] = ROUND_STATS, run_id: str = RUN
              ) -> tuple[object, dict[str, np.ndarray]]:
    request, arrays = encode_job_round({MODEL: list(stats)}, run_id=run_id, round_index=round_index,
                                       num_classes=DATA.num_classes)
    return request.sign(_SIGNER[-1], arrays), arrays


def _plain_run(site_files: Sequence[Path]) -> str:
    """A fresh run that every site in ``site_files`` accepted (a setup like Federation.setup)."""
    run_id, key = f"plain-{next(_PLAIN_RUNS)}", _SIGNER[-1]
    request = SetupRequest(run_id=run_id, labels=LABELS, scorers=["hscore"], coordinator_key=public_key_text(key),
                           models=[ModelOffer(model_id=MODEL, label=FEATURES, kind=SITE_FEATURES)])
    payload = setup_payload(sign_setup(request, key), {})
    for path in site_files:
        site_agent.answer(SETUP, payload, path, run_id=run_id)
    return run_id
# --- end of signed rounds


def plain_statistics(site_files: Sequence[Path], stats: Sequence[Stat]) -> Statistics:
    """Each site agent's plain (unmasked) reply to the same round, added up."""
    total = Statistics.empty()
    for part in site_parts(site_files, stats):
        total = total + part
    return total


def site_parts(site_files: Sequence[Path], stats: Sequence[Stat]) -> list[Statistics]:
    run_id = _plain_run(site_files)  # signed rounds: round 1 of RUN was answered already
    request, arrays = job_round(stats=stats, run_id=run_id)
    payload = Payload(doc=request.model_dump(mode="json", by_alias=True), arrays=arrays)
    return [Statistics.from_arrays(site_agent.answer(STATS, payload, path, run_id=run_id).arrays) for path in site_files]


def assert_exact_sum(total: Statistics, site_files: Sequence[Path], stats: Sequence[Stat], spec: SumSpec, sites: int) -> None:
    """Int blocks equal; float blocks within the codec's bound of the exactly rounded sum (fsum)."""
    parts = site_parts(site_files, stats)
    codec = FixedPointCodec(spec, max_sites=sites)
    assert set(total) == set(keys_of(stats))
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
    job = job_from_dict({"connection": "unused", "labels": LABELS, "scorers": SCORERS_USED, "privacy": {"dp": False},
                         "candidates": [{"name": FEATURES, "site_features": True}], "output": str(tmp_path / "out")})
    outcome = execute_job(federation.exchange, job, load_candidates(job), federation.key, run_id=RUN, aggregator=aggregator)
    pooled = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS_USED)
    result = outcome.models[MODEL].result
    assert result is not None and outcome.secure_sum
    for name in SCORERS_USED:
        assert result.scores[name] == pytest.approx(pooled[name], rel=1e-6), name
    rounds = outcome.planned_rounds
    per_phase = [SECURE_UPLOAD, SECURE_REVEAL] if self_masks else [SECURE_UPLOAD]
    assert [query for query, _ in federation.exchange.sent] == \
        [SETUP, SECURE_ADVERTISE, SECURE_SHARE] + per_phase * rounds + [FINISH]
    assert STATS not in {query for query, _ in federation.exchange.sent}  # nothing left a site unmasked
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
    federation.setup()
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 1)
    request, arrays = job_round()
    total = aggregator.sum_round(federation.exchange, request, arrays)
    assert_exact_sum(total, federation.files, ROUND_STATS, aggregator.uploads_received[0][3], 3)
    uploads = aggregator.uploads_received
    assert sorted(site for site, *_ in uploads) == federation.names
    for site, phase, words, spec in uploads:
        node = federation.exchange.node_of(site)
        plain = plain_statistics([federation.exchange.files[node]], ROUND_STATS)
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
    federation.setup()
    aggregator = federation.aggregator()
    assert aggregator.threshold == 3
    aggregator.begin_job(federation.exchange, 2)
    dropped = federation.exchange.node_of("site2")
    federation.exchange.failing.add(dropped)
    request, arrays = job_round()
    total = aggregator.sum_round(federation.exchange, request, arrays)
    survivors = [path for node, path in sorted(federation.exchange.files.items()) if node != dropped]
    assert_exact_sum(total, survivors, ROUND_STATS, aggregator.uploads_received[0][3], 5)
    assert int(total[keys_of(ROUND_STATS)[0]]) == sum(federation.rows(n) for n in federation.exchange.nodes if n != dropped)
    assert set(aggregator.failures) == {"site2"} and "no reply" in aggregator.failures["site2"]
    # the recovery step ran (it is the only way the masks shared with site2 leave the sum)
    assert [q for q, _ in federation.exchange.sent[-2:]] == [SECURE_UPLOAD, SECURE_REVEAL]
    # the next phase goes on without site2, and is exact again
    request, arrays = job_round(2)
    again = aggregator.sum_round(federation.exchange, request, arrays)
    assert_exact_sum(again, survivors, ROUND_STATS, aggregator.uploads_received[-1][3], 5)


def test_a_site_lost_between_upload_and_reveal_is_still_in_the_sum(tmp_path: Path) -> None:
    # Its upload arrived, so the others reveal its self-mask seed (never its mask key).
    federation = Federation(tmp_path, np.array_split(np.arange(len(DATA.labels)), 5))
    federation.setup()
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 1)
    federation.exchange.failing_at[federation.exchange.node_of("site4")] = SECURE_REVEAL
    request, arrays = job_round()
    total = aggregator.sum_round(federation.exchange, request, arrays)
    assert_exact_sum(total, federation.files, ROUND_STATS, aggregator.uploads_received[0][3], 5)
    assert set(aggregator.failures) == {"site4"}


def test_below_the_threshold_the_job_aborts_releases_nothing_and_survivors_audit_it(tmp_path: Path) -> None:
    federation = Federation(tmp_path, np.array_split(np.arange(len(DATA.labels)), 5))
    federation.setup()
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 1)
    lost = {"site0", "site3", "site4"}
    federation.exchange.failing |= {federation.exchange.node_of(name) for name in lost}
    request, arrays = job_round()
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
    federation.setup()
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 1)
    request, arrays = job_round()
    with pytest.raises(FederationError, match="nothing released") as caught:
        aggregator.sum_round(federation.exchange, request, arrays)
    reasons = caught.value.failures
    assert {"site1", "site2"} <= set(reasons)
    # whether a site's rows break the declared bounds depends on its data: the coordinator gets
    # the one generic text, the data owner the bound error in the site's audit log
    assert all("SiteFailed" in reasons[name] and "beyond its public bound" not in reasons[name]
               for name in ("site1", "site2"))
    for name in ("site1", "site2"):
        aborts = [r for r in read_records(federation.dirs[name] / "audit") if r.kind == "abort"]
        assert any("BoundExceededError" in r.detail and "beyond its public bound" in r.detail for r in aborts)


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
    assert refusals[3].rule == "trust.coordinators"
    assert site.jobs == ("job-refusals",)  # only the genuine request set anything up
    # the nonce survives a restart of the site (state_dir), so the replay stays refused
    restarted = federation.fresh_site("site0")
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
    assert [(r.reason_code, r.rule) for r in refusals] == [("secure:bounds_below_floor", "secure.min_declared_rows")]


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
    federation.setup()
    aggregator = federation.aggregator()
    aggregator.begin_job(federation.exchange, 1)
    victim = federation.exchange.node_of("site1")

    def equivocate(query: str, node: int, payload: Payload) -> Payload:
        if query != SECURE_UPLOAD or node != victim:
            return payload
        envelope = Envelope.model_validate(payload.doc["envelope"])
        body = dict(envelope.body)
        stats = body["inner_doc"]["models"][MODEL]
        body["inner_doc"] = dict(body["inner_doc"], models={MODEL: stats[:2] + stats[3:]})
        inner = JobRoundRequest.parse(body["inner_doc"]).sign(federation.key, payload.arrays)  # signed rounds
        body["inner_doc"] = inner.model_dump(mode="json", by_alias=True)
        forged = envelope.model_copy(update={"body": body, "nonce": os.urandom(16).hex()})
        return sign_request(federation.key, forged, payload.arrays)

    federation.exchange.intercept = equivocate
    request, arrays = job_round()
    total = aggregator.sum_round(federation.exchange, request, arrays)
    assert "another request" in aggregator.failures["site1"]
    assert int(total[keys_of(ROUND_STATS)[0]]) == sum(federation.rows(n) for n in federation.exchange.nodes if n != victim)
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
    with pytest.raises(RefusalError, match="releases statistics only through the secure sum") as caught:
        check_plain_statistics_allowed(federation.files[0])
    assert caught.value.rule == "secure.require_secure_sum"
    plain = write_site(tmp_path / "elsewhere", "elsewhere", {"features": DATA.features, "labels": DATA.labels}, LABELS,
                       coordinator=federation.key, dp=False)
    check_plain_statistics_allowed(plain)  # no [secure] table: plain ok
    relaxed = federation.files[1]
    assert "require_secure_sum = true" in relaxed.read_text()
    relaxed.write_text(relaxed.read_text().replace("require_secure_sum = true", "require_secure_sum = false"))
    check_plain_statistics_allowed(relaxed)
    broken = federation.files[2]
    broken.write_text(broken.read_text() + "\n[secure.unknown]\n")
    with pytest.raises(RefusalError, match="only through the secure sum"):  # a broken site file never opens it
        check_plain_statistics_allowed(broken)


def test_a_job_file_with_a_secure_table_resolves_the_coordinator_key_beside_it(tmp_path: Path) -> None:
    federation = Federation(tmp_path / "sites", site_rows(3))
    roster = "".join(f'{name} = "{key}"\n' for name, key in federation.spec.roster.items())
    path = tmp_path / "job.toml"
    path.write_text('connection = "local"\noutput = "report"\nlabels = ["k0", "k1", "k2", "k3"]\n'
                    'candidates = [{ name = "feats", site_features = true }]\nscorers = ["hscore"]\n\n'
                    '[secure]\nsigning_key = "sites/coordinator.pem"\nself_masks = false\n\n'
                    '[secure.bounds]\nmax_rows = 1000\nfeature_norm = 50.0\n\n'
                    f"[secure.roster]\n{roster}")
    spec = load_job(path).secure
    assert spec is not None and spec.signing_key == tmp_path / "sites" / "coordinator.pem" == federation.key_path
    aggregator = SecureAggregator.from_spec(spec)
    assert aggregator.threshold == 2 and not aggregator.self_masks and aggregator.bounds.max_rows == 1000
    path.write_text(path.read_text().replace("[secure.roster]\n", "[secure.roster]\nsite9 = \"ed25519:AAAA\"\n"))
    with pytest.raises(VerificationError, match="is not base64 of 32 bytes"):
        SecureAggregator.from_spec(load_job(path).secure)  # type: ignore[arg-type]


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
            federation.exchange.sites[node] = federation.fresh_site("site1", config)
        return payload

    federation.exchange.intercept = fresh_site
    report = probe_sites(federation.exchange, federation.spec)
    assert not report.passed
    assert report.failures() == {str(forgetful): "accepted the replayed probe"}
