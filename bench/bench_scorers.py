"""Scoring from statistics against the direct centralised formula, at production size.

For each scorer this prints, measured in the same run on the same data:
- ``direct s``: the reference implementation on the full pooled feature matrix
  (the independent transcriptions in ``tests/refs``);
- ``stats s``: the coordinator's work from the summed statistics (all rounds);
- ``ratio``: direct / stats (how many times faster scoring from statistics is);
- ``bytes``: what one site sends for that scorer over all its rounds.
The site's one streaming pass that computes the statistics is reported separately, since
it is shared by all scorers of a round.

Usage: ``python bench/bench_scorers.py [--n 100000] [--d 1024] [--classes 100]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedmte.protocol.inputs import check_inputs  # noqa: E402
from fedmte.protocol.local import InMemorySite  # noqa: E402
from fedmte.protocol.plan import execute, make_plan  # noqa: E402
from fedmte.protocol.requests import Stat  # noqa: E402
from fedmte.protocol.scorers import SCORERS  # noqa: E402
from fedmte.protocol.statistics import Statistics  # noqa: E402
from tests.refs import REFERENCES  # noqa: E402


def synthetic(n: int, d: int, classes: int, source_classes: int, rank: int, seed: int = 0):
    """Class-structured features of low intrinsic rank plus noise, and a source head."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    basis = rng.normal(size=(rank, d)) / np.sqrt(rank)
    centres = rng.normal(size=(classes, rank)) * 1.5
    latent = centres[labels] + rng.normal(size=(n, rank))
    features = latent @ basis + 0.1 * rng.normal(size=(n, d)) + 3.0
    logits = rng.normal(size=(n, source_classes)).astype(np.float64)
    logits[np.arange(n), labels % source_classes] += 3.0
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return features, labels, probs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--source-classes", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=32, help="intrinsic rank of the synthetic features")
    parser.add_argument("--scorers", default=",".join(SCORERS))
    args = parser.parse_args(argv)
    names = [s for s in args.scorers.split(",") if s]

    features, labels, probs = synthetic(args.n, args.d, args.classes, args.source_classes, args.rank)
    inputs = check_inputs(features, labels, probs)
    site = InMemorySite(inputs, np.arange(inputs.n))
    print(f"n={args.n:,} d={args.d} C={args.classes} Cs={args.source_classes}")
    print(f"{'scorer':<18}{'rounds':>7}{'site pass s':>13}{'stats s':>10}{'direct s':>10}{'ratio':>9}{'bytes/site':>14}{'rel. diff':>11}")
    for name in names:
        cache: dict[str, np.ndarray] = {}
        site_seconds = 0.0

        def aggregate(requests: Sequence[Stat]) -> Statistics:
            nonlocal site_seconds
            missing = [r for r in requests if r.key not in cache]
            if missing:
                start = time.perf_counter()
                cache.update(site.compute(missing))
                site_seconds += time.perf_counter() - start
            return Statistics({r.key: cache[r.key] for r in requests})

        plan = make_plan([name], has_features=True, has_source_probs=True)
        run = lambda: execute(plan, aggregate, dim=inputs.dim, num_classes=inputs.num_classes,
                              num_source_classes=inputs.num_source_classes)
        first = run()  # fills the statistics cache: the sites' work
        start = time.perf_counter()
        result = run()  # the coordinator's work alone, from cached sums
        stats_seconds = time.perf_counter() - start
        start = time.perf_counter()
        direct = REFERENCES[name](features.copy(), labels.copy(), probs.copy())
        direct_seconds = time.perf_counter() - start
        value = result.scores[name]
        assert value == first.scores[name]
        print(
            f"{name:<18}{len(result.rounds):>7}{site_seconds:>13.2f}{stats_seconds:>10.3f}{direct_seconds:>10.2f}"
            f"{direct_seconds / stats_seconds:>9.1f}{result.bytes_sent_per_site:>14,}{abs(value - direct) / max(abs(direct), 1e-300):>11.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
