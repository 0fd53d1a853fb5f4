"""Precomputed features as a site's data: ``[data] kind = "features"`` scored as a
``site_features`` candidate, in process (site agents behind :class:`tests.job_helpers.AgentExchange`,
the coordinator's :func:`fedmte.server.coordinator.execute_job`).

Such a site runs no model, but everything else is the same as for a model's features: its
policy decides (``allowed_scorers``; ``site_features`` must be an allowed architecture), its
rows are clipped to the policy's ``clip_norm``, DP noise and the ledger apply, and every byte
it sends is in its audit log. With DP off and a clip norm no row reaches, the federated scores
equal :func:`fedmte.score` on the pooled rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import fedmte
from fedmte.client.audit_log import read_records, verify
from fedmte.protocol.audit_format import IntentRecord, RefusalRecord
from fedmte.protocol.errors import FederationError
from fedmte.protocol.job_messages import SITE_FEATURES, site_features_id
from fedmte.server.coordinator import JobOutcome, build_job_report, execute_job, load_candidates
from fedmte.server.job import JobSpec, job_from_dict
from fedmte.trial.local_sites import coordinator_key, example_packages, write_site
from tests.datasets import DATASETS, site_split_without_class
from tests.job_helpers import AgentExchange

DATA = DATASETS["basic"]
LABELS = [f"k{c}" for c in range(DATA.num_classes)]  # the .npz files hold class indices into these
SCORERS = ["logme", "hscore", "gbc", "nce", "leep"]
FEATURES = "hospital-features"
MODEL = site_features_id(FEATURES)
ROWS = site_split_without_class(DATA, absent=0, sites=3)


class Sites:
    """Three features-kind site files (one coordinator key) under ``root``."""

    def __init__(self, root: Path, *, dp: bool = False, clip_norm: float | None = None,
                 policies: dict[int, dict[str, object]] | None = None) -> None:
        self.root = root
        self.key, _ = coordinator_key(root / "coordinator")
        self.files = [
            write_site(root / f"site{k}", f"site{k}", {"features": DATA.features[idx], "labels": DATA.labels[idx],
                                                       "source_probs": DATA.source_probs[idx]},
                       LABELS, coordinator=self.key, dp=dp, clip_norm=clip_norm, policy=(policies or {}).get(k))
            for k, idx in enumerate(ROWS)
        ]

    def job(self, scorers: Sequence[str] = SCORERS, *, dp: bool = False, packages: Sequence[Path] = ()) -> JobSpec:
        candidates: list[object] = [{"name": FEATURES, "site_features": True}]
        candidates += [{"name": path.name, "path": str(path)} for path in packages]
        return job_from_dict({"connection": "unused", "labels": LABELS, "scorers": list(scorers),
                              "privacy": {"dp": dp}, "candidates": candidates, "output": str(self.root / "out"),
                              "purpose": "site features test"})

    def run(self, job: JobSpec, run_id: str, files: Sequence[Path] | None = None) -> JobOutcome:
        return execute_job(AgentExchange(files or self.files, run_id), job, load_candidates(job), self.key, run_id=run_id)


def clipped(rows: np.ndarray, clip_norm: float) -> np.ndarray:
    """Each row scaled to L2 norm at most ``clip_norm`` (the policy's per-sample clipping)."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, clip_norm / norms)


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Sites, JobOutcome]:
    sites = Sites(tmp_path_factory.mktemp("features"))
    return sites, sites.run(sites.job(), "501")


def test_site_features_scores_equal_the_pooled_scores(exact: tuple[Sites, JobOutcome]) -> None:
    sites, outcome = exact
    pooled = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS)
    record = outcome.models[MODEL]
    assert record.package.site_features and record.result is not None and not record.failures
    assert record.dim == DATA.features.shape[1] and record.num_source_classes == DATA.source_probs.shape[1]
    for scorer in SCORERS:
        assert record.result.scores[scorer] == pytest.approx(pooled[scorer], rel=1e-9), scorer
    report = build_job_report(sites.job(), outcome)
    (row,) = report.models
    assert row.name == FEATURES and set(row.scores) == set(SCORERS)
    assert row.metadata.manifest_sha256 == MODEL and row.metadata.parameter_count is None  # no package, no manifest
    assert not report.privacy.dp_applied and all(not s.privacy.dp for s in report.sites)


def test_every_reply_of_a_features_site_is_audited(exact: tuple[Sites, JobOutcome]) -> None:
    sites, outcome = exact
    for node, site_file in zip(sorted(outcome.sites), sites.files, strict=True):
        audit = site_file.parent / "audit"
        received = Counter(r.sha256 for r in outcome.receipts if r.node == node)
        sizes = {r.sha256: r.nbytes for r in outcome.receipts if r.node == node}
        intents = [r for r in read_records(audit) if isinstance(r, IntentRecord) and r.run_id == "501"]
        assert Counter(r.payload.sha256 for r in intents) == received
        for record in intents:
            copy = (audit / "payloads" / f"{record.payload.sha256}.bin").read_bytes()
            assert len(copy) == record.payload.bytes == sizes[record.payload.sha256]
        stats = [r for r in intents if r.statistics]
        assert len(stats) == outcome.planned_rounds
        assert all(m.arch_id == SITE_FEATURES for r in stats for m in r.models)
        assert verify(audit).ok


def test_a_scorer_the_policy_does_not_allow_is_refused_at_setup_and_audited(tmp_path: Path) -> None:
    sites = Sites(tmp_path, policies={2: {"allowed_scorers": ["logme", "hscore"]}})
    partial = sites.run(sites.job(["logme", "nce"]), "502")  # nce is left out with the site's rule; logme runs
    assert set(partial.models[MODEL].result.scores) == {"logme"}  # type: ignore[union-attr]
    assert "[allowed_scorers] scorer(s) ['nce'] are not allowed here" in partial.models[MODEL].failures["nce"]
    refusals = [r for r in read_records(sites.files[2].parent / "audit") if isinstance(r, RefusalRecord)]
    assert [(r.run_id, r.rule) for r in refusals] == [("502", "scorers")]
    # the scorers it allows run
    outcome = sites.run(sites.job(["logme", "hscore"]), "503")
    assert set(outcome.models[MODEL].result.scores) == {"logme", "hscore"}  # type: ignore[union-attr]


def test_site_features_must_be_an_allowed_architecture(tmp_path: Path) -> None:
    sites = Sites(tmp_path, policies={0: {"allowed_architectures": ["mlp"]}})
    with pytest.raises(FederationError, match="no candidate can be scored by every site"):
        sites.run(sites.job(["hscore"]), "504")
    refusals = [r for r in read_records(sites.files[0].parent / "audit") if isinstance(r, RefusalRecord)]
    assert [(r.run_id, r.rule) for r in refusals] == [("504", "allowed_architectures")]
    assert [m.arch_id for m in refusals[0].models] == [SITE_FEATURES]


def test_the_policys_clip_norm_applies_to_site_features(tmp_path: Path) -> None:
    clip_norm = 1.5
    norms = np.linalg.norm(DATA.features, axis=1)
    assert (norms > clip_norm).mean() > 0.5  # most rows are scaled
    sites = Sites(tmp_path, clip_norm=clip_norm)
    outcome = sites.run(sites.job(), "505")
    scores = outcome.models[MODEL].result.scores  # type: ignore[union-attr]
    expected = fedmte.score(clipped(DATA.features, clip_norm), DATA.labels, source_probs=DATA.source_probs,
                            scorers=SCORERS)
    unclipped = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS)
    for scorer in SCORERS:
        assert scores[scorer] == pytest.approx(expected[scorer], rel=1e-9), scorer
    # clipping the features moves every feature scorer; nce and leep read only labels and source_probs
    for scorer in ("logme", "hscore", "gbc"):
        assert scores[scorer] != pytest.approx(unclipped[scorer], rel=1e-6), scorer


def test_with_dp_on_site_features_are_noised_charged_and_audited(tmp_path: Path) -> None:
    sites = Sites(tmp_path, dp=True, clip_norm=5.0)
    job = sites.job(["hscore", "gbc"], dp=True)
    outcome = sites.run(job, "506")
    report = build_job_report(job, outcome)
    assert report.privacy.dp_applied and not report.privacy.secure_sum
    for site in report.sites:
        assert site.privacy.dp and (site.privacy.epsilon_spent or 0.0) > 0
        assert site.privacy.epsilon_spent <= site.privacy.epsilon_budget  # type: ignore[operator]
        assert all(s.noised and not s.masked for s in site.statistics)
    noisy = outcome.models[MODEL].result.scores  # type: ignore[union-attr]
    exact_clipped = fedmte.score(clipped(DATA.features, 5.0), DATA.labels, scorers=["hscore", "gbc"])
    for scorer in ("hscore", "gbc"):
        assert noisy[scorer] != pytest.approx(exact_clipped[scorer], rel=1e-9), scorer
    for node, site_file in zip(sorted(outcome.sites), sites.files, strict=True):
        audit = site_file.parent / "audit"
        intents = [r for r in read_records(audit) if isinstance(r, IntentRecord) and r.run_id == "506"]
        assert Counter(r.payload.sha256 for r in intents) == Counter(r.sha256 for r in outcome.receipts if r.node == node)
        assert all((audit / "payloads" / f"{r.payload.sha256}.bin").is_file() for r in intents)
        released = [r for r in intents if r.statistics]
        assert released and all(r.privacy is not None and r.privacy.mechanism != "none" for r in released)
        result = verify(audit, check_payloads=True)
        assert result.ok, result.summary()
        assert (site_file.parent / "ledger").is_dir()


def test_a_model_package_is_refused_by_a_features_site_and_site_features_by_a_raw_data_site(tmp_path: Path) -> None:
    sites = Sites(tmp_path / "features")
    package = example_packages(tmp_path / "models", sites.key, DATA.features.shape[1],
                               {"mlp-small": {"hidden_dims": [8], "num_source_classes": 0, "seed": 1}})["mlp-small"]
    job = sites.job(["hscore"], packages=[package])
    outcome = sites.run(job, "507")
    (model,) = [r for r in outcome.models.values() if not r.package.site_features]
    assert model.run is None and len(model.refusals) == 3
    assert all("[data.input_kind]" in text and "runs no model packages" in text for text in model.refusals)
    assert outcome.models[MODEL].result is not None  # the site's own features are still scored
    refusals = [r for r in read_records(sites.files[0].parent / "audit") if isinstance(r, RefusalRecord)]
    assert [(r.run_id, r.rule) for r in refusals] == [("507", "data.input_kind")]

    rng = np.random.default_rng(0)
    raw = [write_site(tmp_path / "raw" / f"raw{k}", f"raw{k}",
                      {"inputs": rng.normal(size=(60, DATA.features.shape[1])), "labels": DATA.labels[idx][:60]},
                      LABELS, coordinator=sites.key, dp=False)
           for k, idx in enumerate(np.array_split(np.arange(len(DATA.labels)), 2))]
    exchange = AgentExchange(raw, "508")
    outcome = execute_job(exchange, job, load_candidates(job), sites.key, run_id="508")
    features = outcome.models[MODEL]
    assert features.run is None and len(features.refusals) == 2
    assert all("[data.kind]" in text and "not precomputed features" in text for text in features.refusals)
    (model,) = [r for r in outcome.models.values() if not r.package.site_features]
    assert model.result is not None and "hscore" in model.result.scores  # the package runs at a raw-data site
    refusals = [r for r in read_records(raw[0].parent / "audit") if isinstance(r, RefusalRecord)]
    # one refusal per setup message (the package's weights came in a second one)
    assert {(r.run_id, r.rule, tuple(m.arch_id for m in r.models)) for r in refusals} == {("508", "data.kind", (SITE_FEATURES,))}
    assert len(refusals) == [q for q, _ in exchange.sent].count("setup") == 2


def test_an_unpinned_coordinator_is_refused_by_features_sites(exact: tuple[Sites, JobOutcome]) -> None:
    sites, _ = exact
    job = sites.job(["hscore"])
    with pytest.raises(FederationError, match="setup round setup failed") as caught:
        execute_job(AgentExchange(sites.files, "509"), job, load_candidates(job), Ed25519PrivateKey.generate(),
                    run_id="509")
    assert set(caught.value.failures) == {"100", "101", "102"}
    assert all("[coordinator_keys]" in reason for reason in caught.value.failures.values())
