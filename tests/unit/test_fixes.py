"""Fixes are pasted into a shell: each must be safe there and name only what is present."""

from __future__ import annotations

import io
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_diagnosis import NVML2, PCI2, UUID0, UUID1, one, probe, snap

from tfgpud.codes import CODES
from tfgpud.collectors.tensorflow import probe_env
from tfgpud.config import Config, TfEnvConfig, parse_config
from tfgpud.diagnosis import diagnose
from tfgpud.doctor import run_doctor
from tfgpud.model import Finding, KnownGpu, NvmlReading, PciReading, ProbeStatus, TfProbeResult
from tfgpud.text import trim_traceback

CONFIG = Config()
TF = "tensorflow[and-cuda]==2.21.0"


def venv_targets(fix: str) -> list[str]:
    """Every directory a fix would run ``python -m venv`` on."""
    return re.findall(r"-m venv (?:--\S+ )*(\S+)", fix)


def assert_pasteable(fix: str) -> None:
    for target in venv_targets(fix):
        path = os.path.expanduser(target)
        assert os.path.normpath(path) not in ("/", "/usr", "/opt", "/usr/local"), fix
        assert os.path.dirname(os.path.normpath(path)) != "/", fix  # no top-level directory
        assert not os.path.exists(path) or (Path(path) / "pyvenv.cfg").exists(), fix
    assert not re.search(r"-R (?:root: |go-w )(?:/|/usr)(?: |`|$)", fix), fix


def missing(python: str, env: str = "cli") -> TfProbeResult:
    return probe(
        env=env,
        python=python,
        status=ProbeStatus.MISSING_INTERPRETER,
        error=f"interpreter {python} not found",
        tf_version=None,
        gpus=(),
    )


def doctor_finding(python: str, code: str = "tf-import-failed") -> Finding:
    """``tfgpud doctor --python PYTHON`` with the real probe, on injected PCI/NVML readings."""
    found: list[Finding] = []

    def read_nvml(library: str | None) -> NvmlReading:
        return NVML2

    out = io.StringIO()
    run_doctor(
        CONFIG,
        python=python,
        as_json=False,
        out=out,
        read_pci=lambda *_: PCI2,
        read_nvml=read_nvml,
        probe=lambda env, timeout: _keep(probe_env(env, timeout=timeout), found),
    )
    assert found, out.getvalue()
    return one(diagnose(snap(tf=tuple(found)), CONFIG), code, "cli")


def _keep(result: TfProbeResult, into: list[TfProbeResult]) -> TfProbeResult:
    into.append(result)
    return result


# --- never a venv at /, /usr or an existing directory that is not a venv ----------------------


@pytest.mark.parametrize("python", ["/usr/bin/python3.13", "/usr/bin/python3.99"])
def test_doctor_python_in_usr_never_suggests_a_venv_at_usr(python: str) -> None:
    if Path(python).exists():
        pytest.skip(f"{python} exists here: not a missing interpreter")
    f = doctor_finding(python)  # under /usr, and no such interpreter
    assert "-m venv /usr" not in f.fix
    assert venv_targets(f.fix) == ["~/venvs/tf"]
    assert "~/venvs/tf/bin/python -m pip install 'tensorflow[and-cuda]==2.21.0'" in f.fix
    assert_pasteable(f.fix)


def test_doctor_python_at_top_level_never_suggests_a_venv_at_root() -> None:
    f = doctor_finding("/nonexistent/python")
    assert "-m venv / " not in f.fix and "-m venv /&" not in f.fix
    assert venv_targets(f.fix) == ["~/venvs/tf"]
    assert_pasteable(f.fix)


def test_an_existing_directory_that_is_not_a_venv_is_never_a_venv_target(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "bin").mkdir(parents=True)
    (data / "results.csv").write_text("precious\n")
    f = one(
        diagnose(snap(tf=(missing(str(data / "bin" / "python"), "research"),)), CONFIG),
        "tf-import-failed",
        "research",
    )
    assert str(data) not in venv_targets(f.fix)
    assert venv_targets(f.fix) == ["/opt/tf-venv"]
    assert 'set `python = "/opt/tf-venv/bin/python"` in the [[tensorflow.envs]] entry' in f.fix
    assert_pasteable(f.fix)


def test_a_missing_env_whose_directory_is_free_is_created_where_configured(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "venvs" / "research"  # a venv that lost its interpreter: repaired
    broken.mkdir(parents=True)
    (broken / "pyvenv.cfg").write_text("home = /usr/bin\n")
    for prefix in (tmp_path / "venvs" / "new", broken):
        r = missing(str(prefix / "bin" / "python3.11"), "research")
        f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-import-failed", "research")
        assert f.fix.startswith("Fix `python` in the [[tensorflow.envs]] entry `research`")
        assert venv_targets(f.fix) == [str(prefix)]
        assert f"{prefix}/bin/python -m pip install '{TF}'" in f.fix
        assert_pasteable(f.fix)


# --- the env from --python is not a configuration entry ----------------------------------------


def test_env_from_the_command_line_is_not_called_a_config_entry() -> None:
    f = one(diagnose(snap(tf=(missing("/nonexistent/python"),)), CONFIG), "tf-import-failed", "cli")
    assert "[[tensorflow.envs]] entry `cli`" not in f.fix
    assert "tfgpud doctor --python" in f.fix and "[[tensorflow.envs]] entry" in f.fix
    # A configured env of that name is one.
    named = parse_config('[[tensorflow.envs]]\nname = "cli"\npython = "/nonexistent/python"\n')
    g = one(diagnose(snap(tf=(missing("/nonexistent/python"),)), named), "tf-import-failed", "cli")
    assert "[[tensorflow.envs]] entry `cli`" in g.fix


def test_a_crash_of_the_command_line_env_does_not_say_run_doctor_again() -> None:
    r = probe(env="cli", status=ProbeStatus.CRASHED, error="probe killed by SIGSEGV")
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-import-crashed", "cli")
    assert "tfgpud doctor --python" not in f.fix and "--force-reinstall" in f.fix


# --- PEP 668: no pip into an externally managed interpreter ------------------------------------


def managed_python(root: Path) -> Path:
    """``root/usr/bin/python3`` of a distribution that marks it EXTERNALLY-MANAGED."""
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "lib" / "python3.11").mkdir(parents=True)
    (root / "usr" / "lib" / "python3.11" / "EXTERNALLY-MANAGED").write_text(
        "[externally-managed]\n"
    )
    python = root / "usr" / "bin" / "python3"
    python.write_text("")
    return python


def test_externally_managed_interpreter_gets_a_venv_not_pip(tmp_path: Path) -> None:
    python = str(managed_python(tmp_path))
    r = probe(
        env="cli",
        python=python,
        python_version="3.11.2",
        status=ProbeStatus.IMPORT_FAILED,
        error="ModuleNotFoundError: No module named 'tensorflow'",
        tf_version=None,
        gpus=(),
        packages={},
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-import-failed", "cli")
    assert f"{python} -m pip install" not in f.fix
    assert f"`{python} -m venv ~/venvs/tf && ~/venvs/tf/bin/python -m pip install '{TF}'`" in f.fix
    assert "PEP 668" in f.fix and "tfgpud doctor --python ~/venvs/tf/bin/python" in f.fix
    assert_pasteable(f.fix)
    # A configured env: the venv goes where the daemon's user can reach it, named in the entry.
    cfg = parse_config(f'[[tensorflow.envs]]\nname = "sys"\npython = "{python}"\n')
    g = one(diagnose(snap(tf=(replace(r, env="sys"),)), cfg), "tf-import-failed", "sys")
    assert "/opt/tf-venv/bin/python -m pip install" in g.fix
    entry = 'set `python = "/opt/tf-venv/bin/python"` in the [[tensorflow.envs]] entry `sys`'
    assert entry in g.fix


def test_a_venv_of_a_managed_interpreter_is_pip_installed_into(tmp_path: Path) -> None:
    managed_python(tmp_path)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {tmp_path / 'usr' / 'bin'}\n")
    (venv / "bin" / "python").symlink_to(tmp_path / "usr" / "bin" / "python3")
    r = probe(
        python=str(venv / "bin" / "python"),
        python_version="3.11.2",
        gpus=(),
        libraries=(),
        build_info={"is_cuda_build": "False"},
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-cpu-only-build", "research")
    assert f.fix == f"{venv}/bin/python -m pip install '{TF}'"


@pytest.mark.skipif(
    not Path(
        f"/usr/lib/python{sys.version_info[0]}.{sys.version_info[1]}/EXTERNALLY-MANAGED"
    ).exists()
    or not Path("/usr/bin/python3").exists(),
    reason="no externally managed /usr/bin/python3 here (Debian 12 and later have one)",
)
def test_doctor_python_usr_bin_python3_on_debian_suggests_a_venv() -> None:
    f = doctor_finding("/usr/bin/python3")  # the real probe: TensorFlow is not installed there
    assert "/usr/bin/python3 -m pip install" not in f.fix
    assert "/usr/bin/python3 -m venv ~/venvs/tf && ~/venvs/tf/bin/python -m pip install" in f.fix
    assert_pasteable(f.fix)


# --- a refused env under / or /usr: no recursive chown/chmod there ------------------------------


@pytest.mark.parametrize("python", ["/usr/bin/python3", "/python3", "/bin/python3"])
def test_refused_system_interpreter_is_never_chowned_recursively(python: str) -> None:
    r = probe(
        python=python,
        status=ProbeStatus.REFUSED,
        error="the env's code can be written by alice",
        refused_writers=("alice",),
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-probe-refused", "research")
    assert "chown -R" not in f.fix and "chmod -R" not in f.fix
    assert 'run_as = "alice"' in f.fix
    two = replace(r, refused_writers=("alice", "bob"))
    g = one(diagnose(snap(tf=(two,)), CONFIG), "tf-probe-refused", "research")
    assert "chown -R" not in g.fix and "chmod -R" not in g.fix


# --- gpu-vanished: the UUID it knows, and only findings that are present -----------------------


def vanished(nvml: NvmlReading, pci: PciReading = PCI2) -> tuple[Finding, ...]:
    return diagnose(
        snap(nvml=nvml, pci=pci, tf=(), baseline=(KnownGpu(UUID0), KnownGpu(UUID1))), CONFIG
    )


def named_codes(fix: str) -> set[str]:
    return {c for c in CODES if re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", fix)}


def test_vanished_with_nvml_unknown_names_nvml_unusable() -> None:
    found = vanished(NvmlReading(up=False, error="UNKNOWN", error_code=999))
    f = one(found, "gpu-vanished", UUID0)
    assert f.fix.startswith("Bring the driver back first (see nvml-unusable). ")
    assert "nvidia-smi" in one(found, "nvml-unusable", "host").fix
    assert f"`tfgpud baseline forget {UUID0}`" in f.fix and "forget UUID" not in f.fix


def test_vanished_with_the_driver_down_names_the_driver_finding() -> None:
    pci = replace(PCI2, nvidia_module_version=None, device_nodes=())
    found = vanished(NvmlReading(up=False, error="DRIVER_NOT_LOADED", error_code=9), pci)
    f = one(found, "gpu-vanished", UUID1)
    assert f.fix.startswith("Bring the driver back first (see driver-not-loaded")
    assert f"`tfgpud baseline forget {UUID1}`" in f.fix


@pytest.mark.parametrize(
    "nvml",
    [
        NvmlReading(up=False, error="UNKNOWN"),
        NvmlReading(up=False, error="DEVICE_COUNT_FAILED"),
        NvmlReading(up=False, error="CORRUPTED_INFOROM"),
        NvmlReading(up=False, error="DRIVER_NOT_LOADED"),
        NvmlReading(up=False, error="NO_PERMISSION"),
        NvmlReading(up=False, error="LIB_RM_VERSION_MISMATCH"),
        NvmlReading(up=False, error="LIBRARY_NOT_FOUND"),
        replace(NVML2, gpus=NVML2.gpus[:1]),
    ],
)
def test_every_code_a_fix_names_is_a_finding_present(nvml: NvmlReading) -> None:
    found = vanished(nvml)
    present = {f.code for f in found}
    for f in found:
        assert named_codes(f.fix) - {f.code} <= present, (f.code, f.fix)


def test_appeared_gpu_fix_names_its_uuid() -> None:
    s = snap(tf=(), baseline=(KnownGpu(UUID0, first_seen=1.0),))
    f = one(diagnose(s, CONFIG), "gpu-appeared", UUID1)
    assert f"`tfgpud baseline forget {UUID1}`" in f.fix


# --- evidence without traceback frames and caret lines -------------------------------------------

TRACEBACK = [
    "Traceback (most recent call last):",
    '  File "<frozen importlib._bootstrap>", line 1176, in _find_and_load',
    '  File "/opt/research/lib/python3.11/site-packages/tensorflow/__init__.py", line 40, '
    "in <module>",
    "    from tensorflow.python import pywrap_tensorflow as _pywrap_tensorflow",
    "    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
    '  File "/opt/research/lib/python3.11/site-packages/tensorflow/python/'
    'pywrap_tensorflow.py", line 73, in <module>',
    "    raise ImportError(msg)",
    '  File "<frozen importlib._bootstrap_external>", line 940, in exec_module',
    "ImportError: libcudart.so.12: cannot open shared object file: No such file or directory",
]


def test_trim_traceback_keeps_the_exception_and_the_last_meaningful_frame() -> None:
    assert trim_traceback(["python 3.11.2", *TRACEBACK, "other evidence"]) == [
        "python 3.11.2",
        '  File "/opt/research/lib/python3.11/site-packages/tensorflow/python/'
        'pywrap_tensorflow.py", line 73, in <module>',
        "    raise ImportError(msg)",
        "ImportError: libcudart.so.12: cannot open shared object file: No such file or directory",
        "other evidence",
    ]
    assert trim_traceback(["plain", "lines"]) == ["plain", "lines"]


def test_doctor_report_shows_no_frames_or_carets(tmp_path: Path) -> None:
    def failing(env: TfEnvConfig, timeout: float) -> TfProbeResult:
        return probe(
            env=env.name,
            python=env.python,
            status=ProbeStatus.IMPORT_FAILED,
            error=TRACEBACK[-1],
            traceback=tuple(TRACEBACK),
            gpus=(),
        )

    out = io.StringIO()
    run_doctor(
        CONFIG,
        python="/opt/research/bin/python",
        as_json=False,
        out=out,
        read_pci=lambda *_: PCI2,
        read_nvml=lambda _: NVML2,
        probe=failing,
    )
    report = out.getvalue()
    assert "^^^^" not in report and "Traceback (most recent call last)" not in report
    assert "<frozen importlib" not in report and "tensorflow/__init__.py" not in report
    assert "raise ImportError(msg)" in report and TRACEBACK[-1] in report


def test_the_new_venv_never_lands_on_a_directory_that_is_not_a_venv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "venvs" / "tf").mkdir(parents=True)  # someone's data, not a venv
    f = one(diagnose(snap(tf=(missing("/nonexistent/python"),)), CONFIG), "tf-import-failed", "cli")
    assert venv_targets(f.fix) == ["~/venvs/tf-2"]
    assert_pasteable(f.fix)


def test_trim_traceback_drops_cut_off_source_lines_and_frozen_only_frames() -> None:
    # The tail of `import tensorflow` failing where TF is not installed, as the probe keeps it.
    tail = [
        "    return _bootstrap._gcd_import(name[level:], package, level)",
        '  File "<frozen importlib._bootstrap>", line 1142, in _find_and_load_unlocked',
        "ModuleNotFoundError: No module named 'tensorflow'",
    ]
    assert trim_traceback(["python 3.11.2", *tail]) == [
        "python 3.11.2",
        "ModuleNotFoundError: No module named 'tensorflow'",
    ]
