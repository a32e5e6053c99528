"""The observation HTTP server (stdlib ``ThreadingHTTPServer``): GET only, read-only.

Routes: ``/metrics`` (Prometheus text format), ``/healthz`` (JSON; 200 when every check passes,
503 naming the failed ones), ``/`` (status page), ``/thumb/<job>/before.png`` and ``after.png``.
Each request reads the shared database; nothing is kept in this process but rendered thumbnails.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_node.store import db
from dicom_node.config import NodeConfig
from dicom_node.logs import log_event
from dicom_node.observe.health import health
from dicom_node.observe.metrics import registry_for
from dicom_node.observe.page import render_page
from dicom_node.observe.thumbs import ThumbnailCache

log = logging.getLogger("dicom_node.observe")

PAGE_SERIES = 25  # series on the status page (latest first)
_THUMB = re.compile(r"^/thumb/([0-9]{1,12})/(before|after)\.png$")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, observe: ObserveServer, family: int) -> None:
        self.address_family = family
        self.observe = observe
        super().__init__(address, handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address (it can stall offline)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "dicom-node-observe"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._respond(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        obs = self.server.observe
        path = self.path.split("?", 1)[0]
        try:
            status, ctype, body = obs.handle(path)
        except Exception as exc:  # a broken database must not kill the server thread
            log_event(log, "http_error", level=logging.WARNING, path=path[:100], error=type(exc).__name__)
            status, ctype, body = 500, "text/plain; charset=utf-8", f"error: {type(exc).__name__}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """Requests are not logged (a scrape every 15 s would flood the journal)."""


class ObserveServer:
    """``/metrics``, ``/healthz`` and the status page for ``config``'s database."""

    def __init__(self, config: NodeConfig, database: db.Database | None = None) -> None:
        self.config = config
        self.db = database or db.Database(config.db_url)
        self.registry = registry_for(config, self.db)
        self.thumbs = ThumbnailCache(config, self.db)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def handle(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``."""
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            report = health(self.config, self.db)
            code = 200 if report["ok"] else 503
            return code, "application/json", (json.dumps(report, indent=1) + "\n").encode()
        if path in ("/", "/index.html"):
            from dicom_node.admin.status import collect_status

            page = render_page(collect_status(self.config, last=PAGE_SERIES))
            return 200, "text/html; charset=utf-8", page.encode()
        m = _THUMB.match(path)
        if m:
            png = self.thumbs.get(int(m.group(1)), m.group(2))
            if png is not None:
                return 200, "image/png", png
        return 404, "text/plain; charset=utf-8", b"not found\n"

    def start(self) -> int:
        """Bind ``config.http.host``:``port`` and serve in a daemon thread; returns the bound port."""
        host, port = self.config.http.host, self.config.http.port
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self._httpd = _Server(info[4][:2], _Handler, self, info[0])
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="observe-http", daemon=True)
        self._thread.start()
        log_event(log, "http_listening", host=host, port=self.port)
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
