"""Dispatch: send each finished job's output to its destinations, with the retry policy.

A delivery is one job's output series to one destination; each attempt is one association
(:mod:`dicom_node.dispatch.scu`) or, for a ``type = "stow-rs"`` destination, one batch of STOW-RS POSTs
(:mod:`dicom_node.dispatch.stow`); :func:`dicom_node.dispatch.senders.sender_for` picks the sender. Per-instance
send state is committed as each C-STORE (or STOW-RS batch) response arrives, so a crash never
sends an acknowledged instance twice. Failures are classified by the
sender: permanent ones (rejected association, no accepted context, 0xA9xx/0xCxxx, an abort by
the destination's application before it answered anything) end the delivery at once; transient ones are retried with capped exponential backoff until
``max_retries`` or the time budget ``retry_for_s`` is spent (the last attempt is made at the end
of the budget). When every delivery of a job is final, :func:`dicom_node.store.track.close_if_delivered`
closes it. This module owns that policy only: it decides from the outcome's typed fields
(:mod:`dicom_node.dispatch.outcome`) and every row it changes is changed by a function of
:mod:`dicom_node.store.track`.

Several dispatchers may share one queue: each attempt claims its delivery with a lease
(:func:`dicom_node.store.track.claim_delivery`, renewed while sending), so one dispatcher sends a
delivery at a time; a dispatcher that dies leaves it to another once the lease has expired, and
the per-instance send state committed so far keeps the instances already acknowledged from
being sent again.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from dicom_node.store import db, track
from dicom_node.audit import audit_for
from dicom_node.config import Destination, NodeConfig
from dicom_node.store.lease import LeaseKeeper, worker_id
from dicom_node.logs import log_event
from dicom_node.negotiation import PERMANENT
from dicom_node.dispatch.outcome import InstanceResult, SendOutcome
from dicom_node.dispatch.senders import sender_for

log = logging.getLogger("dicom_node.dispatch.dispatcher")


def retry_delay(dest: Any, attempts: int) -> float:
    """Capped exponential backoff: ``backoff_base_s * 2^(attempts-1)``, at most ``backoff_max_s``."""
    return float(min(dest.backoff_base_s * 2 ** min(attempts - 1, 30), dest.backoff_max_s))


@dataclass(frozen=True)
class NextStep:
    """What the retry policy makes of an attempt: ``state`` sent, failed or pending (due again
    after ``delay_s``), with the delivery's error text."""

    state: str
    error: str | None = None
    delay_s: float = 0.0


def next_step(dest: Destination | None, outcome: SendOutcome, attempts: int, elapsed: float,
              all_sent: bool) -> NextStep:
    """The retry policy. ``attempts`` counts this one, ``elapsed`` is the time since the first
    attempt, ``all_sent`` whether every instance is acknowledged now. Permanent failures end the
    delivery; transient ones are retried until ``max_retries`` or ``retry_for_s``, and the last
    attempt is made at the end of the budget, not skipped because the backoff would overshoot it."""
    if outcome.failure is None and all_sent:
        return NextStep(db.SENT)
    if outcome.failure == PERMANENT or dest is None:
        return NextStep(db.FAILED, f"permanent: {outcome.error}")
    budget, retries = dest.retry_for_s, dest.max_retries
    delay = min(retry_delay(dest, attempts), max(budget - elapsed, 0.0))
    if (retries is not None and attempts > retries) or elapsed >= budget:
        limit = f"{retries} retries" if retries is not None and attempts > retries else f"retry budget {budget:.0f} s"
        return NextStep(db.FAILED, f"gave up after {attempts} attempts in {elapsed:.0f} s ({limit}): {outcome.error}")
    of = f"/{retries}" if retries is not None else ""
    return NextStep(db.PENDING, f"retry {attempts}{of} in {delay:g} s ({budget - elapsed:.0f} s of the retry budget "
                                f"left): {outcome.error}", delay)


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

        def commit_one(k: int, res: InstanceResult) -> None:
            """Commit one instance's C-STORE result as its response arrives: a crash after this
            point never sends the instance again."""
            if not res.ok:
                return
            with self.db.session() as s:
                track.instance_sent(s, todo[k][0], res.status, db.utcnow())

        if dest is None:
            outcome = SendOutcome(failure=PERMANENT, error=f"destination {name!r} is no longer configured")
        else:
            outcome = sender_for(dest)(dest, [self.config.output_dir / p for _, p in todo], self.config.ae_title,
                                       self.config.max_pdu, on_result=commit_one)
        now = db.utcnow()
        with self.db.session() as s:
            d = track.owned_delivery(s, delivery_id, self.owner)
            if d is None:
                return
            track.record_attempt(d, [(send_id, res) for (send_id, _), res in zip(todo, outcome.results)],
                                 permanent=outcome.failure == PERMANENT)
            since = d.resent_at or d.started_at or attempt_at  # a resend's budget starts at the resend
            step = next_step(dest, outcome, d.attempts - (d.attempts_before_resend or 0), (now - since).total_seconds(),
                             all(x.state == db.SENT for x in d.sends))
            if step.state == db.SENT:
                track.delivery_sent(d, now)
            elif step.state == db.FAILED:
                track.delivery_failed(d, now, step.error or "")
            else:
                track.delivery_retry(d, now + timedelta(seconds=step.delay_s), step.error or "")
                log_event(log, "delivery_retry", level=logging.WARNING, destination=name, job=d.job_id,
                          attempt=d.attempts, delay_s=step.delay_s, error=outcome.error)
            track.close_if_delivered(d.job, self.audit, now)
