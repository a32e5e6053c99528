"""Dispatch: send each finished job's output to its destinations, with the retry policy.

A delivery is one job's output series to one destination; each attempt is one association
(:mod:`dicom_node.dispatch.scu`) or, for a ``type = "stow-rs"`` destination, one batch of STOW-RS POSTs
(:mod:`dicom_node.dispatch.stow`); :func:`dicom_node.dispatch.senders.sender_for` picks the sender. Per-instance
send state is committed as each C-STORE (or STOW-RS batch) response arrives, so a crash never
sends an acknowledged instance twice. Failures are classified by the
sender: permanent ones (rejected association, no accepted context, 0xA9xx/0xCxxx) end the
delivery at once; transient ones are retried with capped exponential backoff until
``max_retries`` or the time budget ``retry_for_s`` is spent (the last attempt is made at the end
of the budget). When every delivery of a job is final, :func:`dicom_node.store.track.finish` closes it.

Several dispatchers may share one queue: each attempt claims its delivery with a lease
(:func:`dicom_node.store.track.claim_delivery`, renewed while sending), so one dispatcher sends a
delivery at a time; a dispatcher that dies leaves it to another once the lease has expired, and
the per-instance send state committed so far keeps the instances already acknowledged from
being sent again.
"""
from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

from dicom_node.store import db, track
from dicom_node.audit import audit_for
from dicom_node.config import NodeConfig
from dicom_node.store.lease import LeaseKeeper, worker_id
from dicom_node.logs import log_event
from dicom_node.negotiation import PERMANENT
from dicom_node.dispatch.senders import sender_for

log = logging.getLogger("dicom_node.dispatch.dispatcher")


def retry_delay(dest: Any, attempts: int) -> float:
    """Capped exponential backoff: ``backoff_base_s * 2^(attempts-1)``, at most ``backoff_max_s``."""
    return float(min(dest.backoff_base_s * 2 ** min(attempts - 1, 30), dest.backoff_max_s))


class Dispatcher:
    """The scheduled dispatch step: ``sending -> done | failed(reason)``."""

    def __init__(self, config: NodeConfig, database: db.Database, stop: threading.Event | None = None) -> None:
        self.config = config
        self.db = database
        self.stop = stop or threading.Event()
        self.audit = audit_for(config)
        self.owner = worker_id("dispatch")
        self.lease_s = config.node.lease_s
        self.leases = LeaseKeeper(database, db.Delivery, self.owner, self.lease_s)

    def send(self) -> int:
        """Attempt every delivery that is due; returns the number of associations made."""
        done = 0
        while not self.stop.is_set():
            with self.db.session() as s:
                d = track.claim_delivery(s, db.utcnow(), self.owner, self.lease_s)
                if d is None:
                    return done
                delivery_id, name = d.id, d.destination
                todo = [(x.id, x.path) for x in d.sends if x.state != db.SENT]
            self.leases.hold(delivery_id)
            try:
                self._attempt(delivery_id, name, todo)
            finally:
                self.leases.drop(delivery_id)
            done += 1
        return done

    def _attempt(self, delivery_id: int, name: str, todo: list[tuple[int, str]]) -> None:
        try:
            dest = self.config.destination(name)
        except KeyError:
            dest = None
        attempt_at = db.utcnow()

        def commit_one(k: int, res: Any) -> None:
            """Commit one instance's C-STORE result as its response arrives: a crash after this
            point never sends the instance again."""
            if not res.ok:
                return
            with self.db.session() as s:
                track.instance_sent(s, todo[k][0], res.status, db.utcnow())

        if dest is None:
            outcome_error, failure, results = f"destination {name!r} is no longer configured", PERMANENT, []
        else:
            outcome = sender_for(dest)(dest, [self.config.output_dir / p for _, p in todo], self.config.ae_title,
                                       self.config.max_pdu, on_result=commit_one)
            outcome_error, failure, results = outcome.error, outcome.failure, outcome.results
        now = db.utcnow()
        with self.db.session() as s:
            d = s.get(db.Delivery, delivery_id, with_for_update=True)
            if d is None or d.claimed_by != self.owner:
                # The lease expired while this attempt ran and another dispatcher holds the
                # delivery now: its attempt records the outcome (acknowledged instances are committed).
                log_event(log, "delivery_lease_lost", level=logging.WARNING, delivery=delivery_id,
                          claimed_by=d.claimed_by if d is not None else None)
                return
            track.release_delivery(d)
            d.attempts += 1
            by_id = {x.id: x for x in d.sends}
            for (send_id, _), res in zip(todo, results):
                row = by_id[send_id]
                if res.ok:
                    continue  # committed by commit_one
                if res.status is None and res.error and ("not established" in res.error
                                                         or "no presentation context" in res.error):
                    pass  # never reached the destination: not an attempt for this instance
                else:
                    row.attempts += 1
                row.status = res.status
                row.error = res.error
                if failure == PERMANENT and res.status is not None:
                    row.state = db.FAILED
            if failure is None and all(x.state == db.SENT for x in d.sends):
                d.state, d.finished_at, d.error = db.SENT, now, None
            elif failure == PERMANENT:
                d.state, d.finished_at, d.error = db.FAILED, now, f"permanent: {outcome_error}"
            else:
                first = d.started_at or attempt_at
                elapsed = (now - first).total_seconds()
                budget = dest.retry_for_s if dest else 0.0
                retries = dest.max_retries if dest else 0
                # The last attempt is made at the end of the budget, not skipped because the
                # backoff would overshoot it.
                delay = min(retry_delay(dest, d.attempts), max(budget - elapsed, 0.0)) if dest else 0.0
                if (retries is not None and d.attempts > retries) or elapsed >= budget:
                    d.state, d.finished_at = db.FAILED, now
                    limit = (f"{retries} retries" if retries is not None and d.attempts > retries
                             else f"retry budget {budget:.0f} s")
                    d.error = f"gave up after {d.attempts} attempts in {elapsed:.0f} s ({limit}): {outcome_error}"
                else:
                    d.next_attempt_at = now + timedelta(seconds=delay)
                    of = f"/{retries}" if retries is not None else ""
                    d.error = (f"retry {d.attempts}{of} in {delay:g} s ({budget - elapsed:.0f} s of the retry budget "
                               f"left): {outcome_error}")
                    log_event(log, "delivery_retry", level=logging.WARNING, destination=name, job=d.job_id,
                              attempt=d.attempts, delay_s=delay, error=outcome_error)
            job = d.job
            states = [x.state for x in job.deliveries]
            if all(st in (db.SENT, db.FAILED) for st in states):
                errors = [f"{x.destination}: {x.error}" for x in job.deliveries if x.state == db.FAILED]
                track.finish(job, self.audit, now, "; ".join(errors) if errors else None)
