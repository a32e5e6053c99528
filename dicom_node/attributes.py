"""The series attributes the node records from the first instance's header, by DICOM keyword.

One map serves the receiver (which fills the series row from the header) and the routing rules
(which match on the same keywords), so a rule can only name an attribute that is recorded.
"""
from __future__ import annotations

from pydicom.dataset import Dataset

# DICOM keyword -> (series column, column size)
SERIES_ATTRIBUTES: dict[str, tuple[str, int]] = {
    "Modality": ("modality", 16),
    "ConvolutionKernel": ("convolution_kernel", 64),
    "Manufacturer": ("manufacturer", 64),
    "ManufacturerModelName": ("manufacturer_model", 64),
    "BodyPartExamined": ("body_part", 64),
    "SeriesDescription": ("series_description", 128),
    "StationName": ("station_name", 64),
    "SeriesNumber": ("series_number", 16),
}
# Not from the header: the sending AE title of the association that opened the series.
CALLING_AE = "calling_ae"
# What a routing rule may match on.
MATCH_KEYS: tuple[str, ...] = tuple(k for k in SERIES_ATTRIBUTES if k != "SeriesNumber") + (CALLING_AE,)


def header_text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    """A header value as text (multi-valued joined with a backslash), cut to the column size;
    ``None`` when absent or undecodable (a malformed optional element never fails the instance)."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value)[:limit]


def header_int(ds: Dataset, keyword: str | tuple[int, int]) -> int | None:
    try:
        elem = ds.get(keyword)
        value = elem.value if hasattr(elem, "value") else elem
        return int(value) if value not in (None, "") else None
    except Exception:
        return None


def series_attributes(series: object) -> dict[str, str | None]:
    """The matchable attributes of a :class:`dicom_node.store.db.Series` row, by DICOM keyword."""
    out = {k: getattr(series, column, None) for k, (column, _) in SERIES_ATTRIBUTES.items() if k in MATCH_KEYS}
    out[CALLING_AE] = getattr(series, "calling_ae", None)
    return out
