"""Awkward data for the scorer tests: small, seeded, each stressing one weakness."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    name: str
    features: np.ndarray
    labels: np.ndarray
    source_probs: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


def _labels(rng: np.random.Generator, n: int, classes: int, min_per_class: int = 3) -> np.ndarray:
    labels = np.concatenate([np.repeat(np.arange(classes), min_per_class), rng.integers(0, classes, n - classes * min_per_class)])
    return np.sort(labels)  # sorted, so a contiguous site split leaves classes out of some sites


def make(name: str, n: int, d: int, classes: int, *, source_classes: int = 7, offset: float = 0.0, separation: float = 1.0, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    labels = _labels(rng, n, classes)
    centres = rng.normal(scale=separation, size=(classes, d))
    scales = rng.uniform(0.5, 2.0, size=d)
    features = centres[labels] + rng.normal(size=(n, d)) * scales + offset
    logits = rng.normal(size=(n, source_classes)) + 2.0 * np.eye(source_classes)[labels % source_classes]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return Dataset(name, features, labels, probs)


DATASETS: dict[str, Dataset] = {
    "basic": make("basic", n=240, d=12, classes=4, seed=1),
    "d_gt_n": make("d_gt_n", n=40, d=60, classes=3, seed=2),
    "binary": make("binary", n=150, d=6, classes=2, seed=3),
    "many_classes": make("many_classes", n=500, d=10, classes=50, separation=2.0, seed=4),
    "large_offset": make("large_offset", n=240, d=8, classes=4, offset=1e3, seed=5),
    "well_separated": make("well_separated", n=200, d=16, classes=5, separation=4.0, seed=6),
}
"""Every scorer must match its reference on each of these (see tests/refs)."""


def site_split_without_class(dataset: Dataset, absent: int = 0, sites: int = 3) -> list[np.ndarray]:
    """Row sets for ``sites`` sites where the first site holds no row of class ``absent``."""
    rows = np.arange(len(dataset.labels))
    has = dataset.labels == absent
    others = rows[~has]
    first = others[: len(others) // (sites + 1)]
    rest = np.setdiff1d(rows, first)
    return [first, *np.array_split(rest, sites - 1)]
