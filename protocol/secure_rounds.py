"""The secure sum on the network: signed requests, the request digest, and public bounds.

:mod:`fedmte.protocol.secure_sum` is the pure protocol; this module is what the coordinator
(:mod:`fedmte.server.secure_aggregation`) and the sites (:mod:`fedmte.client.secure_site`)
must agree on to run it over a transport. It does no I/O.

Signed requests
---------------
Every secure-sum message the coordinator sends is an :class:`Envelope` (step, job, round,
a fresh 128-bit nonce, the time it was issued, the signer's key fingerprint, the job's model
hashes and a step-specific body) signed with the coordinator's Ed25519 key. The signature
covers ``frame(DOMAIN, canonical JSON of the envelope, arrays_digest(arrays))``, so the
arrays travelling beside the document (a round's broadcast arrays) are covered too. A site
accepts an envelope only if (:func:`open_request`):

* its signer is one of the coordinator keys the site pinned itself (an unknown signer is
  refused before anything else is read), and the signature verifies;
* the step is the message type it arrived as;
* it was issued within the site's freshness window, and its nonce was never seen before
  (the site remembers nonces; a replayed message is refused).

The request digest
------------------
:func:`request_digest` hashes what a statistics phase asks for: the job, the phase, the model
hashes and the inner request (its query name, canonical JSON document and array digest).
Each site computes it from what *it* received and puts it into the phase's
:class:`~fedmte.protocol.fixed_point.SumSpec` as ``context``. The spec digest enters every
mask (pairwise and self), so if the coordinator sent two sites different model hashes or
statistics, their pairwise masks do not cancel and the sum fails the decoder's bound check
instead of yielding a value: the consistency check costs no extra round trip. The unmask
request carries the digest too, and a site refuses to reveal shares for a phase it masked
under another digest. The digest binds the job id and the phase, a site sets up a job id
once (:mod:`fedmte.client.secure_site`), and the active set is fixed per job
(:mod:`fedmte.protocol.secure_sum`): so no request digest is ever unmasked twice, let alone
under two different active sets.

Public bounds (fixed-point scaling)
-----------------------------------
A sum spec needs a public bound on every entry of every site's block
(:mod:`fedmte.protocol.fixed_point`). They come from :class:`DeclaredBounds`, which the job
declares and the coordinator signs into the setup request:

* ``max_rows``: the most rows any one site holds. Counts (int64 blocks) are bounded by it
  exactly; a site with more rows refuses with :class:`BoundExceededError` before anything
  leaves.
* ``feature_norm``: an L2 bound ``R`` on every feature row (the norm the sites clip to when
  their privacy policy clips; a loose bound costs nothing with the default 128-bit ring).
  Views move it by public arguments only (:func:`view_norm_bound`): ``offset`` adds
  ``||o||``, ``project`` multiplies by ``||B||_F``, ``class_shift`` adds ``max_c ||D_c||``,
  ``confmix`` (a convex combination) takes ``max(R, max_c ||m_c||)``.
* ``loglik``: a per-row bound on log-likelihood statistics whose broadcast arguments do not
  bound them (a mixture matrix with a zero entry).

:func:`row_bound` gives, per statistic kind, the bound ``b`` on one row's contribution to any
entry (``M`` the view's norm bound): 1 for counts and probabilities, ``M`` for sums, ``M^2``
for Gram and scatter entries, ``M^3`` and ``M^4`` for the norm-weighted sums; for
log-likelihoods the log of the broadcast matrix's smallest and largest entries (the row's
value is a log of a convex combination of them), or the Gaussian mixture's density bounds;
for the linear probe's gradient and Hessian ``max(M, 1)`` and its square (the row with a 1
appended times probabilities), for its loss ``log C + 2 sqrt(M^2 + 1) max_c ||W_c||``.
A block's bound is ``max_rows * b``, inflated by ``1 + 2^-20`` and rounded up to a power of
two (:func:`block_bound`), so two sites that compute ``b`` with a different last bit still
agree on the spec. Each site builds the spec itself from the signed request and the shapes
of its own statistics (:func:`round_sum_spec`): the coordinator cannot pick a tight bound to
probe a site's values. A value outside its bound is a clear :class:`BoundExceededError` at
that site, never a wrapped sum.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, get_args

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import Field, ValidationError

from fedmte.protocol.encoding import StrictModel, arrays_digest, canonical_json, frame
from fedmte.protocol.errors import ProtocolError, StatisticsError, VerificationError
from fedmte.protocol.fixed_point import DEFAULT_LIMBS, BlockSpec, SumSpec
from fedmte.protocol.inputs import PROBABILITY_TOLERANCE
from fedmte.protocol.job_messages import JobRoundRequest, block_key, decode_job_round
from fedmte.protocol.keys import fingerprint
from fedmte.protocol.requests import Stat, View
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.wire import (
    SECURE_ABORT,
    SECURE_ADVERTISE,
    SECURE_QUERIES,
    SECURE_REVEAL,
    SECURE_SHARE,
    SECURE_UPLOAD,
    STATS,
    Payload,
)

ENVELOPE_SCHEMA = "fedmte.secure_request.v1"
NONCE_HEX = 32  # 128-bit nonces
BOUND_SLACK = 1.0 + 2.0**-20
"""Relative slack on a derived bound before it is rounded up to a power of two."""

_SIGNED_DOMAIN = b"fedmte.secure_request.v1"
_DIGEST_DOMAIN = b"fedmte.secure_round_digest.v1"

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Step = Literal["secure_advertise", "secure_share", "secure_upload", "secure_reveal", "secure_abort"]
if set(get_args(Step)) != set(SECURE_QUERIES):  # the wire names and the signed steps must be one list
    raise ImportError("fedmte.protocol.wire.SECURE_QUERIES and secure_rounds.Step disagree")


# --------------------------------------------------------------------------- keys and encodings

# --------------------------------------------------------------------------- envelopes

class Envelope(StrictModel):
    """What the coordinator signs for one secure-sum message (see the module docstring)."""

    schema_: Literal["fedmte.secure_request.v1"] = Field(default=ENVELOPE_SCHEMA, alias="schema")
    step: Step
    job_id: str = Field(min_length=1, max_length=256)
    round: int = Field(ge=0, description="0 for setup, else the phase's statistics round")
    nonce: str = Field(pattern=rf"^[0-9a-f]{{{NONCE_HEX}}}$")
    issued_at: float = Field(description="unix seconds when the coordinator signed it")
    signer: Hex64
    model_hashes: tuple[Hex64, ...] = Field(default=(), max_length=4096)
    body: dict[str, Any] = Field(default_factory=dict)


def _signed_bytes(envelope: Mapping[str, Any], arrays_sha256: bytes) -> bytes:
    return frame(_SIGNED_DOMAIN, canonical_json(dict(envelope)), arrays_sha256)


def sign_request(key: Ed25519PrivateKey, envelope: Envelope, arrays: Mapping[str, np.ndarray] | None = None, *,
                 arrays_sha256: bytes | None = None) -> Payload:
    """The payload carrying ``envelope`` and its signature (and ``arrays``, covered by it).

    ``arrays_sha256`` is :func:`arrays_digest` of ``arrays`` when the caller already has it
    (one broadcast signed once per site)."""
    arrays = dict(arrays or {})
    if envelope.signer != fingerprint(key.public_key()):
        raise ProtocolError("the envelope names another signer than the key signing it")
    document = envelope.model_dump(mode="json", by_alias=True)
    signature = key.sign(_signed_bytes(document, arrays_sha256 or arrays_digest(arrays)))
    return Payload(doc={"envelope": document, "signature": base64.b64encode(signature).decode("ascii")}, arrays=arrays)


def open_request(payload: Payload, *, step: str, pinned: Mapping[str, Ed25519PublicKey]) -> Envelope:
    """Verify a signed request against the site's pinned coordinator keys (by fingerprint).

    Raises :class:`VerificationError` for an unknown signer, a bad signature or a malformed
    envelope, and :class:`ProtocolError` for an envelope sent as another step. Freshness and
    replays are the receiver's (it holds the nonces it saw).
    """
    document, signature = payload.doc.get("envelope"), payload.doc.get("signature")
    if not isinstance(document, dict) or not isinstance(signature, str) or set(payload.doc) != {"envelope", "signature"}:
        raise VerificationError("a secure-sum request must hold exactly a signed 'envelope' and its 'signature'")
    signer = document.get("signer")
    key = pinned.get(signer) if isinstance(signer, str) else None
    if key is None:
        raise VerificationError(
            f"request signed by unknown coordinator key {str(signer)[:16]}...; this site pins "
            f"{len(pinned)} coordinator key(s): the data owner must add the key to accept it"
        )
    try:
        key.verify(base64.b64decode(signature, validate=True), _signed_bytes(document, arrays_digest(payload.arrays)))
    except (InvalidSignature, binascii.Error, ValueError):
        raise VerificationError(
            "the request's signature does not verify: the message was altered after the coordinator signed it"
        ) from None
    try:
        envelope = Envelope.model_validate(document)
    except ValidationError as error:
        raise VerificationError(f"malformed signed envelope: {error.errors()[0]['msg']}") from None
    if envelope.step != step:
        raise ProtocolError(f"a signed {envelope.step!r} request arrived as {step!r}; refusing it")
    return envelope


def request_digest(job_id: str, phase: int, model_hashes: Sequence[str], inner_query: str,
                   inner_doc: Mapping[str, Any], inner_arrays: Mapping[str, np.ndarray]) -> str:
    """Hex sha256 of what one phase asks the sites: job, phase, models and the inner request."""
    return hashlib.sha256(frame(
        _DIGEST_DOMAIN, job_id, phase, canonical_json(list(model_hashes)), inner_query,
        canonical_json(dict(inner_doc)), arrays_digest(inner_arrays),
    )).hexdigest()


# --------------------------------------------------------------------------- step bodies

class DeclaredBounds(StrictModel):
    """The job's public bounds, from which every phase's fixed-point scales follow."""

    max_rows: int = Field(ge=1, le=2**40, description="the most rows any one site holds")
    feature_norm: float = Field(gt=0, le=1e12, description="L2 bound on every feature row at every site")
    loglik: float = Field(default=1e4, gt=0, le=1e12,
                          description="per-row bound on log-likelihoods that the broadcast arguments do not bound")


class AdvertiseBody(StrictModel):
    params: str = Field(description="SecureSumParams as JSON")
    bounds: DeclaredBounds


class ShareBody(StrictModel):
    advertisements: list[str] = Field(description="the verified advertisements, each as JSON", max_length=256)


class UploadBody(StrictModel):
    phase: int = Field(ge=0)
    inner_query: str
    inner_doc: dict[str, Any]
    bundles: list[str] | None = Field(default=None, max_length=256,
                                      description="the share bundles routed to this site (first upload only)")


class RevealBody(StrictModel):
    unmask: str = Field(description="UnmaskRequest as JSON")
    request_digest: Hex64


class AbortBody(StrictModel):
    reason_code: str = Field(min_length=1, max_length=128)
    detail: str = Field(default="", max_length=4096)


BODIES: dict[str, type[StrictModel]] = {
    SECURE_ADVERTISE: AdvertiseBody, SECURE_SHARE: ShareBody, SECURE_UPLOAD: UploadBody,
    SECURE_REVEAL: RevealBody, SECURE_ABORT: AbortBody,
}


def parse_body(envelope: Envelope) -> Any:
    """The envelope's body as the model of its step; :class:`ProtocolError` if malformed."""
    try:
        return BODIES[envelope.step].model_validate(envelope.body)
    except ValidationError as error:
        raise ProtocolError(f"malformed {envelope.step} body: {error.errors()[0]['msg']} at "
                            f"{'.'.join(map(str, error.errors()[0]['loc']))}") from None


# --------------------------------------------------------------------------- public bounds

def _max_row_norm(matrix: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(matrix, axis=-1))) if matrix.size else 0.0


def view_norm_bound(view: View, feature_norm: float) -> float:
    """A bound on the L2 norm of every row of ``view`` applied to rows of norm <= ``feature_norm``."""
    bound = feature_norm
    for step in view:
        args = step.arrays
        if step.op == "offset":
            bound += float(np.linalg.norm(args["offset"]))
        elif step.op == "project":
            bound *= float(np.linalg.norm(args["basis"]))  # Frobenius >= spectral norm
        elif step.op == "class_shift":
            bound += _max_row_norm(args["shift"])
        elif step.op == "confmix":
            bound = max(bound, _max_row_norm(args["others_mean"]))
        elif step.op == "keep_part":
            pass  # rows are kept or zeroed: no row grows
        else:
            raise StatisticsError(f"transform {step.op!r} has no public norm bound rule; the secure sum cannot scale it")
    return bound


def _log_range(matrix: np.ndarray, fallback: float) -> float:
    """Bound on |log(p . m)| for p a probability vector and m a row of ``matrix``."""
    low, high = float(np.min(matrix)), float(np.max(matrix))
    if not (low > 0 and math.isfinite(high)):
        return fallback
    return max(abs(math.log(low * (1 - PROBABILITY_TOLERANCE))), abs(math.log(high * (1 + PROBABILITY_TOLERANCE))))


def _gmm_loglik_bound(args: Mapping[str, np.ndarray], norm: float) -> float:
    means, prec_chol, log_weights = args["means"], args["prec_chol"], args["log_weights"]
    components, dim = means.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        log_det = np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(axis=1)
    constant = log_weights + log_det - 0.5 * dim * math.log(2 * math.pi)
    spread = np.linalg.norm(prec_chol.reshape(components, -1), axis=1) ** 2 * (norm + np.linalg.norm(means, axis=1)) ** 2
    finite = np.isfinite(constant) & np.isfinite(spread)
    if not np.any(finite):
        raise StatisticsError("the broadcast Gaussian mixture has no finite component; no public bound exists")
    upper = float(np.max(constant[finite])) + math.log(components)
    lower = float(np.max(constant[finite] - 0.5 * spread[finite]))
    return max(abs(upper), abs(lower))


def row_bound(stat: Stat, bounds: DeclaredBounds) -> float:
    """A bound on one row's contribution to any entry of ``stat`` (see the module docstring)."""
    kind, args = stat.kind, stat.arrays
    norm = view_norm_bound(stat.view, bounds.feature_norm)
    if kind in ("count", "class_counts", "hard_joint", "soft_joint", "true_class_prob_sum", "gmm_soft_joint",
                "tilted_joint", "class_prob_outer_sums"):
        return 1.0
    if kind in ("sum", "class_sums"):
        return norm
    if kind in ("gram", "class_sq_sums", "class_scatters"):
        return norm**2
    if kind == "norm2_weighted_sum":
        return norm**3
    if kind == "norm4_sum":
        return norm**4
    if kind == "mixture_loglik":
        return _log_range(args["weights"], bounds.loglik)
    if kind == "gmm_mixture_loglik":
        return _log_range(args["conditional"], bounds.loglik)
    if kind == "gmm_moments":
        reach = norm + (float(np.max(np.linalg.norm(args["means"], axis=1))) if args["means"].size else 0.0)
        return max(1.0, reach, reach**2)
    if kind == "gmm_loglik":
        return _gmm_loglik_bound(args, norm)
    if kind == "tilted_kl_sum":
        floor, sources = float(args["floor"]), int(args["tilt"].shape[1])
        if not floor > 0:
            return bounds.loglik
        return max(math.log(max(sources, 1)) + math.log1p(floor * max(sources, 1)), abs(math.log(floor)))
    if kind in ("holdout_class_counts", "probe_correct"):
        return 1.0
    if kind == "probe_gradient":  # x~_j (p_c - y_c), |x~_j| <= max(M, 1) and |p_c - y_c| <= 1
        return max(norm, 1.0)
    if kind == "probe_hessian":  # x~_j x~_l (p_c [c = c'] - p_c p_c'), the last factor in [-1/4, 1/4]
        return max(norm, 1.0) ** 2
    if kind == "probe_loss":  # logsumexp(z) - z_y in [0, log C + 2 max_c |z_c|], |z_c| <= ||W_c|| sqrt(M^2 + 1)
        weights = args["weights"]
        reach = float(np.linalg.norm(weights, axis=0).max()) if weights.size else 0.0
        return math.log(max(weights.shape[1], 1)) + 2.0 * math.hypot(norm, 1.0) * reach
    raise StatisticsError(f"statistic {kind!r} has no public bound rule; the secure sum cannot scale it")


def block_bound(rows: int, per_row: float) -> float:
    """``rows * per_row`` with slack, rounded up to a power of two (at least 1)."""
    value = rows * max(per_row, 1.0) * BOUND_SLACK
    if not math.isfinite(value):
        raise StatisticsError(
            f"a public bound of {rows} rows x {per_row:.3g} per row overflows float64; lower the job's "
            "declared feature_norm or max_rows"
        )
    return math.ldexp(1.0, math.frexp(value)[1])


def round_sum_spec(stats: Sequence[tuple[str, Stat]], statistics: Statistics, bounds: DeclaredBounds, *,
                   context: str, limbs: int = DEFAULT_LIMBS) -> SumSpec:
    """The phase's sum spec: blocks in request order, shapes and dtypes of ``statistics``,
    bounds from :func:`row_bound`, bound to ``context`` (the request digest)."""
    keys = [key for key, _ in stats]
    if set(keys) != set(statistics) or len(set(keys)) != len(keys):
        raise StatisticsError(
            f"the statistics computed differ from the request: unmatched {sorted(set(keys) ^ set(statistics))}"
        )
    blocks = []
    for key, stat in stats:
        value = statistics[key]
        if value.dtype == np.int64:
            bound: int | float = bounds.max_rows
        else:
            bound = block_bound(bounds.max_rows, row_bound(stat, bounds))
        blocks.append(BlockSpec(key=key, shape=value.shape, dtype=str(value.dtype), bound=bound))
    return SumSpec(blocks=tuple(blocks), limbs=limbs, context=context)


def _stats_request(doc: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> list[tuple[str, Stat]]:
    """A job round's (key, Stat) pairs (:mod:`fedmte.protocol.job_messages`); the reply keys
    are ``<model id>/<request key>``."""
    out: dict[str, Stat] = {}
    for model_id, stats in decode_job_round(JobRoundRequest.parse(doc), arrays).items():
        for stat in stats:
            out.setdefault(block_key(model_id, stat.key), stat)
    return list(out.items())


INNER_QUERIES: dict[str, Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], list[tuple[str, Stat]]]] = {
    STATS: _stats_request,
}
"""Inner queries a secure phase can wrap, each with the decoder that names, per statistics
key of the reply, the :class:`Stat` whose public bound applies. A site answers the inner
query with its ordinary handler; a query whose keys are namespaced (several models in one
round) registers a decoder that returns those keys."""


def inner_stats(inner_query: str, doc: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> list[tuple[str, Stat]]:
    """The (key, Stat) pairs an inner request asks for; refuses an unknown inner query."""
    decoder = INNER_QUERIES.get(inner_query)
    if decoder is None:
        raise ProtocolError(f"the secure sum cannot wrap query {inner_query!r}; it wraps {', '.join(INNER_QUERIES)}")
    return decoder(doc, arrays)
