"""Decide: when a received series is complete, and what to do with it.

Completeness: DICOM has no "end of series" message, so a series is complete when no instance
arrived for ``stable_age_s``; when the header gives an expected instance count (Images in
Acquisition, 0020,1002) and ``use_expected_count`` is on, reaching it completes the series
earlier. Both are pure functions of recorded values, so they give the same answer after a restart.

Routing: the first matching rule wins (standardize with model X to destinations Y, or ignore); a
series no rule matches is kept and shown as ``unrouted``. ``SeriesDescription`` values are regular
expressions (searched, case-insensitive); every other attribute is a shell-style pattern
(``Br40*``, case-sensitive as DICOM code strings are); a list means "any of these".
Multi-valued attributes (ConvolutionKernel ``Br40\\3``) match on the full or the first value.
Before a series is queued, series-level checks (:mod:`dicom_node.decide.anomalies`) may refuse it.
Series rows are locked while decided (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two decide
processes sharing a queue never route the same series twice.

Streaming (``processing.streaming``): rules match attributes that are fixed per series, so a
``received`` series is routed on its first instances into a ``streaming`` job
(:mod:`dicom_node.process.stream` standardizes its settled slices while the rest arrives). Completion is
decided exactly as without streaming: the series checks then run on the whole series, and a
series that is refused, ignored or unrouted at that point loses its streaming job and cache.

A job takes everything the processing uses from its rule when it is routed (model, destinations,
seed, sampler steps, QA mode: :func:`frozen_settings`), so editing a rule later changes only the
series routed after the edit.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from dicom_node.store import db, track
from dicom_node.decide.anomalies import SeriesCheck, check_series
from dicom_node.attributes import series_attributes
from dicom_node.logs import log_event
from dicom_node.store.stream_cache import remove_caches

if TYPE_CHECKING:
    from dicom_node.config import Completeness, NodeConfig, Rule

log = logging.getLogger("dicom_node.decide.rules")

# Anomalies recorded by the receiver (kept when a series is checked again after it grew).
RECEIVE_ANOMALIES = ("duplicate", "conflict", "late")


@dataclass(frozen=True)
class SeriesProgress:
    """What the completeness rule needs to know about one series."""

    instance_count: int
    expected_count: int | None
    last_received_at: datetime
    retry_requested_at: datetime | None = None


def completeness_reason(p: SeriesProgress, cfg: Completeness, now: datetime) -> str | None:
    """``"expected_count"``, ``"stable_age"`` or ``"retry"`` (re-opened by ``dicom-node retry``
    with no instance since) when the series is complete, else ``None``."""
    if p.retry_requested_at is not None and p.retry_requested_at >= p.last_received_at:
        return "retry"
    if cfg.use_expected_count and p.expected_count and p.instance_count >= p.expected_count:
        return "expected_count"
    if (now - p.last_received_at).total_seconds() >= cfg.stable_age_s:
        return "stable_age"
    return None


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


def frozen_settings(rule: Rule, config: NodeConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`dicom_node.store.track.queue` / ``start_stream`` for a
    standardize rule: what the job keeps from the rule and the processing defaults."""
    return {"rule_name": rule.name, "model": rule.model, "destinations": rule.destinations,
            "seed": rule.seed if rule.seed else config.processing.seed,
            "steps": rule.steps if rule.steps else config.processing.steps}


class Decider:
    """The scheduled decide step: ``received -> complete -> queued | ignored | unrouted | refused``."""

    def __init__(self, config: NodeConfig, database: db.Database) -> None:
        from dicom_node.audit import audit_for

        self.config = config
        self.db = database
        self.audit = audit_for(config)

    def scan(self) -> int:
        """Mark stable series ``complete``, then route complete series; returns how many were routed.

        Two commits, so ``complete`` is a persisted state: a series completed just before a crash
        is routed by the next scan after the restart.
        """
        now = db.utcnow()
        cfg = self.config.completeness
        with self.db.session() as s:
            for series in s.scalars(select(db.Series).where(db.Series.state == db.RECEIVED)
                                    .with_for_update(skip_locked=True, of=db.Series)):
                reason = completeness_reason(
                    SeriesProgress(series.instance_count, series.expected_count, series.last_received_at,
                                   series.retry_requested_at), cfg, now
                )
                if reason is not None:
                    track.complete(series, self.audit, reason, now)
        routed = self.route()
        if self.config.processing.streaming:
            self.start_streams()
        return routed

    def start_streams(self) -> int:
        """A ``streaming`` job for every ``received`` series that a standardize rule matches and
        that has none yet; returns how many were started."""
        now = db.utcnow()
        started = 0
        with self.db.session() as s:
            for series in s.scalars(select(db.Series).where(db.Series.state == db.RECEIVED)):
                if track.streaming_job(series) is not None:
                    continue
                if any(j.state in (db.QUEUED, db.PROCESSING, db.SENDING) for j in series.jobs):
                    continue  # grown while its job runs: reprocessed whole once that job has finished
                rule = match_rule(self.config.rules, series_attributes(series))
                if rule is None or rule.action == "ignore":
                    continue
                track.start_stream(s, series, **frozen_settings(rule, self.config), now=now)
                started += 1
        return started

    def route(self) -> int:
        """Apply the first matching rule to every ``complete`` series."""
        now = db.utcnow()
        decided = 0
        dropped: list[int] = []
        with self.db.session() as s:
            for series in s.scalars(select(db.Series).where(db.Series.state == db.COMPLETE)
                                    .with_for_update(skip_locked=True, of=db.Series)):
                rule = match_rule(self.config.rules, series_attributes(series))
                decided += 1
                try:
                    check = self._check(s, series) if rule is not None and rule.action != "ignore" else None
                except Exception as exc:  # one odd series must never stop the routing of the others
                    log.exception("series check failed")
                    check = SeriesCheck(refusal=f"series check failed: {type(exc).__name__}: {exc}"[:500])
                name = rule.name if rule else None
                if check is not None and check.refusal is not None:
                    track.refuse_series(series, self.audit, name, check.refusal)
                elif check is not None and check.all_excluded:
                    track.ignore(series, name, "localizer series: kept, not standardized")
                elif rule is None:
                    track.unroute(series)
                elif rule.action == "ignore":
                    track.ignore(series, rule.name)
                else:
                    track.queue(s, series, **frozen_settings(rule, self.config), qa_mode=rule.qa, now=now)
                if series.state != db.QUEUED:
                    dropped += track.drop_stream(s, series, series.state)
                log_event(log, "series_complete", series_uid=series.series_uid, instances=series.instance_count,
                          reason=series.complete_reason, rule=series.rule_name, state=series.state,
                          grown_after_processing=series.grown_after_processing)
        if dropped:
            remove_caches(self.config, dropped)
        return decided

    def _check(self, s: Any, series: db.Series) -> SeriesCheck:
        """Series-level checks, recorded on the series; findings of an earlier check of the same
        series (before it grew) are replaced."""
        check = check_series([(i.sop_instance_uid, self.config.spool_dir / i.path) for i in series.instances],
                             self.config.processing.max_matrix)
        for a in list(series.anomalies):
            if a.kind not in RECEIVE_ANOMALIES:
                s.delete(a)
        for kind, uid, detail in check.findings:
            series.anomalies.append(db.Anomaly(kind=kind, sop_instance_uid=uid, detail=detail))
        for inst in series.instances:
            inst.excluded = check.excluded.get(inst.sop_instance_uid)
        if check.findings:
            log_event(log, "series_anomalies", level=logging.WARNING, series_uid=series.series_uid,
                      kinds=",".join(sorted({k for k, _, _ in check.findings})), refusal=check.refusal)
        return check
