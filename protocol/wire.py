"""What one federation message carries, independent of the transport.

A :class:`Payload` is a small JSON document plus named plain arrays (float64 or int64
only). On the wire (:meth:`Payload.to_wire`) it is three parts: the document as JSON, a
JSON layout, and one byte string holding every array's little-endian values back to back.
The layout says, for each array, its name, dtype (``f8`` or ``i8``), byte offset and
shape; :meth:`Payload.from_wire` checks that the layout tiles the bytes exactly before it
reads them, and nothing is ever unpickled.

Why one byte string: Flower moves every array (and every record) as its own object, with
its own HTTP request at every hop (coordinator -> SuperLink -> SuperNode -> site runner and
back), so a round of dozens of small arrays would cost hundreds of requests; packed, a
message is a handful of objects whatever the number of statistics.

The coordinator's round driver and the site agent speak payloads; only the two Flower
adapters (:mod:`fedmte.server.flower_exchange`, :mod:`fedmte.client.flower_app`) know records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmte.protocol.errors import StatisticsError

MAX_DOC_CHARS = 1_000_000
"""A document is metadata (a round spec, a site description); bulk data travels as arrays."""

MESSAGE_PREFIX = "query."
"""Every fedmte message is a Flower ``query`` message, ``query.<name>``."""

SETUP = "setup"
"""A job's signed setup: the candidates, labels and scorers (:mod:`fedmte.protocol.job_messages`)."""
STATS = "stats"
"""One statistics round of a job, every candidate at once (:class:`~fedmte.protocol.job_messages.JobRoundRequest`)."""
FINISH = "finish"
"""The job is over: the site signs an audit checkpoint and returns it."""

# --- secure sum (fedmte.protocol.secure_rounds): coordinator-signed steps of one job ---
SECURE_ADVERTISE = "secure_advertise"
"""Setup 1: the signed parameters and bounds; the site replies with its signed public keys."""
SECURE_SHARE = "secure_share"
"""Setup 2: every verified advertisement; the site replies with encrypted Shamir shares."""
SECURE_UPLOAD = "secure_upload"
"""A phase: an inner statistics request (plus routed shares, once); the site replies masked words."""
SECURE_REVEAL = "secure_reveal"
"""Unmask: who is in the sum and who dropped; the site replies its shares for that phase."""
SECURE_ABORT = "secure_abort"
"""Below the threshold: the site records the abort in its audit log and forgets the job."""
SECURE_QUERIES = (SECURE_ADVERTISE, SECURE_SHARE, SECURE_UPLOAD, SECURE_REVEAL, SECURE_ABORT)
"""The secure-sum queries, answered by :mod:`fedmte.client.secure_site`."""
# --- end secure sum ---

QUERIES = (SETUP, STATS, FINISH, *SECURE_QUERIES)
"""Every query a site answers; the ClientApp has one ``query.<name>`` handler for each."""

INLINE_LIMIT = 1 << 20
"""Packed arrays up to this many bytes travel inside the message's small config record (one
object); larger ones as a byte array that Flower splits into 5 MB chunks."""

WIRE_DTYPES = {"f8": np.dtype("<f8"), "i8": np.dtype("<i8"), "u1": np.dtype("u1")}
"""Layout dtype code -> the little-endian dtype its values are stored in. ``u1`` carries raw
bytes (a model package's weights in a job's setup message); statistics stay f8/i8."""


def _code(name: str, array: np.ndarray) -> str:
    for code, dtype in WIRE_DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return code
    raise StatisticsError(f"array {name!r} has dtype {array.dtype}; only float64 and int64 travel "
                          "(and uint8 bytes)")


@dataclass(frozen=True)
class Payload:
    """A JSON-able document and named arrays: the content of one message either way."""

    doc: dict[str, Any] = field(default_factory=dict)
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, array in self.arrays.items():
            if not isinstance(name, str) or not name:
                raise StatisticsError(f"array names must be non-empty strings, got {name!r}")
            _code(name, np.asarray(array))

    def doc_text(self) -> str:
        """The document as compact JSON (what travels)."""
        text = json.dumps(self.doc, separators=(",", ":"), sort_keys=True, allow_nan=False)
        if len(text) > MAX_DOC_CHARS:
            raise StatisticsError(f"a message document of {len(text)} characters exceeds {MAX_DOC_CHARS}")
        return text

    def to_wire(self) -> tuple[str, str, bytes]:
        """``(document JSON, layout JSON, packed array bytes)``: what a transport carries."""
        layout, blob = pack_arrays(self.arrays)
        return self.doc_text(), json.dumps(layout, separators=(",", ":")), blob

    @classmethod
    def from_wire(cls, doc_text: str, layout_text: str, blob: bytes) -> Payload:
        """Rebuild a payload from :meth:`to_wire`'s parts, validating all of them."""
        for what, text in (("document", doc_text), ("array layout", layout_text)):
            if len(text) > MAX_DOC_CHARS:
                raise StatisticsError(f"a message {what} of {len(text)} characters exceeds {MAX_DOC_CHARS}")
        try:
            doc = json.loads(doc_text)
            layout = json.loads(layout_text)
        except json.JSONDecodeError as error:
            raise StatisticsError(f"a message document or layout is not valid JSON: {error}") from None
        if not isinstance(doc, dict):
            raise StatisticsError(f"a message document must be a JSON object, got {type(doc).__name__}")
        return cls(doc=doc, arrays=unpack_arrays(layout, blob))


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[list[dict[str, Any]], bytes]:
    """Concatenate ``arrays``' little-endian bytes; return the layout and the bytes."""
    layout: list[dict[str, Any]] = []
    parts: list[bytes] = []
    offset = 0
    for name, value in arrays.items():
        array = np.asarray(value)
        code = _code(name, array)
        data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[code]).tobytes()
        layout.append({"name": name, "dtype": code, "offset": offset, "shape": list(array.shape)})
        parts.append(data)
        offset += len(data)
    return layout, b"".join(parts)


def unpack_arrays(layout: object, blob: bytes) -> dict[str, np.ndarray]:
    """The inverse of :func:`pack_arrays`; refuse a layout that does not tile ``blob`` exactly."""
    if not isinstance(layout, list):
        raise StatisticsError("the array layout must be a list")
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise StatisticsError(f"packed arrays must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    used = 0
    out: dict[str, np.ndarray] = {}
    for entry in layout:
        try:
            name, code, offset = entry["name"], entry["dtype"], int(entry["offset"])
            shape = tuple(int(k) for k in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise StatisticsError(f"malformed array layout entry: {entry!r}") from None
        if not isinstance(name, str) or not name or name in out:
            raise StatisticsError(f"array layout names must be unique non-empty strings, got {name!r}")
        if code not in WIRE_DTYPES or any(k < 0 for k in shape):
            raise StatisticsError(f"array {name!r} has dtype {code!r} (not f8/i8) or a negative shape {shape}")
        size = int(np.prod(shape, dtype=np.int64)) * WIRE_DTYPES[code].itemsize
        if offset != used or offset + size > len(blob):
            raise StatisticsError(f"array {name!r} does not follow the previous one or runs past the end of the bytes")
        values = np.frombuffer(blob, dtype=WIRE_DTYPES[code], count=size // WIRE_DTYPES[code].itemsize, offset=offset)
        out[name] = values.astype(WIRE_DTYPES[code].newbyteorder("="), copy=True).reshape(shape)
        used = offset + size
    if used != len(blob):
        raise StatisticsError(f"the packed bytes hold {len(blob) - used} bytes that no array claims")
    return out


def message_type(name: str) -> str:
    """``describe`` -> ``query.describe``."""
    return f"{MESSAGE_PREFIX}{name}"
