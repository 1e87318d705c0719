"""tfprobe.py itself, run by an interpreter without TensorFlow (fast) and in-process helpers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tfgpud.collectors.tensorflow import PROBE_SCRIPT
from tfgpud.collectors.tensorflow.child import tfprobe

NO_TF_PYTHON = shutil.which("python3", path="/usr/bin")


def _has_tf(python: str) -> bool:
    r = subprocess.run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('tensorflow') is not None)"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return r.stdout.strip() == "True"


@pytest.mark.skipif(
    NO_TF_PYTHON is None or _has_tf(NO_TF_PYTHON), reason="needs a python3 without TensorFlow"
)
def test_import_failure_is_json_and_exit_0() -> None:
    assert NO_TF_PYTHON is not None
    r = subprocess.run(
        [NO_TF_PYTHON, str(PROBE_SCRIPT)],
        capture_output=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "-1"},
        check=False,
    )
    assert r.returncode == 0
    report = json.loads(r.stdout)
    assert report["schema"] == 1
    assert report["import_error"] == "ModuleNotFoundError: No module named 'tensorflow'"
    assert report["environment"] == {"CUDA_VISIBLE_DEVICES": "-1"}
    assert report["libraries"][0]["soname"] == "libcuda.so.1"
    assert any("import" in line for line in report["traceback"])


def test_script_does_not_import_tfgpud() -> None:
    source = PROBE_SCRIPT.read_text()
    assert "tfgpud" not in "\n".join(
        line for line in source.splitlines() if line.lstrip().startswith(("import", "from"))
    )


def test_check_library_finds_a_real_library_and_its_path() -> None:
    found = tfprobe.check_library("c", "libc.so.6", [])
    assert found["loaded"] and found["path"] and Path(found["path"]).exists()
    assert Path(found["path"]).name.startswith("libc") and found["via"] == "ld.so.cache"
    search = [{"dir": "/nonexistent", "source": "RUNPATH"}]
    missing = tfprobe.check_library("cudnn", "libcudnn.so.9", search)
    assert not missing["loaded"] and "libcudnn.so.9" in missing["error"]
    assert missing["found_elsewhere"] == []


def _fake_lib(where: Path, soname: str) -> Path:
    """A file of that soname that dlopen accepts (a symlink to libm)."""
    where.mkdir(parents=True, exist_ok=True)
    real = Path(tfprobe.check_library("m", "libm.so.6", [])["path"])
    (where / soname).symlink_to(real)
    return real


def test_check_library_follows_the_loaders_order(tmp_path: Path) -> None:
    """LD_LIBRARY_PATH, then RUNPATH, by full path in that order; a copy in a pip dir the
    loader does not search is not "found", only reported as found elsewhere."""
    real = _fake_lib(tmp_path / "ld", "libfakeprobe.so.1")
    _fake_lib(tmp_path / "runpath", "libfakeprobe.so.1")
    search = [
        {"dir": str(tmp_path / "ld"), "source": "LD_LIBRARY_PATH"},
        {"dir": str(tmp_path / "runpath"), "source": "RUNPATH"},
    ]
    found = tfprobe.check_library("fake", "libfakeprobe.so.1", search)
    assert found["loaded"] and found["via"] == "LD_LIBRARY_PATH"
    assert found["path"] == str(real.resolve())
    found = tfprobe.check_library("fake", "libfakeprobe.so.1", search[1:])
    assert found["via"] == "RUNPATH"

    gap = tmp_path / "site" / "nvidia" / "fakesolver" / "lib"
    _fake_lib(gap, "libfakesolver.so.11")
    pip_dirs = tfprobe.pip_library_dirs([str(tmp_path / "site"), "/nonexistent"])
    assert pip_dirs == [str(gap)]
    missing = tfprobe.check_library("fakesolver", "libfakesolver.so.11", search, pip_dirs)
    assert not missing["loaded"] and missing["via"] is None
    assert missing["found_elsewhere"] == [str(gap / "libfakesolver.so.11")]
    # Search path unknown (no dlinfo): pip's dirs are the approximation.
    found = tfprobe.check_library("fakesolver", "libfakesolver.so.11", None, pip_dirs)
    assert found["loaded"] and found["via"] == "pip"


def test_classify_search_path() -> None:
    dirs = ["/drv", "/x/nvidia/cublas/lib", "/x/tensorrt", "/lib/x86_64-linux-gnu", "/usr/lib"]
    got = tfprobe.classify_search_path(dirs, "/drv")
    assert [e["source"] for e in got] == [
        "LD_LIBRARY_PATH",
        "RUNPATH",
        "RUNPATH",
        "default",
        "default",
    ]
    assert [e["source"] for e in tfprobe.classify_search_path(dirs[1:], "")] == [
        "RUNPATH",
        "RUNPATH",
        "default",
        "default",
    ]


def test_search_path_of_a_loaded_library_ends_with_the_default_dirs() -> None:
    import ctypes

    ctypes.CDLL("libm.so.6")
    dirs = tfprobe.search_path("libm.so.6")
    assert dirs is not None and dirs, dirs
    assert any(tfprobe._DEFAULT_DIR.match(d) for d in dirs)
    assert tfprobe.search_path("/nonexistent/libnothing.so.1") is None  # not loaded


def test_packages_lists_metadata_dirs() -> None:
    pkgs, dirs = tfprobe.packages()
    assert all(n.startswith(("nvidia-", "tensorflow")) for n in pkgs)
    assert all(Path(d).is_dir() for d in dirs)


def test_probe_runs_in_this_interpreter_without_tf_import(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> object:
        raise ImportError(f"blocked {name}")

    monkeypatch.setattr(tfprobe.importlib, "import_module", refuse)
    report = tfprobe.probe(smoke=False)
    assert report["import_error"] == "ImportError: blocked tensorflow"
    assert report["python"]["executable"] == sys.executable


def test_site_dirs_are_reported_even_without_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """So that installing TF into an env whose import failed changes the fingerprint."""
    import site

    def refuse(name: str) -> object:
        raise ImportError(f"blocked {name}")

    monkeypatch.setattr(tfprobe.importlib, "import_module", refuse)
    report = tfprobe.probe(smoke=False)
    for d in site.getsitepackages():
        if Path(d).is_dir():
            assert d in report["package_dirs"]


def test_a_broken_distribution_listing_loses_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    def broken() -> object:
        raise OSError("unreadable path entry")

    monkeypatch.setattr(metadata, "distributions", broken)
    assert tfprobe.packages() == ({}, [])


FAKE_TF = """
import atexit, os, signal
__version__ = "9.9.9"
class _Config:
    def list_physical_devices(self, kind):
        raise RuntimeError("device listing exploded")
config = _Config()
# Like a CUDA library crashing at interpreter shutdown, after the report is written.
atexit.register(lambda: os.kill(os.getpid(), signal.SIGSEGV))
"""


def test_report_survives_a_listing_error_and_a_crash_at_shutdown(tmp_path: Path) -> None:
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(FAKE_TF)
    r = subprocess.run(
        [sys.executable, "-s", str(PROBE_SCRIPT)],
        capture_output=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)},
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    report = json.loads(r.stdout)
    assert report["tf_version"] == "9.9.9"
    assert report["gpus"] == [] and "device listing exploded" in report["gpus_error"]


class _FakeTensor:
    def __init__(self, value: list[list[float]]) -> None:
        self.value = value
        self.device = "/job:localhost/replica:0/task:0/device:GPU:0"

    def numpy(self) -> _FakeTensor:
        return self

    def tolist(self) -> list[list[float]]:
        return self.value


class _FakeTf:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.fail_init = False
        self.fail_matmul = False
        outer = self

        class Experimental:
            def set_memory_growth(self, gpu: object, on: bool) -> None:
                outer.calls.append(("growth", gpu))

        class Config:
            experimental = Experimental()

            def set_visible_devices(self, gpu: object, kind: str) -> None:
                outer.calls.append(("visible", (gpu, kind)))

            def list_logical_devices(self, kind: str) -> list[str]:
                outer.calls.append(("init", kind))
                if outer.fail_init:
                    raise RuntimeError("CUDA error: : CUDA_ERROR_NOT_SUPPORTED")
                return ["/device:GPU:0"]

        class Linalg:
            def matmul(self, a: _FakeTensor, b: _FakeTensor) -> _FakeTensor:
                outer.calls.append(("matmul", None))
                if outer.fail_matmul:
                    raise RuntimeError("CUDA_ERROR_LAUNCH_FAILED")
                return _FakeTensor([[7.0, 10.0], [15.0, 22.0]])

        self.config = Config()
        self.linalg = Linalg()

    def device(self, name: str) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def constant(self, value: list[list[float]]) -> _FakeTensor:
        return _FakeTensor(value)


def test_smoke_test_makes_only_the_first_gpu_visible() -> None:
    tf = _FakeTf()
    assert tfprobe._smoke(tf, ["gpu0", "gpu1"]) == (True, None, None)
    assert tf.calls[0] == ("visible", ("gpu0", "GPU"))
    assert ("growth", "gpu1") not in tf.calls
    assert tf.calls[-2:] == [("init", "GPU"), ("matmul", None)]


def test_smoke_test_says_where_it_failed() -> None:
    tf = _FakeTf()
    tf.fail_init = True
    ok, error, stage = tfprobe._smoke(tf, ["gpu0"])
    assert (ok, stage) == (False, "context")
    assert error == "RuntimeError: CUDA error: : CUDA_ERROR_NOT_SUPPORTED"
    assert ("matmul", None) not in tf.calls  # one attempt: after a failed context TF hangs
    tf = _FakeTf()
    tf.fail_matmul = True
    assert tfprobe._smoke(tf, ["gpu0"])[::2] == (False, "matmul")
