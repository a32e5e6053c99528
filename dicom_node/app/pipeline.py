"""The stages behind the receiver, composed for one process: decide, process, dispatch, retention.

A process runs the steps of its roles only (``serve --roles``, :mod:`dicom_node.app.scheduler`);
processes with different roles share the queue through the database.

Each stage is idempotent and commits every state change (through :mod:`dicom_node.store.track`)
before acting on it, so a crash at any point leaves a state a restart resumes from
(:meth:`Pipeline.recover`). :mod:`dicom_node.app.scheduler` runs the steps as interval jobs.

Growth after processing: an instance that arrives for a series that is being or has been
processed is recorded (``Instance.late``), the series is flagged ``grown_after_processing``, and
once the current job has finished the series goes back to ``received``; when it is stable again
the *whole* series is reprocessed as a new job (``version`` + 1) into a new output series. Earlier
outputs are not recalled; status shows both jobs, so there is never a silent second output.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from dicom_node.store import db, track
from dicom_node.admin import retention
from dicom_node.config import NodeConfig
from dicom_node.decide.rules import Decider
from dicom_node.dispatch.dispatcher import Dispatcher
from dicom_node.store.lease import owner_gone
from dicom_node.logs import log_event
from dicom_node.process.model import ModelCache
from dicom_node.process.processor import Processor
from dicom_node.admin.resend import retry
from dicom_node.process.stream import Streamer
from dicom_node.store.stream_cache import sweep


class Pipeline:
    """decide → process → dispatch (+ retention and admin retry) over one database."""

    def __init__(self, config: NodeConfig, database: db.Database, stop: threading.Event | None = None) -> None:
        self.config = config
        self.db = database
        self.stop = stop or threading.Event()
        self.decider = Decider(config, database)
        self.processor = Processor(config, database)
        self.dispatcher = Dispatcher(config, database, self.stop)
        self.streamer = Streamer(config, database, self.processor)
        self.resent: list[str] = []
        # Set by the scheduler: run a step now instead of at its next poll. Routing a series
        # wakes "process", a processed job wakes "send" (the polls stay, for work from other
        # processes and for retries).
        self.wake: Callable[[str], None] = lambda step: None

    @property
    def models(self) -> ModelCache:
        return self.processor.models

    @property
    def last_model(self) -> dict[str, Any]:
        return self.processor.last_model

    def recover(self) -> dict[str, int]:
        """Resume after a restart (see :func:`dicom_node.store.track.recover`); nothing received is deleted.
        On a shared database only jobs whose lease expired or whose worker on this host is gone
        are queued again; the other workers keep theirs."""
        with self.db.session() as s:
            counts = track.recover(s, exclusive=not self.db.shared, dead=owner_gone)
        if counts["requeued"] or counts["sending"] or counts["deliveries_released"]:
            log_event(track.log, "recovered", jobs_requeued=counts["requeued"], jobs_sending=counts["sending"],
                      deliveries_released=counts["deliveries_released"])
        return counts

    def scan(self) -> int:
        routed = self.decider.scan()
        if routed:
            self.wake("process")
        return routed

    def process(self) -> int:
        """One batch of queued jobs; when none waits, streaming runs (same thread, so the two never
        compete for the model, and a completed series always goes first)."""
        n = self.processor.process()
        if n:
            self.wake("send")
        if n == 0 and self.config.processing.streaming:
            self.streamer.stream(self.stop.is_set)
        elif n == 0:
            sweep(self.config, self.db)  # caches left from before streaming was turned off
        return n

    def send(self) -> int:
        return self.dispatcher.send()

    def purge(self, older_than_days: float | None = None, states: Sequence[str] | None = None) -> int:
        return retention.purge(self.config, self.db, older_than_days, states)

    def retry(self, series_uid: str | None = None, failed: bool = False, force: bool = False) -> int:
        n, self.resent = retry(self.config, self.db, series_uid, failed, force)
        return n
