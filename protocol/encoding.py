"""The byte encodings both sides sign, hash and compare, each defined once.

- :func:`canonical_json`: sorted keys, ``,``/``:`` separators, UTF-8, no NaN or infinity: the
  bytes a signature or digest covers (manifests, job setups, secure-sum envelopes, audit
  records), so two parties that build the same document get the same bytes.
- :func:`frame`: an unambiguous concatenation (each part as an 8-byte big-endian length, then
  its bytes; integers as 8 bytes), for key derivations and signed transcripts.
- :func:`arrays_digest`: one sha256 over a message's arrays (name, dtype, shape and bytes of
  each, in name order, domain-separated), for signatures that must cover the arrays too.
- :class:`StrictModel`: the base of every schema at a boundary: unknown keys are refused
  (a typo is an error, never a silent default) and instances are immutable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

ARRAYS_DIGEST_DOMAIN = b"fedmte.arrays_digest.v1"


def canonical_json(value: Any) -> bytes:
    """The one JSON byte encoding fedmte signs and hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def frame(*parts: bytes | str | int) -> bytes:
    """Each part as an 8-byte big-endian length, then its bytes (str as UTF-8, int as 8 bytes)."""
    out = bytearray()
    for part in parts:
        if isinstance(part, str):
            data = part.encode("utf-8")
        elif isinstance(part, int) and not isinstance(part, bool):
            data = part.to_bytes(8, "big")
        elif isinstance(part, (bytes, bytearray)):
            data = bytes(part)
        else:
            raise TypeError(f"cannot frame {type(part).__name__}")
        out += len(data).to_bytes(8, "big") + data
    return bytes(out)


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> bytes:
    """sha256 over ``arrays`` in name order: the domain, then each array's name, little-endian
    dtype, shape (JSON) and bytes, framed (:func:`frame`). Byte order and memory layout do not
    change it; a changed name, dtype, shape or value does."""
    hasher = hashlib.sha256(ARRAYS_DIGEST_DOMAIN)
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        hasher.update(frame(name, little.dtype.str, json.dumps(list(array.shape)), np.ascontiguousarray(little).tobytes()))
    return hasher.digest()


class StrictModel(BaseModel):
    """A boundary schema: unknown keys refused, instances frozen, fields settable by alias or name."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


__all__ = ["ARRAYS_DIGEST_DOMAIN", "StrictModel", "arrays_digest", "canonical_json", "frame"]
