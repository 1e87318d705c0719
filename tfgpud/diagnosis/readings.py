"""What the snapshot says, shared by the rules: which GPUs exist and answer, labels, and
the one constructor of a :class:`Finding`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable

from tfgpud.config import Config
from tfgpud.model import (
    Finding,
    GpuReading,
    Severity,
    Snapshot,
)

HOST = "host"
CRIT, WARN, INFO = Severity.CRITICAL, Severity.WARNING, Severity.INFO


Rule = Callable[[Snapshot, Config], Iterable[Finding]]


def nvml_gpus(s: Snapshot) -> tuple[GpuReading, ...]:
    return s.nvml.gpus if s.nvml is not None and s.nvml.up else ()


def usable_gpus(s: Snapshot) -> tuple[GpuReading, ...]:
    return tuple(g for g in nvml_gpus(s) if not g.lost and g.error is None)


def gpu_count_expected(s: Snapshot) -> int:
    """How many NVIDIA GPUs this machine has, by the best source available.

    NVML's healthy GPUs when NVML is up; otherwise the largest of PCI, baseline and
    ``expected_gpus`` (so a dead driver does not make the GPUs "not exist").
    """
    if s.nvml is not None and s.nvml.up and s.nvml.gpus:
        return len(usable_gpus(s))
    pci = len(s.pci.gpus) if s.pci is not None else 0
    return max(pci, len(s.baseline), s.expected_gpus or 0)


def gpus_exist(s: Snapshot) -> bool:
    """True when any source says there are NVIDIA GPUs: PCI, NVML, the baseline, [expect]."""
    pci = bool(s.pci.gpus) if s.pci is not None else False
    return pci or bool(nvml_gpus(s)) or bool(s.baseline) or (s.expected_gpus or 0) > 0


def pci_lines(s: Snapshot) -> list[str]:
    if s.pci is None:
        return ["PCI bus: not read"]
    if not s.pci.gpus:
        return ["PCI bus: no NVIDIA display/3D controller (vendor 0x10de)"]
    return [
        f"PCI {g.address}: NVIDIA device {g.device_id}, kernel driver {g.driver or 'none bound'}"
        for g in s.pci.gpus
    ]


def gpu_label(g: GpuReading) -> str:
    parts = [g.name or "GPU", g.uuid]
    if g.pci_bus_id:
        parts.append(g.pci_bus_id)
    return f"GPU {g.index} " + " ".join(parts)


def finding(
    code: str, sev: Severity, subject: str, summary: str, evidence: Iterable[str], fix: str
) -> Finding:
    return Finding(code, sev, subject, summary, tuple(e for e in evidence if e), fix)


def lib_version(path: str | None, stem: str) -> str | None:
    """ "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.54.14" -> "550.54.14"."""
    if not path:
        return None
    m = re.fullmatch(rf"{re.escape(stem)}\.so\.(\d+\.\d+(?:\.\d+)?)", os.path.basename(path))
    return m.group(1) if m else None


def norm_bus(addr: str) -> str:
    """NVML's "00000000:01:00.0" and sysfs's "0000:01:00.0" -> "01:00.0"."""
    return addr.lower().split(":", 1)[-1] if addr.count(":") >= 2 else addr.lower()


def cvd_entries(value: str) -> list[str]:
    return [v.strip() for v in value.split(",")] if value.strip() else []


def cvd_visible(value: str, s: Snapshot) -> int:
    """How many GPUs CUDA_VISIBLE_DEVICES=value leaves visible (CUDA stops at the first bad one).

    A ``MIG-`` entry names a MIG instance, whose UUID NVML's GPU list does not carry: it is
    taken as visible (tfgpud does not enumerate MIG instances), never as hiding the GPUs.
    """
    n = gpu_count_expected(s)
    uuids = [g.uuid for g in nvml_gpus(s)]
    count = 0
    for entry in cvd_entries(value):
        index_ok = entry.isdigit() and (int(entry) < n or not uuids)
        uuid_ok = entry.startswith("GPU-") and (
            not uuids or any(u.startswith(entry) for u in uuids)
        )
        mig_ok = entry.startswith("MIG-")
        if index_ok or uuid_ok or mig_ok:
            count += 1
        else:
            break
    return count
