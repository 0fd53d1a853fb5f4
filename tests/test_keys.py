"""``fedmte.protocol.keys``: the one text form, fingerprint and key-file format of every key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedmte.client.audit_log import load_signing_key
from fedmte.client.packages import load_signing_key as load_package_key
from fedmte.protocol.errors import VerificationError as KeyTextError
from fedmte.protocol.keys import (
    KeyFileError,
    fingerprint,
    load_private_key,
    parse_public_key,
    public_key_text,
    write_private_key,
)


def test_every_key_goes_through_one_text_form_fingerprint_and_file_format(tmp_path: Path) -> None:
    """What the audit log, the package signer, the site file and the coordinator all use
    (0600 PEM, never overwritten; ``ed25519:`` text; sha256 fingerprint)."""
    path = tmp_path / "keys" / "coordinator.pem"
    key = write_private_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_key_text(load_private_key(path)) == public_key_text(key) == public_key_text(key.public_key())
    assert public_key_text(load_signing_key(path)) == public_key_text(key)  # the audit log reads the same file
    assert public_key_text(load_package_key(path)) == public_key_text(key)  # and so does the package signer
    with pytest.raises(KeyFileError, match="never overwritten"):
        write_private_key(path)
    assert public_key_text(load_private_key(path)) == public_key_text(key)  # untouched
    text = public_key_text(key)
    assert text.startswith("ed25519:") and public_key_text(parse_public_key(text)) == text
    assert fingerprint(key) == fingerprint(parse_public_key(text)) == hashlib.sha256(key.public_key().public_bytes_raw()).hexdigest()
    for bad in ("rsa:abc", "ed25519:AAAA", "ed25519:not base64!"):
        with pytest.raises(KeyTextError):
            parse_public_key(bad)
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(path)
    with pytest.raises(KeyFileError, match="cannot read the key file"):
        load_private_key(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    (tmp_path / "junk.pem").chmod(0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_private_key(tmp_path / "junk.pem")


# --------------------------------------------------------------------------- tamper cases
