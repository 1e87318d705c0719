"""Hostile HTTP clients against the real ``tfgpud run`` over loopback.

Each test does what an attacker on the machine could do with the unauthenticated port - many
distinct headers, hundreds of idle or trickling connections, oversized heads, resets - and
checks that /metrics stays available, memory stays bounded and stderr stays free of
tracebacks. Bounds are generous (functional, not timing, checks).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess
from helpers import write_scenario
from tlsutil import Pki, make_pki, web_config_yaml

from tfgpud.server import MAX_HEAD_BYTES, MAX_HEADERS, REQUEST_SECONDS

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TEXT = "text/plain; version=0.0.4; charset=utf-8"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def daemon(tmp_path: Path, fakedriver: Path, scenario_path: Path) -> Iterator[DaemonProcess]:
    write_scenario(scenario_path, gpus=[{"name": "NVIDIA A100-SXM4-80GB"}] * 2)
    with DaemonProcess(tmp_path / "d", scenario=scenario_path, interval=1.0) as d:
        d.start()
        yield d
        assert "Traceback" not in d.stderr()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_daemon(
    tmp_path: Path, fakedriver: Path, scenario_path: Path, pki: Pki
) -> Iterator[DaemonProcess]:
    write_scenario(scenario_path, gpus=[{"name": "NVIDIA A100-SXM4-80GB"}])
    web = tmp_path / "web.yml"
    web.write_text(web_config_yaml(pki))
    body = f'web_config_file = "{web}"\n'
    d = DaemonProcess(tmp_path / "d", scenario=scenario_path, interval=1.0)
    # [http] is the harness's last table but one; put the key into it.
    d.config.write_text(d.config.read_text().replace("[nvml]", body + "[nvml]"))
    with d:
        d.start()
        yield d
        assert "Traceback" not in d.stderr()


def _scrape(port: int, accept: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Content-Type") or ""
    finally:
        conn.close()


def _tls_scrape(port: int, pki: Pki, timeout: float = 5.0) -> int:
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer sees a TCP reset, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_distinct_accept_headers_do_not_grow_memory(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)

    def scrape(accept: str) -> tuple[int, str]:
        conn.request("GET", "/metrics", headers={"Accept": accept})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Content-Type") or ""

    try:
        for i in range(1, 201):  # warm-up: both formats rendered, allocator settled
            scrape(f"application/openmetrics-text; version=1.0.{i}")
            scrape("application/openmetrics-text; version=1.0.0")
        before = _rss_mb(daemon.proc.pid)
        answers = {scrape(f"application/openmetrics-text; version=1.0.{i}") for i in range(1, 3001)}
        after = _rss_mb(daemon.proc.pid)
    finally:
        conn.close()
    # Unknown versions get the text format, whose content type echoes nothing of the request.
    assert answers == {(200, TEXT)}
    assert after - before < 8, (before, after)  # one body per distinct header grew ~100 MB


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("application/openmetrics-text; version=abc", TEXT),
        ("application/openmetrics-text; version=", TEXT),
        ("application/openmetrics-text;;;version=1.0.0;escaping=allow-utf-8", OPENMETRICS),
        ("application/openmetrics-text", OPENMETRICS),
        ("application/openmetrics-text;q=0, text/plain", TEXT),
        ("text/plain; version=1.0.0; escaping=" + "x" * 4000, TEXT),
        ("*/*", TEXT),
    ],
)
def test_accept_header_is_negotiated_never_echoed(
    daemon: DaemonProcess, accept: str, content_type: str
) -> None:
    assert _scrape(daemon.port, accept) == (200, content_type)


def _idle_then_scrape(port: int, n: int, scrape: object) -> None:
    assert callable(scrape)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    partial = []
    for _ in range(50):  # and some that started a request and went quiet
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        partial.append(s)
    try:
        time.sleep(0.5)  # the server has accepted them all
        for _ in range(5):
            assert scrape() == 200
    finally:
        for s in (*idle, *partial):
            s.close()


def test_hundreds_of_idle_connections_leave_metrics_available(daemon: DaemonProcess) -> None:
    lines = len(daemon.stderr().splitlines())
    _idle_then_scrape(daemon.port, 300, lambda: _scrape(daemon.port)[0])
    assert daemon.get("/healthz")[0] == 200
    assert len(daemon.stderr().splitlines()) <= lines + 1  # no line per connection


def test_hundreds_of_silent_or_trickling_tls_clients_cost_little(
    tls_daemon: DaemonProcess, pki: Pki
) -> None:
    assert tls_daemon.proc is not None
    assert _tls_scrape(tls_daemon.port, pki) == 200
    before = _rss_mb(tls_daemon.proc.pid)
    trickling = []
    for _ in range(300):  # the start of a ClientHello record, then nothing
        s = socket.create_connection(("127.0.0.1", tls_daemon.port))
        s.sendall(b"\x16\x03\x01")
        trickling.append(s)
    try:
        _idle_then_scrape(tls_daemon.port, 300, lambda: _tls_scrape(tls_daemon.port, pki))
        grown = _rss_mb(tls_daemon.proc.pid) - before
    finally:
        for s in trickling:
            s.close()
    assert grown < 10, grown  # no OpenSSL state before a whole ClientHello (~50 KB each)


def test_a_trickling_client_is_cut_at_the_request_deadline(daemon: DaemonProcess) -> None:
    """One byte every 0.3 s keeps every per-read timeout happy; the request deadline is for
    the whole request."""
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    sock.settimeout(0.3)
    request = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 1000
    start = time.monotonic()
    cut_after = None
    try:
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    cut_after = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except OSError:
                cut_after = time.monotonic() - start
                break
            if time.monotonic() - start > REQUEST_SECONDS + 10:
                break
        assert _scrape(daemon.port)[0] == 200  # served meanwhile, and after
    finally:
        sock.close()
    assert cut_after is not None, "never cut"
    assert REQUEST_SECONDS - 1 <= cut_after <= REQUEST_SECONDS + 5


def _oversized(port: int, head: bytes, out: list[bytes]) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    with contextlib.suppress(OSError):  # the server stopped reading, answered and closed
        sock.sendall(head)
    try:
        out.append(sock.recv(200))
    except OSError as exc:
        out.append(repr(exc).encode())
    finally:
        sock.close()


def test_oversized_heads_are_refused_and_memory_stays_bounded(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    before = _rss_mb(daemon.proc.pid)
    line = b"X-Big: " + b"b" * 60_000 + b"\r\n"
    big = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + line * 16 + b"\r\n"  # ~1 MB of headers
    many = b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n"
    assert len(many) < MAX_HEAD_BYTES  # refused for the count, not the size
    answers: list[bytes] = []
    threads = [
        threading.Thread(target=_oversized, args=(daemon.port, big, answers)) for _ in range(40)
    ]
    threads.append(threading.Thread(target=_oversized, args=(daemon.port, many, answers)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    after = _rss_mb(daemon.proc.pid)
    assert len(answers) == 41
    assert all(a.startswith(b"HTTP/1.1 431 ") for a in answers), set(answers)
    assert after - before < 10, (before, after)
    assert _scrape(daemon.port)[0] == 200


def test_client_resets_print_no_traceback(daemon: DaemonProcess) -> None:
    for i in range(30):
        s = socket.create_connection(("127.0.0.1", daemon.port))
        if i % 3 == 0:
            s.sendall(b"GET /metr")  # reset mid-request
        elif i % 3 == 1:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # reset before reading
        _reset(s)
    time.sleep(0.5)
    assert _scrape(daemon.port)[0] == 200
    err = daemon.stderr()
    assert "Traceback" not in err and "Error" not in err, err


def test_tls_client_resets_print_no_traceback(tls_daemon: DaemonProcess, pki: Pki) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", tls_daemon.port))
        if i % 2:
            s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        else:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00")  # half a ClientHello
        _reset(s)
    time.sleep(0.5)
    assert _tls_scrape(tls_daemon.port, pki) == 200
    err = tls_daemon.stderr()
    assert "Traceback" not in err and "Error" not in err, err
