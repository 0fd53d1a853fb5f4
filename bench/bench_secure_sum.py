"""Secure-sum overhead against a plain sum, for the statistics of a d = 2048 model.

Measures, with 3 in-process sites (threshold 2) and C = 10 classes, the blocks a
Gram-based phase sends: ``gram`` (d(d+1)/2 packed upper triangle), ``class_sums`` (C, d),
``sum`` (d,), ``class_counts`` (C,) int64 and ``count`` int64, about 2.1 M entries.

* plain: ``a + b + c`` of the three :class:`Statistics` (what the coordinator does with no
  secure sum).
* secure: every party's compute for one phase, run one after the other here: each site's
  ``mask`` (encode + PRG masks), the coordinator's ``add_upload`` x 3, ``unmask_request``,
  each site's ``reveal``, and ``finish`` (Shamir recovery, self-mask removal, decode).
  "critical path" counts the sites' masking once, as they run in parallel in a deployment.
* also: the one-time key setup, the phase with one site dropped, and the one-round mode
  (``self_masks=False``).

Each figure is the fastest of ``--repeats`` runs (the machine is shared; the minimum is the
compute cost) (one fresh job per run, since a phase is
masked once). Network time is not included: see the Flower benches. Prints a table and a
JSON line with the sizes, the machine and the figures.

Usage: ``python bench/bench_secure_sum.py [--d 2048] [--classes 10] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from fractions import Fraction

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmte.protocol.fixed_point import FixedPointCodec, SumSpec
from fedmte.protocol.secure_sum import CoordinatorSecureSum, SecureSumParams, SiteSecureSum
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.symmetric import pack

SITES = ("site-a", "site-b", "site-c")
CLIP = 1.0  # per-row feature norm bound, as the privacy pipeline enforces
N_MAX = 1_000_000  # public cap on a site's rows


def site_statistics(rng: np.random.Generator, d: int, classes: int, rows: int) -> Statistics:
    """Statistics of ``rows`` clipped random features, shaped as a scorer round asks."""
    x = rng.normal(size=(rows, d))
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True) / CLIP, 1.0)
    onehot = np.eye(classes)[rng.integers(0, classes, size=rows)]
    return Statistics({
        "gram": pack(x.T @ x),
        "class_sums": onehot.T @ x,
        "sum": x.sum(axis=0),
        "class_counts": onehot.sum(axis=0).astype(np.int64),
        "count": np.asarray(rows, dtype=np.int64),
    })


def public_spec(example: Statistics) -> SumSpec:
    """Bounds from the public clip norm and row cap: |F^T F|_ij <= n C^2, |sums| <= n C."""
    bounds = {"gram": N_MAX * CLIP**2, "class_sums": N_MAX * CLIP, "sum": N_MAX * CLIP,
              "class_counts": N_MAX, "count": N_MAX}
    return SumSpec.for_statistics(example, bounds)


def make_job(self_masks: bool, keys: dict[str, Ed25519PrivateKey]) -> tuple[dict[str, SiteSecureSum],
                                                                              CoordinatorSecureSum, float]:
    known = {name: key.public_key() for name, key in keys.items()}
    params = SecureSumParams(job_id=f"bench-{time.perf_counter_ns()}", sites=SITES, threshold=2, phases=1,
                             self_masks=self_masks)
    start = time.perf_counter()
    sites = {n: SiteSecureSum(params, site_id=n, identity_key=keys[n], known_sites=known) for n in SITES}
    coordinator = CoordinatorSecureSum(params, known_sites=known)
    relayed = coordinator.collect_advertisements([s.advertise() for s in sites.values()])
    routed = coordinator.route_shares([b for s in sites.values() for b in s.share(relayed)])
    for name, site in sites.items():
        site.receive_shares(routed[name])
    return sites, coordinator, time.perf_counter() - start


def secure_phase(sites: dict[str, SiteSecureSum], coordinator: CoordinatorSecureSum, spec: SumSpec,
                 data: dict[str, Statistics], drop: tuple[str, ...] = ()) -> tuple[Statistics, dict[str, float]]:
    timings: dict[str, float] = {}
    coordinator.open_phase(0, spec)
    uploads = []
    site_times = []
    for name in SITES:
        if name in drop:
            continue
        start = time.perf_counter()
        uploads.append(sites[name].mask(data[name], phase=0, spec=spec))
        site_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    for upload in uploads:
        coordinator.add_upload(upload)
    request = coordinator.unmask_request(0)
    timings["coordinator_sum"] = time.perf_counter() - start
    reveals = []
    start = time.perf_counter()
    if request is not None:
        reveals = [sites[name].reveal(request) for name in request.active]
    timings["reveal"] = time.perf_counter() - start
    start = time.perf_counter()
    result = coordinator.finish(0, reveals)
    timings["coordinator_finish"] = time.perf_counter() - start
    timings["site_mask_max"] = max(site_times)
    timings["total"] = sum(site_times) + timings["coordinator_sum"] + timings["reveal"] + timings["coordinator_finish"]
    timings["critical_path"] = max(site_times) + timings["coordinator_sum"] + timings["reveal"] / len(reveals or [1]) \
        + timings["coordinator_finish"]
    return result, timings


def max_relative_error(result: np.ndarray, parts: list[np.ndarray], rng: np.random.Generator, sample: int) -> float:
    """Largest |decoded - exact| / |exact| over a sample of entries, the exact sum in rationals."""
    flat = result.reshape(-1)
    index = rng.choice(flat.size, size=min(sample, flat.size), replace=False)
    worst = 0.0
    for i in index:
        exact = sum((Fraction(float(p.reshape(-1)[i])) for p in parts), Fraction(0))
        if exact != 0:
            worst = max(worst, float(abs(Fraction(float(flat[i])) - exact) / abs(exact)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rows", type=int, default=512, help="rows per site used to make the statistics")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    data = {name: site_statistics(rng, args.d, args.classes, args.rows) for name in SITES}
    spec = public_spec(data[SITES[0]])
    entries = FixedPointCodec(spec, max_sites=len(SITES)).size
    keys = {name: Ed25519PrivateKey.generate() for name in SITES}

    modes = (("secure", True, ()), ("secure, 1 of 3 dropped", True, (SITES[1],)), ("one-round mode", False, ()))
    plain_times: list[float] = []
    setup_times: list[float] = []
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in modes}
    result = plain = None
    for _ in range(args.repeats):  # interleaved, so that plain and secure see the same machine load
        for _ in range(3):
            start = time.perf_counter()
            plain = data[SITES[0]] + data[SITES[1]] + data[SITES[2]]
            plain_times.append(time.perf_counter() - start)
        for label, self_masks, drop in modes:
            sites, coordinator, setup = make_job(self_masks, keys)
            setup_times.append(setup)
            out, timings = secure_phase(sites, coordinator, spec, data, drop)
            runs[label].append(timings)
            if label == "secure":
                result = out
    plain_time = min(plain_times)
    figures = {label: {key: min(run[key] for run in found) for key in found[0]} for label, found in runs.items()}

    assert result is not None and plain is not None
    parts = [data[name] for name in SITES]
    errors = {key: max_relative_error(result[key], [p[key] for p in parts], rng, 2000)
              for key in ("gram", "class_sums", "sum")}
    plain_errors = {key: max_relative_error(plain[key], [p[key] for p in parts], rng, 2000)
                    for key in ("gram", "class_sums", "sum")}
    exact_ints = all(np.array_equal(result[k], plain[k]) for k in ("class_counts", "count"))

    print(f"d = {args.d}, C = {args.classes}, 3 sites, {entries:,} entries "
          f"({entries * 8 / 2**20:.1f} MiB float64, {entries * 8 * spec.limbs / 2**20:.1f} MiB masked upload)")
    print(f"plain sum of 3 sites: {plain_time * 1e3:8.1f} ms")
    for label, f in figures.items():
        print(f"{label:>24}: total {f['total'] * 1e3:8.1f} ms (mask/site {f['site_mask_max'] * 1e3:.0f} ms, "
              f"coordinator {1e3 * (f['coordinator_sum'] + f['coordinator_finish']):.0f} ms) "
              f"-> {f['total'] / plain_time:5.1f}x plain; critical path {f['critical_path'] * 1e3:.0f} ms "
              f"-> {f['critical_path'] / plain_time:5.1f}x")
    print(f"key setup (once per job, 3 sites, all parties): {min(setup_times) * 1e3:.1f} ms")
    print(f"max relative error vs the exact sum (2000 sampled entries): secure {errors}, plain float {plain_errors}; "
          f"int64 blocks exact: {exact_ints}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    print(json.dumps({
        "bench": "secure_sum", "commit": commit, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "d": args.d, "classes": args.classes, "sites": len(SITES), "entries": entries,
        "plain_s": plain_time, "setup_s": min(setup_times),
        "runs": {label: {k: round(v, 6) for k, v in f.items()} for label, f in figures.items()},
        "ratio_total": figures["secure"]["total"] / plain_time,
        "ratio_critical_path": figures["secure"]["critical_path"] / plain_time,
        "max_relative_error": errors, "plain_max_relative_error": plain_errors, "int_exact": exact_ints,
    }))


if __name__ == "__main__":
    main()
