"""An idle daemon costs nothing between polls: each of its threads blocks.

Counted, not timed: the voluntary context switches of each thread of the real `tfgpud run`
process (one per block-and-wake) over a few seconds in which no poll falls due, no watchdog
ping is due and nothing scrapes it. A thread that waits in slices or polls a flag shows up
with its name and count.
"""

from __future__ import annotations

import time
from pathlib import Path

from daemon_harness import DaemonProcess, ThreadStat, thread_stats
from helpers import write_scenario

WINDOW = 3.0  # seconds counted
BOUND = 3  # wake-ups a blocked thread may show in the window (a stray signal, a late GC)
U = [f"GPU-eeeeeeee-0000-4000-8000-00000000000{i}" for i in range(2)]


def label(pid: int, st: ThreadStat) -> str:
    return f"{'main' if st.tid == pid else st.name}[{st.tid}]"


def test_each_thread_of_the_idle_daemon_blocks(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    write_scenario(scenario_path, [{"uuid": u} for u in U])
    # The watchdog as the unit sets it (WatchdogSec=60s); the next poll a minute away.
    with DaemonProcess(
        tmp_path, scenario=scenario_path, interval=60, watchdog_usec=60_000_000
    ) as d:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        d.wait_metric(lambda m: m.get("tfgpud_nvml_gpus") == 2)
        time.sleep(0.5)  # past the scrape
        before = thread_stats(pid)
        time.sleep(WINDOW)
        after = thread_stats(pid)
        assert d.stop() == 0
    woke = {
        label(pid, st): st.voluntary - (before[tid].voluntary if tid in before else 0)
        for tid, st in after.items()
    }
    over = {name: n for name, n in woke.items() if n > BOUND}
    assert not over, f"threads waking while idle ({WINDOW:g} s): {over}; all: {woke}"
    names = {st.name for st in after.values()}
    assert {"tfgpud-xid", "tfgpud-http"} <= names, f"threads not named: {woke}"
