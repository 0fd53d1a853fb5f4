"""The secure sum: fixed-point ring encoding, Shamir sharing, and the masked protocol with
several in-process sites (setup, masking, dropout recovery, refusals)."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy import stats as scipy_stats

from fedmte.protocol import shamir
from fedmte.protocol.errors import (
    BoundExceededError,
    ProtocolError,
    StatisticsError,
    ThresholdError,
    VerificationError,
)
from fedmte.protocol.fixed_point import (
    BlockSpec,
    FixedPointCodec,
    SumSpec,
    ring_add,
    ring_neg,
    ring_sub,
)
from fedmte.protocol.inputs import check_inputs
from fedmte.protocol.local import InMemorySite, run_in_memory
from fedmte.protocol.plan import execute, make_plan
from fedmte.protocol.secure_sum import (
    ActiveSetError,
    Advertisement,
    CoordinatorSecureSum,
    Reveal,
    SecureSumParams,
    ShareBundle,
    SiteSecureSum,
    UnmaskRequest,
    _exchange,
    _Keystream,
    _pair_mask_seed,
    _self_mask_seed,
    majority_threshold,
)
from fedmte.protocol.statistics import Statistics
from tests.datasets import DATASETS

# --------------------------------------------------------------------------- helpers


def _to_int(words: np.ndarray, column: int) -> int:
    """Ring element ``column`` of ``words`` as a Python int in [0, 2^(64 L))."""
    return sum(int(words[limb, column]) << (64 * limb) for limb in range(words.shape[0]))


def _from_ints(values: list[int], limbs: int) -> np.ndarray:
    return np.array([[(v >> (64 * limb)) & (2**64 - 1) for v in values] for limb in range(limbs)], dtype=np.uint64)


def _signed(value: int, limbs: int) -> int:
    return value - (1 << (64 * limbs)) if value >> (64 * limbs - 1) else value


class Federation:
    """N in-process sites and a coordinator that finished the key setup."""

    def __init__(self, sites: int = 3, *, threshold: int | None = None, phases: int = 2, self_masks: bool = True,
                 job_id: str = "job-1") -> None:
        self.names = tuple(f"site{i}" for i in range(sites))
        self.identity = {name: Ed25519PrivateKey.generate() for name in self.names}
        self.known = {name: key.public_key() for name, key in self.identity.items()}
        self.params = SecureSumParams(job_id=job_id, sites=self.names,
                                      threshold=threshold or majority_threshold(sites), phases=phases,
                                      self_masks=self_masks)
        self.sites = {name: SiteSecureSum(self.params, site_id=name, identity_key=self.identity[name],
                                          known_sites=self.known) for name in self.names}
        self.coordinator = CoordinatorSecureSum(self.params, known_sites=self.known)
        self.advertisements = self.coordinator.collect_advertisements([s.advertise() for s in self.sites.values()])
        self.bundles = [b for site in self.sites.values() for b in site.share(self.advertisements)]
        routed = self.coordinator.route_shares(self.bundles)
        for name, site in self.sites.items():
            site.receive_shares(routed[name])

    def upload(self, phase: int, spec: SumSpec, data: dict[str, Statistics], *, drop: tuple[str, ...] = ()) -> None:
        self.coordinator.open_phase(phase, spec)
        for name in self.names:
            if name not in drop:
                self.coordinator.add_upload(self.sites[name].mask(data[name], phase=phase, spec=spec))

    def run(self, phase: int, spec: SumSpec, data: dict[str, Statistics], *, drop: tuple[str, ...] = (),
            silent: tuple[str, ...] = ()) -> Statistics:
        """One phase: ``drop`` never upload; ``silent`` upload but do not answer the unmask request."""
        self.upload(phase, spec, data, drop=drop)
        request = self.coordinator.unmask_request(phase)
        reveals = [] if request is None else [self.sites[n].reveal(request) for n in request.active if n not in silent]
        return self.coordinator.finish(phase, reveals)


def _statistics(rng: np.random.Generator, *, d: int = 6, classes: int = 3, rows: int = 50) -> Statistics:
    x = rng.normal(size=(rows, d)) * rng.uniform(0.1, 10.0, size=d)
    y = rng.integers(0, classes, size=rows)
    onehot = np.eye(classes)[y]
    return Statistics({
        "gram": (x.T @ x)[np.triu_indices(d)],
        "class_sums": onehot.T @ x,
        "class_counts": onehot.sum(axis=0).astype(np.int64),
        "count": np.asarray(rows, dtype=np.int64),
    })


def _spec(example: Statistics, bound: float = 1e5) -> SumSpec:
    """Public bounds: ``bound`` for float blocks (the data reach about 5e3), 10^6 for counts."""
    bounds = {key: (bound if value.dtype.kind == "f" else 10**6) for key, value in example.items()}
    return SumSpec.for_statistics(example, bounds)


def _exact_sum(parts: list[Statistics], key: str) -> list[Fraction]:
    """The exact rational sum of the sites' float64 entries (no rounding at all)."""
    flat = [p[key].reshape(-1) for p in parts]
    return [sum((Fraction(float(f[i])) for f in flat), Fraction(0)) for i in range(flat[0].size)]


# --------------------------------------------------------------------------- ring arithmetic

@settings(max_examples=60, deadline=None)
@given(limbs=st.integers(1, 3), data=st.data())
def test_ring_arithmetic_matches_python_integers_modulo_the_ring(limbs: int, data: st.DataObject) -> None:
    modulus = 1 << (64 * limbs)
    special = st.sampled_from([0, 1, modulus - 1, modulus // 2, modulus // 2 - 1, 2**64 - 1, 2**64])
    element = st.one_of(st.integers(0, modulus - 1), special.filter(lambda v: v < modulus))
    left = data.draw(st.lists(element, min_size=1, max_size=12))
    right = data.draw(st.lists(element, min_size=len(left), max_size=len(left)))
    a, b = _from_ints(left, limbs), _from_ints(right, limbs)
    added = ring_add(a.copy(), b)
    subtracted = ring_sub(a.copy(), b)
    negated = ring_neg(a)
    for i, (u, v) in enumerate(zip(left, right)):
        assert _to_int(added, i) == (u + v) % modulus
        assert _to_int(subtracted, i) == (u - v) % modulus
        assert _to_int(negated, i) == (-u) % modulus


# --------------------------------------------------------------------------- fixed point

@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_subnormal=True), min_size=1, max_size=20),
    limbs=st.integers(1, 3),
    sites=st.integers(1, 40),
)
def test_float_encoding_is_the_exactly_rounded_scaled_integer(values: list[float], limbs: int, sites: int) -> None:
    spec = SumSpec(blocks=(BlockSpec(key="x", shape=(len(values),), dtype="float64", bound=1e3),), limbs=limbs)
    codec = FixedPointCodec(spec, max_sites=sites)
    words = codec.encode(Statistics({"x": np.array(values)}))
    scale = Fraction(2) ** codec.exponent("x")
    for i, value in enumerate(values):
        expected = round(Fraction(value) * scale)  # round half to even, as np.rint
        assert _signed(_to_int(words, i), limbs) == expected


@settings(max_examples=60, deadline=None)
@given(data=st.data(), sites=st.integers(1, 6), extra_sites=st.integers(0, 20), limbs=st.integers(1, 2))
def test_decoded_sum_is_within_the_documented_bound_of_the_exact_sum(
    data: st.DataObject, sites: int, extra_sites: int, limbs: int
) -> None:
    magnitude = data.draw(st.sampled_from([1e-6, 1.0, 1e4, 1e9]))
    entry = st.floats(-magnitude, magnitude, allow_subnormal=True) | st.floats(-1e-3, 1e-3).map(lambda v: v * magnitude)
    size = data.draw(st.integers(1, 8))
    parts = [Statistics({"x": np.array(data.draw(st.lists(entry, min_size=size, max_size=size)))})
             for _ in range(sites)]
    spec = SumSpec(blocks=(BlockSpec(key="x", shape=(size,), dtype="float64", bound=magnitude),), limbs=limbs)
    codec = FixedPointCodec(spec, max_sites=sites + extra_sites)
    total = np.zeros((limbs, size), dtype=np.uint64)
    for part in parts:
        ring_add(total, codec.encode(part))
    decoded = codec.decode(total, summed=sites)["x"]
    exact = _exact_sum(parts, "x")
    for i in range(size):
        error = abs(Fraction(float(decoded[i])) - exact[i])
        assert error <= Fraction(float(codec.error_bound("x", summed=sites, value=float(exact[i])))) * (1 + 1e-9)


def test_decoded_sum_of_typical_statistics_is_exact_to_float64_precision() -> None:
    rng = np.random.default_rng(0)
    parts = [_statistics(rng) for _ in range(5)]
    spec = _spec(parts[0], bound=1e6)  # loose: the largest entry is about 5e3
    codec = FixedPointCodec(spec, max_sites=10)
    total = np.zeros((spec.limbs, codec.size), dtype=np.uint64)
    for part in parts:
        ring_add(total, codec.encode(part))
    decoded = codec.decode(total, summed=5)
    for key in ("gram", "class_sums"):
        exact = np.array([float(v) for v in _exact_sum(parts, key)])
        relative = np.abs(decoded[key].reshape(-1) - exact) / np.abs(exact)
        assert relative.max() <= 2**-51  # a couple of ulps: as good as float64 can hold the exact sum
    for key in ("class_counts", "count"):
        np.testing.assert_array_equal(decoded[key], sum(p[key] for p in parts))
        assert decoded[key].dtype == np.int64


def test_int64_blocks_sum_exactly_including_negative_values_and_the_bound() -> None:
    bound = (2**63 - 1) // 4
    spec = SumSpec(blocks=(BlockSpec(key="k", shape=(5,), dtype="int64", bound=bound),))
    codec = FixedPointCodec(spec, max_sites=4)
    parts = [np.array([bound, -bound, 0, -1, 7]), np.array([bound, -bound, 1, -1, -7]),
             np.array([bound, -bound, -3, 5, 0])]
    total = np.zeros((2, 5), dtype=np.uint64)
    for part in parts:
        ring_add(total, codec.encode(Statistics({"k": part})))
    expected = [sum(int(p[i]) for p in parts) for i in range(5)]
    assert codec.decode(total, summed=3)["k"].tolist() == expected


def test_values_beyond_the_public_bound_are_refused_not_wrapped() -> None:
    spec = SumSpec(blocks=(BlockSpec(key="x", shape=(2,), dtype="float64", bound=10.0),
                           BlockSpec(key="n", shape=(), dtype="int64", bound=100)))
    codec = FixedPointCodec(spec, max_sites=3)
    with pytest.raises(BoundExceededError, match="beyond its public bound"):
        codec.encode(Statistics({"x": np.array([1.0, -10.5]), "n": np.asarray(3, dtype=np.int64)}))
    with pytest.raises(BoundExceededError, match="beyond its public bound 100"):
        codec.encode(Statistics({"x": np.array([1.0, 10.0]), "n": np.asarray(-101, dtype=np.int64)}))
    with pytest.raises(StatisticsError, match="can overflow int64"):
        FixedPointCodec(SumSpec(blocks=(BlockSpec(key="n", shape=(), dtype="int64", bound=2**62),)), max_sites=3)
    with pytest.raises(StatisticsError, match="unmatched"):
        codec.encode(Statistics({"x": np.array([1.0, 2.0])}))


def test_a_vector_with_a_mask_left_in_it_does_not_decode() -> None:
    rng = np.random.default_rng(1)
    spec = SumSpec(blocks=(BlockSpec(key="x", shape=(64,), dtype="float64", bound=1.0),
                           BlockSpec(key="n", shape=(4,), dtype="int64", bound=10)))
    codec = FixedPointCodec(spec, max_sites=3)
    noise = rng.integers(0, 2**63, size=(2, codec.size), dtype=np.uint64) * np.uint64(2)
    with pytest.raises(BoundExceededError, match="a mask was not removed"):
        codec.decode(noise, summed=3)


# --------------------------------------------------------------------------- Shamir

def _lagrange_at(points: list[tuple[int, int]], at: int) -> int:
    """Independent interpolation over GF(2^521 - 1) with Fractions reduced at the end."""
    total = Fraction(0)
    for i, (xi, yi) in enumerate(points):
        term = Fraction(yi)
        for j, (xj, _) in enumerate(points):
            if i != j:
                term *= Fraction(at - xj, xi - xj)
        total += term
    return total.numerator * pow(total.denominator, -1, shamir.PRIME) % shamir.PRIME


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), sites=st.integers(3, 7), data=st.data())
def test_shamir_any_threshold_subset_recovers_the_secret(secret: bytes, sites: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(majority_threshold(sites), sites))
    xs = data.draw(st.permutations(range(1, 20)))[:sites]
    shares = shamir.split(secret, xs=xs, threshold=threshold)
    for subset in itertools.combinations(shares, threshold):
        assert shamir.combine(list(subset), threshold=threshold) == secret
    assert shamir.combine(shares, threshold=threshold) == secret  # extra shares are checked, and agree
    assert _lagrange_at([(s.x, s.y) for s in shares[:threshold]], 0) == int.from_bytes(secret, "big")


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), other=st.binary(min_size=32, max_size=32),
       threshold=st.integers(2, 5))
def test_shamir_fewer_than_threshold_shares_are_consistent_with_any_secret(
    secret: bytes, other: bytes, threshold: int
) -> None:
    shares = shamir.split(secret, xs=list(range(1, threshold + 2)), threshold=threshold)
    seen = shares[: threshold - 1]
    with pytest.raises(ThresholdError, match="cannot recover"):
        shamir.combine(seen, threshold=threshold)
    # The t-1 seen shares plus the point (0, other) fix a polynomial of degree t-1; its value
    # at a fresh x is a share that completes them into a sharing of ``other``.
    fresh_x = threshold + 1
    forged_y = _lagrange_at([(0, int.from_bytes(other, "big"))] + [(s.x, s.y) for s in seen], fresh_x)
    assert shamir.combine(seen + [shamir.Share(fresh_x, forged_y)], threshold=threshold) == other


def test_shamir_refuses_altered_and_duplicate_shares() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, xs=[1, 2, 3, 4, 5], threshold=3)
    altered = shares[:4] + [shamir.Share(shares[4].x, (shares[4].y + 1) % shamir.PRIME)]
    with pytest.raises(VerificationError, match="does not lie on the polynomial"):
        shamir.combine(altered, threshold=3)
    with pytest.raises(ProtocolError, match="distinct"):
        shamir.combine([shares[0], shares[0], shares[1]], threshold=3)
    with pytest.raises(ProtocolError, match="threshold must be in"):
        shamir.split(secret, xs=[1, 2], threshold=3)


# --------------------------------------------------------------------------- the protocol

def test_parameters_require_three_sites_and_a_strict_majority_threshold() -> None:
    with pytest.raises(ValidationError, match="strict majority"):
        SecureSumParams(job_id="j", sites=("a", "b", "c", "d"), threshold=2, phases=1)
    with pytest.raises(ValidationError, match="at least 3 items"):
        SecureSumParams(job_id="j", sites=("a", "b"), threshold=2, phases=1)
    with pytest.raises(ValidationError, match="twice"):
        SecureSumParams(job_id="j", sites=("a", "b", "a"), threshold=2, phases=1)


@pytest.mark.parametrize("self_masks", [True, False])
def test_unmasked_sum_equals_the_plain_sum_over_several_phases(self_masks: bool) -> None:
    rng = np.random.default_rng(2)
    federation = Federation(4, phases=2, self_masks=self_masks)
    for phase, d in ((0, 6), (1, 3)):
        data = {name: _statistics(rng, d=d) for name in federation.names}
        spec = _spec(data["site0"])
        result = federation.run(phase, spec, data)
        parts = list(data.values())
        codec = FixedPointCodec(spec, max_sites=4)
        for key in ("gram", "class_sums"):
            exact = np.array([float(v) for v in _exact_sum(parts, key)]).reshape(result[key].shape)
            assert np.all(np.abs(result[key] - exact) <= codec.error_bound(key, summed=4, value=exact))
        for key in ("class_counts", "count"):
            np.testing.assert_array_equal(result[key], sum(p[key] for p in parts))


def test_one_round_mode_needs_no_unmask_reply_without_dropouts() -> None:
    rng = np.random.default_rng(3)
    federation = Federation(3, phases=1, self_masks=False)
    data = {name: _statistics(rng) for name in federation.names}
    federation.upload(0, _spec(data["site0"]), data)
    assert federation.coordinator.unmask_request(0) is None
    result = federation.coordinator.finish(0)
    np.testing.assert_array_equal(result["class_counts"], sum(p["class_counts"] for p in data.values()))


def test_a_masked_upload_looks_uniformly_random() -> None:
    federation = Federation(3, phases=1)
    size = 4096
    zeros = Statistics({"x": np.zeros(size)})
    spec = SumSpec(blocks=(BlockSpec(key="x", shape=(size,), dtype="float64", bound=1.0),))
    federation.coordinator.open_phase(0, spec)
    uploads = {name: federation.sites[name].mask(zeros, phase=0, spec=spec) for name in federation.names}
    plain = FixedPointCodec(spec, max_sites=3).encode(zeros)
    words = uploads["site0"].words
    assert not np.any(words == plain)  # no entry left as its encoding (probability 2^-128 each)
    assert np.mean(uploads["site0"].words == uploads["site1"].words) < 1e-3  # same data, unrelated vectors
    bits = np.unpackbits(words.view(np.uint8).reshape(-1, 16), axis=1, bitorder="little")  # (size, 128)
    ones = bits.mean(axis=0)
    assert np.max(np.abs(ones - 0.5)) < 5 * 0.5 / math.sqrt(size)  # every bit position is fair
    assert abs(bits.mean() - 0.5) < 5 * 0.5 / math.sqrt(bits.size)
    counts = np.bincount(words.view(np.uint8).reshape(-1), minlength=256)
    assert scipy_stats.chisquare(counts).pvalue > 1e-6
    with pytest.raises(BoundExceededError, match="a mask was not removed"):
        FixedPointCodec(spec, max_sites=3).decode(words, summed=1)  # one upload alone does not decode


def test_five_sites_one_drops_after_key_sharing_gives_the_exact_sum_of_the_survivors() -> None:
    rng = np.random.default_rng(4)
    for self_masks in (True, False):
        federation = Federation(5, threshold=3, phases=1, self_masks=self_masks)
        data = {name: _statistics(rng) for name in federation.names}
        spec = _spec(data["site0"])
        result = federation.run(0, spec, data, drop=("site2",))
        survivors = [data[n] for n in federation.names if n != "site2"]
        for key in ("class_counts", "count"):
            np.testing.assert_array_equal(result[key], sum(p[key] for p in survivors))
        codec = FixedPointCodec(spec, max_sites=5)
        exact = np.array([float(v) for v in _exact_sum(survivors, "gram")])
        assert np.all(np.abs(result["gram"] - exact) <= codec.error_bound("gram", summed=4, value=exact))


def test_two_sites_drop_and_one_survivor_stays_silent_at_unmasking() -> None:
    rng = np.random.default_rng(5)
    federation = Federation(7, threshold=4, phases=1)
    data = {name: _statistics(rng) for name in federation.names}
    result = federation.run(0, _spec(data["site0"]), data, drop=("site0", "site4"), silent=("site5",))
    survivors = [data[n] for n in ("site1", "site2", "site3", "site5", "site6")]
    np.testing.assert_array_equal(result["class_counts"], sum(p["class_counts"] for p in survivors))


def test_a_site_that_dropped_in_the_first_phase_stays_out_of_the_job() -> None:
    # The first phase fixes the active set: a site that missed it cannot come back (its upload
    # is refused), and the later phases sum exactly the first phase's survivors.
    rng = np.random.default_rng(6)
    federation = Federation(5, threshold=3, phases=2)
    data = {name: _statistics(rng) for name in federation.names}
    spec = _spec(data["site0"])
    federation.run(0, spec, data, drop=("site1",))
    active = tuple(n for n in federation.names if n != "site1")
    assert federation.coordinator.fixed_lists == (active, ("site1",))
    federation.coordinator.open_phase(1, spec)
    with pytest.raises(ProtocolError, match="'site1', which was dropped from this job in its first phase"):
        federation.coordinator.add_upload(federation.sites["site1"].mask(data["site1"], phase=1, spec=spec))
    for name in active:
        federation.coordinator.add_upload(federation.sites[name].mask(data[name], phase=1, spec=spec))
    request = federation.coordinator.unmask_request(1)
    assert request is not None and (request.active, request.dropped) == (active, ("site1",))
    result = federation.coordinator.finish(1, [federation.sites[n].reveal(request) for n in active])
    np.testing.assert_array_equal(result["count"], sum(data[n]["count"] for n in active))
    assert all(federation.sites[n].fixed_lists == (active, ("site1",)) for n in active)


def test_a_dropout_after_the_first_phase_aborts_the_phase_at_the_coordinator() -> None:
    rng = np.random.default_rng(16)
    federation = Federation(5, threshold=3, phases=3)
    data = {name: _statistics(rng) for name in federation.names}
    spec = _spec(data["site0"])
    federation.run(0, spec, data)
    federation.upload(1, spec, data, drop=("site3",))  # four uploads: above the threshold, yet refused
    with pytest.raises(ActiveSetError, match=r"\['site3'\] did not upload phase 1.*nothing of this phase is released"):
        federation.coordinator.unmask_request(1)
    with pytest.raises(ProtocolError, match="not open"):
        federation.coordinator.finish(1)


def test_a_site_that_drops_during_key_setup_is_left_out_of_every_phase() -> None:
    rng = np.random.default_rng(15)
    names = tuple(f"s{i}" for i in range(5))
    identity = {n: Ed25519PrivateKey.generate() for n in names}
    known = {n: k.public_key() for n, k in identity.items()}
    params = SecureSumParams(job_id="j", sites=names, threshold=3, phases=1)
    sites = {n: SiteSecureSum(params, site_id=n, identity_key=identity[n], known_sites=known) for n in names}
    coordinator = CoordinatorSecureSum(params, known_sites=known)
    relayed = coordinator.collect_advertisements([s.advertise() for s in sites.values()])
    bundles = [b for n in names[:4] for b in sites[n].share(relayed)]  # s4 advertised, then went silent
    routed = coordinator.route_shares(bundles)
    assert coordinator.participants == names[:4] and set(routed) == set(names[:4])
    for n in names[:4]:
        sites[n].receive_shares(routed[n])
        assert sites[n].participants == names[:4]
    data = {n: _statistics(rng) for n in names[:4]}
    spec = _spec(data["s0"])
    coordinator.open_phase(0, spec)
    for n in names[:4]:
        coordinator.add_upload(sites[n].mask(data[n], phase=0, spec=spec))
    request = coordinator.unmask_request(0)
    assert request is not None and request.dropped == ()
    result = coordinator.finish(0, [sites[n].reveal(request) for n in names[:4]])
    np.testing.assert_array_equal(result["class_counts"], sum(p["class_counts"] for p in data.values()))


def test_below_threshold_nothing_is_released() -> None:
    rng = np.random.default_rng(7)
    federation = Federation(5, threshold=3, phases=2)
    data = {name: _statistics(rng) for name in federation.names}
    spec = _spec(data["site0"])
    federation.upload(0, spec, data, drop=("site0", "site1", "site3"))
    with pytest.raises(ThresholdError, match="nothing is released"):
        federation.coordinator.unmask_request(0)
    with pytest.raises(ProtocolError, match="not open"):
        federation.coordinator.finish(0)
    # A coordinator that asks anyway is refused by every site, which reveals nothing.
    forged = UnmaskRequest(job_id="job-1", phase=0, active=("site2", "site4"), dropped=("site0", "site1", "site3"))
    for name in ("site2", "site4"):
        with pytest.raises(ThresholdError, match="refusing to reveal: only 2 active"):
            federation.sites[name].reveal(forged)
    # Enough uploads but too few unmask replies: no result either.
    federation.upload(1, spec, data)
    request = federation.coordinator.unmask_request(1)
    replies = [federation.sites[name].reveal(request) for name in ("site0", "site1")]
    with pytest.raises(ThresholdError, match="only 2 sites answered"):
        federation.coordinator.finish(1, replies)


def test_tampered_advertisement_and_unknown_signer_are_rejected() -> None:
    federation = Federation(3, phases=1)
    params, known = federation.params, federation.known
    fresh = SiteSecureSum(params, site_id="site0", identity_key=federation.identity["site0"], known_sites=known)
    ads = [fresh.advertise()] + [federation.sites[n].advertise() for n in ("site1", "site2")]
    key = bytearray(ads[1].mask_keys[0])
    key[0] ^= 1
    tampered = ads[1].model_copy(update={"mask_keys": (bytes(key),)})
    with pytest.raises(VerificationError, match="does not verify against its identity key"):
        fresh.share([ads[0], tampered, ads[2]])
    with pytest.raises(VerificationError, match="does not verify against its identity key"):
        CoordinatorSecureSum(params, known_sites=known).collect_advertisements([ads[0], tampered, ads[2]])
    # An impostor holding another identity key for a roster name.
    impostor = SiteSecureSum(params, site_id="site1", identity_key=(other := Ed25519PrivateKey.generate()),
                             known_sites={**known, "site1": other.public_key()})
    with pytest.raises(VerificationError, match="does not verify against its identity key"):
        fresh.share([ads[0], impostor.advertise(), ads[2]])
    # A site this roster does not know at all.
    outsider_params = SecureSumParams(job_id="job-1", sites=("site0", "site1", "site2", "mallory"), threshold=3,
                                      phases=1)
    mallory_key = Ed25519PrivateKey.generate()
    mallory = SiteSecureSum(outsider_params, site_id="mallory", identity_key=mallory_key,
                            known_sites={**known, "mallory": mallory_key.public_key()})
    with pytest.raises(VerificationError, match="unknown signer 'mallory'"):
        fresh.share([*ads, mallory.advertise()])
    with pytest.raises(VerificationError, match="does not know"):
        SiteSecureSum(outsider_params, site_id="site0", identity_key=federation.identity["site0"], known_sites=known)
    # A genuine advertisement from another job is a replay.
    other_job = SecureSumParams(job_id="job-2", sites=params.sites, threshold=2, phases=1)
    replayed = SiteSecureSum(other_job, site_id="site1", identity_key=federation.identity["site1"],
                             known_sites=known).advertise()
    with pytest.raises(VerificationError, match="for job 'job-2' or other parameters"):
        fresh.share([ads[0], replayed, ads[2]])


def test_tampered_or_misattributed_share_bundles_are_rejected() -> None:
    names = ("a", "b", "c")
    identity = {n: Ed25519PrivateKey.generate() for n in names}
    known = {n: k.public_key() for n, k in identity.items()}
    params = SecureSumParams(job_id="j", sites=names, threshold=2, phases=1)
    sites = {n: SiteSecureSum(params, site_id=n, identity_key=identity[n], known_sites=known) for n in names}
    ads = [s.advertise() for s in sites.values()]
    bundles = {n: {b.recipient: b for b in sites[n].share(ads)} for n in names}
    to_a = bundles["b"]["a"]
    flipped = bytearray(to_a.ciphertext)
    flipped[-1] ^= 1
    with pytest.raises(VerificationError, match="fails authentication"):
        sites["a"].receive_shares([to_a.model_copy(update={"ciphertext": bytes(flipped)}), bundles["c"]["a"]])
    with pytest.raises(VerificationError, match="fails authentication"):  # b's bundle claimed to come from c
        sites["a"].receive_shares([to_a.model_copy(update={"sender": "c"})])
    sites["a"].receive_shares([to_a, bundles["c"]["a"]])  # the genuine ones still work afterwards
    assert sites["a"].participants == names


def test_a_site_never_reveals_both_shares_for_one_peer() -> None:
    rng = np.random.default_rng(8)
    for first_dropped in (True, False):
        federation = Federation(5, threshold=3, phases=1)
        data = {name: _statistics(rng) for name in federation.names}
        federation.upload(0, _spec(data["site0"]), data)
        everyone = UnmaskRequest(job_id="job-1", phase=0, active=federation.names, dropped=())
        site4_dropped = UnmaskRequest(job_id="job-1", phase=0, active=federation.names[:4], dropped=("site4",))
        first, second = (site4_dropped, everyone) if first_dropped else (everyone, site4_dropped)
        site = federation.sites["site0"]
        reveal = site.reveal(first)
        assert ("site4" in reveal.key_shares) == first_dropped
        assert ("site4" in reveal.seed_shares) != first_dropped
        assert site.reveal(first) == reveal  # a repeated request is answered alike
        with pytest.raises(ActiveSetError, match=r"\['site4'\] would change sides"):
            site.reveal(second)
        with pytest.raises(ProtocolError, match="stopped taking part in job 'job-1'"):
            site.reveal(first)  # the job is over at this site


def test_the_first_unmask_request_fixes_the_active_set_for_every_later_phase() -> None:
    # The faked-dropout attack: the same statistics in three phases, another site declared
    # dropped in each, would give a+b, b+c and a+c. The first request fixes (A, D); every
    # site refuses a request naming another set and leaves the job.
    rng = np.random.default_rng(17)
    federation = Federation(3, threshold=2, phases=3)
    data = {name: _statistics(rng) for name in federation.names}
    spec = _spec(data["site0"])
    a, b, c = federation.names
    for phase in range(3):
        for name in federation.names:
            federation.sites[name].mask(data[name], phase=phase, spec=spec)
    first = UnmaskRequest(job_id="job-1", phase=0, active=(a, b), dropped=(c,))
    assert federation.sites[a].reveal(first).key_shares.keys() == {c}
    federation.sites[b].reveal(first)
    with pytest.raises(ProtocolError, match="this site is listed as dropped"):
        federation.sites[c].reveal(first)  # refused, and fixes nothing at c
    assert federation.sites[c].fixed_lists is None
    second = UnmaskRequest(job_id="job-1", phase=1, active=(b, c), dropped=(a,))
    with pytest.raises(ActiveSetError, match=r"fixed at active \['site0', 'site1'\], dropped \['site2'\]"):
        federation.sites[b].reveal(second)
    federation.sites[c].reveal(second)  # c alone: one share of each secret, below the threshold of 2
    third = UnmaskRequest(job_id="job-1", phase=2, active=(a, c), dropped=(b,))
    for name in (a, c):
        with pytest.raises(ActiveSetError):
            federation.sites[name].reveal(third)
    with pytest.raises(ProtocolError, match="stopped taking part"):
        federation.sites[b].reveal(UnmaskRequest(job_id="job-1", phase=1, active=(a, b), dropped=(c,)))


def test_in_the_one_round_mode_a_second_masked_phase_fixes_everyone_as_active() -> None:
    # Phase 0 needed no reply (summed over everyone); a later request dropping a site would
    # give that site's statistics by difference.
    rng = np.random.default_rng(18)
    federation = Federation(3, threshold=2, phases=2, self_masks=False)
    data = {name: _statistics(rng) for name in federation.names}
    spec = _spec(data["site0"])
    federation.run(0, spec, data)
    assert federation.coordinator.fixed_lists == (federation.names, ())
    site = federation.sites["site0"]
    site.mask(data["site0"], phase=1, spec=spec)
    assert site.fixed_lists == (federation.names, ())
    with pytest.raises(ActiveSetError):
        site.reveal(UnmaskRequest(job_id="job-1", phase=1, active=federation.names[:2], dropped=("site2",)))


def test_overlapping_or_incomplete_lists_are_refused() -> None:
    rng = np.random.default_rng(9)
    federation = Federation(5, threshold=3, phases=1)
    data = {name: _statistics(rng) for name in federation.names}
    federation.upload(0, _spec(data["site0"]), data)
    site = federation.sites["site0"]
    names = federation.names
    with pytest.raises(ProtocolError, match=r"\['site3'\] listed as both active and dropped"):
        site.reveal(UnmaskRequest(job_id="job-1", phase=0, active=names, dropped=("site3",)))
    with pytest.raises(ProtocolError, match=r"neither active nor dropped: \['site4'\]"):
        site.reveal(UnmaskRequest(job_id="job-1", phase=0, active=names[:4], dropped=()))
    with pytest.raises(ProtocolError, match="this site is listed as dropped"):
        site.reveal(UnmaskRequest(job_id="job-1", phase=0, active=names[1:], dropped=("site0",)))
    with pytest.raises(ProtocolError, match="for job 'other'"):
        site.reveal(UnmaskRequest(job_id="other", phase=0, active=names, dropped=()))


def test_a_phase_is_masked_once_and_unmasked_only_after_upload() -> None:
    rng = np.random.default_rng(10)
    federation = Federation(3, phases=2)
    data = {name: _statistics(rng) for name in federation.names}
    spec = _spec(data["site0"])
    site = federation.sites["site0"]
    site.mask(data["site0"], phase=0, spec=spec)
    with pytest.raises(ProtocolError, match="already masked"):
        site.mask(data["site1"], phase=0, spec=spec)
    with pytest.raises(ProtocolError, match="has not uploaded phase 1"):
        site.reveal(UnmaskRequest(job_id="job-1", phase=1, active=federation.names, dropped=()))
    with pytest.raises(ProtocolError, match="outside this job's phases"):
        site.mask(data["site0"], phase=2, spec=spec)


def test_coordinator_refuses_late_and_foreign_uploads_and_altered_reveals() -> None:
    rng = np.random.default_rng(11)
    federation = Federation(4, threshold=3, phases=3)
    data = {name: _statistics(rng) for name in federation.names}
    spec = _spec(data["site0"])
    federation.upload(0, spec, data, drop=("site3",))
    request = federation.coordinator.unmask_request(0)
    late = federation.sites["site3"].mask(data["site3"], phase=0, spec=spec)
    with pytest.raises(ProtocolError, match="no longer takes uploads"):
        federation.coordinator.add_upload(late)
    reveals = [federation.sites[n].reveal(request) for n in request.active]
    forged = dict(reveals[0].seed_shares)
    forged["site1"] = bytes(len(forged["site1"]))
    altered = reveals[0].model_copy(update={"seed_shares": forged})
    with pytest.raises(VerificationError, match="a share was altered"):
        federation.coordinator.finish(0, [altered, *reveals[1:]])
    # Consistent shares of another seed (sites colluding on a forgery) fail the commitment.
    federation.upload(1, spec, data, drop=("site3",))
    request = federation.coordinator.unmask_request(1)
    reveals = [federation.sites[n].reveal(request) for n in request.active]
    coordinates = [federation.params.coordinate(r.site_id) for r in reveals]
    fake = shamir.split(bytes(range(32)), xs=coordinates, threshold=3)
    reveals = [r.model_copy(update={"seed_shares": {**r.seed_shares, "site1": share.y_bytes()}})
               for r, share in zip(reveals, fake)]
    with pytest.raises(VerificationError, match="does not match its advertised commitment"):
        federation.coordinator.finish(1, reveals)
    other_spec = _spec(data["site0"], bound=2e5)
    federation.coordinator.open_phase(2, spec)
    with pytest.raises(ProtocolError, match="another sum spec"):
        federation.coordinator.add_upload(federation.sites["site0"].mask(data["site0"], phase=2, spec=other_spec))


def test_messages_round_trip_through_json() -> None:
    federation = Federation(3, phases=2)
    advertisement = federation.advertisements[0]
    assert Advertisement.model_validate_json(advertisement.model_dump_json(by_alias=True)) == advertisement
    bundle = federation.bundles[0]
    assert ShareBundle.model_validate_json(bundle.model_dump_json(by_alias=True)) == bundle
    assert SecureSumParams.model_validate_json(federation.params.model_dump_json(by_alias=True)) == federation.params
    rng = np.random.default_rng(12)
    data = {name: _statistics(rng) for name in federation.names}
    federation.upload(0, _spec(data["site0"]), data)
    request = federation.coordinator.unmask_request(0)
    assert UnmaskRequest.model_validate_json(request.model_dump_json(by_alias=True)) == request
    reveal = federation.sites["site1"].reveal(request)
    assert Reveal.model_validate_json(reveal.model_dump_json(by_alias=True)) == reveal


def test_federated_scores_through_the_secure_sum_equal_the_plain_sum() -> None:
    dataset = DATASETS["large_offset"]
    inputs = check_inputs(dataset.features, dataset.labels, dataset.source_probs)
    rows = np.array_split(np.arange(len(dataset.labels)), 3)
    plan = make_plan(None, has_features=True, has_source_probs=True)
    federation = Federation(3, phases=plan.rounds + 1)
    members = dict(zip(federation.names, (InMemorySite(inputs, r) for r in rows)))
    phase = iter(range(plan.rounds + 1))

    def secure_aggregate(requests):
        local = {name: site.compute(requests) for name, site in members.items()}
        # Public bounds, as a job derives them from clip norms and n_max; here from the data.
        bounds = {}
        for key, example in local["site0"].items():
            largest = max(float(np.max(np.abs(v[key]), initial=0.0)) for v in local.values())
            bounds[key] = math.ceil(4 * largest) + 1 if example.dtype.kind == "i" else 4 * largest or 1.0
        spec = SumSpec.for_statistics(local["site0"], bounds)
        return federation.run(next(phase), spec, local)

    secure = execute(plan, secure_aggregate, dim=inputs.dim, num_classes=inputs.num_classes,
                     num_source_classes=inputs.num_source_classes).scores
    plain = run_in_memory(plan, inputs, rows).scores
    assert secure.keys() == plain.keys() and len(secure) >= 5
    for name in plain:
        assert secure[name] == pytest.approx(plain[name], rel=1e-9, abs=1e-12), name


# --------------------------------------------------------------------------- what a recovered key exposes

def _strip_masks(federation: Federation, upload, spec: SumSpec, key_bytes: bytes, seed: bytes | None) -> Statistics:
    """An attacker's attempt: remove the pairwise masks of the last site in the roster (it
    subtracted every pair mask) using a mask private key, and its self mask if it has the
    seed, then decode the upload as a sum of one site."""
    params, digest, owner = federation.params, federation.params.digest(), upload.site_id
    assert owner == params.sites[-1]
    words = upload.words.copy()
    stream = _Keystream(*words.shape)
    if seed is not None:
        ring_sub(words, stream.fill(_self_mask_seed(seed, digest, params.job_id, upload.phase, owner, spec.digest())))
    key = X25519PrivateKey.from_private_bytes(key_bytes)
    for advertisement in federation.advertisements:
        if advertisement.site_id != owner:
            shared = _exchange(key, advertisement.mask_keys[upload.phase], advertisement.site_id)
            seed_pair = _pair_mask_seed(shared, params, digest, upload.phase, owner, advertisement.site_id,
                                        spec.digest())
            ring_add(words, stream.fill(seed_pair))
    return FixedPointCodec(spec, max_sites=len(params.sites)).decode(words, summed=1)


def _recover(federation: Federation, reveals: list[Reveal], owner: str, kind: str) -> bytes:
    shares = [shamir.Share.from_bytes(federation.params.coordinate(r.site_id), getattr(r, kind)[owner])
              for r in reveals]
    return shamir.combine(shares, threshold=federation.params.threshold)


def test_a_key_recovered_after_a_dropout_does_not_unmask_earlier_phases() -> None:
    rng = np.random.default_rng(13)
    federation = Federation(3, threshold=2, phases=2)
    data = {name: _statistics(rng) for name in federation.names}
    spec = _spec(data["site0"])
    coordinator = federation.coordinator
    coordinator.open_phase(0, spec)
    uploads = {name: federation.sites[name].mask(data[name], phase=0, spec=spec) for name in federation.names}
    for upload in uploads.values():
        coordinator.add_upload(upload)
    request = coordinator.unmask_request(0)
    reveals0 = [federation.sites[n].reveal(request) for n in request.active]
    coordinator.finish(0, reveals0)
    # A dropout in phase 1 ends the job (the active set is fixed), so site2's phase-1 key is
    # never released: the sites refuse a request that drops it.
    federation.upload(1, spec, data, drop=("site2",))
    with pytest.raises(ActiveSetError):
        coordinator.unmask_request(1)
    forged = UnmaskRequest(job_id="job-1", phase=1, active=("site0", "site1"), dropped=("site2",))
    for name in ("site0", "site1"):
        with pytest.raises(ActiveSetError):
            federation.sites[name].reveal(forged)
    # And had it been released: the coordinator holds site2's phase-0 upload and seed, and
    # its phase-1 mask key would not remove the phase-0 masks.
    seed0 = _recover(federation, reveals0, "site2", "seed_shares")
    key1 = federation.sites["site2"]._mask_keys[1].private_bytes_raw()
    with pytest.raises(BoundExceededError, match="a mask was not removed"):
        _strip_masks(federation, uploads["site2"], spec, key1, seed0)
    # Control: with a per-job key (here, the phase-0 key itself) the same attack would succeed.
    phase0_key = federation.sites["site2"]._mask_keys[0].private_bytes_raw()
    exposed = _strip_masks(federation, uploads["site2"], spec, phase0_key, seed0)
    np.testing.assert_array_equal(exposed["class_counts"], data["site2"]["class_counts"])


@pytest.mark.parametrize("self_masks", [True, False])
def test_declaring_an_uploaded_site_dropped_exposes_it_only_without_self_masks(self_masks: bool) -> None:
    rng = np.random.default_rng(14)
    federation = Federation(3, threshold=2, phases=1, self_masks=self_masks)
    data = {name: _statistics(rng) for name in federation.names}
    spec = _spec(data["site0"])
    held_back = federation.sites["site2"].mask(data["site2"], phase=0, spec=spec)  # received, but kept aside
    federation.upload(0, spec, data, drop=("site2",))
    request = federation.coordinator.unmask_request(0)
    reveals = [federation.sites[n].reveal(request) for n in request.active]
    assert all("site2" not in r.seed_shares for r in reveals)
    key = _recover(federation, reveals, "site2", "key_shares")
    if self_masks:
        with pytest.raises(BoundExceededError, match="a mask was not removed"):
            _strip_masks(federation, held_back, spec, key, None)
    else:  # the documented price of the one-round mode
        exposed = _strip_masks(federation, held_back, spec, key, None)
        np.testing.assert_array_equal(exposed["class_counts"], data["site2"]["class_counts"])
