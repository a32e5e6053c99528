"""Configuration: the example file is valid and equals the defaults; errors name key and value."""
from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import DEFAULT_RULES, ConfigError, load_config, parse_config

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
        ({"node": {"allowed_calling_aes": [{"ae_title": "CT1", "hots": "x"}]}},
         "node.allowed_calling_aes[0].hots: unknown key"),
        ({"disk": {"min_free_percent": 100}}, "disk.min_free_percent: must be below 100"),
        ({"destinations": [{"name": "P", "ae_title": "P", "host": "h", "port": 104, "backoff_max_s": 0}]},
         "destinations[0].backoff_max_s: must be positive"),
    ],
)
def test_validation_errors_name_key_and_value(raw: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(raw, tmp_path)
    assert message in str(exc.value)


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
