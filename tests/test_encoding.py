"""``fedmte.protocol.encoding``: the one canonical JSON, framing and strict base model."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from fedmte.protocol.encoding import StrictModel, canonical_json, frame


def test_canonical_json_is_key_order_and_whitespace_free_utf8() -> None:
    a = canonical_json({"b": [1, 2], "a": {"y": "é", "x": None}})
    b = canonical_json({"a": {"x": None, "y": "é"}, "b": [1, 2]})
    assert a == b == '{"a":{"x":null,"y":"é"},"b":[1,2]}'.encode("utf-8")
    assert json.loads(a) == {"a": {"x": None, "y": "é"}, "b": [1, 2]}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_canonical_json_refuses_values_json_cannot_hold(value: float) -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": value})


def test_frame_is_unambiguous_where_concatenation_is_not() -> None:
    assert frame("ab", "c") != frame("a", "bc")
    assert frame(b"x", 1) == (1).to_bytes(8, "big") + b"x" + (8).to_bytes(8, "big") + (1).to_bytes(8, "big")
    assert frame("é") == (2).to_bytes(8, "big") + "é".encode("utf-8")
    with pytest.raises(TypeError, match="cannot frame bool"):
        frame(True)
    with pytest.raises(TypeError, match="cannot frame float"):
        frame(1.5)  # type: ignore[arg-type]


def test_strict_models_refuse_unknown_keys_and_changes() -> None:
    class Table(StrictModel):
        name: str

    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Table.model_validate({"name": "a", "nmae": "typo"})
    table = Table(name="a")
    with pytest.raises(ValidationError):
        table.name = "b"  # type: ignore[misc]


def test_every_signer_uses_the_one_encoding() -> None:
    from fedmte.protocol import audit_format, job_messages, secure_rounds, secure_sum
    from fedmte.protocol import encoding

    assert secure_rounds.frame is encoding.frame and secure_sum.frame is encoding.frame
    assert not hasattr(job_messages, "_Strict") and not hasattr(secure_rounds, "_Strict")
    assert audit_format.canonical_json({"a": 1}) == encoding.canonical_json({"a": 1})
