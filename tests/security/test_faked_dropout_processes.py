"""Issue 11 finding 2 (faked dropouts unmask single sites in the secure sum) over real Flower
processes.

A loopback federation (SuperLink with TLS and SuperNode authentication) of three fedmte site
runners, each a features-kind site (DP off, so any leak would be exact) that pins the
coordinator's key and requires the secure sum. The coordinator is malicious: it holds the
key the sites trust and runs its own ServerApp, ``tests.security.faked_dropout_serverapp``,
submitted as a Flower app bundle whose hash the sites allowlisted (``--allow-fab``). That
ServerApp runs the job's first phase honestly, then asks every site for the second phase's
masked upload and sends an unmask request declaring ``site2`` dropped although it uploaded
(active ``[site0, site1]``, a different active set than the first phase fixed).

The test shows: the first phase's sum is exact (the sum of the sites' own plain replies to
the same request, replayed in process at copies of the sites); every site, ``site2``
included, refuses the forged reveal with the active-set rule, so nothing of the second
phase decodes (neither the "active" uploads with the reveals it got, nor all three uploads
added up); each site's runner accepted exactly one reveal in the run; and each site's audit
log records the refusal (rule ``active_set_fixed``, both lists) and the job's abort.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedmte.client.audit_log import read_records
from fedmte.client.site_config import load_site_config
from fedmte.flower_pin import FAB_DIR
from fedmte.protocol.keys import load_private_key
from fedmte.protocol.secure_rounds import DeclaredBounds
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.wire import Payload
from fedmte.server.coordinator import execute_job, load_candidates, server_job_text
from fedmte.server.job import JobSpec
from fedmte.server.job_runner import flwr_env, submit_run, wait_for_status
from fedmte.server.report import RunStatus
from fedmte.server.secure_aggregation import SecureJobSpec
from fedmte.trial.local_federation import LocalFederation, down, up
from tests.datasets import DATASETS, site_split_without_class
from tests.job_helpers import AgentExchange
from tests.security.faked_dropout_serverapp import EVIDENCE, PHASE0_SUM
from tests.test_flower_federation import decisions, job, site_files, site_home
from tests.test_secure_federation import require_secure_sum

pytestmark = pytest.mark.slow  # starts a SuperLink and SuperNodes

DATA = DATASETS["basic"]
SCORERS = ["hscore", "gbc", "logme", "nce"]
SITES = 3
NAMES = [f"site{k}" for k in range(SITES)]
REPO = Path(__file__).resolve().parents[2]
EVIL_SERVERAPP = "tests.security.faked_dropout_serverapp:app"
ACTIVE_SET = "secure:active_set_changed"


def evil_fab(directory: Path) -> tuple[Path, str]:
    """fedmte's FAB with the ServerApp replaced by the faked-dropout one; its sha256 as
    :func:`fedmte.flower_pin.installed_fab_hash` computes a FAB's."""
    from flwr.cli.build import build_fab_from_disk

    directory.mkdir(parents=True, exist_ok=True)
    text = (FAB_DIR / "pyproject.toml").read_text(encoding="utf-8")
    honest = 'serverapp = "fedmte.server.flower_app:app"'
    assert honest in text
    (directory / "pyproject.toml").write_text(text.replace(honest, f'serverapp = "{EVIL_SERVERAPP}"'), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return directory, hashlib.sha256(build_fab_from_disk(directory)).hexdigest()


@contextmanager
def repo_on_pythonpath() -> Iterator[None]:
    """The SuperLink (and the ``flwr-serverapp`` processes it starts) inherit this process's
    environment: with the repo root on PYTHONPATH they can import ``tests.security``."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *([before] if before else [])])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


@dataclass(frozen=True)
class Attack:
    state: LocalFederation
    spec: SecureJobSpec
    job: JobSpec
    status: RunStatus
    output: Path
    evidence: dict[str, object]
    fab_hash: str


@pytest.fixture(scope="module")
def attack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    root = tmp_path_factory.mktemp("faked-dropout")
    fab_dir, fab_hash = evil_fab(root / "evil-fab")
    data = site_files(root / "data", site_split_without_class(DATA, absent=0, sites=SITES))
    with repo_on_pythonpath():  # the SuperLink, and `flwr run`, which loads the app's components to check them
        state = up(root / "local", SITES, data=data, runner="site", dp=False, allowlist=[fab_hash])
        env = flwr_env(Path(state.flwr_home))
    try:
        bounds = DeclaredBounds(max_rows=1000, feature_norm=float(np.max(np.linalg.norm(DATA.features, axis=1))) * 2)
        spec = require_secure_sum(state, bounds)
        output = (root / "out").resolve()
        output.mkdir()
        the_job = job(state, output, SCORERS, secure=spec.model_dump(mode="json"))
        run_id = submit_run(server_job_text(the_job), the_job.connection, env, fab_dir)
        status = wait_for_status(output / "run.json", run_id, the_job.connection, env, the_job.federation.run_timeout)
        evidence_path = output / EVIDENCE
        assert evidence_path.exists(), f"the evil ServerApp wrote no evidence; status: {status}"
        yield Attack(state, spec, the_job, status, output, json.loads(evidence_path.read_text()), fab_hash)
    finally:
        down(Path(state.directory))


def plain_first_round(attack: Attack, tmp: Path) -> list[Statistics]:
    """Each site's plain reply to the job's first statistics round, by a site agent at a copy
    of the site (site file, data, keys; fresh audit log). The first round's request depends
    only on the plan, so it is the request the secure job's first phase wrapped."""
    copies = []
    for index in range(SITES):
        home, copy = site_home(attack.state, index), tmp / f"site{index}"
        copy.mkdir(parents=True)
        shutil.copy(home / "site.toml", copy / "site.toml")
        shutil.copy(home / "data.npz", copy / "data.npz")
        shutil.copytree(home / "keys", copy / "keys")
        copies.append(copy / "site.toml")
    replies: dict[tuple[str, str], dict[int, Payload]] = {}

    class Recording(AgentExchange):
        def exchange(self, query, payloads, *, group):  # type: ignore[no-untyped-def]
            got = super().exchange(query, payloads, group=group)
            replies[(query, group)] = got
            return got

    plain = attack.job.model_copy(update={"secure": None})
    execute_job(Recording(copies, "replay"), plain, load_candidates(plain),
                load_private_key(attack.state.coordinator_key), run_id="replay")
    return [Statistics.from_arrays(reply.arrays) for _, reply in sorted(replies[("stats", "1")].items())]


def test_the_first_phase_is_summed_exactly_over_all_three_sites(attack: Attack, tmp_path: Path) -> None:
    phase0 = attack.evidence["phase0"]
    assert isinstance(phase0, dict) and phase0["decoded"]
    assert phase0["active"] == NAMES and phase0["dropped"] == []
    with np.load(attack.output / PHASE0_SUM) as stored:
        got = {key: stored[key] for key in stored.files}
    sites = plain_first_round(attack, tmp_path)
    expected = sites[0] + sites[1] + sites[2]
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_every_site_refuses_the_reveal_under_a_faked_dropout_and_nothing_decodes(attack: Attack) -> None:
    status, phase1 = attack.status, attack.evidence.get("phase1")
    assert isinstance(phase1, dict), f"the job never reached a second phase: {status}"
    assert status.status == "failed" and "faked dropout of site2 in phase 1" in str(status.error)
    assert phase1["uploaded"] == NAMES and not phase1["upload_failures"]  # site2 did upload
    assert phase1["declared_active"] == ["site0", "site1"] and phase1["declared_dropped"] == ["site2"]
    assert phase1["revealed_by"] == []  # no site revealed anything for the forged lists
    errors = phase1["reveal_errors"]
    assert isinstance(errors, dict) and sorted(errors) == NAMES
    for site, reason in errors.items():
        assert "ActiveSetError" in reason and "would change sides" in reason, (site, reason)
    decode = phase1["decode"]
    assert isinstance(decode, dict)
    assert decode["declared_active_sum"].startswith("ThresholdError"), decode
    assert "DECODED" not in decode.values()
    assert "a mask was not removed" in decode["all_uploads_sum"], decode
    for index in range(SITES):  # each runner admitted the evil bundle (allowlisted) and passed both phases on
        mine = decisions(attack.state, index, status.run_id)  # to its agent, whose answer is the refusal above
        kinds = [d["message_type"] for d in mine]
        assert kinds[:7] == ["query.setup", "query.secure_advertise", "query.secure_share",
                             "query.secure_upload", "query.secure_reveal", "query.secure_upload",
                             "query.secure_reveal"], kinds
        assert all(d["fab_hash"] == attack.fab_hash for d in mine)


def test_each_site_audits_the_refusal_and_the_abort(attack: Attack) -> None:
    job_id = str(attack.evidence["job_id"])
    for site in attack.state.sites:
        records = read_records(load_site_config(site.site_file).audit.dir)
        refusals = [r for r in records if r.kind == "refusal" and r.run_id == job_id]
        assert [(r.reason_code, r.rule) for r in refusals] == [(ACTIVE_SET, "active_set_fixed")], site.name
        assert "names active ['site0', 'site1'], dropped ['site2']" in refusals[0].message
        assert "fixed at active ['site0', 'site1', 'site2'], dropped []" in refusals[0].message
        aborts = [r for r in records if r.kind == "abort" and r.run_id == job_id]
        assert [r.reason_code for r in aborts] == [ACTIVE_SET], site.name
        assert "dropped ['site2']" in aborts[0].detail
