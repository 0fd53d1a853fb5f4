"""What every scorer shares: the context a scorer starts from and its registry entry.

A scorer is a *program*: a generator that yields the statistics it needs for its next
round (``{local name: Stat}``), receives their sums over all sites (``{local name:
array}``) and finally returns the score. The plan runs all requested programs in lockstep,
so round ``k`` of every scorer travels in the same message, and identical requests from
different scorers are computed and sent once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmte.protocol.errors import ScorerDomainError
from fedmte.protocol.requests import Stat, Transform, View

Requests = dict[str, Stat]
Sums = dict[str, np.ndarray]
Program = Generator[Requests, Sums, float]
Bounds = tuple[float | None, float | None]


@dataclass(frozen=True)
class Context:
    """What every site and the coordinator agree on before the first statistics round.

    ``offset`` is the agreed public offset that centred scorers subtract from the features
    before summing (the pooled mean from the centring round, or a public reference mean);
    it is zero when no scorer needs one.
    """

    num_classes: int
    dim: int
    num_source_classes: int
    offset: np.ndarray

    @property
    def centred_view(self) -> View:
        return (Transform.of("offset", offset=self.offset),)


@dataclass(frozen=True)
class ScorerSpec:
    """A registry entry: how to run a scorer and what it costs, for plans and the README."""

    name: str
    program: Callable[..., Program]
    rounds: int
    needs_features: bool
    needs_source_probs: bool
    summary: str
    reference: str
    centred: bool = False
    iterative: bool = False
    opt_in: bool = False
    """Left out of the default set: iterative scorers (many rounds) and partial terms."""
    options: Mapping[str, Any] = field(default_factory=dict)
    helper_scorers: tuple[str, ...] = ()
    """Other registry scorers this one needs for every candidate; a job that asks for it
    runs them too. Their requests are its own, so they cost no extra round."""
    combine: Callable[[Mapping[str, Mapping[str, float]]], dict[str, float]] | None = None
    """A cross-model scorer's last step, for when one model's value depends on the others:
    ``{model: {helper: score}}`` over the candidates whose helpers all succeeded, to
    ``{model: score}``. The ranking ranks that value instead of the program's per-model
    one, which the report keeps as ``auxiliary["<name>_unscaled"]``. None: per-model."""
    bounds: Callable[[Context], Bounds] | None = None
    """The range every exact-sum value lies in, (low, high), None for an open side: proved
    from the formula (each scorer's module says how). The plan clamps a value outside it,
    which only noisy sums can produce, and records the raw value. None: no provable range."""

    def __post_init__(self) -> None:
        if self.combine is not None and not self.helper_scorers:
            raise ValueError(f"scorer {self.name!r}: combine needs the helper_scorers it combines")


def probability_bounds(ctx: Context) -> Bounds:
    """[0, 1]: a mean of probabilities (an accuracy-like score)."""
    return (0.0, 1.0)


def neg_entropy_bounds(ctx: Context) -> Bounds:
    """[-log C, 0]: minus a conditional entropy of the C target labels, or a mean log
    probability bounded below by one (LEEP-like scores, by Jensen's inequality)."""
    return (-math.log(ctx.num_classes), 0.0)


def require_classes(counts: np.ndarray, scorer: str) -> np.ndarray:
    """Indices of the classes that have rows; raise when fewer than two do."""
    present = np.flatnonzero(counts > 0)
    if present.size < 2:
        raise ScorerDomainError(
            f"{scorer} needs at least two classes with samples; the pooled data have {present.size}"
        )
    return present


def require_all_classes(counts: np.ndarray, scorer: str) -> None:
    """Raise when a class in the label space has no rows in the pooled data."""
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ScorerDomainError(
            f"{scorer} is undefined when a class has no samples in the pooled data; "
            f"classes {empty.tolist()} have none (drop them from the label space)"
        )
