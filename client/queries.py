"""The site's answers to the coordinator's queries, transport-free.

A site holds its rows in a file it names itself (Flower: ``--node-config 'data-path="..."'``;
the coordinator cannot change it). For now that file is an ``.npz`` with ``features``
(n, d), ``labels`` (n,) and optionally ``source_probs`` (n, Cs), read without pickle.

Two queries exist:

``describe``
    the shape of the site's data: feature width and number of source classes (never the
    row count), so the coordinator can plan and check that all sites agree;
``stats``
    one statistics round: a :class:`~fedmte.protocol.messages.RoundRequest` and its arrays,
    decoded against the site's own catalogue (unknown statistics or transforms are refused),
    summed over the site's rows in batches by :func:`~fedmte.protocol.catalogue.accumulate`,
    and returned as plain arrays. The secure sum will mask these arrays before they leave.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from fedmte.protocol.catalogue import Batch, accumulate
from fedmte.protocol.errors import InvalidInputError, ProtocolError
from fedmte.protocol.inputs import PROBABILITY_TOLERANCE
from fedmte.protocol.messages import RoundRequest, decode_round
from fedmte.protocol.wire import DESCRIBE, QUERIES, STATS, Payload

DEFAULT_BATCH_SIZE = 4096
"""Rows per streamed batch; memory holds one batch, and the sums do not depend on it."""

SITE_FILE_KEYS = frozenset({"features", "labels", "source_probs"})


@dataclass(frozen=True)
class SiteData:
    """One site's validated rows."""

    features: np.ndarray | None  # (n, d) float64
    labels: np.ndarray  # (n,) int64, >= 0
    source_probs: np.ndarray | None  # (n, cs) float64

    @property
    def dim(self) -> int:
        return 0 if self.features is None else int(self.features.shape[1])

    @property
    def num_source_classes(self) -> int:
        return 0 if self.source_probs is None else int(self.source_probs.shape[1])

    def batches(self, num_classes: int, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[Batch]:
        """Stream the rows; refuse labels outside the job's label space 0..num_classes-1."""
        if self.labels.size and int(self.labels.max()) >= num_classes:
            raise InvalidInputError(
                f"this site has label {int(self.labels.max())}, outside the job's {num_classes} classes; "
                "the job's label names must cover every class the sites hold"
            )
        for start in range(0, len(self.labels), batch_size):
            rows = slice(start, start + batch_size)
            yield Batch(
                features=None if self.features is None else self.features[rows],
                labels=self.labels[rows],
                num_classes=num_classes,
                source_probs=None if self.source_probs is None else self.source_probs[rows],
            )


def _float_matrix(name: str, value: np.ndarray, rows: int) -> np.ndarray:
    if value.ndim != 2 or value.shape[0] != rows or value.dtype.kind not in "fiu":
        raise InvalidInputError(f"site file: {name} must be a numeric (n={rows}, k) array, got {value.shape} {value.dtype}")
    matrix = value.astype(np.float64)
    if not np.all(np.isfinite(matrix)):
        raise InvalidInputError(f"site file: {name} holds NaN or Inf; repair or drop those rows")
    return matrix


def load_site_data(path: Path) -> SiteData:
    """Read and validate a site's ``.npz`` (no pickle); raise :class:`InvalidInputError`."""
    if not path.is_file():
        raise InvalidInputError(f"site data file {path} does not exist; check the SuperNode's --node-config data-path")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError) as error:
        raise InvalidInputError(f"site data file {path} is not a readable .npz of plain arrays: {error}") from None
    unknown = set(arrays) - SITE_FILE_KEYS
    if unknown or "labels" not in arrays:
        raise InvalidInputError(
            f"site data file {path} must hold 'labels' and 'features' and/or 'source_probs' only; it holds {sorted(arrays)}"
        )
    labels = arrays["labels"]
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise InvalidInputError(f"site file: labels must be a 1-D array of class indices >= 0, got {labels.shape} {labels.dtype}")
    labels = labels.astype(np.int64)
    features = _float_matrix("features", arrays["features"], len(labels)) if "features" in arrays else None
    probs = _float_matrix("source_probs", arrays["source_probs"], len(labels)) if "source_probs" in arrays else None
    if features is None and probs is None:
        raise InvalidInputError(f"site data file {path} has neither features nor source_probs")
    if probs is not None and probs.size:
        if probs.min() < 0 or np.max(np.abs(probs.sum(axis=1) - 1.0)) > PROBABILITY_TOLERANCE:
            raise InvalidInputError("site file: source_probs rows must be non-negative and sum to 1 (softmax outputs)")
    return SiteData(features=features, labels=labels, source_probs=probs)


def describe(data: SiteData) -> Payload:
    """The shape of the site's data, not its size."""
    return Payload(doc={
        "dim": data.dim,
        "num_source_classes": data.num_source_classes,
        "has_features": data.features is not None,
        "has_source_probs": data.source_probs is not None,
    })


def answer_stats(data: SiteData, payload: Payload, batch_size: int = DEFAULT_BATCH_SIZE) -> Payload:
    """Decode one round's requests, sum them over the site's rows, return the sums as arrays."""
    try:
        request = RoundRequest.model_validate(payload.doc)
    except ValidationError as error:
        raise ProtocolError(f"malformed round request: {error.error_count()} problems, first: {error.errors()[0]['msg']}") from None
    stats = decode_round(request, payload.arrays)
    sums = accumulate(stats, data.batches(request.num_classes, batch_size))
    return Payload(doc={"round": request.round}, arrays=sums.to_arrays())


def answer(query: str, payload: Payload, data_path: Path) -> Payload:
    """Dispatch one query by name (``describe`` or ``stats``)."""
    data = load_site_data(data_path)
    if query == DESCRIBE:
        return describe(data)
    if query == STATS:
        return answer_stats(data, payload)
    raise ProtocolError(f"unknown query {query!r}; this site answers {', '.join(QUERIES)}")
