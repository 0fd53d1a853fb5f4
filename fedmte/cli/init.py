"""``fedmte init site|job``: write a complete, commented ``site.toml`` or ``job.toml`` template.

The templates are generated from the pydantic models that read them (:class:`SiteConfig`,
:class:`JobSpec`): every key of every table is written, either set or commented out at its
default, under a comment taken from the field's description (or, for fields without one, from
:data:`NOTES`), so the documentation cannot drift from what the reader accepts. Replace every
``CHANGE-ME`` and the file loads.
"""

from __future__ import annotations

import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from fedmte.cli.errors import friendly_errors

PLACEHOLDER = "CHANGE-ME"
COMMENT_WIDTH = 92

ARCHITECTURE_NAMES = ("mlp", "cnn", "text_bag", "site_features", "hf_text_encoder", "hf_image_encoder",
                      "torchvision", "timm")
"""Named in the template's comments (checked against the site registry by the tests)."""

NOTES: dict[str, str] = {
    # the site file
    "SiteConfig.site": "who this site is", "SiteConfig.data": "the data this site holds (one source)",
    "SiteConfig.trust": "the coordinators this site trusts", "SiteConfig.compute": "how the site computes",
    "SiteConfig.limits": "resource caps, checked before anything is built or allocated",
    "SiteConfig.policy": "what this site computes and releases, whatever a job asks (default deny)",
    "SiteConfig.audit": "the tamper-evident audit log, its key and the privacy ledger",
    "SiteConfig.secure": "optional: this site's part in the secure sum (leave out for plain sums)",
    "SiteInfo.name": "this site's name; with [secure], its id in the secure sum (letters, digits, '.', '_', '-')",
    "SiteInfo.cache_dir": "the feature cache and job state (relative paths start at this file's folder)",
    "_Source.path": "the data: a folder (image_folder), a .csv/.jsonl (table), an .npz or .npy (arrays, "
                    "features); relative to this file",
    "_Source.labels": "the label space for local runs (a job brings its own); set it to check labels with "
                      "`fedmte site check`",
    "_Source.label_map": "site label -> label-space name, where they differ (e.g. \"0\" = \"benign\")",
    "_Source.on_error": "corrupt rows: skip them (and count) or refuse the whole source",
    "_Source.fingerprint": "the dataset fingerprint hashes file metadata (fast) or file contents",
    "ImageFolderSource.kind": "one subfolder per class; the subfolder name is the site's label",
    "ImageFolderSource.extensions": "image file suffixes read",
    "TableSource.kind": "CSV (with a header row) or JSON Lines; one row per sample",
    "TableSource.format": "the table's format; auto: from the suffix",
    "TableSource.label_column": "the column holding the label",
    "TableSource.text_column": "the column holding the text (set this or path_column)",
    "TableSource.path_column": "the column holding image paths, relative to the table (or text_column)",
    "ArraySource.kind": "an .npz with an inputs and a labels array, or an .npy of inputs plus labels_path; (n, d) "
                        "inputs are vectors, (n, h, w[, c]) images",
    "ArraySource.inputs_key": "the inputs array in the .npz", "ArraySource.labels_key": "the labels array in the .npz",
    "ArraySource.labels_path": "with an .npy of inputs: the .npy of labels",
    "FeaturesSource.kind": "features the site computed itself: an .npz with (n, d) features, labels and "
                           "optionally (n, Cs) source_probs; scored as a site_features candidate",
    "FeaturesSource.features_key": "the features array", "FeaturesSource.labels_key": "the labels array",
    "FeaturesSource.source_probs_key": "the source head's softmax outputs, if any",
    "TrustConfig.coordinators": "name = \"ed25519:...\": the coordinators this site trusts, each once; the same "
                                "keys verify model packages, jobs and secure-sum requests",
    "ComputeConfig.batch_size": "rows per batch through a model",
    "ComputeConfig.threads": "torch intra-op threads (unset: torch's default)",
    "ComputeConfig.device": "cpu, cuda, or auto (CUDA when present)",
    "ComputeConfig.progress": "show progress bars",
    "ComputeConfig.blas_threads": "BLAS threads for the statistics while torch runs",
    "ComputeConfig.stats_rows": "rows per block of the statistics",
    "SiteLimits.max_weights_bytes": "largest weights file read", "SiteLimits.max_header_bytes": "largest "
    "safetensors header", "SiteLimits.max_tensors": "most tensors in a weights file",
    "SiteLimits.max_parameters": "most parameters of a model",
    "SiteLimits.max_tensor_elements": "largest tensor a configuration may describe",
    "SiteLimits.max_layer_width": "widest layer a configuration may describe",
    "SiteLimits.max_layers": "most layers a configuration may describe",
    "SiteLimits.max_input_elements": "largest decoded input row", "SiteLimits.max_batch_bytes": "largest batch",
    "SiteLimits.max_labels": "most labels in a job's label space",
    "SiteLimits.max_release_entries": "most numbers in one release",
    "SiteLimits.max_address_space_bytes": "RLIMIT_AS of the site runner process (unset: no limit)",
    "SitePolicy.schema_": "the policy format", "SitePolicy.allowed_scorers": "scorers a job may run here",
    "SitePolicy.allowed_statistics": "statistics that may leave this site",
    "SitePolicy.allowed_transforms": "feature transforms a job may ask for",
    "SitePolicy.allowed_architectures": "model architectures that may run here",
    "SitePolicy.max_feature_dim": "widest feature a job may sum",
    "SitePolicy.clip_norm": "every row's feature is clipped to this L2 norm before anything is summed (bounds "
                            "each record's influence)",
    "SitePolicy.min_noisy_class_count": "classes whose noisy count falls below this are suppressed",
    "SitePolicy.dp": "Gaussian differential privacy of every release",
    "DPPolicy.enabled": "add calibrated Gaussian noise (false: exact sums, no privacy guarantee)",
    "DPPolicy.epsilon_per_release": "the fixed (epsilon, delta) cost of one release; no job can change it",
    "DPPolicy.epsilon_budget": "the most all releases on one data source may compose to (Gaussian DP: mu^2 adds, "
                               "so 4 is more than four releases of 1)",
    "DPPolicy.delta": "the delta of both epsilons",
    "DPPolicy.neighbouring": "neighbouring datasets: add or remove one record, or replace one",
    "AuditSettings.dir": "the audit log's folder", "AuditSettings.ledger_dir": "the privacy ledger's folder",
    "AuditSettings.checkpoint_every": "records between signed checkpoints",
    "SecureSettings.state_dir": "nonces seen, so replays are refused after a restart",
    "SecureSettings.max_request_age": "seconds a secure-sum request stays valid",
    "SecureSettings.require_secure_sum": "refuse plain sums: statistics leave masked only",
    "SecureSettings.require_self_masks": "refuse one-round secure sums without self masks",
    "SecureSettings.max_sessions": "secure-sum sessions held at once",
    "SecureSettings.session_ttl": "seconds a secure-sum session is kept",
    # the job file
    "JobSpec.candidates": "the models to rank: a path (contains \"/\": a signed package folder, relative to this "
                          "file), a bare name (a package in model_store), or { name = ..., path = ... }, or "
                          "{ name = \"x\", site_features = true }",
    "JobSpec.labels": "the target label space: C = len(labels)",
    "JobSpec.scorers": "transferability scorers to run (`fedmte scorers` lists them)",
    "JobSpec.scorer_options": "per-scorer options, as [scorer_options.NAME] tables, checked against the registry",
    "JobSpec.constraints": "business constraints on metadata measured at the sites",
    "JobSpec.ranking": "how the per-scorer ranks become one ranking",
    "JobSpec.privacy": "what the coordinator asks; each site's policy decides",
    "JobSpec.federation": "transport settings",
    "Candidate.name": "the candidate's name (a package in model_store without path)",
    "Candidate.path": "a signed model package folder",
    "Constraints.max_latency_ms": "median single-sample latency, worst site",
    "Constraints.max_parameters": "most parameters",
    "Constraints.max_peak_memory_mb": "peak memory of the pass, worst site, MiB",
    "Constraints.licenses": "license allowlist (unset: any license)",
    "Constraints.action": "what a violation does: flag (kept, never recommended) or filter (left out)",
    "Constraints.actions": "per-rule overrides of action, e.g. licenses = \"filter\"",
    "RankingSettings.aggregate": "how per-scorer ranks combine",
    "RankingSettings.ties": "per-scorer ties", "RankingSettings.top_k": "how many models the report recommends",
    "PrivacyRequest.dp": "ask for DP noise",
    "FederationSettings.min_sites": "sites needed to start",
    "FederationSettings.connect_timeout": "seconds to wait for the sites",
    "FederationSettings.round_timeout": "seconds one round may take",
    "FederationSettings.run_timeout": "seconds the whole job may take",
    "SecureJobSpec.self_masks": "two-round secure sum with self masks (false: one round; sites must allow it)",
    "SecureJobSpec.bounds": "public bounds the secure sum's fixed-point scales follow from",
}

EXAMPLES: dict[str, Any] = {
    "SiteInfo.name": PLACEHOLDER, "_Source.labels": ["benign", "malignant"], "_Source.label_map": {"0": "benign"},
    "TableSource.text_column": "text", "TableSource.path_column": "image", "ArraySource.labels_path": "labels.npy",
    "AuditSettings.verification_key_sha256": "CHANGE-ME (the fingerprint `fedmte site keygen` prints)",
    "ComputeConfig.threads": 8, "SiteLimits.max_address_space_bytes": 17_179_869_184,
    "DPPolicy.colluding_sites": 1,
    "SecureSettings.roster": {"CHANGE-ME": "ed25519:CHANGE-ME", "peer-site": "ed25519:CHANGE-ME"},
    "JobSpec.model_store": "models", "JobSpec.scorer_options": {"gbc": {"gaussian_type": "diagonal"}},
    "Constraints.max_latency_ms": 50.0, "Constraints.max_parameters": 25_000_000,
    "Constraints.max_peak_memory_mb": 2048.0, "Constraints.licenses": ["Apache-2.0", "MIT"],
    "Constraints.actions": {"licenses": "filter"}, "RankingSettings.scorer": "logme",
    "PrivacyRequest.epsilon": 1.0, "PrivacyRequest.delta": 1e-6, "PrivacyRequest.project_dim": 16,
    "FederationSettings.flwr_home": "flwr-home", "SecureJobSpec.signing_key": "keys/coordinator.pem",
    "SecureJobSpec.roster": {"site-a": "ed25519:CHANGE-ME", "site-b": "ed25519:CHANGE-ME",
                             "site-c": "ed25519:CHANGE-ME"},
    "SecureJobSpec.threshold": 2, "DeclaredBounds.max_rows": 100_000, "DeclaredBounds.feature_norm": 10.0,
}
"""Values shown for keys that have no default (or an empty one) when they are commented out."""

SKIP = {"SitePolicy.coordinator_keys": "filled in from [trust.coordinators]; never written",
        "SecureJobSpec.model_hashes": "filled in by the coordinator from the candidates"}


# --------------------------------------------------------------------------- the generator

def _lookup(table: dict[str, Any], model: type, name: str) -> Any:
    for cls in model.__mro__:
        key = f"{cls.__name__}.{name}"
        if key in table:
            return table[key]
    return None


def field_doc(model: type, name: str) -> str:
    """The comment of a key: the field's description, else its :data:`NOTES` entry."""
    info = model.model_fields[name]  # type: ignore[attr-defined]
    doc = info.description or _lookup(NOTES, model, name)
    if not doc:
        raise KeyError(f"{model.__name__}.{name} has neither a description nor a note in fedmte.cli.init.NOTES")
    return doc


def _submodel(annotation: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType, typing.Annotated):
        return None  # a list of models is a key (of inline tables), not a table
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _is_dict(annotation: Any) -> bool:
    if typing.get_origin(annotation) is dict:
        return True
    return any(_is_dict(arg) for arg in typing.get_args(annotation) if arg is not type(None))


def _choices(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    found: list[Any] = []
    for arg in typing.get_args(annotation):
        found += _choices(arg)
    return found


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 100_000 else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (frozenset, set)):
        return _value(sorted(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to a template")


def _key(key: str) -> str:
    return key if key and key.replace("-", "").replace("_", "").isalnum() and key.isascii() else json.dumps(key)


def _default(info: Any) -> Any:
    from pydantic_core import PydanticUndefined

    if info.default_factory is not None:
        return info.default_factory()
    return None if info.default is PydanticUndefined else info.default


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def comment(self, text: str, off: bool = False) -> None:
        prefix = "# " if not off else "# "
        self.lines.extend(textwrap.wrap(text, width=COMMENT_WIDTH, initial_indent=prefix, subsequent_indent=prefix,
                                        break_long_words=False, break_on_hyphens=False))

    def line(self, text: str, off: bool) -> None:
        self.lines.append(("# " if off else "") + text)

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")


def _render(out: _Writer, model: Any, path: str, values: dict[str, Any], *, off: bool = False,
            doc: str = "", extra: str = "") -> None:
    """One table: its header, every key (set from ``values`` or commented out), then its subtables.
    ``off`` comments the whole table out."""
    fields = [(name, info) for name, info in model.model_fields.items() if _lookup(SKIP, model, name) is None]
    tables = [(n, i) for n, i in fields if _submodel(i.annotation) is not None or _is_dict(i.annotation)]
    keys = sorted((f for f in fields if f not in tables), key=lambda f: f[0] != "kind")  # the discriminator first
    if path:
        out.blank()
        if doc:
            out.comment(doc)
        out.line(f"[{path}]", off)
    if extra:
        out.comment(extra)
    for name, info in keys:
        key = info.alias or name
        set_here = key in values
        value = values[key] if set_here else _default(info)
        if not set_here and value in (None, [], (), frozenset()):
            example = _lookup(EXAMPLES, model, name)
            value = example if example is not None else value
        note = field_doc(model, name)
        choices = _choices(info.annotation)
        if len(choices) > 1:
            note += f" (one of: {', '.join(_value(c) for c in choices)})"
        default = _default(info)
        if not info.is_required() and not (default is None and "default" in note):
            note += f"; default: {'unset' if default is None else _value(default)}"
        else:
            note += "; required"
        out.comment(note)
        out.line(f"{_key(key)} = {_value(value) if value is not None else _value('')}", off or not set_here)
    for name, info in tables:
        key = info.alias or name
        dotted = f"{path}.{_key(key)}" if path else _key(key)
        sub = _submodel(info.annotation)
        set_here = key in values
        if sub is not None and not _is_dict(info.annotation):
            _render(out, sub, dotted, values.get(key, {}), off=off or not set_here, doc=field_doc(model, name))
            continue
        entries = values[key] if set_here else (_lookup(EXAMPLES, model, name) or {})
        out.blank()
        out.comment(field_doc(model, name) + ("" if set_here else " (example; commented out)"))
        if entries and all(isinstance(v, dict) for v in entries.values()):  # a table of tables
            for entry, table in entries.items():
                out.line(f"[{dotted}.{_key(entry)}]", off or not set_here)
                for k, v in table.items():
                    out.line(f"{_key(k)} = {_value(v)}", off or not set_here)
            continue
        out.line(f"[{dotted}]", off or not set_here)
        for entry, value in entries.items():
            out.line(f"{_key(entry)} = {_value(value)}", off or not set_here)


def _first_paragraph(model: Any) -> str:
    return " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())


# --------------------------------------------------------------------------- the two templates

SITE_VALUES: dict[str, Any] = {
    "site": {"name": PLACEHOLDER, "cache_dir": "cache"},
    "data": {"kind": "arrays", "path": f"data/{PLACEHOLDER}.npz"},
    "trust": {"coordinators": {"main": f"ed25519:{PLACEHOLDER}"}},
    "compute": {},
    "limits": {},
    "policy": {"allowed_scorers": ["hscore", "logme"],
               "allowed_statistics": ["class_counts", "class_sq_sums", "class_sums", "count", "gram", "sum"],
               "allowed_transforms": [], "allowed_architectures": ["cnn", "mlp"], "max_feature_dim": 512,
               "clip_norm": 1.0, "dp": {"enabled": True, "allocation": "by_scorer", "distributed": False}},
    "audit": {"dir": "audit", "signing_key": "keys/audit.key", "ledger_dir": "ledger"},
}


def site_template() -> str:
    """The commented ``site.toml`` template (every key of :class:`SiteConfig`)."""
    from fedmte.client.site_config import (
        ArraySource,
        FeaturesSource,
        ImageFolderSource,
        SiteConfig,
        TableSource,
        _Source,
    )
    from fedmte.protocol.catalogue import STATISTICS, TRANSFORMS
    from fedmte.protocol.scorers import SCORERS

    out = _Writer()
    out.comment("Site file (site.toml): everything this data owner decides, and no job can change. Written by "
                "`fedmte init site`. Replace every CHANGE-ME, make the audit key (`fedmte site keygen keys`), "
                "then run `fedmte site check site.toml`. Relative paths start at this file's folder; unknown keys "
                "are refused.")
    out.comment(f"Scorers: {', '.join(sorted(SCORERS))}.")
    out.comment(f"Statistics: {', '.join(sorted(STATISTICS))}.")
    out.comment(f"Transforms: {', '.join(sorted(TRANSFORMS))}. Architectures: {', '.join(ARCHITECTURE_NAMES)}.")
    for name in ("site", "data", "trust", "compute", "limits", "policy", "audit", "secure"):
        info = SiteConfig.model_fields[name]
        doc = field_doc(SiteConfig, name)
        if name == "data":
            kinds = {"image_folder": ImageFolderSource, "table": TableSource, "arrays": ArraySource,
                     "features": FeaturesSource}
            chosen = kinds[SITE_VALUES["data"]["kind"]]
            _render(out, chosen, "data", SITE_VALUES["data"], doc=f"{doc}; kind is one of {', '.join(kinds)}")
            for kind, model in kinds.items():
                if model is chosen:
                    continue
                out.blank()
                out.comment(f"With kind = \"{kind}\" instead: {field_doc(model, 'kind')}. Its own keys:")
                for field, field_info in model.model_fields.items():
                    if field in _Source.model_fields or field == "kind":
                        continue
                    default = _default(field_info)
                    shown = default if default is not None else _lookup(EXAMPLES, model, field)
                    out.comment(f"{field_doc(model, field)}; default: {'unset' if default is None else _value(default)}")
                    out.line(f"{field} = {_value(shown)}", True)
            continue
        sub = _submodel(info.annotation)
        _render(out, sub, name, SITE_VALUES.get(name, {}), off=name not in SITE_VALUES, doc=doc)
    return "\n".join(out.lines) + "\n"


JOB_VALUES: dict[str, Any] = {
    "connection": PLACEHOLDER, "output": "report", "purpose": f"{PLACEHOLDER}: why this job runs",
    "labels": [f"{PLACEHOLDER}-first-label", f"{PLACEHOLDER}-second-label"],
    "candidates": [f"models/{PLACEHOLDER}"], "scorers": ["logme", "hscore"],
    "constraints": {}, "ranking": {}, "privacy": {"dp": True},
    "federation": {"coordinator_key": "keys/coordinator.pem"},
}


def job_template() -> str:
    """The commented ``job.toml`` template (every key of :class:`JobSpec`)."""
    from fedmte.server.job import Candidate, JobSpec

    out = _Writer()
    out.comment("Job file (job.toml): what to score, how to rank, what privacy to ask. Written by `fedmte init "
                "job`. Replace every CHANGE-ME, then run `fedmte run job.toml`. Relative paths start at this "
                "file's folder; unknown keys are refused.")
    candidate_keys = "; ".join(f"{name}: {field_doc(Candidate, name)}" for name in Candidate.model_fields)
    _render(out, JobSpec, "", JOB_VALUES, extra="", doc="")
    index = next(i for i, line in enumerate(out.lines) if line.startswith("candidates = "))
    note = _Writer()
    note.comment(f"A candidate table's keys: {candidate_keys}")
    out.lines[index:index] = note.lines
    return "\n".join(out.lines) + "\n"


TEMPLATES = {"site": ("site.toml", site_template), "job": ("job.toml", job_template)}


def write_template(kind: str, directory: Path) -> Path:
    """Write the ``kind`` template into ``directory`` (made if missing); never overwrite a file."""
    from fedmte.protocol.errors import InvalidInputError

    name, make = TEMPLATES[kind]
    path = directory / name
    text = make()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        raise InvalidInputError(f"{path} exists and is never overwritten; move it away, or choose another "
                                "folder") from None
    except OSError as error:
        raise InvalidInputError(f"cannot write {path}: {error.strerror}; choose a folder you can write to") from None
    return path


init_app = typer.Typer(name="init", help="Write a complete, commented site.toml or job.toml template.",
                       no_args_is_help=True)

DirArg = Annotated[Path, typer.Argument(metavar="DIR", help="the folder to write into (made if missing)")]


@init_app.command("site")
@friendly_errors
def init_site(directory: DirArg) -> None:
    """Write DIR/site.toml, documenting every key of the site file; never overwrites a file."""
    path = write_template("site", directory)
    typer.echo(f"wrote {path}: replace every {PLACEHOLDER}, make the audit key with `fedmte site keygen "
               f"{directory / 'keys'}`, then run `fedmte site check {path}`")


@init_app.command("job")
@friendly_errors
def init_job(directory: DirArg) -> None:
    """Write DIR/job.toml, documenting every key of the job file; never overwrites a file."""
    path = write_template("job", directory)
    typer.echo(f"wrote {path}: replace every {PLACEHOLDER}, then run `fedmte run {path}`")


def register(app: typer.Typer) -> None:
    app.add_typer(init_app, name="init")
