"""DICOM series in and out: read CT series as HU volumes, pair two kernels, write phantom cases.

The reader and the pairing are what the service uses. The case layout and the phantom writer
(``cases``, ``writer``) need highdicom, which only the ``research`` extra installs, so their
names are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from ltdiff_core.dicomio.pairing import PairingError, pair_series
from ltdiff_core.dicomio.reader import Series, SeriesError, find_series, read_series
from ltdiff_core.dicomio.uids import make_uid

#: name -> module that defines it, imported when the name is first asked for
_LAZY = {
    "CaseError": "ltdiff_core.dicomio.cases",
    "PairedCase": "ltdiff_core.dicomio.cases",
    "list_cases": "ltdiff_core.dicomio.cases",
    "load_case": "ltdiff_core.dicomio.cases",
    "StudyInfo": "ltdiff_core.dicomio.writer",
    "WrittenCase": "ltdiff_core.dicomio.writer",
    "write_phantom_case": "ltdiff_core.dicomio.writer",
}

__all__ = [
    "CaseError",
    "PairedCase",
    "PairingError",
    "Series",
    "SeriesError",
    "StudyInfo",
    "WrittenCase",
    "find_series",
    "list_cases",
    "load_case",
    "make_uid",
    "pair_series",
    "read_series",
    "write_phantom_case",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ltdiff_core.dicomio' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
