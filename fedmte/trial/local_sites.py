"""Site folders for a loopback trial: what a data owner would set up, written in one call.

:func:`write_site` lays out one site the way :mod:`fedmte.client.site_agent` reads it::

    <home>/site.toml       the site file (fedmte.client.site_config.SiteConfig), written through
                           site_file_text, so it is validated by the model that reads it
    <home>/data.npz        ``inputs`` (n, d) and ``labels`` (a site whose models run here), or
                           ``features``, ``labels`` and optionally ``source_probs`` (precomputed)
    <home>/keys/audit.key  the site's Ed25519 audit signing key (mode 600, never leaves; pinned
                           by fingerprint in the site file)
    <home>/audit/          the tamper-evident audit log (created on first use)
    <home>/ledger/         the privacy ledger;  <home>/cache/  staged packages and features

The policy names everything the installed catalogues offer (a trial federation should run
any job), lists the coordinator's key once in ``[trust.coordinators]`` (it signs packages,
jobs and secure-sum requests alike) and turns DP on by default. With ``dp=False`` the clip
norm is set out of reach, so the released sums are exact and a federated score equals
``fedmte.score`` on the pooled features. ``policy`` overrides any policy key (a test narrows
one site's allow-list this way). :func:`provision` adds the secure sum: an identity key and a
``[secure]`` table in each site file.

:func:`coordinator_key` creates (once) the coordinator's Ed25519 key;
:func:`example_packages` packs small MLP candidates with it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmte.client.policy import DEFAULT_DELTA, DEFAULT_EPSILON_BUDGET, DEFAULT_EPSILON_PER_RELEASE
from fedmte.client.site_config import site_file_text
from fedmte.protocol.catalogue import STATISTICS, TRANSFORMS
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.inputs import uneven_split
from fedmte.protocol.job_messages import SITE_FEATURES
from fedmte.protocol.keys import fingerprint, load_private_key, public_key_text, write_private_key
from fedmte.protocol.scorers import SCORERS
from fedmte.protocol.secure_rounds import DeclaredBounds
from fedmte.server.secure_aggregation import SecureJobSpec

COORDINATOR_KEY = "coordinator.pem"
DP_CLIP_NORM = 10.0
"""Rows are scaled to this L2 norm before any statistic when DP is on (the noise scales with it)."""
EXACT_CLIP_NORM = 1e12
"""With DP off: a clip norm no feature row reaches, so the sums are exact."""
MAX_FEATURE_DIM = 4096
ARCHITECTURES = ("cnn", "mlp", "text_bag")
"""The site agent's built-in architectures (:data:`fedmte.client.architectures.ARCHITECTURES`)."""


# --------------------------------------------------------------------------- keys

def coordinator_key(directory: Path) -> tuple[Ed25519PrivateKey, Path]:
    """The coordinator's signing key in ``directory`` (created on first use)."""
    path = directory / COORDINATOR_KEY
    if not path.exists():
        write_private_key(path)
    return load_private_key(path), path


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


def site_policy(*, dp: bool, clip_norm: float | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The trial policy table (see the module docstring)."""
    policy: dict[str, Any] = {
        "allowed_scorers": sorted(SCORERS),
        "allowed_statistics": sorted(STATISTICS),
        "allowed_transforms": sorted(TRANSFORMS),
        "allowed_architectures": [*ARCHITECTURES, SITE_FEATURES],
        "max_feature_dim": MAX_FEATURE_DIM,
        "clip_norm": float(clip_norm if clip_norm is not None else (DP_CLIP_NORM if dp else EXACT_CLIP_NORM)),
        "min_noisy_class_count": 0.0,
        "dp": {"enabled": dp, "epsilon_per_release": DEFAULT_EPSILON_PER_RELEASE,
               "epsilon_budget": DEFAULT_EPSILON_BUDGET, "delta": DEFAULT_DELTA},
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(policy.get(key), dict):
            policy[key] = {**policy[key], **value}
        else:
            policy[key] = value
    return policy


def site_data(home: Path, arrays: Mapping[str, np.ndarray], labels: Sequence[str]) -> dict[str, Any]:
    """Write ``home/data.npz`` and return its ``[data]`` table: raw ``inputs`` (models run at
    the site) or precomputed ``features`` (a features-kind site)."""
    if "labels" not in arrays or ("inputs" in arrays) == ("features" in arrays):
        raise InvalidInputError("a site's data needs 'labels' and either 'inputs' (raw rows for the models) or "
                                f"'features' (precomputed, optionally with 'source_probs'); got {sorted(arrays)}")
    keep = ("inputs", "labels") if "inputs" in arrays else ("features", "labels", "source_probs")
    np.savez(home / "data.npz", **{key: np.asarray(arrays[key]) for key in keep if key in arrays})
    kind = "arrays" if "inputs" in arrays else "features"
    return {"kind": kind, "path": "data.npz", "labels": list(labels)}


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
    home.mkdir(parents=True, exist_ok=True)
    key_path = home / "keys" / "audit.key"
    audit_key = load_private_key(key_path) if key_path.exists() else write_private_key(key_path)
    document = {
        "site": {"name": name, "cache_dir": "cache"},
        "data": site_data(home, arrays, labels),
        "trust": {"coordinators": {"coordinator": public_key_text(coordinator)}},
        "compute": {"batch_size": 256, "threads": 1, "device": "cpu", "progress": False},
        "policy": site_policy(dp=dp, clip_norm=clip_norm, overrides=policy),
        "audit": {"dir": "audit", "signing_key": "keys/audit.key", "ledger_dir": "ledger",
                  "verification_key_sha256": fingerprint(audit_key)},
    }
    path = home / "site.toml"
    path.write_text(site_file_text(document, header=f"Site file of {name} (written by fedmte local up). "
                                                    "The data owner edits it; no job can."), encoding="utf-8")
    return path


def provision(site_files: Mapping[str, Path], coordinator_key: Path, *, bounds: DeclaredBounds,
              require_secure_sum: bool = True, self_masks: bool = True, threshold: int | None = None,
              model_hashes: Sequence[str] = (), require_self_masks: bool | None = None) -> SecureJobSpec:
    """The secure sum for a trial federation: in each site's folder an identity key, and in
    its site file a ``[secure]`` table pinning every site's identity key, with ``bounds`` as
    its floors. ``coordinator_key`` signs the secure-sum requests; it must be the key the site
    files already trust. Returns the job's ``[secure]`` table.

    ``require_self_masks`` (default: ``self_masks``) is the sites' own rule; a site accepts a
    one-round job (``self_masks=False``) only if it says false. In a real deployment each data
    owner makes its own identity key and writes its own roster from keys exchanged out of band;
    this helper plays every party on one machine.
    """
    signer = public_key_text(load_private_key(coordinator_key))
    identities: dict[str, str] = {}
    for name, site_file in site_files.items():
        key_path = Path(site_file).parent / "keys" / "identity.pem"
        identities[name] = public_key_text(load_private_key(key_path) if key_path.exists() else write_private_key(key_path))
    for name, site_file in site_files.items():
        document = tomllib.loads(Path(site_file).read_text(encoding="utf-8"))
        if signer not in document.get("trust", {}).get("coordinators", {}).values():
            raise InvalidInputError(f"{site_file} does not trust the secure sum's coordinator key {coordinator_key}; "
                                    "the secure sum is signed by a key listed in [trust.coordinators]")
        one_round_allowed = not (self_masks if require_self_masks is None else require_self_masks)
        document["secure"] = {"identity_key": "keys/identity.pem", "state_dir": "state",
                              "require_secure_sum": require_secure_sum,
                              **({"require_self_masks": False} if one_round_allowed else {}),  # the default: true
                              "min_declared_rows": bounds.max_rows,
                              "min_declared_feature_norm": bounds.feature_norm, "roster": dict(sorted(identities.items()))}
        Path(site_file).write_text(site_file_text(document, header=f"Site file of {name} (written by fedmte local up), "
                                                  "with its part in the secure sum."), encoding="utf-8")
    return SecureJobSpec(signing_key=coordinator_key, roster=identities, threshold=threshold, self_masks=self_masks,
                         bounds=bounds, model_hashes=tuple(model_hashes))


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


__all__ = ["coordinator_key", "demo_site_inputs", "example_packages", "label_space", "provision", "site_data",
           "site_policy", "split_inputs", "write_site"]
