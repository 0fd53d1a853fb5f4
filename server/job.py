"""The coordinator's job file (``job.toml``): what to score, how to rank, what privacy to ask.

Example::

    connection = "local"                  # a [superlink.NAME] connection in FLWR_HOME/config.toml
    output = "report"                     # report.json and report.html go here (relative to this file)
    purpose = "pick a backbone for X"     # why: written into every site's audit records
    model_store = "models"                # where bare candidate names are looked up (default: none)
    labels = ["cat", "dog", "fox"]        # the target label space: C = len(labels)
    candidates = [
        "models/resnet-small",            # a path (contains "/"): a signed model package folder
        "mlp-digits",                     # a bare name: a package in the coordinator's model store
        { name = "random-init", path = "models/random" },
        # { name = "resnet-feats", site_features = true },  # features the sites hold ([data] kind = "features")
    ]
    scorers = ["logme", "hscore", "gbc", "ncti"]

    [scorer_options.gbc]                  # per-scorer options, checked against the registry
    gaussian_type = "diagonal"

    [constraints]                         # business constraints, on metadata measured at the sites
    max_latency_ms = 50.0                 # median single-sample latency, worst site
    max_parameters = 25_000_000
    max_peak_memory_mb = 2048             # peak memory of the pass, worst site, MiB (2^20 bytes)
    licenses = ["Apache-2.0", "MIT"]      # allowlist; omit to allow any license
    action = "flag"                       # what a violation does: "flag" (default) or "filter"
    [constraints.actions]                 # per-rule overrides of `action`
    licenses = "filter"

    [ranking]
    aggregate = "mean_rank"               # "mean_rank" (default), "median_rank", "borda", "single"
    # scorer = "logme"                    # the scorer that ranks alone, with aggregate = "single"
    ties = "average"                      # per-scorer ties: "average" (default) or "min"
    top_k = 3
    bootstrap = 200                       # resamples of the noisy sums: intervals, chance of being best
    weigh_by_noise = true                 # under noise, a scorer counts by how reproducible its ranking is

    [privacy]                             # what the coordinator asks; each site's policy decides
    dp = true
    epsilon = 1.0                         # per release; omit to take each site's default
    delta = 1e-6
    centre = "coordinator"                # under noise: uncentred sums, centred here (no centring round)
    # project_dim = 16                    # under noise: a public random projection to 16 dimensions first
    clean = true                          # repair noisy sums before scoring (free: post-processing)

    [confirm]                             # stage 2: confirm the top candidates by a linear probe
    top_k = 3                             # on rows each site holds back (fedmte.server.confirm)
    holdout = 0.2
    max_rounds = 20                       # Newton rounds; each is a release under DP

    [federation]                          # transport settings (defaults shown)
    coordinator_key = "keys/coordinator.pem"  # the coordinator's Ed25519 key (PKCS#8 PEM): signs each
                                          # job's setup; sites pin its fingerprint in coordinator_keys
    min_sites = 1
    connect_timeout = 60.0
    round_timeout = 300.0
    run_timeout = 1800.0

Every table refuses unknown keys, so a typo is an error rather than a silent default, and
every error names the file and the offending key, e.g. ``job.toml: scorers[2]: unknown
scorer 'logmee' (did you mean 'logme'?); choose from logme, hscore, ...``.

An optional ``[secure]`` table (:class:`~fedmte.server.secure_aggregation.SecureJobSpec`)
turns the secure sum on; it needs at least three sites, each with a ``[secure]`` table in its
site file and ``signing_key``'s public key in its ``[trust.coordinators]``::

    [secure]
    signing_key = "keys/coordinator.pem"  # relative to the job file
    threshold = 2                         # default: a strict majority of the roster
    [secure.roster]                       # site id -> its identity key, exchanged out of band
    site0 = "ed25519:..."                 # (one line per site)
    [secure.bounds]                       # public bounds: the most rows at one site, a feature-norm bound
    max_rows = 100000
    feature_norm = 10.0

Without it the coordinator adds the sites' released sums in the clear (plain sum), and the
report says so; with it :class:`~fedmte.server.secure_aggregation.SecureAggregator` sums
every round and the coordinator sees only the sum over the sites.

A scorer may be cross-model: one model's value depends on every candidate's. Its registry
entry (:class:`~fedmte.protocol.scorers.base.ScorerSpec`) names the ``helper_scorers`` it
needs and a ``combine`` step; a job that names the scorer also runs its helpers
(:attr:`JobSpec.scorers_to_run`), which share its statistics requests, so this costs no
extra round and no extra bytes, and :mod:`fedmte.server.ranking` ranks what ``combine``
makes of them. NCTI is one: ``ncti`` brings ``ncti_seli``, ``ncti_ncc`` and ``ncti_vc``,
combined by :func:`fedmte.protocol.scorers.ncti.combine`.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedmte.protocol.encoding import StrictModel
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.scorers import NOT_FEDERABLE, SCORERS
from fedmte.protocol.scorers.ncti import TERMS as NCTI_TERMS  # re-exported for importers; the job reads helper_scorers
from fedmte.server.secure_aggregation import SecureJobSpec

JOB_SCHEMA = "fedmte.job.v1"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # as a model manifest's name
RULES = ("max_latency_ms", "max_parameters", "max_peak_memory_mb", "licenses")
"""The business-constraint rules, by the key that sets each in ``[constraints]``."""

Action = Literal["flag", "filter"]
Rule = Literal["max_latency_ms", "max_parameters", "max_peak_memory_mb", "licenses"]
Aggregate = Literal["mean_rank", "median_rank", "borda", "single"]
Ties = Literal["average", "min"]


# --------------------------------------------------------------------------- scorers

def _check_scorer(name: str) -> str:
    """A registered, federable scorer name; the message suggests the nearest name."""
    if name in NOT_FEDERABLE:
        raise ValueError(f"scorer {name!r} cannot be federated: {NOT_FEDERABLE[name]}")
    if name not in SCORERS:
        close = difflib.get_close_matches(name, list(SCORERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown scorer {name!r}{hint}; choose from {', '.join(SCORERS)}")
    return name


ScorerName = Annotated[str, AfterValidator(_check_scorer)]


def _option_type_ok(value: Any, default: Any) -> bool:
    """Whether ``value`` has the type of the registry's default (None: any number or None)."""
    if default is None:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


# --------------------------------------------------------------------------- tables

def _candidate_shorthand(value: Any) -> Any:
    """``"models/x"`` -> ``{path}``; ``"x"`` (no slash) -> ``{name}``; tables pass through."""
    if isinstance(value, str):
        if "/" in value or "\\" in value or value.startswith("."):
            return {"path": value}
        return {"name": value}
    return value


class Candidate(StrictModel):
    """A candidate model: a package folder (``path``), a package name in the model store, or both.

    A string in ``candidates`` containing a slash (or starting with ``.``) is a path,
    relative to the job file; any other string is a name.
    """

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    path: Path | None = None
    site_features: bool = Field(default=False, description="the features each site computed itself and holds as "
                                "[data] kind = \"features\" (no package: { name = \"x\", site_features = true })")

    @model_validator(mode="after")
    def _one_of(self) -> Candidate:
        if self.site_features:
            if self.name is None or self.path is not None:
                raise ValueError("a site-features candidate has a name and no path, e.g. { name = \"resnet-feats\", "
                                 "site_features = true }")
        elif self.name is None and self.path is None:
            raise ValueError("give a package name or path, e.g. { name = \"mlp\", path = \"models/mlp\" }")
        return self

    @property
    def label(self) -> str:
        """How the job refers to this candidate: its name, else its folder's name."""
        return self.name if self.name is not None else Path(str(self.path)).name


class Constraints(StrictModel):
    """Business constraints on measured model metadata; each rule that is set applies.

    A violation either flags the model (kept in the ranking, never recommended) or filters
    it (left out of the ranking); ``action`` is the default and ``actions`` overrides it per
    rule. A rule whose metadata was not measured counts as violated: compliance cannot be
    shown.
    """

    max_latency_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_parameters: int | None = Field(default=None, ge=1)
    max_peak_memory_mb: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    licenses: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(default=None, min_length=1)
    action: Action = "flag"
    actions: dict[Rule, Action] = Field(default_factory=dict)

    def active_rules(self) -> list[str]:
        """The rules this job sets, in :data:`RULES` order."""
        return [rule for rule in RULES if getattr(self, rule) is not None]

    def action_for(self, rule: str) -> Action:
        return self.actions.get(rule, self.action)  # type: ignore[call-overload]

    @model_validator(mode="after")
    def _overrides_set(self) -> Constraints:
        unset = [rule for rule in self.actions if getattr(self, rule) is None]
        if unset:
            raise ValueError(f"constraints.actions names {unset}, which this job does not set; set them or drop the override")
        return self


class RankingSettings(StrictModel):
    """How the per-scorer ranks become one ranking; see :mod:`fedmte.server.ranking`."""

    aggregate: Aggregate = "mean_rank"
    scorer: ScorerName | None = Field(default=None, description="the one scorer that ranks, with aggregate = 'single'")
    ties: Ties = "average"
    top_k: int = Field(default=3, ge=1, le=10_000)
    bootstrap: int = Field(default=200, ge=0, le=10_000, description=(
        "resamples of the noisy sums for intervals and the chance of being best (0: none); free of privacy cost"))
    weigh_by_noise: bool = Field(default=True, description=(
        "under DP noise, weigh each scorer in the mean rank by how reproducible the bootstrap finds its ranking"))

    @model_validator(mode="after")
    def _single_needs_scorer(self) -> RankingSettings:
        if self.aggregate == "single" and self.scorer is None:
            raise ValueError("aggregate = \"single\" needs ranking.scorer, the scorer that ranks alone")
        if self.aggregate != "single" and self.scorer is not None:
            raise ValueError(f"ranking.scorer is only read with aggregate = \"single\", not {self.aggregate!r}; drop it")
        return self


class PrivacyRequest(StrictModel):
    """The privacy the coordinator asks for. Each site's own policy has the last word: a site
    refuses a request its policy does not allow and may add more noise than asked."""

    dp: bool = True
    epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="per release; None: each site's default")
    delta: float | None = Field(default=None, gt=0, le=1e-3, description="None: each site's default")
    centre: Literal["coordinator", "sites"] = Field(default="coordinator", description=(
        "under DP noise, where features are centred: 'coordinator' (uncentred sums, one round fewer, the Gram's "
        "sensitivity C^2) or 'sites' (a centring round first, as for exact sums)"))
    project_dim: int | None = Field(default=None, ge=1, le=100_000, description=(
        "under DP noise, project each candidate's features to this many dimensions by a public random "
        "orthonormal basis before anything is summed (the sites must allow the 'project' transform); "
        "None: no projection"))
    clean: bool = Field(default=True, description=(
        "repair noisy sums before scoring (counts >= 1, Gram eigenvalues floored at the noise level); "
        "post-processing, free of privacy cost"))

    @model_validator(mode="after")
    def _only_with_dp(self) -> PrivacyRequest:
        given = [key for key in ("epsilon", "delta") if getattr(self, key) is not None]
        if given and not self.dp:
            raise ValueError(f"privacy.{given[0]} is set but privacy.dp is false; drop it or set dp = true")
        return self


class ConfirmSettings(StrictModel):
    """Stage 2 (:mod:`fedmte.server.confirm`): the top candidates confirmed by a federated
    linear probe validated on rows the sites hold back."""

    top_k: int = Field(default=3, ge=1, le=100, description="candidates to confirm (a tie group at the cut kept whole)")
    mode: Literal["probe", "lda"] = Field(default="probe", description=(
        "'probe': an exact federated logistic-regression probe (Newton rounds); 'lda': a shrunk LDA head in closed "
        "form (two rounds, no Hessian: the one that survives DP noise)"))
    l2: float = Field(default=1.0, gt=0, allow_inf_nan=False, description="the probe's L2 penalty on the summed loss")
    shrinkage: float = Field(default=0.1, gt=0, le=1, description="'lda': the within-class covariance's shrinkage")
    holdout: float = Field(default=0.2, gt=0, lt=1, description="the share of each site's rows held back to validate")
    seed: int = Field(default=0, ge=0, le=99_999_999, description="the split's seed (rows by a hash of seed and row id)")
    max_rounds: int = Field(default=20, ge=1, le=40, description="Newton rounds at most; each is a release under DP")


class FederationSettings(StrictModel):
    """Transport settings, passed through to the Flower job runner."""

    flwr_home: Path | None = Field(default=None, description="the folder holding config.toml (default: $FLWR_HOME)")
    coordinator_key: Path | None = Field(default=None, description="the coordinator's Ed25519 signing key (PEM)")
    min_sites: int = Field(default=1, ge=1)
    connect_timeout: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    round_timeout: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    run_timeout: float = Field(default=1800.0, gt=0, allow_inf_nan=False)


class JobSpec(StrictModel):
    """A validated job. Build it with :func:`load_job` (a file) or :func:`parse_job` (text)."""

    connection: str = Field(min_length=1, max_length=128, description="a [superlink.NAME] connection")
    output: Path = Field(default=Path("fedmte-report"), description="folder for report.json and report.html")
    labels: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(min_length=2, max_length=100_000)
    candidates: list[Annotated[Candidate, BeforeValidator(_candidate_shorthand)]] = Field(min_length=1)
    scorers: list[ScorerName] = Field(min_length=1)
    scorer_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    constraints: Constraints = Field(default_factory=Constraints)
    ranking: RankingSettings = Field(default_factory=RankingSettings)
    privacy: PrivacyRequest = Field(default_factory=PrivacyRequest)
    federation: FederationSettings = Field(default_factory=FederationSettings)
    purpose: str = Field(default="", max_length=1024, description="why the job runs; sites audit it")
    model_store: Path | None = Field(default=None, description="folder of packages named by bare candidate names")
    secure: SecureJobSpec | None = Field(default=None, description="the [secure] table: secure sum on; none: plain sum")
    confirm: ConfirmSettings | None = Field(default=None, description="the [confirm] table: stage 2; none: scores only")

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        _refuse_duplicates(labels, "label")
        return labels

    @field_validator("scorers")
    @classmethod
    def _unique_scorers(cls, scorers: list[str]) -> list[str]:
        _refuse_duplicates(scorers, "scorer")
        return scorers

    @field_validator("candidates")
    @classmethod
    def _unique_candidates(cls, candidates: list[Candidate]) -> list[Candidate]:
        _refuse_duplicates([c.label for c in candidates], "candidate")
        if sum(c.site_features for c in candidates) > 1:
            raise ValueError("a site holds one set of precomputed features: name at most one site_features candidate")
        return candidates

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        for scorer, options in self.scorer_options.items():
            if scorer not in self.scorers:
                raise ValueError(f"scorer_options.{scorer}: {scorer!r} is not among the job's scorers {self.scorers}")
            accepted = SCORERS[scorer].options
            for key, value in options.items():
                if key not in accepted:
                    takes = f"it takes {sorted(accepted)}" if accepted else "it takes no options"
                    raise ValueError(f"scorer_options.{scorer}.{key}: unknown option for {scorer}; {takes}")
                default = accepted[key]
                if not _option_type_ok(value, default):
                    kind = "a number" if default is None else type(default).__name__
                    raise ValueError(f"scorer_options.{scorer}.{key}: expected {kind} (default {default!r}), got {value!r}")
        if self.ranking.scorer is not None and self.ranking.scorer not in self.scorers:
            raise ValueError(f"ranking.scorer: {self.ranking.scorer!r} is not among the job's scorers {self.scorers}")
        return self

    @property
    def num_classes(self) -> int:
        """C, from the label names (never from the data)."""
        return len(self.labels)

    @property
    def scorers_to_run(self) -> tuple[str, ...]:
        """The job's scorers plus the helper scorers each declares (no extra rounds)."""
        names = list(self.scorers)
        for scorer in self.scorers:
            names += [helper for helper in SCORERS[scorer].helper_scorers if helper not in names]
        return tuple(names)

    @property
    def auxiliary_scorers(self) -> tuple[str, ...]:
        """Scorers run only to compute another (its helper scorers), not ranked on their own."""
        return tuple(name for name in self.scorers_to_run if name not in self.scorers)

    @property
    def options_to_run(self) -> dict[str, dict[str, Any]]:
        """Per-scorer options for the plan (only scorers that have any)."""
        return {name: dict(options) for name, options in self.scorer_options.items() if options}

    def resolved(self, base: Path) -> JobSpec:
        """Relative paths (output, candidate paths, model store, flwr_home, coordinator key,
        the secure sum's signing key) taken relative to ``base``."""
        candidates = [
            c if c.path is None else c.model_copy(update={"path": base / c.path}) for c in self.candidates
        ]
        federation = self.federation
        for name in ("flwr_home", "coordinator_key"):
            value = getattr(federation, name)
            if value is not None:
                federation = federation.model_copy(update={name: base / value})
        store = None if self.model_store is None else base / self.model_store
        secure = None if self.secure is None else self.secure.model_copy(
            update={"signing_key": base / self.secure.signing_key})
        return self.model_copy(update={"output": base / self.output, "candidates": candidates, "federation": federation,
                                       "model_store": store, "secure": secure})

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON data (paths as strings) with a schema marker, for the report."""
        return {"schema": JOB_SCHEMA, **self.model_dump(mode="json")}


def _refuse_duplicates(values: list[str], what: str) -> None:
    first: dict[str, int] = {}
    for index, value in enumerate(values):
        if value in first:
            raise ValueError(f"{what} {value!r} is listed twice (at [{first[value]}] and [{index}]); list it once")
        first[value] = index


# --------------------------------------------------------------------------- loading

def _loc(parts: tuple[int | str, ...]) -> str:
    """('scorers', 2) -> 'scorers[2]'; ('constraints', 'max_latency_ms') -> 'constraints.max_latency_ms'."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model whose fields sit at ``loc`` (for listing the allowed keys)."""
    model: type[BaseModel] = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        inner = [annotation, *get_args(annotation)]
        for candidate in list(inner):
            if get_origin(candidate) is Annotated:
                inner.append(get_args(candidate)[0])
            inner.extend(get_args(candidate))
        found = next((t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if found is None:
            return None
        model = found
    return model


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = f"; allowed here: {', '.join(parent.model_fields)}" if parent is not None else ""
        return f"{_loc(loc)}: unknown key{allowed}"
    if kind == "missing":
        return f"{_loc(loc)}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind != "value_error" and not isinstance(error.get("input"), (dict, list)):
        message += f" (got {error.get('input')!r})"
    if message.startswith(("scorer_options.", "ranking.", "constraints.", "privacy.")) or not loc:
        return message
    return f"{_loc(loc)}: {message}"


def parse_job(text: str, *, source: str = "job.toml", base: Path | None = None) -> JobSpec:
    """Validate the TOML text of a job; ``source`` names it in errors, ``base`` resolves paths.

    Raises
    ------
    InvalidInputError
        Not TOML, or a key that is missing, unknown or wrong; the message names each
        offending key (``job.toml: scorers[2]: unknown scorer ...``), up to five of them.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InvalidInputError(f"{source}: not valid TOML: {error}") from None
    return job_from_dict(raw, source=source, base=base)


def job_from_dict(raw: Mapping[str, Any], *, source: str = "job", base: Path | None = None) -> JobSpec:
    """Validate a job given as plain data (what ``fedmte demo`` builds in code)."""
    try:
        job = JobSpec.model_validate(dict(raw))
    except ValidationError as error:
        problems = [_describe(item) for item in error.errors()]
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InvalidInputError("; ".join(f"{source}: {p}" for p in problems[:5]) + more) from None
    return job if base is None else job.resolved(base)


def load_job(path: Path | str) -> JobSpec:
    """Read ``path`` (UTF-8 TOML), validate it and resolve its relative paths against its folder."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"job file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"job file {path} cannot be read as UTF-8 text: {error}") from None
    return parse_job(text, source=path.name, base=path.resolve().parent)


__all__ = [
    "JOB_SCHEMA",
    "NCTI_TERMS",
    "RULES",
    "Candidate",
    "Constraints",
    "FederationSettings",
    "JobSpec",
    "PrivacyRequest",
    "RankingSettings",
    "job_from_dict",
    "load_job",
    "parse_job",
]
