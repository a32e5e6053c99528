"""DICOM TLS (PS3.15 Annex B): ``ssl`` contexts for the SCP listener and for sending, BCP 195 profile.

Both sides use TLS 1.2 or later (BCP 195 / RFC 9325; the DICOM "BCP 195 TLS Profile", PS3.15
B.9), the BCP 195 AEAD cipher suites for TLS 1.2 (forward-secret ECDHE/DHE with AES-GCM; OpenSSL
chooses the TLS 1.3 suites, all of which are AEAD), no compression and no renegotiation. The SCP
presents ``certificate``/``private_key`` and, with ``require_client_certificate``, accepts only
peers whose certificate chains to ``ca_file``. The SCU presents the same certificate (DICOM TLS
is mutual in practice: PACS usually require it) and verifies the destination's certificate
against ``ca_file`` and, unless disabled per destination, its host name.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the [tls] section of the configuration file
    from dicom_node.config import TLSConfig

# RFC 7525 section 4.2 / RFC 9325 section 4.2, in OpenSSL names, ECDHE first.
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
))
TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
DICOM_TLS_PORT = 2762  # IANA "dicom-tls"


@dataclass(frozen=True)
class ClientTLS:
    """TLS for one destination: the node's credentials plus how the server is checked."""

    settings: TLSConfig
    server_name: str  # name checked against the server certificate (and sent as SNI)
    check_hostname: bool = True


def _base(settings: TLSConfig, purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = TLS_VERSIONS[settings.min_version]
    ctx.set_ciphers(settings.ciphers or BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if settings.certificate is not None:
        ctx.load_cert_chain(str(settings.certificate), str(settings.private_key) if settings.private_key else None)
    return ctx


def server_context(settings: TLSConfig) -> ssl.SSLContext:
    """The SCP side: our certificate; the peer's certificate required and verified if configured."""
    ctx = _base(settings, ssl.PROTOCOL_TLS_SERVER)
    if settings.ca_file is not None:
        ctx.load_verify_locations(cafile=str(settings.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_NONE
    return ctx


def client_context(tls: ClientTLS) -> ssl.SSLContext:
    """The SCU side: our certificate offered, the destination's certificate always verified."""
    ctx = _base(tls.settings, ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = tls.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls.settings.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.settings.ca_file))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return ctx


def check(settings: TLSConfig) -> list[tuple[str, str]]:
    """Problems as (key, why), so the configuration loader can name the key; [] when usable."""
    problems: list[tuple[str, str]] = []
    for key in ("certificate", "private_key"):
        if getattr(settings, key) is None:
            problems.append((key, "required when tls.enabled = true or a destination uses tls"))
    for key in ("certificate", "private_key", "ca_file"):
        p = getattr(settings, key)
        if p is not None and not Path(p).is_file():
            problems.append((key, f"file not found: {p}"))
    if settings.require_client_certificate and settings.enabled and settings.ca_file is None:
        problems.append(("ca_file", "required when require_client_certificate = true"))
    if problems:
        return problems
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(settings.ciphers or BCP195_CIPHERS)
    except ssl.SSLError as exc:
        return [("ciphers", f"OpenSSL accepts none of them: {exc}")]
    try:
        _base(settings, ssl.PROTOCOL_TLS_SERVER)
    except (ssl.SSLError, OSError) as exc:
        return [("private_key", f"cannot load with the certificate: {exc}")]
    if settings.ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(settings.ca_file))
        except (ssl.SSLError, OSError) as exc:
            return [("ca_file", f"not a PEM CA bundle: {exc}")]
    return []
