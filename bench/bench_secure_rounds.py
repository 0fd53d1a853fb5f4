"""Secure sum against plain sum over real Flower processes on loopback, 3 sites.

Starts one loopback federation (``fedmte.trial.local_federation.up``: a SuperLink with TLS
and node authentication, fedmte site runners) whose sites are site agents holding
``--d``-wide precomputed features (``[data] kind = "features"`` in each site file, DP off),
provisions every site file's ``[secure]`` table (identity key, roster, bounds) so that it
still allows plain jobs (both run on the same federation), and runs each job below (a
:class:`~fedmte.server.job.JobSpec` scoring the sites' features as its one
``site_features`` candidate) once per ``--repeats``:

* ``small``: scorers whose statistics are a few hundred numbers (``nce``, ``leep``: counts and
  source-probability sums), so a round trip is mostly latency;
* ``d``: ``hscore``, whose Gram round carries d(d+1)/2 entries per site (about 2.1 M for
  d = 2048), so a round trip is mostly the statistics' bytes and the masking.

Each job runs plain, secure with self masks (the default: upload + reveal per phase) and
secure in the one-round mode (``self_masks = false``: upload only). Printed per job: seconds
per statistics round as the ServerApp measured it (mean over the job's rounds; a secure
round is its upload and, with self masks, its reveal), the seconds of the ServerApp's run
outside the job's own rounds (``run.json``'s total less its setup, statistics and finish
rounds: the secure setup's two round trips, once per job, and the job's loading; the run
status does not time the secure steps one by one), the job's wall time from ``flwr run`` to
the report, and the ratios to plain. The machine is shared: the load average is printed
with the figures.

Usage: ``python bench/bench_secure_rounds.py [--d 2048] [--rows 300] [--repeats 2] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from fedmte.protocol.secure_rounds import DeclaredBounds
from fedmte.server.coordinator import launch
from fedmte.server.job import job_from_dict
from fedmte.server.report import RunStatus
from fedmte.trial.local_federation import demo_site_data, down, up
from fedmte.trial.local_sites import provision

SITES = 3
CLASSES = 10
JOBS = {"small": ["nce", "leep"], "d": ["hscore"]}
MODES = ("plain", "secure", "secure-one-round")


def run_job(state: Any, spec: Any, scorers: list[str], mode: str, out: Path) -> tuple[RunStatus, float]:
    document: dict[str, Any] = {
        "connection": state.connection, "output": str(out), "labels": list(state.labels),
        "purpose": f"bench: {mode} sum", "candidates": [{"name": "site-features", "site_features": True}],
        "scorers": scorers, "privacy": {"dp": False},
        "federation": {"flwr_home": state.flwr_home, "coordinator_key": state.coordinator_key,
                       "min_sites": SITES, "run_timeout": 1200, "round_timeout": 600},
    }
    if mode != "plain":
        document["secure"] = spec.model_copy(update={"self_masks": mode == "secure"}).model_dump(mode="json")
    start = time.perf_counter()
    status = launch(job_from_dict(document))
    return status, time.perf_counter() - start


def summarise(reports: Sequence[tuple[RunStatus, float]]) -> dict[str, Any]:
    per_round = [r.seconds_per_round_trip or 0.0 for r, _ in reports]
    outside = [(r.total_seconds or 0.0) - sum(x.seconds for x in r.rounds) for r, _ in reports]
    return {
        "rounds": reports[0][0].planned_rounds,
        "seconds_per_round": round(statistics.mean(per_round), 3),
        "seconds_per_round_all": [round(x, 3) for x in per_round],
        "outside_rounds_s": round(statistics.mean(outside), 3),
        "job_wall_s": round(statistics.mean(wall for _, wall in reports), 2),
        "bytes_per_site_per_round": max((r.bytes_per_site for r in reports[0][0].rounds if r.kinds), default=0),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=300, help="rows per site")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedmte-bench-secure-") as tmp:
        root = Path(tmp)
        data = []
        for k, arrays in enumerate(demo_site_data(SITES, n=args.rows * SITES, dim=args.d, classes=CLASSES)):
            path = root / f"site{k}.npz"
            np.savez(path, **arrays)
            data.append(path)
        norm = max(float(np.max(np.linalg.norm(np.load(p)["features"], axis=1))) for p in data)
        start = time.perf_counter()
        state = up(root / "federation", SITES, data=data, runner="site", dp=False)
        startup = time.perf_counter() - start
        try:
            spec = provision({site.name: Path(site.site_file) for site in state.sites}, Path(state.coordinator_key),
                             bounds=DeclaredBounds(max_rows=10**6, feature_norm=2 * norm), require_secure_sum=False,
                             require_self_masks=False)  # the sites opt in to the one-round mode it also times
            for job_name, scorers in JOBS.items():
                for mode in MODES:
                    reports = [run_job(state, spec, scorers, mode, root / f"{job_name}-{mode}-{i}")
                               for i in range(args.repeats)]
                    results[f"{job_name}/{mode}"] = summarise(reports)
                    figures = results[f"{job_name}/{mode}"]
                    print(f"{job_name:>5} {mode:>16}: {figures['seconds_per_round']:.3f} s per round over "
                          f"{figures['rounds']} round(s), {figures['outside_rounds_s']:.3f} s outside the rounds"
                          + (" (secure setup included)" if mode != "plain" else "")
                          + f", job {figures['job_wall_s']:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            down(Path(state.directory))
    print(f"\nloopback federation of {SITES} site runners (TLS, node auth) started in {startup:.1f} s; "
          f"d = {args.d}, {args.rows} rows per site, {CLASSES} classes")
    for job_name in JOBS:
        plain = results[f"{job_name}/plain"]
        for mode in MODES[1:]:
            figures = results[f"{job_name}/{mode}"]
            ratio = figures["seconds_per_round"] / plain["seconds_per_round"]
            wall = figures["job_wall_s"] / plain["job_wall_s"]
            print(f"{job_name:>5}: {mode} / plain = {ratio:.2f}x per round ({figures['seconds_per_round']:.3f} vs "
                  f"{plain['seconds_per_round']:.3f} s), {wall:.2f}x per job including the setup")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    record = {"commit": commit, "machine": platform.platform(), "cpus": os.cpu_count(), "d": args.d,
              "rows_per_site": args.rows, "sites": SITES, "startup_s": round(startup, 2), "results": results}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
