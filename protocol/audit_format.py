"""The site audit log's record format, canonical encoding, hashing and checkpoints (pure).

A site's audit log is a file of JSON lines, one record each, that says what left the site,
to whom, when, why and at what privacy cost. This module fixes the bytes; the file itself
is written and verified by :mod:`fedmte.client.audit_log`.

Encoding. A line is the record's *canonical* JSON: UTF-8, keys sorted, no insignificant
whitespace, no floats (privacy numbers travel as decimal strings written by :func:`dec`,
so they round-trip exactly), no NaN. A verifier re-encodes every parsed line and requires
byte equality, so one record has exactly one valid line.

Hashing (RFC 9162, "Certificate Transparency Version 2.0", section 2.1.1, the same as
RFC 6962 section 2.1):

    leaf hash  = SHA-256(0x00 || line)            (the line without its newline)
    node hash  = SHA-256(0x01 || left || right)
    MTH(D[n])  = MTH(D[0:k]) node MTH(D[k:n]),  k the largest power of two < n;
    MTH({})    = SHA-256("")

Every record carries ``prev``, the hex leaf hash of the line before it (64 zeros for the
first), and ``digest``, the SHA-256 of its own canonical JSON without the ``digest`` field;
the digest pins an edited byte to the record that holds it, the chain pins the order.

Checkpoints follow the C2SP ``tlog-checkpoint`` / ``signed-note`` layout: a body of lines

    fedmte.audit/<site_id>          origin
    <tree size>                     number of records the root covers
    <base64 root>                   RFC 9162 root over those records' lines
    timestamp <RFC 3339 UTC>        extension lines
    ledger <hex sha256>             digest of the replayed privacy ledger at that size

then a blank line and one signature line per signer, ``\u2014 <name> base64(hint || sig)``,
where ``hint`` is the first 4 bytes of SHA-256(name || "\\n" || 0x01 || public key) and
``sig`` is Ed25519 over the body. The coordinator countersigns by adding its own line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import Field, NonNegativeInt, StringConstraints, TypeAdapter, ValidationError

from fedmte.protocol import encoding
from fedmte.protocol.encoding import StrictModel
from fedmte.protocol.errors import InvalidInputError, VerificationError

SCHEMA = "fedmte.audit.v1"
GENESIS = "0" * 64
LEAF_PREFIX = b"\x00"  # RFC 9162 section 2.1.1: leaf hashes are domain-separated by 0x00
NODE_PREFIX = b"\x01"  # ... and interior nodes by 0x01
ORIGIN_PREFIX = "fedmte.audit/"
ED25519_ALG_BYTE = b"\x01"  # C2SP signed-note: the Ed25519 key-hint algorithm identifier
SIGNATURE_DASH = "\u2014"  # C2SP signed-note signature lines start with an em dash

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Decimal = Annotated[str, StringConstraints(pattern=r"^-?[0-9]+(\.[0-9]+)?(e[-+]?[0-9]+)?$")]
Timestamp = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")]
SiteId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Text = Annotated[str, StringConstraints(max_length=4096)]


def dec(value: float) -> str:
    """A float as the exact decimal string records carry (``repr`` round-trips float64)."""
    value = float(value)
    if not math.isfinite(value):
        raise InvalidInputError(f"audit records hold finite numbers only, got {value}")
    return repr(value)


# --------------------------------------------------------------------------- canonical JSON

def _reject_floats(value: Any, path: str) -> None:
    if isinstance(value, float):
        raise InvalidInputError(f"{path or 'value'} is a float; audit records write numbers as decimal strings (dec())")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{path or 'value'} has a non-string key {key!r}")
            _reject_floats(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_floats(item, f"{path}[{index}]")


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no floats: the one encoding a record may have."""
    _reject_floats(value, "")
    return _encode(value)


def _encode(value: Any) -> bytes:
    return encoding.canonical_json(value)


def _no_float(text: str) -> Any:
    raise ValueError(f"the number {text} is a float; records write numbers as decimal strings")


# --------------------------------------------------------------------------- RFC 9162 hashing

def leaf_hash(line: bytes) -> bytes:
    """SHA-256(0x00 || line)."""
    return hashlib.sha256(LEAF_PREFIX + line).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def merkle_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """RFC 9162 Merkle tree hash over already-hashed leaves (the recursive definition)."""
    n = len(leaf_hashes)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaf_hashes[0]
    split = 1 << ((n - 1).bit_length() - 1)  # largest power of two strictly below n
    return node_hash(merkle_root(leaf_hashes[:split]), merkle_root(leaf_hashes[split:]))


class MerkleAccumulator:
    """The RFC 9162 root of a growing list of leaves in O(log n) memory and time per leaf.

    It keeps the roots of the perfect subtrees the leaves so far decompose into (largest
    first); the tree hash is those roots folded right to left, which is what the recursive
    definition yields because its left splits are exactly those perfect subtrees.
    """

    def __init__(self) -> None:
        self._peaks: list[tuple[int, bytes]] = []  # (height, subtree root)
        self.size = 0

    def append(self, leaf: bytes) -> None:
        height, node = 0, leaf
        while self._peaks and self._peaks[-1][0] == height:
            _, left = self._peaks.pop()
            node = node_hash(left, node)
            height += 1
        self._peaks.append((height, node))
        self.size += 1

    def root(self) -> bytes:
        if not self._peaks:
            return hashlib.sha256(b"").digest()
        node = self._peaks[-1][1]
        for _, left in reversed(self._peaks[:-1]):
            node = node_hash(left, node)
        return node


# --------------------------------------------------------------------------- records


class ModelRef(StrictModel):
    """A candidate model: the site's architecture id and the sha256 of its weights."""

    arch_id: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    weights_sha256: Hex64


class DatasetRef(StrictModel):
    """Which data: the data source the budget is kept for, and the exact version read."""

    data_source: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    version_sha256: Hex64


class StatBlock(StrictModel):
    """One released block: what it is, its shape, and the noise it carries."""

    model_sha256: Hex64 | None = None
    key: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    kind: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    shape: list[NonNegativeInt]
    dtype: Literal["float64", "int64"]
    sensitivity: Decimal | None = None
    noise_std: Decimal | None = None


class PrivacyCharge(StrictModel):
    """What the release cost, in mu of Gaussian DP (mu^2 adds up), and what is left."""

    mechanism: Literal["gaussian", "none"]
    neighbouring: Literal["add_remove", "replace_one"] = "add_remove"
    clip_norm: Decimal | None = None
    mu_release: Decimal | None = None
    cached: bool = False
    mu_sq_before: Decimal
    mu_sq_after: Decimal
    mu_cap: Decimal | None = None
    delta: Decimal | None = None
    epsilon_spent: Decimal | None = None
    epsilon_budget: Decimal | None = None
    ledger_version: NonNegativeInt
    ledger_sha256: Hex64 | None = None
    policy_sha256: Hex64 | None = None
    suppressed_classes: dict[str, list[NonNegativeInt]] = Field(default_factory=dict)
    # How the release's mu^2 was split across its blocks (protocol.dp.allocate_sigmas).
    allocation: Literal["by_scorer", "by_size", "even"] | None = None
    # Share noise through the secure sum (client.privacy.honest_shares). mu_release above holds
    # given the secure sum and at most the policy's colluders; the *_alone fields are the weaker
    # guarantee the site gives on its own, had the secure sum been broken or every other site
    # colluded. Absent (old records): full noise, the alone values equal the charged ones.
    secure_threshold: NonNegativeInt | None = None
    secure_sites: NonNegativeInt | None = None
    colluding_sites: NonNegativeInt | None = None
    honest_shares: NonNegativeInt | None = None
    noise_share: Decimal | None = None
    mu_alone_release: Decimal | None = None
    mu_alone_sq_before: Decimal | None = None
    mu_alone_sq_after: Decimal | None = None
    epsilon_alone_spent: Decimal | None = None


class PayloadRef(StrictModel):
    """The exact bytes that leave, by content address (a copy sits under payloads/)."""

    sha256: Hex64
    bytes: NonNegativeInt


class LedgerHead(StrictModel):
    """A privacy ledger's version (one per charge) and the hash of its state at that version."""

    version: NonNegativeInt
    sha256: Hex64


class RecordHeader(StrictModel):
    schema_: Literal["fedmte.audit.v1"] = Field(SCHEMA, alias="schema")
    seq: NonNegativeInt
    ts: Timestamp
    prev: Hex64
    digest: Hex64
    site_id: SiteId


class Intent(StrictModel):
    """Written and flushed before anything is sent: who asked, why, what will leave."""

    kind: Literal["intent"] = "intent"
    requester: Text
    recipient: Text
    run_id: Text
    round: NonNegativeInt
    purpose: Text = ""
    request_sha256: Hex64 | None = None
    models: list[ModelRef] = Field(default_factory=list)
    dataset: DatasetRef | None = None
    statistics: list[StatBlock] = Field(default_factory=list)
    privacy: PrivacyCharge | None = None
    payload: PayloadRef


class Outcome(StrictModel):
    """What happened to an intent's payload."""

    kind: Literal["outcome"] = "outcome"
    intent_seq: NonNegativeInt
    status: Literal["sent", "failed", "unknown"]
    payload_sha256: Hex64
    detail: Text = ""


class Refusal(StrictModel):
    """A request the site said no to, and the rule that said it."""

    kind: Literal["refusal"] = "refusal"
    requester: Text
    run_id: Text
    round: NonNegativeInt
    purpose: Text = ""
    request_sha256: Hex64 | None = None
    reason_code: Text
    rule: Text
    message: Text
    data_source: Text | None = None
    models: list[ModelRef] = Field(default_factory=list)


class Abort(StrictModel):
    """A run the site stopped taking part in."""

    kind: Literal["abort"] = "abort"
    run_id: Text
    reason_code: Text
    detail: Text = ""


class CheckpointBody(StrictModel):
    """A signed statement of the tree over every earlier record, and the ledger at that size."""

    kind: Literal["checkpoint"] = "checkpoint"
    tree_size: NonNegativeInt
    root: Hex64
    ledger: dict[str, Decimal]
    key_hint: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8}$")]
    signature: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")]


class IntentRecord(RecordHeader, Intent):
    pass


class OutcomeRecord(RecordHeader, Outcome):
    pass


class RefusalRecord(RecordHeader, Refusal):
    pass


class AbortRecord(RecordHeader, Abort):
    pass


class CheckpointRecord(RecordHeader, CheckpointBody):
    pass


AuditRecord = Annotated[
    Union[IntentRecord, OutcomeRecord, RefusalRecord, AbortRecord, CheckpointRecord],
    Field(discriminator="kind"),
]
RecordBody = Union[Intent, Outcome, Refusal, Abort, CheckpointBody]
_RECORD = TypeAdapter(AuditRecord)


def record_digest(fields: dict[str, Any]) -> str:
    """Hex SHA-256 of the record's canonical JSON without its ``digest`` field."""
    return hashlib.sha256(canonical_json({k: v for k, v in fields.items() if k != "digest"})).hexdigest()


def seal(body: RecordBody, *, seq: int, ts: str, prev: str, site_id: str) -> tuple[bytes, AuditRecord]:
    """The canonical line (no newline) and validated record for ``body`` at position ``seq``."""
    fields = body.model_dump(mode="json", by_alias=True)
    fields.update({"schema": SCHEMA, "seq": seq, "ts": ts, "prev": prev, "site_id": site_id})
    fields["digest"] = record_digest(fields)
    try:
        record = _RECORD.validate_python(fields)
    except ValidationError as error:
        raise InvalidInputError(f"audit record {seq} is not valid: {error}") from None
    return canonical_json(fields), record


def parse_line(line: bytes) -> AuditRecord:
    """Parse one line (without newline) and check it is canonical, self-consistent and valid.

    Raises :class:`VerificationError` saying which check failed.
    """
    try:
        # floats and NaN/Infinity are refused while parsing, so re-encoding needs no walk
        fields = json.loads(line.decode("utf-8"), parse_float=_no_float, parse_constant=_no_float)
    except (UnicodeDecodeError, ValueError) as error:
        raise VerificationError(f"not a JSON record ({error.__class__.__name__}: {error})") from None
    if not isinstance(fields, dict):
        raise VerificationError("not a JSON object")
    if _encode(fields) != line:
        raise VerificationError("not in canonical form (sorted keys, no whitespace, UTF-8, one encoding per record)")
    expected = hashlib.sha256(_encode({k: v for k, v in fields.items() if k != "digest"})).hexdigest()
    if fields.get("digest") != expected:
        raise VerificationError(f"content does not match its digest (edited): expected {expected}, "
                                f"recorded {fields.get('digest')}")
    try:
        return _RECORD.validate_python(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise VerificationError(f"not a valid {SCHEMA} record: {where}: {first['msg']}") from None


# --------------------------------------------------------------------------- checkpoints

def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def origin(site_id: str) -> str:
    return f"{ORIGIN_PREFIX}{site_id}"


def key_hint(name: str, key: Ed25519PublicKey) -> bytes:
    """C2SP signed-note key hint: SHA-256(name || '\\n' || 0x01 || raw key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + ED25519_ALG_BYTE + public_key_bytes(key)).digest()[:4]


def ledger_digest(ledger: dict[str, str]) -> str:
    """Hex SHA-256 of the replayed ledger (data source -> spent mu^2, decimal strings)."""
    return hashlib.sha256(canonical_json(dict(ledger))).hexdigest()


class Checkpoint(StrictModel):
    """The signed body of a checkpoint, as a witness reads it."""

    origin: str
    tree_size: NonNegativeInt
    root: Hex64
    timestamp: Timestamp
    ledger_digest: Hex64

    def body(self) -> bytes:
        root = base64.b64encode(bytes.fromhex(self.root)).decode()
        return (f"{self.origin}\n{self.tree_size}\n{root}\n"
                f"timestamp {self.timestamp}\nledger {self.ledger_digest}\n").encode()


def checkpoint_of(record: CheckpointRecord) -> Checkpoint:
    """The checkpoint a log record states (its body is what the signature covers)."""
    return Checkpoint(origin=origin(record.site_id), tree_size=record.tree_size, root=record.root,
                      timestamp=record.ts, ledger_digest=ledger_digest(record.ledger))


def sign(checkpoint: Checkpoint, key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """(key hint, Ed25519 signature) over the checkpoint body, signer name = origin."""
    return key_hint(checkpoint.origin, key.public_key()), key.sign(checkpoint.body())


def note(checkpoint: Checkpoint, hint: bytes, signature: bytes) -> str:
    """The signed note text: body, blank line, the site's signature line."""
    line = f"{SIGNATURE_DASH} {checkpoint.origin} {base64.b64encode(hint + signature).decode()}\n"
    return checkpoint.body().decode() + "\n" + line


_NOTE_BODY = re.compile(
    r"^(?P<origin>\S+)\n(?P<size>0|[1-9][0-9]*)\n(?P<root>[A-Za-z0-9+/]{43}=)\n"
    r"timestamp (?P<ts>\S+)\nledger (?P<ledger>[0-9a-f]{64})\n$"
)


def parse_note(text: str) -> tuple[Checkpoint, list[tuple[str, bytes, bytes]]]:
    """A signed note's checkpoint and its signature lines as (name, hint, signature)."""
    body, sep, sigs = text.partition("\n\n")
    match = _NOTE_BODY.match(body + "\n") if sep else None
    if match is None:
        raise VerificationError("not a fedmte audit checkpoint note (origin, size, root, timestamp, ledger lines)")
    try:
        checkpoint = Checkpoint(origin=match["origin"], tree_size=int(match["size"]),
                                root=base64.b64decode(match["root"], validate=True).hex(),
                                timestamp=match["ts"], ledger_digest=match["ledger"])
    except (ValidationError, ValueError) as error:
        raise VerificationError(f"checkpoint note has a malformed field: {error}") from None
    signatures = []
    for line in sigs.splitlines():
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != SIGNATURE_DASH:
            raise VerificationError(f"malformed signature line in checkpoint note: {line!r}")
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except ValueError:
            raise VerificationError(f"signature line is not base64: {line!r}") from None
        if len(blob) != 4 + 64:
            raise VerificationError("an Ed25519 signature line holds a 4-byte hint and a 64-byte signature")
        signatures.append((parts[1], blob[:4], blob[4:]))
    return checkpoint, signatures


def verify_signature(checkpoint: Checkpoint, hint: bytes, signature: bytes, key: Ed25519PublicKey) -> None:
    """Raise :class:`VerificationError` unless ``key`` signed ``checkpoint``."""
    if hint != key_hint(checkpoint.origin, key):
        raise VerificationError("checkpoint was signed by a different key than the trusted one (key hint differs)")
    try:
        key.verify(signature, checkpoint.body())
    except InvalidSignature:
        raise VerificationError("checkpoint signature does not verify with the trusted key") from None


def verify_note(text: str, key: Ed25519PublicKey) -> Checkpoint:
    """The checkpoint of a signed note, if ``key`` (under the note's origin) signed it."""
    checkpoint, signatures = parse_note(text)
    expected = key_hint(checkpoint.origin, key)
    for name, hint, signature in signatures:
        if name == checkpoint.origin and hint == expected:
            verify_signature(checkpoint, hint, signature, key)
            return checkpoint
    raise VerificationError(f"checkpoint for {checkpoint.origin} carries no signature by the trusted key")
