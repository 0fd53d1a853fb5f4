"""The coordinator's secure sum: an :class:`~fedmte.server.rounds.Aggregator` that never holds
one site's statistics in the clear.

:class:`SecureAggregator` replaces :class:`~fedmte.server.rounds.PlainSum` behind the same
seam. It runs the protocol of :mod:`fedmte.protocol.secure_sum` (Bonawitz et al. 2017) over
any :class:`~fedmte.server.rounds.Exchange`, with every request signed as
:mod:`fedmte.protocol.secure_rounds` describes and answered by
:mod:`fedmte.client.secure_site`.

Round trips
-----------
* Setup, once per job (:meth:`SecureAggregator.begin_job`, two round trips):
  ``secure_advertise`` (signed parameters and public bounds; each site answers with its
  signed public keys, which also tells the coordinator which node is which site) and
  ``secure_share`` (every verified advertisement; each site answers with its encrypted
  Shamir shares). The routed shares travel with the first upload, not in a round of their own.
* Each statistics round (:meth:`SecureAggregator.sum_round`): ``secure_upload`` (the inner
  ``stats`` request; each site answers with masked ring words and the sum spec it built from
  the public bounds), then ``secure_reveal`` only when something must be unmasked: always
  with self masks (the default), and in the one-round mode (``self_masks=False``) only when a
  site dropped out. So a phase costs two round trips with self masks and one without.

The phase count is the job's round count (:func:`fedmte.server.coordinator.execute_job` calls
:meth:`begin_job` with it); keys for every phase are agreed in the one setup.

Dropouts and aborts
-------------------
A site that fails or does not answer a step is dropped from the job from then on. Up to
the first phase's upload that costs nothing but the site: its masks are recovered from the
others' shares, so the result is the exact sum over the sites that uploaded, provided at
least the threshold did (dropout tolerance needs an exchange with ``gather``, as
:class:`~fedmte.server.flower_exchange.FlowerExchange` has). Uploads whose spec names
another request digest than the coordinator sent are left out as well. The sites whose
uploads the first phase summed are then the job's active set, fixed
(:class:`~fedmte.protocol.secure_sum.CoordinatorSecureSum`): a site of that set that fails
any later step, or whose later upload is missing or left out, aborts the job before the
next phase is summed (a site that fails the last phase's reveal costs nothing, since nothing
follows). Continuing with a smaller set would hand the coordinator two sums of the same
statistics over different sites, whose difference is a site's statistics; the sites refuse
it too, so an honest coordinator stops first.

When fewer than the threshold remain at any step, or the active set would change, the
coordinator sends a signed ``secure_abort`` to every site that advertised keys (each that
hears it records the abort in its audit log and forgets the job), releases nothing, and
raises :class:`~fedmte.protocol.errors.FederationError` naming every site's reason.

What the coordinator held
-------------------------
With ``keep_uploads`` the aggregator keeps every phase's request and every masked upload it
received; :func:`write_transcript` stores them (a job's ``transcript``) so an auditor can
check, against each site's own sums, that the coordinator never held one in the clear.

Public bounds
-------------
The job declares :class:`~fedmte.protocol.secure_rounds.DeclaredBounds` (rows per site,
feature norm); each site derives every block's bound from them and the request alone, and
a site whose values break a bound refuses with a typed
:class:`~fedmte.protocol.errors.BoundExceededError` (it then counts as dropped; below the
threshold the job aborts). A sum is never decoded from a wrapped ring value.
"""

from __future__ import annotations

import collections
import hmac
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmte.protocol.errors import (
    FederationError,
    FedmteError,
    InvalidInputError,
    ProtocolError,
    ThresholdError,
)
from fedmte.protocol.fixed_point import SumSpec
from fedmte.protocol.job_messages import JobRoundRequest
from fedmte.protocol.keys import fingerprint, load_private_key, parse_public_key
from fedmte.protocol.secure_rounds import (
    AbortBody,
    AdvertiseBody,
    DeclaredBounds,
    Envelope,
    RevealBody,
    ShareBody,
    UploadBody,
    arrays_digest,
    request_digest,
    sign_request,
)
from fedmte.protocol.secure_sum import (
    ActiveSetError,
    Advertisement,
    CoordinatorSecureSum,
    MaskedUpload,
    Reveal,
    SecureSumParams,
    ShareBundle,
    majority_threshold,
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


class SecureJobSpec(BaseModel):
    """The ``[secure]`` table of a job: the coordinator's key, the roster, threshold and bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    signing_key: Path = Field(description="the coordinator's Ed25519 PKCS#8 PEM key, pinned by every site")
    roster: dict[str, str] = Field(min_length=3, description="site id -> ed25519:... identity key")
    threshold: int | None = Field(default=None, description="default: a strict majority of the roster")
    self_masks: bool = True
    bounds: DeclaredBounds
    model_hashes: tuple[str, ...] = Field(default=(), description="sha256 of each candidate model package")


def load_coordinator_key(path: Path | str) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 signing key (:func:`fedmte.protocol.keys.load_private_key`)."""
    return load_private_key(path)


@dataclass
class StepTiming:
    """Wall-clock seconds of one secure-sum round trip."""

    name: str
    seconds: float


class SecureAggregator:
    """Sums each round's statistics with the secure sum (see the module docstring).

    Parameters
    ----------
    signing_key : Ed25519PrivateKey
        The coordinator's key; sites accept only requests signed by keys they pinned.
    roster : mapping of site id to Ed25519PublicKey
        The coordinator's list of sites and their identity keys (order-independent: the
        parameters sort it).
    bounds : DeclaredBounds
        The job's public bounds.
    threshold : int, optional
        Sites needed to unmask; a strict majority of the roster by default.
    self_masks : bool
        See :mod:`fedmte.protocol.secure_sum`: two round trips per phase with, one without.
    job_id : str, optional
        Unique per job; a random one by default.
    model_hashes : sequence of str
        The candidate models' hashes, signed into every request and every phase's digest.
    phases : int, optional
        Phases to agree keys for when :meth:`begin_job` is not called with a round count.
    inner_query : str
        The query each phase wraps (``stats``).
    keep_uploads : bool
        Keep every masked upload in :attr:`uploads_received` and every phase's request in
        :attr:`requests_sent` (audits of the coordinator; :meth:`write_transcript`).
    """

    def __init__(
        self,
        *,
        signing_key: Ed25519PrivateKey,
        roster: Mapping[str, Ed25519PublicKey],
        bounds: DeclaredBounds,
        threshold: int | None = None,
        self_masks: bool = True,
        job_id: str | None = None,
        model_hashes: Sequence[str] = (),
        phases: int | None = None,
        inner_query: str = STATS,
        clock: Callable[[], float] = time.time,
        keep_uploads: bool = False,
    ) -> None:
        self._key = signing_key
        self._signer = fingerprint(signing_key.public_key())
        self._roster = dict(roster)
        self.bounds = bounds
        self.threshold = threshold if threshold is not None else majority_threshold(len(self._roster))
        self.self_masks = self_masks
        self.job_id = job_id or f"job-{secrets.token_hex(8)}"
        self.model_hashes = tuple(model_hashes)
        self._declared_phases = phases
        self.inner_query = inner_query
        self._clock = clock
        self.params: SecureSumParams | None = None
        self._coordinator: CoordinatorSecureSum | None = None
        self._node_of: dict[str, int] = {}
        self._live: set[str] = set()
        self._routed: dict[str, tuple[ShareBundle, ...]] = {}
        self._next_phase = 0
        self._aborted: str | None = None
        self.failures: dict[str, str] = {}
        self.timings: list[StepTiming] = []
        self.keep_uploads = keep_uploads
        self.uploads_received: list[tuple[str, int, np.ndarray, SumSpec]] = []
        """(site, phase, words, spec) of every upload as the coordinator received it, when
        ``keep_uploads`` (for inspection: what the coordinator holds is masked)."""
        self.requests_sent: dict[int, tuple[str, Payload]] = {}
        """phase -> (inner query, inner request) of every phase sent, when ``keep_uploads``."""

    @classmethod
    def from_spec(cls, spec: SecureJobSpec, *, job_id: str | None = None) -> SecureAggregator:
        return cls(
            signing_key=load_coordinator_key(spec.signing_key),
            roster={site: parse_public_key(text) for site, text in spec.roster.items()},
            bounds=spec.bounds, threshold=spec.threshold, self_masks=spec.self_masks, job_id=job_id,
            model_hashes=spec.model_hashes,
        )

    def summary(self) -> dict[str, Any]:
        """What a job report records: who summed, the threshold, each step's round trip."""
        setup = [t.seconds for t in self.timings if t.name.startswith("secure setup")]
        fixed = None if self._coordinator is None else self._coordinator.fixed_lists
        return {
            "job_id": self.job_id, "sites": sorted(self._live), "threshold": self.threshold,
            "active": None if fixed is None else list(fixed[0]), "dropped": None if fixed is None else list(fixed[1]),
            "self_masks": self.self_masks, "phases": None if self.params is None else self.params.phases,
            "phases_run": self._next_phase, "setup_seconds": sum(setup), "failures": dict(self.failures),
            "steps": [{"name": t.name, "seconds": t.seconds} for t in self.timings],
        }

    @property
    def sites(self) -> dict[str, int]:
        """Site id -> node id of every site that completed the key setup and still answers."""
        return {site: self._node_of[site] for site in sorted(self._live)}

    # ------------------------------------------------------------------ requests

    def _payload(self, step: str, round_: int, body: BaseModel, arrays: Mapping[str, np.ndarray] | None = None,
                 arrays_sha256: bytes | None = None) -> Payload:
        envelope = Envelope(
            step=step, job_id=self.job_id, round=round_, nonce=os.urandom(16).hex(), issued_at=self._clock(),
            signer=self._signer, model_hashes=self.model_hashes, body=body.model_dump(mode="json", by_alias=True),
        )
        return sign_request(self._key, envelope, arrays, arrays_sha256=arrays_sha256)

    def _round_trip(self, exchange: Any, step: str, payloads: Mapping[int, Payload], group: str,
                    name: str) -> dict[int, Payload]:
        """Send and collect; failed sites are recorded, dropped from the job, and left out."""
        start = time.perf_counter()
        gather = getattr(exchange, "gather", None)
        if gather is not None:
            replies, failures = gather(step, payloads, group=group)
        else:
            try:
                replies, failures = exchange.exchange(step, payloads, group=group), {}
            except FederationError as error:  # no partial replies from this exchange
                replies, failures = {}, dict(error.failures) or {str(node): str(error) for node in payloads}
        self.timings.append(StepTiming(name, time.perf_counter() - start))
        site_of = {node: site for site, node in self._node_of.items()}
        for node, reason in failures.items():
            site = site_of.get(int(node)) if str(node).lstrip("-").isdigit() else None
            self._fail(site or f"node {node}", f"{step}: {reason}")
        return replies

    def _fail(self, site: str, reason: str) -> None:
        self.failures[site] = reason
        self._live.discard(site)

    def _abort(self, exchange: Any, reason_code: str, error: FedmteError) -> FederationError:
        """Tell every site that advertised keys (a dropped one may still hold them) to record
        the abort and forget the job; return the error to raise. A site's first reason stays."""
        self._aborted = str(error)
        if self._node_of:
            body = AbortBody(reason_code=reason_code, detail=str(error)[:4096])
            payloads = {node: self._payload(SECURE_ABORT, self._next_phase, body)
                        for _, node in sorted(self._node_of.items())}
            earlier, live = dict(self.failures), set(self._live)
            self._round_trip(exchange, SECURE_ABORT, payloads, group="secure-abort", name="secure abort")
            self.failures.update(earlier)
            self._live = live
        return FederationError(
            f"secure sum aborted, nothing released: {error}", failures=dict(self.failures),
        )

    # ------------------------------------------------------------------ setup

    def begin_job(self, exchange: Any, rounds: int) -> None:
        """Agree keys for ``rounds`` phases with every site (two round trips)."""
        if self.params is not None:
            raise ProtocolError(f"secure job {self.job_id!r} is already set up")
        phases = max(1, rounds if self._declared_phases is None else self._declared_phases)
        try:
            params = SecureSumParams(job_id=self.job_id, sites=tuple(sorted(self._roster)), threshold=self.threshold,
                                     phases=phases, self_masks=self.self_masks)
        except ValidationError as error:
            raise InvalidInputError(f"invalid secure-sum job: {error.errors()[0]['msg']}") from None
        self.params = params
        coordinator = CoordinatorSecureSum(params, known_sites=self._roster)
        self._coordinator = coordinator
        body = AdvertiseBody(params=params.model_dump_json(by_alias=True), bounds=self.bounds)
        replies = self._round_trip(exchange, SECURE_ADVERTISE,
                                   {node: self._payload(SECURE_ADVERTISE, 0, body) for node in exchange.nodes},
                                   group="secure-setup-1", name="secure setup (advertise)")
        valid: list[Advertisement] = []
        for node, reply in sorted(replies.items()):
            advertisement, problem = self._check_advertisement(reply, params)
            if advertisement is None:
                self._fail(f"node {node}", problem)
                continue
            if advertisement.site_id in self._node_of:
                self._fail(advertisement.site_id, f"two nodes ({self._node_of[advertisement.site_id]}, {node}) "
                                                  "answered as this site; both are left out")
                continue
            self._node_of[advertisement.site_id] = node
            self._live.add(advertisement.site_id)
            valid.append(advertisement)
        valid = [a for a in valid if a.site_id in self._live]
        try:
            verified = coordinator.collect_advertisements(valid)
        except ThresholdError as error:
            raise self._abort(exchange, "secure:below_threshold", error) from error
        share_body = ShareBody(advertisements=[a.model_dump_json(by_alias=True) for a in verified])
        replies = self._round_trip(
            exchange, SECURE_SHARE,
            {self._node_of[site]: self._payload(SECURE_SHARE, 0, share_body) for site in sorted(self._live)},
            group="secure-setup-2", name="secure setup (share)",
        )
        site_of = {node: site for site, node in self._node_of.items()}
        bundles: list[ShareBundle] = []
        for node, reply in sorted(replies.items()):
            site = site_of[node]
            try:
                sent = [ShareBundle.model_validate_json(text) for text in reply.doc["bundles"]]
            except (KeyError, TypeError, ValidationError):
                self._fail(site, "malformed share reply")
                continue
            if any(bundle.sender != site for bundle in sent):
                self._fail(site, "sent share bundles in another site's name")
                continue
            bundles.extend(sent)
        bundles = [bundle for bundle in bundles if bundle.sender in self._live]
        try:
            self._routed = coordinator.route_shares(bundles)
        except ThresholdError as error:
            raise self._abort(exchange, "secure:below_threshold", error) from error
        for site in sorted(self._live - set(coordinator.participants)):
            self._fail(site, "did not complete the key setup")

    def _check_advertisement(self, reply: Payload, params: SecureSumParams) -> tuple[Advertisement | None, str]:
        try:
            advertisement = Advertisement.model_validate_json(reply.doc["advertisement"])
        except (KeyError, TypeError, ValidationError):
            return None, "malformed advertisement"
        identity = self._roster.get(advertisement.site_id)
        if identity is None:
            return None, f"answered as {advertisement.site_id!r}, which is not in the coordinator's roster"
        try:
            identity.verify(advertisement.signature, advertisement.signed_bytes())
        except InvalidSignature:
            return None, f"advertisement of {advertisement.site_id!r} does not verify against its roster key"
        if advertisement.job_id != params.job_id or not hmac.compare_digest(advertisement.params_digest, params.digest()):
            return None, f"advertisement of {advertisement.site_id!r} is for another job or parameters"
        return advertisement, ""

    # ------------------------------------------------------------------ phases

    def sum_round(self, exchange: Any, request: JobRoundRequest, arrays: Mapping[str, np.ndarray]) -> Statistics:
        """The :class:`~fedmte.server.rounds.Aggregator` seam: one ``stats`` round, summed securely."""
        return self.sum_payload(exchange, Payload(doc=request.model_dump(mode="json", by_alias=True), arrays=arrays),
                                inner_query=self.inner_query, label=str(request.round))

    def sum_payload(self, exchange: Any, inner: Payload, *, inner_query: str, label: str) -> Statistics:
        """Run one phase for any inner statistics query; returns only the sum."""
        if self._aborted is not None:
            raise ProtocolError(f"secure job {self.job_id!r} was aborted: {self._aborted}")
        if self.params is None:
            if self._declared_phases is None:
                raise ProtocolError("call begin_job(exchange, rounds) before the first round, or give phases=")
            self.begin_job(exchange, self._declared_phases)
        assert self.params is not None and self._coordinator is not None
        coordinator, phase = self._coordinator, self._next_phase
        if phase >= self.params.phases:
            raise ProtocolError(
                f"the job agreed keys for {self.params.phases} phases and asked for another; declare more rounds"
            )
        fixed = coordinator.fixed_lists
        if fixed is not None:
            gone = [site for site in fixed[0] if site not in self._live]
            if gone:
                raise self._abort(exchange, "secure:active_set_changed", ActiveSetError(
                    f"{gone} failed after the job's active set was fixed at {list(fixed[0])} by its first phase: "
                    "the job cannot continue with a smaller active set (the difference of two sums would be those "
                    f"sites' statistics); phase {phase} was not asked for"
                ))
        self._next_phase += 1
        digest = request_digest(self.job_id, phase, self.model_hashes, inner_query, inner.doc, inner.arrays)
        if self.keep_uploads:
            self.requests_sent[phase] = (inner_query, inner)
        inner_sha = arrays_digest(inner.arrays)
        payloads = {}
        for site in sorted(self._live):
            bundles = None
            if phase == 0:
                bundles = [bundle.model_dump_json(by_alias=True) for bundle in self._routed.get(site, ())]
            body = UploadBody(phase=phase, inner_query=inner_query, inner_doc=dict(inner.doc), bundles=bundles)
            payloads[self._node_of[site]] = self._payload(SECURE_UPLOAD, phase + 1, body, inner.arrays, inner_sha)
        replies = self._round_trip(exchange, SECURE_UPLOAD, payloads, group=f"{label}-upload",
                                   name=f"round {label} (upload)")
        site_of = {node: site for site, node in self._node_of.items()}
        received: dict[str, tuple[SumSpec, np.ndarray]] = {}
        for node, reply in sorted(replies.items()):
            site = site_of[node]
            try:
                spec = SumSpec.model_validate(reply.doc["spec"])
                words = np.ascontiguousarray(reply.arrays["words"]).view(np.uint64)
                if int(reply.doc["phase"]) != phase:
                    raise ValueError("another phase")
            except (KeyError, TypeError, ValueError, ValidationError) as error:
                self._fail(site, f"malformed upload: {error}")
                continue
            if spec.context != digest:
                self._fail(site, "masked its upload for another request (model hashes or statistics) than was sent")
                continue
            received[site] = (spec, words)
            if self.keep_uploads:
                self.uploads_received.append((site, phase, words, spec))
        specs = collections.Counter(spec.digest() for spec, _ in received.values())
        chosen = specs.most_common(1)[0][0] if specs else None
        try:
            if chosen is None:
                raise ThresholdError(f"no site uploaded phase {phase}; the threshold is {self.params.threshold}")
            spec = next(s for s, _ in received.values() if s.digest() == chosen)
            coordinator.open_phase(phase, spec)
            for site, (site_spec, words) in sorted(received.items()):
                if site_spec.digest() != chosen:
                    self._fail(site, "built another sum spec (shapes or bounds) than the other sites")
                    continue
                try:
                    coordinator.add_upload(MaskedUpload(job_id=self.job_id, phase=phase, site_id=site,
                                                        spec_digest=chosen, words=words))
                except ProtocolError as error:
                    self._fail(site, f"upload refused: {error}")
            unmask = coordinator.unmask_request(phase)
        except ThresholdError as error:
            raise self._abort(exchange, "secure:below_threshold", error) from error
        except ActiveSetError as error:
            raise self._abort(exchange, "secure:active_set_changed", error) from error
        reveals: list[Reveal] = []
        if unmask is not None:
            body = RevealBody(unmask=unmask.model_dump_json(by_alias=True), request_digest=digest)
            payloads = {self._node_of[site]: self._payload(SECURE_REVEAL, phase + 1, body)
                        for site in unmask.active if site in self._live}
            replies = self._round_trip(exchange, SECURE_REVEAL, payloads, group=f"{label}-reveal",
                                       name=f"round {label} (reveal)")
            for node, reply in sorted(replies.items()):
                site = site_of[node]
                try:
                    reveal = Reveal.model_validate_json(reply.doc["reveal"])
                except (KeyError, TypeError, ValidationError):
                    self._fail(site, "malformed reveal")
                    continue
                if reveal.site_id != site:
                    self._fail(site, "revealed in another site's name")
                    continue
                reveals.append(reveal)
        try:
            return coordinator.finish(phase, reveals)
        except ThresholdError as error:
            raise self._abort(exchange, "secure:below_threshold", error) from error
        except FedmteError as error:  # a recovered secret that does not match, or a sum that does not decode
            raise self._abort(exchange, "secure:undecodable", error) from error


# --------------------------------------------------------------------------- transcript

TRANSCRIPT_SCHEMA = "fedmte.secure_transcript.v1"


@dataclass(frozen=True)
class TranscriptPhase:
    """One phase as the coordinator saw it: the request it sent, the masked words it got."""

    inner_query: str
    request: Payload
    uploads: dict[str, tuple[np.ndarray, SumSpec]]


def write_transcript(aggregator: SecureAggregator, path: Path) -> None:
    """Write everything the coordinator received in ``aggregator``'s phases to ``path`` (.npz of
    plain arrays and JSON strings, no pickle), so an auditor can check that it holds only
    masked words. Needs ``keep_uploads``."""
    import json

    if not aggregator.keep_uploads:
        raise ProtocolError("the transcript needs an aggregator made with keep_uploads=True")
    arrays: dict[str, np.ndarray] = {
        "schema": np.array(TRANSCRIPT_SCHEMA), "job_id": np.array(aggregator.job_id),
        "failures": np.array(json.dumps(aggregator.failures, sort_keys=True)),
    }
    for phase, (query, request) in aggregator.requests_sent.items():
        arrays[f"phase{phase}/query"] = np.array(query)
        arrays[f"phase{phase}/request"] = np.array(json.dumps(request.doc, sort_keys=True))
        for name, array in request.arrays.items():
            arrays[f"phase{phase}/arrays/{name}"] = np.asarray(array)
    for site, phase, words, spec in aggregator.uploads_received:
        arrays[f"phase{phase}/upload/{site}/words"] = words
        arrays[f"phase{phase}/upload/{site}/spec"] = np.array(spec.model_dump_json(by_alias=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def read_transcript(path: Path) -> dict[int, TranscriptPhase]:
    """The phases of a transcript written by :func:`write_transcript`."""
    import json

    try:
        with np.load(path, allow_pickle=False) as stored:
            entries = {key: stored[key] for key in stored.files}
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"cannot read the secure-sum transcript {path}: {error}") from None
    if str(entries.get("schema", "")) != TRANSCRIPT_SCHEMA:
        raise InvalidInputError(f"{path} is not a {TRANSCRIPT_SCHEMA} transcript")
    phases: dict[int, TranscriptPhase] = {}
    for key in entries:
        if key.startswith("phase") and key.endswith("/query"):
            phase = int(key[len("phase"):].split("/")[0])
            prefix = f"phase{phase}/"
            request = Payload(
                doc=json.loads(str(entries[prefix + "request"])),
                arrays={k[len(prefix + "arrays/"):]: v for k, v in entries.items() if k.startswith(prefix + "arrays/")},
            )
            uploads = {
                k.split("/")[2]: (v, SumSpec.model_validate_json(str(entries[k[:-len("words")] + "spec"])))
                for k, v in entries.items() if k.startswith(prefix + "upload/") and k.endswith("/words")
            }
            phases[phase] = TranscriptPhase(str(entries[key]), request, uploads)
    return dict(sorted(phases.items()))


def load_roster(text: Mapping[str, str]) -> dict[str, Ed25519PublicKey]:
    """Parse a roster table (site id -> ``ed25519:...``)."""
    return {site: parse_public_key(key) for site, key in text.items()}
