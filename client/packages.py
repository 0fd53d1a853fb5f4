"""Signed candidate-model packages: write them (coordinator), verify them (site).

A package is a directory holding exactly three files:

``manifest.json``
    The canonical JSON of a :class:`~fedmte.protocol.manifest.ModelManifest` (sorted keys,
    no whitespace, UTF-8), including the weights' sha256 and size.
``weights.safetensors``
    The weights, as safetensors and nothing else.
``signature.json``
    ``{"schema": "fedmte.package_signature.v1", "algorithm": "ed25519", "key_id": ...,
    "signature": base64}``: an Ed25519 signature over ``SIGNING_DOMAIN``, a newline, the
    manifest's length as 8 big-endian bytes, then the manifest bytes. The domain and the
    length prefix make the signed message unambiguous (as DSSE's PAE does), so a signature
    made for anything else can never pass for a package signature.

A site verifies in this order and stops at the first failure, with a typed error: the
layout; the signature, against the keys pinned in its own site file only (never a key the
package names); the manifest, parsed from the verified bytes and required to be canonical;
the weights' size and sha256 against the signed manifest; then the weights themselves
through the strict safetensors reader (:mod:`fedmte.client.weights`). Nothing is unpickled
or executed at any step. A package directory travels as files; the same three parts can
travel as bytes in a message (:func:`verify_package_bytes`).

Public keys are written ``ed25519:<base64 of the 32 raw bytes>``; a key's id is the first
16 hex digits of the sha256 of its raw bytes. Signing keys are PKCS#8 PEM files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmte.client.errors import (
    PackageError,
    SignatureError,
    UnsignedPackageError,
    UntrustedKeyError,
    WeightsHashMismatchError,
)
from fedmte.client.weights import WeightLimits, parse_safetensors, read_bounded
from fedmte.protocol import keys
from fedmte.protocol.errors import VerificationError
from fedmte.protocol.keys import load_private_key, public_key_text, write_private_key
from fedmte.protocol.manifest import ModelManifest, strict_json_loads

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
SIGNATURE_FILE = "signature.json"
PACKAGE_FILES = frozenset({MANIFEST_FILE, WEIGHTS_FILE, SIGNATURE_FILE})
SIGNATURE_SCHEMA = "fedmte.package_signature.v1"
SIGNING_DOMAIN = b"fedmte.model_package.v1"
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 16 * 1024
KEY_ID_HEX = 16


class PackageSignature(BaseModel):
    """The contents of ``signature.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: Literal["fedmte.package_signature.v1"] = Field(default=SIGNATURE_SCHEMA, alias="schema")
    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    signature: str = Field(min_length=1, max_length=256)


@dataclass(frozen=True)
class VerifiedPackage:
    """A package that passed every check; ``tensors`` are views into the weights bytes."""

    manifest: ModelManifest
    manifest_bytes: bytes
    key_id: str
    tensors: dict[str, torch.Tensor]

    @property
    def package_id(self) -> str:
        """sha256 of the signed manifest bytes: the model's identity at the site."""
        return hashlib.sha256(self.manifest_bytes).hexdigest()


# --------------------------------------------------------------------------- keys

def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_string(public_key: Ed25519PublicKey) -> str:
    """``ed25519:<base64>``, the form a site lists in ``[trust.coordinators]``."""
    return public_key_text(public_key)


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Parse ``ed25519:<base64 of 32 bytes>`` (:func:`fedmte.protocol.keys.parse_public_key`)."""
    try:
        return keys.parse_public_key(text)
    except VerificationError as error:
        raise SignatureError(str(error)) from None


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256(raw public key)."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:KEY_ID_HEX]


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_signing_key(key: Ed25519PrivateKey, path: Path | str) -> None:
    """Write a PKCS#8 PEM file readable by its owner only; refuses to overwrite."""
    write_private_key(path, key)


def load_signing_key(path: Path | str) -> Ed25519PrivateKey:
    """Read the coordinator's PKCS#8 PEM Ed25519 private key."""
    return load_private_key(path)


def _pinned(keys: Iterable[Ed25519PublicKey | str]) -> dict[str, Ed25519PublicKey]:
    parsed = [parse_public_key(k) if isinstance(k, str) else k for k in keys]
    return {key_id(k): k for k in parsed}


# --------------------------------------------------------------------------- signing

def signing_message(manifest_bytes: bytes) -> bytes:
    """DOMAIN, newline, 8-byte big-endian length, manifest bytes: what the key signs."""
    return SIGNING_DOMAIN + b"\n" + len(manifest_bytes).to_bytes(8, "big") + manifest_bytes


def sign_manifest(manifest: ModelManifest, key: Ed25519PrivateKey) -> PackageSignature:
    signature = key.sign(signing_message(manifest.canonical_bytes()))
    return PackageSignature(key_id=key_id(key.public_key()), signature=base64.b64encode(signature).decode("ascii"))


def write_package(
    directory: Path | str,
    manifest: ModelManifest,
    weights: bytes | Path,
    key: Ed25519PrivateKey | None,
) -> Path:
    """Write a package directory as given, without checking that the weights fit.

    ``manifest`` is written and signed as is (``key=None`` writes no signature). Use
    :func:`fedmte.client.architectures.pack_model` to build a package that is known to load.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise PackageError(f"{directory} exists and is not empty; choose a new package directory")
    directory.mkdir(parents=True, exist_ok=True)
    data = weights.read_bytes() if isinstance(weights, Path) else weights
    (directory / WEIGHTS_FILE).write_bytes(data)
    (directory / MANIFEST_FILE).write_bytes(manifest.canonical_bytes())
    if key is not None:
        signature = sign_manifest(manifest, key)
        (directory / SIGNATURE_FILE).write_text(signature.model_dump_json(by_alias=True))
    return directory


# --------------------------------------------------------------------------- verification

def _check_layout(directory: Path) -> None:
    if directory.is_symlink() or not directory.is_dir():
        raise PackageError(f"{directory} is not a package directory (manifest.json, weights.safetensors, signature.json)")
    present = {entry.name for entry in directory.iterdir()}
    extra = sorted(present - PACKAGE_FILES)
    if extra:
        raise PackageError(f"package {directory} holds unexpected files {extra}; a package holds only {sorted(PACKAGE_FILES)}")
    if SIGNATURE_FILE not in present:
        raise UnsignedPackageError(
            f"package {directory} has no {SIGNATURE_FILE}; the site runs only packages signed by a pinned key"
        )
    for name in (MANIFEST_FILE, WEIGHTS_FILE):
        if name not in present:
            raise PackageError(f"package {directory} has no {name}")


def verify_signature(
    manifest_bytes: bytes, signature_bytes: bytes | None, trusted_keys: Iterable[Ed25519PublicKey | str]
) -> str:
    """Verify ``signature_bytes`` (signature.json) over ``manifest_bytes``; return the key id.

    Only ``trusted_keys`` (the site file's pins) are considered; the key id in the
    signature is used only to pick among them.
    """
    if signature_bytes is None:
        raise UnsignedPackageError("the package is not signed; the site runs only packages signed by a pinned key")
    pinned = _pinned(trusted_keys)
    try:
        signature = PackageSignature.model_validate(strict_json_loads(signature_bytes))
        raw_signature = base64.b64decode(signature.signature, validate=True)
    except (ValueError, ValidationError, binascii.Error) as error:
        raise SignatureError(f"signature.json is malformed: {str(error).splitlines()[0]}") from None
    if not pinned:
        raise UntrustedKeyError(
            "the site trusts no coordinator key; add the coordinator's public key to [trust.coordinators] in site.toml"
        )
    public_key = pinned.get(signature.key_id)
    if public_key is None:
        raise UntrustedKeyError(
            f"the package is signed by key {signature.key_id}, which the site does not pin "
            f"(pinned: {', '.join(sorted(pinned))}); ask the coordinator which key it uses"
        )
    try:
        public_key.verify(raw_signature, signing_message(manifest_bytes))
    except InvalidSignature:
        raise SignatureError(
            f"the package's signature does not verify under pinned key {signature.key_id}: the manifest was "
            "altered after signing, or the signature belongs to another package"
        ) from None
    return signature.key_id


def parse_manifest(manifest_bytes: bytes) -> ModelManifest:
    """Parse verified manifest bytes; they must be exactly the canonical encoding."""
    try:
        manifest = ModelManifest.model_validate(strict_json_loads(manifest_bytes))
    except (ValueError, ValidationError) as error:
        raise PackageError(f"manifest.json is not a valid model manifest: {error}") from None
    if manifest.canonical_bytes() != manifest_bytes:
        raise PackageError("manifest.json is not in canonical form (sorted keys, no whitespace, all fields)")
    return manifest


def _check_weights(manifest: ModelManifest, weights: bytearray, limits: WeightLimits) -> dict[str, torch.Tensor]:
    if len(weights) != manifest.weights_bytes:
        raise WeightsHashMismatchError(
            f"the weights have {len(weights):,} bytes but the signed manifest says {manifest.weights_bytes:,}: "
            "they were replaced or truncated"
        )
    digest = hashlib.sha256(weights).hexdigest()
    if not hmac.compare_digest(digest, manifest.weights_sha256):
        raise WeightsHashMismatchError(
            f"the weights hash to {digest} but the signed manifest says {manifest.weights_sha256}: "
            "they were altered after signing"
        )
    return parse_safetensors(weights, limits, WEIGHTS_FILE)


def verify_package_bytes(
    manifest_bytes: bytes,
    weights: bytearray,
    signature_bytes: bytes | None,
    trusted_keys: Iterable[Ed25519PublicKey | str],
    limits: WeightLimits | None = None,
) -> VerifiedPackage:
    """Verify a package given as bytes (signature, manifest, weights hash, then weights)."""
    signer = verify_signature(manifest_bytes, signature_bytes, trusted_keys)
    manifest = parse_manifest(manifest_bytes)
    tensors = _check_weights(manifest, weights, limits or WeightLimits())
    return VerifiedPackage(manifest=manifest, manifest_bytes=manifest_bytes, key_id=signer, tensors=tensors)


def verify_package(
    directory: Path | str,
    trusted_keys: Iterable[Ed25519PublicKey | str],
    limits: WeightLimits | None = None,
) -> VerifiedPackage:
    """Verify a package directory against the site's pinned keys and limits.

    The weights file's size is compared with the signed manifest before it is read, so a
    swapped-in huge file costs nothing.
    """
    directory = Path(directory)
    limits = limits or WeightLimits()
    _check_layout(directory)
    signature_bytes = bytes(read_bounded(directory / SIGNATURE_FILE, MAX_SIGNATURE_BYTES, "signature file"))
    manifest_bytes = bytes(read_bounded(directory / MANIFEST_FILE, MAX_MANIFEST_BYTES, "manifest"))
    signer = verify_signature(manifest_bytes, signature_bytes, trusted_keys)
    manifest = parse_manifest(manifest_bytes)
    size = (directory / WEIGHTS_FILE).stat().st_size
    if size != manifest.weights_bytes:
        raise WeightsHashMismatchError(
            f"{WEIGHTS_FILE} has {size:,} bytes but the signed manifest says {manifest.weights_bytes:,}: "
            "it was replaced or truncated"
        )
    weights = read_bounded(directory / WEIGHTS_FILE, limits.max_weights_bytes, "weights file")
    tensors = _check_weights(manifest, weights, limits)
    return VerifiedPackage(manifest=manifest, manifest_bytes=manifest_bytes, key_id=signer, tensors=tensors)


@dataclass(frozen=True)
class PackageReport:
    """What ``fedmte model inspect`` shows: the claimed manifest and the verification verdict."""

    manifest: ModelManifest | None
    verified: bool
    verdict: str
    key_id: str | None
    tensor_count: int | None


def inspect_package(
    directory: Path | str,
    trusted_keys: Iterable[Ed25519PublicKey | str] = (),
    limits: WeightLimits | None = None,
) -> PackageReport:
    """Verify if keys are given; always report what the manifest claims (marked unverified)."""
    directory = Path(directory)
    claimed: ModelManifest | None = None
    try:
        claimed = parse_manifest(bytes(read_bounded(directory / MANIFEST_FILE, MAX_MANIFEST_BYTES, "manifest")))
    except PackageError:
        claimed = None
    keys = list(trusted_keys)
    try:
        package = verify_package(directory, keys, limits)
    except PackageError as error:
        return PackageReport(claimed, False, f"{type(error).__name__}: {error}", None, None)
    return PackageReport(package.manifest, True, "verified", package.key_id, len(package.tensors))


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes of contiguous CPU copies of ``tensors`` (the writer is data-only)."""
    from safetensors.torch import save

    plain = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    return save(plain, metadata=dict(metadata) if metadata else None)
