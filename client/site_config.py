"""The site file (``site.toml``): what the data owner configures, and no job can change.

Example::

    [site]
    name = "hospital-a"
    cache_dir = "cache"                 # feature cache, relative to this file

    [data]
    kind = "table"                      # "image_folder", "table" or "arrays"
    path = "data/notes.csv"             # .csv or .jsonl for a table
    text_column = "text"                # or path_column = "image" (paths relative to the table)
    label_column = "diagnosis"
    labels = ["benign", "malignant"]    # the label space for local runs (a job brings its own)
    on_error = "skip"                   # corrupt rows: "skip" (and count) or "refuse"
    [data.label_map]                    # site label -> label-space name, where they differ
    "0" = "benign"

    [trust]
    keys = ["ed25519:..."]              # coordinator keys allowed to sign model packages

    [compute]
    batch_size = 256
    threads = 8                         # torch intra-op threads; omit for torch's default
    device = "auto"                     # "cpu", "cuda" or "auto" (CUDA when present)
    blas_threads = 1                    # numpy BLAS threads for the statistics during a pass
    stats_rows = 2048                   # rows per statistics batch (speed/memory only)

    [limits]                            # caps on model packages (fedmte.client.weights)
    max_weights_bytes = 1_000_000_000

``[policy]`` and ``[audit]`` tables are kept as raw tables here; the privacy policy and the
audit log validate them (:mod:`fedmte.client.policy`, :mod:`fedmte.client.audit_log`).
Relative paths are resolved against the folder of the site file. Unknown keys are
refused, so a typo in a security setting is an error, not a silent default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmte.client.errors import SignatureError, SiteConfigError
from fedmte.client.weights import WeightLimits

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteInfo(_Strict):
    name: str = Field(default="site", min_length=1, max_length=128)
    cache_dir: Path = Path(".fedmte-cache")


class _Source(_Strict):
    """What every data source shares: where it is, its labels, and bad-row handling."""

    path: Path
    labels: tuple[str, ...] | None = None
    label_map: dict[str, str] = Field(default_factory=dict)
    on_error: Literal["skip", "refuse"] = "skip"
    fingerprint: Literal["metadata", "content"] = "metadata"


class ImageFolderSource(_Source):
    """One subfolder per class; the subfolder name is the site's label."""

    kind: Literal["image_folder"] = "image_folder"
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    @field_validator("extensions")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in value)


class TableSource(_Source):
    """CSV (with a header row) or JSON Lines; one row per sample."""

    kind: Literal["table"] = "table"
    format: Literal["auto", "csv", "jsonl"] = "auto"
    label_column: str = "label"
    text_column: str | None = None
    path_column: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TableSource:
        if (self.text_column is None) == (self.path_column is None):
            raise ValueError("set exactly one of text_column (text) or path_column (image paths)")
        _ = self.table_format  # an unknown suffix without an explicit format is a config error
        return self

    @property
    def table_format(self) -> Literal["csv", "jsonl"]:
        if self.format != "auto":
            return self.format
        suffix = self.path.suffix.lower()
        if suffix == ".csv":
            return "csv"
        if suffix in (".jsonl", ".ndjson"):
            return "jsonl"
        raise ValueError(f"cannot tell the format of {self.path.name}; set format = \"csv\" or \"jsonl\"")


class ArraySource(_Source):
    """``.npz`` with an inputs and a labels array, or an ``.npy`` of inputs plus ``labels_path``.

    Inputs of shape (n, d) are vectors; (n, h, w) or (n, h, w, c) are images (uint8 pixels,
    or floats already in [0, 1]). Labels are strings (names) or integers (indices into the
    label space, or names through ``label_map``)."""

    kind: Literal["arrays"] = "arrays"
    inputs_key: str = "inputs"
    labels_key: str = "labels"
    labels_path: Path | None = None


DataSource = Annotated[ImageFolderSource | TableSource | ArraySource, Field(discriminator="kind")]


class TrustConfig(_Strict):
    keys: tuple[str, ...] = ()

    @field_validator("keys")
    @classmethod
    def _parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from fedmte.client.packages import parse_public_key

        for key in value:
            try:
                parse_public_key(key)
            except SignatureError as error:
                raise ValueError(str(error)) from None
        return value


class ComputeConfig(_Strict):
    batch_size: int = Field(default=256, ge=1, le=65_536)
    threads: int | None = Field(default=None, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    blas_threads: int | None = Field(default=1, ge=1, le=1024)
    stats_rows: int = Field(default=2048, ge=1, le=1_048_576)


class SiteConfig(_Strict):
    site: SiteInfo = SiteInfo()
    data: DataSource
    trust: TrustConfig = TrustConfig()
    compute: ComputeConfig = ComputeConfig()
    limits: WeightLimits = WeightLimits()
    policy: dict[str, Any] = Field(default_factory=dict)
    audit: dict[str, Any] = Field(default_factory=dict)


def _resolve(table: dict[str, Any], key: str, base: Path) -> None:
    if isinstance(table.get(key), str):
        path = Path(table[key]).expanduser()
        table[key] = path if path.is_absolute() else base / path


def parse_site_config(document: dict[str, Any], base: Path) -> SiteConfig:
    """Validate a parsed site document; relative paths are taken from ``base``."""
    document = {k: dict(v) if isinstance(v, dict) else v for k, v in document.items()}
    site = document.setdefault("site", {})
    if isinstance(site, dict):
        site.setdefault("cache_dir", ".fedmte-cache")
        _resolve(site, "cache_dir", base)
    data = document.get("data")
    if isinstance(data, dict):
        _resolve(data, "path", base)
        _resolve(data, "labels_path", base)
    try:
        return SiteConfig.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors(include_url=False)
        )
        raise SiteConfigError(f"the site file is invalid: {problems}") from None


def load_site_config(path: Path | str) -> SiteConfig:
    """Read and validate ``site.toml``."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise SiteConfigError(f"site file {path} not found; pass --site with the path of your site.toml") from None
    except tomllib.TOMLDecodeError as error:
        raise SiteConfigError(f"site file {path} is not valid TOML: {error}") from None
    return parse_site_config(document, path.resolve().parent)
