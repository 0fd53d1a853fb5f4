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


# --------------------------------------------------------------------------- signed job requests


def test_arrays_digest_covers_name_dtype_shape_and_bytes_and_nothing_else() -> None:
    from fedmte.protocol.encoding import arrays_digest
    from fedmte.protocol import secure_rounds

    arrays = {"b": np.arange(6.0).reshape(2, 3), "a": np.array([1, 2], dtype=np.int64)}
    digest = arrays_digest(arrays)
    assert digest == arrays_digest(dict(reversed(list(arrays.items()))))  # name order, not insertion order
    assert digest == arrays_digest({"b": np.asfortranarray(arrays["b"]), "a": arrays["a"].astype(">i8")})  # layout
    for changed in ({"b": arrays["b"], "c": arrays["a"]},  # a name
                    {"b": arrays["b"], "a": arrays["a"].astype(np.float64)},  # a dtype
                    {"b": arrays["b"].reshape(3, 2), "a": arrays["a"]},  # a shape
                    {"b": arrays["b"] + 1e-12, "a": arrays["a"]},  # a value
                    {"b": arrays["b"]}):  # an array left out
        assert arrays_digest(changed) != digest
    assert arrays_digest({}) != digest and len(digest) == 32
    assert secure_rounds.arrays_digest is arrays_digest  # the secure sum's envelopes use the one digest


def test_a_signed_round_survives_the_wire_and_covers_its_arrays() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedmte.protocol.errors import VerificationError
    from fedmte.protocol.job_messages import JobRoundRequest, encode_job_round
    from fedmte.protocol.wire import Payload

    key = Ed25519PrivateKey.generate()
    model = "ab" * 32
    request, arrays = encode_job_round({model: STATS}, run_id="9", round_index=3, num_classes=2)
    assert (request.nonce, request.issued_at, request.signature) == ("", 0, "")  # encode_job_round signs nothing
    signed = request.sign(key, arrays)
    assert len(signed.nonce) == 32 and signed.issued_at > 0 and signed.signature
    assert request.sign(key, arrays).nonce != signed.nonce  # a fresh nonce each time
    wire = Payload.from_wire(*Payload(doc=signed.model_dump(mode="json", by_alias=True), arrays=arrays).to_wire())
    back = JobRoundRequest.parse(wire.doc)
    back.verify(key.public_key(), wire.arrays)
    name = next(iter(arrays))
    with pytest.raises(VerificationError, match="does not verify"):
        back.verify(key.public_key(), {**wire.arrays, name: wire.arrays[name] * 2})
    with pytest.raises(VerificationError, match="does not verify"):
        back.verify(Ed25519PrivateKey.generate().public_key(), wire.arrays)
    with pytest.raises(VerificationError, match="does not verify"):
        back.model_copy(update={"round": 4}).verify(key.public_key(), wire.arrays)
    with pytest.raises(VerificationError, match="not signed"):
        request.verify(key.public_key(), arrays)
    # domain-separated: a round's signed bytes start with the round's domain, a finish's with its own
    from fedmte.protocol.encoding import frame
    from fedmte.protocol.job_messages import FinishRequest

    assert signed.signing_bytes(arrays).startswith(frame(b"fedmte.job_round.v1"))
    assert FinishRequest(run_id="9", round=4).signing_bytes().startswith(frame(b"fedmte.job_finish.v1"))


def test_the_setup_signature_covers_the_attached_weights() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedmte.protocol.job_messages import (
        ModelOffer,
        SetupRequest,
        parse_setup,
        setup_arrays,
        setup_payload,
        sign_setup,
    )

    key = Ed25519PrivateKey.generate()
    offer = ModelOffer(model_id="cd" * 32, label="m", manifest="{}", signature="{}", weights_attached=True)
    request = SetupRequest(run_id="9", labels=["a", "b"], scorers=["hscore"], coordinator_key="ed25519:x", models=[offer])
    weights = {offer.model_id: b"\x00\x01\x02"}
    signed = sign_setup(request, key, weights)
    assert signed.request.round == 0 and len(signed.request.nonce) == 32 and signed.request.issued_at > 0
    back, attached = parse_setup(setup_payload(signed, weights))
    good = back.request.signing_bytes(setup_arrays(attached))
    key.public_key().verify(back.signature_bytes(), good)
    assert back.request.signing_bytes(setup_arrays({offer.model_id: b"\x00\x01\x03"})) != good
    assert back.request.signing_bytes() != good
