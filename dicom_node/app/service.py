"""The running node: start-up, heartbeat, and clean shutdown on SIGTERM/SIGINT.

A process runs the roles it is given (``serve --roles receive,decide``; default all four):
``receive`` is the DICOM listener, ``decide``/``process``/``dispatch`` are scheduled steps. On
SQLite one process serves the data directory (a pidfile refuses a second one); on PostgreSQL any
number of processes on any hosts share the queue, and each writes its own heartbeat row.

Start-up order makes a restart safe: database first (upgrade the schema, resume interrupted jobs),
then the scheduler, then the listening socket. Shutdown runs in reverse: stop accepting
associations and let open ones finish, let a running job finish (a job interrupted anyway is
resumed at the next start), stop the scheduler, mark the heartbeat stopped, remove the pidfile.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicom_node.store import db, heartbeat
from dicom_node.store.heartbeat import pid_alive
from dicom_node.config import ROLES, ConfigError, NodeConfig
from dicom_node.logs import log_event
from dicom_node.app.scheduler import build_scheduler
from dicom_node.receive.scp import StorageSCP
from dicom_node.store.spool import write_atomic
from dicom_node.app.pipeline import Pipeline

log = logging.getLogger("dicom_node.app.service")

class StartError(RuntimeError):
    """The node cannot start because something the configuration names is unusable; the message
    names the key and its value (``dicom-node serve`` prints it as one line and exits 4)."""

    def __init__(self, key: str, value: object, why: str) -> None:
        super().__init__(f"{key} = {value}: {why}")
        self.key, self.value, self.why = key, value, why


def _writable_dir(key: str, path: Path) -> None:
    """Create ``path`` if missing; refuse a file, a read-only or an unwritable folder."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StartError(key, path, "is a file, not a folder") from None
    except OSError as exc:
        raise StartError(key, path, f"cannot create the folder ({exc.strerror})") from None
    if not path.is_dir():
        raise StartError(key, path, "is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StartError(key, path, f"is not writable ({exc.strerror})") from None


def _port_in_use(host: str, port: int) -> bool:
    """``port`` on ``host`` cannot be bound now (another process listens there)."""
    try:
        with socket.create_server((host, port), reuse_port=False):
            return False
    except OSError:
        return True


def software_version() -> str:
    from dicom_node.version import SOFTWARE_VERSION

    return str(SOFTWARE_VERSION)


class NodeService:
    """One ``dicom-node serve`` process."""

    def __init__(self, config: NodeConfig, roles: Sequence[str] | None = None) -> None:
        self.config = config
        self.roles = tuple(r for r in ROLES if r in (roles or config.node.roles))
        self.stop_event = threading.Event()
        _writable_dir("node.data_dir", config.data_dir)  # before the database: SQLite lives there
        self.db = db.Database(config.db_url)
        self.pipeline = Pipeline(config, self.db, self.stop_event)
        self.scp: StorageSCP | None = None
        self.scheduler: Any = None
        self.port: int | None = None
        self.http: Any = None  # observe.server.ObserveServer when [http] enabled

    def _check_pidfile(self) -> None:
        """Refuse to start a second node on the same data directory (one pidfile, one queue)."""
        pf = self.config.pid_file
        try:
            pid = int(pf.read_text().strip())
        except (OSError, ValueError):
            return
        if pid != os.getpid() and pid_alive(pid):
            raise StartError("node.data_dir", self.config.data_dir, f"another dicom-node (PID {pid}) is running on it")

    def start(self) -> int:
        """Start everything; returns the DICOM port actually bound."""
        c = self.config
        for d in (c.spool_dir, c.output_dir):
            _writable_dir("node.data_dir", d)
        if not self.db.shared:
            if set(self.roles) != set(ROLES):
                raise ConfigError(f"serve --roles {','.join(self.roles)}: the other roles must run in other processes, "
                                  "which need a shared database (node.database_url = \"postgresql+psycopg://...\"); "
                                  f"SQLite ({c.db_url}) serves one process running every role")
            self._check_pidfile()
        self.db.create_all()
        if {"process", "dispatch"} & set(self.roles):  # jobs and deliveries a dead process held
            self.pipeline.recover()
        if c.http.enabled and "receive" in self.roles:
            # Before the DICOM listener: a port already taken stops the start here. One HTTP
            # endpoint per node: the receiver's process serves it (it reads the shared database).
            from dicom_node.observe.server import ObserveServer  # only when [http] is enabled

            self.http = ObserveServer(c, self.db)
            try:
                self.http.start()
            except OSError as exc:
                self.http = None
                raise StartError("http.port", c.http.port, f"cannot listen on {c.http.host} ({exc.strerror})") from None
        if not self.db.shared:
            write_atomic(c.pid_file, f"{os.getpid()}\n".encode())
        if "receive" in self.roles:
            self.scp = StorageSCP(c, self.db)
            self.pipeline.streamer.receive_saturated = self.scp.busy.saturated
            try:
                self.port = self.scp.start()
            except OSError as exc:
                self.scp = None
                tls_busy = c.tls.enabled and _port_in_use(c.bind_address, c.tls.port)
                key, port = ("tls.port", c.tls.port) if tls_busy or not c.tls.plain_tcp else ("node.port", c.port)
                raise StartError(key, port, f"cannot listen on {c.bind_address} ({exc.strerror})") from None
        self.heartbeat(started=True)
        self.scheduler = build_scheduler(c, self.pipeline, self.heartbeat, self.roles)
        self.scheduler.start()
        log_event(log, "node_started", ae_title=c.ae_title, port=self.port, pid=os.getpid(), data_dir=str(c.data_dir),
                  roles=",".join(self.roles), database=c.db_url.split("://")[0],
                  destinations=",".join(d.name for d in c.destinations),
                  rules=",".join(r.name for r in c.rules), version=software_version())
        return int(self.port or 0)

    def heartbeat(self, started: bool = False, stopped: bool = False) -> None:
        """Liveness for ``dicom-node status`` (one row per host and PID): roles, AE and port of
        a receiver, model and device of a process worker."""
        lm = self.pipeline.last_model
        model = f"{lm.get('name') or lm.get('model')} {lm.get('version') or ''}".strip() if lm else None
        heartbeat.beat(self.db, roles=self.roles, ae_title=self.config.ae_title, port=self.port,
                       version=software_version(), model=model, device=str(lm.get("device")) if lm else None,
                       started=started, stopped=stopped)

    def request_stop(self, signum: int | None = None, _frame: Any = None) -> None:
        if not self.stop_event.is_set():
            log_event(log, "stop_requested", signal=signal.Signals(signum).name if signum else None)
        self.stop_event.set()

    def stop(self) -> None:
        """Clean shutdown: no new associations, finish open ones and the running job."""
        self.stop_event.set()
        if self.http is not None:
            self.http.stop()
        if self.scp is not None:
            self.scp.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)  # waits for a running batch/send to finish
        # A job interrupted anyway (process killed while shutting down) is re-queued at start.
        try:
            self.heartbeat(stopped=True)
        except Exception:
            log.exception("could not record the stop in the database")
        try:
            if self.config.pid_file.read_text().strip() == str(os.getpid()):
                self.config.pid_file.unlink()
        except OSError:
            pass
        for worker in (self.pipeline.processor, self.pipeline.dispatcher):
            worker.leases.close()
        self.db.dispose()
        log_event(log, "node_stopped", ae_title=self.config.ae_title)

    def _abandon_start(self) -> None:
        """Undo what a failed start did: listeners closed, our pidfile removed, database closed."""
        for part in (self.scp, self.http):
            if part is not None:
                try:
                    part.stop()
                except Exception:
                    log.exception("could not stop %s after a failed start", type(part).__name__)
        try:
            if self.config.pid_file.read_text().strip() == str(os.getpid()):
                self.config.pid_file.unlink()
        except OSError:
            pass
        self.db.dispose()

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code (0 on a clean stop)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        try:
            self.start()
        except BaseException:
            self._abandon_start()
            raise
        try:
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.stop()
        return 0

