"""Observation over HTTP: Prometheus metrics, a health check and a read-only status page.

Everything is read from the shared database (and the spool/output directories) when it is asked
for, never from counters in this process, so the endpoint of any role sees the whole node.
Modules: ``metrics`` (the Prometheus collector), ``health`` (``/healthz`` checks), ``thumbs``
(before/after PNG thumbnails), ``page`` (the HTML status page), ``server`` (the HTTP server
started by :class:`dicom_node.app.service.NodeService` when ``[http] enabled``).
"""
