"""What a registry entry of the site's architectures is, shared by the built-in families
(:mod:`fedmte.client.architectures`) and the optional ones (:mod:`fedmte.client.architectures_extras`),
so neither module imports the other's internals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedmte.client.limits import ModelSize

InputKind = Literal["image", "text", "vector"]
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ArchitectureConfig(BaseModel):
    """What every architecture's configuration shares: the source head's size and the dtype."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_source_classes: int = Field(default=0, ge=0, le=1_000_000)
    dtype: Literal["float32", "float64"] = "float32"


def source_head(width: int, classes: int) -> nn.Module | None:
    """A linear source head of ``classes`` outputs, or none."""
    return nn.Linear(width, classes) if classes else None


@dataclass(frozen=True)
class Architecture:
    """A registry entry: config model, builder, input kind and the width of each output.

    ``check_input`` refuses preprocessing the network cannot take (beyond the input kind);
    ``requires`` is (module, pip extra) for a family built by an optional library.

    ``size(config, preprocessing)`` is what the network would allocate, computed from the
    numbers alone (preprocessing may be None: no activations then), checked against the
    site's ``[limits]`` before anything is built; with ``count_on_meta`` it is a lower bound,
    and the exact count comes from building the network on PyTorch's ``meta`` device (no
    storage) once the bound has passed. ``meta_build`` says the family builds on the meta
    device, so a package's tensors are compared with the network before it is built for real
    (False for libraries whose model code does not: timm reads values of tensors while it
    builds; their allowlisted backbones are bounded anyway)."""

    config_model: type[ArchitectureConfig]
    build: Callable[[Any], nn.Module]
    input_kind: InputKind
    output_dims: Callable[[Any], dict[str, int]]
    summary: str
    check_input: Callable[[Any, Any], None] | None = None
    requires: tuple[str, str] | None = None
    size: Callable[[Any, Any], ModelSize] | None = None
    count_on_meta: bool = False
    meta_build: bool = True


def with_logits(dims: dict[str, int], config: ArchitectureConfig) -> dict[str, int]:
    """``dims`` plus the source head's ``logits`` width when the configuration has a head."""
    if config.num_source_classes:
        dims["logits"] = config.num_source_classes
    return dims
