"""Explicit mapping of every extracted feature name to one feature class of the reference papers.

Feature names have the form ``<imagetype>_<family>_<Feature>`` (PyRadiomics) or
``goh_<Feature>`` / ``ih_<Feature>`` (computed here). Mapping:

=========  ====================================================================================
Class      Features
=========  ====================================================================================
GOH        ``goh_*`` (magnitude-weighted gradient-orientation histogram statistics) and
           ``gradient_firstorder_*`` (PyRadiomics first order of the ``Gradient`` image)
GLCM       ``original_glcm_*``
GLRLM      ``original_glrlm_*``
ID         ``original_firstorder_*`` except Entropy and Uniformity: statistics of the raw HU
           values, no discretisation
IH         ``original_firstorder_Entropy``, ``original_firstorder_Uniformity`` (the only
           PyRadiomics first-order features that use the binned image) and ``ih_*``
           (IBSI intensity-histogram features on the fixed-bin-width histogram)
NID        ``original_ngtdm_*`` (neighbourhood intensity difference)
GLSZM      ``original_glszm_*`` (extra class, not in the papers' tables)
GLDM       ``original_gldm_*`` (extra class, not in the papers' tables)
=========  ====================================================================================

Shape features are excluded: standard and candidate share the same masks, so they agree by
construction. Any other name raises ``KeyError`` rather than silently joining a class.
"""
from __future__ import annotations

PAPER_CLASSES = ("GOH", "GLCM", "GLRLM", "ID", "IH", "NID")
EXTRA_CLASSES = ("GLSZM", "GLDM")
ALL_CLASSES = PAPER_CLASSES + EXTRA_CLASSES

_BINNED_FIRSTORDER = {"Entropy", "Uniformity"}
_FAMILY_CLASS = {
    "glcm": "GLCM",
    "glrlm": "GLRLM",
    "ngtdm": "NID",
    "glszm": "GLSZM",
    "gldm": "GLDM",
}


def feature_class(name: str) -> str:
    """Class of one feature name; ``KeyError`` for shape or unknown features."""
    parts = name.split("_")
    if parts[0] == "goh" and len(parts) == 2:
        return "GOH"
    if parts[0] == "ih" and len(parts) == 2:
        return "IH"
    if len(parts) != 3:
        raise KeyError(f"unrecognised feature name {name!r}")
    image_type, family, feature = parts
    if image_type == "gradient" and family == "firstorder":
        return "GOH"
    if image_type != "original":
        raise KeyError(f"no class for image type of {name!r}")
    if family == "firstorder":
        return "IH" if feature in _BINNED_FIRSTORDER else "ID"
    if family in _FAMILY_CLASS:
        return _FAMILY_CLASS[family]
    raise KeyError(f"feature {name!r} belongs to no evaluated class (shape features are excluded)")


def class_index(names: list[str]) -> dict[str, list[int]]:
    """Column indices of each class, in ``ALL_CLASSES`` order (empty classes kept)."""
    out: dict[str, list[int]] = {c: [] for c in ALL_CLASSES}
    for j, n in enumerate(names):
        out[feature_class(n)].append(j)
    return out
