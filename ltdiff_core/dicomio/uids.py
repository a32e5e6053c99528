"""Deterministic DICOM UIDs, so that regenerating a data set gives byte-identical headers.

UIDs use the ``2.25`` root (ISO/IEC 9834-8, DICOM PS3.5 Annex B.2): ``2.25.`` followed by the
decimal value of a UUID. The UUID is a name-based version 5 UUID of the joined ``parts``
inside a fixed project namespace, so the same parts always yield the same UID and different
parts collide only with negligible probability. Without parts a random (version 4) UUID is used.
"""
from __future__ import annotations

import uuid

UID_ROOT = "2.25."
# Fixed namespace of this project; changing it would change every generated UID.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ltdiff:dicom-node:uid")


def make_uid(*parts: object) -> str:
    """``2.25.<uuid5>`` UID from ``parts``; a random ``2.25.<uuid4>`` UID when no parts are given."""
    if not parts:
        return f"{UID_ROOT}{uuid.uuid4().int}"
    name = "/".join(str(p) for p in parts)
    return f"{UID_ROOT}{uuid.uuid5(_NAMESPACE, name).int}"
