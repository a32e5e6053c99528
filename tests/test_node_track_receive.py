"""track.record_received: the Core fast path for a series still being received writes the same
rows as the ORM path (record_instance), and never applies where the ORM path must decide
(new, reopened, late or grown series)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.store import db, track
from dicom_node.audit import AuditLog

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture()
def database(tmp_path: Path) -> db.Database:
    d = db.Database(f"sqlite:///{tmp_path / 'node.sqlite'}")
    d.create_all()
    return d


def record(series_uid: str, n: int) -> dict[str, Any]:
    ds = Dataset()
    ds.InstanceNumber = n
    ds.Modality = "CT"
    ds.ConvolutionKernel = "Br40"
    return dict(ds=ds, series_uid=series_uid, sop_uid=f"{series_uid}.{n}", sop_class=CT, ts_uid=EXPLICIT_LE,
                rel=f"{series_uid}/{n}.dcm", size=1000 + n, calling="SCANNER", peer="127.0.0.1", digest=f"{n:064x}")


def receive(database: db.Database, *records: dict[str, Any]) -> None:
    with database.session() as s:
        track.record_received(s, AuditLog(None, "NODE"), list(records))


def instances(database: db.Database, series_uid: str) -> list[db.Instance]:
    with database.session() as s:
        return list(s.scalars(select(db.Instance).join(db.Series).where(db.Series.series_uid == series_uid)
                              .order_by(db.Instance.id)))


def series_row(database: db.Database, series_uid: str) -> db.Series:
    with database.session() as s:
        found = db.series_by_uid(s, series_uid)
        assert found is not None
        return found


def fast_path_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, per series of each group, whether the fast path applied."""
    calls: list[bool] = []
    real = track._record_receiving

    def spy(*args: Any) -> bool:
        calls.append(real(*args))
        return calls[-1]
    monkeypatch.setattr(track, "_record_receiving", spy)
    return calls


COLUMNS = ("sop_instance_uid", "sop_class_uid", "transfer_syntax_uid", "instance_number", "path", "size",
           "calling_ae", "late", "pixel_sha256", "excluded")


def test_fast_path_rows_equal_the_orm_rows(database: db.Database, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fast_path_calls(monkeypatch)
    receive(database, record("1.2.3", 1))  # new series: the ORM path creates it
    receive(database, record("1.2.3", 2))
    receive(database, record("1.2.3", 3), record("1.2.3", 4), record("1.2.5", 1))  # a group, two series
    assert calls == [False, True, True, False]
    # the same instances through the ORM path only, into another series
    with database.session() as s:
        for n in (1, 2, 3, 4):
            track.record_instance(s, AuditLog(None, "NODE"), **record("1.2.4", n))
    fast, orm = instances(database, "1.2.3"), instances(database, "1.2.4")
    assert len(fast) == len(orm) == 4
    for a, b in zip(fast, orm):
        got = {c: getattr(a, c) for c in COLUMNS}
        want = {c: getattr(b, c) for c in COLUMNS}
        want["sop_instance_uid"] = want["sop_instance_uid"].replace("1.2.4", "1.2.3")
        want["path"] = want["path"].replace("1.2.4", "1.2.3")
        assert got == want
        assert a.received_at is not None
    s3, s4 = series_row(database, "1.2.3"), series_row(database, "1.2.4")
    assert (s3.instance_count, s3.state, s3.late_instances) == (s4.instance_count, s4.state, s4.late_instances) \
        == (4, db.RECEIVED, 0)
    assert s3.last_received_at == max(i.received_at for i in fast)


def test_fast_path_does_not_apply_to_late_or_reopened_series(database: db.Database,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    receive(database, record("1.2.3", 1), record("1.2.3", 2))
    with database.session() as s:
        series = db.series_by_uid(s, "1.2.3")
        assert series is not None
        series.set_state(db.COMPLETE)
    calls = fast_path_calls(monkeypatch)
    receive(database, record("1.2.3", 3))  # complete, not processed: reopened by the ORM path
    assert calls == [False]
    assert series_row(database, "1.2.3").state == db.RECEIVED
    receive(database, record("1.2.3", 4))  # received again, no job: fast
    assert calls == [False, True]
    # processed: the output exists, so every later instance is late, also after the series reopens
    with database.session() as s:
        series = db.series_by_uid(s, "1.2.3")
        assert series is not None
        s.add(db.Job(series=series, state=db.DONE, rule_name="r", model="linear"))
        series.set_state(db.DONE)
    receive(database, record("1.2.3", 5))
    row = series_row(database, "1.2.3")
    assert (row.state, row.grown_after_processing, row.late_instances) == (db.RECEIVED, True, 1)
    receive(database, record("1.2.3", 6), record("1.2.3", 7))  # received, but with a done job: still late
    assert calls == [False, True, False, False]
    row = series_row(database, "1.2.3")
    assert (row.instance_count, row.late_instances) == (7, 3)
    assert [i.late for i in instances(database, "1.2.3")] == [False] * 4 + [True] * 3
