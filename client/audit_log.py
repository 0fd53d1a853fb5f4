"""The site's tamper-evident audit log: what left the site, to whom, why, at what privacy cost.

Layout of an audit directory (research/PRIVACY.md section 3.2)::

    log.jsonl               one canonical JSON record per line, append-only, fsynced
    payloads/<sha256>.bin   the exact bytes of every payload, by content address
    checkpoints/<size>.txt  signed checkpoint notes (C2SP signed-note layout)
    keys/audit.pub          the site's Ed25519 public key (the private key lives elsewhere)

The record format, canonical encoding, RFC 9162 hashing and checkpoint notes are in
:mod:`fedmte.protocol.audit_format`. This module writes and verifies them.

Write-ahead rule. A sender calls :meth:`AuditLog.intent` with the exact bytes it is about to
send: the payload copy and then the intent record are written and fsynced before the call
returns; only then may the bytes leave. Afterwards :meth:`AuditLog.sent` (or
:meth:`AuditLog.failed`) records the outcome; :meth:`AuditLog.transmission` wraps the three
steps around a send. A checkpoint over every earlier record is signed every
``checkpoint_every`` records and on :meth:`AuditLog.close`.

:func:`verify` replays the log from the first line: canonical bytes, each record's own
digest, sequence numbers, the hash chain, timestamps, payload copies, the privacy ledger
(every intent's spent mu^2 must follow from the previous one by
:func:`fedmte.protocol.dp.compose_sq`), every checkpoint's root, ledger and signature against
the trusted key, then the checkpoint files and any witness copies (a checkpoint larger than
the log means it was truncated). It stops at the first failure and names that record;
intents without an outcome are reported without failing.

A log proves nothing on its own: whoever can rewrite it can also re-sign it with a new key
and replace ``keys/audit.pub``. So a result is *verified* only when something kept apart from
the directory ties it to the site's key: the key itself, its fingerprint (the site file's
``[audit] verification_key_sha256``), or a witness checkpoint the coordinator kept (it must
verify with the directory's key). Without one the result is UNVERIFIED, however consistent
the chain. With ``ledger_dir`` the privacy ledger is checked against the log too: a ledger
behind the log (rolled back) or ahead of it (charges the log does not record: the log was cut
back) is tampering.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from fedmte.protocol import audit_format as fmt
from fedmte.protocol import dp
from fedmte.protocol.audit_format import (
    GENESIS,
    Abort,
    AuditRecord,
    CheckpointBody,
    CheckpointRecord,
    DatasetRef,
    Intent,
    IntentRecord,
    LedgerHead,
    ModelRef,
    Outcome,
    OutcomeRecord,
    PayloadRef,
    PrivacyCharge,
    RecordBody,
    Refusal,
    StatBlock,
    dec,
)
from fedmte.protocol.durable import atomic_write
from fedmte.protocol.errors import InvalidInputError, VerificationError
from fedmte.protocol.keys import fingerprint, load_private_key, write_private_key

LOG_FILE = "log.jsonl"
PAYLOADS_DIR = "payloads"
CHECKPOINTS_DIR = "checkpoints"
KEYS_DIR = "keys"
PUBLIC_KEY_FILE = "audit.pub"
LOCK_FILE = ".lock"
DEFAULT_CHECKPOINT_EVERY = 100
# Timestamps may step back this much (a clock correction) before verify calls it tampering;
# the writer never steps back at all.
CLOCK_SKEW_TOLERANCE = timedelta(minutes=5)


# --------------------------------------------------------------------------- keys and time

def generate_signing_key(path: Path | str) -> Ed25519PrivateKey:
    """A new Ed25519 audit key, written 0600; an existing file is never overwritten."""
    return write_private_key(path)


def load_signing_key(path: Path | str) -> Ed25519PrivateKey:
    """The site's Ed25519 private key from a PEM file only its owner can read."""
    return load_private_key(path)


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``keys/audit.pub`` or a pinned copy)."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"cannot read an Ed25519 public key from {path}: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInputError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw public key: how records and policies name a key."""
    return fingerprint(key)


def _format_ts(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)  # the record schema has already fixed the "...ssssssZ" form


# --------------------------------------------------------------------------- replay

class _Replay:
    """The state a log implies after its first ``seq`` records; shared by writer and verifier.

    :meth:`apply` checks one record against that state and raises :class:`VerificationError`
    without changing anything, or advances the state.
    """

    def __init__(self) -> None:
        self.seq = 0
        self.prev = GENESIS
        self.merkle = fmt.MerkleAccumulator()
        self.site_id: str | None = None
        self.last_ts: datetime | None = None
        self.spent: dict[str, float] = {}
        self.spent_alone: dict[str, float] = {}  # the spend by the site's guarantee alone (share noise)
        self.ledger_version = 0
        self.ledger_head: LedgerHead | None = None
        self.open_intents: dict[int, str] = {}
        self.checkpoints = 0
        self.kinds: dict[str, int] = {}  # records of each kind, in log order of first appearance
        self.last_checkpoint: CheckpointRecord | None = None
        self.since_checkpoint = 0
        self.warnings: list[str] = []
        self.snapshots: dict[int, tuple[str, str]] = {}  # size -> (root hex, ledger digest)
        self.wanted: set[int] = set()

    def ledger_view(self) -> dict[str, str]:
        return {source: dec(value) for source, value in sorted(self.spent.items())}

    def apply(self, record: AuditRecord, line: bytes, *, key: Ed25519PublicKey | None,
              payload_dir: Path | None) -> None:
        if record.seq != self.seq:
            raise VerificationError(
                f"expected record {self.seq} here, found record {record.seq}: a record was deleted, "
                "inserted or moved"
            )
        if record.prev != self.prev:
            raise VerificationError("its prev hash does not match the record before it: the chain is broken "
                                    "(a record before it was removed, replaced or reordered)")
        if self.site_id is not None and record.site_id != self.site_id:
            raise VerificationError(f"site_id {record.site_id!r} differs from the log's {self.site_id!r}")
        moment = _parse_ts(record.ts)
        if self.last_ts is not None and moment < self.last_ts - CLOCK_SKEW_TOLERANCE:
            raise VerificationError(f"timestamp {record.ts} goes back more than {CLOCK_SKEW_TOLERANCE} "
                                    "before the previous record")
        spent_update: tuple[str, float, float] | None = None
        version = self.ledger_version
        head = self.ledger_head
        if isinstance(record, IntentRecord):
            if payload_dir is not None:
                _check_payload(payload_dir, record.payload)
            if record.privacy is not None:
                spent_update, version, head = self._replay_charge(record)
        elif isinstance(record, OutcomeRecord):
            expected = self.open_intents.get(record.intent_seq)
            if expected is None:
                raise VerificationError(f"outcome for record {record.intent_seq}, which is not an intent "
                                        "awaiting an outcome")
            if record.payload_sha256 != expected:
                raise VerificationError(f"outcome names payload {record.payload_sha256[:16]}..., but intent "
                                        f"{record.intent_seq} declared {expected[:16]}...")
        elif isinstance(record, CheckpointRecord):
            self._check_checkpoint(record, key)
        # every check passed: advance
        if self.seq in self.wanted:  # the state after the first `seq` records, before this one
            self.snapshots[self.seq] = (self.merkle.root().hex(), fmt.ledger_digest(self.ledger_view()))
        if self.site_id is None:
            self.site_id = record.site_id
        if spent_update is not None:
            self.spent[spent_update[0]] = spent_update[1]
            self.spent_alone[spent_update[0]] = spent_update[2]
        self.ledger_version, self.ledger_head = version, head
        if isinstance(record, IntentRecord):
            self.open_intents[record.seq] = record.payload.sha256
        elif isinstance(record, OutcomeRecord):
            del self.open_intents[record.intent_seq]
        if isinstance(record, CheckpointRecord):
            self.checkpoints += 1
            self.last_checkpoint = record
            self.since_checkpoint = 0
        else:
            self.since_checkpoint += 1
        leaf = fmt.leaf_hash(line)
        self.merkle.append(leaf)
        self.prev = leaf.hex()
        self.last_ts = max(moment, self.last_ts) if self.last_ts else moment
        self.kinds[record.kind] = self.kinds.get(record.kind, 0) + 1
        self.seq += 1

    def _replay_charge(self, record: IntentRecord) -> tuple[tuple[str, float, float], int, LedgerHead | None]:
        charge = record.privacy
        assert charge is not None
        if record.dataset is None:
            raise VerificationError("a privacy charge without a dataset: which data source paid?")
        source = record.dataset.data_source
        replayed = self.spent.get(source, 0.0)
        before, after = float(charge.mu_sq_before), float(charge.mu_sq_after)
        paid = charge.mechanism == "gaussian" and not charge.cached
        step = 1 if paid else 0
        if charge.ledger_version < self.ledger_version + step:
            raise VerificationError(f"ledger version {charge.ledger_version} does not advance from "
                                    f"{self.ledger_version}: the ledger values were edited")
        skipped = charge.ledger_version - self.ledger_version - step
        if skipped == 0 and before != replayed:
            raise VerificationError(f"{source!r} had spent mu^2={dec(replayed)} by the log's own account, the "
                                    f"record says {charge.mu_sq_before}: the ledger values were edited")
        if skipped > 0:
            if before < replayed:
                raise VerificationError(f"{source!r} spent mu^2 goes down from {dec(replayed)} to "
                                        f"{charge.mu_sq_before}: the ledger values were edited")
            self.warnings.append(f"record {record.seq}: {skipped} ledger charge(s) have no audit record "
                                 "(the site stopped between charging and logging)")
        if paid:
            if charge.mu_release is None:
                raise VerificationError("a Gaussian release without its mu")
            expected = dp.compose_sq(before, float(charge.mu_release))
            if after != expected:
                raise VerificationError(f"{source!r} spent mu^2 after the release should be {dec(expected)}, "
                                        f"the record says {charge.mu_sq_after}: the ledger values were edited")
        elif after != before:
            raise VerificationError("a free (cached or noiseless) release changed the spent budget")
        alone_after = self._replay_alone(charge, source, skipped, paid, before, after)
        if charge.mu_cap is not None and after > float(charge.mu_cap) ** 2 * (1 + 1e-9):
            self.warnings.append(f"record {record.seq}: {source!r} was charged past its cap")
        head = (LedgerHead(version=charge.ledger_version, sha256=charge.ledger_sha256)
                if charge.ledger_sha256 is not None else self.ledger_head)
        return (source, after, alone_after), charge.ledger_version, head

    def _replay_alone(self, charge: PrivacyCharge, source: str, skipped: int, paid: bool, before: float,
                      after: float) -> float:
        """Check the spend by the site's guarantee alone the way the spend itself is checked:
        it follows from the previous record by :func:`fedmte.protocol.dp.compose_sq` of the
        record's ``mu_alone_release``. A record without these fields (full noise, or written
        before share noise) steps both totals by the same mu."""
        replayed = self.spent_alone.get(source, self.spent.get(source, 0.0))
        alone_before = float(charge.mu_alone_sq_before) if charge.mu_alone_sq_before is not None else None
        if alone_before is None:  # an older record: only full noise existed, the totals move together
            alone_before = replayed if skipped == 0 else before + (replayed - self.spent.get(source, 0.0))
        elif skipped == 0 and alone_before != replayed:
            raise VerificationError(f"{source!r} had spent mu^2={dec(replayed)} by the site's guarantee alone, the "
                                    f"record says {charge.mu_alone_sq_before}: the ledger values were edited")
        elif alone_before < replayed:
            raise VerificationError(f"{source!r} spend alone goes down from {dec(replayed)} to "
                                    f"{charge.mu_alone_sq_before}: the ledger values were edited")
        if not paid:
            expected = alone_before
        else:
            mu_alone = charge.mu_alone_release if charge.mu_alone_release is not None else charge.mu_release
            expected = dp.compose_sq(alone_before, float(mu_alone))  # type: ignore[arg-type]
        if charge.mu_alone_sq_after is not None and float(charge.mu_alone_sq_after) != expected:
            raise VerificationError(f"{source!r} spend alone after the release should be {dec(expected)}, the "
                                    f"record says {charge.mu_alone_sq_after}: the ledger values were edited")
        if expected < after:
            raise VerificationError(f"{source!r} spend alone {dec(expected)} is below its spent mu^2 {dec(after)}")
        return expected

    def _check_checkpoint(self, record: CheckpointRecord, key: Ed25519PublicKey | None) -> None:
        if record.tree_size != self.seq:
            raise VerificationError(f"checkpoint claims {record.tree_size} earlier records, there are {self.seq}")
        root = self.merkle.root().hex()
        if record.root != root:
            raise VerificationError(f"checkpoint root {record.root[:16]}... differs from the recomputed "
                                    f"{root[:16]}...: an earlier record was changed")
        if record.ledger != self.ledger_view():
            raise VerificationError(f"checkpoint ledger {record.ledger} differs from the replayed "
                                    f"{self.ledger_view()}: the ledger values were edited")
        if key is None:
            raise VerificationError("no trusted public key to check this checkpoint's signature; pass one "
                                    f"or restore {KEYS_DIR}/{PUBLIC_KEY_FILE}")
        fmt.verify_signature(fmt.checkpoint_of(record), bytes.fromhex(record.key_hint),
                             base64.b64decode(record.signature), key)


def _check_payload(payload_dir: Path, payload: PayloadRef) -> None:
    path = payload_dir / f"{payload.sha256}.bin"
    try:
        data = path.read_bytes()
    except OSError:
        raise VerificationError(f"its payload copy {PAYLOADS_DIR}/{path.name} is missing") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != payload.sha256 or len(data) != payload.bytes:
        raise VerificationError(f"its payload copy {PAYLOADS_DIR}/{path.name} was replaced or altered "
                                f"(it hashes to {actual[:16]}..., {len(data)} bytes)")


# --------------------------------------------------------------------------- verification

KIND_NAMES = {"intent": "intent", "outcome": "outcome", "refusal": "refusal", "abort": "abort",
              "checkpoint": "signed checkpoint"}


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def count_text(records: int, kinds: dict[str, int]) -> str:
    """``"14 records (6 intents, 6 outcomes, 2 signed checkpoints)"``: the one way every
    command counts a log (the parts always add up to the total)."""
    parts = [_plural(kinds[kind], KIND_NAMES[kind]) for kind in KIND_NAMES if kinds.get(kind)]
    noun = _plural(records, "record")
    return noun + (f" ({', '.join(parts)})" if parts else "")


class AuditVerification(BaseModel):
    """The result of :func:`verify`: whether the log is intact, whether anything kept apart
    from it vouches for its key, and if not intact, where it breaks.

    ``ok`` means no tampering was found; ``verified`` means ``ok`` *and* pinned (a key, its
    fingerprint or a witness from outside the directory). :attr:`status` is one word of the two.
    """

    model_config = ConfigDict(frozen=True)

    ok: bool
    directory: str
    site_id: str | None
    records: int
    checkpoints: int
    counts: dict[str, int] = Field(default_factory=dict)
    first_bad_seq: int | None = None
    reason: str | None = None
    dangling_intents: list[int] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    ledger: dict[str, str] = Field(default_factory=dict)
    ledger_head: LedgerHead | None = None
    ledger_checked: str | None = None  # the ledger directory checked against the log, if any
    ledger_problem: str | None = None
    latest_checkpoint: int | None = None
    pinned: bool = False
    key_source: str
    key_fingerprint: str | None = None

    @property
    def verified(self) -> bool:
        return self.ok and self.pinned

    @property
    def status(self) -> Literal["intact", "UNVERIFIED", "TAMPERED"]:
        if not self.ok:
            return "TAMPERED"
        return "intact" if self.pinned else "UNVERIFIED"

    def count_text(self) -> str:
        return count_text(self.records, self.counts)

    def summary(self) -> str:
        if not self.ok:
            where = f"record {self.first_bad_seq}" if self.first_bad_seq is not None else "the log"
            if self.ledger_problem is not None:
                where = "the ledger"
            text = f"TAMPERED: {where}: {self.reason}"
        elif self.pinned:
            ledger = f"; ledger {self.ledger_checked} agrees" if self.ledger_checked else ""
            text = f"intact: {self.count_text()}, signed by {self.key_source}{ledger}"
        else:
            text = (f"UNVERIFIED: {self.count_text()} form a consistent chain, but nothing ties them to the site's "
                    f"key ({self.key_source}): whoever rewrote the log could have re-signed it. Pin the key with "
                    "--site SITE.toml ([audit] verification_key_sha256), --key PUB.pem or --key-sha256 HEX, or pass "
                    "a --witness checkpoint the coordinator kept")
        if self.dangling_intents:
            text += f"; intents with no outcome: {self.dangling_intents}"
        return text

    def raise_for_problem(self) -> None:
        """Raise :class:`VerificationError` with :meth:`summary` unless the log is intact
        (pinned or not: this checks integrity only)."""
        if not self.ok:
            raise VerificationError(self.summary())


def _read_lines(path: Path) -> Iterator[tuple[bytes, bool]]:
    """(line without newline, whether it had one) for every line of the log."""
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.endswith(b"\n"):
                yield raw[:-1], True
            else:
                yield raw, False


def _scan(directory: Path, key: Ed25519PublicKey | None, *, check_payloads: bool,
          wanted: frozenset[int] | set[int] = frozenset()) -> tuple[_Replay, int | None, str | None]:
    """Replay the whole log; returns the state and the first failure (seq, reason), if any."""
    replay = _Replay()
    replay.wanted = set(wanted)
    path = directory / LOG_FILE
    if not path.exists():
        return replay, None, None
    payload_dir = directory / PAYLOADS_DIR if check_payloads else None
    for line, complete in _read_lines(path):
        if not complete:
            return replay, replay.seq, "truncated: the last line has no end (cut off mid-record)"
        try:
            record = fmt.parse_line(line)
            replay.apply(record, line, key=key, payload_dir=payload_dir)
        except VerificationError as error:
            return replay, replay.seq, str(error)
    if replay.seq in replay.wanted:
        replay.snapshots[replay.seq] = (replay.merkle.root().hex(), fmt.ledger_digest(replay.ledger_view()))
    return replay, None, None


def _read_witness(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        try:
            return str(json.loads(text)["note"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise VerificationError(f"{path} is JSON but holds no checkpoint 'note'") from None
    return text


def _stored_key(directory: Path) -> Ed25519PublicKey | None:
    stored = directory / KEYS_DIR / PUBLIC_KEY_FILE
    return load_public_key(stored) if stored.exists() else None


def verify(
    directory: Path | str,
    trusted_public_key: Ed25519PublicKey | None = None,
    *,
    witnesses: Sequence[Path | str] = (),
    check_payloads: bool = True,
    key_sha256: str | None = None,
    ledger_dir: Path | str | None = None,
) -> AuditVerification:
    """Check an audit directory end to end; see the module docstring for what is checked.

    The key checkpoints must be signed with is ``trusted_public_key`` if given, otherwise the
    directory's ``keys/audit.pub``. The result is *pinned* (:attr:`AuditVerification.verified`)
    only when something kept apart from the directory vouches for that key:
    ``trusted_public_key``; ``key_sha256``, the fingerprint the site file pins (the stored key
    must have it); or ``witnesses``, checkpoint notes (or exported JSON) kept elsewhere, e.g.
    by the coordinator, which must verify with the key. ``ledger_dir`` checks the privacy
    ledger against the log (:func:`check_ledger`).
    """
    directory = Path(directory)
    if not (directory / LOG_FILE).is_file():
        raise InvalidInputError(f"{directory} holds no audit log ({LOG_FILE} is missing)")
    stored_name = f"{KEYS_DIR}/{PUBLIC_KEY_FILE}"
    key_problem: str | None = None
    if key_sha256 is not None:
        key_sha256 = key_sha256.strip().lower()
    if trusted_public_key is not None:
        key, key_source, pinned = trusted_public_key, "the pinned key", True
        if key_sha256 is not None and key_fingerprint(key) != key_sha256:
            key_problem = (f"the pinned key's fingerprint is {key_fingerprint(key)[:16]}..., not the pinned "
                           f"fingerprint {key_sha256[:16]}...: the two pins disagree")
    else:
        key = _stored_key(directory)
        if key is None:
            key_source, pinned = f"no key: {stored_name} is missing", False
            if key_sha256 is not None:
                key_problem = f"{stored_name} is missing, so nothing can be checked against the pinned fingerprint"
        elif key_sha256 is not None:
            actual = key_fingerprint(key)
            key_source, pinned = f"{stored_name}, matching the pinned fingerprint {key_sha256[:16]}...", True
            if actual != key_sha256:
                key_problem = (f"{stored_name} has fingerprint {actual[:16]}..., not the pinned {key_sha256[:16]}...: "
                               "the site's key was replaced (a rewritten log re-signed with a new key)")
        else:
            key_source, pinned = f"{stored_name} in the log directory, not pinned", False
    notes: list[tuple[str, str]] = []
    checkpoint_dir = directory / CHECKPOINTS_DIR
    if checkpoint_dir.is_dir():
        notes += [(f"{CHECKPOINTS_DIR}/{p.name}", p.read_text(encoding="utf-8"))
                  for p in sorted(checkpoint_dir.glob("*.txt"))]
    witness_names = {str(w) for w in witnesses}
    notes += [(str(w), _read_witness(Path(w))) for w in witnesses]

    parsed: list[tuple[str, fmt.Checkpoint | None, str | None]] = []
    for name, text in notes:
        try:
            checkpoint = fmt.verify_note(text, key) if key is not None else fmt.parse_note(text)[0]
            parsed.append((name, checkpoint, None))
        except VerificationError as error:
            parsed.append((name, None, str(error)))
    wanted = {checkpoint.tree_size for _, checkpoint, _ in parsed if checkpoint is not None}

    replay, bad_seq, reason = _scan(directory, key, check_payloads=check_payloads, wanted=wanted)
    if key_problem is not None:
        bad_seq, reason = None, key_problem
    if reason is None:
        for name, checkpoint, problem in parsed:
            if checkpoint is None:
                bad_seq, reason = None, f"{name}: {problem}"
            elif replay.site_id is not None and checkpoint.origin != fmt.origin(replay.site_id):
                bad_seq, reason = None, f"{name} is a checkpoint of {checkpoint.origin}, not of this log"
            elif checkpoint.tree_size > replay.seq:
                bad_seq = replay.seq
                reason = (f"the log ends after {replay.seq} records, but {name} (signed) covers "
                          f"{checkpoint.tree_size}: records from {replay.seq} on were truncated")
            elif replay.snapshots.get(checkpoint.tree_size) != (checkpoint.root, checkpoint.ledger_digest):
                bad_seq = max(checkpoint.tree_size - 1, 0)
                reason = (f"{name} (signed) does not match the log's first {checkpoint.tree_size} records: "
                          "the log was rewritten")
            if reason is not None:
                break
    if reason is None and not pinned and key is not None and witness_names:
        # every witness verified with this key, so the key is the one the coordinator saw
        pinned = True
        key_source = f"{stored_name}, which signed the witness checkpoint(s) {', '.join(sorted(witness_names))}"
    ledger_problem = None
    if reason is None and ledger_dir is not None:
        ledger_problem = check_ledger(ledger_dir, site_id=replay.site_id, head=replay.ledger_head,
                                      spent=replay.ledger_view())
        if ledger_problem is not None:
            reason = ledger_problem
    latest = replay.last_checkpoint
    return AuditVerification(
        ok=reason is None,
        directory=str(directory),
        site_id=replay.site_id,
        records=replay.seq,
        checkpoints=replay.checkpoints,
        counts=dict(replay.kinds),
        first_bad_seq=bad_seq,
        reason=reason,
        dangling_intents=sorted(replay.open_intents) if reason is None else [],
        warnings=list(replay.warnings),
        ledger=replay.ledger_view(),
        ledger_head=replay.ledger_head,
        ledger_checked=None if ledger_dir is None else str(ledger_dir),
        ledger_problem=ledger_problem,
        latest_checkpoint=latest.tree_size if latest else None,
        pinned=pinned,
        key_source=key_source,
        key_fingerprint=None if key is None else key_fingerprint(key),
    )


def check_ledger(ledger_dir: Path | str, *, site_id: str | None, head: LedgerHead | None,
                 spent: dict[str, str] | None = None) -> str | None:
    """Why the privacy ledger in ``ledger_dir`` disagrees with a log whose last recorded
    ledger head is ``head`` (and whose replayed spend is ``spent``), or None when it agrees.

    Every charge the ledger holds must be one the log recorded: a ledger *behind* the log was
    rolled back or edited; a ledger *ahead* of it holds charges the log does not record, which
    is what a log cut back to an earlier checkpoint looks like (the signed checkpoint files
    after the cut are gone too, so the log alone still looks whole).
    """
    from fedmte.client.ledger import LEDGER_FILE, Ledger

    path = Path(ledger_dir) / LEDGER_FILE
    try:
        ledger = Ledger.open(ledger_dir, site_id=site_id or "", expected=head, create=False)
    except VerificationError as error:
        if head is None and not path.exists():
            return None  # the log records no charge and there is no ledger: nothing was ever spent
        return str(error)
    recorded = 0 if head is None else head.version
    actual = ledger.head.version
    if actual > recorded:
        ahead = actual - recorded
        sources = []
        for source, spend in sorted(ledger.state.sources.items()):
            logged = float((spent or {}).get(source, "0"))
            if float(spend.mu_sq) > logged:
                sources.append(f"{source!r} (mu^2 {spend.mu_sq} spent, the log accounts for {dec(logged)})")
        where = f"; unrecorded spend on {', '.join(sources)}" if sources else ""
        return (f"{path} is at version {actual}, but the log's last record of it is version {recorded}: "
                f"{ahead} charge(s) the log does not record{where}. The log was cut back (records and checkpoints "
                "after an earlier checkpoint removed), or the site stopped between charging and logging "
                "(its next record closes that gap)")
    return None


def read_records(directory: Path | str) -> list[AuditRecord]:
    """Every well-formed record of a log, for display; stops at the first malformed line.

    This does not verify anything; run :func:`verify` for that.
    """
    records: list[AuditRecord] = []
    path = Path(directory) / LOG_FILE
    if not path.exists():
        raise InvalidInputError(f"{directory} holds no audit log ({LOG_FILE} is missing)")
    for line, complete in _read_lines(path):
        if not complete:
            break
        try:
            records.append(fmt.parse_line(line))
        except VerificationError:
            break
    return records


def latest_checkpoint_export(directory: Path | str, *, key_sha256: str | None = None) -> dict[str, Any]:
    """The latest checkpoint as a JSON-ready dict (note, fields, site key) for a witness.

    Raises :class:`VerificationError` unless the log verifies with its stored key (and, given
    ``key_sha256``, that key is the pinned one), so a coordinator is never asked to
    countersign a broken log. ``records`` is the log's length, the number every command
    prints; ``tree_size`` is how many records the checkpoint covers (those before it).
    """
    directory = Path(directory)
    result = verify(directory, key_sha256=key_sha256)
    result.raise_for_problem()
    key = load_public_key(directory / KEYS_DIR / PUBLIC_KEY_FILE)
    checkpoint_path = directory / CHECKPOINTS_DIR / f"{result.latest_checkpoint}.txt"
    if result.latest_checkpoint is None or not checkpoint_path.exists():
        raise InvalidInputError(f"{directory} has no checkpoint yet; close the log (or wait for one) first")
    note = checkpoint_path.read_text(encoding="utf-8")
    checkpoint = fmt.verify_note(note, key)
    return {
        "schema": "fedmte.audit_checkpoint.v1",
        "site_id": result.site_id,
        "origin": checkpoint.origin,
        "tree_size": checkpoint.tree_size,
        "root": checkpoint.root,
        "timestamp": checkpoint.timestamp,
        "ledger_digest": checkpoint.ledger_digest,
        "ledger": result.ledger,
        "records": result.records,
        "note": note,
        "public_key": public_key_pem(key).decode(),
        "key_fingerprint": key_fingerprint(key),
    }


# --------------------------------------------------------------------------- writer

class PendingIntent(BaseModel):
    """An intent on disk, awaiting its outcome: hand it back to :meth:`AuditLog.sent`."""

    model_config = ConfigDict(frozen=True)

    seq: int
    payload_sha256: str
    payload_bytes: int


class AuditLog:
    """The append-only writer of one site's audit directory. One writer at a time (a lock file)."""

    def __init__(self, directory: Path, site_id: str, key: Ed25519PrivateKey, checkpoint_every: int,
                 replay: _Replay, fd: int, lock_fd: int) -> None:
        self.directory = directory
        self.site_id = site_id
        self._key = key
        self._public = key.public_key()
        self.checkpoint_every = checkpoint_every
        self._replay = replay
        self._fd = fd
        self._lock_fd = lock_fd
        self._closed = False
        self._broken: str | None = None
        self._held: list[PendingIntent] | None = None

    @classmethod
    def open(cls, directory: Path | str, *, site_id: str, signing_key: Ed25519PrivateKey,
             checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY) -> AuditLog:
        """Open (or create) the log; an existing log must verify with this key first."""
        directory = Path(directory)
        if checkpoint_every < 1:
            raise InvalidInputError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
        fmt.seal(Abort(run_id="-", reason_code="-"), seq=0, ts=_format_ts(datetime.now(timezone.utc)),
                 prev=GENESIS, site_id=site_id)  # validates site_id before anything is created
        for sub in (PAYLOADS_DIR, CHECKPOINTS_DIR, KEYS_DIR):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise InvalidInputError(f"{directory} is open in another process; one writer at a time") from None
        try:
            public = signing_key.public_key()
            stored = directory / KEYS_DIR / PUBLIC_KEY_FILE
            if stored.exists():
                if key_fingerprint(load_public_key(stored)) != key_fingerprint(public):
                    raise VerificationError(f"{stored} is not this signing key's public key; this log belongs to "
                                            "another key (key rotation is not supported: start a new log)")
            else:
                atomic_write(stored, public_key_pem(public))
            replay, bad_seq, reason = _scan(directory, public, check_payloads=True)
            if reason is not None:
                raise VerificationError(f"{directory} does not verify at record {bad_seq}: {reason}; "
                                        "nothing more is appended until it is investigated")
            if replay.site_id is not None and replay.site_id != site_id:
                raise InvalidInputError(f"{directory} is the log of site {replay.site_id!r}, not {site_id!r}")
            fd = os.open(directory / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(directory, site_id, signing_key, checkpoint_every, replay, fd, lock_fd)

    # ------------------------------------------------------------------ state

    @property
    def size(self) -> int:
        return self._replay.seq

    @property
    def ledger_head(self) -> LedgerHead | None:
        """The ledger version and hash the log last recorded: open the ledger with it."""
        return self._replay.ledger_head

    def spent_mu_sq(self, data_source: str) -> float:
        return self._replay.spent.get(data_source, 0.0)

    @property
    def dangling_intents(self) -> list[int]:
        return sorted(self._replay.open_intents)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public

    # ------------------------------------------------------------------ appending

    def _append(self, body: RecordBody, ts: str | None = None) -> AuditRecord:
        if self._closed:
            raise InvalidInputError("the audit log is closed")
        if self._broken:
            raise InvalidInputError(f"the audit log stopped accepting records after a write error: {self._broken}")
        now = datetime.now(timezone.utc)
        if ts is None:
            if self._replay.last_ts is not None and now < self._replay.last_ts:
                now = self._replay.last_ts  # the writer never steps back in time
            ts = _format_ts(now)
        line, record = fmt.seal(body, seq=self._replay.seq, ts=ts, prev=self._replay.prev, site_id=self.site_id)
        try:
            self._replay.apply(record, line, key=self._public, payload_dir=None)
        except VerificationError as error:
            raise InvalidInputError(f"refusing to append an inconsistent {record.kind} record: {error}") from None
        try:
            written = os.write(self._fd, line + b"\n")
            if written != len(line) + 1:
                raise OSError(f"short write ({written} of {len(line) + 1} bytes)")
            os.fsync(self._fd)
        except OSError as error:
            self._broken = str(error)
            raise
        if not isinstance(record, CheckpointRecord) and self._replay.since_checkpoint >= self.checkpoint_every:
            self.checkpoint()
        return record

    def _store_payload(self, payload: bytes) -> str:
        sha = hashlib.sha256(payload).hexdigest()
        path = self.directory / PAYLOADS_DIR / f"{sha}.bin"
        if path.exists():
            if hashlib.sha256(path.read_bytes()).hexdigest() != sha:
                raise VerificationError(f"{path} exists with other content: the payload store was tampered with")
            return sha
        atomic_write(path, payload)
        return sha

    def intent(
        self,
        payload: bytes,
        *,
        requester: str,
        recipient: str,
        run_id: str,
        round: int,
        purpose: str = "",
        request_sha256: str | None = None,
        models: Sequence[ModelRef] = (),
        dataset: DatasetRef | None = None,
        statistics: Sequence[StatBlock] = (),
        privacy: PrivacyCharge | None = None,
    ) -> PendingIntent:
        """Record that ``payload`` is about to leave; returns once the copy and the record are
        on disk (fsynced). Send the bytes only after this returns."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidInputError(f"the payload must be the exact bytes to send, got {type(payload).__name__}")
        payload = bytes(payload)
        sha = self._store_payload(payload)
        body = Intent(requester=requester, recipient=recipient, run_id=run_id, round=round, purpose=purpose,
                      request_sha256=request_sha256, models=list(models), dataset=dataset,
                      statistics=list(statistics), privacy=privacy,
                      payload=PayloadRef(sha256=sha, bytes=len(payload)))
        record = self._append(body)
        return PendingIntent(seq=record.seq, payload_sha256=sha, payload_bytes=len(payload))

    def outcome(self, pending: PendingIntent, status: Literal["sent", "failed", "unknown"], detail: str = "") -> None:
        self._append(Outcome(intent_seq=pending.seq, status=status, payload_sha256=pending.payload_sha256,
                             detail=detail[:4096]))

    def sent(self, pending: PendingIntent, detail: str = "") -> None:
        """The payload of ``pending`` was delivered."""
        self.outcome(pending, "sent", detail)

    def failed(self, pending: PendingIntent, detail: str) -> None:
        """Sending the payload of ``pending`` failed (it may still have partly left)."""
        self.outcome(pending, "failed", detail)

    @contextlib.contextmanager
    def transmission(self, payload: bytes, **intent_fields: Any) -> Iterator[PendingIntent]:
        """``with log.transmission(data, requester=..., ...) as pending: send(data)``: the intent
        is on disk before the block runs; the outcome is written when it ends."""
        pending = self.intent(payload, **intent_fields)
        try:
            yield pending
        except BaseException as error:
            self.failed(pending, f"{type(error).__name__}: {error}")
            raise
        if self._held is not None:
            self._held.append(pending)  # the transport has not accepted it yet: settle() says
        else:
            self.sent(pending)

    def hold_outcomes(self) -> None:
        """From now until :meth:`settle`, a transmission's outcome is kept back: the caller
        that owns the transport (the site runner) records ``sent`` only once the transport has
        accepted the reply, and ``failed`` if it did not."""
        self._held = []

    def settle(self, *, delivered: bool, detail: str = "") -> int:
        """Write the outcome of every transmission held since :meth:`hold_outcomes`; how many."""
        held, self._held = self._held or [], None
        for pending in held:
            if delivered:
                self.sent(pending, detail)
            else:
                self.failed(pending, detail or "the transport did not accept the reply")
        return len(held)

    def refusal(self, *, requester: str, run_id: str, round: int, reason_code: str, rule: str, message: str,
                purpose: str = "", request_sha256: str | None = None, data_source: str | None = None,
                models: Sequence[ModelRef] = ()) -> None:
        """Record a request the site refused, and which rule refused it."""
        self._append(Refusal(requester=requester, run_id=run_id, round=round, purpose=purpose,
                             request_sha256=request_sha256, reason_code=reason_code, rule=rule,
                             message=message[:4096], data_source=data_source, models=list(models)))

    def abort(self, *, run_id: str, reason_code: str, detail: str = "") -> None:
        """Record that the site stopped taking part in a run."""
        self._append(Abort(run_id=run_id, reason_code=reason_code, detail=detail[:4096]))

    def resolve_dangling(self, detail: str = "the site stopped before the outcome was recorded") -> list[int]:
        """After a crash: close every intent without an outcome as ``unknown``."""
        open_seqs = self.dangling_intents
        for seq in open_seqs:
            sha = self._replay.open_intents[seq]
            self._append(Outcome(intent_seq=seq, status="unknown", payload_sha256=sha, detail=detail))
        return open_seqs

    def checkpoint(self) -> str:
        """Sign the root of every record so far (and the replayed ledger); returns the note."""
        ts = _format_ts(max(datetime.now(timezone.utc), self._replay.last_ts or datetime.min.replace(tzinfo=timezone.utc)))
        ledger = self._replay.ledger_view()
        checkpoint = fmt.Checkpoint(origin=fmt.origin(self.site_id), tree_size=self._replay.seq,
                                    root=self._replay.merkle.root().hex(), timestamp=ts,
                                    ledger_digest=fmt.ledger_digest(ledger))
        hint, signature = fmt.sign(checkpoint, self._key)
        self._append(CheckpointBody(tree_size=checkpoint.tree_size, root=checkpoint.root, ledger=ledger,
                                    key_hint=hint.hex(), signature=base64.b64encode(signature).decode()), ts=ts)
        text = fmt.note(checkpoint, hint, signature)
        atomic_write(self.directory / CHECKPOINTS_DIR / f"{checkpoint.tree_size}.txt", text.encode())
        return text

    def close(self) -> None:
        """Sign a final checkpoint (unless the last record is one) and release the log."""
        if self._closed:
            return
        try:
            for pending in self._held or []:  # replies whose delivery nobody confirmed
                self.outcome(pending, "unknown", "the log closed before the transport confirmed the reply")
            self._held = None
            if self._broken is None and self._replay.since_checkpoint > 0:
                self.checkpoint()
        finally:
            self._closed = True
            os.close(self._fd)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "AuditLog", "AuditVerification", "PendingIntent", "verify", "check_ledger", "count_text", "read_records",
    "latest_checkpoint_export",
    "generate_signing_key", "load_signing_key", "load_public_key", "public_key_pem", "key_fingerprint",
]
