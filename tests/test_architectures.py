"""The architecture registry: the site builds the network itself and loads weights only
on an exact key, shape and dtype match."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from fedmte.client.architectures import (
    ARCHITECTURES,
    build,
    initial_weights,
    load_model,
    pack_model,
    parameter_count,
)
from fedmte.client.errors import (
    ArchitectureConfigError,
    MissingTensorError,
    TensorDtypeError,
    TensorShapeError,
    UnexpectedTensorError,
    UnknownArchitectureError,
)
from fedmte.client.packages import generate_signing_key, public_key_string, tensors_to_bytes, write_package
from tests.client_helpers import CNN_CONFIG, CNN_PRE, MLP_CONFIG, MLP_PRE, SPECS, pack

KEY = generate_signing_key()
PINNED = [public_key_string(KEY.public_key())]

INPUTS = {
    "mlp": lambda: torch.randn(3, 6),
    "cnn": lambda: torch.randn(3, 1, 8, 8),
    "text_bag": lambda: torch.tensor([[5, 9, 100, 0, 0], [1, 2, 3, 4, 5], [7, 0, 0, 0, 0]]),
}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_loaded_model_computes_what_the_packed_weights_do(tmp_path: Path, architecture: str) -> None:
    manifest = pack(tmp_path / "pkg", KEY, architecture, seed=3)
    model = load_model(tmp_path / "pkg", PINNED)
    config, _ = SPECS[architecture]
    reference = ARCHITECTURES[architecture].build(ARCHITECTURES[architecture].config_model.model_validate(config))
    reference.load_state_dict(initial_weights(architecture, config, 3))
    reference.eval()
    x = INPUTS[architecture]()
    with torch.inference_mode():
        got, want = model.module(x), reference(x)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert got["features"].shape == (3, model.feature_dim)
    assert got["logits"].shape == (3, manifest.source_head.num_classes)
    assert manifest.parameter_count == sum(t.numel() for t in reference.parameters())
    assert not any(p.requires_grad for p in model.module.parameters())


def test_seeded_initialisation_is_reproducible_and_seed_dependent() -> None:
    a, b, c = (initial_weights("mlp", MLP_CONFIG, s) for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["body.0.weight"], c["body.0.weight"])


def test_text_bag_ignores_padding(tmp_path: Path) -> None:
    pack(tmp_path / "pkg", KEY, "text_bag")
    model = load_model(tmp_path / "pkg", PINNED)
    short = torch.tensor([[5, 9, 0, 0]])
    long = torch.tensor([[5, 9, 0, 0, 0, 0, 0, 0]])
    with torch.inference_mode():
        torch.testing.assert_close(model.module(short)["features"], model.module(long)["features"])


def _signed_with(tmp_path: Path, tensors: dict[str, torch.Tensor], base: str = "mlp") -> Path:
    """A properly signed package whose weights are ``tensors`` (which may not fit)."""
    good = pack(tmp_path / "good", KEY, base)
    data = tensors_to_bytes(tensors)
    manifest = good.model_copy(update={"weights_sha256": hashlib.sha256(data).hexdigest(), "weights_bytes": len(data)})
    return write_package(tmp_path / "bad", manifest, data, KEY)


def test_extra_tensor_is_refused(tmp_path: Path) -> None:
    weights = initial_weights("mlp", MLP_CONFIG, 0) | {"backdoor.weight": torch.zeros(2)}
    with pytest.raises(UnexpectedTensorError, match="backdoor.weight"):
        load_model(_signed_with(tmp_path, weights), PINNED)


def test_missing_tensor_is_refused(tmp_path: Path) -> None:
    weights = initial_weights("mlp", MLP_CONFIG, 0)
    del weights["head.bias"]
    with pytest.raises(MissingTensorError, match="head.bias"):
        load_model(_signed_with(tmp_path, weights), PINNED)


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    weights = initial_weights("mlp", MLP_CONFIG, 0)
    weights["body.0.weight"] = torch.zeros(16, 7)
    with pytest.raises(TensorShapeError, match=r"body.0.weight.*\[16, 7\].*\[16, 6\]"):
        load_model(_signed_with(tmp_path, weights), PINNED)


@pytest.mark.parametrize(
    "name, replacement",
    [("body.0.weight", lambda t: t.double()), ("body.0.weight", lambda t: t.half()), ("body.1.num_batches_tracked", lambda t: t.int())],
)
def test_wrong_dtype_is_refused(tmp_path: Path, name: str, replacement: object) -> None:
    arch = "cnn" if "num_batches" in name else "mlp"
    weights = initial_weights(arch, CNN_CONFIG if arch == "cnn" else MLP_CONFIG, 0)
    weights[name] = replacement(weights[name])
    with pytest.raises(TensorDtypeError, match=f"{name}.*no casts"):
        load_model(_signed_with(tmp_path, weights, arch), PINNED)


def test_float64_networks_load_float64_weights(tmp_path: Path) -> None:
    config = MLP_CONFIG | {"dtype": "float64"}
    pack_model(tmp_path / "pkg", name="m64", architecture="mlp", config=config, preprocessing=MLP_PRE,
               license="MIT", tensors=initial_weights("mlp", config, 0), key=KEY)
    model = load_model(tmp_path / "pkg", PINNED)
    assert model.module(torch.zeros(1, 6, dtype=torch.float64))["features"].dtype == torch.float64


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownArchitectureError, match="'resnet50' is not installed.*cnn, mlp, text_bag"):
        pack_model(tmp_path / "pkg", name="r", architecture="resnet50", config={}, preprocessing=CNN_PRE,
                   license="MIT", tensors={}, key=KEY)
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"feature_output": "hidden"}, "feature_output 'hidden' is not an output"),
        ({"source_head": {"num_classes": 7}}, "says 7 classes"),
        ({"source_head": {"output": "features", "num_classes": 5}}, "must be a logits output"),
        ({"preprocessing": CNN_PRE}, "takes vector input"),
        ({"preprocessing": {"kind": "vector", "dim": 9}}, "9-wide vectors"),
        ({"config": MLP_CONFIG | {"hidden_dims": []}}, "configuration of 'mlp' is invalid"),
        ({"config": MLP_CONFIG | {"exec": "os.system"}}, "configuration of 'mlp' is invalid"),
    ],
)
def test_manifest_must_agree_with_the_architecture(tmp_path: Path, change: dict[str, object], message: str) -> None:
    fields = {"name": "m", "architecture": "mlp", "config": MLP_CONFIG, "preprocessing": MLP_PRE, "license": "MIT",
              "tensors": initial_weights("mlp", MLP_CONFIG, 0), "key": KEY, "source_head": {"num_classes": 4}} | change
    with pytest.raises(ArchitectureConfigError, match=message):
        pack_model(tmp_path / "pkg", **fields)


def test_signed_manifest_with_a_wrong_parameter_count_is_refused(tmp_path: Path) -> None:
    good = pack(tmp_path / "good", KEY, "mlp")
    manifest = good.model_copy(update={"parameter_count": good.parameter_count + 1})
    write_package(tmp_path / "bad", manifest, (tmp_path / "good" / "weights.safetensors").read_bytes(), KEY)
    with pytest.raises(ArchitectureConfigError, match="parameters"):
        load_model(tmp_path / "bad", PINNED)


def test_pack_refuses_weights_that_do_not_fit_and_writes_nothing(tmp_path: Path) -> None:
    weights = initial_weights("mlp", MLP_CONFIG, 0)
    del weights["head.weight"]
    with pytest.raises(MissingTensorError, match="head.weight"):
        pack(tmp_path / "pkg", KEY, "mlp", tensors=weights)
    assert not (tmp_path / "pkg").exists()


def test_build_gives_eval_mode_and_counts_parameters() -> None:
    from fedmte.protocol.manifest import ModelManifest

    manifest = ModelManifest(name="c", architecture="cnn", config=CNN_CONFIG, preprocessing=CNN_PRE, license="MIT",
                             parameter_count=0, weights_sha256="0" * 64, weights_bytes=0)
    module = build(manifest)
    assert not module.training
    # conv(1->4) 36+4, bn 8, conv(4->8) 288+8, bn 16, project 8*6+6, head 6*3+3
    assert parameter_count(module) == 40 + 8 + 296 + 16 + 54 + 21


def test_inspect_model_reports_a_signed_package_that_does_not_build(tmp_path: Path) -> None:
    from fedmte.client.architectures import inspect_model

    weights = initial_weights("mlp", MLP_CONFIG, 0) | {"backdoor.weight": torch.zeros(2)}
    report = inspect_model(_signed_with(tmp_path, weights), PINNED)
    assert not report.verified and report.manifest is not None
    assert report.verdict.startswith("signature verified, but the site cannot build it: UnexpectedTensorError")
    good = inspect_model(tmp_path / "good", PINNED)
    assert good.verified and good.verdict == "verified; builds as this site's 'mlp' network"
