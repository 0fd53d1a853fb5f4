"""GBC in the reference pipeline: PCA of the pooled features to 64 dimensions, then GBC.

google-research ``stable_transfer`` scores GBC on features reduced by
``features_targets_utils.pca_reduction(features, 64)``: scikit-learn ``PCA(n_components=64,
svd_solver='full')``, whose output is then cast to float32. The GBC itself is
:func:`fedmte.protocol.scorers.gbc.gbc_from_class_moments` (spherical by default).

Two rounds:

1. n, class counts, class sums and F^T F (offset coordinates, shared with the other moment
   scorers). The coordinator forms the pooled covariance S = (F^T F - n mu mu^T)/(n - 1) and
   its eigendecomposition; the top k eigenvectors are sklearn's principal axes (up to sign).
2. Sites project their centred rows, z = (f - mean) B with the broadcast (d, k) basis B (the
   catalogue's ``project`` transform), and send per-class counts, sums and sums of squares
   of z, from which GBC follows.

Definitions where the reference is silent or fails:

* Width: k = min(64, d, n - 1). sklearn refuses 64 components when min(n, d) < 64; n - 1
  is the rank of n centred rows, so a further component would be rounding noise.
* Precision: fedmte stays in float64. The reference casts the PCA output to float32 and
  runs GBC in TensorFlow float32, which moves the score by 2e-7 to 9e-7 relative (research
  notes); the tests compare with the same pipeline in float64.
* The same PCA (same basis, same view) serves ``ncti``, so a site projects its rows once
  when both scorers run.
* Signs and order: the eigenvectors' signs are arbitrary, which GBC ignores (it reads
  squared mean differences and variances). Directions within a repeated eigenvalue are
  also arbitrary; spherical GBC is unaffected when the whole repeated block is kept, and
  diagonal GBC can move only in that degenerate case (never met on real features).

Range: GBC's, [-C(C - 1), 0] (:func:`fedmte.protocol.scorers.gbc.gbc_bounds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmte.protocol.errors import ScorerDomainError
from fedmte.protocol.requests import Transform, View
from fedmte.protocol.scorers.base import Context, Program, ScorerSpec
from fedmte.protocol.scorers.gbc import class_moment_requests, gbc_bounds, gbc_from_class_moments
from fedmte.protocol.scorers.moments import Moments, moment_requests

PCA_COMPONENTS = 64  # config_transferability_source_selection.py: pca_reduction=64


def pca_width(n: int, d: int, components: int = PCA_COMPONENTS) -> int:
    """k = min(components, d, n - 1): at most the rank of the n centred rows."""
    k = min(components, d, n - 1)
    if k < 1:
        raise ScorerDomainError(f"PCA needs at least two rows; the pooled data have {n}")
    return k


@dataclass(frozen=True)
class Pca:
    """The pooled PCA: z = (x - mean) @ basis, in the agreed offset coordinates x = f - o."""

    basis: np.ndarray  # (d, k), principal axes by decreasing variance
    variances: np.ndarray  # (k,), explained variances (1/(n - 1), as sklearn)
    mean: np.ndarray  # (d,), pooled mean in offset coordinates
    offset: np.ndarray  # (d,), the agreed offset o

    @property
    def width(self) -> int:
        return self.basis.shape[1]

    @property
    def view(self) -> View:
        """The site transforms giving z: subtract the pooled raw mean, then project."""
        return (Transform.of("offset", offset=self.offset + self.mean), Transform.of("project", basis=self.basis))


def pca_from_moments(m: Moments, components: int = PCA_COMPONENTS) -> Pca:
    """sklearn's exact PCA (``svd_solver='full'``) from pooled moments, by eigh of S."""
    k = pca_width(m.n, m.dim, components)
    eigvals, eigvecs = np.linalg.eigh(m.scatter / (m.n - 1))
    order = np.argsort(eigvals)[::-1][:k]
    return Pca(basis=eigvecs[:, order], variances=np.clip(eigvals[order], 0.0, None), mean=m.mean, offset=m.offset)


def program(ctx: Context, gaussian_type: str = "spherical") -> Program:
    m = Moments.from_sums((yield moment_requests(ctx)), ctx)
    pca = pca_from_moments(m)
    sums = yield class_moment_requests(pca.view)
    return gbc_from_class_moments(sums["counts"], sums["class_sums"], sums["class_sq_sums"], gaussian_type)


SPEC = ScorerSpec(
    name="gbc_pca",
    program=program,
    rounds=2,
    needs_features=True,
    needs_source_probs=False,
    centred=True,
    summary="GBC on the pooled PCA-64 projection of the features, as in the reference pipeline",
    reference="google-research stable_transfer gbc.get_gbc_score after pca_reduction(64, 'full'), float64",
    options={"gaussian_type": "spherical"},
    bounds=gbc_bounds,
)
