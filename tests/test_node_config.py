"""Configuration: the example file is valid and equals the defaults; errors name key and value."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from dicom_node.config import DEFAULT_RULES, ConfigError, NodeConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_is_valid_and_documents_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "conf" / "dicom-node.toml")
    defaults = parse_config({}, ROOT / "conf")
    assert cfg.ae_title == defaults.ae_title == "LTDIFF"
    assert cfg.port == defaults.port == 11112
    assert cfg.max_pdu == defaults.max_pdu == 131072
    assert cfg.completeness == defaults.completeness
    assert cfg.processing == defaults.processing
    assert cfg.retention == defaults.retention
    assert cfg.disk == defaults.disk and defaults.disk.min_free_percent == 5.0 and defaults.disk.min_free_mb == 2048
    assert cfg.audit == defaults.audit and cfg.audit_path == cfg.data_dir / "audit.jsonl"
    assert cfg.accept_enhanced_ct is False
    assert cfg.db_url.startswith("sqlite:///") and cfg.db_url.endswith("dicom-node.sqlite")
    assert [r.name for r in cfg.rules][0] == "br40-to-bl64"
    assert defaults.rules == DEFAULT_RULES
    for section in NodeConfig.model_fields.keys() - {"node", "destinations", "rules"}:
        assert getattr(cfg, section) == getattr(defaults, section), section
    assert cfg.node.model_copy(update={"data_dir": defaults.data_dir}) == defaults.node  # data_dir is an example


def _documented_keys(text: str) -> dict[str, set[str]]:
    """``key =`` lines per section of the example file, commented-out examples included."""
    keys: dict[str, set[str]] = defaultdict(set)
    section = ""
    for line in text.splitlines():
        if m := re.match(r"^#?\s*\[\[?(\w+)\]\]?\s*(#.*)?$", line):
            section = m.group(1)
        elif m := re.match(r"^#?\s*(\w+)\s*=", line):
            keys[section].add(m.group(1))
    return keys


def test_example_config_documents_every_key() -> None:
    """Each key the models accept appears in conf/dicom-node.toml (as a value or a commented example),
    and the file names no key the models would refuse."""
    documented = _documented_keys((ROOT / "conf" / "dicom-node.toml").read_text())
    sections = {name: next(t for t in (f.annotation, *getattr(f.annotation, "__args__", ()))
                           if isinstance(t, type) and issubclass(t, BaseModel))
                for name, f in NodeConfig.model_fields.items()}
    assert set(documented) - {""} == set(sections)
    for name, model in sections.items():
        accepted = {f.alias or n for n, f in model.model_fields.items()}
        assert accepted == documented[name], name


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"node": {"port": 70000}}, "node.port: must be a TCP port 0-65535 (got 70000)"),
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title"),
        ({"node": {"max_pdu": 12}}, "node.max_pdu"),
        ({"node": {"colour": "red"}}, "node.colour: unknown key"),
        ({"completeness": {"stable_age_s": "30"}}, "completeness.stable_age_s: must be int or float (got '30')"),
        ({"processing": {"device": "tpu"}}, "processing.device"),
        ({"destinations": [{"name": "PACS", "ae_title": "PACS", "host": "127.0.0.1"}]},
         "destinations[0].port: required key is missing"),
        ({"destinations": [{"name": "PACS", "ae_title": "PACS", "host": "h", "port": 104}],
          "rules": [{"name": "a", "destinations": ["PACS"]}, {"name": "b", "destinations": ["PACSX"]}]},
         "rules[1].destinations: unknown destination 'PACSX'"),
        ({"rules": [{"match": {"SeriesDescription": "("}}]}, "rules[0].match.SeriesDescription: invalid regular"),
        ({"rules": [{"match": {"Kernel": "Br40"}}]}, "rules[0].match.Kernel: unknown attribute"),
        ({"rules": [{"action": "delete"}]}, "rules[0].action: must be 'standardize' or 'ignore' (got 'delete')"),
        ({"rules": [{"model": "missing/model.safetensors"}]}, "rules[0].model: checkpoint not found"),
        ({"rules": [{"model": "gan"}]}, "rules[0].model: must be 'default', a shipped model (ltdiff, linear"),
        ({"node": {"allowed_calling_aes": [{"ae_title": "CT1", "hots": "x"}]}},
         "node.allowed_calling_aes[0].hots: unknown key"),
        ({"disk": {"min_free_percent": 100}}, "disk.min_free_percent: must be below 100"),
        ({"destinations": [{"name": "P", "ae_title": "P", "host": "h", "port": 104, "backoff_max_s": 0}]},
         "destinations[0].backoff_max_s: must be positive"),
        ({"destinations": [{"name": "W", "type": "wado"}]},
         "destinations[0].type: must be 'dimse' or 'stow-rs' (got 'wado')"),
        ({"destinations": [{"name": "W", "type": "stow-rs"}]}, "destinations[0].url: required key is missing"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "ftp://h/dicom-web"}]},
         "destinations[0].url: must be an http:// or https:// DICOMweb base URL"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "http:///dicom-web"}]},
         "destinations[0].url: must be"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "https://u:pw@h/dicom-web"}]},
         "destinations[0].url: must not carry credentials"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "http://h/dicom-web", "port": 104}]},
         "destinations[0].port: not a key of a type = 'stow-rs' destination"),
        ({"destinations": [{"name": "P", "ae_title": "P", "host": "h", "port": 104, "url": "http://h/"}]},
         "destinations[0].url: not a key of a type = 'dimse' destination"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "http://h/dw", "username": "u"}]},
         "destinations[0].password_env: required with username"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "http://h/dw", "password_file": "pw"}]},
         "destinations[0].password_file: file not found"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "http://h/dw", "token_env": "NO_SUCH_VARIABLE_X"}]},
         "destinations[0].token_env: environment variable is not set or empty"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "http://h/dw", "ca_file": "tls.toml"}]},
         "destinations[0].ca_file: only meaningful with an https:// url"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "http://h/dw", "max_instances_per_request": 0}]},
         "destinations[0].max_instances_per_request: must be positive"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "https://h/dw", "tls": True}]},
         "destinations[0].tls: not a key of a type = 'stow-rs' destination (got True)"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "http://h/dw", "associations": 2}]},
         "destinations[0].associations: not a key of a type = 'stow-rs' destination (got 2)"),
        ({"destinations": [{"name": "P", "ae_title": "P", "host": "h", "port": 104, "associations": 0}]},
         "destinations[0].associations: must be >= 1 (got 0)"),
        ({"destinations": [{"name": "P", "ae_title": "P", "host": "h", "port": 104, "associations": 17}]},
         "destinations[0].associations: must be <= 16 (got 17)"),
        ({"destinations": [{"name": "W", "type": "stow-rs", "url": "http://h/dw", "max_request_mb": "8"}]},
         "destinations[0].max_request_mb: must be int or float (got '8')"),
        # unknown keys, at every level, are named with the keys that level accepts
        ({"colour": "red"}, "colour: unknown key; expected one of ['audit', 'completeness', 'destinations'"),
        ({"tls": {"certfile": "x.pem"}}, "tls.certfile: unknown key; expected one of ['ca_file', 'certificate'"),
        # a typo gets the nearest key
        ({"node": {"ae_tilte": "X"}}, "; did you mean 'ae_title'?"),
        ({"node": {"colour": "red"}}, "'uid_root'] (got 'red')"),  # nothing near: no suggestion
        ({"http": {"bind": "0.0.0.0"}},
         "http.bind: unknown key; expected one of ['enabled', 'host', 'port'] (got '0.0.0.0')"),
        ({"destinations": [{"name": "P", "ae_title": "P", "host": "h", "port": 104, "retries": 3}]},
         "destinations[0].retries: unknown key"),
        ({"rules": [{"name": "r", "destination": ["P"]}]}, "rules[0].destination: unknown key"),
        # TOML values keep their type: no coercion of strings, bools or floats
        ({"node": {"check_called_ae": 1}}, "node.check_called_ae: must be bool (got 1)"),
        ({"node": {"max_associations": 2.5}}, "node.max_associations: must be int (got 2.5)"),
        ({"processing": {"seed": "0"}}, "processing.seed: must be int (got '0')"),
        ({"retention": {"days": True}}, "retention.days: must be int or float (got True)"),
        ({"node": {"allowed_calling_aes": "CT1"}}, "node.allowed_calling_aes: must be an array (got 'CT1')"),
        ({"processing": 3}, "processing: must be a table (got 3)"),
        ({"destinations": [{"name": "P", "ae_title": "P", "host": "h", "port": 104, "tls": "yes"}]},
         "destinations[0].tls: must be bool (got 'yes')"),
        ({"logging": {"format": "xml"}}, "logging.format: must be 'kv' or 'json' (got 'xml')"),
        ({"http": {"port": 65536}}, "http.port: must be a TCP port 0-65535 (got 65536)"),
        ({"http": {"enabled": True, "port": 11112}}, "http.port: must differ from the DICOM ports (got 11112)"),
        ({"destinations": [{"name": "P", "ae_title": "P", "host": "h", "port": 104}] * 2},
         "destinations[1].name: duplicate destination name (got 'P')"),
    ],
)
def test_validation_errors_name_key_and_value(raw: dict, message: str, tmp_path: Path) -> None:
    (tmp_path / "tls.toml").write_text("")
    with pytest.raises(ConfigError) as exc:
        parse_config(raw, tmp_path)
    assert message in str(exc.value)


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    """Field errors of different sections come in one message, one line each, so one edit fixes them all."""
    with pytest.raises(ConfigError) as exc:
        parse_config({"node": {"port": -1}, "processing": {"device": "tpu"}, "rules": [{"action": "x"}]}, tmp_path)
    lines = str(exc.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["node.port", "processing.device", "rules[0].action"]


def test_loaded_configuration_is_immutable_and_http_defaults_off(tmp_path: Path) -> None:
    cfg = parse_config({"http": {"enabled": True, "port": 0}}, tmp_path)
    assert cfg.http.enabled and cfg.http.host == "127.0.0.1" and cfg.http.port == 0
    assert parse_config({}, tmp_path).http.enabled is False and parse_config({}, tmp_path).http.port == 9400
    with pytest.raises(ValidationError):
        cfg.processing.device = "cpu"  # type: ignore[misc]


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nport = "eleven"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: node.port: must be a TCP port"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    p = tmp_path / "etc" / "node.toml"
    p.parent.mkdir()
    p.write_text('[node]\ndata_dir = "../var"\nallowed_calling_aes = ["CT1", {ae_title = "CT2", host = "10.0.0.2"}]\n')
    cfg = load_config(p)
    assert cfg.data_dir == (tmp_path / "var").resolve()
    assert [(a.ae_title, a.host) for a in cfg.allowed_calling_aes] == [("CT1", None), ("CT2", "10.0.0.2")]
    assert cfg.spool_dir == cfg.data_dir / "spool"


def test_audit_path_and_disk_watermark_settings(tmp_path: Path) -> None:
    cfg = parse_config({"audit": {"path": "logs/audit.jsonl"}, "disk": {"min_free_mb": 10, "min_free_percent": 0}},
                       tmp_path)
    assert cfg.audit_path == (tmp_path / "logs" / "audit.jsonl").resolve()
    assert cfg.disk.min_free_mb == 10.0 and cfg.disk.min_free_percent == 0.0
    assert parse_config({"audit": {"enabled": False}}, tmp_path).audit.enabled is False


def test_loopback_configs_carry_a_scratch_watermark_and_can_leave_it_out(tmp_path):
    """Nodes started by tests, the demo and benchmarks use a small watermark, so a busy or small build
    volume does not turn every C-STORE into 0xA700; ``disk=None`` keeps the production default."""
    from nodetools.peers import SCRATCH_DISK, write_node_config

    cfg = load_config(write_node_config(tmp_path / "a.toml", port=11112, data_dir=tmp_path / "d"))
    assert cfg.disk.min_free_mb == SCRATCH_DISK["min_free_mb"] and cfg.disk.min_free_percent == 0.0
    default = load_config(write_node_config(tmp_path / "b.toml", port=11112, data_dir=tmp_path / "d", disk=None))
    assert default.disk.min_free_mb == 2048.0 and default.disk.min_free_percent == 5.0


def test_stow_rs_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DICOMweb destination: host and port come from the URL; secrets are named, not stored."""
    monkeypatch.setenv("PACS_PASSWORD", "pw")
    (tmp_path / "ca.crt").write_text("")
    cfg = parse_config({"destinations": [
        {"name": "WEB", "type": "stow-rs", "url": "https://pacs.example.org/dicom-web/", "username": "node",
         "password_env": "PACS_PASSWORD", "ca_file": "ca.crt", "max_instances_per_request": 10, "timeout_s": 5},
        {"name": "PACS", "ae_title": "PACS", "host": "10.0.0.9", "port": 104}]}, tmp_path)
    web, pacs = cfg.destinations
    assert (web.type, web.url, web.host, web.port, web.ae_title) == (
        "stow-rs", "https://pacs.example.org/dicom-web", "pacs.example.org", 443, "")
    assert web.password_env == "PACS_PASSWORD" and "pw" not in repr(web)
    assert web.ca_file == (tmp_path / "ca.crt").resolve() and web.max_instances_per_request == 10
    assert web.timeout_s == 5.0 and web.max_request_mb == 64.0
    assert pacs.type == "dimse" and pacs.url is None
    plain = parse_config({"destinations": [{"name": "W", "type": "stow-rs", "url": "http://127.0.0.1:8042/dicom-web",
                                            "token_file": "ca.crt"}]}, tmp_path).destinations[0]
    assert (plain.host, plain.port, plain.token_file) == ("127.0.0.1", 8042, (tmp_path / "ca.crt").resolve())


def test_tls_versions_accepted_are_those_the_tls_module_can_set() -> None:
    from typing import get_args

    from dicom_node.config import TLSConfig
    from dicom_node.tls import TLS_VERSIONS

    assert get_args(TLSConfig.model_fields["min_version"].annotation) == tuple(TLS_VERSIONS)


def test_rules_take_shipped_model_names(tmp_path: Path) -> None:
    """A rule may name a shipped checkpoint (kept as the name, so status and audit read "linear")."""
    cfg = parse_config({"rules": [{"name": "a", "model": "linear"}, {"name": "b", "model": "ltdiff"},
                                  {"name": "c"}]}, tmp_path)
    assert [r.model for r in cfg.rules] == ["linear", "ltdiff", "default"]
