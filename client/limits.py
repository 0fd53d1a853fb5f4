"""The site's resource limits: the ``[limits]`` table of the site file, one model, one place.

A coordinator chooses the model (its architecture's numbers), its preprocessing (the input
shape), the job's label space and the statistics of each release. Each of those can ask the
site to allocate more memory than it has: a 68-byte weights file whose configuration says
``hidden_dims = [65536, 65536, 16]`` (a 17 GB network), a manifest resizing every image to
4096x4096x3 (52 GB a batch), a job with 150,010 labels (a 168 GiB one-hot). So every size is
computed from the validated configuration and the site's own settings, arithmetically, and
compared with these caps *before* anything is built, decoded or allocated; a value above a cap
is a :class:`LimitExceededError`, a typed refusal whose ``rule`` names the limit
(``limits.max_parameters``), which the site agent reports to the coordinator as a refused
model (or a refused setup, or a refused release) and writes to its audit log.

Where each cap is checked:

``max_weights_bytes``, ``max_header_bytes``, ``max_tensors``, ``max_parameters``
    The weights file, before the part they bound is read (:mod:`fedmte.client.weights`).
``max_parameters``, ``max_tensor_elements``, ``max_layer_width``, ``max_layers``
    The network a configuration describes, counted from its numbers before it is built
    (:func:`fedmte.client.architectures.resolve`; exact for ``mlp``, ``cnn`` and
    ``text_bag``; the Hugging Face encoders are bounded arithmetically, then counted on
    PyTorch's ``meta`` device, which allocates no storage; torchvision and timm networks are
    fixed allowlisted backbones, so only their source head is counted).
``max_input_elements``, ``max_batch_bytes``
    One preprocessed input row, and one decoded batch (batch size x row elements x item
    size) or, for the built-in families, the largest activation of a batch, before a row is
    decoded (:func:`check_input_limits`, called by ``resolve`` with the site's batch size, by
    :func:`fedmte.client.data.decoded_batches` and by :func:`fedmte.client.extract.run_model`).
``max_labels``
    The job's label space, at setup, before any one-hot is built (:func:`check_job_limits`).
``max_release_entries``
    All float64 entries of one release (every requested block's shape multiplied out),
    before anything is computed (:func:`check_release_limits`).
``max_address_space_bytes``
    Optional: the site runner (:mod:`fedmte.client.site_runner`) sets ``RLIMIT_AS`` to it
    before it starts the SuperNode or answers any message, so a model that gets past every check
    above still cannot take more than this much memory; an allocation beyond it fails
    (``MemoryError``/``RuntimeError``) instead of pushing the machine into swap or the OOM
    killer. It caps *virtual* memory: ``import torch`` alone maps about 1 GiB, every thread
    reserves its stack (8 MiB) and glibc reserves up to 64 MiB of malloc arena per thread
    (set ``MALLOC_ARENA_MAX=2``), so leave at least 4 GiB of headroom above what the models
    need (8 GiB or more for CUDA, whose driver maps large ranges).

Why these defaults: they admit every model a site here runs (the largest optional backbone,
XLM-R large, has a 256M-entry embedding and 560M parameters) and refuse every bomb above.

* ``max_parameters`` 10^9: 4 GB of float32, what ``max_weights_bytes`` (4 GiB) can carry.
* ``max_tensor_elements`` 2^28 (1 GiB of float32): the largest single weight tensor; a
  65536x65536 matrix (2^32) is refused, XLM-R large's 250,002x1,024 embedding fits.
* ``max_layer_width`` 65,536: units of one layer (hidden width, channels, embedding width,
  source classes; not an embedding's vocabulary rows, not the input row); the built-in
  configurations already cap their widths there.
* ``max_layers`` 256: bounds the work (and the Python objects) of a configuration that is
  cheap per layer but deep; encoders in use have at most 48.
* ``max_input_elements`` 2^24 = 16,777,216 per row: a 4096x4096 grey image or 2048x2048x3
  RGB fits, 4096x4096x3 (50M) is refused.
* ``max_batch_bytes`` 2 GiB per decoded batch (or per activation of a batch): the decoder
  holds up to ``prefetch`` + 2 batches at once, so the default keeps the inputs under about
  8 GiB; 256 RGB images of 512x512 in float32 take 805 MB. A site with larger inputs lowers
  ``[compute] batch_size``.
* ``max_labels`` 10,000: the statistics hold per-class blocks and a (rows, C) one-hot of each
  batch (:meth:`fedmte.protocol.catalogue.Batch.one_hot`: 164 MB for 2,048 rows at 10,000
  classes, 2.5 GB at 150,010); 10,000 covers iNaturalist-sized label spaces.
* ``max_release_entries`` 2^27 (1 GiB of float64): the privacy layer holds a few copies of a
  release (sums, noise, encoded payload, audit copy); a per-class second-moment block of
  1,000 classes by 512 features (131M entries) fits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from fedmte.client.errors import SizeLimitError
from fedmte.protocol.errors import RefusalError

GiB = 1024**3


class SiteLimits(BaseModel):
    """The ``[limits]`` table of the site file (see the module docstring for each cap)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # the weights file (fedmte.client.weights), checked before the part each bounds is read
    max_weights_bytes: int = Field(default=4 * GiB, ge=16)
    max_header_bytes: int = Field(default=8 * 1024**2, ge=2)
    max_tensors: int = Field(default=10_000, ge=1)
    max_parameters: int = Field(default=1_000_000_000, ge=1)
    # the network a configuration describes, checked before it is built
    max_tensor_elements: int = Field(default=2**28, ge=1)
    max_layer_width: int = Field(default=65_536, ge=1)
    max_layers: int = Field(default=256, ge=1)
    # the inputs, checked before a row is decoded
    max_input_elements: int = Field(default=2**24, ge=1)
    max_batch_bytes: int = Field(default=2 * GiB, ge=1024)
    # the job and its releases
    max_labels: int = Field(default=10_000, ge=2)
    max_release_entries: int = Field(default=2**27, ge=1)
    # the process (fedmte.client.site_runner); None: no address-space limit
    max_address_space_bytes: int | None = Field(default=None, ge=GiB)


DEFAULT_LIMITS = SiteLimits()


class LimitExceededError(RefusalError, SizeLimitError):
    """A size above one of the site's ``[limits]``: a refusal whose ``rule`` is
    ``limits.<name>`` (and ``reason_code`` ``limits:<name>``), raised before the memory it
    bounds is allocated. ``value`` is what was asked, ``cap`` the site's limit."""

    def __init__(self, limit: str, message: str, *, value: int | None = None, cap: int | None = None) -> None:
        super().__init__(message, reason_code=f"limits:{limit}", rule=f"limits.{limit}")
        self.limit = limit
        self.value = value
        self.cap = cap


def refuse_above(limits: SiteLimits, limit: str, value: int, what: str, hint: str = "") -> None:
    """Raise :class:`LimitExceededError` when ``value`` exceeds ``limits.<limit>``."""
    cap = getattr(limits, limit)
    if cap is not None and value > cap:
        raise LimitExceededError(
            limit, f"{what} is {value:,}; this site allows at most {cap:,} (limits.{limit}){hint}", value=value, cap=cap
        )


@dataclass(frozen=True)
class ModelSize:
    """What a configuration asks the site to allocate, computed from its numbers alone.

    ``parameters`` and ``buffers`` count tensor elements (a package's tensors hold exactly
    ``parameters + buffers`` of them when ``exact``; otherwise ``parameters`` is a lower
    bound); ``largest_tensor`` is the element count of the largest one; ``widest_layer`` the
    most units of one layer; ``activations`` the most elements one input row has in flight
    in one layer (its input plus its output), None where it is not computed."""

    parameters: int
    largest_tensor: int
    widest_layer: int
    layers: int
    buffers: int = 0
    activations: int | None = None
    exact: bool = True


class SizeCounter:
    """Adds up a network's tensors and layers as a builder would create them."""

    def __init__(self) -> None:
        self.parameters = 0
        self.buffers = 0
        self.largest = 0
        self.widest = 0
        self.layers = 0
        self.activations = 0

    def tensor(self, *shape: int, buffer: bool = False, copies: int = 1) -> None:
        elements = math.prod(shape)
        if buffer:
            self.buffers += elements * copies
        else:
            self.parameters += elements * copies
        if copies:
            self.largest = max(self.largest, elements)

    def layer(self, units: int, in_flight: int = 0) -> None:
        """One layer of ``units`` (widths), with ``in_flight`` activation elements per row."""
        self.layers += 1
        self.widest = max(self.widest, units)
        self.activations = max(self.activations, in_flight)

    def in_flight(self, elements: int) -> None:
        """An operation with ``elements`` activation elements per row (input plus output)."""
        self.activations = max(self.activations, elements)

    def elementwise(self, units: int) -> None:
        """An elementwise operation (activation, normalisation) on ``units`` per row."""
        self.in_flight(2 * units)

    def linear(self, n_in: int, n_out: int) -> None:
        self.tensor(n_out, n_in)
        self.tensor(n_out)
        self.layer(n_out, n_in + n_out)

    def size(self, *, activations: bool = True, exact: bool = True) -> ModelSize:
        return ModelSize(parameters=self.parameters, largest_tensor=self.largest, widest_layer=self.widest,
                         layers=self.layers, buffers=self.buffers,
                         activations=self.activations if activations else None, exact=exact)


def check_model_size(limits: SiteLimits, size: ModelSize, what: str = "the model") -> None:
    """Refuse a network above the site's caps (layers, width, largest tensor, parameters)."""
    refuse_above(limits, "max_layers", size.layers, f"the number of layers of {what}")
    refuse_above(limits, "max_layer_width", size.widest_layer, f"the widest layer of {what}")
    refuse_above(limits, "max_tensor_elements", size.largest_tensor, f"the largest weight tensor of {what} (elements)")
    refuse_above(limits, "max_parameters", size.parameters + size.buffers,
                 f"the {'' if size.exact else 'least '}number of parameters of {what}")


def check_input_limits(limits: SiteLimits, elements: int, itemsize: int, batch_size: int | None,
                       *, activations: int | None = None, float_itemsize: int = 4) -> None:
    """Refuse an input row above ``max_input_elements`` and, with a batch size, a decoded
    batch (``batch_size * elements * itemsize``) or a batch's largest activation
    (``batch_size * activations * float_itemsize``) above ``max_batch_bytes``."""
    refuse_above(limits, "max_input_elements", elements, "the elements of one preprocessed input row",
                 "; ask for smaller inputs")
    if batch_size is None:
        return
    hint = "; lower [compute] batch_size or ask for smaller inputs"
    refuse_above(limits, "max_batch_bytes", batch_size * elements * itemsize,
                 f"the bytes of one decoded batch ({batch_size} rows of {elements:,} elements x {itemsize} bytes)", hint)
    if activations is not None:
        refuse_above(limits, "max_batch_bytes", batch_size * activations * float_itemsize,
                     f"the bytes of one layer's activations for a batch ({batch_size} rows of {activations:,} elements "
                     f"x {float_itemsize} bytes)", hint)


def check_job_limits(limits: SiteLimits, num_labels: int) -> None:
    """Refuse a job whose label space is larger than ``max_labels`` (at setup, before the
    label space is opened or any one-hot is built)."""
    refuse_above(limits, "max_labels", int(num_labels), "the number of labels the job asks for",
                 "; a job's label space must be smaller")


def release_entries(shapes: Iterable[Sequence[int]]) -> int:
    """The float64 entries of blocks of these shapes (a scalar block is one entry)."""
    return sum(math.prod(int(n) for n in shape) for shape in shapes)


def check_release_limits(limits: SiteLimits, shapes: Iterable[Sequence[int]]) -> None:
    """Refuse a release whose blocks (their shapes, e.g. from
    :func:`fedmte.protocol.catalogue.expected_shape`) hold more than ``max_release_entries``
    entries in total, before any of them is computed."""
    refuse_above(limits, "max_release_entries", release_entries(shapes), "the entries this release asks for",
                 "; ask for fewer or smaller statistics")


__all__ = [
    "DEFAULT_LIMITS", "LimitExceededError", "ModelSize", "SiteLimits", "SizeCounter", "check_input_limits",
    "check_job_limits", "check_model_size", "check_release_limits", "refuse_above", "release_entries",
]
