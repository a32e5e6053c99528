"""Receive validation helpers: UID syntax and length, and values made safe to store and echo."""
from __future__ import annotations

from dicom_node.receive.validate import printable, uid_problem


def test_printable_keeps_received_values_safe() -> None:
    assert printable("1.2/../\x00\n\u00e9" + "9" * 80) == "1.2/../???" + "9" * 54
    assert uid_problem("1.2.3\x00") is None and uid_problem("1.2.03") and uid_problem("") == "missing"
    assert uid_problem("1." + "2" * 63) == "65 characters (UIDs have at most 64)"
