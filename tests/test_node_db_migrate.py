"""An upgraded node starts on its old database: Alembic adopts a database that predates schema
versions (missing columns added in place, rows kept), then applies the later revisions."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from dicom_node.store import db, migrate


def _columns(path: Path, table: str) -> set[str]:
    return {r[1] for r in sqlite3.connect(path).execute(f"PRAGMA table_info({table})")}


def test_old_database_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE instances (id INTEGER PRIMARY KEY, series_id INTEGER, sop_instance_uid VARCHAR(64), "
                "sop_class_uid VARCHAR(64), transfer_syntax_uid VARCHAR(64), instance_number INTEGER, "
                "path VARCHAR(512), size INTEGER, received_at DATETIME, calling_ae VARCHAR(16), late BOOLEAN)")
    con.execute("INSERT INTO instances (series_id, sop_instance_uid, path, size) VALUES (1, '1.2.3', 'a/b.dcm', 10)")
    con.commit()
    con.close()
    database = db.Database(f"sqlite:///{path}")
    assert migrate.current(database.engine) is None  # unversioned: older than Alembic
    database.create_all()
    assert {"pixel_sha256", "excluded"} <= _columns(path, "instances")
    with database.session() as s:
        inst = s.query(db.Instance).one()
        assert inst.sop_instance_uid == "1.2.3" and inst.excluded is None
    assert migrate.current(database.engine) == migrate.head()
    assert migrate.upgrade(database.engine) == (migrate.head(), migrate.head())  # idempotent
    database.dispose()


def test_one_migration_adds_the_columns_of_every_feature(tmp_path: Path) -> None:
    """QA columns (jobs.qa, jobs.qa_mode, series.qa_force), receive-validation columns
    (instances.pixel_sha256, instances.excluded) and the lease columns come from one upgrade."""
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE series (id INTEGER PRIMARY KEY, series_uid VARCHAR(64), state VARCHAR(16))")
    con.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, series_id INTEGER, version INTEGER, state VARCHAR(16))")
    con.execute("CREATE TABLE instances (id INTEGER PRIMARY KEY, series_id INTEGER, sop_instance_uid VARCHAR(64))")
    con.execute("CREATE TABLE node (ae_title VARCHAR(16) PRIMARY KEY, pid INTEGER)")
    con.execute("INSERT INTO series (series_uid, state) VALUES ('1.2.3', 'failed')")
    con.execute("INSERT INTO jobs (series_id, version, state) VALUES (1, 1, 'failed')")
    con.commit()
    con.close()
    database = db.Database(f"sqlite:///{path}")
    database.create_all()
    assert {"qa_force", "late_instances"} <= _columns(path, "series")
    assert {"qa", "qa_mode", "claimed_by", "lease_expires_at"} <= _columns(path, "jobs")
    assert {"pixel_sha256", "excluded"} <= _columns(path, "instances")
    assert {"claimed_by", "lease_expires_at"} <= _columns(path, "deliveries")
    assert {"hostname", "pid", "roles", "heartbeat_at"} <= _columns(path, "heartbeats")
    with database.session() as s:
        series = s.query(db.Series).one()
        assert series.state == "failed" and not series.qa_force
        job = s.query(db.Job).one()
        assert job.state == "failed" and job.claimed_by is None and job.lease_expires_at is None
    database.dispose()


def test_versioned_database_upgrades_revision_by_revision(tmp_path: Path) -> None:
    """A database of the first versioned release (0001) keeps its rows through the later revisions."""
    path = tmp_path / "v1.sqlite"
    database = db.Database(f"sqlite:///{path}")
    assert migrate.upgrade(database.engine, "0001") == (None, "0001")
    assert "claimed_by" not in _columns(path, "jobs")
    con = sqlite3.connect(path)
    con.execute("INSERT INTO series (series_uid, instance_count, first_received_at, last_received_at, state, "
                "state_changed_at, grown_after_processing, late_instances) "
                "VALUES ('1.2.4', 3, '2026-01-01', '2026-01-01', 'queued', '2026-01-01', 0, 0)")
    con.execute("INSERT INTO jobs (series_id, version, state, rule_name, model, destinations, created_at, attempts) "
                "VALUES (1, 1, 'queued', 'r', 'default', '[]', '2026-01-01', 0)")
    con.commit()
    con.close()
    assert migrate.upgrade(database.engine) == ("0001", migrate.head())
    with database.session() as s:
        job = s.query(db.Job).one()
        assert job.state == "queued" and job.series.series_uid == "1.2.4" and job.claimed_by is None


def test_models_match_the_newest_revision(tmp_path: Path) -> None:
    """A change to dicom_node/store/db.py without a revision fails here (the schema the migrations build
    is the schema the code uses)."""
    database = db.Database(f"sqlite:///{tmp_path / 'new.sqlite'}")
    database.create_all()
    with database.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), db.Base.metadata) == []
    database.dispose()


def test_db_commands_and_roles_on_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dicom-node db current|upgrade`; a subset of roles on SQLite is refused at start (the other
    roles could run nowhere: SQLite serves one process)."""
    from dicom_node.app.cli import main
    from dicom_node.config import ConfigError, parse_config
    from dicom_node.app.service import NodeService

    cfg_path = tmp_path / "node.toml"
    cfg_path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    assert main(["--config", str(cfg_path), "db", "current"]) == 1
    assert "(unversioned)" in capsys.readouterr().out
    assert main(["--config", str(cfg_path), "db", "upgrade"]) == 0
    assert f"upgraded (unversioned) -> {migrate.head()}" in capsys.readouterr().out
    assert main(["--config", str(cfg_path), "db", "current"]) == 0
    with pytest.raises(SystemExit):
        main(["--config", str(cfg_path), "serve", "--roles", "process,cook"])
    assert "roles are a comma list" in capsys.readouterr().err
    service = NodeService(parse_config({"node": {"data_dir": str(tmp_path / "data")}}), roles=("process",))
    with pytest.raises(ConfigError, match="need a shared database"):
        service.start()
