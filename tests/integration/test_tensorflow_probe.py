"""The TF probe with REAL TensorFlow 2.21 (.venv), on this machine and on the simulated driver.

Each real probe imports TensorFlow (~3 CPU-s), so probes are module-scoped and shared.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO_ROOT, run_python, write_scenario

from tfgpud.collectors.tensorflow import probe_env
from tfgpud.config import Config, TfEnvConfig, parse_config
from tfgpud.diagnosis import cpu_fallback_envs, diagnose
from tfgpud.doctor import run_doctor
from tfgpud.model import (
    Finding,
    GpuProcess,
    GpuReading,
    NvmlReading,
    PciReading,
    ProbeStatus,
    Snapshot,
    TfProbeResult,
)

pytestmark = pytest.mark.slow

TF_PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")
TIMEOUT = 120.0
UUIDS = ("GPU-11111111-2222-3333-4444-555555555555", "GPU-11111111-2222-3333-4444-666666666666")


def gpus_scenario() -> list[dict[str, Any]]:
    return [
        {
            "name": "NVIDIA A100-SXM4-80GB",
            "uuid": uuid,
            "pci_bus_id": f"00000000:0{i + 1}:00.0",
            "memory_total": 85899345920,
            "memory_used": 1073741824,
            "cc_major": 8,
            "cc_minor": 0,
        }
        for i, uuid in enumerate(UUIDS)
    ]


def fake_env(name: str, scenario: Path, fakedriver: Path, **extra: str) -> TfEnvConfig:
    environment = {"LD_LIBRARY_PATH": str(fakedriver), "TFGPUD_FAKE_DRIVER": str(scenario)}
    environment.update(extra)
    return TfEnvConfig(name=name, python=TF_PYTHON, environment=environment)


def read_fake_nvml(scenario: Path, fakedriver: Path) -> NvmlReading:
    """Read NVML through the simulated driver in a child, so this process never loads it."""
    code = (
        "import json; from tfgpud.collectors.nvml import read_nvml; "
        "from tfgpud.model import to_jsonable; "
        f"print(json.dumps(to_jsonable(read_nvml({str(fakedriver / 'libnvidia-ml.so.1')!r}))))"
    )
    res = run_python(code, scenario=scenario, libdir=fakedriver)
    assert res.data is not None, res.stderr
    d = dict(res.data)
    gpus = []
    for g in d.pop("gpus"):
        g["compute_capability"] = tuple(g["compute_capability"] or ()) or None
        g["processes"] = tuple(GpuProcess(**p) for p in g["processes"])
        gpus.append(GpuReading(**g))
    return NvmlReading(gpus=tuple(gpus), **d)


def config_for(env: TfEnvConfig) -> Config:
    lines = [f'[[tensorflow.envs]]\nname = "{env.name}"\npython = "{env.python}"']
    lines += ["[tensorflow.envs.environment]"]
    lines += [f'{k} = "{v}"' for k, v in env.environment.items()]
    return parse_config("\n".join(lines) + "\n")


def findings_for(
    result: TfProbeResult, nvml: NvmlReading | None, config: Config
) -> tuple[Finding, ...]:
    snap = Snapshot(taken_at=time.time(), pci=PciReading(), nvml=nvml, tf=(result,))
    return diagnose(snap, config)


def by_code(findings: tuple[Finding, ...], code: str) -> Finding:
    hits = [f for f in findings if f.code == code]
    assert len(hits) == 1, [f.key for f in findings]
    return hits[0]


def doctor_with(result: TfProbeResult, nvml: NvmlReading | None, config: Config) -> tuple[int, str]:
    """Real PCI collector; NVML and the probe result injected (already measured above)."""
    out = io.StringIO()

    def cached_probe(env: TfEnvConfig, timeout: float) -> TfProbeResult:
        return result

    kwargs: dict[str, Any] = {"probe": cached_probe}
    if nvml is not None:
        kwargs["read_nvml"] = lambda library: nvml
    # Hermetic: never read a baseline a daemon on this machine may have left in /var/lib.
    with tempfile.TemporaryDirectory() as state_dir:
        daemon = config.daemon.model_copy(update={"state_dir": state_dir})
        config = config.model_copy(update={"daemon": daemon})
        code = run_doctor(config, python=None, as_json=False, out=out, **kwargs)
    return code, out.getvalue()


# --- 1. this machine as it is -------------------------------------------------------------------


@pytest.fixture(scope="module")
def as_is() -> TfProbeResult:
    env = TfEnvConfig(name="venv", python=TF_PYTHON)
    return probe_env(env, timeout=TIMEOUT)


def test_this_machine_no_gpu_no_alarm(as_is: TfProbeResult) -> None:
    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("this machine has an NVIDIA driver")
    assert as_is.status is ProbeStatus.OK, as_is.error
    assert as_is.tf_version == "2.21.0"
    assert as_is.gpus == ()
    assert as_is.build_info["is_cuda_build"] == "True"
    assert as_is.cpu_seconds is not None and as_is.cpu_seconds > 0.5
    cfg = parse_config(f'[[tensorflow.envs]]\nname = "venv"\npython = "{TF_PYTHON}"\n')
    code, report = doctor_with(as_is, None, cfg)
    assert code == 0, report
    assert "[INFO] no-nvidia-gpu" in report
    assert "tf-cpu-fallback" not in report
    assert "GPUs TensorFlow sees: 0" in report


# --- 2-4. simulated driver, TF without CUDA pip packages ------------------------------------


@pytest.fixture(scope="module")
def scenario_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scenarios")


@pytest.fixture(scope="module")
def two_gpus(
    scenario_dir: Path, fakedriver: Path
) -> tuple[TfEnvConfig, TfProbeResult, NvmlReading]:
    scenario = write_scenario(
        scenario_dir / "two.toml",
        gpus_scenario(),
        driver_version="550.54.14",
        cuda_driver_version=12040,
    )
    env = fake_env("research", scenario, fakedriver)
    return env, probe_env(env, timeout=TIMEOUT), read_fake_nvml(scenario, fakedriver)


def test_fallback_names_missing_cuda_libraries(
    two_gpus: tuple[TfEnvConfig, TfProbeResult, NvmlReading],
) -> None:
    env, result, nvml = two_gpus
    assert result.status is ProbeStatus.OK and result.gpus == ()
    libcuda = next(lib for lib in result.libraries if lib.name == "cuda")
    assert libcuda.loaded and libcuda.path is not None and libcuda.path.startswith(str(REPO_ROOT))
    assert len(nvml.gpus) == 2
    config = config_for(env)
    found = findings_for(result, nvml, config)
    assert cpu_fallback_envs(found) == {"research"}
    fb = by_code(found, "tf-cpu-fallback")
    assert "sees 0 of 2 GPU(s)" in fb.summary
    libs = by_code(found, "tf-cuda-libs-missing")
    for soname in ("libcudart.so.12", "libcublas.so.12", "libcudnn.so.9"):
        assert soname in libs.summary
    assert "built for CUDA 12.5 / cuDNN 9" in libs.summary
    assert libs.fix == f"{TF_PYTHON} -m pip install 'tensorflow[and-cuda]==2.21.0'"
    assert any("Cannot dlopen some GPU libraries" in e for e in libs.evidence)
    assert "tf-libcuda-missing" not in {f.code for f in found}
    code, report = doctor_with(result, nvml, config)
    assert code == 2, report
    assert "[CRITICAL] tf-cuda-libs-missing" in report


def test_cuda_visible_devices_minus_one(scenario_dir: Path, fakedriver: Path) -> None:
    scenario = write_scenario(
        scenario_dir / "hidden.toml", gpus_scenario(), driver_version="550.54.14"
    )
    env = fake_env("hidden", scenario, fakedriver, CUDA_VISIBLE_DEVICES="-1")
    result = probe_env(env, timeout=TIMEOUT)
    assert result.environment["CUDA_VISIBLE_DEVICES"] == "-1"
    found = findings_for(result, read_fake_nvml(scenario, fakedriver), config_for(env))
    f = by_code(found, "tf-gpus-hidden-by-env")
    assert "CUDA_VISIBLE_DEVICES='-1'" in f.summary and "environment table" in " ".join(f.evidence)
    assert "tf-cpu-fallback" in {x.code for x in found}


def test_driver_too_old(scenario_dir: Path, fakedriver: Path) -> None:
    scenario = write_scenario(
        scenario_dir / "old.toml",
        gpus_scenario(),
        driver_version="470.256.02",
        cuda_driver_version=11040,
    )
    env = fake_env("old", scenario, fakedriver)
    result = probe_env(env, timeout=TIMEOUT)
    nvml = read_fake_nvml(scenario, fakedriver)
    assert nvml.cuda_driver_version == 11040
    f = by_code(findings_for(result, nvml, config_for(env)), "tf-driver-too-old")
    assert f.summary == (
        "driver 470.x supports CUDA ≤ 11.4; TF 2.21.0 needs CUDA 12.5: install driver ≥ "
        "555.42.02 (or ≥ 525.60.13 with minor-version compatibility)"
    )


# --- 5. interpreters that are not TF envs ---------------------------------------------------------


def test_interpreter_without_tensorflow() -> None:
    python = "/usr/bin/python3"
    if not Path(python).exists():
        pytest.skip("no /usr/bin/python3")
    result = probe_env(TfEnvConfig(name="bare", python=python), timeout=30)
    assert result.status is ProbeStatus.IMPORT_FAILED
    f = by_code(findings_for(result, None, Config()), "tf-import-failed")
    assert f.summary == f"TensorFlow is not installed in env `bare` ({python})"


def test_nonexistent_interpreter() -> None:
    result = probe_env(TfEnvConfig(name="gone", python="/nonexistent/venv/bin/python"), timeout=5)
    assert result.status is ProbeStatus.MISSING_INTERPRETER
    f = by_code(findings_for(result, None, Config()), "tf-import-failed")
    assert f.summary == "The interpreter of env `gone` does not exist: /nonexistent/venv/bin/python"


@pytest.fixture
def hanging_python(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    pidfile = tmp_path / "grandchild.pid"
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nsleep 1000 &\necho $! > {pidfile}\nsleep 1000\n")
    script.chmod(0o755)
    yield script, pidfile


def test_probe_timeout_leaves_nothing_behind(hanging_python: tuple[Path, Path]) -> None:
    script, pidfile = hanging_python
    t0 = time.monotonic()
    result = probe_env(TfEnvConfig(name="slow", python=str(script)), timeout=1.0)
    assert time.monotonic() - t0 < 4
    assert result.status is ProbeStatus.TIMEOUT
    f = by_code(findings_for(result, None, Config()), "tf-probe-timeout")
    assert "within 1 s" in f.summary
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        stat = Path(f"/proc/{grandchild}/stat")
        if stat.exists() and stat.read_text().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {grandchild} survived the probe timeout")


def test_report_is_json_serialisable(
    two_gpus: tuple[TfEnvConfig, TfProbeResult, NvmlReading],
) -> None:
    from tfgpud.model import to_jsonable

    _, result, _ = two_gpus
    doc = json.loads(json.dumps(to_jsonable(result)))
    assert doc["status"] == "ok" and doc["python"] == TF_PYTHON
