"""The site audit log: RFC 9162 hashing, the write-ahead rule, and every tamper case failing
``verify`` at the right record (research/PRIVACY.md section 3.5)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedmte.cli import app
from fedmte.client import audit_log
from fedmte.client.audit_log import AuditLog, generate_signing_key, load_signing_key, public_key_pem, verify
from fedmte.protocol import audit_format as fmt
from fedmte.protocol import dp
from fedmte.protocol.audit_format import DatasetRef, ModelRef, PrivacyCharge, StatBlock, dec
from fedmte.protocol.errors import InvalidInputError, VerificationError

SITE = "site-a"
SOURCE = "ward-7"
MU = 0.25
WEIGHTS = hashlib.sha256(b"weights of model one").hexdigest()
VERSION = hashlib.sha256(b"dataset v1").hexdigest()


# --------------------------------------------------------------------------- helpers

class Writer:
    """Writes realistic records (a charge per intent) through the real AuditLog."""

    def __init__(self, directory: Path, key: Ed25519PrivateKey, checkpoint_every: int = 100) -> None:
        self.log = AuditLog.open(directory, site_id=SITE, signing_key=key, checkpoint_every=checkpoint_every)
        self.spent = 0.0
        self.version = 0

    def release(self, index: int, *, send: bool = True) -> audit_log.PendingIntent:
        before = self.spent
        self.spent = dp.compose_sq(before, MU)
        self.version += 1
        charge = PrivacyCharge(
            mechanism="gaussian", clip_norm=dec(1.0), mu_release=dec(MU), mu_sq_before=dec(before),
            mu_sq_after=dec(self.spent), mu_cap=dec(100.0), delta=dec(1e-6),
            epsilon_spent=dec(dp.gdp_epsilon(self.spent ** 0.5, 1e-6)), epsilon_budget=dec(1000.0),
            ledger_version=self.version, ledger_sha256=hashlib.sha256(str(self.version).encode()).hexdigest(),
        )
        payload = f"noisy statistics number {index}".encode() * 3
        pending = self.log.intent(
            payload, requester="coordinator-key-1", recipient="coordinator.example", run_id="run-1", round=index,
            purpose="rank candidate models", models=[ModelRef(arch_id="mlp-small", weights_sha256=WEIGHTS)],
            dataset=DatasetRef(data_source=SOURCE, version_sha256=VERSION),
            statistics=[StatBlock(model_sha256=WEIGHTS, key="class_sums:abc", kind="class_sums", shape=[3, 8],
                                  dtype="float64", sensitivity=dec(1.0), noise_std=dec(4.0))],
            privacy=charge,
        )
        if send:
            self.log.sent(pending)
        return pending


def make_log(directory: Path, key: Ed25519PrivateKey, releases: int, checkpoint_every: int = 100) -> None:
    writer = Writer(directory, key, checkpoint_every)
    for index in range(releases):
        writer.release(index)
    writer.log.close()


def lines(directory: Path) -> list[bytes]:
    return (directory / "log.jsonl").read_bytes().split(b"\n")[:-1]


def write_lines(directory: Path, new: list[bytes]) -> None:
    (directory / "log.jsonl").write_bytes(b"".join(line + b"\n" for line in new))


def record(line: bytes) -> dict:
    return json.loads(line)


def reseal(fields: dict) -> bytes:
    """What an attacker who knows the format (but not the key) can do: recompute a digest."""
    fields["digest"] = fmt.record_digest(fields)
    return fmt.canonical_json(fields)


def rechain(all_lines: list[bytes], start: int) -> list[bytes]:
    """Re-link every record from ``start`` on to its predecessor, fixing digests, as an
    attacker rewriting the tail of a log would."""
    out = list(all_lines[:start])
    prev = fmt.leaf_hash(out[-1]).hex() if out else fmt.GENESIS
    for line in all_lines[start:]:
        fields = record(line)
        fields["prev"] = prev
        sealed = reseal(fields)
        out.append(sealed)
        prev = fmt.leaf_hash(sealed).hex()
    return out


def kinds(directory: Path) -> list[str]:
    return [record(line)["kind"] for line in lines(directory)]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def small_log(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    """6 releases (intent + outcome each) with a checkpoint every 4 records, closed."""
    directory = tmp_path / "audit"
    make_log(directory, key, releases=6, checkpoint_every=4)
    return directory


def assert_bad(directory: Path, key: Ed25519PrivateKey, seq: int, reason: str) -> None:
    result = verify(directory, key.public_key())
    assert not result.ok, result.summary()
    assert result.first_bad_seq == seq, result.summary()
    assert reason in (result.reason or ""), result.summary()


# --------------------------------------------------------------------------- hashing

# RFC 6962 / RFC 9162 reference tree: the 8 leaves and the roots of each prefix, as published
# with the Certificate Transparency reference implementation's merkle tree tests (also in
# transparency-dev/merkle's test data). Root 0 is SHA-256 of the empty string.
CT_LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_merkle_roots_match_the_rfc_6962_reference_tree() -> None:
    leaves = [fmt.leaf_hash(bytes.fromhex(text)) for text in CT_LEAVES]
    for size, expected in enumerate(CT_ROOTS):
        assert fmt.merkle_root(leaves[:size]).hex() == expected
        accumulator = fmt.MerkleAccumulator()
        for leaf in leaves[:size]:
            accumulator.append(leaf)
        assert accumulator.root().hex() == expected


def _level_by_level_root(leaves: list[bytes]) -> bytes:
    """An independent formulation: hash pairs level by level, promoting an unpaired last node."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = list(leaves)
    while len(level) > 1:
        paired = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def test_incremental_root_equals_an_independent_tree_at_every_size() -> None:
    leaves = [hashlib.sha256(b"\x00" + i.to_bytes(2, "big")).digest() for i in range(70)]
    accumulator = fmt.MerkleAccumulator()
    for size in range(71):
        assert accumulator.root() == _level_by_level_root(leaves[:size]) == fmt.merkle_root(leaves[:size])
        if size < 70:
            accumulator.append(leaves[size])


def test_canonical_json_is_sorted_compact_utf8_and_has_no_floats() -> None:
    assert fmt.canonical_json({"b": 1, "a": ["é", None, True]}) == '{"a":["é",null,true],"b":1}'.encode()
    with pytest.raises(InvalidInputError, match="float"):
        fmt.canonical_json({"mu": 0.25})
    assert dec(0.1) == "0.1" and float(dec(1 / 3)) == 1 / 3
    with pytest.raises(InvalidInputError, match="finite"):
        dec(float("inf"))


# --------------------------------------------------------------------------- writing

def test_a_closed_log_verifies_and_names_what_it_holds(small_log: Path, key: Ed25519PrivateKey) -> None:
    result = verify(small_log, key.public_key())
    assert result.ok, result.summary()
    assert result.site_id == SITE
    assert result.records == len(lines(small_log))
    assert result.checkpoints == kinds(small_log).count("checkpoint") >= 3
    assert kinds(small_log)[-1] == "checkpoint"  # close() signs the tail
    assert result.dangling_intents == []
    assert result.ledger == {SOURCE: dec(_spent(6))}
    first = record(lines(small_log)[0])
    assert first["prev"] == fmt.GENESIS and first["seq"] == 0
    assert (small_log / "keys" / "audit.pub").read_bytes() == public_key_pem(key.public_key())


def _spent(releases: int) -> float:
    spent = 0.0
    for _ in range(releases):
        spent = dp.compose_sq(spent, MU)
    return spent


def test_every_payload_is_kept_byte_for_byte_under_its_hash(small_log: Path) -> None:
    for line in lines(small_log):
        fields = record(line)
        if fields["kind"] == "intent":
            data = (small_log / "payloads" / f"{fields['payload']['sha256']}.bin").read_bytes()
            assert hashlib.sha256(data).hexdigest() == fields["payload"]["sha256"]
            assert data == f"noisy statistics number {fields['round']}".encode() * 3


def test_the_intent_is_on_disk_and_fsynced_before_the_send(tmp_path: Path, key: Ed25519PrivateKey,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(audit_log.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    payload = b"the exact bytes that leave"
    seen_by_sender: dict[str, object] = {}
    with AuditLog.open(tmp_path / "audit", site_id=SITE, signing_key=key) as log:
        def send(data: bytes) -> None:
            on_disk = lines(tmp_path / "audit")
            seen_by_sender["last"] = record(on_disk[-1])
            seen_by_sender["copy"] = (tmp_path / "audit" / "payloads" /
                                      f"{hashlib.sha256(data).hexdigest()}.bin").read_bytes()
            seen_by_sender["fsyncs"] = len(synced)

        before = len(synced)
        with log.transmission(payload, requester="c", recipient="server", run_id="r", round=0):
            send(payload)
    assert seen_by_sender["last"]["kind"] == "intent"
    assert seen_by_sender["last"]["payload"]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert seen_by_sender["copy"] == payload
    assert seen_by_sender["fsyncs"] >= before + 2  # the payload copy and the intent line
    assert kinds(tmp_path / "audit")[:2] == ["intent", "outcome"]
    assert record(lines(tmp_path / "audit")[1])["status"] == "sent"


def test_a_failed_send_is_recorded_as_failed_and_reraised(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with AuditLog.open(tmp_path / "audit", site_id=SITE, signing_key=key) as log:
        with pytest.raises(ConnectionError, match="link down"):
            with log.transmission(b"bytes", requester="c", recipient="server", run_id="r", round=0):
                raise ConnectionError("link down")
    outcome = record(lines(tmp_path / "audit")[1])
    assert outcome["status"] == "failed" and "link down" in outcome["detail"]
    assert verify(tmp_path / "audit", key.public_key()).ok


def test_an_intent_without_outcome_is_reported_not_failed(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    directory = tmp_path / "audit"
    writer = Writer(directory, key)
    writer.release(0)
    dangling = writer.release(1, send=False)
    writer.release(2)
    writer.log.close()
    result = verify(directory, key.public_key())
    assert result.ok and result.dangling_intents == [dangling.seq]
    assert "no outcome" in result.summary()
    with AuditLog.open(directory, site_id=SITE, signing_key=key) as log:
        assert log.dangling_intents == [dangling.seq]
        assert log.resolve_dangling() == [dangling.seq]
    result = verify(directory, key.public_key())
    assert result.ok and result.dangling_intents == []


def test_the_writer_refuses_records_that_contradict_the_log(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with AuditLog.open(tmp_path / "audit", site_id=SITE, signing_key=key) as log:
        pending = log.intent(b"x", requester="c", recipient="s", run_id="r", round=0)
        log.sent(pending)
        with pytest.raises(InvalidInputError, match="not an intent awaiting"):
            log.sent(pending)
        wrong = PrivacyCharge(mechanism="gaussian", mu_release=dec(MU), mu_sq_before=dec(0.5),
                              mu_sq_after=dec(dp.compose_sq(0.5, MU)), ledger_version=1)
        with pytest.raises(InvalidInputError, match="ledger values"):
            log.intent(b"y", requester="c", recipient="s", run_id="r", round=1,
                       dataset=DatasetRef(data_source=SOURCE, version_sha256=VERSION), privacy=wrong)


def test_reopening_continues_the_chain(small_log: Path, key: Ed25519PrivateKey) -> None:
    writer = Writer.__new__(Writer)
    writer.log = AuditLog.open(small_log, site_id=SITE, signing_key=key, checkpoint_every=4)
    writer.spent, writer.version = writer.log.spent_mu_sq(SOURCE), writer.log.ledger_head.version
    assert writer.spent == _spent(6)
    writer.release(6)
    writer.log.close()
    result = verify(small_log, key.public_key())
    assert result.ok and result.ledger == {SOURCE: dec(_spent(7))}


def test_one_writer_at_a_time_and_one_key_per_log(small_log: Path, key: Ed25519PrivateKey) -> None:
    with AuditLog.open(small_log, site_id=SITE, signing_key=key):
        with pytest.raises(InvalidInputError, match="another process"):
            AuditLog.open(small_log, site_id=SITE, signing_key=key)
    with pytest.raises(VerificationError, match="another key"):
        AuditLog.open(small_log, site_id=SITE, signing_key=Ed25519PrivateKey.generate())
    with pytest.raises(InvalidInputError, match="not 'site-b'"):
        AuditLog.open(small_log, site_id="site-b", signing_key=key)


def test_a_tampered_log_is_not_appended_to(small_log: Path, key: Ed25519PrivateKey) -> None:
    all_lines = lines(small_log)
    write_lines(small_log, all_lines[:2] + all_lines[3:])
    with pytest.raises(VerificationError, match="does not verify at record 2"):
        AuditLog.open(small_log, site_id=SITE, signing_key=key)


def test_signing_keys_are_private_files(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "site.pem"
    key = generate_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_key_pem(load_signing_key(path).public_key()) == public_key_pem(key.public_key())
    path.chmod(0o644)
    with pytest.raises(InvalidInputError, match="chmod 600"):
        load_signing_key(path)


def test_a_flipped_byte_anywhere_in_a_record_names_that_record(small_log: Path, key: Ed25519PrivateKey) -> None:
    original = lines(small_log)
    target = 4  # an intent in the middle
    line = original[target]
    positions = sorted({0, len(line) - 1, len(line), *range(1, len(line), 11)})
    for position in positions:
        data = bytearray(b"".join(x + b"\n" for x in original))
        offset = sum(len(x) + 1 for x in original[:target]) + position
        data[offset] ^= 0x01
        (small_log / "log.jsonl").write_bytes(bytes(data))
        result = verify(small_log, key.public_key())
        assert not result.ok and result.first_bad_seq == target, (position, result.summary())


def test_a_deleted_record_is_named(small_log: Path, key: Ed25519PrivateKey) -> None:
    original = lines(small_log)
    write_lines(small_log, original[:3] + original[4:])
    assert_bad(small_log, key, 3, "expected record 3")


def test_a_deleted_record_with_everything_after_renumbered_breaks_the_next_checkpoint(
        small_log: Path, key: Ed25519PrivateKey) -> None:
    original = lines(small_log)
    assert kinds(small_log)[3:5] == ["outcome", "checkpoint"]
    out: list[bytes] = []
    for index, line in enumerate(original[:3] + original[4:]):  # drop record 3, renumber, re-chain
        fields = record(line)
        fields["seq"] = index
        if fields["kind"] == "checkpoint":
            fields["tree_size"] = index
        fields["prev"] = fmt.leaf_hash(out[-1]).hex() if out else fmt.GENESIS
        out.append(reseal(fields))
    write_lines(small_log, out)
    assert_bad(small_log, key, 3, "differs from the recomputed")


def test_reordered_records_are_named(small_log: Path, key: Ed25519PrivateKey) -> None:
    original = lines(small_log)
    swapped = original[:5] + [original[6], original[5]] + original[7:]
    write_lines(small_log, swapped)
    assert_bad(small_log, key, 5, "expected record 5")


def test_a_cut_off_last_record_is_named(small_log: Path, key: Ed25519PrivateKey) -> None:
    data = (small_log / "log.jsonl").read_bytes()
    (small_log / "log.jsonl").write_bytes(data[:-40])
    assert_bad(small_log, key, len(lines(small_log)), "truncated")


def test_dropped_tail_records_are_caught_by_the_signed_checkpoint_file(small_log: Path,
                                                                      key: Ed25519PrivateKey) -> None:
    original = lines(small_log)
    write_lines(small_log, original[:-3])
    assert_bad(small_log, key, len(original) - 3, "truncated")


def test_a_witness_copy_catches_truncation_even_when_checkpoint_files_go_too(small_log: Path, tmp_path: Path,
                                                                              key: Ed25519PrivateKey) -> None:
    exported = tmp_path / "witness.json"
    exported.write_text(json.dumps(audit_log.latest_checkpoint_export(small_log)))
    original = lines(small_log)
    keep = 8
    write_lines(small_log, original[:keep])
    for note in (small_log / "checkpoints").glob("*.txt"):
        if int(note.stem) > keep:
            note.unlink()
    assert verify(small_log, key.public_key()).ok  # locally consistent...
    result = verify(small_log, key.public_key(), witnesses=[exported])  # ...but not to the witness
    assert not result.ok and result.first_bad_seq == keep and "truncated" in (result.reason or "")


def test_a_swapped_payload_file_names_its_intent(small_log: Path, key: Ed25519PrivateKey) -> None:
    intents = [record(line) for line in lines(small_log) if record(line)["kind"] == "intent"]
    first, second = intents[1], intents[3]
    a = small_log / "payloads" / f"{first['payload']['sha256']}.bin"
    b = small_log / "payloads" / f"{second['payload']['sha256']}.bin"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    assert_bad(small_log, key, first["seq"], "payload copy")


def test_a_missing_payload_file_names_its_intent(small_log: Path, key: Ed25519PrivateKey) -> None:
    intent = [record(line) for line in lines(small_log) if record(line)["kind"] == "intent"][2]
    (small_log / "payloads" / f"{intent['payload']['sha256']}.bin").unlink()
    assert_bad(small_log, key, intent["seq"], "missing")


def test_a_checkpoint_signed_by_another_key_is_named(small_log: Path, key: Ed25519PrivateKey) -> None:
    original = lines(small_log)
    position = kinds(small_log).index("checkpoint")
    fields = record(original[position])
    forger = Ed25519PrivateKey.generate()
    checkpoint = fmt.Checkpoint(origin=fmt.origin(SITE), tree_size=fields["tree_size"], root=fields["root"],
                                timestamp=fields["ts"], ledger_digest=fmt.ledger_digest(fields["ledger"]))
    hint, signature = fmt.sign(checkpoint, forger)
    fields["key_hint"], fields["signature"] = hint.hex(), base64.b64encode(signature).decode()
    tampered = original[:position] + [reseal(fields)] + original[position + 1:]
    write_lines(small_log, rechain(tampered, position + 1))
    assert_bad(small_log, key, position, "different key")


def test_a_forged_checkpoint_file_is_named(small_log: Path, key: Ed25519PrivateKey) -> None:
    path = sorted((small_log / "checkpoints").glob("*.txt"), key=lambda p: int(p.stem))[0]
    checkpoint, _ = fmt.parse_note(path.read_text())
    hint, signature = fmt.sign(checkpoint, Ed25519PrivateKey.generate())
    path.write_text(fmt.note(checkpoint, hint, signature))
    result = verify(small_log, key.public_key())
    assert not result.ok and path.name in (result.reason or "") and "no signature by the trusted key" in result.reason


def test_a_log_re_signed_with_a_swapped_public_key_fails_only_against_the_pinned_key(
        small_log: Path, key: Ed25519PrivateKey) -> None:
    forger = Ed25519PrivateKey.generate()
    original = lines(small_log)
    out: list[bytes] = []
    tree = fmt.MerkleAccumulator()
    for line in original:
        fields = record(line)
        if fields["kind"] == "checkpoint":  # re-sign over the re-signed history
            fields["root"] = tree.root().hex()
            checkpoint = fmt.Checkpoint(origin=fmt.origin(SITE), tree_size=fields["tree_size"], root=fields["root"],
                                        timestamp=fields["ts"], ledger_digest=fmt.ledger_digest(fields["ledger"]))
            hint, signature = fmt.sign(checkpoint, forger)
            fields["key_hint"], fields["signature"] = hint.hex(), base64.b64encode(signature).decode()
            (small_log / "checkpoints" / f"{fields['tree_size']}.txt").write_text(fmt.note(checkpoint, hint, signature))
        fields["prev"] = fmt.leaf_hash(out[-1]).hex() if out else fmt.GENESIS
        out.append(reseal(fields))
        tree.append(fmt.leaf_hash(out[-1]))
    write_lines(small_log, out)
    (small_log / "keys" / "audit.pub").write_bytes(public_key_pem(forger.public_key()))
    unpinned = verify(small_log)  # consistent, but nothing vouches for the key: UNVERIFIED, never "intact"
    assert unpinned.ok and not unpinned.pinned and not unpinned.verified and unpinned.status == "UNVERIFIED"
    assert "not pinned" in unpinned.key_source and unpinned.summary().startswith("UNVERIFIED")
    assert_bad(small_log, key, kinds(small_log).index("checkpoint"), "different key")
    by_fingerprint = verify(small_log, key_sha256=audit_log.key_fingerprint(key.public_key()))
    assert by_fingerprint.status == "TAMPERED" and "was replaced" in (by_fingerprint.reason or "")


def test_a_pin_is_a_key_a_fingerprint_or_a_witness(small_log: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    fingerprint = audit_log.key_fingerprint(key.public_key())
    assert verify(small_log, key.public_key()).verified
    pinned = verify(small_log, key_sha256=fingerprint.upper())
    assert pinned.verified and pinned.status == "intact" and fingerprint[:16] in pinned.key_source
    assert pinned.key_fingerprint == fingerprint
    note = sorted((small_log / "checkpoints").glob("*.txt"), key=lambda p: int(p.stem))[-1]
    witness = tmp_path / "witness.txt"
    witness.write_text(note.read_text())
    witnessed = verify(small_log, witnesses=[witness])
    assert witnessed.verified and "witness" in witnessed.key_source
    other = audit_log.key_fingerprint(Ed25519PrivateKey.generate().public_key())
    wrong = verify(small_log, key_sha256=other)
    assert wrong.status == "TAMPERED" and "not the pinned" in (wrong.reason or "")
    disagree = verify(small_log, key.public_key(), key_sha256=other)
    assert disagree.status == "TAMPERED" and "disagree" in (disagree.reason or "")
    (small_log / "keys" / "audit.pub").unlink()
    gone = verify(small_log, key_sha256=fingerprint)
    assert gone.status == "TAMPERED" and "missing" in (gone.reason or "")
    keyless = verify(small_log)  # no key at all: no signature can be checked
    assert not keyless.verified and "no trusted public key" in (keyless.reason or "")


def test_every_count_of_a_log_is_the_one_number(small_log: Path, key: Ed25519PrivateKey) -> None:
    result = verify(small_log, key.public_key())
    total = len(lines(small_log))
    assert result.records == total == sum(result.counts.values())
    assert result.counts == {"intent": 6, "outcome": 6, "checkpoint": result.checkpoints}
    assert result.count_text() == f"{total} records (6 intents, 6 outcomes, {result.checkpoints} signed checkpoints)"
    assert result.count_text() in result.summary()
    assert audit_log.latest_checkpoint_export(small_log)["records"] == total


def test_an_edited_ledger_value_is_named(small_log: Path, key: Ed25519PrivateKey) -> None:
    original = lines(small_log)
    target = 7
    fields = record(original[target])
    assert fields["kind"] == "intent"
    fields["privacy"]["mu_sq_after"] = dec(float(fields["privacy"]["mu_sq_after"]) / 2)
    # without fixing the digest: the record itself no longer matches
    write_lines(small_log, original[:target] + [fmt.canonical_json(fields)] + original[target + 1:])
    assert_bad(small_log, key, target, "digest")
    # with digest and chain fixed: the replayed ledger disagrees
    write_lines(small_log, rechain(original[:target] + [reseal(fields)] + original[target + 1:], target + 1))
    assert_bad(small_log, key, target, "ledger values were edited")


def test_hiding_spend_consistently_is_still_caught(small_log: Path, key: Ed25519PrivateKey) -> None:
    original = lines(small_log)
    target = 7
    fields = record(original[target])
    assert fields["kind"] == "intent"
    fields["privacy"]["mu_sq_before"] = dec(0.0)
    fields["privacy"]["mu_sq_after"] = dec(dp.compose_sq(0.0, MU))
    write_lines(small_log, rechain(original[:target] + [reseal(fields)] + original[target + 1:], target))
    assert_bad(small_log, key, target, "ledger values were edited")


def test_an_edited_checkpoint_ledger_is_named(small_log: Path, key: Ed25519PrivateKey) -> None:
    original = lines(small_log)
    position = kinds(small_log).index("checkpoint", 5)
    fields = record(original[position])
    fields["ledger"] = {SOURCE: dec(0.0)}
    write_lines(small_log, rechain(original[:position] + [reseal(fields)] + original[position + 1:], position + 1))
    assert_bad(small_log, key, position, "ledger")


@pytest.mark.parametrize("encode", [
    lambda f: json.dumps(f, sort_keys=True).encode(),  # spaces after separators
    lambda f: json.dumps(dict(reversed(sorted(f.items()))), separators=(",", ":")).encode(),  # key order
    lambda f: json.dumps(f, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode().replace(
        b'"run-1"', b'"run\\u002d1"'),  # an escaped character
], ids=["whitespace", "key-order", "escape"])
def test_a_non_canonical_line_is_named(small_log: Path, key: Ed25519PrivateKey, encode) -> None:
    original = lines(small_log)
    target = 2
    fields = record(original[target])
    line = encode(fields)
    assert json.loads(line) == fields and line != original[target]
    write_lines(small_log, rechain(original[:target] + [line] + original[target + 1:], target + 1))
    assert_bad(small_log, key, target, "canonical")


def test_a_float_or_nan_in_a_line_is_named(small_log: Path, key: Ed25519PrivateKey) -> None:
    original = lines(small_log)
    for bad in (b'"seq":2.0', b'"seq":NaN'):
        write_lines(small_log, original[:2] + [original[2].replace(b'"seq":2', bad)] + original[3:])
        assert_bad(small_log, key, 2, "float" if b"." in bad else "NaN")


# --------------------------------------------------------------------------- scale

def test_1000_records_with_10_checkpoints_verify_in_well_under_a_second(
        tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "audit"
    with monkeypatch.context() as patch:  # building the fixture needs no durability; verify is timed
        patch.setattr(audit_log.os, "fsync", lambda fd: None)
        make_log(directory, key, releases=495, checkpoint_every=99)  # 990 records + 10 checkpoints
    assert len(lines(directory)) == 1000
    start = time.perf_counter()
    result = verify(directory, key.public_key())
    elapsed = time.perf_counter() - start
    assert result.ok and result.records == 1000 and result.checkpoints == 10, result.summary()
    assert elapsed < 1.0, f"verify took {elapsed:.3f} s"


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_verify_exit_codes(small_log: Path, tmp_path: Path, key: Ed25519PrivateKey) -> None:
    pinned = tmp_path / "site.pub"
    pinned.write_bytes(public_key_pem(key.public_key()))
    missing = runner.invoke(app, ["audit", "verify", str(tmp_path / "nowhere"), "--key", str(pinned)])
    assert missing.exit_code == 2 and "holds no audit log" in missing.output
    nothing = runner.invoke(app, ["audit", "verify"])
    assert nothing.exit_code == 2 and "--site" in nothing.output
    ok = runner.invoke(app, ["audit", "verify", str(small_log), "--key", str(pinned)])
    assert ok.exit_code == 0, ok.output
    assert "intact" in ok.output and f"{len(lines(small_log))} records" in ok.output
    by_sha = runner.invoke(app, ["audit", "verify", str(small_log), "--key-sha256",
                                 audit_log.key_fingerprint(key.public_key())])
    assert by_sha.exit_code == 0 and "intact" in by_sha.output, by_sha.output
    unpinned = runner.invoke(app, ["audit", "verify", str(small_log)])
    assert unpinned.exit_code == 3 and "UNVERIFIED" in unpinned.output and "intact" not in unpinned.output
    assert "[audit] verification_key_sha256" in unpinned.output  # Rich markup does not eat the table name
    as_json = json.loads(runner.invoke(app, ["audit", "verify", str(small_log), "--json"]).stdout)
    assert as_json["status"] == "UNVERIFIED" and as_json["verified"] is False and as_json["ok"] is True
    other = tmp_path / "other.pub"
    other.write_bytes(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    wrong_key = runner.invoke(app, ["audit", "verify", str(small_log), "--key", str(other)])
    assert wrong_key.exit_code == 1 and "record 4" in wrong_key.output  # the first checkpoint
    original = lines(small_log)
    write_lines(small_log, original[:3] + original[4:])
    bad = runner.invoke(app, ["audit", "verify", str(small_log), "--json"])
    assert bad.exit_code == 1
    data = json.loads(bad.stdout)
    assert data["ok"] is False and data["first_bad_seq"] == 3


def test_cli_show_lists_what_left(small_log: Path, key: Ed25519PrivateKey) -> None:
    fingerprint = audit_log.key_fingerprint(key.public_key())
    result = runner.invoke(app, ["audit", "show", str(small_log), "--key-sha256", fingerprint],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for text in ("coordinator.example", "mlp-small", "class_sums 3x8", "sent", SOURCE, "intact"):
        assert text in result.output
    total = len(lines(small_log))
    assert result.output.count(f"{total} records") == 2  # the table's title and the verdict: one count
    unpinned = runner.invoke(app, ["audit", "show", str(small_log)], env={"COLUMNS": "250"})
    assert unpinned.exit_code == 0 and "UNVERIFIED" in unpinned.output and "intact" not in unpinned.output


def test_cli_export_gives_a_checkpoint_the_site_key_signed(small_log: Path, key: Ed25519PrivateKey,
                                                           tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", "export", str(small_log)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    checkpoint = fmt.verify_note(data["note"], key.public_key())
    assert checkpoint.tree_size == data["tree_size"] == len(lines(small_log)) - 1
    assert data["ledger"] == {SOURCE: dec(_spent(6))}
    with pytest.raises(VerificationError, match="no signature by the trusted key"):
        fmt.verify_note(data["note"], Ed25519PrivateKey.generate().public_key())
    shutil.copy(small_log / "log.jsonl", tmp_path / "backup.jsonl")
    original = lines(small_log)
    write_lines(small_log, original[:2] + original[3:])
    refused = runner.invoke(app, ["audit", "export", str(small_log)])
    assert refused.exit_code == 1 and "record 2" in refused.output
