"""Kernel standardization core: phantom, DICOM I/O, models, sampling and evaluation.

Heavy members are imported lazily so that ``import ltdiff_core`` stays cheap (no torch).
"""
from __future__ import annotations

from typing import Any

__all__ = ["Standardizer", "CheckpointError"]


def __getattr__(name: str) -> Any:
    if name == "Standardizer":
        from .standardizer import Standardizer

        return Standardizer
    if name == "CheckpointError":
        from .checkpoint import CheckpointError

        return CheckpointError
    raise AttributeError(f"module 'ltdiff_core' has no attribute {name!r}")
