"""Where one poll spends its time: thread CPU per phase of an in-process ``Daemon.poll_once()``.

On the simulated 8-GPU x 16-process scenario. Each collector (and the diagnosis, and the alert
bookkeeping) is wrapped to add the thread CPU it used to its phase; "the rest" is the whole
poll less those phases (the snapshot, the baseline, readings put together). "warm": polls back
to back; "cold": ``COLD_GAP`` seconds asleep before each poll (by default the daemon's 10 s
interval: what its polls cost; compare benchmarks.cost's whole-process figures).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from benchmarks.scenario import FAKEDRIVER, busy_scenario

WARM_POLLS = 300
COLD_POLLS = int(os.environ.get("TFGPUD_BENCH_COLD_POLLS", "9"))
COLD_GAP = float(os.environ.get("TFGPUD_BENCH_COLD_GAP", "10"))
PHASES = ("nvml", "workloads", "pci", "diagnose", "alerts")


def _child() -> None:  # runs in a fresh process with the simulated driver loaded
    import json

    import tfgpud.daemon as daemon_module
    from tfgpud.config import parse_config
    from tfgpud.daemon import Daemon

    spent: dict[str, int] = defaultdict(int)

    def timed(phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.thread_time_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[phase] += time.thread_time_ns() - t

        return wrapper

    state = tempfile.mkdtemp()
    d = Daemon(parse_config(f'[daemon]\nstate_dir = "{state}"\n'))
    d._nvml.poll = timed("nvml", d._nvml.poll)
    d._workloads.scan = timed("workloads", d._workloads.scan)
    d._alerts.process = timed("alerts", d._alerts.process)
    daemon_module.collect_pci = timed("pci", daemon_module.collect_pci)
    daemon_module.diagnose = timed("diagnose", daemon_module.diagnose)
    for _ in range(20):
        d.poll_once()

    def polls(n: int, gap: float) -> dict[str, list[float]]:
        out: dict[str, list[float]] = defaultdict(list)
        for _ in range(n):
            if gap:
                time.sleep(gap)
            spent.clear()
            t = time.thread_time_ns()
            d.poll_once()
            whole = time.thread_time_ns() - t
            for phase in PHASES:
                out[phase].append(spent[phase] / 1e6)
            out["rest"].append((whole - sum(spent.values())) / 1e6)
            out["whole"].append(whole / 1e6)
        return out

    warm = polls(WARM_POLLS, 0.0)
    cold = polls(COLD_POLLS, COLD_GAP)
    med = statistics.median
    print(json.dumps({k: [med(warm[k]), med(cold[k])] for k in warm}))


LABELS = {
    "nvml": "nvml (8 GPUs, 128 processes)",
    "workloads": "workloads (/proc: {procs} processes)",
    "pci": "pci (sysfs)",
    "diagnose": "diagnose",
    "alerts": "alerts (transitions, no sinks)",
    "rest": "the rest (snapshot, baseline, readings)",
    "whole": "whole poll",
}


def main() -> None:
    import json

    with tempfile.TemporaryDirectory() as t:
        scenario = os.path.join(t, "busy.toml")
        with open(scenario, "w") as f:
            f.write(busy_scenario())
        env = dict(os.environ, TFGPUD_FAKE_DRIVER=scenario, LD_LIBRARY_PATH=str(FAKEDRIVER))
        proc = subprocess.run(
            [sys.executable, "-c", "from benchmarks.poll_phases import _child; _child()"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    procs = sum(1 for n in os.listdir("/proc") if n.isdigit())
    print("## Where a poll spends its time (in-process `Daemon.poll_once()`)")
    print()
    print(
        f"Thread CPU per phase in ms, median of {WARM_POLLS} warm polls (back to back) and of "
        f"{COLD_POLLS} cold ones ({COLD_GAP:.0f} s asleep before each)."
    )
    print()
    print("| phase | warm | cold |")
    print("|---|---|---|")
    for key, label in LABELS.items():
        warm, cold = result[key]
        name = label.format(procs=procs)
        if key == "whole":
            print(f"| **{name}** | **{warm:.2f}** | **{cold:.2f}** |")
        else:
            print(f"| {name} | {warm:.2f} | {cold:.2f} |")


if __name__ == "__main__":
    main()
