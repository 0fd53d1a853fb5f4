"""Additive statistics: what a site sends and what the coordinator sums.

A :class:`Statistics` maps request keys to float64 or int64 arrays. Two of them add
key-by-key (``a + b`` merges two sites), the empty one is the identity, and both
directions of the plain-array form (:meth:`Statistics.to_arrays`,
:meth:`Statistics.from_arrays`) need no pickle, so they can travel as ``.npy`` bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from fedmte.protocol.errors import StatisticsError

ALLOWED_DTYPES = (np.dtype(np.float64), np.dtype(np.int64))


def _checked(key: str, value: object) -> np.ndarray:
    if not isinstance(key, str) or not key:
        raise StatisticsError(f"statistic keys must be non-empty strings, got {key!r}")
    array = np.asarray(value)
    if array.dtype not in ALLOWED_DTYPES:
        raise StatisticsError(
            f"statistic {key!r} has dtype {array.dtype}; only float64 and int64 travel "
            "(cast counts to int64 and everything else to float64)"
        )
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise StatisticsError(f"statistic {key!r} holds NaN or Inf; check the features it came from")
    array = np.array(array, copy=True, order="C")
    array.setflags(write=False)
    return array


class Statistics(Mapping[str, np.ndarray]):
    """Summed statistics of one round, keyed by the request key.

    Values are read-only copies, so a sum can be shared without being mutated.
    """

    __slots__ = ("_blocks",)

    def __init__(self, blocks: Mapping[str, object] | None = None) -> None:
        self._blocks: dict[str, np.ndarray] = {
            key: _checked(key, value) for key, value in (blocks or {}).items()
        }

    @classmethod
    def empty(cls) -> Statistics:
        """The identity of ``+``: what a site with no rows contributes."""
        return cls()

    def __getitem__(self, key: str) -> np.ndarray:
        return self._blocks[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def __add__(self, other: Statistics) -> Statistics:
        if not isinstance(other, Statistics):
            return NotImplemented
        if not self._blocks:
            return other
        if not other._blocks:
            return self
        if self._blocks.keys() != other._blocks.keys():
            missing = sorted(self._blocks.keys() ^ other._blocks.keys())
            raise StatisticsError(f"cannot add statistics with different keys; unmatched: {missing}")
        summed = {}
        for key, left in self._blocks.items():
            right = other._blocks[key]
            if left.shape != right.shape or left.dtype != right.dtype:
                raise StatisticsError(
                    f"cannot add statistic {key!r}: {left.shape} {left.dtype} vs {right.shape} {right.dtype}"
                )
            summed[key] = left + right
        return Statistics(summed)

    __radd__ = __add__

    def check_shapes(self, expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """Raise :class:`StatisticsError` unless keys, shapes and dtypes are as ``expected``."""
        if self._blocks.keys() != expected.keys():
            unmatched = sorted(self._blocks.keys() ^ expected.keys())
            raise StatisticsError(f"statistics keys differ from the request; unmatched: {unmatched}")
        for key, (shape, dtype) in expected.items():
            got = self._blocks[key]
            if got.shape != tuple(shape) or got.dtype != np.dtype(dtype):
                raise StatisticsError(
                    f"statistic {key!r} should be {tuple(shape)} {np.dtype(dtype)}, got {got.shape} {got.dtype}"
                )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays, ready for ``np.savez`` or a message without pickle."""
        return dict(self._blocks)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Statistics:
        """Validate plain arrays (for example read with ``allow_pickle=False``)."""
        return cls(arrays)

    @property
    def nbytes(self) -> int:
        """Payload size in bytes, as it would travel."""
        return sum(block.nbytes for block in self._blocks.values())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.shape}" for k, v in self._blocks.items())
        return f"Statistics({shapes})"
