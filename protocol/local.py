"""The scoring protocol run with in-memory sites: what ``fedmte.score`` does.

Each site streams its rows in batches through :func:`~fedmte.protocol.catalogue.accumulate`
exactly as a real site agent does; the "transport" simply adds the sites' statistics. So a
1-site run, an N-site run and the federation all execute the same plan.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fedmte.protocol.catalogue import Batch, accumulate
from fedmte.protocol.inputs import ScoringInputs
from fedmte.protocol.plan import ScoringPlan, ScoringResult, execute
from fedmte.protocol.requests import Stat
from fedmte.protocol.statistics import Statistics

DEFAULT_BATCH_SIZE = 4096


@dataclass(frozen=True)
class InMemorySite:
    """One site's rows of the pooled inputs; each row's id (for the held-back split) is its
    index in the pooled inputs."""

    inputs: ScoringInputs
    rows: np.ndarray
    batch_size: int = DEFAULT_BATCH_SIZE

    def batches(self) -> Iterator[Batch]:
        for start in range(0, len(self.rows), self.batch_size):
            idx = self.rows[start : start + self.batch_size]
            yield Batch(
                features=None if self.inputs.features is None else self.inputs.features[idx],
                labels=self.inputs.labels[idx],
                num_classes=self.inputs.num_classes,
                source_probs=None if self.inputs.source_probs is None else self.inputs.source_probs[idx],
                row_ids=np.asarray(idx, dtype=np.int64),
            )

    def compute(self, requests: Sequence[Stat]) -> Statistics:
        return accumulate(requests, self.batches())


def run_in_memory(
    plan: ScoringPlan,
    inputs: ScoringInputs,
    sites: Sequence[np.ndarray],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    offset: np.ndarray | None = None,
) -> ScoringResult:
    """Execute ``plan`` over in-memory sites holding ``inputs[rows]`` for each row set."""
    members = [InMemorySite(inputs, rows, batch_size) for rows in sites]

    def aggregate(requests: Sequence[Stat]) -> Statistics:
        total = Statistics.empty()
        for site in members:
            total = total + site.compute(requests)
        return total

    return execute(
        plan,
        aggregate,
        dim=inputs.dim,
        num_classes=inputs.num_classes,
        num_source_classes=inputs.num_source_classes,
        offset=offset,
    )
