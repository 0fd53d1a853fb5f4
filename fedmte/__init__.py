"""fedmte: privacy-preserving federated model transferability estimation.

``fedmte.score`` runs the federated scoring protocol in process; ``fedmte.evaluate_ranking``
judges a scorer's ranking of models against measured ground truth; ``fedmte.protocol``,
``fedmte.client`` and ``fedmte.server`` are the core, the site agent and the coordinator.

The names below are imported on first use (PEP 562), so ``import fedmte`` and the CLI's
``fedmte --help`` load none of numpy, scipy or pydantic until a caller needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmte.api import score, score_detailed
    from fedmte.protocol.evaluation import RankingMetrics, evaluate_ranking, evaluate_rankings
    from fedmte.protocol.scorers import NOT_FEDERABLE, SCORERS

__all__ = ["score", "score_detailed", "SCORERS", "NOT_FEDERABLE", "evaluate_ranking", "evaluate_rankings", "RankingMetrics"]
__version__ = "0.1.0"

_LAZY = {
    "score": "fedmte.api",
    "score_detailed": "fedmte.api",
    "SCORERS": "fedmte.protocol.scorers",
    "NOT_FEDERABLE": "fedmte.protocol.scorers",
    "evaluate_ranking": "fedmte.protocol.evaluation",
    "evaluate_rankings": "fedmte.protocol.evaluation",
    "RankingMetrics": "fedmte.protocol.evaluation",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedmte' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
