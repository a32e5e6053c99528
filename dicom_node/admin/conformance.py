"""The DICOM conformance statement of the running configuration.

The SOP classes, transfer syntaxes and statuses come from :mod:`dicom_node.negotiation`, which the
SCP and SCU use too, so what ``dicom-node conformance`` prints is what the node negotiates. The text
is built from the running configuration (AE title, port, allow-list, destinations), so a site
hands its PACS team the statement of the node they actually run.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import pynetdicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, CTImageStorage

from dicom_node.negotiation import (
    ACCEPTED_TRANSFER_SYNTAXES, C_STORE_SCP_STATUSES, ENHANCED_CT_REFUSAL_STATUS, ENHANCED_CT_SOP_CLASSES,
    SEND_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES, VERIFICATION_SOP_CLASS,
)
from dicom_node.derive.series import DerivationInfo, uid_prefix, output_kernel
from dicom_node.tls import BCP195_CIPHERS
from dicom_node.receive.transport import ASSOCIATE_RQ_MAX_LENGTH
from dicom_node.version import SOFTWARE_NAME, SOFTWARE_VERSION


class DestinationLike(Protocol):
    """A configured C-STORE SCP that receives standardized series."""

    @property
    def name(self) -> str: ...
    @property
    def ae_title(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


class ConformanceConfig(Protocol):
    """What the statement needs from the node configuration (``dicom_node.config.NodeConfig``)."""

    @property
    def ae_title(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def bind_address(self) -> str: ...
    @property
    def max_pdu(self) -> int: ...
    @property
    def max_associations(self) -> int: ...
    @property
    def allowed_calling_aes(self) -> Sequence[Any]: ...  # str or objects with ae_title (and host)
    @property
    def check_called_ae(self) -> bool: ...
    @property
    def destinations(self) -> Sequence[DestinationLike]: ...
    @property
    def accept_enhanced_ct(self) -> bool: ...
    @property
    def rules(self) -> Sequence[Any]: ...  # name, match, action, model (dicom_node.config.Rule)


def _name(uid: UID) -> str:
    return uid.name if uid.name != str(uid) else "(unnamed)"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _allowed(config: ConformanceConfig) -> list[str]:
    """Allow-list entries as text: ``AE`` or ``AE from HOST``."""
    out = []
    for item in config.allowed_calling_aes:
        if isinstance(item, str):
            out.append(item)
        else:
            host = getattr(item, "host", None)
            out.append(f"{item.ae_title} from {host}" if host else str(item.ae_title))
    return out


def _network_section(c: ConformanceConfig) -> list[str]:
    pdu = "unlimited" if c.max_pdu == 0 else f"{c.max_pdu} bytes"
    timeouts = [f"{label} {getattr(c, attr)} s" for attr, label in
                (("acse_timeout_s", "ACSE"), ("dimse_timeout_s", "DIMSE"), ("network_timeout_s", "network"))
                if getattr(c, attr, None) is not None]
    allowed = _allowed(c)
    tls = getattr(c, "tls", None)
    if tls is not None and tls.enabled:
        where = f"DICOM TLS on {c.bind_address}:{tls.port}" + (f" and plain TCP on {c.bind_address}:{c.port}"
                                                                 if tls.plain_tcp else " only")
    else:
        where = f"TCP {c.bind_address}:{c.port} (DICOM Upper Layer over TCP/IP, no TLS)"
    lines = [
        "## 2 Networking",
        "",
        f"One Application Entity, AE title **{c.ae_title}**, listening on {where}.",
        "",
        f"- Implementation Class UID: {pynetdicom.PYNETDICOM_IMPLEMENTATION_UID}; Implementation Version Name: "
        f"{pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION}",
        f"- Maximum PDU size received: {pdu}",
        f"- Maximum number of simultaneous associations accepted: {c.max_associations}",
        "- Asynchronous operations and SOP class extended negotiation: not supported",
    ]
    if timeouts:
        lines.append("- Timeouts: " + ", ".join(timeouts))
    per_address = getattr(c, "max_connections_per_address", None)
    if per_address is not None:
        lines += [
            f"- Pre-association limits: the complete A-ASSOCIATE-RQ (and TLS handshake) must arrive within the ACSE "
            f"timeout of the TCP connection; a declared PDU length above {ASSOCIATE_RQ_MAX_LENGTH} bytes before the "
            "association, or above the maximum PDU size after it, is answered with A-ABORT (service provider, "
            "invalid PDU parameter value) without reading the body; at most "
            f"{per_address} TCP connections per peer address and {getattr(c, 'max_pending_connections', '?')} "
            "connections not yet admitted as associations; refused connections are closed.",
        ]
    lines += [
        "",
        "### 2.1 Association acceptance policy",
        "",
        "- Calling AE titles: " + (", ".join(allowed) if allowed else "any (no allow-list configured)")
        + ("; an AE pinned to a host is refused from any other address" if any(" from " in a for a in allowed)
           else ""),
        f"- Called AE title: {'must equal ' + c.ae_title if c.check_called_ae else 'not checked'}",
        "- Rejected associations: A-ASSOCIATE-RJ (rejected permanent) for an unknown calling or called AE title; "
        "A-ASSOCIATE-RJ (rejected transient) when the association limit is reached",
        "- Per presentation context, the first proposed transfer syntax (in the requester's order) that is "
        "in the accepted list is chosen; SCP/SCU role selection is not negotiated",
        "",
    ]
    return lines


def _scp_section(c: ConformanceConfig) -> list[str]:
    rows: list[list[object]] = [[_name(VERIFICATION_SOP_CLASS), VERIFICATION_SOP_CLASS, "SCP", "C-ECHO"]]
    rows += [[_name(u), u, "SCP", "stored; standardized when a routing rule matches"] for u in STORAGE_SOP_CLASSES]
    for u in ENHANCED_CT_SOP_CLASSES:
        if c.accept_enhanced_ct:
            what = "stored and kept (multi-frame objects are not standardized)"
        else:
            what = f"negotiated, C-STORE refused with status 0x{ENHANCED_CT_REFUSAL_STATUS:04X} (SOP Class not supported)"
        rows.append([_name(u), u, "SCP", what])
    lines = ["### 2.2 SOP classes accepted (SCP)", ""]
    lines += _table(["SOP Class", "UID", "Role", "Behaviour"], rows)
    lines += ["", "### 2.3 Transfer syntaxes accepted", "",
              "Accepted for every storage SOP class above; compressed pixel data is decoded with "
              "pylibjpeg only when a series is processed (instances are kept exactly as received).", ""]
    lines += _table(["Transfer Syntax", "UID"], [[_name(u), u] for u in ACCEPTED_TRANSFER_SYNTAXES])
    lines += ["", "### 2.4 C-STORE SCP status codes", ""]
    lines += _table(["Status", "Meaning", "When"], [[f"0x{s:04X}", m, w] for s, m, w in C_STORE_SCP_STATUSES])
    lines += ["", "A success status is sent only after the instance is persisted on disk and recorded in the "
              "database. Storage is level 2 (full): all attributes, including private ones, are kept as received.",
              ""]
    return lines


def _scu_section(c: ConformanceConfig) -> list[str]:
    lines = ["### 2.5 Association initiation (SCU)", "",
             f"The node sends each standardized series as {_name(CTImageStorage)} ({CTImageStorage}) "
             "over one association per series and destination, proposing "
             + " and ".join(f"{_name(u)} ({u})" for u in SEND_TRANSFER_SYNTAXES)
             + " (the latter as fallback). Calling AE title: " + c.ae_title + ".", ""]
    dimse = [d for d in c.destinations if getattr(d, "type", "dimse") == "dimse"]
    if dimse:
        rows = []
        for d in dimse:
            retries = getattr(d, "max_retries", None)
            rows.append([d.name, d.ae_title, d.host, d.port, "-" if retries is None else retries])
        lines += _table(["Destination", "Called AE", "Host", "Port", "Max retries"], rows)
    if web := [d for d in c.destinations if getattr(d, "type", "dimse") == "stow-rs"]:
        lines += ["", "Sent by DICOMweb STOW-RS (PS3.18), not DIMSE: "
                  + ", ".join(f"{d.name} ({getattr(d, 'url', '')})" for d in web) + "."]
    if not c.destinations:
        lines.append("No destinations are configured: standardized series are kept in the node's output folder.")
    lines += ["", "Transient failures (connection refused, timeout, abort, 0xA7xx Out of resources) are retried "
              "with exponential backoff up to the destination's retry limit; permanent rejections (association "
              "rejected, 0x0122, 0xA9xx, 0xCxxx) fail the send at once and are recorded per instance.", ""]
    return lines


def _created_objects_section(c: ConformanceConfig) -> list[str]:
    d = DerivationInfo(model_name="", uid_root=getattr(c, "uid_root", None))
    uid_text = f"under the UID root {d.uid_root}" if uid_prefix(d.uid_root) else "as UUID-derived 2.25 UIDs"
    kernel = "\\".join(output_kernel(Dataset(), d))

    def code(c: Code) -> str:
        return f'({c.value}, {c.scheme_designator}, "{c.meaning}")'

    rows = [
        ["SOP Class", f"{_name(CTImageStorage)}, Explicit VR Little Endian, uncompressed (even for compressed input)"],
        ["Series/SOP Instance UID", f"new, {uid_text}; one new series per processed series"],
        ["Image Type", "DERIVED\\SECONDARY\\AXIAL"],
        ["Series Number", f"source Series Number + {d.series_number_offset}"],
        ["Series Description", f'source description + "{d.series_description_suffix.format(target=d.target_kernel)}"'],
        ["Convolution Kernel", kernel],
        ["Source Image Sequence", f"the source instance, purpose {code(codes.DCM.SourceImageForImageProcessingOperation)}, "
                                  "Spatial Locations Preserved YES"],
        ["Referenced Series Sequence", "source series and instance (Common Instance Reference)"],
        ["Derivation Code Sequence", f"{code(d.derivation_code)} from CID 7203"],
        ["Derivation Description", "model name, version, sha256 (short), method and sampler parameters"],
        ["Contributing Equipment Sequence", f"item appended: purpose {code(codes.DCM.ProcessingEquipment)}, "
                                            f"Manufacturer, model name, Software Versions ({SOFTWARE_NAME} "
                                            f"{SOFTWARE_VERSION}, model version), model sha256, date/time"],
        ["Kept from the source", "patient, study, equipment, frame of reference, geometry, acquisition, "
                                 "window, stored pixel representation and rescale, Lossy Image Compression"],
        ["Removed", "private attributes, icon image, digital signatures, earlier derivation/source references"],
    ]
    lines = ["## 3 Created SOP instances", ""]
    lines += _table(["Attribute", "Value"], rows)
    return lines + [""]


def _security_section(c: ConformanceConfig) -> list[str]:
    tls = getattr(c, "tls", None)
    scu_tls = [d.name for d in c.destinations if getattr(d, "tls", None) is not None]
    if (tls is None or not tls.enabled) and not scu_tls:
        return ["No TLS is configured: run the node on a trusted network segment (see the operations guide to "
                "enable the DICOM TLS listener).", ""]
    ciphers = (tls.ciphers if tls is not None and tls.ciphers else BCP195_CIPHERS).replace(":", ", ")
    lines = ["### 5.1 Secure transport connection profile", "",
             f"BCP 195 TLS Profile (PS3.15 B.9): TLS {tls.min_version.removeprefix('TLSv') if tls else '1.2'} or "
             f"later; TLS 1.2 cipher suites {ciphers}; the TLS 1.3 suites of OpenSSL (all AEAD); no compression, "
             "no renegotiation. X.509 certificates in PEM."]
    if tls is not None and tls.enabled:
        verify = ("required and verified against the configured CA list (a client without a trusted "
                  "certificate is refused during the handshake)") if tls.require_client_certificate else \
            "not requested (server authentication only)"
        lines.append(f"- SCP (port {tls.port}): the node presents its certificate; client certificate {verify}.")
    if scu_tls:
        lines.append("- SCU: TLS to " + ", ".join(scu_tls) + "; the node presents its certificate and verifies the "
                     "destination's certificate against the configured CA list and its host name.")
    if tls is not None and tls.enabled and tls.plain_tcp:
        lines.append(f"- Plain TCP stays available on port {c.port} for peers without TLS.")
    return lines + [""]


def _model_text(model: str) -> str:
    """A rule's model as the statement names it: the default's method, a shipped name, a file."""
    from ltdiff_core.weights import DEFAULT

    if model == "default":
        return f"default (shipped `{DEFAULT}`)"
    return f"`{model}`" if "/" not in model else f"`{Path(model).name}` (site checkpoint)"


def _rules_section(config: ConformanceConfig) -> list[str]:
    lines = ["## 1.1 Routing rules of this configuration", "",
             "The first rule whose attributes match a complete series decides what happens to it; "
             "a series no rule matches is kept and shown as unrouted.", ""]
    rows = [[r.name, "; ".join(f"{k} = {' or '.join(v)}" for k, v in r.match.items()) or "(any)",
             r.action if r.action != "standardize" else f"standardize with {_model_text(r.model)}"]
            for r in getattr(config, "rules", ())]
    return lines + _table(["Rule", "Matches", "Action"], rows) + [""] if rows else []


def conformance_statement(config: ConformanceConfig) -> str:
    """The statement as Markdown text, for the configuration the node runs with."""
    lines = [
        f"# DICOM Conformance Statement: {SOFTWARE_NAME} {SOFTWARE_VERSION}",
        "",
        "A DICOM node that receives CT series, standardizes the reconstruction kernel (Siemens Br40 to "
        "Bl64-like) with the model its routing rule names (section 1.1), and sends the result as a new "
        "DERIVED series. "
        "Research use; the output is not intended for diagnosis.",
        "",
        "## 1 Overview",
        "",
    ]
    lines += _table(
        ["SOP Class", "UID", "SCU", "SCP"],
        [[_name(VERIFICATION_SOP_CLASS), VERIFICATION_SOP_CLASS, "no", "yes"]]
        + [[_name(u), u, "yes", "yes"] for u in STORAGE_SOP_CLASSES]
        + [[_name(u), u, "no", "stored" if config.accept_enhanced_ct else "refused"] for u in ENHANCED_CT_SOP_CLASSES],
    )
    lines.append("")
    lines += _rules_section(config)
    lines += _network_section(config) + _scp_section(config) + _scu_section(config)
    lines += _created_objects_section(config)
    lines += [
        "## 4 Character sets",
        "",
        "Received instances are stored with whatever Specific Character Set they carry. Created instances keep "
        "the source's Specific Character Set; the text the node adds is in the default repertoire (ISO-IR 6).",
        "",
        "## 5 Security",
        "",
        *_security_section(config),
        "No user identity negotiation. Access control is the calling AE allow-list (optionally pinned to host "
        "addresses; host names are resolved when the configuration is loaded) and the called AE check above. "
        "The service runs as a dedicated unprivileged user under systemd hardening; logs at INFO level "
        "contain no patient identifiers.",
        "",
    ]
    return "\n".join(lines)
