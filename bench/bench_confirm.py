"""What confirming the top candidates costs next to scoring them (stage 2 against stage 1).

Runs the demo's job in this process (the coordinator's job driver, each site agent and the
secure sum; :func:`fedmte.trial.inprocess.run_job_in_process`) twice per setting: the demo as
it is (7 candidates, the top 3 confirmed) and a 5-candidate job that confirms all 5, each
with exact sums (the Newton probe) and under the default policy (the closed-form LDA head).
For each stage it prints the seconds (setup, rounds and finish, as the report's rounds
record them), the statistics rounds and the bytes per site of those rounds, and the ratio
of stage 2 to stage 1 measured in the same run.

Usage: ``python bench/bench_confirm.py [--json OUT]``. The first run trains the zoo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedmte.client import site_agent  # noqa: E402
from fedmte.server.job import load_job  # noqa: E402
from fedmte.server.report import Report  # noqa: E402
from fedmte.trial import demo  # noqa: E402
from fedmte.trial.inprocess import run_job_in_process  # noqa: E402

CONFIRM_PREFIX = "confirm: "


def stage_costs(report: Report) -> dict[str, dict[str, float]]:
    """Seconds, statistics rounds and bytes per site of each stage, from the report's rounds."""
    out: dict[str, dict[str, float]] = {}
    for info in report.rounds:
        stage = "confirm" if info.name.startswith(CONFIRM_PREFIX) else "score"
        cost = out.setdefault(stage, {"seconds": 0.0, "rounds": 0, "bytes_per_site": 0})
        cost["seconds"] += info.seconds
        cost["rounds"] += 1 if info.kinds else 0
        cost["bytes_per_site"] += info.bytes_per_site if info.kinds else 0
    return out


def run(root: Path, *, dp: bool, models: int | None) -> dict[str, object]:
    """One job; ``models``: keep the first ``models`` candidates and confirm them all."""
    setup = demo.prepare_demo(demo.DemoOptions(out=root, dp=dp, transport="in-process"))
    job = load_job(setup.job_file)
    if models is not None:
        keep = job.candidates[:models]
        confirm = job.confirm.model_copy(update={"top_k": models}) if job.confirm else None
        job = job.model_copy(update={"candidates": keep, "confirm": confirm,
                                     "ranking": job.ranking.model_copy(update={"top_k": models})})
    began = time.perf_counter()
    try:
        report = run_job_in_process(job, setup.site_files)
    finally:
        site_agent.close_agents()
    wall = time.perf_counter() - began
    costs = stage_costs(report)
    return {"dp": dp, "candidates": len(job.candidates), "confirmed": len(report.decision.confirmed) if report.decision else 0,
            "wall_seconds": round(wall, 2), **{f"{stage}_{key}": round(value, 2) for stage, cost in costs.items()
                                               for key, value in cost.items()},
            "decision": report.decision.model if report.decision else None}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedmte-confirm-bench-") as tmp:
        for dp in (False, True):
            for models in (None, 5):
                results.append(run(Path(tmp) / f"{'dp' if dp else 'exact'}-{models or 'demo'}", dp=dp, models=models))
    print(f"{'job':>18s} {'stage':>8s} {'seconds':>8s} {'rounds':>7s} {'bytes/site':>11s}")
    for row in results:
        name = f"{'DP' if row['dp'] else 'exact'}, {row['candidates']} -> {row['confirmed']}"
        for stage in ("score", "confirm"):
            print(f"{name:>18s} {stage:>8s} {row.get(f'{stage}_seconds', 0):8.2f} {int(row.get(f'{stage}_rounds', 0)):7d} "
                  f"{int(row.get(f'{stage}_bytes_per_site', 0)):11,d}")
        ratio = row.get("confirm_seconds", 0) / max(float(row.get("score_seconds", 0)), 1e-9)  # type: ignore[arg-type]
        print(f"{'':>18s} {'ratio':>8s} {ratio:8.2f}  (stage 2 / stage 1, same run; chosen {row['decision']})")
    print(f"{platform.machine()} ({os.cpu_count()} CPUs), load {os.getloadavg()[0]:.1f}")
    print(json.dumps({"bench": "confirm", "results": results}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
