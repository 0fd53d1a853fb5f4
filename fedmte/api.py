"""The Python API: score local features with the federated protocol, in process."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmte.protocol.inputs import check_inputs, check_sites
from fedmte.protocol.local import DEFAULT_BATCH_SIZE, run_in_memory
from fedmte.protocol.plan import ScoringResult, make_plan


def score_detailed(
    features: np.ndarray | None,
    labels: np.ndarray,
    *,
    source_probs: np.ndarray | None = None,
    scorers: Sequence[str] | None = None,
    sites: int | Sequence[Sequence[int]] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    offset: np.ndarray | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ScoringResult:
    """Like :func:`score`, but also returns the per-round traffic."""
    inputs = check_inputs(features, labels, source_probs)
    rows = check_sites(sites, inputs.n)
    plan = make_plan(
        scorers,
        has_features=inputs.features is not None,
        has_source_probs=inputs.source_probs is not None,
        public_offset=offset is not None,
        options=options,
    )
    return run_in_memory(plan, inputs, rows, batch_size=batch_size, offset=offset)


def score(
    features: np.ndarray | None,
    labels: np.ndarray,
    *,
    source_probs: np.ndarray | None = None,
    scorers: Sequence[str] | None = None,
    sites: int | Sequence[Sequence[int]] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    offset: np.ndarray | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, float]:
    """Transferability scores of one model's features, computed by the federated protocol.

    Parameters
    ----------
    features : (n, d) array or None
        The model's features of the labelled target rows.
    labels : (n,) int array
        Target classes 0..C-1 (C = max + 1, as in the reference implementations).
    source_probs : (n, Cs) array, optional
        The source head's class probabilities; enables nce, leep and the other
        source-probability scorers.
    scorers : list of str, optional
        Names from ``fedmte.SCORERS``; ``None`` means every federable, non-iterative scorer
        the inputs allow.
    sites : int or list of index arrays, optional
        Split the rows into that many uneven sites, or use the given row sets. The scores do
        not depend on the split (up to rounding); this knob exists to show it.
    options : dict, optional
        Per-scorer options, e.g. ``{"gbc": {"gaussian_type": "diagonal"}}``.
    offset : (d,) array, optional
        A public offset agreed beforehand; without one, centred scorers spend one extra round
        to agree on the pooled mean.
    batch_size : int
        Rows per streamed batch; does not change the result.

    Returns
    -------
    dict mapping scorer name to score (higher means better expected transfer).
    """
    return score_detailed(
        features,
        labels,
        source_probs=source_probs,
        scorers=scorers,
        sites=sites,
        options=options,
        offset=offset,
        batch_size=batch_size,
    ).scores
