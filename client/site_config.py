"""The site file (``site.toml``): everything a data owner decides, and no job can change.

One file, validated by one model (:class:`SiteConfig`), holds the site's data, the one list of
coordinator keys it trusts (for model packages, for jobs and for the secure sum alike), its
policy and DP settings, its audit log and, optionally, its part in the secure sum. ``fedmte
local up`` and ``fedmte demo`` write it through :func:`site_file_text`, the reader is
:func:`load_site_config`, so a written file always reads back. Example::

    [site]
    name = "hospital-a"
    cache_dir = "cache"                 # feature cache, relative to this file

    [data]
    kind = "table"                      # "image_folder", "table", "arrays" or "features" (precomputed)
    path = "data/notes.csv"             # .csv or .jsonl for a table
    text_column = "text"                # or path_column = "image" (paths relative to the table)
    label_column = "diagnosis"
    labels = ["benign", "malignant"]    # the label space for local runs (a job brings its own)
    on_error = "skip"                   # corrupt rows: "skip" (and count) or "refuse"
    [data.label_map]                    # site label -> label-space name, where they differ
    "0" = "benign"

    [trust.coordinators]                # the coordinators this site trusts, once: they sign the
    main = "ed25519:..."                # model packages, the jobs and the secure-sum requests

    [policy]                            # default deny (fedmte.client.policy.SitePolicy)
    allowed_scorers = ["logme", "hscore"]
    allowed_statistics = ["count", "class_counts", "sum", "class_sums", "gram", "class_sq_sums"]
    allowed_architectures = ["mlp", "cnn"]   # "site_features" for a [data] kind = "features" site
    max_feature_dim = 512
    clip_norm = 1.0
    [policy.dp]
    enabled = true
    allocation = "by_scorer"            # split of each release's mu^2: per requested score, then sqrt(entries);
                                        # or "by_size" (sqrt(entries) per block) or "even"
    distributed = false                 # true: through the secure sum, add only a share of the noise
    # colluding_sites = 1               # other sites that may collude (default: sites - threshold)

    [audit]
    dir = "audit"
    signing_key = "keys/audit.key"
    ledger_dir = "ledger"
    verification_key_sha256 = "..."     # pins the audit key: the site refuses to start with another

    [secure]                            # optional: take part in the secure sum
    identity_key = "keys/identity.pem"  # signs this site's keys in the secure sum
    state_dir = "state"                 # nonces seen, so replays are refused after a restart
    require_secure_sum = true           # refuse plain sums: statistics leave masked only
    [secure.roster]                     # the peers this site sums with (itself included)
    hospital-a = "ed25519:..."
    hospital-b = "ed25519:..."

    [compute]
    batch_size = 256
    threads = 8                         # torch intra-op threads; omit for torch's default
    device = "auto"                     # "cpu", "cuda" or "auto" (CUDA when present)

    [limits]                            # resource caps, checked before anything is built or
    max_weights_bytes = 1_000_000_000   # allocated (fedmte.client.limits: parameters, widths,
    max_labels = 10_000                 # inputs, batches, labels, release entries)
    max_address_space_bytes = 17_179_869_184   # optional: RLIMIT_AS of the site runner

Relative paths are resolved against the folder of the site file. Unknown keys are refused,
so a typo in a security setting is an error, not a silent default.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from fedmte.client.errors import SiteConfigError
from fedmte.client.limits import SiteLimits
from fedmte.client.policy import Fingerprint, SitePolicy
from fedmte.protocol.encoding import StrictModel
from fedmte.protocol.errors import FedmteError
from fedmte.protocol.keys import fingerprint, parse_public_key
from fedmte.protocol.secure_sum import SITE_ID_PATTERN

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class SiteInfo(StrictModel):
    name: str = Field(default="site", min_length=1, max_length=128)
    cache_dir: Path = Path(".fedmte-cache")


class _Source(StrictModel):
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


class FeaturesSource(_Source):
    """Features the site computed itself: an ``.npz`` with a (n, d) ``features`` array, a
    ``labels`` array and optionally (n, Cs) ``source_probs`` (softmax outputs of a source
    head). No model runs at such a site; a job scores these features as a ``site_features``
    candidate, under the same policy, clipping, DP and audit as a model's features."""

    kind: Literal["features"] = "features"
    features_key: str = "features"
    labels_key: str = "labels"
    source_probs_key: str = "source_probs"

    @field_validator("path")
    @classmethod
    def _npz(cls, value: Path) -> Path:
        if value.suffix.lower() != ".npz":
            raise ValueError(f"a features source is an .npz archive (features, labels[, source_probs]); got {value.name}")
        return value


DataSource = Annotated[ImageFolderSource | TableSource | ArraySource | FeaturesSource, Field(discriminator="kind")]


class TrustConfig(StrictModel):
    """The coordinators this site trusts, each once, as ``name = "ed25519:..."``: the same keys
    verify model packages, job setups and secure-sum requests."""

    coordinators: dict[Annotated[str, Field(min_length=1, max_length=128)], str] = Field(default_factory=dict)

    @field_validator("coordinators")
    @classmethod
    def _parse(cls, value: dict[str, str]) -> dict[str, str]:
        for name, key in value.items():
            try:
                parse_public_key(key)
            except FedmteError as error:
                raise ValueError(f"{name}: {error}") from None
        if len(set(value.values())) != len(value):
            raise ValueError("a coordinator key is listed twice; list each key once, under one name")
        return value

    @property
    def keys(self) -> tuple[str, ...]:
        """The pinned keys' texts (packages are verified against these)."""
        return tuple(self.coordinators.values())

    def fingerprints(self) -> dict[str, str]:
        """name -> hex sha256 of the key: how the policy checks who signed a job."""
        return {name: fingerprint(parse_public_key(key)) for name, key in self.coordinators.items()}


class AuditSettings(StrictModel):
    """The ``[audit]`` table: where the tamper-evident log, its key and the ledger live."""

    dir: Path = Path("audit")
    signing_key: Path = Field(default=Path("keys/audit.key"), description="the site's Ed25519 PEM key (mode 600)")
    ledger_dir: Path = Path("ledger")
    checkpoint_every: int = Field(default=100, ge=1)
    verification_key_sha256: Fingerprint | None = Field(
        default=None, description="fingerprint of the audit key's public half; the site refuses another key")


class SecureSettings(StrictModel):
    """The ``[secure]`` table: this site's part in the secure sum (the coordinators it accepts
    requests from are ``[trust.coordinators]``; its site id is ``[site] name``)."""

    identity_key: Path = Field(default=Path("keys/identity.pem"), description="Ed25519 PEM key, mode 600")
    roster: dict[str, str] = Field(min_length=1, description="site id -> ed25519:... identity key, this site included")
    state_dir: Path = Path("state")
    max_request_age: float = Field(default=600.0, gt=0, le=86_400)
    require_secure_sum: bool = True
    require_self_masks: bool = True
    min_declared_rows: int = Field(default=1_000_000, ge=1, description="refuse jobs declaring fewer max_rows")
    min_declared_feature_norm: float = Field(default=0.0, ge=0, description="refuse jobs declaring a smaller feature_norm")
    max_sessions: int = Field(default=8, ge=1, le=1024)
    session_ttl: float = Field(default=86_400.0, gt=0)

    @field_validator("roster")
    @classmethod
    def _roster_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for site, key in value.items():
            try:
                parse_public_key(key)
            except FedmteError as error:
                raise ValueError(f"{site}: {error}") from None
        return value


class ComputeConfig(StrictModel):
    batch_size: int = Field(default=256, ge=1, le=65_536)
    threads: int | None = Field(default=None, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    blas_threads: int | None = Field(default=1, ge=1, le=1024)
    stats_rows: int = Field(default=2048, ge=1, le=1_048_576)


class SiteConfig(StrictModel):
    """The whole site file. ``policy`` is the data owner's policy with the trusted
    coordinators' fingerprints filled in from ``[trust]`` (the policy table never lists keys)."""

    site: SiteInfo = SiteInfo()
    data: DataSource
    trust: TrustConfig = TrustConfig()
    compute: ComputeConfig = ComputeConfig()
    limits: SiteLimits = SiteLimits()
    policy: SitePolicy | None = None
    audit: AuditSettings = AuditSettings()
    secure: SecureSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_list_of_keys(cls, document: Any) -> Any:
        if not isinstance(document, dict):
            return document
        trust, policy = document.get("trust"), document.get("policy")
        if isinstance(trust, dict) and "keys" in trust:
            raise ValueError("trust.keys is gone: list each coordinator once as [trust.coordinators] name = \"ed25519:...\"")
        if isinstance(policy, dict):
            if "coordinator_keys" in policy:
                raise ValueError("policy.coordinator_keys is gone: the coordinators a site trusts are listed once, in "
                                 "[trust.coordinators] (name = \"ed25519:...\")")
            try:
                pinned = TrustConfig.model_validate(trust if isinstance(trust, dict) else {}).fingerprints()
            except ValidationError:
                return document  # the [trust] table's own validation names the problem (as trust.<key>)
            document = {**document, "policy": {**policy, "coordinator_keys": pinned}}
        return document

    @model_validator(mode="after")
    def _secure_fits(self) -> SiteConfig:
        if self.secure is not None:
            if not re.match(SITE_ID_PATTERN, self.site.name):
                raise ValueError(f"site.name {self.site.name!r} is this site's id in the secure sum: use letters, digits, "
                                 "'.', '_' or '-'")
            if self.site.name not in self.secure.roster:
                raise ValueError(f"secure.roster must list this site ({self.site.name!r}) with its own identity key")
            if not self.trust.coordinators:
                raise ValueError("[secure] needs at least one key in [trust.coordinators] to accept requests from")
        return self

    def require_policy(self) -> SitePolicy:
        """The policy; a site file without one may still inspect models, but nothing may leave."""
        if self.policy is None:
            raise SiteConfigError("the site file has no [policy] table, so nothing may leave this site; add one "
                                  "(fedmte local up writes a complete example)")
        return self.policy


def _resolve(table: dict[str, Any], key: str, base: Path) -> None:
    if isinstance(table.get(key), str):
        path = Path(table[key]).expanduser()
        table[key] = path if path.is_absolute() else base / path


PATH_KEYS = {"site": ("cache_dir",), "data": ("path", "labels_path"), "audit": ("dir", "signing_key", "ledger_dir"),
             "secure": ("identity_key", "state_dir")}
"""The keys of each table that hold paths, resolved against the site file's folder."""


def parse_site_config(document: dict[str, Any], base: Path) -> SiteConfig:
    """Validate a parsed site document; relative paths (defaults included) are taken from ``base``."""
    document = {k: dict(v) if isinstance(v, dict) else v for k, v in document.items()}
    document.setdefault("site", {})
    document.setdefault("audit", {})
    defaults = {"site": SiteInfo, "audit": AuditSettings, "secure": SecureSettings}
    for table, keys in PATH_KEYS.items():
        values = document.get(table)
        if not isinstance(values, dict):
            continue
        for key in keys:
            model = defaults.get(table)
            if model is not None and key not in values:
                values[key] = str(model.model_fields[key].default)
            _resolve(values, key, base)
    try:
        return SiteConfig.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg'].removeprefix('Value error, ')}"
            for e in error.errors(include_url=False)
        )
        raise SiteConfigError(f"the site file is invalid: {problems}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SiteConfigError(f"a site file cannot hold {value}")
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # inside a list: an inline table
        return "{ " + ", ".join(f"{_toml_key(key)} = {_toml_value(v)}" for key, v in value.items()) + " }"
    raise SiteConfigError(f"cannot write {type(value).__name__} to a site file")


def _toml_key(key: str) -> str:
    return key if key and key.replace("-", "").replace("_", "").isalnum() and key.isascii() else json.dumps(key)


def toml_text(document: dict[str, Any], prefix: str = "", *, comments: dict[str, str] | None = None) -> str:
    """A TOML rendering of nested dicts of strings, numbers, booleans and lists; ``comments``
    maps a dotted key (``"policy.clip_norm"``) or table (``"policy"``) to a trailing comment."""
    comments = comments or {}

    def line(key: str, text: str) -> str:
        dotted = f"{prefix}.{key}" if prefix else key
        note = comments.get(dotted)
        return f"{text}  # {note}\n" if note else f"{text}\n"

    text = ""
    if prefix:
        note = comments.get(prefix)
        text += f"\n[{prefix}]" + (f"  # {note}" if note else "") + "\n"
    text += "".join(line(key, f"{_toml_key(key)} = {_toml_value(value)}")
                    for key, value in document.items() if not isinstance(value, dict))
    for key, value in document.items():
        if isinstance(value, dict):
            text += toml_text(value, f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key), comments=comments)
    return text


def site_file_text(document: dict[str, Any], *, header: str = "", comments: dict[str, str] | None = None) -> str:
    """Validate ``document`` as a site file (paths as written, relative to the file) and render
    it as TOML: every written site file goes through :class:`SiteConfig` first."""
    parse_site_config(document, Path("."))  # refuses what a reader would refuse
    banner = "".join(f"# {line}\n" for line in header.splitlines())
    return banner + toml_text(document, comments=comments)


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
