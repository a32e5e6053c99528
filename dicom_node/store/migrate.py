"""Schema versions with Alembic: ``dicom-node db upgrade`` and the upgrade at start-up.

Every command that opens the database brings it to the newest revision first (an additive
upgrade never loses data; a database of an older node is adopted by revision ``0001``, which
creates missing tables and adds missing columns, then the later revisions run). On PostgreSQL,
where several processes of several hosts share one database and may start at once, the upgrade
holds a transaction-scoped advisory lock, so exactly one of them runs each revision and the
others find the schema current.
"""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: Key of the PostgreSQL advisory lock taken while upgrading (any constant shared by all nodes).
ADVISORY_LOCK = 0x4C544446  # "LTDF"


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision this version of the node knows."""
    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


def current(engine: Engine) -> str | None:
    """The revision the database is at (``None``: unversioned, empty or older than Alembic)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade to ``revision``; returns (before, after)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK})
        before = MigrationContext.configure(conn).get_current_revision()
        if before != head() or revision != "head":
            command.upgrade(alembic_config(conn), revision)
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after
