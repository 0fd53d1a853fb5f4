"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret ``s`` (the 32 bytes read as a big-endian integer, so ``s < 2^256``) is the constant
term of a random polynomial ``f`` of degree ``t - 1`` over GF(p); the share of party ``x``
is ``(x, f(x))`` for a nonzero public ``x`` (Shamir 1979, "How to share a secret",
CACM 22(11)). Any ``t`` shares give ``s = f(0)`` by Lagrange interpolation,

    f(0) = sum_i y_i * prod_{j != i} x_j / (x_j - x_i)   (mod p),

and any ``t - 1`` shares are consistent with every possible secret (each secret fixes one
polynomial through them), so they reveal nothing. The field is the Mersenne prime
``p = 2^521 - 1``, chosen because it is a well-known prime above 2^256, so every 32-byte
secret is a field element; a share's ``y`` travels as :data:`SHARE_BYTES` big-endian bytes.

Shamir shares are not authenticated: ``t`` shares always interpolate to *some* value.
:func:`combine` checks any shares beyond ``t`` against the polynomial and refuses a value
of 2^256 or more, and callers check the recovered secret against a public commitment (the
secure sum compares a mask key with its advertised public key, a seed with its hash).
Coefficients come from :func:`secrets.randbelow`, the operating system's CSPRNG.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from fedmte.protocol.errors import ProtocolError, ThresholdError, VerificationError

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_SHARES = 65535


@dataclass(frozen=True)
class Share:
    """The share ``(x, y = f(x))`` held by the party with public coordinate ``x``."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 1 <= self.x <= MAX_SHARES:
            raise ProtocolError(f"a share's x must be in [1, {MAX_SHARES}], got {self.x}")
        if not 0 <= self.y < PRIME:
            raise ProtocolError("a share's y must be a field element in [0, 2^521 - 1)")

    def y_bytes(self) -> bytes:
        """``y`` as :data:`SHARE_BYTES` big-endian bytes."""
        return self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, x: int, y: bytes) -> Share:
        """Parse a share's ``y`` written by :meth:`y_bytes`."""
        if len(y) != SHARE_BYTES:
            raise ProtocolError(f"a share's y is {SHARE_BYTES} bytes, got {len(y)}")
        return cls(x, int.from_bytes(y, "big"))


def split(secret: bytes, *, xs: Sequence[int], threshold: int) -> list[Share]:
    """Shares of ``secret`` for the parties ``xs``; any ``threshold`` of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise ProtocolError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise ProtocolError(f"threshold must be in [1, {len(xs)}] for {len(xs)} shares, got {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in xs]


def combine(shares: Sequence[Share], *, threshold: int) -> bytes:
    """The secret behind ``shares``.

    Raises :class:`ThresholdError` with fewer than ``threshold`` shares, and
    :class:`VerificationError` if the shares beyond the first ``threshold`` do not lie on
    the same polynomial or the value is not a 32-byte secret (a share was altered).
    """
    if threshold < 1:
        raise ProtocolError(f"threshold must be at least 1, got {threshold}")
    if len(shares) < threshold:
        raise ThresholdError(f"{len(shares)} shares cannot recover a secret shared with threshold {threshold}")
    _check_xs([share.x for share in shares])
    base, extra = list(shares[:threshold]), shares[threshold:]
    for share in extra:
        if _interpolate(base, share.x) != share.y:
            raise VerificationError(
                f"share x={share.x} does not lie on the polynomial of the first {threshold} shares; "
                "a share was altered or belongs to another secret"
            )
    value = _interpolate(base, 0)
    if value >= 1 << (8 * SECRET_BYTES):
        raise VerificationError("the shares interpolate to a value above 2^256, not a secret: a share was altered")
    return value.to_bytes(SECRET_BYTES, "big")


def _check_xs(xs: Sequence[int]) -> None:
    if not xs:
        raise ProtocolError("no share coordinates given")
    if len(set(xs)) != len(xs):
        raise ProtocolError(f"share coordinates must be distinct, got {sorted(xs)}")
    if not all(1 <= x <= MAX_SHARES for x in xs):
        raise ProtocolError(f"share coordinates must be in [1, {MAX_SHARES}], got {sorted(xs)}")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """Horner's rule modulo p."""
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value


def _interpolate(shares: Sequence[Share], at: int) -> int:
    """The value at ``at`` of the polynomial of degree < len(shares) through ``shares``."""
    total = 0
    for i, share in enumerate(shares):
        numerator, denominator = 1, 1
        for j, other in enumerate(shares):
            if i != j:
                numerator = numerator * (at - other.x) % PRIME
                denominator = denominator * (share.x - other.x) % PRIME
        total = (total + share.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total
