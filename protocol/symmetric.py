"""Packing of symmetric matrices into their upper triangle, the wire form of Gram blocks."""

from __future__ import annotations

import numpy as np


def packed_size(dim: int) -> int:
    """Number of entries in the upper triangle (diagonal included) of a ``dim x dim`` matrix."""
    return dim * (dim + 1) // 2


def pack(matrix: np.ndarray) -> np.ndarray:
    """Upper triangle of the last two axes, row-major: ``(..., d, d) -> (..., d(d+1)/2)``."""
    dim = matrix.shape[-1]
    rows, cols = np.triu_indices(dim)
    return matrix[..., rows, cols]


def unpack(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack`: rebuild the full symmetric matrix."""
    dim = dim_of_packed(packed.shape[-1])
    rows, cols = np.triu_indices(dim)
    full = np.zeros(packed.shape[:-1] + (dim, dim), dtype=packed.dtype)
    full[..., rows, cols] = packed
    full[..., cols, rows] = packed
    return full


def dim_of_packed(size: int) -> int:
    """The ``d`` whose upper triangle has ``size`` entries."""
    dim = int((np.sqrt(8 * size + 1) - 1) // 2)
    if packed_size(dim) != size:
        raise ValueError(f"{size} is not the size of an upper triangle (d(d+1)/2)")
    return dim
