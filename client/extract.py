"""One streaming pass per model: features, source probabilities and statistics together.

For each batch of the site's usable rows the model runs once, under
``torch.inference_mode()``; its feature output (and, for a model with a source head, the
softmax of its logits: the source-class probabilities of NCE/LEEP-type scorers) feed
:func:`fedmte.protocol.catalogue.accumulate` for the requested statistics and, at the same
time, the site's feature cache. A background thread decodes the next batches. When the model
leaves a core free (it runs on CUDA, or on fewer torch threads than the machine has cores),
another writes the cache and accumulates the statistics of the batches already run, so they
overlap the next forward pass (numpy and torch both release the GIL); otherwise that work
runs between forward passes, because torch's OpenMP workers spin for milliseconds after each
parallel region and a thread beside them slows the model more than it saves
(bench/bench_extraction.py). Memory holds a few batches and the running sums, whatever the
number of rows. Later phases read the cache and never run the model again (:func:`extract`
with a cache hit).

Statistics batch boundaries are fixed (``stats_batch`` usable rows, re-chunked whatever rows
were skipped), so a pass and a later read of the cache feed ``accumulate`` the same float64
batches and give bit-identical statistics. The batch sizes are speed knobs only: any sizes
give the same statistics up to float rounding.

Each model's speed on this site's hardware is measured during the pass (throughput over
the whole pass, the median latency of a full batch and of a single sample, peak resident
memory and, on CUDA, peak device memory); it travels as model metadata for the
coordinator's business constraints.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import statistics as pystats
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text
from threadpoolctl import threadpool_limits

from fedmte.client.architectures import LoadedModel
from fedmte.client.cache import CacheEntry, FeatureCache
from fedmte.client.data import RowReport, SiteData, decoded_batches
from fedmte.client.errors import SiteConfigError
from fedmte.client.preprocess import check_input_size
from fedmte.client.site_config import ComputeConfig
from fedmte.protocol.catalogue import STATISTICS, Batch, accumulate
from fedmte.protocol.requests import Stat
from fedmte.protocol.statistics import Statistics

LATENCY_REPEATS = 5
T = TypeVar("T")
R = TypeVar("R")
Part = tuple[np.ndarray, np.ndarray, np.ndarray | None]


class ExtractionSettings(BaseModel):
    """How to run: the site file's ``[compute]`` plus the prefetch and overlap depths.

    ``prefetch`` is how many batches a background thread decodes ahead; ``overlap`` is how
    many model batches may wait for the statistics thread (0 computes the statistics between
    forward passes, in the model's thread; None: 2 when the model leaves a core free, else
    0). Neither changes the statistics.

    ``stats_rows`` is how many rows the statistics take at a time (a memory/speed knob that
    does not change the statistics beyond float rounding); ``blas_threads`` caps numpy's
    BLAS threads during the pass (None leaves them alone).
    The statistics are small matrix products on one batch; a second spinning thread pool
    next to torch's made them 30x slower on a busy 2-core machine (bench/bench_extraction.py).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(default=256, ge=1, le=65_536)
    threads: int | None = Field(default=None, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = False
    prefetch: int = Field(default=2, ge=0, le=64)
    overlap: int | None = Field(default=None, ge=0, le=64)
    blas_threads: int | None = Field(default=1, ge=1, le=1024)
    stats_rows: int = Field(default=2048, ge=1, le=1_048_576)

    @property
    def stats_batch(self) -> int:
        """Rows per statistics batch: at least ``stats_rows`` and never below ``batch_size``.
        Fewer, larger matrix products cost less per row than one per model batch."""
        return max(self.batch_size, self.stats_rows)

    @classmethod
    def from_compute(cls, compute: ComputeConfig, **overrides: Any) -> ExtractionSettings:
        return cls(**(compute.model_dump() | overrides))


class ModelMetrics(BaseModel):
    """What one model costs on this site's hardware."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str
    threads: int
    batch_size: int
    samples: int
    seconds: float
    throughput: float = Field(description="samples per second over the whole pass (decode, model, statistics, cache)")
    forward_seconds: float
    batch_latency_ms: float | None
    latency_ms: float | None = Field(description="median time of one single-sample forward pass")
    peak_rss_bytes: int | None
    peak_device_bytes: int | None


@dataclass(frozen=True)
class Extraction:
    """The result of one model's pass (or of reading its cache entry)."""

    model_id: str
    dataset: str
    statistics: Statistics
    rows: dict[str, Any]
    metrics: ModelMetrics
    from_cache: bool
    entry: CacheEntry | None


# --------------------------------------------------------------------------- helpers

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SiteConfigError("[compute] device = \"cuda\" but no CUDA device is available; use \"auto\" or \"cpu\"")
    return torch.device(device)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Set torch's intra-op thread count for the block, then restore it."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Produce ``items`` in a background thread, up to ``depth`` ahead (decoding overlaps the
    model, which releases the GIL); errors are re-raised in the consumer."""
    if depth == 0:
        yield from items
        return
    buffer: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            put(_Failure(error))

    thread = threading.Thread(target=work, name="fedmte-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


def consume_in_thread(items: Generator[T, None, None], consume: Callable[[Iterator[T]], R], depth: int) -> R:
    """``consume(items)``, with ``items`` produced in the calling thread and consumed in a
    background thread up to ``depth`` behind, so both sides run at once.

    A consumer error stops the producer and is raised here with its own type; a producer
    error stops the consumer. Either way the consumer has finished before this returns, so
    the caller may clean up what it uses. ``depth`` 0 consumes in the calling thread.
    """
    if depth == 0:
        return consume(items)
    buffer: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    outcome: list[object] = []

    def received() -> Iterator[T]:
        while not stop.is_set():
            item = buffer.get()
            if item is _DONE:
                return
            yield item  # type: ignore[misc]

    def work() -> None:
        try:
            outcome.append(consume(received()))
        except BaseException as error:  # noqa: BLE001 - handed to the producer
            outcome.append(_Failure(error))

    thread = threading.Thread(target=work, name="fedmte-statistics", daemon=True)
    thread.start()

    def put(item: object) -> None:
        while thread.is_alive():
            try:
                buffer.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    try:
        for item in items:
            if outcome:  # the consumer failed: stop producing
                break
            put(item)
        put(_DONE)
    except BaseException:
        stop.set()
        put(_DONE)
        raise
    finally:
        items.close()
        thread.join()
    result = outcome[0]
    if isinstance(result, _Failure):
        raise result.error
    return result  # type: ignore[return-value]


def rebatch(parts: Iterator[Part], size: int) -> Iterator[Part]:
    """Regroup (features, labels, logits) parts into exactly ``size`` rows (the last may be
    shorter), so batch boundaries do not depend on which rows were skipped."""
    pending: list[Part] = []
    count = 0
    for part in parts:
        if not pending and len(part[1]) == size:
            yield part
            continue
        pending.append(part)
        count += len(part[1])
        while count >= size:
            merged = tuple(None if p[0] is None else np.concatenate(p) for p in zip(*pending))
            yield tuple(None if m is None else m[:size] for m in merged)  # type: ignore[misc]
            rest = tuple(None if m is None else m[size:] for m in merged)
            count -= size
            pending = [rest] if count else []  # type: ignore[list-item]
    if count:
        merged = tuple(None if p[0] is None else np.concatenate(p) for p in zip(*pending))
        yield merged  # type: ignore[misc]


@dataclass(frozen=True)
class _Needs:
    """Which inputs the requested statistics read, so a batch converts only those."""

    features: bool
    source_probs: bool

    @classmethod
    def of(cls, requests: Sequence[Stat]) -> _Needs:
        kinds = [STATISTICS.get(stat.kind) for stat in requests]
        # an unknown kind is left to accumulate(), which names it in its error
        return cls(
            features=any(k is None or k.needs_features for k in kinds),
            source_probs=any(k is None or k.needs_source_probs for k in kinds),
        )


def _batch(features: np.ndarray, labels: np.ndarray, logits: np.ndarray | None, num_classes: int, needs: _Needs) -> Batch:
    """The catalogue's float64 batch of what the requested statistics need."""
    return Batch.from_model_outputs(features if needs.features else None, labels,
                                    logits if needs.source_probs else None, num_classes)


class _SamplesPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- samples/s" if speed is None else f"{speed:,.0f} samples/s", style="progress.data.speed")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _SamplesPerSecond(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` = 5); False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak resident memory since the last reset (VmHWM), or the process peak."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the pass

def _forward(model: LoadedModel, inputs: np.ndarray, device: torch.device, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    x = torch.from_numpy(inputs)
    if x.is_floating_point():
        x = x.to(dtype)
    x = x.to(device, non_blocking=True)
    out = model.module(x)
    features = out[model.manifest.feature_output].reshape(len(inputs), -1)
    head = model.source_head
    logits = None if head is None else out[head.output].reshape(len(inputs), -1).cpu().numpy()
    return features.cpu().numpy(), logits


def statistics_overlap(device: torch.device, threads: int) -> int:
    """2 when the statistics thread gets a core the model does not use, else 0."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 if device.type == "cuda" or threads < cores else 0


def _measure_latency(model: LoadedModel, sample: np.ndarray, device: torch.device, dtype: torch.dtype) -> float:
    _forward(model, sample, device, dtype)  # warm-up
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        _forward(model, sample, device, dtype)
        times.append(time.perf_counter() - start)
    return pystats.median(times) * 1000


def run_model(
    model: LoadedModel,
    data: SiteData,
    requests: Sequence[Stat],
    settings: ExtractionSettings,
    cache: FeatureCache | None,
    dataset: str,
) -> Extraction:
    """Stream ``data`` through ``model`` once; accumulate ``requests`` and fill the cache.

    Before a row is decoded, the model's input row and a batch of ``settings.batch_size``
    rows (decoded, and the largest activation where the architecture computes it) are
    checked against the limits the model was loaded under (``model.limits``)."""
    dtype = next(model.module.parameters()).dtype
    check_input_size(model.manifest.preprocessing, model.limits, settings.batch_size, float_itemsize=dtype.itemsize,
                     activations=None if model.size is None else model.size.activations)
    device = resolve_device(settings.device)
    model.module.to(device)
    report: RowReport = data.new_report()
    writer = cache.writer(model.package_id, dataset) if cache is not None else None
    forward_times: list[float] = []
    sizes: list[int] = []
    last_input: list[np.ndarray] = []
    logits_dim = model.source_head.num_classes if model.source_head is not None else 0
    feature_dtype = np.dtype({torch.float32: np.float32, torch.float64: np.float64}[dtype])

    def parts() -> Generator[Part, None, None]:
        decoded = decoded_batches(data, model.manifest.preprocessing, settings.batch_size, report, feature_dtype,
                                  model.limits)
        for inputs, labels in prefetch(decoded, settings.prefetch):
            start = time.perf_counter()
            features, logits = _forward(model, inputs, device, dtype)
            forward_times.append(time.perf_counter() - start)
            sizes.append(len(inputs))
            last_input[:] = [inputs[:1]]
            progress.advance(task, len(labels))
            yield features, labels, logits

    def statistics_of(parts: Iterator[Part]) -> Statistics:
        """The statistics thread's share: the cache writes, then the float64 statistics."""

        def written() -> Iterator[Part]:
            for part in parts:
                if writer is not None:
                    writer.append(*part)
                yield part

        needs = _Needs.of(requests)
        batches = (_batch(f, y, z, len(data.labels), needs) for f, y, z in rebatch(written(), settings.stats_batch))
        return accumulate(list(requests), batches)

    total = data.size_hint() if settings.progress else None
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    try:
        with (
            torch_threads(settings.threads) as threads,
            threadpool_limits(settings.blas_threads, user_api="blas"),
            torch.inference_mode(),
            _progress(settings.progress) as progress,
        ):
            task = progress.add_task(model.manifest.name, total=total)
            overlap = settings.overlap if settings.overlap is not None else statistics_overlap(device, threads)
            statistics = consume_in_thread(parts(), statistics_of, overlap)
            seconds = time.perf_counter() - started
            latency = _measure_latency(model, last_input[0], device, dtype) if last_input else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    full = [t for t, s in zip(forward_times, sizes) if s == settings.batch_size] or forward_times
    metrics = ModelMetrics(
        device=str(device),
        threads=threads,
        batch_size=settings.batch_size,
        samples=report.used,
        seconds=seconds,
        throughput=report.used / seconds if seconds > 0 else 0.0,
        forward_seconds=sum(forward_times),
        batch_latency_ms=pystats.median(full) * 1000 if full else None,
        latency_ms=latency,
        peak_rss_bytes=peak_rss_bytes(),
        peak_device_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
    )
    entry = None
    if writer is not None:
        entry = writer.commit(
            label_names=tuple(data.labels.names),
            feature_dim=model.feature_dim,
            feature_dtype=feature_dtype,
            logits_dim=logits_dim,
            logits_dtype=feature_dtype if logits_dim else None,
            row_report=report.as_dict(),
            metrics=metrics.model_dump(),
        )
    return Extraction(model.package_id, dataset, statistics, report.as_dict(), metrics, False, entry)


def from_cache(entry: CacheEntry, num_classes: int, requests: Sequence[Stat], batch_size: int) -> Statistics:
    """Statistics from a cache entry, ``batch_size`` rows at a time (the pass's
    ``stats_batch`` gives the same batches, hence bit-identical sums)."""
    needs = _Needs.of(requests)
    batches = (_batch(f, y, z, num_classes, needs) for f, y, z in entry.slices(batch_size))
    return accumulate(list(requests), batches)


def extract(
    model: LoadedModel,
    data: SiteData,
    requests: Sequence[Stat] = (),
    *,
    cache: FeatureCache | None = None,
    settings: ExtractionSettings | None = None,
    dataset: str | None = None,
) -> Extraction:
    """Statistics for ``requests`` over the site's data under ``model``.

    With a cache, the first call runs the model and stores its features; later calls (any
    requests, e.g. a later phase's) read them back instead of running the model.
    """
    settings = settings or ExtractionSettings()
    dataset = dataset or data.fingerprint()
    if cache is not None:
        entry = cache.get(model.package_id, dataset)
        if entry is not None:
            statistics = from_cache(entry, len(data.labels), requests, settings.stats_batch)
            return Extraction(
                model.package_id, dataset, statistics, entry.meta.row_report,
                ModelMetrics.model_validate(entry.meta.metrics), True, entry,
            )
    return run_model(model, data, requests, settings, cache, dataset)
