"""Messages of a multi-model scoring job: setup, the batched statistics rounds, finish.

A job with candidate models runs over three message types (all Flower ``query.*``):

``setup`` (:data:`SETUP`)
    The coordinator's signed :class:`SetupRequest`: the run, the job's label names, scorers
    and purpose, and one :class:`ModelOffer` per candidate (its manifest and signature, and
    its weights as a ``u1`` array ``weights/<model id>`` when attached). The site verifies
    and stages each package, or answers ``need_weights`` when it does not hold it yet; the
    coordinator then repeats the setup with those weights attached (so a site that staged a
    package earlier never receives its weights twice). The reply, :class:`SetupReply`, says
    per model whether it is ready (with its feature width and number of source classes), or
    which rule of the site refused it.
``stats`` (:data:`fedmte.protocol.wire.STATS`)
    One statistics round for every model at once: :class:`JobRoundRequest` maps each model
    id to that model's request specs (:class:`~fedmte.protocol.messages.StatSpec`), with the
    broadcast arrays shared by content hash. The reply's arrays are namespaced
    ``<model id>/<request key>`` (:func:`block_key`), so one flat
    :class:`~fedmte.protocol.statistics.Statistics` carries every model's sums and the
    round count does not grow with the number of models. Its document
    (:class:`RoundReplyDoc`) carries the site's measured model costs (first round only) and
    what the release cost in privacy; no statistics.
``finish`` (:data:`FINISH`)
    The job is over: the site signs an audit checkpoint and returns it
    (:class:`FinishReply`), for the coordinator to keep as a witness copy.

Every coordinator request of a job (setup, stats, finish) carries the run id, its round
(setup 0, then 1, 2, ... for the rounds, and the finish after the last), a nonce (128 random
bits, hex) and ``issued_at`` (unix seconds), and is signed with the coordinator's Ed25519 key
(:func:`sign_setup`, :meth:`JobRoundRequest.sign`, :meth:`FinishRequest.sign`) over
:func:`signing_bytes`: ``frame(domain, canonical JSON of the request without its signature,
arrays_digest(the message's arrays))``, so no array can be swapped after signing. A site
checks the signature (rounds and finish: under the key that signed the job's setup), that the
request is fresh, that its nonce is new and that its round comes after the last one it
answered (:mod:`fedmte.client.site_agent`).

A model's id is the sha256 of its signed manifest bytes (the package id,
:attr:`fedmte.client.packages.VerifiedPackage.package_id`); the manifest carries the weights'
sha256, so the id pins the weights too.

:func:`wire_bytes` is the exact byte string of a payload as it travels (document, layout,
packed arrays, length-prefixed): what a site's audit log stores as the payload copy, and
what a coordinator can hash to prove what it received. Pure: no I/O, no Flower.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, Field, ValidationError, model_validator

from fedmte.protocol.encoding import StrictModel, arrays_digest, canonical_json, frame
from fedmte.protocol.errors import ProtocolError, StatisticsError, VerificationError
from fedmte.protocol.messages import RoundRequest, StatSpec, decode_round, encode_round
from fedmte.protocol.requests import Stat
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.wire import FINISH, SETUP, Payload

SETUP_SCHEMA = "fedmte.job_setup.v1"
SETUP_REPLY_SCHEMA = "fedmte.job_setup_reply.v1"
ROUND_SCHEMA = "fedmte.job_round.v1"
ROUND_REPLY_SCHEMA = "fedmte.job_round_reply.v1"
FINISH_SCHEMA = "fedmte.job_finish.v1"
FINISH_REPLY_SCHEMA = "fedmte.job_finish_reply.v1"
SETUP_SIGNING_DOMAIN = b"fedmte.job_setup.v1"
ROUND_SIGNING_DOMAIN = b"fedmte.job_round.v1"
FINISH_SIGNING_DOMAIN = b"fedmte.job_finish.v1"
NONCE_BYTES = 16
NONCE_OR_EMPTY = r"^([0-9a-f]{32})?$"
WIRE_MAGIC = b"FMTMSG1\n"
WEIGHTS_PREFIX = "weights/"
HEX64 = r"^[0-9a-f]{64}$"


def _parse(model: type[BaseModel], doc: Mapping[str, Any], what: str) -> Any:
    try:
        return model.model_validate(dict(doc))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise ProtocolError(f"malformed {what}: {error.error_count()} problem(s), first at {where}: {first['msg']}") from None


# --------------------------------------------------------------------------- signatures

def new_nonce() -> str:
    """128 random bits, hex: a request's nonce."""
    return secrets.token_hex(NONCE_BYTES)


def signing_bytes(domain: bytes, doc: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """What the coordinator's key signs for one request: the domain, the canonical JSON of the
    request's document (its signature left out) and the digest of the message's arrays, framed."""
    return frame(domain, canonical_json(dict(doc)), arrays_digest(arrays))


def _sign(key: Ed25519PrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data)).decode("ascii")


def verify_request_signature(public: Ed25519PublicKey, signature: str, data: bytes, what: str) -> None:
    """Raise :class:`VerificationError` unless ``signature`` (base64) is ``public``'s over ``data``."""
    try:
        public.verify(base64.b64decode(signature, validate=True), data)
    except (binascii.Error, ValueError, InvalidSignature):
        raise VerificationError(f"the {what}'s signature does not verify under the coordinator key that signed "
                                "this job's setup (forged, or changed after signing: its document or arrays)") from None


def _stamp(request: Any) -> Any:
    """``request`` with a fresh nonce and ``issued_at`` where it has none."""
    update: dict[str, Any] = {}
    if not request.nonce:
        update["nonce"] = new_nonce()
    if not request.issued_at:
        update["issued_at"] = int(time.time())
    return request.model_copy(update=update) if update else request


class SignedRequest(StrictModel):
    """The fields every signed round and finish request carries beside its own. An empty
    nonce, a zero ``issued_at`` or an empty signature parse (so a site can refuse the request
    with its rule and audit it), but no site accepts them."""

    SIGNING_DOMAIN: ClassVar[bytes] = b""

    nonce: str = Field(default="", pattern=NONCE_OR_EMPTY, description="128 random bits, hex")
    issued_at: int = Field(default=0, ge=0, description="unix seconds, when the coordinator signed the request")
    signature: str = Field(default="", max_length=256, description="base64 Ed25519 signature over signing_bytes")

    def signing_bytes(self, arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
        doc = self.model_dump(mode="json", by_alias=True, exclude={"signature"})
        return signing_bytes(self.SIGNING_DOMAIN, doc, arrays or {})

    def sign(self, key: Ed25519PrivateKey, arrays: Mapping[str, np.ndarray] | None = None) -> Any:
        """This request stamped (a fresh nonce and ``issued_at`` unless set) and signed over
        its document and ``arrays`` (the arrays the message will carry)."""
        stamped = _stamp(self).model_copy(update={"signature": ""})
        return stamped.model_copy(update={"signature": _sign(key, stamped.signing_bytes(arrays))})

    def verify(self, public: Ed25519PublicKey, arrays: Mapping[str, np.ndarray] | None = None, what: str = "request") -> None:
        if not self.signature:
            raise VerificationError(f"the {what} is not signed; a site answers only requests the coordinator signed")
        verify_request_signature(public, self.signature, self.signing_bytes(arrays), what)


# --------------------------------------------------------------------------- setup

SITE_FEATURES = "site_features"
"""The offer kind (and the audit log's architecture id) of features the sites computed
themselves and hold as ``[data] kind = "features"``: no package, no model runs at the site."""
SITE_FEATURES_SCHEMA = "fedmte.site_features.v1"


def site_features_id(label: str) -> str:
    """The model id of a site-features candidate: sha256 of a fixed descriptor of its label,
    so every site and the coordinator derive the same id without a manifest."""
    return hashlib.sha256(f"{SITE_FEATURES_SCHEMA}\n{label}".encode("utf-8")).hexdigest()


class ModelOffer(StrictModel):
    """One candidate as the coordinator offers it: a signed package (the weights travel as an
    array), or the features each site holds itself (``kind = "site_features"``)."""

    model_id: str = Field(pattern=HEX64, description="sha256 of the manifest bytes (site features: site_features_id)")
    label: str = Field(min_length=1, max_length=256, description="the job's name for the candidate")
    kind: Literal["package", "site_features"] = "package"
    manifest: str = Field(default="", max_length=1_048_576, description="manifest.json, canonical UTF-8 text")
    signature: str = Field(default="", max_length=16_384, description="signature.json text")
    weights_attached: bool = False

    @model_validator(mode="after")
    def _kind_fits(self) -> ModelOffer:
        if self.kind == "package" and (len(self.manifest) < 2 or len(self.signature) < 2):
            raise ValueError("a package offer carries its manifest and signature")
        if self.kind == SITE_FEATURES:
            if self.manifest or self.signature or self.weights_attached:
                raise ValueError("a site-features offer carries no manifest, signature or weights")
            if self.model_id != site_features_id(self.label):
                raise ValueError("a site-features offer's model id is site_features_id(label)")
        return self


class SetupRequest(StrictModel):
    """What the coordinator asks a site to prepare for; signed by the coordinator's key."""

    schema_: Literal["fedmte.job_setup.v1"] = Field(default=SETUP_SCHEMA, alias="schema")
    run_id: str = Field(min_length=1, max_length=64)
    purpose: str = Field(default="", max_length=4096)
    labels: list[str] = Field(min_length=2)
    scorers: list[str] = Field(min_length=1)
    coordinator_key: str = Field(description="ed25519:<base64>, the key that signed this request")
    models: list[ModelOffer] = Field(min_length=1)
    dp_requested: bool = True
    round: Literal[0] = 0
    nonce: str = Field(default="", pattern=NONCE_OR_EMPTY, description="128 random bits, hex (sign_setup fills it)")
    issued_at: int = Field(default=0, ge=0, description="unix seconds (sign_setup fills it)")

    def signing_bytes(self, arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
        """What the coordinator's key signs: the request and the message's weights arrays."""
        return signing_bytes(SETUP_SIGNING_DOMAIN, self.model_dump(mode="json", by_alias=True), arrays or {})


class SignedSetup(StrictModel):
    """The setup message's document: the request and the coordinator's Ed25519 signature."""

    request: SetupRequest
    signature: str = Field(min_length=1, max_length=256, description="base64 Ed25519 signature")

    def signature_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.signature, validate=True)
        except binascii.Error:
            raise ProtocolError("the setup signature is not base64") from None


def weights_name(model_id: str) -> str:
    return f"{WEIGHTS_PREFIX}{model_id}"


def setup_arrays(weights: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    """The setup message's arrays: ``weights[model_id]`` as the ``u1`` array ``weights/<model id>``."""
    return {weights_name(mid): np.frombuffer(data, dtype=np.uint8) for mid, data in weights.items()}


def sign_setup(request: SetupRequest, key: Ed25519PrivateKey, weights: Mapping[str, bytes] | None = None) -> SignedSetup:
    """``request`` stamped (a fresh nonce and ``issued_at`` unless set) and signed by ``key``
    over the request and the weights the message will attach (pass the same ``weights`` to
    :func:`setup_payload`)."""
    stamped = _stamp(request)
    return SignedSetup(request=stamped, signature=_sign(key, stamped.signing_bytes(setup_arrays(weights or {}))))


def setup_payload(signed: SignedSetup, weights: Mapping[str, bytes]) -> Payload:
    """The setup message: the signed request, and ``weights[model_id]`` as ``u1`` arrays."""
    attached = {m.model_id for m in signed.request.models if m.weights_attached}
    if attached != set(weights):
        raise ProtocolError(f"weights attached for {sorted(weights)} but the offers say {sorted(attached)}")
    return Payload(doc=signed.model_dump(mode="json", by_alias=True), arrays=setup_arrays(weights))


def parse_setup(payload: Payload) -> tuple[SignedSetup, dict[str, bytes]]:
    """The signed request and the attached weights (checked against the offers)."""
    signed = _parse(SignedSetup, payload.doc, "setup request")
    weights: dict[str, bytes] = {}
    for name, array in payload.arrays.items():
        if not name.startswith(WEIGHTS_PREFIX) or array.dtype != np.uint8 or array.ndim != 1:
            raise ProtocolError(f"unexpected array {name!r} ({array.dtype}, {array.shape}) in a setup message")
        weights[name[len(WEIGHTS_PREFIX):]] = array.tobytes()
    attached = {m.model_id for m in signed.request.models if m.weights_attached}
    if attached != set(weights):
        raise ProtocolError(f"the setup message attaches weights for {sorted(weights)}, its offers say {sorted(attached)}")
    ids = [m.model_id for m in signed.request.models]
    if len(set(ids)) != len(ids):
        raise ProtocolError("the setup request offers the same model twice")
    return signed, weights


class ModelStatus(StrictModel):
    """A site's answer for one offered model."""

    status: Literal["ready", "need_weights", "refused"]
    feature_dim: int | None = Field(default=None, ge=1)
    num_source_classes: int | None = Field(default=None, ge=0)
    rule: str | None = Field(default=None, max_length=200, description="the site rule that refused the model")
    reason: str | None = Field(default=None, max_length=4096)


class SetupReply(StrictModel):
    schema_: Literal["fedmte.job_setup_reply.v1"] = Field(default=SETUP_REPLY_SCHEMA, alias="schema")
    site: str = Field(min_length=1, max_length=128)
    models: dict[str, ModelStatus]
    dp: bool = Field(description="whether the site's policy adds DP noise to its releases")
    refused_scorers: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, description="requested scorers this site's policy refuses, with the rule and reason "
                                          "(decided from the request alone); the job runs without them")

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> SetupReply:
        return _parse(cls, doc, "setup reply")


# --------------------------------------------------------------------------- rounds

def block_key(model_id: str, key: str) -> str:
    """The name of one model's statistic in a multi-model reply."""
    return f"{model_id}/{key}"


class JobRoundRequest(SignedRequest):
    """One statistics round of a job: every unfinished model's requests, signed (with the
    round's arrays) by the coordinator key that signed the job's setup."""

    SIGNING_DOMAIN: ClassVar[bytes] = ROUND_SIGNING_DOMAIN

    schema_: Literal["fedmte.job_round.v1"] = Field(default=ROUND_SCHEMA, alias="schema")
    run_id: str = Field(min_length=1, max_length=64)
    round: int = Field(ge=1)
    num_classes: int = Field(ge=2)
    models: dict[str, list[StatSpec]] = Field(min_length=1)

    def model_request(self, model_id: str) -> RoundRequest:
        return RoundRequest(round=self.round, num_classes=self.num_classes, stats=self.models[model_id])

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> JobRoundRequest:
        return _parse(cls, doc, "job round request")


def encode_job_round(
    requests: Mapping[str, Sequence[Stat]], *, run_id: str, round_index: int, num_classes: int
) -> tuple[JobRoundRequest, dict[str, np.ndarray]]:
    """One request for every model, with their argument arrays merged by content hash
    (unsigned: :meth:`JobRoundRequest.sign` it with the arrays before sending)."""
    arrays: dict[str, np.ndarray] = {}
    models: dict[str, list[StatSpec]] = {}
    for model_id, stats in requests.items():
        request, model_arrays = encode_round(stats, round_index=round_index, num_classes=num_classes)
        models[model_id] = list(request.stats)
        arrays.update(model_arrays)
    return JobRoundRequest(run_id=run_id, round=round_index, num_classes=num_classes, models=models), arrays


def decode_job_round(request: JobRoundRequest, arrays: Mapping[str, np.ndarray]) -> dict[str, list[Stat]]:
    """Each model's requests, rebuilt and checked against the catalogue."""
    return {model_id: decode_round(request.model_request(model_id), arrays) for model_id in request.models}


def split_statistics(total: Statistics, models: Sequence[str]) -> dict[str, Statistics]:
    """Split a flat multi-model sum back into one :class:`Statistics` per model."""
    out: dict[str, dict[str, np.ndarray]] = {model: {} for model in models}
    for name, value in total.items():
        model, _, key = name.partition("/")
        if model not in out or not key:
            raise StatisticsError(f"a reply holds {name!r}, which belongs to no model of this round")
        out[model][key] = value
    return {model: Statistics(blocks) for model, blocks in out.items()}


class SiteMetrics(StrictModel):
    """A model's cost on one site's hardware, as the site reports it (no row counts)."""

    device: str | None = None
    latency_ms: float | None = Field(default=None, ge=0)
    batch_latency_ms: float | None = Field(default=None, ge=0)
    throughput: float | None = Field(default=None, ge=0)
    peak_rss_bytes: int | None = Field(default=None, ge=0)
    peak_device_bytes: int | None = Field(default=None, ge=0)


class ReleaseCost(StrictModel):
    """What one release cost the site's data source, by the site's own ledger (GDP mu^2)."""

    mechanism: Literal["gaussian", "none"]
    cached: bool = False
    mu_sq_before: float = Field(ge=0)
    mu_sq_after: float = Field(ge=0)
    delta: float | None = None
    epsilon_budget: float | None = None
    noise_std: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        default_factory=dict,
        description="per-entry std of the Gaussian noise this site added to each block, keyed by the reply's "
                    "array keys (0.0 for exact blocks); public, since it follows from the policy and the request")


class RoundReplyDoc(StrictModel):
    schema_: Literal["fedmte.job_round_reply.v1"] = Field(default=ROUND_REPLY_SCHEMA, alias="schema")
    round: int = Field(ge=1)
    metrics: dict[str, SiteMetrics] = Field(default_factory=dict, description="models run for the first time this job")
    privacy: ReleaseCost

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> RoundReplyDoc:
        return _parse(cls, doc, "round reply")


# --------------------------------------------------------------------------- finish

class FinishRequest(SignedRequest):
    """The job is over; signed like a round, and numbered after the job's last round."""

    SIGNING_DOMAIN: ClassVar[bytes] = FINISH_SIGNING_DOMAIN

    schema_: Literal["fedmte.job_finish.v1"] = Field(default=FINISH_SCHEMA, alias="schema")
    run_id: str = Field(min_length=1, max_length=64)
    round: int = Field(default=1, ge=1, description="after the last statistics round of the job")
    status: Literal["finished", "failed"] = "finished"
    detail: str = Field(default="", max_length=4096)

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> FinishRequest:
        return _parse(cls, doc, "finish request")


class FinishReply(StrictModel):
    schema_: Literal["fedmte.job_finish_reply.v1"] = Field(default=FINISH_REPLY_SCHEMA, alias="schema")
    site: str
    tree_size: int = Field(ge=0)
    checkpoint: str = Field(description="the site's signed audit checkpoint note")

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> FinishReply:
        return _parse(cls, doc, "finish reply")


# --------------------------------------------------------------------------- bytes

def wire_bytes(payload: Payload) -> bytes:
    """The exact bytes of ``payload`` as they travel: magic, then the document, the array
    layout and the packed arrays, each but the last prefixed by its 8-byte length."""
    doc, layout, blob = payload.to_wire()
    doc_bytes, layout_bytes = doc.encode("utf-8"), layout.encode("utf-8")
    return (WIRE_MAGIC + len(doc_bytes).to_bytes(8, "big") + doc_bytes
            + len(layout_bytes).to_bytes(8, "big") + layout_bytes + blob)


def payload_sha256(payload: Payload) -> str:
    return hashlib.sha256(wire_bytes(payload)).hexdigest()


__all__ = [
    "FINISH", "SETUP", "FinishReply", "FinishRequest", "JobRoundRequest", "ModelOffer", "ModelStatus",
    "ReleaseCost", "RoundReplyDoc", "SITE_FEATURES", "SetupReply", "SetupRequest", "SignedRequest", "SignedSetup",
    "SiteMetrics", "block_key", "decode_job_round", "encode_job_round", "new_nonce", "parse_setup", "payload_sha256",
    "setup_arrays", "setup_payload", "sign_setup", "signing_bytes", "site_features_id", "split_statistics",
    "verify_request_signature", "wire_bytes",
]
