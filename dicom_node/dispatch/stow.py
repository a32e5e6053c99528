"""Send: STOW-RS a derived series to a DICOMweb destination (PS3.18 §10.5).

Same contract as the C-STORE sender (:func:`dicom_node.dispatch.scu.send_files`): one
:class:`~dicom_node.dispatch.outcome.SendOutcome` with an :class:`~dicom_node.dispatch.outcome.InstanceResult` per
file, and the failure classified so the caller retries only what may succeed later. An attempt
reached the server when a request's connection was made (it may have stored something even
without an answer); a refused or unverified connection did not. Transient: connection
refused or reset, timeouts, HTTP 408/429/5xx, per-instance FailureReason 0xA7xx (out of resources).
Permanent: other HTTP 4xx (the status and reason are recorded), redirects (not followed) and other
FailureReasons.

The series goes in batches (``max_instances_per_request`` instances, about ``max_request_mb`` per
POST); each batch's per-instance results, read from the response's ReferencedSOPSequence and
FailedSOPSequence, are reported through ``on_result`` before the next POST, so the caller can commit
them. HTTP 200 means all stored, 202 stored with warnings or some failed, 409 some or all failed.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError
from urllib3.exceptions import SSLError as URLLibSSLError

from dicom_node.config import Destination
from dicom_node.logs import log_event
from dicom_node.negotiation import PERMANENT, TRANSIENT, classify_status
from dicom_node.dispatch.outcome import InstanceResult, SendOutcome

log = logging.getLogger("dicom_node.dispatch.stow")
# dicomweb-client wraps each POST in the `retrying` package, which logs every failed try with a
# traceback at WARNING; retries are off here (the delivery backoff owns them) and the outcome is
# logged once as ``stow_rs_series``.
logging.getLogger("retrying").setLevel(logging.ERROR)

#: HTTP statuses worth retrying: the server is busy, overloaded or between restarts.
TRANSIENT_HTTP = frozenset({408, 429})
#: Used when a FailedSOPSequence item lacks FailureReason (Type 1, so a non-conformant server).
PROCESSING_FAILURE = 0x0110


class SecretError(RuntimeError):
    """A configured password or token cannot be read at send time."""


def _secret(env: str | None, path: Path | None, what: str) -> str | None:
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            raise SecretError(f"{what} environment variable {env} is not set")
        return value
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    return None


class _TrustAdapter(HTTPAdapter):
    """Verifies https servers against one CA file. ``Session.verify`` is not enough: requests lets
    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` in the environment override it."""

    def __init__(self, ca_file: Path) -> None:
        super().__init__()
        self.ca_file = str(ca_file)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        kwargs["verify"] = self.ca_file
        return super().send(request, **kwargs)


def session_for(dest: Destination) -> requests.Session:
    """A requests session with the destination's credentials and TLS trust; secrets are read now
    (not kept in the configuration) and never logged."""
    s = requests.Session()
    # A redirect is refused, not followed: requests turns a redirected POST into a GET (whose 200
    # would read as "all stored") and would carry the credentials to another address.
    s.max_redirects = 0
    if dest.ca_file is not None:
        s.mount("https://", _TrustAdapter(dest.ca_file))
    password = _secret(dest.password_env, dest.password_file, "password")
    if dest.username is not None and password is not None:
        s.auth = (dest.username, password)
    token = _secret(dest.token_env, dest.token_file, "token")
    if token is not None:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


def client_for(dest: Destination, on_response: Callable[..., None] | None = None) -> DICOMwebClient:
    """A DICOMweb client that makes one try per call: the node's delivery backoff owns retries.
    ``on_response(response)`` sees every HTTP response (the client returns only the dataset)."""
    assert dest.url is not None
    client = DICOMwebClient(dest.url, session=session_for(dest), timeout=(dest.timeout_s, dest.timeout_s),
                            callback=on_response,
                            chunk_size=1 << 40)  # one Content-Length body, no chunked transfer encoding
    client.set_http_retry_params(retry=False)
    return client


def batches(sizes: Sequence[int], max_instances: int, max_bytes: float) -> Iterator[range]:
    """Consecutive index ranges of at most ``max_instances`` files and about ``max_bytes``
    (a single larger file forms a batch of its own)."""
    start, total = 0, 0
    for k, size in enumerate(sizes):
        if k > start and (k - start >= max_instances or total + size > max_bytes):
            yield range(start, k)
            start, total = k, 0
        total += size
    if start < len(sizes):
        yield range(start, len(sizes))


def _never_connected(exc: requests.ConnectionError) -> bool:
    """True when the request never reached the server (refused, unresolvable, connect timeout,
    TLS handshake): nothing can have been stored. False when the connection broke afterwards."""
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.SSLError)):
        return True
    reason = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError, URLLibSSLError))


def _http_reason(rsp: requests.Response) -> str:
    """``HTTP 404 Not Found`` plus the start of the body (servers put the cause there)."""
    text = f"HTTP {rsp.status_code} {rsp.reason or ''}".strip()
    retry_after = rsp.headers.get("Retry-After")
    if retry_after:
        text += f", Retry-After {retry_after}"
    body = " ".join((rsp.text or "").split())[:200]
    return f"{text}: {body}" if body else text


def _parse_response(rsp: requests.Response) -> Dataset | None:
    """The STOW-RS response dataset (DICOM JSON or XML), ``None`` when absent or unreadable."""
    if not rsp.content:
        return None
    ctype = rsp.headers.get("Content-Type", "").split(";")[0].strip()
    try:
        if ctype in ("application/dicom+json", "application/json"):
            return Dataset.from_json(rsp.json())
        if ctype in ("application/dicom+xml", "application/xml"):
            from dicomweb_client.web import _load_xml_dataset
            from xml.etree.ElementTree import fromstring  # noqa: S405 - response of the configured server

            return _load_xml_dataset(fromstring(rsp.content))  # noqa: S314
    except (ValueError, TypeError, KeyError) as exc:
        log.debug("unreadable STOW-RS response: %s", exc)
    return None


def instance_statuses(response: Dataset | None, uids: Sequence[str],
                      http_status: int) -> list[tuple[int | None, str | None]]:
    """(status, error) per SOP Instance UID from the response's ReferencedSOPSequence (stored;
    WarningReason if any) and FailedSOPSequence (FailureReason). An instance the response does not
    list is stored only under HTTP 200 ("all stored"); otherwise its fate is unknown (status None)."""
    stored: dict[str, int] = {}
    failed: dict[str, int] = {}
    if response is not None:
        for item in response.get("ReferencedSOPSequence", []):
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            stored[uid] = int(item.WarningReason) if item.get("WarningReason") is not None else 0x0000
        for item in response.get("FailedSOPSequence", []):
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            failed[uid] = int(item.FailureReason) if item.get("FailureReason") is not None else PROCESSING_FAILURE
    out: list[tuple[int | None, str | None]] = []
    for uid in uids:
        if uid in failed:
            out.append((failed[uid], f"STOW-RS FailureReason 0x{failed[uid]:04X}"))
        elif uid in stored:
            status = stored[uid]
            out.append((status, None if status == 0 else f"STOW-RS WarningReason 0x{status:04X}"))
        elif http_status == 200:
            out.append((0x0000, None))
        else:
            out.append((None, f"not listed in the STOW-RS response (HTTP {http_status})"))
    return out


def _post(client: DICOMwebClient, datasets: list[Dataset],
          seen: list[requests.Response]) -> tuple[int, Dataset | None]:
    """POST one batch; returns (HTTP status, response dataset) for 2xx and 409, raises otherwise.
    ``seen`` is filled by the client's response callback (see :func:`client_for`)."""
    seen.clear()
    try:
        ds = client.store_instances(datasets)
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 409:
            return 409, _parse_response(exc.response)
        raise
    return (seen[-1].status_code if seen else 200), (ds if len(ds) else None)


def _uids(files: Sequence[Path]) -> list[str | None]:
    """SOPInstanceUID per file from its meta header (``None``: not a readable DICOM file)."""
    out: list[str | None] = []
    for p in files:
        try:
            meta = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            out.append(str(meta.file_meta.MediaStorageSOPInstanceUID))
        except (OSError, ValueError, AttributeError, pydicom.errors.InvalidDicomError):
            out.append(None)
    return out


def _reached(exc: requests.RequestException) -> bool:
    """Whether a request that failed as a whole got to the server (answered, timed out waiting
    for the answer, or broke after connecting): only then can the server have acted on it."""
    return not (isinstance(exc, requests.ConnectionError) and _never_connected(exc))


def _request_failure(exc: requests.RequestException, dest: Destination) -> tuple[str, str]:
    """(TRANSIENT | PERMANENT, reason) for a POST that failed as a whole."""
    if isinstance(exc, requests.TooManyRedirects) and exc.response is not None:
        where = exc.response.headers.get("Location", "?")
        return PERMANENT, (f"STOW-RS HTTP {exc.response.status_code} {exc.response.reason or ''}".rstrip()
                           + f" redirects to {where}; set url to the service's own address (permanent)")
    if isinstance(exc, requests.ConnectionError) and _never_connected(exc):
        return TRANSIENT, f"STOW-RS connection to {dest.url} not established ({type(exc).__name__}: {exc})"
    if isinstance(exc, requests.Timeout):
        return TRANSIENT, f"no STOW-RS response from {dest.url} within {dest.timeout_s:g} s (timeout)"
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        kind = TRANSIENT if code in TRANSIENT_HTTP or code >= 500 else PERMANENT
        return kind, f"STOW-RS {_http_reason(exc.response)} ({kind})"
    if isinstance(exc, requests.ConnectionError):
        return TRANSIENT, f"STOW-RS connection to {dest.url} broke during the request ({exc})"
    return TRANSIENT, f"STOW-RS request to {dest.url} failed: {exc}"


def send_files_stow(dest: Destination, files: Sequence[Path], calling_ae: str = "", max_pdu: int = 0,
                    on_result: Callable[[int, InstanceResult], None] | None = None) -> SendOutcome:
    """STOW-RS ``files`` to ``dest.url`` in batches; never raises for network outcomes.

    ``calling_ae`` and ``max_pdu`` belong to DIMSE and are accepted only so both senders share one
    signature. ``on_result(index, result)`` is called for each instance as its batch's response
    arrives (before the next POST)."""
    t0 = time.monotonic()
    out = SendOutcome()
    if not files:
        return out
    results: list[InstanceResult | None] = [None] * len(files)
    posts = 0

    def note(kind: str, msg: str) -> None:
        if out.failure != PERMANENT:  # a permanent failure is the one to report
            out.failure, out.error = kind, msg

    def fail(ks: Sequence[int], msg: str, kind: str, reached: bool) -> None:
        for k in ks:
            results[k] = InstanceResult(files[k], uids[k] or "", None, msg, reached=reached, failure=kind)

    uids = _uids(files)
    seen: list[requests.Response] = []
    try:
        client = client_for(dest, on_response=lambda r, *a, **k: seen.append(r))
    except SecretError as exc:
        client = None
        note(PERMANENT, f"STOW-RS to {dest.url}: {exc}")
        fail(range(len(files)), out.error or str(exc), PERMANENT, reached=False)
    sizes = [p.stat().st_size if uids[k] else 0 for k, p in enumerate(files)]
    for batch in batches(sizes, dest.max_instances_per_request, dest.max_request_mb * 2**20) if client else ():
        index, datasets = [], []
        for k in batch:
            try:
                if uids[k] is None:
                    raise ValueError("not a readable DICOM file")
                datasets.append(pydicom.dcmread(files[k]))
                index.append(k)
            except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:
                note(PERMANENT, f"cannot send {files[k].name}: {exc}")
                fail([k], f"cannot send {files[k].name}: {exc}", PERMANENT, reached=False)
        if not datasets:
            continue
        posts += 1
        try:
            http_status, response = _post(client, datasets, seen)
        except (requests.RequestException, ValueError) as exc:
            if isinstance(exc, requests.RequestException):
                (kind, msg), reached = _request_failure(exc, dest), _reached(exc)
            else:
                kind, msg, reached = TRANSIENT, f"STOW-RS request to {dest.url} failed: {exc}", True
            note(kind, msg)
            out.reached = out.reached or reached
            # The rest is not sent now: the next attempt sends whatever is not committed.
            fail([k for k in range(batch.start, len(files)) if results[k] is None], msg, kind, reached)
            break
        out.reached = True
        for k, (status, error) in zip(index, instance_statuses(response, [uids[k] for k in index], http_status)):
            if status is None:  # answered, but not about this instance: its fate is unknown
                res = InstanceResult(files[k], uids[k] or "", None, error, reached=True, failure=TRANSIENT)
            else:
                res = InstanceResult.answered(files[k], uids[k] or "", status, error, failure=classify_status(status))
            if not res.ok:
                kind = res.failure or TRANSIENT
                note(kind, f"{error} ({kind}; HTTP {http_status})")
            results[k] = res
            if on_result is not None:
                on_result(k, res)
    out.results = [r for r in results if r is not None]
    out.seconds = time.monotonic() - t0
    log_event(log, "stow_rs_series", level=logging.INFO if out.failure is None else logging.WARNING,
              destination=dest.name, url=dest.url, sent=out.sent, total=len(files), requests=posts,
              failure=out.failure, error=out.error, seconds=round(out.seconds, 2))
    return out


def qido_echo(dest: Destination) -> tuple[bool, str]:
    """The DICOMweb counterpart of C-ECHO: one QIDO-RS study search (limit 1) with the
    destination's credentials and trust; says whether the service answers and how."""
    try:
        client_for(dest).search_for_studies(limit=1)
    except (requests.RequestException, SecretError, ValueError) as exc:
        _, msg = _request_failure(exc, dest) if isinstance(exc, requests.RequestException) else (PERMANENT, str(exc))
        return False, f"QIDO-RS {dest.url}: {msg}"
    return True, f"QIDO-RS {dest.url}: the service answers"
