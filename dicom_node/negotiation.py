"""Negotiation: what the node accepts and proposes, and what its DIMSE statuses mean.

The SOP classes and transfer syntaxes here are used by the SCP (:mod:`dicom_node.receive.scp`), the
SCU (:mod:`dicom_node.dispatch.scu`) and the conformance statement (:mod:`dicom_node.admin.conformance`), so
what the statement says is, by construction, what the node negotiates. Status categories
(:mod:`dicom_node.dispatch.outcome`), rejection and abort reasons come from pynetdicom
(``code_to_category``, ``reason_str``, ``source_str``), not hand tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    Verification,
)

TRANSIENT = "transient"
PERMANENT = "permanent"

# C-STORE statuses the SCP returns (PS3.4 Table GG.4-1 / B.2-1)
STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (the sender should retry later)
STATUS_DATASET_MISMATCH = 0xA900  # Error: data set does not match SOP class
STATUS_CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand

VERIFICATION_SOP_CLASS = UID(Verification)
# Stored and standardized. CT Image Storage only: the model works on single-frame axial slices.
STORAGE_SOP_CLASSES: tuple[UID, ...] = (CTImageStorage,)
# Negotiated so that a refusal is a clear C-STORE status rather than a rejected context.
ENHANCED_CT_SOP_CLASSES: tuple[UID, ...] = (UID(EnhancedCTImageStorage), UID(LegacyConvertedEnhancedCTImageStorage))
ENHANCED_CT_REFUSAL_STATUS = STATUS_SOP_CLASS_NOT_SUPPORTED

# Every syntax here is decodable in-process (pydicom + pylibjpeg) when the series is processed;
# instances are spooled exactly as received, so no syntax costs a re-encode at receive time.
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,      # 1.2.840.10008.1.2.4.70, process 14 selection value 1
    JPEGLossless,         # 1.2.840.10008.1.2.4.57, process 14
    JPEG2000Lossless,
    JPEG2000,             # lossy or lossless
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
# Derived instances are written Explicit VR Little Endian; Implicit is proposed as fallback
# because every Storage SCP must accept it.
SEND_TRANSFER_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

C_STORE_SCP_STATUSES: tuple[tuple[int, str, str], ...] = (
    (0x0000, "Success", "instance written to the spool (fsync, rename) and recorded, or a duplicate SOP Instance UID"),
    (ENHANCED_CT_REFUSAL_STATUS, "Refused: SOP Class not supported", "Enhanced CT when accept_enhanced_ct is false"),
    (0xA700, "Refused: Out of resources",
     "disk watermark reached, or the instance could not be persisted; the sender may retry"),
    (0xA900, "Error: Data set does not match SOP class",
     "SOP/Series/Study Instance UID missing, SOP UIDs differ from the request, image attributes missing, "
     "colour or multi-frame image"),
    (0xC000, "Error: Cannot understand",
     "invalid UID (syntax, over 64 characters), undecodable header, implausible geometry, truncated pixel "
     "data, or a SOP Instance UID already received with different pixel data (kept in quarantine)"),
)


def classify_status(status: int) -> str:
    """0xA7xx "out of resources" is worth retrying; every other failure status is permanent."""
    return TRANSIENT if (int(status) & 0xFF00) == 0xA700 else PERMANENT


def _sentence(text: str) -> str:
    return text[:1].lower() + text[1:] if text else text


def reject_reason(primitive: Any) -> str:
    """An A-ASSOCIATE-RJ's Result Source / Reason-Diag as words (PS3.8 Table 9-21)."""
    return _sentence(str(primitive.reason_str))


def rejection(assoc: Any) -> Any | None:
    """The destination's A-ASSOCIATE-RJ primitive, or ``None`` if it did not reject.

    A peer that rejects and closes at once (DCMTK ``storescp --refuse`` does) can close the
    socket before pynetdicom's requestor looks at it again after connecting; pynetdicom then
    reports an abort and leaves the rejection unread on the DUL's queue (often, on loopback
    against ``storescp --refuse``). The rejection is the peer's real answer: a permanent
    one must not be retried."""
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        return assoc.acceptor.primitive
    for prim in list(assoc.dul.to_user_queue.queue):
        if isinstance(prim, A_ASSOCIATE) and prim.result in (0x01, 0x02):
            return prim
    return None


def rejection_text(primitive: Any) -> str:
    """``association rejected (permanent|transient): <reason>``, as the sender records it and
    ``dicom-node echo`` prints it."""
    kind = "permanent" if int(primitive.result) == 1 else "transient"
    return f"association rejected ({kind}): {reject_reason(primitive)}"


@dataclass(frozen=True)
class Abort:
    """An A-ABORT PDU the peer sent (PS3.8 9.3.8): Source 0 is the peer's application (the DICOM UL
    service-user), 2 its upper layer (the service-provider, which then gives a Reason/Diag.); the
    words are pynetdicom's."""

    source: int
    reason: int
    source_str: str
    reason_str: str

    @classmethod
    def from_pdu(cls, pdu: Any) -> Abort:
        """From pynetdicom's received ``A_ABORT_RQ`` PDU (``evt.EVT_PDU_RECV``)."""
        return cls(int(pdu.source or 0), int(pdu.reason_diagnostic or 0), str(pdu.source_str), str(pdu.reason_str))

    def __str__(self) -> str:
        """``A-ABORT source 0 DUL service-user, reason 0``; for a service-provider abort the
        reason in words too (for a service-user abort the reason is not significant, PS3.8
        Table 9-26)."""
        text = f"A-ABORT source {self.source} {self.source_str}, reason {self.reason}"
        return text + f" {_sentence(self.reason_str)}" if self.source == 2 else text


def classify_abort(abort: Abort | None, *, established: bool, answered: int) -> str:
    """Whether an attempt the destination aborted is worth retrying (the one place this is decided).

    Permanent only when the destination's application (A-ABORT source 0, service-user) aborted an
    established association before answering any request on it: it accepted the association and
    then refused to serve it, which the next attempt, with the same calling AE and the same
    instances, meets again. Orthanc 1.10 does this for a C-STORE from a calling AE that is not in
    its ``DicomModalities``. Transient: an abort after it answered some requests (it stopped
    mid-series: restart, overload), an abort by its upper layer (source 2, a protocol-level
    event such as a timer), an abort during negotiation, and a connection closed without an
    A-ABORT (``abort`` is ``None``)."""
    if abort is not None and abort.source == 0 and established and answered == 0:
        return PERMANENT
    return TRANSIENT


def context_result(context: Any) -> str:
    """Why a presentation context was not accepted (PS3.8 9.3.3.2), e.g. "abstract syntax not supported"."""
    return str(context.status).lower()
