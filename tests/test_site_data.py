"""Site file and site data: the owner's formats, the job's label space, bad rows counted or refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmte.client.data import RowReport, decoded_batches, open_site_data
from fedmte.client.errors import (
    BadRowsRefusedError,
    InputKindMismatchError,
    LabelMappingError,
    SiteConfigError,
    SiteDataError,
)
from fedmte.protocol.manifest import ImagePreprocessing, TextPreprocessing, VectorPreprocessing
from fedmte.client.packages import generate_signing_key, public_key_string
from fedmte.client.preprocess import image_batch, image_input, tokenize
from fedmte.client.site_config import load_site_config, parse_site_config
from fedmte.protocol.keys import fingerprint, parse_public_key

GREY = ImagePreprocessing(height=6, width=5, channels=1, mean=(0.5,), std=(0.25,))
RGB = ImagePreprocessing(height=6, width=5, channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
BYTES = TextPreprocessing(tokenizer="bytes", vocab_size=257, max_tokens=8)
WORDS = TextPreprocessing(tokenizer="hashed_words", vocab_size=101, max_tokens=4, lowercase=True)
VEC = VectorPreprocessing(dim=3, mean=(1.0, 2.0, 3.0), std=(2.0, 2.0, 4.0))


def collect(data: object, pre: object, batch_size: int = 4) -> tuple[np.ndarray, np.ndarray, RowReport]:
    report = data.new_report()
    batches = list(decoded_batches(data, pre, batch_size, report))
    assert all(len(x) <= batch_size for x, _ in batches)
    inputs = np.concatenate([x for x, _ in batches]) if batches else np.zeros((0,))
    labels = np.concatenate([y for _, y in batches]) if batches else np.zeros((0,), dtype=np.int64)
    return inputs, labels, report


def source(**fields: object) -> object:
    return parse_site_config({"data": fields}, Path("/")).data


# --------------------------------------------------------------------------- site file

def test_site_file_resolves_paths_and_validates(tmp_path: Path) -> None:
    key = public_key_string(generate_signing_key().public_key())
    (tmp_path / "site.toml").write_text(
        f"""
[site]
name = "a"
[data]
kind = "table"
path = "notes.jsonl"
text_column = "text"
labels = ["x", "y"]
[trust.coordinators]
main = "{key}"
[compute]
batch_size = 32
threads = 2
device = "cpu"
[limits]
max_tensors = 50
[policy]
allowed_scorers = ["logme"]
max_feature_dim = 64
clip_norm = 1.0
[audit]
dir = "log"
"""
    )
    config = load_site_config(tmp_path / "site.toml")
    assert config.data.path == tmp_path / "notes.jsonl"
    assert config.site.cache_dir == tmp_path / ".fedmte-cache"
    assert config.data.table_format == "jsonl"
    assert config.trust.keys == (key,) and config.limits.max_tensors == 50 and config.compute.threads == 2
    # [policy] is validated where the file is read, and the policy pins the coordinators of [trust]
    assert config.policy is not None and config.policy.allowed_scorers == {"logme"}
    assert config.policy.coordinator_keys == {"main": fingerprint(parse_public_key(key))}
    # [audit] is typed too: relative paths (defaults included) are taken from the file's folder
    assert config.audit.dir == tmp_path / "log" and config.audit.signing_key == tmp_path / "keys" / "audit.key"
    assert config.audit.ledger_dir == tmp_path / "ledger" and config.audit.verification_key_sha256 is None
    assert config.secure is None


@pytest.mark.parametrize(
    "text, message",
    [
        ('[data]\nkind = "arrays"\npath = "x.npz"\nmax_rows = 3', "data.arrays.max_rows: Extra inputs"),
        ('[data]\nkind = "table"\npath = "x.csv"', "exactly one of text_column"),
        ('[data]\nkind = "table"\npath = "x.txt"\ntext_column = "t"', "cannot tell the format"),
        ('[data]\nkind = "arrays"\npath = "x.npz"\n[trust.coordinators]\nmain = "rsa:abc"', "trust.coordinators: .*ed25519"),
        ('[data]\nkind = "arrays"\npath = "x.npz"\n[trust.coordinators]\nmain = "rsa:abc"\n'
         '[policy]\nmax_feature_dim = 4\nclip_norm = 1.0', "invalid: trust.coordinators: main: .*ed25519"),
        ('[data]\nkind = "arrays"\npath = "x.npz"\n[trust]\nkeys = ["rsa:abc"]',
         r"trust.keys is gone: list each coordinator once as \[trust.coordinators\]"),
        ('[data]\nkind = "arrays"\npath = "x.npz"\n[policy]\nmax_feature_dim = 4\nclip_norm = 1.0\n'
         '[policy.coordinator_keys]\nmain = "' + "0" * 64 + '"',
         r"policy.coordinator_keys is gone: .*\[trust.coordinators\]"),
        ('[data]\nkind = "arrays"\npath = "x.npz"\n[policy]\nanything = 1', "policy.anything: Extra inputs"),
        ('[data]\nkind = "arrays"\npath = "x.npz"\n[audit]\nverification_key_sha256 = "abc"', "audit.verification_key_sha256"),
        ('[data]\nkind = "features"\npath = "x.csv"', "a features source is an .npz archive"),
        ('[data]\nkind = "arrays"\npath = "x.npz"\n[compute]\ndevice = "tpu"', "compute.device"),
        ('[data]\nkind = "arrays"\npath = "x.npz"\n[limits]\nmax_tensors = 0', "limits.max_tensors"),
        ('[data]\nkind = "arrays"\npath = "x.npz"\n[limits]\nmax_label = 10', "limits.max_label: Extra inputs"),
        ('[data]\nkind = "arrays"\npath = "x.npz"\n[limits]\nmax_address_space_bytes = 1000000',
         "limits.max_address_space_bytes"),
        ("[data\nkind=", "not valid TOML"),
    ],
)
def test_bad_site_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "site.toml").write_text(text)
    with pytest.raises(SiteConfigError, match=message):
        load_site_config(tmp_path / "site.toml")


def test_missing_site_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match="pass --site"):
        load_site_config(tmp_path / "nope.toml")


# --------------------------------------------------------------------------- image folders

def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {}
    for cls in ("cat", "dog"):
        for i in range(3):
            pixels = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
            arrays[f"{cls}/{i}.png"] = pixels
            _png(tmp_path / "imgs" / cls / f"{i}.png", pixels)
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    good = (tmp_path / "imgs" / "dog" / "0.png").read_bytes()
    (tmp_path / "imgs" / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "dog" / ".hidden.png").write_bytes(b"junk")
    return tmp_path / "imgs", arrays


def test_image_folder_skips_and_counts_corrupt_images(image_folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, arrays = image_folder
    data = open_site_data(source(kind="image_folder", path=str(root)), ["dog", "cat"])
    inputs, labels, report = collect(data, GREY)
    assert report.used == 6 and report.total_skipped == 2 and report.ignored_files == 1
    assert {where for where, _ in report.examples} == {"cat/broken.png", "dog/truncated.png"}
    assert all(reason.startswith("undecodable image") for _, reason in report.examples)
    # sorted order: cat/0..2 (class 1), then dog/0..2 (class 0)
    assert labels.tolist() == [1, 1, 1, 0, 0, 0]
    want = np.stack([(arrays[k] / 255.0 - 0.5) / 0.25 for k in sorted(arrays)])[:, None]
    np.testing.assert_allclose(inputs, want, rtol=1e-6, atol=1e-6)


def test_image_folder_refuses_when_told(image_folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = image_folder
    data = open_site_data(source(kind="image_folder", path=str(root), on_error="refuse"), ["cat", "dog"])
    with pytest.raises(BadRowsRefusedError, match=r"cat/broken.png: undecodable image.*on_error"):
        collect(data, GREY)


def test_unknown_class_folder_is_an_error_and_label_map_renames(image_folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = image_folder
    with pytest.raises(LabelMappingError, match=r"label 'dog' is not in the label space \['cat', 'hound'\]"):
        open_site_data(source(kind="image_folder", path=str(root)), ["cat", "hound"])
    data = open_site_data(source(kind="image_folder", path=str(root), label_map={"dog": "hound"}), ["hound", "cat"])
    _, labels, _ = collect(data, GREY)
    assert labels.tolist() == [1, 1, 1, 0, 0, 0]


def test_rgb_images_are_resized_like_pil(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(12, 9, 3), dtype=np.uint8)
    _png(tmp_path / "a.png", pixels)
    got = image_input(tmp_path / "a.png", RGB)
    resized = np.asarray(Image.fromarray(pixels).resize((5, 6), Image.Resampling.BILINEAR), dtype=np.float64) / 255
    want = (resized - np.array(RGB.mean)) / np.array(RGB.std)
    np.testing.assert_allclose(got, np.moveaxis(want, -1, 0), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- tables

def test_csv_bad_rows_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(
        b"text,label\n"
        b"hello,pos\n"
        b",neg\n"                       # empty text is a valid (empty) document
        b"no label,\n"                  # missing label
        b"too,many,fields\n"
        b"short\n"
        b"bad \xff utf8,pos\n"
        b'"multi\nline",neg\n'
    )
    data = open_site_data(source(kind="table", path=str(path), text_column="text"), ["neg", "pos"])
    inputs, labels, report = collect(data, BYTES, batch_size=3)
    assert labels.tolist() == [1, 0, 0]
    assert report.skipped == {"missing label": 1, "more fields than the header": 1,
                              "fewer fields than the header": 1, "not valid UTF-8": 1}
    np.testing.assert_array_equal(inputs[0], [ord(c) + 1 for c in "hello"] + [0, 0, 0])
    np.testing.assert_array_equal(inputs[2], [ord(c) + 1 for c in "multi\nli"])
    assert [w for w, _ in report.examples] == ["line 4", "line 5", "line 6", "line 7"]


def test_csv_unknown_label_is_an_error_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,label\na,pos\nb,maybe\n")
    data = open_site_data(source(kind="table", path=str(path), text_column="text"), ["neg", "pos"])
    with pytest.raises(LabelMappingError, match=r"t.csv line 3: label 'maybe' is not in the label space"):
        collect(data, BYTES)


def test_csv_without_the_columns_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("body,label\na,pos\n")
    with pytest.raises(SiteDataError, match=r"no column\(s\) \['text'\]"):
        open_site_data(source(kind="table", path=str(path), text_column="text"), ["pos"])


def test_jsonl_bad_rows_are_counted_or_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = [
        json.dumps({"text": "Good Words", "label": 1}),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"label": 0}),
        json.dumps({"text": "x", "label": True}),
        json.dumps({"text": 5, "label": 0}),
        "",
        json.dumps({"text": "more words here please", "label": 0}),
    ]
    path.write_text("\n".join(lines) + "\n")
    fields = dict(kind="table", path=str(path), text_column="text", label_map={"0": "neg", "1": "pos"})
    data = open_site_data(source(**fields), ["neg", "pos"])
    inputs, labels, report = collect(data, WORDS)
    assert labels.tolist() == [1, 0]
    assert report.skipped == {"malformed JSON": 1, "not a JSON object": 1, "missing 'text'": 1,
                              "label is not a string or an integer": 1, "'text' is not a string": 1}
    np.testing.assert_array_equal(inputs[0], tokenize("good words", WORDS))
    assert (inputs[1] > 0).all() and inputs[1].max() < 101  # truncated to max_tokens=4 words
    refuse = open_site_data(source(**fields, on_error="refuse"), ["neg", "pos"])
    with pytest.raises(BadRowsRefusedError, match="line 2: malformed JSON"):
        collect(refuse, WORDS)


def test_table_of_image_paths(tmp_path: Path) -> None:
    pixels = np.full((6, 5), 128, dtype=np.uint8)
    _png(tmp_path / "img" / "a.png", pixels)
    (tmp_path / "t.csv").write_text("file,label\nimg/a.png,x\nimg/missing.png,x\n")
    data = open_site_data(source(kind="table", path=str(tmp_path / "t.csv"), path_column="file"), ["x"])
    inputs, labels, report = collect(data, GREY)
    assert inputs.shape == (1, 1, 6, 5) and report.skipped == {"image file not found": 1}
    np.testing.assert_allclose(inputs[0, 0], (128 / 255 - 0.5) / 0.25, rtol=0, atol=1e-6)  # float32 pixels


# --------------------------------------------------------------------------- arrays

def test_npz_vectors_with_string_labels(tmp_path: Path) -> None:
    x = np.arange(15, dtype=np.float64).reshape(5, 3)
    x[2, 1] = np.nan
    np.savez(tmp_path / "d.npz", inputs=x, labels=np.array(["b", "a", "a", "", "b"]))
    data = open_site_data(source(kind="arrays", path=str(tmp_path / "d.npz")), ["a", "b"])
    inputs, labels, report = collect(data, VEC, batch_size=2)
    keep = [0, 1, 4]
    np.testing.assert_allclose(inputs, (x[keep] - np.array(VEC.mean)) / np.array(VEC.std))
    assert labels.tolist() == [1, 0, 1]
    assert report.skipped == {"missing label": 1, "input holds NaN or Inf": 1}
    assert sorted(w for w, _ in report.examples) == ["index 2", "index 3"]


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100])
def test_npy_inputs_are_read_in_blocks(tmp_path: Path, batch_size: int) -> None:
    x = np.random.default_rng(4).normal(size=(7, 3))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.array([0, 1, 1, 0, 1, 0, 0]))
    data = open_site_data(source(kind="arrays", path=str(tmp_path / "x.npy"), labels_path=str(tmp_path / "y.npy")), ["a", "b"])
    assert isinstance(data.inputs, np.memmap)
    inputs, labels, _ = collect(data, VectorPreprocessing(dim=3), batch_size=batch_size)
    np.testing.assert_array_equal(inputs, x)
    assert labels.tolist() == [0, 1, 1, 0, 1, 0, 0]


def test_truncated_npy_is_a_data_error(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((6, 3)))
    np.save(tmp_path / "y.npy", np.zeros(6, dtype=np.int64))
    data = open_site_data(source(kind="arrays", path=str(tmp_path / "x.npy"), labels_path=str(tmp_path / "y.npy")), ["a"])
    with open(tmp_path / "x.npy", "r+b") as handle:
        handle.truncate(128 + 4 * 3 * 8)
    with pytest.raises(SiteDataError, match="shorter than its header"):
        collect(data, VectorPreprocessing(dim=3), batch_size=3)


def test_array_label_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.ones((2, 3)), labels=np.array([0, 2]))
    with pytest.raises(LabelMappingError, match="index the 2-name label space; found 0..2"):
        open_site_data(source(kind="arrays", path=str(tmp_path / "d.npz")), ["a", "b"])
    np.savez(tmp_path / "e.npz", inputs=np.ones((2, 3)), labels=np.array(["a", "zebra"]))
    with pytest.raises(LabelMappingError, match="'zebra' is not in the label space"):
        open_site_data(source(kind="arrays", path=str(tmp_path / "e.npz")), ["a", "b"])


def test_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.array([{"a": 1}, None], dtype=object), labels=np.array([0, 1]))
    with pytest.raises(SiteDataError, match="pickle is never allowed"):
        open_site_data(source(kind="arrays", path=str(tmp_path / "d.npz")), ["a", "b"])


def test_uint8_image_arrays_fast_path_equals_pil_path() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, size=(4, 6, 5, 3), dtype=np.uint8)
    fast, ok = image_batch(pixels, RGB)
    assert ok.all()
    slow = np.stack([image_input(p, RGB) for p in pixels])
    np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-6)


def test_input_kind_mismatches_are_config_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.ones((2, 4)), labels=np.array([0, 1]))
    data = open_site_data(source(kind="arrays", path=str(tmp_path / "d.npz")), ["a", "b"])
    with pytest.raises(InputKindMismatchError, match="takes 3-wide vectors"):
        collect(data, VEC)
    with pytest.raises(InputKindMismatchError, match="takes text input"):
        collect(data, BYTES)


def test_label_space_must_be_given(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.ones((2, 3)), labels=np.array([0, 1]))
    with pytest.raises(LabelMappingError, match="no label space"):
        open_site_data(source(kind="arrays", path=str(tmp_path / "d.npz")))
    with pytest.raises(LabelMappingError, match="repeats"):
        open_site_data(source(kind="arrays", path=str(tmp_path / "d.npz")), ["a", "a"])


# --------------------------------------------------------------------------- precomputed features

def test_features_data_is_validated_when_loaded(tmp_path: Path) -> None:
    """A features-kind source (the site's own ``fedmte features`` output): non-finite rows and
    rows whose source probabilities are not a distribution are skipped and counted (or refused
    with on_error = "refuse"), a missing or unreadable file and missing arrays are data errors."""
    features = np.arange(12, dtype=np.float64).reshape(4, 3)
    features[1, 2] = np.nan
    probs = np.full((4, 2), 0.5)
    probs[2] = [0.9, 0.3]
    np.savez(tmp_path / "f.npz", features=features, labels=np.array([0, 1, 0, 1]), source_probs=probs)
    data = open_site_data(source(kind="features", path=str(tmp_path / "f.npz")), ["x", "y"])
    assert data.input_kind == "features" and data.dim == 3 and data.num_source_classes == 2
    report = data.new_report()
    rows = list(data.rows(3, report))
    kept = np.concatenate([f for f, _, _ in rows])
    np.testing.assert_array_equal(kept, features[[0, 3]])
    assert np.concatenate([y for _, y, _ in rows]).tolist() == [0, 1]
    assert report.used == 2 and report.skipped == {"non-finite or non-probability values": 2}
    refusing = open_site_data(source(kind="features", path=str(tmp_path / "f.npz"), on_error="refuse"), ["x", "y"])
    with pytest.raises(BadRowsRefusedError, match="row 1: non-finite"):
        list(refusing.rows(3, refusing.new_report()))
    with pytest.raises(InputKindMismatchError, match="runs no model packages"):
        data.check_compatible(VEC)
    with pytest.raises(SiteDataError, match="cannot read missing.npz"):
        open_site_data(source(kind="features", path=str(tmp_path / "missing.npz")), ["x", "y"])
    np.savez(tmp_path / "nolabels.npz", features=features)
    with pytest.raises(SiteDataError, match=r"has no array\(s\) \['labels'\]"):
        open_site_data(source(kind="features", path=str(tmp_path / "nolabels.npz")), ["x", "y"])
    with pytest.raises(LabelMappingError, match="integer labels must index the 1-name label space"):
        open_site_data(source(kind="features", path=str(tmp_path / "f.npz")), ["x"])


# --------------------------------------------------------------------------- fingerprints and tokens

def test_fingerprint_tracks_files_settings_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,label\na,x\n")
    fields = dict(kind="table", path=str(path), text_column="text")
    first = open_site_data(source(**fields), ["x"]).fingerprint()
    assert open_site_data(source(**fields), ["x"]).fingerprint() == first
    assert open_site_data(source(**fields), ["x", "y"]).fingerprint() != first
    assert open_site_data(source(**fields, on_error="refuse"), ["x"]).fingerprint() != first
    stat = path.stat()
    path.write_text("text,label\nb,x\n")  # same size; restore the mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert open_site_data(source(**fields), ["x"]).fingerprint() == first  # metadata mode cannot see it
    content = dict(fields, fingerprint="content")
    changed = open_site_data(source(**content), ["x"]).fingerprint()
    path.write_text("text,label\na,x\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert open_site_data(source(**content), ["x"]).fingerprint() != changed


def test_tokenizers() -> None:
    np.testing.assert_array_equal(tokenize("héllo wörld", BYTES), np.frombuffer("héllo wörld".encode()[:8], np.uint8) + 1)
    a, b = tokenize("The cat", WORDS), tokenize("the CAT sat", WORDS)
    np.testing.assert_array_equal(a[:2], b[:2])
    assert a[2] == 0 and b[2] > 0 and ((b >= 0) & (b < 101)).all()


def test_the_limits_table_holds_every_cap_of_the_site(tmp_path: Path) -> None:
    text = ('[data]\nkind = "arrays"\npath = "x.npz"\n[limits]\nmax_labels = 50\nmax_release_entries = 1000\n'
            'max_input_elements = 4096\nmax_batch_bytes = 65536\nmax_layer_width = 128\nmax_tensor_elements = 8192\n'
            'max_layers = 4\nmax_address_space_bytes = 8589934592\n')
    (tmp_path / "site.toml").write_text(text)
    limits = load_site_config(tmp_path / "site.toml").limits
    assert (limits.max_labels, limits.max_release_entries, limits.max_input_elements, limits.max_batch_bytes) == (
        50, 1000, 4096, 65536)
    assert (limits.max_layer_width, limits.max_tensor_elements, limits.max_layers) == (128, 8192, 4)
    assert limits.max_address_space_bytes == 8 * 1024**3 and limits.max_parameters == 1_000_000_000
    assert load_site_config(_write(tmp_path / "b", '[data]\nkind = "arrays"\npath = "x.npz"\n')).limits.max_address_space_bytes is None


def _write(folder: Path, text: str) -> Path:
    folder.mkdir()
    (folder / "site.toml").write_text(text)
    return folder / "site.toml"


def test_decoding_refuses_inputs_above_the_limits_before_reading_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmte.client.data import ArrayData
    from fedmte.client.limits import LimitExceededError, SiteLimits

    np.savez(tmp_path / "a.npz", inputs=np.zeros((4, 8, 8, 3), dtype=np.uint8), labels=np.array(["x", "y", "x", "y"]))
    data = open_site_data(source(kind="arrays", path=str(tmp_path / "a.npz")), ["x", "y"])

    def no_rows(*args: object, **kwargs: object) -> object:
        raise AssertionError("a row was read")

    monkeypatch.setattr(ArrayData, "chunks", no_rows)
    huge = ImagePreprocessing(height=4096, width=4096, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(LimitExceededError, match=r"50,331,648; this site allows at most 16,777,216") as caught:
        next(decoded_batches(data, huge, 4, data.new_report()))
    assert caught.value.rule == "limits.max_input_elements"
    with pytest.raises(LimitExceededError, match=r"4 rows of 12,288 elements x 8 bytes") as caught:
        next(decoded_batches(data, RGB.model_copy(update={"height": 64, "width": 64}), 4, data.new_report(),
                             np.dtype(np.float64), SiteLimits(max_batch_bytes=300_000)))
    assert caught.value.rule == "limits.max_batch_bytes" and caught.value.value == 4 * 64 * 64 * 3 * 8


@pytest.mark.parametrize("inputs, pre", [
    (np.zeros((37, 5)), VectorPreprocessing(dim=6)),
    (np.zeros((37, 4, 4, 2)), RGB),
    (np.zeros((37, 5, 5, 3), dtype=np.float32), RGB),
])
def test_a_model_the_arrays_do_not_fit_is_refused_without_the_row_count(
        tmp_path: Path, inputs: np.ndarray, pre: object) -> None:
    """The refusal reaches the coordinator; how many rows the site holds is its data."""
    from fedmte.client.site_config import ArraySource

    path = tmp_path / "arrays.npz"
    np.savez(path, inputs=inputs, labels=np.zeros(len(inputs), dtype=np.int64))
    data = open_site_data(ArraySource(path=path, labels=("a", "b")))
    with pytest.raises(InputKindMismatchError) as caught:
        data.check_compatible(pre)  # type: ignore[arg-type]
    assert "37" not in str(caught.value) and "(n, " in str(caught.value)
