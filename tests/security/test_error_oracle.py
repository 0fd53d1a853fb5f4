"""Finding 1 of the security review: a coordinator's broadcast arrays as an error oracle.

The coordinator is trusted (its key is in ``[trust.coordinators]``) and hostile. It asks two
sites that differ only by one canary row (present at one, absent at the other) for
statistics whose broadcast arrays are built to fail on some rows: a linear classifier with
weights so large a logit overflows exactly when a feature passes a threshold, a huge offset
under which the Gram overflows once n * M^2 passes the float range (a row-count oracle), an
always-NaN block beside it. Before, the failure text named the block and came back before
any charge, so the pattern of answers rebuilt the canary for free.

Now, through the production path (the site agent behind the Flower ClientApp): every answer
is the same for the site with and without the canary, the site charged its budget for every
attempt before looking at a row, and the reason stays in the site's audit log.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedmte.client.audit_log import read_records, verify
from fedmte.client.ledger import Ledger
from fedmte.client.privacy import MAX_BROADCAST_ABS, ClipCounts, guarded_sums
from fedmte.client.site_config import load_site_config
from fedmte.protocol.audit_format import AbortRecord, IntentRecord
from fedmte.protocol.catalogue import Batch
from fedmte.protocol.job_messages import (
    SITE_FEATURES,
    ModelOffer,
    SetupRequest,
    block_key,
    encode_job_round,
    setup_payload,
    site_features_id,
)
from fedmte.protocol.keys import public_key_text
from fedmte.protocol.requests import Stat, Transform
from fedmte.protocol.wire import SETUP, STATS, Payload
from fedmte.server.coordinator import sign_setup
from fedmte.trial.local_sites import coordinator_key, write_site
from tests.security.clientapp import ClientAppSite

LABELS = ["a", "b", "c"]
DIM = 4
CANDIDATE = "site-features"
MODEL = site_features_id(CANDIDATE)


def rows(seed: int = 5, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    return rng.normal(scale=0.3, size=(n, DIM)) + labels[:, None] * 0.2, labels


@pytest.fixture
def sites(tmp_path: Path) -> dict[str, object]:
    """Two features-kind sites under the default DP policy: without and with the canary."""
    key, _ = coordinator_key(tmp_path / "coordinator")
    features, labels = rows()
    canary = np.array([[0.9, -0.9, 0.9, -0.9]])
    data = {"absent": (features, labels), "present": (np.vstack([features, canary]), np.append(labels, 1))}
    files = {name: write_site(tmp_path / name, name, {"features": x, "labels": y}, LABELS, coordinator=key, dp=True,
                              clip_norm=1.0) for name, (x, y) in data.items()}
    return {"key": key, "files": files}


def set_up(site: ClientAppSite, key: object, run_id: int) -> None:
    request = SetupRequest(run_id=str(run_id), labels=LABELS, scorers=["hscore"], coordinator_key=public_key_text(key),
                           models=[ModelOffer(model_id=MODEL, label=CANDIDATE, kind=SITE_FEATURES)])
    answer = site.ask(SETUP, setup_payload(sign_setup(request, key), {}), run_id=run_id)  # type: ignore[arg-type]
    assert answer.payload is not None, answer.error
    assert answer.payload.doc["models"][MODEL]["status"] == "ready"


def ask_round(site: ClientAppSite, stats: list[Stat], run_id: int, round_index: int = 1, *, key: object) -> str:
    """One round, signed by the coordinator's ``key`` as execute_job signs it."""
    request, arrays = encode_job_round({MODEL: stats}, run_id=str(run_id), round_index=round_index, num_classes=3)
    signed = request.sign(key, arrays)  # type: ignore[arg-type]
    answer = site.ask(STATS, Payload(doc=signed.model_dump(mode="json", by_alias=True), arrays=arrays), run_id=run_id)
    return "released" if answer.error is None else answer.error


def spent_mu_sq(site_file: Path) -> float:
    config = load_site_config(site_file)
    ledger = Ledger.open(config.audit.ledger_dir, site_id=config.site.name, expected=None, create=False)
    source = next(iter(ledger.state.sources), None)
    return 0.0 if source is None else ledger.spent_mu_sq(source)


def attacks() -> dict[str, list[Stat]]:
    """The reviewer's requests, each built to fail on some rows and not on others."""
    huge = np.zeros((3, DIM))
    huge[1, 0] = 1e305  # logit +inf (then NaN) exactly where feature 0 is large enough
    zeros3, zeros_d = np.zeros(3), np.zeros((3, DIM))
    nan_offset = np.full(DIM, np.nan)
    return {
        "overflowing classifier": [Stat.of("class_counts"),
                                   Stat.of("class_sums", view=(Transform.of("confmix", coef=huge, bias=zeros3,
                                                                           others_mean=zeros_d),))],
        "row-count oracle (huge offset)": [Stat.of("gram", view=(Transform.of("offset", offset=np.full(DIM, 1e160)),)),
                                           Stat.of("count")],
        "always-NaN block beside a real one": [Stat.of("class_counts"),
                                               Stat.of("sum", view=(Transform.of("offset", offset=nan_offset),))],
    }


def test_every_answer_is_the_same_with_and_without_the_canary_and_every_attempt_is_charged(
        sites: dict[str, object]) -> None:
    key, files = sites["key"], sites["files"]
    answers: dict[str, dict[str, str]] = {}
    for name, site_file in files.items():  # type: ignore[union-attr]
        site = ClientAppSite(site_file)
        set_up(site, key, 11)
        answers[name] = {}
        for index, (attack, stats) in enumerate(attacks().items(), start=1):
            before = spent_mu_sq(site_file)
            answers[name][attack] = ask_round(site, stats, 11, index, key=key)
            after = spent_mu_sq(site_file)
            mu = load_site_config(site_file).require_policy().dp.mu_per_release
            assert after == pytest.approx(before + mu * mu, rel=1e-9), (name, attack)  # charged, before any row
        # the detailed reason stays at the site; every reply that left is in its audit log
        records = read_records(load_site_config(site_file).audit.dir)
        assert sum(isinstance(r, AbortRecord) and r.reason_code == "broadcast:out_of_bounds" for r in records) == 3
        replies = [r for r in records if isinstance(r, IntentRecord) and r.round >= 1]
        assert len(replies) == 3 and all(r.privacy is not None and not r.privacy.cached for r in replies)
    assert answers["present"] == answers["absent"]
    for text in answers["present"].values():
        assert text.startswith("RefusalError: refused by site: broadcast array") and "canary" not in text
        assert f"exceed {MAX_BROADCAST_ABS:g}" in text


def test_a_classifier_within_the_bounds_answers_alike_with_and_without_the_canary(
        sites: dict[str, object]) -> None:
    """The largest weights the site accepts cannot overflow for clipped rows: both sites release."""
    key, files = sites["key"], sites["files"]
    steep = np.zeros((3, DIM))
    steep[1, 0] = MAX_BROADCAST_ABS
    stats = [Stat.of("class_counts"), Stat.of("class_sums", view=(Transform.of(
        "confmix", coef=steep, bias=np.zeros(3), others_mean=np.zeros((3, DIM))),))]
    outcomes = []
    for site_file in files.values():  # type: ignore[union-attr]
        site = ClientAppSite(site_file)
        set_up(site, key, 12)
        outcomes.append(ask_round(site, stats, 12, key=key))
        assert verify(load_site_config(site_file).audit.dir).ok
    assert outcomes == ["released", "released"]


def test_a_failure_after_the_charge_is_one_text_whatever_went_wrong(
        sites: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    """A data-dependent failure inside the computation (simulated: the sums raise with a
    message naming the data) reaches the coordinator as the one generic text, charged."""
    from fedmte.client import privacy

    def failing(stats: object, batches: object, counts: object) -> dict[str, np.ndarray]:
        raise ValueError("row 120 holds the canary (0.9, -0.9, 0.9, -0.9)")

    monkeypatch.setattr(privacy, "guarded_sums", failing)
    key, site_file = sites["key"], sites["files"]["present"]  # type: ignore[index]
    site = ClientAppSite(site_file)
    set_up(site, key, 13)
    before = spent_mu_sq(site_file)
    text = ask_round(site, [Stat.of("class_counts")], 13, key=key)
    assert text == f"ReleaseFailed: {privacy.ReleaseFailed.MESSAGE}"
    assert spent_mu_sq(site_file) > before
    records = read_records(load_site_config(site_file).audit.dir)
    assert any(isinstance(r, AbortRecord) and "holds the canary" in r.detail for r in records)
    intent = [r for r in records if isinstance(r, IntentRecord)][-1]
    payload = (load_site_config(site_file).audit.dir / "payloads" / f"{intent.payload.sha256}.bin").read_bytes()
    assert payload == text.encode("utf-8")  # the exact bytes of the reply that left


def test_a_row_whose_statistics_are_not_finite_is_left_out_and_counted() -> None:
    good = np.array([[1.0, 2.0], [0.5, -1.0]])
    batch = Batch(features=np.vstack([good, [[1e200, 0.0]]]), labels=np.array([0, 1, 1]), num_classes=2)
    counts = ClipCounts()
    gram, count = Stat.of("gram"), Stat.of("count")
    sums = guarded_sums([gram, count], [batch], counts)
    assert counts.dropped_rows == 1  # 1e200 squared overflows: that row alone is left out
    np.testing.assert_allclose(sums[gram.key], (good.T @ good)[np.triu_indices(2)])  # packed upper triangle
    assert int(sums[count.key]) == 2
    assert math.isfinite(float(np.abs(sums[gram.key]).max()))


def test_block_shapes_and_the_budget_do_not_depend_on_the_rows(sites: dict[str, object]) -> None:
    """The successful release has the same blocks at both sites (shapes come from the
    request), so neither its size nor its layout tells a row count."""
    key, files = sites["key"], sites["files"]
    shapes = []
    for site_file in files.values():  # type: ignore[union-attr]
        site = ClientAppSite(site_file)
        set_up(site, key, 14)
        request, arrays = encode_job_round({MODEL: [Stat.of("class_counts"), Stat.of("gram")]}, run_id="14",
                                           round_index=1, num_classes=3)
        signed = request.sign(key, arrays)  # type: ignore[arg-type]
        answer = site.ask(STATS, Payload(doc=signed.model_dump(mode="json", by_alias=True), arrays=arrays), run_id=14)
        assert answer.payload is not None, answer.error
        shapes.append({name: value.shape for name, value in answer.payload.arrays.items()})
    assert shapes[0] == shapes[1] and block_key(MODEL, Stat.of("gram").key) in shapes[0]
