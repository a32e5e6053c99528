"""``python -m dicom_node``: the same command line as ``dicom-node``."""
from dicom_node.app.cli import main

raise SystemExit(main())
