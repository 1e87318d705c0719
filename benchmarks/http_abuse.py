"""Hostile HTTP clients against the real daemon on loopback: is /metrics still there?

Three phases on one `tfgpud run` process (simulated 8-GPU x 16-process host), all on 127.0.0.1,
each bounded in count and time:

1. reference: 200 concurrent scrapers, each scraping twice a second for 5 s, nothing else;
2. the same 200 scrapers for 15 s (longer than the server's request deadline) while 500 slow
   clients are connected, each trickling a request one byte a second (and reconnecting, at most
   once a second, when cut);
3. 10,000 keep-alive scrapes, each with a distinct ``Accept`` header.

Phases 1 and 2 run over plain HTTP and again over TLS (a web config with a certificate).

A scrape succeeds when it answers 200 with the whole body within 1 s. Targets: >= 99 % of
scrapes within 1 s while the slow clients are connected; RSS growth <= 10 MB in phases 2 and 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.scenario import ROOT, busy_scenario

sys.path.insert(0, str(ROOT / "tests"))
from daemon_harness import DaemonProcess
from tlsutil import make_pki, web_config_yaml

SLOW_CLIENTS = 500
SCRAPERS = 200
REFERENCE_SECONDS = 5.0
LOAD_SECONDS = 15.0
SCRAPE_EVERY = 0.5  # seconds between one scraper's scrapes (starts, when answered in time)
DISTINCT_ACCEPTS = 10_000
ACCEPT_CONNECTIONS = 8
SCRAPE_OK_SECONDS = 1.0
SCRAPE_TIMEOUT = 5.0
PHASE_LIMIT = 120.0  # seconds; a phase still running then is cut and reported as such


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = await reader.readexactly(length)
    return status, body


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, close: bool
) -> float | None:
    """Seconds one GET /metrics took on this connection; None when it failed."""
    start = time.monotonic()
    connection = "Connection: close\r\n" if close else ""
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: bench\r\n{connection}\r\n".encode())
    status, body = await _read_response(reader)
    if status != 200 or b"tfgpud_gpu_info" not in body:
        return None
    return time.monotonic() - start


async def _scrape_once(port: int) -> float | None:
    """Seconds a fresh-connection GET /metrics took; None when it failed or took too long."""
    start = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if await _get(reader, writer, close=True) is None:
                return None
        return time.monotonic() - start
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _scrapers(
    port: int, seconds: float, tls: ssl.SSLContext | None = None
) -> list[float | None]:
    """Every scraper scrapes every SCRAPE_EVERY s for ``seconds``; one sample per scrape.
    Plain: a fresh connection per scrape. TLS: one keep-alive connection per scraper, as
    Prometheus keeps them (reconnecting after a failure), so handshakes do not dominate."""
    out: list[float | None] = []

    async def keep_alive(end: float) -> None:
        loop = asyncio.get_running_loop()
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while loop.time() < end:
            started = loop.time()
            sample: float | None = None
            try:
                async with asyncio.timeout(SCRAPE_TIMEOUT):
                    if conn is None:
                        conn = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
                    sample = await _get(*conn, close=False)
                    if sample is not None:
                        sample = loop.time() - started
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                if conn is not None:
                    conn[1].close()
                conn = None
            out.append(sample)
            await asyncio.sleep(max(0.0, started + SCRAPE_EVERY - loop.time()))
        if conn is not None:
            conn[1].close()

    async def fresh(end: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < end:
            started = loop.time()
            out.append(await _scrape_once(port))
            await asyncio.sleep(max(0.0, started + SCRAPE_EVERY - loop.time()))

    end = asyncio.get_running_loop().time() + seconds
    one = fresh if tls is None else keep_alive
    async with asyncio.timeout(PHASE_LIMIT):
        await asyncio.gather(*(one(end) for _ in range(SCRAPERS)))
    return out


# What a slow client trickles: a request's head, or (to a TLS port) a ClientHello.
HTTP_TRICKLE = b"GET /metrics HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"a" * 10_000
TLS_TRICKLE = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 10_000


class _SlowClients:
    """``n`` connections, each sending ``payload`` one byte a second, reconnecting when cut."""

    def __init__(self, port: int, n: int, payload: bytes) -> None:
        self.port, self.n, self.payload = port, n, payload
        self.connected = 0
        self.cut = 0
        self.refused = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _one(self) -> None:
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.refused += 1
                await asyncio.sleep(1.0)
                continue
            self.connected += 1
            try:
                for i in range(len(self.payload)):
                    writer.write(self.payload[i : i + 1])
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await reader.read(1)  # EOF or an error answer: cut
                            break
                    if self._stop.is_set():
                        break
            except OSError:
                pass
            finally:
                self.connected -= 1
                if not self._stop.is_set():
                    self.cut += 1
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            if not self._stop.is_set():
                await asyncio.sleep(1.0)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._one()) for _ in range(self.n)]
        deadline = time.monotonic() + 20
        while self.connected < self.n and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _distinct_accepts(port: int, n: int) -> int:
    """Scrape ``n`` times over a few keep-alive connections, every Accept header different."""
    ok = 0
    per = n // ACCEPT_CONNECTIONS

    async def one(c: int) -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(per):
                accept = f"application/openmetrics-text; version=1.{c}.{i}; q=0.{i % 10}"
                request = f"GET /metrics HTTP/1.1\r\nHost: b\r\nAccept: {accept}\r\n\r\n"
                writer.write(request.encode())
                status, _ = await _read_response(reader)
                ok += status == 200
        finally:
            writer.close()

    async with asyncio.timeout(PHASE_LIMIT):
        await asyncio.gather(*(one(c) for c in range(ACCEPT_CONNECTIONS)))
    return ok


def _row(name: str, samples: list[float | None]) -> tuple[str, float]:
    """A table row for ``samples``, and the share of scrapes answered 200 within 1 s."""
    done = sorted(s for s in samples if s is not None)
    n = max(1, len(samples))
    ok_pct = 100.0 * sum(1 for s in done if s <= SCRAPE_OK_SECONDS) / n
    p50 = f"{statistics.median(done) * 1000:.1f}" if done else "-"
    p99 = f"{done[max(0, int(len(done) * 0.99) - 1)] * 1000:.1f}" if done else "-"
    answered = 100.0 * len(done) / n
    return (
        f"| {name} | {len(samples)} | {ok_pct:.1f} % | {answered:.1f} % | {p50} | {p99} |",
        ok_pct,
    )


@dataclass
class _Report:
    rows: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    worst_ok_pct: float = 100.0
    worst_growth_mb: float = 0.0


async def _with_slow_clients(
    d: DaemonProcess, label: str, payload: bytes, tls: ssl.SSLContext | None, report: _Report
) -> None:
    assert d.proc is not None
    pid, port = d.proc.pid, d.port
    await _scrapers(port, 0.2, tls)  # warm: first render, thread and arena start-up
    row, _ = _row(f"{label}, alone", await _scrapers(port, REFERENCE_SECONDS, tls))
    report.rows.append(row)
    slow = _SlowClients(port, SLOW_CLIENTS, payload)
    before = _rss_mb(pid)
    await slow.start()
    connected = slow.connected
    try:
        samples = await _scrapers(port, LOAD_SECONDS, tls)
    except TimeoutError:
        samples = [None]
    during = _rss_mb(pid)
    row, ok_pct = _row(f"{label}, {connected} slow clients connected", samples)
    report.rows.append(row)
    await slow.stop()
    await asyncio.sleep(1.0)
    report.notes.append(
        f"- {label} slow clients: {slow.cut} cut by the server, {slow.refused} connects refused;"
        f" daemon RSS {before:.1f} MB before, {during:.1f} MB with them connected "
        f"({during - before:+.1f} MB), {_rss_mb(pid):.1f} MB after they left"
    )
    report.worst_ok_pct = min(report.worst_ok_pct, ok_pct)
    report.worst_growth_mb = max(report.worst_growth_mb, during - before)


async def _accepts(d: DaemonProcess, report: _Report) -> None:
    assert d.proc is not None
    before = _rss_mb(d.proc.pid)
    t = time.monotonic()
    try:
        ok: object = await _distinct_accepts(d.port, DISTINCT_ACCEPTS)
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        ok = f"failed: {type(exc).__name__}"
    after = _rss_mb(d.proc.pid)
    report.notes.append(
        f"- {DISTINCT_ACCEPTS} scrapes with distinct Accept headers: {ok} answered 200 in "
        f"{time.monotonic() - t:.1f} s; RSS {before:.1f} -> {after:.1f} MB "
        f"({after - before:+.1f} MB)"
    )
    report.worst_growth_mb = max(report.worst_growth_mb, after - before)


def _stderr_note(label: str, d: DaemonProcess) -> str:
    err = d.stderr()
    return (
        f"- {label} daemon stderr: {err.count('WARNING')} WARNING lines, "
        f"{err.count('Traceback')} tracebacks"
    )


def run() -> str:
    nofile = _raise_nofile()
    report = _Report()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        scenario = tmp / "busy.toml"
        scenario.write_text(busy_scenario())
        with DaemonProcess(tmp / "http", scenario=scenario, interval=1.0) as d:
            d.start()
            asyncio.run(_with_slow_clients(d, "HTTP", HTTP_TRICKLE, None, report))
            asyncio.run(_accepts(d, report))
            report.notes.append(_stderr_note("HTTP", d))
            d.stop()
        pki = make_pki(tmp / "pki")
        web = tmp / "web.yml"
        web.write_text(web_config_yaml(pki))
        d = DaemonProcess(tmp / "tls", scenario=scenario, interval=1.0)
        d.config.write_text(
            d.config.read_text().replace("[nvml]", f'web_config_file = "{web}"\n[nvml]')
        )
        with d:
            d.start()
            ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
            asyncio.run(_with_slow_clients(d, "TLS", TLS_TRICKLE, ctx, report))
            report.notes.append(_stderr_note("TLS", d))
            d.stop()
    return "\n".join(
        [
            f"## HTTP abuse ({SLOW_CLIENTS} slow clients, {SCRAPERS} concurrent scrapers, "
            f"loopback, RLIMIT_NOFILE {nofile})",
            "",
            "HTTP scrapers open a connection per scrape; TLS scrapers keep theirs alive (as "
            "Prometheus does). TLS slow clients trickle a ClientHello.",
            "",
            "| phase | scrapes | 200 within 1 s | answered | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|",
            *report.rows,
            "",
            *report.notes,
            f"- targets: >= 99 % of scrapes within 1 s with slow clients: "
            f"{_met(report.worst_ok_pct >= 99.0)}; RSS growth <= 10 MB: "
            f"{_met(report.worst_growth_mb <= 10.0)}",
        ]
    )


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    print(run())
