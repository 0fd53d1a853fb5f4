"""The architecture registry: the site builds the network itself and loads weights only
on an exact key, shape and dtype match."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmte.client.architectures import (
    ARCHITECTURES,
    CNNConfig,
    MLPConfig,
    TextBagConfig,
    build,
    cnn_size,
    initial_weights,
    load_model,
    mlp_size,
    pack_model,
    parameter_count,
    resolve,
    text_bag_size,
)
from fedmte.client.errors import (
    ArchitectureConfigError,
    MissingTensorError,
    TensorDtypeError,
    TensorShapeError,
    UnexpectedTensorError,
    UnknownArchitectureError,
)
from fedmte.client.limits import DEFAULT_LIMITS, LimitExceededError, SiteLimits
from fedmte.client.packages import generate_signing_key, public_key_string, tensors_to_bytes, write_package
from fedmte.protocol.manifest import ModelManifest
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


# --------------------------------------------------------------------------- sizes and the site's limits

SIZES = {"mlp": (MLPConfig, mlp_size), "cnn": (CNNConfig, cnn_size), "text_bag": (TextBagConfig, text_bag_size)}
WIDTHS = st.integers(1, 24)
CONFIGS = {
    "mlp": st.fixed_dictionaries({"input_dim": WIDTHS, "hidden_dims": st.lists(WIDTHS, min_size=1, max_size=4),
                                  "num_source_classes": st.integers(0, 5), "dtype": st.sampled_from(["float32", "float64"])}),
    "cnn": st.fixed_dictionaries({"in_channels": st.sampled_from([1, 3]), "channels": st.lists(WIDTHS, min_size=1, max_size=3),
                                  "batch_norm": st.booleans(), "feature_dim": st.none() | WIDTHS,
                                  "num_source_classes": st.integers(0, 5)}),
    "text_bag": st.fixed_dictionaries({"vocab_size": st.integers(2, 300), "embed_dim": WIDTHS, "feature_dim": WIDTHS,
                                       "num_source_classes": st.integers(0, 5)}),
}


def _manifest(architecture: str, config: dict[str, object], preprocessing: dict[str, object]) -> ModelManifest:
    return ModelManifest(name="m", architecture=architecture, config=config, preprocessing=preprocessing, license="MIT",
                         parameter_count=0, weights_sha256="0" * 64, weights_bytes=0)


@pytest.mark.parametrize("architecture", sorted(SIZES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_sizes_from_the_configuration_are_what_the_builder_allocates(architecture: str, data: st.DataObject) -> None:
    config_model, size_of = SIZES[architecture]
    config = config_model.model_validate(data.draw(CONFIGS[architecture]))
    size = size_of(config)
    module = ARCHITECTURES[architecture].build(config)
    state = module.state_dict()
    assert size.exact and size.parameters == parameter_count(module)
    assert size.parameters + size.buffers == sum(t.numel() for t in state.values())
    assert size.largest_tensor == max(t.numel() for t in state.values())
    widths = [m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)]
    widths += [m.out_channels for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    widths += [m.embedding_dim for m in module.modules() if isinstance(m, torch.nn.EmbeddingBag)]
    assert size.widest_layer == max(widths) and size.layers == len(widths)


def test_the_cnn_activation_estimate_covers_what_a_forward_pass_holds() -> None:
    config = CNNConfig(in_channels=1, channels=(4, 8), feature_dim=6)
    pre = {"kind": "image", "height": 9, "width": 7, "channels": 1, "mean": [0.5], "std": [0.25]}
    size = cnn_size(config, _manifest("cnn", config.model_dump(mode="json"), pre).preprocessing)
    assert cnn_size(config).activations is None  # no preprocessing, no image size
    module = ARCHITECTURES["cnn"].build(config).eval()
    with torch.inference_mode():
        x = torch.zeros(1, 1, 9, 7)
        conv = module.body[0](x)
        relu = module.body[1](conv)
    # the largest operation of a row: the first ReLU's input and output, at full resolution
    assert size.activations == conv.numel() + relu.numel() == 2 * 4 * 9 * 7 > x.numel() + conv.numel()


def test_the_finding_bomb_is_refused_before_any_layer_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """hidden_dims = [65536, 65536, 16]: 17 GB of float32, refused from the numbers alone."""

    def no_layers(*args: object, **kwargs: object) -> None:
        raise AssertionError("a layer was built")

    monkeypatch.setattr(torch.nn.Linear, "__init__", no_layers)
    manifest = _manifest("mlp", {"input_dim": 6, "hidden_dims": [65536, 65536, 16]}, MLP_PRE)
    for attempt in (lambda: resolve(manifest), lambda: build(manifest),
                    lambda: initial_weights("mlp", {"input_dim": 6, "hidden_dims": [65536, 65536, 16]}, 0)):
        with pytest.raises(LimitExceededError, match=r"4,294,967,296.*at most 268,435,456 \(limits.max_tensor_elements\)") as caught:
            attempt()
        assert caught.value.rule == "limits.max_tensor_elements" and caught.value.reason_code == "limits:max_tensor_elements"


@pytest.mark.parametrize(
    "architecture, config, preprocessing, limit",
    [
        ("mlp", {"input_dim": 6, "hidden_dims": [100_000]}, MLP_PRE, "max_layer_width"),
        ("mlp", {"input_dim": 6, "hidden_dims": [16384] * 5}, MLP_PRE, "max_parameters"),
        ("mlp", {"input_dim": 6, "hidden_dims": [16], "num_source_classes": 70_000}, MLP_PRE, "max_layer_width"),
        ("text_bag", {"vocab_size": 16_777_216, "embed_dim": 64, "feature_dim": 8},
         {"kind": "text", "tokenizer": "hashed_words", "vocab_size": 16_777_216, "max_tokens": 8}, "max_tensor_elements"),
        ("cnn", {"in_channels": 3, "channels": [4]},
         {"kind": "image", "height": 4096, "width": 4096, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
         "max_input_elements"),
    ],
)
def test_each_size_above_a_default_limit_is_refused_naming_it(architecture: str, config: dict[str, object],
                                                              preprocessing: dict[str, object], limit: str) -> None:
    with pytest.raises(LimitExceededError) as caught:
        resolve(_manifest(architecture, config, preprocessing))
    assert caught.value.rule == f"limits.{limit}" and caught.value.cap == getattr(DEFAULT_LIMITS, limit)


def test_the_sites_limits_and_batch_size_are_applied() -> None:
    manifest = _manifest("mlp", MLP_CONFIG, MLP_PRE)
    resolve(manifest, SiteLimits(max_layers=3, max_parameters=221, max_layer_width=16))  # 6-16-5 and a 4-class head
    for limits, rule in ((SiteLimits(max_layers=2), "max_layers"), (SiteLimits(max_parameters=220), "max_parameters"),
                         (SiteLimits(max_layer_width=8), "max_layer_width"),
                         (SiteLimits(max_tensor_elements=50), "max_tensor_elements"),
                         (SiteLimits(max_input_elements=5), "max_input_elements")):
        with pytest.raises(LimitExceededError) as caught:
            resolve(manifest, limits)
        assert caught.value.rule == f"limits.{rule}"
    # a 1-channel 4096 x 4096 image passes the row cap; its first activations, 64 channels at
    # full resolution in and out of a ReLU, are 8.6 GB a row in float32: refused once the
    # site's batch size is known
    big = _manifest("cnn", {"in_channels": 1, "channels": [64]},
                    {"kind": "image", "height": 4096, "width": 4096, "channels": 1, "mean": [0.5], "std": [0.25]})
    resolve(big)
    with pytest.raises(LimitExceededError, match="activations") as caught:
        resolve(big, batch_size=1)
    assert caught.value.rule == "limits.max_batch_bytes" and caught.value.value == 2 * 64 * 4096 * 4096 * 4
    with pytest.raises(LimitExceededError, match="decoded batch") as caught:
        resolve(_manifest("mlp", {"input_dim": 1_000_000, "hidden_dims": [4]}, {"kind": "vector", "dim": 1_000_000}),
                SiteLimits(max_batch_bytes=2**30), batch_size=256)
    assert caught.value.value == 256 * 1_000_000 * 8  # vectors may be standardised in float64


def test_weights_that_do_not_fill_the_network_are_refused_before_it_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the caps, a 68-byte weights file still cannot make the site build (and
    initialise) a 16M-parameter network: the package is compared with the network on the
    meta device first."""
    from fedmte.client import architectures

    config = {"input_dim": 6, "hidden_dims": [4096, 4096]}
    data = tensors_to_bytes({"body.0.weight": torch.zeros(1)})
    manifest = _manifest("mlp", config, MLP_PRE).model_copy(update={
        "parameter_count": 6 * 4096 + 4096 + 4096 * 4096 + 4096,
        "weights_sha256": hashlib.sha256(data).hexdigest(), "weights_bytes": len(data)})
    write_package(tmp_path / "pkg", manifest, data, KEY)

    def no_build(*args: object) -> None:
        raise AssertionError("the network was built")

    monkeypatch.setattr(architectures, "_build", no_build)
    with pytest.raises(MissingTensorError, match=r"lack 3 tensor.*body.0.bias"):
        load_model(tmp_path / "pkg", PINNED)


def test_hugging_face_encoders_are_bounded_before_they_are_built(monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    from fedmte.client.architectures import meta_size
    from fedmte.client.architectures_extras import EXTRA_ARCHITECTURES, HFTextConfig

    tiny = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 37, "vocab_size": 100, "max_position_embeddings": 24}
    pre = {"kind": "text", "tokenizer": "hashed_words", "vocab_size": 100, "max_tokens": 12}
    # the exact count comes from the meta device and is what the real build allocates
    config = HFTextConfig(hf_config=tiny, num_source_classes=3)
    arch = EXTRA_ARCHITECTURES["hf_text_encoder"]
    bound = arch.size(config, None)
    exact = meta_size(arch, config, bound)
    weights = initial_weights("hf_text_encoder", {"hf_config": tiny, "num_source_classes": 3}, 0)
    assert not bound.exact and bound.parameters <= exact.parameters
    assert exact.parameters + exact.buffers == sum(t.numel() for t in weights.values())
    assert exact.largest_tensor == max(t.numel() for t in weights.values())
    from tests.test_optional_architectures import FAMILIES, HF_IMAGE_FAMILIES, hf_config

    for family in FAMILIES:  # the arithmetic bound holds for every family the site builds
        arch_id = "hf_image_encoder" if family in HF_IMAGE_FAMILIES else "hf_text_encoder"
        family_arch = EXTRA_ARCHITECTURES[arch_id]
        family_config = family_arch.config_model.model_validate(hf_config(family))
        family_bound = family_arch.size(family_config, None)
        family_exact = meta_size(family_arch, family_config, family_bound)
        state = initial_weights(arch_id, hf_config(family), 0)
        assert family_bound.parameters <= family_exact.parameters, family
        assert family_exact.parameters + family_exact.buffers == sum(t.numel() for t in state.values()), family
    # a 65536-wide encoder, or a 10,000-layer one, never reaches transformers
    monkeypatch.setattr(transformers.AutoModel, "from_config", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    for change, rule in (({"hidden_size": 65536, "intermediate_size": 64}, "max_tensor_elements"),
                         ({"num_hidden_layers": 10_000}, "max_layers"),
                         ({"intermediate_size": 100_000}, "max_layer_width")):
        manifest = _manifest("hf_text_encoder", {"hf_config": tiny | change}, pre)
        with pytest.raises(LimitExceededError) as caught:
            resolve(manifest)
        assert caught.value.rule == f"limits.{rule}"


def test_an_allowlisted_backbone_is_bounded_by_its_head() -> None:
    from fedmte.client.architectures_extras import EXTRA_ARCHITECTURES, TorchvisionConfig
    from fedmte.client.limits import check_model_size

    arch = EXTRA_ARCHITECTURES["torchvision"]
    size = arch.size(TorchvisionConfig(model="resnet50", num_source_classes=1000), None)
    assert size.parameters == 2048 * 1000 + 1000 and not size.exact and not arch.meta_build
    with pytest.raises(LimitExceededError) as caught:
        check_model_size(DEFAULT_LIMITS, arch.size(TorchvisionConfig(model="resnet50", num_source_classes=1_000_000), None))
    assert caught.value.rule == "limits.max_layer_width"
