"""Validation of the arrays a user scores: features, labels, source probabilities, splits.

Checked once, at the edge, with messages that say what is wrong and how to fix it, so the
scorers never see input that would give a NaN score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmte.protocol.errors import InvalidInputError

PROBABILITY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ScoringInputs:
    features: np.ndarray | None  # (n, d) float64
    labels: np.ndarray  # (n,) int64
    source_probs: np.ndarray | None  # (n, Cs) float64
    num_classes: int

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return 0 if self.features is None else self.features.shape[1]

    @property
    def num_source_classes(self) -> int:
        return 0 if self.source_probs is None else self.source_probs.shape[1]


def check_labels(labels: object, num_classes: int | None = None) -> tuple[np.ndarray, int]:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise InvalidInputError(f"labels must be a 1-D array of class indices, got shape {y.shape}")
    if y.size == 0:
        raise InvalidInputError("labels are empty: there is nothing to score")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise InvalidInputError("labels must be integers 0..C-1; got non-integer values")
        y = y.astype(np.int64)
    elif y.dtype.kind not in "iub":
        raise InvalidInputError(f"labels must be integers 0..C-1, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise InvalidInputError(f"labels must be in 0..C-1; found {int(y.min())}")
    inferred = int(y.max()) + 1
    if num_classes is None:
        num_classes = inferred
    elif inferred > num_classes:
        raise InvalidInputError(f"label {inferred - 1} is outside the label space 0..{num_classes - 1}")
    if np.unique(y).size < 2:
        raise InvalidInputError(
            f"all labels are {int(y[0])}: transferability needs at least two classes present"
        )
    return y, num_classes


def check_inputs(
    features: object | None,
    labels: object,
    source_probs: object | None = None,
    num_classes: int | None = None,
) -> ScoringInputs:
    """Validate and convert to float64/int64; raise :class:`InvalidInputError` otherwise."""
    y, num_classes = check_labels(labels, num_classes)
    x = None
    if features is not None:
        x = np.asarray(features)
        if x.ndim != 2:
            raise InvalidInputError(f"features must be a 2-D array (n samples, d dims), got shape {x.shape}")
        if x.dtype.kind not in "fiu":
            raise InvalidInputError(f"features must be numeric, got dtype {x.dtype}")
        x = x.astype(np.float64)
        if x.shape[0] != y.shape[0]:
            raise InvalidInputError(f"features have {x.shape[0]} rows but labels have {y.shape[0]}")
        if x.shape[1] == 0:
            raise InvalidInputError("features have zero columns")
        bad = ~np.isfinite(x)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            raise InvalidInputError(
                f"features contain NaN or Inf in {rows.size} rows (first: {rows[:5].tolist()}); "
                "drop or repair those rows"
            )
    p = None
    if source_probs is not None:
        p = np.asarray(source_probs)
        if p.ndim != 2 or p.shape[0] != y.shape[0]:
            raise InvalidInputError(
                f"source_probs must be (n={y.shape[0]}, source classes), got shape {p.shape}"
            )
        if p.dtype.kind not in "fiu":
            raise InvalidInputError(f"source_probs must be numeric, got dtype {p.dtype}")
        p = p.astype(np.float64)
        if not np.all(np.isfinite(p)) or p.min() < 0:
            raise InvalidInputError("source_probs must be finite and non-negative (softmax outputs)")
        row_sums = p.sum(axis=1)
        if np.max(np.abs(row_sums - 1.0)) > PROBABILITY_TOLERANCE:
            raise InvalidInputError(
                "source_probs rows must sum to 1 (apply softmax to the logits first); "
                f"found a row summing to {row_sums[np.argmax(np.abs(row_sums - 1.0))]:.4g}"
            )
    if x is None and p is None:
        raise InvalidInputError("give features, source_probs or both")
    return ScoringInputs(features=x, labels=y, source_probs=p, num_classes=num_classes)


def uneven_split(n: int, parts: int) -> list[np.ndarray]:
    """Contiguous index ranges of sizes proportional to 1, 2, ..., parts (none empty)."""
    if not 1 <= parts <= n:
        raise InvalidInputError(f"cannot split {n} rows into {parts} non-empty sites")
    weights = np.arange(1, parts + 1, dtype=np.float64)
    bounds = np.floor(np.cumsum(weights) / weights.sum() * n).astype(int)
    bounds = np.maximum(bounds, np.arange(1, parts + 1))  # every site gets at least one row
    starts = np.concatenate([[0], bounds[:-1]])
    return [np.arange(s, e) for s, e in zip(starts, bounds)]


def check_sites(sites: int | Sequence[Sequence[int]] | None, n: int) -> list[np.ndarray]:
    """Row indices per site: ``None`` is one site, an int an uneven split, or explicit lists
    that together cover every row exactly once (a site may hold none: it adds nothing)."""
    if sites is None:
        return [np.arange(n)]
    if isinstance(sites, (int, np.integer)) and not isinstance(sites, bool):
        return uneven_split(n, int(sites))
    parts = []
    for k, site in enumerate(sites):
        idx = np.asarray(site)
        if idx.size == 0:  # an empty list has no integer dtype of its own
            idx = idx.astype(np.int64).reshape(0)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise InvalidInputError(f"site {k} must be a 1-D array of row indices")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise InvalidInputError(f"site {k} has row indices outside 0..{n - 1}")
        parts.append(idx.astype(np.int64))
    if not parts:
        raise InvalidInputError("sites is an empty list; give at least one site")
    if not any(part.size for part in parts):
        raise InvalidInputError("no site holds a row; give each row to one site")
    allrows = np.concatenate(parts)
    if allrows.size != n or np.unique(allrows).size != n:
        raise InvalidInputError("the sites must cover every row exactly once (no row missing or repeated)")
    return parts
