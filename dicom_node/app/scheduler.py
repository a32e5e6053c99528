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

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import NodeConfig
from dicom_node.app.pipeline import Pipeline


class _Waker:
    """``Pipeline.wake``: run a step's job now rather than at its next poll. A wake while the
    step runs makes it run once more when it ends (APScheduler would skip a run requested while
    the single allowed instance is running, with a warning)."""

    def __init__(self, sched: BackgroundScheduler) -> None:
        self.sched = sched
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._again: set[str] = set()

    def step(self, step_id: str, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            while True:
                with self._lock:
                    self._running.add(step_id)
                    self._again.discard(step_id)
                try:
                    fn()
                finally:
                    with self._lock:
                        self._running.discard(step_id)
                        again = step_id in self._again
                if not again:
                    return
        return run

    def wake(self, step_id: str) -> None:
        with self._lock:
            if step_id in self._running:
                self._again.add(step_id)
                return
        job = self.sched.get_job(step_id)
        if job is not None:
            job.modify(next_run_time=datetime.now(timezone.utc))


def build_scheduler(config: NodeConfig, pipeline: Pipeline, heartbeat: Callable[[], None],
                    roles: Sequence[str] | None = None) -> BackgroundScheduler:
    """A scheduler with the heartbeat and the steps of ``roles`` (default: the configured roles)."""
    roles = config.node.roles if roles is None else roles
    sched = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=5)},
        job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
        timezone="UTC",
    )
    soon = datetime.now().astimezone() + timedelta(seconds=0.5)
    poll = config.processing.poll_interval_s
    if "decide" in roles:
        sched.add_job(pipeline.scan, "interval", seconds=config.completeness.scan_interval_s, id="completeness",
                      next_run_time=soon)
        sched.add_job(pipeline.purge, "interval", seconds=config.retention.purge_interval_s, id="retention",
                      next_run_time=soon)
    waker = _Waker(sched)
    if "process" in roles:
        sched.add_job(waker.step("process", pipeline.process), "interval", seconds=poll, id="process",
                      next_run_time=soon)
    if "dispatch" in roles:
        sched.add_job(waker.step("send", pipeline.send), "interval", seconds=poll, id="send", next_run_time=soon)
    pipeline.wake = waker.wake
    sched.add_job(heartbeat, "interval", seconds=5, id="heartbeat", next_run_time=soon)
    return sched
