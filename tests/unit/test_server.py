from __future__ import annotations

import http.client
import logging
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import run_python
from prometheus_client import CollectorRegistry

from tfgpud import server as server_mod
from tfgpud.server import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    BadRequest,
    Endpoints,
    HttpServer,
    parse_head,
)
from tfgpud.views import render_page


def _broken_status() -> dict[str, Any]:
    raise RuntimeError("bug behind /status")


@contextmanager
def serving(status: Any = lambda: {"host": "h", "findings": []}) -> Iterator[HttpServer]:
    srv = HttpServer(
        "127.0.0.1",
        0,
        Endpoints(registry=CollectorRegistry(), health=lambda: (True, "ok"), status=status),
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(2.0)


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def test_a_bug_behind_an_endpoint_is_a_500_and_serving_goes_on() -> None:
    with serving(_broken_status) as srv:
        port = srv.address[1]
        status, body, _ = _get(port, "/status")
        assert (status, body) == (500, b"internal error\n")
        assert _get(port, "/healthz")[0] == 200


def test_head_unknown_paths_and_server_header() -> None:
    with serving() as srv:
        port = srv.address[1]
        status, body, headers = _get(port, "/healthz", "HEAD")
        assert status == 200 and body == b"" and headers["Content-Length"] == "3"
        assert headers["Server"] == "tfgpud"
        assert _get(port, "/nope")[0] == 404


def test_at_the_cap_the_longest_waiting_connection_makes_room(monkeypatch: Any) -> None:
    """Connections that hold a slot without a request cannot keep the next client out: at the
    cap the one that has waited longest is closed, and the newcomer is served."""
    monkeypatch.setattr(server_mod, "MAX_CONNECTIONS", 4)
    with serving() as srv:
        port = srv.address[1]
        idle = []
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", port)))
            time.sleep(0.05)  # accepted in this order
        try:
            assert _get(port, "/healthz")[0] == 200  # a fifth client is served ...
            idle[0].settimeout(5)
            assert idle[0].recv(1) == b""  # ... and the oldest idle one was closed for it
            # One slot went to the scrape (closed since); the other idle ones are kept.
            idle[1].settimeout(0.2)
            with pytest.raises(TimeoutError):
                idle[1].recv(1)
        finally:
            for s in idle:
                s.close()


def test_page_shows_a_dash_for_unknown_visibility() -> None:
    page = render_page(
        {"tensorflow": [{"env": "x", "status": "import-failed", "visible_gpus": None}]}
    )
    assert "probe import-failed</span>" in page and "None" not in page


def test_parse_head_accepts_what_scrapers_send() -> None:
    req = parse_head(
        b"GET /metrics?x=1 HTTP/1.1\r\nHost: h\r\nAccept: text/plain\r\n"
        b"accept: second\r\nAuthorization:  Basic abc  \r\n\r\n"
    )
    assert (req.method, req.path, req.keep_alive, req.has_body) == ("GET", "/metrics", True, False)
    assert req.headers["accept"] == "text/plain"  # the first of repeated fields
    assert req.headers["authorization"] == "Basic abc"
    assert parse_head(b"GET http://h:1/status HTTP/1.1\r\n\r\n").path == "/status"
    assert not parse_head(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive
    assert parse_head(b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").has_body


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /\r\n\r\n", 400),  # HTTP/0.9
        (b"GET  / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431),
    ],
)
def test_parse_head_refuses_malformed_heads(head: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as info:
        parse_head(head)
    assert info.value.status == status


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(timeout)
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_pipelined_requests_are_answered_in_order_then_closed() -> None:
    with serving() as srv:
        out = _raw(
            srv.address[1],
            b"GET /healthz HTTP/1.1\r\n\r\nHEAD /nope HTTP/1.1\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
    statuses = re.findall(rb"HTTP/1\.1 \d+ [^\r]*", out)
    assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 200 OK"]
    assert out.endswith(b"ok\n")


def test_errors_are_answered_and_close_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    with serving() as srv:
        port = srv.address[1]
        assert _raw(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nab").startswith(
            b"HTTP/1.1 405 Method Not Allowed\r\n"
        )
        big = b"GET / HTTP/1.1\r\nX: " + b"x" * (2 * MAX_HEAD_BYTES) + b"\r\n\r\n"
        assert _raw(port, big).startswith(b"HTTP/1.1 431 ")
        assert _raw(port, b"GET / HTTP/3.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
        assert not caplog.records  # nothing logged per request or connection ...
        with caplog.at_level(logging.INFO, logger="tfgpud.server"):
            srv.log_summary()  # ... only counted, for the once-a-minute summary line
    (line,) = [r.getMessage() for r in caplog.records]
    assert "requests refused (431): 1" in line and "requests refused (505): 1" in line


def test_the_open_files_limit_is_raised_and_bounds_the_connection_cap() -> None:
    code = (
        "import resource\n"
        "from tfgpud.server import connection_limit, raise_open_files_limit\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))\n"
        "low = connection_limit()\n"
        "print([low, raise_open_files_limit(), connection_limit(), hard])\n"
    )
    out = run_python(code, scenario=None)
    assert out.returncode == 0, out.stderr
    low, soft, cap, hard = out.data
    assert low == 100 - server_mod.FD_RESERVE
    assert soft == min(hard, server_mod.OPEN_FILES_WANTED)
    assert cap == min(server_mod.MAX_CONNECTIONS, soft - server_mod.FD_RESERVE)
