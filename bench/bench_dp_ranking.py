"""How much differential privacy changes the ranking of the demo's candidate models.

The candidates are the demo zoo (:mod:`fedmte.trial.zoo`: seven small CNNs of different
quality on scikit-learn's digits), written as signed packages and loaded the way a site
loads any candidate. The zoo's *target train* rows are split at random over three sites;
each site runs every candidate over its rows with the site's own extraction code
(:func:`fedmte.client.extract.extract`, feature cache included).

* **non-DP ranking**: :func:`fedmte.score` on the exact features (no clipping, no noise),
  one ranking per scorer and the ranking by mean rank over the scorers.
* **DP ranking**: every statistics round is a release by each site's own privacy pipeline
  (:meth:`fedmte.client.privacy.SitePrivacy.disclose`: policy check, per-row L2 clipping to
  ``--clip``, Gaussian noise calibrated to each block's sensitivity, ledger charge, audit
  record); the coordinator adds the three sites' noisy releases and the scorers run on the
  sums (one :class:`fedmte.protocol.plan.PlanRun` per model and scorer, their requests
  batched into one release per round, so a scorer that breaks on noise stops alone).

Budget accounting (each site spends at most epsilon, delta = 1e-6, on its data source):

``job``
    one job ranks all candidates with all scorers: the plan's R rounds are R releases per
    site (a release holds every candidate's blocks of that round), each of mu_cap / sqrt(R),
    so the site's ledger ends at epsilon. This is what a site pays for a full report.
``scorer``
    each scorer alone, as its own job, gets the whole epsilon (all candidates, all of that
    scorer's rounds). It shows how robust each scorer is to noise, not what a site pays
    for all of them.

The ``clip`` column runs the same pipeline with DP off (clipping still applied): the part
of the change that comes from clipping alone. Kendall's tau-b compares each DP ranking with
the non-DP ranking of the same scorer (mean and standard deviation over ``--draws`` noise
draws; a scorer that fails on a noisy sum ranks that model last and is counted). Scorers
whose statistics have no finite sensitivity are refused by the site policy under DP
(:data:`fedmte.protocol.dp.UNBOUNDED`) and are left out, with a printed note.

``--post``: ``raw`` feeds the noisy sums to the scorers as they are; ``psd`` first applies
the plain post-processing of research/PRIVACY.md section 4.3, here in the bench (counts
>= 1, non-negative sums >= 0, Gram blocks projected onto the PSD cone); ``clean`` uses
fedmte's own :mod:`fedmte.protocol.dp_postprocess` (Gram eigenvalues floored at the noise
level 2 sigma sqrt(d), sigma pooled from the noise std each site declared). ``--repeat K`` is a what-if: every site holds each of its rows K times,
i.e. K times the data with the same noise.

Usage: ``python bench/bench_dp_ranking.py [--draws 10] [--epsilons 1 4 8] [--clip 1.0]
[--modes job scorer] [--post raw psd clean] [--repeat 1]`` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fedmte  # noqa: E402
from fedmte.client.architectures import LoadedModel, load_model  # noqa: E402
from fedmte.client.audit_log import key_fingerprint  # noqa: E402
from fedmte.client.cache import FeatureCache  # noqa: E402
from fedmte.client.data import open_site_data  # noqa: E402
from fedmte.client.extract import ExtractionSettings, extract  # noqa: E402
from fedmte.client.packages import generate_signing_key, public_key_string  # noqa: E402
from fedmte.client.policy import DPPolicy, SitePolicy, violations  # noqa: E402
from fedmte.client.privacy import (  # noqa: E402
    ModelRequest,
    ReleaseRequest,
    SitePrivacy,
    block_name,
    clip_batches,
    decode_release,
)
from fedmte.client.site_config import ArraySource  # noqa: E402
from fedmte.protocol import dp  # noqa: E402
from fedmte.protocol.catalogue import STATISTICS, TRANSFORMS, Batch, accumulate, softmax  # noqa: E402
from fedmte.protocol.errors import FedmteError  # noqa: E402
from fedmte.protocol.evaluation import evaluate_ranking  # noqa: E402
from fedmte.protocol.inputs import check_inputs  # noqa: E402
from fedmte.protocol.local import InMemorySite  # noqa: E402
from fedmte.protocol.plan import PlanRun, default_scorers, make_plan  # noqa: E402
from fedmte.protocol.requests import Stat  # noqa: E402
from fedmte.protocol.statistics import Statistics  # noqa: E402
from fedmte.protocol.symmetric import pack, unpack  # noqa: E402
from fedmte.trial.zoo import DIGIT_LABELS, build_zoo, load_digits_split, pack_zoo  # noqa: E402

try:
    from fedmte.protocol import dp_postprocess
except ImportError:  # a tree without fedmte's own post-processing: ``--post clean`` is not offered
    dp_postprocess = None

DELTA = 1e-6
SITES = 3
SPLIT_SEED = 7
NUM_CLASSES = len(DIGIT_LABELS)
DATA_SOURCE = "digits-target"
COORDINATOR = Ed25519PrivateKey.generate()
# Spend a hair under the budget, so that R releases of mu_cap / sqrt(R) never trip the
# ledger's cap over a rounding error in the epsilon <-> mu conversions.
BUDGET_SHAVE = 1e-9


# --------------------------------------------------------------------------- candidates and sites

@dataclass(frozen=True)
class Candidate:
    """One candidate model as the sites ran it: its identity and each site's outputs."""

    name: str
    weights_sha256: str
    feature_dim: int
    num_source_classes: int
    features: list[np.ndarray]  # per site, (n_site, d) float64
    probs: list[np.ndarray]  # per site, (n_site, Cs) float64
    truth: float  # the zoo's linear-probe accuracy


def site_rows(count: int) -> list[np.ndarray]:
    """A seeded random split of the target train rows over the sites."""
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    return [np.sort(part) for part in np.array_split(order, SITES)]


def load_candidates(root: Path) -> tuple[list[Candidate], list[np.ndarray]]:
    """Build (or load) the zoo, pack it, load every package as a site does, and run each
    model over each site's rows with the site's extraction pass."""
    zoo = build_zoo()
    key = generate_signing_key()
    pack_zoo(zoo, root / "models", key)
    trusted = [public_key_string(key.public_key())]
    split = load_digits_split()
    images, labels = split.images[split.target_train], split.labels[split.target_train]
    sources = []
    for index, rows in enumerate(site_rows(len(labels))):
        path = root / f"site-{index}.npz"
        np.savez(path, inputs=images[rows], labels=labels[rows])
        sources.append(open_site_data(ArraySource(path=path, labels=DIGIT_LABELS)))
    settings = ExtractionSettings(device="cpu", progress=False)
    candidates = []
    site_labels: list[np.ndarray] = []
    for entry in zoo.index.entries:
        model: LoadedModel = load_model(root / "models" / entry.name, trusted)
        features, probs, kept = [], [], []
        for index, data in enumerate(sources):
            cache = FeatureCache(root / f"cache-{index}")
            result = extract(model, data, [], cache=cache, settings=settings)
            if result.entry is None or result.entry.logits() is None:
                raise RuntimeError(f"{entry.name}: the extraction pass left no cached features and logits")
            features.append(np.asarray(result.entry.features(), dtype=np.float64))
            probs.append(softmax(np.asarray(result.entry.logits(), dtype=np.float64)))
            kept.append(np.asarray(result.entry.labels(), dtype=np.int64))
        if not site_labels:
            site_labels = kept
        elif any(not np.array_equal(a, b) for a, b in zip(site_labels, kept)):
            raise RuntimeError(f"{entry.name}: the sites' rows came out in another order than for the other models")
        candidates.append(Candidate(entry.name, model.manifest.weights_sha256, model.feature_dim,
                                    model.source_head.num_classes if model.source_head else 0,
                                    features, probs, entry.ground_truth))
    return candidates, site_labels


# --------------------------------------------------------------------------- scorers

def statistic_kinds(scorer: str, candidate: Candidate, labels: Sequence[np.ndarray]) -> set[str]:
    """Every statistic kind ``scorer`` asks for, found by running it once on exact sums."""
    inputs = check_inputs(np.vstack(candidate.features), np.concatenate(labels), np.vstack(candidate.probs))
    site = InMemorySite(inputs, np.arange(inputs.n))
    run = PlanRun(make_plan([scorer], has_features=True, has_source_probs=True), dim=candidate.feature_dim,
                  num_classes=NUM_CLASSES, num_source_classes=candidate.num_source_classes, record_failures=True)
    kinds: set[str] = set()
    while (requests := run.pending()) is not None:
        kinds |= {stat.kind for stat in requests}
        run.feed(site.compute(requests))
    return kinds


def split_scorers(candidates: Sequence[Candidate], labels: Sequence[np.ndarray],
                  clip: float) -> tuple[list[str], dict[str, str]]:
    """(scorers a DP site policy allows, {refused scorer: the policy's reason})."""
    allowed, refused = [], {}
    probe = site_policy(default_scorers(has_features=True, has_source_probs=True), clip, DPPolicy())
    for scorer in default_scorers(has_features=True, has_source_probs=True):
        kinds = set().union(*(statistic_kinds(scorer, c, labels) for c in candidates))
        found = [message for rule, message in violations(probe, kinds, [scorer], "cnn", candidates[0].feature_dim)
                 if rule == "dp.bounded_statistics"]
        if found:
            refused[scorer] = found[0]
        else:
            allowed.append(scorer)
    return allowed, refused


def site_policy(scorers: Sequence[str], clip: float, settings: DPPolicy) -> SitePolicy:
    """The policy of every site: these scorers, every catalogue statistic, the zoo's architecture."""
    return SitePolicy(
        allowed_scorers=set(scorers), allowed_statistics=set(STATISTICS), allowed_transforms=set(TRANSFORMS),
        allowed_architectures={"cnn"}, max_feature_dim=64, clip_norm=clip,
        coordinator_keys={"coordinator": key_fingerprint(COORDINATOR.public_key())}, dp=settings,
    )


def dp_settings(epsilon: float | None, releases: int) -> DPPolicy:
    """DP off (``epsilon`` None), or ``releases`` equal releases that compose to ``epsilon``."""
    if epsilon is None:
        return DPPolicy(enabled=False)
    mu_release = dp.gdp_mu(epsilon, DELTA) / math.sqrt(releases) * (1.0 - BUDGET_SHAVE)
    return DPPolicy(epsilon_per_release=dp.gdp_epsilon(mu_release, DELTA), epsilon_budget=epsilon, delta=DELTA)


# --------------------------------------------------------------------------- one DP job

@dataclass
class JobResult:
    scores: dict[str, dict[str, float]]  # scorer -> model -> score
    failures: dict[str, dict[str, str]]  # scorer -> model -> "ExceptionType: message"
    epsilon_spent: float  # the most any site's ledger records


# Bench-side coordinator post-processing of the noisy sums (``--post psd``): the plain steps
# research/PRIVACY.md section 4.3 lists, free under DP. ``--post clean`` uses fedmte's own.
POST_CHOICES = ["raw", "psd", *(["clean"] if dp_postprocess is not None else [])]
NON_NEGATIVE = frozenset({"hard_joint", "soft_joint", "class_sq_sums", "norm4_sum", "true_class_prob_sum",
                          "class_prob_outer_sums", "tilted_joint", "gmm_soft_joint"})
COUNTS = frozenset({"count", "class_counts"})
GRAMS = frozenset({"gram", "class_scatters"})


def postprocess(post: str, stat: Stat, value: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """``raw``: unchanged. ``psd``: counts clamped to >= 1, non-negative sums to >= 0, Gram
    blocks projected onto the PSD cone (eigenvalues clipped at 0). ``clean``: fedmte's
    :func:`~fedmte.protocol.dp_postprocess.clean_block` with the pooled noise std of the
    sites' declared ``noise_std`` (eigenvalues floored at 2 sigma sqrt(d))."""
    if post == "raw":
        return value
    if post == "clean":
        return dp_postprocess.clean_block(stat.kind, value, dp_postprocess.pooled_sigma(sigmas))
    if stat.kind in COUNTS:
        return np.maximum(value, 1)
    if stat.kind in NON_NEGATIVE:
        return np.maximum(value, 0).astype(value.dtype)
    if stat.kind in GRAMS:
        eigenvalues, vectors = np.linalg.eigh(unpack(value))
        return pack((vectors * np.maximum(eigenvalues, 0.0)[..., None, :]) @ np.swapaxes(vectors, -1, -2))
    return value


def job_rounds(scorers: Sequence[str]) -> int:
    """Releases per site of a job that runs ``scorers`` side by side."""
    return max(make_plan([s], has_features=True, has_source_probs=True).rounds for s in scorers)


def run_job(candidates: Sequence[Candidate], labels: Sequence[np.ndarray], scorers: Sequence[str],
            epsilon: float | None, clip: float, root: Path, *, post: str = "raw") -> JobResult:
    """All candidates, ``scorers``, three sites, each release through the site's pipeline.

    Each (model, scorer) is its own :class:`PlanRun`, so a scorer that breaks on a noisy sum
    stops alone; every round, all runs' requests for a model (identical requests merged by
    key, as one plan would) go into one release per site. The scorers' centring rounds ask
    for the same ``count`` and ``sum``, so they all get the same noisy offset.
    """
    releases = job_rounds(scorers)
    policy = site_policy(scorers, clip, dp_settings(epsilon, releases))
    sites = [SitePrivacy.open(policy, audit_dir=root / f"site-{i}" / "audit", ledger_dir=root / f"site-{i}" / "ledger",
                              site_id=f"site-{i}", signing_key=Ed25519PrivateKey.generate()) for i in range(SITES)]
    by_name = {c.name: c for c in candidates}
    by_sha = {c.weights_sha256: c for c in candidates}
    versions = [hashlib.sha256(f"{root}/site-{i}".encode() + labels[i].tobytes()).hexdigest() for i in range(SITES)]

    def batches_for(site: int) -> Callable[[ModelRequest], Iterator[Batch]]:
        def stream(model: ModelRequest) -> Iterator[Batch]:
            candidate = by_sha[model.weights_sha256]
            yield Batch(candidate.features[site], labels[site], NUM_CLASSES, candidate.probs[site])
        return stream

    def release(round_no: int, pending: Mapping[str, Sequence[Stat]]
                ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[float]]]:
        """Every site's release of one round, summed: ({model: {request key: sum}},
        {block name: each site's declared noise std})."""
        models = tuple(
            ModelRequest("cnn", by_name[name].weights_sha256, by_name[name].feature_dim, tuple(stats),
                         by_name[name].num_source_classes)
            for name, stats in pending.items()
        )
        totals: dict[str, dict[str, np.ndarray]] = {name: {} for name in pending}
        sigmas: dict[str, list[float]] = {}
        for index, site in enumerate(sites):
            request = ReleaseRequest(
                requester=key_fingerprint(COORDINATOR.public_key()), recipient="coordinator", run_id=str(root),
                round=round_no, data_source=DATA_SOURCE, dataset_version=versions[index], num_classes=NUM_CLASSES,
                models=models, scorers=tuple(scorers), purpose="bench: DP ranking fidelity",
            )
            sent: list[bytes] = []
            disclosed = site.disclose(request, batches_for(index), sent.append)
            for block in disclosed.statistics:
                sigmas.setdefault(block.key, []).append(float(block.noise_std) if block.noise_std is not None else 0.0)
            blocks = decode_release(sent[0])
            for name, stats in pending.items():
                sha = by_name[name].weights_sha256
                for stat in stats:
                    value = blocks[block_name(sha, stat)]
                    totals[name][stat.key] = totals[name].get(stat.key, 0) + value
        return totals, sigmas

    runs = {(c.name, s): PlanRun(make_plan([s], has_features=True, has_source_probs=True), dim=c.feature_dim,
                                 num_classes=NUM_CLASSES, num_source_classes=c.num_source_classes,
                                 record_failures=True)
            for c in candidates for s in scorers}
    crashed: dict[tuple[str, str], str] = {}

    def unanswerable(key: tuple[str, str], requests: Sequence[Stat]) -> str | None:
        """Why a site's statistics pass would fail on these requests (e.g. a classifier the
        coordinator fitted to noisy sums broadcast with Inf in it), found on the sites' own
        clipped rows before the release, or None. A failing pass makes a site refuse the
        whole release, so such a run stops here instead, alone."""
        candidate = by_name[key[0]]
        for site in range(SITES):
            batch = Batch(candidate.features[site], labels[site], NUM_CLASSES, candidate.probs[site])
            try:
                accumulate(list(requests), clip_batches([batch], clip))
            except FedmteError as error:
                return f"{type(error).__name__} at the site: {error}"
        return None

    try:
        for round_no in range(releases):
            pending = {key: reqs for key, run in runs.items() if key not in crashed and (reqs := run.pending()) is not None}
            for key, reqs in list(pending.items()):
                if (why := unanswerable(key, reqs)) is not None:
                    crashed[key] = why
                    del pending[key]
            if not pending:
                break
            merged: dict[str, dict[str, Stat]] = {}
            for (model, _), reqs in pending.items():
                merged.setdefault(model, {}).update({stat.key: stat for stat in reqs})
            sums, sigmas = release(round_no, {model: list(stats.values()) for model, stats in merged.items()})
            for (model, scorer), reqs in pending.items():
                sha = by_name[model].weights_sha256
                try:
                    runs[(model, scorer)].feed(Statistics({
                        stat.key: postprocess(post, stat, sums[model][stat.key], sigmas[block_name(sha, stat)])
                        for stat in reqs
                    }))
                except Exception as error:  # noqa: BLE001 - a scorer that breaks on noise is a finding, not a stop
                    crashed[(model, scorer)] = f"{type(error).__name__}: {error}"
        spent = max(site.ledger.spent_mu(DATA_SOURCE) for site in sites)
    finally:
        for site in sites:
            site.close()
    scores: dict[str, dict[str, float]] = {s: {} for s in scorers}
    failures: dict[str, dict[str, str]] = {s: {} for s in scorers}
    for (model, scorer), run in runs.items():
        if (model, scorer) in crashed:
            failures[scorer][model] = crashed[(model, scorer)]
        elif run.pending() is not None:
            failures[scorer][model] = "RuntimeError: asked for more rounds than its plan declared"
        elif scorer in run.failures:
            failures[scorer][model] = f"ScorerDomainError: {run.failures[scorer]}"
        else:
            scores[scorer][model] = run.scores[scorer]
    return JobResult(scores, failures, dp.gdp_epsilon(spent, DELTA))


# --------------------------------------------------------------------------- rankings

def ranks(scores: Mapping[str, float], models: Sequence[str]) -> dict[str, float]:
    """Average rank per model (1 = best); a model without a score ranks last."""
    values = np.array([scores.get(m, -np.inf) for m in models])
    order = (-values).argsort(kind="stable")
    rank = np.empty(len(models))
    rank[order] = np.arange(1, len(models) + 1, dtype=np.float64)
    for value in np.unique(values):  # ties share their average rank
        tied = values == value
        rank[tied] = rank[tied].mean()
    return dict(zip(models, rank))


def with_failures_last(scores: Mapping[str, float], models: Sequence[str]) -> dict[str, float]:
    """Scores with every failed model below the worst score (the ranking the user would see)."""
    floor = min(scores.values(), default=0.0) - 1.0
    return {m: scores.get(m, floor) for m in models}


def mean_rank_scores(table: Mapping[str, Mapping[str, float]], models: Sequence[str]) -> dict[str, float]:
    """Minus the mean rank over scorers (so higher is better, as for a score)."""
    per_scorer = [ranks(table[s], models) for s in table]
    return {m: -float(np.mean([r[m] for r in per_scorer])) for m in models}


def tau(scores: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """Kendall's tau-b between two rankings of the same models (0 if one is constant)."""
    metrics = evaluate_ranking(dict(scores), dict(reference))
    return metrics.kendall_tau if metrics.kendall_tau is not None else 0.0


# --------------------------------------------------------------------------- main

def summarise(values: Sequence[float], failed: int = 0) -> str:
    text = f"{np.mean(values):+.2f} ±{np.std(values):.2f}" if len(values) > 1 else f"{values[0]:+.2f}"
    return text + (f" [{failed}]" if failed else "")


def repeated(candidates: Sequence[Candidate], labels: Sequence[np.ndarray],
             times: int) -> tuple[list[Candidate], list[np.ndarray]]:
    """Each site's rows ``times`` over: a what-if for sites with more data like theirs."""
    if times == 1:
        return list(candidates), list(labels)
    grown = [Candidate(c.name, c.weights_sha256, c.feature_dim, c.num_source_classes,
                       [np.tile(f, (times, 1)) for f in c.features], [np.tile(p, (times, 1)) for p in c.probs], c.truth)
             for c in candidates]
    return grown, [np.tile(y, times) for y in labels]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=10, help="noise draws per epsilon")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--clip", type=float, default=1.0, help="the sites' per-row L2 clip norm C")
    parser.add_argument("--modes", nargs="+", choices=["job", "scorer"], default=["job", "scorer"])
    parser.add_argument("--post", nargs="+", choices=POST_CHOICES, default=POST_CHOICES,
                        help="coordinator post-processing of the noisy sums: raw (none), psd (counts >= 1, "
                             "non-negative sums >= 0, Gram blocks projected onto the PSD cone), clean "
                             "(fedmte.protocol.dp_postprocess)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="what-if: every site holds its rows this many times over (more data, same noise)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="fedmte-dp-bench-") as tmp:
        root = Path(tmp)
        candidates, labels = repeated(*load_candidates(root), args.repeat)
        models = [c.name for c in candidates]
        truth = {c.name: c.truth for c in candidates}
        scorers, refused = split_scorers(candidates, labels, args.clip)

        exact: dict[str, dict[str, float]] = {s: {} for s in scorers}
        bounds = np.cumsum([0, *(len(y) for y in labels)])
        rows = [np.arange(bounds[i], bounds[i + 1]) for i in range(SITES)]
        for c in candidates:
            values = fedmte.score(np.vstack(c.features), np.concatenate(labels), source_probs=np.vstack(c.probs),
                                  scorers=scorers, sites=rows)
            for s in scorers:
                exact[s][c.name] = values[s]
        exact["mean rank"] = mean_rank_scores({s: exact[s] for s in scorers}, models)

        print(f"{len(models)} candidates; rows per site {[len(y) for y in labels]}"
              + (f" (each row {args.repeat} times)" if args.repeat > 1 else "")
              + f"; clip norm C = {args.clip:g}; delta = {DELTA:g}")
        for c in candidates:
            clipped = float(np.mean(np.linalg.norm(np.vstack(c.features), axis=1) > args.clip))
            print(f"  {c.name:15s} d={c.feature_dim:<3d} linear-probe accuracy {c.truth:.3f}, rows clipped {clipped:.0%}")
        for scorer, reason in refused.items():
            print(f"note: {scorer} is left out: under DP the site policy refuses it ({reason})")
        print(f"scorers under DP: {', '.join(scorers)}")

        settings: list[tuple[str, float | None]] = [("clip", None)] + [(f"eps{e:g}", e) for e in args.epsilons]
        modes = [m for m in ("job", "scorer") if m in args.modes]
        taus: dict[tuple[str, str, str, str], list[float]] = {}
        truth_taus: dict[tuple[str, str, str], list[float]] = {}
        fails: dict[tuple[str, str, str, str], int] = {}
        reasons: dict[tuple[str, str], str] = {}
        spent: dict[tuple[str, str], float] = {}
        count = 0
        for post in args.post:
            for label, epsilon in settings:
                for _ in range(1 if epsilon is None else args.draws):
                    jobs: dict[str, dict[str, JobResult]] = {}
                    if "job" in modes:
                        jobs["job"] = {"*": run_job(candidates, labels, scorers, epsilon, args.clip,
                                                    root / f"run-{count}", post=post)}
                        count += 1
                    if "scorer" in modes:
                        jobs["scorer"] = {}
                        for s in scorers:
                            jobs["scorer"][s] = run_job(candidates, labels, [s], epsilon, args.clip,
                                                        root / f"run-{count}", post=post)
                            count += 1
                    for mode, results in jobs.items():
                        table = {}
                        for s in scorers:
                            result = results.get(s, results.get("*"))
                            table[s] = with_failures_last(result.scores[s], models)
                            key = (post, label, mode, s)
                            taus.setdefault(key, []).append(tau(table[s], exact[s]))
                            fails[key] = fails.get(key, 0) + len(result.failures[s])
                            for why in result.failures[s].values():
                                reasons.setdefault((post, s), why.split(";")[0][:110])
                            spent[(label, mode)] = max(spent.get((label, mode), 0.0), result.epsilon_spent)
                        mean_rank = mean_rank_scores(table, models)
                        taus.setdefault((post, label, mode, "mean rank"), []).append(tau(mean_rank, exact["mean rank"]))
                        truth_taus.setdefault((post, label, mode), []).append(tau(mean_rank, truth))

        columns = [(label, mode) for label, _ in settings for mode in modes]
        for post in args.post:
            print(f"\nKendall tau-b, DP vs non-DP ranking of the same scorer, post-processing: {post} "
                  f"(mean ±sd over {args.draws} draws; [k]: failures over all draws and models, ranked last)")
            print(f"{'':17s}" + "".join(f"{label + ' ' + mode:>17s}" for label, mode in columns))
            for s in [*scorers, "mean rank"]:
                cells = [summarise(taus[(post, label, mode, s)], fails.get((post, label, mode, s), 0))
                         for label, mode in columns]
                print(f"{s:17s}" + "".join(f"{cell:>17s}" for cell in cells))
            print(f"{'mean rank vs truth':17s}" + "".join(f"{summarise(truth_taus[(post, label, mode)]):>17s}"
                                                          for label, mode in columns))
            for (where, s), why in reasons.items():
                if where == post:
                    print(f"  {s} failed with {why}")
        print(f"\nnon-DP mean-rank ranking vs the zoo's ground truth (linear-probe accuracy): "
              f"{tau(exact['mean rank'], truth):+.2f}")
        print("largest epsilon any site's ledger recorded: " + ", ".join(
            f"{label} {mode} {spent[(label, mode)]:.3f}" for label, e in settings if e is not None for mode in modes))
        elapsed = time.perf_counter() - started
        print(f"\n{elapsed:.0f} s on {platform.machine()} ({os.cpu_count()} CPUs)")
        print(json.dumps({
            "bench": "dp_ranking", "draws": args.draws, "clip": args.clip, "delta": DELTA, "sites": SITES,
            "repeat": args.repeat, "scorers": scorers, "refused": sorted(refused), "models": models,
            "tau": {"|".join(key): [round(float(np.mean(v)), 4), round(float(np.std(v)), 4)] for key, v in taus.items()},
            "failures": {"|".join(key): n for key, n in fails.items() if n},
            "seconds": round(elapsed, 1),
        }))


if __name__ == "__main__":
    main()
