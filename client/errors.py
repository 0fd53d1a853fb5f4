"""Typed errors of the site agent: model packages, architectures, site file, site data, cache.

Every error subclasses :class:`fedmte.protocol.errors.FedmteError` (so the CLI shows it as
one line) and the built-in a caller would expect (``ValueError``). Each one is raised
*before* anything unsafe happens: a package is refused before its weights are parsed, a
weights file before any byte is interpreted as anything but a safetensors header.
"""

from __future__ import annotations

from fedmte.protocol.errors import FedmteError, VerificationError


class PackageError(FedmteError, ValueError):
    """A model package that cannot be used: missing files, bad layout, invalid manifest."""


class UnsafeFormatError(PackageError):
    """A weights file that is not safetensors: a pickle (``torch.save``), a zip archive
    (TorchScript, ``torch.export``, ``.npz``), ONNX, an ELF library or anything else.
    Raised from the first bytes of the file; nothing in it is parsed or executed."""


class SizeLimitError(PackageError):
    """A file, header, tensor count or parameter count above the site's limits."""


class MalformedWeightsError(PackageError):
    """A safetensors file whose header or data buffer is inconsistent (bad JSON, unknown
    dtype, offsets that overlap, leave gaps or run past the end, non-finite weights)."""


class SignatureError(PackageError, VerificationError):
    """A package whose signature is missing, malformed, made by a key the site does not
    pin, or does not verify; or whose weights do not hash to the signed manifest's value."""


class UnsignedPackageError(SignatureError):
    """A package without a signature file."""


class UntrustedKeyError(SignatureError):
    """A package signed by a key that is not pinned in the site file."""


class WeightsHashMismatchError(SignatureError):
    """Weights whose sha256 differs from the one in the signed manifest (tampered)."""


class UnknownArchitectureError(FedmteError, ValueError):
    """An architecture id that is not in the site's installed registry."""


class OptionalDependencyError(UnknownArchitectureError):
    """An architecture family (Hugging Face encoders, torchvision, timm) whose library this
    site cannot import; the message names the pip extra that installs it."""


class ArchitectureConfigError(FedmteError, ValueError):
    """An architecture configuration, feature output or head that the architecture
    cannot build, or a manifest that disagrees with what it builds."""


class WeightsMismatchError(FedmteError, ValueError):
    """Weights that do not match the network the site built."""


class MissingTensorError(WeightsMismatchError):
    """The network has a tensor the weights file lacks."""


class UnexpectedTensorError(WeightsMismatchError):
    """The weights file has a tensor the network does not."""


class TensorShapeError(WeightsMismatchError):
    """A tensor with another shape than the network's."""


class TensorDtypeError(WeightsMismatchError):
    """A tensor with another dtype than the network's (no silent casts)."""


class SiteConfigError(FedmteError, ValueError):
    """A site file (``site.toml``) that is missing, not TOML, or fails validation."""


class SiteDataError(FedmteError, ValueError):
    """Site data that cannot be read as configured (missing folder, wrong column, empty)."""


class LabelMappingError(SiteDataError):
    """A label the job's label space does not know, or a label space that is unusable."""


class BadRowsRefusedError(SiteDataError):
    """A corrupt or undecodable row, when the site file says ``on_error = "refuse"``."""


class InputKindMismatchError(SiteDataError):
    """A model whose preprocessing expects another kind of input than the site holds."""


class CacheError(FedmteError, ValueError):
    """A feature-cache entry that is incomplete or does not match its key."""


def reply_text(error: BaseException) -> str:
    """The text of the error reply a failure becomes on the wire (the site runner's ``Error``
    reason), so the audit log can hold the exact bytes that leave the site."""
    return f"{type(error).__name__}: {error}"
