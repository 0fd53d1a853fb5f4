"""Model packages: only signed safetensors from pinned keys; everything else is refused
with a typed error before any byte is unpickled (PRIVACY.md threat T1)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmte.client.errors import (
    MalformedWeightsError,
    PackageError,
    SignatureError,
    SizeLimitError,
    UnsafeFormatError,
    UnsignedPackageError,
    UntrustedKeyError,
    WeightsHashMismatchError,
)
from fedmte.protocol.manifest import ModelManifest
from fedmte.client.packages import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
    generate_signing_key,
    inspect_package,
    key_id,
    public_key_string,
    signing_message,
    verify_package,
    write_package,
)
from fedmte.client.weights import WeightLimits, read_safetensors
from fedmte.protocol.errors import FedmteError
from tests.client_helpers import pack

KEY = generate_signing_key()
PINNED = [public_key_string(KEY.public_key())]
OTHER_KEY = generate_signing_key()


def _write_marker(path: str) -> None:
    Path(path).write_text("pwned")


class Evil:
    """Unpickling this object writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_write_marker, (self.marker,))


@pytest.fixture
def package(tmp_path: Path) -> Path:
    pack(tmp_path / "pkg", KEY, "mlp")
    return tmp_path / "pkg"


def test_the_malicious_pickle_is_live(tmp_path: Path) -> None:
    """The fixture really runs code when unpickled, so the refusals below mean something."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_pickle_in_disguise_is_refused_unread(tmp_path: Path, protocol: int, suffix: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(Evil(marker), protocol=protocol))
    with pytest.raises(UnsafeFormatError, match="pickle|not safetensors"):
        read_safetensors(path)
    assert not marker.exists()


def test_zip_archives_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    archive = tmp_path / "model.safetensors"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(marker), protocol=2))
    torch_saved = tmp_path / "state.bin"
    torch.save({"w": torch.zeros(3)}, torch_saved)
    for path in (archive, torch_saved):
        with pytest.raises(UnsafeFormatError, match="zip archive"):
            read_safetensors(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "head, found",
    [
        (b"\x7fELF\x02\x01\x01" + bytes(9), "ELF"),
        (b"\x08\x07\x12\x07pytorch" + bytes(4), "protobuf"),
        (b"\x93NUMPY\x01\x00" + bytes(8), "npy"),
        (b"\x1f\x8b\x08" + bytes(13), "gzip"),
        (b"abc", "too short"),
    ],
)
def test_other_formats_are_named(tmp_path: Path, head: bytes, found: str) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(head)
    with pytest.raises(UnsafeFormatError, match=found):
        read_safetensors(path)


def test_signed_pickle_package_is_refused_before_unpickling(tmp_path: Path) -> None:
    """Even a package the pinned key signed, whose hash matches, is refused if it is not safetensors."""
    marker = tmp_path / "marker"
    payload = pickle.dumps(Evil(marker), protocol=4)
    good = pack(tmp_path / "good", KEY, "mlp")
    import hashlib

    manifest = good.model_copy(update={"weights_sha256": hashlib.sha256(payload).hexdigest(), "weights_bytes": len(payload)})
    write_package(tmp_path / "evil", manifest, payload, KEY)
    with pytest.raises(UnsafeFormatError, match="pickle"):
        verify_package(tmp_path / "evil", PINNED)
    assert not marker.exists()


def test_round_trip_equals_the_reference_reader(package: Path) -> None:
    verified = verify_package(package, PINNED)
    reference = load_file(package / WEIGHTS_FILE)
    assert verified.tensors.keys() == reference.keys()
    for name, tensor in reference.items():
        assert verified.tensors[name].dtype == tensor.dtype
        assert torch.equal(verified.tensors[name], tensor)
    assert verified.key_id == key_id(KEY.public_key())
    assert verified.manifest.weights_sha256 == __import__("hashlib").sha256((package / WEIGHTS_FILE).read_bytes()).hexdigest()


def test_every_error_is_a_fedmte_value_error(package: Path) -> None:
    (package / SIGNATURE_FILE).unlink()
    with pytest.raises(FedmteError, match="not signed|no signature") as info:
        verify_package(package, PINNED)
    assert isinstance(info.value, ValueError)


def test_flipped_weight_byte_is_detected(package: Path) -> None:
    data = bytearray((package / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0x01
    (package / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(WeightsHashMismatchError, match="altered after signing"):
        verify_package(package, PINNED)


def test_replaced_weights_are_detected(package: Path, tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    (package / WEIGHTS_FILE).write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(WeightsHashMismatchError, match="replaced or truncated"):
        verify_package(package, PINNED)


def test_unsigned_package_is_refused(package: Path) -> None:
    (package / SIGNATURE_FILE).unlink()
    with pytest.raises(UnsignedPackageError, match="no signature.json"):
        verify_package(package, PINNED)


def test_package_signed_by_an_unpinned_key_is_refused(tmp_path: Path) -> None:
    pack(tmp_path / "pkg", OTHER_KEY, "mlp")
    with pytest.raises(UntrustedKeyError, match="does not pin"):
        verify_package(tmp_path / "pkg", PINNED)


def test_site_without_pinned_keys_refuses_everything(package: Path) -> None:
    with pytest.raises(UntrustedKeyError, match=r"trusts no coordinator key; add .*\[trust.coordinators\]"):
        verify_package(package, [])


def test_forged_signature_under_a_pinned_key_id_fails(package: Path) -> None:
    manifest_bytes = (package / MANIFEST_FILE).read_bytes()
    forged = OTHER_KEY.sign(signing_message(manifest_bytes))
    doc = json.loads((package / SIGNATURE_FILE).read_text())
    doc["signature"] = base64.b64encode(forged).decode()
    (package / SIGNATURE_FILE).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_package(package, PINNED)


def test_edited_manifest_fails_the_signature(package: Path) -> None:
    doc = json.loads((package / MANIFEST_FILE).read_bytes())
    doc["license"] = "proprietary"
    (package / MANIFEST_FILE).write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(SignatureError, match="does not verify"):
        verify_package(package, PINNED)


def test_non_canonical_manifest_is_refused_even_if_signed(package: Path) -> None:
    loose = json.dumps(json.loads((package / MANIFEST_FILE).read_bytes()), indent=2).encode()
    (package / MANIFEST_FILE).write_bytes(loose)
    signature = json.loads((package / SIGNATURE_FILE).read_text())
    signature["signature"] = base64.b64encode(KEY.sign(signing_message(loose))).decode()
    (package / SIGNATURE_FILE).write_text(json.dumps(signature))
    with pytest.raises(PackageError, match="canonical form"):
        verify_package(package, PINNED)


def test_unexpected_files_and_symlinks_are_refused(package: Path, tmp_path: Path) -> None:
    (package / "run_me.py").write_text("print('hi')")
    with pytest.raises(PackageError, match="unexpected files"):
        verify_package(package, PINNED)
    (package / "run_me.py").unlink()
    target = tmp_path / "real.safetensors"
    target.write_bytes((package / WEIGHTS_FILE).read_bytes())
    (package / WEIGHTS_FILE).unlink()
    os.symlink(target, package / WEIGHTS_FILE)
    with pytest.raises(PackageError, match="symbolic links are refused"):
        verify_package(package, PINNED)


# --------------------------------------------------------------------------- header caps and structure

def _safetensors_bytes(header: dict[str, object], data: bytes, pad: int = 0) -> bytes:
    text = json.dumps(header).encode() + b" " * pad
    return len(text).to_bytes(8, "little") + text + data


def test_oversized_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes((200 * 1024 * 1024).to_bytes(8, "little") + b'{"a":' + bytes(64))
    with pytest.raises(SizeLimitError, match="header"):
        read_safetensors(path)


def test_header_cap_applies_to_real_files(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({f"t{i}": torch.zeros(1) for i in range(20)}, path)
    assert len(read_safetensors(path)) == 20
    with pytest.raises(SizeLimitError, match="max_header_bytes"):
        read_safetensors(path, WeightLimits(max_header_bytes=64))
    with pytest.raises(SizeLimitError, match="max_tensors"):
        read_safetensors(path, WeightLimits(max_tensors=19))
    with pytest.raises(SizeLimitError, match="max_parameters"):
        read_safetensors(path, WeightLimits(max_parameters=19))
    with pytest.raises(SizeLimitError, match="max_weights_bytes"):
        read_safetensors(path, WeightLimits(max_weights_bytes=100))


@pytest.mark.parametrize("limit, value", [("max_header_bytes", 64), ("max_tensors", 19), ("max_parameters", 19),
                                          ("max_weights_bytes", 100)])
def test_each_weights_limit_is_a_refusal_naming_it(tmp_path: Path, limit: str, value: int) -> None:
    """The site agent reports these to the coordinator as a refused model with the limit as its rule."""
    from fedmte.client.limits import LimitExceededError, SiteLimits
    from fedmte.protocol.errors import RefusalError

    assert WeightLimits is SiteLimits  # one [limits] table
    path = tmp_path / "w.safetensors"
    save_file({f"t{i}": torch.zeros(1) for i in range(20)}, path)
    with pytest.raises(LimitExceededError) as caught:
        read_safetensors(path, WeightLimits(**{limit: value}))
    assert isinstance(caught.value, RefusalError) and isinstance(caught.value, SizeLimitError)
    assert caught.value.rule == f"limits.{limit}" and caught.value.reason_code == f"limits:{limit}"
    assert caught.value.cap == value


def test_a_huge_tensor_count_is_refused_quickly(tmp_path: Path) -> None:
    entries = b",".join(b'"t%d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % i for i in range(1_000_000))
    path = tmp_path / "many.safetensors"
    text = b"{" + entries + b"}"
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    start = time.perf_counter()
    with pytest.raises(SizeLimitError, match="more than 10000 tensors"):
        read_safetensors(path, WeightLimits(max_header_bytes=128 * 1024 * 1024))
    assert time.perf_counter() - start < 2.0


def test_tensor_count_cap_holds_when_the_key_is_escaped(tmp_path: Path) -> None:
    """The fast pre-count can be dodged with a JSON escape; the exact count still applies."""
    entry = b'"t%d":{"dtype":"U8","shape":[0],"data\\u005foffsets":[0,0]}'
    text = b"{" + b",".join(entry % i for i in range(30)) + b"}"
    path = tmp_path / "escaped.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    with pytest.raises(SizeLimitError, match="30 tensors"):
        read_safetensors(path, WeightLimits(max_tensors=20))


F4 = bytes(8)


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "without gaps or overlaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, F4, "starts at byte 4"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, F4, "data buffer has 8"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, F4, "needs 12 bytes"),
        ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, F4, "dtype 'C64'"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, F4, "shape"),
        ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, F4, "shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "code": "x"}}, F4, "exactly the fields"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
        ([1, 2], b"", "must be a JSON object"),
    ],
)
def test_malformed_headers_are_refused(tmp_path: Path, header: object, data: bytes, message: str) -> None:
    path = tmp_path / "w.safetensors"
    text = json.dumps(header).encode()
    if not text.startswith(b"{"):
        text = b"{" + text[1:-1] + b"}"  # keep the sniffer happy; the JSON is then invalid
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    with pytest.raises(MalformedWeightsError, match=message if isinstance(header, dict) else "not valid JSON"):
        read_safetensors(path)


def test_duplicate_tensor_names_are_refused(tmp_path: Path) -> None:
    text = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + F4)
    with pytest.raises(MalformedWeightsError, match="duplicate JSON key"):
        read_safetensors(path)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.tensor([1.0, float("nan")])}, path)
    with pytest.raises(MalformedWeightsError, match="NaN or Inf"):
        read_safetensors(path)


def test_all_dtypes_read_like_the_reference(tmp_path: Path) -> None:
    tensors = {
        "f64": torch.randn(3, 2, dtype=torch.float64),
        "f32": torch.randn(5),
        "f16": torch.randn(4).half(),
        "bf16": torch.randn(4).bfloat16(),
        "i64": torch.arange(7),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "b": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, path)
    got = read_safetensors(path)
    for name, want in load_file(path).items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        assert torch.equal(got[name], want)


def test_inspect_reports_claims_and_verdict(package: Path) -> None:
    good = inspect_package(package, PINNED)
    assert good.verified and good.manifest is not None and good.tensor_count == 6  # two hidden layers and the head, weight and bias each
    claimed = inspect_package(package, [public_key_string(OTHER_KEY.public_key())])
    assert not claimed.verified and "UntrustedKeyError" in claimed.verdict
    assert isinstance(claimed.manifest, ModelManifest) and claimed.manifest.name == "test-mlp"
