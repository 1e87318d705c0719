"""``tfgpud doctor``: run every collector once, diagnose, and explain it to a person (or JSON).

Exit status: 0 healthy (info findings only), 1 warnings, 2 critical.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from tfgpud.collectors.base import timed
from tfgpud.collectors.discovery import EnvSource, ProbeTarget, discover_envs, merge_envs
from tfgpud.collectors.tensorflow import probe_env
from tfgpud.collectors.tensorflow.discovered import (
    DiscoverFn,
    EnvDiscovery,
    env_record,
    probe_target,
)
from tfgpud.collectors.workloads import WorkloadScanner
from tfgpud.config import Config, TfEnvConfig
from tfgpud.diagnosis import diagnose, worst_severity
from tfgpud.model import (
    CollectorRun,
    Finding,
    NvmlReading,
    PciReading,
    Snapshot,
    TfProbeResult,
    WorkloadsReading,
    to_jsonable,
)
from tfgpud.poll import Expected, PressureTracker, Readings, build_snapshot
from tfgpud.state import BASELINE_FILE, Baseline, StateFileError
from tfgpud.views import render_report

PciReader = Callable[[Path, Path, Path], PciReading]
NvmlReader = Callable[[str | None], NvmlReading]
EnvProber = Callable[[TfEnvConfig, float], TfProbeResult]


def _read_pci(sys_root: Path, proc_root: Path, dev_root: Path) -> PciReading:
    from tfgpud.collectors.pci import collect_pci

    return collect_pci(sys_root, proc_root, dev_root)


def _read_nvml(library: str | None) -> NvmlReading:
    from tfgpud.collectors.nvml import read_nvml

    return read_nvml(library)


def _probe(env: TfEnvConfig, timeout: float) -> TfProbeResult:
    return probe_env(env, timeout=timeout)


def exit_code(findings: Sequence[Finding]) -> int:
    """0 when nothing worse than info, 1 for warnings, 2 for anything critical."""
    worst = worst_severity(findings)
    return worst.rank if worst is not None else 0


def collect_snapshot(
    config: Config,
    *,
    python: str | None = None,
    sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
    dev_root: Path = Path("/dev"),
    read_pci: PciReader = _read_pci,
    read_nvml: NvmlReader = _read_nvml,
    probe: EnvProber = _probe,
    discover: DiscoverFn = discover_envs,
    now: Callable[[], float] = time.time,
) -> Snapshot:
    """Run pci, nvml, discovery, one probe per env (only ``python``, as env "cli", when given:
    then nothing is discovered) and the workloads scan once, and build the snapshot as the
    daemon's poll does. Discovered envs are probed as the daemon probes them."""
    runs: list[CollectorRun] = []
    pci, run = timed("pci", lambda: read_pci(sys_root, proc_root, dev_root))
    runs.append(run)
    nvml, run = timed("nvml", lambda: read_nvml(config.nvml.library))
    runs.append(run)
    discovery = None
    if python is not None:
        targets: tuple[ProbeTarget, ...] = (
            ProbeTarget(TfEnvConfig(name="cli", python=python), EnvSource.CONFIGURED),
        )
    else:
        found = EnvDiscovery(config.tensorflow.discover, discover=discover).run_once()
        if found.run is not None:
            runs.append(found.run)
        discovery = found.summary
        targets = merge_envs(config.tensorflow.envs, found.envs)
    results: list[TfProbeResult] = []
    timeout = config.tensorflow.timeout_seconds
    for target in targets:

        def probe_one(t: ProbeTarget = target) -> TfProbeResult:
            return probe_target(t, lambda env: probe(env, timeout))

        result, run = timed(f"tensorflow:{target.config.name}", probe_one)
        runs.append(run)
        if result is not None:
            results.append(result)
    taken_at = now()
    workloads = None
    if config.workloads.enabled:
        names = config.workloads.process_names

        def scan() -> WorkloadsReading:
            return WorkloadScanner(proc_root).scan(nvml, taken_at, names)

        workloads, run = timed("workloads", scan)
        runs.append(run)
    readings = Readings(
        taken_at=taken_at,
        pci=pci,
        nvml=nvml,
        tf=tuple(results),
        collectors=tuple(runs),
        workloads=workloads,
        tf_envs=tuple(env_record(t) for t in targets),
        discovery=discovery,
    )
    ratio = config.memory.pressure_ratio
    return build_snapshot(readings, _read_baseline(config), PressureTracker(), ratio)


def _read_baseline(config: Config) -> Expected:
    """The daemon's persisted baseline, read-only (doctor never writes state)."""
    expect = config.expect.gpus
    fixed = expect if isinstance(expect, int) else None
    path = Path(config.daemon.state_dir) / BASELINE_FILE
    if path.exists() and not os.access(path, os.R_OK):
        return Expected(count=fixed)  # e.g. a user running doctor: the daemon's state is not theirs
    try:
        b = Baseline.read(config.daemon.state_dir, expect)
    except StateFileError as exc:
        return Expected(count=fixed, problems=(str(exc),))
    if not b.gpus and fixed is None:
        return Expected()
    return Expected(b.gpus, b.expected)


def run_doctor(
    config: Config,
    *,
    python: str | None,
    as_json: bool,
    out: TextIO,
    sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
    dev_root: Path = Path("/dev"),
    read_pci: PciReader = _read_pci,
    read_nvml: NvmlReader = _read_nvml,
    probe: EnvProber = _probe,
    discover: DiscoverFn = discover_envs,
    now: Callable[[], float] = time.time,
    colour: bool = False,
) -> int:
    """Diagnose the machine now, write the report to ``out``, return the exit status (0/1/2).

    With ``python`` only that interpreter is probed (env name "cli"): configured envs are
    ignored and nothing is discovered. Otherwise the configured envs and the discovered ones.
    Never raises for what it finds; collectors that break are reported as such.
    """
    snap = collect_snapshot(
        config,
        python=python,
        sys_root=sys_root,
        proc_root=proc_root,
        dev_root=dev_root,
        read_pci=read_pci,
        read_nvml=read_nvml,
        probe=probe,
        discover=discover,
        now=now,
    )
    findings = diagnose(snap, config)
    code = exit_code(findings)
    if as_json:
        doc = {
            "exit_code": code,
            "host": socket.gethostname(),
            "snapshot": to_jsonable(snap),
            "findings": to_jsonable(findings),
        }
        out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        out.write(render_report(snap, findings, code, socket.gethostname(), colour=colour))
    return code
