"""The site policy: default deny, one test per rule, every violation named at once, and a
refusal that is audited before anything is computed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dp_accounting
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmte.client.audit_log import key_fingerprint, read_records, verify
from fedmte.client.policy import DPPolicy, SitePolicy, check_coordinator, check_request, load_policy, parse_policy
from fedmte.client.privacy import ModelRequest, ReleaseRequest, SitePrivacy
from fedmte.protocol.audit_format import RefusalRecord
from fedmte.protocol.errors import InvalidInputError, PolicyRefusal
from fedmte.protocol.requests import Stat, Transform

FULL = dict(
    allowed_scorers={"logme", "gbc"}, allowed_statistics={"count", "class_counts", "class_sums", "gram"},
    allowed_transforms={"offset"}, allowed_architectures={"mlp", "resnet18"}, max_feature_dim=128, clip_norm=1.0,
)


def refusal(policy: SitePolicy, kinds=("class_sums",), scorers=("logme",), arch="mlp", dim=64,
            transforms=()) -> PolicyRefusal:
    with pytest.raises(PolicyRefusal, match="refused by site policy") as caught:
        check_request(policy, kinds, scorers, arch, dim, transforms=transforms)
    return caught.value


def test_an_allowed_request_passes() -> None:
    assert check_request(SitePolicy(**FULL), ["class_sums", "gram"], ["logme"], "mlp", 128,
                         transforms=["offset"]) is None


def test_default_deny_names_every_rule() -> None:
    bare = SitePolicy(max_feature_dim=128, clip_norm=1.0)
    error = refusal(bare, transforms=("offset",))
    assert [rule for rule, _ in error.violations] == [
        "allowed_scorers", "allowed_statistics", "allowed_transforms", "allowed_architectures",
    ]
    assert error.rule == "allowed_scorers" and error.reason_code == "policy:allowed_scorers"
    assert "allowed: none" in str(error)


@pytest.mark.parametrize(("change", "rule", "text"), [
    (dict(scorers=("leep",)), "allowed_scorers", "['leep']"),
    (dict(kinds=("class_sums", "norm4_sum")), "allowed_statistics", "['norm4_sum']"),
    (dict(transforms=("project",)), "allowed_transforms", "['project']"),
    (dict(arch="vit-huge"), "allowed_architectures", "'vit-huge'"),
    (dict(dim=129), "max_feature_dim", "129 exceeds"),
])
def test_each_rule_refuses_on_its_own(change: dict, rule: str, text: str) -> None:
    error = refusal(SitePolicy(**FULL), **change)
    assert error.violations[0][0] == rule and len(error.violations) == 1
    assert text in str(error)


def test_the_dimension_limit_is_inclusive() -> None:
    check_request(SitePolicy(**FULL), ["gram"], ["logme"], "mlp", 128)


def test_unbounded_statistics_are_refused_while_dp_is_on() -> None:
    policy = SitePolicy(**{**FULL, "allowed_statistics": {"soft_joint", "mixture_loglik"}})
    error = refusal(policy, kinds=("soft_joint", "mixture_loglik"))
    assert error.rule == "dp.bounded_statistics" and "unbounded below" in str(error)
    off = SitePolicy(**{**FULL, "allowed_statistics": {"soft_joint", "mixture_loglik"}},
                     dp=DPPolicy(enabled=False))
    check_request(off, ["soft_joint", "mixture_loglik"], ["logme"], "mlp", 8)


def test_several_violations_are_reported_together() -> None:
    error = refusal(SitePolicy(**FULL), scorers=("leep",), arch="vit", dim=4096)
    assert [rule for rule, _ in error.violations] == ["allowed_scorers", "allowed_architectures", "max_feature_dim"]


def test_only_pinned_coordinator_keys_are_accepted() -> None:
    pinned = Ed25519PrivateKey.generate().public_key()
    policy = SitePolicy(**FULL, coordinator_keys={"hospital-consortium": key_fingerprint(pinned)})
    assert check_coordinator(policy, key_fingerprint(pinned)) == "hospital-consortium"
    stranger = key_fingerprint(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(PolicyRefusal, match="not pinned") as caught:
        check_coordinator(policy, stranger)
    assert caught.value.rule == "coordinator_keys"
    with pytest.raises(PolicyRefusal, match="not pinned"):
        check_coordinator(SitePolicy(**FULL), key_fingerprint(pinned))  # nothing pinned: nobody


def test_typos_and_impossible_settings_fail_at_load_time() -> None:
    with pytest.raises(InvalidInputError, match="unknown scorer name"):
        parse_policy({**FULL, "allowed_scorers": ["logmee"]})
    with pytest.raises(InvalidInputError, match="unknown statistic name"):
        parse_policy({**FULL, "allowed_statistics": ["grams"]})
    with pytest.raises(InvalidInputError, match="exceeds epsilon_budget"):
        parse_policy({**FULL, "dp": {"epsilon_per_release": 5.0, "epsilon_budget": 4.0}})
    with pytest.raises(InvalidInputError, match="max_feature_dim"):
        parse_policy({"clip_norm": 1.0})
    with pytest.raises(InvalidInputError, match="allow_everything: Extra inputs"):
        parse_policy({**FULL, "allow_everything": True})


def test_dp_settings_match_dp_accountings_calibration() -> None:
    settings = DPPolicy(epsilon_per_release=2.0, epsilon_budget=8.0, delta=1e-6)
    assert settings.mu_per_release == pytest.approx(1 / dp_accounting.get_sigma_gaussian(2.0, 1e-6), rel=1e-7)
    assert settings.mu_cap == pytest.approx(1 / dp_accounting.get_sigma_gaussian(8.0, 1e-6), rel=1e-7)


def test_policy_from_a_site_file_and_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        '[data]\npath = "images/"\n\n'
        "[policy]\n"
        'allowed_scorers = ["logme", "gbc"]\n'
        'allowed_statistics = ["count", "class_counts", "class_sums", "gram"]\n'
        'allowed_transforms = ["offset"]\n'
        'allowed_architectures = ["resnet18", "mlp"]\n'
        "max_feature_dim = 128\nclip_norm = 1.0\n\n"
        "[policy.dp]\nepsilon_per_release = 1.0\nepsilon_budget = 4.0\n"
    )
    policy = load_policy(path)
    assert policy == SitePolicy(**FULL)
    reordered = SitePolicy(**{**FULL, "allowed_architectures": ["resnet18", "mlp"][::-1]})
    assert policy.sha256() == reordered.sha256()
    assert policy.sha256() != SitePolicy(**{**FULL, "clip_norm": 2.0}).sha256()


def test_a_refused_request_is_audited_and_nothing_is_computed(tmp_path: Path) -> None:
    coordinator = Ed25519PrivateKey.generate().public_key()
    policy = SitePolicy(**FULL, coordinator_keys={"c": key_fingerprint(coordinator)})
    key = Ed25519PrivateKey.generate()
    site = SitePrivacy.open(policy, audit_dir=tmp_path / "audit", ledger_dir=tmp_path / "ledger",
                            site_id="site-a", signing_key=key)
    calls: list[object] = []
    stats = (Stat.of("class_sums", (Transform.of("project", basis=[[1.0], [0.0]]),)),)
    request = ReleaseRequest(
        requester=key_fingerprint(coordinator), recipient="coordinator", run_id="run-1", round=0,
        data_source="ward-7", dataset_version=hashlib.sha256(b"v").hexdigest(), num_classes=2,
        models=(ModelRequest("mlp", "cd" * 32, 2, stats),), scorers=("logme",),
    )
    with pytest.raises(PolicyRefusal, match="allowed_transforms") as caught:
        site.disclose(request, lambda model: calls.append(model) or iter(()), calls.append)
    assert caught.value.rule == "allowed_transforms" and calls == []
    stranger = ReleaseRequest(**{**request.__dict__, "requester": "ef" * 32})
    with pytest.raises(PolicyRefusal, match="not pinned"):
        site.disclose(stranger, lambda model: calls.append(model) or iter(()), calls.append)
    site.close()
    refusals = [r for r in read_records(tmp_path / "audit") if isinstance(r, RefusalRecord)]
    assert [r.rule for r in refusals] == ["allowed_transforms", "coordinator_keys"]
    assert refusals[0].reason_code == "policy:allowed_transforms" and refusals[0].models[0].arch_id == "mlp"
    assert verify(tmp_path / "audit", key.public_key()).ok
