"""Cost of the TensorFlow probe, and of tfgpud's probe cadence vs probing every poll.

Run: ``python -m benchmarks.tf_probe [--python PATH] [--probes N] [--checks N]``.

Measures one real probe (CPU seconds and peak RSS of the child, from wait4) and the per-poll
cost of the scheduler's change detection (``maybe_start`` when nothing is due: an NVML
fingerprint compare plus a stat of the env's package dirs), then models 24 h at the defaults
([daemon] interval_seconds = 10, [tensorflow] interval_seconds = 6 h).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

from tfgpud.collectors.tensorflow import TfProbeScheduler, probe_env
from tfgpud.config import Config, TfEnvConfig
from tfgpud.model import GpuReading, NvmlReading, ProbeStatus, TfProbeResult

DAY = 86400.0


def measure_probe(python: str, n: int) -> tuple[TfProbeResult, list[float], list[int]]:
    cpu: list[float] = []
    rss: list[int] = []
    result: TfProbeResult | None = None
    for _ in range(n):
        result = probe_env(TfEnvConfig(name="bench", python=python), timeout=300)
        if result.status is not ProbeStatus.OK:
            sys.exit(f"probe failed: {result.status.value}: {result.error}")
        cpu.append(result.cpu_seconds or 0.0)
        rss.append(result.max_rss_bytes or 0)
    assert result is not None
    return result, cpu, rss


def measure_check(package_dirs: tuple[str, ...], python: str, checks: int) -> float:
    """CPU seconds of one maybe_start() that finds nothing due (the daemon's per-poll cost)."""

    def instant(env: TfEnvConfig, *, timeout: float, cancel: threading.Event) -> TfProbeResult:
        return TfProbeResult(
            env=env.name,
            python=env.python,
            status=ProbeStatus.OK,
            started_at=0.0,
            duration_seconds=0.0,
            package_dirs=package_dirs,
        )

    nvml = NvmlReading(
        up=True,
        driver_version="550.54.14",
        gpus=tuple(GpuReading(i, f"GPU-{i:08d}") for i in range(8)),
    )
    config = Config().tensorflow
    sched = TfProbeScheduler(
        [TfEnvConfig(name="bench", python=python)],
        interval=config.interval_seconds,
        timeout=config.timeout_seconds,
        probe=instant,
    )
    sched.maybe_start(nvml, 0.0)
    sched.wait_idle(5)
    start = time.process_time()
    for i in range(checks):
        if sched.maybe_start(nvml, 1.0 + i * 1e-6):
            sys.exit("benchmark bug: a probe became due")
    per_check = (time.process_time() - start) / checks
    sched.close()
    return per_check


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--python", default=str(Path(sys.prefix) / "bin" / "python"))
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--checks", type=int, default=20000)
    ap.add_argument("--changes-per-day", type=float, default=2.0)
    args = ap.parse_args(argv)

    result, cpu, rss = measure_probe(args.python, args.probes)
    probe_cpu = statistics.median(cpu)
    per_check = measure_check(result.package_dirs, args.python, args.checks)
    defaults = Config()
    poll = defaults.daemon.interval_seconds or 10.0
    polls = DAY / poll
    probes_day = DAY / defaults.tensorflow.interval_seconds + args.changes_per_day
    cadence_cpu = probes_day * probe_cpu + polls * per_check
    naive_cpu = polls * probe_cpu

    print(f"TensorFlow {result.tf_version} probe via {args.python} ({args.probes} runs)")
    print(
        f"  CPU seconds per probe: median {probe_cpu:.2f} (min {min(cpu):.2f}, max {max(cpu):.2f})"
    )
    print(f"  peak RSS of the probe: {max(rss) / 1e6:.0f} MB")
    print(
        f"  change check per poll: {per_check * 1e6:.1f} µs CPU ({len(result.package_dirs)} dirs)"
    )
    print()
    print(f"24 h at {poll:g} s polls ({polls:.0f} polls), one env:")
    print(f"  {'strategy':<44} {'probes/day':>10} {'CPU s/day':>10} {'% of a core':>12}")
    rows = [
        (
            f"tfgpud: every 6 h + on change ({args.changes_per_day:g}/day)",
            probes_day,
            cadence_cpu,
        ),
        ("naive: probe every poll", polls, naive_cpu),
    ]
    for name, n, cpu_s in rows:
        print(f"  {name:<44} {n:>10.0f} {cpu_s:>10.1f} {100 * cpu_s / DAY:>11.4f}%")
    print(f"  ratio naive / tfgpud: {naive_cpu / cadence_cpu:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
