"""Finding 6 (suppression): a release without class counts skipped ``min_noisy_class_count``.

A coordinator could ask for class sums alone, so the site had no noisy counts to decide
which classes are too small to release. Now such a release plans noisy class counts as an
internal block, within the same mu: small classes are zeroed in every class-indexed block,
and the counts themselves never leave the site.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmte.client.audit_log import key_fingerprint, read_records
from fedmte.client.policy import DPPolicy, SitePolicy
from fedmte.client.privacy import ModelRequest, ReleaseRequest, SitePrivacy, block_name, decode_release
from fedmte.protocol import dp
from fedmte.protocol.audit_format import IntentRecord
from fedmte.protocol.catalogue import Batch
from fedmte.protocol.requests import Stat

COORDINATOR = Ed25519PrivateKey.generate().public_key()
SHA = "ab" * 32


def release(tmp_path: Path, min_count: float) -> tuple[dict[str, np.ndarray], IntentRecord]:
    policy = SitePolicy(allowed_scorers={"hscore"}, allowed_statistics={"class_sums", "class_counts"},
                        allowed_architectures={"mlp"}, max_feature_dim=4, clip_norm=1.0,
                        min_noisy_class_count=min_count, coordinator_keys={"c": key_fingerprint(COORDINATOR)},
                        dp=DPPolicy())
    site = SitePrivacy.open(policy, audit_dir=tmp_path / "audit", ledger_dir=tmp_path / "ledger", site_id="s",
                            signing_key=Ed25519PrivateKey.generate())
    stats = (Stat.of("class_sums"),)  # class-indexed, and no class counts asked for
    request = ReleaseRequest(requester=key_fingerprint(COORDINATOR), recipient="c", run_id="r", round=1,
                             data_source="ward", dataset_version=hashlib.sha256(b"v").hexdigest(), num_classes=3,
                             models=(ModelRequest("mlp", SHA, 2, stats),), scorers=("hscore",))
    rng = np.random.default_rng(0)
    labels = np.array([0] * 200 + [1] * 200 + [2])  # class 2 holds one row
    batch = Batch(features=rng.normal(scale=0.3, size=(len(labels), 2)), labels=labels, num_classes=3)
    sent: list[bytes] = []
    site.disclose(request, lambda model: iter([batch]), sent.append)
    site.close()
    intent = [r for r in read_records(tmp_path / "audit") if isinstance(r, IntentRecord)][-1]
    return decode_release(sent[-1]), intent


def test_class_sums_alone_still_suppress_small_classes_and_the_counts_stay_at_the_site(tmp_path: Path) -> None:
    blocks, intent = release(tmp_path, min_count=50.0)
    assert list(blocks) == [block_name(SHA, Stat.of("class_sums"))]  # no counts left the site
    sums = blocks[block_name(SHA, Stat.of("class_sums"))]
    assert np.all(sums[2] == 0) and np.all(sums[:2] != 0)  # the one-row class is zeroed
    assert intent.privacy is not None and intent.privacy.suppressed_classes == {SHA: [2]}
    assert [b.kind for b in intent.statistics] == ["class_sums"]
    # both blocks shared the release's mu: by size, the 3 x 2 sums get sqrt(6) / (sqrt(6) + sqrt(3)) of
    # mu^2 and the 3 internal counts the rest: less noise on the sums than an even split, more than alone
    mu = DPPolicy().mu_per_release
    sigma = float(intent.statistics[0].noise_std)
    assert float(intent.statistics[0].sensitivity) == 1.0
    assert math.isclose(sigma, 1.0 / math.sqrt(mu ** 2 * math.sqrt(6) / (math.sqrt(6) + math.sqrt(3))), rel_tol=1e-12)
    assert sigma == dp.allocate_sigmas([1.0, 1.0], [6, 3], mu)[0]
    assert dp.noise_multiplier(mu, 1) < sigma < dp.noise_multiplier(mu, 2)


def test_without_a_threshold_nothing_extra_is_planned(tmp_path: Path) -> None:
    blocks, intent = release(tmp_path, min_count=0.0)
    assert list(blocks) == [block_name(SHA, Stat.of("class_sums"))]
    assert intent.privacy is not None and not intent.privacy.suppressed_classes
    mu = DPPolicy().mu_per_release
    assert float(intent.statistics[0].noise_std) == float(intent.statistics[0].sensitivity) * dp.noise_multiplier(mu, 1)
