"""TLS and basic auth on the real HTTP server, driven by curl and raw sockets.

The server runs in-process (HttpServer + WebSecurity) on a loopback port; clients are curl
(what an admin would use), Python's ssl, and raw TCP sockets that connect and never speak.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import socket
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge
from tlsutil import Pki, bcrypt_hash, make_pki, web_config_yaml

from tfgpud.server import Endpoints, HttpServer
from tfgpud.webconfig import WebSecurity

CURL = shutil.which("curl")
PROMTOOL = shutil.which("promtool")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl not installed (apt install curl)")
PASSWORD = "s3cret horse"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return bcrypt_hash(PASSWORD)


def _endpoints() -> Endpoints:
    registry = CollectorRegistry()
    Gauge("tfgpud_test_up", "test gauge", registry=registry).set(1)
    return Endpoints(
        registry=registry,
        health=lambda: (True, "ok"),
        status=lambda: {"host": "test", "summary": "ok", "findings": []},
    )


@contextmanager
def serving(
    tmp: Path, web_yaml: str, *, handshake_timeout: float = 5.0
) -> Iterator[tuple[HttpServer, Path]]:
    path = tmp / "web-config.yml"
    path.write_text(web_yaml)
    server = HttpServer(
        "127.0.0.1",
        0,
        _endpoints(),
        security=WebSecurity.from_file(path),
        handshake_timeout=handshake_timeout,
    )
    server.start()
    try:
        yield server, path
    finally:
        server.stop(2.0)


def curl(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run(
        [CURL, "-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _code(proc: subprocess.CompletedProcess[str]) -> int:
    return int(proc.stdout.rsplit("\n", 1)[-1])


def _client_context(pki: Pki, cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    if cert:
        ctx.load_cert_chain(str(pki.client_crt), str(pki.client_key))
    return ctx


def _https_get(port: int, ctx: ssl.SSLContext, auth: str | None = None) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        headers = {"Authorization": auth} if auth else {}
        conn.request("GET", "/metrics", headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@needs_curl
def test_curl_scrapes_through_tls_and_basic_auth(tmp_path: Path, pki: Pki, alice_hash: str) -> None:
    with serving(tmp_path, web_config_yaml(pki, {"alice": alice_hash})) as (server, _):
        url = f"https://127.0.0.1:{server.address[1]}/metrics"
        ok = curl("--cacert", str(pki.ca_crt), "-u", f"alice:{PASSWORD}", url)
        assert _code(ok) == 200, ok.stderr
        assert "tfgpud_test_up 1.0" in ok.stdout

        wrong = curl("--cacert", str(pki.ca_crt), "-u", "alice:wrong", "-D", "-", url)
        assert _code(wrong) == 401
        assert 'WWW-Authenticate: Basic realm="tfgpud"' in wrong.stdout
        assert "tfgpud_test_up" not in wrong.stdout
        assert _code(curl("--cacert", str(pki.ca_crt), url)) == 401  # no credentials
        assert _code(curl("--cacert", str(pki.ca_crt), "-u", f"bob:{PASSWORD}", url)) == 401
        for path in ("/", "/status", "/healthz"):  # every endpoint, not only /metrics
            u = url.replace("/metrics", path)
            assert _code(curl("--cacert", str(pki.ca_crt), u)) == 401

        # Unverifiable certificate → curl refuses; plain HTTP to the TLS port → no answer.
        assert curl(url).returncode != 0
        assert curl(url.replace("https", "http")).returncode != 0
        # ... and the server still serves the next client.
        assert _code(curl("--cacert", str(pki.ca_crt), "-u", f"alice:{PASSWORD}", url)) == 200


@needs_curl
def test_basic_auth_without_tls_and_configured_headers(tmp_path: Path, alice_hash: str) -> None:
    web = web_config_yaml(None, {"alice": alice_hash})
    web += "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
    with serving(tmp_path, web) as (server, _):
        assert server.scheme == "http"
        url = f"http://127.0.0.1:{server.address[1]}/metrics"
        ok = curl("-u", f"alice:{PASSWORD}", "-D", "-", url)
        assert _code(ok) == 200
        assert "X-Frame-Options: deny" in ok.stdout
        assert _code(curl("-u", "alice:nope", url)) == 401


@needs_curl
def test_client_certificates_are_verified(tmp_path: Path, pki: Pki) -> None:
    web = web_config_yaml(pki, client_auth="RequireAndVerifyClientCert")
    with serving(tmp_path, web) as (server, _):
        url = f"https://127.0.0.1:{server.address[1]}/metrics"
        base = ("--cacert", str(pki.ca_crt))
        good = curl(*base, "--cert", str(pki.client_crt), "--key", str(pki.client_key), url)
        assert _code(good) == 200, good.stderr
        assert curl(*base, url).returncode != 0  # no client certificate
        foreign = curl(*base, "--cert", str(pki.other_crt), "--key", str(pki.other_key), url)
        assert foreign.returncode != 0  # signed by a CA the server does not trust


@needs_curl
def test_client_allowed_sans(tmp_path: Path, pki: Pki) -> None:
    for sans, allowed in (("[prometheus.example]", True), ("[someone.else]", False)):
        web = web_config_yaml(
            pki,
            client_auth="RequireAndVerifyClientCert",
            extra_tls=f"client_allowed_sans: {sans}",
        )
        with serving(tmp_path, web) as (server, _):
            url = f"https://127.0.0.1:{server.address[1]}/metrics"
            got = curl(
                "--cacert", str(pki.ca_crt), "--cert", str(pki.client_crt),
                "--key", str(pki.client_key), url,
            )  # fmt: skip
            assert (got.returncode == 0 and _code(got) == 200) is allowed, got


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt install prometheus)")
def test_promtool_accepts_the_same_web_configs(tmp_path: Path, pki: Pki, alice_hash: str) -> None:
    assert PROMTOOL is not None
    for i, text in enumerate(
        (
            web_config_yaml(pki, {"alice": alice_hash}),
            web_config_yaml(pki, client_auth="RequireAndVerifyClientCert"),
            web_config_yaml(None, {"alice": alice_hash}),
        )
    ):
        path = tmp_path / f"web{i}.yml"
        path.write_text(text)
        WebSecurity.from_file(path)  # tfgpud accepts it ...
        out = subprocess.run(
            [PROMTOOL, "check", "web-config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr  # ... and so does promtool


def test_stalled_clients_do_not_delay_concurrent_scrapes(
    tmp_path: Path, pki: Pki, alice_hash: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Clients that connect and never finish a TLS handshake cost nothing to other scrapes."""
    auth = _basic("alice", PASSWORD)
    ctx = _client_context(pki)
    web = web_config_yaml(pki, {"alice": alice_hash})
    with serving(tmp_path, web, handshake_timeout=3.0) as (server, _):
        port = server.address[1]
        assert _https_get(port, ctx, auth) == 200  # warm: bcrypt verified once, then cached

        def timed_scrapes(n: int) -> list[float]:
            out = []
            for _ in range(n):
                t = time.monotonic()
                assert _https_get(port, ctx, auth) == 200
                out.append(time.monotonic() - t)
            return out

        baseline = timed_scrapes(20)
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"\x16\x03\x01\x02\x00\x01\x00")  # the start of a ClientHello, then silence
        try:
            time.sleep(0.2)  # the server has accepted them and is waiting in handshakes
            during = timed_scrapes(20)
            # The server gives up on a silent client after the handshake timeout.
            stalled[0].settimeout(8)
            t = time.monotonic()
            assert stalled[0].recv(1) == b""
            dropped_after = time.monotonic() - t + 0.2
        finally:
            for s in (*stalled, half):
                s.close()
    b50, d50 = statistics.median(baseline), statistics.median(during)
    with capsys.disabled():
        print(
            f"\n[tls] new-connection TLS scrape: median {b50 * 1000:.1f} ms alone, "
            f"{d50 * 1000:.1f} ms (max {max(during) * 1000:.1f} ms) with 9 stalled clients; "
            f"stalled client dropped after {dropped_after:.1f} s"
        )
    assert max(during) < 1.0, during  # a blocked accept loop would make this >= 3 s
    assert d50 < b50 * 5 + 0.05
    assert 2.0 <= dropped_after <= 6.0


def test_keep_alive_scrapes_skip_the_handshake_and_bcrypt(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    slow_hash = bcrypt_hash(PASSWORD, rounds=12)  # ~0.2 s per verification
    auth = _basic("alice", PASSWORD)
    with serving(tmp_path, web_config_yaml(pki, {"alice": slow_hash})) as (server, _):
        conn = http.client.HTTPSConnection(
            "127.0.0.1", server.address[1], context=_client_context(pki), timeout=5
        )
        times = []
        try:
            for _ in range(11):
                t = time.monotonic()
                conn.request("GET", "/metrics", headers={"Authorization": auth})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200
                times.append(time.monotonic() - t)
        finally:
            conn.close()
    first, rest = times[0], statistics.median(times[1:])
    with capsys.disabled():
        print(
            f"\n[tls] keep-alive scrape with basic auth (bcrypt cost 12): first "
            f"{first * 1000:.1f} ms, then median {rest * 1000:.2f} ms"
        )
    assert rest < first / 5


def test_certificate_rotation_needs_no_restart(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tfgpud.webconfig as webconfig

    monkeypatch.setattr(webconfig, "_RECHECK_SECONDS", 0.0)
    cert = tmp_path / "live.crt"
    key = tmp_path / "live.key"
    shutil.copy(pki.server_crt, cert)
    shutil.copy(pki.server_key, key)
    web = f"tls_server_config:\n  cert_file: {cert.name}\n  key_file: {key.name}\n"
    with serving(tmp_path, web) as (server, _):
        port = server.address[1]

        def served_cert() -> bytes:
            raw = ssl.get_server_certificate(("127.0.0.1", port), timeout=5)
            return ssl.PEM_cert_to_DER_cert(raw)

        before = served_cert()
        renewed = make_pki(tmp_path / "renewed")
        shutil.copy(renewed.server_crt, cert)
        shutil.copy(renewed.server_key, key)
        assert served_cert() != before
        assert served_cert() == ssl.PEM_cert_to_DER_cert(renewed.server_crt.read_text())
        # A broken renewal is refused and the last good certificate kept.
        key.write_text("garbage\n")
        assert served_cert() == ssl.PEM_cert_to_DER_cert(renewed.server_crt.read_text())


def test_many_concurrent_tls_scrapes(tmp_path: Path, pki: Pki) -> None:
    ctx = _client_context(pki)
    with serving(tmp_path, web_config_yaml(pki)) as (server, _):
        port = server.address[1]
        codes: list[int] = []
        lock = threading.Lock()

        def worker() -> None:
            for _ in range(5):
                code = _https_get(port, ctx)
                with lock:
                    codes.append(code)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert codes == [200] * 40


def test_status_command_through_tls_and_basic_auth(
    tmp_path: Path,
    pki: Pki,
    alice_hash: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tfgpud.cli import main

    with serving(tmp_path, web_config_yaml(pki, {"alice": alice_hash})) as (server, _):
        url = f"https://127.0.0.1:{server.address[1]}"
        monkeypatch.setenv("TFGPUD_PASSWORD", PASSWORD)
        assert main(["status", "--url", url, "--cacert", str(pki.ca_crt), "--user", "alice"]) == 0
        assert "tfgpud ? on test: ok" in capsys.readouterr().out
        monkeypatch.setenv("TFGPUD_PASSWORD", "wrong")
        assert main(["status", "--url", url, "--cacert", str(pki.ca_crt), "--user", "alice"]) == 1
        assert "answered 401" in capsys.readouterr().err
        # Without the CA the certificate cannot be verified: a clear error, not a traceback.
        assert main(["status", "--url", url, "--user", "alice"]) == 1
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err


def test_a_client_hello_split_across_packets_still_connects(tmp_path: Path, pki: Pki) -> None:
    """The server waits for the whole first TLS record before starting OpenSSL: a ClientHello
    that arrives in pieces, slowly, must still complete the handshake."""
    with serving(tmp_path, web_config_yaml(pki)) as (server, _):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = _client_context(pki).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        sock = socket.create_connection(("127.0.0.1", server.address[1]), timeout=5)
        try:
            with pytest.raises(ssl.SSLWantReadError):
                tls.do_handshake()
            hello = outgoing.read()
            for i in range(0, len(hello), len(hello) // 4 + 1):  # 1-3 bytes, then the rest
                sock.sendall(hello[i : i + len(hello) // 4 + 1])
                time.sleep(0.2)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if data := outgoing.read():
                        sock.sendall(data)
                    incoming.write(sock.recv(65536))
            tls.write(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
            sock.sendall(outgoing.read())
            answer = b""
            while b"\r\n\r\n" not in answer:
                incoming.write(sock.recv(65536))
                with contextlib.suppress(ssl.SSLWantReadError):
                    answer += tls.read(65536)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        finally:
            sock.close()


def test_plain_http_and_garbage_to_the_tls_port_are_closed_at_once(
    tmp_path: Path, pki: Pki
) -> None:
    with serving(tmp_path, web_config_yaml(pki), handshake_timeout=5.0) as (server, _):
        for data in (b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\xff\xff", b"\x16\x02\x00\x00\x05"):
            with socket.create_connection(("127.0.0.1", server.address[1]), timeout=5) as s:
                start = time.monotonic()
                s.sendall(data)
                with contextlib.suppress(ConnectionResetError):  # closed, bytes unread
                    assert s.recv(100) == b""
                assert time.monotonic() - start < 2  # not after the handshake timeout
        assert _https_get(server.address[1], _client_context(pki)) == 200
