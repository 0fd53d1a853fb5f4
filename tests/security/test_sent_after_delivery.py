"""Finding 5 (when "sent" is written): the site recorded a reply as sent before it had left.

In the site runner (agents kept open), every reply's intent is written before the ClientApp
returns, and its outcome waits for the transport: ``sent`` once the push succeeded, ``failed``
if it did not, ``unknown`` if the log closed first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmte.client import site_agent
from fedmte.client.audit_log import read_records, verify
from fedmte.client.site_config import load_site_config
from fedmte.protocol.audit_format import IntentRecord, OutcomeRecord
from fedmte.protocol.job_messages import SITE_FEATURES, ModelOffer, SetupRequest, setup_payload, site_features_id
from fedmte.protocol.keys import public_key_text
from fedmte.protocol.wire import SETUP
from fedmte.server.coordinator import sign_setup
from fedmte.trial.local_sites import coordinator_key, write_site
from tests.security.clientapp import ClientAppSite

LABELS = ["a", "b"]
MODEL = site_features_id("site-features")


@pytest.fixture
def kept_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(site_agent, "_KEEP_OPEN", True)  # as the site runner does (keep_agents_open)
    key, _ = coordinator_key(tmp_path / "coordinator")
    rng = np.random.default_rng(1)
    site_file = write_site(tmp_path / "site", "ward", {"features": rng.normal(size=(30, 3)), "labels": np.arange(30) % 2},
                           LABELS, coordinator=key, dp=False)
    yield key, site_file
    site_agent.close_agents()


def setup_message(key, run_id: int):
    request = SetupRequest(run_id=str(run_id), labels=LABELS, scorers=["hscore"], coordinator_key=public_key_text(key),
                           models=[ModelOffer(model_id=MODEL, label="site-features", kind=SITE_FEATURES)])
    return setup_payload(sign_setup(request, key), {})


def records(site_file: Path):
    return read_records(load_site_config(site_file).audit.dir)


def test_the_outcome_waits_for_the_transport_and_is_sent_once_it_accepted(kept_site) -> None:
    key, site_file = kept_site
    site_agent.hold_outcomes(site_file)
    answer = ClientAppSite(site_file).ask(SETUP, setup_message(key, 41), run_id=41)
    assert answer.payload is not None, answer.error
    last = records(site_file)[-1]
    assert isinstance(last, IntentRecord)  # on disk before the reply is handed over, no outcome yet
    assert site_agent.settle_outcomes(site_file, delivered=True) == 1
    outcome = records(site_file)[-1]
    assert isinstance(outcome, OutcomeRecord) and outcome.status == "sent" and outcome.intent_seq == last.seq


def test_a_reply_the_transport_refused_is_recorded_as_failed(kept_site) -> None:
    key, site_file = kept_site
    site_agent.hold_outcomes(site_file)
    ClientAppSite(site_file).ask(SETUP, setup_message(key, 42), run_id=42)
    site_agent.settle_outcomes(site_file, delivered=False, detail="ConnectionError: the SuperLink went away")
    outcome = records(site_file)[-1]
    assert isinstance(outcome, OutcomeRecord) and outcome.status == "failed" and "SuperLink" in outcome.detail


def test_a_reply_whose_delivery_was_never_confirmed_is_unknown_and_the_log_verifies(kept_site) -> None:
    key, site_file = kept_site
    site_agent.hold_outcomes(site_file)
    ClientAppSite(site_file).ask(SETUP, setup_message(key, 43), run_id=43)
    site_agent.close_agents()
    outcomes = [r for r in records(site_file) if isinstance(r, OutcomeRecord)]
    assert outcomes[-1].status == "unknown"
    config = load_site_config(site_file)
    assert verify(config.audit.dir, key_sha256=config.audit.verification_key_sha256).verified
