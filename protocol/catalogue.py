"""The site's catalogue: every feature transform and statistic a site knows how to compute.

The coordinator can only *name* entries of these two literal dicts and send arrays for
them; the code that runs is the site's own. A site's policy can allow or deny entries by
name. Each statistic says which inputs it reads (features, source probabilities), its shape
and dtype, so the receiving side can validate a sum before using it.

Notation: ``x`` is the (m, k) float64 view of a batch's features, ``y`` the (m,) int64
labels, ``theta`` the (m, Cs) source-class probabilities, ``C`` the number of target
classes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedmte.protocol import symmetric
from fedmte.protocol.errors import InvalidInputError, UnknownStatisticError
from fedmte.protocol.requests import Stat, View
from fedmte.protocol.statistics import Statistics


@dataclass(frozen=True)
class Batch:
    """A slice of one site's rows: features (m, d) float64, labels (m,) int64 in [0, C),
    optionally source probabilities (m, Cs), and ``row_ids`` (m,) int64: each row's index in
    the site's data, stable for a data version, which the held-back split reads."""

    features: np.ndarray | None
    labels: np.ndarray
    num_classes: int
    source_probs: np.ndarray | None = None
    row_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.row_ids is not None and np.shape(self.row_ids) != np.shape(self.labels):
            raise InvalidInputError(f"row ids must match the labels one to one, got {np.shape(self.row_ids)} "
                                    f"for {np.shape(self.labels)}")

    def rows(self, index: slice | np.ndarray) -> Batch:
        """The batch's rows at ``index`` (every array taken alike, row ids included)."""
        return Batch(features=None if self.features is None else self.features[index], labels=self.labels[index],
                     num_classes=self.num_classes,
                     source_probs=None if self.source_probs is None else self.source_probs[index],
                     row_ids=None if self.row_ids is None else self.row_ids[index])

    def one_hot(self) -> np.ndarray:
        """(rows, C) indicators of the labels, built at the batch's size (never a C x C identity)."""
        out = np.zeros((len(self.labels), self.num_classes), dtype=np.float64)
        out[np.arange(len(self.labels)), self.labels] = 1.0
        return out

    @classmethod
    def from_model_outputs(cls, features: np.ndarray | None, labels: np.ndarray, logits: np.ndarray | None,
                           num_classes: int, row_ids: np.ndarray | None = None) -> Batch:
        """The float64 batch of a model's outputs: its features, and the source head's
        probabilities (softmax of the logits, in float64) when it has one; ``row_ids``
        name the rows."""
        return cls(
            features=None if features is None else np.asarray(features, dtype=np.float64),
            labels=np.asarray(labels, dtype=np.int64),
            num_classes=num_classes,
            source_probs=None if logits is None else probs_from_logits(logits),
            row_ids=None if row_ids is None else np.asarray(row_ids, dtype=np.int64),
        )


# --------------------------------------------------------------------------- transforms

@dataclass(frozen=True)
class TransformKind:
    """A feature transform: ``apply(x, batch, args) -> x'`` and the output width."""

    apply: Callable[[np.ndarray, Batch, Mapping[str, np.ndarray]], np.ndarray]
    output_dim: Callable[[int, int, Mapping[str, np.ndarray]], int]
    summary: str


def _require(args: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], op: str) -> np.ndarray:
    if name not in args:
        raise InvalidInputError(f"transform or statistic {op!r} needs the argument {name!r}")
    array = args[name]
    if array.shape != shape:
        raise InvalidInputError(f"{op!r} argument {name!r} should have shape {shape}, got {array.shape}")
    return array


def _offset_dim(dim: int, num_classes: int, args: Mapping[str, np.ndarray]) -> int:
    _require(args, "offset", (dim,), "offset")
    return dim


def _project_dim(dim: int, num_classes: int, args: Mapping[str, np.ndarray]) -> int:
    basis = args.get("basis")
    if basis is None or basis.ndim != 2 or basis.shape[0] != dim:
        raise InvalidInputError(f"'project' needs a (d={dim}, k) basis, got {None if basis is None else basis.shape}")
    return int(basis.shape[1])


def _class_shift_dim(dim: int, num_classes: int, args: Mapping[str, np.ndarray]) -> int:
    _require(args, "shift", (num_classes, dim), "class_shift")
    return dim


def _confmix_dim(dim: int, num_classes: int, args: Mapping[str, np.ndarray]) -> int:
    _require(args, "coef", (num_classes, dim), "confmix")
    _require(args, "bias", (num_classes,), "confmix")
    _require(args, "others_mean", (num_classes, dim), "confmix")
    if "passes" in args and (args["passes"].shape != () or int(args["passes"]) < 1):
        raise InvalidInputError(f"'confmix' argument 'passes' must be a positive integer, got {args['passes']}")
    return dim


def _confmix(x: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray]) -> np.ndarray:
    """SFDA's ConfMix: x~ = p x + (1 - p) others_mean[y], p = p(y | x) under a broadcast
    linear classifier (softmax applied ``passes`` times). Returns a new array."""
    own = linear_class_probs(x, batch, args, "confmix")[np.arange(len(batch.labels)), batch.labels][:, None]
    return own * x + (1.0 - own) * args["others_mean"][batch.labels]


def _keep_part_dim(dim: int, num_classes: int, args: Mapping[str, np.ndarray]) -> int:
    for name in ("seed", "holdout", "part"):
        _require(args, name, (), "keep_part")
    return dim


def _keep_part(x: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray]) -> np.ndarray:
    """Rows outside one part of the held-back split (part 0: training, 1: held back) become
    zero, so every feature sum of the view is that part's sum (a zero row adds nothing);
    rows only shrink, so every norm bound stays. Counts come from ``holdout_class_counts``."""
    held_back = _split_rows(batch, args, "keep_part", held_back=True)
    keep = held_back if int(args["part"]) == 1 else ~held_back
    return np.where(keep[:, None], x, 0.0)


TRANSFORMS: dict[str, TransformKind] = {
    "offset": TransformKind(
        apply=lambda x, b, a: x - a["offset"],
        output_dim=_offset_dim,
        summary="subtract the agreed public offset (x - o)",
    ),
    "project": TransformKind(
        apply=lambda x, b, a: x @ a["basis"],
        output_dim=_project_dim,
        summary="project onto a broadcast basis (x @ B), e.g. a PCA",
    ),
    "class_shift": TransformKind(
        apply=lambda x, b, a: x + a["shift"][b.labels],
        output_dim=_class_shift_dim,
        summary="move every row by its class's broadcast vector (x + D[y])",
    ),
    "keep_part": TransformKind(
        apply=_keep_part,
        output_dim=_keep_part_dim,
        summary="zero the rows outside one part of the held-back split (seed, holdout, part: 0 train, 1 held back)",
    ),
    "confmix": TransformKind(
        apply=_confmix,
        output_dim=_confmix_dim,
        summary="SFDA's ConfMix: p x + (1 - p) others_mean[y], p = p(y | x) of a broadcast linear classifier",
    ),
}


# --------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class StatisticKind:
    """An additive statistic: ``compute(x, batch, args)`` over a batch, summed over batches.

    ``shape(k, C, Cs, args)`` gives the summed array's shape for a view of width ``k``.
    """

    compute: Callable[[np.ndarray | None, Batch, Mapping[str, np.ndarray]], np.ndarray]
    shape: Callable[[int, int, int, Mapping[str, np.ndarray]], tuple[int, ...]]
    dtype: np.dtype
    needs_features: bool
    needs_source_probs: bool
    summary: str


def _class_scatters(x: np.ndarray, batch: Batch) -> np.ndarray:
    out = np.zeros((batch.num_classes, symmetric.packed_size(x.shape[1])))
    for c in np.unique(batch.labels):
        rows = x[batch.labels == c]
        out[c] = symmetric.pack(rows.T @ rows)
    return out


def _class_prob_outer_sums(x: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray]) -> np.ndarray:
    probs = linear_class_probs(x, batch, args, "class_prob_outer_sums")
    out = np.zeros((batch.num_classes, symmetric.packed_size(batch.num_classes)))
    for c in np.unique(batch.labels):
        rows = probs[batch.labels == c]
        out[c] = symmetric.pack(rows.T @ rows)
    return out


def _mixture_loglik(theta: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray]) -> np.ndarray:
    weights = _require(args, "weights", (batch.num_classes, theta.shape[1]), "mixture_loglik")
    likelihood = np.einsum("iz,iz->i", theta, weights[batch.labels])
    with np.errstate(divide="ignore"):
        return np.asarray(np.log(likelihood).sum())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def probs_from_logits(logits: np.ndarray) -> np.ndarray:
    """A source head's class probabilities: softmax of its logits in float64 (the one
    conversion extraction, the cache export and the site agent all use)."""
    return softmax(np.asarray(logits, dtype=np.float64))


def linear_class_probs(x: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray], op: str) -> np.ndarray:
    """softmax(x coef^T + bias), applied ``passes`` times (SFDA applies it twice)."""
    coef = args.get("coef")
    if coef is None or coef.shape != (batch.num_classes, x.shape[1]):
        raise InvalidInputError(f"{op!r} needs coef of shape (C={batch.num_classes}, k={x.shape[1]})")
    bias = _require(args, "bias", (batch.num_classes,), op)
    probs = x @ coef.T + bias
    for _ in range(int(args["passes"]) if "passes" in args else 1):
        probs = softmax(probs)
    return probs


def _logsumexp_rows(values: np.ndarray) -> np.ndarray:
    """log sum_j exp(values[i, j]) per row, shifted by the row maximum."""
    top = values.max(axis=1)
    return top + np.log(np.exp(values - top[:, None]).sum(axis=1))


def _gmm_parameters(
    x: np.ndarray, args: Mapping[str, np.ndarray], op: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    means = args.get("means")
    if means is None or means.ndim != 2 or means.shape[1] != x.shape[1]:
        raise InvalidInputError(
            f"{op!r} needs 'means' of shape (K, k={x.shape[1]}), got {None if means is None else means.shape}"
        )
    components, k = means.shape
    prec_chol = _require(args, "prec_chol", (components, k, k), op)
    log_weights = _require(args, "log_weights", (components,), op)
    return means, prec_chol, log_weights


def _gmm_components(args: Mapping[str, np.ndarray]) -> int:
    if "means" not in args or args["means"].ndim != 2:
        raise InvalidInputError("a 'gmm_*' statistic needs the mixture's 'means' as a (K, k) array")
    return int(args["means"].shape[0])


def gmm_log_resp(x: np.ndarray, args: Mapping[str, np.ndarray], op: str) -> tuple[np.ndarray, np.ndarray]:
    """log p(x_i) (m,) and log responsibilities (m, K) under a broadcast full-covariance mixture.

    scikit-learn's E-step: log w_j - (k log 2 pi + ||(x - mu_j) U_j||^2) / 2 + sum log diag U_j,
    with U_j upper triangular and U_j U_j^T the precision. One component at a time, so memory
    stays O(m (K + k)).
    """
    means, prec_chol, log_weights = _gmm_parameters(x, args, op)
    components, k = means.shape
    log_det = np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(axis=1)
    squared = np.empty((x.shape[0], components))
    for j in range(components):
        whitened = (x - means[j]) @ prec_chol[j]
        squared[:, j] = np.einsum("ij,ij->i", whitened, whitened)
    weighted = -0.5 * (k * np.log(2 * np.pi) + squared) + log_det + log_weights
    log_norm = _logsumexp_rows(weighted)
    return log_norm, weighted - log_norm[:, None]


def _gmm_moments(x: np.ndarray, args: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per component j: [sum r, sum r (x - mu_j), upper triangle of sum r (x - mu_j)(x - mu_j)^T],
    taken about the broadcast mean mu_j so that narrow, distant components keep their digits."""
    _, log_resp = gmm_log_resp(x, args, "gmm_moments")
    resp = np.exp(log_resp)
    means = args["means"]
    components, k = means.shape
    rows, cols = np.triu_indices(k)
    out = np.empty((components, 1 + k + len(rows)))
    out[:, 0] = resp.sum(axis=0)
    for j in range(components):
        centred = x - means[j]
        weighted = centred * resp[:, j, None]
        out[j, 1 : 1 + k] = weighted.sum(axis=0)
        out[j, 1 + k :] = (weighted.T @ centred)[rows, cols]
    return out


def _gmm_mixture_loglik(x: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray]) -> np.ndarray:
    _, log_resp = gmm_log_resp(x, args, "gmm_mixture_loglik")
    conditional = _require(args, "conditional", (batch.num_classes, log_resp.shape[1]), "gmm_mixture_loglik")
    likelihood = np.einsum("iz,iz->i", np.exp(log_resp), conditional[batch.labels])
    with np.errstate(divide="ignore"):
        return np.asarray(np.log(likelihood).sum())


def _tilted_log_posterior(batch: Batch, args: Mapping[str, np.ndarray], op: str) -> tuple[np.ndarray, np.ndarray]:
    """log q (m, Cs) with q_i = softmax(log(theta_i + floor) + T[y_i]), and log(theta + floor)."""
    theta = batch.source_probs
    tilt = _require(args, "tilt", (batch.num_classes, theta.shape[1]), op)
    floor = _require(args, "floor", (), op)
    log_prior = np.log(theta + floor)
    logits = log_prior + tilt[batch.labels]
    return logits - _logsumexp_rows(logits)[:, None], log_prior


def _tilted_kl_sum(batch: Batch, args: Mapping[str, np.ndarray]) -> np.ndarray:
    log_q, log_prior = _tilted_log_posterior(batch, args, "tilted_kl_sum")
    return np.asarray(np.sum(np.exp(log_q) * (log_q - log_prior)))


# ---------------------------------------------------------- held-back split and linear probe

HOLDOUT_DOMAIN = b"fedmte.holdout.v1\0"
MAX_SPLIT_SEED = 99_999_999
"""The largest split seed: broadcast arrays stay within the site's bound on their entries."""


def holdout_mask(row_ids: np.ndarray, seed: int, holdout: float) -> np.ndarray:
    """True for the rows held back for validation: row i is held back when the first 8 bytes
    of sha256(HOLDOUT_DOMAIN || seed || id_i) (both int64 little-endian), read as a big-endian
    unsigned integer h, satisfy h < floor(holdout * 2^64). A function of the coordinator's
    seed and the row's own id alone, so the split is the same in every round, for every model
    and on every re-run of a data version, and no other row moves it."""
    ids = np.asarray(row_ids, dtype=np.int64)
    if not 0.0 < holdout < 1.0:
        raise InvalidInputError(f"the held-back fraction must lie in (0, 1), got {holdout}")
    threshold = int(holdout * 2.0**64)
    prefix = HOLDOUT_DOMAIN + int(seed).to_bytes(8, "little", signed=True)
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(prefix + row.to_bytes(8, "little", signed=True)).digest()[:8], "big") < threshold
         for row in ids.tolist()),
        dtype=bool, count=len(ids),
    )


def _split_rows(batch: Batch, args: Mapping[str, np.ndarray], op: str, held_back: bool) -> np.ndarray:
    """The batch's rows in the training part (``held_back=False``) or the held-back part.

    A batch without row ids is refused: numbering its rows from 0 would give every batch of a
    site the same split. Every site path (the site agent, in-memory sites, the trace) names
    its rows."""
    seed = _require(args, "seed", (), op)
    holdout = _require(args, "holdout", (), op)
    if not 0 <= int(seed) <= MAX_SPLIT_SEED:
        raise InvalidInputError(f"{op!r} needs a split seed in [0, {MAX_SPLIT_SEED}], got {int(seed)}")
    if batch.row_ids is None:
        raise InvalidInputError(f"{op!r} splits rows by their ids, and this batch names none")
    mask = holdout_mask(batch.row_ids, int(seed), float(holdout))
    return mask if held_back else ~mask


def _probe_weights(k: int, num_classes: int, args: Mapping[str, np.ndarray], op: str) -> np.ndarray:
    return _require(args, "weights", (k + 1, num_classes), op)


def _probe_rows(x: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray], op: str,
                held_back: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows of the part, their labels, their logits x W[:-1] + W[-1])."""
    weights = _probe_weights(x.shape[1], batch.num_classes, args, op)
    keep = _split_rows(batch, args, op, held_back)
    rows, labels = x[keep], np.asarray(batch.labels)[keep]
    return rows, labels, rows @ weights[:-1] + weights[-1]


def _probe_loss(x: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray]) -> np.ndarray:
    _, labels, logits = _probe_rows(x, batch, args, "probe_loss", False)
    return np.asarray((_logsumexp_rows(logits) - logits[np.arange(len(labels)), labels]).sum()
                      if len(labels) else 0.0)


def _probe_residuals(x: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray], op: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    rows, labels, logits = _probe_rows(x, batch, args, op, False)
    probs = softmax(logits) if len(labels) else logits
    return rows, probs, labels


def _probe_gradient(x: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray]) -> np.ndarray:
    rows, probs, labels = _probe_residuals(x, batch, args, "probe_gradient")
    probs[np.arange(len(labels)), labels] -= 1.0
    return np.vstack([rows.T @ probs, probs.sum(axis=0, keepdims=True)])


def _probe_hessian(x: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray]) -> np.ndarray:
    """Packed sum of (x~ x~^T) kron (diag p - p p^T), parameters in row-major order of W."""
    rows, probs, _ = _probe_residuals(x, batch, args, "probe_hessian")
    lifted = np.hstack([rows, np.ones((len(rows), 1))])
    classes = batch.num_classes
    size = lifted.shape[1] * classes
    outer = (lifted[:, :, None] * probs[:, None, :]).reshape(len(rows), size)
    full = -(outer.T @ outer)
    for c in range(classes):
        full[c::classes, c::classes] += (lifted * probs[:, c : c + 1]).T @ lifted
    return symmetric.pack(full)


def _probe_correct(x: np.ndarray, batch: Batch, args: Mapping[str, np.ndarray]) -> np.ndarray:
    _, labels, logits = _probe_rows(x, batch, args, "probe_correct", True)
    hits = labels[np.argmax(logits, axis=1) == labels] if len(labels) else labels
    return np.bincount(hits, minlength=batch.num_classes).astype(np.int64)


def _holdout_class_counts(batch: Batch, args: Mapping[str, np.ndarray]) -> np.ndarray:
    part = _require(args, "part", (), "holdout_class_counts")
    if int(part) not in (0, 1):
        raise InvalidInputError(f"'holdout_class_counts' needs part 0 (training) or 1 (held back), got {int(part)}")
    labels = np.asarray(batch.labels)[_split_rows(batch, args, "holdout_class_counts", bool(int(part)))]
    return np.bincount(labels, minlength=batch.num_classes).astype(np.int64)


def _probe_shape(op: str) -> Callable[[int, int, int, Mapping[str, np.ndarray]], tuple[int, ...]]:
    """The summed shape of probe statistic ``op`` (the broadcast W is checked against k and C)."""

    def shape(k: int, num_classes: int, num_source_classes: int, args: Mapping[str, np.ndarray]) -> tuple[int, ...]:
        _probe_weights(k, num_classes, args, op)
        size = (k + 1) * num_classes
        return {"probe_loss": (), "probe_gradient": (k + 1, num_classes),
                "probe_hessian": (symmetric.packed_size(size),), "probe_correct": (num_classes,)}[op]

    return shape


F64 = np.dtype(np.float64)
I64 = np.dtype(np.int64)

STATISTICS: dict[str, StatisticKind] = {
    "count": StatisticKind(
        compute=lambda x, b, a: np.asarray(len(b.labels), dtype=np.int64),
        shape=lambda k, C, Cs, a: (),
        dtype=I64, needs_features=False, needs_source_probs=False,
        summary="n, the number of rows",
    ),
    "class_counts": StatisticKind(
        compute=lambda x, b, a: np.bincount(b.labels, minlength=b.num_classes).astype(np.int64),
        shape=lambda k, C, Cs, a: (C,),
        dtype=I64, needs_features=False, needs_source_probs=False,
        summary="n_c, rows per target class",
    ),
    "sum": StatisticKind(
        compute=lambda x, b, a: x.sum(axis=0),
        shape=lambda k, C, Cs, a: (k,),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="sum of the feature rows",
    ),
    "class_sums": StatisticKind(
        compute=lambda x, b, a: b.one_hot().T @ x,
        shape=lambda k, C, Cs, a: (C, k),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="per-class sums of the rows (F^T Y, transposed)",
    ),
    "gram": StatisticKind(
        compute=lambda x, b, a: symmetric.pack(x.T @ x),
        shape=lambda k, C, Cs, a: (symmetric.packed_size(k),),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="F^T F, upper triangle",
    ),
    "class_sq_sums": StatisticKind(
        compute=lambda x, b, a: b.one_hot().T @ (x * x),
        shape=lambda k, C, Cs, a: (C, k),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="per-class sums of squared coordinates",
    ),
    "class_scatters": StatisticKind(
        compute=lambda x, b, a: _class_scatters(x, b),
        shape=lambda k, C, Cs, a: (C, symmetric.packed_size(k)),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="per-class F_c^T F_c, upper triangles",
    ),
    "norm4_sum": StatisticKind(
        compute=lambda x, b, a: np.asarray((np.einsum("ij,ij->i", x, x) ** 2).sum()),
        shape=lambda k, C, Cs, a: (),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="sum of ||f||^4",
    ),
    "norm2_weighted_sum": StatisticKind(
        compute=lambda x, b, a: np.einsum("ij,ij->i", x, x) @ x,
        shape=lambda k, C, Cs, a: (k,),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="sum of ||f||^2 f",
    ),
    "soft_joint": StatisticKind(
        compute=lambda x, b, a: b.one_hot().T @ b.source_probs,
        shape=lambda k, C, Cs, a: (C, Cs),
        dtype=F64, needs_features=False, needs_source_probs=True,
        summary="sum of source probabilities per target class (C x Cs)",
    ),
    "hard_joint": StatisticKind(
        compute=lambda x, b, a: np.bincount(
            b.labels * b.source_probs.shape[1] + np.argmax(b.source_probs, axis=1),
            minlength=b.num_classes * b.source_probs.shape[1],
        ).reshape(b.num_classes, -1).astype(np.int64),
        shape=lambda k, C, Cs, a: (C, Cs),
        dtype=I64, needs_features=False, needs_source_probs=True,
        summary="counts of (target class, most likely source class)",
    ),
    "mixture_loglik": StatisticKind(
        compute=lambda x, b, a: _mixture_loglik(b.source_probs, b, a),
        shape=lambda k, C, Cs, a: (),
        dtype=F64, needs_features=False, needs_source_probs=True,
        summary="sum of log(theta_i . W[y_i]) for a broadcast C x Cs matrix W",
    ),
    "true_class_prob_sum": StatisticKind(
        compute=lambda x, b, a: np.asarray(
            linear_class_probs(x, b, a, "true_class_prob_sum")[np.arange(len(b.labels)), b.labels].sum()
        ),
        shape=lambda k, C, Cs, a: (),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="sum of p(y_i | x_i) under a broadcast linear classifier softmax(x coef^T + bias)",
    ),
    "gmm_moments": StatisticKind(
        compute=lambda x, b, a: _gmm_moments(x, a),
        shape=lambda k, C, Cs, a: (_gmm_components(a), 1 + k + symmetric.packed_size(k)),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="EM sufficient statistics under a broadcast Gaussian mixture (means, prec_chol, "
        "log_weights): per component sum r, sum r (x - mu), sum r (x - mu)(x - mu)^T (upper triangle)",
    ),
    "gmm_loglik": StatisticKind(
        compute=lambda x, b, a: np.asarray(gmm_log_resp(x, a, "gmm_loglik")[0].sum()),
        shape=lambda k, C, Cs, a: (),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="sum of log p(x_i) under a broadcast Gaussian mixture",
    ),
    "gmm_soft_joint": StatisticKind(
        compute=lambda x, b, a: b.one_hot().T @ np.exp(gmm_log_resp(x, a, "gmm_soft_joint")[1]),
        shape=lambda k, C, Cs, a: (C, _gmm_components(a)),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="sum of a broadcast Gaussian mixture's posteriors per target class (C x K)",
    ),
    "gmm_mixture_loglik": StatisticKind(
        compute=_gmm_mixture_loglik,
        shape=lambda k, C, Cs, a: (),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="sum of log(r_i . P[y_i]) for the posteriors r_i of a broadcast Gaussian mixture "
        "and a broadcast C x K matrix P (conditional)",
    ),
    "tilted_joint": StatisticKind(
        compute=lambda x, b, a: b.one_hot().T @ np.exp(_tilted_log_posterior(b, a, "tilted_joint")[0]),
        shape=lambda k, C, Cs, a: (C, Cs),
        dtype=F64, needs_features=False, needs_source_probs=True,
        summary="Y^T q with q_i = softmax(log(theta_i + floor) + T[y_i]) for a broadcast C x Cs tilt T "
        "(PACTran's mean-field pass)",
    ),
    "tilted_kl_sum": StatisticKind(
        compute=lambda x, b, a: _tilted_kl_sum(b, a),
        shape=lambda k, C, Cs, a: (),
        dtype=F64, needs_features=False, needs_source_probs=True,
        summary="sum of KL(q_i || theta_i + floor) for the tilted q of 'tilted_joint'",
    ),
    "class_prob_outer_sums": StatisticKind(
        compute=lambda x, b, a: _class_prob_outer_sums(x, b, a),
        shape=lambda k, C, Cs, a: (C, symmetric.packed_size(C)),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="per target class, sum of p p^T (upper triangle) with p = softmax(x coef^T + bias) broadcast",
    ),
    "holdout_class_counts": StatisticKind(
        compute=lambda x, b, a: _holdout_class_counts(b, a),
        shape=lambda k, C, Cs, a: (C,),
        dtype=I64, needs_features=False, needs_source_probs=False,
        summary="rows per target class in the training part (part 0) or the held-back part (part 1) of the "
        "split by seed and holdout (holdout_mask)",
    ),
    "probe_loss": StatisticKind(
        compute=_probe_loss,
        shape=_probe_shape("probe_loss"),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="over the training rows, the summed multinomial cross-entropy of a broadcast linear probe "
        "softmax(x W[:-1] + W[-1]), W of shape (k + 1, C)",
    ),
    "probe_gradient": StatisticKind(
        compute=_probe_gradient,
        shape=_probe_shape("probe_gradient"),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="over the training rows, sum of [x, 1]^T (p - y) for the broadcast probe W: the gradient of probe_loss",
    ),
    "probe_hessian": StatisticKind(
        compute=_probe_hessian,
        shape=_probe_shape("probe_hessian"),
        dtype=F64, needs_features=True, needs_source_probs=False,
        summary="over the training rows, the Hessian of probe_loss in W (row-major), upper triangle: "
        "sum of [x, 1][x, 1]^T kron (diag p - p p^T)",
    ),
    "probe_correct": StatisticKind(
        compute=_probe_correct,
        shape=_probe_shape("probe_correct"),
        dtype=I64, needs_features=True, needs_source_probs=False,
        summary="over the held-back rows, per target class, how many the broadcast probe's argmax predicts right",
    ),
}


# --------------------------------------------------------------------------- evaluation

def _lookup(table: Mapping[str, object], name: str, what: str) -> object:
    try:
        return table[name]
    except KeyError:
        raise UnknownStatisticError(
            f"unknown {what} {name!r}; the catalogue has: {', '.join(sorted(table))}"
        ) from None


def view_dim(view: View, dim: int, num_classes: int) -> int:
    """Width of ``view`` applied to ``dim``-wide features (validates the arguments)."""
    for step in view:
        kind = _lookup(TRANSFORMS, step.op, "transform")
        dim = kind.output_dim(dim, num_classes, step.arrays)
    return dim


def expected_shape(stat: Stat, dim: int, num_classes: int, num_source_classes: int) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the summed ``stat``; raises for unknown or ill-shaped requests."""
    kind = _lookup(STATISTICS, stat.kind, "statistic")
    width = view_dim(stat.view, dim, num_classes) if kind.needs_features else 0
    return kind.shape(width, num_classes, num_source_classes, stat.arrays), kind.dtype


def apply_view(view: View, batch: Batch) -> np.ndarray:
    x = batch.features
    for step in view:
        kind = _lookup(TRANSFORMS, step.op, "transform")
        x = kind.apply(x, batch, step.arrays)
    return x


def batch_sums(requests: Sequence[Stat], batch: Batch) -> dict[str, np.ndarray]:
    """Every requested statistic over one batch, as raw arrays (no finiteness check: the
    site's privacy layer decides what a non-finite row contribution becomes)."""
    views: dict[str, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for stat in requests:
        if stat.key in out:
            continue
        kind = _lookup(STATISTICS, stat.kind, "statistic")
        if kind.needs_source_probs and batch.source_probs is None:
            raise InvalidInputError(f"statistic {stat.kind!r} needs source probabilities, and this site has none")
        x = None
        if kind.needs_features:
            if stat.view_key not in views:
                views[stat.view_key] = apply_view(stat.view, batch)
            x = views[stat.view_key]
        out[stat.key] = np.asarray(kind.compute(x, batch, stat.arrays), dtype=kind.dtype)
    return out


def accumulate(requests: Sequence[Stat], batches: Iterable[Batch]) -> Statistics:
    """Sum every requested statistic over ``batches`` in one pass.

    Each distinct view is computed once per batch and shared by all requests on it; memory
    holds one batch and the running sums, whatever the number of rows.
    """
    totals: dict[str, np.ndarray] = {}
    for batch in batches:
        for key, value in batch_sums(requests, batch).items():
            totals[key] = value if key not in totals else totals[key] + value
    if not totals:
        return Statistics.empty()
    return Statistics(totals)