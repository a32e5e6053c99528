"""The seam between a loaded model and its callers: :class:`KernelModel` and :class:`ModelInfo`.

Every method (linear filter, direct UNet++, latent diffusion, and whatever comes next)
implements :class:`KernelModel`, so the node, ``dicom-node standardize`` and the evaluation call
a model without knowing which method it is, and a test can stand in a small class that
implements it. Nothing here imports torch or SciPy: the service types its code against this
module before any model is loaded.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

Progress = Callable[[int, int], None]

#: With explicit slice keys every network call gets ``max_batch_pixels // FIXED_BATCH_PIXELS``
#: slices (4 by default), whatever the slice size, so a slice's result never depends on its batch
#: mates; callers that feed a model slice runs (streaming) use the same count.
FIXED_BATCH_PIXELS = 512 * 512


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is: recorded with every output (provenance) and logged when loaded."""

    name: str
    version: str
    sha256: str  # of the checkpoint file
    weights_sha256: str  # of the tensors alone (the header may change without them)
    method: str  # the registered method: "linear", "direct", "latent_diffusion", ...
    variant: str  # what of the method runs ("diffusion", "autoencoder", "linear+noise", ...)
    device: str  # where it runs ("cpu", "cuda:0", ...)
    runtime: str  # "torch" or "onnx"
    path: str  # the checkpoint file
    default_steps: int | None = None  # sampler steps when a caller gives none (None: not a sampler)
    strength: float | None = None  # SDEdit start of a sampler
    training_pixel_mm: float | None = None  # in-plane spacing of the training data, when recorded
    kernels: tuple[tuple[str, str], ...] = ()  # (source, target) reconstruction kernels it was trained on
    trained_on: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)  # training data summary

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (reports, benchmarks): the fields by name, kernel pairs as lists."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["kernels"] = [list(pair) for pair in self.kernels]
        out["trained_on"] = dict(self.trained_on) if self.trained_on is not None else None
        return out


@runtime_checkable
class KernelModel(Protocol):
    """A loaded kernel-standardization model, whatever its method.

    Arrays are float32 HU, volumes ``(Z, Y, X)`` with ``spacing = (dz, dy, dx)`` in mm. With
    ``slice_keys`` (one random-stream key per slice, ``ltdiff_core.standardizer.uid_slice_key``) a
    slice's output depends only on its pixels, its key and the model, never on the other slices
    of the call.
    """

    device: str
    max_batch_pixels: int  # pixels per model call; see FIXED_BATCH_PIXELS

    @property
    def info(self) -> ModelInfo:
        """Name, version, digests, method, defaults and training facts of the loaded checkpoint."""
        ...

    def qa_envelope(self) -> dict[str, Any] | None:
        """The training envelope of the QA gate (``ltdiff_core.qa``), or None when not recorded."""
        ...

    def supported_geometry(self) -> dict[str, dict[str, float]]:
        """Pixel spacing and slice thickness the model handles, as QA envelope ranges."""
        ...

    def standardize(self, hu_volume: np.ndarray, spacing: Sequence[float], steps: int | None = None,
                    seed: int = 0, progress: Progress | None = None,
                    slice_keys: Sequence[int] | None = None) -> np.ndarray:
        """One ``(Z, Y, X)`` or ``(Y, X)`` volume; same shape out."""
        ...

    def standardize_batch(self, volumes: Sequence[np.ndarray], spacings: Sequence[Sequence[float]],
                          steps: int | None = None, seed: int = 0, progress: Progress | None = None,
                          slice_keys: Sequence[Sequence[int]] | None = None) -> list[np.ndarray]:
        """Several volumes in shared model calls; each result equals its own :meth:`standardize`."""
        ...
