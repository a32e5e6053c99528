"""The node's side of the model seam: loaded models, their random-stream keys, and what of their
:class:`~ltdiff_core.kernel_model.ModelInfo` goes into an output's provenance.

The node sees a model only as a :class:`~ltdiff_core.kernel_model.KernelModel`, whatever its
method; the service and ``dicom-node standardize`` record the same sampler settings and
derivation, so an offline result and a PACS result of the same input differ only in their UIDs
and creation times.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ltdiff_core.kernel_model import KernelModel, ModelInfo

from dicom_node.logs import log_event

if TYPE_CHECKING:
    from dicom_node.derive.series import DerivationInfo

log = logging.getLogger("dicom_node.process.model")


class ModelCache:
    """Models loaded once per worker process, keyed by the rule's ``model``: loading the weights
    (and moving them to the GPU) costs far more than one series."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._models: dict[str, KernelModel] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> KernelModel:
        """``model``: ``"default"``, a shipped name or a checkpoint path; raises ``CheckpointError``."""
        with self._lock:
            if model not in self._models:
                from ltdiff_core import Standardizer  # heavy (torch): imported on first use only

                t0 = time.monotonic()
                loaded = Standardizer.from_checkpoint(model, device=self.device)
                self._models[model] = loaded
                info = loaded.info
                log_event(log, "model_loaded", model=model, name=info.name, version=info.version,
                          sha256=info.sha256[:16], device=info.device, seconds=round(time.monotonic() - t0, 2))
            return self._models[model]

    def put(self, model: str, loaded: KernelModel) -> None:
        """Use ``loaded`` for ``model`` from now on (a model built in memory rather than from a file)."""
        with self._lock:
            self._models[model] = loaded

    def loaded(self) -> list[str]:
        return list(self._models)


def series_slice_keys(series: Any, seed: int) -> list[int]:
    """One random-stream key per slice from its SOPInstanceUID (``ltdiff_core.standardizer``), so a
    slice's output does not depend on which other slices are present (streamed, whole, offline)."""
    from ltdiff_core.standardizer import uid_slice_key

    return [uid_slice_key(seed, str(ds.SOPInstanceUID)) for ds in series.datasets]


def sampler_parameters(info: ModelInfo, steps: int | None, seed: int) -> dict[str, Any]:
    """The sampler settings recorded in the output: effective steps, seed and model defaults."""
    params: dict[str, Any] = {"steps": steps if steps is not None else info.default_steps, "seed": seed,
                              "strength": info.strength, "variant": info.variant}
    return {k: v for k, v in params.items() if v is not None}


def derivation_info(info: ModelInfo, *, sampler: dict[str, Any], uid_root: str | None) -> DerivationInfo:
    """``DerivationInfo`` of the output series: the model that made its pixels and how it ran."""
    from dicom_node.derive.series import DerivationInfo

    return DerivationInfo(model_name=info.name or "unknown", model_version=info.version or "unknown",
                          model_sha256=info.sha256, method=info.method or "unknown", sampler=sampler,
                          device=info.device, uid_root=uid_root)
