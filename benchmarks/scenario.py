"""Scenario files for benchmarks (the simulated driver's TOML)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKEDRIVER = ROOT / "build" / "fakedriver"


def busy_scenario(gpus: int = 8, procs_per_gpu: int = 16) -> str:
    """A busy host: ``gpus`` H100s each running ``procs_per_gpu`` processes."""
    lines = ['driver_version = "550.54.15"', "cuda_driver_version = 12040", ""]
    for i in range(gpus):
        pids = [10_000 + i * 100 + j for j in range(procs_per_gpu)]
        mem = [(j + 1) * 2**28 for j in range(procs_per_gpu)]
        lines += [
            "[[gpu]]",
            'name = "NVIDIA H100 80GB HBM3"',
            f'uuid = "GPU-b0000000-0000-4000-8000-{i:012d}"',
            f'pci_bus_id = "00000000:{0x10 + i:02X}:00.0"',
            "memory_total = 85899345920",
            f"memory_used = {sum(mem)}",
            f"utilization_gpu = {10 * i}",
            f"temperature = {40 + i}",
            f"power_mw = {100_000 + i * 1000}",
            "cc_major = 9",
            "cc_minor = 0",
            f"process_pids = [{', '.join(map(str, pids))}]",
            f"process_memory = [{', '.join(map(str, mem))}]",
            "",
        ]
    return "\n".join(lines)
