"""Optional architecture families: networks built by libraries a site installs with a pip extra.

Like the built-in registry (:mod:`fedmte.client.architectures`), each family is a literal
allowlist the coordinator chooses from and cannot add to; the site's own installed library
builds the network, with pretrained downloads off and no remote code, and the package's
safetensors are copied in only on an exact key, shape and dtype match. The libraries are
imported only when a family is requested, so the site agent runs without them; a family whose
library does not import is refused with
:class:`~fedmte.client.errors.OptionalDependencyError` naming the extra to install.

``hf_text_encoder`` / ``hf_image_encoder`` (``pip install 'fedmte[hf]'``)
    A Hugging Face ``transformers`` encoder built from a ``config.json`` dict
    (``hf_config``) with ``AutoConfig.for_model`` and ``AutoModel.from_config``: never
    ``from_pretrained``, no hub id or path, nothing downloaded, ``trust_remote_code`` off.
    ``model_type`` must be one of the encoder families transformers itself ships
    (:data:`HF_TEXT_FAMILIES`, :data:`HF_IMAGE_FAMILIES`); ``auto_map``,
    ``trust_remote_code``, quantisation and attention/expert kernel choices are refused (the
    first two name remote code, the last two can pull code from the hub). The optional pooler
    layer is left out. Text encoders take the site's token ids
    (:class:`~fedmte.protocol.manifest.TextPreprocessing`: 0 pads, so ``pad_token_id`` must be
    0 and the attention mask is ``ids != 0``; ``cls_token_id`` optionally prepends a
    classification token); image encoders take the preprocessed (C, H, W) pixels.
    Outputs ``features`` -- the first token's last hidden state (``pooling = "cls"``) or the
    mean of the last hidden states over the attended tokens (``"mean"``; every token for
    images; an empty text gives zeros) -- and, with ``num_source_classes``, ``logits`` =
    Linear(features). Weight keys: the transformers model's own ``state_dict`` keys under
    ``backbone.`` (without ``pooler.*``), plus ``head.weight`` and ``head.bias``.
    Before one is built, its size is bounded from the ``config.json`` numbers (embeddings,
    four attention projections and two feed-forward matrices per distinct layer, depth,
    widths) against the site's ``[limits]``, then counted exactly on the meta device.
``torchvision`` (``pip install 'fedmte[torchvision]'``)
    ``torchvision.models.<model>(weights=None, num_classes=...)`` for a name in
    :data:`TORCHVISION_MODELS`. Its final Linear layer is replaced by Identity, so
    ``features`` is that layer's input (the penultimate layer); with
    ``num_source_classes`` the original layer is the source head (``logits``). Weight keys:
    torchvision's under ``backbone.``, the final layer's as ``head.weight``/``head.bias``.
``timm`` (``pip install 'fedmte[timm]'``)
    ``timm.create_model(model, pretrained=False, num_classes=..., in_chans=...)`` for a name
    in :data:`TIMM_MODELS`; ``features`` = ``forward_head(forward_features(x),
    pre_logits=True)`` and, with ``num_source_classes``, ``logits`` =
    ``forward_head(forward_features(x))``. Weight keys: timm's under ``backbone.``.

For torchvision and timm the backbone is fixed by the allowlist; what a configuration adds,
the source head (``num_source_classes`` x width), is checked against the site's ``[limits]``.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, JsonValue, field_validator
from torch import nn

from fedmte.client.architecture_spec import TORCH_DTYPES, Architecture, ArchitectureConfig, source_head, with_logits
from fedmte.client.errors import ArchitectureConfigError, OptionalDependencyError
from fedmte.client.limits import ModelSize, SizeCounter
from fedmte.protocol.manifest import ImagePreprocessing, TextPreprocessing


def _brief(error: BaseException) -> str:
    """An exception's type and first line, for a one-line error message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def import_optional(module: str, extra: str, architecture: str) -> ModuleType:
    """Import an optional library, or say which pip extra installs it."""
    try:
        return importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - absent, or built for another torch (RuntimeError, OSError)
        raise OptionalDependencyError(
            f"architecture {architecture!r} is built by the optional {module} library, which this site cannot "
            f"import ({_brief(error)}); install it with pip install 'fedmte[{extra}]'"
        ) from None


# --------------------------------------------------------------------------- Hugging Face encoders

HF_TEXT_FAMILIES = ("albert", "bert", "deberta-v2", "distilbert", "electra", "roberta", "xlm-roberta")
HF_IMAGE_FAMILIES = ("deit", "dinov2", "vit")
HF_POSITION_OFFSET = {"roberta": 1, "xlm-roberta": 1}
"""Families whose position ids start at ``pad_token_id + 1``: one position fewer for tokens."""
HF_ANY_IMAGE_SIZE = ("dinov2",)
"""Families that interpolate their position embeddings to any multiple of the patch size."""
HF_REFUSED_KEYS = frozenset({
    "auto_map", "trust_remote_code", "custom_pipelines", "quantization_config",
    "attn_implementation", "_attn_implementation", "_attn_implementation_internal",
    "experts_implementation", "_experts_implementation",
})


class _HFConfig(ArchitectureConfig):
    families: ClassVar[tuple[str, ...]]
    architecture: ClassVar[str]

    hf_config: dict[str, JsonValue] = Field(description="a Hugging Face config.json, as a JSON object")
    pooling: Literal["cls", "mean"] = "cls"

    @field_validator("hf_config")
    @classmethod
    def _allowed(cls, value: dict[str, JsonValue]) -> dict[str, JsonValue]:
        model_type = value.get("model_type")
        if model_type not in cls.families:
            raise ValueError(
                f"hf_config model_type {model_type!r} is not one of the encoder families {cls.architecture!r} "
                f"builds: {', '.join(cls.families)}"
            )
        refused = sorted(HF_REFUSED_KEYS & value.keys())
        if refused:
            raise ValueError(
                f"hf_config keys {refused} are refused: remote code, quantisation and kernel choices are the "
                "site's, not the package's; remove them"
            )
        for flag in ("is_decoder", "add_cross_attention"):
            if value.get(flag):
                raise ValueError(f"hf_config sets {flag}; only encoders are built")
        return value


class HFTextConfig(_HFConfig):
    families = HF_TEXT_FAMILIES
    architecture = "hf_text_encoder"

    cls_token_id: int | None = Field(default=None, ge=1, le=16_777_216)


class HFImageConfig(_HFConfig):
    families = HF_IMAGE_FAMILIES
    architecture = "hf_image_encoder"


def _transformers(architecture: str) -> ModuleType:
    return import_optional("transformers", "hf", architecture)


def hf_config_object(config: _HFConfig) -> Any:
    """The transformers config object of ``config.hf_config`` (plain data, no download)."""
    transformers = _transformers(config.architecture)
    fields = copy.deepcopy(config.hf_config)
    model_type = fields.pop("model_type")
    try:
        hf = transformers.AutoConfig.for_model(model_type, **fields)
    except Exception as error:  # noqa: BLE001 - transformers' validation of untrusted data raises many types
        raise ArchitectureConfigError(f"hf_config is not a valid {model_type!r} config.json: {_brief(error)}") from None
    for name in ("hidden_size",) + (("vocab_size",) if isinstance(config, HFTextConfig) else ("num_channels",)):
        value = getattr(hf, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArchitectureConfigError(f"hf_config {name} must be a positive integer, got {value!r}")
    return hf


def _hf_dims(config: _HFConfig) -> dict[str, int]:
    return with_logits({"features": int(hf_config_object(config).hidden_size)}, config)


HF_ABSOLUTE_POSITIONS = ("albert", "bert", "distilbert", "electra", "roberta", "xlm-roberta")
"""Text families whose embeddings hold a (max_position_embeddings, width) table."""


def _positive(hf: Any, name: str, default: int = 0) -> int:
    value = getattr(hf, name, default)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _hf_size(config: _HFConfig, pre: Any = None) -> ModelSize:
    """A lower bound of what a Hugging Face encoder allocates, from its config.json numbers:
    the token (and absolute position) embeddings or the patch embedding, and per distinct
    layer the four attention projections and the two feed-forward matrices (ALBERT shares
    its layers: num_hidden_groups x inner_group_num distinct ones). Checked against the
    site's limits before the exact count, which builds the encoder on the meta device."""
    hf = hf_config_object(config)
    hidden = _positive(hf, "hidden_size")
    layers = _positive(hf, "num_hidden_layers")
    inner = _positive(hf, "intermediate_size") or _positive(hf, "hidden_dim")
    ratio = getattr(hf, "mlp_ratio", None)
    if not inner and isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0:
        inner = int(hidden * ratio)
    width = _positive(hf, "embedding_size") or hidden
    count = SizeCounter()
    if isinstance(config, HFTextConfig):
        count.tensor(_positive(hf, "vocab_size"), width)
        if hf.model_type in HF_ABSOLUTE_POSITIONS:
            count.tensor(_positive(hf, "max_position_embeddings"), width)
    else:
        try:
            patch = _pair(getattr(hf, "patch_size", 1))
        except (TypeError, ValueError, IndexError):
            patch = (1, 1)
        count.tensor(hidden, _positive(hf, "num_channels", 1), max(patch[0], 1), max(patch[1], 1))
    distinct = layers
    if hf.model_type == "albert":
        distinct = min(layers, _positive(hf, "num_hidden_groups", 1) * _positive(hf, "inner_group_num", 1))
    count.tensor(hidden, hidden, copies=4 * distinct)
    count.tensor(inner, hidden, copies=2 * distinct)
    count.layers = layers
    count.widest = max(hidden, inner, width)
    if config.num_source_classes:
        count.linear(hidden, config.num_source_classes)
    return count.size(activations=False, exact=False)


def _check_hf_text(config: HFTextConfig, pre: TextPreprocessing) -> None:
    hf = hf_config_object(config)
    if hf.pad_token_id != 0:
        raise ArchitectureConfigError(
            f"hf_config pad_token_id is {hf.pad_token_id!r}, but the site pads token ids with 0; "
            'set "pad_token_id": 0 (and train with 0 as padding)'
        )
    if pre.vocab_size > hf.vocab_size:
        raise ArchitectureConfigError(
            f"preprocessing gives token ids below {pre.vocab_size} but the embedding has {hf.vocab_size} rows"
        )
    if config.cls_token_id is not None and config.cls_token_id >= hf.vocab_size:
        raise ArchitectureConfigError(f"cls_token_id {config.cls_token_id} is not below vocab_size {hf.vocab_size}")
    limit = getattr(hf, "max_position_embeddings", None)
    need = pre.max_tokens + (config.cls_token_id is not None) + HF_POSITION_OFFSET.get(hf.model_type, 0)
    if isinstance(limit, int) and need > limit:
        raise ArchitectureConfigError(
            f"{pre.max_tokens} tokens need {need} positions in a {hf.model_type!r} encoder but max_position_embeddings "
            f"is {limit}; lower max_tokens in the preprocessing"
        )


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _check_hf_image(config: HFImageConfig, pre: ImagePreprocessing) -> None:
    hf = hf_config_object(config)
    if hf.num_channels != pre.channels:
        raise ArchitectureConfigError(
            f"preprocessing gives {pre.channels}-channel images but the encoder takes {hf.num_channels}"
        )
    size = (pre.height, pre.width)
    if hf.model_type in HF_ANY_IMAGE_SIZE:
        patch = _pair(hf.patch_size)
        if size[0] % patch[0] or size[1] % patch[1]:
            raise ArchitectureConfigError(f"images of {size[0]}x{size[1]} are not a multiple of the {patch[0]}x{patch[1]} patches")
    elif size != _pair(hf.image_size):
        want = _pair(hf.image_size)
        raise ArchitectureConfigError(
            f"preprocessing gives {size[0]}x{size[1]} images but the {hf.model_type!r} encoder takes {want[0]}x{want[1]}"
        )


class _HFEncoder(nn.Module):
    def __init__(self, config: _HFConfig) -> None:
        super().__init__()
        transformers = _transformers(config.architecture)
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        hf = hf_config_object(config)
        model_class = MODEL_MAPPING[type(hf)]
        if not model_class.__module__.startswith("transformers.models."):
            raise ArchitectureConfigError(f"{hf.model_type!r} maps to {model_class.__module__}, not to transformers' own code")
        pooler = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters else {}
        try:
            backbone = transformers.AutoModel.from_config(
                hf, trust_remote_code=False, dtype=TORCH_DTYPES[config.dtype], **pooler
            )
        except Exception as error:  # noqa: BLE001 - as above: a config value the model code cannot use
            raise ArchitectureConfigError(f"transformers cannot build this {hf.model_type!r} config: {_brief(error)}") from None
        if type(backbone) is not model_class:
            raise ArchitectureConfigError(f"transformers built {type(backbone).__name__}, not {model_class.__name__}")
        self.backbone = backbone
        self.pooling = config.pooling
        self.head = source_head(int(hf.hidden_size), config.num_source_classes)

    def _outputs(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.pooling == "cls":
            features = hidden[:, 0]
        elif mask is None:
            features = hidden.mean(dim=1)
        else:
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            features = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        out = {"features": features}
        if self.head is not None:
            out["logits"] = self.head(features)
        return out


class HFTextEncoder(_HFEncoder):
    def __init__(self, config: HFTextConfig) -> None:
        super().__init__(config)
        self.cls_token_id = config.cls_token_id

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = tokens != 0
        if self.cls_token_id is not None:
            tokens = torch.cat([torch.full_like(tokens[:, :1], self.cls_token_id), tokens], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        hidden = self.backbone(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        return self._outputs(hidden, mask)


class HFImageEncoder(_HFEncoder):
    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._outputs(self.backbone(pixel_values=pixels).last_hidden_state, None)


# --------------------------------------------------------------------------- torchvision and timm

@dataclass(frozen=True)
class Backbone:
    """An allowlisted image network: its feature width, the one input side it takes (vision
    transformers; None: any) and, for torchvision, the path of its final Linear layer."""

    width: int
    side: int | None = None
    head: str = ""


TORCHVISION_MODELS: dict[str, Backbone] = {
    "resnet18": Backbone(512, head="fc"),
    "resnet34": Backbone(512, head="fc"),
    "resnet50": Backbone(2048, head="fc"),
    "resnet101": Backbone(2048, head="fc"),
    "mobilenet_v3_small": Backbone(1024, head="classifier.3"),
    "mobilenet_v3_large": Backbone(1280, head="classifier.3"),
    "efficientnet_b0": Backbone(1280, head="classifier.1"),
    "convnext_tiny": Backbone(768, head="classifier.2"),
    "densenet121": Backbone(1024, head="classifier"),
    "swin_t": Backbone(768, head="head"),
    "vit_b_16": Backbone(768, side=224, head="heads.head"),
    "vit_b_32": Backbone(768, side=224, head="heads.head"),
}

TIMM_MODELS: dict[str, Backbone] = {
    "resnet18": Backbone(512),
    "resnet50": Backbone(2048),
    "efficientnet_b0": Backbone(1280),
    "mobilenetv3_small_100": Backbone(1024),
    "mobilenetv3_large_100": Backbone(1280),
    "convnext_tiny": Backbone(768),
    "vit_tiny_patch16_224": Backbone(192, side=224),
    "vit_small_patch16_224": Backbone(384, side=224),
    "vit_base_patch16_224": Backbone(768, side=224),
    "deit_tiny_patch16_224": Backbone(192, side=224),
    "deit_small_patch16_224": Backbone(384, side=224),
}


class _LibraryConfig(ArchitectureConfig):
    models: ClassVar[dict[str, Backbone]]
    library: ClassVar[str]

    model: str

    @field_validator("model")
    @classmethod
    def _allowed(cls, value: str) -> str:
        if value not in cls.models:
            raise ValueError(f"{cls.library} model {value!r} is not allowed at this site; it builds: {', '.join(sorted(cls.models))}")
        return value

    @property
    def in_channels(self) -> int:
        return 3


class TorchvisionConfig(_LibraryConfig):
    models = TORCHVISION_MODELS
    library = "torchvision"


class TimmConfig(_LibraryConfig):
    models = TIMM_MODELS
    library = "timm"

    in_chans: Literal[1, 3] = 3

    @property
    def in_channels(self) -> int:
        return self.in_chans


def _library_dims(config: _LibraryConfig) -> dict[str, int]:
    return with_logits({"features": config.models[config.model].width}, config)


def _library_size(config: _LibraryConfig, pre: Any = None) -> ModelSize:
    """What the configuration adds to an allowlisted backbone: its source head (the
    backbone itself is fixed by the allowlist, so only a lower bound is counted)."""
    count = SizeCounter()
    width = config.models[config.model].width
    count.layer(width)
    if config.num_source_classes:
        count.linear(width, config.num_source_classes)
    return count.size(activations=False, exact=False)


def _check_library_input(config: _LibraryConfig, pre: ImagePreprocessing) -> None:
    if pre.channels != config.in_channels:
        raise ArchitectureConfigError(
            f"preprocessing gives {pre.channels}-channel images but {config.library} {config.model} takes {config.in_channels}"
        )
    side = config.models[config.model].side
    if side is not None and (pre.height, pre.width) != (side, side):
        raise ArchitectureConfigError(
            f"preprocessing gives {pre.height}x{pre.width} images but {config.library} {config.model} takes {side}x{side}"
        )


def _width_mismatch(config: _LibraryConfig, width: Any) -> ArchitectureConfigError:
    return ArchitectureConfigError(
        f"this site's {config.library} builds {config.model} with {width!r}-wide features, not the allowlist's "
        f"{config.models[config.model].width}; its {config.library} version does not fit this fedmte"
    )


class TorchvisionNet(nn.Module):
    def __init__(self, config: TorchvisionConfig) -> None:
        super().__init__()
        torchvision = import_optional("torchvision", "torchvision", "torchvision")
        spec = TORCHVISION_MODELS[config.model]
        builder = getattr(torchvision.models, config.model)
        net = builder(weights=None, num_classes=config.num_source_classes or 1000)
        head = net.get_submodule(spec.head)
        if not isinstance(head, nn.Linear) or head.in_features != spec.width:
            raise _width_mismatch(config, getattr(head, "in_features", type(head).__name__))
        parent, _, leaf = spec.head.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
        self.backbone = net
        self.head = head if config.num_source_classes else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        out = {"features": features}
        if self.head is not None:
            out["logits"] = self.head(features)
        return out


class TimmNet(nn.Module):
    def __init__(self, config: TimmConfig) -> None:
        super().__init__()
        timm = import_optional("timm", "timm", "timm")
        net = timm.create_model(
            config.model, pretrained=False, num_classes=config.num_source_classes, in_chans=config.in_chans
        )
        width = getattr(net, "head_hidden_size", None) or net.num_features
        if width != TIMM_MODELS[config.model].width:
            raise _width_mismatch(config, width)
        self.backbone = net
        self.has_head = config.num_source_classes > 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_map = self.backbone.forward_features(x)
        out = {"features": self.backbone.forward_head(feature_map, pre_logits=True)}
        if self.has_head:
            out["logits"] = self.backbone.forward_head(feature_map)
        return out


EXTRA_ARCHITECTURES: dict[str, Architecture] = {
    "hf_text_encoder": Architecture(
        config_model=HFTextConfig,
        build=HFTextEncoder,
        input_kind="text",
        output_dims=_hf_dims,
        summary="Hugging Face transformers text encoder built from a config.json",
        check_input=_check_hf_text,
        requires=("transformers", "hf"),
        size=_hf_size,
        count_on_meta=True,
    ),
    "hf_image_encoder": Architecture(
        config_model=HFImageConfig,
        build=HFImageEncoder,
        input_kind="image",
        output_dims=_hf_dims,
        summary="Hugging Face transformers vision encoder built from a config.json",
        check_input=_check_hf_image,
        requires=("transformers", "hf"),
        size=_hf_size,
        count_on_meta=True,
    ),
    "torchvision": Architecture(
        config_model=TorchvisionConfig,
        build=TorchvisionNet,
        input_kind="image",
        output_dims=_library_dims,
        summary="torchvision classification network, penultimate-layer features",
        check_input=_check_library_input,
        requires=("torchvision", "torchvision"),
        size=_library_size,
        meta_build=False,
    ),
    "timm": Architecture(
        config_model=TimmConfig,
        build=TimmNet,
        input_kind="image",
        output_dims=_library_dims,
        summary="timm image network, pre-logits features",
        check_input=_check_library_input,
        requires=("timm", "timm"),
        size=_library_size,
        meta_build=False,
    ),
}
