"""The running daemon: time to READY=1, /metrics latency, RSS over many polls.

All on the simulated 8-GPU x 16-process scenario, with the real `tfgpud run` process.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.scenario import FAKEDRIVER, ROOT, busy_scenario

sys.path.insert(0, str(ROOT / "tests"))
from daemon_harness import DaemonProcess

SCRAPES = 1000


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _polls(d: DaemonProcess) -> int:
    return int(d.metrics().get("tfgpud_polls_total", 0))


def ready_and_latency(tmp: Path, scenario: Path) -> dict[str, float]:
    with DaemonProcess(tmp / "lat", scenario=scenario, interval=1.0) as d:
        t0 = time.monotonic()
        d.start()
        ready = time.monotonic() - t0
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
        samples = []
        for _ in range(SCRAPES):
            s = time.perf_counter()
            conn.request("GET", "/metrics")
            body = conn.getresponse().read()
            samples.append(time.perf_counter() - s)
        conn.close()
        assert b"tfgpud_gpu_user_memory_bytes" in body
        d.stop()
    samples.sort()
    return {
        "ready_seconds": ready,
        "p50_ms": statistics.median(samples) * 1000,
        "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1000,
        "series": float(sum(1 for x in body.decode().splitlines() if x and x[0] != "#")),
    }


def uncached_render(scenario: Path, rounds: int = 200) -> dict[str, float]:
    """Time to render /metrics from a fresh snapshot (the first scrape after each poll)."""
    env = dict(os.environ, TFGPUD_FAKE_DRIVER=str(scenario), LD_LIBRARY_PATH=str(FAKEDRIVER))
    code = (
        "import json, time\n"
        "from prometheus_client.exposition import generate_latest\n"
        "from tfgpud.config import Config\n"
        "from tfgpud.daemon import Daemon\n"
        "import tempfile\n"
        "from tfgpud.config import parse_config\n"
        "cfg = parse_config(f'[daemon]\\nstate_dir = \"{tempfile.mkdtemp()}\"\\n')\n"
        "d = Daemon(cfg)\n"
        "reg = d._registry\n"
        "d.poll_once(); generate_latest(reg)\n"
        "out = []\n"
        f"for _ in range({rounds}):\n"
        "    s = time.perf_counter(); generate_latest(reg); out.append(time.perf_counter() - s)\n"
        "print(json.dumps(sorted(out)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, check=True, timeout=300
    )
    samples = json.loads(proc.stdout)
    return {
        "p50_ms": statistics.median(samples) * 1000,
        "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1000,
    }


def rss_growth(tmp: Path, scenario: Path, first: int = 100, last: int = 10_000) -> dict[str, float]:
    with DaemonProcess(tmp / "rss", scenario=scenario, interval=0.0) as d:
        d.start()
        assert d.proc is not None
        while _polls(d) < first:
            time.sleep(0.05)
        rss_first, n_first = _rss_bytes(d.proc.pid), _polls(d)
        t0 = time.monotonic()
        while _polls(d) < last:
            time.sleep(0.5)
        rss_last, n_last = _rss_bytes(d.proc.pid), _polls(d)
        elapsed = time.monotonic() - t0
        d.stop()
    return {
        "polls_first": n_first,
        "rss_first_mb": rss_first / 2**20,
        "polls_last": n_last,
        "rss_last_mb": rss_last / 2**20,
        "growth_mb": (rss_last - rss_first) / 2**20,
        "polls_per_second": (n_last - n_first) / elapsed,
    }


def run() -> str:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        scenario = tmp / "busy.toml"
        scenario.write_text(busy_scenario())
        lat = ready_and_latency(tmp, scenario)
        cold = uncached_render(scenario)
        rss = rss_growth(tmp, scenario)
    return "\n".join(
        [
            "## Daemon (8 GPUs x 16 processes, simulated driver)",
            "",
            f"- exec to READY=1: {lat['ready_seconds'] * 1000:.0f} ms",
            f"- /metrics over {SCRAPES} sequential scrapes ({lat['series']:.0f} series): "
            f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms (target p99 <= 5 ms)",
            f"- rendering /metrics from a fresh snapshot (first scrape after a poll, in-process): "
            f"p50 {cold['p50_ms']:.2f} ms, p99 {cold['p99_ms']:.2f} ms",
            f"- RSS at interval 0: {rss['rss_first_mb']:.1f} MB after {rss['polls_first']:.0f} "
            f"polls, {rss['rss_last_mb']:.1f} MB after {rss['polls_last']:.0f} polls; growth "
            f"{rss['growth_mb']:.2f} MB (targets <= 45 MB, growth <= 1 MB); "
            f"{rss['polls_per_second']:.0f} polls/s",
        ]
    )


if __name__ == "__main__":
    print(run())
