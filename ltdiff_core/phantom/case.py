"""The in-memory result of one phantom case: what the DICOM writer and the trainers consume."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class PhantomCase:
    """One synthetic acquisition reconstructed with two kernels (and optionally a rescan).

    All volumes are ``(Z, Y, X)``; ``spacing`` is ``(dz, dy, dx)`` in mm with ``dz`` equal to
    the slice thickness (contiguous slices). HU arrays are float32 holding integer values
    (the reconstructions are rounded as int16 storage would be). ``rescan``, when present, is a
    second Bl64-like image of the same truth, dose and IR strength with its own noise draw: the
    reference of what an ideal standardizer can reach (written as kernel ``RESCAN``).
    """

    br40: np.ndarray
    bl64: np.ndarray
    truth: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    tumour_masks: list[np.ndarray]
    tumour_info: list[dict[str, Any]]
    spacing: tuple[float, float, float]
    meta: dict[str, Any] = field(default_factory=dict)
    rescan: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.br40.shape)  # type: ignore[return-value]
