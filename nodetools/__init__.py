"""Tools around the node, not the node: local DICOM peers (DCMTK, Orthanc, ``dicom-node serve`` as a
subprocess, raw-socket attacker helpers, loopback node configurations, a throw-away PostgreSQL
server) and the demo that the README's main job runs.

Used by the tests, the benchmarks and ``scripts/main.sh`` (``python -m nodetools.demo``). The service
package ``dicom_node`` never imports this package (``tests/test_layout.py`` holds that boundary), so a
production install does not depend on test peers.
"""
