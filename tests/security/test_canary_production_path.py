"""The canary attack (a hostile model that copies its input) on the production path.

``tests/test_privacy_attack.py`` measures the mechanism itself (``SitePrivacy``); this module
runs the same attack the way a coordinator would: a signed ``mlp`` package whose weights are
the identity is offered to real site files, and the setup and statistics messages go through
the Flower ClientApp the site runner serves (:mod:`tests.security.clientapp`) to the site
agent, which extracts, clips, noises, charges and audits. The attacker keeps only the bytes
that came back.

With DP off the class sums give the canary away (cosine above 0.99): DP off means no
protection against a coordinator who picks the weights, and the README says so. Under the
site's default policy (epsilon 1 per release) the reconstruction is noise (|cosine| < 0.5).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedmte.client.architectures import pack_model
from fedmte.client.audit_log import verify
from fedmte.client.site_config import load_site_config
from fedmte.protocol.job_messages import ModelOffer, SetupRequest, block_key, encode_job_round, setup_payload
from fedmte.protocol.keys import public_key_text
from fedmte.protocol.requests import Stat
from fedmte.protocol.wire import SETUP, STATS, Payload
from fedmte.server.coordinator import sign_setup
from fedmte.trial.local_sites import coordinator_key, write_site
from tests.security.clientapp import ClientAppSite

PIXELS = 64
CLIP = 1.0
LABELS = [*(str(k) for k in range(10)), "canary"]
CANARY_CLASS = "3"
STATS_ASKED = (Stat.of("class_counts"), Stat.of("class_sums"))


def canary_pixels() -> np.ndarray:
    """A checkerboard of 0 and 16: a valid 8x8 input that no handwritten digit looks like."""
    return ((np.add.outer(np.arange(8), np.arange(8)) % 2) * 16.0).reshape(PIXELS)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class Coordinator:
    """A trusted, hostile coordinator: its key signs the identity package and the jobs."""

    def __init__(self, root: Path) -> None:
        self.key, _ = coordinator_key(root / "coordinator")
        self.package = root / "identity-mlp"
        pack_model(
            self.package, name="identity-mlp", architecture="mlp",
            config={"input_dim": PIXELS, "hidden_dims": [PIXELS], "dtype": "float64"},
            preprocessing={"kind": "vector", "dim": PIXELS}, license="MIT",
            tensors={"body.0.weight": torch.eye(PIXELS, dtype=torch.float64),
                     "body.0.bias": torch.zeros(PIXELS, dtype=torch.float64)},
            key=self.key,
        )
        self.manifest = (self.package / "manifest.json").read_bytes()
        self.model_id = hashlib.sha256(self.manifest).hexdigest()

    def steal_class_sums(self, site_file: Path, run_id: int) -> dict[str, np.ndarray]:
        """Set up a job with the identity package, ask for class counts and sums, keep the reply."""
        site = ClientAppSite(site_file)
        offer = ModelOffer(model_id=self.model_id, label="identity-mlp", manifest=self.manifest.decode(),
                           signature=(self.package / "signature.json").read_text(), weights_attached=True)
        request = SetupRequest(run_id=str(run_id), labels=LABELS, scorers=["gbc"], coordinator_key=public_key_text(self.key),
                               models=[offer])
        weights = {self.model_id: (self.package / "weights.safetensors").read_bytes()}
        answer = site.ask(SETUP, setup_payload(sign_setup(request, self.key, weights), weights), run_id=run_id)
        assert answer.payload is not None and answer.payload.doc["models"][self.model_id]["status"] == "ready", answer
        round_request, arrays = encode_job_round({self.model_id: list(STATS_ASKED)}, run_id=str(run_id), round_index=1,
                                                 num_classes=len(LABELS))
        signed = round_request.sign(self.key, arrays)  # signed rounds (issue 11): as execute_job sends them
        answer = site.ask(STATS, Payload(doc=signed.model_dump(mode="json", by_alias=True), arrays=arrays),
                          run_id=run_id)
        assert answer.payload is not None, answer.error
        return {stat.kind: answer.payload.arrays[block_key(self.model_id, stat.key)] for stat in STATS_ASKED}


def site_files(root: Path, coordinator: Coordinator, *, dp: bool) -> dict[str, Path]:
    """Three versions of one ward's data, each a site file of the site agent."""
    digits = load_digits()
    inputs, labels = digits.data.astype(np.float64), np.array([str(v) for v in digits.target])
    canary = canary_pixels()[None]
    versions = {
        "without": (inputs, labels),
        "with": (np.vstack([inputs, canary]), np.append(labels, CANARY_CLASS)),
        "own_class": (np.vstack([inputs, canary]), np.append(labels, "canary")),
    }
    return {name: write_site(root / name, name, {"inputs": x, "labels": y}, LABELS, coordinator=coordinator.key, dp=dp,
                             clip_norm=CLIP) for name, (x, y) in versions.items()}


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Coordinator:
    return Coordinator(tmp_path_factory.mktemp("canary-coordinator"))


def test_without_dp_the_coordinator_recovers_the_canary_through_the_client_app(
        coordinator: Coordinator, tmp_path: Path) -> None:
    files = site_files(tmp_path, coordinator, dp=False)
    before = coordinator.steal_class_sums(files["without"], 21)
    after = coordinator.steal_class_sums(files["with"], 22)
    own = coordinator.steal_class_sums(files["own_class"], 23)
    k = LABELS.index(CANARY_CLASS)
    stolen = after["class_sums"][k] - before["class_sums"][k]
    assert cosine(stolen, canary_pixels()) > 0.99
    assert np.linalg.norm(stolen) == pytest.approx(CLIP, rel=1e-9)  # the clipped row, exactly
    c = LABELS.index("canary")
    assert cosine(own["class_sums"][c] / own["class_counts"][c], canary_pixels()) > 0.99
    for site_file in files.values():  # every release is on the record, DP or not
        assert verify(load_site_config(site_file).audit.dir).ok


def test_under_the_default_policy_the_reconstruction_through_the_client_app_is_noise(
        coordinator: Coordinator, tmp_path: Path) -> None:
    cosines = []
    for draw in range(3):
        files = site_files(tmp_path / f"draw-{draw}", coordinator, dp=True)
        policy = load_site_config(files["with"]).require_policy()
        assert policy.dp.enabled and policy.dp.epsilon_per_release == 1.0 and policy.dp.delta == 1e-6
        before = coordinator.steal_class_sums(files["without"], 31)
        after = coordinator.steal_class_sums(files["with"], 32)
        own = coordinator.steal_class_sums(files["own_class"], 33)
        k, c = LABELS.index(CANARY_CLASS), LABELS.index("canary")
        cosines += [cosine(after["class_sums"][k] - before["class_sums"][k], canary_pixels()),
                    cosine(own["class_sums"][c], canary_pixels())]
        for site_file in files.values():
            assert verify(load_site_config(site_file).audit.dir).ok
    # the clipped signal has norm 1 against a noise vector some 70 times longer: a random
    # direction in 64 dimensions (cosine std 1/8), far below 0.5 every time
    assert max(abs(value) for value in cosines) < 0.5
