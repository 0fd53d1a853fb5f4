"""End to end: a multi-model scoring job over Flower against ``fedmte.score`` on pooled features.

Starts a loopback federation of ``--sites`` site runners whose site files hold ``--n`` rows of
``--dim``-wide vectors in ``--classes`` classes (split unevenly; DP off, so the scores are
exact), packs ``--models`` MLP candidates of different widths with source heads, and runs
one job with ``--scorers`` (:func:`fedmte.server.coordinator.run_job`). Then, on one machine
and without a federation, the same work the usual way: each model's features of the pooled
rows (:func:`fedmte.client.extract.extract`, one pass) and ``fedmte.score`` on them.

Printed: the job's wall time from ``run_job`` to the report and the ServerApp's share of it,
the round trips (setup, statistics rounds, finish) and seconds per statistics round; the
pooled pipeline's extraction and scoring times; their ratios; and the largest relative
difference between the federated and the pooled scores. The machine's load average is
printed too: other processes share the cores, and the numbers move with them.

Usage: ``python bench/bench_job.py [--sites 3] [--models 5] [--n 30000] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import fedmte  # noqa: E402
from fedmte.client.architectures import load_model  # noqa: E402
from fedmte.client.cache import FeatureCache  # noqa: E402
from fedmte.client.data import open_site_data  # noqa: E402
from fedmte.client.extract import ExtractionSettings, extract  # noqa: E402
from fedmte.client.site_config import load_site_config  # noqa: E402
from fedmte.protocol.catalogue import softmax  # noqa: E402
from fedmte.server.coordinator import load_coordinator_key, run_job  # noqa: E402
from fedmte.server.job import job_from_dict  # noqa: E402
from fedmte.server.job_runner import JobReport  # noqa: E402
from fedmte.trial.local_federation import down, up  # noqa: E402
from fedmte.trial.local_sites import demo_site_inputs, example_packages, write_site  # noqa: E402

WIDTHS = ([256], [512, 256], [128, 128], [384], [192, 96], [320], [64, 64])
SCORERS = ["hscore", "leep", "gbc", "logme", "nce", "sfda"]


def models(count: int, source_classes: int) -> dict[str, dict[str, object]]:
    return {f"mlp-{k}": {"hidden_dims": WIDTHS[k % len(WIDTHS)], "activation": "gelu",
                         "num_source_classes": source_classes, "seed": 100 + k} for k in range(count)}


def pooled_pipeline(arrays: list[dict[str, np.ndarray]], labels: list[str], packages: dict[str, Path], key_path: Path,
                    scorers: list[str], workdir: Path) -> tuple[dict[str, dict[str, float]], float, float]:
    """Features of the pooled rows (one pass per model) and fedmte.score on them; (scores, extract s, score s)."""
    pooled = {name: np.concatenate([a[name] for a in arrays]) for name in ("inputs", "labels")}
    site_file = write_site(workdir / "pooled", "pooled", pooled, labels, coordinator=load_coordinator_key(key_path), dp=False)
    config = load_site_config(site_file)
    data = open_site_data(config.data, labels)
    settings = ExtractionSettings.from_compute(config.compute, progress=False)
    scores: dict[str, dict[str, float]] = {}
    extract_s = score_s = 0.0
    for name, path in packages.items():
        model = load_model(path, config.trust.keys, config.limits)
        start = time.perf_counter()
        result = extract(model, data, cache=FeatureCache(workdir / "pooled-cache"), settings=settings)
        assert result.entry is not None
        features = np.asarray(result.entry.features(), dtype=np.float64)
        y = np.asarray(result.entry.labels())
        logits = result.entry.logits()
        probs = None if logits is None else softmax(np.asarray(logits, dtype=np.float64))
        extract_s += time.perf_counter() - start
        start = time.perf_counter()
        scores[name] = fedmte.score(features, y, source_probs=probs, scorers=scorers)
        score_s += time.perf_counter() - start
    return scores, extract_s, score_s


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--n", type=int, default=30_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--source-classes", type=int, default=50)
    parser.add_argument("--scorers", default=",".join(SCORERS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    scorers = args.scorers.split(",")
    with tempfile.TemporaryDirectory(prefix="fedmte-bench-job-") as tmp:
        workdir = Path(tmp)
        arrays = demo_site_inputs(args.sites, n=args.n, dim=args.dim, classes=args.classes, seed=7)
        files = []
        for k, part in enumerate(arrays):
            files.append(workdir / f"site{k}.npz")
            np.savez(files[-1], **part)
        start = time.perf_counter()
        state = up(workdir / "federation", args.sites, data=files, dp=False)
        startup = time.perf_counter() - start
        try:
            assert state.coordinator_key is not None
            key_path = Path(state.coordinator_key)
            packages = example_packages(workdir / "models", load_coordinator_key(key_path), args.dim,
                                        models(args.models, args.source_classes))
            job = job_from_dict({
                "connection": state.connection, "output": str(workdir / "report"), "labels": state.labels,
                "candidates": [str(p) for p in packages.values()], "scorers": scorers,
                "federation": {"flwr_home": state.flwr_home, "coordinator_key": str(key_path),
                               "min_sites": args.sites, "round_timeout": 600, "run_timeout": 1800},
            })
            start = time.perf_counter()
            report = run_job(job)
            wall = time.perf_counter() - start
            status = JobReport.model_validate_json((workdir / "report" / "run.json").read_text())
        finally:
            down(Path(state.directory))
        pooled, extract_s, score_s = pooled_pipeline(arrays, state.labels, packages, key_path, scorers, workdir)
    worst = 0.0
    for model in report.models:
        for scorer, value in model.scores.items():
            ref = pooled[model.name][scorer]
            worst = max(worst, abs(value - ref) / max(abs(ref), 1e-300))
    stats = [r for r in status.rounds if r.kinds]
    result = {
        "sites": args.sites, "models": args.models, "n": args.n, "dim": args.dim, "classes": args.classes,
        "scorers": scorers, "federation_start_s": round(startup, 2), "job_wall_s": round(wall, 2),
        "serverapp_s": round(status.total_seconds, 2),
        "round_trips": [{"name": r.name, "seconds": round(r.seconds, 3), "bytes_per_site": r.bytes_per_site}
                        for r in status.rounds],
        "statistics_rounds": len(stats), "seconds_per_statistics_round": round(sum(r.seconds for r in stats) / len(stats), 3),
        "pooled_extract_s": round(extract_s, 2), "pooled_score_s": round(score_s, 2),
        "ratio_job_to_pooled_score": round(wall / score_s, 1),
        "ratio_job_to_pooled_extract_and_score": round(wall / (extract_s + score_s), 1),
        "max_relative_difference": worst, "load_average": os.getloadavg(),
    }
    print(f"{args.sites} sites x {args.models} models, n={args.n:,}, d_in={args.dim}, C={args.classes}, "
          f"scorers {', '.join(scorers)}")
    print("round trips: " + ", ".join(f"{r['name']} {r['seconds']:.2f} s" for r in result["round_trips"]))
    print(f"job over Flower: {wall:.1f} s end to end ({status.total_seconds:.1f} s inside the ServerApp); "
          f"{len(stats)} statistics rounds at {result['seconds_per_statistics_round']:.2f} s")
    print(f"pooled, one machine: extraction {extract_s:.2f} s + fedmte.score {score_s:.2f} s")
    print(f"ratios: job / fedmte.score {result['ratio_job_to_pooled_score']}x, "
          f"job / (extraction + fedmte.score) {result['ratio_job_to_pooled_extract_and_score']}x; "
          f"largest relative score difference {worst:.1e}; load {result['load_average'][0]:.1f}")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
        args.json.write_text(json.dumps({"commit": commit, "machine": platform.platform(), "cpus": os.cpu_count(),
                                         "result": result}, indent=2))


if __name__ == "__main__":
    main()
