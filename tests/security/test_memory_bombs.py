"""Finding 4 of the security review: memory bombs from a trusted, hostile coordinator.

Each bomb is something the coordinator chooses: a 68-byte weights file whose signed manifest
says ``hidden_dims = [65536, 65536, 16]`` (17 GB of network), a manifest resizing every image
to 4096x4096x3 (52 GB a batch), a job with 150,010 labels (a 168 GiB one-hot), a release of
per-class scatter matrices too large to hold. Before, the site built or decoded first and
failed with an untyped MemoryError, or was killed. Now each one is a typed refusal
(:class:`~fedmte.client.limits.LimitExceededError`) whose rule names the site's limit, raised
before the memory is allocated.

Every bomb runs in a child process under ``RLIMIT_AS`` = 3 GiB, so an allocation the checks
failed to prevent fails the test (MemoryError, or torch's allocation RuntimeError) instead of
passing quietly on a machine with memory to spare. The child is this module run as a script
(``python -m tests.security.test_memory_bombs CASE ROOT``, limit set before anything is
imported); the parent writes the site and the signed packages, then reads the verdicts and
the site's audit log.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmte.client.audit_log import read_records
from fedmte.client.packages import tensors_to_bytes, write_package
from fedmte.client.site_config import site_file_text
from fedmte.protocol.audit_format import RefusalRecord
from fedmte.protocol.manifest import ModelManifest
from fedmte.trial.local_sites import coordinator_key, write_site

REPO = Path(__file__).resolve().parents[2]
GiB = 1024**3
ADDRESS_SPACE = 3 * GiB
LABELS = ["a", "b", "c"]
HUGE_LABELS = 150_010
BOOT = (
    "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0})); "
    "runpy.run_module('tests.security.test_memory_bombs', run_name='__main__', alter_sys=True)"
)

PACKAGE_BOMBS: dict[str, dict[str, Any]] = {
    # the finding's own bomb: a 65536 x 65536 matrix (2^32 elements) from 68 bytes of weights
    "weights": {"architecture": "mlp", "config": {"input_dim": 6, "hidden_dims": [65536, 65536, 16]},
                "preprocessing": {"kind": "vector", "dim": 6}, "rule": "limits.max_tensor_elements"},
    # every matrix at the cap (16384^2 = 2^28), five of them: 1.07e9 parameters
    "parameters": {"architecture": "mlp", "config": {"input_dim": 6, "hidden_dims": [16384] * 5},
                   "preprocessing": {"kind": "vector", "dim": 6}, "rule": "limits.max_parameters"},
    "width": {"architecture": "mlp", "config": {"input_dim": 6, "hidden_dims": [100_000, 16]},
              "preprocessing": {"kind": "vector", "dim": 6}, "rule": "limits.max_layer_width"},
    # an honest tiny CNN whose manifest resizes every image to 4096 x 4096 x 3 (50M elements a row)
    "image": {"architecture": "cnn", "config": {"in_channels": 3, "channels": [4], "feature_dim": 16},
              "preprocessing": {"kind": "image", "height": 4096, "width": 4096, "channels": 3,
                                "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
              "honest": True, "site": "image", "rule": "limits.max_input_elements"},
}


# --------------------------------------------------------------------------- the parent's side

def _child(case: str, root: Path, timeout: float = 300) -> dict[str, Any]:
    """Run one case in a fresh interpreter under the 3 GiB address-space limit."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", BOOT.format(ADDRESS_SPACE), case, str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"the {case} child failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _site(root: Path, kind: str = "vector", *, labels: list[str] | None = None,
          limits: dict[str, Any] | None = None) -> Path:
    key, _ = coordinator_key(root / "coordinator")
    rng = np.random.default_rng(0)
    names = np.array(LABELS * 10)
    if kind == "image":
        arrays = {"inputs": rng.integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8), "labels": names}
    else:
        arrays = {"inputs": rng.normal(size=(30, 6)), "labels": names}
    site_file = write_site(root / "site", "site0", arrays, labels or LABELS, coordinator=key, dp=False)
    if limits:
        document = tomllib.loads(site_file.read_text(encoding="utf-8"))
        document["limits"] = limits
        site_file.write_text(site_file_text(document), encoding="utf-8")
    return site_file


def _package(directory: Path, architecture: str, config: dict[str, Any], preprocessing: dict[str, Any], *,
             honest: bool = False) -> int:
    """A package signed by the site's trusted coordinator, written without building the network
    (pack_model would build it: that is the bomb). ``honest`` weights fit the network; the
    others are one float (68 bytes). Returns the weights' size in bytes."""
    key, _ = coordinator_key(directory.parent.parent / "coordinator")
    if honest:
        from fedmte.client.architectures import initial_weights

        tensors = initial_weights(architecture, config, 0)
    else:
        tensors = {"w": torch.zeros(1)}
    count = sum(t.numel() for t in tensors.values())
    data = tensors_to_bytes(tensors)
    manifest = ModelManifest(name="bomb", architecture=architecture, config=config, preprocessing=preprocessing,
                             license="MIT", parameter_count=count, weights_sha256=hashlib.sha256(data).hexdigest(),
                             weights_bytes=len(data))
    write_package(directory, manifest, data, key)
    return len(data)


def _refusals(site_file: Path) -> list[RefusalRecord]:
    return [r for r in read_records(site_file.parent / "audit") if isinstance(r, RefusalRecord)]


@pytest.fixture(scope="module")
def package_bombs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Path], dict[str, int]]:
    """Every package bomb offered to a real site agent at setup, in one child process."""
    root = tmp_path_factory.mktemp("package-bombs")
    sites = {kind: _site(root / kind) if kind == "vector" else _site(root / kind, "image") for kind in ("vector", "image")}
    sizes = {}
    for case, bomb in PACKAGE_BOMBS.items():
        kind = bomb.get("site", "vector")
        sizes[case] = _package(root / kind / "models" / case, bomb["architecture"], bomb["config"],
                               bomb["preprocessing"], honest=bool(bomb.get("honest")))
    return _child("packages", root), sites, sizes


@pytest.mark.parametrize("case", sorted(PACKAGE_BOMBS))
def test_a_package_bomb_is_refused_at_setup_naming_the_limit(
    package_bombs: tuple[dict[str, Any], dict[str, Path], dict[str, int]], case: str
) -> None:
    verdicts, sites, sizes = package_bombs
    verdict, bomb = verdicts[case], PACKAGE_BOMBS[case]
    assert verdict["status"] == "refused", verdict
    assert verdict["rule"] == bomb["rule"], verdict
    assert f"({bomb['rule']})" in verdict["reason"] and "LimitExceededError" not in verdict["reason"]
    if not bomb.get("honest"):
        assert sizes[case] == 68  # the weights are one float; the manifest asks for the rest
    site_file = sites[bomb.get("site", "vector")]
    assert any(r.rule == bomb["rule"] and r.run_id == f"bomb-{case}" for r in _refusals(site_file))
    # refused before anything was built: the child never came near its 3 GiB
    assert verdict["peak_rss_bytes"] < 2 * GiB


def test_the_bombs_are_real_without_the_checks() -> None:
    """What the checks prevent, sized from the same numbers the site checks."""
    from fedmte.client.architectures import MLPConfig, mlp_size

    weights = mlp_size(MLPConfig(**PACKAGE_BOMBS["weights"]["config"]))
    assert weights.parameters * 4 > 17e9 and weights.largest_tensor == 65536**2
    image = PACKAGE_BOMBS["image"]["preprocessing"]
    assert 256 * image["height"] * image["width"] * image["channels"] * 4 > 51e9  # 52 GB a batch of 256
    assert HUGE_LABELS**2 * 8 > 167 * GiB  # the identity the one-hot is cut from (168 GiB)


def test_a_batch_larger_than_the_site_allows_is_refused_before_decoding(tmp_path: Path) -> None:
    """2048 x 2048 x 3 rows pass the per-row cap, but 256 of them are 12.9 GB: refused by
    ``max_batch_bytes`` before the first image is decoded (the site's [compute] batch size)."""
    _site(tmp_path / "image", "image")
    verdict = _child("batch", tmp_path)
    assert verdict["outcome"] == "refused" and verdict["rule"] == "limits.max_batch_bytes", verdict
    assert "lower [compute] batch_size" in verdict["message"]
    assert verdict["peak_rss_bytes"] < 2 * GiB


def test_a_job_with_too_many_labels_is_refused_by_the_limit_function() -> None:
    from fedmte.client.limits import DEFAULT_LIMITS, LimitExceededError, check_job_limits

    check_job_limits(DEFAULT_LIMITS, DEFAULT_LIMITS.max_labels)
    with pytest.raises(LimitExceededError, match=r"150,010.*at most 10,000 \(limits.max_labels\)") as caught:
        check_job_limits(DEFAULT_LIMITS, HUGE_LABELS)
    assert caught.value.rule == "limits.max_labels" and caught.value.reason_code == "limits:max_labels"


def test_a_job_with_150010_labels_is_refused_at_setup(tmp_path: Path) -> None:
    site_file = _site(tmp_path / "vector")
    _package(tmp_path / "vector" / "models" / "mlp", "mlp", {"input_dim": 6, "hidden_dims": [8]},
             {"kind": "vector", "dim": 6}, honest=True)
    verdict = _child("labels", tmp_path)
    assert verdict["outcome"] == "refused" and verdict["rule"] == "limits.max_labels", verdict
    assert any(r.rule == "limits.max_labels" for r in _refusals(site_file))


def test_a_release_too_large_is_refused_by_the_limit_function() -> None:
    from fedmte.client.limits import DEFAULT_LIMITS, LimitExceededError, check_release_limits, release_entries
    from fedmte.protocol.catalogue import expected_shape
    from fedmte.protocol.requests import Stat

    stats = [Stat.of("count"), Stat.of("class_sums"), Stat.of("class_scatters")]
    small = [expected_shape(s, 512, 1000, 0)[0] for s in stats]
    assert release_entries(small) == 1 + 1000 * 512 + 1000 * 512 * 513 // 2
    check_release_limits(DEFAULT_LIMITS, small)  # 132M entries: a per-class scatter of 512 features fits
    huge = [expected_shape(s, 4096, 1000, 0)[0] for s in stats]
    with pytest.raises(LimitExceededError, match=r"limits.max_release_entries") as caught:
        check_release_limits(DEFAULT_LIMITS, huge)  # 8.4e9 entries: 67 GB of float64
    assert caught.value.rule == "limits.max_release_entries" and caught.value.value == release_entries(huge)


def test_a_release_too_large_is_refused_before_it_is_computed(tmp_path: Path) -> None:
    """1,000 labels and a 4096-wide model asking for per-class scatters: 8.4e9 entries."""
    labels = LABELS + [f"extra{i}" for i in range(997)]
    site_file = _site(tmp_path / "vector", labels=labels)
    _package(tmp_path / "vector" / "models" / "mlp", "mlp", {"input_dim": 6, "hidden_dims": [4096]},
             {"kind": "vector", "dim": 6}, honest=True)
    verdict = _child("release", tmp_path)
    assert verdict["outcome"] == "refused" and verdict["rule"] == "limits.max_release_entries", verdict
    assert any(r.rule == "limits.max_release_entries" for r in _refusals(site_file))


def test_the_site_files_limits_are_the_ones_applied(tmp_path: Path) -> None:
    """A site lowers a cap in [limits]; loading a model under that site file refuses what the
    defaults admit, naming the site's limit (the weights reader and the architecture check)."""
    from fedmte.client.architectures import load_model, pack_model, resolve
    from fedmte.client.limits import LimitExceededError
    from fedmte.client.site_config import load_site_config

    site_file = _site(tmp_path / "vector", limits={"max_parameters": 100, "max_layer_width": 32})
    config = load_site_config(site_file)
    key, _ = coordinator_key(tmp_path / "vector" / "coordinator")
    from fedmte.client.architectures import initial_weights

    spec = {"input_dim": 6, "hidden_dims": [64]}
    manifest = pack_model(tmp_path / "pkg", name="wide", architecture="mlp", config=spec,
                          preprocessing={"kind": "vector", "dim": 6}, license="MIT",
                          tensors=initial_weights("mlp", spec, 0), key=key)
    with pytest.raises(LimitExceededError) as caught:
        load_model(tmp_path / "pkg", config.trust.keys, config.limits)
    assert caught.value.rule == "limits.max_parameters"  # 448 tensor elements in the weights file
    with pytest.raises(LimitExceededError) as caught:
        resolve(manifest, config.limits)
    assert caught.value.rule == "limits.max_layer_width" and caught.value.value == 64 and caught.value.cap == 32


def test_the_site_runner_limits_its_address_space_from_the_site_file(tmp_path: Path) -> None:
    site_file = _site(tmp_path / "vector", limits={"max_address_space_bytes": 6 * GiB})
    code = (
        "import json, resource, sys, torch\n"
        "from fedmte.client.site_runner import apply_site_limits\n"
        f"applied = apply_site_limits(['--insecure', '--node-config', 'site-file=\"{site_file}\" other=1'])\n"
        "try:\n"
        "    torch.empty(2 * 1024**3, dtype=torch.float32)\n"
        "    outcome = 'allocated'\n"
        "except (MemoryError, RuntimeError) as error:\n"
        "    outcome = type(error).__name__\n"
        "print(json.dumps({'applied': applied, 'limit': resource.getrlimit(resource.RLIMIT_AS), 'outcome': outcome}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["applied"] == 6 * GiB and result["limit"] == [6 * GiB, 6 * GiB]
    assert result["outcome"] in ("MemoryError", "RuntimeError")  # 8 GiB do not fit in 6
    assert "address space limited to 6.0 GiB" in done.stderr


def test_the_runner_finds_the_site_file_as_flower_parses_the_node_config(tmp_path: Path) -> None:
    from fedmte.client import site_agent
    from fedmte.client.site_runner import SITE_FILE_KEY, node_config_site_file

    assert SITE_FILE_KEY == site_agent.SITE_FILE_KEY
    assert node_config_site_file(["--node-config", 'site-file="/a b/site.toml"']) == Path("/a b/site.toml")
    assert node_config_site_file(['--node-config=site-file="/c/site.toml"', "--insecure"]) == Path("/c/site.toml")
    assert node_config_site_file(["--node-config", "x=1 site-file='/d.toml' y=2"]) == Path("/d.toml")
    assert node_config_site_file(["--insecure"]) is None
    (tmp_path / "node.toml").write_text('site-file = "/e/site.toml"\n')
    assert node_config_site_file(["--node-config", str(tmp_path / "node.toml")]) == Path("/e/site.toml")


# --------------------------------------------------------------------------- the child's side

def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _setup(site_file: Path, package: Path | None, run_id: str, labels: list[str]) -> tuple[dict[str, Any], str]:
    """Offer ``package`` to the real site agent of ``site_file`` in a signed setup."""
    from fedmte.client import site_agent
    from fedmte.protocol.errors import RefusalError
    from fedmte.protocol.job_messages import SETUP, ModelOffer, SetupRequest, setup_payload
    from fedmte.protocol.keys import public_key_text
    from fedmte.server.coordinator import sign_setup

    key, _ = coordinator_key(site_file.parent.parent / "coordinator")
    assert package is not None
    manifest = (package / "manifest.json").read_bytes()
    model_id = hashlib.sha256(manifest).hexdigest()
    offer = ModelOffer(model_id=model_id, label=package.name, manifest=manifest.decode("utf-8"),
                       signature=(package / "signature.json").read_text(encoding="utf-8"), weights_attached=True)
    request = SetupRequest(run_id=run_id, purpose="memory bomb", labels=labels, scorers=["logme"],
                           coordinator_key=public_key_text(key), models=[offer], dp_requested=False)
    weights = {model_id: (package / "weights.safetensors").read_bytes()}
    payload = setup_payload(sign_setup(request, key, weights), weights)  # signed rounds: over the weights too
    try:
        reply = site_agent.answer(SETUP, payload, site_file, run_id=run_id)
    except RefusalError as refusal:
        return {"outcome": "refused", "rule": refusal.rule, "message": str(refusal)}, model_id
    status = reply.doc["models"][model_id]
    return {"outcome": status["status"], "status": status["status"], "rule": status.get("rule"),
            "reason": status.get("reason")}, model_id


def _case_packages(root: Path) -> dict[str, Any]:
    verdicts: dict[str, Any] = {}
    for case, bomb in PACKAGE_BOMBS.items():
        kind = bomb.get("site", "vector")
        verdict, _ = _setup(root / kind / "site" / "site.toml", root / kind / "models" / case, f"bomb-{case}", LABELS)
        verdicts[case] = verdict | {"peak_rss_bytes": _peak_rss()}
    return verdicts


def _case_batch(root: Path) -> dict[str, Any]:
    from fedmte.client.architectures import initial_weights, load_model, pack_model
    from fedmte.client.data import open_site_data
    from fedmte.client.extract import ExtractionSettings, extract
    from fedmte.client.limits import LimitExceededError
    from fedmte.client.site_config import load_site_config

    config = load_site_config(root / "image" / "site" / "site.toml")
    key, _ = coordinator_key(root / "image" / "coordinator")
    spec = {"in_channels": 3, "channels": [4], "feature_dim": 16}
    pre = {"kind": "image", "height": 2048, "width": 2048, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    pack_model(root / "big-images", name="big-images", architecture="cnn", config=spec, preprocessing=pre,
               license="MIT", tensors=initial_weights("cnn", spec, 0), key=key)
    model = load_model(root / "big-images", config.trust.keys, config.limits)
    settings = ExtractionSettings.from_compute(config.compute, progress=False)
    try:
        extract(model, open_site_data(config.data, LABELS), (), settings=settings)
    except LimitExceededError as refusal:
        return {"outcome": "refused", "rule": refusal.rule, "message": str(refusal), "peak_rss_bytes": _peak_rss()}
    return {"outcome": "decoded", "peak_rss_bytes": _peak_rss()}


def _case_labels(root: Path) -> dict[str, Any]:
    labels = LABELS + [f"extra{i}" for i in range(HUGE_LABELS - len(LABELS))]
    verdict, _ = _setup(root / "vector" / "site" / "site.toml", root / "vector" / "models" / "mlp", "labels", labels)
    return verdict


def _case_release(root: Path) -> dict[str, Any]:
    from fedmte.client import site_agent
    from fedmte.protocol.errors import RefusalError
    from fedmte.protocol.job_messages import encode_job_round
    from fedmte.protocol.requests import Stat
    from fedmte.protocol.wire import STATS, Payload

    site_file = root / "vector" / "site" / "site.toml"
    labels = LABELS + [f"extra{i}" for i in range(997)]
    verdict, model_id = _setup(site_file, root / "vector" / "models" / "mlp", "release", labels)
    if verdict["outcome"] != "ready":
        return verdict
    request, arrays = encode_job_round({model_id: [Stat.of("class_scatters")]}, run_id="release", round_index=1,
                                       num_classes=len(labels))
    key, _ = coordinator_key(site_file.parent.parent / "coordinator")  # signed rounds: the setup's key signs
    payload = Payload(doc=request.sign(key, arrays).model_dump(mode="json", by_alias=True), arrays=arrays)
    try:
        site_agent.answer(STATS, payload, site_file, run_id="release")
    except RefusalError as refusal:
        return {"outcome": "refused", "rule": refusal.rule, "message": str(refusal)}
    except (MemoryError, RuntimeError) as error:
        return {"outcome": type(error).__name__, "message": str(error)[:500]}
    return {"outcome": "released"}


CASES = {"packages": _case_packages, "batch": _case_batch, "labels": _case_labels, "release": _case_release}

if __name__ == "__main__":
    print(json.dumps(CASES[sys.argv[1]](Path(sys.argv[2]))))
