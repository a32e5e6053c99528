"""Which sender delivers to a destination: C-STORE (``type = "dimse"``) or STOW-RS (``"stow-rs"``).

Both take ``(dest, files, calling_ae, max_pdu, on_result=...)`` and return a
:class:`~dicom_node.dispatch.outcome.SendOutcome` with the same typed fields (reached, status category,
transient/permanent), so the delivery loop (retries, per-instance commits) does not depend on the
protocol.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from dicom_node.config import Destination
from dicom_node.dispatch.outcome import InstanceResult, SendOutcome
from dicom_node.dispatch.scu import send_files


class Sender(Protocol):
    def __call__(self, dest: Destination, files: Sequence[Path], calling_ae: str, max_pdu: int = ...,
                 on_result: Callable[[int, InstanceResult], None] | None = None) -> SendOutcome: ...


def sender_for(dest: Destination) -> Sender:
    """The send function for ``dest.type``; the DICOMweb client is imported only when used."""
    if dest.type == "stow-rs":
        from dicom_node.dispatch.stow import send_files_stow

        return send_files_stow
    if dest.type == "dimse":
        return send_files
    raise ValueError(f"destination {dest.name!r}: unknown type {dest.type!r}")
