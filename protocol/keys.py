"""Ed25519 keys as both sides hold them: one text form, one fingerprint, one key-file format.

Every key a site pins and every key a coordinator signs with goes through these functions, so
a key written by one command reads the same in every other, and every problem with a key is a
:class:`KeyFileError` (a key file) or a :class:`~fedmte.protocol.errors.VerificationError`
(a key's text), naming the file or the text.

- Public keys travel and are pinned as ``ed25519:<base64 of the 32 raw bytes>``
  (:func:`public_key_text`, :func:`parse_public_key`).
- A key's fingerprint is the hex sha256 of its 32 raw bytes (:func:`fingerprint`); records,
  refusals and ``fedmte site check`` name keys by it.
- Private keys live in unencrypted PKCS#8 PEM files with mode 0600: :func:`write_private_key`
  never overwrites an existing file, :func:`load_private_key` refuses a file that others may
  read. These two are the only file access in ``protocol/``: both the site and the
  coordinator hold keys, and each side may depend on ``protocol/`` only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmte.protocol.errors import InvalidInputError, VerificationError

PUBLIC_KEY_PREFIX = "ed25519:"


class KeyFileError(InvalidInputError):
    """A private-key file that cannot be written or read safely; the message says what to do."""


def public_key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``ed25519:<base64 of the 32 raw bytes>`` (a private key gives its public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return PUBLIC_KEY_PREFIX + base64.b64encode(public.public_bytes_raw()).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Parse ``ed25519:<base64 of 32 bytes>``; raise :class:`VerificationError` otherwise."""
    if not isinstance(text, str) or not text.startswith(PUBLIC_KEY_PREFIX):
        raise VerificationError(f"public key {text!r} must look like 'ed25519:<base64 of 32 bytes>'")
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text[len(PUBLIC_KEY_PREFIX):], validate=True))
    except (binascii.Error, ValueError):
        raise VerificationError(f"public key {text!r} is not base64 of 32 bytes") from None


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Hex sha256 of the raw public key (64 digits): how records and refusals name a key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(public.public_bytes_raw()).hexdigest()


def write_private_key(path: Path | str, key: Ed25519PrivateKey | None = None) -> Ed25519PrivateKey:
    """Write ``key`` (default: a new one) as PKCS#8 PEM, mode 0600; never overwrite a file."""
    path = Path(path)
    key = key if key is not None else Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists; a key file is never overwritten: remove it first, or choose another path") from None
    except OSError as error:
        raise KeyFileError(f"cannot write the key file {path}: {error.strerror}") from None
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    return key


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file that only its owner can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as error:
        raise KeyFileError(f"cannot read the key file {path}: {error.strerror}; check the path in your site or job file") from None
    if mode & 0o077:
        raise KeyFileError(f"{path} is readable by others (mode {oct(mode & 0o777)}); run chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not an unencrypted PEM private key; write one with `fedmte model keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}; fedmte signs with Ed25519 keys only")
    return key


__all__ = ["PUBLIC_KEY_PREFIX", "KeyFileError", "fingerprint", "load_private_key", "parse_public_key",
           "public_key_text", "write_private_key"]
