"""Site folders for a loopback trial: what a data owner would set up, written in one call.

:func:`write_site` lays out one site the way :mod:`fedmte.client.site_agent` reads it::

    <home>/site.toml       the site file: data, pinned keys, compute, policy, audit
    <home>/data.npz        ``inputs`` (n, d) and ``labels`` (names or class indices)
    <home>/keys/audit.key  the site's Ed25519 audit signing key (mode 600, never leaves)
    <home>/audit/          the tamper-evident audit log (created on first use)
    <home>/ledger/         the privacy ledger;  <home>/cache/  staged packages and features

The policy names everything the installed catalogues offer (a trial federation should run
any job), pins the coordinator's key twice (package signatures in ``[trust] keys``, job
requests in ``[policy.coordinator_keys]``) and turns DP on by default. With ``dp=False`` the
clip norm is set out of reach, so the released sums are exact and a federated score equals
``fedmte.score`` on the pooled ``fedmte features``. ``policy`` overrides any policy key (a
test narrows one site's allow-list this way).

:func:`coordinator_key` creates (once) the coordinator's Ed25519 key that signs packages and
job setups; :func:`example_packages` packs small MLP candidates with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmte.client.policy import DEFAULT_DELTA, DEFAULT_EPSILON_BUDGET, DEFAULT_EPSILON_PER_RELEASE
from fedmte.protocol.catalogue import STATISTICS, TRANSFORMS
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.inputs import uneven_split
from fedmte.protocol.scorers import SCORERS
from fedmte.server.coordinator import coordinator_fingerprint, load_coordinator_key, public_key_text

COORDINATOR_KEY = "coordinator.pem"
DP_CLIP_NORM = 10.0
"""Rows are scaled to this L2 norm before any statistic when DP is on (the noise scales with it)."""
EXACT_CLIP_NORM = 1e12
"""With DP off: a clip norm no feature row reaches, so the sums are exact."""
MAX_FEATURE_DIM = 4096
ARCHITECTURES = ("cnn", "mlp", "text_bag")
"""The site agent's built-in architectures (:data:`fedmte.client.architectures.ARCHITECTURES`)."""


# --------------------------------------------------------------------------- TOML

def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"a site file cannot hold {value}")
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # inside a list: an inline table
        return "{ " + ", ".join(f"{key} = {_value(v)}" for key, v in value.items()) + " }"
    raise InvalidInputError(f"cannot write {type(value).__name__} to a site file")


def toml_text(document: Mapping[str, Any], prefix: str = "") -> str:
    """A TOML rendering of nested dicts of strings, numbers, booleans and lists."""
    scalars = [f"{key} = {_value(value)}" for key, value in document.items() if not isinstance(value, Mapping)]
    text = ""
    if prefix:
        text += f"\n[{prefix}]\n"
    text += "".join(line + "\n" for line in scalars)
    for key, value in document.items():
        if isinstance(value, Mapping):
            text += toml_text(value, f"{prefix}.{key}" if prefix else key)
    return text


# --------------------------------------------------------------------------- keys

def coordinator_key(directory: Path) -> tuple[Ed25519PrivateKey, Path]:
    """The coordinator's signing key in ``directory`` (created on first use)."""
    from fedmte.client.packages import generate_signing_key, save_signing_key

    path = directory / COORDINATOR_KEY
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        save_signing_key(generate_signing_key(), path)
    return load_coordinator_key(path), path


# --------------------------------------------------------------------------- sites

def label_space(labels: Sequence[np.ndarray]) -> list[str]:
    """The label names the sites' labels imply: sorted names, or ``"0".."C-1"`` for indices."""
    pooled = np.concatenate([np.asarray(y) for y in labels]) if labels else np.zeros(0, dtype=np.int64)
    if pooled.dtype.kind in "iu":
        return [str(i) for i in range(max(int(pooled.max()) + 1 if pooled.size else 0, 2))]
    names = sorted({str(v) for v in pooled.tolist()})
    if len(names) < 2:
        raise InvalidInputError(f"the sites' labels hold {len(names)} class(es); a job needs at least two")
    return names


def site_policy(*, coordinator: str, dp: bool, clip_norm: float | None = None,
                overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The trial policy table (see the module docstring)."""
    policy: dict[str, Any] = {
        "allowed_scorers": sorted(SCORERS),
        "allowed_statistics": sorted(STATISTICS),
        "allowed_transforms": sorted(TRANSFORMS),
        "allowed_architectures": list(ARCHITECTURES),
        "max_feature_dim": MAX_FEATURE_DIM,
        "clip_norm": float(clip_norm if clip_norm is not None else (DP_CLIP_NORM if dp else EXACT_CLIP_NORM)),
        "min_noisy_class_count": 0.0,
        "coordinator_keys": {"coordinator": coordinator},
        "dp": {"enabled": dp, "epsilon_per_release": DEFAULT_EPSILON_PER_RELEASE,
               "epsilon_budget": DEFAULT_EPSILON_BUDGET, "delta": DEFAULT_DELTA},
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(policy.get(key), dict):
            policy[key] = {**policy[key], **value}
        else:
            policy[key] = value
    return policy


def write_site(
    home: Path,
    name: str,
    arrays: Mapping[str, np.ndarray],
    labels: Sequence[str],
    *,
    coordinator: Ed25519PrivateKey,
    dp: bool = True,
    clip_norm: float | None = None,
    policy: Mapping[str, Any] | None = None,
) -> Path:
    """Write one site folder (module docstring) and return its ``site.toml``."""
    from fedmte.client.audit_log import generate_signing_key

    if "inputs" not in arrays or "labels" not in arrays:
        raise InvalidInputError(f"site {name}'s data needs 'inputs' and 'labels' arrays, got {sorted(arrays)}")
    home.mkdir(parents=True, exist_ok=True)
    np.savez(home / "data.npz", inputs=np.asarray(arrays["inputs"]), labels=np.asarray(arrays["labels"]))
    key_path = home / "keys" / "audit.key"
    if not key_path.exists():
        generate_signing_key(key_path)
    document = {
        "site": {"name": name, "cache_dir": "cache"},
        "data": {"kind": "arrays", "path": "data.npz", "labels": list(labels)},
        "trust": {"keys": [public_key_text(coordinator)]},
        "compute": {"batch_size": 256, "threads": 1, "device": "cpu", "progress": False},
        "policy": site_policy(coordinator=coordinator_fingerprint(coordinator), dp=dp, clip_norm=clip_norm,
                              overrides=policy),
        "audit": {"dir": "audit", "signing_key": "keys/audit.key", "ledger_dir": "ledger"},
    }
    path = home / "site.toml"
    path.write_text(f"# Site file of {name} (written by fedmte local up). The data owner edits it; no job can.\n"
                    + toml_text(document), encoding="utf-8")
    return path


def demo_site_inputs(sites: int, *, n: int = 600, dim: int = 6, classes: int = 3, seed: int = 0
                     ) -> list[dict[str, np.ndarray]]:
    """Seeded Gaussian classes of ``dim``-wide vectors with names ``c0``.., split unevenly."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    centres = rng.normal(scale=1.5, size=(classes, dim))
    inputs = centres[labels] + rng.normal(size=(n, dim))
    names = np.array([f"c{k}" for k in range(classes)])
    return [{"inputs": inputs[rows], "labels": names[labels[rows]]} for rows in uneven_split(n, sites)]


EXAMPLE_MODELS: dict[str, dict[str, Any]] = {
    "mlp-small": {"hidden_dims": [8], "activation": "tanh", "num_source_classes": 4, "seed": 1},
    "mlp-wide": {"hidden_dims": [32, 16], "activation": "gelu", "num_source_classes": 5, "seed": 2},
    "mlp-deep": {"hidden_dims": [16, 16, 12], "activation": "tanh", "num_source_classes": 0, "seed": 3},
}
"""Name -> hidden widths, activation, source classes (0: no head), seed. Smooth activations:
a ReLU unit that never fires leaves an all-zero feature column."""


def example_packages(directory: Path, key: Ed25519PrivateKey, input_dim: int,
                     models: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Path]:
    """Signed MLP packages (seeded default-init weights) for ``input_dim``-wide inputs."""
    from fedmte.client.architectures import initial_weights, pack_model

    out: dict[str, Path] = {}
    for name, spec in (models or EXAMPLE_MODELS).items():
        path = directory / name
        out[name] = path
        if (path / "manifest.json").exists():
            continue
        config = {"input_dim": input_dim, "hidden_dims": list(spec["hidden_dims"]),
                  "activation": str(spec.get("activation", "relu")),
                  "num_source_classes": int(spec.get("num_source_classes", 0))}
        head = {"num_classes": config["num_source_classes"]} if config["num_source_classes"] else None
        pack_model(path, name=name, architecture="mlp", config=config, preprocessing={"kind": "vector", "dim": input_dim},
                   license=str(spec.get("license", "Apache-2.0")),
                   tensors=initial_weights("mlp", config, int(spec.get("seed", 0))), key=key, source_head=head,
                   description=f"example {config['activation']} MLP {spec['hidden_dims']}")
    return out


def split_inputs(pooled: Mapping[str, np.ndarray], sites: int) -> list[dict[str, np.ndarray]]:
    """One pooled ``inputs``/``labels`` set, split unevenly over ``sites``."""
    return [{key: np.asarray(value)[rows] for key, value in pooled.items()}
            for rows in uneven_split(len(pooled["labels"]), sites)]


__all__ = ["coordinator_key", "demo_site_inputs", "example_packages", "label_space", "site_policy", "split_inputs",
           "toml_text", "write_site"]
