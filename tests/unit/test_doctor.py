"""run_doctor with injected readings: report order, JSON, exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tfgpud.config import Config, TfEnvConfig, parse_config
from tfgpud.doctor import run_doctor
from tfgpud.model import (
    GpuReading,
    LibraryCheck,
    NvmlReading,
    PciGpu,
    PciReading,
    ProbeStatus,
    TfProbeResult,
    frozen_map,
)

PCI = PciReading(
    gpus=(PciGpu("0000:01:00.0", "0x2330", "0x030200", "nvidia"),),
    nvidia_module_version="550.54.14",
    device_nodes=("nvidia0", "nvidiactl"),
)
NVML = NvmlReading(
    up=True,
    driver_version="550.54.14",
    cuda_driver_version=12040,
    gpus=(GpuReading(0, "GPU-a", "NVIDIA H100", compute_capability=(8, 0)),),
)


def fake_pci(sys_root: Path, proc_root: Path, dev_root: Path) -> PciReading:
    return PCI


def fake_nvml(library: str | None) -> NvmlReading:
    return NVML


def probe_without_cuda_libs(env: TfEnvConfig, timeout: float) -> TfProbeResult:
    return TfProbeResult(
        env=env.name,
        python=env.python,
        status=ProbeStatus.OK,
        started_at=0.0,
        duration_seconds=3.0,
        tf_version="2.21.0",
        build_info=frozen_map({"is_cuda_build": "True", "cuda_version": "12.5.1"}),
        libraries=(LibraryCheck("cudart", "libcudart.so.12", False, None, "not found"),),
    )


def test_cli_python_is_probed_as_env_cli_and_report_reads_top_down() -> None:
    out = io.StringIO()
    probed: list[str] = []

    def probe(env: TfEnvConfig, timeout: float) -> TfProbeResult:
        probed.append(f"{env.name}={env.python}")
        return probe_without_cuda_libs(env, timeout)

    cfg = parse_config('[[tensorflow.envs]]\nname = "ignored"\npython = "/x"\n')
    code = run_doctor(
        cfg,
        python="/opt/v/bin/python",
        as_json=False,
        out=out,
        read_pci=fake_pci,
        read_nvml=fake_nvml,
        probe=probe,
    )
    assert code == 2 and probed == ["cli=/opt/v/bin/python"]
    text = out.getvalue()
    order = [
        "Hardware (PCI bus)",
        "Driver (NVML)",
        "TensorFlow env `cli`",
        "[CRITICAL] tf-cpu-fallback",
        "[CRITICAL] tf-cuda-libs-missing",
        "Fix: /opt/v/bin/python -m pip install 'tensorflow[and-cuda]==2.21.0'",
        "Result: critical (exit 2)",
    ]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)


def test_json_output_and_healthy_exit() -> None:
    out = io.StringIO()

    def healthy(env: TfEnvConfig, timeout: float) -> TfProbeResult:
        from tfgpud.model import TfGpu

        return TfProbeResult(
            env=env.name,
            python=env.python,
            status=ProbeStatus.OK,
            started_at=0.0,
            duration_seconds=3.0,
            tf_version="2.21.0",
            build_info=frozen_map({"is_cuda_build": "True", "cuda_version": "12.5.1"}),
            gpus=(TfGpu("/physical_device:GPU:0"),),
        )

    cfg = parse_config('[[tensorflow.envs]]\nname = "main"\npython = "/opt/main/bin/python"\n')
    code = run_doctor(
        cfg,
        python=None,
        as_json=True,
        out=out,
        read_pci=fake_pci,
        read_nvml=fake_nvml,
        probe=healthy,
    )
    doc = json.loads(out.getvalue())
    assert code == 0 and doc["exit_code"] == 0 and doc["findings"] == []
    assert doc["snapshot"]["tf"][0]["env"] == "main"
    assert doc["snapshot"]["nvml"]["gpus"][0]["uuid"] == "GPU-a"


def test_broken_collector_is_reported_not_raised() -> None:
    def broken(library: str | None) -> NvmlReading:
        raise RuntimeError("nvml exploded")

    out = io.StringIO()
    code = run_doctor(
        Config(),
        python=None,
        as_json=False,
        out=out,
        read_pci=fake_pci,
        read_nvml=broken,
        probe=probe_without_cuda_libs,
    )
    assert "Driver (NVML)\n  not read (collector failed)" in out.getvalue()
    assert code == 0  # one healthy-looking PCI GPU, no envs: nothing to report
