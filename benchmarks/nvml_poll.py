"""CPU time of one full NVML poll: tfgpud vs gpustat's new_query() vs nvitop's snapshots.

Each poller runs in its own child process (gpustat patches pynvml's functions on import, so
they cannot share one) with the simulated driver on LD_LIBRARY_PATH, on the same 8-GPU x
16-process scenario; the children alternate round by round so drift hits them equally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.scenario import FAKEDRIVER, busy_scenario

ROUNDS = 5
PER_ROUND = 20


def _measure(fn: Callable[[], object]) -> float:
    start = time.process_time()
    for _ in range(PER_ROUND):
        fn()
    return (time.process_time() - start) / PER_ROUND


CONTENDERS = {
    "tfgpud": "tfgpud NvmlSession.poll()",
    "gpustat": "gpustat new_query()",
    "nvitop": "nvitop Device.all() snapshots",
}


def _poller(which: str) -> Callable[[], object]:
    if which == "tfgpud":
        from tfgpud.collectors.nvml import NvmlSession

        session = NvmlSession()
        reading = session.poll()
        assert reading.up and len(reading.gpus) == 8, reading
        return session.poll
    if which == "gpustat":
        import gpustat

        return gpustat.new_query
    from nvitop import Device

    return lambda: [d.as_snapshot() for d in Device.all()]


def child(which: str) -> float:
    fn = _poller(which)
    fn()  # warm: symbol lookups, lazy imports
    return _measure(fn)


def run() -> dict[str, float]:
    totals = dict.fromkeys(CONTENDERS, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        scenario = Path(tmp) / "busy.toml"
        scenario.write_text(busy_scenario())
        env = dict(os.environ)
        env.update(TFGPUD_FAKE_DRIVER=str(scenario), LD_LIBRARY_PATH=str(FAKEDRIVER))
        for _ in range(ROUNDS):
            for which in CONTENDERS:
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.nvml_poll", "--child", which],
                    env=env,
                    check=True,
                    capture_output=True,
                    timeout=300,
                )
                totals[which] += float(out.stdout)
    return {CONTENDERS[w]: total / ROUNDS for w, total in totals.items()}


def report(result: dict[str, float]) -> str:
    ours = result["tfgpud NvmlSession.poll()"]
    lines = ["## NVML poll CPU time (8 GPUs x 16 processes, simulated driver)", ""]
    lines.append("| poller | CPU ms per poll | vs tfgpud |")
    lines.append("|---|---|---|")
    for name, sec in result.items():
        lines.append(f"| {name} | {sec * 1000:.2f} | {sec / ours:.1f}x |")
    ratio = ours / result["gpustat new_query()"]
    verdict = "met" if ratio <= 0.5 else "NOT met"
    lines.append("")
    lines.append(f"tfgpud / gpustat = {ratio:.2f} (target <= 0.5: {verdict})")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(child(sys.argv[sys.argv.index("--child") + 1])))
    else:
        print(report(run()))
