"""Outcome of one send attempt, as both senders (C-STORE and STOW-RS) report it.

The dispatcher's retry policy reads only typed fields: whether the attempt reached the
destination, the status category of each answer, and the node's transient/permanent class
(:mod:`dicom_node.negotiation`). The error texts are for people (status, logs), never parsed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

#: Status categories of an answer, as pynetdicom's ``code_to_category`` names them.
SUCCESS, WARNING = STATUS_SUCCESS, STATUS_WARNING


@dataclass
class InstanceResult:
    """One instance of an attempt.

    ``status`` is the destination's answer for this instance (C-STORE Status, STOW-RS
    FailureReason or WarningReason); ``None`` when it gave none (not sent, or the association or
    request broke). ``category`` is that status's category (Success, Warning, Failure, Cancel,
    Pending, Unknown), ``None`` without a status. ``reached`` says whether the attempt that
    carried the instance got to the destination's service (C-STORE: the association was
    established; STOW-RS: the request's connection was made), so it counts as an attempt for this
    instance; a refused connection, a rejected association or one with no accepted presentation
    context does not."""

    path: Path
    sop_instance_uid: str
    status: int | None
    error: str | None = None
    reached: bool = False
    category: str | None = None
    failure: str | None = None  # TRANSIENT | PERMANENT | None (kept by the destination)

    @classmethod
    def answered(cls, path: Path, sop_instance_uid: str, status: int, error: str | None = None,
                 failure: str | None = None) -> InstanceResult:
        """An instance the destination answered with ``status`` (so the attempt reached it);
        ``failure`` is the caller's class of a status that is not a success."""
        category = code_to_category(int(status))
        kept = category in (SUCCESS, WARNING)
        return cls(path, sop_instance_uid, int(status), error, reached=True, category=category,
                   failure=None if kept else failure)

    @property
    def ok(self) -> bool:
        """The destination kept the instance (success or warning)."""
        return self.category in (SUCCESS, WARNING)


@dataclass
class SendOutcome:
    """Result of one attempt: per-instance results and, when not all succeeded, why.

    ``reached``: the attempt got to the destination's service (at least one association
    established, or one STOW-RS request connected)."""

    results: list[InstanceResult] = field(default_factory=list)
    failure: str | None = None  # TRANSIENT | PERMANENT | None (all sent)
    error: str | None = None
    seconds: float = 0.0
    reached: bool = False

    @property
    def sent(self) -> int:
        return sum(r.ok for r in self.results)
