"""The scorer registry: every scorer fedmte can run, by the name used everywhere.

``SCORERS`` is a literal dict (no registration by import side effect); an unknown name is
refused with the list of valid ones. ``NOT_FEDERABLE`` names the scorers that cannot be
computed from sums of per-site statistics, with the reason.
"""

from __future__ import annotations

from fedmte.protocol.scorers import (
    etran,
    gbc,
    gbc_pca,
    hscore,
    linear_mse,
    linear_probe,
    logme,
    ncti,
    nleep,
    pactran,
    ped,
    sfda,
    source_label,
    transrate,
)
from fedmte.protocol.scorers.base import ScorerSpec

SCORERS: dict[str, ScorerSpec] = {
    "logme": logme.SPEC,
    "hscore": hscore.HSCORE,
    "shrinkage_hscore": hscore.SHRINKAGE_HSCORE,
    "nce": source_label.NCE,
    "gbc": gbc.SPEC,
    "transrate": transrate.SPEC,
    "linear_mse": linear_mse.SPEC,
    "leep": source_label.LEEP,
    "sfda": sfda.SPEC,
    "ped": ped.SPEC,
    "etran_lda": etran.SPEC,
    "gbc_pca": gbc_pca.SPEC,
    "ncti": ncti.NCTI,
    "ncti_seli": ncti.NCTI_SELI,
    "ncti_ncc": ncti.NCTI_NCC,
    "ncti_vc": ncti.NCTI_VC,
    "nleep": nleep.SPEC,
    "pactran_dir": pactran.PAC_DIR,
    "pactran_gamma": pactran.PAC_GAMMA,
    "linear_probe": linear_probe.SPEC,
    "lda_probe": linear_probe.LDA_SPEC,
}

NOT_FEDERABLE: dict[str, str] = {
    "parc": (
        "PARC correlates the pairwise distances between all samples, including pairs that sit "
        "at different sites, so it needs per-sample features from every site; no sum of "
        "per-site statistics reproduces it"
    ),
    "knn": (
        "the hold-one-out k-NN accuracy needs each sample's nearest neighbours among all "
        "sites' samples, which per-site sums cannot give"
    ),
}

__all__ = ["SCORERS", "NOT_FEDERABLE", "ScorerSpec"]
