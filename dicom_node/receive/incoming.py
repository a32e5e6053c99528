"""Incoming data sets: a C-STORE's data set goes to disk fragment by fragment as it arrives.

pynetdicom keeps a C-STORE data set in memory (a ``BytesIO``) until its last fragment, so a data
set that never ends grows the process without limit, and what it held is not all given back
after the association. Its own option (``_config.STORE_RECV_CHUNKED_DATASET``) writes to the
system's temporary directory: another volume than the data directory, not seen by the disk
watermark, without a size limit, and switched for the whole process. Here each association's
DIMSE provider (:class:`SpoolingDIMSE`) writes the data set, exactly as received, after the
file meta information, to ``spool/.incoming/``: the data volume, so that the file becomes the
spool file by a rename (:mod:`dicom_node.receive.groupcommit`) or a quarantined copy
(:mod:`dicom_node.receive.quarantine`). An association holds one PDU in memory, not a data set.

Each fragment is counted before it is written, against ``node.max_dataset_mb`` and the disk
watermark (:meth:`dicom_node.store.watermark.Watermark.take_incoming`). Past either limit the
data set is no longer kept (its file is removed and the rest is read and dropped) and is
answered with ``0xA700`` and the reason once it ends; a data set that goes on past twice
``max_dataset_mb`` is aborted, so a sender that streams without end does not hold its
association for ever. A re-send of an instance already stored is let past the watermark (it is
compared and answered, never kept).

Command sets, and the data sets of other messages (C-ECHO has none), stay in memory as in
pynetdicom but are capped at :data:`OTHER_MESSAGE_MAX` bytes.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import time
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.pdu_primitives import P_DATA

from dicom_node.logs import log_event
from dicom_node.receive.validate import uid_problem
from dicom_node.store.heartbeat import pid_alive
from dicom_node.store.spool import unlink_quietly
from dicom_node.store.watermark import Watermark

log = logging.getLogger("dicom_node.receive.incoming")

MiB = 1 << 20
OTHER_MESSAGE_MAX = 1 << 20  # command sets and non-C-STORE data sets (a C-ECHO's is ~100 bytes)
ABORT_FACTOR = 2  # a data set past max_dataset_mb is read and dropped up to this multiple, then aborted
_names = itertools.count()
_HOST = socket.gethostname().replace("@", "_").replace("/", "_")


class DataSetTooLarge(ValueError):
    """A deflated data set that inflates past ``node.max_dataset_mb``."""


def incoming_dir(spool_dir: Path) -> Path:
    """Where data sets are written while they arrive (the spool's volume: a rename keeps them)."""
    return spool_dir / ".incoming"


class IncomingDataSet:
    """One C-STORE data set: written by the association's DUL thread as it arrives, read by the
    C-STORE handler once complete. ``refusal`` says why it was not kept (``failed``: the spool
    could not be written, as opposed to a limit). Without file meta information (``meta``
    ``None``: the request's UIDs cannot be encoded) the data set alone is kept, for the handler
    to decode and refuse with the reason."""

    def __init__(self, path: Path, meta: bytes | None, watermark: Watermark, max_bytes: int,
                 known: Callable[[], bool]) -> None:
        self.path = path
        self.has_meta = meta is not None
        meta = meta or b""
        self.meta_length = len(meta)
        self.received = 0  # data set bytes received (kept or not)
        self.refusal: str | None = None
        self.failed = False
        self._watermark = watermark
        self._max_bytes = max_bytes
        self._known = known
        self._over_watermark: bool | None = None  # once asked: a known instance may pass the watermark
        self._taken = 0  # bytes counted with the watermark (file meta included)
        self._settled = False  # the taken bytes were handed on (accepted) or released
        self._file: Any = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "wb")  # noqa: SIM115 - closed in finish/drop
        except OSError as exc:
            self._refuse(f"spool write failed: {exc.strerror or exc}", failed=True)
            return
        self._keep(meta)

    @property
    def nbytes(self) -> int:
        """Size of the file: preamble, file meta information and the data set as received."""
        return self.meta_length + self.received

    def write(self, data: memoryview) -> bool:
        """Keep one fragment (or count it, once past a limit); ``False``: abort the association."""
        self.received += len(data)
        if self._file is not None:
            if self.received > self._max_bytes:
                self._refuse(f"data set larger than node.max_dataset_mb ({self._max_bytes / MiB:g} MiB)")
            else:
                self._keep(data)
        return self.received <= ABORT_FACTOR * self._max_bytes

    def _keep(self, data: bytes | memoryview) -> None:
        why = self._watermark.take_incoming(len(data), over=bool(self._over_watermark))
        if why is not None and self._over_watermark is None:
            self._over_watermark = self._known()  # asked once, on the rare path only
            if self._over_watermark:
                why = self._watermark.take_incoming(len(data), over=True)
        if why is not None:
            self._refuse(why)
            return
        self._taken += len(data)
        try:
            self._file.write(data)
        except OSError as exc:
            self._refuse(f"spool write failed: {exc.strerror or exc}", failed=True)

    def _refuse(self, reason: str, failed: bool = False) -> None:
        """Stop keeping this data set: its file goes, what follows is only counted."""
        if self.refusal is None:
            self.refusal, self.failed = reason, failed
        self._close()
        unlink_quietly(self.path)
        self.release()

    def finish(self) -> None:
        """The last fragment is in: the file is complete (not yet synced)."""
        try:
            self._close()
        except OSError as exc:
            self._refuse(f"spool write failed: {exc.strerror or exc}", failed=True)

    def _close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def accepted(self) -> None:
        """The file is the spool's now (renamed and recorded): its output stays reserved."""
        if not self._settled:
            self._settled = True
            self._watermark.note_accepted(self._taken)

    def release(self) -> None:
        """No output will be made from these bytes (refused, a duplicate, quarantined)."""
        if not self._settled:
            self._settled = True
            self._watermark.release_incoming(self._taken)

    def drop(self) -> None:
        """Forget the data set: its file (if still here, not renamed) and its reservation."""
        try:
            self._close()
        except OSError:
            pass
        unlink_quietly(self.path)
        self.release()

    def dataset(self, transfer_syntax: UID) -> Dataset:
        """The data set decoded as pynetdicom decodes it (lazily, values as raw bytes); a deflated
        one is inflated only up to ``node.max_dataset_mb``."""
        with open(self.path, "rb") as f:
            f.seek(self.meta_length)
            if transfer_syntax.is_deflated:
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                data = inflater.decompress(f.read(), self._max_bytes + 1)
                if len(data) > self._max_bytes or inflater.unconsumed_tail:
                    raise DataSetTooLarge(f"inflated data set larger than node.max_dataset_mb "
                                          f"({self._max_bytes / MiB:g} MiB)")
                ds = read_dataset(BytesIO(data), False, True)
                ds.set_original_encoding(False, True)
            else:
                ds = read_dataset(f, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
                ds.set_original_encoding(transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
        return ds


class Incoming:
    """Opens the incoming data sets of one receiver and installs :class:`SpoolingDIMSE` on each
    association it accepts."""

    def __init__(self, spool_dir: Path, watermark: Watermark, max_dataset_mb: float,
                 is_known: Callable[[str], bool], stale_s: float) -> None:
        self.dir = incoming_dir(spool_dir)
        self.watermark = watermark
        self.max_bytes = int(max_dataset_mb * MiB)
        self.is_known = is_known
        self.stale_s = stale_s

    def sweep(self) -> int:
        """Remove data sets left by a receiver that died while receiving them: those of a process
        of this host that is gone, and any not written to for ``stale_s`` (receivers on other
        hosts may share this spool, and write to an open data set at least that often)."""
        removed = 0
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return 0
        cutoff = time.time() - self.stale_s
        for entry in entries:
            host, _, rest = entry.name.rpartition("@")
            pid = rest.split("-")[0]
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                gone = host == _HOST and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))
                if gone or entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                pass
        if removed:
            log_event(log, "incoming_swept", files=removed)
        return removed

    def open(self, assoc: Any, command_set: Dataset, context_id: int) -> IncomingDataSet:
        """A new data set for the C-STORE-RQ whose command set was just decoded."""
        name = self.dir / f"{_HOST}@{os.getpid()}-{next(_names)}.part"
        sop_uid = str(command_set.get("AffectedSOPInstanceUID", "") or "")
        sop_class = command_set.get("AffectedSOPClassUID", "")
        meta: bytes | None = None
        if not (uid_problem(sop_uid) or uid_problem(sop_class)):  # else refused by the handler (0xC000)
            try:
                meta = b"\0" * 128 + b"DICM" + encode_file_meta(create_file_meta(
                    sop_class_uid=sop_class, sop_instance_uid=sop_uid,
                    transfer_syntax=assoc._accepted_cx[context_id].transfer_syntax[0]))
            except Exception:  # noqa: BLE001 - no accepted context for it
                meta = None
        return IncomingDataSet(name, meta, self.watermark, self.max_bytes,
                               lambda: self.is_known(sop_uid.strip().rstrip("\x00").strip()))

    def install(self, assoc: Any) -> Callable[[], None]:
        """Make ``assoc`` (not yet started) spool its C-STORE data sets; returns what to call once
        its thread has ended (drops a data set cut off by the end of the association)."""
        dimse = SpoolingDIMSE.adopt(assoc.dimse, self)
        return dimse.discard


class SpoolingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with each C-STORE data set written to an
    :class:`IncomingDataSet` instead of memory (installed on an acceptor before it starts)."""

    _incoming: Incoming
    _sink: IncomingDataSet | None

    @classmethod
    def adopt(cls, dimse: DIMSEServiceProvider, incoming: Incoming) -> SpoolingDIMSE:
        dimse.__class__ = cls
        me: SpoolingDIMSE = dimse  # type: ignore[assignment]
        me._incoming = incoming
        me._sink = None
        return me

    @property
    def receiving(self) -> bool:
        """A C-STORE data set is arriving (the association is working, not idle)."""
        return self._sink is not None

    def receive_primitive(self, primitive: P_DATA) -> None:
        """As pynetdicom's, one presentation data value at a time; a C-STORE-RQ's data set
        fragments go to its :class:`IncomingDataSet`."""
        for context_id, data in primitive.presentation_data_value_list:
            sink = self._sink
            if sink is not None and not data[0] & 1:
                if not sink.write(memoryview(data)[1:]):
                    self._abort(f"C-STORE data set past {ABORT_FACTOR} x node.max_dataset_mb, still arriving "
                                f"(not kept: {sink.refusal})")
                    return
                if data[0] & 2:
                    self._deliver(sink)
                continue
            single = P_DATA()
            single.presentation_data_value_list = [[context_id, data]]
            super().receive_primitive(single)
            msg = self.message
            if msg is None:
                continue
            if isinstance(msg, C_STORE_RQ) and self._sink is None:  # command set decoded, data set follows
                self._sink = self._incoming.open(self.assoc, msg.command_set, context_id)
            elif msg.encoded_command_set.tell() + (msg.data_set.tell() if msg.data_set else 0) > OTHER_MESSAGE_MAX:
                self._abort(f"DIMSE message past {OTHER_MESSAGE_MAX} bytes without a C-STORE data set")
                return

    def _deliver(self, sink: IncomingDataSet) -> None:
        """The data set is complete: hand the C-STORE to the association, as pynetdicom does."""
        msg = self.message
        assert msg is not None
        sink.finish()
        msg._data_set_path = sink.path if sink.refusal is None else None
        self.message, self._sink = None, None
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": msg})
        try:
            request = msg.message_to_primitive()
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an invalid message ends the association
            log_event(log, "dimse_invalid", level=logging.WARNING, reason=f"{type(exc).__name__}: {exc}"[:200])
            sink.drop()
            self.dul.event_queue.put("Evt19")
            return
        request.incoming = sink  # read by the C-STORE handler (scp.py), which drops it when done
        self.msg_queue.put((msg.context_id, request))

    def _abort(self, reason: str) -> None:
        self.discard()
        self.message = None
        abort = getattr(self.dul, "abort_transport", None)
        if abort is not None:
            abort(reason)
        else:  # not the node's DUL: let pynetdicom's state machine abort (invalid PDU)
            self.dul.event_queue.put("Evt19")

    def discard(self) -> None:
        """Drop the data set still arriving (association aborted or ended mid-way)."""
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.drop()
