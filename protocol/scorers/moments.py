"""First and second moments per class, the statistics most feature scorers share.

All moments are taken in the agreed offset coordinates ``x = f - o`` (see
:class:`~fedmte.protocol.scorers.base.Context`), which keeps digits when the feature mean is
large compared with the spread. Scorers that are not translation-invariant (LogME) convert
back with :meth:`Moments.raw`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedmte.protocol import symmetric
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers.base import Context, Requests, Sums


def moment_requests(ctx: Context) -> Requests:
    """n, class counts, class sums and the Gram matrix, all on the centred view."""
    view = ctx.centred_view
    return {
        "n": Stat.of("count"),
        "counts": Stat.of("class_counts"),
        "class_sums": Stat.of("class_sums", view),
        "gram": Stat.of("gram", view),
    }


@dataclass(frozen=True)
class Moments:
    """Pooled moments in offset coordinates; derived quantities are computed on demand."""

    n: int
    counts: np.ndarray
    class_sums: np.ndarray
    gram: np.ndarray
    offset: np.ndarray

    @classmethod
    def from_sums(cls, sums: Sums, ctx: Context) -> Moments:
        return cls(
            n=int(sums["n"]),
            counts=np.asarray(sums["counts"], dtype=np.int64),
            class_sums=np.asarray(sums["class_sums"], dtype=np.float64),
            gram=symmetric.unpack(np.asarray(sums["gram"], dtype=np.float64)),
            offset=ctx.offset,
        )

    @property
    def dim(self) -> int:
        return self.gram.shape[0]

    @cached_property
    def mean(self) -> np.ndarray:
        return self.class_sums.sum(axis=0) / self.n

    @cached_property
    def class_means(self) -> np.ndarray:
        """Per-class means; rows of absent classes are zero (callers skip them)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            means = self.class_sums / self.counts[:, None]
        means[self.counts == 0] = 0.0
        return means

    @cached_property
    def scatter(self) -> np.ndarray:
        """Centred scatter sum_i (x_i - mu)(x_i - mu)^T."""
        mu = self.mean
        return self.gram - self.n * np.outer(mu, mu)

    @cached_property
    def between_scatter(self) -> np.ndarray:
        """sum_c n_c (mu_c - mu)(mu_c - mu)^T over the classes with rows."""
        present = self.counts > 0
        diff = self.class_means[present] - self.mean
        return (diff * self.counts[present, None]).T @ diff

    @cached_property
    def within_scatter(self) -> np.ndarray:
        """sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T = scatter - between scatter."""
        return self.scatter - self.between_scatter

    def raw(self) -> tuple[np.ndarray, np.ndarray]:
        """Gram matrix and class sums of the raw features ``f = x + o``."""
        o = self.offset
        total = self.class_sums.sum(axis=0)
        gram = self.gram + np.outer(o, total) + np.outer(total, o) + self.n * np.outer(o, o)
        class_sums = self.class_sums + self.counts[:, None] * o
        return gram, class_sums
