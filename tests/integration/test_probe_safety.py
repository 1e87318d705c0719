"""Probe safety: a root tfgpud never runs code another user can write, unless as that user.

The envs are fake interpreters (shell scripts that answer like tfprobe.py and report the uid
and gid they run as, from inside the child) in directories owned by ``nobody``; the daemon
test starts the real ``tfgpud run`` as root.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess

from tfgpud.collectors.tensorflow import probe_env
from tfgpud.collectors.tensorflow.safety import decide_probe_user, path_writers
from tfgpud.config import Config, TensorflowConfig, TfEnvConfig
from tfgpud.diagnosis import diagnose
from tfgpud.model import ProbeStatus, Snapshot, TfProbeResult

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setuid)")

# Answers like tfprobe.py (schema 1) and says, from inside the child, who it runs as.
FAKE_PYTHON = """#!/bin/sh
printf '{"schema": 1, "tf_version": "2.21.0", "gpus": [], "build_info": {"is_cuda_build": "True"},
 "environment": {"PROBE_UID": "%s", "PROBE_GID": "%s", "PROBE_HOME": "%s"}}\\n' \
 "$(id -u)" "$(id -g)" "$HOME"
"""


def _nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


@pytest.fixture
def env_dir() -> Iterator[Path]:
    """A world-traversable scratch dir (pytest's tmp_path is 0700 root: nobody cannot enter)."""
    d = Path(tempfile.mkdtemp(prefix="tfgpud-probe-safety-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _fake_env(root: Path, owner: pwd.struct_passwd | None, mode: int = 0o755) -> Path:
    """root/venv/bin/python (+ pyvenv.cfg, site-packages), owned by ``owner`` (None: root)."""
    venv = root / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (site / "tensorflow").mkdir()
    python = venv / "bin" / "python"
    python.parent.mkdir()
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    if owner is not None:
        for p in [venv, *venv.rglob("*")]:
            os.chown(p, owner.pw_uid, owner.pw_gid)
    venv.chmod(mode)
    return python


def _finding(result: TfProbeResult, config: Config) -> dict[str, object]:
    snap = Snapshot(taken_at=0.0, sequence=1, tf=(result,))
    found = {f.code: f for f in diagnose(snap, config)}
    f = found["tf-probe-refused"]
    return {"severity": f.severity.value, "summary": f.summary, "fix": f.fix, "ev": f.evidence}


def test_root_refuses_a_user_writable_env_without_run_as(env_dir: Path) -> None:
    python = _fake_env(env_dir, _nobody())
    env = TfEnvConfig(name="alice", python=str(python))
    result = probe_env(env, timeout=10)
    assert result.status is ProbeStatus.REFUSED
    assert result.refused_writers == ("nobody",)
    assert "writable by nobody" in (result.error or "")
    f = _finding(result, Config(tensorflow=TensorflowConfig(envs=[env])))
    assert f["severity"] == "warning"
    assert 'run_as = "nobody"' in str(f["fix"])
    assert any(str(python) in line for line in f["ev"])  # type: ignore[attr-defined]


def test_with_run_as_the_child_runs_as_that_user(env_dir: Path) -> None:
    nobody = _nobody()
    python = _fake_env(env_dir, nobody)
    result = probe_env(TfEnvConfig(name="a", python=str(python), run_as="nobody"), timeout=10)
    assert result.status is ProbeStatus.OK, result
    assert result.environment["PROBE_UID"] == str(nobody.pw_uid)
    assert result.environment["PROBE_GID"] == str(nobody.pw_gid)
    assert result.environment["PROBE_HOME"] == nobody.pw_dir


def test_root_owned_env_is_probed_as_root_and_run_as_still_applies(env_dir: Path) -> None:
    python = _fake_env(env_dir, None)
    result = probe_env(TfEnvConfig(name="sys", python=str(python)), timeout=10)
    assert result.status is ProbeStatus.OK and result.environment["PROBE_UID"] == "0"
    result = probe_env(TfEnvConfig(name="sys", python=str(python), run_as="nobody"), timeout=10)
    assert result.environment["PROBE_UID"] == str(_nobody().pw_uid)


def test_one_user_writable_package_inside_a_root_env_is_enough(env_dir: Path) -> None:
    python = _fake_env(env_dir, None)
    pkg = env_dir / "venv" / "lib" / "python3.11" / "site-packages" / "tensorflow"
    os.chown(pkg, _nobody().pw_uid, 0)
    decision = decide_probe_user(TfEnvConfig(name="e", python=str(python)))
    assert decision.refused is not None and decision.writers == ("nobody",)
    assert any(line.startswith(f"{pkg}: owner nobody") for line in decision.evidence)


def test_world_writable_is_refused_even_with_run_as(env_dir: Path) -> None:
    python = _fake_env(env_dir, _nobody(), mode=0o777)
    env = TfEnvConfig(name="w", python=str(python), run_as="nobody")
    result = probe_env(env, timeout=10)
    assert result.status is ProbeStatus.REFUSED
    assert "everyone" in result.refused_writers
    f = _finding(result, Config(tensorflow=TensorflowConfig(envs=[env])))
    assert "chmod -R go-w" in str(f["fix"])


def test_pythonpath_from_the_environment_table_is_checked(env_dir: Path) -> None:
    python = _fake_env(env_dir, None)
    extra = env_dir / "extra"
    extra.mkdir()
    os.chown(extra, _nobody().pw_uid, _nobody().pw_gid)
    env = TfEnvConfig(name="p", python=str(python), environment={"PYTHONPATH": str(extra)})
    assert decide_probe_user(env).refused is not None


def test_not_root_probes_as_itself_without_checks() -> None:
    env = TfEnvConfig(name="x", python="/nonexistent/python", run_as="nobody")
    decision = decide_probe_user(env, euid=1000)
    assert decision.user is None and decision.refused is None


def test_unknown_run_as_user_is_a_refusal_finding(env_dir: Path) -> None:
    python = _fake_env(env_dir, None)
    env = TfEnvConfig(name="u", python=str(python), run_as="no-such-user-tfgpud")
    result = probe_env(env, timeout=10)
    assert result.status is ProbeStatus.REFUSED and not result.refused_writers
    f = _finding(result, Config(tensorflow=TensorflowConfig(envs=[env])))
    assert "getent passwd no-such-user-tfgpud" in str(f["fix"])


def test_path_writers_sticky_dirs_and_symlinks() -> None:
    tmp = os.stat("/tmp")
    assert tmp.st_mode & stat.S_ISVTX and path_writers(tmp) == set()  # sticky /tmp: not "everyone"
    assert path_writers(os.stat("/usr/bin")) == set()


def _wait_status(d: DaemonProcess, env: str, timeout: float = 20.0) -> dict[str, object]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = d.get("/status")
        doc = json.loads(body)
        for t in doc.get("tensorflow", []):
            if t["env"] == env:
                return doc  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"env {env} never probed; stderr:\n{d.stderr()}")


def test_root_daemon_reports_the_refusal_and_probes_with_run_as(
    tmp_path: Path, env_dir: Path, fakedriver: Path, scenario_path: Path
) -> None:
    from helpers import write_scenario

    write_scenario(scenario_path, gpus=[{"name": "NVIDIA A100-SXM4-80GB"}])
    python = _fake_env(env_dir, _nobody())
    body = (
        f'[[tensorflow.envs]]\nname = "refused"\npython = "{python}"\n'
        f'[[tensorflow.envs]]\nname = "owned"\npython = "{python}"\nrun_as = "nobody"\n'
    )
    with DaemonProcess(tmp_path / "d", body, scenario=scenario_path) as d:
        d.start()
        _wait_status(d, "refused")
        _wait_status(d, "owned")
        _, m = d.wait_metric(
            lambda m: (
                any("tf-probe-refused" in k for k in m)
                and m.get('tfgpud_tf_probe_success{env="owned"}') == 1.0
            )
        )
        doc = _wait_status(d, "owned")
        states = {t["env"]: t["status"] for t in doc["tensorflow"]}  # type: ignore[attr-defined]
        assert states == {"refused": "refused", "owned": "ok"}
        refused = [f for f in doc["findings"] if f["code"] == "tf-probe-refused"]  # type: ignore[attr-defined]
        assert [f["subject"] for f in refused] == ["refused"]
        assert 'run_as = "nobody"' in refused[0]["fix"]
        assert m['tfgpud_tf_probe_success{env="refused"}'] == 0.0
        assert d.stop() == 0


# --- what a root probe must also check (review findings) ----------------------------------------


def _site(env_dir: Path) -> Path:
    return env_dir / "venv" / "lib" / "python3.11" / "site-packages"


def _nobody_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, _nobody().pw_uid, _nobody().pw_gid)
    return path


def test_symlinked_site_entry_to_a_user_dir_is_refused(env_dir: Path) -> None:
    python = _fake_env(env_dir, None)
    target = _nobody_dir(env_dir / "elsewhere" / "pkg")
    (_site(env_dir) / "pkg").symlink_to(target)
    d = decide_probe_user(TfEnvConfig(name="e", python=str(python)))
    assert d.refused is not None and "nobody" in d.writers


def test_directory_added_by_a_pth_file_is_refused(env_dir: Path) -> None:
    python = _fake_env(env_dir, None)
    extra = _nobody_dir(env_dir / "added")
    (_site(env_dir) / "extra.pth").write_text(f"# comment\nimport sys\n{extra}\n")
    d = decide_probe_user(TfEnvConfig(name="e", python=str(python)))
    assert d.refused is not None and any(line.startswith(str(extra)) for line in d.evidence)


def test_a_user_file_deep_inside_a_package_is_refused(env_dir: Path) -> None:
    python = _fake_env(env_dir, None)
    deep = _site(env_dir) / "tensorflow" / "python" / "ops"
    deep.mkdir(parents=True)
    mod = deep / "math_ops.py"
    mod.write_text("")
    os.chown(mod, _nobody().pw_uid, 0)
    d = decide_probe_user(TfEnvConfig(name="e", python=str(python)))
    assert d.refused is not None and any(line.startswith(str(mod)) for line in d.evidence)


def test_too_many_files_fails_closed(env_dir: Path) -> None:
    python = _fake_env(env_dir, None)
    env = TfEnvConfig(name="e", python=str(python))
    n = decide_probe_user(env).checked
    for i in range(30):
        (_site(env_dir) / f"m{i}.py").write_text("")
    assert decide_probe_user(env, limit=n + 40).refused is None
    d = decide_probe_user(env, limit=n + 10)
    assert d.refused is not None and f"more than {n + 10} files" in d.refused


def test_a_symlinked_directory_above_a_path_is_not_walked(env_dir: Path) -> None:
    """LD_LIBRARY_PATH=/lib/x86_64-linux-gnu must not walk all of /usr/lib (/lib -> usr/lib)."""
    python = _fake_env(env_dir, None)
    big = env_dir / "big"
    (big / "sub").mkdir(parents=True)
    for i in range(100):
        (big / f"f{i}").write_text("")
    (env_dir / "link").symlink_to(big)
    n = decide_probe_user(TfEnvConfig(name="e", python=str(python))).checked
    env = TfEnvConfig(
        name="e", python=str(python), environment={"LD_LIBRARY_PATH": str(env_dir / "link/sub")}
    )
    d = decide_probe_user(env)
    assert d.refused is None and d.checked < n + 20


def test_copied_venv_base_interpreter_from_pyvenv_home_is_checked(env_dir: Path) -> None:
    python = _fake_env(env_dir, None)
    base = _nobody_dir(env_dir / "base" / "bin")
    (base / "python3").write_text("")
    (env_dir / "venv" / "pyvenv.cfg").write_text(f"home = {base}\n")
    d = decide_probe_user(TfEnvConfig(name="e", python=str(python)))
    assert d.refused is not None and any(line.startswith(str(base)) for line in d.evidence)


def test_probe_script_in_a_user_writable_dir_is_refused(env_dir: Path) -> None:
    from tfgpud.collectors.tensorflow import PROBE_SCRIPT

    python = _fake_env(env_dir, None)
    checkout = _nobody_dir(env_dir / "checkout" / "tfgpud")
    script = checkout / "tfprobe.py"
    shutil.copy(PROBE_SCRIPT, script)
    result = probe_env(TfEnvConfig(name="dev", python=str(python)), timeout=10, script=script)
    assert result.status is ProbeStatus.REFUSED and "nobody" in result.refused_writers


@pytest.mark.parametrize(
    "var",
    [
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONUSERBASE",
        "PYTHONPLATLIBDIR",
        "HOME",
        "LD_PRELOAD",
        "LD_AUDIT",
    ],
)
def test_variables_that_redirect_code_are_refused_as_root(env_dir: Path, var: str) -> None:
    python = _fake_env(env_dir, None)
    env = TfEnvConfig(name="v", python=str(python), environment={var: "/x"})
    result = probe_env(env, timeout=10)
    assert result.status is ProbeStatus.REFUSED and var in (result.error or "")
    f = _finding(result, Config(tensorflow=TensorflowConfig(envs=[env])))
    assert "run_as" in str(f["fix"]) and "getent" not in str(f["fix"])
    as_user = TfEnvConfig(name="v", python=str(python), environment={var: "/x"}, run_as="nobody")
    assert decide_probe_user(as_user).refused is None


def test_system_python_checks_debian_local_dist_packages() -> None:
    from tfgpud.collectors.tensorflow.safety import code_plan

    local = sorted(Path("/usr/local/lib").glob("python3*/dist-packages"))
    if not Path("/usr/bin/python3").exists() or not local:
        pytest.skip("no Debian-style /usr/local/lib/python3.X/dist-packages")
    plan = code_plan(TfEnvConfig(name="s", python="/usr/bin/python3"), "/usr/bin/python3")
    assert {str(p) for p in local} <= set(plan.trees)


def test_root_probe_ignores_the_callers_home_and_user_site(
    env_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$HOME/.local/.../site-packages of another user must not run as root."""
    python = "/usr/bin/python3"
    if not Path(python).exists():
        pytest.skip("no /usr/bin/python3")
    import subprocess

    ver = subprocess.run(
        [python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    home = _nobody_dir(env_dir / "home")
    user_site = home / ".local" / "lib" / f"python{ver}" / "site-packages"
    user_site.mkdir(parents=True)
    marker = env_dir / "ran-as-root"
    (user_site / "evil.pth").write_text(f"import os; open({str(marker)!r}, 'w').write('x')\n")
    (user_site / "usercustomize.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    for p in [home, *home.rglob("*")]:
        os.chown(p, _nobody().pw_uid, _nobody().pw_gid)
    monkeypatch.setenv("HOME", str(home))
    result = probe_env(TfEnvConfig(name="sys", python=python), timeout=60)
    assert result.status in (ProbeStatus.IMPORT_FAILED, ProbeStatus.OK), result
    assert not marker.exists()


def test_unreachable_interpreter_is_no_access_not_a_crash(env_dir: Path) -> None:
    private = env_dir / "private"
    private.mkdir()
    python = _fake_env(private, None)
    private.chmod(0o700)  # root's: nobody cannot enter
    env = TfEnvConfig(name="p", python=str(python), run_as="nobody")
    result = probe_env(env, timeout=10)
    assert result.status is ProbeStatus.NO_ACCESS, result
    assert result.denied_paths == (str(private),)
    f = _finding(result, Config(tensorflow=TensorflowConfig(envs=[env])))
    assert f["severity"] == "warning" and f"setfacl -m u:nobody:x {private}" in str(f["fix"])
