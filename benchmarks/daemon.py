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
    """The first scrape after a poll, in-process, two ways side by side on the same snapshots:
    prometheus_client encoding the whole registry (what the daemon did before) and the daemon's
    exposition, which encodes again only the families that changed since the last render."""
    env = dict(os.environ, TFGPUD_FAKE_DRIVER=str(scenario), LD_LIBRARY_PATH=str(FAKEDRIVER))
    code = (
        "import json, tempfile, time\n"
        "from prometheus_client.exposition import generate_latest\n"
        "from tfgpud.config import parse_config\n"
        "from tfgpud.daemon import Daemon\n"
        "from tfgpud.exporter import Format\n"
        "cfg = parse_config(f'[daemon]\\nstate_dir = \"{tempfile.mkdtemp()}\"\\n')\n"
        "d = Daemon(cfg)\n"
        "reg, expo = d._registry, d._exposition\n"
        "d.poll_once(); expo.render(Format.TEXT)\n"
        "whole, families = [], []\n"
        f"for _ in range({rounds}):\n"
        "    d.poll_once()\n"
        "    s = time.thread_time(); a = generate_latest(reg)\n"
        "    whole.append(time.thread_time() - s)\n"
        "    s = time.thread_time(); b = expo.render(Format.TEXT)\n"
        "    families.append(time.thread_time() - s)\n"
        "    assert a == b\n"
        "print(json.dumps([sorted(whole), sorted(families)]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, check=True, timeout=300
    )
    whole, families = json.loads(proc.stdout)
    return {
        "whole_p50_ms": statistics.median(whole) * 1000,
        "whole_p99_ms": whole[int(len(whole) * 0.99) - 1] * 1000,
        "p50_ms": statistics.median(families) * 1000,
        "p99_ms": families[int(len(families) * 0.99) - 1] * 1000,
    }


def rss_growth(scenario: Path, first: int = 100, last: int = 10_000) -> dict[str, float]:
    """RSS of a started daemon (HTTP server, Xid and alert threads) whose poll loop is driven
    back to back, each poll followed by a render of /metrics, after ``first`` and ``last``
    polls. (The loop itself waits at least [daemon] interval_seconds >= 0.1 s between polls.)"""
    env = dict(os.environ, TFGPUD_FAKE_DRIVER=str(scenario), LD_LIBRARY_PATH=str(FAKEDRIVER))
    code = (
        "import json, tempfile, time\n"
        "from tfgpud.config import parse_config\n"
        "from tfgpud.daemon import Daemon\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "state = tempfile.mkdtemp()\n"
        "cfg = parse_config(\n"
        '    f\'[daemon]\\nstate_dir = "{state}"\\n[http]\\nlisten = "127.0.0.1:0"\\n\'\n'
        ")\n"
        "d = Daemon(cfg, environ={})\n"
        "d.startup()\n"
        f"for _ in range({first} - 1):\n"
        "    d.poll_once(); d._exposition('')\n"
        "r0, t0 = rss(), time.monotonic()\n"
        f"for _ in range({last - first}):\n"
        "    d.poll_once(); d._exposition('')\n"
        "r1, elapsed = rss(), time.monotonic() - t0\n"
        "d.shutdown()\n"
        "print(json.dumps([r0, r1, elapsed]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, check=True, timeout=600
    )
    rss_first, rss_last, elapsed = json.loads(proc.stdout.splitlines()[-1])
    return {
        "polls_first": first,
        "rss_first_mb": rss_first / 2**20,
        "polls_last": last,
        "rss_last_mb": rss_last / 2**20,
        "growth_mb": (rss_last - rss_first) / 2**20,
        "polls_per_second": (last - first) / elapsed,
    }


def run() -> str:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        scenario = tmp / "busy.toml"
        scenario.write_text(busy_scenario())
        lat = ready_and_latency(tmp, scenario)
        cold = uncached_render(scenario)
        rss = rss_growth(scenario)
    return "\n".join(
        [
            "## Daemon (8 GPUs x 16 processes, simulated driver)",
            "",
            f"- exec to READY=1: {lat['ready_seconds'] * 1000:.0f} ms",
            f"- /metrics over {SCRAPES} sequential scrapes ({lat['series']:.0f} series): "
            f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms (target p99 <= 5 ms)",
            f"- the first scrape after a poll (in-process, thread CPU, the same snapshots): "
            f"p50 {cold['p50_ms']:.2f} ms, p99 {cold['p99_ms']:.2f} ms re-encoding only the "
            f"families that changed; p50 {cold['whole_p50_ms']:.2f} ms, p99 "
            f"{cold['whole_p99_ms']:.2f} ms encoding the whole registry",
            f"- RSS, polls back to back (each with a /metrics render): "
            f"{rss['rss_first_mb']:.1f} MB after {rss['polls_first']:.0f} polls, "
            f"{rss['rss_last_mb']:.1f} MB after {rss['polls_last']:.0f} polls; growth "
            f"{rss['growth_mb']:.2f} MB (targets <= 45 MB, growth <= 1 MB); "
            f"{rss['polls_per_second']:.0f} polls/s",
        ]
    )


if __name__ == "__main__":
    print(run())
