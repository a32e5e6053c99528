"""Software identity written into every object the node creates and into association negotiation.

One place for these strings, so the ContributingEquipmentSequence of derived images, the
conformance statement and ``dicom-node status`` always name the same software and version.
"""
from __future__ import annotations

from importlib import metadata

SOFTWARE_NAME = "dicom-node-ltdiff"
# Manufacturer (0008,0070) of the contributing equipment: the open-source project, not a vendor.
MANUFACTURER = "dicom-node-ltdiff open-source project"


def _installed_version() -> str:
    """The installed distribution's version; a source checkout that is not installed says so."""
    try:
        return metadata.version(SOFTWARE_NAME)
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


__version__ = SOFTWARE_VERSION = _installed_version()

# Implementation Version Name (0002,0013): at most 16 characters of the DICOM default repertoire.
IMPLEMENTATION_VERSION_NAME = f"DCMNODE_{SOFTWARE_VERSION}"[:16]
