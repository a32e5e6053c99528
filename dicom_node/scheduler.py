"""APScheduler (3.x) wiring: the pipeline steps as interval jobs.

``max_instances=1`` keeps each step single-threaded (a slow batch is never run twice at once),
``coalesce=True`` collapses runs missed while a step was busy into one. The steps run in
parallel with each other, so sending never waits for a long model run. Only the steps of the
process's roles are scheduled: ``decide`` (completeness scan, retention), ``process``, ``dispatch``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from .config import NodeConfig
from .pipeline import Pipeline


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
    if "process" in roles:
        sched.add_job(pipeline.process, "interval", seconds=poll, id="process", next_run_time=soon)
    if "dispatch" in roles:
        sched.add_job(pipeline.send, "interval", seconds=poll, id="send", next_run_time=soon)
    sched.add_job(heartbeat, "interval", seconds=5, id="heartbeat", next_run_time=soon)
    return sched
