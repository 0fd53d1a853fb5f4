"""Scorers that read the source model's class probabilities: NCE and LEEP.

``nce`` follows thuml/LogME ``NCE.py`` (hard source labels = argmax of the probabilities);
``leep`` follows thuml/LogME ``LEEP.py``.

References: Tran et al., "Transferability and Hardness of Supervised Classification Tasks",
ICCV 2019; Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned
Representations", ICML 2020.

Ranges: both lie in [-log C, 0]. NCE is minus a conditional entropy of C labels (the noisy
joint is clipped at 0 first, so it stays a distribution). LEEP averages log sum_z P(y|z)
theta_z <= log 1; by Jensen it is >= sum_z J(y, z) log P(y|z) = -sum_z P(z) H(Y | z) >= -log C
for the soft joint J the conditional came from.
"""

from __future__ import annotations

import numpy as np

from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers.base import Context, Program, ScorerSpec, neg_entropy_bounds


def nce_from_counts(joint_counts: np.ndarray) -> float:
    """-H(Y | Z) from the C x Cs counts of (target class, argmax source class)."""
    joint_counts = np.maximum(joint_counts, 0.0)  # exact counts are >= 0; DP-noised ones may not be
    joint = joint_counts / joint_counts.sum()
    p_z = joint.sum(axis=0)
    valid = p_z != 0
    conditional = (joint[:, valid] / p_z[valid]).T + 1e-20  # P(y | z), the reference's guard
    entropy = np.sum(-conditional * np.log(conditional), axis=1)
    return float(-np.sum(entropy * p_z[valid]))


def nce_program(ctx: Context) -> Program:
    sums = yield {"joint": Stat.of("hard_joint")}
    return nce_from_counts(np.asarray(sums["joint"], dtype=np.float64))


def leep_conditional(joint: np.ndarray) -> np.ndarray:
    """P(y | z) as a C x Cs matrix from the soft joint sums.

    The reference divides by each source class's total mass and gives NaN when one is zero.
    Such a column only ever multiplies zero probabilities, so fedmte sets it to zero, which
    equals the reference wherever the reference is defined.
    """
    mass = joint.sum(axis=0)
    conditional = np.zeros_like(joint)
    np.divide(joint, mass, out=conditional, where=mass > 0)
    return conditional


def leep_program(ctx: Context) -> Program:
    sums = yield {"joint": Stat.of("soft_joint"), "n": Stat.of("count")}
    n = int(sums["n"])
    conditional = leep_conditional(sums["joint"])
    sums = yield {"loglik": Stat.of("mixture_loglik", weights=conditional)}
    return float(sums["loglik"]) / n


NCE = ScorerSpec(
    name="nce",
    program=nce_program,
    rounds=1,
    needs_features=False,
    needs_source_probs=True,
    summary="negative conditional entropy of target labels given the source model's hard labels",
    reference="thuml/LogME NCE.py (Tran et al. 2019)",
    bounds=neg_entropy_bounds,
)

LEEP = ScorerSpec(
    name="leep",
    program=leep_program,
    rounds=2,
    needs_features=False,
    needs_source_probs=True,
    summary="log expected empirical prediction of a source head re-mapped to target labels",
    reference="thuml/LogME LEEP.py (Nguyen et al. 2020)",
    bounds=neg_entropy_bounds,
)
