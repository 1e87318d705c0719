"""The only place tfgpud starts processes: bounded in time, output and lifetime.

Every child runs in its own session (so its process group id is its pid), with stdin closed,
an explicit environment, and both pipes drained concurrently into bounded buffers. When the
child exits, or the deadline passes, or the caller cancels, the whole group is SIGKILLed before
the child is reaped, and so is every other descendant found: those seen while it ran (a
``/proc`` walk of its children), those re-parented to this process after their parent died
(the daemon is a child subreaper, see :func:`become_subreaper`, so a grandchild that called
``setsid()`` comes back here rather than to init), and any process still holding the child's
stdout or stderr pipe. Nothing the child started outlives it. A SIGKILLed child that does not
die within a few seconds (uninterruptible sleep, e.g. in a GPU driver call) is handed to a
reaper thread, which waits for it; :func:`abandoned_children` lists those still alive so
callers can hold back from starting another child for the same work. :func:`deadline_scope`
bounds several runs (a probe and its safety pre-check) by one deadline. :func:`children` lists
every child not reaped yet: their sessions are this process's own doing (the workloads scan
skips them).

A child switched to another user (a probe run as an env's owner) cannot be signalled by a
daemon that holds CAP_SETUID but not CAP_KILL: its group is then killed by a short helper
switched to the same user, so timeouts and cancels hold for it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

MIB = 1024 * 1024
_CHUNK = 65536
_POLL_SECONDS = 0.05  # how often the loop checks for child exit / cancel while pipes are quiet
_DRAIN_SECONDS = 1.0  # after the group is killed, how long to wait for the pipes to close
_REAP_SECONDS = 5.0  # a SIGKILLed process in uninterruptible sleep may take a while
_KILL_HELPER_SECONDS = 5.0  # the helper that kills another user's group: a Python start-up
_TRACK_SECONDS = 0.2  # how often the child's descendants are listed while it runs
_HOLDERS_AFTER = 0.1  # pipes still open this long after the kill: look for who holds them
_SWEEP_ROUNDS = 8  # kill, look again (what was forked meanwhile), at most this often
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
PROC = "/proc"


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


# -- descendants ----------------------------------------------------------------------------------

_subreaper = False
# Pids of the children started here and not reaped yet (running, or killed and handed to the
# reaper). Held while a child is started and registered: children() answers after any start
# under way, so a process seen in /proc before children() was asked is either listed or not
# ours, and a sweep never takes a child being started for an orphan.
_running: set[int] = set()
_running_lock = threading.Lock()


def children() -> frozenset[int]:
    """Pids of the children started here and not reaped yet (running, or killed and handed to
    the reaper). Each leads its own session: every process in those sessions is ours."""
    with _running_lock:
        return frozenset(_running)


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
    with _running_lock:
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
        _running.add(proc.pid)
    return proc


def _forget(pid: int) -> None:
    with _running_lock:
        _running.discard(pid)


def _without_ambient_caps(argv: tuple[str, ...]) -> tuple[str, ...]:
    """``argv`` behind setpriv clearing the ambient and inheritable sets, when this process
    has ambient capabilities (they survive execve of ordinary programs, and setuid between
    two non-root users keeps them). Raises LookupError when setpriv is needed but missing."""
    if not _has_ambient_caps():
        return argv
    if SETPRIV is None:
        raise LookupError("this process has ambient capabilities and setpriv is not installed")
    return (SETPRIV, "--ambient-caps=-all", "--inh-caps=-all", "--", *argv)


def become_subreaper() -> bool:
    """Make this process the parent of every orphaned descendant (Linux prctl
    PR_SET_CHILD_SUBREAPER); True when it is. Call once, early, in a command that probes (the
    daemon, doctor), never in a library user: a process that is a subreaper must reap what
    comes back to it, which run_bounded() then does."""
    global _subreaper
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        _subreaper = False
    return _subreaper


def _alive_since(pid: int) -> int | None:
    """The start time (clock ticks, field 22 of /proc/PID/stat) of ``pid`` while it is alive;
    None once it is gone or a zombie. Pairs of (pid, start time) survive pid reuse."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (of every thread of it), from /proc/PID/task/*/children."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"{PROC}/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"{PROC}/{pid}/task/{tid}/children", "rb") as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
    return out


def _descendants(roots: Iterable[int]) -> dict[int, int]:
    """Every live descendant of ``roots`` (not the roots) -> its start time."""
    found: dict[int, int] = {}
    todo = list(roots)
    while todo:
        for child in _children(todo.pop()):
            if child in found:
                continue
            start = _alive_since(child)
            if start is not None:
                found[child] = start
                todo.append(child)
    return found


def _orphans() -> list[int]:
    """Children of this process that no run_bounded() call is running: descendants of finished
    children, re-parented here because this process is a subreaper. Empty when it is not."""
    if not _subreaper:
        return []
    taken = _taken()
    return [p for p in _children(os.getpid()) if p not in taken]


def _taken() -> set[int]:
    """Children someone already waits for: a running call's, or a reaper thread's."""
    with _running_lock:
        taken = set(_running)
    with _abandoned_lock:
        return taken | _abandoned


def _pipe_holders(inodes: set[int]) -> dict[int, int]:
    """Processes (other than this one) with an fd on one of the pipes ``inodes`` -> start time."""
    wanted = {f"pipe:[{i}]" for i in inodes}
    me = os.getpid()
    found: dict[int, int] = {}
    try:
        pids = [int(p) for p in os.listdir(PROC) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == me:
            continue
        try:
            fds = os.listdir(f"{PROC}/{pid}/fd")
        except OSError:
            continue  # gone, or another user's
        for fd in fds:
            try:
                if os.readlink(f"{PROC}/{pid}/fd/{fd}") in wanted:
                    start = _alive_since(pid)
                    if start is not None:
                        found[pid] = start
                    break
            except OSError:
                continue
    return found


def _kill_all(known: Mapping[int, int]) -> None:
    """SIGKILL every process of ``known`` (pid -> start time) that is still that process, with
    its descendants and this process's orphans; look again, as a process can fork until the
    signal lands; then reap what of it (and of the orphans) is this process's child."""
    live = {p: t for p, t in known.items() if _alive_since(p) == t}
    hit: set[int] = set()
    for _ in range(_SWEEP_ROUNDS):
        for pid in _orphans():
            since = _alive_since(pid)
            if since is not None:
                live[pid] = since
        live.update(_descendants(live))
        live = {p: t for p, t in live.items() if _alive_since(p) == t}
        if not live:
            break
        for pid in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        hit |= live.keys()
        time.sleep(0.005)
    _reap_orphans(hit | set(_orphans()))


def _reap_orphans(pids: Iterable[int]) -> None:
    """Reap those of ``pids`` that are this process's children (and neither a running call's
    nor one a reaper thread already waits for)."""
    taken = _taken()
    mine = [p for p in pids if p not in taken and _still_ours(p)]
    deadline = time.monotonic() + 1.0
    while mine and time.monotonic() < deadline:
        left = []
        for pid in mine:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done != pid:
                left.append(pid)
        mine = left
        if mine:
            time.sleep(0.01)
    for pid in mine:
        hand_to_reaper(pid)


# -- deadlines ------------------------------------------------------------------------------------

_scope = threading.local()


@contextlib.contextmanager
def deadline_scope(seconds: float, cancel: threading.Event | None = None) -> Iterator[None]:
    """Inside the block, on this thread, every run_bounded() ends within ``seconds`` of the
    block's start (its timeout is cut to what is left; nested scopes keep the earliest), and
    ``cancel`` stops it when the call passes no event of its own."""
    previous: float | None = getattr(_scope, "deadline", None)
    previous_cancel: threading.Event | None = getattr(_scope, "cancel", None)
    mine = time.monotonic() + seconds
    _scope.deadline = mine if previous is None else min(previous, mine)
    _scope.cancel = cancel or previous_cancel
    try:
        yield
    finally:
        _scope.deadline, _scope.cancel = previous, previous_cancel


def _time_left(timeout: float) -> float:
    deadline: float | None = getattr(_scope, "deadline", None)
    if deadline is None:
        return timeout
    return max(0.0, min(timeout, deadline - time.monotonic()))


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

    Returns within about ``timeout`` + 1 s (``timeout`` is cut to what an enclosing
    :func:`deadline_scope` leaves, whose ``cancel`` applies when none is given). Keeps the
    first ``max_output`` bytes of stdout and of stderr (the rest is read and dropped so the
    child never blocks on a full pipe). On timeout or ``cancel`` the child's whole process
    group is SIGKILLed, with every other descendant found (see the module docstring); the
    same happens once the child itself exits, so nothing it started is left behind, not even
    a grandchild in a session of its own. ``user`` switches uid, gid and supplementary groups
    (needs root, or CAP_SETUID and CAP_SETGID: see :func:`can_switch_user`); the child keeps
    no capability that this process holds as ambient. A child that cannot be started (missing
    or non-executable file, unknown user) gives a result with ``error`` set.
    """
    args = tuple(argv)
    start = time.monotonic()
    timeout = _time_left(timeout)
    if cancel is None:
        cancel = getattr(_scope, "cancel", None)

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
    pipes = {os.fstat(proc.stdout.fileno()).st_ino, os.fstat(proc.stderr.fileno()).st_ino}
    for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ, name)
    timed_out = cancelled = killed = False
    drain_until: float | None = None
    holders_at: float | None = None
    seen: dict[int, int] = {}  # descendants met while the child ran -> start time
    next_look = start + _TRACK_SECONDS
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
                    seen.update(_descendants([proc.pid]))
                    _kill_all(seen)
                    killed = True
                    drain_until = now + _DRAIN_SECONDS
                    holders_at = now + _HOLDERS_AFTER
                elif now >= next_look:
                    seen.update(_descendants([proc.pid]))
                    next_look = now + _TRACK_SECONDS
            if drain_until is not None and now >= drain_until:
                break
            if holders_at is not None and now >= holders_at:
                # Someone still holds a pipe: a descendant that left the group and was not seen
                # (this process is no subreaper, or it forked between two looks).
                holders_at = None
                _kill_all(_pipe_holders(pipes))
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
            seen.update(_descendants([proc.pid]))
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
        _kill_all(seen)  # also what was forked or re-parented here since the first sweep
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
