"""Flower records <-> fedmte payloads, shared by the ClientApp and the ServerApp's exchange.

A payload (:class:`fedmte.protocol.wire.Payload`: a JSON document plus packed plain arrays)
travels in one ConfigRecord when it is small, and as a ``uint8`` ArrayRecord that Flower
chunks when it is large: one object per message instead of one per array.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.wire import INLINE_LIMIT, Payload


def payload_to_record(payload: Payload) -> RecordDict:
    """Wrap a fedmte payload as a record (see :mod:`fedmte.protocol.wire` for the packed form)."""
    doc, layout, blob = payload.to_wire()
    config: dict[str, str | bytes] = {"json": doc, "layout": layout}
    records: dict[str, ConfigRecord | ArrayRecord] = {}
    if len(blob) <= INLINE_LIMIT:
        config["blob"] = blob  # one small object instead of an array and its chunks
    else:
        records["arrays"] = ArrayRecord({"blob": Array(np.frombuffer(blob, dtype=np.uint8))})
    records["doc"] = ConfigRecord(config)
    return RecordDict(records)


def payload_from_record(content: RecordDict) -> Payload:
    """Read a fedmte payload out of a record (the inverse of :func:`payload_to_record`)."""
    doc = content.config_records.get("doc")
    arrays = content.array_records.get("arrays")
    text = "{}" if doc is None else doc.get("json", "{}")
    layout = "[]" if doc is None else doc.get("layout", "[]")
    blob = b"" if doc is None else doc.get("blob", b"")
    if arrays is not None and "blob" in arrays:
        blob = arrays["blob"].numpy().tobytes()
    if not isinstance(text, str) or not isinstance(layout, str) or not isinstance(blob, bytes):
        raise InvalidInputError("a message's doc record must hold JSON strings 'json' and 'layout' and bytes 'blob'")
    return Payload.from_wire(text, layout, blob)
