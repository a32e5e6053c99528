"""Structured logging: one line per event, ``key=value`` or JSON, never patient identifiers at INFO.

Log lines are read by people tailing the journal and by log shippers, so each line carries an
``event`` name and flat fields. Identifiers that name a patient (PatientName, PatientID,
PatientBirthDate) are dropped from INFO and above even if a caller passes them; UIDs are fine.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

PHI_FIELDS = frozenset({"PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id", "patient_birth_date"})
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with ``fields`` as structured data (rendered by :class:`StructuredFormatter`)."""
    if level >= logging.INFO:
        fields = {k: v for k, v in fields.items() if k not in PHI_FIELDS}
    logger.log(level, event, extra={"fields": fields})


def _kv(value: Any) -> str:
    s = str(value)
    if s == "" or any(c in s for c in ' ="\n'):
        return json.dumps(s)
    return s


class StructuredFormatter(logging.Formatter):
    """``ts=… level=… logger=… event=… k=v`` lines, or JSON objects when ``json_lines``."""

    def __init__(self, json_lines: bool = False) -> None:
        super().__init__()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict(getattr(record, "fields", {}) or {})
        if record.levelno >= logging.INFO:
            fields = {k: v for k, v in fields.items() if k not in PHI_FIELDS}
        base = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        if self.json_lines:
            return json.dumps({**base, **fields}, default=str)
        # key=value lines leave out what is not there (no "error=None"); JSON keeps it as null
        return " ".join(f"{k}={_kv(v)}" for k, v in {**base, **fields}.items() if v is not None)


def setup_logging(level: str = "INFO", fmt: str = "kv", stream: Any = None) -> None:
    """Route all log records (ours and pynetdicom's) to one structured handler on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(StructuredFormatter(json_lines=(fmt == "json")))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO/DEBUG; keep its per-message chatter out of the service log.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: max instances" is expected
    # Alembic announces every revision it checks at INFO; the node logs the upgrade's outcome itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)
