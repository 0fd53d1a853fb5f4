"""Optional architecture families: Hugging Face encoders (installed here and in CI, so the real
path runs), torchvision and timm (each tested the way it installs: with the library, the site
computes what the library computes; without it, the id is refused naming the pip extra)."""

from __future__ import annotations

import hashlib
import importlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedmte.cli import app
from fedmte.client.architectures import LoadedModel, initial_weights, inspect_model, load_model, lookup, pack_model
from fedmte.client.architectures_extras import (
    HF_IMAGE_FAMILIES,
    HF_TEXT_FAMILIES,
    TIMM_MODELS,
    TORCHVISION_MODELS,
    TimmConfig,
    TorchvisionConfig,
)
from fedmte.client.cache import FeatureCache
from fedmte.client.data import open_site_data
from fedmte.client.errors import (
    ArchitectureConfigError,
    OptionalDependencyError,
    UnexpectedTensorError,
    UnknownArchitectureError,
)
from fedmte.client.extract import ExtractionSettings, extract
from fedmte.protocol.manifest import ModelManifest, TextPreprocessing
from fedmte.client.packages import generate_signing_key, public_key_string, tensors_to_bytes, write_package
from fedmte.client.preprocess import tokenize
from fedmte.client.site_config import parse_site_config

KEY = generate_signing_key()
PINNED = [public_key_string(KEY.public_key())]
LABELS = ["a", "b", "c"]
SETTINGS = ExtractionSettings(batch_size=4, device="cpu", prefetch=1, threads=1)

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
TINY_TEXT = TINY | {"vocab_size": 100, "max_position_embeddings": 24}
TINY_IMAGE = TINY | {"image_size": 16, "patch_size": 8, "num_channels": 3}
FAMILIES: dict[str, dict[str, Any]] = {
    "bert": TINY_TEXT,
    "roberta": TINY_TEXT | {"pad_token_id": 0},
    "xlm-roberta": TINY_TEXT | {"pad_token_id": 0},
    "distilbert": {"vocab_size": 100, "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 37, "max_position_embeddings": 24},
    "electra": TINY_TEXT | {"embedding_size": 16},
    "albert": TINY_TEXT | {"embedding_size": 16},
    "deberta-v2": TINY_TEXT,
    "vit": TINY_IMAGE,
    "deit": TINY_IMAGE,
    "dinov2": {k: v for k, v in TINY_IMAGE.items() if k != "intermediate_size"} | {"mlp_ratio": 1},
}
TEXT_PRE = {"kind": "text", "tokenizer": "hashed_words", "vocab_size": 100, "max_tokens": 12}
IMAGE_PRE = {"kind": "image", "height": 16, "width": 16, "channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
TEXTS = ["the cat sat", "a dog ran far away today", "", "cat dog cat dog", "one two three four five six seven eight nine ten eleven twelve thirteen",
         "sat", "far far away", "the the the", "dog", "a b c d"]


def hf_config(family: str, **extra: Any) -> dict[str, Any]:
    return {"hf_config": {"model_type": family, **FAMILIES[family]}, **extra}


def arch_of(family: str) -> str:
    return "hf_image_encoder" if family in HF_IMAGE_FAMILIES else "hf_text_encoder"


def packed(path: Path, architecture: str, config: dict[str, Any], pre: dict[str, Any], seed: int = 0) -> LoadedModel:
    classes = config.get("num_source_classes", 0)
    pack_model(path, name="tiny", architecture=architecture, config=config, preprocessing=pre, license="Apache-2.0",
               tensors=initial_weights(architecture, config, seed), key=KEY,
               source_head={"num_classes": classes} if classes else None)
    return load_model(path, PINNED)


def reference(path: Path, family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """transformers' own model with the package's weights, built without fedmte, and the head tensors."""
    tensors = load_file(path / "weights.safetensors")
    fields = dict(FAMILIES[family])
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(family, **fields))
    if hasattr(model, "pooler"):
        model.pooler = None  # fedmte leaves the optional pooler out
    missing, unexpected = model.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items()
                                                 if k.startswith("backbone.")}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval(), {k: v for k, v in tensors.items() if k.startswith("head.")}


def pooled(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No socket may connect and nothing may be loaded by name while the site builds and runs."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network or from_pretrained used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    for owner in (transformers.AutoModel, transformers.AutoConfig, transformers.PreTrainedModel):
        monkeypatch.setattr(owner, "from_pretrained", refuse)


def table(tmp_path: Path) -> Any:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": LABELS[i % 3]}) + "\n" for i, t in enumerate(TEXTS)))
    source = parse_site_config({"data": {"kind": "table", "path": str(path), "text_column": "text"}}, Path("/")).data
    return open_site_data(source, LABELS)


# --------------------------------------------------------------------------- Hugging Face: the site pipeline

@pytest.mark.parametrize("pooling, cls_token_id", [("cls", None), ("mean", None), ("cls", 99)])
def test_tiny_bert_extracts_what_transformers_computes(tmp_path: Path, offline: None, pooling: str, cls_token_id: int | None) -> None:
    config = hf_config("bert", pooling=pooling, num_source_classes=3, cls_token_id=cls_token_id)
    model = packed(tmp_path / "pkg", "hf_text_encoder", config, TEXT_PRE, seed=1)
    result = extract(model, table(tmp_path), cache=FeatureCache(tmp_path / "cache"), settings=SETTINGS)
    assert result.rows["used"] == len(TEXTS) and result.entry is not None

    ref, head = reference(tmp_path / "pkg", "bert")
    ids = torch.from_numpy(np.stack([tokenize(t, TextPreprocessing(**TEXT_PRE)) for t in TEXTS]))
    if cls_token_id is not None:
        ids = torch.cat([torch.full((len(ids), 1), cls_token_id), ids], dim=1)
    mask = ids != 0
    with torch.no_grad():
        features = pooled(ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state, mask, pooling)
        logits = features @ head["head.weight"].T + head["head.bias"]
    np.testing.assert_allclose(result.entry.features(), features.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.entry.logits(), logits.numpy(), rtol=1e-5, atol=1e-5)
    assert result.entry.features().shape == (len(TEXTS), 32) and np.isfinite(result.entry.features()).all()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_tiny_vit_extracts_what_transformers_computes(tmp_path: Path, offline: None, pooling: str) -> None:
    config = hf_config("vit", pooling=pooling, num_source_classes=3)
    model = packed(tmp_path / "pkg", "hf_image_encoder", config, IMAGE_PRE, seed=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(9, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", inputs=images, labels=rng.integers(0, 3, size=9))
    source = parse_site_config({"data": {"kind": "arrays", "path": str(tmp_path / "images.npz")}}, Path("/")).data
    result = extract(model, open_site_data(source, LABELS), cache=FeatureCache(tmp_path / "cache"), settings=SETTINGS)

    ref, head = reference(tmp_path / "pkg", "vit")
    pixels = (images / 255.0 - np.array(IMAGE_PRE["mean"])) / np.array(IMAGE_PRE["std"])
    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        hidden = ref(pixel_values=x).last_hidden_state
        features = pooled(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool), pooling)
        logits = features @ head["head.weight"].T + head["head.bias"]
    np.testing.assert_allclose(result.entry.features(), features.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.entry.logits(), logits.numpy(), rtol=1e-5, atol=1e-5)


def test_every_allowlisted_family_is_tested() -> None:
    assert set(FAMILIES) == set(HF_TEXT_FAMILIES) | set(HF_IMAGE_FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_loads_and_computes_what_transformers_does(tmp_path: Path, family: str) -> None:
    pre = IMAGE_PRE if family in HF_IMAGE_FAMILIES else TEXT_PRE
    model = packed(tmp_path / "pkg", arch_of(family), hf_config(family, pooling="mean", num_source_classes=2), pre)
    assert type(model.module.backbone).__module__.startswith("transformers.models.")
    ref, head = reference(tmp_path / "pkg", family)
    if family in HF_IMAGE_FAMILIES:
        x = torch.randn(3, 3, 16, 16)
        with torch.no_grad():
            hidden = ref(pixel_values=x).last_hidden_state
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
    else:
        x = torch.tensor([[5, 9, 33, 0, 0], [1, 2, 3, 4, 5], [7, 0, 0, 0, 0]])
        mask = x != 0
        with torch.no_grad():
            hidden = ref(input_ids=x, attention_mask=mask.long()).last_hidden_state
    features = pooled(hidden, mask, "mean")
    with torch.inference_mode():
        got = model.module(x)
    torch.testing.assert_close(got["features"], features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["logits"], features @ head["head.weight"].T + head["head.bias"], rtol=1e-5, atol=1e-5)
    assert model.manifest.parameter_count == sum(p.numel() for p in ref.parameters()) + 32 * 2 + 2


def test_seeded_hf_initialisation_is_reproducible_and_float64_builds(tmp_path: Path) -> None:
    a, b, c = (initial_weights("hf_text_encoder", hf_config("bert"), s) for s in (4, 4, 5))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["backbone.embeddings.word_embeddings.weight"], c["backbone.embeddings.word_embeddings.weight"])
    assert not any(k.startswith("backbone.pooler") for k in a)
    model = packed(tmp_path / "pkg", "hf_text_encoder", hf_config("bert", dtype="float64"), TEXT_PRE)
    assert model.module(torch.tensor([[3, 4, 0]]))["features"].dtype == torch.float64


def test_hf_weights_load_only_on_an_exact_match(tmp_path: Path) -> None:
    """A package carrying the pooler (which fedmte does not build) is refused, not partly loaded."""
    config = hf_config("bert")
    good = pack_model(tmp_path / "good", name="b", architecture="hf_text_encoder", config=config, preprocessing=TEXT_PRE,
                      license="MIT", tensors=initial_weights("hf_text_encoder", config, 0), key=KEY)
    weights = initial_weights("hf_text_encoder", config, 0) | {
        "backbone.pooler.dense.weight": torch.zeros(32, 32), "backbone.pooler.dense.bias": torch.zeros(32)}
    data = tensors_to_bytes(weights)
    manifest = good.model_copy(update={"weights_sha256": hashlib.sha256(data).hexdigest(), "weights_bytes": len(data)})
    write_package(tmp_path / "bad", manifest, data, KEY)
    with pytest.raises(UnexpectedTensorError, match="backbone.pooler.dense"):
        load_model(tmp_path / "bad", PINNED)


def test_cli_packs_a_tiny_bert_that_verifies_and_loads(tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(app, ["model", "keygen", str(tmp_path / "k.key")], catch_exceptions=False)
    public = done.output.strip().splitlines()[-1]
    config = hf_config("bert", num_source_classes=4)
    done = runner.invoke(app, [
        "model", "pack", str(tmp_path / "pkg"), "--architecture", "hf_text_encoder", "--config", json.dumps(config),
        "--preprocessing", json.dumps(TEXT_PRE), "--name", "tiny-bert", "--license", "Apache-2.0",
        "--key", str(tmp_path / "k.key"), "--init-seed", "7", "--head-output", "logits",
    ], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["model", "inspect", str(tmp_path / "pkg"), "--public-key", public, "--json"], catch_exceptions=False)
    report = json.loads(done.output)
    assert done.exit_code == 0 and report["verified"], done.output
    assert report["verdict"] == "verified; builds as this site's 'hf_text_encoder' network"
    model = load_model(tmp_path / "pkg", [public])
    assert model.source_head is not None and model.source_head.num_classes == 4 and model.feature_dim == 32
    want = initial_weights("hf_text_encoder", config, 7)
    got = model.module.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# --------------------------------------------------------------------------- Hugging Face: refusals

@pytest.mark.parametrize(
    "architecture, config, pre, message",
    [
        ("hf_text_encoder", {"hf_config": {"model_type": "gpt2", "n_embd": 32}}, TEXT_PRE, "model_type 'gpt2' is not one of"),
        ("hf_text_encoder", hf_config("vit"), TEXT_PRE, "model_type 'vit' is not one of"),
        ("hf_image_encoder", hf_config("bert"), IMAGE_PRE, "model_type 'bert' is not one of"),
        ("hf_text_encoder", {"hf_config": {"hidden_size": 32}}, TEXT_PRE, "model_type None is not one of"),
        ("hf_text_encoder", {"hf_config": {"model_type": "bert", "auto_map": {"AutoModel": "evil.Model"}} | TINY_TEXT},
         TEXT_PRE, r"\['auto_map'\] are refused"),
        ("hf_text_encoder", {"hf_config": {"model_type": "bert", "trust_remote_code": True} | TINY_TEXT},
         TEXT_PRE, r"\['trust_remote_code'\] are refused"),
        ("hf_text_encoder", {"hf_config": {"model_type": "bert", "_attn_implementation": "kernels-community/x"} | TINY_TEXT},
         TEXT_PRE, r"\['_attn_implementation'\] are refused"),
        ("hf_text_encoder", {"hf_config": {"model_type": "bert", "is_decoder": True} | TINY_TEXT}, TEXT_PRE, "only encoders"),
        ("hf_text_encoder", hf_config("bert", pooling="max"), TEXT_PRE, "configuration of 'hf_text_encoder' is invalid"),
        ("hf_text_encoder", {"hf_config": {"model_type": "roberta"} | TINY_TEXT}, TEXT_PRE, "pad_token_id is 1"),
        ("hf_text_encoder", hf_config("bert"), TEXT_PRE | {"vocab_size": 101}, "below 101 but the embedding has 100 rows"),
        ("hf_text_encoder", hf_config("bert", cls_token_id=100), TEXT_PRE, "cls_token_id 100 is not below vocab_size 100"),
        ("hf_text_encoder", hf_config("bert"), TEXT_PRE | {"max_tokens": 25}, "need 25 positions.*max_position_embeddings is 24"),
        ("hf_text_encoder", hf_config("bert", cls_token_id=1), TEXT_PRE | {"max_tokens": 24}, "need 25 positions"),
        ("hf_text_encoder", hf_config("roberta"), TEXT_PRE | {"max_tokens": 24}, "need 25 positions"),
        ("hf_text_encoder", {"hf_config": {"model_type": "bert"} | TINY_TEXT | {"hidden_size": 33}}, TEXT_PRE,
         "transformers cannot build"),
        ("hf_text_encoder", {"hf_config": {"model_type": "bert"} | TINY_TEXT | {"hidden_size": "wide"}}, TEXT_PRE,
         "hf_config is not a valid 'bert' config.json"),
        ("hf_text_encoder", {"hf_config": {"model_type": "bert"} | TINY_TEXT | {"hidden_size": 0}}, TEXT_PRE,
         "hidden_size must be a positive integer"),
        ("hf_image_encoder", {"hf_config": {"model_type": "vit"} | TINY_IMAGE | {"num_channels": -1}}, IMAGE_PRE,
         "num_channels must be a positive integer"),
        ("hf_text_encoder", hf_config("bert"), IMAGE_PRE, "takes text input but the manifest preprocesses image"),
        ("hf_image_encoder", hf_config("vit"), IMAGE_PRE | {"height": 32, "width": 32}, "32x32 images but the 'vit' encoder takes 16x16"),
        ("hf_image_encoder", hf_config("vit"), IMAGE_PRE | {"channels": 1, "mean": [0.5], "std": [0.2]}, "1-channel images"),
        ("hf_image_encoder", hf_config("dinov2"), IMAGE_PRE | {"height": 20}, "not a multiple of the 8x8 patches"),
    ],
)
def test_hf_configs_the_site_cannot_safely_build_are_refused(
    tmp_path: Path, architecture: str, config: dict[str, Any], pre: dict[str, Any], message: str
) -> None:
    with pytest.raises(ArchitectureConfigError, match=message):
        pack_model(tmp_path / "pkg", name="m", architecture=architecture, config=config, preprocessing=pre,
                   license="MIT", tensors={}, key=KEY)
    assert not (tmp_path / "pkg").exists()


def test_position_limits_are_exact_at_the_boundary(tmp_path: Path) -> None:
    """The longest accepted input really runs: 24 positions take 24 BERT tokens, 23 RoBERTa ones."""
    for family, tokens in (("bert", 24), ("roberta", 23)):
        model = packed(tmp_path / family, "hf_text_encoder", hf_config(family), TEXT_PRE | {"max_tokens": tokens})
        out = model.module(torch.full((2, tokens), 7))["features"]
        assert out.shape == (2, 32) and torch.isfinite(out).all()


def test_real_config_json_fields_are_accepted_and_dtype_is_the_sites(tmp_path: Path) -> None:
    """A config.json as saved by transformers carries bookkeeping keys; they change nothing."""
    plain = hf_config("bert")
    saved = {"hf_config": plain["hf_config"] | {"architectures": ["BertForMaskedLM"], "torch_dtype": "float16",
                                                "transformers_version": "4.40.0", "_name_or_path": "somewhere/bert"}}
    a, b = initial_weights("hf_text_encoder", plain, 0), initial_weights("hf_text_encoder", saved, 0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and b[k].dtype == torch.float32 for k in a)


def test_without_transformers_the_hf_ids_name_their_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = hf_config("bert")
    pack_model(tmp_path / "pkg", name="b", architecture="hf_text_encoder", config=config, preprocessing=TEXT_PRE,
               license="MIT", tensors=initial_weights("hf_text_encoder", config, 0), key=KEY)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails as if absent
    for architecture in ("hf_text_encoder", "hf_image_encoder"):
        with pytest.raises(OptionalDependencyError, match=r"optional transformers library.*pip install 'fedmte\[hf\]'"):
            lookup(architecture)
    with pytest.raises(OptionalDependencyError, match=r"fedmte\[hf\]"):
        load_model(tmp_path / "pkg", PINNED)
    assert "cannot build it: OptionalDependencyError" in inspect_model(tmp_path / "pkg", PINNED).verdict


def test_the_site_agent_imports_without_the_optional_libraries() -> None:
    code = ("import sys\n"
            "for name in ('transformers', 'torchvision', 'timm'): sys.modules[name] = None\n"
            "import fedmte.client.architectures, fedmte.client.architectures_extras, fedmte.client.extract\n"
            "from fedmte.client.architectures import initial_weights\n"
            "initial_weights('mlp', {'input_dim': 2, 'hidden_dims': [3]}, 0)\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# --------------------------------------------------------------------------- torchvision and timm

IMAGE32 = {"kind": "image", "height": 32, "width": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - absent, or built for another torch
        return False
    return True


def _assert_refused_naming_the_extra(tmp_path: Path, architecture: str, config: dict[str, Any], extra: str) -> None:
    """Without its library the id is refused everywhere, naming the extra; nothing is written."""
    message = rf"optional {architecture} library.*pip install 'fedmte\[{extra}\]'"
    with pytest.raises(OptionalDependencyError, match=message) as raised:
        initial_weights(architecture, config, 0)
    assert isinstance(raised.value, UnknownArchitectureError)
    with pytest.raises(OptionalDependencyError, match=message):
        pack_model(tmp_path / "pkg", name="m", architecture=architecture, config=config, preprocessing=IMAGE32,
                   license="MIT", tensors={}, key=KEY)
    assert not (tmp_path / "pkg").exists()
    data = tensors_to_bytes({"w": torch.zeros(2)})
    manifest = ModelManifest(name="m", architecture=architecture, config=config, preprocessing=IMAGE32, license="MIT",
                             parameter_count=2, weights_sha256=hashlib.sha256(data).hexdigest(), weights_bytes=len(data))
    write_package(tmp_path / "signed", manifest, data, KEY)
    with pytest.raises(OptionalDependencyError, match=message):
        load_model(tmp_path / "signed", PINNED)
    assert "cannot build it: OptionalDependencyError" in inspect_model(tmp_path / "signed", PINNED).verdict


def _extract_images(tmp_path: Path, model: LoadedModel, images: np.ndarray) -> Any:
    np.savez(tmp_path / "images.npz", inputs=images, labels=np.arange(len(images)) % 3)
    source = parse_site_config({"data": {"kind": "arrays", "path": str(tmp_path / "images.npz")}}, Path("/")).data
    return extract(model, open_site_data(source, LABELS), cache=FeatureCache(tmp_path / "cache"), settings=SETTINGS).entry


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((images / 255.0 - 0.5) / 0.25).transpose(0, 3, 1, 2).astype(np.float32))


def test_torchvision_family_runs_torchvision_or_names_its_extra(tmp_path: Path) -> None:
    config = {"model": "resnet18", "num_source_classes": 3}
    if not _imports("torchvision"):
        _assert_refused_naming_the_extra(tmp_path, "torchvision", config, "torchvision")
        return
    import torchvision

    model = packed(tmp_path / "pkg", "torchvision", config, IMAGE32, seed=3)
    images = np.random.default_rng(1).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    entry = _extract_images(tmp_path, model, images)
    tensors = load_file(tmp_path / "pkg" / "weights.safetensors")
    ref = torchvision.models.resnet18(weights=None, num_classes=3)
    ref.load_state_dict({k.removeprefix("backbone.").replace("head.", "fc.", 1) if k.startswith("head.") else
                         k.removeprefix("backbone."): v for k, v in tensors.items()})
    ref.eval()
    with torch.no_grad():
        logits = ref(_pixels(images))
        ref.fc = torch.nn.Identity()
        features = ref(_pixels(images))
    np.testing.assert_allclose(entry.features(), features.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(entry.logits(), logits.numpy(), rtol=1e-4, atol=1e-4)


def test_timm_family_runs_timm_or_names_its_extra(tmp_path: Path) -> None:
    config = {"model": "resnet18", "num_source_classes": 3}
    if not _imports("timm"):
        _assert_refused_naming_the_extra(tmp_path, "timm", config, "timm")
        return
    import timm

    model = packed(tmp_path / "pkg", "timm", config, IMAGE32, seed=3)
    images = np.random.default_rng(1).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    entry = _extract_images(tmp_path, model, images)
    tensors = load_file(tmp_path / "pkg" / "weights.safetensors")
    ref = timm.create_model("resnet18", pretrained=False, num_classes=3)
    ref.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items()})
    ref.eval()
    with torch.no_grad():
        logits = ref(_pixels(images))
        features = ref.forward_head(ref.forward_features(_pixels(images)), pre_logits=True)
    np.testing.assert_allclose(entry.features(), features.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(entry.logits(), logits.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config_model, name", [(TorchvisionConfig, "alexnet"), (TimmConfig, "hf-hub:someone/model")])
def test_library_families_build_only_allowlisted_names(config_model: type, name: str) -> None:
    with pytest.raises(ValueError, match=f"model '{name}' is not allowed at this site"):
        config_model.model_validate({"model": name})
    assert set(TORCHVISION_MODELS) >= {"resnet18", "resnet50", "mobilenet_v3_small", "vit_b_16"}
    assert set(TIMM_MODELS) >= {"resnet18", "vit_tiny_patch16_224"}
