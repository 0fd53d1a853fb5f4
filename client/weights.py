"""A strict, data-only reader for safetensors weights sent by a coordinator.

Why our own reader: the weights come from someone else, and the site must never unpickle or
execute them (PyTorch SECURITY.md: "PyTorch models are programs"; ``torch.load`` with
``weights_only=True`` has had RCE-class CVEs, TorchScript and ``torch.export`` archives
unpickle or run code; see shared/research/PRIVACY.md, section 1.1 and threat T1). So:

1. The first bytes are sniffed. A safetensors file is an 8-byte little-endian header length
   followed by a JSON object, so byte 8 is ``{``. Anything else is refused by name: a pickle
   (``0x80`` + protocol), a zip archive (``PK``: ``torch.save``, TorchScript, ``.pt2``,
   ``.npz``), ONNX/protobuf, ELF, gzip, ``.npy``, HDF5.
2. The file size, the header length, the tensor count and the parameter count are capped
   (the site's ``[limits]``, :class:`fedmte.client.limits.SiteLimits`) before the part they
   bound is read or parsed; each violation is a
   :class:`~fedmte.client.limits.LimitExceededError` naming the limit.
3. The header is parsed here, as JSON with duplicate keys refused, and validated as the
   safetensors format specifies: every entry has exactly ``dtype``, ``shape`` and
   ``data_offsets``; the dtype is on an allowlist; ``end - begin`` equals the element count
   times the item size; the entries tile the data buffer with no gap and no overlap.
4. Only then are the bytes viewed as tensors (``torch.frombuffer``); float tensors must be
   finite.

Format reference: huggingface/safetensors README ("Format" section).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fedmte.client.errors import MalformedWeightsError, PackageError, SizeLimitError, UnsafeFormatError
from fedmte.client.limits import LimitExceededError, SiteLimits
from fedmte.protocol.manifest import strict_json_loads

HEADER_LENGTH_BYTES = 8
SNIFF_BYTES = 16
MAX_TENSOR_NAME = 1024
MAX_TENSOR_RANK = 8

# safetensors dtype name -> (torch dtype, item size in bytes). Complex, fp8 and unsigned
# wide types are left out on purpose: no architecture here uses them.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}


WeightLimits = SiteLimits
"""The caps on weights files are part of the site's one ``[limits]`` table
(:class:`fedmte.client.limits.SiteLimits`); this name stays for the readers that take them."""


@dataclass(frozen=True)
class TensorEntry:
    """One validated header entry: name, dtype, shape and its byte range in the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def sniff_format(head: bytes) -> str:
    """Name the format of a file from its first bytes; ``"safetensors"`` only for a
    plausible safetensors start (8-byte length, then ``{``)."""
    if len(head) >= HEADER_LENGTH_BYTES + 1 and head[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + 1] == b"{":
        if int.from_bytes(head[:HEADER_LENGTH_BYTES], "little") >= 2:
            return "safetensors"
    if head[:2] == b"PK":
        return "a zip archive (torch.save, TorchScript, torch.export .pt2 or .npz)"
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        return f"a Python pickle (protocol {head[1]}, as torch.save writes it)"
    if head[:4] == b"\x7fELF":
        return "an ELF shared library"
    if head[:2] == b"\x1f\x8b":
        return "a gzip stream"
    if head[:6] == b"\x93NUMPY":
        return "a NumPy .npy file"
    if head[:4] == b"\x89HDF":
        return "an HDF5 file"
    if head[:1] == b"\x08":
        return "a protobuf message (ONNX?)"
    if head[:1] in (b"(", b"c", b"]", b"}", b"I", b"S", b"V"):
        return "possibly a text pickle (protocol 0 or 1)"
    if len(head) < HEADER_LENGTH_BYTES + 1:
        return f"a {len(head)}-byte file, too short for safetensors"
    return "an unknown format"


def _refuse_unless_safetensors(head: bytes, name: str) -> None:
    found = sniff_format(head)
    if found != "safetensors":
        raise UnsafeFormatError(
            f"{name} is {found}, not safetensors; the site reads model weights only as "
            "safetensors (convert with safetensors.torch.save_file on a trusted machine)"
        )


def _check_start(head: bytes, size: int, limits: WeightLimits, name: str) -> int:
    """Sniff the format and cap the declared header length; return where the data starts."""
    _refuse_unless_safetensors(head, name)
    header_length = int.from_bytes(head[:HEADER_LENGTH_BYTES], "little")
    if header_length > limits.max_header_bytes:
        raise LimitExceededError(
            "max_header_bytes",
            f"{name} declares a {header_length:,}-byte header; the site allows at most "
            f"{limits.max_header_bytes:,} (limits.max_header_bytes)",
            value=header_length, cap=limits.max_header_bytes,
        )
    base = HEADER_LENGTH_BYTES + header_length
    if base > size:
        raise MalformedWeightsError(f"{name} declares a {header_length:,}-byte header but has only {size:,} bytes")
    return base


def _int(value: object) -> bool:
    return type(value) is int


def parse_header(header: bytes, data_length: int, limits: WeightLimits, name: str = "weights") -> list[TensorEntry]:
    """Validate a safetensors JSON header against a data buffer of ``data_length`` bytes."""
    # Early out before the (slower) JSON parse: each entry names data_offsets once. A header
    # that spells the key with escapes gets past this, and is counted exactly below.
    if header.count(b'"data_offsets"') > limits.max_tensors:
        raise LimitExceededError(
            "max_tensors", f"{name} holds more than {limits.max_tensors} tensors (limits.max_tensors)",
            cap=limits.max_tensors,
        )
    try:
        parsed = strict_json_loads(header)
    except (UnicodeDecodeError, ValueError) as error:
        raise MalformedWeightsError(f"{name}: the safetensors header is not valid JSON ({error})") from None
    if not isinstance(parsed, dict):
        raise MalformedWeightsError(f"{name}: the safetensors header must be a JSON object")
    metadata = parsed.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise MalformedWeightsError(f"{name}: __metadata__ must map strings to strings")
    if len(parsed) > limits.max_tensors:
        raise LimitExceededError(
            "max_tensors",
            f"{name} holds {len(parsed)} tensors; the site allows at most {limits.max_tensors} (limits.max_tensors)",
            value=len(parsed), cap=limits.max_tensors,
        )
    entries: list[TensorEntry] = []
    parameters = 0
    for tensor_name, info in parsed.items():
        where = f"{name}: tensor {tensor_name[:80]!r}"
        if not tensor_name or len(tensor_name) > MAX_TENSOR_NAME:
            raise MalformedWeightsError(f"{name}: tensor names must have 1 to {MAX_TENSOR_NAME} characters")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise MalformedWeightsError(f"{where} must have exactly the fields dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise MalformedWeightsError(f"{where} has dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK or not all(_int(s) and s >= 0 for s in shape):
            raise MalformedWeightsError(f"{where} has shape {shape!r}; want a list of at most {MAX_TENSOR_RANK} sizes >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) and o >= 0 for o in offsets)):
            raise MalformedWeightsError(f"{where} has data_offsets {offsets!r}; want [begin, end]")
        entry = TensorEntry(tensor_name, dtype, tuple(shape), offsets[0], offsets[1])
        parameters += entry.numel
        if parameters > limits.max_parameters:
            raise LimitExceededError(
                "max_parameters", f"{name} holds more than {limits.max_parameters} parameters (limits.max_parameters)",
                cap=limits.max_parameters,
            )
        if entry.end - entry.begin != entry.numel * DTYPES[dtype][1]:
            raise MalformedWeightsError(
                f"{where}: shape {list(entry.shape)} of {dtype} needs {entry.numel * DTYPES[dtype][1]} bytes, "
                f"data_offsets give {entry.end - entry.begin}"
            )
        entries.append(entry)
    position = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            raise MalformedWeightsError(
                f"{name}: tensor {entry.name!r} starts at byte {entry.begin}, expected {position} "
                "(tensors must tile the data buffer without gaps or overlaps)"
            )
        position = entry.end
    if position != data_length:
        raise MalformedWeightsError(
            f"{name}: the tensors cover {position} bytes but the data buffer has {data_length}"
        )
    return entries


def _tensor(buffer: bytearray, base: int, entry: TensorEntry) -> torch.Tensor:
    dtype, _ = DTYPES[entry.dtype]
    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=dtype)
    flat = torch.frombuffer(buffer, dtype=dtype, count=entry.numel, offset=base + entry.begin)
    return flat.reshape(entry.shape)


def parse_safetensors(buffer: bytearray, limits: WeightLimits, name: str = "weights") -> dict[str, torch.Tensor]:
    """Tensors of a whole safetensors file held in ``buffer`` (views into it, no copy)."""
    if sys.byteorder != "little":
        raise PackageError("safetensors data is little-endian; this reader runs on little-endian hosts only")
    if len(buffer) > limits.max_weights_bytes:
        raise LimitExceededError(
            "max_weights_bytes",
            f"{name} has {len(buffer):,} bytes; the site allows at most {limits.max_weights_bytes:,} "
            "(limits.max_weights_bytes)",
            value=len(buffer), cap=limits.max_weights_bytes,
        )
    base = _check_start(bytes(buffer[:SNIFF_BYTES]), len(buffer), limits, name)
    entries = parse_header(bytes(buffer[HEADER_LENGTH_BYTES:base]), len(buffer) - base, limits, name)
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        tensor = _tensor(buffer, base, entry)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MalformedWeightsError(f"{name}: tensor {entry.name!r} holds NaN or Inf")
        tensors[entry.name] = tensor
    return tensors


def read_bounded(path: Path, max_bytes: int, what: str) -> bytearray:
    """Read a regular file of at most ``max_bytes`` bytes (checked before reading)."""
    if path.is_symlink() or not path.is_file():
        raise PackageError(f"{what} {path} is missing or not a regular file (symbolic links are refused)")
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise SizeLimitError(f"{what} {path.name} has {size:,} bytes; the limit is {max_bytes:,}")
        buffer = bytearray(size)
        if handle.readinto(buffer) != size:
            raise PackageError(f"{what} {path} changed size while being read")
    return buffer


def read_safetensors(path: Path | str, limits: WeightLimits | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, whatever its name; refuses every other format.

    The first bytes are sniffed before the rest of the file is read, so a pickle, a zip
    archive or a huge file is refused having read at most 16 bytes.
    """
    path = Path(path)
    limits = limits or WeightLimits()
    if path.is_symlink() or not path.is_file():
        raise PackageError(f"weights file {path} is missing or not a regular file (symbolic links are refused)")
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limits.max_weights_bytes:
            raise LimitExceededError(
                "max_weights_bytes",
                f"{path.name} has {size:,} bytes; the site allows at most {limits.max_weights_bytes:,} "
                "(limits.max_weights_bytes)",
                value=size, cap=limits.max_weights_bytes,
            )
        _check_start(handle.read(SNIFF_BYTES), size, limits, path.name)
    return parse_safetensors(read_bounded(path, limits.max_weights_bytes, "weights file"), limits, path.name)
