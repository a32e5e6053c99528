"""The node's configuration: one TOML file, validated once at start-up by pydantic models.

Every later component reads typed attributes from :class:`NodeConfig`, so a typo in the file is
reported before the node accepts its first association, with the key path and the bad value
(``rules[1].destinations: unknown destination 'PACSX'``), never as a failure hours later.
Each section of the file is one model below; a field's default is the only place that default
lives (``conf/dicom-node.toml`` documents them, and a test keeps the two in step). Every model
forbids unknown keys, and scalars are strict (``"30"`` is not a number, ``1`` is not ``true``),
because TOML already gives typed values and a quoted number is a mistake worth naming.
Relative paths in the file are resolved against the directory of the file itself, so a
configuration keeps working whatever the current directory of the process is.
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, Strict, StrictBool, StrictInt, StrictStr,
    ValidationError, ValidationInfo, field_validator, model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from dicom_node.attributes import MATCH_KEYS
from dicom_node.tls import DICOM_TLS_PORT, ClientTLS
from dicom_node.tls import check as check_tls

QAMode = Literal["refuse", "flag", "off"]  # physics QA gate, see dicom_node.process.qa_gate
Role = Literal["receive", "decide", "process", "dispatch"]  # stages a `serve` process runs
ROLES: tuple[str, ...] = get_args(Role)
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash/control
_UID_ROOT_RE = re.compile(r"^[0-9]+(\.[0-9]+)*\.?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_INPUT = object()  # an error's value is the validated input unless the check names another one
_NO_VALUE = object()  # ... or none at all (a message that already says what is wrong)


class ConfigError(ValueError):
    """Invalid configuration; the message names the key path and the bad value."""


# --------------------------------------------------------------------------- field types
def _invalid(why: str, value: Any = _INPUT, key: str = "") -> PydanticCustomError:
    """A failure with the house message; ``key`` extends the location (``match.Kernel``)."""
    return PydanticCustomError("config", "{why}", {"why": why, "key": key, "value": value})


def _ae_title(value: Any) -> str:
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise _invalid("must be a DICOM AE title (1-16 characters, no backslash)")
    return value.strip()


def _port(lowest: int) -> BeforeValidator:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= 65535:
            raise _invalid(f"must be a TCP port {lowest}-65535")
        return value
    return BeforeValidator(check)


def _path(value: Any, info: ValidationInfo) -> Path:
    """A path relative to the configuration file's directory (``base`` in the validation context)."""
    if not isinstance(value, (str, Path)) or value == "":
        raise _invalid("must be a path (str)")
    base = Path((info.context or {}).get("base", "."))
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


Positive = Annotated[float, Strict(), Field(gt=0)]  # strict: an int is a float too; a string or a bool is not
NonNegative = Annotated[float, Strict(), Field(ge=0)]
Count = Annotated[int, Strict(), Field(gt=0)]
AETitle = Annotated[str, BeforeValidator(_ae_title)]
Port = Annotated[int, _port(0)]  # 0: any free port (tests)
RemotePort = Annotated[int, _port(1)]
ConfigPath = Annotated[Path, BeforeValidator(_path)]
OptionalPath = Annotated[Path | None, BeforeValidator(lambda v, info: None if v in (None, "") else _path(v, info))]
Steps = Annotated[int, Strict(), Field(ge=1)]


def _existing_file(value: Any, info: ValidationInfo) -> Path | None:
    """A path (as :func:`_path`) that must name a readable file now, not at the first use."""
    if value in (None, ""):
        return None
    p = _path(value, info)
    if not p.is_file():
        raise _invalid(f"file not found at {p}")
    return p


ExistingFile = Annotated[Path | None, BeforeValidator(_existing_file)]


class Section(BaseModel):
    """One table of the file: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- sections
class AllowedAE(Section):
    """A calling AE title allowed to associate; ``host`` pins it to one peer address.

    ``addresses`` are what ``host`` resolved to when the configuration was loaded (a host name
    is resolved once; the peer address of an association is always numeric). In the file an
    entry is either the AE title or a table ``{ae_title, host}``."""

    ae_title: AETitle
    host: StrictStr | None = None
    _addresses: tuple[str, ...] = PrivateAttr(())

    @model_validator(mode="before")
    @classmethod
    def _title_or_table(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"ae_title": value}
        if not isinstance(value, (dict, AllowedAE)):
            raise _invalid("must be an AE title or a table {ae_title, host}")
        return value

    @model_validator(mode="after")
    def _resolve_host(self) -> AllowedAE:
        if self.host is not None:
            self._addresses = _addresses(self.host)
        return self

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._addresses

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"


def _addresses(host: str) -> tuple[str, ...]:
    """The numeric addresses of an allow-list pin; a name that does not resolve is an error now,
    not a pin that silently never matches."""
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise _invalid(f"host name does not resolve ({exc})", host, key="host") from None
    return tuple(sorted({str(info[4][0]) for info in infos}))


class Node(Section):
    """``[node]``: the listener, its limits and the local storage."""

    ae_title: AETitle = "LTDIFF"
    bind_address: StrictStr = "0.0.0.0"
    port: Port = 11112
    data_dir: ConfigPath = Field("data", validate_default=True)  # resolved like any other path
    database_url: StrictStr = ""  # "": SQLite in data_dir
    max_pdu: StrictInt = 131072  # 128 KB PDUs raise pynetdicom's receive rate ~25 % over 16 KB
    max_associations: Count = 10
    allowed_calling_aes: tuple[AllowedAE, ...] = ()
    check_called_ae: StrictBool = True
    accept_enhanced_ct: StrictBool = False
    uid_root: StrictStr = "2.25."
    acse_timeout_s: Positive = 5.0
    dimse_timeout_s: Positive = 30.0
    network_timeout_s: Positive = 60.0
    max_connections_per_address: Count = 4
    max_pending_connections: Count = 32
    max_associations_per_address: Count = 4  # associations one peer address holds at once (fair share: transport.py)
    idle_association_s: Positive = 10.0  # no C-STORE this long: the slot may go to a newcomer when all are taken
    max_echo_per_s: Positive = 5.0  # C-ECHO answers per association and second (a loop is slowed)
    max_dataset_mb: Annotated[float, Strict(), Field(gt=0, le=4096)] = 32.0  # one C-STORE data set; larger: 0xA700
    group_commit_ms: NonNegative = 10.0  # wait for concurrent instances to share syncs; 0 = off
    group_commit_max: Count = 64  # instances per group commit
    roles: tuple[Role, ...] = ROLES  # `serve --roles` overrides; all four: the single-box node
    lease_s: Positive = 60.0  # a claimed job/delivery is another worker's to take after this without renewal
    # Several `serve --roles receive` processes (shared database) listen on the same port and the
    # kernel spreads new connections among them (Linux SO_REUSEPORT): receiving on several cores.
    reuse_port: StrictBool = False

    @field_validator("roles")
    @classmethod
    def _roles(cls, roles: tuple[str, ...]) -> tuple[str, ...]:
        if not roles:
            raise _invalid(f"must name at least one of {list(ROLES)}")
        return tuple(r for r in ROLES if r in roles)  # pipeline order, no repeats

    @field_validator("database_url")
    @classmethod
    def _url(cls, url: str) -> str:
        if url and "://" not in url:
            raise _invalid("must be an SQLAlchemy URL such as sqlite:///path or postgresql://...")
        return url

    @field_validator("max_pdu")
    @classmethod
    def _pdu(cls, size: int) -> int:
        if size != 0 and not 4096 <= size <= 2**26:
            raise _invalid("must be 0 (unlimited) or 4096..67108864 bytes")
        return size

    @field_validator("uid_root")
    @classmethod
    def _root(cls, root: str) -> str:
        if not _UID_ROOT_RE.match(root) or len(root) > 40:
            raise _invalid("must be a numeric UID root such as '1.2.826.0.1.3680043.10.999.' (max 40 chars)")
        return root if root.endswith(".") else root + "."


class TLSConfig(Section):
    """``[tls]``: one certificate for the node, used when listening and when sending (see ``tls.py``)."""

    enabled: StrictBool = False
    port: Port = DICOM_TLS_PORT
    plain_tcp: StrictBool = True  # keep the plain listener on node.port as well
    certificate: OptionalPath = None
    private_key: OptionalPath = None
    ca_file: OptionalPath = None
    require_client_certificate: StrictBool = True
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"  # the keys of tls.TLS_VERSIONS
    ciphers: StrictStr = ""  # "" = tls.BCP195_CIPHERS

    @model_validator(mode="after")
    def _usable(self) -> TLSConfig:
        if not self.plain_tcp and not self.enabled:
            raise _invalid("the node needs a listener: set tls.enabled = true or keep plain_tcp", False,
                           key="plain_tcp")
        if self.enabled:
            for key, why in check_tls(self)[:1]:
                raise _invalid(why, _NO_VALUE, key=key)
        return self


class Completeness(Section):
    """``[completeness]``: when a series counts as complete (DICOM has no end-of-series message)."""

    stable_age_s: NonNegative = 30.0
    use_expected_count: StrictBool = True
    scan_interval_s: Positive = 2.0


class Processing(Section):
    """``[processing]``: where and how the model runs."""

    device: StrictStr = "auto"
    max_batch_slices: Count = 256
    poll_interval_s: Positive = 2.0
    steps: Steps | None = None  # None: the model's default
    seed: StrictInt = 0
    max_matrix: Count = 1024  # Rows/Columns above this are refused (memory, tiling)
    streaming: StrictBool = True  # standardize settled slices of a routed series while it arrives (stream.py)
    stream_min_slices: Count = 16  # settled, not yet standardized slices that start a streaming run
    stream_settle_s: NonNegative = 2.0  # how long a slice has been on disk before it is streamed

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not _DEVICE_RE.match(device):
            raise _invalid("must be auto, cpu, cuda, cuda:N or mps")
        return device


class Retention(Section):
    """``[retention]``: how long finished series are kept."""

    days: Positive = 30.0
    purge_interval_s: Positive = 3600.0


class Disk(Section):
    """``[disk]``: free-space watermark of the data directory: below ``max(min_free_percent,
    min_free_mb)`` (after reserving room for the outputs of accepted work) new instances get 0xA700."""

    min_free_percent: Annotated[float, Strict(), Field(ge=0, lt=100)] = 5.0
    min_free_mb: NonNegative = 2048.0  # at least 1 MiB is kept in any case (the processing step's margin)
    output_reserve_factor: NonNegative = 1.0  # expected output bytes per accepted input byte
    quarantine_max_mb: NonNegative = 1024.0  # conflicting copies kept; the oldest go first (0: none kept)


class Audit(Section):
    """``[audit]``: one JSON line per association and per series event (IHE ATNA / RFC 3881 shape)."""

    enabled: StrictBool = True
    path: OptionalPath = None  # None: <data_dir>/audit.jsonl


class Logging(Section):
    """``[logging]``."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["kv", "json"] = "kv"  # key=value or one JSON object per line

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, level: Any) -> Any:
        return level.upper() if isinstance(level, str) else level


class Http(Section):
    """``[http]``: the metrics and status endpoint (off by default; loopback unless configured)."""

    enabled: StrictBool = False
    host: Annotated[StrictStr, Field(pattern=r"\S")] = "127.0.0.1"  # an explicit address is the admin's choice
    port: Port = 9400


DestinationType = Literal["dimse", "stow-rs"]
DESTINATION_TYPES: tuple[str, ...] = get_args(DestinationType)
DIMSE_KEYS = frozenset({"ae_title", "host", "port", "tls", "tls_server_name", "tls_check_hostname", "associations"})
STOW_KEYS = frozenset({"url", "max_instances_per_request", "max_request_mb", "username", "password_env",
                       "password_file", "token_env", "token_file", "ca_file"})


def _stow_address(url: str) -> tuple[str, int]:
    """Host and port of a DICOMweb base URL; raises the house error naming what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _invalid("must be an http:// or https:// DICOMweb base URL")
    if parts.username is not None or parts.password is not None:
        raise _invalid("must not carry credentials; use username with password_env or password_file")
    if parts.query or parts.fragment:
        raise _invalid("must be a base URL without query or fragment")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise _invalid("has an invalid port") from None
    return parts.hostname, port


class Destination(Section):
    """``[[destinations]]``: a receiver of standardized series (a PACS, a router): a C-STORE SCP
    (``type = "dimse"``) or a DICOMweb STOW-RS service (``type = "stow-rs"``, ``url``; ``host`` and
    ``port`` are then taken from the URL and ``ae_title`` is empty). Secrets of a STOW-RS
    destination are named (an environment variable or a file), never written in the file, and
    must be readable when the configuration is loaded."""

    name: StrictStr
    type: DestinationType = "dimse"
    ae_title: AETitle = ""  # required for dimse (checked in _required_keys)
    host: StrictStr = ""  # dimse: required; stow-rs: from url
    port: RemotePort = 0  # dimse: required; stow-rs: from url (default 80/443)
    max_retries: Annotated[int, Strict(), Field(ge=0)] | None = None  # None: limited by retry_for_s only
    backoff_base_s: Positive = 10.0
    timeout_s: Positive = 30.0
    associations: Annotated[int, Strict(), Field(ge=1, le=16)] = 1  # dimse: C-STORE associations in parallel
    retry_for_s: NonNegative = 86400.0  # keep retrying transient failures this long, then `failed`
    backoff_max_s: Positive = 600.0  # cap of the exponential backoff
    use_tls: StrictBool = Field(False, alias="tls")  # `tls = true` in the file: DICOM TLS ([tls] credentials)
    tls_server_name: StrictStr | None = None  # None: host
    tls_check_hostname: StrictBool = True
    url: StrictStr | None = None  # stow-rs: DICOMweb base URL, e.g. http://pacs:8042/dicom-web
    max_instances_per_request: Count = 50  # stow-rs: one POST carries at most this many instances ...
    max_request_mb: Positive = 64.0  # ... and about this many MB (a larger single instance goes alone)
    username: StrictStr | None = None  # stow-rs: HTTP basic auth, password from password_env or password_file
    password_env: StrictStr | None = None
    password_file: ExistingFile = None
    token_env: StrictStr | None = None  # stow-rs: bearer token from an environment variable or a file
    token_file: ExistingFile = None
    ca_file: ExistingFile = None  # stow-rs over https: CA bundle to verify the server (default: system CAs)
    _client_tls: ClientTLS | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _keys_of_type(cls, value: Any) -> Any:
        """Refuse the other type's keys; a STOW-RS destination's address is its URL's."""
        if not isinstance(value, dict) or value.get("type", "dimse") not in DESTINATION_TYPES:
            return value
        kind = value.get("type", "dimse")
        for key in sorted(set(value) & (STOW_KEYS if kind == "dimse" else DIMSE_KEYS)):
            raise _invalid(f"not a key of a type = {kind!r} destination", value[key], key=key)
        if kind == "stow-rs" and isinstance(value.get("url"), str):
            try:
                host, port = _stow_address(value["url"])
            except PydanticCustomError:
                return value  # reported by _url
            return {**value, "host": host, "port": port}
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME_RE.match(name):
            raise _invalid("must be 1-64 letters, digits, '_', '-' or '.'")
        return name

    @field_validator("url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        _stow_address(url)
        return url.rstrip("/")

    @field_validator("password_env", "token_env")
    @classmethod
    def _env_set(cls, name: str | None) -> str | None:
        if name is not None and not os.environ.get(name):
            raise _invalid("environment variable is not set or empty")
        return name

    @model_validator(mode="after")
    def _required_keys(self) -> Destination:
        if self.type == "dimse":
            for key in ("ae_title", "host", "port"):
                if key not in self.model_fields_set:
                    raise _invalid("required key is missing", _NO_VALUE, key=key)
            return self
        if self.url is None:
            raise _invalid("required key is missing (type = 'stow-rs')", _NO_VALUE, key="url")
        if self.password_env and self.password_file:
            raise _invalid("give password_env or password_file, not both", str(self.password_file),
                           key="password_file")
        if self.token_env and self.token_file:
            raise _invalid("give token_env or token_file, not both", str(self.token_file), key="token_file")
        has_password = bool(self.password_env or self.password_file)
        if self.username is not None and not has_password:
            raise _invalid("required with username (or password_file)", _NO_VALUE, key="password_env")
        if has_password and self.username is None:
            raise _invalid("required with a password", _NO_VALUE, key="username")
        if self.username is not None and (self.token_env or self.token_file):
            raise _invalid("basic auth and a bearer token are exclusive", self.username, key="username")
        if self.ca_file is not None and urlsplit(self.url).scheme != "https":
            raise _invalid("only meaningful with an https:// url", str(self.ca_file), key="ca_file")
        return self

    @model_validator(mode="after")
    def _tls_keys_need_tls(self) -> Destination:
        if not self.use_tls:
            for key in ("tls_server_name", "tls_check_hostname"):
                if key in self.model_fields_set:
                    raise _invalid("only meaningful with tls = true", getattr(self, key), key=key)
        return self

    @property
    def tls(self) -> ClientTLS | None:
        """The TLS settings to send with, or ``None`` for plain TCP (set when the file is loaded)."""
        return self._client_tls


class Rule(Section):
    """``[[rules]]``: the first matching rule decides what happens to a complete series."""

    name: StrictStr  # in the file: rule-<index> when left out
    match: dict[str, tuple[str, ...]] = Field(default_factory=dict)  # MATCH_KEYS -> patterns
    action: Literal["standardize", "ignore"] = "standardize"
    model: StrictStr = "default"  # a shipped name (ltdiff_core.weights.NAMES) or the resolved path of a checkpoint
    destinations: tuple[StrictStr, ...] = ()
    steps: Steps | None = None
    seed: StrictInt = 0
    qa: QAMode = "refuse"

    @field_validator("match", mode="before")
    @classmethod
    def _match(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        match: dict[str, tuple[str, ...]] = {}
        for key, value in raw.items():
            if key not in MATCH_KEYS:
                raise _invalid(f"unknown attribute; expected one of {list(MATCH_KEYS)}", value, key=key)
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, (list, tuple)) or not values or not all(isinstance(x, str) for x in values):
                raise _invalid("must be a string or a non-empty list of strings", value, key=key)
            if key == "SeriesDescription":
                for x in values:
                    try:
                        re.compile(x)
                    except re.error as exc:
                        raise _invalid(f"invalid regular expression: {exc}", x, key=key) from None
            match[key] = tuple(values)
        return match

    @field_validator("model")
    @classmethod
    def _checkpoint(cls, model: str, info: ValidationInfo) -> str:
        from ltdiff_core.weights import NAMES

        if model == "default" or model in NAMES:
            return model
        if "/" not in model and not model.endswith(".safetensors"):
            raise _invalid(f"must be 'default', a shipped model ({', '.join(NAMES)}) or a path to a .safetensors checkpoint")
        resolved = _path(model, info)
        if not resolved.is_file():
            raise _invalid(f"checkpoint not found at {resolved}")
        return str(resolved)


DEFAULT_RULES = (
    Rule(name="br40-to-bl64", match={"Modality": ("CT",), "ConvolutionKernel": ("Br40*",)}),
)


# --------------------------------------------------------------------------- the file
class NodeConfig(Section):
    """The validated file. The ``[node]`` keys are also attributes of the configuration itself
    (``config.port``), the names the conformance statement uses."""

    node: Node = Field(default_factory=dict, validate_default=True)  # validated: data_dir resolved against base
    tls: TLSConfig = TLSConfig()
    completeness: Completeness = Completeness()
    processing: Processing = Processing()
    retention: Retention = Retention()
    logging: Logging = Logging()
    disk: Disk = Disk()
    audit: Audit = Audit()
    http: Http = Http()
    destinations: tuple[Destination, ...] = ()
    rules: tuple[Rule, ...] = DEFAULT_RULES
    _source: Path | None = PrivateAttr(None)

    @field_validator("rules", mode="before")
    @classmethod
    def _rule_names(cls, rules: Any) -> Any:
        if not isinstance(rules, list):
            return rules
        return [{"name": f"rule-{i}", **r} if isinstance(r, dict) and "name" not in r else r
                for i, r in enumerate(rules)]

    @model_validator(mode="after")
    def _cross_checks(self) -> NodeConfig:
        node, tls = self.node, self.tls
        if tls.enabled and tls.port == node.port and tls.port != 0:
            raise _invalid("must differ from node.port (the plain TCP listener)", tls.port, key="tls.port")
        listening = {node.port} | ({tls.port} if tls.enabled else set())
        if self.http.enabled and self.http.port != 0 and self.http.port in listening:
            raise _invalid("must differ from the DICOM ports", self.http.port, key="http.port")
        seen: set[str] = set()
        for i, d in enumerate(self.destinations):
            if d.name in seen:
                raise _invalid("duplicate destination name", d.name, key=f"destinations[{i}].name")
            seen.add(d.name)
            if d.use_tls:  # the SCU needs certificate/key, not the listener's client-certificate policy
                for key, why in check_tls(tls.model_copy(update={"enabled": False}))[:1]:
                    raise _invalid(f"{why} (destinations[{i}] uses tls)", _NO_VALUE, key=f"tls.{key}")
                d._client_tls = ClientTLS(tls, d.tls_server_name or d.host, d.tls_check_hostname)
        for i, rule in enumerate(self.rules):
            for name in rule.destinations:
                if name not in seen:
                    raise _invalid(f"unknown destination {name!r} (defined: {sorted(seen)})", _NO_VALUE,
                                   key=f"rules[{i}].destinations")
        return self

    # the [node] keys, read where the protocol needs them
    @property
    def ae_title(self) -> str:
        return self.node.ae_title

    @property
    def bind_address(self) -> str:
        return self.node.bind_address

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    @property
    def database_url(self) -> str:
        return self.node.database_url

    @property
    def max_pdu(self) -> int:
        return self.node.max_pdu

    @property
    def max_associations(self) -> int:
        return self.node.max_associations

    @property
    def allowed_calling_aes(self) -> tuple[AllowedAE, ...]:
        return self.node.allowed_calling_aes

    @property
    def check_called_ae(self) -> bool:
        return self.node.check_called_ae

    @property
    def accept_enhanced_ct(self) -> bool:
        return self.node.accept_enhanced_ct

    @property
    def uid_root(self) -> str:
        return self.node.uid_root

    @property
    def acse_timeout_s(self) -> float:
        return self.node.acse_timeout_s

    @property
    def dimse_timeout_s(self) -> float:
        return self.node.dimse_timeout_s

    @property
    def network_timeout_s(self) -> float:
        return self.node.network_timeout_s

    @property
    def max_connections_per_address(self) -> int:
        return self.node.max_connections_per_address

    @property
    def max_pending_connections(self) -> int:
        return self.node.max_pending_connections

    # derived places
    @property
    def source(self) -> Path | None:
        """The file this was read from, for messages."""
        return self._source

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


# --------------------------------------------------------------------------- messages
_MUST_BE = {
    "int_type": "int", "int_parsing": "int", "int_from_float": "int",
    "float_type": "int or float", "float_parsing": "int or float",
    "bool_type": "bool", "bool_parsing": "bool", "string_type": "str",
    "tuple_type": "an array", "list_type": "an array",
    "dict_type": "a table", "model_type": "a table", "model_attributes_type": "a table",
}


def _number(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model whose keys the location ``loc`` indexes (``("rules", 0)`` -> :class:`Rule`)."""
    model: type[BaseModel] | None = NodeConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        model = _model_in(field.annotation) if field is not None else None
    return model


def _model_in(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _path_text(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif "[" not in part:  # pydantic's tags of validator functions are not keys
            text += f".{part}" if text else part
    return text


def _describe(err: ErrorDetails) -> str:
    """One error as ``key.path: why (got value)``, the message format of the whole node."""
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input", _NO_VALUE)
    loc = tuple(err["loc"])
    if kind == "config":
        path = ".".join(p for p in (_path_text(loc), ctx["key"]) if p)
        value = value if ctx["value"] is _INPUT else ctx["value"]
        return f"{path}: {ctx['why']}" + ("" if value is _NO_VALUE else f" (got {value!r})")
    path = _path_text(loc)
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        keys = sorted(f.alias or n for n, f in model.model_fields.items()) if model else []
        near = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
        why = f"unknown key; expected one of {keys}" + (f"; did you mean '{near[0]}'?" if near else "")
    elif kind in _MUST_BE:
        why = f"must be {_MUST_BE[kind]}"
    elif kind == "greater_than":
        why = "must be positive" if ctx["gt"] == 0 else f"must be > {_number(ctx['gt'])}"
    elif kind == "greater_than_equal":
        why = f"must be >= {_number(ctx['ge'])}"
    elif kind == "less_than":
        why = f"must be below {_number(ctx['lt'])}"
    elif kind == "less_than_equal":
        why = f"must be <= {_number(ctx['le'])}"
    elif kind == "literal_error":
        why = f"must be {ctx['expected']}" if isinstance(value, str) else "must be str"
    else:
        why = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    return f"{path}: {why}" + ("" if value is _NO_VALUE else f" (got {value!r})")


def parse_config(raw: dict[str, Any], base: Path = Path("."), source: Path | None = None) -> NodeConfig:
    """Validate a TOML-shaped dict; raises :class:`ConfigError` naming each bad key and value.

    ``base`` is the directory relative paths in ``raw`` are resolved against."""
    try:
        config = NodeConfig.model_validate(raw, context={"base": base})
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e) for e in exc.errors(include_url=False))) from None
    config._source = source
    return config


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
        raise ConfigError("\n".join(f"{p}: {line}" for line in str(exc).splitlines())) from None
