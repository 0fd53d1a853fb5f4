"""The site agent of a scoring job: the data owner's site file decides, the coordinator asks.

A site runs one :class:`SiteAgent` per site file (``site.toml``,
:mod:`fedmte.client.site_config`; Flower: ``--node-config 'site-file="/path/site.toml"'``).
The site file names the data, the keys the site pins, its policy, its audit log and its
cache; nothing a coordinator sends can change them. The agent answers the three messages
of a job (:mod:`fedmte.protocol.job_messages`):

``setup``
    Checks that the coordinator's key is one the site file trusts (``[trust.coordinators]``)
    and that it signed the request, that the policy allows every scorer the job names, then
    each offered model package: its id is the hash of its manifest, its signature verifies
    under a trusted coordinator key, the site can build its architecture, the policy
    allows that architecture and its feature width (``allowed_architectures``,
    ``max_feature_dim``), and it reads this site's kind of data. A package the site staged
    earlier (``<cache_dir>/packages/<model id>``) is verified again from disk; a new one is
    verified from the attached weights (:func:`fedmte.client.packages.verify_package_bytes`)
    and staged, or answered ``need_weights`` when none came. Every refusal is written to the
    audit log and named in the reply (rule and reason), so the coordinator sees which rule
    said no.
``stats``
    One round for every model. The request is decoded against the site's catalogue and
    released through :class:`fedmte.client.privacy.SitePrivacy`: policy check (a refusal
    names its rule), per-sample clipping, DP noise when the policy turns DP on, the ledger,
    then the audit intent (payload copy and record, fsynced) before the reply is handed to
    the SuperNode, and the outcome after. The first time a job needs a model, the model
    runs once over the site's data (:func:`fedmte.client.extract.extract`), filling the
    feature cache; every statistic is then read from the cache, after clipping (so the
    model's output never reaches a statistic unclipped), and later rounds and later jobs
    never run the model again. The model's measured cost (latency, throughput, peak memory;
    never a row count) goes back with the first round that used it.
``finish``
    Signs an audit checkpoint and returns it (also audited), then forgets the job.

Before any of the three is acted on, the request must be signed (the setup by a key in
``[trust.coordinators]``; every round and the finish by the key that signed the job's setup,
over the document and the message's arrays), issued within :data:`REQUEST_WINDOW` of the
site's clock, carry a nonce the site never accepted (:class:`~fedmte.client.request_guard.SeenNonces`,
kept under ``<cache_dir>/jobs/`` across restarts, so a finished run's setup replayed is refused
too), and come in order (a round after the last round answered; a setup before any). A request
that fails one is refused with a typed error naming its rule (``request.signature``,
``request.nonce``, ``request.stale``, ``request.replay``, ``request.order``) and audited as a
refusal.

Every byte of every reply is audited: the payload copy is :func:`wire_bytes` of the exact
reply. The ``seal`` hook of :meth:`SiteAgent.stats` transforms the plain reply before it is
audited (the secure sum masks it there), so the audit log always holds the bytes that left.
An error reply after anything other than a refusal (which the privacy layer audits itself)
is recorded as an ``abort``.

A job's state (the verified setup, the models, which metrics were reported) is kept on disk
under ``<cache_dir>/jobs/``, so a SuperNode that starts a new process per message (stock
Flower) answers as well as the site runner, which keeps one agent per site file open across
messages (:func:`keep_agents_open`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from cryptography.exceptions import InvalidSignature
from pydantic import BaseModel, ConfigDict, Field

from fedmte.client.architectures import LoadedModel, load_verified, resolve
from fedmte.client.audit_log import key_fingerprint, load_signing_key
from fedmte.client.cache import CacheEntry, FeatureCache
from fedmte.client.data import FeatureData, SiteData, content_identity, open_site_data
from fedmte.client.errors import (
    ArchitectureConfigError,
    PackageError,
    SignatureError,
    SiteConfigError,
    SiteDataError,
    UnknownArchitectureError,
    UnsignedPackageError,
    UntrustedKeyError,
    reply_text,
)
from fedmte.client.extract import ExtractionSettings, ModelMetrics, extract
from fedmte.client.limits import check_job_limits
from fedmte.client.packages import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
    parse_manifest,
    parse_public_key,
    verify_package,
    verify_package_bytes,
    verify_signature,
)
from fedmte.client.policy import SitePolicy, check_coordinator, scorer_refusals, violations
from fedmte.client.privacy import ModelRequest, ReleaseRequest, SecureContext, SitePrivacy
from fedmte.client.request_guard import NONCES_FILE, REQUEST_WINDOW, SeenNonces
from fedmte.client.site_config import SiteConfig, load_site_config
from fedmte.protocol.audit_format import ModelRef, parse_note
from fedmte.protocol.catalogue import Batch
from fedmte.protocol.durable import atomic_write
from fedmte.protocol.encoding import StrictModel
from fedmte.protocol.errors import (
    FedmteError,
    InvalidInputError,
    PolicyRefusal,
    ProtocolError,
    RefusalError,
    UnknownStatisticError,
    VerificationError,
)
from fedmte.protocol.job_messages import (
    FINISH,
    SETUP,
    SITE_FEATURES,
    FinishReply,
    FinishRequest,
    JobRoundRequest,
    ModelOffer,
    ModelStatus,
    ReleaseCost,
    RoundReplyDoc,
    SetupReply,
    SetupRequest,
    SignedRequest,
    SiteMetrics,
    block_key,
    decode_job_round,
    parse_setup,
    wire_bytes,
)
from fedmte.protocol.manifest import ModelManifest
from fedmte.protocol.wire import STATS, Payload

SITE_FILE_KEY = "site-file"
"""The SuperNode node-config key naming the site file."""

AGENT_QUERIES = (SETUP, STATS, FINISH)
"""The queries a site agent answers (a job's setup, its statistics rounds, its end)."""

REQUEST_ERRORS = (ProtocolError, VerificationError, UnknownStatisticError, SiteConfigError)
"""Failures decided from the request or the site file alone: their words may go back. Any
other failure may depend on the data and becomes :class:`SiteFailed`."""


class SiteFailed(RefusalError):
    """A failure that may depend on the site's data: the coordinator gets this one text, the
    data owner the reason (an abort record in the audit log)."""

    MESSAGE = "refused by site: the site could not answer this request; the reason is in the site's audit log"

    def __init__(self) -> None:
        super().__init__(self.MESSAGE, reason_code="site:failed", rule="site")


PACKAGES_DIR = "packages"
JOBS_DIR = "jobs"
Seal = Callable[[Payload], Payload]


@dataclass(frozen=True)
class SecureSeal:
    """A seal that masks the reply into a secure-sum upload, with the sum's public parameters:
    the privacy layer sizes share noise from them (:func:`fedmte.client.privacy.honest_shares`).
    A plain :data:`Seal` carries none, and its release gets full noise."""

    mask: Seal
    secure: SecureContext

    def __call__(self, reply: Payload) -> Payload:
        return self.mask(reply)


class SessionModel(StrictModel):
    label: str
    architecture: str
    weights_sha256: str
    feature_dim: int
    num_source_classes: int


class JobSession(BaseModel):
    """A verified job as this site accepted it (``<cache_dir>/jobs/<run id>.json``)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    requester: str = Field(description="hex sha256 of the coordinator's key (pinned by the policy)")
    coordinator: str = Field(description="the name the policy pins that key under")
    purpose: str
    labels: list[str]
    scorers: list[str]
    setup_sha256: str
    dataset: str = Field(description="fingerprint of the data as the setup found them")
    models: dict[str, SessionModel] = Field(default_factory=dict)
    reported: list[str] = Field(default_factory=list, description="models whose metrics went out")
    coordinator_key: str = Field(default="", description="ed25519:<base64>, the key that signed the setup; it must "
                                                         "sign every round and the finish of the job")
    last_round: int = Field(default=0, ge=0, description="the last round admitted (a request must come after it)")


def _rule_of(error: Exception) -> str:
    """The site rule a package problem falls under, for the refusal the coordinator sees."""
    if isinstance(error, (UntrustedKeyError, UnsignedPackageError)):
        return "trust.coordinators"
    if isinstance(error, SignatureError):
        return "package.signature"
    if isinstance(error, (UnknownArchitectureError, ArchitectureConfigError)):
        return "architecture"
    if isinstance(error, SiteDataError):
        return "data.input_kind"
    return "package"


class SiteAgent:
    """Everything one site file configures, answering the messages of scoring jobs."""

    def __init__(self, site_file: Path | str) -> None:
        self.site_file = Path(site_file).resolve()
        self.config: SiteConfig = load_site_config(self.site_file)
        self.policy: SitePolicy = self.config.require_policy()
        self.audit = self.config.audit
        self.name = self.config.site.name
        audit_key = load_signing_key(self.audit.signing_key)
        pinned = self.audit.verification_key_sha256
        if pinned is not None and key_fingerprint(audit_key.public_key()) != pinned:
            raise SiteConfigError(f"the audit key {self.audit.signing_key} is not the key the site file pins "
                                  f"(audit.verification_key_sha256 = {pinned[:16]}...); restore the key or re-pin it")
        self.privacy = SitePrivacy.open(
            self.policy, audit_dir=self.audit.dir, ledger_dir=self.audit.ledger_dir, site_id=self.name,
            signing_key=audit_key, checkpoint_every=self.audit.checkpoint_every, limits=self.config.limits,
        )
        self.cache = FeatureCache(self.config.site.cache_dir)
        self.nonces = SeenNonces(self.config.site.cache_dir / JOBS_DIR / NONCES_FILE, window=REQUEST_WINDOW)
        self.settings = ExtractionSettings.from_compute(self.config.compute, progress=False)
        self.lock = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self._metrics: dict[tuple[str, str], ModelMetrics] = {}
        self._entries: dict[tuple[str, str], CacheEntry] = {}
        self._maps: dict[Path, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self._data: dict[tuple[str, ...], tuple[SiteData, str]] = {}
        self._data_source: str | None = None

    # ------------------------------------------------------------------ plumbing

    @property
    def data_source(self) -> str:
        """The name the ledger keeps this data's budget under: the data's content identity
        (:func:`fedmte.client.data.content_identity`), not its path, so renaming the data or
        pointing a second site file at it does not start a fresh budget."""
        if self._data_source is None:  # once per opening of the data (every setup reopens it)
            try:
                self._data_source = f"{self.config.data.kind}:sha256:{content_identity(self.config.data)}"
            except OSError:  # the data cannot be read, so nothing of it can be released either
                return f"{self.config.data.kind}:unreadable"
        return self._data_source

    def close(self) -> None:
        self.privacy.close()

    def _site_data(self, labels: list[str], *, fresh: bool = False) -> tuple[SiteData, str]:
        """The site's data in the job's label space and its fingerprint (reopened when
        ``fresh``: at every setup, so a job always reads the data as they are now)."""
        key = tuple(labels)
        if fresh or key not in self._data:
            data = open_site_data(self.config.data, labels)
            self._data[key] = (data, data.fingerprint())
            self._data_source = None
        return self._data[key]

    def _job_path(self, run_id: str) -> Path:
        if not run_id.replace("-", "").isalnum():
            raise ProtocolError(f"run id {run_id!r} is not alphanumeric")
        return self.config.site.cache_dir / JOBS_DIR / f"{run_id}.json"

    def _save(self, session: JobSession) -> None:
        path = self._job_path(session.run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, session.model_dump_json(indent=1).encode())

    def _session(self, run_id: str) -> JobSession:
        path = self._job_path(run_id)
        if not path.is_file():
            raise ProtocolError(f"run {run_id} has no accepted setup at this site; the coordinator must send setup first")
        return JobSession.model_validate_json(path.read_text(encoding="utf-8"))

    def _send(self, reply: Payload, *, requester: str, recipient: str, run_id: str, round: int, purpose: str,
              request_sha256: str | None, **fields: Any) -> Payload:
        """Audit ``reply``'s exact bytes (intent fsynced first), then hand it over (outcome)."""
        with self.privacy.log.transmission(
            wire_bytes(reply), requester=requester, recipient=recipient, run_id=run_id, round=round,
            purpose=purpose, request_sha256=request_sha256, **fields,
        ):
            pass  # handed to the SuperNode, which delivers it to the coordinator's SuperLink
        return reply

    # ------------------------------------------------------------------ dispatch

    def answer(self, query: str, payload: Payload, *, run_id: str | int | None = None,
               seal: Seal | SecureSeal | None = None) -> Payload:
        """Answer one message; ``run_id`` is the transport's run (checked against the request)."""
        expected = None if run_id is None else str(run_id)
        with self.lock:
            try:
                if query == SETUP:
                    return self.setup(payload, expected)
                if query == STATS:
                    return self.stats(payload, expected, seal=seal)
                if query == FINISH:
                    return self.finish(payload, expected)
                raise ProtocolError(f"unknown query {query!r}; a site agent answers {SETUP}, {STATS} and {FINISH}")
            except RefusalError as refusal:  # audited as a refusal (or a failed release) where it was decided
                self._audit_error_reply(refusal, expected, payload)
                raise
            except REQUEST_ERRORS as error:  # decided from the request or the site file: its words may go back
                self._abort(error, expected, payload)
                self._audit_error_reply(error, expected, payload)
                raise
            except Exception as error:  # noqa: BLE001 - anything else may depend on the data: one text
                self._abort(error, expected, payload)
                generic = SiteFailed()
                self._audit_error_reply(generic, expected, payload)
                raise generic from None

    def _abort(self, error: BaseException, expected: str | None, payload: Payload) -> None:
        """The detailed reason of a failure, for the data owner's eyes (it never leaves)."""
        run = expected or str(payload.doc.get("run_id") or "-")
        try:
            self.privacy.log.abort(run_id=run[:64], reason_code=f"error:{type(error).__name__}"[:64],
                                   detail=reply_text(error)[:4096])
        except FedmteError:
            pass  # a broken log already refuses everything; the original error matters more

    def _audit_error_reply(self, error: BaseException, expected: str | None, payload: Payload) -> None:
        """The error reply's exact bytes, before the transport sends them (unless the privacy
        layer already recorded them with the release's charge)."""
        if getattr(error, "reply_audited", False):
            return
        run = (expected or str(payload.doc.get("run_id") or "-"))[:64]
        round_ = payload.doc.get("round")
        try:
            requester = self._session(run).requester if self._job_path(run).is_file() else "unknown"
        except FedmteError:
            requester = "unknown"
        try:
            with self.privacy.log.transmission(
                reply_text(error).encode("utf-8"), requester=requester, recipient="coordinator", run_id=run,
                round=round_ if isinstance(round_, int) and round_ >= 0 else 0, purpose="error reply",
            ):
                pass  # handed to the transport as the message's error reply
        except FedmteError:
            pass  # a broken log already refuses everything; the original error matters more

    # ------------------------------------------------------------------ request checks

    def _admit(self, what: str, request: SetupRequest | SignedRequest, *, requester: str, purpose: str,
               request_sha256: str, session: JobSession | None, arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Let a coordinator request through only if it is signed (a round or finish: by the key
        that signed the job's setup, over its document and ``arrays``; the setup's signature is
        checked against ``[trust.coordinators]`` before this), fresh, new and in order. A round or
        finish admitted moves the session's ``last_round`` to its round (saved before it is
        answered). Anything else: a refusal record naming the rule, and a typed error."""
        round_ = int(request.round)

        def refuse(rule: str, message: str, error: type[FedmteError] = ProtocolError) -> NoReturn:
            self.privacy.log.refusal(requester=requester, run_id=request.run_id, round=round_, reason_code=rule,
                                     rule=rule, message=message, purpose=purpose, request_sha256=request_sha256,
                                     data_source=self.data_source)
            raise error(f"refused by site [{rule}]: {message}")

        if isinstance(request, SignedRequest):
            assert session is not None
            try:
                if not session.coordinator_key:
                    raise VerificationError(f"run {request.run_id} was set up without a coordinator key to check its "
                                            "requests against; the coordinator must set the job up again")
                request.verify(parse_public_key(session.coordinator_key), arrays, what)
            except FedmteError as error:
                refuse("request.signature", str(error), VerificationError)
        if not request.nonce or request.issued_at <= 0:
            refuse("request.nonce", f"the {what} carries no nonce or issued_at; a site answers only requests "
                                    "stamped and signed by the coordinator")
        now = time.time()
        age = now - request.issued_at
        if abs(age) > REQUEST_WINDOW:
            refuse("request.stale", f"the {what} was issued at {request.issued_at}, {abs(age):.0f} s "
                                    f"{'before' if age > 0 else 'ahead of'} this site's clock; a request is answered "
                                    f"within {REQUEST_WINDOW:g} s of it")
        if not self.nonces.remember(request.nonce, request.issued_at, now):
            refuse("request.replay", f"the {what}'s nonce {request.nonce[:16]}... was seen before: a replayed "
                                     "request is refused")
        if session is None:
            return
        if not isinstance(request, SignedRequest):
            if session.last_round > 0:
                refuse("request.order", f"run {request.run_id} already answered round {session.last_round}; "
                                        "a setup comes before the job's rounds")
            return
        if round_ <= session.last_round:
            refuse("request.order", f"the {what} is for round {round_}, but this site already answered round "
                                    f"{session.last_round} of run {request.run_id}; rounds only move forward")
        session.last_round = round_
        self._save(session)

    # ------------------------------------------------------------------ setup

    def _verify_coordinator(self, signed_request: SetupRequest, signature: bytes, signed_bytes: bytes) -> tuple[str, str]:
        """(fingerprint, pinned name) of the coordinator key that signed the request
        (``signed_bytes``: its :meth:`~SetupRequest.signing_bytes` with the message's arrays)."""
        public = parse_public_key(signed_request.coordinator_key)
        fingerprint = key_fingerprint(public)
        name = check_coordinator(self.policy, fingerprint)
        try:
            public.verify(signature, signed_bytes)
        except InvalidSignature:
            raise PolicyRefusal([("coordinator_keys", "the setup request's signature does not verify under the "
                                                      "pinned coordinator key it names")]) from None
        return fingerprint, name

    def setup(self, payload: Payload, expected_run: str | None) -> Payload:
        signed, weights = parse_setup(payload)
        request = signed.request
        if expected_run is not None and request.run_id != expected_run:
            raise ProtocolError(f"the setup request is for run {request.run_id}, this message belongs to run {expected_run}")
        signed_bytes = request.signing_bytes(payload.arrays)
        setup_sha = hashlib.sha256(signed_bytes).hexdigest()
        claimed = key_fingerprint(parse_public_key(request.coordinator_key))
        try:
            requester, coordinator = self._verify_coordinator(request, signed.signature_bytes(), signed_bytes)
            refused = scorer_refusals(self.policy, request.scorers)
            if request.scorers and len(refused) == len(set(request.scorers)):  # nothing left to run
                raise PolicyRefusal([("scorers", f"{scorer}: {reason}") for scorer, reason in refused.items()])
            check_job_limits(self.config.limits, len(request.labels))
        except RefusalError as refusal:
            self.privacy.log.refusal(requester=claimed, run_id=request.run_id, round=0, reason_code=refusal.reason_code,
                                     rule=refusal.rule, message=str(refusal), purpose=request.purpose,
                                     request_sha256=setup_sha, data_source=self.data_source)
            raise
        path = self._job_path(request.run_id)
        self._admit("setup request", request, requester=requester, purpose=request.purpose, request_sha256=setup_sha,
                    session=self._session(request.run_id) if path.is_file() else None)
        data, fingerprint = self._site_data(request.labels, fresh=not path.is_file())
        allowed = [scorer for scorer in request.scorers if scorer not in refused]
        if refused and not path.is_file():  # the scorers this site will not run, each with its rule, audited
            self.privacy.log.refusal(requester=requester, run_id=request.run_id, round=0, reason_code="policy:scorers",
                                     rule="scorers", message="; ".join(f"{s}: {r}" for s, r in refused.items())[:4096],
                                     purpose=request.purpose, request_sha256=setup_sha, data_source=self.data_source)
        session = self._session(request.run_id) if path.is_file() else JobSession(
            run_id=request.run_id, requester=requester, coordinator=coordinator, purpose=request.purpose,
            labels=list(request.labels), scorers=allowed, setup_sha256=setup_sha, dataset=fingerprint,
            coordinator_key=request.coordinator_key)
        if (session.labels, session.scorers, session.requester) != (list(request.labels), allowed, requester):
            raise ProtocolError(f"run {request.run_id} was set up with other labels, scorers or coordinator")
        statuses: dict[str, ModelStatus] = {}
        refs: list[ModelRef] = []
        for offer in request.models:
            if offer.kind == SITE_FEATURES:
                status = self._offer_site_features(offer, data, request, requester, setup_sha)
                statuses[offer.model_id] = status
                refs.append(ModelRef(arch_id=SITE_FEATURES, weights_sha256=offer.model_id))
                if status.status == "ready":
                    session.models[offer.model_id] = SessionModel(
                        label=offer.label, architecture=SITE_FEATURES, weights_sha256=offer.model_id,
                        feature_dim=int(status.feature_dim or 0), num_source_classes=int(status.num_source_classes or 0))
                continue
            status, manifest = self._offer(offer, weights.get(offer.model_id), data, request, requester, setup_sha)
            statuses[offer.model_id] = status
            if manifest is not None:
                refs.append(ModelRef(arch_id=manifest.architecture, weights_sha256=manifest.weights_sha256))
                if status.status == "ready":
                    session.models[offer.model_id] = SessionModel(
                        label=offer.label, architecture=manifest.architecture, weights_sha256=manifest.weights_sha256,
                        feature_dim=int(status.feature_dim or 0), num_source_classes=int(status.num_source_classes or 0))
        weights_seen = [m.weights_sha256 for m in session.models.values()]
        if len(set(weights_seen)) != len(weights_seen):
            raise ProtocolError("two offered models have the same weights; offer each model once")
        self._save(session)
        reply = Payload(doc=SetupReply(site=self.name, models=statuses, dp=self.policy.dp.enabled, refused_scorers=refused)
                        .model_dump(mode="json", by_alias=True))
        return self._send(reply, requester=requester, recipient=f"coordinator:{coordinator}", run_id=request.run_id,
                          round=0, purpose=request.purpose, request_sha256=setup_sha, models=refs)

    def _offer_site_features(self, offer: ModelOffer, data: SiteData, request: SetupRequest, requester: str,
                             setup_sha: str) -> ModelStatus:
        """The site's own precomputed features as a candidate: only a features-kind site holds
        them, and the policy still decides (``site_features`` must be an allowed architecture)."""
        if isinstance(data, FeatureData):
            found = violations(self.policy, [], [], SITE_FEATURES, data.dim)
            if not found:
                return ModelStatus(status="ready", feature_dim=data.dim, num_source_classes=data.num_source_classes)
            refusal = PolicyRefusal(found)
            rule, reason_code, message = refusal.rule, refusal.reason_code, str(refusal)
        else:
            rule, reason_code = "data.kind", "data:no_site_features"
            message = (f"this site holds {self.config.data.kind} data, not precomputed features; only a site with "
                       "[data] kind = \"features\" answers a site-features candidate")
        self.privacy.log.refusal(requester=requester, run_id=request.run_id, round=0, reason_code=reason_code[:64],
                                 rule=rule, message=message, purpose=request.purpose, request_sha256=setup_sha,
                                 data_source=self.data_source,
                                 models=[ModelRef(arch_id=SITE_FEATURES, weights_sha256=offer.model_id)])
        return ModelStatus(status="refused", rule=rule, reason=message[:4096])

    def _offer(self, offer: ModelOffer, weights: bytes | None, data: SiteData, request: SetupRequest,
               requester: str, setup_sha: str) -> tuple[ModelStatus, ModelManifest | None]:
        """Verify one offered package against the site's pins, registry, policy and data."""
        manifest: ModelManifest | None = None
        try:
            manifest_bytes = offer.manifest.encode("utf-8")
            if hashlib.sha256(manifest_bytes).hexdigest() != offer.model_id:
                raise PackageError(f"model id {offer.model_id[:16]}... is not the sha256 of the manifest offered with it")
            signature = offer.signature.encode("utf-8")
            verify_signature(manifest_bytes, signature, self.config.trust.keys)
            manifest = parse_manifest(manifest_bytes)
            _, _, dims = resolve(manifest, self.config.limits, batch_size=self.settings.batch_size)
            dim = int(dims[manifest.feature_output])
            classes = manifest.source_head.num_classes if manifest.source_head is not None else 0
            found = violations(self.policy, [], [], manifest.architecture, dim)
            if found:
                raise PolicyRefusal(found)
            data.check_compatible(manifest.preprocessing)
            if offer.model_id not in self._models:
                staged = self.config.site.cache_dir / PACKAGES_DIR / offer.model_id
                if staged.is_dir():
                    package = verify_package(staged, self.config.trust.keys, self.config.limits)
                elif weights is not None:
                    package = verify_package_bytes(manifest_bytes, bytearray(weights), signature, self.config.trust.keys,
                                                   self.config.limits)
                    self._stage(offer.model_id, manifest_bytes, weights, signature)
                else:
                    return ModelStatus(status="need_weights", feature_dim=dim, num_source_classes=classes), manifest
                loaded = load_verified(package, self.config.limits)
                if loaded.package_id != offer.model_id:
                    raise PackageError("the staged package is not the offered model")
                self._models[offer.model_id] = loaded
            return ModelStatus(status="ready", feature_dim=dim, num_source_classes=classes), manifest
        except RefusalError as refusal:
            rule, reason_code, message = refusal.rule, refusal.reason_code, str(refusal)
        except FedmteError as error:
            rule = _rule_of(error)
            reason_code, message = f"package:{type(error).__name__}", f"{type(error).__name__}: {error}"
        models = [] if manifest is None else [ModelRef(arch_id=manifest.architecture, weights_sha256=manifest.weights_sha256)]
        self.privacy.log.refusal(requester=requester, run_id=request.run_id, round=0, reason_code=reason_code[:64],
                                 rule=rule, message=message, purpose=request.purpose, request_sha256=setup_sha,
                                 data_source=self.data_source, models=models)
        return ModelStatus(status="refused", rule=rule, reason=message[:4096]), manifest

    def _stage(self, model_id: str, manifest: bytes, weights: bytes, signature: bytes) -> None:
        """Write a verified package into the cache (temporary folder, then rename)."""
        root = self.config.site.cache_dir / PACKAGES_DIR
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        try:
            (tmp / MANIFEST_FILE).write_bytes(manifest)
            (tmp / WEIGHTS_FILE).write_bytes(weights)
            (tmp / SIGNATURE_FILE).write_bytes(signature)
            os.rename(tmp, root / model_id)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (root / model_id).is_dir():
                raise

    # ------------------------------------------------------------------ rounds

    def _features(self, model_id: str, data: SiteData, fingerprint: str) -> CacheEntry:
        """The model's cached features of this data, running the model once if needed."""
        known = self._entries.get((model_id, fingerprint))
        if known is not None:
            if known.path.is_dir():
                return known
            self._maps.pop(known.path, None)  # the entry was deleted: never read its old maps
        model = self._models.get(model_id)
        if model is None:
            staged = self.config.site.cache_dir / PACKAGES_DIR / model_id
            model = load_verified(verify_package(staged, self.config.trust.keys, self.config.limits), self.config.limits)
            self._models[model_id] = model
        entry = self.cache.get(model.package_id, fingerprint)
        if entry is None:
            result = extract(model, data, (), cache=self.cache, settings=self.settings, dataset=fingerprint)
            self._metrics[(model_id, fingerprint)] = result.metrics
            entry = result.entry
            assert entry is not None
        self._entries[(model_id, fingerprint)] = entry
        return entry

    def _batches(self, entry: CacheEntry, num_classes: int) -> Iterator[Batch]:
        """The cached rows as float64 batches (source probabilities: softmax of the logits).
        The entry's memory maps are opened once per agent, not once per round."""
        maps = self._maps.get(entry.path)
        if maps is None:
            maps = self._maps[entry.path] = (entry.features(), entry.labels(), entry.logits())
        features, labels, logits = maps
        step = self.settings.stats_batch
        for start in range(0, entry.meta.rows, step):
            rows = slice(start, start + step)
            ids = np.arange(start, min(start + step, entry.meta.rows))  # the row's place in the cache, in data order
            yield Batch.from_model_outputs(features[rows], labels[rows], None if logits is None else logits[rows],
                                           num_classes, row_ids=ids)

    def _site_feature_batches(self, data: SiteData, num_classes: int) -> Iterator[Batch]:
        """A features-kind site's own rows as float64 batches (bad rows skipped or refused)."""
        assert isinstance(data, FeatureData)
        start = 0
        for features, labels, probs in data.rows(self.settings.stats_batch, data.new_report()):
            ids = np.arange(start, start + len(labels))  # the row's place among the usable rows, in data order
            start += len(labels)
            yield Batch(features=features, labels=labels, num_classes=num_classes, source_probs=probs, row_ids=ids)

    def _site_metrics(self, model_id: str, fingerprint: str) -> SiteMetrics | None:
        metrics = self._metrics.get((model_id, fingerprint))
        if metrics is None:
            model = self._models.get(model_id)
            entry = None if model is None else self.cache.get(model.package_id, fingerprint)
            if entry is None:
                return None
            metrics = ModelMetrics.model_validate(entry.meta.metrics)
        return SiteMetrics(device=metrics.device, latency_ms=metrics.latency_ms, batch_latency_ms=metrics.batch_latency_ms,
                           throughput=metrics.throughput, peak_rss_bytes=metrics.peak_rss_bytes,
                           peak_device_bytes=metrics.peak_device_bytes)

    def stats(self, payload: Payload, expected_run: str | None, *, seal: Seal | SecureSeal | None = None) -> Payload:
        """Release one round's statistics for every requested model (see the module docstring)."""
        request = JobRoundRequest.parse(payload.doc)
        if expected_run is not None and request.run_id != expected_run:
            raise ProtocolError(f"the round request is for run {request.run_id}, this message belongs to run {expected_run}")
        session = self._session(request.run_id)
        self._admit("round request", request, requester=session.requester, purpose=session.purpose,
                    request_sha256=hashlib.sha256(wire_bytes(payload)).hexdigest(), session=session,
                    arrays=payload.arrays)
        if request.num_classes != len(session.labels):
            raise ProtocolError(f"the round asks for {request.num_classes} classes; the job has {len(session.labels)} labels")
        unknown = sorted(set(request.models) - set(session.models))
        if unknown:
            raise ProtocolError(f"the round names model(s) {[m[:16] for m in unknown]} this site did not accept at setup")
        try:
            requests = decode_job_round(request, payload.arrays)
        except InvalidInputError as error:  # the request's own arrays do not fit the catalogue
            raise ProtocolError(f"malformed round request: {error}") from None
        data, fingerprint = self._site_data(session.labels)
        if fingerprint != session.dataset:
            raise ProtocolError("the site's data changed since this job's setup; the job must start again")
        model_requests: dict[str, ModelRequest] = {}
        for model_id, stats in requests.items():
            model = session.models[model_id]
            model_requests[model_id] = ModelRequest(
                arch_id=model.architecture, weights_sha256=model.weights_sha256, feature_dim=model.feature_dim,
                stats=tuple(stats), num_source_classes=model.num_source_classes)
        model_of = {id(mr): model_id for model_id, mr in model_requests.items()}
        request_sha = hashlib.sha256(wire_bytes(payload)).hexdigest()
        release_request = ReleaseRequest(
            requester=session.requester, recipient=f"coordinator:{session.coordinator}", run_id=request.run_id,
            round=request.round, data_source=self.data_source, dataset_version=fingerprint,
            num_classes=request.num_classes, models=tuple(model_requests.values()), scorers=tuple(session.scorers),
            purpose=session.purpose, request_sha256=request_sha,
            secure=seal.secure if isinstance(seal, SecureSeal) else None,
        )

        def batches_for(model: ModelRequest) -> Iterator[Batch]:
            if model.arch_id == SITE_FEATURES:
                return self._site_feature_batches(data, request.num_classes)
            entry = self._features(model_of[id(model)], data, fingerprint)
            return self._batches(entry, request.num_classes)

        release = self.privacy.prepare(release_request, batches_for)
        blocks = release.blocks()
        arrays: dict[str, np.ndarray] = {}
        noise_std: dict[str, float] = {}
        added = {block.key: 0.0 if block.noise_std is None else float(block.noise_std) for block in release.statistics}
        for model_id, model in model_requests.items():
            for stat in model.unique_stats():
                name = f"{model.weights_sha256}/{stat.key}"
                arrays[block_key(model_id, stat.key)] = blocks[name]
                noise_std[block_key(model_id, stat.key)] = added[name]
        metrics = {}
        for model_id in model_requests:
            if model_id not in session.reported:
                measured = self._site_metrics(model_id, fingerprint)
                if measured is not None:
                    metrics[model_id] = measured
        charge = release.privacy
        doc = RoundReplyDoc(
            round=request.round, metrics=metrics,
            privacy=ReleaseCost(
                mechanism=charge.mechanism, cached=charge.cached, mu_sq_before=float(charge.mu_sq_before),
                mu_sq_after=float(charge.mu_sq_after), delta=None if charge.delta is None else float(charge.delta),
                epsilon_budget=None if charge.epsilon_budget is None else float(charge.epsilon_budget),
                noise_std=noise_std),
        )
        reply = Payload(doc=doc.model_dump(mode="json", by_alias=True), arrays=arrays)
        if seal is not None:
            reply = seal(reply)
        self._send(reply, requester=session.requester, recipient=release_request.recipient, run_id=request.run_id,
                   round=request.round, purpose=session.purpose, request_sha256=request_sha, models=release.models,
                   dataset=release.dataset, statistics=release.statistics, privacy=release.privacy)
        if metrics:
            session.reported = sorted(set(session.reported) | set(metrics))
            self._save(session)
        return reply

    # ------------------------------------------------------------------ finish

    def finish(self, payload: Payload, expected_run: str | None) -> Payload:
        """Sign a checkpoint, send it, forget the job."""
        request = FinishRequest.parse(payload.doc)
        if expected_run is not None and request.run_id != expected_run:
            raise ProtocolError(f"the finish request is for run {request.run_id}, this message belongs to run {expected_run}")
        session = self._session(request.run_id)
        self._admit("finish request", request, requester=session.requester, purpose=session.purpose,
                    request_sha256=hashlib.sha256(wire_bytes(payload)).hexdigest(), session=session,
                    arrays=payload.arrays)
        note = self.privacy.log.checkpoint()
        checkpoint, _ = parse_note(note)
        reply = Payload(doc=FinishReply(site=self.name, tree_size=checkpoint.tree_size, checkpoint=note)
                        .model_dump(mode="json", by_alias=True))
        self._send(reply, requester=session.requester, recipient=f"coordinator:{session.coordinator}",
                   run_id=request.run_id, round=0, purpose=f"job {request.status}: audit checkpoint",
                   request_sha256=hashlib.sha256(wire_bytes(payload)).hexdigest())
        self._job_path(request.run_id).unlink(missing_ok=True)
        active: set[str] = set()
        for path in (self.config.site.cache_dir / JOBS_DIR).glob("*.json"):
            active |= set(JobSession.model_validate_json(path.read_text(encoding="utf-8")).models)
        for model_id in list(self._models):
            if model_id not in active:
                del self._models[model_id]
        return reply


# --------------------------------------------------------------------------- per process

_AGENTS: dict[Path, SiteAgent] = {}
_AGENTS_LOCK = threading.Lock()
_KEEP_OPEN = False


def keep_agents_open() -> None:
    """Keep each site file's agent (models, open audit log) across messages: for a process
    that answers many messages, such as :mod:`fedmte.client.site_runner`. Without it, every
    message opens the agent and closes it again (a stock SuperNode starts a process per
    message)."""
    global _KEEP_OPEN
    _KEEP_OPEN = True


def hold_outcomes(site_file: Path | str) -> None:
    """The site runner is about to hand one message to the ClientApp: keep back the outcome of
    every reply the site's audit log records until :func:`settle_outcomes` (a kept agent only)."""
    if not _KEEP_OPEN:
        return
    agent = agent_for(site_file)
    with agent.lock:
        agent.privacy.log.hold_outcomes()


def settle_outcomes(site_file: Path | str, *, delivered: bool, detail: str = "") -> int:
    """The transport accepted (or refused) the reply: record ``sent`` (or ``failed``) for it."""
    if not _KEEP_OPEN:
        return 0
    agent = agent_for(site_file)
    with agent.lock:
        return agent.privacy.log.settle(delivered=delivered, detail=detail)


def agent_for(site_file: Path | str) -> SiteAgent:
    path = Path(site_file).resolve()
    with _AGENTS_LOCK:
        agent = _AGENTS.get(path)
        if agent is None:
            agent = SiteAgent(path)
            if _KEEP_OPEN:
                _AGENTS[path] = agent
        return agent


def answer(query: str, payload: Payload, site_file: Path | str, *, run_id: str | int | None = None,
           seal: Seal | SecureSeal | None = None) -> Payload:
    """Answer one message with the agent of ``site_file``."""
    agent = agent_for(site_file)
    try:
        return agent.answer(query, payload, run_id=run_id, seal=seal)
    finally:
        if not _KEEP_OPEN:
            agent.close()


def close_agents() -> None:
    """Close every kept agent (sign a final checkpoint of each audit log)."""
    with _AGENTS_LOCK:
        for agent in _AGENTS.values():
            with agent.lock:  # never close a log in the middle of an answer
                agent.close()
        _AGENTS.clear()


__all__ = ["SITE_FILE_KEY", "JobSession", "SecureSeal", "SiteAgent", "agent_for", "answer", "close_agents", "hold_outcomes",
           "keep_agents_open", "settle_outcomes"]
