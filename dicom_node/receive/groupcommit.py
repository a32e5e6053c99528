"""Group commit: instances received at about the same time share one pass of syncs and one
database transaction, and each C-STORE response waits for its group to be durable.

An instance is acknowledged only when its file content, its directory entry and its database row
are on disk. Paying one file fsync, one directory fsync and one SQLite commit per instance caps
the receive rate at the disk's sync latency; across concurrent associations (pynetdicom runs one
thread per association) the syncs can be shared instead:

* the instance is on disk already, unsynced, in ``spool/.incoming/`` (written as it arrived,
  :mod:`dicom_node.receive.incoming`); the association thread submits it and blocks on its future;
* the committer thread takes what is queued, waits up to ``group_commit_ms`` for the other open
  associations (each has at most one C-STORE in flight: the node negotiates no asynchronous
  operations window, so a group never needs more members than there are open associations), up
  to ``group_commit_max`` members;
* for the group, in this order: one query for the SOP Instance UIDs already known (a known one
  is a duplicate, answered by the caller's duplicate/conflict handling, which also owns its
  temporary file: the first copy is never overwritten); rename the new files to their final names;
  fsync every file and every distinct directory once, all in parallel (the file system commits
  its journal once for all of them), while the rows are inserted in one transaction
  (``track.record_received``); commit once every sync has returned;
* then every future completes. On any failure every member gets the exception (the caller answers
  ``0xA700``, never success); files renamed before a failed insert are removed, so no file is left
  that a re-send would not replace, and no row ever exists without its file (the row commits last).

``group_commit_ms = 0`` turns grouping off: each instance is committed alone in its own thread
(one sync pass and one transaction per instance); so is an instance that arrives while no other
association is sending (there is nothing to share, and no hand-over between threads to pay).
"""
from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.store import db, track
from dicom_node.audit import AuditLog
from dicom_node.logs import log_event
from dicom_node.store.spool import fsync_dir, fsync_file, unlink_quietly

log = logging.getLogger("dicom_node.receive.groupcommit")


class Outcome(enum.Enum):
    STORED = "stored"  # file durable under its final name, row committed
    KNOWN = "known"  # SOP Instance UID already recorded (or earlier in the same group): a duplicate


@dataclass
class Pending:
    """One instance written to ``tmp`` (not yet synced) that becomes ``path`` with its row."""

    tmp: Path
    path: Path
    record: dict[str, Any]  # keyword arguments of track.record_instance (ds, sop_uid, ...)
    new_dirs: Sequence[Path] = ()  # directories whose entries changed when ``path.parent`` was created
    future: Future[Outcome] = field(default_factory=Future)

    @property
    def sop_uid(self) -> str:
        return str(self.record["sop_uid"])


class GroupCommitter:
    """The committer of one receiver; ``submit`` blocks until the instance's group is durable."""

    def __init__(self, database: db.Database, audit: AuditLog, *, window_ms: float, max_group: int,
                 open_associations: Callable[[], int] = lambda: 1, timeout_s: float = 60.0) -> None:
        self.db = database
        self.audit = audit
        self.window_s = window_ms / 1000.0
        self.max_group = max(1, int(max_group))
        self.open_associations = open_associations
        self.timeout_s = timeout_s
        self._queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._commit_lock = threading.Lock()  # one commit at a time, inline or by the committer
        self._thread: threading.Thread | None = None
        # fsyncs run in parallel: concurrent fsyncs share the file system's journal commits
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(min(self.max_group, 16) + 1,
                                                                   thread_name_prefix="fsync")
        self._stopped = False
        self._unsynced_dirs: set[Path] = set()  # new directories of failed groups: synced by the next
        self.groups = 0  # committed groups and members (for the log and the tests)
        self.members = 0

    @property
    def grouping(self) -> bool:
        return self.window_s > 0 and self.max_group > 1

    def start(self) -> None:
        if self.grouping and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the committer thread; later submits commit inline."""
        self._stopped = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(self.timeout_s)
            self._thread = None
        while True:  # anything submitted while stopping, behind the end marker
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                with self._commit_lock:
                    self.commit([item])
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        log_event(log, "group_commit_stopped", groups=self.groups, instances=self.members)

    def submit(self, item: Pending) -> Outcome:
        """Make ``item`` durable and recorded with its group; raises what failed the group."""
        if self._thread is None or self._stopped or (self._queue.empty() and self.open_associations() <= 1):
            # nobody to share the syncs with: commit in this thread (no hand-over to the committer)
            with self._commit_lock:
                self.commit([item])
        else:
            self._queue.put(item)
        return item.future.result(timeout=self.timeout_s)

    # ------------------------------------------------------------------ committer thread
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.window_s
            end = False
            while len(batch) < self.max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    # each open association has at most one C-STORE in flight: once all are in
                    # the group, waiting longer cannot add a member
                    left = deadline - time.monotonic()
                    if left <= 0 or len(batch) >= self.open_associations():
                        break
                    try:
                        nxt = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                if nxt is None:
                    end = True
                    break
                batch.append(nxt)
            with self._commit_lock:
                self.commit(batch)
            if end:
                return

    def commit(self, batch: list[Pending]) -> None:
        """Make ``batch`` durable and recorded, then complete every member's future."""
        renamed: list[Pending] = []
        committing = False
        s = self.db.Session()
        try:
            known = track.known_sop_uids(s, [it.sop_uid for it in batch])
            new: list[Pending] = []
            for it in batch:  # the first of a UID repeated within the group is the one stored
                if it.sop_uid in known:
                    continue
                known.add(it.sop_uid)
                new.append(it)
            for it in new:
                it.tmp.replace(it.path)
                renamed.append(it)
            syncs = self._sync(new, batch)
            try:  # the rows are prepared while the syncs run; they commit only once all are done
                track.record_received(s, self.audit, [it.record for it in new])
                s.flush()
            finally:
                for f in syncs:
                    f.result()
            committing = True
            s.commit()
        except BaseException as exc:
            s.rollback()
            s.close()
            for it in batch:
                unlink_quietly(it.tmp)
                self._unsynced_dirs.update(it.new_dirs)
            if not committing:  # the rows are certainly not there: drop their files too
                for it in renamed:
                    unlink_quietly(it.path)
            log_event(log, "group_commit_failed", level=logging.ERROR, instances=len(batch),
                      reason=f"{type(exc).__name__}: {exc}")
            for it in batch:
                it.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        s.close()
        self._unsynced_dirs.clear()  # all were synced with this group
        self.groups += 1
        self.members += len(new)
        stored = {id(it) for it in new}
        for it in batch:  # a known one's file stays with the caller (compared, maybe quarantined)
            it.future.set_result(Outcome.STORED if id(it) in stored else Outcome.KNOWN)

    def _sync(self, items: list[Pending], batch: list[Pending]) -> list[Future[None]]:
        """Start the fsync of every file and of every directory whose entries changed (each
        once), all at once: the file system commits its journal for them together. The renames
        are done, so file content and directory entries may reach the disk in any order: before
        the rows commit, a crash leaves at most files without rows, which are never acknowledged
        and which a re-send replaces. Directories created for members of a failed group are
        synced with the next group (a later instance finds them existing and creates nothing)."""
        dirs: dict[Path, None] = dict.fromkeys(sorted(self._unsynced_dirs))
        for it in batch:  # a directory made for a duplicate may hold the next new instance
            dirs.update(dict.fromkeys(it.new_dirs))
        for it in items:
            dirs[it.path.parent] = None
        jobs = [(fsync_file, it.path) for it in items] + [(fsync_dir, d) for d in dirs]
        pool = self._pool
        out: list[Future[None]] = []
        for fn, path in jobs:
            if pool is None:  # stopped: sync in this thread
                f: Future[None] = Future()
                try:
                    fn(path)
                    f.set_result(None)
                except BaseException as exc:
                    f.set_exception(exc)
            else:
                f = pool.submit(fn, path)
            out.append(f)
        return out
