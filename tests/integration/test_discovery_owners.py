"""Discovered envs of other users: owner, who can write them, and as whom their code may run.

As root, with a real second user created by the test: discovery reports the owner, the probe
safety walk finds who can write the env's code, :func:`plan_discovered_probe` decides, and the
interpreter (a script that says who runs it) is run as the planned user by the real runner.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

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
