"""APScheduler (3.x) wiring: the pipeline steps as interval jobs.

``max_instances=1`` keeps each step single-threaded (a slow batch is never run twice at once),
``coalesce=True`` collapses runs missed while a step was busy into one. The steps run in
parallel with each other, so sending never waits for a long model run.
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from .config import NodeConfig
from .pipeline import Pipeline


def build_scheduler(config: NodeConfig, pipeline: Pipeline, heartbeat: Callable[[], None]) -> BackgroundScheduler:
    """A scheduler with the completeness scan, processing, sending, retention and heartbeat jobs."""
    sched = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=5)},
        job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
        timezone="UTC",
    )
    soon = datetime.now().astimezone() + timedelta(seconds=0.5)
    poll = config.processing.poll_interval_s
    sched.add_job(pipeline.scan, "interval", seconds=config.completeness.scan_interval_s, id="completeness",
                  next_run_time=soon)
    sched.add_job(pipeline.process, "interval", seconds=poll, id="process", next_run_time=soon)
    sched.add_job(pipeline.send, "interval", seconds=poll, id="send", next_run_time=soon)
    sched.add_job(pipeline.purge, "interval", seconds=config.retention.purge_interval_s, id="retention",
                  next_run_time=soon)
    sched.add_job(heartbeat, "interval", seconds=5, id="heartbeat", next_run_time=soon)
    return sched
