"""Sites, candidate packages and pooled references for the multi-model job tests.

The reference for a federated score is computed the way a data owner could check it: each
site runs ``fedmte features`` on its own data (with a fresh feature cache, so nothing the job
computed is reused), the coordinator pools those arrays, and ``fedmte.score`` scores them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

import fedmte
from fedmte.cli import app
from fedmte.protocol.errors import FederationError, FedmteError
from fedmte.protocol.job_messages import FinishRequest, encode_job_round
from fedmte.protocol.requests import Stat
from fedmte.protocol.wire import Payload

INPUT_DIM = 6
MODELS: dict[str, dict[str, object]] = {
    "tanh-head": {"hidden_dims": [10, 7], "activation": "tanh", "num_source_classes": 4, "seed": 11},
    "gelu-head": {"hidden_dims": [12], "activation": "gelu", "num_source_classes": 5, "seed": 12},
    "tanh-nohead": {"hidden_dims": [9], "activation": "tanh", "num_source_classes": 0, "seed": 13},
    "gelu-deep": {"hidden_dims": [14, 11, 8], "activation": "gelu", "num_source_classes": 3, "seed": 14,
                  "license": "proprietary"},
    "too-wide": {"hidden_dims": [24], "activation": "tanh", "num_source_classes": 4, "seed": 15},
}
"""Candidates for 6-wide vectors; ``too-wide`` has 24 features (a site with max_feature_dim 20 refuses it)."""
SCORERS = ["hscore", "leep", "gbc", "logme", "nce", "sfda"]
SOURCE_SCORERS = {"leep", "nce"}


def site_arrays(sites: int, *, n: int = 1200, seed: int = 3) -> list[dict[str, np.ndarray]]:
    """Three Gaussian classes of 6-wide vectors named a, b, c, split unevenly (every site holds every class)."""
    from fedmte.trial.local_sites import demo_site_inputs

    parts = demo_site_inputs(sites, n=n, dim=INPUT_DIM, classes=3, seed=seed)
    names = {"c0": "a", "c1": "b", "c2": "c"}
    return [{"inputs": p["inputs"], "labels": np.array([names[v] for v in p["labels"]])} for p in parts]


LABELS = ["a", "b", "c"]


def pooled_reference(site_files: Sequence[Path], package: Path, scorers: Sequence[str], tmp: Path) -> dict[str, float]:
    """``fedmte features`` at every site (fresh caches), pooled, scored by ``fedmte.score``."""
    features, labels, probs = [], [], []
    runner = CliRunner()
    for k, site_file in enumerate(site_files):
        fresh = site_file.with_name("site-fresh.toml")
        text = site_file.read_text()
        assert 'cache_dir = "cache"' in text
        fresh.write_text(text.replace('cache_dir = "cache"', f'cache_dir = "{tmp / f"fresh-cache-{k}"}"'))
        out = tmp / f"{package.name}-{k}.npz"
        result = runner.invoke(app, ["features", "--model", str(package), "--site", str(fresh), "--out", str(out),
                                     "--labels", ",".join(LABELS), "--no-progress"])
        assert result.exit_code == 0, result.output
        assert "computed on" in result.output  # not read from a cache the job filled
        with np.load(out, allow_pickle=False) as arrays:
            features.append(arrays["features"])
            labels.append(arrays["labels"])
            if "source_probs" in arrays.files:
                probs.append(arrays["source_probs"])
    return fedmte.score(np.concatenate(features), np.concatenate(labels),
                        source_probs=np.concatenate(probs) if probs else None, scorers=list(scorers))


class AgentExchange:
    """Sites as in-process site agents; every message goes through the wire form, and an
    error becomes a :class:`FederationError` naming the site, as over Flower."""

    def __init__(self, site_files: Sequence[Path], run_id: str) -> None:
        from fedmte.client import site_agent

        self.answer = site_agent.answer
        self.files = {100 + k: Path(f) for k, f in enumerate(site_files)}
        self.run_id = run_id
        self.sent: list[tuple[str, str]] = []

    @property
    def nodes(self) -> Sequence[int]:
        return sorted(self.files)

    def reply(self, query: str, node: int, payload: Payload) -> Payload:
        """One site's answer to one (wire-decoded) message."""
        return self.answer(query, payload, self.files[node], run_id=self.run_id)

    def exchange(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> dict[int, Payload]:
        self.sent.append((query, group))
        replies, failures = {}, {}
        for node, payload in payloads.items():
            try:
                reply = self.reply(query, node, Payload.from_wire(*payload.to_wire()))
            except FedmteError as error:
                failures[str(node)] = f"{type(error).__name__}: {error}"
                continue
            replies[node] = Payload.from_wire(*reply.to_wire())
        if failures:
            raise FederationError(f"{query} round {group} failed", failures=failures)
        return replies


def signed_round(requests: Mapping[str, Sequence[Stat]], key: Ed25519PrivateKey, *, run_id: str, round_index: int = 1,
                 num_classes: int = 3, issued_at: int | None = None) -> Payload:
    """A round request as execute_job sends it: stamped (a fresh nonce, ``issued_at`` now unless
    given) and signed by ``key`` over its document and arrays."""
    request, arrays = encode_job_round(requests, run_id=run_id, round_index=round_index, num_classes=num_classes)
    if issued_at is not None:
        request = request.model_copy(update={"issued_at": issued_at})
    return Payload(doc=request.sign(key, arrays).model_dump(mode="json", by_alias=True), arrays=arrays)


def signed_finish(key: Ed25519PrivateKey, *, run_id: str, round_index: int, status: str = "finished") -> Payload:
    """A finish request as execute_job sends it, numbered after the job's last round."""
    request = FinishRequest(run_id=run_id, round=round_index, status=status)  # type: ignore[arg-type]
    return Payload(doc=request.sign(key).model_dump(mode="json", by_alias=True))
