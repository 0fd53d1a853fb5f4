"""The secure sum over real Flower processes on loopback.

One federation serves the module: a SuperLink with TLS and SuperNode authentication, three
fedmte site runners, started once and stopped in the fixture's ``finally``. Each site gets an
identity key and its own ``secure.toml`` (pinned coordinator key, roster, audit log) beside
its data file, which makes it refuse plain statistics. A secure scoring job then gives the
scores ``fedmte.score`` gives on the pooled rows, with the round trips the protocol states,
and a plain job is refused at every site. Forgeries, masked uploads, a site crashing after
key sharing and an abort below the threshold are shown over five real site runners in
``test_secure_dropout.py``; every corner of the protocol in-process in ``test_secure_rounds.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fedmte.protocol.errors import FederationError
from fedmte.protocol.secure_rounds import DeclaredBounds
from fedmte.server.job_runner import JobReport, launch
from fedmte.server.secure_aggregation import SecureJobSpec, provision
from fedmte.trial.local_federation import LocalFederation, down, up

import fedmte
from tests.datasets import DATASETS, site_split_without_class
from tests.test_flower_federation import job, site_files

pytestmark = pytest.mark.slow  # starts a SuperLink and SuperNodes

DATA = DATASETS["basic"]
SCORERS = ["hscore", "leep", "gbc", "logme", "nce"]


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFederation, SecureJobSpec]]:
    root = tmp_path_factory.mktemp("secure-federation")
    data = site_files(root / "data", site_split_without_class(DATA, absent=0, sites=3))
    state = up(root / "local", 3, data=data, runner="site")
    try:
        bounds = DeclaredBounds(max_rows=1000, feature_norm=float(np.max(np.linalg.norm(DATA.features, axis=1))) * 2)
        spec = provision({site.name: Path(site.data).parent for site in state.sites},
                         Path(state.directory) / "secure" / "coordinator.pem", bounds=bounds)
        yield state, spec
    finally:
        down(Path(state.directory))


@pytest.fixture(scope="module")
def secure_report(secure_federation: tuple[LocalFederation, SecureJobSpec],
                  tmp_path_factory: pytest.TempPathFactory) -> JobReport:
    state, spec = secure_federation
    out = tmp_path_factory.mktemp("secure-reports") / "report.json"
    return launch(job(state, out, SCORERS).model_copy(update={"secure": spec}))


def test_secure_job_scores_equal_pooled_scores(secure_report: JobReport) -> None:
    pooled = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS)
    assert secure_report.status == "finished" and secure_report.sites == 3
    for name in SCORERS:
        assert secure_report.scores[name] == pytest.approx(pooled[name], rel=1e-6), name
    summary = secure_report.secure
    assert summary is not None and summary["sites"] == ["site0", "site1", "site2"] and summary["failures"] == {}
    assert summary["threshold"] == 2 and summary["phases_run"] == secure_report.planned_rounds
    steps = [step["name"] for step in summary["steps"]]
    assert steps[:2] == ["secure setup (advertise)", "secure setup (share)"]
    assert len(steps) == 2 + 2 * secure_report.planned_rounds  # upload + reveal per phase (self masks)
    print(f"\nsecure job over 3 site runners: setup {summary['setup_seconds']:.2f} s (2 round trips), "
          f"{secure_report.seconds_per_round_trip:.2f} s per statistics round (upload + reveal), "
          f"{secure_report.total_seconds:.1f} s in all")


def test_every_site_answered_only_signed_secure_steps(secure_federation: tuple[LocalFederation, SecureJobSpec],
                                                      secure_report: JobReport) -> None:
    state, _ = secure_federation
    rounds = secure_report.planned_rounds
    for site in state.sites:
        lines = (Path(site.data).parent / "decisions.jsonl").read_text().splitlines()
        mine = [json.loads(line) for line in lines if json.loads(line)["run_id"] == secure_report.run_id]
        assert [d["message_type"] for d in mine] == ["query.describe", "query.secure_advertise", "query.secure_share"] \
            + ["query.secure_upload", "query.secure_reveal"] * rounds
        assert all(d["accepted"] for d in mine)


def test_a_plain_job_is_refused_by_sites_that_require_the_secure_sum(
    secure_federation: tuple[LocalFederation, SecureJobSpec], secure_report: JobReport, tmp_path: Path
) -> None:
    state, _ = secure_federation
    with pytest.raises(FederationError, match="releases statistics only through the secure sum") as caught:
        launch(job(state, tmp_path / "plain.json", ["nce"]))
    assert set(caught.value.failures) == {str(site.node_id) for site in state.sites}
