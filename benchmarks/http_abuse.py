"""Hostile HTTP clients against the real daemon on loopback: is /metrics still there?

Three phases on one `tfgpud run` process (simulated 8-GPU x 16-process host), all on 127.0.0.1,
each bounded in count and time:

1. reference: 200 concurrent scrapers, each scraping on a fresh connection twice a second for
   5 s, nothing else;
2. the same 200 scrapers for 15 s (longer than the server's request deadline) while 500 slow
   clients are connected, each trickling a request one byte a second (and reconnecting, at most
   once a second, when cut);
3. 10,000 keep-alive scrapes, each with a distinct ``Accept`` header.

A scrape succeeds when it answers 200 with the whole body within 1 s. Targets: >= 99 % of
scrapes within 1 s while the slow clients are connected; RSS growth <= 10 MB in phases 2 and 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.scenario import ROOT, busy_scenario

sys.path.insert(0, str(ROOT / "tests"))
from daemon_harness import DaemonProcess

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


async def _scrape_once(port: int) -> float | None:
    """Seconds a fresh-connection GET /metrics took; None when it failed or took too long."""
    start = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            status, body = await _read_response(reader)
        if status != 200 or b"tfgpud_gpu_info" not in body:
            return None
        return time.monotonic() - start
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _scrapers(port: int, seconds: float) -> list[float | None]:
    """Every scraper scrapes every SCRAPE_EVERY s for ``seconds``; one sample per scrape."""
    out: list[float | None] = []

    async def one() -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            started = loop.time()
            out.append(await _scrape_once(port))
            await asyncio.sleep(max(0.0, started + SCRAPE_EVERY - loop.time()))

    async with asyncio.timeout(PHASE_LIMIT):
        await asyncio.gather(*(one() for _ in range(SCRAPERS)))
    return out


class _SlowClients:
    """``n`` connections, each sending a request one byte a second, reconnecting when cut."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.connected = 0
        self.cut = 0
        self.refused = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _one(self) -> None:
        payload = b"GET /metrics HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"a" * 10_000
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.refused += 1
                await asyncio.sleep(1.0)
                continue
            self.connected += 1
            try:
                for i in range(len(payload)):
                    writer.write(payload[i : i + 1])
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
                writer.write(
                    f"GET /metrics HTTP/1.1\r\nHost: b\r\nAccept: {accept}\r\n\r\n".encode()
                )
                status, _ = await _read_response(reader)
                ok += status == 200
        finally:
            writer.close()

    async with asyncio.timeout(PHASE_LIMIT):
        await asyncio.gather(*(one(c) for c in range(ACCEPT_CONNECTIONS)))
    return ok


def _summary(samples: list[float | None]) -> dict[str, float]:
    done = sorted(s for s in samples if s is not None)
    within = sum(1 for s in done if s <= SCRAPE_OK_SECONDS)
    p99 = done[max(0, int(len(done) * 0.99) - 1)] if done else float("nan")
    return {
        "n": len(samples),
        "ok_pct": 100.0 * within / len(samples) if samples else 0.0,
        "answered_pct": 100.0 * len(done) / len(samples) if samples else 0.0,
        "p50_ms": statistics.median(done) * 1000 if done else float("nan"),
        "p99_ms": p99 * 1000,
    }


async def _run(d: DaemonProcess) -> dict[str, object]:
    assert d.proc is not None
    pid, port = d.proc.pid, d.port
    out: dict[str, object] = {}
    await _scrapers(port, 0.1)  # warm: first render, thread/arena start-up
    out["rss_start"] = _rss_mb(pid)
    out["reference"] = _summary(await _scrapers(port, REFERENCE_SECONDS))
    slow = _SlowClients(port, SLOW_CLIENTS)
    rss_before = _rss_mb(pid)
    await slow.start()
    out["slow_connected"] = slow.connected
    try:
        out["under_load"] = _summary(await _scrapers(port, LOAD_SECONDS))
    except TimeoutError:
        out["under_load"] = {"n": 0, "ok_pct": 0.0, "answered_pct": 0.0, "p50_ms": 0, "p99_ms": 0}
    out["rss_slow_during"] = _rss_mb(pid)
    out["slow_cut"], out["slow_refused"] = slow.cut, slow.refused
    await slow.stop()
    await asyncio.sleep(1.0)
    out["rss_slow_before"], out["rss_slow_after"] = rss_before, _rss_mb(pid)
    rss_accept_before = _rss_mb(pid)
    t = time.monotonic()
    try:
        out["accept_ok"] = await _distinct_accepts(port, DISTINCT_ACCEPTS)
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        out["accept_ok"] = f"failed: {type(exc).__name__}"
    out["accept_seconds"] = time.monotonic() - t
    out["rss_accept_before"], out["rss_accept_after"] = rss_accept_before, _rss_mb(pid)
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def run() -> str:
    nofile = _raise_nofile()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        scenario = tmp / "busy.toml"
        scenario.write_text(busy_scenario())
        with DaemonProcess(tmp / "abuse", scenario=scenario, interval=1.0) as d:
            d.start()
            r = asyncio.run(_run(d))
            warnings = d.stderr().count("WARNING")
            tracebacks = d.stderr().count("Traceback")
            d.stop()
    ref, load = r["reference"], r["under_load"]
    assert isinstance(ref, dict) and isinstance(load, dict)
    slow_growth = float(r["rss_slow_during"]) - float(r["rss_slow_before"])  # type: ignore[arg-type]
    accept_growth = float(r["rss_accept_after"]) - float(r["rss_accept_before"])  # type: ignore[arg-type]
    return "\n".join(
        [
            f"## HTTP abuse ({SLOW_CLIENTS} slow clients, {SCRAPERS} concurrent scrapers, "
            f"loopback, RLIMIT_NOFILE {nofile})",
            "",
            "| phase | scrapes | 200 within 1 s | answered | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|",
            f"| alone | {ref['n']:.0f} | {ref['ok_pct']:.1f} % | {ref['answered_pct']:.1f} % | "
            f"{ref['p50_ms']:.1f} | {ref['p99_ms']:.1f} |",
            f"| with {r['slow_connected']} slow clients connected | {load['n']:.0f} | "
            f"{load['ok_pct']:.1f} % | {load['answered_pct']:.1f} % | {load['p50_ms']:.1f} | "
            f"{load['p99_ms']:.1f} |",
            "",
            f"- slow clients: {r['slow_cut']} cut by the server, {r['slow_refused']} connects "
            f"refused; daemon RSS {r['rss_slow_before']:.1f} MB before, "
            f"{r['rss_slow_during']:.1f} MB with them connected ({slow_growth:+.1f} MB), "
            f"{r['rss_slow_after']:.1f} MB after they left",
            f"- {DISTINCT_ACCEPTS} scrapes with distinct Accept headers: {r['accept_ok']} "
            f"answered 200 in {r['accept_seconds']:.1f} s; RSS {r['rss_accept_before']:.1f} -> "
            f"{r['rss_accept_after']:.1f} MB ({accept_growth:+.1f} MB)",
            f"- daemon stderr: {warnings} WARNING lines, {tracebacks} tracebacks",
            f"- targets: >= 99 % of scrapes within 1 s with slow clients: "
            f"{_met(float(load['ok_pct']) >= 99.0)}; RSS growth <= 10 MB: "
            f"{_met(max(slow_growth, accept_growth) <= 10.0)}",
        ]
    )


if __name__ == "__main__":
    print(run())
