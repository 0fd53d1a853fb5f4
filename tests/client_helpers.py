"""Small signed model packages and site data for the site-agent tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmte.client.architectures import initial_weights, pack_model
from fedmte.protocol.manifest import ModelManifest

MLP_CONFIG: dict[str, Any] = {"input_dim": 6, "hidden_dims": [16, 5], "num_source_classes": 4}
MLP_PRE: dict[str, Any] = {"kind": "vector", "dim": 6}
CNN_CONFIG: dict[str, Any] = {"in_channels": 1, "channels": [4, 8], "batch_norm": True, "feature_dim": 6, "num_source_classes": 3}
CNN_PRE: dict[str, Any] = {"kind": "image", "height": 8, "width": 8, "channels": 1, "mean": [0.5], "std": [0.25]}
TEXT_CONFIG: dict[str, Any] = {"vocab_size": 257, "embed_dim": 8, "feature_dim": 5, "num_source_classes": 3}
TEXT_PRE: dict[str, Any] = {"kind": "text", "tokenizer": "bytes", "vocab_size": 257, "max_tokens": 32}

SPECS = {
    "mlp": (MLP_CONFIG, MLP_PRE),
    "cnn": (CNN_CONFIG, CNN_PRE),
    "text_bag": (TEXT_CONFIG, TEXT_PRE),
}


def pack(
    directory: Path,
    key: Ed25519PrivateKey,
    architecture: str = "mlp",
    seed: int = 0,
    *,
    head: bool = True,
    tensors: dict[str, torch.Tensor] | None = None,
) -> ModelManifest:
    """A signed package of ``architecture`` with seeded default-init weights."""
    config, pre = SPECS[architecture]
    config = dict(config)
    if not head:
        config["num_source_classes"] = 0
    weights = tensors if tensors is not None else initial_weights(architecture, config, seed)
    return pack_model(
        directory,
        name=f"test-{architecture}",
        architecture=architecture,
        config=config,
        preprocessing=pre,
        license="Apache-2.0",
        tensors=weights,
        key=key,
        source_head={"num_classes": config["num_source_classes"]} if head else None,
    )
