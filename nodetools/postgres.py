"""A throw-away PostgreSQL server for the multi-role tests and benchmark: Debian ``postgresql`` binaries, a
cluster in a temp directory, listening on 127.0.0.1 on a free port (and a Unix socket in the same
directory), stopped by its PID.

PostgreSQL refuses to run as root; as root the cluster belongs to the unprivileged ``nobody`` and
``initdb``/``postgres`` run under ``setpriv`` as that user (it execs, so the PID we hold is the
postmaster's). As any other user they run as that user.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .peers import LOOPBACK, free_port

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def pg_bin(tool: str) -> str | None:
    for d in PG_BIN_DIRS:
        if (d / tool).exists():
            return str(d / tool)
    return shutil.which(tool)


def _as_user(user: pwd.struct_passwd | None) -> list[str]:
    if user is None:
        return []
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]


@dataclass
class PostgresServer:
    root: Path
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/postgres"

    def create_database(self, name: str) -> str:
        """A fresh database on this server; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(host=LOOPBACK, port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # fast shutdown: roll back open transactions
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(timeout: float = 60.0) -> PostgresServer:
    initdb, postgres = pg_bin("initdb"), pg_bin("postgres")
    if initdb is None or postgres is None:
        raise FileNotFoundError("PostgreSQL server binaries not found; install the Debian package postgresql")
    user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))  # not under pytest's root-only tmp tree
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    os.chmod(root, 0o700)
    data, log_path = root / "data", root / "postgres.log"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    subprocess.run([*_as_user(user), initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                    "--no-sync", "--locale=C"], check=True, capture_output=True, env=env, timeout=120, cwd=root)
    port = free_port()
    logf = open(log_path, "ab")
    if user is not None:
        os.chown(log_path, user.pw_uid, user.pw_gid)
    proc = subprocess.Popen(
        [*_as_user(user), postgres, "-D", str(data), "-h", LOOPBACK, "-p", str(port), "-k", str(root),
         "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
         "-c", "max_connections=100", "-c", "shared_buffers=32MB"],
        stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    logf.close()
    server = PostgresServer(root, port, proc, log_path)
    deadline = time.monotonic() + timeout
    import psycopg

    while True:
        if proc.poll() is not None:
            text = log_path.read_text(errors="replace")
            server.stop()
            raise RuntimeError(f"postgres exited with {proc.returncode}: {text[-2000:]}")
        try:
            psycopg.connect(host=LOOPBACK, port=port, user="postgres", dbname="postgres", connect_timeout=2).close()
            return server
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.2)
