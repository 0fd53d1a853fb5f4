"""The site's architecture registry: networks built from code the site installed.

A package names an architecture id and a configuration; the site looks the id up in the
literal dict :data:`ARCHITECTURES`, validates the configuration with that architecture's
pydantic model, builds the network with its own code, and copies the package's tensors in
only if every key, shape and dtype matches exactly (no silent casts, no partial loads).
The coordinator can choose among these networks and their sizes, never add to them.

Every network's ``forward`` returns a dict of named outputs, so the manifest can say which
one is the feature (``feature_output``) and which one holds the source head's logits
(``source_head.output``):

``mlp`` (input: vector)
    Linear + activation per hidden width. Outputs ``features`` (the last hidden layer) and,
    with a head, ``logits``.
``cnn`` (input: image)
    Conv3x3 [+ BatchNorm] + ReLU + 2x2 max-pool per block, then global average pooling
    (``pooled``), then optionally Linear + ReLU to ``feature_dim`` (``features``; equal to
    ``pooled`` without it), then an optional head (``logits``).
``text_bag`` (input: text token ids, 0 = padding)
    Mean of token embeddings ignoring padding (``embedding``), then Linear + tanh
    (``features``), then an optional head (``logits``).

Before anything is built, :func:`resolve` computes from the configuration alone what the
network would allocate (:func:`mlp_size`, :func:`cnn_size`, :func:`text_bag_size`: exact
parameter and buffer counts, the largest tensor, the widest layer, the depth and, with the
preprocessing, the largest activation of a row) and refuses anything above the site's
``[limits]`` (:mod:`fedmte.client.limits`) with a
:class:`~fedmte.client.limits.LimitExceededError` naming the limit; :func:`load_verified`
then compares the package's tensors with the network built on PyTorch's ``meta`` device (no
storage), so weights that do not fill the network exactly are refused before it is built.

Optional families live in :mod:`fedmte.client.architectures_extras`, each built by a library
the site installs with a pip extra, with pretrained downloads off and no remote code:
``hf_text_encoder`` / ``hf_image_encoder`` (Hugging Face ``transformers`` encoders from a
``config.json``; ``fedmte[hf]``), ``torchvision`` (``fedmte[torchvision]``) and ``timm``
(``fedmte[timm]``). Where the library does not import, their ids are refused with
:class:`~fedmte.client.errors.OptionalDependencyError` naming the extra; any other id with
:class:`~fedmte.client.errors.UnknownArchitectureError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError
from torch import nn

from fedmte.client.architecture_spec import (
    TORCH_DTYPES,
    Architecture,
    ArchitectureConfig,
    InputKind,
    source_head,
    with_logits,
)
from fedmte.client.architectures_extras import EXTRA_ARCHITECTURES, import_optional
from fedmte.client.errors import (
    ArchitectureConfigError,
    MissingTensorError,
    TensorDtypeError,
    TensorShapeError,
    UnexpectedTensorError,
    UnknownArchitectureError,
)
from fedmte.client.limits import DEFAULT_LIMITS, ModelSize, SiteLimits, SizeCounter, check_model_size
from fedmte.client.packages import (
    PackageReport,
    VerifiedPackage,
    inspect_package,
    tensors_to_bytes,
    verify_package,
    write_package,
)
from fedmte.client.preprocess import check_input_size
from fedmte.protocol.errors import FedmteError
from fedmte.protocol.manifest import ImagePreprocessing, ModelManifest, Preprocessing, SourceHead, TextPreprocessing

MAX_WIDTH = 65_536


class MLPConfig(ArchitectureConfig):
    input_dim: int = Field(ge=1, le=1_000_000)
    hidden_dims: tuple[int, ...] = Field(min_length=1, max_length=32)
    activation: Literal["relu", "gelu", "tanh"] = "relu"


class CNNConfig(ArchitectureConfig):
    in_channels: Literal[1, 3]
    channels: tuple[int, ...] = Field(min_length=1, max_length=16)
    batch_norm: bool = False
    feature_dim: int | None = Field(default=None, ge=1, le=MAX_WIDTH)


class TextBagConfig(ArchitectureConfig):
    vocab_size: int = Field(ge=2, le=16_777_216)
    embed_dim: int = Field(ge=1, le=MAX_WIDTH)
    feature_dim: int = Field(ge=1, le=MAX_WIDTH)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.input_dim
        for hidden in config.hidden_dims:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[config.activation]()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = source_head(width, config.num_source_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        out = {"features": features}
        if self.head is not None:
            out["logits"] = self.head(features)
        return out


class CNN(nn.Module):
    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.in_channels
        for channels in config.channels:
            layers.append(nn.Conv2d(width, channels, kernel_size=3, padding=1))
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(channels))
            layers += [nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            width = channels
        self.body = nn.Sequential(*layers)
        self.project = None
        if config.feature_dim is not None:
            self.project = nn.Sequential(nn.Linear(width, config.feature_dim), nn.ReLU())
            width = config.feature_dim
        self.head = source_head(width, config.num_source_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.body(x).mean(dim=(2, 3))
        features = pooled if self.project is None else self.project(pooled)
        out = {"pooled": pooled, "features": features}
        if self.head is not None:
            out["logits"] = self.head(features)
        return out


class TextBag(nn.Module):
    def __init__(self, config: TextBagConfig) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(config.vocab_size, config.embed_dim, mode="mean", padding_idx=0)
        self.project = nn.Linear(config.embed_dim, config.feature_dim)
        self.head = source_head(config.feature_dim, config.num_source_classes)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.embedding(tokens)
        features = torch.tanh(self.project(embedding))
        out = {"embedding": embedding, "features": features}
        if self.head is not None:
            out["logits"] = self.head(features)
        return out


def _head(count: SizeCounter, width: int, classes: int) -> None:
    if classes:
        count.linear(width, classes)


def mlp_size(config: MLPConfig, pre: Preprocessing | None = None) -> ModelSize:
    """Exactly what :class:`MLP` allocates (Linear weight and bias per layer, then the head)."""
    count = SizeCounter()
    width = config.input_dim
    for hidden in config.hidden_dims:
        count.linear(width, hidden)
        count.elementwise(hidden)
        width = hidden
    _head(count, width, config.num_source_classes)
    return count.size(activations=pre is not None)


def cnn_size(config: CNNConfig, pre: Preprocessing | None = None) -> ModelSize:
    """Exactly what :class:`CNN` allocates; with image preprocessing, also the largest
    activation of one row (a block's input and output at its resolution)."""
    count = SizeCounter()
    image = isinstance(pre, ImagePreprocessing)
    height, width_px = (pre.height, pre.width) if image else (1, 1)
    width = config.in_channels
    for channels in config.channels:
        pixels = height * width_px
        count.tensor(channels, width, 3, 3)
        count.tensor(channels)
        count.layer(channels, (width + channels) * pixels)
        if config.batch_norm:
            count.tensor(channels)
            count.tensor(channels)
            count.tensor(channels, buffer=True)
            count.tensor(channels, buffer=True)
            count.tensor(buffer=True)  # num_batches_tracked
            count.elementwise(channels * pixels)
        count.elementwise(channels * pixels)  # ReLU
        height, width_px = -(-height // 2), -(-width_px // 2)  # 2x2 max-pool, ceil_mode
        count.in_flight(channels * pixels + channels * height * width_px)
        width = channels
    if config.feature_dim is not None:
        count.linear(width, config.feature_dim)
        count.elementwise(config.feature_dim)
        width = config.feature_dim
    _head(count, width, config.num_source_classes)
    return count.size(activations=image)


def text_bag_size(config: TextBagConfig, pre: Preprocessing | None = None) -> ModelSize:
    """Exactly what :class:`TextBag` allocates (the embedding's vocabulary rows are a
    tensor, not a layer width); with text preprocessing, its activations per row."""
    count = SizeCounter()
    tokens = pre.max_tokens if isinstance(pre, TextPreprocessing) else 0
    count.tensor(config.vocab_size, config.embed_dim)
    count.layer(config.embed_dim, 2 * tokens + config.embed_dim)  # ids, their bag offsets, the mean
    count.linear(config.embed_dim, config.feature_dim)
    count.elementwise(config.feature_dim)
    _head(count, config.feature_dim, config.num_source_classes)
    return count.size(activations=isinstance(pre, TextPreprocessing))


ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture(
        config_model=MLPConfig,
        build=MLP,
        input_kind="vector",
        output_dims=lambda c: with_logits({"features": c.hidden_dims[-1]}, c),
        summary="multilayer perceptron on a feature vector",
        size=mlp_size,
    ),
    "cnn": Architecture(
        config_model=CNNConfig,
        build=CNN,
        input_kind="image",
        output_dims=lambda c: with_logits(
            {"pooled": c.channels[-1], "features": c.feature_dim or c.channels[-1]}, c
        ),
        summary="small convolutional network on images",
        size=cnn_size,
    ),
    "text_bag": Architecture(
        config_model=TextBagConfig,
        build=TextBag,
        input_kind="text",
        output_dims=lambda c: with_logits({"embedding": c.embed_dim, "features": c.feature_dim}, c),
        summary="embedding bag over byte or hashed-word tokens",
        size=text_bag_size,
    ),
}


def lookup(architecture: str) -> Architecture:
    """The registry entry of an id; an optional family only if its library imports."""
    arch = ARCHITECTURES.get(architecture) or EXTRA_ARCHITECTURES.get(architecture)
    if arch is None:
        raise UnknownArchitectureError(
            f"architecture {architecture!r} is not installed at this site; it has: {', '.join(sorted(ARCHITECTURES))} "
            f"(and, with their pip extras, {', '.join(sorted(EXTRA_ARCHITECTURES))})"
        )
    if arch.requires is not None:
        import_optional(*arch.requires, architecture=architecture)
    return arch


def _input_matches(manifest: ModelManifest, config: Any) -> None:
    pre = manifest.preprocessing
    if isinstance(config, MLPConfig) and pre.dim != config.input_dim:
        raise ArchitectureConfigError(f"preprocessing gives {pre.dim}-wide vectors but the MLP takes {config.input_dim}")
    if isinstance(config, CNNConfig) and pre.channels != config.in_channels:
        raise ArchitectureConfigError(
            f"preprocessing gives {pre.channels}-channel images but the CNN takes {config.in_channels}"
        )
    if isinstance(config, TextBagConfig) and pre.vocab_size != config.vocab_size:
        raise ArchitectureConfigError(
            f"preprocessing gives token ids below {pre.vocab_size} but the embedding has {config.vocab_size} rows"
        )


def _checked_size(arch: Architecture, config: Any, pre: Preprocessing | None, limits: SiteLimits,
                  batch_size: int | None, what: str) -> ModelSize | None:
    """The network's size from its configuration, refused above the site's limits before
    anything is built (a family counted on the meta device is bounded arithmetically first)."""
    size = arch.size(config, pre) if arch.size is not None else None
    if size is not None:
        check_model_size(limits, size, what)
        if arch.count_on_meta:
            size = meta_size(arch, config, size)
            check_model_size(limits, size, what)
    if pre is not None:
        itemsize = TORCH_DTYPES[config.dtype].itemsize
        check_input_size(pre, limits, batch_size, float_itemsize=itemsize,
                         activations=None if size is None else size.activations)
    return size


def _meta_module(arch: Architecture, config: Any) -> nn.Module:
    """The network on PyTorch's meta device: every shape and dtype, no storage."""
    with torch.device("meta"):
        return arch.build(config).to(TORCH_DTYPES[config.dtype])


def meta_size(arch: Architecture, config: Any, bound: ModelSize) -> ModelSize:
    """The exact tensor counts of a network built on the meta device (after ``bound``, its
    arithmetic lower bound, has passed the site's limits)."""
    module = _meta_module(arch, config)
    parameters = parameter_count(module)
    state = module.state_dict()
    elements = sum(t.numel() for t in state.values())
    return ModelSize(parameters=parameters, buffers=elements - parameters,
                     largest_tensor=max((t.numel() for t in state.values()), default=0),
                     widest_layer=bound.widest_layer, layers=bound.layers, activations=bound.activations, exact=True)


def _resolve(manifest: ModelManifest, limits: SiteLimits | None,
             batch_size: int | None) -> tuple[Architecture, Any, dict[str, int], ModelSize | None]:
    arch = lookup(manifest.architecture)
    try:
        config = arch.config_model.model_validate(manifest.config)
    except ValidationError as error:
        raise ArchitectureConfigError(f"configuration of {manifest.architecture!r} is invalid: {error}") from None
    if manifest.preprocessing.kind != arch.input_kind:
        raise ArchitectureConfigError(
            f"{manifest.architecture!r} takes {arch.input_kind} input but the manifest preprocesses {manifest.preprocessing.kind}"
        )
    _input_matches(manifest, config)
    if arch.check_input is not None:
        arch.check_input(config, manifest.preprocessing)
    dims = arch.output_dims(config)
    if manifest.feature_output not in dims:
        raise ArchitectureConfigError(
            f"feature_output {manifest.feature_output!r} is not an output of {manifest.architecture!r}; it has {sorted(dims)}"
        )
    head = manifest.source_head
    if head is not None:
        if head.output not in dims or head.output == manifest.feature_output:
            raise ArchitectureConfigError(
                f"source_head.output {head.output!r} must be a logits output of {manifest.architecture!r} "
                f"(outputs: {sorted(dims)}; set num_source_classes in the config to add a head)"
            )
        if dims[head.output] != head.num_classes:
            raise ArchitectureConfigError(
                f"source_head says {head.num_classes} classes but output {head.output!r} has {dims[head.output]}"
            )
    size = _checked_size(arch, config, manifest.preprocessing, limits or DEFAULT_LIMITS, batch_size,
                         f"{manifest.architecture!r} with this configuration")
    return arch, config, dims, size


def resolve(manifest: ModelManifest, limits: SiteLimits | None = None, *,
            batch_size: int | None = None) -> tuple[Architecture, Any, dict[str, int]]:
    """Validate a manifest against the registry: config, input kind, outputs and head, and
    the site's ``[limits]`` (default: :class:`~fedmte.client.limits.SiteLimits` defaults):
    the network's parameters, largest tensor, widths and depth, counted from the
    configuration, and the input row; with ``batch_size`` (the site's ``[compute]``), the
    bytes of a decoded batch too. A size above a limit raises
    :class:`~fedmte.client.limits.LimitExceededError` naming it; nothing is built."""
    arch, config, dims, _ = _resolve(manifest, limits, batch_size)
    return arch, config, dims


def _build(arch: Architecture, config: Any) -> nn.Module:
    return arch.build(config).to(TORCH_DTYPES[config.dtype]).eval()


def build(manifest: ModelManifest, limits: SiteLimits | None = None) -> nn.Module:
    """The network a manifest describes, with fresh (random) weights, in eval mode; refused
    before it is built when it is larger than ``limits`` allow."""
    arch, config, _, _ = _resolve(manifest, limits, None)
    return _build(arch, config)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_tensors(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse ``tensors`` unless their keys, shapes and dtypes are exactly ``expected``'s (a
    state dict, possibly of a network on the meta device)."""
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise MissingTensorError(f"the weights lack {len(missing)} tensor(s) the network has: {missing[:10]}")
    extra = sorted(tensors.keys() - expected.keys())
    if extra:
        raise UnexpectedTensorError(f"the weights have {len(extra)} tensor(s) the network does not: {extra[:10]}")
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise TensorShapeError(f"tensor {name!r} has shape {list(got.shape)}; the network needs {list(want.shape)}")
        if got.dtype != want.dtype:
            raise TensorDtypeError(f"tensor {name!r} is {got.dtype}; the network needs {want.dtype} (no casts are made)")


def load_weights(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``module``: keys, shapes and dtypes must match exactly."""
    check_tensors(module.state_dict(), tensors)
    with torch.no_grad():
        module.load_state_dict(dict(tensors), strict=True)


@dataclass(frozen=True)
class LoadedModel:
    """A verified package built into a network, ready to run at the site; ``limits`` are the
    site's limits it was checked against (its batches are checked against them too) and
    ``size`` what its configuration allocates."""

    manifest: ModelManifest
    module: nn.Module
    package_id: str
    key_id: str
    input_kind: InputKind
    feature_dim: int
    limits: SiteLimits = DEFAULT_LIMITS
    size: ModelSize | None = None

    @property
    def source_head(self) -> SourceHead | None:
        return self.manifest.source_head


def _check_count(manifest: ModelManifest, count: int) -> None:
    if count != manifest.parameter_count:
        raise ArchitectureConfigError(
            f"the manifest says {manifest.parameter_count:,} parameters but {manifest.architecture!r} with this "
            f"configuration has {count:,}"
        )


def load_verified(package: VerifiedPackage, limits: SiteLimits | None = None) -> LoadedModel:
    """Build the network of a verified package and load its weights strictly.

    Before anything is allocated the configuration is checked against the site's ``limits``
    (:func:`resolve`), then the network is built on the meta device (no storage) and the
    package's tensors compared with it: its parameter count with the manifest's, every key,
    shape and dtype with the weights'. Only a package whose weights fill the network exactly
    is built for real, so a small weights file can never make the site allocate a large
    network."""
    limits = limits or DEFAULT_LIMITS
    manifest = package.manifest
    arch, config, dims, size = _resolve(manifest, limits, None)
    shape = _meta_module(arch, config) if arch.meta_build else None
    if shape is not None:
        _check_count(manifest, parameter_count(shape))
        check_tensors(shape.state_dict(), package.tensors)
        del shape
    module = _build(arch, config)
    _check_count(manifest, parameter_count(module))
    load_weights(module, package.tensors)
    module.requires_grad_(False)
    return LoadedModel(
        manifest=manifest,
        module=module,
        package_id=package.package_id,
        key_id=package.key_id,
        input_kind=arch.input_kind,
        feature_dim=dims[manifest.feature_output],
        limits=limits,
        size=size,
    )


def load_model(directory: Path | str, trusted_keys: Any, limits: SiteLimits | None = None) -> LoadedModel:
    """Verify a package directory against pinned keys and ``limits``, then build and load it."""
    return load_verified(verify_package(directory, trusted_keys, limits), limits)


def initial_weights(architecture: str, config: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialised state dict of an architecture (PyTorch's default init, seeded):
    test and demo weights, made without touching the global random state."""
    arch = lookup(architecture)
    try:
        parsed = arch.config_model.model_validate(dict(config))
    except ValidationError as error:
        raise ArchitectureConfigError(f"configuration of {architecture!r} is invalid: {error}") from None
    _checked_size(arch, parsed, None, DEFAULT_LIMITS, None, f"{architecture!r} with this configuration")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = arch.build(parsed).to(TORCH_DTYPES[parsed.dtype])
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def pack_model(
    directory: Path | str,
    *,
    name: str,
    architecture: str,
    config: Mapping[str, Any],
    preprocessing: Mapping[str, Any] | BaseModel,
    license: str,
    tensors: Mapping[str, torch.Tensor],
    key: Any,
    feature_output: str = "features",
    source_head: Mapping[str, Any] | SourceHead | None = None,
    version: str = "1",
    description: str = "",
) -> ModelManifest:
    """Write a signed package whose weights are known to load into the named architecture.

    The weights are serialised once, hashed, described in the manifest (with the parameter
    count the site's own builder gives), loaded strictly into a freshly built network as a
    check, and only then written and signed with ``key``.
    """
    data = tensors_to_bytes(tensors)
    if isinstance(preprocessing, BaseModel):
        preprocessing = preprocessing.model_dump(mode="json")
    if isinstance(source_head, BaseModel):
        source_head = source_head.model_dump(mode="json")
    try:
        manifest = ModelManifest(
            name=name,
            version=version,
            architecture=architecture,
            config=dict(config),
            preprocessing=preprocessing,
            feature_output=feature_output,
            source_head=source_head,
            license=license,
            parameter_count=0,
            weights_sha256=hashlib.sha256(data).hexdigest(),
            weights_bytes=len(data),
            description=description,
        )
    except ValidationError as error:
        raise ArchitectureConfigError(f"the manifest fields are invalid: {error}") from None
    module = build(manifest)
    manifest = manifest.model_copy(update={"parameter_count": parameter_count(module)})
    load_weights(module, {k: v.detach().cpu() for k, v in tensors.items()})
    write_package(directory, manifest, data, key)
    return manifest


def inspect_model(directory: Path | str, trusted_keys: Any = (), limits: SiteLimits | None = None) -> PackageReport:
    """What a package claims, whether it verifies, and whether this site can build it."""
    report = inspect_package(directory, trusted_keys, limits)
    if not report.verified or report.manifest is None:
        return report
    try:
        load_model(directory, trusted_keys, limits)
    except FedmteError as error:
        return replace(report, verified=False,
                       verdict=f"signature verified, but the site cannot build it: {type(error).__name__}: {error}")
    return replace(report, verdict=f"verified; builds as this site's {report.manifest.architecture!r} network")
