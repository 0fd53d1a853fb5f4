"""``fedmte model keygen|pack|inspect`` and ``fedmte features``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax
from typer.testing import CliRunner

from fedmte.cli import app
from fedmte.client.architectures import load_model

runner = CliRunner()
CONFIG = json.dumps({"input_dim": 4, "hidden_dims": [8, 6], "num_source_classes": 3})
PRE = json.dumps({"kind": "vector", "dim": 4})


def invoke(*args: str) -> object:
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, object]:
    done = invoke("model", "keygen", str(tmp_path / "coord.key"))
    assert done.exit_code == 0, done.output
    public = done.output.strip().splitlines()[-1]
    assert public.startswith("ed25519:")
    done = invoke(
        "model", "pack", str(tmp_path / "pkg"), "--architecture", "mlp", "--config", CONFIG, "--preprocessing", PRE,
        "--name", "demo-mlp", "--license", "MIT", "--key", str(tmp_path / "coord.key"), "--init-seed", "4",
        "--head-output", "logits",
    )
    assert done.exit_code == 0, done.output
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    x[3] = np.inf
    y = np.array(["no", "yes"])[rng.integers(0, 2, size=40)]
    np.savez(tmp_path / "data.npz", inputs=x, labels=y)
    (tmp_path / "site.toml").write_text(
        f'[data]\nkind = "arrays"\npath = "data.npz"\nlabels = ["no", "yes"]\n'
        f'[trust.coordinators]\ncoordinator = "{public}"\n[compute]\nbatch_size = 16\ndevice = "cpu"\nprogress = false\n'
    )
    return {"dir": tmp_path, "public": public, "x": x, "y": y}


def test_inspect_verifies_with_the_site_keys(workspace: dict[str, object]) -> None:
    tmp = workspace["dir"]
    done = invoke("model", "inspect", str(tmp / "pkg"), "--site", str(tmp / "site.toml"), "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["verified"] and report["manifest"]["name"] == "demo-mlp" and report["tensors"] == 6
    assert report["manifest"]["source_head"]["num_classes"] == 3


def test_inspect_without_pinned_keys_shows_claims_and_exits_1(workspace: dict[str, object]) -> None:
    done = invoke("model", "inspect", str(workspace["dir"] / "pkg"))
    assert done.exit_code == 1
    assert "NOT verified" in done.output and "demo-mlp" in done.output and "UntrustedKeyError" in done.output


def test_features_writes_npz_and_second_run_uses_the_cache(workspace: dict[str, object]) -> None:
    tmp = workspace["dir"]
    args = ("features", "--model", str(tmp / "pkg"), "--site", str(tmp / "site.toml"), "--out", str(tmp / "f.npz"))
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "39 rows used, 1 skipped" in first.output and "computed on cpu" in first.output
    with np.load(tmp / "f.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    assert sorted(arrays) == ["features", "labels", "source_probs"]
    ok = np.isfinite(workspace["x"]).all(axis=1)
    model = load_model(tmp / "pkg", [workspace["public"]])
    with torch.inference_mode():
        out = model.module(torch.from_numpy(workspace["x"][ok]).float())
    np.testing.assert_allclose(arrays["features"], out["features"].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(arrays["source_probs"], softmax(out["logits"].numpy().astype(np.float64), axis=1), rtol=1e-6)
    assert arrays["labels"].tolist() == [int(v == "yes") for v in workspace["y"][ok]]
    second = invoke(*args)
    assert second.exit_code == 0 and "read from the feature cache" in second.output
    scored = invoke("score", str(tmp / "f.npz"), "--scorers", "logme,nce", "--json")
    assert scored.exit_code == 0, scored.output
    assert set(json.loads(scored.output)) == {"logme", "nce"}


def test_features_refuses_a_package_from_an_unpinned_key(workspace: dict[str, object]) -> None:
    tmp = workspace["dir"]
    other_public = invoke("model", "keygen", str(tmp / "other.key")).output.strip()
    text = (tmp / "site.toml").read_text().replace(workspace["public"], other_public)
    (tmp / "site.toml").write_text(text)
    done = invoke("features", "--model", str(tmp / "pkg"), "--site", str(tmp / "site.toml"), "--out", str(tmp / "f.npz"))
    assert done.exit_code == 2
    assert "error:" in done.output and "does not pin" in done.output
    assert not (tmp / "f.npz").exists()


def test_pack_needs_exactly_one_weights_source(workspace: dict[str, object]) -> None:
    tmp = workspace["dir"]
    done = invoke(
        "model", "pack", str(tmp / "pkg2"), "--architecture", "mlp", "--config", CONFIG, "--preprocessing", PRE,
        "--name", "x", "--license", "MIT", "--key", str(tmp / "coord.key"),
    )
    assert done.exit_code == 2 and "exactly one of --weights" in done.output


def test_pack_from_a_safetensors_file(workspace: dict[str, object]) -> None:
    from safetensors.torch import save_file

    from fedmte.client.architectures import initial_weights

    tmp = workspace["dir"]
    save_file(initial_weights("mlp", json.loads(CONFIG), 9), tmp / "w.safetensors")
    done = invoke(
        "model", "pack", str(tmp / "pkg3"), "--architecture", "mlp", "--config", CONFIG, "--preprocessing", PRE,
        "--name", "from-file", "--license", "MIT", "--key", str(tmp / "coord.key"), "--weights", str(tmp / "w.safetensors"),
    )
    assert done.exit_code == 0, done.output
    assert load_model(tmp / "pkg3", [workspace["public"]]).manifest.source_head is None
