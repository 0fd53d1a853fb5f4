"""The site's side of the secure sum over the network: signed requests in, masked words out.

A site takes part in secure jobs when its site file has a ``[secure]`` table
(:class:`fedmte.client.site_config.SecureSettings`): its identity key, the roster of peers it
sums with, where the nonces it has seen are kept, and its floors on the declared bounds. The
coordinators it accepts requests from are the one list of ``[trust.coordinators]``; its site
id is ``[site] name``. The coordinator can set none of these.

:class:`SecureSite` answers the five ``secure_*`` queries (:mod:`fedmte.protocol.wire`).
Every request must be signed by a pinned coordinator key, fresh, and carry a nonce never seen
before (:func:`fedmte.protocol.secure_rounds.open_request`); anything else is refused and the
refusal written to the audit log. A job's parameters must name only sites of the site's own
roster (:class:`~fedmte.protocol.secure_sum.SiteSecureSum` checks the peers' signed keys
against it). A phase computes the statistics of the wrapped inner query with the site's
ordinary handler (any :class:`~fedmte.protocol.statistics.Statistics`, namespaced keys
included), builds the phase's sum spec itself from the public bounds and the request
digest, and returns only masked ring words.

Why the site sets floors on the declared bounds
------------------------------------------------
A job's public bounds (:class:`~fedmte.protocol.secure_rounds.DeclaredBounds`) come from the
coordinator, and a site whose rows break them refuses with a
:class:`~fedmte.protocol.errors.BoundExceededError`. That refusal would tell a coordinator
that declares ever smaller ``max_rows`` over many jobs the site's row count. So the site
refuses, at setup and before touching its data, any job that declares less than its own
floors (``min_declared_rows``, ``min_declared_feature_norm``): with floors above what the
site holds, whether a job runs depends only on public values. A loose bound costs nothing
(the ring has 128 bits).

Self masks, one active set per job, one setup per job id
---------------------------------------------------------
A site refuses a job with ``self_masks = false`` unless its owner sets
``require_self_masks = false`` (rule ``secure.require_self_masks``): without self masks a
coordinator that declares an uploaded site dropped reads that site's statistics. The active
set is fixed for a job by its first masked upload
(:class:`~fedmte.protocol.secure_sum.SiteSecureSum`): an unmask request, in any phase,
naming another active set is refused (rule ``active_set_fixed``), and the site records the
refusal, aborts the job and forgets its keys, so sums of the same statistics over different
sets of sites (``a + b``, ``b + c``, ``a + c``) are never unmasked. A job id is set up once
per site, ever (rule ``job_id``; the ids are kept in ``state_dir``): the request digest of a
phase binds the job id and the phase, so no request digest is ever unmasked twice, under one
active set or another. A *new* job asking for the same statistics is a new release, which
the site's DP noise and privacy ledger govern.

What the site audits
--------------------
Every reply that leaves through :meth:`SecureSite.handle` has an intent in the site's audit
log, with a copy of its exact bytes (:func:`~fedmte.protocol.job_messages.wire_bytes` of the
reply payload), written before it is handed over, and an outcome once it is handed to the
transport (as the site agent records its own replies): the advertisement,
the encrypted share bundles, the revealed shares (with the active and dropped lists the site
acted on, in the intent's purpose and in the reply itself), the abort acknowledgement, and
every error reply (the bytes of :func:`fedmte.client.errors.reply_text`, which is what the site runner
sends). The masked upload is audited once, by the site agent that computed it (the ``seal``
hook), with the sites it was masked against in its document.

Share noise
-----------
The seal a phase hands to the site agent is a :class:`~fedmte.client.site_agent.SecureSeal`
carrying the job's threshold, sites and self-mask setting, so a site whose policy opts in
(``[policy.dp] distributed = true``) adds only a share of the DP noise: the honest shares
in any sum the secure sum unmasks add up to the full noise
(:func:`fedmte.client.privacy.honest_shares`). A plain sum always gets full noise.

Where the job's state lives
---------------------------
The :class:`~fedmte.protocol.secure_sum.SiteSecureSum` of a job (its X25519 private keys,
self-mask seeds and the shares it holds for its peers) stays in the memory of the process
that answers the site's messages: fedmte's site runner (:mod:`fedmte.client.site_runner`)
is one long-lived process, and :func:`answer_secure` keeps one :class:`SecureSite` per
configuration file in it. Secret keys never touch the disk. A site that restarts mid-job
loses the job and counts as dropped (the others recover its masks); a stock SuperNode,
which starts a new process per message, cannot take part, and the first upload says so.
Only the seen nonces and the ids of the jobs it set up are persisted (``state_dir``), so a
restart reopens neither replays nor a finished job. Jobs are kept for ``session_ttl``
seconds, at most ``max_sessions`` at once. The file is
read once per process: edits take effect when the site runner restarts (the plain-statistics
check reads it on every message, so ``require_secure_sum`` never lags).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmte.client import site_agent
from fedmte.client.audit_log import AuditLog, load_signing_key
from fedmte.client.errors import reply_text
from fedmte.client.privacy import SecureContext
from fedmte.client.site_config import SiteConfig, load_site_config
from fedmte.protocol.errors import (
    FedmteError,
    InvalidInputError,
    ProtocolError,
    RefusalError,
    ThresholdError,
    VerificationError,
)
from fedmte.protocol.job_messages import wire_bytes
from fedmte.protocol.keys import fingerprint, parse_public_key
from fedmte.protocol.secure_rounds import (
    AbortBody,
    AdvertiseBody,
    DeclaredBounds,
    Envelope,
    RevealBody,
    ShareBody,
    UploadBody,
    inner_stats,
    open_request,
    parse_body,
    request_digest,
    round_sum_spec,
)
from fedmte.protocol.secure_sum import (
    SITE_ID_PATTERN,
    ActiveSetError,
    Advertisement,
    SecureSumParams,
    ShareBundle,
    SiteSecureSum,
    UnmaskRequest,
)
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.wire import (
    SECURE_ABORT,
    SECURE_ADVERTISE,
    SECURE_REVEAL,
    SECURE_SHARE,
    SECURE_UPLOAD,
    Payload,
)

NONCES_FILE = "secure_nonces.txt"
JOBS_FILE = "secure_jobs.txt"

AuditWriter = Callable[[Callable[[AuditLog], None]], None]
"""Runs a write against the site's open audit log."""
Seal = Callable[[Payload], Payload]
"""Masks a plain statistics reply into the upload that leaves the site."""
Compute = Callable[[str, Payload, Seal], Payload]
"""``compute(inner_query, payload, seal)``: the site's statistics handler; it computes the plain
reply, passes it through ``seal`` and returns (and audits) the sealed payload, as
:meth:`fedmte.client.site_agent.SiteAgent.stats` does with its ``seal`` hook."""


class SecureSiteConfig(BaseModel):
    """What :class:`SecureSite` runs on, drawn from the site file (:func:`secure_config`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site_id: str = Field(pattern=SITE_ID_PATTERN)
    identity_key: Path
    coordinators: dict[str, str] = Field(min_length=1, description="name -> ed25519:... key")
    roster: dict[str, str] = Field(min_length=1, description="site id -> ed25519:... identity key")
    audit_dir: Path | None = None
    audit_key: Path | None = Field(default=None, description="key signing audit checkpoints (default: identity_key)")
    state_dir: Path | None = None
    max_request_age: float = Field(default=600.0, gt=0, le=86_400)
    require_secure_sum: bool = True
    require_self_masks: bool = True
    min_declared_rows: int = Field(default=1_000_000, ge=1)
    min_declared_feature_norm: float = Field(default=0.0, ge=0)
    max_sessions: int = Field(default=8, ge=1, le=1024)
    session_ttl: float = Field(default=86_400.0, gt=0)

    def pinned_coordinators(self) -> dict[str, Ed25519PublicKey]:
        """The pinned coordinator keys by fingerprint."""
        keys = [parse_public_key(text) for text in self.coordinators.values()]
        return {fingerprint(key): key for key in keys}

    def coordinator_names(self) -> dict[str, str]:
        """The name each pinned coordinator key is listed under, by fingerprint."""
        return {fingerprint(parse_public_key(text)): name for name, text in self.coordinators.items()}

    def roster_keys(self) -> dict[str, Ed25519PublicKey]:
        return {site: parse_public_key(text) for site, text in self.roster.items()}


def secure_config(config: SiteConfig) -> SecureSiteConfig:
    """The secure-sum settings of a site file; refuses a site file without ``[secure]``."""
    secure = config.secure
    if secure is None:
        raise InvalidInputError("this site takes no part in the secure sum: its site file has no [secure] table "
                                "(identity_key and roster); add one to accept secure jobs")
    return SecureSiteConfig(
        site_id=config.site.name, identity_key=secure.identity_key, coordinators=dict(config.trust.coordinators),
        roster=dict(secure.roster), state_dir=secure.state_dir, max_request_age=secure.max_request_age,
        require_secure_sum=secure.require_secure_sum, require_self_masks=secure.require_self_masks,
        min_declared_rows=secure.min_declared_rows, min_declared_feature_norm=secure.min_declared_feature_norm,
        max_sessions=secure.max_sessions, session_ttl=secure.session_ttl,
    )


@dataclass(frozen=True)
class _Reply:
    """Who a reply goes to and what it answers, for its audit intent."""

    requester: str
    recipient: str
    run_id: str
    round: int
    request_sha256: str | None


@dataclass
class _Session:
    """One job at this site."""

    job_id: str
    signer: str
    bounds: DeclaredBounds
    model_hashes: tuple[str, ...]
    secure: SiteSecureSum
    created: float
    shared: bool = False
    received: bool = False
    digests: dict[int, str] = field(default_factory=dict)


class SecureSite:
    """Answers the ``secure_*`` queries of one site (see the module docstring).

    Parameters
    ----------
    config : SecureSiteConfig
        The site's own settings.
    compute : callable
        ``compute(inner_query, payload, seal) -> Payload``: computes the plain statistics reply,
        seals it with ``seal`` (which masks it) and returns the sealed payload (:data:`Compute`).
    identity_key : Ed25519PrivateKey, optional
        Defaults to the key file the config names.
    clock : callable
        Unix seconds (tests move it).
    audit : callable, optional
        ``audit(write)`` calls ``write(log)`` with the site's open :class:`AuditLog` (the site
        agent's, which holds the log's lock); by default the log in ``config.audit_dir`` is
        opened for each record.
    """

    def __init__(self, config: SecureSiteConfig, *, compute: Compute, identity_key: Ed25519PrivateKey | None = None,
                 clock: Callable[[], float] = time.time, audit: AuditWriter | None = None) -> None:
        self.config = config
        self._compute = compute
        self._audit_writer = audit
        self._identity = identity_key if identity_key is not None else load_signing_key(config.identity_key)
        roster = config.roster_keys()
        if roster[config.site_id].public_bytes_raw() != self._identity.public_key().public_bytes_raw():
            raise VerificationError(f"the identity key is not the key the roster lists for {config.site_id!r}")
        self._roster = roster
        self._pinned = config.pinned_coordinators()
        self._clock = clock
        self._names = config.coordinator_names()
        self._sessions: dict[str, _Session] = {}
        self._nonces: dict[str, float] = {}
        self._jobs_seen: set[str] = set()
        self._lock = threading.Lock()
        self._load_nonces()
        self._load_jobs()

    # ------------------------------------------------------------------ entry point

    def handle(self, query: str, payload: Payload) -> Payload:
        """Verify one signed request and answer it; raise (and audit) a refusal. Every reply,
        error replies included, is audited before it leaves (module docstring)."""
        with self._lock:
            reply_to = self._reply_to(payload)
            try:
                reply, purpose = self._answer(query, payload)
            except Exception as error:
                self._audit_error_reply(reply_to, query, error)
                raise
            if purpose is not None:  # None: the site agent audited it (the masked upload)
                self._send(reply, reply_to, purpose)
            return reply

    def _answer(self, query: str, payload: Payload) -> tuple[Payload, str | None]:
        envelope = self._accept(query, payload)
        body = parse_body(envelope)
        if query == SECURE_ADVERTISE:
            try:
                return self._advertise(envelope, body)
            except RefusalError as error:
                self._audit_refusal(envelope.signer, envelope.job_id, 0, error.reason_code, error.rule, str(error))
                raise
        session = self._session(envelope)
        if query == SECURE_SHARE:
            return self._share(session, body)
        if query == SECURE_UPLOAD:
            return self._upload(session, envelope, body, payload.arrays), None
        if query == SECURE_REVEAL:
            return self._reveal(session, envelope, body)
        if query == SECURE_ABORT:
            return self._abort(session, body)
        raise ProtocolError(f"unknown secure-sum query {query!r}")

    @property
    def jobs(self) -> tuple[str, ...]:
        """The jobs this site currently holds state for."""
        return tuple(self._sessions)

    # ------------------------------------------------------------------ checks

    def _accept(self, query: str, payload: Payload) -> Envelope:
        """Signature by a pinned key, the right step, fresh, nonce never seen: else refuse and audit."""
        raw = payload.doc.get("envelope")
        raw = raw if isinstance(raw, dict) else {}
        job = str(raw.get("job_id") or "-")[:256]
        round_ = raw["round"] if isinstance(raw.get("round"), int) and raw["round"] >= 0 else 0
        signer = str(raw.get("signer") or "unknown")[:64]

        def refuse(code: str, rule: str, error: FedmteError) -> FedmteError:
            self._audit_refusal(signer, job, round_, code, rule, str(error))
            return error

        if signer not in self._pinned:
            raise refuse("secure:unknown_signer", "trust.coordinators", VerificationError(
                f"request signed by unknown coordinator key {signer[:16]}...; this site pins {len(self._pinned)} "
                "coordinator key(s) in [trust.coordinators] of its site file: the data owner must add the key to accept it"
            ))
        try:
            envelope = open_request(payload, step=query, pinned=self._pinned)
        except FedmteError as error:
            raise refuse("secure:bad_request", "signature", error) from None
        now = self._clock()
        if abs(now - envelope.issued_at) > self.config.max_request_age:
            raise refuse("secure:stale", "max_request_age", ProtocolError(
                f"the request was signed {now - envelope.issued_at:+.0f} s off this site's clock; this site accepts "
                f"requests within {self.config.max_request_age:.0f} s: a delayed or replayed message"
            ))
        self._prune_nonces(now)
        if envelope.nonce in self._nonces:
            raise refuse("secure:replay", "nonce", ProtocolError(
                f"nonce {envelope.nonce} was seen before: a replayed request is refused"
            ))
        self._remember_nonce(envelope.nonce, envelope.issued_at)
        return envelope

    def _session(self, envelope: Envelope) -> _Session:
        session = self._sessions.get(envelope.job_id)
        if session is None:
            raise ProtocolError(
                f"no secure-sum state for job {envelope.job_id!r} in this process: the job was never set up here, "
                "was aborted, or the site restarted (it counts as dropped). The secure sum needs fedmte's site "
                "runner (one process per site); a stock SuperNode starts a new process per message"
            )
        if session.signer != envelope.signer:
            raise VerificationError(f"job {envelope.job_id!r} was set up by another coordinator key")
        if tuple(envelope.model_hashes) != session.model_hashes:
            raise ProtocolError(f"the request names other model hashes than job {envelope.job_id!r} was set up with")
        return session

    # ------------------------------------------------------------------ steps

    def _advertise(self, envelope: Envelope, body: AdvertiseBody) -> Payload:
        try:
            params = SecureSumParams.model_validate_json(body.params)
        except ValidationError as error:
            raise ProtocolError(f"malformed secure-sum parameters: {error.errors()[0]['msg']}") from None
        if params.job_id != envelope.job_id:
            raise ProtocolError(f"the parameters are for job {params.job_id!r}, the request for {envelope.job_id!r}")
        if params.job_id in self._sessions or params.job_id in self._jobs_seen:
            raise RefusalError(
                f"refused by site: job {params.job_id!r} was already set up at this site (running, finished or "
                "aborted); a job id is accepted once, so no phase of a job is ever masked or unmasked twice",
                reason_code="secure:job_id_reused", rule="job_id",
            )
        if self.config.require_self_masks and not params.self_masks:
            raise RefusalError(
                "refused by site: the job turns self masks off (self_masks = false), and this site takes part only "
                "in jobs with self masks (require_self_masks = true in its site file's [secure] table): without them "
                "a coordinator that declares an uploaded site dropped reads that site's statistics",
                reason_code="secure:self_masks_required", rule="secure.require_self_masks",
            )
        floors = [("secure.min_declared_rows", "max_rows", body.bounds.max_rows, self.config.min_declared_rows),
                  ("secure.min_declared_feature_norm", "feature_norm", body.bounds.feature_norm,
                   self.config.min_declared_feature_norm)]
        for rule, name, declared, floor in floors:
            if declared < floor:
                raise RefusalError(
                    f"refused by site: the job declares {name} = {declared:g}, below this "
                    f"site's floor {floor:g}; declare at least the floor (a loose bound costs nothing)",
                    reason_code="secure:bounds_below_floor", rule=rule,
                )
        secure = SiteSecureSum(params, site_id=self.config.site_id, identity_key=self._identity,
                               known_sites=self._roster)
        now = self._clock()
        self._prune_sessions(now)
        self._remember_job(params.job_id)
        self._sessions[params.job_id] = _Session(params.job_id, envelope.signer, body.bounds,
                                                 tuple(envelope.model_hashes), secure, now)
        purpose = (f"secure sum setup: signed public keys for job {params.job_id} ({params.phases} phase(s), "
                   f"threshold {params.threshold} of {list(params.sites)}, self masks "
                   f"{'on' if params.self_masks else 'off'})")
        return Payload(doc={"advertisement": secure.advertise().model_dump_json(by_alias=True)}), purpose

    def _share(self, session: _Session, body: ShareBody) -> tuple[Payload, str]:
        if session.shared:
            raise ProtocolError(f"job {session.job_id!r} already shared its keys")
        advertisements = [Advertisement.model_validate_json(text) for text in body.advertisements]
        bundles = session.secure.share(advertisements)
        session.shared = True
        purpose = ("secure sum setup: Shamir shares of this site's self-mask seeds and mask keys, encrypted to "
                   f"{[bundle.recipient for bundle in bundles]}")
        return Payload(doc={"bundles": [bundle.model_dump_json(by_alias=True) for bundle in bundles]}), purpose

    def _upload(self, session: _Session, envelope: Envelope, body: UploadBody, arrays: Mapping[str, np.ndarray]) -> Payload:
        phase = body.phase
        if envelope.round != phase + 1:
            raise ProtocolError(f"the request's round {envelope.round} is not phase {phase} + 1")
        if body.bundles is not None:
            if session.received:
                raise ProtocolError(f"job {session.job_id!r} already received its share bundles")
            session.secure.receive_shares([ShareBundle.model_validate_json(text) for text in body.bundles])
            session.received = True
        elif not session.received:
            raise ProtocolError(f"the first upload of job {session.job_id!r} must carry the routed share bundles")
        digest = request_digest(session.job_id, phase, session.model_hashes, body.inner_query, body.inner_doc, arrays)
        stats = inner_stats(body.inner_query, body.inner_doc, arrays)
        sealed: list[Payload] = []

        def seal(reply: Payload) -> Payload:
            statistics = Statistics.from_arrays(reply.arrays)
            spec = round_sum_spec(stats, statistics, session.bounds, context=digest)
            upload = session.secure.mask(statistics, phase=phase, spec=spec)
            out = Payload(doc={"phase": phase, "spec": spec.model_dump(mode="json", by_alias=True), "inner": reply.doc,
                               "masked_with": list(session.secure.participants)},
                          arrays={"words": upload.words.view(np.int64)})
            sealed.append(out)
            return out

        params = session.secure.params
        context = SecureContext(job_id=params.job_id, threshold=params.threshold, sites=len(params.sites),
                                self_masks=params.self_masks)
        answered = self._compute(body.inner_query, Payload(doc=body.inner_doc, arrays=arrays),
                                 site_agent.SecureSeal(seal, context))
        if len(sealed) != 1 or answered is not sealed[0]:
            raise ProtocolError("the site's statistics handler did not return the sealed (masked) reply; nothing is sent")
        session.digests[phase] = digest
        return answered

    def _reveal(self, session: _Session, envelope: Envelope, body: RevealBody) -> tuple[Payload, str]:
        try:
            request = UnmaskRequest.model_validate_json(body.unmask)
        except ValidationError as error:
            raise ProtocolError(f"malformed unmask request: {error.errors()[0]['msg']}") from None
        if request.job_id != session.job_id or envelope.round != request.phase + 1:
            raise ProtocolError("the unmask request is for another job or round than its signed envelope")
        masked_under = session.digests.get(request.phase)
        if masked_under is None:
            raise ProtocolError(f"refusing to reveal: this site did not upload phase {request.phase}")
        if masked_under != body.request_digest:
            raise ProtocolError(
                f"refusing to reveal: this site masked phase {request.phase} for request {masked_under[:16]}..., "
                f"the unmask request names {body.request_digest[:16]}...: the sites did not all receive the same "
                "request (model hashes or statistics)"
            )
        try:
            reveal = session.secure.reveal(request)
        except ThresholdError as error:
            self._end(session, "secure:below_threshold", str(error))
            raise
        except ActiveSetError as error:
            self._audit_refusal(envelope.signer, session.job_id, envelope.round, "secure:active_set_changed",
                                "active_set_fixed", str(error))
            self._end(session, "secure:active_set_changed", str(error))
            raise
        active, dropped = session.secure.fixed_lists or ((), ())
        purpose = (f"secure sum reveal, phase {request.phase}: shares of the self-mask seeds of active {list(active)} "
                   f"and of the mask keys of dropped {list(dropped)}")
        return Payload(doc={"reveal": reveal.model_dump_json(by_alias=True), "active": list(active),
                            "dropped": list(dropped)}), purpose

    def _abort(self, session: _Session, body: AbortBody) -> tuple[Payload, str]:
        self._end(session, body.reason_code, body.detail)
        recorded = self._audit_writer is not None or self.config.audit_dir is not None
        return Payload(doc={"recorded": recorded}), f"secure sum abort acknowledged ({body.reason_code})"

    def _end(self, session: _Session, reason_code: str, detail: str) -> None:
        """Forget the job (its keys and shares) and record the abort."""
        self._sessions.pop(session.job_id, None)
        self._audit(lambda log: log.abort(run_id=session.job_id, reason_code=reason_code, detail=detail))

    # ------------------------------------------------------------------ state

    def _prune_sessions(self, now: float) -> None:
        for job, session in list(self._sessions.items()):
            if now - session.created > self.config.session_ttl:
                del self._sessions[job]
        while len(self._sessions) >= self.config.max_sessions:
            oldest = min(self._sessions.values(), key=lambda s: s.created)
            del self._sessions[oldest.job_id]

    def _nonce_file(self) -> Path | None:
        return None if self.config.state_dir is None else self.config.state_dir / NONCES_FILE

    def _load_nonces(self) -> None:
        path = self._nonce_file()
        if path is None or not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) == 2:
                try:
                    self._nonces[parts[0]] = float(parts[1])
                except ValueError:
                    continue
        self._prune_nonces(self._clock())

    def _jobs_file(self) -> Path | None:
        return None if self.config.state_dir is None else self.config.state_dir / JOBS_FILE

    def _load_jobs(self) -> None:
        path = self._jobs_file()
        if path is not None and path.exists():
            self._jobs_seen.update(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())

    def _remember_job(self, job_id: str) -> None:
        """Keep the job id for good (in ``state_dir``): a job id is set up once."""
        self._jobs_seen.add(job_id)
        path = self._jobs_file()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(f"{job_id}\n")
                handle.flush()
                os.fsync(handle.fileno())

    def _remember_nonce(self, nonce: str, issued_at: float) -> None:
        self._nonces[nonce] = issued_at
        path = self._nonce_file()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(f"{nonce} {issued_at!r}\n")

    def _prune_nonces(self, now: float) -> None:
        """Nonces older than the freshness window are refused as stale anyway."""
        horizon = 2 * self.config.max_request_age
        for nonce, issued in list(self._nonces.items()):
            if abs(now - issued) > horizon:
                del self._nonces[nonce]

    # ------------------------------------------------------------------ audit

    def _audit(self, write: Callable[[AuditLog], None]) -> None:
        if self._audit_writer is not None:
            self._audit_writer(write)
            return
        if self.config.audit_dir is None:
            return
        key = load_signing_key(self.config.audit_key) if self.config.audit_key is not None else self._identity
        log = AuditLog.open(self.config.audit_dir, site_id=self.config.site_id, signing_key=key)
        try:
            write(log)
        finally:
            log.close()

    def _audit_refusal(self, requester: str, job: str, round_: int, code: str, rule: str, message: str) -> None:
        self._audit(lambda log: log.refusal(requester=requester, run_id=job, round=round_, reason_code=code,
                                            rule=rule, message=message, purpose="secure sum"))

    def _reply_to(self, payload: Payload) -> _Reply:
        """The audit fields of the reply to ``payload``, read before anything is verified (an
        unverified request's fields are what it claims)."""
        raw = payload.doc.get("envelope")
        raw = raw if isinstance(raw, dict) else {}
        signer = str(raw.get("signer") or "unknown")[:64]
        round_ = raw["round"] if isinstance(raw.get("round"), int) and raw["round"] >= 0 else 0
        try:
            request_sha: str | None = hashlib.sha256(wire_bytes(payload)).hexdigest()
        except FedmteError:
            request_sha = None
        return _Reply(requester=signer, recipient=f"coordinator:{self._names.get(signer, 'unknown')}",
                      run_id=str(raw.get("job_id") or "-")[:256], round=round_, request_sha256=request_sha)

    def _transmit(self, data: bytes, reply_to: _Reply, purpose: str) -> None:
        """Intent (with a copy of ``data``) before the reply leaves, outcome after."""

        def write(log: AuditLog) -> None:
            with log.transmission(data, requester=reply_to.requester, recipient=reply_to.recipient,
                                  run_id=reply_to.run_id, round=reply_to.round, purpose=purpose[:4096],
                                  request_sha256=reply_to.request_sha256):
                pass  # returned to the transport, which delivers it to the coordinator

        self._audit(write)

    def _send(self, reply: Payload, reply_to: _Reply, purpose: str) -> None:
        self._transmit(wire_bytes(reply), reply_to, purpose)

    def _audit_error_reply(self, reply_to: _Reply, query: str, error: Exception) -> None:
        """Audit the error reply's bytes; a log that cannot take it leaves the original error."""
        try:
            self._transmit(reply_text(error).encode("utf-8"), reply_to, f"secure sum {query}: error reply")
        except Exception:  # noqa: BLE001 - the error being answered matters more than its record
            pass


# --------------------------------------------------------------------------- the site's statistics

def agent_statistics(site_file: Path) -> Compute:
    """The ``compute`` of a site: its site agent releases the round through its privacy layer
    and audits the sealed bytes that leave."""

    def compute(inner_query: str, payload: Payload, seal: Seal) -> Payload:
        return site_agent.answer(inner_query, payload, site_file, seal=seal)

    return compute


# --------------------------------------------------------------------------- process registry

_SITES: dict[Path, SecureSite] = {}
_REGISTRY_LOCK = threading.Lock()


def _agent_audit(site_file: Path) -> AuditWriter:
    """Write to the audit log the site agent holds open (one writer per log)."""

    def audit(write: Callable[[AuditLog], None]) -> None:
        agent = site_agent.agent_for(site_file)
        try:
            with agent.lock:  # one writer at a time, also against the agent's own answers
                write(agent.privacy.log)
        finally:
            if site_agent._AGENTS.get(Path(site_file).resolve()) is not agent:  # not kept open: close it again
                agent.close()

    return audit


def site_for(site_file: Path | str) -> SecureSite:
    """This process's :class:`SecureSite` for a site file (made on first use): it computes
    through the site's agent and audits to the agent's log."""
    path = Path(site_file).resolve()
    with _REGISTRY_LOCK:
        site = _SITES.get(path)
        if site is None:
            site = SecureSite(secure_config(load_site_config(path)), compute=agent_statistics(path),
                              audit=_agent_audit(path))
            _SITES[path] = site
        return site


def answer_secure(query: str, payload: Payload, site_file: Path | str) -> Payload:
    """Answer one ``secure_*`` query for the site of ``site_file``."""
    return site_for(site_file).handle(query, payload)


def check_plain_statistics_allowed(site_file: Path | str) -> None:
    """Refuse a plain ``stats`` query at a site whose site file requires the secure sum."""
    try:
        secure = load_site_config(site_file).secure
        required = secure is not None and secure.require_secure_sum
    except FedmteError:
        required = True  # a broken site file never opens the plain path
    if required:
        raise RefusalError(
            "refused by site: this site releases statistics only through the secure sum "
            "(require_secure_sum = true in its site file's [secure] table); run the job with the secure sum on",
            reason_code="secure:plain_statistics", rule="secure.require_secure_sum",
        )
