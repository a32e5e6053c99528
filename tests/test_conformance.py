"""The conformance statement reflects the configuration and the lists the SCP negotiates."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import UID, CTImageStorage

from dicom_node.app.cli import main
from dicom_node.config import parse_config
from dicom_node.admin.conformance import conformance_statement
from dicom_node.negotiation import (
    ACCEPTED_TRANSFER_SYNTAXES,
    ENHANCED_CT_REFUSAL_STATUS,
    ENHANCED_CT_SOP_CLASSES,
    SEND_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
)


@dataclass(frozen=True)
class Dest:
    name: str
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class PlainConfig:
    """The smallest object satisfying ``ConformanceConfig``: plain strings in the allow-list."""

    ae_title: str = "KERNELSTD"
    port: int = 4104
    bind_address: str = "127.0.0.1"
    max_pdu: int = 65536
    max_associations: int = 3
    allowed_calling_aes: list[str] = field(default_factory=lambda: ["CT_SCANNER1", "ROUTER"])
    check_called_ae: bool = True
    destinations: list[Dest] = field(default_factory=lambda: [Dest("MAINPACS", "PACS_AE", "10.0.0.5", 11112)])
    accept_enhanced_ct: bool = False


def test_lists_configuration_and_every_syntax() -> None:
    text = conformance_statement(PlainConfig())
    for expected in ("KERNELSTD", "127.0.0.1:4104", "65536 bytes", "CT_SCANNER1", "ROUTER",
                     "MAINPACS", "PACS_AE", "10.0.0.5", "11112", "must equal KERNELSTD"):
        assert expected in text, expected
    for uid in ACCEPTED_TRANSFER_SYNTAXES + SEND_TRANSFER_SYNTAXES + STORAGE_SOP_CLASSES + ENHANCED_CT_SOP_CLASSES:
        assert str(uid) in text, uid
    assert "1.2.840.10008.1.1" in text  # Verification
    assert f"0x{ENHANCED_CT_REFUSAL_STATUS:04X}" in text and "refused" in text


def test_policy_switches_change_the_text() -> None:
    open_node = PlainConfig(allowed_calling_aes=[], check_called_ae=False, destinations=[], accept_enhanced_ct=True,
                            max_pdu=0)
    text = conformance_statement(open_node)
    assert "any (no allow-list configured)" in text
    assert "Called AE title: not checked" in text
    assert "No destinations are configured" in text
    assert "Maximum PDU size received: unlimited" in text
    assert "C-STORE refused" not in text and "stored and kept" in text


def test_accepted_lists_are_decodable_and_complete() -> None:
    """One source of truth for the SCP: every compressed syntax can be decoded here."""
    assert list(STORAGE_SOP_CLASSES) == [CTImageStorage]
    required = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.70",
                "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.80",
                "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.5"}
    assert required <= {str(u) for u in ACCEPTED_TRANSFER_SYNTAXES}
    assert len(set(ACCEPTED_TRANSFER_SYNTAXES)) == len(ACCEPTED_TRANSFER_SYNTAXES)
    for uid in map(UID, ACCEPTED_TRANSFER_SYNTAXES):
        assert uid.is_transfer_syntax
        if uid.is_compressed:
            assert get_decoder(uid).is_available, uid.name


def test_node_config_with_pinned_hosts() -> None:
    """The real configuration object: allow-list entries may pin an AE to a host."""
    cfg = parse_config({
        "node": {"ae_title": "LTDIFF", "port": 11113,
                 "allowed_calling_aes": ["CT1", {"ae_title": "ROUTER2", "host": "10.1.2.3"}]},
        "destinations": [{"name": "PACS", "ae_title": "ARCHIVE", "host": "pacs.example", "port": 104}],
    })
    text = conformance_statement(cfg)
    assert "LTDIFF" in text and ":11113" in text
    assert "CT1" in text and "ROUTER2 from 10.1.2.3" in text
    assert "ARCHIVE" in text and "pacs.example" in text


def test_stow_rs_destination_is_not_listed_as_a_dimse_peer() -> None:
    cfg = parse_config({"destinations": [{"name": "WEB", "type": "stow-rs", "url": "http://web.example/dicom-web"}]})
    text = conformance_statement(cfg)
    assert "STOW-RS (PS3.18), not DIMSE: WEB (http://web.example/dicom-web)" in text
    assert "| WEB |" not in text and "No destinations are configured" not in text


def test_cli_prints_statement(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    conf = tmp_path / "node.toml"
    conf.write_text('[node]\nae_title = "CLI_NODE"\nport = 12345\ndata_dir = "data"\n')
    assert main(["--config", str(conf), "conformance"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# DICOM Conformance Statement") and "CLI_NODE" in out and ":12345" in out
