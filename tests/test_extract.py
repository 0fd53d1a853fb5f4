"""Streaming extraction: one pass, statistics equal to one big batch, identical from the cache."""

from __future__ import annotations

from pathlib import Path

import os
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import softmax as scipy_softmax

from fedmte.client.architectures import LoadedModel, load_model
from fedmte.client.cache import FeatureCache, NpyAppender
from fedmte.client.data import open_site_data
from fedmte.client.errors import BadRowsRefusedError, SiteConfigError
from fedmte.client.extract import ExtractionSettings, consume_in_thread, extract, prefetch, rebatch, statistics_overlap
from fedmte.client.packages import generate_signing_key, public_key_string
from fedmte.client.site_config import parse_site_config
from fedmte.protocol.catalogue import Batch, accumulate
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.requests import Stat, Transform
from fedmte.client.architectures import initial_weights, pack_model
from tests.client_helpers import MLP_CONFIG, MLP_PRE, pack

KEY = generate_signing_key()
PINNED = [public_key_string(KEY.public_key())]
LABELS = ["a", "b", "c"]


def requests(dim: int) -> list[Stat]:
    offset = Transform.of("offset", offset=np.linspace(-1, 1, dim))
    return [
        Stat.of("count"),
        Stat.of("class_counts"),
        Stat.of("sum"),
        Stat.of("class_sums"),
        Stat.of("gram"),
        Stat.of("gram", view=(offset,)),
        Stat.of("soft_joint"),
        Stat.of("hard_joint"),
    ]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = tmp_path_factory.mktemp("pkg") / "mlp"
    pack(path, KEY, "mlp", seed=5)
    return load_model(path, PINNED)


@pytest.fixture
def vectors(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(203, 6))
    y = rng.integers(0, 3, size=203)
    x[[5, 77, 150]] = np.nan  # three rows the site skips
    np.savez(tmp_path / "d.npz", inputs=x, labels=y)
    return tmp_path / "d.npz", x, y


def site_data(path: Path, **extra: object) -> object:
    source = parse_site_config({"data": {"kind": "arrays", "path": str(path), **extra}}, Path("/")).data
    return open_site_data(source, LABELS)


def reference(model: LoadedModel, x: np.ndarray, y: np.ndarray, reqs: list[Stat]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The same statistics from one forward pass over all usable rows, as one batch."""
    ok = np.isfinite(x).all(axis=1)
    with torch.inference_mode():
        weight_dtype = next(model.module.parameters()).dtype
        out = model.module(torch.from_numpy(x[ok]).to(weight_dtype))
    features = out["features"].numpy().astype(np.float64)
    probs = scipy_softmax(out["logits"].numpy().astype(np.float64), axis=1)
    stats = accumulate(reqs, [Batch(features, y[ok].astype(np.int64), 3, probs)])
    return stats.to_arrays(), features


@pytest.fixture(scope="module")
def mlp64(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = tmp_path_factory.mktemp("pkg") / "mlp64"
    config = MLP_CONFIG | {"dtype": "float64"}
    pack_model(path, name="mlp64", architecture="mlp", config=config, preprocessing=MLP_PRE, license="MIT",
               tensors=initial_weights("mlp", config, 5), key=KEY, source_head={"num_classes": 4})
    return load_model(path, PINNED)


@pytest.mark.parametrize("batch_size, stats_rows", [(1, 1), (7, 5), (64, 2048), (1000, 1)])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_streaming_equals_one_big_batch(
    mlp: LoadedModel, mlp64: LoadedModel, vectors: tuple[Path, np.ndarray, np.ndarray], batch_size: int,
    stats_rows: int, precision: str,
) -> None:
    """float32 networks give a row slightly different bits in batches of other sizes (BLAS
    blocking), hence the float32 tolerance; float64 networks agree to 1e-10."""
    model, rtol = (mlp, 1e-5) if precision == "float32" else (mlp64, 1e-10)
    path, x, y = vectors
    reqs = requests(model.feature_dim)
    settings = ExtractionSettings(batch_size=batch_size, stats_rows=stats_rows, device="cpu")
    result = extract(model, site_data(path), reqs, settings=settings)
    want, _ = reference(model, x, y, reqs)
    got = result.statistics.to_arrays()
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=rtol, err_msg=key)
    assert result.rows["used"] == 200 and result.rows["skipped"] == 3
    assert int(got[reqs[0].key]) == 200


def test_cache_gives_identical_statistics_without_running_the_model(
    mlp: LoadedModel, vectors: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, x, y = vectors
    cache = FeatureCache(tmp_path / "cache")
    reqs = requests(mlp.feature_dim)
    settings = ExtractionSettings(batch_size=16, stats_rows=24, device="cpu")
    first = extract(mlp, site_data(path), reqs, cache=cache, settings=settings)
    no_cache = extract(mlp, site_data(path), reqs, settings=settings)
    assert not first.from_cache and first.entry is not None

    def refuse(*args: object) -> None:
        raise AssertionError("the model ran although its features are cached")

    monkeypatch.setattr(mlp.module, "forward", refuse)
    second = extract(mlp, site_data(path), reqs, cache=cache, settings=settings)
    assert second.from_cache and second.rows == first.rows
    assert second.metrics == first.metrics
    for key, value in first.statistics.items():
        assert np.array_equal(second.statistics[key], value), key
        assert np.array_equal(no_cache.statistics[key], value), key
    # a later phase's new request is served from the cache too
    later = [Stat.of("class_sq_sums"), Stat.of("norm4_sum")]
    from_cache = extract(mlp, site_data(path), later, cache=cache, settings=settings)
    monkeypatch.undo()
    fresh = extract(mlp, site_data(path), later, settings=settings)
    for key, value in fresh.statistics.items():
        assert np.array_equal(from_cache.statistics[key], value), key
    _, features = reference(mlp, x, y, [])
    np.testing.assert_allclose(first.entry.features(), features, rtol=1e-6)
    assert first.entry.features().dtype == np.float32
    assert first.entry.labels().tolist() == y[np.isfinite(x).all(axis=1)].tolist()


def test_statistics_thread_gives_the_bits_of_the_model_thread(
    mlp: LoadedModel, vectors: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Overlapping the statistics with the next forward pass changes when they run, not what
    they sum: same float64 batches in the same order, hence identical bits and cache."""
    path, _, _ = vectors
    reqs = requests(mlp.feature_dim)
    results = {}
    for overlap in (0, 1, 3):
        settings = ExtractionSettings(batch_size=7, stats_rows=24, overlap=overlap, device="cpu")
        results[overlap] = extract(mlp, site_data(path), reqs, cache=FeatureCache(tmp_path / f"c{overlap}"), settings=settings)
    serial = results[0]
    for overlap in (1, 3):
        for key, value in serial.statistics.items():
            assert np.array_equal(results[overlap].statistics[key], value), (overlap, key)
        assert np.array_equal(results[overlap].entry.features(), serial.entry.features())
        assert np.array_equal(results[overlap].entry.logits(), serial.entry.logits())
        assert results[overlap].rows == serial.rows


def test_statistics_thread_only_when_the_model_leaves_a_core_free() -> None:
    cores = len(os.sched_getaffinity(0))
    assert statistics_overlap(torch.device("cpu"), cores) == 0  # torch's workers spin on every core
    assert statistics_overlap(torch.device("cpu"), max(cores - 1, 1)) == (2 if cores > 1 else 0)
    assert statistics_overlap(torch.device("cuda"), cores) == 2  # the model runs on the GPU


def test_a_statistics_thread_error_reaches_the_caller_and_leaves_no_cache_entry(
    tmp_path: Path, vectors: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    pack(tmp_path / "nohead", KEY, "mlp", head=False)
    model = load_model(tmp_path / "nohead", PINNED)
    cache = FeatureCache(tmp_path / "cache")
    settings = ExtractionSettings(batch_size=8, stats_rows=8, overlap=2, device="cpu")
    with pytest.raises(InvalidInputError, match="needs source probabilities"):
        extract(model, site_data(vectors[0]), [Stat.of("soft_joint")], cache=cache, settings=settings)
    assert list((tmp_path / "cache").iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name == "fedmte-statistics"]


def test_cache_key_follows_the_data(mlp: LoadedModel, vectors: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    path, x, y = vectors
    cache = FeatureCache(tmp_path / "cache")
    extract(mlp, site_data(path), cache=cache, settings=ExtractionSettings(device="cpu"))
    np.savez(path, inputs=x[:50], labels=y[:50])
    again = extract(mlp, site_data(path), [Stat.of("count")], cache=cache, settings=ExtractionSettings(device="cpu"))
    assert not again.from_cache and int(again.statistics[Stat.of("count").key]) == 49
    assert len([p for p in (tmp_path / "cache").iterdir()]) == 2


def test_a_refused_pass_leaves_no_cache_entry(mlp: LoadedModel, vectors: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    path, _, _ = vectors
    cache = FeatureCache(tmp_path / "cache")
    data = site_data(path, on_error="refuse")
    with pytest.raises(BadRowsRefusedError, match="index 5: input holds NaN"):
        extract(mlp, data, requests(mlp.feature_dim), cache=cache, settings=ExtractionSettings(batch_size=4, device="cpu"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_metrics_and_thread_setting(mlp: LoadedModel, vectors: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, _, _ = vectors
    before = torch.get_num_threads()
    result = extract(mlp, site_data(path), settings=ExtractionSettings(batch_size=32, threads=1, device="cpu", progress=True))
    assert torch.get_num_threads() == before
    m = result.metrics
    assert m.threads == 1 and m.samples == 200 and m.device == "cpu" and m.batch_size == 32
    assert m.throughput > 0 and m.latency_ms is not None and m.latency_ms > 0 and m.batch_latency_ms > 0
    assert m.peak_rss_bytes is not None and m.peak_rss_bytes > 10_000_000
    assert 0 < m.forward_seconds <= m.seconds


def test_cuda_request_without_cuda_is_a_config_error(mlp: LoadedModel, vectors: tuple[Path, np.ndarray, np.ndarray]) -> None:
    if torch.cuda.is_available():
        return  # this check is about CPU-only sites
    with pytest.raises(SiteConfigError, match="no CUDA device"):
        extract(mlp, site_data(vectors[0]), settings=ExtractionSettings(device="cuda"))


def test_image_and_text_models_stream_like_one_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    root = tmp_path / "imgs"
    pixels = {}
    for cls in LABELS:
        (root / cls).mkdir(parents=True)
        for i in range(4):
            pixels[f"{cls}/{i}"] = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
            Image.fromarray(pixels[f"{cls}/{i}"]).save(root / cls / f"{i}.png")
    pack(tmp_path / "cnn", KEY, "cnn", seed=1)
    cnn = load_model(tmp_path / "cnn", PINNED)
    source = parse_site_config({"data": {"kind": "image_folder", "path": str(root)}}, Path("/")).data
    reqs = requests(cnn.feature_dim)
    got = extract(cnn, open_site_data(source, LABELS), reqs, settings=ExtractionSettings(batch_size=5, device="cpu"))
    x = np.stack([(pixels[k] / 255.0 - 0.5) / 0.25 for k in sorted(pixels)])[:, None]
    y = np.repeat(np.arange(3), 4)
    with torch.inference_mode():
        out = cnn.module(torch.from_numpy(x).float())
    want = accumulate(reqs, [Batch(out["features"].numpy().astype(np.float64), y, 3,
                                   scipy_softmax(out["logits"].numpy().astype(np.float64), axis=1))])
    for key in want:
        np.testing.assert_allclose(got.statistics[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)

    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"doc {i} {'x' * i},{LABELS[i % 3]}\n" for i in range(11)))
    pack(tmp_path / "txt", KEY, "text_bag", seed=2)
    text = load_model(tmp_path / "txt", PINNED)
    source = parse_site_config({"data": {"kind": "table", "path": str(tmp_path / "t.csv"), "text_column": "text"}}, Path("/")).data
    reqs = requests(text.feature_dim)
    got = extract(text, open_site_data(source, LABELS), reqs, settings=ExtractionSettings(batch_size=4, device="cpu", prefetch=0))
    tokens = np.zeros((11, 32), dtype=np.int64)
    for i in range(11):
        encoded = np.frombuffer(f"doc {i} {'x' * i}".encode()[:32], dtype=np.uint8)
        tokens[i, : len(encoded)] = encoded.astype(np.int64) + 1
    with torch.inference_mode():
        out = text.module(torch.from_numpy(tokens))
    want = accumulate(reqs, [Batch(out["features"].numpy().astype(np.float64), np.arange(11) % 3, 3,
                                   scipy_softmax(out["logits"].numpy().astype(np.float64), axis=1))])
    for key in want:
        np.testing.assert_allclose(got.statistics[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_model_without_head_gives_no_source_statistics(tmp_path: Path, vectors: tuple[Path, np.ndarray, np.ndarray]) -> None:
    pack(tmp_path / "nohead", KEY, "mlp", head=False)
    model = load_model(tmp_path / "nohead", PINNED)
    cache = FeatureCache(tmp_path / "cache")
    result = extract(model, site_data(vectors[0]), [Stat.of("gram")], cache=cache, settings=ExtractionSettings(device="cpu"))
    assert result.entry.logits() is None and result.entry.meta.logits_dim == 0
    with pytest.raises(ValueError, match="needs source probabilities"):
        extract(model, site_data(vectors[0]), [Stat.of("soft_joint")], cache=cache, settings=ExtractionSettings(device="cpu"))


# --------------------------------------------------------------------------- building blocks

def test_rebatch_gives_exact_sizes_in_order() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 9, size=30)
    parts, start = [], 0
    for s in sizes:
        rows = np.arange(start, start + s)
        parts.append((rows[:, None].astype(np.float32), rows, None))
        start += s
    out = list(rebatch(iter(parts), 5))
    assert [len(p[1]) for p in out[:-1]] == [5] * (len(out) - 1) and 0 < len(out[-1][1]) <= 5
    assert np.concatenate([p[1] for p in out]).tolist() == list(range(start))
    assert all(p[2] is None for p in out)


def test_prefetch_keeps_order_and_reraises() -> None:
    assert list(prefetch(iter(range(100)), 3)) == list(range(100))

    def failing() -> object:
        yield 1
        raise BadRowsRefusedError("row 2: broken")

    with pytest.raises(BadRowsRefusedError, match="row 2: broken"):
        list(prefetch(failing(), 2))


def test_consume_in_thread_returns_the_result_and_stops_both_sides_on_errors() -> None:
    produced: list[int] = []

    def numbers(n: int) -> Iterator[int]:
        for i in range(n):
            produced.append(i)
            yield i

    assert consume_in_thread(numbers(500), lambda items: [i * 2 for i in items], 2) == [2 * i for i in range(500)]
    assert consume_in_thread(numbers(5), sum, 0) == 10

    def fails_at_ten(items: Iterator[int]) -> int:
        for i in items:
            if i == 10:
                raise InvalidInputError("item 10 is bad")
        return 0

    produced.clear()
    with pytest.raises(InvalidInputError, match="item 10 is bad"):
        consume_in_thread(numbers(10_000), fails_at_ten, 2)
    assert len(produced) < 100  # the producer stopped soon after the consumer failed

    seen: list[int] = []
    finished = threading.Event()

    def broken() -> Iterator[int]:
        yield from range(5)
        raise BadRowsRefusedError("row 5: broken")

    def record(items: Iterator[int]) -> None:
        try:
            seen.extend(items)
        finally:
            finished.set()

    with pytest.raises(BadRowsRefusedError, match="row 5: broken"):
        consume_in_thread(broken(), record, 3)
    assert finished.is_set()  # the consumer had stopped when the error came out
    assert seen == list(range(len(seen)))
    assert not [t for t in threading.enumerate() if t.name == "fedmte-statistics"]


@pytest.mark.parametrize("dtype, width", [(np.float32, 3), (np.float64, 1), (np.int64, None)])
def test_npy_appender_writes_what_np_save_would(tmp_path: Path, dtype: type, width: int | None) -> None:
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, width) if width else (n,)).astype(dtype) for n in (3, 0, 5)]
    writer = NpyAppender(tmp_path / "a.npy", np.dtype(dtype), width)
    for part in parts:
        writer.append(part)
    writer.close()
    got = np.load(tmp_path / "a.npy", allow_pickle=False)
    np.testing.assert_array_equal(got, np.concatenate(parts))
    assert got.dtype == np.dtype(dtype)


def test_a_batch_above_the_sites_limits_is_refused_before_a_row_is_decoded(
    tmp_path: Path, vectors: tuple[Path, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limits a model was loaded under bound its batches: 256 rows of 6 float64 inputs
    (12 KiB) and their activations are refused under a 4 KiB cap, 16 rows pass."""
    from fedmte.client import data as data_module
    from fedmte.client.limits import LimitExceededError, SiteLimits

    path = tmp_path / "pkg"
    pack(path, KEY, "mlp", seed=5)
    limits = SiteLimits(max_batch_bytes=4096)
    model = load_model(path, PINNED, limits)
    assert model.limits is limits and model.size is not None and model.size.activations == 2 * 16
    cache = FeatureCache(tmp_path / "cache")
    chunks = data_module.ArrayData.chunks

    def no_rows(*args: object, **kwargs: object) -> Iterator[object]:
        raise AssertionError("a row was read")

    monkeypatch.setattr(data_module.ArrayData, "chunks", no_rows)
    with pytest.raises(LimitExceededError, match=r"256 rows of 6 elements x 8 bytes.*\(limits.max_batch_bytes\)") as caught:
        extract(model, site_data(vectors[0]), [Stat.of("count")], cache=cache,
                settings=ExtractionSettings(batch_size=256, device="cpu"))
    assert caught.value.rule == "limits.max_batch_bytes" and caught.value.value == 256 * 6 * 8
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(LimitExceededError, match="activations"):  # 64 x 6 x 8 bytes in, 64 x 32 x 4 in flight
        extract(model, site_data(vectors[0]), [Stat.of("count")], settings=ExtractionSettings(batch_size=64, device="cpu"))
    monkeypatch.setattr(data_module.ArrayData, "chunks", chunks)
    done = extract(model, site_data(vectors[0]), [Stat.of("count")], settings=ExtractionSettings(batch_size=16, device="cpu"))
    assert float(done.statistics[Stat.of("count").key]) == 200
