"""An upgraded node starts on its old database: columns added since are created in place."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from dicom_node import db


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
    database.create_all()
    cols = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(instances)")}
    assert {"pixel_sha256", "excluded"} <= cols
    with database.session() as s:
        inst = s.query(db.Instance).one()
        assert inst.sop_instance_uid == "1.2.3" and inst.excluded is None
    assert db.add_missing_columns(database.engine) == []  # idempotent
    database.dispose()



def test_one_migration_adds_the_columns_of_every_feature(tmp_path: Path) -> None:
    """QA columns (jobs.qa, jobs.qa_mode, series.qa_force) and receive-validation columns
    (instances.pixel_sha256, instances.excluded) come from the same additive migration."""
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE series (id INTEGER PRIMARY KEY, series_uid VARCHAR(64), state VARCHAR(16))")
    con.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, series_id INTEGER, version INTEGER, state VARCHAR(16))")
    con.execute("CREATE TABLE instances (id INTEGER PRIMARY KEY, series_id INTEGER, sop_instance_uid VARCHAR(64))")
    con.execute("INSERT INTO series (series_uid, state) VALUES ('1.2.3', 'failed')")
    con.commit()
    con.close()
    database = db.Database(f"sqlite:///{path}")
    database.create_all()
    cols = {t: {r[1] for r in sqlite3.connect(path).execute(f"PRAGMA table_info({t})")}
            for t in ("series", "jobs", "instances")}
    assert {"qa_force", "late_instances"} <= cols["series"]
    assert {"qa", "qa_mode"} <= cols["jobs"]
    assert {"pixel_sha256", "excluded"} <= cols["instances"]
    with database.session() as s:
        series = s.query(db.Series).one()
        assert series.state == "failed" and not series.qa_force
    assert db.add_missing_columns(database.engine) == []
    database.dispose()
