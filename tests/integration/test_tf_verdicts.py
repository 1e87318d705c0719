"""`tfgpud doctor` with REAL TensorFlow 2.21 taking its GPU path on the simulated driver and the
simulated CUDA user-space (tests/cuda_userspace.py): each verdict as a user meets it.

Every case is a real probe of a real env (the repo's .venv, or a throwaway venv laid out like
`pip install tensorflow[and-cuda]`) inside a real `tfgpud doctor --json` process. Each probe
imports TensorFlow (~3 CPU-s), so cases that share a simulated machine share one doctor run
(one env per case), and the runs are module-scoped: seven doctor runs, twelve probes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cuda_userspace import (
    TF_CUDA_LIBS,
    WheelVenv,
    build_cuda_userspace,
    lay_out_libdir,
    make_wheel_venv,
)
from helpers import FAKEDRIVER_DIR, REPO_ROOT, write_scenario

pytestmark = pytest.mark.slow

TF_PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")
TFGPUD = str(REPO_ROOT / ".venv" / "bin" / "tfgpud")
DRIVER = str(FAKEDRIVER_DIR)


def a6000(i: int) -> dict[str, Any]:
    return {
        "name": "NVIDIA RTX A6000",
        "uuid": f"GPU-a6000000-0000-4000-8000-00000000000{i}",
        "pci_bus_id": f"00000000:0{i + 1}:00.0",
        "cc_major": 8,
        "cc_minor": 6,
    }


def other_gpu(name: str, cc: tuple[int, int], i: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "uuid": f"GPU-0de00000-0000-4000-8000-00000000000{i}",
        "pci_bus_id": f"00000000:0{i + 1}:00.0",
        "cc_major": cc[0],
        "cc_minor": cc[1],
    }


@dataclass
class Env:
    name: str
    python: str
    lib_dirs: tuple[str, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)
    smoke: bool = False
    scenario: Path | None = None  # the probe's own scenario (default: the doctor's)


@dataclass
class Doctor:
    code: int
    doc: dict[str, Any]

    def findings(self, env: str) -> dict[str, dict[str, Any]]:
        return {f["code"]: f for f in self.doc["findings"] if f["subject"] == env}

    def probe(self, env: str) -> dict[str, Any]:
        return next(r for r in self.doc["snapshot"]["tf"] if r["env"] == env)

    def visible_gpus(self, env: str) -> int:
        """What `tfgpud_tf_visible_gpus{env}` exports: the GPUs TensorFlow lists there."""
        return len(self.probe(env)["gpus"])


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def run_doctor(workdir: Path, scenario: Path, envs: list[Env]) -> Doctor:
    """`tfgpud doctor --json` on the simulated machine `scenario`, probing `envs`."""
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [
        "[daemon]",
        f"state_dir = {_toml(str(workdir / 'state'))}",
        "[nvml]",
        f"library = {_toml(str(FAKEDRIVER_DIR / 'libnvidia-ml.so.1'))}",
        "[tensorflow]",
        "timeout_seconds = 120",
        "[tensorflow.discover]",
        "enabled = false",
        "[workloads]",  # other TF processes on this machine are not this test's
        "enabled = false",
    ]
    for env in envs:
        environment = {
            "LD_LIBRARY_PATH": ":".join([*env.lib_dirs, DRIVER]),
            "TFGPUD_FAKE_DRIVER": str(env.scenario or scenario),
            **env.extra,
        }
        lines += [
            "[[tensorflow.envs]]",
            f"name = {_toml(env.name)}",
            f"python = {_toml(env.python)}",
            f"smoke_test = {'true' if env.smoke else 'false'}",
            "[tensorflow.envs.environment]",
            *(f"{k} = {_toml(v)}" for k, v in environment.items()),
        ]
    config = workdir / "tfgpud.toml"
    config.write_text("\n".join(lines) + "\n")
    return doctor_json(config, scenario, workdir)


def doctor_json(config: Path, scenario: Path, home: Path) -> Doctor:
    """Run `tfgpud doctor --config CONFIG --json` with the simulated driver on `scenario`."""
    proc = subprocess.run(
        [TFGPUD, "doctor", "--config", str(config), "--json"],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "TFGPUD_FAKE_DRIVER": str(scenario),
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode in (0, 1, 2), proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["exit_code"] == proc.returncode
    return Doctor(proc.returncode, doc)


def evidence(f: dict[str, Any]) -> str:
    return "\n".join(f["evidence"])


# --- the simulated machines and CUDA layouts ----------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build_cuda_userspace()
    return tmp_path_factory.mktemp("verdicts")


@pytest.fixture(scope="module")
def two_a6000(work: Path) -> Path:
    return write_scenario(work / "two-a6000.toml", [a6000(0), a6000(1)])


@pytest.fixture(scope="module")
def libdirs(work: Path) -> dict[str, str]:
    """LD_LIBRARY_PATH layouts: all seven libraries, no cuDNN, cuDNN 8 only."""
    return {
        "all": str(lay_out_libdir(work / "cuda-all")),
        "no-cudnn": str(lay_out_libdir(work / "cuda-no-cudnn", omit={"cudnn"})),
        "cudnn8": str(lay_out_libdir(work / "cuda-cudnn8", cudnn=8)),
    }


@pytest.fixture(scope="module")
def wheel_venv(wheel_parent: Path) -> WheelVenv:
    return make_wheel_venv(wheel_parent / "and-cuda")


@pytest.fixture(scope="module")
def broken(work: Path, two_a6000: Path, libdirs: dict[str, str], wheel_venv: WheelVenv) -> Doctor:
    """Two healthy A6000s; each env breaks the CUDA user-space in its own way."""
    cudnn91 = write_scenario(
        work / "two-a6000-cudnn91.toml", [a6000(0), a6000(1)], cudnn_version=90100
    )
    return run_doctor(
        work / "broken",
        two_a6000,
        [
            Env("wheel", str(wheel_venv.python)),  # the pip layout, nothing on LD_LIBRARY_PATH
            Env("cudnn91", TF_PYTHON, (libdirs["all"],), scenario=cudnn91),
            Env("no-cudnn", TF_PYTHON, (libdirs["no-cudnn"],)),
            Env("cudnn8", TF_PYTHON, (libdirs["cudnn8"],)),
            Env("smoke", TF_PYTHON, (libdirs["all"],), smoke=True),
        ],
    )


def _fixed_ld_library_path(broken: Doctor) -> str:
    """The LD_LIBRARY_PATH the wheel env's finding tells the user to put in its table."""
    fix = broken.findings("wheel")["tf-cuda-libs-missing"]["fix"]
    m = re.search(r'LD_LIBRARY_PATH = "([^"]+)"', fix)
    assert m is not None, fix
    return m.group(1)


@pytest.fixture(scope="module")
def healthy(
    work: Path, two_a6000: Path, libdirs: dict[str, str], wheel_venv: WheelVenv, broken: Doctor
) -> Doctor:
    """The same machine, set up right; plus the wheel env with the fix its finding gave."""
    return run_doctor(
        work / "healthy",
        two_a6000,
        [
            Env("healthy", TF_PYTHON, (libdirs["all"],)),
            Env("one-gpu", TF_PYTHON, (libdirs["all"],), extra={"CUDA_VISIBLE_DEVICES": "0"}),
            Env(
                "wheel-fixed",
                str(wheel_venv.python),
                extra={"LD_LIBRARY_PATH": _fixed_ld_library_path(broken)},
            ),
        ],
    )


@pytest.fixture(scope="module")
def hardware(work: Path, libdirs: dict[str, str]) -> Iterator[dict[str, Doctor]]:
    """GPUs TensorFlow 2.21 has no kernel for: a K80 beside an A6000, an RTX 5090 on driver
    570 (CUDA 12.8), a Quadro K4200 (cc 3.0) beside an A6000; and two A6000s on a driver too
    old for the build (470, CUDA 11.4). One doctor run each: the diagnosis compares TF's list
    with NVML's, and NVML reads the doctor's scenario."""
    machines = {
        "k80": ([other_gpu("Tesla K80", (3, 7)), a6000(1)], {}),
        "rtx5090": (
            [other_gpu("NVIDIA GeForce RTX 5090", (12, 0))],
            {"driver_version": "570.86.10", "cuda_driver_version": 12080},
        ),
        "cc30": ([other_gpu("Quadro K4200", (3, 0)), a6000(1)], {}),
        "old-driver": (
            [a6000(0), a6000(1)],
            {"driver_version": "470.256.02", "cuda_driver_version": 11040},
        ),
    }
    out = {}
    for name, (gpus, top) in machines.items():
        scenario = write_scenario(work / f"{name}.toml", gpus, **top)
        out[name] = run_doctor(work / name, scenario, [Env(name, TF_PYTHON, (libdirs["all"],))])
    yield out


# --- healthy -------------------------------------------------------------------------------------


def test_healthy_two_gpus_is_an_all_clear(healthy: Doctor) -> None:
    assert healthy.code == 0, healthy.doc["findings"]
    assert healthy.visible_gpus("healthy") == 2
    assert healthy.findings("healthy") == {}
    assert [f for f in healthy.doc["findings"] if f["severity"] != "info"] == []
    libs = {lib["soname"]: lib for lib in healthy.probe("healthy")["libraries"]}
    assert libs["libcudnn.so.9"]["version"] == 90300  # asked through cudnnGetVersion()
    assert {lib["via"] for lib in libs.values()} == {"LD_LIBRARY_PATH"}
    assert healthy.probe("healthy")["loader_failures"] == {}


def test_cuda_visible_devices_0_on_two_gpus_is_one_on_purpose(healthy: Doctor) -> None:
    assert healthy.visible_gpus("one-gpu") == 1
    f = healthy.findings("one-gpu")
    assert set(f) == {"tf-gpus-selected-by-env"}
    sel = f["tf-gpus-selected-by-env"]
    assert sel["severity"] == "info"
    assert (
        "uses 1 of the 2 GPUs, on purpose: CUDA_VISIBLE_DEVICES=0 (set in the" in (sel["summary"])
    )
    assert "left to other jobs: GPU 1 NVIDIA RTX A6000" in evidence(sel)


def test_the_wheel_layouts_fix_works_with_real_tensorflow(healthy: Doctor) -> None:
    """The LD_LIBRARY_PATH the cuSOLVER finding named, in the env's table: TF lists both."""
    assert healthy.visible_gpus("wheel-fixed") == 2
    assert healthy.findings("wheel-fixed") == {}
    cusolver = next(
        lib for lib in healthy.probe("wheel-fixed")["libraries"] if lib["name"] == "cusolver"
    )
    assert cusolver["loaded"] and cusolver["via"] == "LD_LIBRARY_PATH"
    assert cusolver["path"].endswith("/nvidia/cusolver/lib/libcusolver.so.11")


# --- the CUDA user-space broken ----------------------------------------------------------------


def test_wheel_layout_names_libcusolver_and_the_runpath_gap(broken: Doctor) -> None:
    assert broken.code == 2
    assert broken.visible_gpus("wheel") == 0
    f = broken.findings("wheel")
    assert "(cause: tf-cuda-libs-missing)" in f["tf-cpu-fallback"]["summary"]
    libs = f["tf-cuda-libs-missing"]
    assert "; libcusolver.so.11 cannot be loaded (searched: LD_LIBRARY_PATH=" in libs["summary"]
    assert libs["summary"].endswith(
        ": libcusolver.so.11 is installed in nvidia/cusolver/lib, which is not on the RUNPATH of "
        "libtensorflow_framework.so.2 nor on LD_LIBRARY_PATH"
    )
    assert "TensorFlow's loader: Could not load dynamic library 'libcusolver.so.11'" in evidence(
        libs
    )
    runpath = next(e for e in libs["evidence"] if e.startswith("RUNPATH of "))
    assert "nvidia/cudnn/lib" in runpath and "nvidia/cusolver/lib" not in runpath
    assert "export LD_LIBRARY_PATH=" in libs["fix"] and "pip install" not in libs["fix"]


def test_cudnn_91_under_a_build_compiled_with_93_is_critical(broken: Doctor) -> None:
    assert broken.visible_gpus("cudnn91") == 2  # TF lists them; the first cuDNN call fails
    f = broken.findings("cudnn91")
    assert set(f) == {"tf-cudnn-mismatch"}
    mm = f["tf-cudnn-mismatch"]
    assert mm["severity"] == "critical"
    assert "but cuDNN 9.1.0 is installed and is what it loads (" in mm["summary"]
    assert (
        "Loaded runtime CuDNN library: 9.1.0 but source was compiled with: 9.3.0" in (mm["summary"])
    )
    assert "nvidia-cudnn-cu12>=9.3,<10" in mm["fix"] and "from LD_LIBRARY_PATH" in mm["fix"]


def test_cudnn_missing_names_libcudnn(broken: Doctor) -> None:
    assert broken.visible_gpus("no-cudnn") == 0
    f = broken.findings("no-cudnn")
    assert set(f) == {"tf-cpu-fallback", "tf-cuda-libs-missing"}
    libs = f["tf-cuda-libs-missing"]
    assert "; libcudnn.so.9 cannot be loaded (searched: " in libs["summary"]
    assert "nvidia-cudnn-cu12" in libs["fix"]


def test_cudnn_8_only_is_the_cudnn_mismatch(broken: Doctor) -> None:
    assert broken.visible_gpus("cudnn8") == 0
    f = broken.findings("cudnn8")
    assert set(f) == {"tf-cpu-fallback", "tf-cudnn-mismatch"}
    mm = f["tf-cudnn-mismatch"]
    assert "cuDNN 8.9.7 is installed (" in mm["summary"] and "libcudnn.so.8)" in mm["summary"]
    assert "it loads only libcudnn.so.9" in mm["summary"]
    assert "(cause: tf-cudnn-mismatch)" in f["tf-cpu-fallback"]["summary"]


def test_smoke_failing_at_context_creation_is_clean(broken: Doctor) -> None:
    assert broken.visible_gpus("smoke") == 2
    probe = broken.probe("smoke")
    assert probe["smoke_ok"] is False and probe["smoke_stage"] == "context"
    assert "CUDA_ERROR_NOT_SUPPORTED" in probe["smoke_error"]
    f = broken.findings("smoke")
    assert set(f) == {"tf-smoke-failed"}
    smoke = f["tf-smoke-failed"]
    assert "lists 2 GPU(s) but could not initialise GPU:0 (no CUDA context)" in smoke["summary"]
    assert "tfgpud doctor" not in smoke["fix"]
    assert "nvidia-smi -q -d COMPUTE" in smoke["fix"] and "/dev/nvidia-uvm" in smoke["fix"]


# --- GPUs TensorFlow has no kernel for ---------------------------------------------------------


def test_k80_beside_an_a6000_is_critical_although_tensorflow_lists_both(
    hardware: dict[str, Doctor],
) -> None:
    d = hardware["k80"]
    assert d.code == 2 and d.visible_gpus("k80") == 2
    f = d.findings("k80")
    assert set(f) == {"tf-compute-capability-unsupported"}  # no fallback: TF lists both
    cc = f["tf-compute-capability-unsupported"]
    assert "cannot run on GPU 0 Tesla K80" in cc["summary"] and "(cc 3.7)" in cc["summary"]
    ev = evidence(cc)
    assert "TensorFlow lists GPU:0 Tesla K80 (cc 3.7), GPU:1 NVIDIA RTX A6000 (cc 8.6)" in ev
    assert "not built with CUDA kernel binaries compatible with compute capability 3.7" in ev
    assert "'tensorflow[and-cuda]==2.14.*'" in cc["fix"] and "470 branch" in cc["fix"]
    assert f"export CUDA_VISIBLE_DEVICES={a6000(1)['uuid']}" in cc["fix"]


def test_rtx_5090_on_570_is_critical_with_the_blackwell_facts(
    hardware: dict[str, Doctor],
) -> None:
    d = hardware["rtx5090"]
    assert d.code == 2 and d.visible_gpus("rtx5090") == 1
    f = d.findings("rtx5090")
    assert set(f) == {"tf-compute-capability-unsupported"}  # not tf-ptx-jit-only
    cc = f["tf-compute-capability-unsupported"]
    assert "every kernel fails there with CUDA_ERROR_INVALID_PTX" in cc["summary"]
    ev = evidence(cc)
    assert "tensorflow#99592" in ev and "compute capability 12.0a" in ev  # TF's own line
    assert "nvcr.io/nvidia/tensorflow" in cc["fix"]
    assert "HERMETIC_CUDA_COMPUTE_CAPABILITIES=sm_120" in cc["fix"]


def test_cc_30_is_dropped_by_tensorflow_and_no_release_is_promised(
    hardware: dict[str, Doctor],
) -> None:
    d = hardware["cc30"]
    assert d.code == 2 and d.visible_gpus("cc30") == 1
    f = d.findings("cc30")
    assert set(f) == {"tf-partial-visibility", "tf-compute-capability-unsupported"}
    cc = f["tf-compute-capability-unsupported"]
    assert "TensorFlow ignores it (below its minimum 3.5)" in cc["summary"]
    assert "Ignoring visible gpu device (device: 0, name: Quadro K4200" in evidence(cc)
    assert "The minimum required Cuda capability is 3.5." in evidence(cc)
    assert "sm_30" not in cc["fix"] and "2.14" not in cc["fix"]
    assert cc["fix"].startswith("No TensorFlow pip release has kernels for compute capability 3.0")
    assert "tf-compute-capability-unsupported" in f["tf-partial-visibility"]["fix"]


def test_a_driver_too_old_for_the_build_is_critical_although_tensorflow_lists_the_gpus(
    hardware: dict[str, Doctor],
) -> None:
    d = hardware["old-driver"]
    assert d.code == 2 and d.visible_gpus("old-driver") == 2  # listing only needs libcuda
    f = d.findings("old-driver")
    assert set(f) == {"tf-driver-too-old"}
    assert f["tf-driver-too-old"]["summary"].startswith(
        "driver 470.x supports CUDA ≤ 11.4; TF 2.21.0 needs CUDA 12.5"
    )


def test_make_demo_starts_healthy(work: Path) -> None:
    """`make demo`'s files (config/demo/demo.toml.in, the scenario, its CUDA user-space copy):
    doctor on them is an all-clear with both GPUs, and the probe watches the library dir, so
    removing a library there (the README's way to break it) makes the daemon probe again."""
    demo = work / "demo"
    subprocess.run(
        ["make", "-s", "-C", str(REPO_ROOT), "demo-files", f"DEMO={demo}"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert sorted(p.name for p in (demo / "cuda").glob("lib*")) == sorted(
        lib.soname for lib in TF_CUDA_LIBS
    )
    d = doctor_json(demo / "demo.toml", demo / "workstation.scenario.toml", work)
    assert d.code == 0, d.doc["findings"]
    assert d.visible_gpus("venv") == 2 and d.findings("venv") == {}
    assert [f for f in d.doc["findings"] if f["severity"] != "info"] == []
    assert str(demo / "cuda") in d.probe("venv")["package_dirs"]
