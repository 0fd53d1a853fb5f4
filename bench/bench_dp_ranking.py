"""How well fedmte ranks the demo's candidates under DP, and what each privacy improvement buys.

Every job runs the production path in this process (:func:`fedmte.trial.inprocess.run_job_in_process`):
the coordinator's job driver, the secure sum, and at every site the site agent with its
package checks, policy, clipping, noise, ledger and audit log. The candidates are the demo
zoo (:mod:`fedmte.trial.zoo`, seven small CNNs on scikit-learn's digits) scored with the
demo's scorers; the digits' target rows (each with its eight one-pixel shifts, about 6,800
rows, as in ``fedmte demo``) are dealt at random over ``N`` sites, so the data stay the same
as the sites multiply and only the split changes.

For each epsilon per release (the sites' budget is four releases' worth, as in the default
policy), each number of sites and each configuration, ``--draws`` jobs run with fresh ledgers
and the aggregate ranking is compared with

* the **truth**: the zoo's linear-probe accuracies on held-out digits (weighted Kendall tau,
  ``scipy.stats.weightedtau``, as :mod:`fedmte.protocol.evaluation` computes it), and
* the **DP-off ranking** of the same sites (exact sums; weighted tau against its aggregate).

Configurations (``--configs``): ``all`` is the default of ``fedmte demo`` (distributed noise
over a secure sum whose threshold is every site, budget allocated by block size, uncentred
sums centred at the coordinator, noisy sums cleaned, scorers weighed by how reproducible the
noise leaves their rankings); ``no-distributed``, ``no-allocation``, ``no-centre``,
``no-clean`` and ``no-weigh`` each switch one of those off (full noise at every site; an even split of each
release's budget over its blocks; a centring round first; raw noisy sums; an equal vote per
scorer); ``none`` switches all five off (fedmte before these improvements); ``project``
adds to ``all`` the optional public projection of every candidate's features to
:data:`PROJECT_DIM` dimensions.

Also printed per run: the share of jobs whose recommendation (its first tie group) held the
truth-worst candidate, and how often the top candidate by truth had the highest chance of
being best. Usage::

    python bench/bench_dp_ranking.py [--epsilons 0.5 1 2 4 8] [--sites 3 10 30] [--draws 3]
                                     [--configs all no-distributed no-allocation no-centre no-clean no-weigh none project]

The first run trains the zoo (about a minute) unless ``$FEDMTE_CACHE/zoo`` holds it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedmte.client import site_agent  # noqa: E402
from fedmte.client.site_config import site_file_text  # noqa: E402
from fedmte.protocol.keys import fingerprint, public_key_text, write_private_key  # noqa: E402
from fedmte.protocol.secure_rounds import DeclaredBounds  # noqa: E402
from fedmte.server.job import load_job  # noqa: E402
from fedmte.server.report import Report  # noqa: E402
from fedmte.trial import demo  # noqa: E402
from fedmte.trial.inprocess import run_job_in_process  # noqa: E402
from fedmte.trial.local_sites import provision  # noqa: E402
from fedmte.trial.zoo import DIGIT_LABELS, build_zoo, load_digits_split, pack_zoo  # noqa: E402

SPLIT_SEED = 11
BUDGET_RELEASES = 4.0
"""The budget is this many releases' epsilon, as the default policy (1 per release, 4 in all)."""
IMPROVEMENTS = ("distributed", "allocation", "centre", "clean", "weigh")
CONFIGS = ("all", *(f"no-{name}" for name in IMPROVEMENTS), "none", "project")
PROJECT_DIM = 16
"""The projection ``project`` adds: the demo's candidates have 32 to 64 feature dimensions."""


@dataclass(frozen=True)
class Config:
    """Which of the four improvements a run switches on."""

    name: str
    distributed: bool
    allocation: bool
    centre: bool
    clean: bool
    weigh: bool
    project: bool = False

    @classmethod
    def named(cls, name: str) -> Config:
        if name == "all":
            return cls(name, True, True, True, True, True)
        if name == "none":
            return cls(name, False, False, False, False, False)
        if name == "project":
            return cls(name, True, True, True, True, True, project=True)
        off = name.removeprefix("no-")
        if off not in IMPROVEMENTS:
            raise SystemExit(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
        return cls(name, **{improvement: improvement != off for improvement in IMPROVEMENTS})


class Bench:
    """The zoo packed once, the sites' data and feature caches kept across runs; every run
    gets fresh site homes (keys, audit logs, ledgers), so no ledger or cache of releases
    carries over and every draw is an independent release."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.zoo = build_zoo()
        key_path = root / demo.COORDINATOR_KEY
        self.key = write_private_key(key_path)
        self.key_path = key_path
        manifests = pack_zoo(self.zoo, root / "models", self.key)
        self.architectures = sorted({m.architecture for m in manifests.values()})  # what the sites must allow
        self.models = sorted(entry.name for entry in self.zoo.index.entries)
        self.truth = self.zoo.index.ground_truth()
        self.split = load_digits_split()
        self.runs = 0

    def data_dir(self, sites: int, index: int) -> Path:
        """Site ``index`` of ``sites``: its digits and its feature cache (kept across runs)."""
        home = self.root / "data" / f"{sites}-sites" / f"site-{index}"
        data = home / demo.SITE_DATA_FILE
        if not data.exists():
            rows = self.split.target_train
            order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
            chosen = np.sort(rows[np.array_split(order, sites)[index]])
            labels = np.repeat(self.split.labels[chosen], len(demo.SHIFTS))
            data.parent.mkdir(parents=True, exist_ok=True)
            np.savez(data, inputs=demo.shifted_copies(self.split.images[chosen]),
                     labels=np.array([DIGIT_LABELS[y] for y in labels]))
        return home

    def run(self, sites: int, epsilon: float | None, config: Config) -> Report:
        """One job: fresh site homes over the kept data and caches; returns its report."""
        self.runs += 1
        run_dir = self.root / "runs" / f"run-{self.runs}"
        trust = public_key_text(self.key)
        files: dict[str, Path] = {}
        for index in range(sites):
            name = f"site-{index}"
            home = run_dir / name
            audit_key = write_private_key(home / "keys" / "audit.key")
            document = demo.site_document(name, trust_key=trust, audit_key_sha256=fingerprint(audit_key),
                                          dp=epsilon is not None, scorers=demo.DEMO_SCORERS,
                                          architectures=self.architectures)
            kept = self.data_dir(sites, index)
            document["site"]["cache_dir"] = str(kept / "cache")
            document["data"]["path"] = str(kept / demo.SITE_DATA_FILE)
            if config.project:  # the data owner allows the public projection
                document["policy"]["allowed_transforms"] = sorted({*document["policy"]["allowed_transforms"], "project"})
            if epsilon is not None:
                document["policy"]["dp"].update({
                    "epsilon_per_release": epsilon, "epsilon_budget": BUDGET_RELEASES * epsilon,
                    "distributed": config.distributed, "allocation": "by_scorer" if config.allocation else "even"})
            (home / "site.toml").write_text(site_file_text(document), encoding="utf-8")
            files[name] = home / "site.toml"
        total_rows = len(self.split.target_train) * len(demo.SHIFTS)
        secure = provision(files, self.key_path, bounds=DeclaredBounds(
            max_rows=total_rows, feature_norm=demo.DP_CLIP_NORM if epsilon is not None else demo.SECURE_FEATURE_NORM),
            require_secure_sum=False, threshold=sites)
        text = demo.job_toml(self.models, sites=sites, dp=epsilon is not None, secure=secure)
        text = text.replace("[privacy]\n", f"[privacy]\ncentre = {json.dumps('coordinator' if config.centre else 'sites')}\n"
                                           f"clean = {str(config.clean).lower()}\n"
                                           + (f"project_dim = {PROJECT_DIM}\n" if config.project else "")
                                           if epsilon is not None else "[privacy]\n")
        text = text.replace("[ranking]\n", f"[ranking]\nweigh_by_noise = {str(config.weigh).lower()}\n")
        text = text.replace('path = "models/', f'path = "{self.root / "models"}/')
        text = text.replace(f'coordinator_key = "{demo.COORDINATOR_KEY}"', f'coordinator_key = "{self.key_path}"')
        text = text.replace(f'signing_key = "{demo.COORDINATOR_KEY}"', f'signing_key = "{self.key_path}"')
        job_file = run_dir / "job.toml"
        job_file.write_text(text, encoding="utf-8")
        try:
            return run_job_in_process(load_job(job_file), list(files.values()))
        finally:
            site_agent.close_agents()
            shutil.rmtree(run_dir, ignore_errors=True)


def ranking_scores(report: Report) -> dict[str, float]:
    """The aggregate ranking as scores (higher is better)."""
    sign = 1.0 if report.better == "higher" else -1.0
    return {m.name: sign * m.aggregate for m in report.models if m.aggregate is not None}


def weighted_tau(scores: dict[str, float], reference: dict[str, float]) -> float:
    from fedmte.protocol.evaluation import evaluate_ranking

    common = sorted(set(scores) & set(reference))
    value = evaluate_ranking({m: scores[m] for m in common}, {m: reference[m] for m in common}).weighted_tau
    return float("nan") if value is None else float(value)


def first_group(report: Report) -> list[str]:
    """The candidates the report recommends first: its first tie group (one name when exact)."""
    groups = report.recommendation_groups or [report.recommendation[:1]]
    return list(groups[0]) if groups else []


def most_likely_best(report: Report) -> str | None:
    """The candidate with the highest chance of being best (None without uncertainty)."""
    chances = {m.name: m.uncertainty.p_best for m in report.models if m.uncertainty is not None}
    return max(chances, key=lambda name: chances[name]) if chances else None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 30])
    parser.add_argument("--draws", type=int, default=3, help="independent jobs per cell")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    args = parser.parse_args(argv)
    configs = [Config.named(name) for name in args.configs]
    started = time.perf_counter()
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="fedmte-dp-bench-") as tmp:
        bench = Bench(Path(tmp))
        worst = min(bench.truth, key=bench.truth.get)
        best = max(bench.truth, key=bench.truth.get)
        print(f"{len(bench.models)} candidates, truth-best {best}, truth-worst {worst}; scorers "
              f"{', '.join(demo.DEMO_SCORERS)}; delta {demo.DEFAULT_DELTA:g}; budget {BUDGET_RELEASES:g} releases")
        for sites in args.sites:
            exact = bench.run(sites, None, Config.named("all"))
            exact_scores = ranking_scores(exact)
            print(f"\n{sites} sites, DP off: weighted tau vs truth {weighted_tau(exact_scores, bench.truth):+.2f}")
            print(f"{'config':>13s} {'eps':>5s}  {'tau truth':>14s}  {'tau DP-off':>14s}  {'worst rec.':>10s}  "
                  f"{'best=argmax P':>13s}  {'s/job':>6s}")
            for epsilon in args.epsilons:
                for config in configs:
                    truth_taus, off_taus, worst_hits, best_hits, seconds = [], [], 0, 0, []
                    for _ in range(args.draws):
                        began = time.perf_counter()
                        report = bench.run(sites, epsilon, config)
                        seconds.append(time.perf_counter() - began)
                        scores = ranking_scores(report)
                        truth_taus.append(weighted_tau(scores, bench.truth))
                        off_taus.append(weighted_tau(scores, exact_scores))
                        worst_hits += worst in first_group(report)
                        best_hits += most_likely_best(report) == best
                    row = {"sites": sites, "epsilon": epsilon, "config": config.name,
                           "tau_truth": [round(float(np.nanmean(truth_taus)), 3), round(float(np.nanstd(truth_taus)), 3)],
                           "tau_dp_off": [round(float(np.nanmean(off_taus)), 3), round(float(np.nanstd(off_taus)), 3)],
                           "worst_recommended": worst_hits, "best_most_likely": best_hits, "draws": args.draws,
                           "seconds_per_job": round(float(np.mean(seconds)), 2)}
                    results.append(row)
                    print(f"{config.name:>13s} {epsilon:5g}  {np.nanmean(truth_taus):+6.2f} ±{np.nanstd(truth_taus):4.2f}  "
                          f"{np.nanmean(off_taus):+6.2f} ±{np.nanstd(off_taus):4.2f}  {worst_hits:>5d}/{args.draws:<4d}  "
                          f"{best_hits:>7d}/{args.draws:<5d}  {np.mean(seconds):6.1f}", flush=True)
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s on {platform.machine()} ({os.cpu_count()} CPUs)")
    print(json.dumps({"bench": "dp_ranking", "results": results, "seconds": round(elapsed, 1)}))


if __name__ == "__main__":
    main()
