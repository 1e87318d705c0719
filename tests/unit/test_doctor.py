"""run_doctor with injected readings: report order, JSON, exit codes."""

from __future__ import annotations

import io
import json
import os
import pwd
from pathlib import Path
from typing import Any

from tfgpud.collectors.discovery import (
    DiscoveredEnv,
    DiscoveryResult,
    Distribution,
    EnvKind,
    SearchedPlace,
)
from tfgpud.config import Config, DiscoverConfig, TfEnvConfig, parse_config
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


SEARCHED = (SearchedPlace("/home", "root", "searched", 4),)


def found_nothing(settings: DiscoverConfig) -> DiscoveryResult:
    return DiscoveryResult(envs=(), found=0, searched=SEARCHED, homes=1)


def discovered(python: str, label: str = "opt-found") -> DiscoveredEnv:
    """A discovered env owned by the user running the tests (its interpreter need not exist)."""
    prefix = os.path.dirname(os.path.dirname(python))
    return DiscoveredEnv(
        env=label,
        python=python,
        prefix=prefix,
        kind=EnvKind.VENV,
        source=f"{prefix}/pyvenv.cfg",
        owner_uid=os.geteuid(),
        owner=pwd.getpwuid(os.geteuid()).pw_name,
        tensorflow=Distribution("tensorflow", "2.21.0"),
        site_packages=f"{prefix}/lib/python3.11/site-packages",
        python_version="3.11.2",
    )


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


def doctor(
    config: Config,
    probe: Any = None,
    *,
    python: str | None = None,
    as_json: bool = True,
    read_nvml: Any = None,
    discover: Any = found_nothing,
) -> tuple[int, str]:
    """run_doctor on the injected PCI/NVML readings and discovery; returns (exit code, output)."""
    out = io.StringIO()
    code = run_doctor(
        config,
        python=python,
        as_json=as_json,
        out=out,
        read_pci=fake_pci,
        read_nvml=read_nvml or fake_nvml,
        probe=probe or probe_without_cuda_libs,
        discover=discover,
    )
    return code, out.getvalue()


def test_cli_python_is_probed_as_env_cli_and_report_reads_top_down(tmp_path: Path) -> None:
    probed: list[str] = []

    def probe(env: TfEnvConfig, timeout: float) -> TfProbeResult:
        probed.append(f"{env.name}={env.python}")
        return probe_without_cuda_libs(env, timeout)

    cfg = parse_config(
        f'[daemon]\nstate_dir = "{tmp_path}"\n'
        '[[tensorflow.envs]]\nname = "ignored"\npython = "/x"\n'
    )
    code, text = doctor(cfg, probe, python="/opt/v/bin/python", as_json=False)
    assert code == 2 and probed == ["cli=/opt/v/bin/python"]
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


def test_json_output_and_healthy_exit(tmp_path: Path) -> None:

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

    cfg = parse_config(
        f'[daemon]\nstate_dir = "{tmp_path}"\n'
        '[[tensorflow.envs]]\nname = "main"\npython = "/opt/main/bin/python"\n'
    )
    code, text = doctor(cfg, healthy)
    doc = json.loads(text)
    assert code == 0 and doc["exit_code"] == 0 and doc["findings"] == []
    assert doc["snapshot"]["tf"][0]["env"] == "main"
    assert doc["snapshot"]["nvml"]["gpus"][0]["uuid"] == "GPU-a"


def test_broken_collector_is_reported_not_raised(tmp_path: Path) -> None:
    def broken(library: str | None) -> NvmlReading:
        raise RuntimeError("nvml exploded")

    config = parse_config(f'[daemon]\nstate_dir = "{tmp_path}"\n')
    code, text = doctor(config, as_json=False, read_nvml=broken)
    assert "Driver (NVML)\n  not read (collector failed)" in text
    # One healthy-looking PCI GPU and no env to probe: that is said, never an all-clear.
    assert code == 1 and "[WARNING] tf-no-env  (host)" in text
    assert "    - root /home: searched (4 entries)" in text
    # The fix's configuration snippet is on lines of its own, under the fix (not "\n" shown).
    assert "\\n" not in text and "\\x0a" not in text
    assert (
        '`sudo systemctl reload tfgpud`:\n       [[tensorflow.envs]]\n       name = "main"\n'
        in text
    )


def test_doctor_reads_the_daemons_baseline(tmp_path: Path) -> None:
    from tfgpud.state import Baseline

    state = Baseline.open(tmp_path)
    gone = GpuReading(1, "GPU-b", "NVIDIA H100", pci_bus_id="00000000:02:00.0")
    state.learn(NvmlReading(up=True, gpus=(*NVML.gpus, gone)), 1000.0)
    state.save(1000.0)
    state.close()
    config = parse_config(f'[daemon]\nstate_dir = "{tmp_path}"\n')
    code, text = doctor(config)
    doc = json.loads(text)
    vanished = [f for f in doc["findings"] if f["code"] == "gpu-vanished"]
    assert [f["subject"] for f in vanished] == ["GPU-b"]
    assert "00000000:02:00.0" in vanished[0]["summary"]
    assert code == 2
    # A corrupt state file is reported, and doctor never moves or rewrites it.
    (tmp_path / "baseline.json").write_text("{not json")
    codes = {f["code"] for f in json.loads(doctor(config)[1])["findings"]}
    assert "baseline-state-error" in codes
    assert (tmp_path / "baseline.json").read_text() == "{not json"


def test_configured_and_discovered_envs_are_probed_and_python_probes_only_that_one(
    tmp_path: Path,
) -> None:
    probed: list[str] = []

    def probe(env: TfEnvConfig, timeout: float) -> TfProbeResult:
        probed.append(env.name)
        return probe_without_cuda_libs(env, timeout)

    searches: list[DiscoverConfig] = []

    def discover(settings: DiscoverConfig) -> DiscoveryResult:
        searches.append(settings)
        envs = (discovered("/opt/main/bin/python", "opt-main"), discovered("/opt/found/bin/python"))
        return DiscoveryResult(envs=envs, found=2, searched=SEARCHED)

    cfg = parse_config(
        f'[daemon]\nstate_dir = "{tmp_path}"\n'
        '[[tensorflow.envs]]\nname = "main"\npython = "/opt/main/bin/python"\n'
    )
    code, text = doctor(cfg, probe, discover=discover)
    doc = json.loads(text)
    assert code == 2
    # The configured env wins over its discovered duplicate; the other one joins.
    assert probed == ["main", "opt-found"] and len(searches) == 1
    assert [(e["env"], e["source"]) for e in doc["snapshot"]["tf_envs"]] == [
        ("main", "configured"),
        ("opt-found", "discovered"),
    ]
    assert {"discovery", "tensorflow:main", "tensorflow:opt-found"} <= {
        c["name"] for c in doc["snapshot"]["collectors"]
    }
    assert {f["subject"] for f in doc["findings"] if f["code"] == "tf-cpu-fallback"} == {
        "main",
        "opt-found",
    }
    probed.clear()
    doctor(cfg, probe, discover=discover, python="/opt/v/bin/python")
    assert probed == ["cli"] and len(searches) == 1  # --python: nothing discovered
