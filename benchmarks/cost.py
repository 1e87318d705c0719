"""The daemon's whole cost as a user sees it: every thread of the real `tfgpud run` process.

On the simulated 8-GPU x 16-process scenario, side by side in one run:
- whole-process CPU per poll (all threads, /proc/PID/task/*; ns from schedstat where the kernel
  has it, clock ticks from stat otherwise) at a 1 s interval and at the default 10 s, idle (no
  scrapes in the window, watchdog as the systemd unit sets it);
- gpustat's and nvitop's full query (one child process each, as in benchmarks.nvml_poll);
- voluntary wake-ups per second, per thread, at the default interval;
- the 24 h projection from the whole-process figure at defaults.
Each figure is measured ``RUNS`` times; min/median/max show the machine's noise.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.scenario import FAKEDRIVER, ROOT, busy_scenario

sys.path.insert(0, str(ROOT / "tests"))
from daemon_harness import DaemonProcess, ThreadStat, process_cpu_ticks, thread_stats

RUNS = int(os.environ.get("TFGPUD_BENCH_RUNS", "3"))
# poll interval -> seconds measured
WINDOWS = {
    1.0: float(os.environ.get("TFGPUD_BENCH_W1", "20")),
    10.0: float(os.environ.get("TFGPUD_BENCH_W10", "60")),
}  # poll interval -> seconds measured
DEFAULT_INTERVAL = 10.0
WATCHDOG_USEC = 60_000_000  # packaging/systemd/tfgpud.service: WatchdogSec=60s
TICK = 1.0 / os.sysconf("SC_CLK_TCK")
TARGET_RATIO = 0.3
TARGET_WAKEUPS = 0.3


@dataclass(frozen=True)
class Window:
    interval: float
    seconds: float
    polls: int
    cpu_s: float  # whole process, all threads
    cpu_ticks_s: float  # the same from /proc/PID/stat (clock-tick resolution), as a cross-check
    per_thread: dict[str, tuple[float, float]]  # name -> (CPU s, voluntary wake-ups)

    @property
    def cpu_per_poll_ms(self) -> float:
        return self.cpu_s / max(self.polls, 1) * 1000

    @property
    def ticks_per_poll_ms(self) -> float:
        return self.cpu_ticks_s / max(self.polls, 1) * 1000

    @property
    def wakeups_per_s(self) -> float:
        return sum(w for _, w in self.per_thread.values()) / self.seconds


def _cpu(st: ThreadStat) -> float:
    return st.cpu_ns / 1e9 if st.cpu_ns is not None else st.cpu_ticks * TICK


def _names(pid: int, threads: Iterable[ThreadStat]) -> dict[int, str]:
    """tid -> the thread's name ("main" for the main thread); a name shared by several threads
    gets #2, #3 (by tid)."""
    out: dict[int, str] = {}
    seen: dict[str, int] = defaultdict(int)
    for st in sorted(threads, key=lambda s: s.tid):
        name = "main" if st.tid == pid else st.name
        seen[name] += 1
        out[st.tid] = name if seen[name] == 1 else f"{name}#{seen[name]}"
    return out


def _polls(d: DaemonProcess) -> int:
    return int(d.metrics().get("tfgpud_polls_total", 0))


def measure(tmp: Path, scenario: Path, interval: float, seconds: float) -> Window:
    """One idle window of the real daemon: nothing scrapes it inside the window."""
    with DaemonProcess(tmp, scenario=scenario, interval=interval, watchdog_usec=WATCHDOG_USEC) as d:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        time.sleep(min(interval, 2.0) + 1.0)  # past startup and the first regular poll
        polls_a = _polls(d)
        time.sleep(0.2)  # the scrape's connection thread is gone before the window opens
        a, ticks_a, t_a = thread_stats(pid), process_cpu_ticks(pid), time.monotonic()
        time.sleep(seconds)
        b, ticks_b, t_b = thread_stats(pid), process_cpu_ticks(pid), time.monotonic()
        polls_b = _polls(d)
        d.stop()
    per_thread: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for tid, name in _names(pid, b.values()).items():
        after, before = b[tid], a.get(tid)
        cpu0, vol0 = (_cpu(before), before.voluntary) if before is not None else (0.0, 0)
        acc = per_thread[name]
        acc[0] += _cpu(after) - cpu0
        acc[1] += after.voluntary - vol0
    return Window(
        interval=interval,
        seconds=t_b - t_a,
        polls=polls_b - polls_a,
        cpu_s=sum(c for c, _ in per_thread.values()),
        cpu_ticks_s=(ticks_b - ticks_a) * TICK,
        per_thread={k: (v[0], v[1]) for k, v in per_thread.items()},
    )


def query_cpu(scenario: Path, which: str) -> float:
    """CPU seconds of one full query by ``which`` (benchmarks.nvml_poll's child)."""
    env = dict(os.environ, TFGPUD_FAKE_DRIVER=str(scenario), LD_LIBRARY_PATH=str(FAKEDRIVER))
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.nvml_poll", "--child", which],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return float(out.stdout)


def _mmm(values: Iterable[float], fmt: str = "{:.2f}") -> str:
    v = sorted(values)
    return f"{fmt.format(statistics.median(v))} ({fmt.format(v[0])}-{fmt.format(v[-1])})"


def run() -> str:
    windows: dict[float, list[Window]] = defaultdict(list)
    queries: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        scenario = tmp / "busy.toml"
        scenario.write_text(busy_scenario())
        for i in range(RUNS):  # interleaved, so drift on a shared machine hits all alike
            for which in ("gpustat", "nvitop"):
                queries[which].append(query_cpu(scenario, which))
            for interval, seconds in WINDOWS.items():
                windows[interval].append(
                    measure(tmp / f"d{i}-{interval}", scenario, interval, seconds)
                )
    gpustat = statistics.median(queries["gpustat"]) * 1000
    lines = [
        "## The daemon's whole cost (8 GPUs x 16 processes, simulated driver, all threads)",
        "",
        f"median (min-max) of {RUNS} runs; windows idle (no scrapes), watchdog at 60 s.",
        "",
        "| what | CPU ms per poll | vs gpustat | wake-ups/s (whole process) |",
        "|---|---|---|---|",
        f"| gpustat new_query() | {_mmm(q * 1000 for q in queries['gpustat'])} | 1.00 | |",
        f"| nvitop Device.all() snapshots | {_mmm(q * 1000 for q in queries['nvitop'])} | "
        f"{statistics.median(queries['nvitop']) * 1000 / gpustat:.2f} | |",
    ]
    for interval, ws in windows.items():
        lines.append(
            f"| tfgpud run, interval {interval:g} s ({ws[0].seconds:.0f} s window) | "
            f"{_mmm(w.cpu_per_poll_ms for w in ws)} | "
            f"{_mmm(w.cpu_per_poll_ms / gpustat for w in ws)} | "
            f"{_mmm(w.wakeups_per_s for w in ws)} |"
        )
    default = windows[DEFAULT_INTERVAL]
    ratio = statistics.median(w.cpu_per_poll_ms for w in default) / gpustat
    wake = statistics.median(w.wakeups_per_s for w in default)
    lines += [
        "",
        f"At the default {DEFAULT_INTERVAL:g} s: whole-process CPU per poll / gpustat's query = "
        f"{ratio:.2f} (target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'}); "
        f"{wake:.2f} wake-ups/s (target <= {TARGET_WAKEUPS}: "
        f"{'met' if wake <= TARGET_WAKEUPS else 'NOT met'}).",
        "Cross-check from /proc/PID/stat (10 ms ticks, exited threads included): "
        + ", ".join(
            f"{iv:g} s: {statistics.median(w.ticks_per_poll_ms for w in ws):.1f} ms"
            for iv, ws in windows.items()
        )
        + " per poll.",
        "",
        f"Per thread at the default {DEFAULT_INTERVAL:g} s interval (median of {RUNS} runs):",
        "",
        "| thread | wake-ups/s | CPU ms/s |",
        "|---|---|---|",
    ]
    names = sorted({n for w in default for n in w.per_thread})
    for name in names:
        wk = [w.per_thread.get(name, (0.0, 0.0))[1] / w.seconds for w in default]
        cpu = [w.per_thread.get(name, (0.0, 0.0))[0] / w.seconds * 1000 for w in default]
        lines.append(f"| {name} | {_mmm(wk)} | {_mmm(cpu, '{:.3f}')} |")
    per_s = statistics.median(w.cpu_s / w.seconds for w in default)
    day = per_s * 86400
    lines += [
        "",
        f"24 h at defaults (whole process, idle, {DEFAULT_INTERVAL:g} s polls): "
        f"{per_s * 1000:.3f} CPU-ms/s x 86,400 s = {day:.1f} CPU-s/day = "
        f"{per_s * 100:.4f} % of one core; {wake * 86400:,.0f} wake-ups/day "
        "(TensorFlow probes come on top: see the probe section).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
