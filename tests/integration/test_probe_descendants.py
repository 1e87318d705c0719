"""Every descendant of a TensorFlow probe ends with the probe, on the real ``tfgpud run``.

The env's "python" is a shell script that leaves two processes behind in sessions of their
own (``setsid``): one keeping the probe's stdout and stderr open, one with them closed. As
root the daemon also runs it as ``nobody`` for the safety pre-check, which leaves two more.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess
from helpers import fakedriver_env, write_scenario

ESCAPE = """#!/bin/sh
echo $$ >> {pids}/self-$(id -u)
setsid sleep 1000 &
echo $! >> {pids}/left-$(id -u)
setsid sh -c 'exec >/dev/null 2>&1 </dev/null; exec sleep 1000' &
echo $! >> {pids}/left-$(id -u)
sleep 0.3
"""
ANSWER = """printf '{"schema": 1, "tf_version": "2.21.0", "gpus": [], "build_info": {}}\\n'\n"""
HANG = "exec sleep 1000\n"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A world-traversable dir (pytest's tmp_path is 0700: nobody could not run the script)."""
    d = Path(tempfile.mkdtemp(prefix="tfgpud-descendants-"))
    d.chmod(0o755)
    (d / "pids").mkdir(mode=0o777)
    (d / "pids").chmod(0o777)  # the pre-check's copy runs as nobody and writes here too
    try:
        yield d
    finally:
        for pid in _pids(d, "*"):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)  # never leave them behind, even when failing
        shutil.rmtree(d)


def _pids(scratch: Path, pattern: str = "left-*") -> list[int]:
    """Pids the fake interpreter wrote: what it left behind (default), or with "*" itself too."""
    return [int(x) for f in (scratch / "pids").glob(pattern) for x in f.read_text().split()]


def _fake_python(scratch: Path, tail: str) -> Path:
    python = scratch / "bin" / "python"
    python.parent.mkdir(mode=0o755)
    python.write_text(ESCAPE.format(pids=scratch / "pids") + tail)
    python.chmod(0o755)
    return python


def _wait_gone(pids: list[int], seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _daemon(tmp: Path, scenario: Path, python: Path, timeout: float) -> DaemonProcess:
    write_scenario(scenario, gpus=[{"name": "NVIDIA A100-SXM4-80GB"}])
    body = (
        f"[tensorflow]\ntimeout_seconds = {timeout}\n"
        f'[[tensorflow.envs]]\nname = "escapes"\npython = "{python}"\n'
    )
    return DaemonProcess(tmp / "d", body, scenario=scenario)


def _wait_probed(d: DaemonProcess, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in json.loads(d.get("/status")[1]).get("tensorflow", []):
            return str(t["status"])
        time.sleep(0.1)
    raise AssertionError(f"never probed; stderr:\n{d.stderr()}")


def test_no_descendant_of_a_probe_survives_it(
    tmp_path: Path, scratch: Path, fakedriver: Path, scenario_path: Path
) -> None:
    python = _fake_python(scratch, ANSWER)
    with _daemon(tmp_path, scenario_path, python, timeout=30) as d:
        d.start()
        assert _wait_probed(d) == "ok"
        pids = _pids(scratch)
        assert len(pids) == (4 if os.geteuid() == 0 else 2), pids  # root: the pre-check too
        assert _wait_gone(_pids(scratch, "*")) == []
        assert d.stop() == 0


def test_a_hung_probe_and_its_descendants_end_with_the_daemon(
    tmp_path: Path, scratch: Path, fakedriver: Path, scenario_path: Path
) -> None:
    python = _fake_python(scratch, HANG)
    with _daemon(tmp_path, scenario_path, python, timeout=600) as d:
        d.start()
        deadline = time.monotonic() + 20
        while len(_pids(scratch)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # in their own sessions by now
        assert len(_pids(scratch)) >= 2
        assert d.stop() == 0
        assert _wait_gone(_pids(scratch, "*")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the pre-check runs only as root")
def test_the_root_pre_check_is_bounded_by_the_probe_timeout(
    tmp_path: Path, scratch: Path, fakedriver: Path, scenario_path: Path
) -> None:
    """The pre-check asks the interpreter, as nobody, for its sys.path: one that hangs then
    must not add its own 20 s to timeout_seconds."""
    python = _fake_python(scratch, HANG)
    with _daemon(tmp_path, scenario_path, python, timeout=2) as d:
        d.start()
        started = time.monotonic()
        assert _wait_probed(d) == "timeout"
        assert time.monotonic() - started < 2 + 4
        assert _wait_gone(_pids(scratch, "*")) == []


@pytest.mark.parametrize("linger", [True, False])
def test_no_descendant_of_a_doctor_probe_survives_doctor(
    tmp_path: Path, scratch: Path, fakedriver: Path, scenario_path: Path, linger: bool
) -> None:
    # Without the linger the interpreter exits at once: what it left is re-parented before
    # anyone could see it as a descendant.
    python = _fake_python(scratch, ANSWER)
    if not linger:
        python.write_text(python.read_text().replace("sleep 0.3\n", ""))
    write_scenario(scenario_path, gpus=[{"name": "NVIDIA A100-SXM4-80GB"}])
    (tmp_path / "tfgpud.toml").write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[tensorflow.discover]\nenabled = false\n'
    )
    config = tmp_path / "tfgpud.toml"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tfgpud",
            "doctor",
            "--config",
            str(config),
            "--python",
            str(python),
        ],
        env=fakedriver_env(scenario_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode in (0, 1, 2), r.stdout + r.stderr
    assert len(_pids(scratch)) == (4 if os.geteuid() == 0 else 2)
    assert _wait_gone(_pids(scratch, "*"), 2.0) == []
