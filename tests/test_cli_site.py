"""``fedmte --version``, ``fedmte site check|keygen|fingerprint`` and ``fedmte init site|job``."""

from __future__ import annotations

import json
import math
import stat
import tomllib
import typing
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedmte.cli import app, installed_version
from fedmte.cli import init as init_cli
from fedmte.cli import site as site_cli
from fedmte.client.ledger import Ledger
from fedmte.client.site_config import load_site_config
from fedmte.protocol import dp
from fedmte.protocol.keys import fingerprint, public_key_text, write_private_key
from fedmte.trial.local_sites import write_site
from tests.test_cli_startup import _probe

runner = CliRunner()
COORDINATOR = Ed25519PrivateKey.generate()


def invoke(*args: str):  # noqa: ANN201
    return runner.invoke(app, list(args), catch_exceptions=False)


def _site(tmp_path: Path, **kwargs: object) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"inputs": rng.normal(size=(60, 4)), "labels": np.array(["a", "b", "c"] * 20)}
    return write_site(tmp_path / "site", "hospital-a", arrays, ["a", "b", "c"], coordinator=COORDINATOR, **kwargs)


def _check(site_file: Path) -> tuple[int, dict]:
    done = invoke("site", "check", str(site_file), "--json")
    return done.exit_code, json.loads(done.stdout)


# --------------------------------------------------------------------------- --version, startup

def test_version_prints_the_installed_version() -> None:
    done = invoke("--version")
    assert done.exit_code == 0
    assert done.stdout.strip() == f"fedmte {installed_version()}"
    assert installed_version() == "0.1.0"


@pytest.mark.parametrize("args", [["--version"], ["site", "--help"], ["site", "check", "--help"],
                                  ["init", "site", "--help"]], ids=" ".join)
def test_new_commands_start_light(args: list[str]) -> None:
    result = _probe(*args)
    assert result["code"] in (0, None), result
    assert result["heavy"] == [], result


# --------------------------------------------------------------------------- site check

def test_check_reports_policy_keys_and_budget(tmp_path: Path) -> None:
    site_file = _site(tmp_path)
    code, report = _check(site_file)
    assert code == 0, report["problems"]
    config = load_site_config(site_file)
    assert report["ok"] and report["problems"] == []
    assert report["data"]["opens"] and report["data"]["rows"] == 60
    policy = report["policy"]
    assert policy["allowed_scorers"] == sorted(config.policy.allowed_scorers)
    assert policy["clip_norm"] == config.policy.clip_norm
    assert {"allocation", "distributed", "colluding_sites", "epsilon_budget", "delta"} <= set(policy["dp"])
    keys = {key["role"]: key for key in report["keys"]}
    assert keys["coordinator"]["fingerprint"] == fingerprint(COORDINATOR)
    assert keys["audit"]["fingerprint"] == config.audit.verification_key_sha256
    [budget] = report["budget"]
    assert budget["current"] and budget["releases_spent"] == 0 and budget["epsilon_spent"] == 0
    assert budget["epsilon_left_one_release"] == pytest.approx(config.policy.dp.epsilon_budget, rel=1e-6)
    # composition is not additive: far more than budget / epsilon_per_release releases fit
    expected = math.floor(config.policy.dp.mu_cap ** 2 / config.policy.dp.mu_per_release ** 2)
    assert budget["releases_left"] == expected > config.policy.dp.epsilon_budget / config.policy.dp.epsilon_per_release


def test_check_converts_the_spent_budget_from_mu(tmp_path: Path) -> None:
    site_file = _site(tmp_path)
    config = load_site_config(site_file)
    source = report_source = _check(site_file)[1]["data"]["data_source"]
    ledger = Ledger.open(config.audit.ledger_dir, site_id="hospital-a", expected=None)
    settings = config.policy.dp
    for _ in range(3):
        ledger.reserve(source, settings.mu_per_release, settings.mu_cap)
    ledger.reserve("arrays:sha256:" + "0" * 64, settings.mu_per_release, settings.mu_cap)  # an earlier version
    code, report = _check(site_file)
    assert code == 0
    current, other = report["budget"]
    assert current["data_source"] == report_source and current["current"] and not other["current"]
    spent_sq = 3 * settings.mu_per_release ** 2
    assert current["releases_spent"] == 3
    assert current["epsilon_spent"] == pytest.approx(dp.gdp_epsilon(math.sqrt(spent_sq), settings.delta))
    assert current["epsilon_spent"] < 3 * settings.epsilon_per_release  # not additive
    left_sq = settings.mu_cap ** 2 - spent_sq
    assert current["epsilon_left_one_release"] == pytest.approx(dp.gdp_epsilon(math.sqrt(left_sq), settings.delta))
    assert current["releases_left"] == math.floor(left_sq / settings.mu_per_release ** 2 + 1e-9)
    assert other["releases_spent"] == 1
    # the ledger takes exactly releases_left more releases of the policy's cost, then refuses
    for _ in range(current["releases_left"]):
        ledger.reserve(source, settings.mu_per_release, settings.mu_cap)
    with pytest.raises(Exception, match="epsilon_budget"):
        ledger.check(source, settings.mu_per_release, settings.mu_cap)
    assert _check(site_file)[1]["budget"][0]["releases_left"] == 0


def test_the_budget_is_looked_up_under_the_agents_name_for_the_data(tmp_path: Path) -> None:
    from fedmte.client.site_agent import SiteAgent

    site_file = _site(tmp_path)
    name = _check(site_file)[1]["data"]["data_source"]
    agent = SiteAgent(site_file)
    try:
        assert agent.data_source == name
    finally:
        agent.close()


def test_plain_output_names_the_composition_and_wraps_without_splitting_words(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    site_file = _site(tmp_path)
    plain = invoke("site", "check", str(site_file)).stdout
    assert "mu^2" in plain and "not their epsilons" in plain and "release(s) at epsilon 1 each" in plain
    monkeypatch.setattr(site_cli, "_width", lambda: 80)
    wrapped = invoke("site", "check", str(site_file)).stdout
    assert wrapped.split() == plain.split()  # the same words, none split or cut
    assert all(len(line) <= 80 for line in wrapped.splitlines()), wrapped
    assert fingerprint(COORDINATOR) in wrapped.split()


def test_check_names_each_problem_and_its_fix(tmp_path: Path) -> None:
    site_file = _site(tmp_path)
    (site_file.parent / "data.npz").unlink()
    config = load_site_config(site_file)
    config.audit.signing_key.unlink()
    write_private_key(config.audit.signing_key)  # another key than the pinned one
    done = invoke("site", "check", str(site_file))
    assert done.exit_code == 2
    assert "[data] path" in done.stderr and "put the data there" in done.stderr
    assert "[audit] verification_key_sha256" in done.stderr and "restore the pinned key" in done.stderr
    code, report = _check(site_file)
    assert code == 2 and len(report["problems"]) == 2 and not report["ok"]


def test_check_refuses_typos_with_a_suggestion(tmp_path: Path) -> None:
    site_file = _site(tmp_path)
    text = site_file.read_text().replace("allowed_scorers", "alowed_scorers")
    site_file.write_text(text)
    done = invoke("site", "check", str(site_file))
    assert done.exit_code == 2
    assert "policy.alowed_scorers" in done.stderr and "did you mean allowed_scorers?" in done.stderr
    assert "fedmte init site" in done.stderr
    done = invoke("site", "check", str(tmp_path / "missing.toml"))
    assert done.exit_code == 2 and "not found" in done.stderr and "fedmte init site DIR" in done.stderr


def test_check_without_a_policy_or_coordinators_fails(tmp_path: Path) -> None:
    site_file = _site(tmp_path)
    document = tomllib.loads(site_file.read_text())
    del document["policy"]
    document["trust"] = {"coordinators": {}}
    from fedmte.client.site_config import site_file_text

    site_file.write_text(site_file_text(document))
    code, report = _check(site_file)
    assert code == 2
    assert any(p.startswith("[policy]") and "add one" in p for p in report["problems"])
    assert any(p.startswith("[trust.coordinators]") and "add name" in p for p in report["problems"])


# --------------------------------------------------------------------------- keys

def test_keygen_writes_a_private_key_once_and_fingerprint_reads_every_form(tmp_path: Path) -> None:
    done = invoke("site", "keygen", str(tmp_path / "keys"), "--json")
    assert done.exit_code == 0, done.output
    made = json.loads(done.stdout)
    path = Path(made["path"])
    assert path.name == "audit.key" and stat.S_IMODE(path.stat().st_mode) == 0o600
    again = invoke("site", "keygen", str(tmp_path / "keys"))
    assert again.exit_code == 2 and "never overwritten" in again.stderr
    identity = invoke("site", "keygen", str(tmp_path / "keys"), "--kind", "identity")
    assert identity.exit_code == 0 and (tmp_path / "keys" / "identity.pem").exists()
    assert "[secure.roster]" in identity.stdout

    from fedmte.client.audit_log import public_key_pem

    key = Ed25519PrivateKey.generate()
    (tmp_path / "pub.pem").write_bytes(public_key_pem(key.public_key()))
    (tmp_path / "pub.txt").write_text(public_key_text(key) + "\n")
    for given, expected in [(str(path), made["fingerprint"]), (str(tmp_path / "pub.pem"), fingerprint(key)),
                            (str(tmp_path / "pub.txt"), fingerprint(key)), (public_key_text(key), fingerprint(key))]:
        done = invoke("site", "fingerprint", given, "--json")
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout)["fingerprint"] == expected
    assert made["public_key"] == json.loads(invoke("site", "fingerprint", str(path), "--json").stdout)["public_key"]
    path.chmod(0o644)
    done = invoke("site", "fingerprint", str(path))
    assert done.exit_code == 2 and "chmod 600" in done.stderr
    (tmp_path / "junk").write_text("hello")
    done = invoke("site", "fingerprint", str(tmp_path / "junk"))
    assert done.exit_code == 2 and "holds no Ed25519 key" in done.stderr and "fedmte site keygen" in done.stderr


# --------------------------------------------------------------------------- templates

def test_site_template_filled_in_passes_site_check(tmp_path: Path) -> None:
    assert invoke("init", "site", str(tmp_path)).exit_code == 0
    template = (tmp_path / "site.toml").read_text()
    with pytest.raises(Exception, match="ed25519"):
        load_site_config(tmp_path / "site.toml")  # the placeholders must be filled
    assert invoke("site", "keygen", str(tmp_path / "keys")).exit_code == 0
    filled = template.replace("ed25519:CHANGE-ME", public_key_text(COORDINATOR)).replace("CHANGE-ME", "hospital-a")
    (tmp_path / "site.toml").write_text(filled)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "hospital-a.npz", inputs=np.zeros((5, 3)), labels=np.array(list("ababa")))
    config = load_site_config(tmp_path / "site.toml")
    assert config.site.name == "hospital-a" and config.policy is not None and config.policy.dp.enabled
    code, report = _check(tmp_path / "site.toml")
    assert code == 0, report["problems"]
    done = invoke("init", "site", str(tmp_path))
    assert done.exit_code == 2 and "never overwritten" in done.stderr
    assert (tmp_path / "site.toml").read_text() == filled


def test_job_template_filled_in_loads(tmp_path: Path) -> None:
    from fedmte.server.job import load_job

    assert invoke("init", "job", str(tmp_path)).exit_code == 0
    text = (tmp_path / "job.toml").read_text()
    (tmp_path / "job.toml").write_text(text.replace("CHANGE-ME", "demo"))
    job = load_job(tmp_path / "job.toml")
    assert job.connection == "demo" and job.scorers and job.privacy.dp
    assert invoke("init", "job", str(tmp_path)).exit_code == 2


def _tables(model: type, path: str) -> typing.Iterator[tuple[type, str, str]]:
    """(model, table, key) for every key of every table reachable from ``model``."""
    for name, info in model.model_fields.items():
        if init_cli._lookup(init_cli.SKIP, model, name) is not None:
            continue
        key = info.alias or name
        yield model, path, key
        sub = init_cli._submodel(info.annotation)
        if sub is not None and not init_cli._is_dict(info.annotation):
            yield from _tables(sub, f"{path}.{key}" if path else key)


def _documented(text: str, key: str) -> bool:
    return any(line.lstrip("# ").startswith(f"{key} = ") or line.lstrip("# ").startswith(f"[{key}")
               or f".{key}]" in line for line in text.splitlines())


@pytest.mark.parametrize("kind", ["site", "job"])
def test_templates_document_every_key_of_the_model(kind: str) -> None:
    from fedmte.client.site_config import ArraySource, FeaturesSource, ImageFolderSource, SiteConfig, TableSource
    from fedmte.server.job import Candidate, JobSpec

    text = init_cli.TEMPLATES[kind][1]()
    roots = ([SiteConfig, ImageFolderSource, TableSource, ArraySource, FeaturesSource] if kind == "site"
             else [JobSpec, Candidate])
    for root in roots:
        for model, table, key in _tables(root, ""):
            init_cli.field_doc(model, key if key in model.model_fields else next(
                n for n, i in model.model_fields.items() if i.alias == key))  # a description or a note
            assert _documented(text, key) or key in text, f"{model.__name__}.{key} ({table}) is not in the template"


def test_notes_name_existing_fields_and_architectures() -> None:
    import fedmte.client.site_config as site_config
    import fedmte.server.job as job
    import fedmte.server.secure_aggregation as secure
    from fedmte.client import limits, policy
    from fedmte.client.architectures import ARCHITECTURES
    from fedmte.client.architectures_extras import EXTRA_ARCHITECTURES
    from fedmte.protocol import secure_rounds

    modules = (site_config, job, secure, limits, policy, secure_rounds)
    for entry in [*init_cli.NOTES, *init_cli.EXAMPLES, *init_cli.SKIP]:
        model_name, field = entry.split(".")
        model = next(getattr(m, model_name) for m in modules if hasattr(m, model_name))
        assert field in model.model_fields, f"{entry} documents a field that no longer exists"
    assert set(init_cli.ARCHITECTURE_NAMES) == set(ARCHITECTURES) | set(EXTRA_ARCHITECTURES) | {"site_features"}
