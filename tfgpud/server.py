"""The HTTP endpoints: /metrics, /healthz, /status, and a small HTML page at /.

Every handler reads state the daemon already computed; none of them touches NVML or starts
a process.

The server stays available by construction; the limits are the constants below. One asyncio
event loop, on one thread, reads every connection: no connection has a thread of its own, so
hundreds of idle or slow clients cost a few KB each. A request is handled only once its head
is complete, which must happen within ``MAX_HEAD_BYTES`` and ``MAX_HEADERS`` lines (else 431
and the connection is closed), and the whole request - head read, answer written - must be
done within ``REQUEST_SECONDS`` of its first byte, however the client spaces its bytes. At
``MAX_CONNECTIONS`` the connection that has waited longest in its state (an idle keep-alive,
a trickling request, a slow handshake) is closed to make room: clients that hold connections
cannot lock out the next scrape.
Responses to slow readers are written in chunks under flow control, so one costs at most a few
chunks of memory until its deadline.

With a web config (:mod:`tfgpud.webconfig`) each accepted socket gets the current TLS context
(a renewed certificate applies to the next connection), and its handshake runs on the loop
over memory BIOs, bounded by ``handshake_timeout``. OpenSSL's state for it (~50 KB) is only
created once the client's whole ClientHello has arrived, so silent and trickling TLS clients
cost what plain ones do. The one blocking step, a bcrypt check of
credentials not verified before, runs on one worker thread; checks waiting for it are bounded
too (503 beyond ``MAX_AUTH_PENDING``). Nothing is logged per connection: cut, evicted and
refused connections are counted and summed up in one line at most every ``SUMMARY_SECONDS``,
and a client that resets never produces a traceback.

Why asyncio: it is the standard library (no new dependency in a hardened service and its
.deb), and it already does the hard parts - TLS with handshake and shutdown timeouts, write
flow control, cancellation - so this module only parses a strict subset of HTTP/1.1: GET and
HEAD without bodies, all the four endpoints need. A framework (aiohttp, uvicorn) would bring its
own dependency tree and defaults to audit, for a port that serves four read-only pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import resource
import socket
import threading
import time
from asyncio import sslproto
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.registry import CollectorRegistry

from tfgpud.config import HTTP_TOKEN
from tfgpud.exporter import Exposition
from tfgpud.views import render_page
from tfgpud.webconfig import WebSecurity

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 1024  # open connections; beyond, the longest-waiting one is closed
MAX_HEAD_BYTES = 8192  # request line + header fields (Prometheus and curl send < 1 KB)
MAX_HEADERS = 64
REQUEST_SECONDS = 10.0  # first byte of a request -> last byte of its answer
IDLE_SECONDS = 120.0  # keep-alive between requests (Prometheus scrapes every 15-60 s)
LINGER_SECONDS = 2.0  # a closing connection's last bytes (and TLS close_notify)
MAX_AUTH_PENDING = 32  # requests waiting for a bcrypt check
SUMMARY_SECONDS = 60.0  # at most one summary line of refused/cut connections this often
FD_RESERVE = 64  # descriptors kept for everything else (NVML, probe pipes, state files)
OPEN_FILES_WANTED = 16384  # the soft RLIMIT_NOFILE the daemon raises itself to (hard allowing)
_CHUNK = 16384  # a response is written in chunks this size, each waiting for the socket
_TEXT = "text/plain; charset=utf-8"
# asyncio gives every TLS connection a receive buffer of SSLProtocol.max_size, 256 KiB: 500
# slow handshakes would hold 130 MB. Received bytes accumulate in OpenSSL's BIO whatever the
# chunk size, and a request head is at most MAX_HEAD_BYTES, so small chunks lose nothing.
sslproto.SSLProtocol.max_size = 4096

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters other than HTAB
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")


@dataclass(frozen=True)
class Endpoints:
    """What the handlers serve; supplied by the daemon (or a test)."""

    registry: CollectorRegistry
    health: Callable[[], tuple[bool, str]]
    status: Callable[[], dict[str, Any]]
    # Optional cached renderer (Accept header -> body, content type); see exporter.Exposition.
    exposition: Callable[[str], tuple[bytes, str]] | None = None


@dataclass(frozen=True)
class Request:
    """A parsed request head; ``headers`` maps lower-case names to their first value."""

    method: str
    path: str
    headers: Mapping[str, str]
    has_body: bool
    keep_alive: bool


class BadRequest(Exception):
    """The request head is not HTTP/1.x as this server accepts it; answer ``status``."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


def parse_head(head: bytes) -> Request:
    """Parse a request head (request line and header fields, CRLF-separated); raise BadRequest."""
    lines = head.decode("latin-1").split("\r\n")
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise BadRequest(400, "empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not HTTP_TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    m = _VERSION.fullmatch(version)
    if m is None:
        raise BadRequest(400, "malformed request line")
    if m.group(1) != "1":
        raise BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are served")
    if _CONTROL.search(target):
        raise BadRequest(400, "control character in the request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not HTTP_TOKEN.fullmatch(name):  # also refuses obs-fold continuation lines
            raise BadRequest(400, "malformed header field")
        value = value.strip(" \t")
        if _CONTROL.search(value):
            raise BadRequest(400, "control character in a header field")
        headers.setdefault(name.lower(), value)
    length = headers.get("content-length")
    if length is not None and not length.isdigit():
        raise BadRequest(400, "malformed Content-Length")
    has_body = "transfer-encoding" in headers or (length is not None and int(length) > 0)
    # origin-form (/path?query), else absolute-form (http://host/path) or "*"
    path = target.split("?", 1)[0] if target.startswith("/") else urlsplit(target).path or target
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if m.group(2) != "0" else "keep-alive" in tokens
    return Request(method, path, headers, has_body, keep_alive)


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` as far as the hard limit allows (systemd
    sets soft 1024, hard 524288); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_limit() -> int:
    """MAX_CONNECTIONS, or fewer when the open-files limit would not leave FD_RESERVE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = MAX_CONNECTIONS
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft - FD_RESERVE)
    return max(1, limit)


class _Conn:
    """One accepted socket and the task serving it."""

    __slots__ = ("handed_over", "id", "sock", "task")

    def __init__(self, cid: int, sock: socket.socket) -> None:
        self.id = cid
        self.sock = sock
        self.task: asyncio.Task[None] | None = None
        self.handed_over = False  # the socket belongs to an asyncio transport now


_Response = tuple[int, bytes, str, Mapping[str, str]]
_TLS_HANDSHAKE_RECORD = 0x16
_MAX_TLS_RECORD = 16384 + 2048  # a TLSCiphertext fragment may exceed 2^14 by up to 2048 bytes


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fd = sock.fileno()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _client_hello_arrived(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
    """Wait, without reading it, until the client's first TLS record (its ClientHello) has
    arrived whole; False when it sent something else or closed. Until then a TLS client costs
    what a plain one does: no OpenSSL state (~50 KB) for one that is silent or trickles."""
    need = 5  # the record header: type, version (2), length (2)
    while True:
        # The kernel reports the socket readable only once `need` bytes are queued (or EOF).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
        await _readable(loop, sock)
        try:
            head = sock.recv(need, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError:
            return False
        if len(head) < need:
            return False  # closed (or reset) before the record was complete
        if need > 5:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            return True
        length = int.from_bytes(head[3:5], "big")
        if head[0] != _TLS_HANDSHAKE_RECORD or head[1] != 3 or not 0 < length <= _MAX_TLS_RECORD:
            return False  # not TLS: plain HTTP to the TLS port, a scanner
        need = 5 + length


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
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Listen on exactly what was asked for, not dual-stack by surprise.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.endpoints = endpoints
        self.security = security
        self.handshake_timeout = handshake_timeout
        self.max_connections = connection_limit()
        self._conns: OrderedDict[int, _Conn] = OrderedDict()  # oldest state change first
        self._next_id = 0
        self._counts: Counter[str] = Counter()
        self._last_bug_log = -SUMMARY_SECONDS
        self._auth_pool = ThreadPoolExecutor(1, thread_name_prefix="tfgpud-auth")
        self._auth_pending = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tfgpud-http", daemon=True)

    @property
    def scheme(self) -> str:
        sec = self.security
        return "https" if sec is not None and sec.tls_enabled else "http"

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        self._running.wait(5.0)

    def set_endpoints(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints

    def stop(self, timeout: float = 1.0) -> None:
        """Close the listening socket and every connection; wait up to ``timeout`` s."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stopping.set)
            self._thread.join(timeout)
        else:
            self._sock.close()
        self._auth_pool.shutdown(wait=False, cancel_futures=True)

    # -- the event loop ------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._loop_error)
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stopping = asyncio.Event()
        self._loop = loop
        self._running.set()
        accept = asyncio.create_task(self._accept_loop())
        summary = asyncio.create_task(self._summary_loop())
        try:
            await self._stopping.wait()
        finally:
            tasks = [accept, summary, *(c.task for c in self._conns.values() if c.task)]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._sock.close()
            await asyncio.sleep(0)  # let the aborted transports close their sockets

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if exc is None or isinstance(exc, OSError):  # a client went away mid-write, etc.
            log.debug("HTTP: %s %r", context.get("message"), exc)
            return
        self._count("internal errors")
        now = time.monotonic()
        if now - self._last_bug_log >= SUMMARY_SECONDS:
            self._last_bug_log = now
            log.error("HTTP: %s", context.get("message"), exc_info=exc)

    def _count(self, what: str) -> None:
        self._counts[what] += 1

    async def _summary_loop(self) -> None:
        while True:
            await asyncio.sleep(SUMMARY_SECONDS)
            self.log_summary()

    def log_summary(self) -> None:
        """One line with what was refused or cut since the last one; nothing if nothing was."""
        if not self._counts:
            return
        parts = ", ".join(f"{what}: {n}" for what, n in sorted(self._counts.items()))
        crowded = any(
            k.startswith(("connections evicted", "connections refused")) for k in self._counts
        )
        log.log(
            logging.WARNING if crowded else logging.INFO,
            "HTTP, last %.0f s: %s",
            SUMMARY_SECONDS,
            parts,
        )
        self._counts.clear()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError:  # EMFILE, ENFILE, ENOBUFS: out of descriptors or memory
                self._count("accepts failed (out of descriptors or memory)")
                await asyncio.sleep(0.1)
                continue
            with contextlib.suppress(OSError):  # head and body are separate TLS records
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self._conns) >= self.max_connections:
                # Make room: the connection that has waited longest goes (an idle keep-alive,
                # a trickling request), never the newcomer, so holders cannot lock scrapes out.
                _, victim = self._conns.popitem(last=False)
                if victim.task is not None:
                    victim.task.cancel()
                self._count(f"connections evicted at the {self.max_connections}-connection cap")
            conn = _Conn(self._next_id, sock)
            self._next_id += 1
            self._conns[conn.id] = conn
            conn.task = asyncio.create_task(self._serve(conn))
            # sock_accept returns at once while the backlog has connections: let the new task
            # (and any evicted one) run before the next accept, so evictions free memory first.
            await asyncio.sleep(0)

    def _enter_state(self, conn: _Conn) -> None:
        """Mark a state change (request, idle): the connection is now the newest to have one."""
        if conn.id in self._conns:
            self._conns.move_to_end(conn.id)

    # -- one connection ------------------------------------------------------------------------

    async def _serve(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport: asyncio.Transport | None = None
        try:
            transport = await self._connect(conn, protocol)
            if transport is None:
                return
            transport.set_write_buffer_limits(high=_CHUNK)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            if await self._requests(conn, reader, writer):
                await self._close_gracefully(reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # resets, a peer that stopped reading: the connection is simply closed
        finally:
            self._conns.pop(conn.id, None)
            # A cancelled task keeps its CancelledError, whose traceback holds this frame and so
            # `conn`: without this, conn -> task -> error -> conn is a cycle that keeps the
            # connection's TLS state (~60 KB) until a full garbage collection, if ever.
            conn.task = None
            if transport is not None:
                transport.abort()  # no lingering: whatever is unsent is dropped
            elif not conn.handed_over:
                conn.sock.close()

    async def _connect(
        self, conn: _Conn, protocol: asyncio.StreamReaderProtocol
    ) -> asyncio.Transport | None:
        loop = asyncio.get_running_loop()
        sec = self.security
        ctx = sec.context() if sec is not None else None
        if ctx is None:
            conn.handed_over = True
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn.sock)
            assert isinstance(transport, asyncio.Transport)
            return transport
        try:
            async with asyncio.timeout(self.handshake_timeout):
                hello = await _client_hello_arrived(loop, conn.sock)
        except TimeoutError:
            hello = False
        if not hello:
            self._count("TLS handshakes failed")
            return None
        conn.handed_over = True
        try:
            async with asyncio.timeout(self.handshake_timeout + 1.0):
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol,
                    conn.sock,
                    ssl=ctx,
                    ssl_handshake_timeout=self.handshake_timeout,
                    ssl_shutdown_timeout=LINGER_SECONDS,
                )
        except (OSError, TimeoutError) as exc:  # bad or slow handshakes, resets, plain HTTP
            self._count("TLS handshakes failed")
            log.debug("TLS handshake failed: %r", exc)
            return None
        if sec is not None and not sec.san_allowed(transport.get_extra_info("peercert")):
            self._count("TLS clients refused (certificate SAN not in client_allowed_sans)")
            transport.abort()
            return None
        assert isinstance(transport, asyncio.Transport)
        return transport

    async def _requests(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve requests on one connection until it is done - closed by either side, answered
        with an error, idle too long (True: close it gracefully) - or a request overruns its
        deadline (False: cut it)."""
        loop = asyncio.get_running_loop()
        start = loop.time()  # the first request's clock starts at accept (or handshake)
        first = b""
        while True:
            self._enter_state(conn)
            try:
                async with asyncio.timeout_at(start + REQUEST_SECONDS):
                    head: bytes | None
                    try:
                        head = first + await reader.readuntil(b"\r\n\r\n")
                    except asyncio.LimitOverrunError:
                        head = None
                    if not await self._respond(head, writer):
                        return True
            except TimeoutError:
                self._count(f"requests cut at the {REQUEST_SECONDS:.0f} s deadline")
                return False
            except asyncio.IncompleteReadError:
                return True  # closed by the client mid-head, or between requests
            self._enter_state(conn)
            try:
                async with asyncio.timeout(IDLE_SECONDS):
                    first = await reader.read(1)
            except TimeoutError:
                return True
            if not first:
                return True
            start = loop.time()

    async def _close_gracefully(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Half-close, then drop what the client still sends for up to LINGER_SECONDS: closing
        with unread input would reset the connection and destroy the answer just sent (a 431
        to a client still sending its oversized head)."""
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_SECONDS):
                while await reader.read(_CHUNK):
                    pass
                writer.close()
                await writer.wait_closed()

    async def _respond(self, head: bytes | None, writer: asyncio.StreamWriter) -> bool:
        """Answer one request (``head`` None: it was too large); True when the connection may
        carry another."""
        try:
            if head is None:
                raise BadRequest(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            req = parse_head(head.lstrip(b"\r\n"))
        except BadRequest as exc:
            self._count(f"requests refused ({exc.status})")
            await self._send(writer, (exc.status, f"{exc.why}\n".encode(), _TEXT, {}), close=True)
            return False
        response = await self._handle(req)
        close = not req.keep_alive or req.has_body or response[0] >= 500
        await self._send(writer, response, close=close, head_only=req.method == "HEAD")
        return not close

    async def _handle(self, req: Request) -> _Response:
        if req.method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", _TEXT, {"Allow": "GET, HEAD"}
        sec = self.security
        if sec is not None:
            auth = req.headers.get("authorization")
            ok = sec.cached_verdict(auth)
            if ok is None:
                if self._auth_pending >= MAX_AUTH_PENDING:
                    self._count("requests refused (503, too many credential checks waiting)")
                    return 503, b"busy checking credentials\n", _TEXT, {"Retry-After": "1"}
                self._auth_pending += 1
                try:
                    loop = asyncio.get_running_loop()
                    ok = await loop.run_in_executor(self._auth_pool, sec.authenticate, auth)
                finally:
                    self._auth_pending -= 1
            if not ok:
                realm = {"WWW-Authenticate": 'Basic realm="tfgpud"'}
                return 401, b"Unauthorized\n", _TEXT, realm
        try:
            return self._endpoint(req)
        except Exception:
            # A bug behind an endpoint: answer 500 and keep serving; log it at most once a
            # summary period (a client could trigger it on every request).
            self._count("requests answered 500")
            now = time.monotonic()
            if now - self._last_bug_log >= SUMMARY_SECONDS:
                self._last_bug_log = now
                log.exception("error serving %s", req.path)
            return 500, b"internal error\n", _TEXT, {}

    def _endpoint(self, req: Request) -> _Response:
        ep = self.endpoints
        path = req.path
        if path == "/metrics":
            accept = req.headers.get("accept", "")
            render = ep.exposition or Exposition(ep.registry, lambda: None)
            body, content_type = render(accept)
            return 200, body, content_type, {}
        if path == "/healthz":
            ok, why = ep.health()
            return (200 if ok else 503), (why + "\n").encode(), _TEXT, {}
        if path == "/status":
            body = json.dumps(ep.status(), indent=2, sort_keys=True).encode()
            return 200, body + b"\n", "application/json", {}
        if path == "/":
            return 200, render_page(ep.status()).encode(), "text/html; charset=utf-8", {}
        return 404, b"not found\n", _TEXT, {}

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        response: _Response,
        *,
        close: bool,
        head_only: bool = False,
    ) -> None:
        status, body, content_type, extra = response
        sec = self.security
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "Server: tfgpud",
            f"Date: {formatdate(usegmt=True)}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
        ]
        headers = {**(sec.headers if sec is not None else {}), **extra}
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if close:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        view = memoryview(b"" if head_only else body)
        # Chunks, each waiting for the socket: a client that does not read holds at most
        # about two chunks here until the request deadline, not a copy of the whole body.
        writer.write(data + view[:_CHUNK])
        for i in range(_CHUNK, len(view), _CHUNK):
            await writer.drain()
            writer.write(view[i : i + _CHUNK])
        await writer.drain()
