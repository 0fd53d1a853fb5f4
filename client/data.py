"""The site's own data, read where and how the data owner keeps it, one chunk at a time.

Four sources (configured in ``[data]`` of the site file, :mod:`fedmte.client.site_config`):

- ``image_folder``: one subfolder per class, images below it (any depth, sorted order);
  files whose suffix is not an image suffix are ignored and counted.
- ``table``: CSV with a header row, or JSON Lines; a label column plus a text column or an
  image-path column (relative paths are taken from the table's folder).
- ``arrays``: an ``.npz`` (inputs and labels arrays) or an ``.npy`` of inputs plus an
  ``.npy`` of labels; ``.npy`` files are memory-mapped, so their size is not bounded by
  memory. Everything is read with ``allow_pickle=False``.
- ``features``: an ``.npz`` of features the site computed itself (``features``, ``labels``,
  optionally ``source_probs``); no model runs, the statistics read these rows directly.

Labels are names in the site's vocabulary; ``label_map`` renames them, and the result must
be a name of the job's label space (whose order gives the class index). An unknown label is
always an error (:class:`~fedmte.client.errors.LabelMappingError`): silently dropping a
class would bias every score. A corrupt row (an image that does not decode, malformed JSON,
invalid UTF-8, a missing label or input, NaN in a vector) is skipped and counted by reason,
or refused with :class:`~fedmte.client.errors.BadRowsRefusedError` when the site file says
``on_error = "refuse"``.

A dataset's fingerprint (:meth:`SiteData.fingerprint`) hashes the source configuration, the
label space and, per file, its relative path, size and modification time (or its bytes, with
``fingerprint = "content"``); the feature cache is keyed by it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedmte.client.errors import (
    BadRowsRefusedError,
    InputKindMismatchError,
    LabelMappingError,
    SiteDataError,
)
from fedmte.client.limits import DEFAULT_LIMITS, SiteLimits
from fedmte.client.preprocess import (
    RowError,
    check_image_array,
    check_input_size,
    image_array_fits,
    image_batch,
    image_input,
    row_shape_text,
    tokenize,
    vector_batch,
)
from fedmte.client.site_config import ArraySource, DataSource, FeaturesSource, ImageFolderSource, TableSource
from fedmte.protocol.inputs import PROBABILITY_TOLERANCE
from fedmte.protocol.manifest import (
    ImagePreprocessing,
    Preprocessing,
    TextPreprocessing,
    VectorPreprocessing,
    canonical_json,
)

FINGERPRINT_SCHEMA = "fedmte.dataset_fingerprint.v1"
MAX_EXAMPLES = 20
InputKind = Literal["image", "text", "vector", "features"]


# --------------------------------------------------------------------------- labels

class LabelSpace:
    """The job's label names (index = class) and the site's renaming into them."""

    def __init__(self, names: Sequence[str], label_map: dict[str, str] | None = None) -> None:
        names = tuple(names)
        if not names:
            raise LabelMappingError("the label space is empty; give the job's label names")
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise LabelMappingError(f"the label space repeats {duplicates}")
        self.names = names
        self.label_map = dict(label_map or {})
        unknown_targets = sorted(set(self.label_map.values()) - set(names))
        if unknown_targets:
            raise LabelMappingError(f"label_map maps to {unknown_targets}, which are not in the label space {list(names)}")
        self._index = {name: i for i, name in enumerate(names)}

    def __len__(self) -> int:
        return len(self.names)

    def index(self, site_label: str, where: str = "") -> int:
        """Class index of a site label; unknown labels raise :class:`LabelMappingError`."""
        name = self.label_map.get(site_label, site_label)
        try:
            return self._index[name]
        except KeyError:
            raise LabelMappingError(
                f"{where + ': ' if where else ''}label {site_label!r} is not in the label space {list(self.names)}; "
                "add it to [data.label_map] in the site file, or fix the data"
            ) from None


# --------------------------------------------------------------------------- row report

@dataclass
class RowReport:
    """Rows used and skipped (by reason), with the first few skipped locations.

    These counts stay at the site; they are for the data owner's own inspection.
    """

    on_error: Literal["skip", "refuse"] = "skip"
    used: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)
    ignored_files: int = 0

    def skip(self, where: str, reason: str) -> None:
        if self.on_error == "refuse":
            raise BadRowsRefusedError(
                f"{where}: {reason}; the site file says on_error = \"refuse\" (set \"skip\" to skip and count such rows)"
            )
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((where, reason))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "used": self.used,
            "skipped": self.total_skipped,
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "examples": [list(e) for e in self.examples],
            "ignored_files": self.ignored_files,
        }


# --------------------------------------------------------------------------- sources

@dataclass
class Chunk:
    """Up to ``size`` consecutive rows: raw inputs, class indices (-1 where the row is bad
    before decoding, with the reason in ``bad``) and a way to name a row for the report."""

    raws: Sequence[Any] | np.ndarray
    labels: np.ndarray
    where: Callable[[int], str]
    bad: dict[int, str] = field(default_factory=dict)


class SiteData(ABC):
    """One configured data source, mapped into a label space."""

    input_kind: InputKind

    def __init__(self, source: DataSource, labels: LabelSpace) -> None:
        self.source = source
        self.labels = labels

    def new_report(self) -> RowReport:
        """An empty row report that skips or refuses as the site file says."""
        return RowReport(on_error=self.source.on_error)

    @abstractmethod
    def chunks(self, size: int, report: RowReport) -> Iterator[Chunk]:
        """Rows in a fixed order, ``size`` at a time."""

    @abstractmethod
    def files(self) -> list[Path]:
        """The files this source reads, for the fingerprint."""

    def size_hint(self) -> int | None:
        """About how many rows there are (for progress bars), if cheap to know."""
        return None

    def check_compatible(self, pre: Preprocessing) -> None:
        """Raise unless a model with this preprocessing can read this source."""
        if pre.kind != self.input_kind:
            raise InputKindMismatchError(
                f"the model takes {pre.kind} input but the site's {self.source.kind} data holds {self.input_kind}"
            )

    def fingerprint(self) -> str:
        """sha256 of the source settings, label space and its files' metadata (or bytes)."""
        root = self.source.path if self.source.path.is_dir() else self.source.path.parent
        entries = []
        for path in self.files():
            stat = path.stat()
            entry: dict[str, Any] = {"path": os.path.relpath(path, root), "size": stat.st_size}
            if self.source.fingerprint == "content":
                entry["sha256"] = _sha256(path)
            else:
                entry["mtime_ns"] = stat.st_mtime_ns
            entries.append(entry)
        settings = self.source.model_dump(mode="json", exclude={"path", "labels_path", "labels"})
        document = {"schema": FINGERPRINT_SCHEMA, "source": settings, "labels": list(self.labels.names), "files": entries}
        return hashlib.sha256(canonical_json(document)).hexdigest()


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


IDENTITY_SCHEMA = b"fedmte.data_identity.v1\n"
_IDENTITY_CACHE: dict[tuple[tuple[str, int, int], ...], str] = {}


def source_files(source: DataSource) -> list[Path]:
    """The files that hold a source's rows (an image folder's images, else its array or
    table files), whatever the label space."""
    if isinstance(source, ImageFolderSource):
        return sorted(p for p in source.path.rglob("*") if p.is_file() and p.suffix.lower() in source.extensions)
    files = [source.path]
    if isinstance(source, ArraySource) and source.labels_path is not None:
        files.append(source.labels_path)
    return files


def content_identity(source: DataSource) -> str:
    """The data's identity for the privacy ledger: sha256 over the sorted content hashes of
    its files. Renaming the path, moving the folder, relabelling or writing a second site file
    for the same rows leaves it unchanged, so the budget cannot be reset that way. Computed
    once per process for files whose size and modification time did not change."""
    files = source_files(source)
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    known = _IDENTITY_CACHE.get(key)
    if known is None:
        digests = sorted(bytes.fromhex(_sha256(path)) for path in files)
        known = _IDENTITY_CACHE[key] = hashlib.sha256(IDENTITY_SCHEMA + b"".join(digests)).hexdigest()
    return known


class ImageFolderData(SiteData):
    input_kind: InputKind = "image"

    def __init__(self, source: ImageFolderSource, labels: LabelSpace) -> None:
        super().__init__(source, labels)
        root = source.path
        if not root.is_dir():
            raise SiteDataError(f"image folder {root} does not exist or is not a folder")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise SiteDataError(f"image folder {root} has no class subfolders (one folder per class is expected)")
        self.class_index = {name: labels.index(name, f"class folder {name!r}") for name in self.classes}

    def _walk(self, report: RowReport | None) -> Iterator[tuple[Path, int]]:
        extensions = set(self.source.extensions)
        for name in self.classes:
            for directory, subdirs, names in os.walk(self.source.path / name):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                for file_name in sorted(names):
                    if file_name.startswith("."):
                        continue
                    if Path(file_name).suffix.lower() not in extensions:
                        if report is not None:
                            report.ignored_files += 1
                        continue
                    yield Path(directory) / file_name, self.class_index[name]

    def files(self) -> list[Path]:
        return [path for path, _ in self._walk(None)]

    def size_hint(self) -> int:
        return sum(1 for _ in self._walk(None))

    def chunks(self, size: int, report: RowReport) -> Iterator[Chunk]:
        root = self.source.path
        paths: list[Path] = []
        labels: list[int] = []
        for path, label in self._walk(report):
            paths.append(path)
            labels.append(label)
            if len(paths) == size:
                yield self._chunk(paths, labels, root)
                paths, labels = [], []
        if paths:
            yield self._chunk(paths, labels, root)

    @staticmethod
    def _chunk(paths: list[Path], labels: list[int], root: Path) -> Chunk:
        return Chunk(paths, np.asarray(labels, dtype=np.int64), lambda i: str(paths[i].relative_to(root)))


class TableData(SiteData):
    def __init__(self, source: TableSource, labels: LabelSpace) -> None:
        super().__init__(source, labels)
        if not source.path.is_file():
            raise SiteDataError(f"table {source.path} does not exist or is not a file")
        self.input_kind = "text" if source.text_column is not None else "image"
        self.column = source.text_column or source.path_column
        self.format = source.table_format
        if self.format == "csv":
            with open(source.path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
                header = next(csv.reader(handle), None)
            missing = [c for c in (source.label_column, self.column) if header is None or c not in header]
            if missing:
                raise SiteDataError(f"{source.path.name} has no column(s) {missing}; its header is {header}")

    def files(self) -> list[Path]:
        return [self.source.path]

    def size_hint(self) -> int:
        with open(self.source.path, "rb") as handle:
            lines = sum(1 for _ in handle)
        return max(lines - (1 if self.format == "csv" else 0), 0)

    def _rows(self) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
        """(location, row or None, reason if the row is malformed)."""
        if self.format == "csv":
            with open(self.source.path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
                reader = csv.DictReader(handle, restkey="\0extra")
                while True:
                    try:
                        row = next(reader)
                    except StopIteration:
                        return
                    except csv.Error as error:
                        yield f"line {reader.line_num}", None, f"malformed CSV ({error})"
                        continue
                    where = f"line {reader.line_num}"
                    if "\0extra" in row:
                        yield where, None, "more fields than the header"
                    elif any(v is None for v in row.values()):
                        yield where, None, "fewer fields than the header"
                    elif any(_has_surrogates(v) for v in row.values()):
                        yield where, None, "not valid UTF-8"
                    else:
                        yield where, row, None
        else:
            with open(self.source.path, "rb") as handle:
                for number, line in enumerate(handle, start=1):
                    where = f"line {number}"
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line.decode("utf-8"))
                    except UnicodeDecodeError:
                        yield where, None, "not valid UTF-8"
                        continue
                    except ValueError:
                        yield where, None, "malformed JSON"
                        continue
                    if not isinstance(row, dict):
                        yield where, None, "not a JSON object"
                    else:
                        yield where, row, None

    def _record(self, row: dict[str, Any]) -> tuple[Any, int | str]:
        """(raw input, class index) or (None, reason)."""
        label = row.get(self.source.label_column)
        if label is None or label == "":
            return None, "missing label"
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            return None, "label is not a string or an integer"
        value = row.get(self.column)
        if value is None or (self.input_kind == "image" and value == ""):
            return None, f"missing {self.column!r}"
        if not isinstance(value, str):
            return None, f"{self.column!r} is not a string"
        if self.input_kind == "image":
            path = Path(value).expanduser()
            value = path if path.is_absolute() else self.source.path.parent / path
        return value, str(label)

    def chunks(self, size: int, report: RowReport) -> Iterator[Chunk]:
        raws: list[Any] = []
        labels: list[int] = []
        wheres: list[str] = []
        bad: dict[int, str] = {}
        for where, row, reason in self._rows():
            if row is not None:
                raw, label_or_reason = self._record(row)
                if raw is None:
                    reason = str(label_or_reason)
                else:
                    label = self.labels.index(str(label_or_reason), f"{self.source.path.name} {where}")
            if reason is not None:
                bad[len(raws)] = reason
                raw, label = None, -1
            raws.append(raw)
            labels.append(label)
            wheres.append(where)
            if len(raws) == size:
                yield self._chunk(raws, labels, wheres, bad)
                raws, labels, wheres, bad = [], [], [], {}
        if raws:
            yield self._chunk(raws, labels, wheres, bad)

    @staticmethod
    def _chunk(raws: list[Any], labels: list[int], wheres: list[str], bad: dict[int, str]) -> Chunk:
        return Chunk(raws, np.asarray(labels, dtype=np.int64), wheres.__getitem__, bad)


def _has_surrogates(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value) if not value.isascii() else False


class ArrayData(SiteData):
    def __init__(self, source: ArraySource, labels: LabelSpace) -> None:
        super().__init__(source, labels)
        self.inputs, raw_labels = self._load(source)
        if raw_labels.ndim != 1 or len(raw_labels) != len(self.inputs):
            raise SiteDataError(
                f"labels must be a 1-d array with one entry per input row; got {raw_labels.shape} for {self.inputs.shape[0]} rows"
            )
        if self.inputs.ndim not in (2, 3, 4) or self.inputs.dtype.kind not in "fiub":
            raise SiteDataError(
                f"inputs must be numeric (n, d) vectors or (n, h, w[, c]) images; got {self.inputs.shape} {self.inputs.dtype}"
            )
        self.input_kind = "vector" if self.inputs.ndim == 2 else "image"
        self.class_labels = self._map(raw_labels)

    def _load(self, source: ArraySource) -> tuple[np.ndarray, np.ndarray]:
        try:
            if source.path.suffix.lower() == ".npz":
                with np.load(source.path, allow_pickle=False) as archive:
                    missing = [k for k in (source.inputs_key, source.labels_key) if k not in archive.files]
                    if missing:
                        raise SiteDataError(f"{source.path.name} has no array(s) {missing}; it has {archive.files}")
                    return archive[source.inputs_key], archive[source.labels_key]
            if source.labels_path is None:
                raise SiteDataError(f"{source.path.name} is an .npy of inputs; set labels_path to the .npy of labels")
            inputs = np.load(source.path, mmap_mode="r", allow_pickle=False)
            labels = np.load(source.labels_path, allow_pickle=False)
            return inputs, labels
        except (OSError, ValueError) as error:
            raise SiteDataError(f"cannot read {source.path.name} as plain arrays (pickle is never allowed): {error}") from None

    def _map(self, raw: np.ndarray) -> np.ndarray:
        return _map_labels(raw, self.labels, self.source.path.name)

    def files(self) -> list[Path]:
        return [self.source.path] + ([self.source.labels_path] if self.source.labels_path else [])

    def size_hint(self) -> int:
        return len(self.inputs)

    def check_compatible(self, pre: Preprocessing) -> None:
        super().check_compatible(pre)
        if isinstance(pre, VectorPreprocessing) and self.inputs.shape[1] != pre.dim:
            raise InputKindMismatchError(
                f"the model takes {pre.dim}-wide vectors; the site's arrays are {row_shape_text(self.inputs.shape)}")
        if isinstance(pre, ImagePreprocessing):
            check_image_array(self.inputs.shape, self.inputs.dtype, pre)

    def _slices(self, size: int) -> Iterator[np.ndarray]:
        """Row blocks of the inputs. A memory-mapped ``.npy`` is read with plain file reads,
        so pages already used do not stay mapped and resident memory stays flat in n."""
        inputs = self.inputs
        if not (isinstance(inputs, np.memmap) and inputs.flags.c_contiguous):
            for start in range(0, len(inputs), size):
                yield inputs[start : start + size]
            return
        row_shape = inputs.shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * inputs.dtype.itemsize
        with open(self.source.path, "rb") as handle:
            handle.seek(inputs.offset)
            for start in range(0, len(inputs), size):
                rows = min(size, len(inputs) - start)
                block = bytearray(rows * row_bytes)
                if handle.readinto(block) != len(block):
                    raise SiteDataError(f"{self.source.path.name} is shorter than its header says; was it truncated?")
                yield np.frombuffer(block, dtype=inputs.dtype).reshape((rows, *row_shape))

    def chunks(self, size: int, report: RowReport) -> Iterator[Chunk]:
        for start, block in zip(range(0, len(self.inputs), size), self._slices(size)):
            labels = self.class_labels[start : start + size]
            bad = {int(i): "missing label" for i in np.flatnonzero(labels < 0)}
            yield Chunk(block, labels, lambda i, s=start: f"index {s + i}", bad)


class FeatureData(SiteData):
    """Precomputed features (``kind = "features"``): rows the site's statistics read
    directly; no model reads them, so :meth:`check_compatible` refuses every package."""

    input_kind: InputKind = "features"

    def __init__(self, source: FeaturesSource, labels: LabelSpace) -> None:
        super().__init__(source, labels)
        try:
            with np.load(source.path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except (OSError, ValueError) as error:
            raise SiteDataError(f"cannot read {source.path.name} as plain arrays (pickle is never allowed): {error}") from None
        missing = [key for key in (source.features_key, source.labels_key) if key not in arrays]
        if missing:
            raise SiteDataError(f"{source.path.name} has no array(s) {missing}; it has {sorted(arrays)}")
        features = arrays[source.features_key]
        if features.ndim != 2 or features.dtype.kind not in "fiu":
            raise SiteDataError(f"{source.features_key} must be a numeric (n, d) array; got {features.shape} {features.dtype}")
        self.features = features.astype(np.float64)
        raw_labels = arrays[source.labels_key]
        if raw_labels.ndim != 1 or len(raw_labels) != len(self.features):
            raise SiteDataError(f"{source.labels_key} must be a 1-d array with one entry per feature row; got "
                                f"{raw_labels.shape} for {len(self.features)} rows")
        self.class_labels = _map_labels(raw_labels, labels, source.path.name)
        probs = arrays.get(source.source_probs_key)
        if probs is not None:
            if probs.ndim != 2 or len(probs) != len(self.features) or probs.dtype.kind != "f":
                raise SiteDataError(f"{source.source_probs_key} must be a float (n, Cs) array; got {probs.shape} {probs.dtype}")
            probs = probs.astype(np.float64)
        self.source_probs = probs
        bad = ~np.all(np.isfinite(self.features), axis=1)
        if probs is not None:
            bad |= ~np.all(np.isfinite(probs), axis=1) | np.any(probs < 0, axis=1)
            bad |= np.abs(np.nan_to_num(probs).sum(axis=1) - 1.0) > PROBABILITY_TOLERANCE
        self.bad_rows = {int(i): "non-finite or non-probability values" for i in np.flatnonzero(bad)}
        self.bad_rows.update({int(i): "missing label" for i in np.flatnonzero(self.class_labels < 0)})

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_source_classes(self) -> int:
        return 0 if self.source_probs is None else int(self.source_probs.shape[1])

    def files(self) -> list[Path]:
        return [self.source.path]

    def size_hint(self) -> int:
        return len(self.features)

    def check_compatible(self, pre: Preprocessing) -> None:
        raise InputKindMismatchError(
            f"this site holds precomputed features ([data] kind = \"features\"); it runs no model packages "
            f"(the model takes {pre.kind} input)"
        )

    def chunks(self, size: int, report: RowReport) -> Iterator[Chunk]:
        for start in range(0, len(self.features), size):
            labels = self.class_labels[start : start + size]
            bad = {i - start: r for i, r in self.bad_rows.items() if start <= i < start + size}
            yield Chunk(self.features[start : start + size], labels, lambda i, s=start: f"row {s + i}", bad)

    def rows(self, size: int, report: RowReport) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(features, class indices, source probabilities) of the good rows, ``size`` at a time;
        bad rows are skipped and counted (or refused) as the site file says."""
        for start in range(0, len(self.features), size):
            stop = min(start + size, len(self.features))
            keep = np.ones(stop - start, dtype=bool)
            for i, reason in self.bad_rows.items():
                if start <= i < stop:
                    report.skip(f"{self.source.path.name}: row {i}", reason)
                    keep[i - start] = False
            report.used += int(keep.sum())
            probs = None if self.source_probs is None else self.source_probs[start:stop][keep]
            yield self.features[start:stop][keep], self.class_labels[start:stop][keep], probs


def _map_labels(raw: np.ndarray, labels: LabelSpace, where: str) -> np.ndarray:
    """Class index per row, or -1 for a missing (empty) label; unknown labels raise."""
    if raw.dtype.kind in "iu" and not labels.label_map:
        if len(raw) and (raw.min() < 0 or raw.max() >= len(labels)):
            raise LabelMappingError(
                f"integer labels must index the {len(labels)}-name label space; found {int(raw.min())}..{int(raw.max())}"
            )
        return raw.astype(np.int64)
    if raw.dtype.kind not in "iuUS":
        raise LabelMappingError(f"labels must be strings or integers, got dtype {raw.dtype}")
    values, inverse = np.unique(raw, return_inverse=True)
    table = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        table[i] = -1 if text == "" else labels.index(text, where)
    return table[inverse.reshape(-1)]


def open_site_data(source: DataSource, label_names: Sequence[str] | None = None) -> SiteData:
    """Open the configured source in the job's label space (default: ``[data] labels``)."""
    names = label_names if label_names is not None else source.labels
    if names is None:
        raise LabelMappingError(
            "no label space: pass the job's label names (e.g. --labels a,b,c) or set labels = [...] under [data]"
        )
    space = LabelSpace(names, source.label_map)
    if isinstance(source, ImageFolderSource):
        return ImageFolderData(source, space)
    if isinstance(source, TableSource):
        return TableData(source, space)
    if isinstance(source, FeaturesSource):
        return FeatureData(source, space)
    return ArrayData(source, space)


# --------------------------------------------------------------------------- decoding

def _decode_one(raw: Any, pre: Preprocessing) -> np.ndarray:
    if isinstance(pre, ImagePreprocessing):
        return image_input(raw, pre)
    if isinstance(pre, TextPreprocessing):
        return tokenize(raw, pre)
    rows, ok = vector_batch(np.asarray(raw)[None], pre)
    if not ok[0]:
        raise RowError("vector holds NaN or Inf")
    return rows[0]


def decode_chunk(chunk: Chunk, pre: Preprocessing, report: RowReport) -> tuple[np.ndarray, np.ndarray] | None:
    """Network inputs and class indices of a chunk's usable rows (None if there are none).

    Bad rows are reported (skipped and counted, or refused) in row order.
    """
    for i, reason in sorted(chunk.bad.items()):
        report.skip(chunk.where(i), reason)
    good = np.flatnonzero(chunk.labels >= 0)
    raws = chunk.raws
    if isinstance(raws, np.ndarray) and (
        isinstance(pre, VectorPreprocessing)
        or (isinstance(pre, ImagePreprocessing) and image_array_fits(raws.shape, raws.dtype, pre))
    ):
        selected = raws[good] if len(good) != len(raws) else raws
        inputs, ok = vector_batch(selected, pre) if isinstance(pre, VectorPreprocessing) else image_batch(selected, pre)
        for i in good[~ok]:
            report.skip(chunk.where(int(i)), "input holds NaN or Inf")
        labels = chunk.labels[good[ok]]
    else:
        decoded: list[np.ndarray] = []
        kept: list[int] = []
        for i in good:
            try:
                decoded.append(_decode_one(raws[i], pre))
                kept.append(int(i))
            except RowError as error:
                report.skip(chunk.where(int(i)), error.reason)
        if not decoded:
            return None
        inputs = np.stack(decoded)
        labels = chunk.labels[kept]
    if len(labels) == 0:
        return None
    report.used += len(labels)
    return inputs, labels


def decoded_batches(
    data: SiteData, pre: Preprocessing, batch_size: int, report: RowReport, float_dtype: np.dtype | None = None,
    limits: SiteLimits | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, labels) batches of at most ``batch_size`` usable rows, in source order.

    ``float_dtype`` casts floating inputs to the network's dtype here, in the decoding
    thread, rather than in the loop that runs the network. Before the first row is read,
    the preprocessing's row and a batch of ``batch_size`` such rows are checked against the
    site's ``limits`` (``max_input_elements``, ``max_batch_bytes``; default: the defaults of
    :class:`~fedmte.client.limits.SiteLimits`)."""
    itemsize = np.dtype(float_dtype).itemsize if float_dtype is not None else 4
    check_input_size(pre, limits or DEFAULT_LIMITS, batch_size, float_itemsize=itemsize)
    data.check_compatible(pre)
    for chunk in data.chunks(batch_size, report):
        decoded = decode_chunk(chunk, pre, report)
        if decoded is not None:
            inputs, labels = decoded
            if float_dtype is not None and inputs.dtype.kind == "f" and inputs.dtype != float_dtype:
                inputs = inputs.astype(float_dtype)
            elif not inputs.flags.writeable:  # torch.from_numpy wants a writable array
                inputs = inputs.copy()
            yield inputs, labels
