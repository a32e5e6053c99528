"""The node's configuration: one TOML file, validated once at start-up.

Every later component reads typed attributes from :class:`NodeConfig`, so a typo in the file is
reported before the node accepts its first association, with the key path and the bad value
(``rules[1].destinations: unknown destination 'PACSX'``), never as a failure hours later.
Relative paths in the file are resolved against the directory of the file itself, so a
configuration keeps working whatever the current directory of the process is.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .attributes import MATCH_KEYS
from .tls import DICOM_TLS_PORT, TLS_VERSIONS, ClientTLS, TLSConfig
from .tls import check as check_tls

DEFAULT_PORT = 11112
DEFAULT_MAX_PDU = 131072  # 128 KB PDUs raise pynetdicom's receive rate ~25 % over 16 KB
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash/control
_UID_ROOT_RE = re.compile(r"^[0-9]+(\.[0-9]+)*\.?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
QA_MODES = ("refuse", "flag", "off")


class ConfigError(ValueError):
    """Invalid configuration; the message names the key path and the bad value."""


@dataclass(frozen=True)
class AllowedAE:
    """A calling AE title allowed to associate; ``host`` pins it to one peer address.

    ``addresses`` are what ``host`` resolved to when the configuration was loaded (a host name
    is resolved once; the peer address of an association is always numeric)."""

    ae_title: str
    host: str | None = None
    addresses: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP that receives standardized series (a PACS, a router)."""

    name: str
    ae_title: str
    host: str
    port: int
    max_retries: int | None = None  # None: limited by retry_for_s only
    backoff_base_s: float = 10.0
    timeout_s: float = 30.0
    retry_for_s: float = 86400.0  # keep retrying transient failures this long, then `failed`
    backoff_max_s: float = 600.0  # cap of the exponential backoff
    tls: ClientTLS | None = None  # DICOM TLS to this destination ([tls] credentials)


@dataclass(frozen=True)
class Rule:
    """First matching rule decides what happens to a complete series."""

    name: str
    match: dict[str, tuple[str, ...]]
    action: str  # "standardize" | "ignore"
    model: str = "default"
    destinations: tuple[str, ...] = ()
    steps: int | None = None
    seed: int = 0
    qa: str = "refuse"  # physics QA gate: "refuse" | "flag" | "off" (see dicom_node.qa_gate)


@dataclass(frozen=True)
class Completeness:
    stable_age_s: float = 30.0
    use_expected_count: bool = True
    scan_interval_s: float = 2.0


@dataclass(frozen=True)
class Processing:
    device: str = "auto"
    max_batch_slices: int = 256
    poll_interval_s: float = 2.0
    steps: int | None = None
    seed: int = 0
    max_matrix: int = 1024  # Rows/Columns above this are refused (memory, tiling)


@dataclass(frozen=True)
class Retention:
    days: float = 30.0
    purge_interval_s: float = 3600.0


@dataclass(frozen=True)
class Disk:
    """Free-space watermark of the data directory: below ``max(min_free_percent, min_free_mb)``
    (after reserving room for the outputs of accepted work) new instances get 0xA700."""

    min_free_percent: float = 5.0
    min_free_mb: float = 2048.0
    output_reserve_factor: float = 1.0  # expected output bytes per accepted input byte


@dataclass(frozen=True)
class Audit:
    """Audit trail: one JSON line per association and per series event (IHE ATNA / RFC 3881 shape)."""

    enabled: bool = True
    path: Path | None = None  # None: <data_dir>/audit.jsonl


@dataclass(frozen=True)
class Logging:
    level: str = "INFO"
    format: str = "kv"  # "kv" (key=value) or "json"


@dataclass(frozen=True)
class Http:
    """Observation endpoint (``/metrics``, ``/healthz``, status page): off by default, loopback
    unless the admin names another address; ``port = 0`` takes any free port."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9400


@dataclass(frozen=True)
class NodeConfig:
    """Validated configuration. Attribute names follow the conformance statement's protocol."""

    ae_title: str = "LTDIFF"
    bind_address: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    data_dir: Path = Path("data")
    database_url: str = ""
    max_pdu: int = DEFAULT_MAX_PDU
    max_associations: int = 10
    allowed_calling_aes: tuple[AllowedAE, ...] = ()
    check_called_ae: bool = True
    accept_enhanced_ct: bool = False
    uid_root: str = "2.25."
    acse_timeout_s: float = 5.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0
    max_connections_per_address: int = 4
    max_pending_connections: int = 32
    tls: TLSConfig = field(default_factory=TLSConfig)
    completeness: Completeness = field(default_factory=Completeness)
    processing: Processing = field(default_factory=Processing)
    retention: Retention = field(default_factory=Retention)
    logging: Logging = field(default_factory=Logging)
    disk: Disk = field(default_factory=Disk)
    audit: Audit = field(default_factory=Audit)
    http: Http = field(default_factory=Http)
    destinations: tuple[Destination, ...] = ()
    rules: tuple[Rule, ...] = ()
    source: Path | None = None  # the file this was read from, for messages

    @property
    def spool_dir(self) -> Path:
        """Raw received instances, one directory per SeriesInstanceUID."""
        return self.data_dir / "spool"

    @property
    def output_dir(self) -> Path:
        """Derived instances waiting to be sent (and kept per retention)."""
        return self.data_dir / "output"

    @property
    def quarantine_dir(self) -> Path:
        """Instances kept for inspection but not processed (e.g. a conflicting duplicate)."""
        return self.data_dir / "quarantine"

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.data_dir / "audit.jsonl"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "dicom-node.pid"

    @property
    def db_url(self) -> str:
        """The effective database URL: SQLite in the data directory unless configured."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'dicom-node.sqlite').resolve()}"

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)


DEFAULT_RULES = (
    Rule(
        name="br40-to-bl64",
        match={"Modality": ("CT",), "ConvolutionKernel": ("Br40*",)},
        action="standardize",
        model="default",
        destinations=(),
    ),
)


# --------------------------------------------------------------------------- validation
def _fail(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{key}: {why} (got {value!r})")


def _table(raw: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise _fail(f"{path}{key}", value, "must be a table")
    return value


def _reject_unknown(table: dict[str, Any], allowed: set[str], path: str) -> None:
    for k, v in table.items():
        if k not in allowed:
            raise _fail(f"{path}{k}", v, f"unknown key; expected one of {sorted(allowed)}")


def _get(table: dict[str, Any], key: str, path: str, typ: type | tuple[type, ...], default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    ok = isinstance(value, typ) and not (isinstance(value, bool) and typ in (int, float, (int, float)))
    if not ok:
        names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise _fail(f"{path}{key}", value, f"must be {names}")
    return value


def _positive(value: float, key: str, allow_zero: bool = False) -> float:
    if value < 0 or (value == 0 and not allow_zero):
        raise _fail(key, value, "must be positive" if not allow_zero else "must be >= 0")
    return value


def _ae(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise _fail(key, value, "must be a DICOM AE title (1-16 characters, no backslash)")
    return value.strip()


def _port(value: Any, key: str, allow_zero: bool = False) -> int:
    lo = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= 65535:
        raise _fail(key, value, f"must be a TCP port {lo}-65535")
    return value


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


# --------------------------------------------------------------------------- sections
def _node(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    t = _table(raw, "node", "")
    p = "node."
    _reject_unknown(
        t,
        {
            "ae_title", "bind_address", "port", "data_dir", "database_url", "max_pdu",
            "max_associations", "allowed_calling_aes", "check_called_ae", "accept_enhanced_ct",
            "uid_root", "acse_timeout_s", "dimse_timeout_s", "network_timeout_s",
            "max_connections_per_address", "max_pending_connections",
        },
        p,
    )
    out: dict[str, Any] = {}
    out["ae_title"] = _ae(t.get("ae_title", "LTDIFF"), p + "ae_title")
    out["bind_address"] = _get(t, "bind_address", p, str, "0.0.0.0")
    out["port"] = _port(t.get("port", DEFAULT_PORT), p + "port", allow_zero=True)
    out["data_dir"] = _resolve(_get(t, "data_dir", p, str, "data"), base)
    url = _get(t, "database_url", p, str, "")
    if url and "://" not in url:
        raise _fail(p + "database_url", url, "must be an SQLAlchemy URL such as sqlite:///path or postgresql://...")
    out["database_url"] = url
    max_pdu = _get(t, "max_pdu", p, int, DEFAULT_MAX_PDU)
    if max_pdu != 0 and not 4096 <= max_pdu <= 2**26:
        raise _fail(p + "max_pdu", max_pdu, "must be 0 (unlimited) or 4096..67108864 bytes")
    out["max_pdu"] = max_pdu
    out["max_associations"] = int(_positive(_get(t, "max_associations", p, int, 10), p + "max_associations"))
    allowed = _get(t, "allowed_calling_aes", p, list, [])
    aes = []
    for i, item in enumerate(allowed):
        key = f"{p}allowed_calling_aes[{i}]"
        if isinstance(item, str):
            aes.append(AllowedAE(_ae(item, key)))
        elif isinstance(item, dict):
            _reject_unknown(item, {"ae_title", "host"}, key + ".")
            host = _get(item, "host", key + ".", str, None)
            addresses = _addresses(host, key + ".host") if host is not None else ()
            aes.append(AllowedAE(_ae(item.get("ae_title"), key + ".ae_title"), host, addresses))
        else:
            raise _fail(key, item, "must be an AE title or a table {ae_title, host}")
    out["allowed_calling_aes"] = tuple(aes)
    out["check_called_ae"] = _get(t, "check_called_ae", p, bool, True)
    out["accept_enhanced_ct"] = _get(t, "accept_enhanced_ct", p, bool, False)
    root = _get(t, "uid_root", p, str, "2.25.")
    if not _UID_ROOT_RE.match(root) or len(root) > 40:
        raise _fail(p + "uid_root", root, "must be a numeric UID root such as '1.2.826.0.1.3680043.10.999.' (max 40 chars)")
    out["uid_root"] = root if root.endswith(".") else root + "."
    for k, d in (("acse_timeout_s", 5.0), ("dimse_timeout_s", 30.0), ("network_timeout_s", 60.0)):
        out[k] = float(_positive(_get(t, k, p, (int, float), d), p + k))
    for k, n in (("max_connections_per_address", 4), ("max_pending_connections", 32)):
        out[k] = int(_positive(_get(t, k, p, int, n), p + k))
    return out


def _addresses(host: str, key: str) -> tuple[str, ...]:
    """The numeric addresses of an allow-list pin; a name that does not resolve is an error now,
    not a pin that silently never matches."""
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise _fail(key, host, f"host name does not resolve ({exc})") from None
    return tuple(sorted({str(info[4][0]) for info in infos}))


TLS_KEYS = {"enabled", "port", "plain_tcp", "certificate", "private_key", "ca_file", "require_client_certificate",
            "min_version", "ciphers"}
DESTINATION_TLS_KEYS = {"tls", "tls_server_name", "tls_check_hostname"}


def _tls(raw: dict[str, Any], base: Path, node: dict[str, Any]) -> TLSConfig:
    t = _table(raw, "tls", "")
    p = "tls."
    _reject_unknown(t, TLS_KEYS, p)
    paths = {}
    for k in ("certificate", "private_key", "ca_file"):
        v = _get(t, k, p, str, None)
        paths[k] = _resolve(v, base) if v else None
    version = _get(t, "min_version", p, str, "TLSv1.2")
    if version not in TLS_VERSIONS:
        raise _fail(p + "min_version", version, f"must be one of {sorted(TLS_VERSIONS)}")
    tls = TLSConfig(
        enabled=_get(t, "enabled", p, bool, False),
        port=_port(t.get("port", DICOM_TLS_PORT), p + "port", allow_zero=True),
        plain_tcp=_get(t, "plain_tcp", p, bool, True),
        require_client_certificate=_get(t, "require_client_certificate", p, bool, True),
        min_version=version,
        ciphers=_get(t, "ciphers", p, str, ""),
        **paths,
    )
    if not tls.plain_tcp and not tls.enabled:
        raise _fail(p + "plain_tcp", False, "the node needs a listener: set tls.enabled = true or keep plain_tcp")
    if tls.enabled and tls.port == node["port"] and tls.port != 0:
        raise _fail(p + "port", tls.port, "must differ from node.port (the plain TCP listener)")
    return tls


def _destination_tls(raw: dict[str, Any], destinations: tuple[Destination, ...],
                     tls: TLSConfig) -> tuple[Destination, ...]:
    """Per-destination ``tls = true`` (with optional ``tls_server_name``/``tls_check_hostname``)."""
    out = []
    for i, d in enumerate(destinations):
        t = raw["destinations"][i]
        p = f"destinations[{i}]."
        if not _get(t, "tls", p, bool, False):
            for k in ("tls_server_name", "tls_check_hostname"):
                if k in t:
                    raise _fail(p + k, t[k], "only meaningful with tls = true")
            out.append(d)
            continue
        problems = check_tls(replace(tls, enabled=False))  # the SCU needs certificate/key, not client-cert policy
        if problems:
            k, why = problems[0]
            raise ConfigError(f"tls.{k}: {why} (destinations[{i}] uses tls)")
        name = _get(t, "tls_server_name", p, str, d.host)
        out.append(replace(d, tls=ClientTLS(tls, name, _get(t, "tls_check_hostname", p, bool, True))))
    return tuple(out)


def _completeness(raw: dict[str, Any]) -> Completeness:
    t = _table(raw, "completeness", "")
    p = "completeness."
    _reject_unknown(t, {"stable_age_s", "use_expected_count", "scan_interval_s"}, p)
    return Completeness(
        stable_age_s=float(_positive(_get(t, "stable_age_s", p, (int, float), 30.0), p + "stable_age_s", True)),
        use_expected_count=_get(t, "use_expected_count", p, bool, True),
        scan_interval_s=float(_positive(_get(t, "scan_interval_s", p, (int, float), 2.0), p + "scan_interval_s")),
    )


def _steps(t: dict[str, Any], p: str) -> int | None:
    steps = _get(t, "steps", p, int, None)
    if steps is not None and steps < 1:
        raise _fail(p + "steps", steps, "must be >= 1 (leave it out for the model's default)")
    return steps


def _processing(raw: dict[str, Any]) -> Processing:
    t = _table(raw, "processing", "")
    p = "processing."
    _reject_unknown(t, {"device", "max_batch_slices", "poll_interval_s", "steps", "seed", "max_matrix"}, p)
    device = _get(t, "device", p, str, "auto")
    if not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", device):
        raise _fail(p + "device", device, "must be auto, cpu, cuda, cuda:N or mps")
    return Processing(
        device=device,
        max_batch_slices=int(_positive(_get(t, "max_batch_slices", p, int, 256), p + "max_batch_slices")),
        poll_interval_s=float(_positive(_get(t, "poll_interval_s", p, (int, float), 2.0), p + "poll_interval_s")),
        steps=_steps(t, p),
        seed=_get(t, "seed", p, int, 0),
        max_matrix=int(_positive(_get(t, "max_matrix", p, int, 1024), p + "max_matrix")),
    )


def _disk(raw: dict[str, Any]) -> Disk:
    t = _table(raw, "disk", "")
    p = "disk."
    _reject_unknown(t, {"min_free_percent", "min_free_mb", "output_reserve_factor"}, p)
    pct = float(_positive(_get(t, "min_free_percent", p, (int, float), 5.0), p + "min_free_percent", True))
    if pct >= 100:
        raise _fail(p + "min_free_percent", pct, "must be below 100")
    return Disk(
        min_free_percent=pct,
        min_free_mb=float(_positive(_get(t, "min_free_mb", p, (int, float), 2048.0), p + "min_free_mb", True)),
        output_reserve_factor=float(_positive(_get(t, "output_reserve_factor", p, (int, float), 1.0),
                                              p + "output_reserve_factor", True)),
    )


def _audit(raw: dict[str, Any], base: Path) -> Audit:
    t = _table(raw, "audit", "")
    p = "audit."
    _reject_unknown(t, {"enabled", "path"}, p)
    path = _get(t, "path", p, str, "")
    return Audit(enabled=_get(t, "enabled", p, bool, True), path=_resolve(path, base) if path else None)


def _http(raw: dict[str, Any]) -> Http:
    t = _table(raw, "http", "")
    p = "http."
    _reject_unknown(t, {"enabled", "host", "port"}, p)
    host = _get(t, "host", p, str, "127.0.0.1").strip()
    if not host:
        raise _fail(p + "host", host, "must be an address or host name (default 127.0.0.1)")
    return Http(enabled=_get(t, "enabled", p, bool, False), host=host,
                port=_port(t.get("port", 9400), p + "port", allow_zero=True))


def _retention(raw: dict[str, Any]) -> Retention:
    t = _table(raw, "retention", "")
    p = "retention."
    _reject_unknown(t, {"days", "purge_interval_s"}, p)
    return Retention(
        days=float(_positive(_get(t, "days", p, (int, float), 30.0), p + "days")),
        purge_interval_s=float(_positive(_get(t, "purge_interval_s", p, (int, float), 3600.0), p + "purge_interval_s")),
    )


def _logging(raw: dict[str, Any]) -> Logging:
    t = _table(raw, "logging", "")
    p = "logging."
    _reject_unknown(t, {"level", "format"}, p)
    level = _get(t, "level", p, str, "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise _fail(p + "level", level, "must be DEBUG, INFO, WARNING or ERROR")
    fmt = _get(t, "format", p, str, "kv")
    if fmt not in {"kv", "json"}:
        raise _fail(p + "format", fmt, "must be 'kv' or 'json'")
    return Logging(level=level, format=fmt)


def _destinations(raw: dict[str, Any]) -> tuple[Destination, ...]:
    items = raw.get("destinations", [])
    if not isinstance(items, list):
        raise _fail("destinations", items, "must be an array of tables [[destinations]]")
    out: list[Destination] = []
    seen: set[str] = set()
    for i, t in enumerate(items):
        p = f"destinations[{i}]."
        if not isinstance(t, dict):
            raise _fail(f"destinations[{i}]", t, "must be a table")
        _reject_unknown(t, {"name", "ae_title", "host", "port", "max_retries", "backoff_base_s", "timeout_s",
                            "retry_for_s", "backoff_max_s"} | DESTINATION_TLS_KEYS, p)
        for req in ("name", "ae_title", "host", "port"):
            if req not in t:
                raise ConfigError(f"{p}{req}: required key is missing")
        name = _get(t, "name", p, str, None)
        if not _NAME_RE.match(name):
            raise _fail(p + "name", name, "must be 1-64 letters, digits, '_', '-' or '.'")
        if name in seen:
            raise _fail(p + "name", name, "duplicate destination name")
        seen.add(name)
        max_retries = _get(t, "max_retries", p, int, None)
        if max_retries is not None and max_retries < 0:
            raise _fail(p + "max_retries", max_retries, "must be >= 0")
        out.append(
            Destination(
                name=name,
                ae_title=_ae(t["ae_title"], p + "ae_title"),
                host=_get(t, "host", p, str, None),
                port=_port(t["port"], p + "port"),
                max_retries=max_retries,
                backoff_base_s=float(_positive(_get(t, "backoff_base_s", p, (int, float), 10.0), p + "backoff_base_s")),
                timeout_s=float(_positive(_get(t, "timeout_s", p, (int, float), 30.0), p + "timeout_s")),
                retry_for_s=float(_positive(_get(t, "retry_for_s", p, (int, float), 86400.0), p + "retry_for_s", True)),
                backoff_max_s=float(_positive(_get(t, "backoff_max_s", p, (int, float), 600.0), p + "backoff_max_s")),
            )
        )
    return tuple(out)


def _rules(raw: dict[str, Any], destinations: tuple[Destination, ...], base: Path) -> tuple[Rule, ...]:
    if "rules" not in raw:
        return DEFAULT_RULES
    items = raw["rules"]
    if not isinstance(items, list):
        raise _fail("rules", items, "must be an array of tables [[rules]]")
    names = {d.name for d in destinations}
    out: list[Rule] = []
    for i, t in enumerate(items):
        p = f"rules[{i}]."
        if not isinstance(t, dict):
            raise _fail(f"rules[{i}]", t, "must be a table")
        _reject_unknown(t, {"name", "match", "action", "model", "destinations", "steps", "seed", "qa"}, p)
        name = _get(t, "name", p, str, f"rule-{i}")
        match_raw = _get(t, "match", p, dict, {})
        match: dict[str, tuple[str, ...]] = {}
        for k, v in match_raw.items():
            mk = f"{p}match.{k}"
            if k not in MATCH_KEYS:
                raise _fail(mk, v, f"unknown attribute; expected one of {list(MATCH_KEYS)}")
            values = [v] if isinstance(v, str) else v
            if not isinstance(values, list) or not values or not all(isinstance(x, str) for x in values):
                raise _fail(mk, v, "must be a string or a non-empty list of strings")
            if k == "SeriesDescription":
                for x in values:
                    try:
                        re.compile(x)
                    except re.error as exc:
                        raise _fail(mk, x, f"invalid regular expression: {exc}") from None
            match[k] = tuple(values)
        action = _get(t, "action", p, str, "standardize")
        if action not in {"standardize", "ignore"}:
            raise _fail(p + "action", action, "must be 'standardize' or 'ignore'")
        model = _get(t, "model", p, str, "default")
        if model != "default" and "/" not in model and not model.endswith(".safetensors"):
            raise _fail(p + "model", model, "must be 'default' or a path to a .safetensors checkpoint")
        if model != "default":
            resolved = _resolve(model, base)
            if not resolved.is_file():
                raise _fail(p + "model", model, f"checkpoint not found at {resolved}")
            model = str(resolved)
        qa = _get(t, "qa", p, str, "refuse")
        if qa not in QA_MODES:
            raise _fail(p + "qa", qa, "must be 'refuse', 'flag' or 'off'")
        dests = _get(t, "destinations", p, list, [])
        for j, d in enumerate(dests):
            if d not in names:
                raise ConfigError(f"{p}destinations: unknown destination {d!r} (defined: {sorted(names)})")
        out.append(
            Rule(
                name=name, match=match, action=action, model=model, destinations=tuple(dests),
                steps=_steps(t, p), seed=_get(t, "seed", p, int, 0), qa=qa,
            )
        )
    return tuple(out)


def parse_config(raw: dict[str, Any], base: Path = Path("."), source: Path | None = None) -> NodeConfig:
    """Validate a TOML-shaped dict; raises :class:`ConfigError` naming the bad key and value."""
    _reject_unknown(
        raw, {"node", "completeness", "processing", "retention", "logging", "destinations", "rules",
              "tls", "disk", "audit", "http"}, ""
    )
    node = _node(raw, base)
    tls = _tls(raw, base, node)
    if tls.enabled:
        for k, why in check_tls(tls)[:1]:
            raise ConfigError(f"tls.{k}: {why}")
    destinations = _destination_tls(raw, _destinations(raw), tls)
    return NodeConfig(
        **node,
        tls=tls,
        completeness=_completeness(raw),
        processing=_processing(raw),
        retention=_retention(raw),
        logging=_logging(raw),
        disk=_disk(raw),
        audit=_audit(raw, base),
        http=_http(raw),
        destinations=destinations,
        rules=_rules(raw, destinations, base),
        source=source,
    )


def load_config(path: str | Path | None) -> NodeConfig:
    """Read and validate the TOML file at ``path``; ``None`` gives the built-in defaults."""
    if path is None:
        return parse_config({}, Path.cwd())
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    try:
        return parse_config(raw, p.resolve().parent, p)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
