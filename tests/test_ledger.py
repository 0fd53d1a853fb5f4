"""The privacy pipeline and ledger: identical requests cost nothing and return the same bytes,
models compose, the cap refuses (and is audited), a rolled-back ledger is detected."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedmte.cli import app
from fedmte.client import privacy
from fedmte.client.audit_log import key_fingerprint, read_records, verify
from fedmte.client.ledger import LEDGER_FILE, Ledger, LedgerState
from fedmte.client.policy import DPPolicy, SitePolicy
from fedmte.client.privacy import (
    ModelRequest,
    ReleaseRequest,
    SitePrivacy,
    clip_rows,
    decode_release,
    encode_release,
    noise_generator,
    plan_blocks,
    sanitize_probs,
)
from fedmte.protocol import dp
from fedmte.protocol.audit_format import IntentRecord, RefusalRecord
from fedmte.protocol.catalogue import Batch, accumulate
from fedmte.protocol.errors import BudgetExceededError, StatisticsError, VerificationError
from fedmte.protocol.requests import Stat

SITE = "site-a"
SOURCE = "ward-7"
DELTA = 1e-6
COORDINATOR = Ed25519PrivateKey.generate().public_key()
STATS = (Stat.of("count"), Stat.of("class_counts"), Stat.of("class_sums"), Stat.of("gram"))
NUM_CLASSES = 3
DIM = 6


def make_policy(**overrides: object) -> SitePolicy:
    fields: dict[str, object] = dict(
        allowed_scorers={"logme", "hscore"}, allowed_statistics={"count", "class_counts", "class_sums", "gram"},
        allowed_architectures={"mlp"}, max_feature_dim=16, clip_norm=1.0,
        coordinator_keys={"coordinator": key_fingerprint(COORDINATOR)},
    )
    fields.update(overrides)
    return SitePolicy(**fields)


def data(rows: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, DIM)) * 0.5, rng.integers(0, NUM_CLASSES, rows)


class Site:
    """A site with a policy, its ledger and audit log, and a record of what was sent."""

    def __init__(self, root: Path, policy: SitePolicy, key: Ed25519PrivateKey | None = None) -> None:
        self.root = root
        self.key = key or Ed25519PrivateKey.generate()
        self.policy = policy
        self.x, self.y = data()
        self.sent: list[bytes] = []
        self.computed = 0
        self.privacy = SitePrivacy.open(policy, audit_dir=root / "audit", ledger_dir=root / "ledger",
                                        site_id=SITE, signing_key=self.key)

    def batches(self, model: ModelRequest):
        self.computed += 1
        for start in range(0, len(self.y), 150):
            yield Batch(self.x[start:start + 150], self.y[start:start + 150], NUM_CLASSES)

    def disclose(self, request: ReleaseRequest) -> privacy.Release:
        return self.privacy.disclose(request, self.batches, self.sent.append)

    def reopen(self) -> None:
        self.privacy.close()
        self.privacy = SitePrivacy.open(self.policy, audit_dir=self.root / "audit", ledger_dir=self.root / "ledger",
                                        site_id=SITE, signing_key=self.key)


def request(model: str = "model-one", run: str = "run-1", round: int = 0, stats: tuple = STATS) -> ReleaseRequest:
    return ReleaseRequest(
        requester=key_fingerprint(COORDINATOR), recipient="coordinator.example", run_id=run, round=round,
        data_source=SOURCE, dataset_version=hashlib.sha256(b"v1").hexdigest(), num_classes=NUM_CLASSES,
        models=(ModelRequest("mlp", hashlib.sha256(model.encode()).hexdigest(), DIM, stats),),
        scorers=("logme",), purpose="rank candidates",
    )


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path, make_policy())


def intents(site: Site) -> list[IntentRecord]:
    return [r for r in read_records(site.root / "audit") if isinstance(r, IntentRecord)]


# --------------------------------------------------------------------------- caching and composition

def test_the_same_request_twice_gives_identical_bytes_and_an_unchanged_ledger(site: Site) -> None:
    first = site.disclose(request())
    head, spent = site.privacy.ledger.head, site.privacy.ledger.spent_mu_sq(SOURCE)
    second = site.disclose(request(run="run-2", round=3))  # another run asking the same thing
    assert second.payload == first.payload and site.sent == [first.payload, first.payload]
    assert site.privacy.ledger.head == head and site.privacy.ledger.spent_mu_sq(SOURCE) == spent
    assert site.computed == 1  # the repeat never touched the data
    records = intents(site)
    assert [r.privacy.cached for r in records] == [False, True]
    assert records[1].privacy.mu_sq_after == records[0].privacy.mu_sq_after
    site.privacy.close()
    assert verify(site.root / "audit", site.key.public_key()).ok


def test_the_cache_survives_a_restart(site: Site) -> None:
    first = site.disclose(request())
    site.reopen()
    assert site.privacy.ledger.spent_mu_sq(SOURCE) == pytest.approx(site.policy.dp.mu_per_release ** 2)
    again = site.disclose(request(run="run-9"))
    assert again.payload == first.payload and site.computed == 1


def test_two_models_compose_in_quadrature(site: Site) -> None:
    site.disclose(request("model-one"))
    site.disclose(request("model-two"))
    mu = site.policy.dp.mu_per_release
    # independent of the ledger: two mu-GDP releases are one (sqrt 2 mu)-GDP release, i.e. one
    # Gaussian with noise multiplier 1 / (sqrt 2 mu), whose epsilon dp-accounting gives exactly.
    assert site.privacy.ledger.spent_mu(SOURCE) == pytest.approx(math.sqrt(2) * mu, rel=1e-12)
    expected_epsilon = dp_accounting.get_epsilon_gaussian(1 / (math.sqrt(2) * mu), DELTA)
    assert float(intents(site)[-1].privacy.epsilon_spent) == pytest.approx(expected_epsilon, rel=1e-6)
    assert len(site.privacy.ledger.state.releases) == 2


def test_a_request_beyond_the_cap_is_refused_and_audited(site: Site) -> None:
    # how many releases of eps 1 fit in eps 4 (delta 1e-6), from dp-accounting's calibration
    mu_release = 1 / dp_accounting.get_sigma_gaussian(1.0, DELTA)
    mu_cap = 1 / dp_accounting.get_sigma_gaussian(4.0, DELTA)
    fits = math.floor((mu_cap / mu_release) ** 2)
    for index in range(fits):
        site.disclose(request(f"model-{index}"))
    head, computed, sent = site.privacy.ledger.head, site.computed, len(site.sent)
    with pytest.raises(BudgetExceededError, match="would bring it to") as refused:
        site.disclose(request("one-model-too-many"))
    assert refused.value.reason_code == "budget_exhausted" and refused.value.rule == "dp.epsilon_budget"
    assert site.privacy.ledger.head == head and site.computed == computed and len(site.sent) == sent
    last = read_records(site.root / "audit")[-1]
    assert isinstance(last, RefusalRecord)
    assert last.reason_code == "budget_exhausted" and last.data_source == SOURCE
    # an old request is still answered from the cache, for free
    site.disclose(request("model-0"))
    assert site.privacy.ledger.head == head
    site.privacy.close()
    result = verify(site.root / "audit", site.key.public_key())
    assert result.ok and not result.warnings


# --------------------------------------------------------------------------- rollback and edits

def test_a_rolled_back_ledger_file_is_detected(site: Site, tmp_path: Path) -> None:
    site.disclose(request("model-one"))
    backup = tmp_path / "old-ledger.json"
    shutil.copy(site.root / "ledger" / LEDGER_FILE, backup)
    site.disclose(request("model-two"))
    site.privacy.close()
    shutil.copy(backup, site.root / "ledger" / LEDGER_FILE)
    with pytest.raises(VerificationError, match="rolled back"):
        SitePrivacy.open(site.policy, audit_dir=site.root / "audit", ledger_dir=site.root / "ledger",
                         site_id=SITE, signing_key=site.key)
    result = CliRunner().invoke(app, ["audit", "verify", str(site.root / "audit"), "--ledger",
                                      str(site.root / "ledger")])
    assert result.exit_code == 1 and "rolled back" in result.output


def test_an_edited_ledger_file_is_detected(site: Site) -> None:
    site.disclose(request())
    site.privacy.close()
    path = site.root / "ledger" / LEDGER_FILE
    original = json.loads(path.read_text())
    edited = json.loads(path.read_text())
    edited["state"]["sources"][SOURCE]["mu_sq"] = "0.0"
    path.write_text(json.dumps(edited))
    with pytest.raises(VerificationError, match="was edited"):
        Ledger.open(site.root / "ledger", site_id=SITE, expected=None)
    # an editor who also fixes the hashes still disagrees with the audit log
    forged = LedgerState.model_validate(edited["state"])
    edited["state_sha256"] = forged.sha256()
    edited["history"][-1] = forged.sha256()
    path.write_text(json.dumps(edited))
    with pytest.raises(VerificationError, match="disagrees with the audit log"):
        SitePrivacy.open(site.policy, audit_dir=site.root / "audit", ledger_dir=site.root / "ledger",
                         site_id=SITE, signing_key=site.key)
    path.write_text(json.dumps(original))
    path.unlink()
    with pytest.raises(VerificationError, match="missing"):
        SitePrivacy.open(site.policy, audit_dir=site.root / "audit", ledger_dir=site.root / "ledger",
                         site_id=SITE, signing_key=site.key)


def test_an_altered_cached_release_is_refused(site: Site) -> None:
    release = site.disclose(request())
    blob = site.root / "ledger" / "releases" / f"{hashlib.sha256(release.payload).hexdigest()}.bin"
    blob.write_bytes(release.payload[:-1] + bytes([release.payload[-1] ^ 1]))
    with pytest.raises(VerificationError, match="altered"):
        site.disclose(request())


def test_a_charge_without_an_audit_record_is_a_warning_not_a_failure(site: Site) -> None:
    site.disclose(request("model-one"))
    site.privacy.prepare(request("model-two"), site.batches)  # charged; the site stops before logging
    site.reopen()  # the ledger is ahead of the log: allowed
    site.disclose(request("model-three"))
    site.privacy.close()
    result = verify(site.root / "audit", site.key.public_key())
    assert result.ok and any("no audit record" in w for w in result.warnings)


# --------------------------------------------------------------------------- the pipeline

def test_dp_off_releases_the_exact_clipped_sums_and_says_so(tmp_path: Path) -> None:
    site = Site(tmp_path, make_policy(dp=DPPolicy(enabled=False), clip_norm=0.8))
    release = site.disclose(request())
    clipped, _, _ = clip_rows(site.x, 0.8)
    expected = accumulate(list(STATS), [Batch(clipped, site.y, NUM_CLASSES)])
    blocks = decode_release(release.payload)
    sha = request().models[0].weights_sha256
    for stat in STATS:
        np.testing.assert_allclose(blocks[f"{sha}/{stat.key}"], expected[stat.key], rtol=1e-12)
    assert release.privacy.mechanism == "none" and site.privacy.ledger.head.version == 0


def test_noise_is_calibrated_to_the_release_mu(tmp_path: Path) -> None:
    site = Site(tmp_path, make_policy(allowed_statistics={"gram"}, max_feature_dim=64))
    wide = ReleaseRequest(**{**request().__dict__,
                             "models": (ModelRequest("mlp", "ab" * 32, 60, (Stat.of("gram"),)),)})
    planned = plan_blocks(wide, site.policy)
    assert dp.release_mu([b.sensitivity for b in planned], [b.sigma for b in planned]) == pytest.approx(
        site.policy.dp.mu_per_release, rel=1e-12)
    empty = site.privacy.prepare(wide, lambda model: iter(()))  # no rows: the release is pure noise
    noise = decode_release(empty.payload)[planned[0].name]
    assert noise.shape == (60 * 61 // 2,)
    assert np.std(noise) == pytest.approx(planned[0].sigma, rel=0.08)
    assert abs(np.mean(noise)) < 5 * planned[0].sigma / math.sqrt(noise.size)


def test_noise_seeds_come_from_the_os_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = noise_generator().normal(size=8), noise_generator().normal(size=8)
    assert not np.allclose(first, second)
    monkeypatch.setattr(privacy.secrets, "token_bytes", lambda n: b"\x07" * n)
    assert np.array_equal(noise_generator().normal(size=8), noise_generator().normal(size=8))


def test_clipping_bounds_every_row_including_adversarial_ones() -> None:
    rows = np.array([[3.0, 4.0], [0.3, 0.4], [1e200, -1e200], [np.nan, 1.0], [np.inf, 0.0], [0.0, 0.0]])
    clipped, scaled, bad = clip_rows(rows, 1.0)
    norms = np.linalg.norm(clipped, axis=1)
    assert np.all(norms <= 1.0 + 1e-12)
    np.testing.assert_allclose(clipped[0], [0.6, 0.8])
    np.testing.assert_array_equal(clipped[1], rows[1])  # inside the ball: untouched
    np.testing.assert_allclose(clipped[2], [2 ** -0.5, -(2 ** -0.5)])
    np.testing.assert_array_equal(clipped[3:5], 0.0)
    assert (scaled, bad) == (2, 2)
    probs, repaired = sanitize_probs(np.array([[0.2, 0.8], [np.nan, 1.0], [-1.0, 3.0], [0.0, 0.0]]))
    np.testing.assert_allclose(probs, [[0.2, 0.8], [0.5, 0.5], [0.0, 1.0], [0.5, 0.5]])
    assert repaired == 3


def test_small_noisy_classes_are_suppressed_without_changing_shapes(tmp_path: Path) -> None:
    site = Site(tmp_path, make_policy(min_noisy_class_count=60))
    site.y = np.where(np.arange(len(site.y)) < 5, 2, np.where(site.y == 2, 0, site.y))  # class 2: 5 rows
    release = site.disclose(request())
    sha = request().models[0].weights_sha256
    blocks = decode_release(release.payload)
    class_sums = blocks[f"{sha}/{Stat.of('class_sums').key}"]
    assert release.suppressed_classes == {sha: [2]}
    assert class_sums.shape == (NUM_CLASSES, DIM) and np.all(class_sums[2] == 0) and np.any(class_sums[0] != 0)
    assert intents(site)[-1].privacy.suppressed_classes == {sha: [2]}


def test_release_encoding_is_deterministic_and_strict() -> None:
    blocks = {"b": np.arange(6, dtype=np.int64).reshape(2, 3), "a": np.linspace(0, 1, 4), "s": np.array(2.5)}
    data = encode_release(blocks)
    assert data == encode_release(dict(reversed(list(blocks.items()))))
    decoded = decode_release(data)
    assert set(decoded) == set(blocks)
    for key, value in blocks.items():
        np.testing.assert_array_equal(decoded[key], value)
        assert decoded[key].dtype == value.dtype
    with pytest.raises(StatisticsError, match="unexpected bytes"):
        decode_release(data + b"\x00")
    with pytest.raises(StatisticsError, match="past the end"):
        decode_release(data[:-1])
    with pytest.raises(StatisticsError, match="bad magic"):
        decode_release(b"\x80\x04pickle")
