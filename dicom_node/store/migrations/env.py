"""Alembic environment of the node's database (run through :func:`dicom_node.store.migrate.upgrade`).

The caller hands over an open connection (``config.attributes["connection"]``), so the same code
path serves ``dicom-node db upgrade``, ``serve`` start-up and the tests, on SQLite and PostgreSQL.
With only a URL (the ``alembic`` command line), an engine is made from it.
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from dicom_node.store.db import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    # render_as_batch: SQLite cannot ALTER most things in place; batch mode copies the table.
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
