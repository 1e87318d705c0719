from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry

from tfgpud import server as server_mod
from tfgpud.server import Endpoints, HttpServer
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


def test_connections_beyond_the_cap_are_refused_not_threaded(monkeypatch: Any) -> None:
    monkeypatch.setattr(server_mod, "MAX_CONNECTIONS", 4)
    with serving() as srv:
        port = srv.address[1]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            time.sleep(0.2)  # let the server accept them all
            extra = socket.create_connection(("127.0.0.1", port))
            extra.settimeout(5)
            assert extra.recv(1) == b""  # closed at once
            extra.close()
        finally:
            for s in idle:
                s.close()
        # Slots come back when clients go away.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if _get(port, "/healthz")[0] == 200:
                    break
            except (ConnectionError, http.client.HTTPException):
                time.sleep(0.05)
        assert _get(port, "/healthz")[0] == 200


def test_page_shows_a_dash_for_unknown_visibility() -> None:
    page = render_page(
        {"tensorflow": [{"env": "x", "status": "import-failed", "visible_gpus": None}]}
    )
    assert "probe import-failed</span>" in page and "None" not in page
