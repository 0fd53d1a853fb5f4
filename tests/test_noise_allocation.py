"""How a release's privacy is split over its blocks (protocol/dp.allocate_sigmas, client/privacy.plan_blocks):
the split always composes to the policy's mu (checked against dp-accounting too), by-size gives the
large blocks the budget, and label-only blocks are noised once per release."""

from __future__ import annotations

import hashlib
import math

import dp_accounting
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dp_accounting import pld, rdp

from fedmte.client.audit_log import key_fingerprint, read_records
from fedmte.client.policy import DPPolicy, SitePolicy, parse_policy
from fedmte.client.privacy import (
    ModelRequest,
    ReleaseRequest,
    SitePrivacy,
    block_name,
    decode_release,
    plan_blocks,
    plan_units,
)
from fedmte.protocol import dp
from fedmte.protocol.audit_format import IntentRecord
from fedmte.protocol.catalogue import Batch
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.plan import traced_requests
from fedmte.protocol.requests import Stat

COORDINATOR = Ed25519PrivateKey.generate().public_key()
SHAS = ("ab" * 32, "cd" * 32)
DIM, CLASSES = 8, 4
STATS = (Stat.of("count"), Stat.of("class_counts"), Stat.of("class_sums"), Stat.of("gram"))
DELTA = 1e-6


def policy(**dp_settings: object) -> SitePolicy:
    return SitePolicy(allowed_scorers={"hscore"}, allowed_statistics={s.kind for s in STATS},
                      allowed_architectures={"mlp"}, max_feature_dim=DIM, clip_norm=1.0,
                      coordinator_keys={"c": key_fingerprint(COORDINATOR)}, dp=DPPolicy(**dp_settings))


def request(models: int = 2, stats: tuple[Stat, ...] = STATS, version: bytes = b"v") -> ReleaseRequest:
    return ReleaseRequest(requester=key_fingerprint(COORDINATOR), recipient="c", run_id="r", round=1,
                          data_source="ward", dataset_version=hashlib.sha256(version).hexdigest(),
                          num_classes=CLASSES, models=tuple(ModelRequest("mlp", sha, DIM, stats) for sha in SHAS[:models]),
                          scorers=("hscore",))


# --------------------------------------------------------------------------- the pure split

GRIDS = [
    ([1.0], [1]),
    ([1.0, 1.0, 1.0, 1.0], [1, 10, 640, 2080]),
    ([1.0, 2.0, 4.0, 0.5, 1.0], [1, 4, 64, 36, 5]),
    ([3.0, 1.0, 0.0, 1.0], [100, 1, 7, 0]),  # a block that cannot move and one with no entries
]


@pytest.mark.parametrize("rule", ["by_scorer", "by_size", "even"])
@pytest.mark.parametrize(("sensitivities", "entries"), GRIDS)
@pytest.mark.parametrize("mu", [0.05, 0.2367, 1.0, 3.0])
def test_every_split_composes_to_exactly_mu(rule: str, sensitivities: list[float], entries: list[int], mu: float) -> None:
    readers = [{"a"} if k % 2 else {"a", "b"} for k in range(len(entries))]  # some blocks shared, some not
    sigmas = dp.allocate_sigmas(sensitivities, entries, mu, rule, readers=readers)  # type: ignore[arg-type]
    moving = [(d, s) for d, s, e in zip(sensitivities, sigmas, entries) if d > 0 and e > 0]
    assert dp.release_mu([d for d, _ in moving], [s for _, s in moving]) == pytest.approx(mu, rel=1e-12)
    assert all(s == 0.0 for d, s, e in zip(sensitivities, sigmas, entries) if d == 0 or e == 0)


def test_by_size_shares_follow_the_square_root_of_the_entries_and_even_matches_the_old_multiplier() -> None:
    deltas, entries, mu = [1.0, 1.0, 1.0, 1.0], [1, 10, 640, 2080], 0.2367
    sigmas = dp.allocate_sigmas(deltas, entries, mu, "by_size")
    rho = [(d / s) ** 2 for d, s in zip(deltas, sigmas)]
    weights = np.sqrt(entries)
    assert rho == pytest.approx(list(mu ** 2 * weights / weights.sum()), rel=1e-12)
    even = dp.allocate_sigmas(deltas, entries, mu, "even")
    assert even == pytest.approx([dp.noise_multiplier(mu, 4)] * 4, rel=1e-15)
    # the Gram (2080 entries) gets less noise than under the even split, the count more
    assert sigmas[3] < even[3] and sigmas[0] > even[0]


def test_by_scorer_gives_every_score_the_same_share_and_splits_it_by_size() -> None:
    """Two scores of one model: A reads the class counts, the class sums and a huge scatter block,
    B the class counts and the class sums. By size the scatter takes most of mu^2; by scorer each
    score holds half, so the blocks B reads get more than by size, and the shared ones the most."""
    deltas, entries, mu = [1.0, 1.0, 1.0], [10, 640, 20_800], 0.2367
    readers = [{"A", "B"}, {"A", "B"}, {"A"}]
    by_size = dp.allocate_sigmas(deltas, entries, mu, "by_size")
    by_scorer = dp.allocate_sigmas(deltas, entries, mu, "by_scorer", readers=readers)
    rho = np.array([(d / s) ** 2 for d, s in zip(deltas, by_scorer)])
    root = np.sqrt(entries)
    share_a = root / root.sum()  # A's half, split by size over its three blocks
    share_b = np.array([root[0], root[1], 0.0]) / (root[0] + root[1])
    assert rho == pytest.approx(list(mu ** 2 * (share_a + share_b) / 2), rel=1e-12)
    assert by_scorer[0] < by_size[0] and by_scorer[1] < by_size[1] and by_scorer[2] > by_size[2]
    # no readers: by size; a block nobody reads is a reader of its own
    assert dp.allocate_sigmas(deltas, entries, mu, "by_scorer") == by_size
    alone = dp.allocate_sigmas(deltas, entries, mu, "by_scorer", readers=[{"A"}, {"A"}, set()])
    assert dp.release_mu(deltas, alone) == pytest.approx(mu, rel=1e-12)


def test_a_release_splits_its_budget_by_the_scores_the_job_asked_for() -> None:
    """At a site, by_scorer reads the request's scorers: what each traces to
    (:func:`fedmte.protocol.plan.traced_requests`) decides which blocks are whose."""
    kinds, _ = traced_requests("hscore")
    assert {"class_counts", "class_sums", "gram"} <= kinds and "class_scatters" not in kinds
    assert "class_scatters" in traced_requests("transrate")[0] and "gram" not in traced_requests("transrate")[0]
    planned = plan_blocks(request(), policy(allocation="by_scorer"))
    units = plan_units(planned)
    assert dp.release_mu([b.sensitivity for b in units], [b.sigma for b in units]) == pytest.approx(
        DPPolicy().mu_per_release, rel=1e-12)


def test_by_size_minimises_the_summed_relative_noise() -> None:
    """sum_b entries_b / rho_b is smallest at rho proportional to sqrt(entries): any other split of mu^2 is worse."""
    entries, mu = np.array([1.0, 4.0, 36.0, 528.0]), 0.5

    def cost(rho: np.ndarray) -> float:
        return float((entries / rho).sum())

    best = cost(np.array([(1.0 / s) ** 2 for s in dp.allocate_sigmas([1.0] * 4, entries.astype(int).tolist(), mu)]))
    rng = np.random.default_rng()
    for _ in range(200):
        other = rng.dirichlet(np.ones(4)) * mu ** 2
        assert cost(other) >= best * (1 - 1e-12)
    assert cost(np.full(4, mu ** 2 / 4)) > best


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(InvalidInputError):
        dp.allocate_sigmas([1.0], [1, 2], 1.0)
    with pytest.raises(InvalidInputError):
        dp.allocate_sigmas([1.0], [1], 0.0)
    with pytest.raises(InvalidInputError):
        dp.allocate_sigmas([1.0], [1], 1.0, "uneven")  # type: ignore[arg-type]
    assert dp.allocate_sigmas([0.0, 1.0], [3, 0], 1.0) == [0.0, 0.0]


@pytest.mark.parametrize("rule", ["by_scorer", "by_size", "even"])
def test_the_composed_blocks_agree_with_dp_accounting(rule: str) -> None:
    """The release's per-block Gaussians, composed by dp-accounting (noise multiplier sigma_b / Delta_b each),
    give the epsilon the closed-form GDP conversion gives: PLD within 2%, RDP an upper bound."""
    plan = plan_units(plan_blocks(request(), policy(allocation=rule)))
    mu = DPPolicy().mu_per_release
    assert dp.release_mu([b.sensitivity for b in plan], [b.sigma for b in plan]) == pytest.approx(mu, rel=1e-12)
    event = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(b.sigma / b.sensitivity) for b in plan])
    exact = dp.gdp_epsilon(mu, DELTA)
    assert exact == pytest.approx(DPPolicy().epsilon_per_release, rel=1e-9)
    by_pld = pld.PLDAccountant()
    by_pld.compose(event)
    assert by_pld.get_epsilon(DELTA) == pytest.approx(exact, rel=0.02)
    by_rdp = rdp.RdpAccountant()
    by_rdp.compose(event)
    assert by_rdp.get_epsilon(DELTA) >= exact


# --------------------------------------------------------------------------- the plan

def test_the_plan_noises_label_only_blocks_once_and_derives_n_from_the_class_counts() -> None:
    planned = plan_blocks(request(), policy())
    units = plan_units(planned)
    # one count-free unit of class counts for both models, a class-sums and a Gram unit per model
    assert sorted(b.stat.kind for b in units) == ["class_counts", "class_sums", "class_sums", "gram", "gram"]
    counts = [b for b in planned if b.stat.kind == "class_counts"]
    assert len(counts) == 2 and counts[0].sigma == counts[1].sigma > 0
    for n in (b for b in planned if b.stat.kind == "count"):
        assert n.derived_from == counts[0].unit
        assert n.sigma == pytest.approx(counts[0].sigma * math.sqrt(CLASSES), rel=1e-15)
    gram = next(b for b in planned if b.stat.kind == "gram")
    even = plan_blocks(request(), policy(allocation="even"))
    assert gram.sigma < next(b for b in even if b.stat.kind == "gram").sigma  # the Gram got more of mu^2
    assert len(plan_units(even)) == 5  # even: the same five units, each mu^2 / 5
    assert dp.release_mu([b.sensitivity for b in plan_units(even)], [b.sigma for b in plan_units(even)]) == \
        pytest.approx(DPPolicy().mu_per_release, rel=1e-12)


def test_without_class_counts_n_is_noised_once_for_every_model() -> None:
    planned = plan_blocks(request(stats=(Stat.of("count"), Stat.of("class_sums"))), policy())
    units = plan_units(planned)
    assert sorted(b.stat.kind for b in units) == ["class_sums", "class_sums", "count"]
    assert all(b.derived_from is None for b in planned)


def test_the_allocation_is_a_policy_key() -> None:
    base = policy().model_dump(mode="json", by_alias=True)
    assert base["dp"]["allocation"] == "by_scorer" and base["dp"]["distributed"] is False
    assert parse_policy({**base, "dp": {**base["dp"], "allocation": "even"}}).dp.allocation == "even"
    with pytest.raises(InvalidInputError, match="allocation"):
        parse_policy({**base, "dp": {**base["dp"], "allocation": "by_gram"}})
    assert policy().sha256() != policy(allocation="even").sha256()  # the split is part of what governed a release


# --------------------------------------------------------------------------- a release

def test_a_release_sends_the_same_noisy_class_counts_under_every_model_and_n_is_their_sum(tmp_path) -> None:
    site = SitePrivacy.open(policy(), audit_dir=tmp_path / "audit", ledger_dir=tmp_path / "ledger", site_id="s",
                            signing_key=Ed25519PrivateKey.generate())
    rng = np.random.default_rng()
    labels = rng.integers(0, CLASSES, size=500)
    features = {sha: rng.normal(size=(len(labels), DIM)) for sha in SHAS}  # the models see different features
    read: list[str] = []

    def batches(model: ModelRequest):
        read.append(model.weights_sha256)
        return iter([Batch(features=features[model.weights_sha256], labels=labels, num_classes=CLASSES)])

    sent: list[bytes] = []
    site.disclose(request(), batches, sent.append)
    site.close()
    assert read == list(SHAS)  # each model's rows are read once, the labels' blocks summed in the first pass
    blocks = decode_release(sent[-1])
    counts = [blocks[block_name(sha, Stat.of("class_counts"))] for sha in SHAS]
    assert np.array_equal(counts[0], counts[1])
    assert not np.array_equal(counts[0], np.bincount(labels, minlength=CLASSES))  # noised (sigma ~ 20)
    for sha in SHAS:
        assert blocks[block_name(sha, Stat.of("count"))] == counts[0].sum()
        assert blocks[block_name(sha, Stat.of("count"))].dtype == np.int64
    assert not np.array_equal(blocks[block_name(SHAS[0], Stat.of("class_sums"))],
                              blocks[block_name(SHAS[1], Stat.of("class_sums"))])
    intent = [r for r in read_records(tmp_path / "audit") if isinstance(r, IntentRecord)][-1]
    assert intent.privacy is not None and intent.privacy.allocation == "by_scorer"
    stated = {b.key: float(b.noise_std) for b in intent.statistics}
    planned = {b.name: b.sigma for b in plan_blocks(request(), policy())}
    assert stated == planned
