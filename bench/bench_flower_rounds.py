"""Seconds per round trip over real Flower processes on loopback, site runner against stock.

Starts a loopback federation (``fedmte.trial.local_federation.up``: a SuperLink with TLS and
node authentication, N SuperNodes, each a site agent whose site file holds precomputed
features, ``[data] kind = "features"``, DP off), runs one scoring job (a
:class:`~fedmte.server.job.JobSpec` with the sites' features as its one ``site_features``
candidate) whose plan takes ``--rounds`` statistics rounds (a setup round comes first, a
finish round last), stops the federation, and repeats for each runner kind. Printed per kind: seconds per round trip as the ServerApp measured it (mean of
the statistics rounds, and the setup round alone, which includes each site's first look at
the bundle), the job's wall time from ``flwr run`` to the report, and the machine's load.

"site" is fedmte's site runner (``--isolation process``, one process per site, shortened
polls); "stock" is a plain ``flower-supernode`` (a new ClientApp process per message, 3 s
idle polls). The numbers depend on the machine's load: other processes share the cores.

Usage: ``python bench/bench_flower_rounds.py [--sites 3] [--runners site,stock] [--json OUT]``.
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

from fedmte.server.coordinator import launch  # noqa: E402
from fedmte.server.job import job_from_dict  # noqa: E402
from fedmte.trial.local_federation import demo_site_data, down, up  # noqa: E402

# scorer sets by number of statistics rounds (centring round included)
PLANS = {1: ["nce", "logme"], 2: ["hscore", "gbc"], 3: ["hscore", "leep", "gbc"], 4: ["sfda", "leep", "hscore"]}


def bench(runner: str, sites: int, rounds: int, workdir: Path) -> dict[str, object]:
    import numpy as np

    data = []
    for k, arrays in enumerate(demo_site_data(sites, n=3000, dim=64, classes=10)):
        path = workdir / f"{runner}-site{k}.npz"
        np.savez(path, **arrays)
        data.append(path)
    start = time.perf_counter()
    state = up(workdir / runner, sites, data=data, runner=runner, dp=False)  # type: ignore[arg-type]
    startup = time.perf_counter() - start
    try:
        job = job_from_dict({
            "connection": state.connection, "output": str(workdir / f"{runner}-report"), "labels": list(state.labels),
            "purpose": "bench: seconds per round trip", "candidates": [{"name": "site-features", "site_features": True}],
            "scorers": PLANS[rounds], "privacy": {"dp": False},
            "federation": {"flwr_home": state.flwr_home, "coordinator_key": state.coordinator_key,
                           "min_sites": sites, "run_timeout": 900},
        })
        start = time.perf_counter()
        status = launch(job)
        wall = time.perf_counter() - start
    finally:
        down(Path(state.directory))
    stats = [r.seconds for r in status.rounds if r.kinds]
    setup = next(r for r in status.rounds if r.name == "setup")
    return {
        "runner": runner, "sites": sites, "rounds": len(stats), "startup_s": round(startup, 2),
        "setup_round_s": round(setup.seconds, 3),
        "seconds_per_round_trip": round(sum(stats) / len(stats), 3),
        "round_trips_s": [round(s, 3) for s in stats], "job_wall_s": round(wall, 2),
        "load_average": os.getloadavg(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, choices=sorted(PLANS), default=4)
    parser.add_argument("--runners", default="site,stock")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedmte-bench-") as tmp:
        for runner in args.runners.split(","):
            result = bench(runner, args.sites, args.rounds, Path(tmp))
            results.append(result)
            print(f"{runner:>5}: {result['seconds_per_round_trip']:.2f} s per round trip over {result['rounds']} "
                  f"rounds (setup round {result['setup_round_s']:.2f} s), job {result['job_wall_s']:.1f} s, "
                  f"federation start {result['startup_s']:.1f} s, load {result['load_average'][0]:.1f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    record = {"commit": commit, "machine": platform.platform(), "cpus": os.cpu_count(), "results": results}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
