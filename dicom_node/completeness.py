"""Decide when a received series is complete.

DICOM has no "end of series" message, so completeness is a quiet-time guess: a series is complete
when no instance arrived for ``stable_age_s``; when the header gives an expected instance count
(Images in Acquisition, 0020,1002) and ``use_expected_count`` is on, reaching it completes the
series earlier. Both rules are pure functions of recorded values, so they are easy to test and
give the same answer after a restart.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .config import Completeness


@dataclass(frozen=True)
class SeriesProgress:
    """What the completeness rule needs to know about one series."""

    instance_count: int
    expected_count: int | None
    last_received_at: datetime


def completeness_reason(p: SeriesProgress, cfg: Completeness, now: datetime) -> str | None:
    """``"expected_count"`` or ``"stable_age"`` when the series is complete, else ``None``."""
    if cfg.use_expected_count and p.expected_count and p.instance_count >= p.expected_count:
        return "expected_count"
    if (now - p.last_received_at).total_seconds() >= cfg.stable_age_s:
        return "stable_age"
    return None
