"""Discovered envs of other users: owner, who can write them, and as whom their code may run.

As root, with a real second user created by the test: discovery reports the owner, the probe
safety walk finds who can write the env's code, :func:`plan_discovered_probe` decides, and the
interpreter (a script that says who runs it) is run as the planned user by the real runner.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tfgpud.collectors.discovery import (
    DiscoveredEnv,
    ProbeAs,
    discover_envs,
    merge_envs,
    plan_discovered_probe,
)
from tfgpud.collectors.tensorflow.safety import decide_probe_user
from tfgpud.config import DiscoverConfig, TfEnvConfig
from tfgpud.runner import run_bounded

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None, reason="needs root and useradd"
)

WHOAMI = "#!/bin/sh\nid -u\n"


def _retry(argv: list[str]) -> None:
    """useradd/userdel, retried while another process holds the passwd lock."""
    for _ in range(50):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        if "lock" not in proc.stderr:
            raise RuntimeError(f"{argv}: {proc.stderr.strip()}")
        time.sleep(0.2)
    raise RuntimeError(f"{argv}: passwd stayed locked")


@pytest.fixture
def user() -> Iterator[pwd.struct_passwd]:
    """A real user with its own private group, removed afterwards."""
    name = f"tfgpud-d{os.getpid() % 100000}"
    no_login = ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]
    _retry(["useradd", "--user-group", "--no-create-home", *no_login, name])
    try:
        yield pwd.getpwnam(name)
    finally:
        _retry(["userdel", name])


@pytest.fixture
def fs(shared_tmp: Path) -> Path:
    return shared_tmp


def _venv(fs: Path, path: str, owner: pwd.struct_passwd | None) -> Path:
    """A TF venv whose bin/python is a script printing the uid it runs as."""
    prefix = fs / path.lstrip("/")
    site = prefix / "lib" / "python3.11" / "site-packages"
    meta = site / "tensorflow-2.21.0.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorflow\nVersion: 2.21.0\n")
    (prefix / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.2\n")
    (prefix / "bin").mkdir()
    (prefix / "bin" / "python").write_text(WHOAMI)
    (prefix / "bin" / "python").chmod(0o755)
    if owner is not None:
        for p in [prefix, *prefix.rglob("*")]:
            os.chown(p, owner.pw_uid, owner.pw_gid)
    return prefix


def _find(fs: Path) -> DiscoveredEnv:
    result = discover_envs(
        DiscoverConfig(roots=("/home", "/srv")),
        fsroot=str(fs),
        homes=(),
        kernel_dirs=(),
        system_prefixes=(),
    )
    (env,) = result.envs
    return env


def _writers(env: DiscoveredEnv) -> tuple[str, ...]:
    """Who can write the env's code, by the probe safety walk (nothing is executed)."""
    config = TfEnvConfig(name=env.env, python=env.python, run_as=env.owner)
    return decide_probe_user(config, euid=0, query=None).writers


def _runs_as(env: DiscoveredEnv, user: str | None) -> int:
    (target,) = merge_envs([], [env])
    run = run_bounded(
        [target.config.python], env={"PATH": "/usr/bin:/bin"}, timeout=10, cwd="/", user=user
    )
    assert run.returncode == 0, run
    return int(run.stdout.decode().strip())


def test_an_env_owned_by_another_user_runs_as_that_user(fs: Path, user: pwd.struct_passwd) -> None:
    home = fs / "home" / user.pw_name
    home.mkdir(parents=True)
    _venv(fs, f"/home/{user.pw_name}/tf", user)

    env = _find(fs)

    assert (env.owner, env.owner_uid) == (user.pw_name, user.pw_uid)
    writers = _writers(env)
    assert set(writers) <= {user.pw_name, f"group:{user.pw_name}"} and writers
    plan = plan_discovered_probe(env, writers, daemon_uid=0, switch=True)
    assert (plan.how, plan.user) == (ProbeAs.OWNER, user.pw_name), plan.reason
    assert _runs_as(env, plan.user) == user.pw_uid


def test_an_env_a_shared_group_can_write_is_not_run(fs: Path, user: pwd.struct_passwd) -> None:
    prefix = _venv(fs, "/home/x/tf", user)
    site = prefix / "lib/python3.11/site-packages"
    shared = grp.getgrnam("users")
    os.chown(site, user.pw_uid, shared.gr_gid)
    site.chmod(0o775)

    env = _find(fs)
    writers = _writers(env)

    assert "group:users" in writers
    plan = plan_discovered_probe(env, writers, daemon_uid=0, switch=True)
    assert plan.how is ProbeAs.NOT_RUN and plan.user is None
    assert "group:users" in plan.reason


def test_a_world_writable_env_is_not_run_even_as_its_owner(
    fs: Path, user: pwd.struct_passwd
) -> None:
    prefix = _venv(fs, "/srv/tf", user)
    (prefix / "bin").chmod(0o777)
    env = _find(fs)
    plan = plan_discovered_probe(env, _writers(env), daemon_uid=0, switch=True)
    assert plan.how is ProbeAs.NOT_RUN and "everyone" in plan.reason


def test_a_root_owned_env_runs_as_nobody_never_as_root(fs: Path) -> None:
    _venv(fs, "/srv/tf", None)
    env = _find(fs)
    assert env.owner_uid == 0
    writers = _writers(env)
    assert writers == ()
    plan = plan_discovered_probe(env, writers, daemon_uid=0, switch=True)
    assert (plan.how, plan.user) == (ProbeAs.UNPRIVILEGED, "nobody")
    assert _runs_as(env, plan.user) == pwd.getpwnam("nobody").pw_uid


# --- the daemon's probe of a discovered env (tfgpud.collectors.tensorflow.discovered) ----------

# Answers like tfprobe.py (schema 1) and says, from inside the child, its uid and capabilities.
REPORTER = """#!/bin/sh
caps=$(grep -E '^Cap(Inh|Prm|Eff|Amb):' /proc/$$/status | tr -s '\\t ' ' ' | tr '\\n' ';')
printf '{"schema": 1, "tf_version": "2.21.0", "gpus": [], "build_info": {"is_cuda_build": "True"},
 "environment": {"PROBE_UID": "%s", "PROBE_CAPS": "%s"}}\\n' "$(id -u)" "$caps"
"""
REPO = Path(__file__).resolve().parents[2]


def _reporting_venv(fs: Path, path: str, owner: pwd.struct_passwd, python: str) -> Path:
    prefix = _venv(fs, path, None)
    (prefix / "bin" / "python").write_text(python)
    for p in [prefix, *prefix.rglob("*")]:
        os.chown(p, owner.pw_uid, owner.pw_gid)
    return prefix


def _caps(report: str) -> dict[str, int]:
    """``CapEff: 0000...;CapPrm: ...`` -> {"CapEff": 0, ...}."""
    pairs = (item.split(":") for item in report.split(";") if ":" in item)
    return {k.strip(): int(v.strip(), 16) for k, v in pairs}


def test_the_daemons_probe_of_another_users_env_runs_as_that_user(
    fs: Path, user: pwd.struct_passwd
) -> None:
    from tfgpud.collectors.tensorflow import probe_env
    from tfgpud.collectors.tensorflow.discovered import probe_target
    from tfgpud.model import ProbeStatus

    (fs / "home" / user.pw_name).mkdir(parents=True)
    _reporting_venv(fs, f"/home/{user.pw_name}/tf", user, REPORTER)
    env = _find(fs)
    (target,) = merge_envs([], [env])
    result = probe_target(target, lambda config: probe_env(config, timeout=30))
    assert result.status is ProbeStatus.OK, result
    assert result.environment["PROBE_UID"] == str(user.pw_uid)  # said by the child itself
    caps = _caps(result.environment["PROBE_CAPS"])
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == caps["CapInh"] == 0, caps


def test_a_world_writable_env_is_never_executed_and_reports_its_metadata(
    fs: Path, user: pwd.struct_passwd
) -> None:
    import io

    from tfgpud.config import parse_config
    from tfgpud.doctor import run_doctor
    from tfgpud.model import GpuReading, NvmlReading, PciReading

    marks = fs / "marks"
    marks.mkdir()
    marks.chmod(0o777)  # whoever ran it could leave the mark
    marker = marks / "ran"
    prefix = _reporting_venv(
        fs, "/srv/shared-tf", user, f"#!/bin/sh\nid -u > {marker}\n" + REPORTER.split("\n", 1)[1]
    )
    (prefix / "bin").chmod(0o777)
    config = parse_config(
        f'[daemon]\nstate_dir = "{fs / "state"}"\n'
        f'[tensorflow.discover]\nroots = ["{fs / "srv"}"]\n'
        "jupyter = false\nconda = false\nsystem = false\n"
    )
    out = io.StringIO()
    nvml = NvmlReading(up=True, driver_version="550.54.14", gpus=(GpuReading(0, "GPU-a"),))
    code = run_doctor(
        config,
        python=None,
        as_json=True,
        out=out,
        read_pci=lambda *_: PciReading(),
        read_nvml=lambda _: nvml,
    )
    doc = json.loads(out.getvalue())
    assert not marker.exists()  # not as its owner, not as nobody, not as root
    (tf,) = doc["snapshot"]["tf"]
    assert tf["status"] == "not-run" and "everyone" in tf["refused_writers"]
    (f,) = [f for f in doc["findings"] if f["code"] == "tf-probe-refused"]
    assert f["subject"] == tf["env"] and f["severity"] == "warning" and code == 1
    evidence = "\n".join(f["evidence"])
    assert f"tensorflow 2.21.0 in {prefix}/lib/python3.11/site-packages" in evidence
    assert "Python 3.11.2: within the range TensorFlow 2.21" in evidence
    assert f"{prefix}/bin: owner {user.pw_name}" in evidence
    assert f"sudo chmod -R go-w {prefix}" in f["fix"]


# Run as a user holding only CAP_SETUID and CAP_SETGID (ambient, as the packaged unit grants
# them): the same probe of a discovered env, and what the child says about itself.
CAPABLE = """
import json, os, sys
from tfgpud.collectors.discovery import discover_envs, merge_envs
from tfgpud.collectors.tensorflow import probe_env
from tfgpud.collectors.tensorflow.discovered import probe_target
from tfgpud.config import DiscoverConfig
from tfgpud.runner import can_switch_user

fs = sys.argv[1]
settings = DiscoverConfig(roots=("/home",), jupyter=False, conda=False, system=False)
(env,) = discover_envs(settings, fsroot=fs, homes=()).envs
(target,) = merge_envs([], [env])
result = probe_target(target, lambda config: probe_env(config, timeout=30))
with open("/proc/self/status") as fh:
    mine = [line.split()[1] for line in fh if line.startswith("CapEff:")][0]
print(json.dumps({"uid": os.geteuid(), "can_switch": can_switch_user(), "cap_eff": mine,
                  "status": result.status.value, "error": result.error,
                  "environment": dict(result.environment)}))
"""


def _as_capable_nobody(code: str, arg: str) -> dict[str, Any]:
    """Run ``code`` (printing a JSON line last) as nobody holding only CAP_SETUID and
    CAP_SETGID, ambient: the packaged daemon's privileges, as an unprivileged user."""
    site = REPO / ".venv" / "lib" / "python3.11" / "site-packages"
    if not Path("/usr/bin/python3").exists() or not site.is_dir():
        pytest.skip("needs /usr/bin/python3 and the checkout's .venv")
    nobody = pwd.getpwnam("nobody")
    proc = subprocess.run(
        [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            "--inh-caps=+setuid,+setgid",
            "--ambient-caps=+setuid,+setgid",
            "--",
            "/usr/bin/python3",  # the checkout's interpreter may be out of nobody's reach
            "-c",
            code,
            arg,
        ],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{site}", "HOME": "/nonexistent"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uid"] == nobody.pw_uid, out
    return out


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_with_only_cap_setuid_and_setgid_the_probe_child_holds_no_capability(
    fs: Path, user: pwd.struct_passwd
) -> None:
    (fs / "home" / user.pw_name).mkdir(parents=True)
    _reporting_venv(fs, f"/home/{user.pw_name}/tf", user, REPORTER)
    out = _as_capable_nobody(CAPABLE, str(fs))
    # The stand-in daemon: an unprivileged user with exactly the two capabilities.
    assert out["can_switch"] is True
    assert int(out["cap_eff"], 16) == (1 << 6) | (1 << 7)
    assert out["status"] == "ok", out
    assert out["environment"]["PROBE_UID"] == str(user.pw_uid)  # switched to the owner
    caps = _caps(out["environment"]["PROBE_CAPS"])
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == caps["CapInh"] == 0, caps


# The stand-in daemon (nobody with CAP_SETUID/CAP_SETGID) runs a child as another user that
# outlives its timeout, with a grandchild in its group: both must be killed, though the daemon
# may not signal that user's processes itself (it has no CAP_KILL).
KILLS = """
import json, os, sys
from tfgpud.runner import children, run_bounded
r = run_bounded(["/bin/sh", "-c", "sleep 600 & exec sleep 600"], env={"PATH": "/usr/bin:/bin"},
                timeout=0.5, cwd="/", user=sys.argv[1])
print(json.dumps({"uid": os.geteuid(), "timed_out": r.timed_out, "signal": r.signal_name,
                  "abandoned": r.abandoned_pid, "children": sorted(children())}))
"""


def _processes_of(uid: int) -> list[str]:
    """ "PID name" of each live process of ``uid``."""
    found = []
    for name in os.listdir("/proc"):
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)] and fields["State"].split()[0] != "Z":
            found.append(f"{name} {fields['Name'].strip()}")
    return found


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_with_only_cap_setuid_and_setgid_a_timed_out_child_of_another_user_is_killed(
    user: pwd.struct_passwd,
) -> None:
    try:
        out = _as_capable_nobody(KILLS, user.pw_name)
        # Killed within the reap deadline, not handed to a reaper with the group still alive.
        assert out["timed_out"] and out["signal"] == "SIGKILL" and out["abandoned"] is None, out
        assert out["children"] == [], out  # every child (the kill helper too) reaped
        assert _processes_of(user.pw_uid) == []  # the grandchild too
    finally:
        for line in _processes_of(user.pw_uid):  # only this test's fresh user's: ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
