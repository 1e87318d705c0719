"""run_bounded: time, output and lifetime limits; failures to start are results."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import run_python

from tfgpud.runner import deadline_scope, run_bounded

ROOT = Path(__file__).resolve().parents[2]

ENV = {"PATH": "/usr/bin:/bin"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; only the init reaper can clear it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_exit_status_and_both_streams() -> None:
    r = run_bounded(["sh", "-c", "echo out; echo err >&2; exit 3"], env=ENV, timeout=5)
    assert (r.returncode, r.stdout, r.stderr, r.timed_out) == (3, b"out\n", b"err\n", False)
    assert r.started and r.signal_name is None
    assert r.cpu_seconds is not None and r.max_rss_bytes is not None and r.max_rss_bytes > 0


def test_environment_is_exactly_what_was_given() -> None:
    r = run_bounded(["/usr/bin/env"], env={"ONLY": "this"}, timeout=5)
    assert r.stdout == b"ONLY=this\n"


def test_timeout_kills_the_whole_group_and_leaves_nothing(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    script = f"sleep 1000 & echo $! > {pidfile}; sleep 1000"
    start = time.monotonic()
    r = run_bounded(["sh", "-c", script], env=ENV, timeout=0.5)
    assert r.timed_out and r.signal_name == "SIGKILL" and r.returncode == -9
    assert time.monotonic() - start < 3
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(grandchild)


def test_grandchild_holding_the_pipes_is_killed_when_child_exits(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    r = run_bounded(
        ["sh", "-c", f"sleep 1000 & echo $! > {pidfile}; echo done"], env=ENV, timeout=10
    )
    assert r.returncode == 0 and r.stdout == b"done\n" and not r.timed_out
    assert r.duration_seconds < 3
    grandchild = int(pidfile.read_text())
    time.sleep(0.1)
    assert not _alive(grandchild)


def test_output_is_bounded_and_child_never_blocks() -> None:
    r = run_bounded(
        ["sh", "-c", "head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2; echo end >&2"],
        env=ENV,
        timeout=10,
        max_output=1000,
    )
    assert r.returncode == 0 and not r.timed_out
    assert len(r.stdout) == 1000 and r.stdout_truncated
    assert len(r.stderr) == 1000 and r.stderr_truncated


def test_missing_executable_is_a_result() -> None:
    r = run_bounded(["/nonexistent/bin/python", "x"], env=ENV, timeout=5)
    assert not r.started and r.error == "executable not found: /nonexistent/bin/python"
    assert r.returncode is None


def test_not_executable_is_a_result(tmp_path: Path) -> None:
    f = tmp_path / "python"
    f.write_text("#!/bin/sh\n")
    r = run_bounded([str(f)], env=ENV, timeout=5)
    assert r.error is not None and r.error.startswith("permission denied")


def test_unknown_user_is_a_result() -> None:
    r = run_bounded(["true"], env=ENV, timeout=5, user="no-such-user-tfgpud")
    assert r.error == "unknown user 'no-such-user-tfgpud'"


def test_signal_is_named() -> None:
    r = run_bounded(["sh", "-c", "kill -ILL $$"], env=ENV, timeout=5)
    assert r.signal_name == "SIGILL" and r.returncode == -4 and not r.timed_out


def test_cancel_stops_the_child() -> None:
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    r = run_bounded(["sleep", "1000"], env=ENV, timeout=30, cancel=cancel)
    assert r.cancelled and not r.timed_out and r.duration_seconds < 3


def test_child_closing_its_pipes_is_still_waited_for() -> None:
    r = run_bounded(["sh", "-c", "exec >&- 2>&-; sleep 0.3; exit 4"], env=ENV, timeout=5)
    assert r.returncode == 4 and r.duration_seconds >= 0.3


def test_a_child_not_reaped_in_time_is_handed_to_a_reaper(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILLed child stuck in uninterruptible sleep outlives the reap deadline: it must
    not be left an unreaped zombie, and callers must be able to see that it still exists."""
    from tfgpud import runner

    real_wait4 = os.wait4
    monkeypatch.setattr(runner, "_REAP_SECONDS", 0.05)
    # Pretend the child is still in the kernel for the whole reap window.
    monkeypatch.setattr(runner.os, "wait4", lambda pid, options: (0, 0, None))
    r = run_bounded(["sh", "-c", "exit 0"], env=ENV, timeout=5)
    monkeypatch.setattr(runner.os, "wait4", real_wait4)
    assert r.abandoned_pid is not None and r.returncode is None
    pid = r.abandoned_pid
    deadline = time.monotonic() + 3
    while pid in runner.abandoned_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pid not in runner.abandoned_children()
    assert not Path(f"/proc/{pid}").exists()  # reaped: no zombie left behind


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root")
def test_ambient_capabilities_are_not_passed_to_the_child(tmp_path: Path) -> None:
    # The daemon runs with an ambient CAP_SYS_PTRACE (the README's drop-in); the probe child,
    # which runs code from a user's env, must get none of it.
    code = (
        "from tfgpud.runner import run_bounded\n"
        "r = run_bounded(['/bin/cat', '/proc/self/status'], env={}, timeout=10)\n"
        "amb = [l for l in r.stdout.decode().splitlines() if l.startswith('CapAmb:')][0]\n"
        "mine = [l for l in open('/proc/self/status') if l.startswith('CapAmb:')][0]\n"
        "print(mine.split()[1], amb.split()[1])\n"
    )
    out = subprocess.run(
        [
            "setpriv",
            "--inh-caps=+sys_ptrace",
            "--ambient-caps=+sys_ptrace",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=str(ROOT),
    ).stdout.split()
    assert int(out[0], 16) != 0, "the test did not get an ambient capability"
    assert int(out[1], 16) == 0


def _wait_gone(pid: int, seconds: float = 3.0) -> bool:
    """True once ``pid`` is gone (a zombie counts as gone); kills it when it is not."""
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not _alive(pid):
        return True
    os.kill(pid, signal.SIGKILL)  # leave nothing behind, even when failing
    return False


def test_a_grandchild_in_its_own_session_holding_the_pipes_is_killed(tmp_path: Path) -> None:
    """setsid() leaves the process group the group kill reaches; the pipes it keeps give it
    away (this process is no subreaper, so that is the only trace)."""
    pidfile = tmp_path / "grandchild"
    r = run_bounded(
        ["sh", "-c", f"setsid sleep 1000 & echo $! > {pidfile}; sleep 0.3; echo done"],
        env=ENV,
        timeout=10,
    )
    assert r.returncode == 0 and r.stdout == b"done\n" and not r.timed_out
    assert r.duration_seconds < 3
    assert _wait_gone(int(pidfile.read_text()))


def test_on_timeout_a_grandchild_in_its_own_session_is_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    script = f"setsid sh -c 'exec >/dev/null 2>&1; sleep 1000' & echo $! > {pidfile}; sleep 1000"
    r = run_bounded(["sh", "-c", script], env=ENV, timeout=1.0)
    assert r.timed_out
    assert _wait_gone(int(pidfile.read_text()))  # seen by the /proc walk while it ran


def test_a_subreaper_kills_and_reaps_an_orphan_that_closed_its_pipes() -> None:
    """The daemon's case: a grandchild that left the session and closed stdout and stderr,
    orphaned when its parent exited. It comes back to the subreaper, which kills and reaps it.
    Run in a fresh process: a subreaper test process would adopt every orphan of the suite."""
    code = (
        "import json, os, time\n"
        "from tfgpud.runner import become_subreaper, run_bounded\n"
        "assert become_subreaper()\n"
        "script = \"setsid sh -c 'exec >/dev/null 2>&1; sleep 1000' & echo $!\"\n"
        "r = run_bounded(['sh', '-c', script], env={'PATH': '/usr/bin:/bin'}, timeout=10)\n"
        "pid = int(r.stdout)\n"
        "time.sleep(0.2)\n"
        "print(json.dumps({'rc': r.returncode, 'left': os.path.exists(f'/proc/{pid}'),\n"
        "                  'children': open(f'/proc/{os.getpid()}/task/{os.getpid()}/children')\n"
        "                  .read().split()}))\n"
    )
    out = run_python(code, scenario=None)
    assert out.data == {"rc": 0, "left": False, "children": []}, out.stderr


def test_a_deadline_scope_bounds_several_runs_together() -> None:
    start = time.monotonic()
    with deadline_scope(1.0):
        first = run_bounded(["sleep", "30"], env=ENV, timeout=30)
        second = run_bounded(["sleep", "30"], env=ENV, timeout=30)
    assert first.timed_out and second.timed_out
    assert time.monotonic() - start < 4
    assert run_bounded(["true"], env=ENV, timeout=5).returncode == 0  # no scope outside
