"""`make bench`: every benchmark, one after another in one run, each as its own module.

Each module is run as `python -m benchmarks.NAME` so one benchmark's imports (gpustat patches
pynvml; TensorFlow is heavy) cannot skew another. The combined report is printed and written to
build/bench/results.md.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = (
    "nvml_poll",
    "cost",
    "poll_phases",
    "daemon",
    "http_abuse",
    "workloads",
    "discovery",
    "tf_probe",
)


def main() -> int:
    sections = [f"# tfgpud benchmarks — {time.strftime('%Y-%m-%d %H:%M %Z')}", ""]
    failed = []
    for name in MODULES:
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            continue
        print(f"running benchmarks.{name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{name}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if proc.returncode != 0:
            failed.append(name)
            sections += [f"## {name}: FAILED (exit {proc.returncode})", "", proc.stderr[-2000:]]
        else:
            sections += [proc.stdout.strip(), ""]
    report = "\n".join(sections)
    print(report)
    out = ROOT / "build" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
