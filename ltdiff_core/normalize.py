"""HU <-> network-space mapping shared by training and inference.

A single linear map (``x = HU / 1000``) keeps noise texture linear in the network input: a
window or clipping inside the body range would distort exactly the noise statistics the
kernel conversion has to change. Values outside the CT-storable range are clamped only to
protect against padding or corrupt pixels.
"""
from __future__ import annotations

from typing import Any

import numpy as np

HU_SCALE = 1000.0
HU_MIN = -1024.0
HU_MAX = 3071.0

NORMALIZATION: dict[str, Any] = {
    "kind": "linear",
    "scale_hu": HU_SCALE,
    "clamp_hu": [HU_MIN, HU_MAX],
}


def hu_to_unit(hu: np.ndarray, norm: dict[str, Any] | None = None) -> np.ndarray:
    """Map HU to network space (clamped to the storable range, then scaled)."""
    norm = norm or NORMALIZATION
    lo, hi = norm["clamp_hu"]
    return (np.clip(np.asarray(hu, dtype=np.float32), lo, hi) / float(norm["scale_hu"])).astype(np.float32)


def unit_to_hu(x: np.ndarray, norm: dict[str, Any] | None = None) -> np.ndarray:
    """Inverse of :func:`hu_to_unit` (output is clamped to the storable range too)."""
    norm = norm or NORMALIZATION
    lo, hi = norm["clamp_hu"]
    return np.clip(np.asarray(x, dtype=np.float32) * float(norm["scale_hu"]), lo, hi).astype(np.float32)


def check_normalization(norm: dict[str, Any]) -> None:
    """Raise ``ValueError`` if a stored normalisation is not one this code can reproduce."""
    if norm.get("kind") != "linear":
        raise ValueError(f"unsupported normalization kind {norm.get('kind')!r}")
    if "scale_hu" not in norm or "clamp_hu" not in norm or len(norm["clamp_hu"]) != 2:
        raise ValueError("normalization needs 'scale_hu' and 'clamp_hu' [lo, hi]")
