"""The simulated CUDA user-space (tests/fakedriver: cudart, cuBLAS(Lt), cuFFT, cuSOLVER,
cuSPARSE, cuDNN 9 and 8) on its own through ctypes, laid out by tests/cuda_userspace.py, and
under real TensorFlow 2.21 (.venv) on the simulated driver.

Each TensorFlow run imports it in a fresh process (~3 CPU-s): the layouts are module-scoped
and each case is one run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cuda_userspace import (
    BASE_VENV,
    CUDA_USERSPACE_DIR,
    CUDNN8_SONAME,
    TF_CUDA_LIBS,
    WHEELS,
    WheelVenv,
    build_cuda_userspace,
    cuda_env,
    lay_out_libdir,
    make_wheel_venv,
)
from helpers import run_python, write_scenario

# What each stub exports, exactly (README.md says why).
EXPORTS = {
    "libcudart.so.12": {
        "cudaRuntimeGetVersion",
        "cudaDriverGetVersion",
        "cudaGetDevice",
        "cudaSetDevice",
    },
    "libcudnn.so.9": {"cudnnGetVersion", "cudnnGetProperty"},
    "libcudnn.so.8": {"cudnnGetVersion", "cudnnGetProperty"},
    "libcublas.so.12": set(),
    "libcublasLt.so.12": set(),
    "libcufft.so.11": set(),
    "libcusolver.so.11": set(),
    "libcusparse.so.12": set(),
}

TWO_GPUS: list[dict[str, Any]] = [
    {
        "name": "NVIDIA RTX A6000",
        "uuid": f"GPU-6a6a6a6a-0000-4000-8000-00000000000{i}",
        "cc_major": 8,
        "cc_minor": 6,
    }
    for i in range(2)
]


@pytest.fixture(scope="module")
def stubs() -> Path:
    return build_cuda_userspace()


def _readelf(path: Path, *args: str) -> str:
    return subprocess.run(
        ["readelf", "--wide", *args, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_stubs_have_their_sonames_and_export_only_their_calls(stubs: Path) -> None:
    assert {p.name for p in stubs.iterdir()} == set(EXPORTS)
    for soname, exports in EXPORTS.items():
        dynamic = _readelf(stubs / soname, "--dynamic")
        assert f"Library soname: [{soname}]" in dynamic
        # no dependency on another stub: each loads (or is missing) on its own
        needed = re.findall(r"Shared library: \[(.+?)\]", dynamic)
        assert not [n for n in needed if n.startswith("libcu")], (soname, needed)
        defined = {
            fields[7].split("@")[0]
            for line in _readelf(stubs / soname, "--dyn-syms").splitlines()
            if len(fields := line.split()) >= 8
            and fields[3] == "FUNC"
            and fields[4] == "GLOBAL"
            and fields[6] != "UND"
        }
        assert defined == exports, soname


def test_cuda_userspace_is_not_on_the_driver_path(stubs: Path) -> None:
    """build/fakedriver alone (the driver) has no CUDA user-space: existing cases keep failing
    at "Cannot dlopen some GPU libraries" unless a test lays the stubs out."""
    assert stubs == CUDA_USERSPACE_DIR
    assert not any((stubs.parent / lib.soname).exists() for lib in TF_CUDA_LIBS)


VERSIONS = textwrap.dedent(
    """
    import ctypes, json, os, threading
    from helpers import write_scenario

    d = os.environ["STUBS"]
    cudart = ctypes.CDLL(os.path.join(d, "libcudart.so.12"))
    cudnn = {m: ctypes.CDLL(os.path.join(d, f"libcudnn.so.{m}")) for m in (9, 8)}
    for lib in cudnn.values():
        lib.cudnnGetVersion.restype = ctypes.c_size_t

    def ask():
        out = {}
        for name in ("cudaRuntimeGetVersion", "cudaDriverGetVersion"):
            v = ctypes.c_int(-1)
            rc = getattr(cudart, name)(ctypes.byref(v))
            out[name] = [rc, v.value]
        out["null"] = cudart.cudaRuntimeGetVersion(None)
        for m, lib in cudnn.items():
            props = []
            for prop in (0, 1, 2, 3):
                v = ctypes.c_int(-1)
                props.append([lib.cudnnGetProperty(prop, ctypes.byref(v)), v.value])
            out[f"cudnn{m}"] = [lib.cudnnGetVersion(), props]
        return out

    res = {"defaults": ask()}
    write_scenario(os.environ["TFGPUD_FAKE_DRIVER"], [{}], cudart_version=12080,
                   cudnn_version=90100, cuda_driver_version=12080)
    res["rewritten"] = ask()

    # many threads asking while the scenario keeps changing: always one of the versions
    seen = set()
    def hammer():
        for _ in range(2000):
            seen.add(cudnn[9].cudnnGetVersion())
    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for v in (90200, 90300) * 10:
        write_scenario(os.environ["TFGPUD_FAKE_DRIVER"], [{}], cudnn_version=v)
    for t in threads:
        t.join()
    res["threads"] = sorted(seen)
    with open(os.environ["TFGPUD_FAKE_DRIVER"], "w") as f:
        f.write("cudnn_version = 9.1\\n")
    res["malformed"] = ask()
    print(json.dumps(res))
    """
)


def test_versions_come_from_the_scenario(stubs: Path, scenario_path: Path) -> None:
    write_scenario(scenario_path, [{}])
    # the stubs by full path; libcuda.so.1 (for cudaDriverGetVersion) through LD_LIBRARY_PATH
    result = run_python(VERSIONS, scenario=scenario_path, env={"STUBS": str(stubs)})
    assert result.returncode == 0, result.stderr
    out = result.data
    bad_type = [2000, -1]  # CUDNN_STATUS_BAD_PARAM (cuDNN 9)
    assert out["defaults"] == {
        "cudaRuntimeGetVersion": [0, 12050],
        "cudaDriverGetVersion": [0, 12040],  # libcuda's cuda_driver_version
        "null": 1,  # cudaErrorInvalidValue
        "cudnn9": [90300, [[0, 9], [0, 3], [0, 0], bad_type]],
        "cudnn8": [8907, [[0, 8], [0, 9], [0, 7], [3, -1]]],  # cuDNN 8's BAD_PARAM is 3
    }
    assert out["rewritten"] == {
        "cudaRuntimeGetVersion": [0, 12080],
        "cudaDriverGetVersion": [0, 12080],
        "null": 1,
        "cudnn9": [90100, [[0, 9], [0, 1], [0, 0], bad_type]],
        # a scenario may give any library any version; the encoding decides the fields
        "cudnn8": [90100, [[0, 9], [0, 1], [0, 0], [3, -1]]],
    }
    assert set(out["threads"]) <= {90100, 90200, 90300}
    # malformed: cudaErrorUnknown, version 0, CUDNN_STATUS_INTERNAL_ERROR; no driver version
    assert out["malformed"] == {
        "cudaRuntimeGetVersion": [999, -1],
        "cudaDriverGetVersion": [0, 0],
        "null": 1,
        "cudnn9": [0, [[4000, -1], [4000, -1], [4000, -1], bad_type]],
        "cudnn8": [0, [[4, -1], [4, -1], [4, -1], [3, -1]]],
    }
    lines = result.fakedriver_lines()
    assert lines and all("floats are not supported" in line for line in lines), result.stderr


def test_driver_version_is_0_without_libcuda(stubs: Path, scenario_path: Path) -> None:
    write_scenario(scenario_path, [{}])
    code = textwrap.dedent(
        f"""
        import ctypes, json
        cudart = ctypes.CDLL({str(stubs / "libcudart.so.12")!r})
        v = ctypes.c_int(-1)
        print(json.dumps([cudart.cudaDriverGetVersion(ctypes.byref(v)), v.value]))
        """
    )
    result = run_python(code, scenario=scenario_path, libdir=stubs)  # no libcuda.so.1 there
    assert result.returncode == 0, result.stderr
    assert result.data == [0, 0]


DEVICES = textwrap.dedent(
    """
    import ctypes, json, os, threading
    cudart = ctypes.CDLL(os.path.join(os.environ["STUBS"], "libcudart.so.12"))

    def get():
        d = ctypes.c_int(-1)
        return [cudart.cudaGetDevice(ctypes.byref(d)), d.value]

    out = {"initial": get(), "set1": cudart.cudaSetDevice(1), "after": get(),
           "set2": cudart.cudaSetDevice(2), "neg": cudart.cudaSetDevice(-1),
           "null": cudart.cudaGetDevice(None)}
    other = []
    t = threading.Thread(target=lambda: other.append(get()))
    t.start(); t.join()
    out["other_thread"] = other[0]
    print(json.dumps(out))
    """
)


def test_device_selection_follows_libcuda(stubs: Path, scenario_path: Path) -> None:
    """cudaSetDevice checks the ordinal against libcuda's (visible) GPUs; the current device
    is per thread, as in the real runtime."""
    write_scenario(scenario_path, [{}, {}])
    result = run_python(DEVICES, scenario=scenario_path, env={"STUBS": str(stubs)})
    assert result.returncode == 0, result.stderr
    assert result.data == {
        "initial": [0, 0],
        "set1": 0,
        "after": [0, 1],
        "set2": 101,  # cudaErrorInvalidDevice: two GPUs
        "neg": 101,
        "null": 1,
        "other_thread": [0, 0],
    }
    hidden = run_python(
        DEVICES, scenario=scenario_path, env={"STUBS": str(stubs), "CUDA_VISIBLE_DEVICES": "0"}
    )
    assert hidden.data is not None and hidden.data["set1"] == 101  # one visible GPU
    no_driver = run_python(DEVICES, scenario=scenario_path, libdir=stubs, env={"STUBS": str(stubs)})
    assert no_driver.data is not None and no_driver.data["set1"] == 35  # no libcuda.so.1


# --- layouts ------------------------------------------------------------------------------------


def test_libdir_layouts(tmp_path: Path) -> None:
    every = {lib.soname for lib in TF_CUDA_LIBS}
    assert {p.name for p in lay_out_libdir(tmp_path / "all").iterdir()} == every
    no_cudnn = lay_out_libdir(tmp_path / "no-cudnn", omit={"cudnn", "cusolver"})
    assert {p.name for p in no_cudnn.iterdir()} == every - {"libcudnn.so.9", "libcusolver.so.11"}
    cudnn8 = lay_out_libdir(tmp_path / "cudnn8", cudnn=8)
    assert {p.name for p in cudnn8.iterdir()} == every - {"libcudnn.so.9"} | {CUDNN8_SONAME}
    with pytest.raises(ValueError, match="unknown libraries"):
        lay_out_libdir(tmp_path / "x", omit={"cudnn9"})


def test_wheel_versions_are_what_tensorflow_asks_for() -> None:
    """The dist-info versions are the lower bounds of TF 2.21's `and-cuda` extra."""
    code = textwrap.dedent(
        """
        import importlib.metadata as m, json
        print(json.dumps(m.requires("tensorflow")))
        """
    )
    proc = subprocess.run(
        [str(BASE_VENV / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    pins = {}
    for req in json.loads(proc.stdout):
        if m := re.match(r"(nvidia-[a-z0-9-]+)<[\d.]+,>=([\d.]+); extra == \"and-cuda\"", req):
            pins[m.group(1)] = m.group(2)
    for dist, version in WHEELS.values():
        assert pins[dist] == version


@pytest.fixture(scope="module")
def wheel_venv(wheel_parent: Path) -> WheelVenv:
    return make_wheel_venv(wheel_parent / "and-cuda")


WHEEL_PROBE = textwrap.dedent(
    """
    import importlib.metadata as m, importlib.util, json
    dists = {d.metadata["Name"]: d.version for d in m.distributions()
             if d.metadata["Name"].endswith("-cu12")}
    print(json.dumps({"tf": importlib.util.find_spec("tensorflow").origin,
                      "tf_version": m.version("tensorflow"), "nvidia": dists}))
    """
)


def _venv_python(venv: WheelVenv, code: str) -> Any:
    proc = subprocess.run(
        [str(venv.python), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(proc.stdout.splitlines()[-1])


def test_wheel_venv_layout(wheel_venv: WheelVenv, wheel_parent: Path) -> None:
    sp = wheel_venv.site_packages
    for lib in TF_CUDA_LIBS:
        assert (wheel_venv.lib_dir(lib.package) / lib.soname).is_file()
    # TensorFlow is shared, not copied: the same inodes as .venv's
    tf_so = "libtensorflow_framework.so.2"
    base_tf = next(BASE_VENV.glob("lib/python3.*/site-packages/tensorflow"))
    assert (sp / "tensorflow" / tf_so).stat().st_ino == (base_tf / tf_so).stat().st_ino
    out = _venv_python(wheel_venv, WHEEL_PROBE)
    assert out["tf"] == str(sp / "tensorflow" / "__init__.py")
    assert out["tf_version"] == "2.21.0"
    assert out["nvidia"] == dict(WHEELS.values())

    cudnn8 = make_wheel_venv(wheel_parent / "cudnn8", cudnn=8, omit={"cufft"})
    assert (cudnn8.lib_dir("cudnn") / CUDNN8_SONAME).is_file()
    assert not (cudnn8.lib_dir("cudnn") / "libcudnn.so.9").exists()
    assert not cudnn8.lib_dir("cufft").exists()
    nvidia = _venv_python(cudnn8, WHEEL_PROBE)["nvidia"]
    assert nvidia["nvidia-cudnn-cu12"] == "8.9.7.29"
    assert "nvidia-cufft-cu12" not in nvidia


# --- real TensorFlow ----------------------------------------------------------------------------

TF_LIST = textwrap.dedent(
    """
    import json, os
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    out = {"gpus": [tf.config.experimental.get_device_details(g) for g in gpus]}
    if gpus:
        # the simulated libcuda refuses contexts: TF's first op fails cleanly
        try:
            with tf.device("/GPU:0"):
                tf.zeros(1)
            out["context"] = None
        except Exception as e:
            out["context"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)
    os._exit(0)  # a TF op after the failed context would hang
    """
)


def run_tf(python: Path | str, env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Run TF_LIST; (its JSON, stderr)."""
    env = {**env, "TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_MAX_VLOG_LEVEL": "1"}
    proc = subprocess.run(
        [str(python), "-c", TF_LIST],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def dlopen_failures(stderr: str) -> set[str]:
    """The libraries TF's loader names at VLOG 1 as failing."""
    return set(re.findall(r"Could not load dynamic library '([^']+)'", stderr))


def dlopen_successes(stderr: str) -> set[str]:
    return set(re.findall(r"Successfully opened dynamic library (\S+)", stderr))


@pytest.fixture(scope="module")
def tf_scenario(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build_cuda_userspace()
    return write_scenario(tmp_path_factory.mktemp("cuda") / "two.toml", TWO_GPUS)


@pytest.mark.slow
def test_tensorflow_lists_every_gpu_with_the_stubs(tf_scenario: Path, tmp_path: Path) -> None:
    libdir = lay_out_libdir(tmp_path / "cuda")
    out, stderr = run_tf(sys.executable, cuda_env(tf_scenario, lib_dirs=[libdir]))
    assert out["gpus"] == [
        {"compute_capability": [8, 6], "device_name": "NVIDIA RTX A6000"} for _ in TWO_GPUS
    ]
    assert "Cannot dlopen some GPU libraries" not in stderr
    assert {lib.soname for lib in TF_CUDA_LIBS} <= dlopen_successes(stderr)
    assert dlopen_failures(stderr) == set()
    assert "CUDA_ERROR_NOT_SUPPORTED" in out["context"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [{"omit": {"cudnn"}}, {"cudnn": 8}], ids=["cudnn-missing", "cudnn8-only"]
)
def test_tensorflow_without_cudnn9_lists_no_gpu(
    tf_scenario: Path, tmp_path: Path, layout: dict[str, Any]
) -> None:
    libdir = lay_out_libdir(tmp_path / "cuda", **layout)
    out, stderr = run_tf(sys.executable, cuda_env(tf_scenario, lib_dirs=[libdir]))
    assert out["gpus"] == []
    assert "Cannot dlopen some GPU libraries" in stderr
    assert dlopen_failures(stderr) == {"libcudnn.so.9"}  # TF never asks for libcudnn.so.8


@pytest.mark.slow
def test_tensorflow_in_the_wheel_layout_misses_cusolver(
    tf_scenario: Path, wheel_venv: WheelVenv
) -> None:
    """TF 2.21's framework RUNPATH has no nvidia/cusolver/lib: cuSOLVER alone is not found."""
    out, stderr = run_tf(wheel_venv.python, cuda_env(tf_scenario))
    assert out["gpus"] == []
    assert "Cannot dlopen some GPU libraries" in stderr
    assert dlopen_failures(stderr) == {"libcusolver.so.11"}
    others = {lib.soname for lib in TF_CUDA_LIBS} - {"libcusolver.so.11"}
    assert others <= dlopen_successes(stderr)

    # the same venv with that one directory on LD_LIBRARY_PATH: every GPU
    fixed = cuda_env(tf_scenario, lib_dirs=[wheel_venv.lib_dir("cusolver")])
    out, stderr = run_tf(wheel_venv.python, fixed)
    assert len(out["gpus"]) == len(TWO_GPUS)
    assert dlopen_failures(stderr) == set()
