"""Audit trail: one JSON line per association and per series event, shaped after IHE ATNA /
RFC 3881 (DICOM PS3.15 A.5): EventIdentification (EventID, EventActionCode, EventDateTime,
EventOutcomeIndicator, EventTypeCode), ActiveParticipant (who, from where), AuditSourceIdentification
(this node), ParticipantObjectIdentification (what: Study/Series/SOP UIDs only).

Why a separate file and not the log: an audit trail is read by security staff and shippers that
expect one record shape; the log is for operators. No patient name, ID or birth date is ever
written here: participant objects carry UIDs and counts only.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig

# EventOutcomeIndicator (RFC 3881 5.1.4)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12

# DICOM audit event IDs (PS3.16 CID 400) and type codes (CID 401)
_DCM = "DCM"
APPLICATION_ACTIVITY = ("110100", "Application Activity")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
EXPORT = ("110106", "Export")
IMPORT = ("110107", "Import")
USER_AUTHENTICATION = ("110114", "User Authentication")
LOGIN = ("110122", "Login")
LOGOUT = ("110123", "Logout")
STUDY_UID_TYPE = {"csd-code": "110180", "codeSystemName": _DCM, "originalText": "Study Instance UID"}

# Series events -> (EventID, EventActionCode). Action codes: C create, R read, U update, E execute.
SERIES_EVENTS: dict[str, tuple[tuple[str, str], str]] = {
    "received": (IMPORT, "C"),
    "completed": (INSTANCES_ACCESSED, "R"),
    "processed": (INSTANCES_ACCESSED, "C"),
    "sent": (EXPORT, "R"),
    "failed": (APPLICATION_ACTIVITY, "E"),
    "refused": (IMPORT, "C"),
    "resend": (EXPORT, "R"),
}


def _code(pair: tuple[str, str]) -> dict[str, str]:
    return {"csd-code": pair[0], "codeSystemName": _DCM, "originalText": pair[1]}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends audit records to one file (thread-safe; one ``write`` + flush per record)."""

    def __init__(self, path: Path | None, ae_title: str) -> None:
        self.path = path
        self.ae_title = ae_title
        self.host = socket.gethostname()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ records
    def _source(self) -> dict[str, Any]:
        return {"AuditSourceID": f"{self.ae_title}@{self.host}", "AuditEnterpriseSiteID": self.ae_title,
                "AuditSourceTypeCode": "4"}  # 4: application server process

    def _node(self, requestor: bool) -> dict[str, Any]:
        return {"UserID": self.ae_title, "AlternativeUserID": str(os.getpid()), "UserIsRequestor": requestor,
                "NetworkAccessPointID": self.host, "NetworkAccessPointTypeCode": "1",
                "RoleIDCode": {"csd-code": "110152" if not requestor else "110153", "codeSystemName": _DCM,
                               "originalText": "Destination Role ID" if not requestor else "Source Role ID"}}

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()

    def association(self, outcome: str, calling_ae: str, peer: str, called_ae: str | None = None,
                    counts: dict[str, Any] | None = None, reason: str | None = None) -> None:
        """``outcome``: accepted, rejected, released or aborted."""
        if outcome == "rejected":
            event, type_code, indicator = USER_AUTHENTICATION, LOGIN, MINOR_FAILURE
        else:
            event = INSTANCES_TRANSFERRED
            type_code = LOGIN if outcome == "accepted" else LOGOUT
            indicator = MINOR_FAILURE if outcome == "aborted" else SUCCESS
        record = {
            "EventIdentification": {
                "EventID": _code(event), "EventActionCode": "E", "EventDateTime": _now(),
                "EventOutcomeIndicator": indicator, "EventTypeCode": [_code(type_code)],
                "EventOutcomeDescription": reason or outcome,
            },
            "ActiveParticipant": [
                {"UserID": calling_ae, "UserIsRequestor": True, "NetworkAccessPointID": peer,
                 "NetworkAccessPointTypeCode": "2",
                 "RoleIDCode": {"csd-code": "110153", "codeSystemName": _DCM, "originalText": "Source Role ID"}},
                {**self._node(False), **({"UserID": called_ae} if called_ae else {})},
            ],
            "AuditSourceIdentification": self._source(),
            "ParticipantObjectIdentification": [],
            "dicom_node": {"kind": "association", "outcome": outcome, **(counts or {})},
        }
        self.write(record)

    def series(self, event: str, series_uid: str | None, study_uid: str | None = None, *,
               success: bool = True, reason: str | None = None, calling_ae: str | None = None,
               peer: str | None = None, destination: str | None = None, sop_instance_uid: str | None = None,
               instances: int | None = None, output_series_uid: str | None = None) -> None:
        """A series event: received, completed, processed, sent, failed, refused, resend."""
        event_id, action = SERIES_EVENTS[event]
        participants = [self._node(event in ("sent", "resend"))]
        if calling_ae or peer:
            participants.append({"UserID": calling_ae or "", "UserIsRequestor": True,
                                 "NetworkAccessPointID": peer or "", "NetworkAccessPointTypeCode": "2"})
        if destination:
            participants.append({"UserID": destination, "UserIsRequestor": False,
                                 "RoleIDCode": {"csd-code": "110152", "codeSystemName": _DCM,
                                                "originalText": "Destination Role ID"}})
        objects: list[dict[str, Any]] = []
        if study_uid or series_uid:
            detail = [{"type": "SeriesInstanceUID", "value": series_uid}]
            if output_series_uid:
                detail.append({"type": "OutputSeriesInstanceUID", "value": output_series_uid})
            if sop_instance_uid:
                detail.append({"type": "SOPInstanceUID", "value": sop_instance_uid})
            objects.append({
                "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3",
                "ParticipantObjectIDTypeCode": STUDY_UID_TYPE, "ParticipantObjectID": study_uid or "",
                "ParticipantObjectDetail": detail,
                **({"ParticipantObjectDescription": {"NumberOfInstances": instances}} if instances is not None else {}),
            })
        record = {
            "EventIdentification": {
                "EventID": _code(event_id), "EventActionCode": action, "EventDateTime": _now(),
                "EventOutcomeIndicator": SUCCESS if success else (MINOR_FAILURE if event == "refused" else SERIOUS_FAILURE),
                "EventOutcomeDescription": reason or event,
            },
            "ActiveParticipant": participants,
            "AuditSourceIdentification": self._source(),
            "ParticipantObjectIdentification": objects,
            "dicom_node": {"kind": "series", "event": event},
        }
        self.write(record)


_REGISTRY: dict[tuple[str, str], AuditLog] = {}
_REGISTRY_LOCK = threading.Lock()


def audit_for(config: NodeConfig) -> AuditLog:
    """The process-wide audit log of a configuration (one lock per file)."""
    path = config.audit_path if config.audit.enabled else None
    key = (str(path), config.ae_title)
    with _REGISTRY_LOCK:
        if key not in _REGISTRY:
            _REGISTRY[key] = AuditLog(path, config.ae_title)
        return _REGISTRY[key]
