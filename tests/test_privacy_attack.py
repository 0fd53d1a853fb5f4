"""Threat T2 (a hostile model, README "Threat model"): a model whose features copy its input.

The candidate model is a real signed package of the site's own ``mlp`` architecture whose
weights are the identity (pixels are >= 0, so ReLU(I x + 0) = x): every feature row the site
computes *is* the raw record. The site holds sklearn's 8x8 digits plus a planted canary, a
distinctive pattern no digit resembles. The attacker sees only the site's released bytes.

Two attacks, both from released class sums (and counts):

* differencing: the site releases class sums of dataset version 1, then of version 2 with
  the canary added to one class; S_k(v2) - S_k(v1) is the canary's (clipped) feature row.
* own class: the canary is the only record of its class; S_k / c_k is its feature row.

With DP off (clipping still applied as the policy says) both recover the canary (cosine
above 0.99). Under the default DP settings (``DPPolicy()``: epsilon 1 per release at delta
1e-6) the differencing estimate is the clipped row plus the difference of two noise vectors,
so its error norm is about sqrt(2) * sigma * sqrt(d) with sigma the calibrated noise std,
and its cosine with the canary is that of a random direction.

The distinguishing check follows the GDP definition (Dong, Roth and Su 2022): a mu-GDP
release makes any test of "canary in" against "canary out" no better than telling
N(0, 1) from N(mu, 1), i.e. TPR <= Phi(Phi^-1(FPR) + mu). The strongest attacker knows every
other record; its likelihood-ratio statistic over the two released blocks is exactly that
normal pair, so the empirical statistic must show a mean shift of mu (not more) in units of
its own standard deviation, and its TPR/FPR must sit on the bound within sampling error.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy import stats as sps
from sklearn.datasets import load_digits

from fedmte.client.architectures import LoadedModel, load_model, pack_model
from fedmte.client.audit_log import key_fingerprint, verify
from fedmte.client.data import decoded_batches, open_site_data
from fedmte.client.packages import public_key_string
from fedmte.client.policy import DPPolicy, SitePolicy
from fedmte.client.privacy import ModelRequest, ReleaseRequest, SitePrivacy, block_name, clip_rows, decode_release
from fedmte.client.site_config import ArraySource
from fedmte.protocol.catalogue import Batch
from fedmte.protocol.requests import Stat

SITE = "site-a"
SOURCE = "digits-ward"
PIXELS = 64
CLIP = 1.0
DIGITS = [str(k) for k in range(10)]
LABELS = [*DIGITS, "canary"]
CANARY_CLASS = 3  # for differencing: the canary joins the threes
STATS = (Stat.of("class_counts"), Stat.of("class_sums"))
COORDINATOR = Ed25519PrivateKey.generate()
PACKAGE_KEY = Ed25519PrivateKey.generate()


def canary_pixels() -> np.ndarray:
    """A checkerboard of 0 and 16: a valid 8x8 input that no handwritten digit looks like."""
    board = (np.add.outer(np.arange(8), np.arange(8)) % 2) * 16.0
    return board.reshape(PIXELS)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------- the hostile model

@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A coordinator-signed ``mlp`` package whose feature output is its input, loaded the
    way a site loads any candidate: signature against a pinned key, strict weight loading."""
    directory = tmp_path_factory.mktemp("hostile") / "package"
    pack_model(
        directory, name="identity-mlp", architecture="mlp",
        config={"input_dim": PIXELS, "hidden_dims": [PIXELS], "dtype": "float64"},
        preprocessing={"kind": "vector", "dim": PIXELS}, license="MIT",
        tensors={"body.0.weight": torch.eye(PIXELS, dtype=torch.float64),
                 "body.0.bias": torch.zeros(PIXELS, dtype=torch.float64)},
        key=PACKAGE_KEY,
    )
    return load_model(directory, [public_key_string(PACKAGE_KEY.public_key())])


@dataclass(frozen=True)
class Version:
    """One version of the site's data, run through the hostile model once."""

    name: str
    features: np.ndarray  # the model's (unclipped) feature rows
    labels: np.ndarray

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.name.encode() + self.features.tobytes() + self.labels.tobytes()).hexdigest()

    def batches(self, model: ModelRequest) -> Iterator[Batch]:
        for start in range(0, len(self.labels), 500):
            rows = slice(start, start + 500)
            yield Batch(self.features[rows], self.labels[rows], len(LABELS))


def site_version(tmp: Path, model: LoadedModel, name: str, inputs: np.ndarray, labels: np.ndarray) -> Version:
    """Write the site's arrays file, open it as the site does, decode with the package's
    preprocessing and run the model: the feature rows a site would clip and sum."""
    path = tmp / f"{name}.npz"
    np.savez(path, inputs=inputs, labels=labels)
    data = open_site_data(ArraySource(path=path, labels=tuple(LABELS)))
    features, kept = [], []
    with torch.inference_mode():
        for batch, batch_labels in decoded_batches(data, model.manifest.preprocessing, 256, data.new_report(),
                                                  np.dtype(np.float64)):
            out = model.module(torch.from_numpy(batch))[model.manifest.feature_output]
            features.append(out.numpy())
            kept.append(batch_labels)
    return Version(name, np.concatenate(features), np.concatenate(kept))


@pytest.fixture(scope="module")
def versions(hostile: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Version]:
    digits = load_digits()
    inputs, labels = digits.data.astype(np.float64), digits.target.astype(np.int64)
    canary = canary_pixels()[None]
    tmp = tmp_path_factory.mktemp("site-data")
    return {
        "without": site_version(tmp, hostile, "without", inputs, labels),
        "with": site_version(tmp, hostile, "with", np.vstack([inputs, canary]), np.append(labels, CANARY_CLASS)),
        "own_class": site_version(tmp, hostile, "own_class", np.vstack([inputs, canary]),
                                  np.append(labels, LABELS.index("canary"))),
    }


# --------------------------------------------------------------------------- the site

def policy(dp: DPPolicy) -> SitePolicy:
    """The site's policy: only the DP settings vary; clipping is always applied."""
    return SitePolicy(
        allowed_scorers={"gbc"}, allowed_statistics={s.kind for s in STATS}, allowed_architectures={"mlp"},
        max_feature_dim=PIXELS, clip_norm=CLIP, coordinator_keys={"coordinator": key_fingerprint(COORDINATOR.public_key())},
        dp=dp,
    )


def request(model: LoadedModel, version: Version) -> ReleaseRequest:
    return ReleaseRequest(
        requester=key_fingerprint(COORDINATOR.public_key()), recipient="coordinator", run_id=f"run-{version.name}",
        round=0, data_source=SOURCE, dataset_version=version.sha256, num_classes=len(LABELS),
        models=(ModelRequest(model.manifest.architecture, model.manifest.weights_sha256, model.feature_dim, STATS),),
        scorers=("gbc",), purpose="rank candidate models",
    )


class Site:
    """A site with a real ledger and audit log; ``sent`` is what left it, byte for byte."""

    def __init__(self, root: Path, site_policy: SitePolicy) -> None:
        self.root = root
        self.privacy = SitePrivacy.open(site_policy, audit_dir=root / "audit", ledger_dir=root / "ledger",
                                        site_id=SITE, signing_key=Ed25519PrivateKey.generate())
        self.sent: list[bytes] = []
        self.noise_std: dict[str, float] = {}  # per statistic kind, as the last audit record states it

    def disclose(self, model: LoadedModel, version: Version) -> dict[str, np.ndarray]:
        """Release class counts and sums of ``version``; return what the attacker received."""
        release = self.privacy.disclose(request(model, version), version.batches, self.sent.append)
        self.noise_std = {b.kind: float(b.noise_std) for b in release.statistics if b.noise_std is not None}
        received = decode_release(self.sent[-1])
        sha = model.manifest.weights_sha256
        return {stat.kind: received[block_name(sha, stat)] for stat in STATS}

    def close(self) -> None:
        self.privacy.close()


# --------------------------------------------------------------------------- the attacker

def attack_by_differencing(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> np.ndarray:
    """The feature row that joined a class between two releases: the class whose count grew
    the most, and the change of its class sum."""
    grown = int(np.argmax(after["class_counts"] - before["class_counts"]))
    return after["class_sums"][grown] - before["class_sums"][grown]


def attack_own_class(release: dict[str, np.ndarray], label: int) -> np.ndarray:
    """The mean feature row of a class the attacker knows holds one record."""
    return release["class_sums"][label] / max(float(release["class_counts"][label]), 1.0)


# --------------------------------------------------------------------------- tests

def test_the_hostile_package_routes_raw_records_into_its_features(
        hostile: LoadedModel, versions: dict[str, Version]) -> None:
    digits = load_digits()
    np.testing.assert_array_equal(versions["without"].features, digits.data)
    np.testing.assert_array_equal(versions["with"].features[-1], canary_pixels())
    # Clipping keeps the direction: the site's own bound does not hide a copied record.
    clipped, scaled, _ = clip_rows(versions["with"].features[-1:], CLIP)
    assert scaled == 1 and cosine(clipped[0], canary_pixels()) == pytest.approx(1.0, abs=1e-12)


def test_without_dp_the_attacker_recovers_the_canary(
        hostile: LoadedModel, versions: dict[str, Version], tmp_path: Path) -> None:
    site = Site(tmp_path, policy(DPPolicy(enabled=False)))
    before = site.disclose(hostile, versions["without"])
    after = site.disclose(hostile, versions["with"])
    own = site.disclose(hostile, versions["own_class"])
    site.close()
    canary = canary_pixels()
    stolen = attack_by_differencing(before, after)
    assert cosine(stolen, canary) > 0.99
    assert np.linalg.norm(stolen) == pytest.approx(CLIP, rel=1e-9)  # the clipped row, exactly
    assert cosine(attack_own_class(own, LABELS.index("canary")), canary) > 0.99
    assert verify(tmp_path / "audit").ok  # every release is on the record, DP or not


def test_under_the_default_dp_settings_the_reconstruction_is_noise(
        hostile: LoadedModel, versions: dict[str, Version], tmp_path: Path) -> None:
    default = DPPolicy()
    assert default.enabled and default.epsilon_per_release == 1.0 and default.delta == 1e-6
    canary = canary_pixels()
    cosines, error_ratios, own_cosines = [], [], []
    for draw in range(8):
        site = Site(tmp_path / f"draw-{draw}", policy(default))
        before = site.disclose(hostile, versions["without"])
        after = site.disclose(hostile, versions["with"])  # a new dataset version: charged again
        own = site.disclose(hostile, versions["own_class"])
        ledger = site.privacy.ledger
        assert ledger.spent_mu(SOURCE) == pytest.approx(math.sqrt(3) * default.mu_per_release, rel=1e-9)
        site.close()
        # The calibrated noise of each release, as its audit record states it, is what mu-GDP
        # needs: sqrt((C / sigma_sums)^2 + (1 / sigma_counts)^2) = mu per release.
        sigma, sigma_counts = site.noise_std["class_sums"], site.noise_std["class_counts"]
        assert math.hypot(CLIP / sigma, 1 / sigma_counts) == pytest.approx(default.mu_per_release, rel=1e-6)
        clipped = canary * CLIP / np.linalg.norm(canary)
        stolen = attack_by_differencing(before, after)
        # The attacker may not even find the right class; take the best case for it: the true class.
        stolen_true = after["class_sums"][CANARY_CLASS] - before["class_sums"][CANARY_CLASS]
        cosines += [cosine(stolen, canary), cosine(stolen_true, canary)]
        error_ratios.append(np.linalg.norm(stolen_true - clipped) / (math.sqrt(2) * sigma * math.sqrt(PIXELS)))
        own_cosines.append(cosine(attack_own_class(own, LABELS.index("canary")), canary))
    # A random direction in 64 dimensions has cosine with std 1/8 with any fixed vector, and
    # the signal (norm C = 1) is about 1/70 of the noise norm: far below 0.5 every time.
    assert max(abs(c) for c in cosines + own_cosines) < 0.5
    # The error is the noise: about sqrt(2) sigma sqrt(d) (chi with 64 dof: +-9% per draw).
    assert 0.85 < float(np.mean(error_ratios)) < 1.15
    assert all(0.6 < r < 1.4 for r in error_ratios)


def test_the_canary_is_no_more_distinguishable_than_mu_allows(
        hostile: LoadedModel, versions: dict[str, Version], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The strongest attacker (knows every other record) against 200 releases with and 200
    without the canary: its statistic separates them by mu_release standard deviations,
    which is what mu-GDP allows and no more; with DP off they separate completely."""
    # Durability is not under test here, and 400 releases make ~3,000 fsyncs (seconds on a disk).
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    draws = 200
    default = DPPolicy()
    # Room for many releases of the default size on one ledger (the per-release mechanism is
    # what is audited here; each draw is a new dataset version, so no cache hit).
    budget = DPPolicy(epsilon_budget=50.0)
    assert budget.mu_per_release == default.mu_per_release
    site = Site(tmp_path / "site-0", policy(budget))
    mu = default.mu_per_release
    # The default allocation gives each block a share of mu^2 proportional to sqrt(its entries)
    # (K counts, K x 64 sums), sigma_b = Delta_b / sqrt(share), so that
    # sqrt((1/sigma_c)^2 + (C/sigma_S)^2) = mu.
    shares = np.sqrt([len(LABELS), len(LABELS) * PIXELS])
    rho_counts, rho_sums = mu ** 2 * shares / shares.sum()
    sigma_counts = 1.0 / math.sqrt(rho_counts)
    sigma_sums = CLIP / math.sqrt(rho_sums)
    assert math.hypot(1 / sigma_counts, CLIP / sigma_sums) == pytest.approx(mu, rel=1e-12)
    assert sigma_sums < math.sqrt(len(STATS)) / mu * CLIP < sigma_counts  # the sums get more than an even split
    without, with_canary = versions["without"], versions["with"]
    known_counts = np.bincount(without.labels, minlength=len(LABELS))
    clipped_rows, _, _ = clip_rows(without.features, CLIP)
    known_sum = clipped_rows[without.labels == CANARY_CLASS].sum(axis=0)
    canary_row = clip_rows(canary_pixels()[None], CLIP)[0][0]

    def statistic(release: dict[str, np.ndarray]) -> float:
        """Log-likelihood-ratio direction of both blocks, in units where "out" is N(0, 1)
        and "in" is N(mu, 1): (shift of the sum along the canary row)/sigma_S^2 * C
        plus (shift of the count)/sigma_c^2, divided by mu."""
        along = (release["class_sums"][CANARY_CLASS] - known_sum) @ canary_row / sigma_sums ** 2
        count = (release["class_counts"][CANARY_CLASS] - known_counts[CANARY_CLASS]) / sigma_counts ** 2
        return float((along + count) / mu)

    out_scores, in_scores = [], []
    for draw in range(draws):
        if draw and draw % 20 == 0:  # a fresh site now and then keeps the ledger file small
            site.close()
            site = Site(tmp_path / f"site-{draw}", policy(budget))
        for version, scores in ((without, out_scores), (with_canary, in_scores)):
            fresh = Version(f"{version.name}-{draw}", version.features, version.labels)  # a new dataset version
            scores.append(statistic(site.disclose(hostile, fresh)))
            assert site.noise_std == pytest.approx({"class_counts": sigma_counts, "class_sums": sigma_sums}, rel=1e-6)
    site.close()
    out_scores, in_scores = np.array(out_scores), np.array(in_scores)
    # Noise is calibrated: "out" is N(0, 1) and "in" is N(mu, 1) (rounding the noisy counts
    # adds a variance of 1/12 / sigma_c^2, negligible); the bounds are 4 standard errors.
    assert abs(out_scores.mean()) < 4 / math.sqrt(draws)
    spread = np.concatenate([out_scores - out_scores.mean(), in_scores - in_scores.mean()]).std()
    assert abs(spread - 1.0) < 4 / math.sqrt(2 * 2 * draws)
    # The mean shift is mu, within sampling error, and certainly not more.
    shift = in_scores.mean() - out_scores.mean()
    standard_error = math.sqrt(in_scores.var() / draws + out_scores.var() / draws)
    assert abs(shift - mu) < 4 * standard_error
    # TPR at FPR alpha on the mu-GDP trade-off curve Phi(Phi^-1(alpha) + mu), within sampling error.
    for alpha in (0.05, 0.1, 0.25, 0.5):
        threshold = np.quantile(out_scores, 1 - alpha)
        tpr = float(np.mean(in_scores > threshold))
        bound = float(sps.norm.cdf(sps.norm.ppf(alpha) + mu))
        assert tpr <= bound + 4 * math.sqrt(bound * (1 - bound) / draws) + 4 * math.sqrt(alpha * (1 - alpha) / draws)

    # The same attacker against exact sums: complete separation (the check above can fail).
    open_site = Site(tmp_path / "no-dp", policy(DPPolicy(enabled=False)))
    exact_out = statistic(open_site.disclose(hostile, without))
    exact_in = statistic(open_site.disclose(hostile, with_canary))
    open_site.close()
    assert exact_out == pytest.approx(0.0, abs=1e-9)
    assert exact_in == pytest.approx(mu, rel=1e-9)  # noiseless: the full shift, no spread at all
