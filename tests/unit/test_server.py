from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tfgpud import server as server_mod
from tfgpud.server import Endpoints, HttpServer, render_page


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
    assert "<td>import-failed</td><td>-</td>" in page and "None" not in page
