"""Independent, centralised reference implementations of every federable scorer.

Each function takes the pooled ``features``, ``labels`` and ``source_probs`` and transcribes
the reference implementation's formula on the rows, the slow obvious way; none of them calls
``fedmte``. ``REFERENCES`` maps scorer names to them; ``TOLERANCES`` lists the few
(scorer, dataset) pairs where the reference itself is ill-conditioned, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.refs import core
from tests.refs import sfda
from tests.refs import lda_pca
from tests.refs import iterative
from tests.refs import linear_probe

Reference = Callable[..., float]

REFERENCES: dict[str, Reference] = {**core.REFERENCES, **sfda.REFERENCES, **lda_pca.REFERENCES, **iterative.REFERENCES,
                                   **linear_probe.REFERENCES}

TOLERANCES: dict[tuple[str, str], tuple[float, str]] = {**core.TOLERANCES, **sfda.TOLERANCES, **lda_pca.TOLERANCES, **iterative.TOLERANCES,
                                                     **linear_probe.TOLERANCES}
