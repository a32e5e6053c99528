"""DICOM series in and out: read CT series as HU volumes, pair two kernels, write phantom cases."""
from ltdiff_core.dicomio.cases import CaseError, PairedCase, list_cases, load_case
from ltdiff_core.dicomio.pairing import PairingError, pair_series
from ltdiff_core.dicomio.reader import Series, SeriesError, find_series, read_series
from ltdiff_core.dicomio.uids import make_uid
from ltdiff_core.dicomio.writer import StudyInfo, WrittenCase, write_phantom_case

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
