"""The coordinator of a multi-model scoring job: packages out, batched rounds, ranked report.

:func:`run_job` is the entry point (``fedmte run JOB.toml``, ``fedmte demo``): it checks the
job's candidate packages, submits the fedmte Flower app with the job in its run config, and
waits for the report. Inside the ServerApp, :func:`serve_job` drives the job over the Flower
grid with :func:`execute_job`, which works over any :class:`~fedmte.server.rounds.Exchange`:

1. **Setup** (``query.setup``, :mod:`fedmte.protocol.job_messages`): a request signed with
   the coordinator's Ed25519 key names the run, the label space, the scorers and every
   candidate (manifest and signature, no weights). Each site answers per model: ready,
   refused (with the rule), or ``need_weights``; only then, and only to the sites that asked,
   a second setup attaches the weights. So a site that staged a package earlier never
   receives it again, and the round trip is paid only when something must travel.
2. **Rounds**: a :class:`~fedmte.protocol.plan.PlanRun` per model that every site accepted,
   driven in lockstep by :func:`~fedmte.protocol.plan.execute_many`: each round is one
   ``query.stats`` carrying every unfinished model's requests, summed by the
   :class:`~fedmte.server.rounds.Aggregator` (plain sum by default; the secure sum plugs in
   there). Each round request is signed by the job's key with a fresh nonce, ``issued_at``, the
   run and the round number, over its document and arrays
   (:meth:`~fedmte.protocol.job_messages.JobRoundRequest.sign`), as are the setups and the
   finish; the sites refuse anything unsigned, stale, replayed or out of order. The number of round trips is the longest plan's, whatever the number of models.
   A model refused by any site is left out (the sum needs every site) and its refusal,
   rule and site are in the report.
3. **Finish** (``query.finish``): each site signs an audit checkpoint and returns it; the
   coordinator keeps the notes as witness copies (``OUTPUT/witnesses/<site>.txt``, for
   ``fedmte audit verify --witness``).
4. **Report**: :func:`build_job_report` ranks the models (:func:`fedmte.server.ranking.rank_models`,
   with the job's constraints on the costs the sites measured) and assembles
   :class:`fedmte.server.report.Report` with each site's disclosures (statistic kinds,
   shapes and bytes per round, privacy spent by the site's own account).

Every reply the coordinator receives is digested (:func:`fedmte.protocol.job_messages.payload_sha256`)
and listed in ``OUTPUT/received.jsonl``: a site can compare it with the payload copies of its
audit log, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from threadpoolctl import threadpool_limits

from fedmte.protocol import dp
from fedmte.protocol.audit_format import parse_note
from fedmte.protocol.dp_postprocess import clean_sums
from fedmte.protocol.errors import FederationError, FedmteError, InvalidInputError, VerificationError
from fedmte.protocol.job_messages import (
    FINISH,
    SETUP,
    SITE_FEATURES,
    FinishReply,
    FinishRequest,
    ModelOffer,
    ModelStatus,
    ReleaseCost,
    RoundReplyDoc,
    SetupReply,
    SetupRequest,
    SiteMetrics,
    encode_job_round,
    setup_payload,
    sign_setup,
    site_features_id,
    split_statistics,
    wire_bytes,
)
from fedmte.protocol.keys import public_key_text
from fedmte.protocol.manifest import ModelManifest, strict_json_loads
from fedmte.protocol.plan import PlanRun, ScoringResult, execute_many, make_plan
from fedmte.protocol.projection import projection_seed, random_basis
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers import SCORERS
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.uncertainty import NoisyRelease, bootstrap_scores, score_bounds
from fedmte.protocol.wire import SECURE_UPLOAD, Payload
from fedmte.server.confirm import Validation, confirmation_job, decide, held_back_counts, validation_of
from fedmte.server.job import JobSpec
from fedmte.server.job_runner import FAB_DIR, flwr_env, submit_run, wait_for_status
from fedmte.server.ranking import ModelMetadata, rank_models
from fedmte.server.report import (
    DisclosedStatistic,
    Report,
    RoundInfo,
    RoundStatus,
    RunStatus,
    SiteDisclosure,
    SitePrivacy,
    build_report,
    read_report,
    write_report,
    write_status,
)
from fedmte.server.rounds import Aggregator, Exchange, PlainSum
from fedmte.server.secure_aggregation import SecureAggregator, load_coordinator_key
from fedmte.server.site_probe import probe_sites

MANIFEST_FILE, WEIGHTS_FILE, SIGNATURE_FILE = "manifest.json", "weights.safetensors", "signature.json"
"""A package folder's files (:mod:`fedmte.client.packages`)."""
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 16 << 10
RECEIVED_FILE = "received.jsonl"
STATUS_FILE = "run.json"
WITNESS_DIR = "witnesses"


# --------------------------------------------------------------------------- candidates

@dataclass(frozen=True)
class CandidatePackage:
    """One candidate as the coordinator holds it: the signed package folder's bytes, or, for a
    site-features candidate (no ``directory``), only its label."""

    label: str
    directory: Path | None
    manifest_bytes: bytes = b""
    signature_bytes: bytes = b""
    manifest: ModelManifest | None = None

    @property
    def site_features(self) -> bool:
        return self.directory is None

    @property
    def model_id(self) -> str:
        """sha256 of the manifest bytes: the package id every site computes too."""
        if self.site_features:
            return site_features_id(self.label)
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    @property
    def weights_bytes(self) -> int:
        return 0 if self.manifest is None else self.manifest.weights_bytes

    def weights(self) -> bytes:
        if self.directory is None or self.manifest is None:
            raise InvalidInputError(f"{self.label} is a site-features candidate; it has no weights to send")
        data = (self.directory / WEIGHTS_FILE).read_bytes()
        if len(data) != self.manifest.weights_bytes or hashlib.sha256(data).hexdigest() != self.manifest.weights_sha256:
            raise VerificationError(f"{self.directory / WEIGHTS_FILE} does not match its manifest; re-pack {self.label}")
        return data

    def offer(self, *, attach: bool) -> ModelOffer:
        if self.site_features:
            return ModelOffer(model_id=self.model_id, label=self.label, kind=SITE_FEATURES)
        return ModelOffer(model_id=self.model_id, label=self.label, manifest=self.manifest_bytes.decode("utf-8"),
                          signature=self.signature_bytes.decode("utf-8"), weights_attached=attach)


def _read(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
    except OSError:
        raise InvalidInputError(f"{path} is missing; a package folder holds {MANIFEST_FILE}, {WEIGHTS_FILE} and "
                                f"{SIGNATURE_FILE} (fedmte model pack writes them)") from None
    if size > limit:
        raise InvalidInputError(f"{path} has {size:,} bytes, more than the {limit:,} a package file may have")
    return path.read_bytes()


def load_candidates(job: JobSpec) -> list[CandidatePackage]:
    """Read every candidate package the job names (a path, or a name in ``job.model_store``).

    Checks what the coordinator can check alone: the files exist, the manifest is canonical
    and valid, the weights have the size and hash it states, and no two candidates share
    weights. The signature is the sites' to verify against the keys they pin.
    """
    packages: list[CandidatePackage] = []
    for candidate in job.candidates:
        if candidate.site_features:
            packages.append(CandidatePackage(candidate.label, None))
            continue
        if candidate.path is not None:
            directory = Path(candidate.path)
        elif job.model_store is not None:
            directory = Path(job.model_store) / str(candidate.name)
        else:
            raise InvalidInputError(f"candidate {candidate.label!r} is a bare name, but the job sets no model_store; "
                                    "give its path or set model_store = \"<folder of packages>\"")
        manifest_bytes = _read(directory / MANIFEST_FILE, MAX_MANIFEST_BYTES)
        signature_bytes = _read(directory / SIGNATURE_FILE, MAX_SIGNATURE_BYTES)
        try:
            manifest = ModelManifest.model_validate(strict_json_loads(manifest_bytes))
            if manifest.canonical_bytes() != manifest_bytes:
                raise ValueError("not canonical")
            signature_bytes.decode("utf-8")
        except (ValueError, ValidationError) as error:
            raise InvalidInputError(f"{directory}: the manifest or signature is not a valid fedmte package ({error})") from None
        size = (directory / WEIGHTS_FILE).stat().st_size if (directory / WEIGHTS_FILE).is_file() else -1
        if size != manifest.weights_bytes:
            raise InvalidInputError(f"{directory / WEIGHTS_FILE} has {size} bytes, the manifest says {manifest.weights_bytes}")
        packages.append(CandidatePackage(candidate.label, directory, manifest_bytes, signature_bytes, manifest))
    seen: dict[str, str] = {}
    for package in packages:
        if package.manifest is None:
            continue
        other = seen.setdefault(package.manifest.weights_sha256, package.label)
        if other != package.label:
            raise InvalidInputError(f"candidates {other!r} and {package.label!r} have the same weights; list each model once")
    return packages


# --------------------------------------------------------------------------- keys

# sign_setup (imported from fedmte.protocol.job_messages): the setup, stamped with a nonce and
# issued_at and signed over the request and its weights; rounds and finishes are signed with
# JobRoundRequest.sign / FinishRequest.sign by the same key (execute_job, _finish).


# --------------------------------------------------------------------------- the exchange, recorded

@dataclass(frozen=True)
class Receipt:
    """One reply as the coordinator received it: who, for what, its digest and size."""

    node: int
    query: str
    group: str
    sha256: str
    nbytes: int


class RecordingExchange:
    """An :class:`~fedmte.server.rounds.Exchange` that keeps a receipt and the document of
    every reply passing through (for the report and for comparison with the sites' audit
    logs). ``gather`` (the secure sum's partial round trip) is passed through when the inner
    exchange has it, and otherwise built from ``exchange`` (all replies, or none and every reason)."""

    def __init__(self, inner: Exchange) -> None:
        self.inner = inner
        self.receipts: list[Receipt] = []
        self.docs: dict[tuple[str, str, int], dict[str, Any]] = {}

    @property
    def nodes(self) -> Sequence[int]:
        return self.inner.nodes

    def _record(self, query: str, group: str, replies: Mapping[int, Payload]) -> None:
        for node in sorted(replies):
            data = wire_bytes(replies[node])
            self.receipts.append(Receipt(node, query, group, hashlib.sha256(data).hexdigest(), len(data)))
            self.docs[(query, group, node)] = dict(replies[node].doc)

    def exchange(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> dict[int, Payload]:
        replies = self.inner.exchange(query, payloads, group=group)
        self._record(query, group, replies)
        return replies

    def gather(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> tuple[dict[int, Payload], dict[str, str]]:
        gather = getattr(self.inner, "gather", None)
        if gather is not None:
            replies, failures = gather(query, payloads, group=group)
        else:  # an exchange that fails as a whole: no partial replies, every site's reason
            try:
                replies, failures = self.inner.exchange(query, payloads, group=group), {}
            except FederationError as error:
                replies, failures = {}, dict(error.failures) or {str(node): str(error) for node in payloads}
        self._record(query, group, replies)
        return replies, failures


# --------------------------------------------------------------------------- the job

@dataclass
class SiteRecord:
    """What the coordinator learns about one site during a job."""

    node: int
    name: str
    dp: bool = False
    refusals: list[str] = field(default_factory=list)
    metrics: dict[str, SiteMetrics] = field(default_factory=dict)
    releases: list[ReleaseCost] = field(default_factory=list)
    statistics: list[DisclosedStatistic] = field(default_factory=list)
    checkpoint: str | None = None


@dataclass
class ReleasedSums:
    """Every pooled, cleaned block a model's plan received, with its pooled noise std: what the
    bootstrap resamples (the noise the coordinator asked for is public)."""

    blocks: dict[str, np.ndarray] = field(default_factory=dict)
    sigma: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Stat] = field(default_factory=dict)  # what each block is (kind, view, arguments)

    def record(self, sums: Statistics, sigma: Mapping[str, float], requests: Sequence[Stat] = ()) -> None:
        for key, value in sums.items():
            self.blocks[key] = value
            self.sigma[key] = float(sigma.get(key, 0.0))
        self.stats.update({stat.key: stat for stat in requests})

    @property
    def noisy(self) -> bool:
        return any(value > 0 for value in self.sigma.values())


@dataclass
class ModelRecord:
    """One candidate through the job: its plan (if every site accepted it) and results."""

    package: CandidatePackage
    dim: int = 0
    num_source_classes: int = 0
    run: PlanRun | None = None
    result: ScoringResult | None = None
    failures: dict[str, str] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)
    released: ReleasedSums = field(default_factory=ReleasedSums)
    projection: np.ndarray | None = None  # the public (dim, k) basis its requests read through


@dataclass
class JobOutcome:
    run_id: str
    sites: dict[int, SiteRecord]
    models: dict[str, ModelRecord]
    rounds: list[RoundInfo]
    planned_rounds: int
    receipts: list[Receipt]
    secure_sum: bool
    notes: list[str] = field(default_factory=list)


def _setup_round(exchange: RecordingExchange, job: JobSpec, packages: Sequence[CandidatePackage], key: Ed25519PrivateKey,
                 run_id: str, attach: Mapping[int, set[str]] | None, group: str) -> dict[int, SetupReply]:
    weights: dict[str, bytes] = {}
    payloads: dict[int, Payload] = {}
    for node in exchange.nodes:
        wanted = set() if attach is None else attach.get(node, set())
        request = SetupRequest(
            run_id=run_id, purpose=job.purpose, labels=list(job.labels), scorers=list(job.scorers_to_run),
            coordinator_key=public_key_text(key), models=[p.offer(attach=p.model_id in wanted) for p in packages],
            dp_requested=job.privacy.dp,
        )
        for model_id in wanted:
            if model_id not in weights:
                weights[model_id] = next(p for p in packages if p.model_id == model_id).weights()
        attached = {m: weights[m] for m in wanted}
        payloads[node] = setup_payload(sign_setup(request, key, attached), attached)
    replies = exchange.exchange(SETUP, payloads, group=group)
    parsed: dict[int, SetupReply] = {}
    for node, reply in replies.items():
        try:
            parsed[node] = SetupReply.parse(reply.doc)
        except FedmteError as error:
            raise FederationError(f"site {node} sent a malformed setup reply: {error}",
                                  failures={str(node): "malformed setup reply"}) from None
        offered = {p.model_id for p in packages}
        if set(parsed[node].models) != offered:
            raise FederationError(f"site {node} answered for other models than offered",
                                  failures={str(node): "setup reply names other models"})
    return parsed


def _site_names(replies: Mapping[int, SetupReply]) -> dict[int, str]:
    names = {node: reply.site for node, reply in replies.items()}
    counts = {name: list(names.values()).count(name) for name in names.values()}
    return {node: name if counts[name] == 1 else f"{name}#{node}" for node, name in names.items()}


def _plan_model(record: ModelRecord, job: JobSpec, *, noisy: bool, run_id: str,
                refused: Mapping[str, Sequence[str]] | None = None) -> None:
    """The model's plan over the scorers its outputs allow; the rest fail with a reason.

    ``noisy`` (some site adds DP noise): the scorers read uncentred sums (offset zero) and the
    coordinator centres them, so there is no centring round to charge, and the Gram's
    sensitivity is C^2 instead of (C + ||offset||)^2, up to four times less noise. The
    scorers work in any offset coordinates (:mod:`fedmte.protocol.scorers.moments`); the
    centring round exists only for the digits of exact sums, which noise swamps. With
    ``[privacy] project_dim = k`` (and noise) every request reads the features through a
    public random orthonormal basis to k dimensions (:mod:`fedmte.protocol.projection`).
    """
    has_probs = record.num_source_classes > 0
    usable = []
    for name in job.scorers_to_run:
        if refused and name in refused:
            record.failures[name] = "refused by " + "; ".join(refused[name])
        elif SCORERS[name].needs_source_probs and not has_probs:
            record.failures[name] = ("needs source-class probabilities; the sites hold none for these features"
                                     if record.package.site_features else
                                     "needs source-class probabilities; this model has no source classifier head")
        else:
            usable.append(name)
    if not usable:
        return
    options = {name: opts for name, opts in job.options_to_run.items() if name in usable}
    k = job.privacy.project_dim
    if k is not None and noisy and k < record.dim:
        record.projection = random_basis(record.dim, k, projection_seed(run_id, record.package.model_id))
    width = record.dim if record.projection is None else k
    plan = make_plan(usable, has_features=True, has_source_probs=has_probs, options=options, public_offset=noisy)
    record.run = PlanRun(plan, dim=record.dim, num_classes=job.num_classes, num_source_classes=record.num_source_classes,
                         offset=np.zeros(width) if noisy else None, record_failures=True, projection=record.projection)


def execute_job(
    exchange: Exchange,
    job: JobSpec,
    packages: Sequence[CandidatePackage],
    key: Ed25519PrivateKey,
    *,
    run_id: str,
    aggregator: Aggregator | None = None,
) -> JobOutcome:
    """Run the job over ``exchange``: setup, the batched rounds, finish (module docstring).

    Raises :class:`FederationError` (with each failing site's reason) when a round fails,
    or when no candidate was accepted by every site.
    """
    if not exchange.nodes:
        raise FederationError("no site is connected to the SuperLink; start the SuperNodes first")
    recorder = RecordingExchange(exchange)
    aggregator = aggregator or PlainSum()
    secure = not isinstance(aggregator, PlainSum)
    rounds: list[RoundInfo] = []
    start = time.perf_counter()
    replies = _setup_round(recorder, job, packages, key, run_id, None, "setup")
    rounds.append(RoundInfo(name="setup", seconds=time.perf_counter() - start))
    need = {node: {m for m, s in reply.models.items() if s.status == "need_weights"} for node, reply in replies.items()}
    if any(need.values()):
        start = time.perf_counter()
        again = _setup_round(recorder, job, packages, key, run_id, need, "setup-weights")
        rounds.append(RoundInfo(name="setup (weights)", seconds=time.perf_counter() - start,
                                bytes_per_site=max(sum(p.weights_bytes for p in packages if p.model_id in n)
                                                   for n in need.values())))
        replies = {node: again[node] for node in replies}
    names = _site_names(replies)
    sites = {node: SiteRecord(node=node, name=names[node], dp=reply.dp) for node, reply in replies.items()}
    refused_scorers: dict[str, list[str]] = {}  # a scorer one site refuses cannot be summed over all: left out
    for node, reply in sorted(replies.items()):
        for scorer, reason in sorted(reply.refused_scorers.items()):
            refused_scorers.setdefault(scorer, []).append(f"{names[node]} {reason}")
            sites[node].refusals.append(f"scorer {scorer}: {reason}")
    models = {p.model_id: ModelRecord(package=p) for p in packages}
    for model_id, record in models.items():
        statuses: dict[int, ModelStatus] = {node: reply.models[model_id] for node, reply in replies.items()}
        for node, status in sorted(statuses.items()):
            if status.status == "refused":
                text = f"refused by {names[node]} [{status.rule}]: {status.reason}"
                record.refusals.append(text)
                sites[node].refusals.append(f"{record.package.label}: [{status.rule}] {status.reason}")
            elif status.status != "ready":
                record.refusals.append(f"{names[node]} did not stage the package ({status.status})")
        if record.refusals:
            for name in job.scorers_to_run:
                record.failures[name] = "; ".join(record.refusals)
            continue
        shapes = {(s.feature_dim, s.num_source_classes) for s in statuses.values()}
        if len(shapes) != 1:
            raise FederationError(f"the sites disagree on the outputs of {record.package.label}: {sorted(shapes)}")
        record.dim, record.num_source_classes = (int(v or 0) for v in shapes.pop())
        _plan_model(record, job, noisy=any(site.dp for site in sites.values()) and job.privacy.centre == "coordinator",
                    run_id=run_id, refused=refused_scorers)
    runs = {model_id: r.run for model_id, r in models.items() if r.run is not None}
    if not runs:
        reasons = "; ".join(f"{r.package.label}: {', '.join(r.refusals) or 'no scorer applies'}" for r in models.values())
        raise FederationError(f"no candidate can be scored by every site: {reasons}",
                              failures={names[n]: "; ".join(s.refusals) for n, s in sites.items() if s.refusals})
    planned = max(run.plan.rounds for run in runs.values())
    begin_job = getattr(aggregator, "begin_job", None)
    if begin_job is not None:  # the secure sum agrees keys for every round up front
        begin_job(recorder, planned)
    label = {model_id: r.package.label for model_id, r in models.items()}
    round_index = 0

    def aggregate_many(pending: Mapping[str, Sequence[Stat]]) -> dict[str, Statistics]:
        nonlocal round_index
        round_index += 1
        request, arrays = encode_job_round(pending, run_id=run_id, round_index=round_index, num_classes=job.num_classes)
        request = request.sign(key, arrays)  # nonce, issued_at, over the document and its arrays
        expected = {model_id: runs[model_id].expected() for model_id in pending}
        began = time.perf_counter()
        total = aggregator.sum_round(recorder, request, arrays)  # type: ignore[arg-type]
        seconds = time.perf_counter() - began
        sums = split_statistics(total, list(pending))
        noise_sq: dict[str, dict[str, float]] = {model_id: {} for model_id in pending}
        nbytes = 0
        kinds: set[str] = set()
        for model_id, shapes in expected.items():
            for stat_key, (shape, dtype) in shapes.items():
                size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                nbytes += size
                kind = stat_key.split(":", 1)[0]
                kinds.add(kind)
                for site in sites.values():
                    site.statistics.append(DisclosedStatistic(
                        kind=kind, shape=list(shape), nbytes=size, model=label[model_id],
                        round=round_index, masked=secure, noised=site.dp))
        for node, site in sites.items():
            doc = recorder.docs.get(("stats", str(round_index), node))
            if doc is None:  # the secure sum: the site's round reply travels beside its masked words
                inner = recorder.docs.get((SECURE_UPLOAD, f"{round_index}-upload", node), {}).get("inner")
                doc = inner if isinstance(inner, dict) else None
            if doc is None:
                continue
            reply = RoundReplyDoc.parse(doc)
            site.releases.append(reply.privacy)
            for name, std in reply.privacy.noise_std.items():
                model_id, _, stat_key = name.partition("/")
                if model_id in noise_sq:
                    noise_sq[model_id][stat_key] = noise_sq[model_id].get(stat_key, 0.0) + float(std) ** 2
            for model_id, measured in reply.metrics.items():
                site.metrics.setdefault(model_id, measured)
        rounds.append(RoundInfo(name=f"round {round_index}", seconds=seconds, kinds=sorted(kinds), bytes_per_site=nbytes))
        for model_id, model_sums in sums.items():
            sigma = {key: math.sqrt(value) for key, value in noise_sq[model_id].items()}
            if job.privacy.clean:
                sums[model_id] = clean_sums(pending[model_id], model_sums, sigma)  # post-processing: free
            models[model_id].released.record(sums[model_id], sigma, pending[model_id])
        return sums

    try:
        results = execute_many(runs, aggregate_many)
    except BaseException as error:
        _finish(recorder, run_id, sites, "failed", f"{type(error).__name__}: {error}", rounds, key, round_index + 1)
        raise
    for model_id, result in results.items():
        models[model_id].result = result
        models[model_id].failures.update(result.failures)
    notes = _finish(recorder, run_id, sites, "finished", "", rounds, key, round_index + 1)
    notes += [f"{scorer} was left out, the job ran without it: refused by {'; '.join(reasons)}"
              for scorer, reasons in sorted(refused_scorers.items())]
    dropped = getattr(aggregator, "failures", {}) or {}  # the secure sum goes on without a failed site
    notes += [f"the secure sum left out {site} (its statistics are not in the sums): {reason}"
              for site, reason in sorted(dropped.items())]
    return JobOutcome(run_id=run_id, sites=sites, models=models, rounds=rounds, planned_rounds=planned,
                      receipts=list(recorder.receipts), secure_sum=secure, notes=notes)


def _finish(exchange: RecordingExchange, run_id: str, sites: Mapping[int, SiteRecord], status: Literal["finished", "failed"],
            detail: str, rounds: list[RoundInfo], key: Ed25519PrivateKey, round_index: int) -> list[str]:
    """Ask every site to close the job with a signed checkpoint; a failure here is a note.
    The request is signed by the job's key and numbered ``round_index`` (after the last round)."""
    request = FinishRequest(run_id=run_id, round=round_index, status=status, detail=detail[:4096]).sign(key)
    payload = Payload(doc=request.model_dump(mode="json", by_alias=True))
    start = time.perf_counter()
    try:
        replies = exchange.exchange(FINISH, {node: payload for node in exchange.nodes}, group="finish")
    except FedmteError as error:
        return [f"not every site closed the job with an audit checkpoint: {error}"]
    rounds.append(RoundInfo(name="finish", seconds=time.perf_counter() - start))
    notes = []
    for node, reply in replies.items():
        try:
            sites[node].checkpoint = FinishReply.parse(reply.doc).checkpoint
        except FedmteError as error:
            notes.append(f"site {sites[node].name} sent a malformed finish reply: {error}")
    return notes


# --------------------------------------------------------------------------- the report

def _site_privacy(site: SiteRecord) -> SitePrivacy:
    """The job's privacy cost at one site, from the costs its releases reported."""
    if not site.dp or not site.releases:
        return SitePrivacy(dp=site.dp)
    delta = next((r.delta for r in site.releases if r.delta is not None), None)
    budget = next((r.epsilon_budget for r in site.releases if r.epsilon_budget is not None), None)
    job_mu_sq = sum(max(r.mu_sq_after - r.mu_sq_before, 0.0) for r in site.releases)
    total_mu_sq = max(r.mu_sq_after for r in site.releases)
    if delta is None:
        return SitePrivacy(dp=True, epsilon_budget=budget)
    return SitePrivacy(dp=True, delta=delta, epsilon_budget=budget,
                       epsilon_spent=dp.gdp_epsilon(math.sqrt(job_mu_sq), delta),
                       epsilon_total=dp.gdp_epsilon(math.sqrt(total_mu_sq), delta))


def _disclosures(sites: Iterable[SiteRecord]) -> list[SiteDisclosure]:
    """Each site's account of what left it and what it cost, by site name."""
    return [SiteDisclosure(name=site.name, statistics=site.statistics, privacy=_site_privacy(site),
                           refusals=site.refusals, audit_head=_audit_head(site.checkpoint))
            for site in sorted(sites, key=lambda s: s.name)]


def _audit_head(note: str | None) -> str | None:
    if note is None:
        return None
    try:
        checkpoint, _ = parse_note(note)
    except FedmteError:
        return None
    return f"{checkpoint.tree_size} records, root {checkpoint.root}"


def bootstrap_replicates(job: JobSpec, outcome: JobOutcome) -> dict[str, dict[str, np.ndarray]] | None:
    """Each noisy model's scores re-computed on ``job.ranking.bootstrap`` resamples of its
    released sums (:func:`fedmte.protocol.uncertainty.bootstrap_scores`): the coordinator
    knows the noise it asked for, so this costs no privacy. None when every sum was exact.
    Seeded by the run id, so a report rebuilt from the same run is the same."""
    noisy = {model_id: record for model_id, record in outcome.models.items()
             if record.run is not None and record.result is not None and record.released.noisy}
    if not noisy or job.ranking.bootstrap == 0:
        return None
    seed = int.from_bytes(hashlib.sha256(f"bootstrap:{outcome.run_id}".encode()).digest()[:8], "big")
    replicates: dict[str, dict[str, np.ndarray]] = {}
    with threadpool_limits(1):  # thousands of small eigendecompositions: BLAS threads only contend (30x slower)
        for index, (_, record) in enumerate(sorted(noisy.items())):
            run = record.run
            assert run is not None
            release = NoisyRelease(sums=Statistics(record.released.blocks), sigma=dict(record.released.sigma),
                                   clean=job.privacy.clean)
            replicates[record.package.label] = bootstrap_scores(
                run.plan, release, dim=record.dim, num_classes=job.num_classes,
                num_source_classes=record.num_source_classes, offset=run.ctx.offset,
                replicates=job.ranking.bootstrap, rng=np.random.default_rng([seed, index]),
                projection=record.projection)
    return replicates


def build_job_report(job: JobSpec, outcome: JobOutcome) -> Report:
    """Rank the models on their federated scores and the sites' measured costs; assemble the report."""
    scores: dict[str, dict[str, float | None]] = {}
    failures: dict[str, dict[str, str]] = {}
    metadata: dict[str, ModelMetadata] = {}
    for model_id, record in outcome.models.items():
        name = record.package.label
        scores[name] = dict(record.result.scores) if record.result is not None else {}
        if record.failures:
            failures[name] = dict(record.failures)
        measured = {site.name: site.metrics[model_id].model_dump() for site in outcome.sites.values()
                    if model_id in site.metrics}
        manifest = record.package.manifest
        described = {} if manifest is None else dict(
            license=manifest.license, parameter_count=manifest.parameter_count, architecture=manifest.architecture,
            version=manifest.version, description=manifest.description or None)
        metadata[name] = ModelMetadata.from_sites(measured, manifest_sha256=model_id, **described)
    clamped = {r.package.label: dict(r.result.clamped) for r in outcome.models.values()
               if r.result is not None and r.result.clamped}
    bounds = {r.package.label: score_bounds(list(r.run.plan.scorers), dim=r.run.work_dim, num_classes=job.num_classes,
                                            num_source_classes=r.num_source_classes)
              for r in outcome.models.values() if r.run is not None}
    ranking = rank_models(scores, metadata, scorers=job.scorers, settings=job.ranking, constraints=job.constraints,
                          failures=failures, replicates=bootstrap_replicates(job, outcome), clamped=clamped,
                          bounds=bounds)
    report = build_report(job, ranking, _disclosures(outcome.sites.values()), rounds=outcome.rounds)
    refused = [f"{r.package.label}: {'; '.join(r.refusals)}" for r in outcome.models.values() if r.refusals]
    notes = [*report.notes, *outcome.notes, *(f"left out of the federation: {text}" for text in refused)]
    if not outcome.secure_sum:
        notes.append("statistics were added in the clear (plain sum): the coordinator saw each site's released sums")
    exact = sorted(site.name for site in outcome.sites.values() if not site.dp)
    if job.privacy.dp and exact:
        notes.append(f"the job asked for DP, but the policies of {', '.join(exact)} release exact sums (a site's "
                     "policy has the last word)")
    projected = sorted(r.package.label for r in outcome.models.values() if r.projection is not None)
    if projected:
        notes.append(f"features projected to k = {job.privacy.project_dim} dimensions before release (a public random "
                     f"orthonormal basis seeded by the run id): {', '.join(projected)}; the scores are of the "
                     "projected features")
    notes.append(f"{len([r for r in outcome.rounds if r.kinds])} statistics round(s) for {len(outcome.models)} "
                 f"candidate(s); planned {outcome.planned_rounds}")
    privacy = report.privacy.model_copy(update={"secure_sum": outcome.secure_sum})
    return report.model_copy(update={"notes": notes, "privacy": privacy})


def run_stages(exchange: Exchange, job: JobSpec, packages: Sequence[CandidatePackage], key: Ed25519PrivateKey, *,
               run_id: str, aggregator: Aggregator | None = None) -> tuple[Report, list[JobOutcome]]:
    """The scoring job, then, with a ``[confirm]`` table, stage 2 over the same exchange
    (:mod:`fedmte.server.confirm`): the recommended candidates probed and validated on the
    sites' held-back rows, each confirmed model's ``validation`` and the report's ``decision``.
    A stage 2 that fails leaves the scoring report standing, with the reason in its notes."""
    outcome = execute_job(exchange, job, packages, key, run_id=run_id, aggregator=aggregator)
    report = build_job_report(job, outcome)
    stage2 = confirmation_job(job, report.recommendation_groups)
    if stage2 is None:
        return report, [outcome]
    names = {c.label for c in stage2.candidates}
    try:  # the same run (the transport's), a new setup: the sites closed the first with its checkpoint
        second = execute_job(exchange, stage2, [p for p in packages if p.label in names], key, run_id=run_id,
                             aggregator=job_aggregator(stage2, run_id))
    except FedmteError as error:
        note = f"the confirmation stage failed, so the ranking stands unconfirmed: {error}"
        return report.model_copy(update={"notes": [*report.notes, note]}), [outcome]
    return confirmed_report(job, report, outcome, second), [outcome, second]


def confirmed_report(job: JobSpec, report: Report, first: JobOutcome, second: JobOutcome) -> Report:
    """``report`` with each confirmed model's validation and the decision (stage 2)."""
    validated: dict[str, Validation] = {}
    stage_rounds = len([r for r in second.rounds if r.kinds])
    mode = job.confirm.mode if job.confirm is not None else "probe"
    for record in second.models.values():
        failure = next(iter(record.failures.values()), None)
        counts = held_back_counts(record.released.blocks, record.released.stats) or (0.0, 0.0)
        validated[record.package.label] = validation_of(
            *counts, rounds=stage_rounds, noisy=record.released.noisy, mode=mode,
            failure=failure or (None if counts[1] > 0 else "no held-back counts were released"))
    order = [m.name for m in report.models if m.rank is not None]
    decision = decide(validated, {m.name: m.scores for m in report.models}, report.ranked_scorers, order)
    models = [m.model_copy(update={"validation": validated.get(m.name)}) for m in report.models]
    for node, site in first.sites.items():  # what left each site, and its cost, over both stages
        later = second.sites.get(node)
        if later is not None:
            site.statistics.extend(later.statistics)
            site.releases.extend(later.releases)
            site.refusals.extend(later.refusals)
            site.checkpoint = later.checkpoint or site.checkpoint
    sites = _disclosures(first.sites.values())
    spent = [s.privacy.epsilon_spent for s in sites if s.privacy.epsilon_spent is not None]
    privacy = report.privacy.model_copy(update={"epsilon_spent_max": max(spent) if spent else None})
    rounds = [*report.rounds, *(r.model_copy(update={"name": f"confirm: {r.name}"}) for r in second.rounds)]
    notes = [*report.notes, *second.notes]
    if any(v.noisy for v in validated.values()):
        notes.append("the confirmation's held-back counts carry DP noise; their intervals are the binomial ones only")
    return report.model_copy(update={"models": models, "decision": decision, "notes": notes, "sites": sites,
                                     "privacy": privacy, "rounds": rounds})


def write_job_outputs(outcome: JobOutcome, directory: Path, *, append: bool = False) -> None:
    """``received.jsonl`` (a digest of every reply; ``append``: after an earlier stage's) and
    each site's checkpoint as a witness (a later stage's checkpoint covers the earlier ones)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = {node: site.name for node, site in outcome.sites.items()}
    lines = [json.dumps({"run_id": outcome.run_id, "node": r.node, "site": names.get(r.node, str(r.node)),
                         "query": r.query, "group": r.group, "sha256": r.sha256, "bytes": r.nbytes}, sort_keys=True)
             for r in outcome.receipts]
    with (directory / RECEIVED_FILE).open("a" if append else "w", encoding="utf-8") as out:
        out.write("".join(line + "\n" for line in lines))
    witnesses = directory / WITNESS_DIR
    for site in outcome.sites.values():
        if site.checkpoint is not None:
            witnesses.mkdir(exist_ok=True)
            (witnesses / f"{site.name}.txt").write_text(site.checkpoint, encoding="utf-8")


# --------------------------------------------------------------------------- over Flower

class ServerJob(BaseModel):
    """What the ServerApp needs to run a job (the run config's ``job``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: dict[str, Any] = Field(description="the JobSpec, paths absolute on the coordinator's machine")
    coordinator_key: str = Field(pattern=r"^/", description="absolute path of the coordinator's signing key")
    probe: bool = Field(default=False, description="probe the sites' secure-sum request rules instead of scoring")


def serve_job(grid: Any, text: str, run_id: int) -> Report | None:
    """Inside the ServerApp: run the job in ``text`` (a :class:`ServerJob`) over the grid,
    with the secure sum when the job has a ``[secure]`` table (:func:`job_aggregator`).

    Writes ``report.json``/``report.html``, ``received.jsonl`` and the witnesses to the job's
    output folder, and the run's status (``run.json``, a
    :class:`~fedmte.server.report.RunStatus`) last; a failure writes the status with every
    site's reason and re-raises, so Flower marks the run failed. A probe run
    (:mod:`fedmte.server.site_probe`) writes only the status, with each site's verdicts.
    """
    from fedmte.server.flower_exchange import FlowerExchange, tune_pull_backoff

    start = time.perf_counter()
    try:
        spec = ServerJob.model_validate_json(text)
        job = JobSpec.model_validate(spec.job)
    except ValidationError as error:
        raise InvalidInputError(f"the run config's 'job' is not a fedmte job: {error.error_count()} problem(s)") from None
    output = Path(job.output)
    status_path = output / STATUS_FILE
    aggregator: Aggregator | None = None
    try:
        tune_pull_backoff()
        federation = job.federation
        exchange = FlowerExchange(grid, min_sites=federation.min_sites, connect_timeout=federation.connect_timeout,
                                  round_timeout=federation.round_timeout)
        if spec.probe:
            _serve_probe(exchange, job, run_id, start, status_path)
            return None
        key = load_coordinator_key(Path(spec.coordinator_key))
        packages = load_candidates(job)
        aggregator = job_aggregator(job, str(run_id))
        report, outcomes = run_stages(exchange, job, packages, key, run_id=str(run_id), aggregator=aggregator)
        outcome = outcomes[0]
        write_report(report, output)
        for index, stage in enumerate(outcomes):
            write_job_outputs(stage, output, append=index > 0)
    except FedmteError as error:
        write_status(RunStatus(status="failed", run_id=run_id, error=str(error), total_seconds=time.perf_counter() - start,
                               failures=getattr(error, "failures", {}), secure=_secure_summary(aggregator)), status_path)
        raise
    trips = [r.seconds for r in outcome.rounds if r.kinds]
    write_status(RunStatus(
        status="finished", run_id=run_id, sites=len(outcome.sites), planned_rounds=outcome.planned_rounds,
        rounds=[RoundStatus(name=r.name, seconds=r.seconds, kinds=r.kinds, bytes_per_site=r.bytes_per_site)
                for r in outcome.rounds],
        seconds_per_round_trip=sum(trips) / len(trips) if trips else None,
        total_seconds=time.perf_counter() - start, secure=_secure_summary(aggregator),
    ), status_path)
    return report


def _secure_summary(aggregator: Aggregator | None) -> dict[str, Any] | None:
    return aggregator.summary() if isinstance(aggregator, SecureAggregator) else None


def _serve_probe(exchange: Exchange, job: JobSpec, run_id: int, start: float, status_path: Path) -> None:
    if job.secure is None:
        raise InvalidInputError("probing the sites needs the job's [secure] table (its key, roster and bounds)")
    probe = probe_sites(exchange, job.secure, job_id=f"probe-{run_id}-{secrets.token_hex(4)}")
    write_status(RunStatus(
        status="finished" if probe.passed else "failed", run_id=run_id, sites=len(exchange.nodes),
        total_seconds=time.perf_counter() - start, probes=probe.results, failures=probe.failures(),
        error=None if probe.passed else (
            "some sites did not refuse every forged request (see failures): do not run secure jobs with them "
            "until their data owners run a fedmte site agent that refuses them (a site runner keeps its nonces)"),
    ), status_path)


def job_aggregator(job: JobSpec, run_id: str) -> Aggregator | None:
    """The secure sum when the job has a ``[secure]`` table (None: the plain sum)."""
    if job.secure is None:
        return None
    return SecureAggregator.from_spec(job.secure, job_id=f"run-{run_id}-{secrets.token_hex(4)}")


def server_job_text(job: JobSpec, *, probe: bool = False) -> str:
    """The run config's ``job`` for :func:`serve_job` (checks the candidates and the key first)."""
    if job.federation.coordinator_key is None:
        raise InvalidInputError("the job names no coordinator key; set [federation] coordinator_key to the "
                                "coordinator's Ed25519 PEM key (the sites trust it in [trust.coordinators])")
    key_path = Path(job.federation.coordinator_key).resolve()
    load_coordinator_key(key_path)
    load_candidates(job)
    secure = job.secure
    if secure is not None:
        secure = secure.model_copy(update={"signing_key": Path(secure.signing_key).resolve()})
        load_coordinator_key(secure.signing_key)
    elif probe:
        raise InvalidInputError("the job has no [secure] table; the probe checks the secure sum's request rules")
    resolved = job.model_copy(update={"output": Path(job.output).resolve(), "secure": secure})
    return ServerJob(job=resolved.model_dump(mode="json"), coordinator_key=str(key_path), probe=probe).model_dump_json()


def launch(job: JobSpec, *, probe: bool = False, fab_dir: Path | None = None, poll: float = 0.1) -> RunStatus:
    """Submit ``job`` over its Flower connection and wait for the run's status.

    Raises :class:`FederationError` naming each failing site's reason when the run fails
    (a probe run: when a site did not refuse a forgery), and :class:`InvalidInputError` for a
    job that cannot start (missing key or packages).
    """
    text = server_job_text(job, probe=probe)
    output = Path(job.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    status_path = output / STATUS_FILE
    status_path.unlink(missing_ok=True)
    env = flwr_env(job.federation.flwr_home)
    run_id = submit_run(text, job.connection, env, fab_dir or FAB_DIR)
    status = wait_for_status(status_path, run_id, job.connection, env, job.federation.run_timeout, poll=poll)
    if status.status == "failed":
        raise FederationError(f"run {run_id} failed: {status.error}", failures=status.failures)
    return status


def run_job(job: JobSpec, *, fab_dir: Path | None = None, poll: float = 0.1) -> Report:
    """Run ``job`` over its Flower connection and return the report (also written to
    ``job.output``: report.json, report.html, received.jsonl, run.json, witnesses/)."""
    launch(job, fab_dir=fab_dir, poll=poll)
    return read_report(Path(job.output).resolve() / "report.json")


__all__ = [
    "CandidatePackage", "JobOutcome", "RecordingExchange", "ServerJob", "build_job_report",
    "execute_job", "job_aggregator", "launch", "load_candidates", "load_coordinator_key", "run_job",
    "serve_job", "sign_setup",
]
