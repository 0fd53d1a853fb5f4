"""Fixed-point encoding of statistics into the ring Z_{2^(64 L)}, the arithmetic of the secure sum.

A secure sum adds integers modulo a power of two, so every statistics block is first turned
into ring elements (Bonawitz et al. 2017, section 3: inputs are vectors in Z_R). A ring
element is ``L`` little-endian 64-bit limbs (``L = 2`` by default: Z_{2^128}); a vector of
``m`` elements is a ``(L, m)`` uint64 array, limb 0 the least significant. Addition,
subtraction and negation carry between limbs (:func:`ring_add`, :func:`ring_sub`,
:func:`ring_neg`), so the sum of the encodings is the encoding of the sum as long as no
value leaves the signed range [-2^(64L-1), 2^(64L-1)).

Encoding (:class:`FixedPointCodec`)
-----------------------------------
Each block of a :class:`SumSpec` carries a public bound ``B``: every site's entry satisfies
``|x| <= B``. With at most ``N`` sites (the job's roster size) and ``G`` guard bits
(:data:`GUARD_BITS`):

* int64 blocks are encoded exactly (two's complement, sign-extended to L limbs). The spec
  requires ``N * B <= 2^63 - 1`` so that the sum is again an int64.
* float64 blocks are scaled by a power of two ``2^k`` and rounded to the nearest integer,
  ``q = rint(x * 2^k)``, with ``k = 64 L - 1 - G - e`` where ``2^e >= N * B``
  (``e`` from ``frexp``). Scaling by a power of two is exact in binary floating point, so
  the only encoding error is the rounding, at most ``2^-(k+1)`` per site and entry, and
  ``|sum q| <= N * (B * 2^k + 1/2) < 2^(64L - 1 - G) + N/2`` cannot wrap.
* A value beyond its bound is refused with :class:`BoundExceededError`, never wrapped.

Decoding ``n`` summed sites reads the signed integer ``Q`` and returns ``Q * 2^-k`` in
float64. The error bound, for each entry, against the exact real sum ``S = sum_i x_i`` of
the sites' float64 values, is

    |decoded - S| <= n * 2^-(k+1) + 2 L * 2^-53 * |S|
                   <= n * N * B * 2^(1 + G - 64 L) + 2 L * 2^-53 * |S|,

(:meth:`FixedPointCodec.error_bound`): the first term is the rounding at the sites (about
``4e-34 * n * N * B`` with the defaults ``L = 2, G = 16``), the second the final conversion
of a 128-bit integer to float64 (under two units in the last place). So the decoded sum is
as accurate as float64 can represent the exact sum, usually more accurate than adding the
float64 blocks, and independent of the order and grouping of the sites: with 5 sites and a
bound 10^9 times the largest value, the first term is still about 1e-23 of that value. With
``L = 1`` (Z_{2^64}) the first term is ``n * N * B * 2^(G - 63)``, about
``7e-15 * n * N * B`` with 16 guard bits: relative to the bound, not to the values, so a
loose bound costs precision there.

Decoding also checks ``|Q| <= n * (B * 2^k + 1/2)``. Sums of honest sites always pass; a
vector with a mask left in it is uniform on the ring and fails the check in each entry
with probability ``1 - 2^-G`` or so, so a wrong unmasking is refused rather than returned.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedmte.protocol.errors import BoundExceededError, StatisticsError
from fedmte.protocol.statistics import Statistics

SUM_SPEC_SCHEMA = "fedmte.sum_spec.v1"
WORD_BITS = 64
DEFAULT_LIMBS = 2
MAX_LIMBS = 8
GUARD_BITS = 16
INT64_MAX = 2**63 - 1
MAX_ENTRIES = 2**31
_CHUNK = 1 << 14
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
_FRACTION_BITS = np.uint64((1 << 52) - 1)
_HIDDEN_BIT = np.uint64(1 << 52)


class BlockSpec(BaseModel):
    """One statistics block as the secure sum sees it: key, shape, dtype and the public
    per-site bound ``bound`` on the absolute value of every entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1, max_length=256)
    shape: tuple[int, ...] = Field(max_length=8)
    dtype: Literal["float64", "int64"]
    bound: int | float = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> BlockSpec:
        if any(side < 0 for side in self.shape):
            raise ValueError(f"block {self.key!r} has a negative side in shape {self.shape}")
        if not math.isfinite(self.bound):
            raise ValueError(f"block {self.key!r} needs a finite bound, got {self.bound}")
        if self.dtype == "int64" and (self.bound != int(self.bound) or self.bound > INT64_MAX):
            raise ValueError(f"int64 block {self.key!r} needs an integer bound below 2^63, got {self.bound}")
        return self

    @property
    def int_bound(self) -> int:
        """The bound of an int64 block as an exact integer."""
        return int(self.bound)

    @property
    def size(self) -> int:
        """Number of entries."""
        return math.prod(self.shape)


class SumSpec(BaseModel):
    """The public description of what one secure-sum phase adds: the blocks in order and
    the ring width in 64-bit limbs. Every site and the coordinator must hold the same spec;
    its :meth:`digest` is bound into the masks, so a site with another spec cannot cancel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: Literal["fedmte.sum_spec.v1"] = Field(default=SUM_SPEC_SCHEMA, alias="schema")
    blocks: tuple[BlockSpec, ...] = Field(min_length=1, max_length=4096)
    limbs: int = Field(default=DEFAULT_LIMBS, ge=1, le=MAX_LIMBS)
    context: str = Field(default="", max_length=128, pattern=r"^[0-9a-f]*$")
    """An opaque public digest the phase is bound to (hex), e.g. the digest of the signed
    request the sites answered: it enters :meth:`digest`, hence every mask, so sites that
    saw different requests produce masks that do not cancel and the sum does not decode."""

    @model_validator(mode="after")
    def _unique(self) -> SumSpec:
        keys = [block.key for block in self.blocks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"sum spec lists a block key twice: {sorted(k for k in keys if keys.count(k) > 1)}")
        if sum(block.size for block in self.blocks) > MAX_ENTRIES:
            raise ValueError(f"sum spec has more than {MAX_ENTRIES} entries; split it over phases")
        return self

    @classmethod
    def for_statistics(cls, example: Statistics, bounds: Mapping[str, float], *, limbs: int = DEFAULT_LIMBS,
                       context: str = "") -> SumSpec:
        """The spec of statistics shaped like ``example``, with one public bound per key."""
        missing = sorted(set(example) ^ set(bounds))
        if missing:
            raise StatisticsError(f"bounds and statistics name different keys: {missing}; give one bound per block")
        return cls(
            blocks=tuple(
                BlockSpec(key=key, shape=value.shape, dtype=str(value.dtype), bound=bounds[key])
                for key, value in example.items()
            ),
            limbs=limbs,
            context=context,
        )

    def digest(self) -> bytes:
        """sha256 of the canonical JSON of the spec."""
        return hashlib.sha256(self.model_dump_json(by_alias=True).encode("utf-8")).digest()


# --------------------------------------------------------------------------- ring arithmetic

def ring_zeros(limbs: int, size: int) -> np.ndarray:
    """The zero vector of ``size`` ring elements: a ``(limbs, size)`` uint64 array."""
    return np.zeros((limbs, size), dtype=np.uint64)


def ring_add(accumulator: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``accumulator += other`` modulo 2^(64 L), in place, carrying between limbs."""
    _check_pair(accumulator, other)
    carry = None
    last = accumulator.shape[0] - 1
    for limb in range(accumulator.shape[0]):
        word = accumulator[limb]
        np.add(word, other[limb], out=word)
        overflow = word < other[limb] if limb < last else None
        if carry is not None:
            np.add(word, carry, out=word)
            if overflow is not None:
                overflow |= word < carry
        carry = overflow.astype(np.uint64) if overflow is not None else None
    return accumulator


def ring_sub(accumulator: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``accumulator -= other`` modulo 2^(64 L), in place, borrowing between limbs."""
    _check_pair(accumulator, other)
    borrow = None
    last = accumulator.shape[0] - 1
    for limb in range(accumulator.shape[0]):
        word = accumulator[limb]
        under = word < other[limb] if limb < last else None
        np.subtract(word, other[limb], out=word)
        if borrow is not None:
            if under is not None:
                under |= word < borrow
            np.subtract(word, borrow, out=word)
        borrow = under.astype(np.uint64) if under is not None else None
    return accumulator


def ring_neg(words: np.ndarray) -> np.ndarray:
    """``-words`` modulo 2^(64 L), as a new array."""
    return ring_sub(ring_zeros(*words.shape), words)


def _check_pair(accumulator: np.ndarray, other: np.ndarray) -> None:
    if accumulator.dtype != np.uint64 or other.dtype != np.uint64 or accumulator.shape != other.shape:
        raise StatisticsError(
            f"ring vectors must be uint64 arrays of one shape, got {accumulator.dtype}{accumulator.shape} "
            f"and {other.dtype}{other.shape}"
        )
    if not accumulator.flags.writeable:
        raise StatisticsError("the ring accumulator is read-only; add into a copy")


# --------------------------------------------------------------------------- codec

class FixedPointCodec:
    """Encode one site's :class:`Statistics` into ring words, and decode a sum of them.

    Parameters
    ----------
    spec : SumSpec
        Blocks, public bounds and ring width.
    max_sites : int
        The largest number of sites that can be summed (the job's roster size ``N``); it
        sizes the float scales and the int64 headroom.
    guard_bits : int
        Spare high bits (``G`` in the module docstring): more of them makes a wrongly
        unmasked sum easier to detect and costs precision only with ``L = 1``.
    """

    def __init__(self, spec: SumSpec, *, max_sites: int, guard_bits: int = GUARD_BITS) -> None:
        if max_sites < 1:
            raise StatisticsError(f"max_sites must be at least 1, got {max_sites}")
        if not 1 <= guard_bits <= WORD_BITS * spec.limbs // 2:
            raise StatisticsError(f"guard_bits must be in [1, {WORD_BITS * spec.limbs // 2}], got {guard_bits}")
        self.spec = spec
        self.max_sites = max_sites
        self.limbs = spec.limbs
        self.guard_bits = guard_bits
        self._offsets: dict[str, tuple[int, int]] = {}
        self._exponents: dict[str, int] = {}
        offset = 0
        for block in spec.blocks:
            self._offsets[block.key] = (offset, offset + block.size)
            offset += block.size
            if block.dtype == "int64":
                if block.int_bound * max_sites > INT64_MAX:
                    raise StatisticsError(
                        f"int64 block {block.key!r}: {max_sites} sites x bound {block.int_bound} can overflow int64; "
                        "lower the bound"
                    )
            else:
                if not math.isfinite(max_sites * block.bound):
                    raise StatisticsError(f"block {block.key!r}: {max_sites} x bound {block.bound} overflows float64")
                _, exponent = math.frexp(max_sites * block.bound)  # max_sites * bound <= 2^exponent
                self._exponents[block.key] = WORD_BITS * self.limbs - 1 - guard_bits - exponent
        self.size = offset

    def exponent(self, key: str) -> int:
        """The scale exponent ``k`` of a float64 block: entries travel as ``rint(x * 2^k)``."""
        return self._exponents[key]

    def encode(self, statistics: Statistics) -> np.ndarray:
        """One site's statistics as a ``(L, size)`` uint64 ring vector.

        Raises :class:`StatisticsError` if keys, shapes or dtypes differ from the spec and
        :class:`BoundExceededError` if an entry's absolute value exceeds its block's bound.
        """
        statistics.check_shapes({b.key: (b.shape, np.dtype(b.dtype)) for b in self.spec.blocks})
        words = ring_zeros(self.limbs, self.size)
        for block in self.spec.blocks:
            start, stop = self._offsets[block.key]
            values = statistics[block.key].reshape(-1)
            if block.dtype == "int64":
                bound = block.int_bound
                if np.any((values > bound) | (values < -bound)):
                    worst = int(np.max(np.abs(values.astype(np.float64))))
                    raise BoundExceededError(
                        f"block {block.key!r} holds {worst}, beyond its public bound {bound}; raise the bound"
                    )
                words[:, start:stop] = _encode_int(values, self.limbs)
            else:
                if np.any(np.abs(values) > block.bound):
                    raise BoundExceededError(
                        f"block {block.key!r} holds {float(np.max(np.abs(values))):.6g}, beyond its public bound "
                        f"{block.bound:.6g}; raise the bound in the sum spec or clip the features harder"
                    )
                exponent = self._exponents[block.key]
                for lo in range(0, block.size, _CHUNK):  # chunks keep the temporaries in cache
                    hi = min(lo + _CHUNK, block.size)
                    words[:, start + lo:start + hi] = _encode_float(values[lo:hi], exponent, self.limbs)
        return words

    def decode(self, words: np.ndarray, *, summed: int) -> Statistics:
        """The :class:`Statistics` whose encoding, summed over ``summed`` sites, is ``words``.

        Raises :class:`BoundExceededError` if an entry lies outside ``summed`` times its
        bound: the sum was not fully unmasked, or a site broke the bound.
        """
        if words.dtype != np.uint64 or words.shape != (self.limbs, self.size):
            raise StatisticsError(
                f"a sum for this spec is a ({self.limbs}, {self.size}) uint64 array, got {words.dtype}{words.shape}"
            )
        if not 1 <= summed <= self.max_sites:
            raise StatisticsError(f"summed must be in [1, {self.max_sites}], got {summed}")
        blocks: dict[str, np.ndarray] = {}
        for block in self.spec.blocks:
            start, stop = self._offsets[block.key]
            part = words[:, start:stop]
            if block.dtype == "int64":
                values = _decode_int(part, block.key)
                limit = summed * block.int_bound
                outside = (values > limit) | (values < -limit)
            else:
                exponent = self._exponents[block.key]
                magnitude, negative = np.empty(block.size), np.empty(block.size, dtype=bool)
                for lo in range(0, block.size, _CHUNK):  # chunks keep the temporaries in cache
                    hi = min(lo + _CHUNK, block.size)
                    magnitude[lo:hi], negative[lo:hi] = _magnitude(part[:, lo:hi])
                limit = summed * (math.ldexp(block.bound, exponent) + 0.5)
                outside = magnitude > limit * (1 + 1e-12)
                values = np.ldexp(magnitude, -exponent)
                np.negative(values, out=values, where=negative)
            if np.any(outside):
                raise BoundExceededError(
                    f"the sum of block {block.key!r} over {summed} sites lies outside {summed} x its bound in "
                    f"{int(np.count_nonzero(outside))} entries: a mask was not removed or a site broke the bound"
                )
            blocks[block.key] = values.reshape(block.shape)
        return Statistics(blocks)

    def error_bound(self, key: str, *, summed: int, value: np.ndarray | float) -> np.ndarray | float:
        """Largest ``|decoded - exact sum|`` of a float64 block for a sum of ``summed`` sites
        whose exact value is ``value`` (see the module docstring); zero for int64 blocks."""
        if key not in self._exponents:
            return 0.0 * np.abs(value)
        rounding = summed * math.ldexp(1.0, -self._exponents[key] - 1)
        return rounding + 2 * self.limbs * 2.0**-53 * np.abs(value)


def _encode_int(values: np.ndarray, limbs: int) -> np.ndarray:
    out = np.empty((limbs, values.size), dtype=np.uint64)
    out[0] = values.view(np.uint64)
    out[1:] = np.where(values < 0, _ALL_ONES, np.uint64(0))
    return out


def _decode_int(words: np.ndarray, key: str) -> np.ndarray:
    values = words[0].view(np.int64).copy()
    extension = np.where(values < 0, _ALL_ONES, np.uint64(0))
    if any(np.any(words[limb] != extension) for limb in range(1, words.shape[0])):
        raise BoundExceededError(
            f"the sum of int64 block {key!r} does not fit int64: a mask was not removed or a site broke the bound"
        )
    return values


def _encode_float(values: np.ndarray, exponent: int, limbs: int) -> np.ndarray:
    """``rint(values * 2^exponent)`` as two's-complement ring words, exactly.

    The scaled value ``q`` is 0 or an integer-valued float64 of magnitude at least 1, so
    ``|q| = m * 2^s`` with ``m`` its 53-bit significand and ``s`` its unbiased exponent minus
    52, both read from the IEEE 754 bits; limb ``j`` of ``|q|`` is ``m`` shifted by
    ``s - 64 j`` bits, left or right (numpy defines shifts of 64 bits or more as 0).
    """
    scaled = np.rint(np.ldexp(values, exponent))
    bits = np.abs(scaled).view(np.uint64)
    biased = (bits >> np.uint64(52)).astype(np.int64)
    significand = (bits & _FRACTION_BITS) | _HIDDEN_BIT
    significand[biased == 0] = 0
    shift = biased - 1075
    out = np.empty((limbs, values.size), dtype=np.uint64)
    for limb in range(limbs):
        offset = shift - WORD_BITS * limb
        left = np.maximum(offset, 0).astype(np.uint64)
        right = np.maximum(-offset, 0).astype(np.uint64)
        out[limb] = (significand << left) >> right
    negative = scaled < 0
    if np.any(negative):
        np.copyto(out, ring_neg(out), where=negative[np.newaxis, :])
    return out


def _magnitude(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|Q| as float64 and the sign of the signed ring integers ``words``.

    Each limb converts to float64 with one rounding and Horner's rule adds one per limb, so
    the relative error is below ``(2 L - 1) * 2^-53``.
    """
    negative = (words[-1] >> np.uint64(WORD_BITS - 1)).astype(bool)
    absolute = words
    if np.any(negative):
        absolute = np.array(words, copy=True)
        np.copyto(absolute, ring_neg(np.ascontiguousarray(words)), where=negative[np.newaxis, :])
    magnitude = absolute[-1].astype(np.float64)
    for limb in reversed(range(words.shape[0] - 1)):
        magnitude = magnitude * 2.0**WORD_BITS + absolute[limb].astype(np.float64)
    return magnitude, negative
