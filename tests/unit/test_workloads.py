"""The workloads collector on fixture /proc trees."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tfgpud.collectors.workloads import (
    CMDLINE_MAX,
    FD_RECHECK_SECONDS,
    RECHECK_SECONDS,
    REMAP_GROWTH_BYTES,
    WorkloadScanner,
    find_tf_library,
    parse_stat,
)
from tfgpud.model import GpuProcess, GpuReading, NvmlReading

ROOT = Path(__file__).resolve().parents[2]
BTIME = 1_700_000_000
TICKS = os.sysconf("SC_CLK_TCK")
NOW = 1_800_000_000.0
SITE = "/home/ana/venv/lib/python3.11/site-packages"
TF_MAPS = (
    "55d0c0000000-55d0c0001000 r--p 00000000 08:01 131 /usr/bin/python3.11\n"
    f"7f0000000000-7f0000100000 r-xp 00000000 08:01 4242 {SITE}/tensorflow/"
    "libtensorflow_framework.so.2\n"
    "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n"
)
PLAIN_MAPS = "55d0c0000000-55d0c0001000 r--p 00000000 08:01 131 /usr/bin/python3.11\n"


def stat_line(
    pid: int,
    comm: str,
    state: str = "S",
    start: int = 1000,
    vsize: int = 1 << 26,
    session: int | None = None,
) -> str:
    # Fields 4..21 (ppid, pgrp, session, ...), then starttime (22), vsize (23), then the rest.
    sid = str(pid if session is None else session)
    middle = " ".join(["1", sid, sid, "0", "-1", "4194304"] + ["0"] * 12)
    return f"{pid} ({comm}) {state} {middle} {start} {vsize} 2000 " + " ".join(["0"] * 29) + "\n"


class Proc:
    """Writes one fake /proc/PID directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)
        (root / "stat").write_text(f"cpu  1 2 3 4\nbtime {BTIME}\nprocesses 99\n")

    def add(
        self,
        pid: int,
        comm: str = "python3",
        *,
        maps: str | None = PLAIN_MAPS,
        start: int = 1000,
        vsize: int = 1 << 26,
        state: str = "S",
        uid: int = 0,
        cmdline: list[str] | None = None,
        environ: dict[str, str] | None = None,
        exe: str | None = "/usr/bin/python3.11",
        fds: dict[str, str] | None = None,
        session: int | None = None,
    ) -> Path:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        (d / "stat").write_text(stat_line(pid, comm, state, start, vsize, session))
        (d / "comm").write_text(comm + "\n")
        (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        if maps is not None:
            (d / "maps").write_text(maps)
        args = cmdline if cmdline is not None else [comm, "train.py"]
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
        if environ is not None:
            (d / "environ").write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in environ.items()))
        if exe is not None:
            (d / "exe").unlink(missing_ok=True)
            os.symlink(exe, d / "exe")
        (d / "fd").mkdir(exist_ok=True)
        for fd, target in (fds or {}).items():
            os.symlink(target, d / "fd" / fd)
        return d


def nvml(*pids: int) -> NvmlReading:
    procs = tuple(GpuProcess(p, 1 << 30) for p in pids)
    return NvmlReading(up=True, gpus=(GpuReading(index=0, uuid="GPU-0", processes=procs),))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def proc(tmp_path: Path) -> Proc:
    return Proc(tmp_path / "proc")


def test_parse_stat_handles_names_with_spaces_and_parens() -> None:
    line = stat_line(7, "a) (b c", start=4321, vsize=99, session=5).encode()
    assert parse_stat(line) == (b"a) (b c", b"S", 4321, 99, 5)
    assert parse_stat(b"7 (python") is None
    assert parse_stat(b"7 (python) S 1 2") is None


def test_find_tf_library_returns_the_mapped_path() -> None:
    assert find_tf_library(TF_MAPS.encode()) == f"{SITE}/tensorflow/libtensorflow_framework.so.2"
    assert find_tf_library(PLAIN_MAPS.encode()) is None


def test_finds_tf_processes_and_their_placement(proc: Proc) -> None:
    proc.add(100, maps=TF_MAPS)  # TF, no GPU context: cpu
    proc.add(101, maps=TF_MAPS)  # TF, in NVML's list: gpu
    # Holds /dev/nvidia1 open but NVML lists no context: cuInit opened the node, then TF
    # skipped the GPUs (e.g. no cuDNN). With NVML up that is the CPU.
    proc.add(102, maps=TF_MAPS, fds={"0": "/dev/null", "7": "/dev/nvidia1"})
    proc.add(103, maps=TF_MAPS, fds={"5": "/dev/nvidiactl", "6": "/dev/nvidia-uvm"})  # no GPU
    proc.add(104)  # python without TensorFlow
    proc.add(105, "bash", maps=TF_MAPS)  # not a candidate name: never inspected
    proc.add(106, "trainer", maps=TF_MAPS)  # not a candidate name, but NVML lists it
    proc.add(107, "train.py", maps=TF_MAPS)  # a script run by its shebang
    reading = WorkloadScanner(proc.root).scan(nvml(101, 106, 999), NOW)
    placement = {p.pid: p.placement for p in reading.processes}
    assert placement == {100: "cpu", 101: "gpu", 102: "cpu", 103: "cpu", 106: "gpu", 107: "cpu"}
    scan = reading.scan
    assert (scan.processes, scan.candidates, scan.maps_read, scan.unreadable) == (8, 7, 7, 0)
    assert dict(scan.gpu_process_users) == {101: "root", 106: "root"}  # 999 is not running


def test_facts_of_every_process_on_a_gpu_for_the_memory_rules(proc: Proc) -> None:
    """User, command line and TensorFlow or not, for each pid NVML lists (TensorFlow or not),
    read once per process; nothing for a listed pid /proc does not show."""
    proc.add(101, maps=TF_MAPS, uid=0, cmdline=["python3", "-m", "ipykernel_launcher"])
    proc.add(106, "blender", uid=0, cmdline=["blender", "-b", "scene.blend"])
    d = proc.add(107, "render", maps=None)
    (d / "maps").mkdir()  # unreadable maps (another user's, without CAP_SYS_PTRACE)
    scanner = WorkloadScanner(proc.root)
    facts = scanner.scan(nvml(101, 106, 107, 999), NOW).scan.gpu_processes
    assert {pid: (f.user, f.cmdline, f.tensorflow) for pid, f in facts.items()} == {
        101: ("root", "python3 -m ipykernel_launcher", True),
        106: ("root", "blender -b scene.blend", False),
        107: ("root", "render train.py", None),
    }
    (proc.root / "106" / "cmdline").write_bytes(b"changed\0")
    again = scanner.scan(nvml(101, 106, 107), NOW).scan.gpu_processes
    assert again[106].cmdline == "blender -b scene.blend"  # read once per process


@pytest.mark.parametrize("reading", [None, NvmlReading(up=False, error="DRIVER_NOT_LOADED")])
def test_open_gpu_node_counts_only_while_nvml_is_down(
    proc: Proc, reading: NvmlReading | None
) -> None:
    proc.add(102, maps=TF_MAPS, fds={"7": "/dev/nvidia1"})
    proc.add(103, maps=TF_MAPS, fds={"5": "/dev/nvidiactl", "6": "/dev/nvidia-uvm"})
    found = WorkloadScanner(proc.root).scan(reading, NOW).processes
    assert {p.pid: p.placement for p in found} == {102: "gpu", 103: "cpu"}
    # NVML up and not listing it: the open node is not a context.
    found = WorkloadScanner(proc.root).scan(nvml(), NOW).processes
    assert {p.pid: p.placement for p in found} == {102: "cpu", 103: "cpu"}


def test_unreadable_hint_names_the_drop_in_that_works(
    proc: Proc, caplog: pytest.LogCaptureFixture
) -> None:
    d = proc.add(100, maps=None)
    (d / "maps").mkdir()  # unreadable, as another user's maps are without CAP_SYS_PTRACE
    with caplog.at_level(logging.WARNING):
        WorkloadScanner(proc.root).scan(None, NOW)
    text = caplog.text
    # Exactly the README's drop-in: the packaged unit already has PrivateUsers=no and
    # CAP_SETUID/CAP_SETGID, so the capability lines are all it needs.
    readme = (ROOT / "README.md").read_text()
    section = readme.split("#### Seeing other users' TensorFlow jobs", 1)[1]
    block = section.split("```ini\n", 1)[1].split("```", 1)[0].split()
    assert block == [
        "[Service]",
        "CapabilityBoundingSet=CAP_SYS_PTRACE",
        "AmbientCapabilities=CAP_SYS_PTRACE",
    ]
    assert all(line in text for line in block[1:]), text
    assert "PrivateUsers" not in text and "Seeing other users' TensorFlow jobs" in text


def test_process_facts(proc: Proc) -> None:
    long_cmd = ["/home/ana/venv/bin/python", "train.py", "--flag=" + "x" * 300]
    env = {"TF_FORCE_GPU_ALLOW_GROWTH": "true", "CUDA_VISIBLE_DEVICES": "-1", "SECRET": "hunter2"}
    proc.add(100, maps=TF_MAPS, start=500 * TICKS, cmdline=long_cmd, environ=env)
    proc.add(101, maps=TF_MAPS, environ={"PATH": "/bin"}, exe=None)
    proc.add(102, maps=TF_MAPS, uid=4_000_000)  # no environ readable, uid without a name
    a, b, c = WorkloadScanner(proc.root).scan(None, NOW).processes
    assert a.user == "root" and a.started_at == BTIME + 500
    assert a.cmdline.startswith("/home/ana/venv/bin/python train.py --flag=xxx")
    assert len(a.cmdline) == CMDLINE_MAX and a.cmdline.endswith("…")
    assert a.python == "/usr/bin/python3.11"
    assert a.tensorflow_library == f"{SITE}/tensorflow/libtensorflow_framework.so.2"
    assert a.allow_growth is True
    assert dict(a.environment) == {
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        "CUDA_VISIBLE_DEVICES": "-1",
    }
    assert b.allow_growth is False and b.python is None and dict(b.environment) == {}
    assert c.allow_growth is None and c.user == "4000000"


def test_a_user_made_since_is_named_once_the_lookups_expire(
    proc: Proc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uid 4000000 has no passwd entry, then gets one (useradd, sssd): its later jobs show the
    name within USERS_SECONDS, not the number for the daemon's lifetime."""
    from tfgpud.collectors import workloads

    proc.add(100, maps=TF_MAPS, uid=4_000_000)
    clock = Clock()
    scanner = WorkloadScanner(proc.root, clock=clock)
    assert [p.user for p in scanner.scan(None, NOW).processes] == ["4000000"]
    monkeypatch.setattr(workloads, "user_name", lambda uid: "dana" if uid == 4_000_000 else None)
    proc.add(101, maps=TF_MAPS, uid=4_000_000)  # a new job of the new user
    assert [p.user for p in scanner.scan(None, NOW + 10).processes] == ["4000000", "4000000"]
    clock.t += workloads.USERS_SECONDS
    proc.add(102, maps=TF_MAPS, uid=4_000_000)
    users = [p.user for p in scanner.scan(None, NOW + 20).processes]
    assert users == ["4000000", "4000000", "dana"]  # a process keeps what it was first read as


def test_maps_are_read_once_per_pid_and_start_time(proc: Proc) -> None:
    proc.add(100, maps=TF_MAPS)
    proc.add(101)
    scanner = WorkloadScanner(proc.root)
    assert scanner.scan(None, NOW).scan.maps_read == 2
    second = scanner.scan(None, NOW + 10)
    assert second.scan.maps_read == 0 and [p.pid for p in second.processes] == [100]
    # pid 101 reused by a new process (new start time) that has TensorFlow: read again.
    proc.add(101, maps=TF_MAPS, start=9000)
    third = scanner.scan(None, NOW + 20)
    assert third.scan.maps_read == 1 and [p.pid for p in third.processes] == [100, 101]
    # pid 100 reused by a process without TensorFlow: the old positive answer is dropped.
    proc.add(100, maps=PLAIN_MAPS, start=9500)
    fourth = scanner.scan(None, NOW + 30)
    assert fourth.scan.maps_read == 1 and [p.pid for p in fourth.processes] == [101]


def test_late_import_and_exec_are_noticed(proc: Proc) -> None:
    proc.add(100, vsize=1 << 26)  # python, TensorFlow not imported yet
    proc.add(101, "bash", maps=TF_MAPS)  # a launcher that will exec python
    clock = Clock()
    scanner = WorkloadScanner(proc.root, clock=clock)
    assert scanner.scan(None, NOW).processes == ()
    # Small growth: not worth a re-read (TF maps ~1 GB at once).
    proc.add(100, maps=TF_MAPS, vsize=(1 << 26) + REMAP_GROWTH_BYTES // 2)
    assert scanner.scan(None, NOW).scan.maps_read == 0
    proc.add(100, maps=TF_MAPS, vsize=(1 << 26) + 2 * REMAP_GROWTH_BYTES)
    proc.add(101, "python3", maps=TF_MAPS)  # same pid and start time, new program
    reading = scanner.scan(None, NOW)
    # The candidate is re-read every scan; the launcher only once its re-check is due.
    assert reading.scan.maps_read == 1 and [p.pid for p in reading.processes] == [100]
    clock.t += 1.5 * RECHECK_SECONDS
    reading = scanner.scan(None, NOW + 1.5 * RECHECK_SECONDS)
    assert reading.scan.maps_read == 1 and [p.pid for p in reading.processes] == [100, 101]


def test_an_import_after_a_big_free_is_noticed(proc: Proc) -> None:
    """Data prep maps 20 GiB and frees it, then the script imports TensorFlow: its growth
    counts from the low after the free, not from the 20 GiB high (never re-read before)."""
    big = 20 << 30
    proc.add(100, vsize=big)
    scanner = WorkloadScanner(proc.root, clock=Clock())
    assert scanner.scan(None, NOW).scan.maps_read == 1  # the first look: no TensorFlow
    proc.add(100, vsize=2 << 30)  # freed
    assert scanner.scan(None, NOW + 10).scan.maps_read == 0
    proc.add(100, maps=TF_MAPS, vsize=3 << 30)  # `import tensorflow`: +1 GiB
    reading = scanner.scan(None, NOW + 20)
    assert reading.scan.maps_read == 1 and [p.pid for p in reading.processes] == [100]


def test_maps_that_failed_to_read_for_lack_of_descriptors_are_read_again(
    proc: Proc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE (a client holding most descriptors) is the scan's trouble, not the process's:
    the job is looked at again next scan, not taken for another user's for its whole life."""
    import errno

    from tfgpud.collectors import workloads

    proc.add(100, maps=TF_MAPS)
    read = workloads._read
    failures = iter([OSError(errno.EMFILE, "Too many open files")])

    def flaky(path: str, limit: int = -1) -> bytes:
        if path.endswith("/maps"):
            failure = next(failures, None)
            if failure is not None:
                raise failure
        return read(path, limit)

    monkeypatch.setattr(workloads, "_read", flaky)
    scanner = WorkloadScanner(proc.root, clock=Clock())
    first = scanner.scan(None, NOW)
    assert first.processes == () and first.scan.unreadable == 0  # not for lack of rights
    assert [p.pid for p in scanner.scan(None, NOW + 10).processes] == [100]


def test_other_processes_are_re_read_on_a_spread_schedule(proc: Proc) -> None:
    launchers = range(1000, 1100)  # pids in a row, as a burst of starts gets
    for pid in launchers:
        proc.add(pid, "bash", maps=TF_MAPS)
    clock = Clock()
    scanner = WorkloadScanner(proc.root, clock=clock)
    assert scanner.scan(None, NOW).scan.candidates == 0
    for pid in launchers:  # every one of them execs python with TensorFlow
        proc.add(pid, "python3", maps=TF_MAPS)
    proc.add(2000, "python3", maps=TF_MAPS)  # a new pid is read at once
    proc.add(3000, "bash", maps=TF_MAPS)
    seen = []
    for f in (0.0, 0.5, 1.25, 1.5):
        clock.t = 100.0 + f * RECHECK_SECONDS
        seen.append(len(scanner.scan(nvml(3000), NOW + f * RECHECK_SECONDS).processes))
    # 2000 and 3000 (NVML lists it: read and inspected every scan, whatever its name), then
    # none of the launchers before the re-check is due, about half of them midway through the
    # spread, all of them at its end.
    assert seen[0] == seen[1] == 2
    assert 20 < seen[2] - 2 < 80
    assert seen[3] == 102


def test_vanishing_and_odd_entries_are_normal_input(proc: Proc) -> None:
    proc.add(100, maps=TF_MAPS)
    (proc.root / "101").mkdir()  # exited between listdir and reading its stat
    proc.add(102, maps=None)  # exited between reading stat and reading maps
    proc.add(103, maps=TF_MAPS, state="Z")  # zombie
    (proc.root / "104").mkdir()
    (proc.root / "104" / "stat").write_text("104 (python3")  # truncated
    (proc.root / "self").mkdir()  # not a pid
    (proc.root / "net").mkdir()
    scanner = WorkloadScanner(proc.root)
    reading = scanner.scan(None, NOW)
    assert [p.pid for p in reading.processes] == [100]
    assert (reading.scan.processes, reading.scan.unreadable) == (2, 0)
    # 102 comes back readable with TensorFlow (its maps read now); 100 exits.
    (proc.root / "102" / "maps").write_text(TF_MAPS)
    for f in (proc.root / "100").rglob("*"):
        if f.is_file() or f.is_symlink():
            f.unlink()
    reading = scanner.scan(None, NOW + 1)
    assert [p.pid for p in reading.processes] == [102]


def test_processes_in_the_sessions_of_tfgpuds_own_children_are_not_workloads(
    proc: Proc, caplog: pytest.LogCaptureFixture
) -> None:
    # 200: a probe child run as an env's owner (a python whose maps tfgpud may not read);
    # 201: what it started (same session). 300: another user's job, in a session of its own.
    for pid in (200, 201, 300):
        d = proc.add(pid, maps=None, session=200 if pid < 300 else None)
        (d / "maps").mkdir()  # reading fails as EACCES would
    proc.add(202, maps=TF_MAPS, session=200)  # even with TensorFlow loaded: the probe's own
    own: set[int] = {200}
    scanner = WorkloadScanner(proc.root, own_sessions=lambda: own)
    with caplog.at_level(logging.WARNING, logger="tfgpud.collectors.workloads"):
        reading = scanner.scan(nvml(202), NOW)
    assert reading.processes == ()
    scan = reading.scan
    assert (scan.processes, scan.candidates, scan.unreadable, scan.maps_read) == (4, 1, 1, 0)
    assert "e.g. pid 300" in caplog.text
    own.clear()  # the probe was reaped; its session, were anything left in it, is no one's
    assert {p.pid for p in scanner.scan(nvml(202), NOW + 1).processes} == {202}


def test_unreadable_maps_are_counted_not_retried(proc: Proc) -> None:
    d = proc.add(100, maps=None)
    (d / "maps").mkdir()  # reading fails with an error other than "gone" (as EACCES does)
    scanner = WorkloadScanner(proc.root)
    first = scanner.scan(None, NOW)
    assert first.processes == () and first.scan.unreadable == 1
    second = scanner.scan(None, NOW)
    assert second.scan.unreadable == 1 and second.scan.maps_read == 0


def test_cpu_since_and_gpu_fd_recheck(proc: Proc) -> None:
    d = proc.add(100, maps=TF_MAPS)
    clock = Clock()
    scanner = WorkloadScanner(proc.root, clock=clock)
    assert scanner.scan(None, NOW).processes[0].cpu_since == NOW
    (d / "fd" / "9").symlink_to("/dev/nvidia0")  # it made a CUDA context
    clock.t += FD_RECHECK_SECONDS / 2
    p = scanner.scan(None, NOW + 10).processes[0]
    assert (p.placement, p.cpu_since) == ("cpu", NOW)  # fds not re-read yet
    clock.t += FD_RECHECK_SECONDS
    p = scanner.scan(None, NOW + 40).processes[0]
    assert (p.placement, p.cpu_since) == ("gpu", None)


def test_cpu_since_restarts_after_a_gpu_stretch(proc: Proc) -> None:
    proc.add(100, maps=TF_MAPS)
    scanner = WorkloadScanner(proc.root)
    assert scanner.scan(nvml(), NOW).processes[0].cpu_since == NOW
    assert scanner.scan(nvml(100), NOW + 5).processes[0].placement == "gpu"
    assert scanner.scan(nvml(), NOW + 9).processes[0].cpu_since == NOW + 9


def test_nvml_down_means_no_gpu_pids(proc: Proc) -> None:
    proc.add(100, maps=TF_MAPS)
    down = NvmlReading(up=False, gpus=nvml(100).gpus)
    assert WorkloadScanner(proc.root).scan(down, NOW).processes[0].placement == "cpu"


def test_process_names_are_configurable(proc: Proc) -> None:
    proc.add(100, "serve", maps=TF_MAPS)
    proc.add(101, "python3", maps=TF_MAPS)
    scanner = WorkloadScanner(proc.root)
    assert [p.pid for p in scanner.scan(None, NOW).processes] == [101]
    assert [p.pid for p in scanner.scan(None, NOW, ["serve", "python*"]).processes] == [100, 101]
    every = scanner.scan(None, NOW, ["*"])
    assert every.scan.candidates == 2 and every.scan.maps_read == 0  # both cached by now
    assert scanner.scan(None, NOW, []).processes == ()


def test_missing_proc_root_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        WorkloadScanner(tmp_path / "nope").scan(None, NOW)
