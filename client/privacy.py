"""The site's privacy pipeline: clip after the model, sum, add calibrated Gaussian noise.

A candidate model is untrusted: its weights can route raw records into its features. The
only defence that holds for any weights is in the site's own code, after the model
(research/PRIVACY.md sections 2 T2 and 4.2):

1. :func:`clip_rows` scales every feature row to L2 norm at most C (``policy.clip_norm``);
   non-finite rows become zero and are counted. Source probabilities are put back in the
   simplex (:func:`sanitize_probs`).
2. The catalogue sums the requested statistics over the clipped rows
   (:func:`fedmte.protocol.catalogue.accumulate`).
3. Every block b gets N(0, sigma_b^2) noise, Delta_b / sigma_b set by the policy's
   allocation of the release's mu^2 (:func:`fedmte.protocol.dp.allocate_sigmas`; Delta_b its
   L2 sensitivity, :func:`fedmte.protocol.dp.stat_sensitivity`), so the release is mu-GDP with
   mu fixed by the site's policy. Label-only blocks (``count``, ``class_counts``) are the same
   whatever the model, so each is computed and noised once per release and sent under every
   model's name; with class counts in the release, n is their noisy sum (free). Integer blocks
   (counts) are rounded after the noise, which is post-processing. Through the secure sum a
   site that opts in adds only a share of the noise (:func:`honest_shares`).
   Noise comes from a generator seeded with 256 fresh bits of the OS CSPRNG per release
   (:func:`noise_generator`), never from numpy's global state.
4. Classes whose *noisy* count is below ``policy.min_noisy_class_count`` have their
   class rows zeroed (shapes never depend on the data).
5. The ledger charges mu to the data source when the attempt starts, before the broadcast
   arrays are checked or a row is read; an identical request gets the same bytes back at no
   cost; a request past the cap is refused and audited. A failure after the charge is
   :class:`ReleaseFailed`, one text whatever the data; the reason stays in the audit log.

No row can turn a statistic into an error: broadcast arrays are finite and bounded
(:func:`check_broadcast`, :data:`MAX_BROADCAST_ABS`), and a row whose contribution is still not
finite is left out and counted (:func:`guarded_sums`), which the add/remove noise covers.

:class:`SitePrivacy` runs these steps for a :class:`ReleaseRequest` and, in
:meth:`SitePrivacy.disclose`, wraps the send in the audit log's intent and outcome records.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmte.client.audit_log import AuditLog
from fedmte.client.errors import reply_text
from fedmte.client.ledger import Ledger, Receipt
from fedmte.client.limits import DEFAULT_LIMITS, LimitExceededError, SiteLimits, check_release_limits
from fedmte.client.policy import DPPolicy, SitePolicy, check_coordinator, violations
from fedmte.protocol import dp
from fedmte.protocol.audit_format import DatasetRef, ModelRef, PrivacyCharge, StatBlock, canonical_json, dec
from fedmte.protocol.catalogue import STATISTICS, Batch, batch_sums, expected_shape
from fedmte.protocol.errors import (
    BudgetExceededError,
    FedmteError,
    InvalidInputError,
    PolicyRefusal,
    RefusalError,
    StatisticsError,
)
from fedmte.protocol.plan import traced_requests
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers import SCORERS

RELEASE_MAGIC = b"FMTREL1\n"
RELEASE_SCHEMA = "fedmte.release.v1"
SEED_BYTES = 32  # 256 bits of OS randomness per release
# Statistics whose first axis is the target class, zeroed for suppressed classes.
CLASS_INDEXED = frozenset({
    "class_sums", "class_sq_sums", "class_scatters", "soft_joint", "hard_joint", "tilted_joint",
    "gmm_soft_joint", "class_prob_outer_sums",
})
# Statistics that read only the labels: the same value whatever the model or view.
LABEL_ONLY = frozenset(kind for kind, spec in STATISTICS.items()
                       if not spec.needs_features and not spec.needs_source_probs)
_DTYPES = {"float64": np.dtype("<f8"), "int64": np.dtype("<i8")}
MAX_BROADCAST_ABS = 1e8
"""The largest magnitude a broadcast array entry (offset, basis, shift, classifier weights,
mixture means and precisions) may have. With rows clipped, every logit, exponent and moment
built from such arrays stays far inside float64, so no statistic can overflow on some rows
and not on others: a huge weight can no longer turn one row's value into an error."""
RELEASE_FAILED = "release:failed"


class ReleaseFailed(RefusalError):
    """A release that could not be computed. Its text is the same whatever the data and the
    reason (which stays in the site's audit log), and its privacy cost was charged first."""

    MESSAGE = ("refused by site: the release could not be computed, so nothing was released; its privacy cost "
               "was charged when the attempt started and the reason is in the site's audit log")

    def __init__(self) -> None:
        super().__init__(self.MESSAGE, reason_code=RELEASE_FAILED, rule="release")


# --------------------------------------------------------------------------- clipping

def clip_rows(x: np.ndarray, clip_norm: float) -> tuple[np.ndarray, int, int]:
    """(rows scaled to L2 norm <= clip_norm, how many were scaled, how many were non-finite).

    v -> v * min(1, C / ||v||), in float64; a row with NaN or Inf becomes zero. Returns a
    new array, never a view of the model's output.
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise InvalidInputError(f"the clip norm must be positive and finite, got {clip_norm}")
    x = np.array(x, dtype=np.float64, copy=True)
    if x.ndim != 2:
        raise InvalidInputError(f"features must be a (rows, dim) array, got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    x[bad] = 0.0
    norms = _row_norms(x)
    over = norms > clip_norm
    x[over] *= (clip_norm / norms[over])[:, None]
    # Rounding can leave a scaled row a few ulps above C; pull those just inside.
    still = _row_norms(x) > clip_norm
    x[still] *= (np.nextafter(clip_norm, 0.0) / _row_norms(x[still]))[:, None]
    return x, int(over.sum()), int(bad.sum())


def _row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row, scaled by the row's largest entry so 1e200 does not overflow."""
    top = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x))
    safe = np.where(top > 0, top, 1.0)
    scaled = x / safe[:, None]
    return top * np.sqrt(np.einsum("ij,ij->i", scaled, scaled))


def sanitize_probs(theta: np.ndarray) -> tuple[np.ndarray, int]:
    """(rows put in the probability simplex, how many needed repair).

    A row with a non-finite or negative entry, or that does not sum to 1 within 1e-6,
    is clamped to >= 0 and renormalised (uniform if nothing is left); the soft-count
    sensitivities assume simplex rows.
    """
    theta = np.array(theta, dtype=np.float64, copy=True)
    if theta.ndim != 2 or theta.shape[1] == 0:
        raise InvalidInputError(f"source probabilities must be a (rows, classes) array, got shape {theta.shape}")
    finite = np.isfinite(theta).all(axis=1)
    theta[~finite] = 0.0
    negative = (theta < 0).any(axis=1)
    np.maximum(theta, 0.0, out=theta)
    totals = theta.sum(axis=1)
    off = ~finite | negative | (np.abs(totals - 1.0) > 1e-6)
    empty = totals <= 0
    theta[empty] = 1.0 / theta.shape[1]
    totals[empty] = 1.0
    theta /= totals[:, None]
    return theta, int(off.sum())


@dataclass
class ClipCounts:
    """Running counts of what clipping changed, for the site's own report."""

    rows: int = 0
    clipped: int = 0
    nonfinite_features: int = 0
    repaired_probs: int = 0
    dropped_rows: int = 0  # rows whose statistics were not finite, left out of the sums


def clip_batch(batch: Batch, clip_norm: float, counts: ClipCounts | None = None) -> Batch:
    """The batch with features clipped and source probabilities in the simplex."""
    features, probs = batch.features, batch.source_probs
    scaled = bad = repaired = 0
    if features is not None:
        features, scaled, bad = clip_rows(features, clip_norm)
    if probs is not None:
        probs, repaired = sanitize_probs(probs)
    if counts is not None:
        counts.rows += len(batch.labels)
        counts.clipped += scaled
        counts.nonfinite_features += bad
        counts.repaired_probs += repaired
    return Batch(features=features, labels=batch.labels, num_classes=batch.num_classes, source_probs=probs,
                 row_ids=batch.row_ids)


def clip_batches(batches: Iterable[Batch], clip_norm: float, counts: ClipCounts | None = None) -> Iterator[Batch]:
    """Clip a stream of batches lazily (memory holds one batch)."""
    for batch in batches:
        yield clip_batch(batch, clip_norm, counts)


# --------------------------------------------------------------------------- noise

def noise_generator() -> np.random.Generator:
    """A fresh numpy generator seeded with 256 bits from the OS CSPRNG (``secrets``)."""
    return np.random.default_rng(int.from_bytes(secrets.token_bytes(SEED_BYTES), "big"))


def add_noise(value: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """value + N(0, sigma^2) per coordinate; integer blocks are rounded back to int64."""
    value = np.asarray(value)
    noisy = value.astype(np.float64) + rng.normal(0.0, sigma, size=value.shape)
    if value.dtype.kind in "iu":
        return np.rint(noisy).astype(np.int64)
    return noisy


# --------------------------------------------------------------------------- payload encoding

def encode_release(blocks: Mapping[str, np.ndarray]) -> bytes:
    """Deterministic bytes of named float64/int64 arrays: magic, header length, canonical JSON
    header (key, dtype, shape per block, sorted by key), then little-endian data. No pickle."""
    entries, chunks = [], []
    for key in sorted(blocks):
        array = np.asarray(blocks[key])
        name = {"f": "float64", "i": "int64"}.get(array.dtype.kind) if array.dtype.itemsize == 8 else None
        if name is None:
            raise InvalidInputError(f"block {key!r} has dtype {array.dtype}; releases hold float64 and int64 only")
        if name == "float64" and not np.isfinite(array).all():
            raise InvalidInputError(f"block {key!r} holds NaN or Inf")
        entries.append({"key": key, "dtype": name, "shape": list(array.shape)})
        chunks.append(np.ascontiguousarray(array, dtype=_DTYPES[name]).tobytes())
    header = canonical_json({"schema": RELEASE_SCHEMA, "blocks": entries})
    return RELEASE_MAGIC + struct.pack(">Q", len(header)) + header + b"".join(chunks)


def decode_release(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_release`; raises :class:`StatisticsError` on anything malformed."""
    if not data.startswith(RELEASE_MAGIC) or len(data) < len(RELEASE_MAGIC) + 8:
        raise StatisticsError("not a fedmte release (bad magic)")
    offset = len(RELEASE_MAGIC)
    (length,) = struct.unpack(">Q", data[offset:offset + 8])
    offset += 8
    if length > len(data) - offset:
        raise StatisticsError("release header runs past the end of the data")
    try:
        header = json.loads(data[offset:offset + length])
        entries = header["blocks"]
        if header.get("schema") != RELEASE_SCHEMA or not isinstance(entries, list):
            raise ValueError("wrong schema")
    except (ValueError, KeyError, TypeError) as error:
        raise StatisticsError(f"release header is malformed: {error}") from None
    offset += length
    out: dict[str, np.ndarray] = {}
    for entry in entries:
        try:
            key, dtype, shape = str(entry["key"]), _DTYPES[entry["dtype"]], tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise StatisticsError(f"release block entry {entry!r} is malformed") from None
        if any(s < 0 for s in shape) or key in out:
            raise StatisticsError(f"release block {key!r} has a bad shape or is repeated")
        size = math.prod(shape) * dtype.itemsize
        if size > len(data) - offset:
            raise StatisticsError(f"release block {key!r} runs past the end of the data")
        array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
        out[key] = array.astype(array.dtype.newbyteorder("="))
        offset += size
    if offset != len(data):
        raise StatisticsError(f"{len(data) - offset} unexpected bytes after the last release block")
    return out


def block_name(weights_sha256: str, stat: Stat) -> str:
    """A released block's name: the model's weights hash and the request key."""
    return f"{weights_sha256}/{stat.key}"


# --------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class SecureContext:
    """The secure sum a release is masked into (:mod:`fedmte.client.secure_site`): its job,
    the threshold t of uploads any unmasked sum needs, its N sites, and whether self masks
    are on. Public parameters of the job, no data."""

    job_id: str
    threshold: int
    sites: int
    self_masks: bool = True


def honest_shares(settings: DPPolicy, secure: SecureContext | None) -> int:
    """h, the number of honest noise shares any released sum is guaranteed to hold; the site
    adds sigma^2 / h of each (float) block's noise variance, full noise when h is 1.

    With ``distributed`` on and the release going through a secure sum with self masks,
    h = t - c, c the policy's ``colluding_sites`` (unset: N - t, the secure sum's own collusion
    tolerance), and h < 2 means full noise. Why t - c and not t: the coordinator can falsely
    declare honest sites dropped, and the secure sum then unmasks a sum of t uploads of which
    up to c come from colluders whose inputs (and noise) the coordinator knows, so only t - c
    honest shares are guaranteed in a released sum. This is stricter than "any t honest
    sites" on purpose. Without the secure sum (a plain sum, or self masks off, where a site
    declared dropped after its upload is read on its own) the site adds full noise, whatever
    the policy says.
    """
    if not (settings.enabled and settings.distributed) or secure is None or not secure.self_masks:
        return 1
    colluders = settings.colluding_sites if settings.colluding_sites is not None else secure.sites - secure.threshold
    shares = secure.threshold - colluders
    return shares if shares >= 2 else 1


@dataclass(frozen=True)
class ModelRequest:
    """One candidate model's part of a request: what it is and which statistics to release."""

    arch_id: str
    weights_sha256: str
    feature_dim: int
    stats: tuple[Stat, ...]
    num_source_classes: int = 0

    @property
    def ref(self) -> ModelRef:
        return ModelRef(arch_id=self.arch_id, weights_sha256=self.weights_sha256)

    def unique_stats(self) -> list[Stat]:
        return list({stat.key: stat for stat in self.stats}.values())


@dataclass(frozen=True)
class ReleaseRequest:
    """A verified request for one release from one data source (who, why, what)."""

    requester: str  # hex SHA-256 of the coordinator's Ed25519 key, checked against the policy
    recipient: str
    run_id: str
    round: int
    data_source: str
    dataset_version: str  # hex SHA-256 fingerprint of the exact data read
    num_classes: int
    models: tuple[ModelRequest, ...]
    scorers: tuple[str, ...] = ()
    purpose: str = ""
    request_sha256: str | None = None
    secure: SecureContext | None = None  # the secure sum the release goes through, None for a plain sum

    @property
    def dataset(self) -> DatasetRef:
        return DatasetRef(data_source=self.data_source, version_sha256=self.dataset_version)


def request_fingerprint(request: ReleaseRequest, policy_sha256: str, shares: int = 1) -> str:
    """What makes two requests the same release: the data, the policy, the models and the
    statistics (with their views and arguments), not the run, round or requester; and how
    it leaves: plain or through the secure sum, and the noise share (``shares``,
    :func:`honest_shares`). Bytes with share noise are private only inside one secure sum,
    so they are never replayed in the clear, at another share, or into another secure job
    (sums of the same shares over other sets of sites could be differenced): the job id is
    part of such a release's fingerprint."""
    description = {
        "secure": request.secure is not None,
        "honest_shares": shares,
        "secure_job": request.secure.job_id if request.secure is not None and shares > 1 else None,
        "data_source": request.data_source,
        "dataset_version": request.dataset_version,
        "policy_sha256": policy_sha256,
        "num_classes": request.num_classes,
        "models": [
            {"arch_id": m.arch_id, "weights_sha256": m.weights_sha256, "feature_dim": m.feature_dim,
             "num_source_classes": m.num_source_classes, "stats": sorted(s.key for s in m.unique_stats())}
            for m in sorted(request.models, key=lambda m: m.weights_sha256)
        ],
    }
    return hashlib.sha256(canonical_json(description)).hexdigest()


@dataclass(frozen=True)
class PlannedBlock:
    """One block of a release: its shape, sensitivity and the noise std this site adds (0
    without DP). Blocks with the same ``group`` hold one value, noised once (label-only
    statistics); a block ``derived_from`` a group is computed from that group's noisy value
    and adds no noise of its own (n from the class counts). ``sigma_full`` is the calibrated
    std before any secure-sum share (:func:`honest_shares`); ``sigma`` is what the site adds."""

    model: ModelRequest
    stat: Stat
    shape: tuple[int, ...]
    dtype: np.dtype
    sensitivity: float | None
    sigma: float
    internal: bool = False  # computed and noised only to decide which classes to suppress; never sent
    group: str = ""  # the allocation unit; empty: the block's own name
    derived_from: str | None = None
    sigma_full: float = 0.0

    @property
    def name(self) -> str:
        return block_name(self.model.weights_sha256, self.stat)

    @property
    def unit(self) -> str:
        return self.group or self.name

    @property
    def entries(self) -> int:
        return math.prod(self.shape)

    def audit(self) -> StatBlock:
        return StatBlock(model_sha256=self.model.weights_sha256, key=self.name, kind=self.stat.kind,
                         shape=list(self.shape), dtype=str(self.dtype),
                         sensitivity=None if self.sensitivity is None else dec(self.sensitivity),
                         noise_std=dec(self.sigma) if self.sensitivity is not None else None)


def check_broadcast(request: ReleaseRequest) -> None:
    """Refuse a request whose broadcast arrays are not finite or exceed
    :data:`MAX_BROADCAST_ABS`; decided from the request alone, before any row is read."""
    for model in request.models:
        for stat in model.unique_stats():
            named = [(f"{stat.kind}.{name}", array) for name, array in stat.args]
            named += [(f"{step.op}.{name}", array) for step in stat.view for name, array in step.args]
            for label, array in named:
                values = np.asarray(array)
                if values.dtype.kind not in "fiub":
                    raise RefusalError(f"refused by site: broadcast array {label} has dtype {values.dtype}; send numbers",
                                       reason_code="broadcast:dtype", rule="broadcast.bounds")
                values = values.astype(np.float64, copy=False)
                if values.size and not (np.isfinite(values).all() and np.abs(values).max() <= MAX_BROADCAST_ABS):
                    raise RefusalError(
                        f"refused by site: broadcast array {label} holds values that are not finite or exceed "
                        f"{MAX_BROADCAST_ABS:g} in magnitude; rescale it (features are clipped to the policy's clip norm)",
                        reason_code="broadcast:out_of_bounds", rule="broadcast.bounds")


def guarded_sums(stats: Sequence[Stat], batches: Iterable[Batch], counts: ClipCounts) -> dict[str, np.ndarray]:
    """Sum the statistics over the batches so that no row can make a sum non-finite: a batch
    whose sums are finite is added whole; otherwise its rows are added one by one and a row
    whose contribution is not finite is left out (and counted, for the site's own report).
    Leaving a row out is within the add/remove sensitivity every block is noised for."""
    totals: dict[str, np.ndarray] = {}

    def add(sums: Mapping[str, np.ndarray]) -> None:
        for key, value in sums.items():
            totals[key] = value if key not in totals else totals[key] + value

    for batch in batches:
        with np.errstate(all="ignore"):
            sums = batch_sums(stats, batch)
        if all(np.isfinite(value).all() for value in sums.values()):
            add(sums)
            continue
        for row in range(len(batch.labels)):
            with np.errstate(all="ignore"):
                sums = batch_sums(stats, batch.rows(slice(row, row + 1)))
            if all(np.isfinite(value).all() for value in sums.values()):
                add(sums)
            else:
                counts.dropped_rows += 1
    return totals


def release_shapes(request: ReleaseRequest) -> list[tuple[int, ...]]:
    """The shape of every block a release asks for, from the request alone (a block whose
    shape the catalogue refuses is left to plan_blocks, after the charge)."""
    shapes: list[tuple[int, ...]] = []
    for model in request.models:
        for stat in model.unique_stats():
            try:
                shapes.append(tuple(expected_shape(stat, model.feature_dim, request.num_classes,
                                                   model.num_source_classes)[0]))
            except FedmteError:
                continue
    return shapes


def label_group(stat: Stat) -> str:
    """The one allocation unit of a label-only statistic in a release, whatever its model and view."""
    return "labels/" + Stat(stat.kind, (), stat.args).key


def plan_blocks(request: ReleaseRequest, policy: SitePolicy) -> list[PlannedBlock]:
    """Shapes, sensitivities and noise for every block of a release; pure, no data read.

    With DP on, the release's mu^2 is split over its noised units by the policy's allocation
    (:func:`fedmte.protocol.dp.allocate_sigmas`), so sqrt(sum (Delta_b / sigma_b)^2) over the
    units is mu_per_release. A unit is a block, except that a label-only statistic is one unit
    for the whole release (every model's copy holds the same noisy value), and ``count`` is no
    unit at all when the release has class counts: it is their noisy sum, with std
    sigma_cc * sqrt(C). When the policy suppresses small classes and a model's release has
    class-indexed blocks but no class counts, noisy counts are planned as an internal block
    (within the same mu), so the suppression rule holds for every release; the internal block
    never leaves the site. Through the secure sum with share noise the site adds sigma / sqrt(h)
    on float blocks (:func:`honest_shares`); integer blocks keep full noise, since rounding a
    share of the noise at each site is not post-processing of the noisy sum.
    """
    settings = policy.dp
    raw: list[PlannedBlock] = []
    for model in request.models:
        stats = [(stat, False) for stat in model.unique_stats()]
        kinds = {stat.kind for stat, _ in stats}
        if settings.enabled and policy.min_noisy_class_count > 0 and kinds & CLASS_INDEXED and "class_counts" not in kinds:
            stats.append((Stat.of("class_counts"), True))  # suppression needs noisy counts; they share this release's mu
        for stat, internal in stats:
            shape, dtype = expected_shape(stat, model.feature_dim, request.num_classes, model.num_source_classes)
            delta = dp.stat_sensitivity(stat, policy.clip_norm, settings.neighbouring) if settings.enabled else None
            group = label_group(stat) if settings.enabled and stat.kind in LABEL_ONLY else ""
            raw.append(PlannedBlock(model, stat, tuple(shape), np.dtype(dtype), delta, 0.0, internal, group))
    if not settings.enabled:
        return raw
    counts_group = next((b.group for b in raw if b.stat.kind == "class_counts" and not b.stat.args), None)
    if counts_group is not None:
        raw = [replace(b, derived_from=counts_group) if b.stat.kind == "count" else b for b in raw]
    units: dict[str, PlannedBlock] = {}
    for block in raw:
        if block.derived_from is None:
            units.setdefault(block.unit, block)
    readers: dict[str, set[str]] = {unit: set() for unit in units}
    for block in raw:  # which requested scores read each unit (the by_scorer split)
        if block.derived_from is None:
            readers[block.unit] |= {f"{block.model.weights_sha256}:{scorer}" for scorer in request.scorers
                                    if scorer in SCORERS and block.stat.kind in traced_requests(scorer)[0]}
    full = dict(zip(units, dp.allocate_sigmas([b.sensitivity or 0.0 for b in units.values()],
                                              [b.entries for b in units.values()], settings.mu_per_release,
                                              settings.allocation, readers=[readers[u] for u in units])))
    shares = honest_shares(settings, request.secure)
    added = {unit: sigma / math.sqrt(shares) if shares > 1 and units[unit].dtype.kind == "f" else sigma
             for unit, sigma in full.items()}
    planned = []
    for block in raw:
        if block.derived_from is not None:
            source = units[block.derived_from]
            factor = math.sqrt(source.entries)
            planned.append(replace(block, sigma=added[source.unit] * factor, sigma_full=full[source.unit] * factor))
        else:
            planned.append(replace(block, sigma=added[block.unit], sigma_full=full[block.unit]))
    return planned


def plan_units(planned: Sequence[PlannedBlock]) -> list[PlannedBlock]:
    """One block per allocation unit of a plan (derived blocks left out): the Gaussian
    mechanisms the release is made of, for its mu (:func:`fedmte.protocol.dp.release_mu`)."""
    units: dict[str, PlannedBlock] = {}
    for block in planned:
        if block.derived_from is None and block.sensitivity and block.entries:
            units.setdefault(block.unit, block)
    return list(units.values())


def add_release_noise(blocks: dict[str, np.ndarray], planned: Sequence[PlannedBlock],
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The planned noise, in place: each unit noised once and its value put under every
    member's name, then derived blocks computed from the noisy values (post-processing)."""
    noisy: dict[str, np.ndarray] = {}
    for block in planned:
        if block.derived_from is not None:
            continue
        if block.unit not in noisy:
            value = blocks[block.name]
            noisy[block.unit] = add_noise(value, block.sigma, rng) if block.sigma > 0 else value
        blocks[block.name] = noisy[block.unit]
    for block in planned:
        if block.derived_from is not None:
            blocks[block.name] = np.asarray(noisy[block.derived_from].sum(), dtype=block.dtype).reshape(block.shape)
    return blocks


def suppress_small_classes(blocks: dict[str, np.ndarray], planned: Sequence[PlannedBlock],
                           min_count: float) -> dict[str, list[int]]:
    """Zero the class rows of classes whose noisy count is below ``min_count``, in place.

    Decided per model from that model's noisy ``class_counts`` (released, or planned as an
    internal block, :func:`plan_blocks`). Returns {weights_sha256: suppressed classes}.
    """
    suppressed: dict[str, list[int]] = {}
    if min_count <= 0:
        return suppressed
    by_model: dict[str, list[PlannedBlock]] = {}
    for block in planned:
        by_model.setdefault(block.model.weights_sha256, []).append(block)
    for sha, model_blocks in by_model.items():
        counts = next((blocks[b.name] for b in model_blocks if b.stat.kind == "class_counts"), None)
        if counts is None:
            continue
        small = [int(c) for c in np.flatnonzero(counts < min_count)]
        if not small:
            continue
        suppressed[sha] = small
        for block in model_blocks:
            if block.stat.kind in CLASS_INDEXED:
                blocks[block.name] = np.array(blocks[block.name], copy=True)
                blocks[block.name][small] = 0
    return suppressed


@dataclass(frozen=True)
class Release:
    """What a site is ready to send for one request, and what the audit log must say about it."""

    payload: bytes
    fingerprint: str
    privacy: PrivacyCharge
    statistics: list[StatBlock]
    models: list[ModelRef]
    dataset: DatasetRef
    suppressed_classes: dict[str, list[int]] = field(default_factory=dict)

    def blocks(self) -> dict[str, np.ndarray]:
        return decode_release(self.payload)


BatchSource = Callable[[ModelRequest], Iterable[Batch]]


class SitePrivacy:
    """Policy, ledger and audit log together: every release is checked, clipped, noised,
    charged and recorded here."""

    def __init__(self, policy: SitePolicy, ledger: Ledger, log: AuditLog, limits: SiteLimits = DEFAULT_LIMITS) -> None:
        self.policy = policy
        self.limits = limits
        self.ledger = ledger
        self.log = log
        self.policy_sha256 = policy.sha256()
        self.last_clip_counts = ClipCounts()

    @classmethod
    def open(cls, policy: SitePolicy, *, audit_dir: Path | str, ledger_dir: Path | str, site_id: str,
             signing_key: Ed25519PrivateKey, checkpoint_every: int = 100,
             limits: SiteLimits = DEFAULT_LIMITS) -> SitePrivacy:
        """Open the audit log, then the ledger checked against the head the log recorded
        (so a rolled-back ledger is refused before any request is served)."""
        log = AuditLog.open(audit_dir, site_id=site_id, signing_key=signing_key, checkpoint_every=checkpoint_every)
        try:
            ledger = Ledger.open(ledger_dir, site_id=site_id, expected=log.ledger_head)
        except BaseException:
            log.close()
            raise
        return cls(policy, ledger, log, limits)

    def close(self) -> None:
        self.log.close()

    # ------------------------------------------------------------------ checks

    def _refuse(self, request: ReleaseRequest, error: RefusalError) -> None:
        self.log.refusal(requester=request.requester, run_id=request.run_id, round=request.round,
                         reason_code=error.reason_code, rule=error.rule, message=str(error),
                         purpose=request.purpose, request_sha256=request.request_sha256,
                         data_source=request.data_source, models=[m.ref for m in request.models])

    def check(self, request: ReleaseRequest) -> None:
        """Raise (and audit) a :class:`PolicyRefusal` naming every rule the request breaks."""
        found: list[tuple[str, str]] = []
        try:
            check_coordinator(self.policy, request.requester)
        except PolicyRefusal as refusal:
            found += refusal.violations
        if not request.models:
            found.append(("request", "the request names no model"))
        for model in request.models:
            for rule, message in violations(
                self.policy, [s.kind for s in model.stats], request.scorers, model.arch_id, model.feature_dim,
                transforms={step.op for s in model.stats for step in s.view},
            ):
                if (rule, message) not in found:
                    found.append((rule, message))
        if found:
            refusal = PolicyRefusal(found)
            self._refuse(request, refusal)
            raise refusal

    # ------------------------------------------------------------------ releasing

    def prepare(self, request: ReleaseRequest, batches_for: BatchSource) -> Release:
        """Check, charge, compute, clip, noise and keep one release; nothing is sent here.

        The order is what makes a failure safe to report: the policy and the budget are
        checked from the request alone; then the release's cost is charged (an attempt pays
        whether or not it ends in a release); then the broadcast arrays are checked, the
        release planned (shapes, sensitivities, noise) and the rows read. A failure after the charge is :class:`ReleaseFailed`, whose text does not
        depend on the data; the reason goes to the audit log with the reply's exact bytes.
        ``batches_for(model)`` streams that model's (unclipped) feature batches; it is only
        called when the release is new and within budget.
        """
        self.check(request)
        try:
            check_release_limits(self.limits, release_shapes(request))
        except LimitExceededError as error:
            self._refuse(request, error)
            raise
        dp_on = self.policy.dp.enabled
        shares = honest_shares(self.policy.dp, request.secure)
        fingerprint = request_fingerprint(request, self.policy_sha256, shares)
        reserved = None
        if dp_on:
            cached = self.ledger.lookup(fingerprint)
            if cached is not None:  # the same request was answered before: its plan was sound
                payload, receipt = cached
                return self._release(request, plan_blocks(request, self.policy), payload, fingerprint, cached=True,
                                     receipt=receipt, suppressed=receipt.suppressed_classes)
            try:
                reserved = self.ledger.reserve(request.data_source, self.policy.dp.mu_per_release, self.policy.dp.mu_cap,
                                               mu_alone_release=self._mu_alone(shares))
            except BudgetExceededError as error:
                self._refuse(request, error)
                raise
        planned: list[PlannedBlock] = []
        try:
            check_broadcast(request)
            planned = plan_blocks(request, self.policy)
            blocks = self._compute(request, planned, batches_for)
            suppressed: dict[str, list[int]] = {}
            if dp_on:
                add_release_noise(blocks, planned, noise_generator())
                suppressed = suppress_small_classes(blocks, planned, self.policy.min_noisy_class_count)
            payload = encode_release({b.name: blocks[b.name] for b in planned if not b.internal})
        except RefusalError as refusal:  # decided from the request alone: its own words may go back
            self._failed(request, planned, refusal, refusal, fingerprint, reserved)
            refusal.reply_audited = True  # type: ignore[attr-defined]
            raise
        except Exception as error:  # noqa: BLE001 - whatever went wrong, the coordinator sees one text
            generic = ReleaseFailed()
            self._failed(request, planned, generic, error, fingerprint, reserved)
            generic.reply_audited = True  # type: ignore[attr-defined]
            raise generic from None
        if reserved is None:
            return self._release(request, planned, payload, fingerprint, cached=False, receipt=None,
                                 suppressed=suppressed)
        receipt = self.ledger.keep(reserved, fingerprint, payload, suppressed_classes=suppressed)
        return self._release(request, planned, payload, fingerprint, cached=False, receipt=receipt,
                             suppressed=suppressed)

    def _mu_alone(self, shares: int) -> float:
        """What one release costs by the site's guarantee alone: mu * sqrt(h). Exact when every
        block carries share noise, an upper bound when integer blocks keep full noise."""
        mu = self.policy.dp.mu_per_release
        return mu if shares == 1 else mu * math.sqrt(shares)

    def _failed(self, request: ReleaseRequest, planned: Sequence[PlannedBlock], reply: RefusalError,
                cause: BaseException, fingerprint: str, reserved: Receipt | None) -> None:
        """Audit a failed attempt: the detailed cause (an abort record, for the data owner),
        then the error reply's exact bytes with the charge it cost (intent and outcome)."""
        self.log.abort(run_id=request.run_id[:64], reason_code=reply.reason_code[:64],
                       detail=f"round {request.round}: {reply_text(cause)}"[:4096])
        failed = self._release(request, planned, b"", fingerprint, cached=False, receipt=reserved, suppressed={})
        with self.log.transmission(
            reply_text(reply).encode("utf-8"), requester=request.requester, recipient=request.recipient,
            run_id=request.run_id, round=request.round, purpose=request.purpose, request_sha256=request.request_sha256,
            models=failed.models, dataset=failed.dataset, statistics=[], privacy=failed.privacy,
        ):
            pass  # the transport sends the error reply

    def _compute(self, request: ReleaseRequest, planned: Sequence[PlannedBlock],
                 batches_for: BatchSource) -> dict[str, np.ndarray]:
        counts = ClipCounts()
        blocks: dict[str, np.ndarray] = {}
        done: dict[str, str] = {}  # label-only unit -> the block name that holds its value
        for model in request.models:
            mine = []
            for block in planned:
                if block.model is not model:
                    continue
                if block.group and block.group in done:  # the same labels, already summed for another model
                    blocks[block.name] = np.array(blocks[done[block.group]], copy=True)
                    continue
                mine.append(block)
            if not mine:
                continue
            sums = guarded_sums([b.stat for b in mine], clip_batches(batches_for(model), self.policy.clip_norm, counts),
                                counts)
            for block in mine:
                value = sums[block.stat.key] if block.stat.key in sums else np.zeros(block.shape, block.dtype)
                value = np.asarray(value, dtype=block.dtype)
                if value.shape != block.shape:
                    raise StatisticsError(f"{block.stat.kind} for model {model.weights_sha256[:12]} came out "
                                          f"{value.shape}, expected {block.shape}")
                if not np.isfinite(value).all():
                    raise StatisticsError(f"{block.stat.kind} for model {model.weights_sha256[:12]} overflowed")
                blocks[block.name] = np.array(value, copy=True)
                if block.group:
                    done.setdefault(block.group, block.name)
        self.last_clip_counts = counts
        return blocks

    def _release(self, request: ReleaseRequest, planned: Sequence[PlannedBlock], payload: bytes, fingerprint: str,
                 *, cached: bool, receipt: Receipt | None, suppressed: dict[str, list[int]]) -> Release:
        """The release and its audit charge; ``receipt`` is the ledger's (None without DP)."""
        settings = self.policy.dp
        head = self.ledger.head
        source = request.data_source
        if receipt is None:
            before = after = self.ledger.spent_mu_sq(source)
            alone_before = alone_after = self.ledger.spent_alone_sq(source)
        else:
            before, after = receipt.mu_sq_before, receipt.mu_sq_after
            alone_before, alone_after = receipt.mu_alone_sq_before, receipt.mu_alone_sq_after
        shares = honest_shares(settings, request.secure)
        secure = request.secure
        charge = PrivacyCharge(
            mechanism="gaussian" if settings.enabled else "none",
            neighbouring=settings.neighbouring,
            clip_norm=dec(self.policy.clip_norm),
            mu_release=dec(settings.mu_per_release) if settings.enabled else None,
            cached=cached,
            mu_sq_before=dec(before),
            mu_sq_after=dec(after),
            mu_cap=dec(settings.mu_cap) if settings.enabled else None,
            delta=dec(settings.delta),
            epsilon_spent=dec(dp.gdp_epsilon(math.sqrt(after), settings.delta)),
            epsilon_budget=dec(settings.epsilon_budget) if settings.enabled else None,
            ledger_version=head.version,
            ledger_sha256=head.sha256,
            policy_sha256=self.policy_sha256,
            suppressed_classes=suppressed,
            allocation=settings.allocation if settings.enabled else None,
            secure_threshold=secure.threshold if secure is not None else None,
            secure_sites=secure.sites if secure is not None else None,
            colluding_sites=(settings.colluding_sites if settings.colluding_sites is not None
                             else secure.sites - secure.threshold) if secure is not None and settings.distributed else None,
            honest_shares=shares if settings.enabled else None,
            noise_share=dec(1.0 / shares) if settings.enabled else None,
            mu_alone_release=dec(self._mu_alone(shares)) if settings.enabled else None,
            mu_alone_sq_before=dec(alone_before),
            mu_alone_sq_after=dec(alone_after),
            epsilon_alone_spent=dec(dp.gdp_epsilon(math.sqrt(alone_after), settings.delta)),
        )
        return Release(payload=payload, fingerprint=fingerprint, privacy=charge,
                       statistics=[block.audit() for block in planned if not block.internal],
                       models=[m.ref for m in request.models],
                       dataset=request.dataset, suppressed_classes=suppressed)

    def disclose(self, request: ReleaseRequest, batches_for: BatchSource, send: Callable[[bytes], object]) -> Release:
        """prepare, then write the intent, ``send(payload)``, and write the outcome."""
        release = self.prepare(request, batches_for)
        with self.log.transmission(
            release.payload, requester=request.requester, recipient=request.recipient, run_id=request.run_id,
            round=request.round, purpose=request.purpose, request_sha256=request.request_sha256,
            models=release.models, dataset=release.dataset, statistics=release.statistics, privacy=release.privacy,
        ):
            send(release.payload)
        return release
