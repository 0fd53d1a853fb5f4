"""The byte encodings both sides sign, hash and compare, each defined once.

- :func:`canonical_json`: sorted keys, ``,``/``:`` separators, UTF-8, no NaN or infinity: the
  bytes a signature or digest covers (manifests, job setups, secure-sum envelopes, audit
  records), so two parties that build the same document get the same bytes.
- :func:`frame`: an unambiguous concatenation (each part as an 8-byte big-endian length, then
  its bytes; integers as 8 bytes), for key derivations and signed transcripts.
- :class:`StrictModel`: the base of every schema at a boundary: unknown keys are refused
  (a typo is an error, never a silent default) and instances are immutable.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict


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


class StrictModel(BaseModel):
    """A boundary schema: unknown keys refused, instances frozen, fields settable by alias or name."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


__all__ = ["StrictModel", "canonical_json", "frame"]
