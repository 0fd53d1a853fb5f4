"""etran_lda, ncti and gbc_pca: the choices the generic exactness test does not pin down."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

import fedmte
from fedmte.protocol import symmetric
from fedmte.protocol.catalogue import Batch, accumulate
from fedmte.protocol.errors import InvalidInputError, ScorerDomainError
from fedmte.protocol.inputs import check_inputs
from fedmte.protocol.local import InMemorySite
from fedmte.protocol.plan import execute, make_plan
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers import SCORERS
from fedmte.protocol.scorers.gbc_pca import pca_from_moments, pca_width
from fedmte.protocol.scorers.moments import Moments
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.scorers.ncti import NctiTerms, PcaSpace, combine, fit_lda, nuclear_norm_from_gram
from tests.datasets import DATASETS, make
from tests.refs import lda_pca as ref

RELATIVE = 1e-9
TERMS = ("ncti_seli", "ncti_ncc", "ncti_vc")


def rel(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-12)


def pooled_moments(features: np.ndarray, labels: np.ndarray) -> Moments:
    """The round-1 sums of one site holding every row, offset at the pooled mean."""
    offset = features.mean(axis=0)
    x = features - offset
    c = int(labels.max()) + 1
    one_hot = np.eye(c)[labels]
    return Moments(n=len(labels), counts=np.bincount(labels, minlength=c), class_sums=one_hot.T @ x, gram=x.T @ x, offset=offset)


# ------------------------------------------------------------------------------ etran_lda


def test_etran_lda_ignores_a_translation_even_with_a_far_public_offset() -> None:
    data = DATASETS["basic"]
    shift = np.random.default_rng(0).normal(scale=1e4, size=data.features.shape[1])
    want = ref.etran_lda(data.features, data.labels)
    moved = fedmte.score(data.features + shift, data.labels, scorers=["etran_lda"], sites=3)["etran_lda"]
    # A public offset of zero: the logits are formed on raw rows whose mean is 1e4 away, as
    # the reference forms them; both lose about 4e-10 to cancellation there.
    raw = fedmte.score(data.features + shift, data.labels, scorers=["etran_lda"], offset=np.zeros(len(shift)))["etran_lda"]
    assert rel(moved, want) < 1e-13
    assert rel(raw, want) < 1e-8


def test_etran_lda_is_not_sfda() -> None:
    """The reference's V V^T = I removes S_w: the term is a nearest-mean classifier, not an LDA."""
    data = DATASETS["basic"]
    got = fedmte.score(data.features, data.labels, scorers=["etran_lda", "sfda"])
    assert got["etran_lda"] == pytest.approx(ref.etran_lda(data.features, data.labels), rel=RELATIVE)
    assert abs(got["etran_lda"] - got["sfda"]) > 1e-3


# ------------------------------------------------------------------------------ classes


@pytest.mark.parametrize("name", ["etran_lda", "ncti", "ncti_seli"])
def test_a_class_without_pooled_rows_is_refused(name: str) -> None:
    data = DATASETS["basic"]
    labels = np.where(data.labels == 2, 3, data.labels)  # class 2 has no rows
    with pytest.raises(ScorerDomainError, match=r"undefined when a class has no samples.*\[2\]"):
        fedmte.score(data.features, labels, scorers=[name])


def test_gbc_pca_skips_a_class_without_pooled_rows() -> None:
    data = DATASETS["basic"]
    labels = np.where(data.labels == 2, 3, data.labels)
    compact = np.unique(labels, return_inverse=True)[1]
    got = fedmte.score(data.features, labels, scorers=["gbc_pca"], sites=2)["gbc_pca"]
    assert rel(got, ref.gbc_pca(data.features, compact)) < RELATIVE


# ------------------------------------------------------------------------------ PCA


def test_pca_width_is_64_or_the_rank_of_the_centred_rows() -> None:
    assert pca_width(1000, 2048) == 64
    assert pca_width(1000, 12) == 12
    assert pca_width(40, 60) == 39
    with pytest.raises(ScorerDomainError, match="at least two rows"):
        pca_width(1, 10)


def test_wide_features_are_cut_to_64_components() -> None:
    data = make("wide", n=200, d=80, classes=5, separation=0.4, seed=7)
    got = fedmte.score(data.features, data.labels, scorers=["gbc_pca", *TERMS], sites=3)
    seli, ncc, vc = ref.ncti_terms(data.features, data.labels)
    assert 0.5 < ncc < 1.0, "the classes should neither collapse nor separate perfectly"
    for name, want in [("gbc_pca", ref.gbc_pca(data.features, data.labels)), ("ncti_seli", seli), ("ncti_ncc", ncc), ("ncti_vc", vc)]:
        assert rel(got[name], want) < RELATIVE, name


def test_gbc_pca_diagonal_option_matches_reference() -> None:
    data = DATASETS["d_gt_n"]
    options = {"gbc_pca": {"gaussian_type": "diagonal"}}
    got = fedmte.score(data.features, data.labels, scorers=["gbc_pca"], sites=3, options=options)["gbc_pca"]
    want = ref.gbc_pca(data.features, data.labels, gaussian_type="diagonal")
    assert rel(got, want) < RELATIVE
    plain = fedmte.score(data.features, data.labels, scorers=["gbc"], options={"gbc": {"gaussian_type": "diagonal"}})["gbc"]
    assert rel(got, plain) > 1e-3, "the PCA rotation must change diagonal GBC"


def test_gbc_pca_and_ncti_share_one_projected_view() -> None:
    """Both build the same PCA from the same moments, so round 2 projects the rows once."""
    data = DATASETS["basic"]
    inputs = check_inputs(data.features, data.labels, None)
    site = InMemorySite(inputs, np.arange(inputs.n))
    asked: list[list[Stat]] = []

    def aggregate(requests: Sequence[Stat]) -> Statistics:
        asked.append(list(requests))
        return site.compute(requests)

    plan = make_plan(["gbc_pca", "ncti"], has_features=True, has_source_probs=False)
    result = execute(plan, aggregate, dim=inputs.dim, num_classes=inputs.num_classes)
    views = {s.view_key: [t.op for t in s.view] for s in asked[-1] if s.view}
    assert list(views.values()) == [["offset", "project"]]
    alone = fedmte.score(data.features, data.labels, scorers=["gbc_pca"])["gbc_pca"]
    assert result.scores["gbc_pca"] == pytest.approx(alone, rel=1e-12)


def test_width_n_would_make_ncti_depend_on_row_order() -> None:
    """Why the width stops at n - 1: with k = n the last component is rounding noise, which
    the svd solver's per-feature scaling blows up, so the reference's seli follows the row
    order. At k = n - 1 (fedmte's definition) it does not, and neither does fedmte."""
    data = DATASETS["d_gt_n"]
    n = len(data.labels)
    orders = [np.arange(n), *(np.random.default_rng(seed).permutation(n) for seed in range(3))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the collinear noise column
        noisy = [ref.ncti_terms(data.features[o], data.labels[o], width=n)[0] for o in orders]
        exact = [ref.ncti_terms(data.features[o], data.labels[o])[0] for o in orders]
    fed = [fedmte.score(data.features[o], data.labels[o], scorers=["ncti_seli"])["ncti_seli"] for o in orders]
    assert max(noisy) / min(noisy) > 1.1
    assert max(exact) / min(exact) - 1 < 1e-12
    assert max(fed) / min(fed) - 1 < 1e-12


# ------------------------------------------------------------------------------ NCTI


@pytest.mark.parametrize(("dataset", "solver"), [("binary", "eigen"), ("large_offset", "eigen"), ("basic", "svd"), ("d_gt_n", "svd"), ("many_classes", "svd")])
def test_lda_from_moments_predicts_like_sklearn(dataset: str, solver: str) -> None:
    """Both of the reference's solvers, replayed on moments, give sklearn's posteriors."""
    data = DATASETS[dataset]
    m = pooled_moments(data.features, data.labels)
    pca = pca_from_moments(m)
    lda = fit_lda(PcaSpace.of(m, pca), pca)
    assert lda.solver == solver
    z_ours = (data.features - m.offset - pca.mean) @ pca.basis
    logits = z_ours @ lda.coef.T + lda.intercept
    ours = np.exp(logits - logits.max(axis=1, keepdims=True))
    ours /= ours.sum(axis=1, keepdims=True)

    sk_pca = PCA(n_components=pca.width)
    z = sk_pca.fit_transform(data.features)
    assert np.allclose(sk_pca.explained_variance_, pca.variances, rtol=1e-10)
    kwargs = {"solver": "svd"} if solver == "svd" else {"solver": "eigen", "shrinkage": lda.shrinkage}
    sk = LinearDiscriminantAnalysis(**kwargs).fit(z, data.labels)
    assert np.max(np.abs(ours - sk.predict_proba(z))) < 1e-10


def test_ncti_is_the_unscaled_sum_of_its_terms_and_the_terms_travel_once() -> None:
    data = DATASETS["basic"]
    alone = fedmte.score_detailed(data.features, data.labels, scorers=["ncti"], sites=2)
    together = fedmte.score_detailed(data.features, data.labels, scorers=["ncti", *TERMS], sites=2)
    s = together.scores
    assert s["ncti"] == pytest.approx(s["ncti_seli"] + s["ncti_ncc"] - s["ncti_vc"], rel=1e-14)
    assert together.bytes_sent_per_site == alone.bytes_sent_per_site
    assert len(together.rounds) == 3  # centring + the two NCTI rounds
    seli_only = fedmte.score_detailed(data.features, data.labels, scorers=["ncti_seli"])
    assert len(seli_only.rounds) == 2 and SCORERS["ncti_seli"].rounds == 1  # seli needs moments only


def test_combine_is_the_reference_min_max_mix() -> None:
    """Three 'models' (feature maps of one labelled set) ranked as evaluate_metric_group1_cpu does."""
    base = DATASETS["basic"]
    rng = np.random.default_rng(3)
    models = {
        "raw": base.features,
        "noisy": base.features + rng.normal(scale=2.0, size=base.features.shape),
        "narrow": base.features[:, :5],
    }
    terms = {}
    for name, features in models.items():  # one federated run per model
        scores = fedmte.score(features, base.labels, scorers=list(TERMS), sites=2)
        terms[name] = NctiTerms(seli=scores["ncti_seli"], ncc=scores["ncti_ncc"], vc=scores["ncti_vc"])
    got = combine(terms)
    # The reference's loop, on the reference's terms.
    ref_terms = {name: ref.ncti_terms(f, base.labels) for name, f in models.items()}
    seli, ncc, vc = (np.array([ref_terms[m][i] for m in models]) for i in range(3))
    want = sum(sign * (v - v.min()) / (v.max() - v.min()) for sign, v in ((1, ncc), (1, seli), (-1, vc)))
    assert np.allclose([got[m] for m in models], want, rtol=0, atol=1e-9)
    assert len(set(np.round(want, 6))) == 3, "the three models must be told apart"


def test_combine_edge_cases() -> None:
    one = NctiTerms(seli=10.0, ncc=0.9, vc=2.0)
    assert combine({"only": one}) == {"only": 0.0}
    tie = combine({"a": one, "b": NctiTerms(seli=10.0, ncc=0.5, vc=2.0)})
    assert tie == {"a": 1.0, "b": 0.0}  # seli and vc tie, so only ncc ranks them
    with pytest.raises(InvalidInputError, match="at least one model"):
        combine({})


def test_nuclear_norm_from_gram_keeps_small_singular_values() -> None:
    """Posteriors hold columns of tiny probabilities; sqrt(eig(P_c^T P_c)) loses the
    singular values they carry, the pivoted Cholesky route keeps them."""
    data = DATASETS["many_classes"]
    z = PCA(n_components=pca_width(*data.features.shape)).fit_transform(data.features)
    probs = LinearDiscriminantAnalysis(solver="svd").fit(z, data.labels).predict_proba(z)
    want = got = eig = 0.0
    for c in range(data.num_classes):
        p = probs[data.labels == c]
        gram = p.T @ p
        want += np.linalg.norm(p, ord="nuc")
        got += nuclear_norm_from_gram(gram, len(p))
        eig += np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1][: len(p)], 0, None)).sum()
    assert rel(got, want) < 1e-11
    assert rel(eig, want) > 1e-9, "the naive route should fail here, or this test proves nothing"
    square = np.diag([3.0, 1e-3, 1e-7])  # and the plain case: an SVD's values, any row count
    assert nuclear_norm_from_gram(square.T @ square, 3) == pytest.approx(3.0 + 1e-3 + 1e-7, rel=1e-15)
    assert nuclear_norm_from_gram(square.T @ square, 1) == pytest.approx(3.0, rel=1e-15)


def test_class_prob_outer_sums_match_a_row_loop_over_batches() -> None:
    rng = np.random.default_rng(2)
    x, labels = rng.normal(size=(30, 4)), np.repeat([0, 2, 2], 10)  # class 1 is absent here
    coef, bias = rng.normal(size=(3, 4)), rng.normal(size=3)
    stat = Stat.of("class_prob_outer_sums", coef=coef, bias=bias)
    batches = [Batch(features=x[i : i + 7], labels=labels[i : i + 7], num_classes=3) for i in range(0, 30, 7)]
    got = symmetric.unpack(accumulate([stat], batches)[stat.key])
    want = np.zeros((3, 3, 3))
    for row, c in zip(x, labels):
        logits = coef @ row + bias
        p = np.exp(logits - logits.max())
        p /= p.sum()
        want[c] += np.outer(p, p)
    assert np.allclose(got, want, rtol=1e-13, atol=0)
    assert not got[1].any()


def test_features_constant_within_classes_are_refused() -> None:
    labels = np.repeat([0, 1, 2], 20)
    features = np.random.default_rng(4).normal(size=(3, 5))[labels]  # each class one point
    with pytest.raises(ScorerDomainError, match="constant within every class"):
        fedmte.score(features, labels, scorers=["ncti_seli"])
