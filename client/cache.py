"""The site-local feature cache: features computed once per model and dataset, read back
by every later phase without running the model again.

An entry lives in ``<cache_dir>/<model id[:32]>-<dataset fingerprint[:32]>/`` and holds
``features.npy`` and ``labels.npy`` (and ``logits.npy`` for a model with a source head), in
the dtype the model produced, in source row order, plus ``meta.json`` (counts, shapes,
the skipped-row report and the model's measured speed and memory). Entries are written in a
temporary folder while the features stream out of the model (one batch in memory at a time)
and renamed into place only when complete, so a crash never leaves a half entry behind.
Everything is read back with ``np.load(..., mmap_mode="r", allow_pickle=False)``.

The ``.npy`` writer reserves a fixed 128-byte header and rewrites it with the final row
count at the end (the format lets the header be padded with spaces:
numpy/lib/format.py, "Format Version 1.0"), so rows can be appended before their number is
known.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmte.client.errors import CacheError
from fedmte.protocol.catalogue import probs_from_logits

CACHE_SCHEMA = "fedmte.feature_cache.v1"
NPY_HEADER_BYTES = 128
NPY_MAGIC = b"\x93NUMPY\x01\x00"
KEY_HEX = 32


class CacheMeta(BaseModel):
    """``meta.json`` of one cache entry."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["fedmte.feature_cache.v1"] = Field(default=CACHE_SCHEMA, alias="schema")
    model_id: str
    dataset: str
    label_names: tuple[str, ...]
    rows: int = Field(ge=0)
    feature_dim: int = Field(ge=0)
    feature_dtype: str
    logits_dim: int = Field(ge=0)
    logits_dtype: str | None
    row_report: dict[str, Any]
    metrics: dict[str, Any]


def npy_header(dtype: np.dtype, shape: tuple[int, ...], size: int = NPY_HEADER_BYTES) -> bytes:
    """A version-1.0 ``.npy`` header of exactly ``size`` bytes (a multiple of 64)."""
    text = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    room = size - len(NPY_MAGIC) - 2
    body = text.encode("latin1").ljust(room - 1) + b"\n"
    if len(body) != room:
        raise CacheError(f"npy header {text!r} does not fit in {size} bytes")
    return NPY_MAGIC + room.to_bytes(2, "little") + body


class NpyAppender:
    """Append rows to a version-1.0 ``.npy`` file whose final length is not known yet."""

    def __init__(self, path: Path, dtype: np.dtype, width: int | None) -> None:
        self.path = path
        self.dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
        self.width = width
        self.rows = 0
        self._handle = open(path, "wb")
        self._handle.write(b"\0" * NPY_HEADER_BYTES)

    def append(self, array: np.ndarray) -> None:
        want = (len(array),) if self.width is None else (len(array), self.width)
        if array.shape != want:
            raise CacheError(f"cache rows for {self.path.name} should be {want}, got {array.shape}")
        self._handle.write(np.ascontiguousarray(array, dtype=self.dtype).data)  # the buffer itself, no bytes copy
        self.rows += len(array)

    def close(self) -> None:
        shape = (self.rows,) if self.width is None else (self.rows, self.width)
        self._handle.seek(0)
        self._handle.write(npy_header(self.dtype, shape))
        self._handle.close()

    def abort(self) -> None:
        self._handle.close()


class CacheEntry:
    """A complete cache entry, read through memory maps."""

    def __init__(self, path: Path, meta: CacheMeta) -> None:
        self.path = path
        self.meta = meta

    def _load(self, name: str) -> np.ndarray:
        try:
            return np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CacheError(f"cache entry {self.path} is damaged ({name}: {error}); delete the folder to recompute") from None

    def features(self) -> np.ndarray:
        return self._load("features.npy")

    def labels(self) -> np.ndarray:
        return self._load("labels.npy")

    def logits(self) -> np.ndarray | None:
        return self._load("logits.npy") if self.meta.logits_dim else None

    def check(self) -> None:
        """Shapes and dtypes agree with ``meta.json``."""
        features, labels, logits = self.features(), self.labels(), self.logits()
        problems = []
        if features.shape != (self.meta.rows, self.meta.feature_dim) or features.dtype.str != self.meta.feature_dtype:
            problems.append(f"features are {features.shape} {features.dtype}")
        if labels.shape != (self.meta.rows,) or labels.dtype != np.int64:
            problems.append(f"labels are {labels.shape} {labels.dtype}")
        if logits is not None and logits.shape != (self.meta.rows, self.meta.logits_dim):
            problems.append(f"logits are {logits.shape}")
        if problems:
            raise CacheError(f"cache entry {self.path} does not match its meta.json ({'; '.join(problems)}); delete it to recompute")

    def slices(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(features, labels, logits) in row order, ``batch_size`` rows at a time."""
        features, labels, logits = self.features(), self.labels(), self.logits()
        for start in range(0, self.meta.rows, batch_size):
            stop = start + batch_size
            yield (
                np.asarray(features[start:stop]),
                np.asarray(labels[start:stop]),
                None if logits is None else np.asarray(logits[start:stop]),
            )


    def export_npz(self, path: Path | str, batch_size: int = 65_536) -> dict[str, tuple[int, ...]]:
        """Write ``features``, ``labels`` and (with a head) ``source_probs`` (softmax of the
        logits, float64) to an ``.npz``, streaming ``batch_size`` rows at a time."""
        features, labels, logits = self.features(), self.labels(), self.logits()
        parts: dict[str, tuple[np.ndarray, np.dtype, Any]] = {
            "features": (features, features.dtype, lambda a: a),
            "labels": (labels, labels.dtype, lambda a: a),
        }
        if logits is not None:
            parts["source_probs"] = (logits, np.dtype(np.float64), probs_from_logits)
        shapes = {}
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, (array, dtype, convert) in parts.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    member.write(npy_header(dtype, array.shape))
                    for start in range(0, len(array), batch_size):
                        member.write(np.ascontiguousarray(convert(array[start : start + batch_size]), dtype=dtype).tobytes())
                shapes[name] = tuple(array.shape)
        return shapes


class CacheWriter:
    """Streams one entry into a temporary folder; :meth:`commit` renames it into place."""

    def __init__(self, cache: FeatureCache, model_id: str, dataset: str) -> None:
        self.cache = cache
        self.model_id = model_id
        self.dataset = dataset
        cache.root.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache.root))
        self._features: NpyAppender | None = None
        self._logits: NpyAppender | None = None
        self._labels = NpyAppender(self.tmp / "labels.npy", np.dtype(np.int64), None)

    def append(self, features: np.ndarray, labels: np.ndarray, logits: np.ndarray | None) -> None:
        if self._features is None:
            self._features = NpyAppender(self.tmp / "features.npy", features.dtype, features.shape[1])
            if logits is not None:
                self._logits = NpyAppender(self.tmp / "logits.npy", logits.dtype, logits.shape[1])
        self._features.append(features)
        self._labels.append(np.asarray(labels, dtype=np.int64))
        if self._logits is not None and logits is not None:
            self._logits.append(logits)

    def commit(
        self,
        *,
        label_names: tuple[str, ...],
        feature_dim: int,
        feature_dtype: np.dtype,
        logits_dim: int,
        logits_dtype: np.dtype | None,
        row_report: dict[str, Any],
        metrics: dict[str, Any],
    ) -> CacheEntry:
        if self._features is None:  # no usable rows: still a valid (empty) entry
            self._features = NpyAppender(self.tmp / "features.npy", feature_dtype, feature_dim)
            if logits_dim:
                self._logits = NpyAppender(self.tmp / "logits.npy", logits_dtype or np.float32, logits_dim)
        for appender in (self._features, self._labels, self._logits):
            if appender is not None:
                appender.close()
        meta = CacheMeta(
            model_id=self.model_id,
            dataset=self.dataset,
            label_names=label_names,
            rows=self._labels.rows,
            feature_dim=feature_dim,
            feature_dtype=self._features.dtype.str,
            logits_dim=logits_dim,
            logits_dtype=None if self._logits is None else self._logits.dtype.str,
            row_report=row_report,
            metrics=metrics,
        )
        (self.tmp / "meta.json").write_text(meta.model_dump_json(by_alias=True, indent=2))
        final = self.cache.entry_path(self.model_id, self.dataset)
        try:
            os.rename(self.tmp, final)
        except OSError:  # another run finished the same entry first: keep that one
            shutil.rmtree(self.tmp, ignore_errors=True)
        entry = self.cache.get(self.model_id, self.dataset)
        assert entry is not None
        return entry

    def abort(self) -> None:
        for appender in (self._features, self._labels, self._logits):
            if appender is not None:
                appender.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


class FeatureCache:
    """Entries keyed by (model id, dataset fingerprint) under ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def entry_path(self, model_id: str, dataset: str) -> Path:
        return self.root / f"{model_id[:KEY_HEX]}-{dataset[:KEY_HEX]}"

    def get(self, model_id: str, dataset: str) -> CacheEntry | None:
        """The complete entry for this model and dataset, or None."""
        path = self.entry_path(model_id, dataset)
        if not (path / "meta.json").is_file():
            return None
        try:
            meta = CacheMeta.model_validate(json.loads((path / "meta.json").read_text()))
        except (ValueError, ValidationError) as error:
            raise CacheError(f"cache entry {path} has an unreadable meta.json ({error}); delete it to recompute") from None
        if meta.model_id != model_id or meta.dataset != dataset:
            raise CacheError(f"cache entry {path} belongs to another model or dataset; delete it to recompute")
        entry = CacheEntry(path, meta)
        entry.check()
        return entry

    def writer(self, model_id: str, dataset: str) -> CacheWriter:
        return CacheWriter(self, model_id, dataset)
