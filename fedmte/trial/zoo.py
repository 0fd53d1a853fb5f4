"""The demo's model zoo: candidate models for scikit-learn's digits, built reproducibly and cached.

``fedmte demo`` needs candidate models of clearly different quality for one target task,
with no download. The target task is scikit-learn's bundled *digits* data set (1,797
8x8 grey images of handwritten digits, ten classes; UCI "Optical Recognition of Handwritten
Digits", CC BY 4.0), read with :func:`sklearn.datasets.load_digits`. Every candidate is a
small network of the site's own ``cnn`` architecture (:mod:`fedmte.client.architectures`;
the sites hold images, and a site's data source has one input kind, so the ``mlp`` family
that reads vectors cannot run on them), pre-trained on a different *source task* built from
public data that ships inside a package, and keeps its source classifier head so the
source-label scorers (NCE, LEEP, ...) apply:

==================  ===================================================================
``digits-cnn``      all ten digits (source half of the data set)
``digits-noisy``    all ten digits under heavy Gaussian pixel noise (sd 0.8 in [0, 1])
``digits-0to4``     the digits 0-4 only (a five-class head)
``digits-parity``   even or odd (a two-class head)
``photo-patches``   which of scikit-learn's two sample photographs (``china.jpg``,
                    ``flower.jpg``, CC BY 2.0) an 8x8 grey patch comes from
``random-init``     no training: PyTorch's default initialisation, a random ten-class head
``digits-narrow``   all ten digits through a 4-wide bottleneck of a single 8-channel layer
==================  ===================================================================

The digits are split once, with a fixed seed, into a *source* part (the only rows any
candidate is trained on) and a *target* part that the demo's sites hold (target train)
plus a held-out target test part that no site and no candidate ever sees. Each
candidate's ground truth is its **linear-probe accuracy**: multinomial logistic regression
(scikit-learn, L2, C = 1) on the standardised features of the target train rows, evaluated
on the target test rows. That is the quantity the transferability scorers try to predict,
and ``fedmte evaluate`` compares their rankings with it.

Reproducibility: every model is trained on the CPU with one intra-op thread,
``torch.use_deterministic_algorithms(True)``, a fixed seed per recipe and a seeded
``torch.Generator`` for the batch order, inside :func:`torch.random.fork_rng` so the caller's
random state is untouched. The same torch build on the same machine gives bit-identical
weights (the tests compare weight hashes); a different torch build or CPU may differ in the
last bits, which changes hashes but not the spread of quality.

The zoo is cached under ``<cache>/<ZOO_SCHEMA>-<recipe hash>/``: ``zoo.json`` (a
:class:`ZooIndex`) and one ``<name>.safetensors`` per model. A recipe change gives a new
folder; a cached file whose hash differs from the index is rebuilt. :func:`pack_zoo` writes
the models as signed packages (:func:`fedmte.client.architectures.pack_model`). The default
cache is ``$FEDMTE_CACHE/zoo``, else ``$XDG_CACHE_HOME/fedmte/zoo``, else
``~/.cache/fedmte/zoo``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as load_safetensors

from fedmte.client.architectures import ARCHITECTURES, CNNConfig, initial_weights, pack_model, parameter_count
from fedmte.client.packages import tensors_to_bytes
from fedmte.protocol.durable import replace_file
from fedmte.protocol.errors import FedmteError, InvalidInputError
from fedmte.protocol.manifest import ImagePreprocessing, ModelManifest

ZOO_SCHEMA = "fedmte.zoo.v1"
INDEX_FILE = "zoo.json"
DIGIT_LABELS: tuple[str, ...] = tuple(str(digit) for digit in range(10))
"""The target label space: the digit names "0".."9" (class index = digit)."""

SIDE = 8
PIXEL_MEAN = 0.3
PIXEL_STD = 0.4
"""Normalisation of pixels in [0, 1]: about the mean and spread of the digits' pixels."""
PREPROCESSING = ImagePreprocessing(height=SIDE, width=SIDE, channels=1, mean=(PIXEL_MEAN,), std=(PIXEL_STD,))

SPLIT_SEED = 20_240_601
SOURCE_FRACTION = 0.4
TARGET_TEST_FRACTION = 0.3
"""Of the digits, 40 % are the source part; of the rest, 30 % are held out as target test."""

BATCH = 64
LEARNING_RATE = 3e-3
PROBE_C = 1.0
PROBE_MAX_ITER = 2000
NOISE_SD = 0.8
PATCH_SIDE = 32  # photo patches of 32x32 pixels, averaged down to 8x8

SourceTask = Literal["digits", "digits_noisy", "digits_0to4", "digits_parity", "photo_patches", "none"]


@dataclass(frozen=True)
class Recipe:
    """How one candidate is built: architecture settings, source task, training length, seed."""

    name: str
    description: str
    source_task: SourceTask
    source_classes: tuple[str, ...]
    channels: tuple[int, ...]
    feature_dim: int
    epochs: int
    seed: int
    license: str

    def config(self) -> dict[str, Any]:
        """The ``cnn`` configuration of the manifest."""
        return CNNConfig(
            in_channels=1, channels=self.channels, feature_dim=self.feature_dim,
            num_source_classes=len(self.source_classes),
        ).model_dump(mode="json")


_DIGITS_CC = "CC-BY-4.0"
RECIPES: tuple[Recipe, ...] = (
    Recipe("digits-cnn", "CNN trained to recognise all ten digits (source half of scikit-learn's digits)",
           "digits", DIGIT_LABELS, (16, 32), 32, 25, 1, _DIGITS_CC),
    Recipe("digits-noisy", "CNN trained on all ten digits under heavy Gaussian pixel noise (sd 0.8)",
           "digits_noisy", DIGIT_LABELS, (16, 32), 32, 25, 2, _DIGITS_CC),
    Recipe("digits-0to4", "CNN trained to recognise the digits 0-4 only",
           "digits_0to4", DIGIT_LABELS[:5], (16, 32), 32, 25, 3, _DIGITS_CC),
    Recipe("digits-parity", "CNN trained to tell even from odd digits",
           "digits_parity", ("even", "odd"), (16, 32), 32, 25, 4, _DIGITS_CC),
    Recipe("photo-patches", "CNN trained to tell 8x8 patches of two photographs apart (china.jpg, flower.jpg)",
           "photo_patches", ("china", "flower"), (16, 32), 32, 25, 5, "CC-BY-2.0"),
    Recipe("random-init", "untrained CNN: PyTorch's default initialisation and a random ten-class head",
           "none", DIGIT_LABELS, (16, 32), 32, 0, 6, "Apache-2.0"),
    Recipe("digits-narrow", "one 8-channel layer and a 4-wide bottleneck, trained on all ten digits",
           "digits", DIGIT_LABELS, (8,), 4, 25, 7, _DIGITS_CC),
)


# --------------------------------------------------------------------------- data

@dataclass(frozen=True)
class DigitsSplit:
    """The digits as uint8 pixels (0..255) and class indices, with the fixed three-way split."""

    images: np.ndarray  # (n, 8, 8) uint8
    labels: np.ndarray  # (n,) int64
    source: np.ndarray  # row indices
    target_train: np.ndarray
    target_test: np.ndarray


def _sklearn_datasets() -> Any:
    try:
        from sklearn import datasets
    except ImportError:
        raise InvalidInputError(
            "the demo's data set ships with scikit-learn, which is not installed: `pip install 'fedmte[demo]'` (or scikit-learn)"
        ) from None
    return datasets


def load_digits_split() -> DigitsSplit:
    """scikit-learn's digits (pixels 0..16 scaled to 0..255) split into source / target train / target test.

    The split is stratified by class and seeded (``SPLIT_SEED``), so it never changes.
    """
    digits = _sklearn_datasets().load_digits()
    images = np.rint(np.asarray(digits.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(digits.target, dtype=np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    source, train, test = [], [], []
    for digit in range(len(DIGIT_LABELS)):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        n_source = round(SOURCE_FRACTION * len(rows))
        rest = rows[n_source:]
        n_test = round(TARGET_TEST_FRACTION * len(rest))
        source.append(rows[:n_source])
        test.append(rest[:n_test])
        train.append(rest[n_test:])
    return DigitsSplit(images, labels, *(np.sort(np.concatenate(part)) for part in (source, train, test)))


def normalise(pixels: np.ndarray) -> np.ndarray:
    """(n, 8, 8) pixels (uint8, or floats in [0, 1]) -> (n, 1, 8, 8) float32 network input,
    exactly as the site's preprocessing computes it for :data:`PREPROCESSING`."""
    x = pixels.astype(np.float32) / np.float32(255.0) if pixels.dtype == np.uint8 else pixels.astype(np.float32)
    return np.ascontiguousarray(((x - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD))[:, None])


def _photo_patches(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random 32x32 grey patches of the two sample photos, averaged to 8x8, in [0, 1]."""
    photos = [image.astype(np.float64).mean(axis=2) / 255.0 for image in _sklearn_datasets().load_sample_images().images]
    rng = np.random.default_rng(seed)
    patches = np.empty((count, SIDE, SIDE), dtype=np.float32)
    labels = np.arange(count, dtype=np.int64) % len(photos)
    block = PATCH_SIDE // SIDE
    for i, which in enumerate(labels):
        photo = photos[which]
        top = int(rng.integers(0, photo.shape[0] - PATCH_SIDE))
        left = int(rng.integers(0, photo.shape[1] - PATCH_SIDE))
        patch = photo[top:top + PATCH_SIDE, left:left + PATCH_SIDE]
        patches[i] = patch.reshape(SIDE, block, SIDE, block).mean(axis=(1, 3))
    return patches, labels


def source_task(recipe: Recipe, split: DigitsSplit) -> tuple[np.ndarray, np.ndarray]:
    """Training inputs (n, 8, 8) in [0, 1] and labels of a recipe's source task (source rows only)."""
    x = split.images[split.source].astype(np.float32) / np.float32(255.0)
    y = split.labels[split.source]
    task = recipe.source_task
    if task == "digits":
        return x, y
    if task == "digits_noisy":
        noise = np.random.default_rng(recipe.seed).normal(0.0, NOISE_SD, size=x.shape).astype(np.float32)
        return np.clip(x + noise, 0.0, 1.0), y
    if task == "digits_0to4":
        keep = y < 5
        return x[keep], y[keep]
    if task == "digits_parity":
        return x, y % 2
    if task == "photo_patches":
        return _photo_patches(len(y), recipe.seed)
    raise InvalidInputError(f"recipe {recipe.name!r} has no source task to train on")


# --------------------------------------------------------------------------- training

@contextlib.contextmanager
def deterministic_torch(seed: int) -> Iterator[None]:
    """Seeded, deterministic, single-threaded torch for the block; global state restored after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)


def _module(recipe: Recipe) -> torch.nn.Module:
    return ARCHITECTURES["cnn"].build(CNNConfig.model_validate(recipe.config()))


def train(recipe: Recipe, split: DigitsSplit) -> dict[str, torch.Tensor]:
    """The recipe's weights: Adam on cross-entropy over its source task, fixed seed and order."""
    if recipe.source_task == "none":
        return initial_weights("cnn", recipe.config(), recipe.seed)
    x, y = source_task(recipe, split)
    inputs = torch.from_numpy(normalise(x))
    targets = torch.from_numpy(y)
    with deterministic_torch(recipe.seed):
        module = _module(recipe)
        module.train()
        optimiser = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE)
        order = torch.Generator().manual_seed(recipe.seed)
        for _ in range(recipe.epochs):
            permutation = torch.randperm(len(targets), generator=order)
            for start in range(0, len(permutation), BATCH):
                rows = permutation[start:start + BATCH]
                loss = torch.nn.functional.cross_entropy(module(inputs[rows])["logits"], targets[rows])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
        module.eval()
        return {name: tensor.detach().clone().contiguous() for name, tensor in module.state_dict().items()}


def features_of(recipe: Recipe, tensors: Mapping[str, torch.Tensor], pixels: np.ndarray) -> np.ndarray:
    """The model's feature output for (n, 8, 8) pixels, float64."""
    with deterministic_torch(0):
        module = _module(recipe)
        module.load_state_dict(dict(tensors), strict=True)
        module.eval()
        with torch.inference_mode():
            return module(torch.from_numpy(normalise(pixels)))["features"].double().numpy()


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy on the test rows of logistic regression fitted on standardised train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    classifier = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER)
    classifier.fit(scaler.transform(train_x), train_y)
    return float(classifier.score(scaler.transform(test_x), test_y))


# --------------------------------------------------------------------------- the cached zoo

class ZooEntry(BaseModel):
    """One built candidate: what it is, its weights' hash and its measured ground truth."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    architecture: Literal["cnn"] = "cnn"
    config: dict[str, Any]
    source_task: str
    source_classes: tuple[str, ...]
    license: str
    parameter_count: int = Field(ge=0)
    weights_file: str
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    ground_truth: float = Field(ge=0.0, le=1.0, description="linear-probe accuracy on the held-out target test rows")
    build_seconds: float = Field(ge=0.0)


class ZooIndex(BaseModel):
    """``zoo.json``: the recipe hash the models were built from, and the models."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["fedmte.zoo.v1"] = Field(default=ZOO_SCHEMA, alias="schema")
    recipe_sha256: str
    torch_version: str
    ground_truth_metric: str = "linear-probe accuracy (logistic regression, C=1) on the held-out digits target test rows"
    target_train_rows: int
    target_test_rows: int
    entries: list[ZooEntry]

    def entry(self, name: str) -> ZooEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise InvalidInputError(f"the zoo has no model {name!r}; it has {', '.join(e.name for e in self.entries)}")

    def ground_truth(self) -> dict[str, float]:
        """``{model: linear-probe accuracy}``, the truth file ``fedmte evaluate`` reads."""
        return {entry.name: entry.ground_truth for entry in self.entries}


@dataclass(frozen=True)
class Zoo:
    """A built (or loaded) zoo: its folder, index and the weights of each model."""

    directory: Path
    index: ZooIndex
    tensors: dict[str, dict[str, torch.Tensor]]
    from_cache: bool


def recipe_sha256(recipes: Sequence[Recipe] = RECIPES) -> str:
    """Hash of everything that decides the weights and the ground truth."""
    settings = {
        "schema": ZOO_SCHEMA, "recipes": [asdict(r) for r in recipes], "split_seed": SPLIT_SEED,
        "source_fraction": SOURCE_FRACTION, "test_fraction": TARGET_TEST_FRACTION, "batch": BATCH,
        "lr": LEARNING_RATE, "noise_sd": NOISE_SD, "probe": [PROBE_C, PROBE_MAX_ITER],
        "preprocessing": PREPROCESSING.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$FEDMTE_CACHE/zoo``, else ``$XDG_CACHE_HOME/fedmte/zoo``, else ``~/.cache/fedmte/zoo``."""
    if os.environ.get("FEDMTE_CACHE"):
        return Path(os.environ["FEDMTE_CACHE"]) / "zoo"
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "fedmte" / "zoo"


def _read_index(directory: Path) -> ZooIndex | None:
    try:
        return ZooIndex.model_validate_json((directory / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValidationError, ValueError):
        return None


def _load_cached(directory: Path, entry: ZooEntry) -> dict[str, torch.Tensor] | None:
    """The cached weights of ``entry`` if the file is there and hashes as the index says."""
    try:
        data = (directory / entry.weights_file).read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != entry.weights_sha256:
        return None
    return dict(load_safetensors(data))


Progress = Callable[[str, bool], None]
"""Called with (model name, whether it came from the cache) as each model becomes ready."""


def build_zoo(
    cache_dir: Path | str | None = None,
    *,
    names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> Zoo:
    """Build the zoo's models (or load them from the cache) and measure their ground truth.

    ``names`` builds only those recipes (tests use it); the index then lists only them.
    """
    recipes = list(RECIPES)
    if names is not None:
        unknown = sorted(set(names) - {r.name for r in recipes})
        if unknown:
            raise InvalidInputError(f"unknown zoo model(s) {unknown}; the zoo has {', '.join(r.name for r in recipes)}")
        recipes = [r for r in recipes if r.name in names]
    digest = recipe_sha256()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = directory / f"{ZOO_SCHEMA}-{digest[:16]}"
    directory.mkdir(parents=True, exist_ok=True)
    cached = _read_index(directory)
    known = {e.name: e for e in cached.entries} if cached is not None and cached.recipe_sha256 == digest else {}
    split: DigitsSplit | None = None
    entries: list[ZooEntry] = []
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    all_cached = True
    for recipe in recipes:
        entry = known.get(recipe.name)
        weights = _load_cached(directory, entry) if entry is not None else None
        hit = entry is not None and weights is not None
        if not hit:
            split = split or load_digits_split()
            entry, weights = _build_one(recipe, split, directory)
        assert entry is not None and weights is not None
        all_cached = all_cached and hit
        entries.append(entry)
        tensors[recipe.name] = weights
        if progress is not None:
            progress(recipe.name, hit)
    if split is not None:
        rows = (len(split.target_train), len(split.target_test))
    elif cached is not None:
        rows = (cached.target_train_rows, cached.target_test_rows)
    else:  # nothing to build and no index: only with an empty ``names``
        split = load_digits_split()
        rows = (len(split.target_train), len(split.target_test))
    merged = {**known, **{e.name: e for e in entries}}
    order = [r.name for r in RECIPES if r.name in merged]
    index = ZooIndex(
        recipe_sha256=digest, torch_version=torch.__version__, target_train_rows=rows[0], target_test_rows=rows[1],
        entries=[merged[name] for name in order],
    )
    if cached is None or index != cached:
        replace_file(directory / INDEX_FILE, (index.model_dump_json(by_alias=True, indent=2) + "\n").encode())
    selected = ZooIndex.model_validate({**index.model_dump(by_alias=True), "entries": [e.model_dump() for e in entries]})
    return Zoo(directory=directory, index=selected, tensors=tensors, from_cache=all_cached)


def _build_one(recipe: Recipe, split: DigitsSplit, directory: Path) -> tuple[ZooEntry, dict[str, torch.Tensor]]:
    started = time.perf_counter()
    weights = train(recipe, split)
    truth = linear_probe_accuracy(
        features_of(recipe, weights, split.images[split.target_train]), split.labels[split.target_train],
        features_of(recipe, weights, split.images[split.target_test]), split.labels[split.target_test],
    )
    data = tensors_to_bytes(weights)
    file_name = f"{recipe.name}.safetensors"
    replace_file(directory / file_name, data)
    entry = ZooEntry(
        name=recipe.name, description=recipe.description, config=recipe.config(), source_task=recipe.source_task,
        source_classes=recipe.source_classes, license=recipe.license, parameter_count=parameter_count(_module(recipe)),
        weights_file=file_name, weights_sha256=hashlib.sha256(data).hexdigest(), ground_truth=truth,
        build_seconds=time.perf_counter() - started,
    )
    return entry, weights


def pack_zoo(zoo: Zoo, models_dir: Path | str, key: Any) -> dict[str, ModelManifest]:
    """Write each model as a signed package ``models_dir/<name>/`` (signed with ``key``).

    A package folder that already holds this model signed by this key is kept as is.
    """
    from fedmte.client.packages import verify_package

    models_dir = Path(models_dir)
    manifests: dict[str, ModelManifest] = {}
    public = key.public_key()
    for entry in zoo.index.entries:
        folder = models_dir / entry.name
        if folder.exists():
            try:
                existing = verify_package(folder, [public])
            except FedmteError:
                existing = None
            if existing is not None and existing.manifest.weights_sha256 == entry.weights_sha256:
                manifests[entry.name] = existing.manifest
                continue
            raise InvalidInputError(
                f"{folder} holds another package; remove it (or choose a new --out) to write the zoo's {entry.name!r}"
            )
        manifests[entry.name] = pack_model(
            folder, name=entry.name, architecture=entry.architecture, config=entry.config,
            preprocessing=PREPROCESSING, license=entry.license, tensors=zoo.tensors[entry.name], key=key,
            source_head={"output": "logits", "num_classes": len(entry.source_classes),
                         "class_names": list(entry.source_classes)},
            description=entry.description,
        )
    return manifests


__all__ = [
    "DIGIT_LABELS",
    "PREPROCESSING",
    "RECIPES",
    "DigitsSplit",
    "Recipe",
    "Zoo",
    "ZooEntry",
    "ZooIndex",
    "build_zoo",
    "default_cache_dir",
    "linear_probe_accuracy",
    "load_digits_split",
    "pack_zoo",
    "recipe_sha256",
]
