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
    assert Path(found["path"]).name.startswith("libc")
    missing = tfprobe.check_library("cudnn", "libcudnn.so.9", ["/nonexistent"])
    assert not missing["loaded"] and "libcudnn.so.9" in missing["error"]


def test_check_library_prefers_pip_dirs(tmp_path: Path) -> None:
    libdir = tmp_path / "nvidia" / "fake" / "lib"
    libdir.mkdir(parents=True)
    real = Path(tfprobe.check_library("m", "libm.so.6", [])["path"])
    (libdir / "libfakeprobe.so.1").symlink_to(real)
    dirs = tfprobe.pip_library_dirs([str(tmp_path), "/nonexistent"])
    assert dirs == [str(libdir)]
    found = tfprobe.check_library("fake", "libfakeprobe.so.1", dirs)
    assert found["loaded"] and found["path"] == str(real.resolve())


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
        outer = self

        class Experimental:
            def set_memory_growth(self, gpu: object, on: bool) -> None:
                outer.calls.append(("growth", gpu))

        class Config:
            experimental = Experimental()

            def set_visible_devices(self, gpu: object, kind: str) -> None:
                outer.calls.append(("visible", (gpu, kind)))

        class Linalg:
            def matmul(self, a: _FakeTensor, b: _FakeTensor) -> _FakeTensor:
                outer.calls.append(("matmul", None))
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
    assert tfprobe._smoke(tf, ["gpu0", "gpu1"]) == (True, None)
    assert tf.calls[0] == ("visible", ("gpu0", "GPU"))
    assert ("growth", "gpu1") not in tf.calls
    assert tf.calls[-1] == ("matmul", None)
