"""TensorFlow jobs running now, and whether each computes on a GPU or on the CPU.

A process "has TensorFlow" when ``libtensorflow_framework.so`` is in its ``/proc/PID/maps``; it
is on the ``gpu`` when it holds a GPU context, on the ``cpu`` otherwise. With NVML up, only NVML's
compute process list tells: holding ``/dev/nvidiaN`` open proves nothing, because ``cuInit``
opens the device nodes even when TensorFlow then skips GPU registration (missing cuDNN, the most
common CPU fallback). Only when NVML is down or unknown is an open ``/dev/nvidiaN`` taken as a
GPU context (the best evidence left).

Cost on a machine with thousands of processes: a scan lists ``/proc`` and reads
``/proc/PID/stat`` (one small read: name, state, start time, virtual size) of each new pid, of
each *candidate* — a name matching ``[workloads] process_names``, or a pid NVML lists — and of
each other known pid once every ``RECHECK_SECONDS`` (spread so that one poll reads only a share
of them). That re-read is what notices a launcher (``bash``, ``env``) that execs python
under the same pid, so such a job is seen up to ``1.5 * RECHECK_SECONDS`` late: well inside the
5 minutes a job must compute on the CPU before ``tf-job-on-cpu``. Candidates go further, and
their maps are read once per (pid, start time): again only when the name changed (``exec``) or
the virtual size grew by ``REMAP_GROWTH_BYTES`` since (a process that imports TensorFlow late
maps ~1 GB at once). TensorFlow never unloads, so a positive answer is kept for the life of the
process.

``cpu_since`` is when this scanner first saw the process on the CPU (in its current CPU stretch),
not its start: TensorFlow jobs often compute on the CPU a while before making a GPU context, and a
daemon restart should not turn every long-running job into an instant ``tf-job-on-cpu``.

Processes of tfgpud's own making are not workloads: a TensorFlow probe child (run as an env's
owner, it is a ``python`` whose maps tfgpud may not read) and whatever it starts live in a session
:mod:`tfgpud.runner` started, and a candidate in one of those sessions is skipped before anything
else of it is read.

Processes exiting mid-scan and entries the daemon may not read (other users' maps without
CAP_SYS_PTRACE) are normal input: skipped, and counted in ``WorkloadScan.unreadable``.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import math
import os
import re
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from tfgpud.config import DEFAULT_PROCESS_NAMES
from tfgpud.model import (
    GpuProcessFacts,
    NvmlReading,
    TfProcess,
    WorkloadScan,
    WorkloadsReading,
    frozen_map,
)
from tfgpud.runner import children
from tfgpud.text import user_name

log = logging.getLogger(__name__)

TF_LIBRARY = b"libtensorflow_framework.so"
GPU_DEVICE = re.compile(r"/dev/nvidia[0-9]+")
# uid -> user name lookups are kept this long, and at most this many.
USERS_SECONDS = 600.0
MAX_USERS = 1024
# Errors of this process's own resources (a client holding most descriptors), not of the one read.
_TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR})
# Re-read the maps of a candidate without TensorFlow when its virtual size grew this much.
REMAP_GROWTH_BYTES = 32 * 2**20
# How long a "holds no /dev/nvidiaN open" answer is trusted (NVML's list is re-checked each poll).
FD_RECHECK_SECONDS = 30.0
# A known process that is no candidate has its stat re-read after this long (times 1 to 1.5,
# by pid): only an exec (or a reused pid) can make it one.
RECHECK_SECONDS = 30.0
CMDLINE_MAX = 200
ENV_KEYS = (b"CUDA_VISIBLE_DEVICES", b"TF_FORCE_GPU_ALLOW_GROWTH", b"TF_GPU_ALLOCATOR")
ALLOW_GROWTH = "TF_FORCE_GPU_ALLOW_GROWTH"


@dataclass
class _Entry:
    """What the scanner remembers about one process (one pid + start time)."""

    start: int  # /proc/PID/stat field 22, clock ticks after boot
    comm: bytes
    candidate: bool
    session: int = 0  # field 6, at the latest scan
    vsize: int = 0  # virtual size at the latest scan
    # Virtual size when the maps were last read, lowered when it shrinks since; -1 = never read.
    vsize_at_read: int = -1
    tf_library: str | None = None
    unreadable: bool = False
    user: str | None = None
    uid_read: bool = False
    cmdline: str | None = None  # read once, for a process NVML lists on a GPU
    tf: TfProcess | None = None  # the static facts, read once when TensorFlow is found
    gpu_fds: bool = False
    fds_checked_at: float = -math.inf
    cpu_since: float | None = None
    recheck_at: float = -math.inf  # scanner clock; only used while not a candidate


@dataclass
class _Counts:
    processes: int = 0
    candidates: int = 0
    unreadable: int = 0
    maps_read: int = 0
    users: dict[int, str] = field(default_factory=dict)
    gpu: dict[int, GpuProcessFacts] = field(default_factory=dict)


def _read(path: str, limit: int = -1) -> bytes:
    """The file's bytes (at most ``limit``, or all). Raises OSError (incl. vanished processes)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if limit > 0:
            return os.read(fd, limit)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_stat(data: bytes) -> tuple[bytes, bytes, int, int, int] | None:
    """(comm, state, starttime, vsize, session) from a /proc/PID/stat line; None when malformed.

    The name is inside parentheses and may itself contain spaces and ')', hence the rfind.
    """
    open_, close = data.find(b"("), data.rfind(b")")
    if open_ < 0 or close < open_:
        return None
    rest = data[close + 2 :].split(b" ", 21)  # rest[0] is field 3 (state)
    if len(rest) < 21:
        return None
    try:
        return data[open_ + 1 : close], rest[0], int(rest[19]), int(rest[20]), int(rest[3])
    except ValueError:
        return None


def find_tf_library(maps: bytes) -> str | None:
    """Path of the libtensorflow_framework.so mapped in ``maps`` (a /proc/PID/maps text)."""
    at = maps.find(TF_LIBRARY)
    if at < 0:
        return None
    start = maps.rfind(b"\n", 0, at) + 1
    end = maps.find(b"\n", at)
    line = maps[start : end if end >= 0 else len(maps)]
    parts = line.split(None, 5)  # address perms offset dev inode path
    path = parts[5] if len(parts) == 6 else TF_LIBRARY
    return path.decode("utf-8", "replace")


def _names_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    pats = tuple(patterns)
    if not pats:
        return lambda name: False
    rx = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats))
    return lambda name: rx.match(name) is not None


def _user(uid: int, cache: dict[int, str]) -> str:
    name = cache.get(uid)
    if name is None:
        name = user_name(uid) or str(uid)  # no passwd entry (containers): show the number
        cache[uid] = name
    return name


def _cmdline(raw: bytes) -> str:
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    return text if len(text) <= CMDLINE_MAX else text[: CMDLINE_MAX - 1] + "…"


def _environment(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in ENV_KEYS:
            out[key.decode()] = value.decode("utf-8", "replace")
    return out


class WorkloadScanner:
    """Finds TensorFlow processes under ``proc_root``; keeps a per-process cache between scans.

    ``clock`` (monotonic seconds) times the /dev/nvidia* fd re-checks; tests inject one.
    ``own_sessions`` returns the sessions of this process's children (:func:`tfgpud.runner.
    children`): a candidate in one of them is this process's own (a probe), not a workload.
    """

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        *,
        clock: Callable[[], float] = time.monotonic,
        fd_recheck_seconds: float = FD_RECHECK_SECONDS,
        recheck_seconds: float = RECHECK_SECONDS,
        own_sessions: Callable[[], Collection[int]] = children,
    ) -> None:
        # Plain strings, not pathlib: this runs for every process on every poll.
        self._root = str(proc_root)
        self._own_sessions = own_sessions
        self._clock = clock
        self._fd_recheck = fd_recheck_seconds
        self._recheck = recheck_seconds
        self._entries: dict[int, _Entry] = {}
        self._users: dict[int, str] = {}  # uid -> name; forgotten every USERS_SECONDS
        self._users_at = clock()
        self._patterns: tuple[str, ...] | None = None
        self._match: Callable[[str], bool] = lambda name: False
        self._btime: float | None = None
        self._btime_read = False
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._warned_unreadable = False

    def _boot_time(self) -> float | None:
        if not self._btime_read:
            self._btime_read = True
            try:
                for line in _read(f"{self._root}/stat").splitlines():
                    if line.startswith(b"btime "):
                        self._btime = float(line.split()[1])
            except (OSError, ValueError, IndexError):
                self._btime = None
        return self._btime

    def scan(
        self,
        nvml: NvmlReading | None,
        now: float,
        process_names: Iterable[str] = DEFAULT_PROCESS_NAMES,
    ) -> WorkloadsReading:
        """One pass over ``proc_root``. ``now`` (unix time) stamps ``cpu_since``.

        Raises OSError only when ``proc_root`` itself cannot be listed.
        """
        if self._clock() - self._users_at >= USERS_SECONDS or len(self._users) > MAX_USERS:
            # A user made since (sssd, useradd) gets a name; random container uids do not pile up.
            self._users.clear()
            self._users_at = self._clock()
        names = tuple(process_names)
        if names != self._patterns:
            self._patterns, self._match = names, _names_matcher(names)
            for e in self._entries.values():
                e.candidate = self._match(e.comm.decode("utf-8", "replace"))
                e.recheck_at = -math.inf
        nvml_up = nvml is not None and nvml.up
        gpu_pids = frozenset(
            p.pid for g in (nvml.gpus if nvml is not None and nvml.up else ()) for p in g.processes
        )
        counts = _Counts()
        live: dict[int, _Entry] = {}
        found: list[TfProcess] = []
        clock = self._clock()
        known = self._entries
        for name in os.listdir(self._root):
            if not name.isdigit():
                continue
            pid = int(name)
            entry = known.get(pid)
            if entry is None or entry.candidate or clock >= entry.recheck_at or pid in gpu_pids:
                entry = self._entry(pid, clock)
                if entry is None:
                    continue  # exited between listdir and the read
            live[pid] = entry
            counts.processes += 1
            if pid in gpu_pids:
                user = self._entry_user(pid, entry)
                if user is not None:
                    counts.users[pid] = user
            if not (entry.candidate or pid in gpu_pids):
                continue
            # Asked after this process's stat was read: a child started before then is listed.
            if entry.session in self._own_sessions():
                continue
            counts.candidates += 1
            tf = self._inspect(pid, entry, counts, gpu_pids, now, nvml_up)
            if tf is not None:
                found.append(tf)
            if pid in gpu_pids:
                counts.gpu[pid] = self._gpu_facts(pid, entry)
        self._entries = live
        if counts.unreadable and not self._warned_unreadable:
            self._warned_unreadable = True
            log.warning(
                "cannot read the memory maps of %d candidate process(es), e.g. pid %d: "
                "TensorFlow jobs among them are not seen. Reading other users' processes needs "
                "CAP_SYS_PTRACE, which the packaged unit does not grant (only CAP_SETUID and "
                "CAP_SETGID, to probe discovered envs as their owners): add a drop-in "
                "(`systemctl edit tfgpud`) with CapabilityBoundingSet=CAP_SYS_PTRACE and "
                "AmbientCapabilities=CAP_SYS_PTRACE (README: 'Seeing other users' TensorFlow "
                "jobs')",
                counts.unreadable,
                min(pid for pid, e in live.items() if e.unreadable),
            )
        scan = WorkloadScan(
            processes=counts.processes,
            candidates=counts.candidates,
            unreadable=counts.unreadable,
            maps_read=counts.maps_read,
            gpu_process_users=MappingProxyType(counts.users),
            gpu_processes=MappingProxyType(counts.gpu),
        )
        return WorkloadsReading(tuple(sorted(found, key=lambda p: p.pid)), scan)

    def _entry(self, pid: int, clock: float) -> _Entry | None:
        """The cache entry for ``pid``, new when the pid was reused or exec'd; None if gone."""
        try:
            stat = parse_stat(_read(f"{self._root}/{pid}/stat", 4096))
        except OSError:
            return None
        if stat is None:
            return None
        comm, state, start, vsize, session = stat
        if state in (b"Z", b"X"):
            return None  # a zombie has no memory map and computes nothing
        entry = self._entries.get(pid)
        if entry is None or entry.start != start or entry.comm != comm:
            entry = _Entry(start, comm, self._match(comm.decode("utf-8", "replace")))
        entry.vsize, entry.session = vsize, session
        if not entry.candidate:
            # Spread by pid, so that the processes first seen together are not re-read together.
            entry.recheck_at = clock + self._recheck * (1 + (pid * 2654435761 % 4096) / 8192)
        return entry

    def _entry_user(self, pid: int, entry: _Entry) -> str | None:
        if not entry.uid_read:
            entry.uid_read = True
            try:
                for line in _read(f"{self._root}/{pid}/status").splitlines():
                    if line.startswith(b"Uid:"):
                        entry.user = _user(int(line.split()[1]), self._users)
                        break
            except (OSError, ValueError, IndexError):
                entry.user = None
        return entry.user

    def _gpu_facts(self, pid: int, entry: _Entry) -> GpuProcessFacts:
        """User, command line and whether it has TensorFlow, for a process on a GPU (what the
        memory rules name); the command line is read once per process."""
        if entry.cmdline is None:
            if entry.tf is not None:
                entry.cmdline = entry.tf.cmdline
            else:
                try:
                    entry.cmdline = _cmdline(_read(f"{self._root}/{pid}/cmdline", 1 << 16))
                except OSError:
                    entry.cmdline = ""
        if entry.tf_library is not None:
            tf: bool | None = True
        elif entry.unreadable or entry.vsize_at_read < 0:
            tf = None  # maps not read (another user's, or it exited mid-scan)
        else:
            tf = False
        return GpuProcessFacts(pid, self._entry_user(pid, entry), entry.cmdline, tf)

    def _inspect(
        self,
        pid: int,
        entry: _Entry,
        counts: _Counts,
        gpu_pids: frozenset[int],
        now: float,
        nvml_up: bool,
    ) -> TfProcess | None:
        if entry.tf_library is None:
            if entry.unreadable:
                counts.unreadable += 1
                return None
            vsize = entry.vsize
            if 0 <= vsize < entry.vsize_at_read:
                entry.vsize_at_read = vsize  # it unmapped since: growth counts from the low
            if entry.vsize_at_read >= 0 and vsize - entry.vsize_at_read < REMAP_GROWTH_BYTES:
                return None  # maps read before, nothing big mapped since: still no TensorFlow
            try:
                maps = _read(f"{self._root}/{pid}/maps")
            except (FileNotFoundError, ProcessLookupError):
                return None  # exited mid-scan
            except OSError as exc:
                if exc.errno in _TRANSIENT_ERRNOS:
                    return None  # this scan's trouble, not the process's: read it again
                # EACCES: another user's process and no CAP_SYS_PTRACE. Not retried.
                entry.unreadable = True
                counts.unreadable += 1
                return None
            counts.maps_read += 1
            entry.vsize_at_read = vsize
            entry.tf_library = find_tf_library(maps)
            if entry.tf_library is None:
                return None
        if entry.tf is None:
            entry.tf = self._facts(pid, entry)
        # NVML's list is the truth when NVML answers: an open /dev/nvidiaN is no GPU context
        # (cuInit opens the nodes before TensorFlow gives up on a missing cuDNN).
        on_gpu = pid in gpu_pids if nvml_up else self._holds_gpu(pid, entry)
        if on_gpu:
            entry.cpu_since = None
        elif entry.cpu_since is None:
            entry.cpu_since = now
        return TfProcess(
            pid=entry.tf.pid,
            placement="gpu" if on_gpu else "cpu",
            user=entry.tf.user,
            cmdline=entry.tf.cmdline,
            started_at=entry.tf.started_at,
            python=entry.tf.python,
            allow_growth=entry.tf.allow_growth,
            cpu_since=entry.cpu_since,
            tensorflow_library=entry.tf.tensorflow_library,
            environment=entry.tf.environment,
        )

    def _facts(self, pid: int, entry: _Entry) -> TfProcess:
        """What does not change while the process lives; every piece may be unreadable."""
        base = f"{self._root}/{pid}"
        try:
            cmdline = _cmdline(_read(f"{base}/cmdline", 1 << 16))
        except OSError:
            cmdline = ""
        try:
            python: str | None = os.readlink(f"{base}/exe")
        except OSError:
            python = None
        env: dict[str, str] | None
        try:
            env = _environment(_read(f"{base}/environ"))
        except OSError:
            env = None  # other users' environ needs CAP_SYS_PTRACE
        allow = None if env is None else env.get(ALLOW_GROWTH, "").strip().lower() == "true"
        btime = self._boot_time()
        return TfProcess(
            pid=pid,
            placement="cpu",
            user=self._entry_user(pid, entry),
            cmdline=cmdline,
            started_at=None if btime is None else btime + entry.start / self._ticks,
            python=python,
            allow_growth=allow,
            tensorflow_library=entry.tf_library,
            environment=frozen_map(env),
        )

    def _holds_gpu(self, pid: int, entry: _Entry) -> bool:
        """True when the process has /dev/nvidiaN open: taken as a CUDA context only while NVML
        is down (cuInit opens the nodes even when no context follows). Re-checked on a TTL."""
        now = self._clock()
        if entry.gpu_fds or now - entry.fds_checked_at < self._fd_recheck:
            return entry.gpu_fds  # a context, once made, lives as long as the process
        entry.fds_checked_at = now
        fd_dir = f"{self._root}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return False
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if GPU_DEVICE.fullmatch(target):
                entry.gpu_fds = True
                break
        return entry.gpu_fds
