"""The only place tfgpud starts processes: bounded in time, output and lifetime.

Every child runs in its own session (so its process group id is its pid), with stdin closed,
an explicit environment, and both pipes drained concurrently into bounded buffers. When the
child exits, or the deadline passes, or the caller cancels, the whole group is SIGKILLed before
the child is reaped, so nothing it forked outlives it. A SIGKILLed child that does not die
within a few seconds (uninterruptible sleep, e.g. in a GPU driver call) is handed to a reaper
thread, which waits for it; :func:`abandoned_children` lists those still alive so callers can
hold back from starting another child for the same work. :func:`children` lists every child not
reaped yet: their sessions are this process's own doing (the workloads scan skips them).

A child switched to another user (a probe run as an env's owner) cannot be signalled by a
daemon that holds CAP_SETUID but not CAP_KILL: its group is then killed by a short helper
switched to the same user, so timeouts and cancels hold for it too.
"""

from __future__ import annotations

import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MIB = 1024 * 1024
_CHUNK = 65536
_POLL_SECONDS = 0.05  # how often the loop checks for child exit / cancel while pipes are quiet
_DRAIN_SECONDS = 1.0  # after the group is killed, how long to wait for the pipes to close
_REAP_SECONDS = 5.0  # a SIGKILLed process in uninterruptible sleep may take a while
_KILL_HELPER_SECONDS = 5.0  # the helper that kills another user's group: a Python start-up


@dataclass(frozen=True)
class RunResult:
    """What happened to one child. ``error`` is set when it could not be started at all."""

    argv: tuple[str, ...]
    returncode: int | None  # exit status; negative signal number when killed (like Popen)
    signal_name: str | None  # e.g. "SIGILL" when the child died by a signal
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    duration_seconds: float
    cpu_seconds: float | None  # user + system time of the child (and children it reaped)
    max_rss_bytes: int | None
    error: str | None = None  # e.g. "executable not found: /x/bin/python"
    cancelled: bool = False
    # Set when the killed child was still not reaped after a few seconds (stuck in the kernel):
    # a reaper thread waits for it; see abandoned_children().
    abandoned_pid: int | None = None

    @property
    def started(self) -> bool:
        return self.error is None


class _Capture:
    """Keeps the first ``limit`` bytes of a stream and counts (then drops) the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.kept = 0
        self.truncated = False

    def add(self, data: bytes) -> None:
        room = self.limit - self.kept
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        if data:
            self.parts.append(data)
            self.kept += len(data)

    def value(self) -> bytes:
        return b"".join(self.parts)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _user_ids(user: str) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary gids) of ``user``; raise KeyError when unknown."""
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid)


_children: set[int] = set()
# Held while a child is started and registered: children() answers after any start under way,
# so a process seen in /proc before children() was asked is either listed or not ours.
_children_lock = threading.Lock()


def children() -> frozenset[int]:
    """Pids of the children started here and not reaped yet (running, or killed and handed to
    the reaper). Each leads its own session: every process in those sessions is ours."""
    with _children_lock:
        return frozenset(_children)


def _start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    user: int | None,
    group: int | None,
    extra_groups: list[int] | None,
    capture: bool,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (stdin closed; stdout and stderr piped when
    ``capture``), registered in :func:`children` before anyone can ask. Raises what Popen
    raises."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    with _children_lock:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
        _children.add(proc.pid)
    return proc


def _forget(pid: int) -> None:
    with _children_lock:
        _children.discard(pid)


# Run by this process's own interpreter as the group's user: sends SIGKILL to the group.
_KILL_CODE = "import os, sys; os.killpg(int(sys.argv[1]), 9)"


def _kill_group(pgid: int, owner: tuple[int, int] | None = None) -> None:
    """SIGKILL process group ``pgid``; ``owner`` (uid, gid): the user it was switched to."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        if owner is not None:
            _kill_group_as(pgid, *owner)


def _kill_group_as(pgid: int, uid: int, gid: int) -> None:
    """Kill the group of a child switched to ``uid``: without CAP_KILL only that user may
    signal it (CAP_SETUID lets this process start a helper as that user, not signal it)."""
    argv = _without_ambient_caps((sys.executable, "-I", "-S", "-c", _KILL_CODE, str(pgid)))
    try:
        helper = _start(argv, env={}, cwd="/", user=uid, group=gid, extra_groups=[], capture=False)
    except (OSError, ValueError, subprocess.SubprocessError):
        return  # nothing more to try: the caller's reap deadline and reaper still apply
    try:
        helper.wait(_KILL_HELPER_SECONDS)
    except subprocess.TimeoutExpired:
        hand_to_reaper(helper.pid)  # it is another user's too: not ours to kill
        helper.returncode = -signal.SIGKILL  # the reaper waits for it, not Popen.__del__
    else:
        _forget(helper.pid)


def _exited(pid: int) -> bool:
    """True once the child has exited; it stays a zombie (WNOWAIT) so its pgid stays reserved."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


_abandoned: set[int] = set()
_abandoned_lock = threading.Lock()


def abandoned_children() -> frozenset[int]:
    """Pids of children given up on (killed but not yet exited) that still exist."""
    with _abandoned_lock:
        return frozenset(_abandoned)


def _reaper(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    finally:
        with _abandoned_lock:
            _abandoned.discard(pid)
        _forget(pid)


def hand_to_reaper(pid: int) -> None:
    """Let a daemon thread wait for (and so reap) child ``pid``; it stays listed meanwhile."""
    with _abandoned_lock:
        _abandoned.add(pid)
    threading.Thread(target=_reaper, args=(pid,), name=f"reap-{pid}", daemon=True).start()


def _reap(pid: int) -> tuple[int | None, float | None, int | None]:
    """Reap ``pid``; return (wait status, cpu seconds, max rss bytes), None where unknown."""
    deadline = time.monotonic() + _REAP_SECONDS
    while True:
        try:
            wpid, status, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            return None, None, None
        if wpid == pid:
            # ru_maxrss is in KiB on Linux.
            return status, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024
        if time.monotonic() >= deadline:
            return None, None, None
        time.sleep(0.01)


def _still_ours(pid: int) -> bool:
    """True while ``pid`` is our unreaped child (running or a zombie)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


SETPRIV = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")


CAP_SETGID, CAP_SETUID = 6, 7


def _cap_set(name: str, status: str = "/proc/self/status") -> int | None:
    """This process's capability set ``name`` ("CapEff", "CapAmb", ...) as a bit mask."""
    try:
        with open(status, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(f"{name}:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _has_ambient_caps(status: str = "/proc/self/status") -> bool:
    return bool(_cap_set("CapAmb", status))


def can_switch_user(status: str = "/proc/self/status") -> bool:
    """Whether ``run_bounded(user=...)`` can work here: root, or CAP_SETUID and CAP_SETGID in
    this process's effective set (the packaged unit grants both)."""
    if os.geteuid() == 0:
        return True
    caps = _cap_set("CapEff", status) or 0
    return bool(caps & (1 << CAP_SETUID)) and bool(caps & (1 << CAP_SETGID))


def _without_ambient_caps(argv: tuple[str, ...]) -> tuple[str, ...]:
    """``argv`` behind setpriv clearing the ambient and inheritable sets, when this process
    has ambient capabilities (they survive execve of ordinary programs, and setuid between
    two non-root users keeps them). Raises LookupError when setpriv is needed but missing."""
    if not _has_ambient_caps():
        return argv
    if SETPRIV is None:
        raise LookupError("this process has ambient capabilities and setpriv is not installed")
    return (SETPRIV, "--ambient-caps=-all", "--inh-caps=-all", "--", *argv)


def run_bounded(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    max_output: int = MIB,
    cwd: str | None = None,
    user: str | None = None,
    cancel: threading.Event | None = None,
) -> RunResult:
    """Run ``argv`` with exactly ``env``; never raises for anything the child does.

    Returns within about ``timeout`` + 1 s. Keeps the first ``max_output`` bytes of stdout and
    of stderr (the rest is read and dropped so the child never blocks on a full pipe). On
    timeout or ``cancel`` the child's whole process group is SIGKILLed; it is also killed once
    the child itself exits, so a grandchild left sleeping is not left behind (a descendant that
    starts its own session escapes this; only a cgroup would catch it). ``user`` switches uid,
    gid and supplementary groups (needs root, or CAP_SETUID and CAP_SETGID: see
    :func:`can_switch_user`); the child keeps no capability that this process holds as
    ambient. A child that cannot be started (missing or
    non-executable file, unknown user) gives a result with ``error`` set.
    """
    args = tuple(argv)
    start = time.monotonic()

    def failed(message: str) -> RunResult:
        return RunResult(
            argv=args,
            returncode=None,
            signal_name=None,
            stdout=b"",
            stderr=b"",
            stdout_truncated=False,
            stderr_truncated=False,
            timed_out=False,
            duration_seconds=time.monotonic() - start,
            cpu_seconds=None,
            max_rss_bytes=None,
            error=message,
        )

    uid: int | None = None
    gid: int | None = None
    groups: list[int] | None = None
    if user is not None:
        try:
            uid, gid, groups = _user_ids(user)
        except KeyError:
            return failed(f"unknown user {user!r}")
    # A daemon given capabilities (CAP_SETUID/CAP_SETGID to probe as an env's owner,
    # CAP_SYS_PTRACE to see other users' jobs) must not pass them on to code from a user's env.
    try:
        args = _without_ambient_caps(args)
    except LookupError as exc:
        return failed(str(exc))
    owner = (uid, gid) if uid is not None and gid is not None else None
    try:
        proc = _start(  # argv comes from the operator's configuration
            args, env=env, cwd=cwd, user=uid, group=gid, extra_groups=groups, capture=True
        )
    except FileNotFoundError as exc:
        missing = exc.filename if exc.filename is not None else args[0] if args else "?"
        if cwd is not None and missing == cwd:
            return failed(f"working directory not found: {cwd}")
        return failed(f"executable not found: {missing}")
    except PermissionError as exc:
        return failed(f"permission denied starting {args[0] if args else '?'}: {exc.strerror}")
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return failed(f"cannot start {args[0] if args else '?'}: {exc}")

    deadline = start + timeout
    captures = {"stdout": _Capture(max_output), "stderr": _Capture(max_output)}
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ, name)
    timed_out = cancelled = killed = False
    drain_until: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if not killed:
                if now >= deadline:
                    timed_out = True
                elif cancel is not None and cancel.is_set():
                    cancelled = True
                if timed_out or cancelled or _exited(proc.pid):
                    # Kill the group while the child is an unreaped zombie: its pid (= pgid)
                    # cannot be reused yet, so this cannot hit an unrelated process.
                    _kill_group(proc.pid, owner)
                    killed = True
                    drain_until = now + _DRAIN_SECONDS
            if drain_until is not None and now >= drain_until:
                break
            for key, _ in sel.select(_POLL_SECONDS):
                try:
                    data = os.read(key.fd, _CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    captures[key.data].add(data)
                else:
                    sel.unregister(key.fileobj)
        if not killed:
            # Pipes closed before we noticed the exit: the child may still be running (it
            # closed its own stdout/stderr). Wait for it within the deadline, then kill.
            while not _exited(proc.pid):
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                if cancel is not None and cancel.is_set():
                    cancelled = True
                    break
                time.sleep(_POLL_SECONDS)
            _kill_group(proc.pid, owner)
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
        status, cpu, rss = _reap(proc.pid)
        abandoned: int | None = None
        if status is None and _still_ours(proc.pid):
            abandoned = proc.pid
            hand_to_reaper(proc.pid)
        else:
            _forget(proc.pid)
        # Tell Popen the child is gone (or the reaper's) so it neither waits nor warns in __del__.
        proc.returncode = (
            os.waitstatus_to_exitcode(status) if status is not None else -signal.SIGKILL
        )

    returncode: int | None = None
    signal_name: str | None = None
    if status is not None:
        returncode = os.waitstatus_to_exitcode(status)
        if os.WIFSIGNALED(status):
            signal_name = _signal_name(os.WTERMSIG(status))
    out, err = captures["stdout"], captures["stderr"]
    return RunResult(
        argv=args,
        returncode=returncode,
        signal_name=signal_name,
        stdout=out.value(),
        stderr=err.value(),
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
        timed_out=timed_out,
        duration_seconds=time.monotonic() - start,
        cpu_seconds=cpu,
        max_rss_bytes=rss,
        cancelled=cancelled,
        abandoned_pid=abandoned,
    )
