"""APScheduler (3.x) wiring: the pipeline steps as interval jobs.

``max_instances=1`` keeps each step single-threaded (a slow batch is never run twice at once),
``coalesce=True`` collapses runs missed while a step was busy into one. A routed series wakes the
process step and a processed job the send step at once (``Pipeline.wake``); the polls remain for
work queued by other processes and for retries that come due. The steps run in
parallel with each other, so sending never waits for a long model run. Only the steps of the
process's roles are scheduled: ``decide`` (completeness scan, retention), ``process``, ``dispatch``.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_STOPPED

from dicom_node.config import NodeConfig
from dicom_node.app.pipeline import Pipeline
from dicom_node.store.heartbeat import HEARTBEAT_S


class _Waker:
    """``Pipeline.wake``: run a step's job now rather than at its next poll. A wake while the
    step runs makes it run once more when it ends (APScheduler would skip a run requested while
    the single allowed instance is running, with a warning).

    Every scheduled job runs through :meth:`step`, so the waker knows which are running. That is
    what makes shutdown safe: APScheduler's ``shutdown(wait=True)`` holds its job-store lock while
    it waits for running jobs, and a finishing step that wakes another (``get_job`` needs that
    lock) would wait for it forever. :meth:`close` makes wakes no-ops and waits for the running
    steps itself, before the scheduler is shut down."""

    def __init__(self, sched: BackgroundScheduler) -> None:
        self.sched = sched
        self._lock = threading.Condition()
        self._running: set[str] = set()
        self._again: set[str] = set()
        self._closed = False

    def step(self, step_id: str, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    self._running.add(step_id)
                    self._again.discard(step_id)
                try:
                    fn()
                finally:
                    with self._lock:
                        self._running.discard(step_id)
                        again = step_id in self._again and not self._closed
                        self._lock.notify_all()
                if not again:
                    return
        return run

    def wake(self, step_id: str) -> None:
        with self._lock:
            if self._closed:
                return
            if step_id in self._running:
                self._again.add(step_id)
                return
        job = self.sched.get_job(step_id)
        if job is not None:
            job.modify(next_run_time=datetime.now(timezone.utc))

    def close(self) -> None:
        """No more runs or wakes; returns when the steps that are running have finished."""
        with self._lock:
            self._closed = True
            self._again.clear()
            while self._running:
                self._lock.wait(1.0)


class StepScheduler(BackgroundScheduler):
    """APScheduler's background scheduler whose jobs all run through one :class:`_Waker`, and
    whose ``shutdown(wait=True)`` waits for the running steps before APScheduler takes its lock."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.waker = _Waker(self)

    def shutdown(self, wait: bool = True) -> None:
        if wait and self.state != STATE_STOPPED:
            self.pause()  # no new runs are submitted
            self.waker.close()
        super().shutdown(wait=wait)


def build_scheduler(config: NodeConfig, pipeline: Pipeline, heartbeat: Callable[[], None],
                    roles: Sequence[str] | None = None) -> StepScheduler:
    """A scheduler with the heartbeat and the steps of ``roles`` (default: the configured roles)."""
    roles = config.node.roles if roles is None else roles
    sched = StepScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=5)},
        job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
        timezone="UTC",
    )
    waker = sched.waker
    soon = datetime.now().astimezone() + timedelta(seconds=0.5)
    poll = config.processing.poll_interval_s
    if "decide" in roles:
        sched.add_job(waker.step("completeness", pipeline.scan), "interval",
                      seconds=config.completeness.scan_interval_s, id="completeness", next_run_time=soon)
        sched.add_job(waker.step("retention", pipeline.purge), "interval", seconds=config.retention.purge_interval_s,
                      id="retention", next_run_time=soon)
    if "process" in roles:
        sched.add_job(waker.step("process", pipeline.process), "interval", seconds=poll, id="process",
                      next_run_time=soon)
    if "dispatch" in roles:
        sched.add_job(waker.step("send", pipeline.send), "interval", seconds=poll, id="send", next_run_time=soon)
    pipeline.wake = waker.wake
    sched.add_job(waker.step("heartbeat", heartbeat), "interval", seconds=HEARTBEAT_S, id="heartbeat",
                  next_run_time=soon)
    return sched
