"""Turn raw samples into network inputs, as the manifest's preprocessing describes.

This is site code run on the site's data; the manifest only chooses among a few fixed
recipes and their numbers (:mod:`fedmte.protocol.manifest`). A sample that cannot be turned
into an input (an image that does not decode, a text that is not UTF-8, a vector with NaN)
raises :class:`RowError`, which the caller counts or refuses as the site file says. A
source whose shape can never fit the model (vectors of the wrong width) raises
:class:`~fedmte.client.errors.InputKindMismatchError` instead: that is a configuration
mistake, not a bad row.

Images: ``convert`` to L or RGB, ``resize`` to (width, height) with the named filter, scale
to [0, 1], then ``(x - mean) / std`` per channel, laid out (C, H, W) as PyTorch expects.
Byte pixels go through a per-channel table of the 256 possible values (computed in float64,
stored as float32), so decoding costs one lookup per pixel.
Text: see :class:`~fedmte.protocol.manifest.TextPreprocessing`.

Sizes: :func:`input_elements` and :func:`input_itemsize` give what one decoded row holds, so
:func:`check_input_size` can refuse, before a row is decoded, preprocessing whose rows or
batches are larger than the site's ``[limits]`` allow (``max_input_elements``,
``max_batch_bytes``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fedmte.client.errors import InputKindMismatchError
from fedmte.client.limits import SiteLimits, check_input_limits
from fedmte.protocol.manifest import ImagePreprocessing, Preprocessing, TextPreprocessing, VectorPreprocessing

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# --------------------------------------------------------------------------- sizes

def input_elements(pre: Preprocessing) -> int:
    """Elements of one preprocessed input row: C x H x W pixels, ``max_tokens`` token ids or
    ``dim`` numbers (what :func:`fedmte.client.limits.check_input_limits` caps before decoding)."""
    if isinstance(pre, ImagePreprocessing):
        return pre.channels * pre.height * pre.width
    if isinstance(pre, TextPreprocessing):
        return pre.max_tokens
    return pre.dim


def input_itemsize(pre: Preprocessing, float_itemsize: int = 4) -> int:
    """Bytes per element of a decoded row at its largest: token ids are int64; vectors may be
    standardised in float64; pixels are decoded as float32, then cast to the network's float
    type (``float_itemsize``)."""
    if isinstance(pre, ImagePreprocessing):
        return max(4, float_itemsize)
    return 8


def check_input_size(pre: Preprocessing, limits: SiteLimits, batch_size: int | None = None, *,
                     float_itemsize: int = 4, activations: int | None = None) -> None:
    """Refuse, before a row is decoded, inputs above the site's ``max_input_elements`` per
    row and, with a batch size, decoded batches (or a batch's largest activation, where the
    architecture computes it) above ``max_batch_bytes``."""
    check_input_limits(limits, input_elements(pre), input_itemsize(pre, float_itemsize), batch_size,
                       activations=activations, float_itemsize=float_itemsize)


class RowError(Exception):
    """One sample that cannot be used; ``reason`` is what the row report counts."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- text

def _word_id(word: str, vocab_size: int) -> int:
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (vocab_size - 1)


def tokenize(text: str, pre: TextPreprocessing) -> np.ndarray:
    """(max_tokens,) int64 token ids, 0-padded."""
    if pre.lowercase:
        text = text.lower()
    try:
        if pre.tokenizer == "bytes":
            encoded = text.encode("utf-8")[: pre.max_tokens]
            ids = np.frombuffer(encoded, dtype=np.uint8).astype(np.int64) + 1
        else:
            ids = np.array([_word_id(w, pre.vocab_size) for w in text.split()[: pre.max_tokens]], dtype=np.int64)
    except UnicodeEncodeError:
        raise RowError("text is not valid UTF-8") from None
    out = np.zeros(pre.max_tokens, dtype=np.int64)
    out[: len(ids)] = ids
    return out


# --------------------------------------------------------------------------- images

def _normalise(pixels: np.ndarray, pre: ImagePreprocessing) -> np.ndarray:
    """(H, W[, C]) floats in [0, 1] -> (C, H, W) float32, standardised per channel."""
    chw = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((chw.astype(np.float32) - mean) / std)


@functools.lru_cache(maxsize=64)
def _byte_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: (v / 255 - mean_c) / std_c for every byte value v."""
    values = np.arange(256, dtype=np.float64) / 255.0
    return ((values[None, :] - np.asarray(mean)[:, None]) / np.asarray(std)[:, None]).astype(np.float32)


def _standardise_bytes(pixels: np.ndarray, pre: ImagePreprocessing) -> np.ndarray:
    """(..., H, W, C) uint8 -> (..., C, H, W) float32 through a per-channel byte table (one
    gather per pixel; the per-image and the batched path share it, so they agree exactly)."""
    table = _byte_table(pre.mean, pre.std)
    channels = pixels.shape[-1]
    out = np.empty(pixels.shape[:-3] + (channels,) + pixels.shape[-3:-1], dtype=np.float32)
    for c in range(channels):
        out[..., c, :, :] = table[c][pixels[..., c]]
    return out


def _from_pil(image: Image.Image, pre: ImagePreprocessing) -> np.ndarray:
    image = image.convert("L" if pre.channels == 1 else "RGB")
    if image.size != (pre.width, pre.height):
        image = image.resize((pre.width, pre.height), RESAMPLE[pre.resize])
    pixels = np.asarray(image, dtype=np.uint8)
    return _standardise_bytes(pixels[..., None] if pixels.ndim == 2 else pixels, pre)


def image_input(raw: Path | np.ndarray, pre: ImagePreprocessing) -> np.ndarray:
    """(C, H, W) float32 from an image file or an (H, W[, C]) array."""
    if isinstance(raw, Path):
        try:
            with Image.open(raw) as image:
                return _from_pil(image, pre)
        except FileNotFoundError:
            raise RowError("image file not found") from None
        except PIL_ERRORS as error:
            raise RowError(f"undecodable image ({type(error).__name__})") from None
    array = np.asarray(raw)
    if array.dtype == np.uint8:
        try:
            return _from_pil(Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array), pre)
        except (TypeError, ValueError) as error:
            raise RowError(f"undecodable image array ({error})") from None
    if not np.all(np.isfinite(array)):
        raise RowError("image holds NaN or Inf")
    return _normalise(array, pre)


def image_batch(raw: np.ndarray, pre: ImagePreprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised path for an (m, H, W[, C]) array already at the model's size.

    Returns the (k, C, H, W) float32 inputs of the usable rows and the (m,) mask of them.
    """
    if raw.dtype == np.uint8:
        return _standardise_bytes(raw[..., None] if raw.ndim == 3 else raw, pre), np.ones(len(raw), dtype=bool)
    pixels = raw.astype(np.float32)
    ok = np.isfinite(pixels.reshape(len(pixels), -1)).all(axis=1)
    pixels = pixels[ok]
    chw = pixels[:, None] if pixels.ndim == 3 else np.moveaxis(pixels, -1, 1)
    mean = np.asarray(pre.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[None, :, None, None]
    return np.ascontiguousarray((chw - mean) / std), ok


def image_array_fits(shape: Sequence[int], dtype: np.dtype, pre: ImagePreprocessing) -> bool:
    """Whether (n, H, W[, C]) arrays can skip PIL: right size and channel count."""
    if tuple(shape[1:3]) != (pre.height, pre.width):
        return False
    channels = 1 if len(shape) == 3 else shape[3]
    return channels == pre.channels and (dtype == np.uint8 or dtype.kind == "f")


def row_shape_text(shape: Sequence[int]) -> str:
    """An array's shape with its row count left out, for messages that reach the coordinator
    (how many rows a site holds is its data)."""
    return "(n, " + ", ".join(str(int(v)) for v in shape[1:]) + ")"


def check_image_array(shape: Sequence[int], dtype: np.dtype, pre: ImagePreprocessing) -> None:
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
        raise InputKindMismatchError(
            f"image arrays must be (n, h, w) or (n, h, w, c) with c in 1, 3, 4; got {row_shape_text(shape)}")
    if dtype != np.uint8 and not image_array_fits(shape, dtype, pre):
        raise InputKindMismatchError(
            f"float image arrays must already be {pre.height}x{pre.width} with {pre.channels} channel(s) "
            f"and values in [0, 1]; got {row_shape_text(shape)} (store uint8 pixels to let the site resize)"
        )


# --------------------------------------------------------------------------- vectors

def vector_batch(raw: np.ndarray, pre: VectorPreprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Usable (k, dim) rows of an (m, dim) array, standardised in float64 when the
    manifest asks for it (otherwise left in their float dtype), and the (m,) usable mask."""
    rows = np.asarray(raw)
    if rows.ndim != 2 or rows.shape[1] != pre.dim:
        raise InputKindMismatchError(f"the model takes {pre.dim}-wide vectors; the site holds shape {rows.shape}")
    if rows.dtype.kind != "f":
        rows = rows.astype(np.float64)
    ok = np.isfinite(rows).all(axis=1)
    if not ok.all():
        rows = rows[ok]
    if pre.mean is not None or pre.std is not None:
        rows = rows.astype(np.float64)
        if pre.mean is not None:
            rows -= np.asarray(pre.mean)
        if pre.std is not None:
            rows /= np.asarray(pre.std)
    return rows, ok
