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
import html
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


def _or_dash(value: object) -> str:
    return "-" if value is None else html.escape(str(value))


def render_page(status: dict[str, Any]) -> str:
    """A small page a person can read: GPUs, driver, TensorFlow envs, findings."""
    e = html.escape
    rows = []
    for g in status.get("gpus", []):
        mem = ""
        if g.get("memory_total_bytes"):
            used = (g.get("memory_used_bytes") or 0) / 2**30
            mem = f"{used:.1f} / {g['memory_total_bytes'] / 2**30:.1f} GiB"
        state = "lost" if g.get("lost") else "ok"
        rows.append(
            f"<tr><td>{g['index']}</td><td>{e(g.get('name') or '?')}</td>"
            f"<td><code>{e(g['uuid'])}</code></td><td>{e(g.get('pci_bus_id') or '')}</td>"
            f"<td>{mem}</td><td class={state}>{state}</td></tr>"
        )
    envs = []
    for t in status.get("tensorflow", []):
        envs.append(
            f"<tr><td>{e(t['env'])}</td><td>{e(t.get('tf_version') or '-')}</td>"
            f"<td>{e(t['status'])}</td><td>{_or_dash(t.get('visible_gpus'))}</td></tr>"
        )
    findings = []
    for f in status.get("findings", []):
        evidence = "".join(f"<li>{e(x)}</li>" for x in f.get("evidence", []))
        fix = f"<p><b>Fix:</b> {e(f['fix'])}</p>" if f.get("fix") else ""
        findings.append(
            f"<div class='f {e(f['severity'])}'><h3>[{e(f['severity'])}] {e(f['code'])} "
            f"— {e(f['subject'])}</h3><p>{e(f['summary'])}</p><ul>{evidence}</ul>{fix}</div>"
        )
    driver = status.get("driver") or {}
    nvml = (
        f"driver {e(driver.get('driver_version') or '?')}, "
        f"CUDA {e(driver.get('cuda_driver_version') or '?')}"
        if driver.get("up")
        else f"NVML unavailable ({e(str(driver.get('error') or 'not polled yet'))})"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tfgpud — {e(status.get("host", ""))}</title>
<meta http-equiv="refresh" content="10">
<style>body{{font-family:sans-serif;max-width:60em;margin:1em auto}}
td,th{{padding:.2em .6em;text-align:left}} .lost{{color:#b00}} .f{{border-left:4px solid #888;
padding-left:.6em;margin:.6em 0}} .critical{{border-color:#b00}} .warning{{border-color:#d80}}
.info{{border-color:#48c}}</style></head><body>
<h1>tfgpud on {e(status.get("host", ""))}</h1>
<p>{e(status.get("summary", ""))}</p>
<h2>Driver</h2><p>{nvml}; {status.get("pci_gpus", "?")} NVIDIA GPU(s) on the PCI bus.</p>
<h2>GPUs</h2><table><tr><th>#</th><th>name</th><th>UUID</th><th>PCI</th><th>memory</th>
<th>state</th></tr>{"".join(rows) or "<tr><td colspan=6>none</td></tr>"}</table>
<h2>TensorFlow</h2><table><tr><th>env</th><th>version</th><th>probe</th><th>GPUs seen</th></tr>
{"".join(envs) or "<tr><td colspan=4>no env configured</td></tr>"}</table>
<h2>Findings</h2>{"".join(findings) or "<p>none</p>"}
<p><a href="/metrics">/metrics</a> · <a href="/status">/status</a> ·
<a href="/healthz">/healthz</a></p></body></html>
"""


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
