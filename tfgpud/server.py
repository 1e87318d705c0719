"""The HTTP endpoints: /metrics, /healthz, /status, and a small HTML page at /.

Every handler reads state the daemon already computed; none of them touches NVML or starts
a process. Each connection gets its own thread and a socket timeout, so a client that connects
and never speaks cannot stall other scrapes. With a web config (:mod:`tfgpud.webconfig`) the
TLS handshake also happens on that connection's thread, under its own timeout — never on the
listening socket, where one silent client would block every other scrape — and every request
must carry good basic-auth credentials when users are configured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import exposition
from prometheus_client.registry import CollectorRegistry

from tfgpud.views import render_page
from tfgpud.webconfig import WebSecurity

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # concurrent connections (each has a thread); Prometheus needs a few


@dataclass(frozen=True)
class Endpoints:
    """What the handlers serve; supplied by the daemon (or a test)."""

    registry: CollectorRegistry
    health: Callable[[], tuple[bool, str]]
    status: Callable[[], dict[str, Any]]
    # Optional cached renderer (Accept header -> body, content type); see exporter.Exposition.
    exposition: Callable[[str], tuple[bytes, str]] | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    endpoints: Endpoints
    security: WebSecurity | None = None
    handshake_timeout = 5.0
    slots: threading.BoundedSemaphore

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Listen on exactly what was asked for, not dual-stack by surprise.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        # Each connection costs a thread; past the cap, refuse instead of growing without bound
        # (clients that trickle bytes can hold a connection for a long time).
        if not self.slots.acquire(blocking=False):
            log.warning(
                "too many open connections (%d); refusing %s", MAX_CONNECTIONS, client_address
            )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs on the connection's own thread (ThreadingMixIn), so a slow handshake stalls
        # nobody else.
        ctx = self.security.context() if self.security is not None else None
        if ctx is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(self.handshake_timeout)
        try:
            conn = ctx.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            log.debug("TLS setup with %s failed: %s", client_address, exc)
            return
        try:
            conn.do_handshake()
            if self.security is not None and not self.security.san_allowed(conn.getpeercert()):
                log.info(
                    "TLS client %s: certificate SAN not in client_allowed_sans", client_address
                )
                return
            _Handler(conn, client_address, self)
        except (OSError, ssl.SSLError) as exc:  # timeouts, resets, bad handshakes
            log.debug("TLS connection from %s: %s", client_address, exc)
        finally:
            conn.close()  # wrap_socket detached `request`; this closes the descriptor


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # per-connection socket timeout: idle or slow clients are dropped
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    protocol_version = "HTTP/1.1"
    server_version = "tfgpud"
    sys_version = ""

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(
        self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        sec = self.server.security
        headers = {**(sec.headers if sec is not None else {}), **(extra or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        ep = self.server.endpoints
        sec = self.server.security
        try:
            if sec is not None and not sec.authenticate(self.headers.get("Authorization")):
                self._send(
                    401,
                    b"Unauthorized\n",
                    "text/plain; charset=utf-8",
                    {"WWW-Authenticate": 'Basic realm="tfgpud"'},
                )
            elif path == "/metrics":
                accept = self.headers.get("Accept", "")
                if ep.exposition is not None:
                    body, content_type = ep.exposition(accept)
                else:
                    encoder, content_type = exposition.choose_encoder(accept)
                    body = encoder(ep.registry)
                self._send(200, body, content_type)
            elif path == "/healthz":
                ok, why = ep.health()
                self._send(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
            elif path == "/status":
                body = json.dumps(ep.status(), indent=2, sort_keys=True).encode()
                self._send(200, body + b"\n", "application/json")
            elif path == "/":
                self._send(200, render_page(ep.status()).encode(), "text/html; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            # A bug behind an endpoint: log it where logs go, answer 500, keep serving.
            log.exception("error serving %s", path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send(500, b"internal error\n", "text/plain; charset=utf-8")


class HttpServer:
    """Binds at construction (so a busy port fails early), serves on a thread after start()."""

    def __init__(
        self,
        host: str,
        port: int,
        endpoints: Endpoints,
        security: WebSecurity | None = None,
        handshake_timeout: float = 5.0,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("_BoundServer", (_Server,), {"address_family": family})
        self._server = server_cls((host, port), _Handler, bind_and_activate=True)
        self._server.endpoints = endpoints
        self._server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._server.security = security
        self._server.handshake_timeout = handshake_timeout
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="tfgpud-http"
        )

    @property
    def scheme(self) -> str:
        sec = self._server.security
        return "https" if sec is not None and sec.tls_enabled else "http"

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def set_endpoints(self, endpoints: Endpoints) -> None:
        self._server.endpoints = endpoints

    def stop(self, timeout: float = 1.0) -> None:
        start = time.monotonic()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(max(0.0, timeout - (time.monotonic() - start)))
