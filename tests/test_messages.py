"""Requests survive the wire as JSON plus plain arrays, and tampering is refused."""

from __future__ import annotations

import io

import numpy as np
import pytest

from fedmte.protocol.errors import StatisticsError, UnknownStatisticError
from fedmte.protocol.messages import RoundRequest, decode_round, encode_round
from fedmte.protocol.requests import Stat, Transform

OFFSET = (Transform.of("offset", offset=np.arange(3.0)),)
STATS = [
    Stat.of("gram", OFFSET),
    Stat.of("class_sums", OFFSET),
    Stat.of("mixture_loglik", weights=np.full((2, 4), 0.25)),
    Stat.of("true_class_prob_sum", OFFSET, coef=np.ones((2, 3)), bias=np.zeros(2), passes=2),
]


def through_the_wire(stats):
    spec, arrays = encode_round(stats, round_index=2, num_classes=2)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as loaded:
        received = {k: loaded[k] for k in loaded.files}
    return RoundRequest.model_validate_json(spec.model_dump_json()), received


def test_round_trip_keeps_keys_and_sends_shared_arrays_once() -> None:
    spec, arrays = through_the_wire(STATS)
    assert len(arrays) == 5  # offset, weights, coef, bias, passes: the offset travels once for three requests
    back = decode_round(spec, arrays)
    assert [s.key for s in back] == [s.key for s in STATS]


def test_substituted_array_is_refused() -> None:
    spec, arrays = through_the_wire(STATS)
    ident = spec.stats[0].view[0].args["offset"]
    arrays[ident] = arrays[ident] + 1.0
    with pytest.raises(StatisticsError, match="does not match its content hash"):
        decode_round(spec, arrays)


def test_missing_array_and_unknown_kinds_are_refused() -> None:
    spec, arrays = through_the_wire(STATS)
    ident = spec.stats[2].args["weights"]
    with pytest.raises(StatisticsError, match="which was not sent"):
        decode_round(spec, {k: v for k, v in arrays.items() if k != ident})
    evil = spec.model_copy(update={"stats": [spec.stats[0].model_copy(update={"kind": "os.system"})]})
    with pytest.raises(UnknownStatisticError, match="unknown statistic 'os.system'"):
        decode_round(evil, arrays)
    evil_view = spec.stats[0].model_copy(update={"view": [spec.stats[0].view[0].model_copy(update={"op": "eval"})]})
    with pytest.raises(UnknownStatisticError, match="unknown transform 'eval'"):
        decode_round(spec.model_copy(update={"stats": [evil_view]}), arrays)


def test_key_must_match_content() -> None:
    spec, arrays = through_the_wire(STATS)
    forged = spec.stats[0].model_copy(update={"key": spec.stats[1].key})
    with pytest.raises(StatisticsError, match="does not match its content"):
        decode_round(spec.model_copy(update={"stats": [forged]}), arrays)


def test_extra_fields_are_refused() -> None:
    spec, _ = through_the_wire(STATS)
    raw = spec.model_dump()
    raw["stats"][0]["code"] = "print(1)"
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        RoundRequest.model_validate(raw)
