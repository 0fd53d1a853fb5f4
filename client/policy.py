"""The data owner's site policy: what this site will compute and release, whatever a job asks.

The policy is part of the site's own configuration (the ``[policy]`` table of ``site.toml``),
written by the data owner; nothing a coordinator sends can widen it. Everything it does not
name is refused (default deny): an empty allow-list allows nothing. A refusal names the rule
that said no, and :func:`check_request` reports every violated rule at once so a
coordinator can fix a job in one go.

The privacy settings follow research/PRIVACY.md section 4: per-sample L2 clipping of the
model's output in site code (``clip_norm``), Gaussian noise for a fixed (epsilon, delta) per
release, and a budget per data source that all releases together may not exceed, accounted
in Gaussian DP. The per-release cost is fixed here, never chosen by the coordinator.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from fedmte.protocol import dp
from fedmte.protocol.catalogue import STATISTICS, TRANSFORMS
from fedmte.protocol.errors import InvalidInputError, PolicyRefusal
from fedmte.protocol.scorers import SCORERS

POLICY_SCHEMA = "fedmte.site_policy.v1"

# Default privacy settings (research/PRIVACY.md sections 4.6 and 5): epsilon 1 per release and
# epsilon 4 per data source overall, at delta 1e-6.
DEFAULT_EPSILON_PER_RELEASE = 1.0
DEFAULT_EPSILON_BUDGET = 4.0
DEFAULT_DELTA = 1e-6

Fingerprint = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class DPPolicy(BaseModel):
    """Gaussian DP settings. ``enabled = false`` releases exact sums and says so in the audit log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    epsilon_per_release: PositiveFloat = DEFAULT_EPSILON_PER_RELEASE
    epsilon_budget: PositiveFloat = DEFAULT_EPSILON_BUDGET
    delta: float = Field(DEFAULT_DELTA, gt=0.0, le=1e-3)
    neighbouring: Literal["add_remove", "replace_one"] = "add_remove"
    allocation: dp.Allocation = Field(
        "by_scorer", description="how a release's mu^2 is split across its blocks (dp.allocate_sigmas): by_scorer "
                                 "gives every requested score of every model the same share, split over the blocks "
                                 "it reads by sqrt(their entries); by_size splits by sqrt(entries) alone; even gives "
                                 "every block the same share")
    distributed: bool = Field(
        False, description="through the secure sum, add only a share of the noise (the sum of the honest shares "
                           "carries the full noise); never without the secure sum")
    colluding_sites: NonNegativeInt | None = Field(
        None, description="how many other sites of a secure sum may collude with the coordinator; unset: the "
                          "secure sum's own tolerance, sites - threshold")

    @model_validator(mode="after")
    def _release_fits_budget(self) -> DPPolicy:
        if not (math.isfinite(self.epsilon_per_release) and math.isfinite(self.epsilon_budget)):
            raise ValueError("epsilon values must be finite")
        if self.epsilon_per_release > self.epsilon_budget:
            raise ValueError(
                f"epsilon_per_release ({self.epsilon_per_release}) exceeds epsilon_budget "
                f"({self.epsilon_budget}); no release could ever be made"
            )
        return self

    @cached_property
    def mu_per_release(self) -> float:
        """The Gaussian-DP mu one release spends: the mu that is (epsilon_per_release, delta)-DP."""
        return dp.gdp_mu(self.epsilon_per_release, self.delta)

    @cached_property
    def mu_cap(self) -> float:
        """The most mu all releases on one data source may compose to."""
        return dp.gdp_mu(self.epsilon_budget, self.delta)


class SitePolicy(BaseModel):
    """What this site allows. Names are checked against the catalogues, so a typo is an
    error at load time rather than a silent refusal later."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: Literal["fedmte.site_policy.v1"] = Field(POLICY_SCHEMA, alias="schema")
    allowed_scorers: frozenset[str] = frozenset()
    allowed_statistics: frozenset[str] = frozenset()
    allowed_transforms: frozenset[str] = frozenset()
    allowed_architectures: frozenset[str] = frozenset()
    max_feature_dim: PositiveInt
    clip_norm: PositiveFloat
    min_noisy_class_count: NonNegativeFloat = 0.0
    coordinator_keys: dict[str, Fingerprint] = Field(default_factory=dict)
    dp: DPPolicy = DPPolicy()

    @field_validator("allowed_scorers")
    @classmethod
    def _known_scorers(cls, names: frozenset[str]) -> frozenset[str]:
        return _known(names, SCORERS, "scorer")

    @field_validator("allowed_statistics")
    @classmethod
    def _known_statistics(cls, names: frozenset[str]) -> frozenset[str]:
        return _known(names, STATISTICS, "statistic")

    @field_validator("allowed_transforms")
    @classmethod
    def _known_transforms(cls, names: frozenset[str]) -> frozenset[str]:
        return _known(names, TRANSFORMS, "transform")

    @field_serializer("allowed_scorers", "allowed_statistics", "allowed_transforms", "allowed_architectures")
    def _sorted(self, names: frozenset[str]) -> list[str]:
        return sorted(names)

    @field_validator("clip_norm")
    @classmethod
    def _finite_clip(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("clip_norm must be finite")
        return value

    def sha256(self) -> str:
        """Content hash of the policy, written into every audit record it governed."""
        data = self.model_dump(mode="json", by_alias=True)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _known(names: frozenset[str], catalogue: Iterable[str], what: str) -> frozenset[str]:
    unknown = sorted(set(names) - set(catalogue))
    if unknown:
        raise ValueError(f"unknown {what} name(s) {unknown}; known: {', '.join(sorted(catalogue))}")
    return names


def parse_policy(table: dict) -> SitePolicy:
    """A policy from a parsed TOML/JSON table; raises :class:`InvalidInputError` listing every problem."""
    try:
        return SitePolicy.model_validate(table)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'policy'}: {e['msg']}" for e in error.errors())
        raise InvalidInputError(f"invalid site policy: {problems}") from None


def load_policy(path: Path) -> SitePolicy:
    """The ``[policy]`` table of a site file (or the whole file if it has no such table)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise InvalidInputError(f"cannot read the site policy from {path}: {error}") from None
    return parse_policy(data.get("policy", data))


# --------------------------------------------------------------------------- checks

def violations(
    policy: SitePolicy,
    requested_statistic_kinds: Iterable[str],
    scorers: Iterable[str],
    model_arch: str,
    dim: int,
    *,
    transforms: Iterable[str] = (),
) -> list[tuple[str, str]]:
    """Every (rule, message) the request breaks, in a fixed order; empty when allowed."""
    found: list[tuple[str, str]] = []
    scorers = sorted(set(scorers))
    kinds = sorted(set(requested_statistic_kinds))
    denied = [name for name in scorers if name not in policy.allowed_scorers]
    if denied:
        found.append(("allowed_scorers", f"scorer(s) {denied} are not allowed here; allowed: "
                                         f"{sorted(policy.allowed_scorers) or 'none'}"))
    denied = [kind for kind in kinds if kind not in policy.allowed_statistics]
    if denied:
        found.append(("allowed_statistics", f"statistic(s) {denied} are not allowed here; allowed: "
                                            f"{sorted(policy.allowed_statistics) or 'none'}"))
    denied = sorted(set(transforms) - policy.allowed_transforms)
    if denied:
        found.append(("allowed_transforms", f"feature transform(s) {denied} are not allowed here; allowed: "
                                            f"{sorted(policy.allowed_transforms) or 'none'}"))
    if model_arch not in policy.allowed_architectures:
        found.append(("allowed_architectures", f"architecture {model_arch!r} is not allowed here; allowed: "
                                               f"{sorted(policy.allowed_architectures) or 'none'}"))
    if dim > policy.max_feature_dim:
        found.append(("max_feature_dim", f"feature dimension {dim} exceeds this site's maximum "
                                         f"{policy.max_feature_dim}; project the features first"))
    if policy.dp.enabled:
        unbounded = [kind for kind in kinds if kind not in dp.SENSITIVITY]
        if unbounded:
            reasons = "; ".join(f"{kind}: {dp.UNBOUNDED.get(kind, 'no sensitivity is declared for it')}"
                                for kind in unbounded)
            found.append(("dp.bounded_statistics", f"cannot add calibrated noise to {unbounded} ({reasons})"))
    return found


SCORER_RULES = frozenset({"allowed_scorers", "allowed_statistics", "allowed_transforms", "dp.bounded_statistics"})
"""The rules a single scorer can break, whatever the model: what a site refuses per scorer at setup."""


def scorer_refusals(policy: SitePolicy, scorers: Iterable[str]) -> dict[str, str]:
    """``{scorer: "[rule] reason; ..."}`` for every requested scorer this policy refuses, from
    the policy and what the scorer asks for (:func:`fedmte.protocol.plan.traced_requests`)
    alone, never the data: so the reason may go back to the coordinator, which runs the job
    with the scorers that are allowed instead of losing it."""
    from fedmte.protocol.plan import traced_requests

    refused: dict[str, str] = {}
    for scorer in dict.fromkeys(scorers):
        if scorer not in SCORERS:
            refused[scorer] = f"[allowed_scorers] {scorer!r} is not a scorer this site knows"
            continue
        kinds, transforms = traced_requests(scorer)
        found = [(rule, message) for rule, message in violations(policy, kinds, [scorer], "", 0, transforms=transforms)
                 if rule in SCORER_RULES]
        if found:
            refused[scorer] = "; ".join(f"[{rule}] {message}" for rule, message in found)
    return refused


def check_request(
    policy: SitePolicy,
    requested_statistic_kinds: Iterable[str],
    scorers: Iterable[str],
    model_arch: str,
    dim: int,
    *,
    transforms: Iterable[str] = (),
) -> None:
    """Raise :class:`PolicyRefusal` naming every rule the request breaks; return if allowed."""
    found = violations(policy, requested_statistic_kinds, scorers, model_arch, dim, transforms=transforms)
    if found:
        raise PolicyRefusal(found)


def check_coordinator(policy: SitePolicy, key_fingerprint: str) -> str:
    """The pinned name of a coordinator key (hex SHA-256 of its raw public key), or a refusal."""
    for name, pinned in sorted(policy.coordinator_keys.items()):
        if pinned == key_fingerprint:
            return name
    raise PolicyRefusal([("coordinator_keys", f"coordinator key {key_fingerprint[:16]}... is not pinned by this "
                                              "site; the data owner must list it in [trust.coordinators] of the site file")])
