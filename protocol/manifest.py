"""The manifest of a candidate-model package: what the model is, as plain, signed data.

A manifest names an architecture from the site's own registry
(:mod:`fedmte.client.architectures`) and its configuration, how to turn a raw sample into
the network's input (preprocessing, run by site code), which of the network's named outputs
is the feature vector, whether and where a source classifier head gives source-class
probabilities (for NCE/LEEP-type scorers), the license, the parameter count, and the
sha256 and size of the weights file. The coordinator signs the manifest's canonical bytes
(:func:`ModelManifest.canonical_bytes`), so the signature covers the weights through their
hash. Nothing in a manifest is code: every field is a number, a string or a list of them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, JsonValue, model_validator

from fedmte.protocol.encoding import StrictModel, canonical_json

MANIFEST_SCHEMA = "fedmte.model_manifest.v1"

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAX_IMAGE_SIDE = 4096
MAX_TEXT_TOKENS = 65536


class ImagePreprocessing(StrictModel):
    """Decode, convert to ``channels`` (1: grey, 3: RGB), resize to ``height`` x ``width``,
    scale to [0, 1], then subtract ``mean`` and divide by ``std`` per channel."""

    kind: Literal["image"] = "image"
    height: int = Field(ge=1, le=MAX_IMAGE_SIDE)
    width: int = Field(ge=1, le=MAX_IMAGE_SIDE)
    channels: Literal[1, 3]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: Literal["bilinear", "bicubic", "nearest"] = "bilinear"

    @model_validator(mode="after")
    def _per_channel(self) -> ImagePreprocessing:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need one value per channel ({self.channels})")
        if any(not s > 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class TextPreprocessing(StrictModel):
    """Turn text into at most ``max_tokens`` token ids in [1, vocab_size); 0 pads.

    ``bytes``: id = UTF-8 byte + 1 (so ``vocab_size`` must be 257).
    ``hashed_words``: whitespace-split words, id = 1 + blake2b-64(word) mod (vocab_size - 1).
    """

    kind: Literal["text"] = "text"
    tokenizer: Literal["bytes", "hashed_words"]
    vocab_size: int = Field(ge=2, le=16_777_216)
    max_tokens: int = Field(ge=1, le=MAX_TEXT_TOKENS)
    lowercase: bool = False

    @model_validator(mode="after")
    def _byte_vocab(self) -> TextPreprocessing:
        if self.tokenizer == "bytes" and self.vocab_size != 257:
            raise ValueError("the 'bytes' tokenizer needs vocab_size = 257 (256 bytes + padding)")
        return self


class VectorPreprocessing(StrictModel):
    """A row of ``dim`` numbers, optionally standardised as (x - mean) / std."""

    kind: Literal["vector"] = "vector"
    dim: int = Field(ge=1, le=1_000_000)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _lengths(self) -> VectorPreprocessing:
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) != self.dim:
                raise ValueError(f"{name} needs {self.dim} values, got {len(values)}")
        if self.std is not None and any(not s > 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


Preprocessing = Annotated[
    ImagePreprocessing | TextPreprocessing | VectorPreprocessing, Field(discriminator="kind")
]


class SourceHead(StrictModel):
    """Where the source classifier's logits come out, and how many source classes it has."""

    output: str = Field(default="logits", min_length=1, max_length=64)
    num_classes: int = Field(ge=2, le=1_000_000)
    class_names: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _names(self) -> SourceHead:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        return self


class ModelManifest(StrictModel):
    """Everything the site needs to build, verify and run one candidate model."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["fedmte.model_manifest.v1"] = Field(default=MANIFEST_SCHEMA, alias="schema")
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(default="1", min_length=1, max_length=64)
    architecture: str = Field(pattern=NAME_PATTERN)
    config: dict[str, JsonValue] = Field(default_factory=dict)
    preprocessing: Preprocessing
    feature_output: str = Field(default="features", min_length=1, max_length=64)
    source_head: SourceHead | None = None
    license: str = Field(min_length=1, max_length=256)
    parameter_count: int = Field(ge=0)
    weights_sha256: str = Field(pattern=SHA256_PATTERN)
    weights_bytes: int = Field(ge=0)
    description: str = Field(default="", max_length=4096)

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON data with the wire field names (``schema``, not ``schema_``)."""
        return self.model_dump(mode="json", by_alias=True)

    def canonical_bytes(self) -> bytes:
        """Sorted keys, no whitespace, UTF-8: the exact bytes a package stores and signs."""
        return canonical_json(self.to_json_dict())

    @property
    def manifest_sha256(self) -> str:
        """Content address of the whole manifest (architecture, preprocessing, weights hash):
        the model's identity in caches, audit records and model-consistency checks."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> None:
    raise ValueError(f"JSON constant {name} is not allowed")


def strict_json_loads(data: bytes) -> Any:
    """Parse UTF-8 JSON, refusing duplicate keys and NaN/Infinity (both make signed bytes
    mean two things)."""
    return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
