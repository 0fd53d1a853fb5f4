"""``fedmte demo``: the whole mission on one machine, with no input.

:func:`run_demo` lays out ``DIR`` (default ``./fedmte-demo``)::

    DIR/job.toml                 the scoring job (a normal job file: candidates, labels, scorers,
                                 constraints, ranking, privacy, federation)
    DIR/models/<name>/           the candidates as signed packages (fedmte.trial.zoo)
    DIR/coordinator/             the coordinator's Ed25519 key: signs the packages and job setups
    DIR/sites/<name>/site.toml   each site's file: data, pinned keys, compute, policy, audit
    DIR/sites/<name>/data/       its part of the digits (digits.npz: uint8 pixels, label names)
    DIR/sites/<name>/audit/      its tamper-evident audit log
    DIR/sites/<name>/ledger/     its privacy ledger;  keys/ its audit signing key;  cache/ features
    DIR/federation/              the loopback federation: TLS files, Flower homes, node keys, logs
    DIR/ground_truth.json        each candidate's linear-probe accuracy on held-out digits
    DIR/evaluation.json          how well each scorer's ranking matches that ground truth
    DIR/report.json, report.html the ranking report (fedmte.server.report), with the coordinator's
                                 received.jsonl, run.json and witnesses/ (each site's checkpoint)

and then: builds (or loads from the cache) the model zoo and signs it; splits the digits'
target rows into ``sites`` disjoint, label-skewed parts (each class is spread over the sites
with Dirichlet(``SKEW_ALPHA``) proportions, seeded), each site holding its digits together
with their eight one-pixel shifts (:data:`SHIFTS`); writes each site's file with the default
privacy policy (Gaussian DP at epsilon 1 per release and 4 per data source, delta 1e-6;
``dp=False`` turns DP off, and then sets a clip norm no row reaches, so the released sums
are exact and the scores equal ``fedmte score`` on the pooled ``fedmte features``); provisions
the secure sum (an identity key and a ``[secure]`` table in each ``site.toml``, the job's
``[secure]`` table; :func:`fedmte.server.secure_aggregation.provision`); starts a
loopback Flower federation of those site files (:func:`start_federation`: TLS, node
authentication, fedmte's site runner), runs the job with the coordinator
(:func:`run_job`), stops the federation (also on an error or Ctrl-C); writes the report;
judges the scorers against the ground truth; and verifies every site's audit log and
ledger, with the coordinator's witness copy of its checkpoint, as ``fedmte audit verify``
does. ``transport="in-process"`` runs the same coordinator, site agents and secure sum in
this process instead (no network; the report says so).

With DP on, the sites opt in to distributed noise (``[policy.dp] distributed``) and the
secure sum needs every site (threshold = sites), so each site adds 1/sites of the noise
variance and the sum carries the calibrated noise (the README's "Rankings under DP").

Re-running in the same ``DIR`` reuses the packages, the keys and the site data files (their
fingerprint is their content), so the sites' feature caches stay valid. Releases made with
share noise are tied to their secure job and are not replayed, so every DP run spends one
release of each site's budget (four in all); a site whose budget is spent refuses, and the
demo says which rule said no. With DP off nothing is spent.

Why the shifted copies: under the default policy (epsilon 1 per release) stable rankings
need thousands of rows (the privacy research notes, section 4.8), and the digits give the
three sites 754 together. Nine copies give about 6,800 rows. The unit of privacy stays one
row, so one written digit is protected as a group of nine rows; this is a public data set,
and the site files say so. With the noise spent where the ranking needs it (the README's
"Rankings under DP") the DP ranking's weighted tau against the ground truth is about 0.8
on average (``bench/bench_dp_ranking.py``), against 0.84 for the exact sums.

The job's scorers (:data:`DEMO_SCORERS`) are non-iterative and need only statistics with
a declared DP sensitivity (LEEP's log-likelihood sum is unbounded, so a DP policy refuses
it); they finish in :func:`demo_rounds` statistics rounds, whatever the number of models.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmte.client.audit_log import AuditVerification, verify
from fedmte.client.policy import DEFAULT_DELTA, DEFAULT_EPSILON_BUDGET, DEFAULT_EPSILON_PER_RELEASE
from fedmte.client.site_config import load_site_config, site_file_text
from fedmte.protocol.durable import replace_file
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.evaluation import MIN_MODELS, RankingMetrics, evaluate_ranking, parse_scores
from fedmte.protocol.keys import fingerprint, load_private_key, public_key_text, write_private_key
from fedmte.protocol.plan import traced_requests
from fedmte.protocol.secure_rounds import DeclaredBounds
from fedmte.protocol.secure_sum import majority_threshold
from fedmte.server.job import JobSpec, load_job
from fedmte.server.report import Report, write_report
from fedmte.server.secure_aggregation import SecureJobSpec
from fedmte.trial.inprocess import run_job_in_process
from fedmte.trial.local_federation import LocalFederation
from fedmte.trial.local_sites import provision
from fedmte.trial.zoo import DIGIT_LABELS, Zoo, build_zoo, load_digits_split, pack_zoo

DEFAULT_OUT = Path("fedmte-demo")
DEMO_SCORERS: tuple[str, ...] = ("logme", "hscore", "gbc", "transrate", "nce")
"""Non-iterative scorers whose statistics all have a declared DP sensitivity."""
CONFIRM_SCORERS: tuple[str, ...] = ("linear_probe", "lda_probe")
"""Stage 2's programs (:mod:`fedmte.server.confirm`): the sites' policies allow them too. With
exact sums the demo confirms by the Newton probe; under DP by the closed-form LDA head (two
releases, with the scoring's three of the default budget's four)."""
def demo_rounds(dp: bool) -> int:
    """Statistics rounds of the demo job: under DP one (the sums are uncentred and centred at
    the coordinator), with exact sums two (a centring round, then every scorer's one round)."""
    return 1 if dp else 2
SKEW_ALPHA = 0.5
SPLIT_SEED = 7
MIN_SITES, MAX_SITES = 3, 12
MIN_SITE_SHARE = 0.05
DP_CLIP_NORM = 1.0
"""Clip norm under DP: below every candidate's typical feature norm, so clipping puts every
row on the unit sphere, the same for every model (rankings compare directions, not scales)."""
NO_DP_CLIP_NORM = 1e9
"""Clip norm with DP off: no feature row comes near it, so the released sums are exact."""
SECURE_FEATURE_NORM = 1e4
"""The feature-norm bound the secure sum declares with DP off (with DP on: the clip norm).
The sites do not clip then, so this is a declaration the candidates' features must meet; a
site whose rows exceed it refuses the round rather than let a sum wrap."""
MAX_FEATURE_DIM = 64
LICENSE_ALLOWLIST = ("CC-BY-4.0", "Apache-2.0")
MAX_LATENCY_MS = 50.0
TOP_K = 3
SITE_DATA_FILE = "data/digits.npz"
COORDINATOR_KEY = "coordinator/coordinator.pem"
FEDERATION_DIR = "federation"


class DemoProgress(Protocol):
    """What the demo reports as it goes: a new stage, or a detail of the current one."""

    def stage(self, title: str) -> None: ...

    def detail(self, text: str) -> None: ...


class _Silent:
    def stage(self, title: str) -> None:
        pass

    def detail(self, text: str) -> None:
        pass


Transport = Literal["federation", "in-process"]


@dataclass(frozen=True)
class DemoOptions:
    out: Path = DEFAULT_OUT
    sites: int = 3
    dp: bool = True
    zoo_cache: Path | None = None
    transport: Transport = "federation"


@dataclass(frozen=True)
class DemoSetup:
    """Everything :func:`prepare_demo` wrote, ready for :func:`run_job`."""

    out: Path
    job_file: Path
    job: JobSpec
    site_files: list[Path]
    models: dict[str, Path]
    ground_truth: dict[str, float]
    coordinator_key: Ed25519PrivateKey
    zoo: Zoo


@dataclass(frozen=True)
class SiteCheck:
    """``fedmte audit verify`` of one site's log, plus its ledger against the log."""

    site: str
    audit_dir: Path
    verification: AuditVerification
    ledger_problem: str | None

    @property
    def ok(self) -> bool:
        return self.verification.verified and self.ledger_problem is None


@dataclass(frozen=True)
class DemoResult:
    setup: DemoSetup
    report: Report
    evaluation: dict[str, RankingMetrics]
    audits: list[SiteCheck]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def audits_ok(self) -> bool:
        return all(check.ok for check in self.audits)


# --------------------------------------------------------------------------- pieces

def skewed_split(labels: np.ndarray, sites: int, *, alpha: float = SKEW_ALPHA, seed: int = SPLIT_SEED) -> list[np.ndarray]:
    """Disjoint row sets, one per site, covering every row: each class's rows are dealt to the
    sites in Dirichlet(alpha) proportions (small alpha: strong label skew). Seeded; a draw
    that leaves a site with under ``MIN_SITE_SHARE`` of the rows is redrawn."""
    if sites < 1:
        raise InvalidInputError(f"need at least one site, got {sites}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(sites)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(sites, alpha))
            cuts = np.rint(np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for site, chunk in enumerate(np.split(rows, cuts)):
                parts[site].append(chunk)
        split = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in split) >= MIN_SITE_SHARE * len(labels):
            return split
    raise InvalidInputError(f"could not split {len(labels)} rows over {sites} sites with at least "
                            f"{MIN_SITE_SHARE:.0%} each; use fewer sites")


SHIFTS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
"""The one-pixel shifts (zero fill) each site holds of each of its digits, the unshifted one included."""


def shifted_copies(images: np.ndarray) -> np.ndarray:
    """(n, h, w) -> (n * len(SHIFTS), h, w): every image moved by each shift, zeros shifted in;
    the copies of image i are rows i * len(SHIFTS) ... (i + 1) * len(SHIFTS) - 1."""
    n, height, width = images.shape
    out = np.zeros((n, len(SHIFTS), height, width), dtype=images.dtype)
    for k, (dy, dx) in enumerate(SHIFTS):
        src_rows = slice(max(-dy, 0), height - max(dy, 0))
        dst_rows = slice(max(dy, 0), height - max(-dy, 0))
        src_cols = slice(max(-dx, 0), width - max(dx, 0))
        dst_cols = slice(max(dx, 0), width - max(-dx, 0))
        out[:, k, dst_rows, dst_cols] = images[:, src_rows, src_cols]
    return out.reshape(n * len(SHIFTS), height, width)


def site_names(count: int) -> list[str]:
    """``site-a``, ``site-b``, ..."""
    if not MIN_SITES <= count <= MAX_SITES:
        raise InvalidInputError(
            f"--sites must be between {MIN_SITES} and {MAX_SITES}, got {count} "
            "(the secure sum needs at least 3 sites; the digits are too few for more)"
        )
    return [f"site-{chr(ord('a') + i)}" for i in range(count)]


def policy_needs(scorers: Sequence[str]) -> tuple[list[str], list[str]]:
    """The statistic kinds and feature transforms ``scorers`` request
    (:func:`fedmte.protocol.plan.traced_requests`). A site's policy must allow exactly these
    for the job to run."""
    kinds: set[str] = set()
    transforms: set[str] = set()
    for scorer in scorers:
        traced = traced_requests(scorer)
        kinds |= traced[0]
        transforms |= traced[1]
    return sorted(kinds), sorted(transforms)


def site_document(name: str, *, trust_key: str, audit_key_sha256: str, dp: bool, scorers: Sequence[str],
                  architectures: Sequence[str]) -> dict[str, Any]:
    """A demo site's site file: its data, the one trusted coordinator key, compute, policy and audit."""
    kinds, transforms = policy_needs(scorers)
    return {
        "site": {"name": name, "cache_dir": "cache"},
        "data": {"kind": "arrays", "fingerprint": "content", "path": SITE_DATA_FILE, "labels": list(DIGIT_LABELS)},
        "trust": {"coordinators": {"demo-coordinator": trust_key}},
        "compute": {"batch_size": 256, "threads": 1, "device": "cpu", "progress": False},
        "policy": {
            "allowed_scorers": sorted(scorers), "allowed_statistics": kinds, "allowed_transforms": transforms,
            "allowed_architectures": sorted(architectures), "max_feature_dim": MAX_FEATURE_DIM,
            "clip_norm": DP_CLIP_NORM if dp else NO_DP_CLIP_NORM, "min_noisy_class_count": 0.0,
            "dp": {"enabled": dp, "epsilon_per_release": DEFAULT_EPSILON_PER_RELEASE,
                   "epsilon_budget": DEFAULT_EPSILON_BUDGET, "delta": DEFAULT_DELTA, "neighbouring": "add_remove",
                   "allocation": "by_scorer", "distributed": dp},
        },
        "audit": {"dir": "audit", "signing_key": "keys/audit.key", "ledger_dir": "ledger",
                  "verification_key_sha256": audit_key_sha256},
    }


SITE_COMMENTS = {
    "site.cache_dir": "the feature cache (stays here)",
    "data.fingerprint": "the data set's identity: its bytes (reruns reuse cache and ledger)",
    "data.path": "uint8 8x8 pixels (inputs) and digit names (labels), each digit with its 8 one-pixel shifts",
    "trust.coordinators": "the one coordinator this site trusts: it signs packages, jobs and secure-sum requests",
    "policy": "default deny: only what is named here is allowed",
    "policy.clip_norm": "rows are scaled to at most this L2 norm before anything is summed",
    "policy.dp": "the default privacy settings, and distributed noise: through the secure sum this site adds a share",
    "policy.dp.distributed": "a share of the noise through the secure sum (full noise without it)",
    "audit.dir": "the tamper-evident log: fedmte audit verify <site>/audit",
    "audit.signing_key": "the site's audit signing key (never leaves the site)",
    "audit.ledger_dir": "the privacy budget spent, per data source",
    "audit.verification_key_sha256": "pins the audit key: the site refuses to start with another",
}
"""The comments of a demo site file (:func:`fedmte.client.site_config.site_file_text`)."""


def secure_toml(spec: SecureJobSpec) -> str:
    """The job's ``[secure]`` table (signing key relative to the job file)."""
    roster = "\n".join(f"{name} = {json.dumps(key)}" for name, key in sorted(spec.roster.items()))
    threshold = "" if spec.threshold is None else (
        f"threshold = {spec.threshold}                       # uploads needed, or nothing is released\n")
    return f"""
[secure]                            # sum with the secure sum: the coordinator sees only sums over sites
signing_key = {json.dumps(COORDINATOR_KEY)}   # the coordinator key every site trusts
self_masks = {str(spec.self_masks).lower()}
{threshold}
[secure.roster]                     # each site's identity key (sites/<name>/identity.pem)
{roster}

[secure.bounds]                     # public bounds every site checks its sums against
max_rows = {spec.bounds.max_rows}
feature_norm = {spec.bounds.feature_norm!r}
"""


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def job_toml(models: Sequence[str], *, sites: int, dp: bool, secure: SecureJobSpec | None = None) -> str:
    """The text of the demo's ``job.toml`` (with ``secure``: its ``[secure]`` table)."""
    candidates = "\n".join(f"    {{ name = {json.dumps(m)}, path = {json.dumps('models/' + m)} }}," for m in models)
    return f"""# The fedmte demo's scoring job: which candidates, which label space, how to rank them.
connection = "local"
output = "."
purpose = "fedmte demo: rank candidate models for handwritten digits"
labels = {_toml_list(DIGIT_LABELS)}
candidates = [
{candidates}
]
scorers = {_toml_list(DEMO_SCORERS)}

[constraints]                       # business constraints, checked on what the sites measured
max_latency_ms = {MAX_LATENCY_MS:g}
licenses = {_toml_list(LICENSE_ALLOWLIST)}
action = "flag"                     # a violation flags the model: ranked, never recommended

[ranking]
aggregate = "mean_rank"
top_k = {TOP_K}

[confirm]                           # stage 2: the top {TOP_K} confirmed on rows each site holds back
top_k = {TOP_K}
mode = {'"lda"                        # a shrunk LDA head in closed form: two releases' if dp else
        '"probe"                      # a logistic-regression probe by Newton rounds'}
holdout = 0.2

[privacy]
dp = {str(dp).lower()}

[federation]
flwr_home = "federation/flwr"       # the loopback federation's Flower connection "local"
coordinator_key = {json.dumps(COORDINATOR_KEY)}   # signs the packages and each job's setup
min_sites = {sites}
round_timeout = 120.0
run_timeout = 600.0
""" + ("" if secure is None else secure_toml(secure))


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write ``data`` unless the file already holds exactly it (keeps its mtime, hence the
    data set's fingerprint and the site's feature cache)."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _coordinator_key(out: Path) -> Ed25519PrivateKey:
    path = out / COORDINATOR_KEY
    return load_private_key(path) if path.exists() else write_private_key(path)


def prepare_demo(options: DemoOptions, progress: DemoProgress | None = None) -> DemoSetup:
    """Build the zoo, sign the packages, write the site files and data, and the job file."""
    say = progress or _Silent()
    names = site_names(options.sites)
    out = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    say.stage("Building the model zoo")
    zoo = build_zoo(options.zoo_cache, progress=lambda name, cached: say.detail(
        f"{name} {'loaded from the cache' if cached else 'trained'}"))

    say.stage("Signing the candidate packages")
    key = _coordinator_key(out)
    manifests = pack_zoo(zoo, out / "models", key)
    models = {name: out / "models" / name for name in manifests}
    truth = zoo.index.ground_truth()
    _write_if_changed(out / "ground_truth.json", (json.dumps(truth, indent=2) + "\n").encode())

    say.stage(f"Writing {len(names)} sites' data and site files")
    split = load_digits_split()
    rows = split.target_train
    parts = skewed_split(split.labels[rows], len(names))
    trust = public_key_text(key)
    architectures = sorted({m.architecture for m in manifests.values()})
    site_files = []
    for name, part in zip(names, parts):
        home = out / "sites" / name
        chosen = rows[part]
        labels = np.repeat(split.labels[chosen], len(SHIFTS))
        arrays = {"inputs": shifted_copies(split.images[chosen]), "labels": np.array([DIGIT_LABELS[y] for y in labels])}
        _write_if_changed(home / SITE_DATA_FILE, _npz_bytes(arrays))
        site_file = home / "site.toml"
        audit_key_path = home / "keys" / "audit.key"
        audit_key = load_private_key(audit_key_path) if audit_key_path.exists() else write_private_key(audit_key_path)
        document = site_document(name, trust_key=trust, audit_key_sha256=fingerprint(audit_key), dp=options.dp,
                                 scorers=(*DEMO_SCORERS, *CONFIRM_SCORERS), architectures=architectures)
        _write_if_changed(site_file, site_file_text(
            document, comments=SITE_COMMENTS,
            header=f"Site file of the fedmte demo's {name}. The data owner writes this file; no job can change it.",
        ).encode())
        site_files.append(site_file)
        counts = np.bincount(split.labels[chosen], minlength=len(DIGIT_LABELS))
        say.detail(f"{name}: {len(chosen)} digits ({len(labels)} rows with shifts), per digit {counts.tolist()}")

    say.stage("Provisioning the secure sum")
    total_rows = len(rows) * len(SHIFTS)
    secure = provision(dict(zip(names, site_files)), out / COORDINATOR_KEY,
                       bounds=DeclaredBounds(max_rows=total_rows, feature_norm=DP_CLIP_NORM if options.dp else SECURE_FEATURE_NORM),
                       require_secure_sum=False, threshold=len(names) if options.dp else None)
    threshold = secure.threshold or majority_threshold(len(names))
    say.detail(f"identity keys and a [secure] table in each site file; threshold {threshold} of {len(names)} sites"
               + (f": each site adds 1/{threshold} of the noise variance" if options.dp else ""))

    job_file = out / "job.toml"
    _write_if_changed(job_file, job_toml(list(models), sites=len(names), dp=options.dp, secure=secure).encode())
    job = load_job(job_file)
    return DemoSetup(out=out, job_file=job_file, job=job, site_files=site_files, models=models,
                     ground_truth=truth, coordinator_key=key, zoo=zoo)


def start_federation(directory: Path, site_files: Sequence[Path], *, timeout: float = 90.0) -> LocalFederation:
    """A loopback federation whose site runners serve the demo's site files (TLS, node
    authentication), stopped by :func:`fedmte.trial.local_federation.down`."""
    from fedmte.trial.local_federation import serve_site_files

    return serve_site_files(directory, site_files, labels=DIGIT_LABELS, timeout=timeout)


def run_job(setup: DemoSetup, transport: Transport = "federation", progress: DemoProgress | None = None) -> Report:
    """Run the demo's scoring job over its sites and return the report.

    ``federation``: a loopback Flower federation of the demo's site files
    (:func:`start_federation`) and the coordinator's :func:`fedmte.server.coordinator.run_job`;
    the federation is stopped afterwards, also on an error or Ctrl-C. ``in-process``: every
    site-side step in this process, the releases summed in the clear
    (:func:`fedmte.trial.inprocess.run_job_in_process`, the coordinator's job driver over
    in-process site agents).
    """
    say = progress or _Silent()
    if transport == "in-process":
        say.detail(f"running the job: {demo_rounds(setup.job.privacy.dp)} statistics round(s) for {len(setup.models)} models")
        return run_job_in_process(setup.job, setup.site_files)
    from fedmte.server.coordinator import run_job as coordinator_run_job
    from fedmte.trial import local_federation as lf

    directory = setup.out / FEDERATION_DIR
    say.detail("starting a SuperLink and one SuperNode per site (TLS, node authentication)")
    start_federation(directory, setup.site_files)
    try:
        say.detail(f"running the job: {demo_rounds(setup.job.privacy.dp)} statistics round(s) for {len(setup.models)} models")
        return coordinator_run_job(setup.job)
    finally:
        say.detail("stopping the federation")
        lf.down(directory)


AGGREGATE_KEY = "ranking"
"""The name the aggregate ranking goes by in :func:`evaluate_report`'s results."""


def evaluate_report(report: Report, truth: dict[str, float]) -> dict[str, RankingMetrics]:
    """Each scorer's ranking against the ground truth (as ``fedmte evaluate``), over the models it
    scored (a score that failed leaves its model out of that scorer's evaluation; fewer than
    ``MIN_MODELS`` scored models: no evaluation), then the aggregate ranking's own, as
    ``AGGREGATE_KEY`` (a lower mean or median rank is better, so it enters negated)."""
    scores = parse_scores(json.loads(report.to_json()), "report.json")
    sign = 1.0 if report.better == "higher" else -1.0
    scores[AGGREGATE_KEY] = {m.name: sign * m.aggregate for m in report.models if m.aggregate is not None}
    results: dict[str, RankingMetrics] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tie-heavy scorer warns; its metrics still stand
        for scorer, values in scores.items():
            scored = {model: value for model, value in values.items() if model in truth}
            if len(scored) < MIN_MODELS:
                continue
            results[scorer] = evaluate_ranking(scored, {model: truth[model] for model in scored})
    return results


WITNESS_DIR = "witnesses"


def verify_sites(site_files: Sequence[Path], witness_dir: Path | None = None) -> list[SiteCheck]:
    """``fedmte audit verify --site SITE.toml [--witness NOTE]`` for every site: the log against
    the audit key the site file pins and against its ledger (behind or ahead of the log is
    tampering); the witness is the checkpoint the coordinator kept for the site
    (``witness_dir/<site>.txt``), if any."""
    checks = []
    for site_file in site_files:
        config = load_site_config(site_file)
        audit = config.audit
        witness = None if witness_dir is None else witness_dir / f"{config.site.name}.txt"
        result = verify(audit.dir, witnesses=[witness] if witness is not None and witness.is_file() else [],
                        key_sha256=audit.verification_key_sha256, ledger_dir=audit.ledger_dir)
        checks.append(SiteCheck(site=config.site.name, audit_dir=audit.dir, verification=result,
                                  ledger_problem=result.ledger_problem))
    return checks


def run_demo(options: DemoOptions, progress: DemoProgress | None = None) -> DemoResult:
    """Prepare, run the job, write the report, judge the scorers and verify every audit log."""
    say = progress or _Silent()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    setup = prepare_demo(options, say)
    timings["prepare"] = time.perf_counter() - mark

    where = "over a loopback federation" if options.transport == "federation" else "in this process"
    say.stage(f"Scoring {len(setup.models)} candidates at {len(setup.site_files)} sites {where}")
    mark = time.perf_counter()
    report = run_job(setup, options.transport, say)
    timings["job"] = time.perf_counter() - mark

    say.stage("Writing the report")
    evaluation = evaluate_report(report, setup.ground_truth)
    if evaluation:
        agreement = ", ".join(f"{name} {m.weighted_tau:.2f}" for name, m in evaluation.items() if m.weighted_tau is not None)
        report = report.model_copy(update={"notes": [*report.notes, (
            "against the ground truth (ground_truth.json: each candidate's linear-probe accuracy on held-out digits), "
            f"weighted Kendall tau: {agreement}"
        )]})
    write_report(report, setup.out)
    _write_if_changed(setup.out / "evaluation.json", (json.dumps(
        {"truth": "ground_truth.json", "scorers": {s: m.model_dump(mode="json") for s, m in evaluation.items()}},
        indent=2) + "\n").encode())

    say.stage("Verifying every site's audit log")
    audits = verify_sites(setup.site_files, setup.out / WITNESS_DIR)
    return DemoResult(setup=setup, report=report, evaluation=evaluation, audits=audits,
                      seconds=time.perf_counter() - started, timings=timings)


__all__ = [
    "DEMO_SCORERS",
    "DemoOptions",
    "DemoProgress",
    "DemoResult",
    "DemoSetup",
    "SiteCheck",
    "evaluate_report",
    "job_toml",
    "policy_needs",
    "prepare_demo",
    "run_demo",
    "run_job",
    "site_document",
    "skewed_split",
    "verify_sites",
]
