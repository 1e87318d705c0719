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
from tfgpud.collectors.tensorflow import probe_env
from tfgpud.config import Config, TfEnvConfig
from tfgpud.diagnosis import diagnose, worst_severity
from tfgpud.model import (
    CollectorRun,
    Finding,
    KnownGpu,
    NvmlReading,
    PciReading,
    Snapshot,
    TfProbeResult,
    to_jsonable,
)
from tfgpud.state import BASELINE_FILE, Baseline, StateFileError

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
    now: Callable[[], float] = time.time,
) -> Snapshot:
    """Run pci, nvml and one probe per env (only ``python``, as env "cli", when given)."""
    runs: list[CollectorRun] = []
    pci, run = timed("pci", lambda: read_pci(sys_root, proc_root, dev_root))
    runs.append(run)
    nvml, run = timed("nvml", lambda: read_nvml(config.nvml.library))
    runs.append(run)
    envs = (
        [TfEnvConfig(name="cli", python=python)] if python is not None else config.tensorflow.envs
    )
    results: list[TfProbeResult] = []
    timeout = config.tensorflow.timeout_seconds
    for env in envs:

        def probe_one(e: TfEnvConfig = env) -> TfProbeResult:
            return probe(e, timeout)

        result, run = timed(f"tensorflow:{env.name}", probe_one)
        runs.append(run)
        if result is not None:
            results.append(result)
    baseline, expected, problems = _read_baseline(config)
    return Snapshot(
        taken_at=now(),
        pci=pci,
        nvml=nvml,
        tf=tuple(results),
        collectors=tuple(runs),
        baseline=baseline,
        expected_gpus=expected,
        baseline_problems=problems,
    )


def _read_baseline(config: Config) -> tuple[tuple[KnownGpu, ...], int | None, tuple[str, ...]]:
    """The daemon's persisted baseline, read-only (doctor never writes state)."""
    expect = config.expect.gpus
    fixed = expect if isinstance(expect, int) else None
    path = Path(config.daemon.state_dir) / BASELINE_FILE
    if path.exists() and not os.access(path, os.R_OK):
        return (), fixed, ()  # e.g. a user running doctor: the daemon's state is not theirs
    try:
        b = Baseline.read(config.daemon.state_dir, expect)
    except StateFileError as exc:
        return (), fixed, (str(exc),)
    if not b.gpus and fixed is None:
        return (), None, ()
    return b.gpus, b.expected, ()


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
    now: Callable[[], float] = time.time,
) -> int:
    """Diagnose the machine now, write the report to ``out``, return the exit status (0/1/2).

    With ``python`` only that interpreter is probed (env name "cli"), config envs are ignored.
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
        out.write(render_report(snap, findings, code))
    return code


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024**3:.1f} GiB"


def render_report(snap: Snapshot, findings: Sequence[Finding], code: int) -> str:
    """The report a person reads top to bottom: hardware, driver, each env, findings."""
    lines: list[str] = [
        f"tfgpud doctor on {socket.gethostname()} at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(snap.taken_at))}",
        "",
        "Hardware (PCI bus)",
    ]
    pci = snap.pci
    if pci is None:
        lines.append("  not read (collector failed)")
    else:
        lines.append(f"  {len(pci.gpus)} NVIDIA GPU(s)")
        lines += [
            f"  {g.address}  device {g.device_id}  driver {g.driver or '-'}" for g in pci.gpus
        ]
        lines.append(f"  nvidia module: {pci.nvidia_module_version or 'not loaded'}")
        if pci.nouveau_loaded:
            lines.append("  nouveau module: loaded")
        lines.append(f"  /dev nodes: {' '.join(pci.device_nodes) or 'none'}")
    lines += ["", "Driver (NVML)"]
    nvml = snap.nvml
    if nvml is None:
        lines.append("  not read (collector failed)")
    elif not nvml.up:
        lines.append(f"  not available: {nvml.error}")
    else:
        lines.append(
            f"  driver {nvml.driver_version}, supports CUDA {nvml.cuda_driver_version_str or '?'}"
            f" ({nvml.library_path or 'libnvidia-ml.so.1'})"
        )
        for g in nvml.gpus:
            state = "LOST" if g.lost else f"mem {_gib(g.memory_used_bytes)}/"
            state += "" if g.lost else _gib(g.memory_total_bytes)
            lines.append(
                f"  GPU {g.index}  {g.name or '?'}  {g.uuid}  cc {g.compute_capability_str or '?'}"
                f"  {g.pci_bus_id or '?'}  {state}"
            )
    for r in snap.tf:
        lines += ["", f"TensorFlow env `{r.env}` ({r.python})"]
        if not r.ok:
            lines.append(f"  probe {r.status.value} after {r.duration_seconds:.1f} s: {r.error}")
            continue
        b = r.build_info
        build = (
            f"CUDA {b.get('cuda_version')}, cuDNN {b.get('cudnn_version')}"
            if b.get("cuda_version")
            else "CPU-only build"
        )
        lines.append(
            f"  TensorFlow {r.tf_version} ({build}), Python {r.python_version or '?'}; "
            f"probe {r.duration_seconds:.1f} s"
        )
        lines.append(f"  GPUs TensorFlow sees: {len(r.gpus)}")
        lines += [f"    {g.name}  {g.device_name or ''}" for g in r.gpus]
        for lib in r.libraries:
            where = lib.path if lib.loaded else f"MISSING ({lib.error})"
            lines.append(f"  {lib.soname:<20} {where}")
        for k, v in sorted(r.environment.items()):
            lines.append(f"  {k}={v}")
        if r.smoke_ok is not None:
            lines.append(f"  smoke test: {'ok' if r.smoke_ok else r.smoke_error}")
    lines += ["", f"Findings ({len(findings)})"]
    if not findings:
        lines.append("  none: TensorFlow can use every GPU this machine has")
    for f in findings:
        lines += ["", f"  [{f.severity.value.upper()}] {f.code}  ({f.subject})", f"  {f.summary}"]
        lines += [f"    - {e}" for e in f.evidence]
        if f.fix:
            lines.append(f"  Fix: {f.fix}")
    verdict = {0: "healthy", 1: "warnings", 2: "critical"}[code]
    lines += ["", f"Result: {verdict} (exit {code})", ""]
    return "\n".join(lines)
