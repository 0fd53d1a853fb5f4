"""fedmte: privacy-preserving federated model transferability estimation.

``fedmte.score`` runs the federated scoring protocol in process; ``fedmte.evaluate_ranking``
judges a scorer's ranking of models against measured ground truth; ``fedmte.protocol``,
``fedmte.client`` and ``fedmte.server`` are the core, the site agent and the coordinator.
"""

from fedmte.api import score, score_detailed
from fedmte.protocol.evaluation import RankingMetrics, evaluate_ranking, evaluate_rankings
from fedmte.protocol.scorers import NOT_FEDERABLE, SCORERS

__all__ = ["score", "score_detailed", "SCORERS", "NOT_FEDERABLE", "evaluate_ranking", "evaluate_rankings", "RankingMetrics"]
__version__ = "0.1.0"
