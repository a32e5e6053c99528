"""Receive validation helpers: UID syntax and length, and values made safe to store and echo."""
from __future__ import annotations

from dicom_node.receive.validate import printable, uid_problem


def test_printable_keeps_received_values_safe() -> None:
    assert printable("1.2/../\x00\n\u00e9" + "9" * 80) == "1.2/../???" + "9" * 54
    assert uid_problem("1.2.3\x00") is None and uid_problem("1.2.03") and uid_problem("") == "missing"
    assert uid_problem("1." + "2" * 63) == "65 characters (UIDs have at most 64)"


def test_length_fields_are_checked_before_the_values_are_read() -> None:
    """A US value of 3 bytes and a PixelData length field beyond the data set (issue 23, item 5),
    seen on the raw elements as received."""
    import io
    import struct

    from pydicom.filereader import read_dataset

    from dicom_node.receive.validate import pixel_module_length_problem, truncated_pixel_data

    def us(elem: int, value: bytes) -> bytes:
        return struct.pack("<HH", 0x0028, elem) + b"US" + struct.pack("<H", len(value)) + value

    raw = us(0x0010, b"\x04\x00") + us(0x0103, b"\x01\x00\x00")
    raw += struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<L", 2**31) + bytes(32)
    ds = read_dataset(io.BytesIO(raw), False, True)
    assert pixel_module_length_problem(ds) == "PixelRepresentation (0028,0103) has a value length of 3 bytes; US is 2"
    assert truncated_pixel_data(ds) == "PixelData length field says 2147483648 bytes, the data set holds 32"
    ok = read_dataset(io.BytesIO(us(0x0103, b"\x01\x00") + struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0"
                                 + struct.pack("<L", 32) + bytes(32)), False, True)
    assert pixel_module_length_problem(ok) is None and truncated_pixel_data(ok) is None
