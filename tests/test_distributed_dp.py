"""Share noise through the secure sum (client/privacy.honest_shares): h honest shares add up to the
calibrated full noise, a plain sum always gets full noise, the audit log states the weaker
guarantee the site gives alone and still verifies, and share-noised bytes are never replayed
elsewhere."""

from __future__ import annotations

import hashlib
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy import stats as sps

from fedmte.client.audit_log import key_fingerprint, read_records, verify
from fedmte.client.policy import DPPolicy, SitePolicy
from fedmte.client.privacy import (
    ModelRequest,
    ReleaseRequest,
    SecureContext,
    SitePrivacy,
    add_release_noise,
    honest_shares,
    noise_generator,
    plan_blocks,
    plan_units,
    request_fingerprint,
)
from fedmte.client.site_config import site_file_text
from fedmte.protocol import dp
from fedmte.protocol.audit_format import IntentRecord
from fedmte.protocol.catalogue import Batch
from fedmte.protocol.requests import Stat
from fedmte.protocol.wire import SECURE_UPLOAD
from fedmte.trial.local_sites import DP_CLIP_NORM
from tests.test_audit_log import lines, rechain, record, reseal, write_lines
from tests.test_secure_rounds import LABELS, Federation, job_round, keys_of, site_rows

COORDINATOR = Ed25519PrivateKey.generate().public_key()
SHA = "ab" * 32
DIM, CLASSES = 6, 3
STATS = (Stat.of("class_counts"), Stat.of("class_sums"), Stat.of("gram"))
SECURE = SecureContext(job_id="job-1", threshold=4, sites=5)  # tolerates 5 - 4 = 1 colluder: h = 3


def policy(**dp_settings: object) -> SitePolicy:
    return SitePolicy(allowed_scorers={"hscore"}, allowed_statistics={s.kind for s in STATS},
                      allowed_architectures={"mlp"}, max_feature_dim=DIM, clip_norm=1.0,
                      coordinator_keys={"c": key_fingerprint(COORDINATOR)},
                      dp=DPPolicy(epsilon_budget=8.0, **dp_settings))


def request(secure: SecureContext | None, version: bytes = b"v") -> ReleaseRequest:
    return ReleaseRequest(requester=key_fingerprint(COORDINATOR), recipient="c", run_id="r", round=1,
                          data_source="ward", dataset_version=hashlib.sha256(version).hexdigest(), num_classes=CLASSES,
                          models=(ModelRequest("mlp", SHA, DIM, STATS),), scorers=("hscore",), secure=secure)


def test_the_number_of_honest_shares() -> None:
    on = DPPolicy(distributed=True)
    assert honest_shares(on, SECURE) == 3  # t - (N - t)
    assert honest_shares(on, None) == 1  # a plain sum: full noise
    assert honest_shares(DPPolicy(), SECURE) == 1  # not opted in
    assert honest_shares(DPPolicy(distributed=True, colluding_sites=0), SECURE) == 4
    assert honest_shares(DPPolicy(distributed=True, colluding_sites=2), SECURE) == 2
    assert honest_shares(DPPolicy(distributed=True, colluding_sites=3), SECURE) == 1  # h = 1 < 2: full noise
    assert honest_shares(on, SecureContext("j", threshold=2, sites=3)) == 1  # h = 2 - 1
    assert honest_shares(on, SecureContext("j", threshold=4, sites=5, self_masks=False)) == 1
    assert honest_shares(DPPolicy(enabled=False, distributed=True), SECURE) == 1


def test_h_shares_sum_to_the_calibrated_full_noise() -> None:
    """Through the site's own noise path: h sites' share noise, summed, is N(0, sigma^2) with sigma the
    full calibrated std of each block; one share alone is not (its variance is sigma^2 / h)."""
    settings = policy(distributed=True)
    planned = plan_blocks(request(SECURE), settings)
    h = honest_shares(settings.dp, SECURE)
    float_blocks = [b for b in planned if b.dtype.kind == "f"]
    assert {b.stat.kind for b in float_blocks} == {"class_sums", "gram"}
    full = plan_blocks(request(None), settings)  # the same release in a plain sum: full noise
    assert [b.sigma for b in full] == [b.sigma_full for b in planned]
    assert dp.release_mu([b.sensitivity for b in plan_units(full)], [b.sigma for b in plan_units(full)]) == \
        pytest.approx(settings.dp.mu_per_release, rel=1e-12)
    draws = 300
    summed: dict[str, list[np.ndarray]] = {b.name: [] for b in float_blocks}
    single: dict[str, list[np.ndarray]] = {b.name: [] for b in float_blocks}
    for _ in range(draws):
        total = {b.name: np.zeros(b.shape) for b in float_blocks}
        for site in range(h):
            zeros = {b.name: np.zeros(b.shape, b.dtype) for b in planned}
            noisy = add_release_noise(zeros, planned, noise_generator())
            for b in float_blocks:
                total[b.name] += noisy[b.name]
                if site == 0:
                    single[b.name].append(noisy[b.name].ravel())
        for b in float_blocks:
            summed[b.name].append(total[b.name].ravel())
    for b in float_blocks:
        assert b.sigma == pytest.approx(b.sigma_full / math.sqrt(h), rel=1e-15)
        z = np.concatenate(summed[b.name]) / b.sigma_full
        assert sps.kstest(z, "norm").pvalue > 1e-4
        chi2 = float((z ** 2).sum())  # chi-square with z.size degrees of freedom when the variance is sigma^2
        assert min(sps.chi2.cdf(chi2, z.size), sps.chi2.sf(chi2, z.size)) > 1e-5
        one = np.concatenate(single[b.name]) / b.sigma_full
        assert sps.kstest(one, "norm").pvalue < 1e-6  # one share is far from the full noise
        assert float(one.var()) == pytest.approx(1 / h, rel=0.1)


def test_integer_blocks_keep_full_noise_under_share_noise() -> None:
    """Rounding a share of the noise at each site is not post-processing of the noisy sum."""
    planned = plan_blocks(request(SECURE), policy(distributed=True))
    counts = next(b for b in planned if b.stat.kind == "class_counts")
    assert counts.dtype.kind == "i" and counts.sigma == counts.sigma_full > 0


def open_site(tmp_path: Path, **dp_settings: object) -> SitePrivacy:
    return SitePrivacy.open(policy(**dp_settings), audit_dir=tmp_path / "audit", ledger_dir=tmp_path / "ledger",
                            site_id="s", signing_key=Ed25519PrivateKey.generate())


def batches(model: ModelRequest):
    rng = np.random.default_rng(0)
    labels = np.arange(300) % CLASSES
    return iter([Batch(features=rng.normal(size=(len(labels), DIM)), labels=labels, num_classes=CLASSES)])


def test_a_plain_sum_gets_full_noise_even_with_distributed_on(tmp_path: Path) -> None:
    site = open_site(tmp_path, distributed=True)
    release = site.prepare(request(None), batches)
    site.close()
    expected = {b.name: b.sigma_full for b in plan_blocks(request(SECURE), site.policy) if not b.internal}
    assert {b.key: float(b.noise_std) for b in release.statistics} == expected
    charge = release.privacy
    assert charge.honest_shares == 1 and float(charge.noise_share) == 1.0 and charge.secure_threshold is None
    assert charge.mu_alone_release == charge.mu_release and charge.mu_alone_sq_after == charge.mu_sq_after


def test_the_audit_record_states_the_share_and_the_guarantee_alone_and_the_log_verifies(tmp_path: Path) -> None:
    site = open_site(tmp_path, distributed=True)
    mu = site.policy.dp.mu_per_release
    shared = site.disclose(request(SECURE), batches, lambda data: None)
    plain = site.disclose(request(None, version=b"v2"), batches, lambda data: None)
    ledger = site.ledger
    site.close()
    charge = shared.privacy
    assert (charge.secure_threshold, charge.secure_sites, charge.colluding_sites, charge.honest_shares) == (4, 5, 1, 3)
    assert float(charge.noise_share) == 1 / 3
    assert float(charge.mu_release) == mu  # charged as ever: the guarantee given the secure sum
    assert float(charge.mu_alone_release) == mu * math.sqrt(3)
    assert float(charge.mu_alone_sq_after) == dp.compose_sq(0.0, mu * math.sqrt(3))
    assert float(charge.epsilon_alone_spent) == pytest.approx(dp.gdp_epsilon(math.sqrt(3) * mu, 1e-6), rel=1e-12)
    assert float(charge.epsilon_alone_spent) > float(charge.epsilon_spent)
    sigma = {b.key: float(b.noise_std) for b in shared.statistics}
    for b in plan_blocks(request(SECURE), site.policy):
        if not b.internal:
            assert sigma[b.name] == b.sigma  # what was added, share noise included
    # a later full-noise release steps the alone total by mu, like the spend
    after = plain.privacy
    assert float(after.mu_alone_sq_before) == float(charge.mu_alone_sq_after)
    assert float(after.mu_alone_sq_after) == dp.compose_sq(float(charge.mu_alone_sq_after), mu)
    assert ledger.spent_alone_sq("ward") == float(after.mu_alone_sq_after)
    assert ledger.spent_mu_sq("ward") == float(after.mu_sq_after) < ledger.spent_alone_sq("ward")
    intents = [r for r in read_records(tmp_path / "audit") if isinstance(r, IntentRecord)]
    assert [r.privacy.honest_shares for r in intents] == [3, 1]
    result = verify(tmp_path / "audit", ledger_dir=tmp_path / "ledger")
    assert result.ok, result.reason
    # an edited alone total is caught by the replay, at its record
    original = lines(tmp_path / "audit")
    position = next(i for i, line in enumerate(original) if record(line).get("kind") == "intent")
    fields = record(original[position])
    fields["privacy"]["mu_alone_sq_after"] = fields["privacy"]["mu_sq_after"]
    write_lines(tmp_path / "audit", rechain(original[:position] + [reseal(fields)] + original[position + 1:], position + 1))
    broken = verify(tmp_path / "audit")
    assert not broken.ok and broken.first_bad_seq == position and "alone" in (broken.reason or "")


def test_fingerprints_differ_between_secure_and_plain_and_between_shares() -> None:
    on = policy(distributed=True).dp
    policy_sha = "0" * 64

    def fingerprint(secure: SecureContext | None) -> str:
        return request_fingerprint(request(secure), policy_sha, honest_shares(on, secure))

    plain, shared = fingerprint(None), fingerprint(SECURE)
    assert plain != shared
    assert fingerprint(SecureContext("job-1", threshold=4, sites=5)) == shared  # the same job: the same release
    assert fingerprint(SecureContext("job-2", threshold=4, sites=5)) != shared  # never replayed into another sum
    assert fingerprint(SecureContext("job-1", threshold=5, sites=5)) != shared  # another share (h = 5)
    full_secure = request_fingerprint(request(SECURE), policy_sha, 1)
    assert full_secure not in (plain, shared)
    # full noise through the secure sum is safe to replay into another secure job
    assert request_fingerprint(request(SecureContext("job-2", threshold=4, sites=5)), policy_sha, 1) == full_secure


def test_a_cached_share_release_is_not_replayed_in_the_clear(tmp_path: Path) -> None:
    site = open_site(tmp_path, distributed=True)
    first = site.prepare(request(SECURE), batches)
    again = site.prepare(request(SECURE), batches)
    plain = site.prepare(request(None), batches)
    site.close()
    assert again.privacy.cached and again.payload == first.payload
    assert not plain.privacy.cached and plain.payload != first.payload
    assert plain.privacy.mu_sq_after > first.privacy.mu_sq_after  # a new release, charged


def test_a_secure_round_plumbs_the_threshold_to_the_noise_and_reports_each_blocks_std(tmp_path: Path) -> None:
    """Through the real secure sum (SecureSite -> SecureSeal -> site agent -> privacy layer): each site adds
    share noise for h = t - c, audits it, and its round reply beside the masked words states every block's std."""
    federation = Federation(tmp_path, site_rows(3))
    for path in federation.files:  # the data owners opt in, trusting that no other site colludes
        document = tomllib.loads(path.read_text(encoding="utf-8"))
        document["policy"]["dp"].update(enabled=True, distributed=True, colluding_sites=0)
        document["policy"]["clip_norm"] = DP_CLIP_NORM
        path.write_text(site_file_text(document), encoding="utf-8")
    federation.setup()
    aggregator = federation.aggregator()
    assert aggregator.threshold == 2
    aggregator.begin_job(federation.exchange, 1)
    request, arrays = job_round()
    aggregator.sum_round(federation.exchange, request, arrays)
    uploads = [reply for query, _, reply in federation.exchange.received if query == SECURE_UPLOAD]
    assert len(uploads) == 3
    for name, reply in zip(federation.names, uploads):
        intent = [r for r in federation.audit(name) if isinstance(r, IntentRecord) and r.privacy is not None][-1]
        charge = intent.privacy
        assert (charge.secure_threshold, charge.secure_sites, charge.honest_shares) == (2, 3, 2)
        assert float(charge.mu_alone_release) == float(charge.mu_release) * math.sqrt(2)
        stated = reply.doc["inner"]["privacy"]["noise_std"]
        assert sorted(stated) == sorted(keys_of([*STATS, Stat.of("count")]))
        audited = {b.kind: float(b.noise_std) for b in intent.statistics}
        assert {key.split("/", 1)[1].split(":", 1)[0]: std for key, std in stated.items()} == audited
        assert audited["gram"] > 0 and audited["count"] == pytest.approx(audited["class_counts"] * math.sqrt(len(LABELS)))
        assert verify(federation.dirs[name] / "audit").ok
