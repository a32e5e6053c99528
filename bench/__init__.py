"""Benchmarks, run by hand from the repository root as ``python -m bench.NAME`` (not installed).

Run that way, the repository root is on ``sys.path``, so the scripts import the installed packages
(``dicom_node``, ``ltdiff_core``, ``ltdiff_train``), the local peers (``nodetools``) and each other
(``bench.bench_node``) without editing the path.
"""
