"""Package list (metadata and dependencies are in setup.cfg).

The training commands live in the ``train/`` folder and install as ``ltdiff_train``, a name that
cannot collide with another project's top-level ``train`` package.
"""
from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["dicom_node", "dicom_node.*", "ltdiff_core", "ltdiff_core.*"]), "ltdiff_train"],
    package_dir={"ltdiff_train": "train"},
)
