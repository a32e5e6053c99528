"""Routing: map a complete series to an action (standardize with model X to destinations Y, or
ignore). The first matching rule wins; a series no rule matches is kept and shown as
``unrouted`` (never silently dropped).

Matching: ``SeriesDescription`` values are regular expressions (searched, case-insensitive);
every other attribute is a shell-style pattern (``Br40*``, case-sensitive as DICOM code strings
are); a list of values means "any of these". Multi-valued attributes (ConvolutionKernel can be
``Br40\\3``) match on the full value or on their first value.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

from .config import Rule


def series_attributes(series: object) -> dict[str, str | None]:
    """The matchable attributes of a :class:`dicom_node.db.Series` row, by DICOM keyword."""
    return {
        "Modality": getattr(series, "modality", None),
        "ConvolutionKernel": getattr(series, "convolution_kernel", None),
        "Manufacturer": getattr(series, "manufacturer", None),
        "ManufacturerModelName": getattr(series, "manufacturer_model", None),
        "BodyPartExamined": getattr(series, "body_part", None),
        "SeriesDescription": getattr(series, "series_description", None),
        "StationName": getattr(series, "station_name", None),
        "calling_ae": getattr(series, "calling_ae", None),
    }


def _value_matches(key: str, pattern: str, value: str | None) -> bool:
    if value is None:
        return False
    if key == "SeriesDescription":
        return re.search(pattern, value, flags=re.IGNORECASE) is not None
    candidates = {value, value.split("\\")[0]}
    return any(fnmatch.fnmatchcase(v.strip(), pattern) for v in candidates)


def rule_matches(rule: Rule, attrs: Mapping[str, str | None]) -> bool:
    """All of the rule's attributes must match (each one: any of its patterns)."""
    return all(any(_value_matches(k, p, attrs.get(k)) for p in patterns) for k, patterns in rule.match.items())


def match_rule(rules: Sequence[Rule], attrs: Mapping[str, str | None]) -> Rule | None:
    """The first rule that matches, or ``None`` (the series is then ``unrouted``)."""
    for rule in rules:
        if rule_matches(rule, attrs):
            return rule
    return None
