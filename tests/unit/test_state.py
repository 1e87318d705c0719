"""The persisted baseline (tfgpud/state.py) and `tfgpud baseline show|reset|forget`."""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfgpud import state
from tfgpud.cli import EX_CONFIG, EX_FAILURE, EX_OK, main
from tfgpud.config import Config
from tfgpud.diagnosis import diagnose
from tfgpud.model import GpuReading, KnownGpu, NvmlReading, PciReading, Snapshot
from tfgpud.state import Baseline, StateFileError, forget_gpu, reset_baseline, write_atomically

U0 = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
U1 = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
A6000 = "NVIDIA RTX A6000"


def nvml(*uuids: str, up: bool = True) -> NvmlReading:
    gpus = tuple(
        GpuReading(index=i, uuid=u, name=A6000, pci_bus_id=f"00000000:{i + 1:02X}:00.0")
        for i, u in enumerate(uuids)
    )
    return NvmlReading(up=up, gpus=gpus if up else (), error=None if up else "DRIVER_NOT_LOADED")


def learned(tmp: Path, *uuids: str) -> Baseline:
    b = Baseline.open(tmp)
    assert b.learn(nvml(*uuids), 100.0)
    b.save(100.0)
    return b


# --- atomic writes ------------------------------------------------------------------------------


def test_write_atomically_replaces_fsyncs_file_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.json"
    target.write_text("old")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(state.os, "fsync", fsync)
    old_inode = target.stat().st_ino
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_ino != old_inode  # renamed over, not rewritten in place
    assert synced[0].startswith(str(tmp_path / ".f.json."))  # the temp file, before the rename
    assert synced[1] == str(tmp_path)  # then the directory, so the rename is durable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_write_atomically_failure_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    target.mkdir()  # rename of a file over a directory fails
    with pytest.raises(IsADirectoryError):
        write_atomically(target, b"new")
    assert target.is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


# --- learning and persistence -------------------------------------------------------------------


def test_learns_persists_and_reloads_across_processes(tmp_path: Path) -> None:
    learned(tmp_path, U0, U1)
    again = Baseline.open(tmp_path)
    assert [(g.uuid, g.name, g.pci_bus_id) for g in again.gpus] == [
        (U0, A6000, "00000000:01:00.0"),
        (U1, A6000, "00000000:02:00.0"),
    ]
    assert again.expected == 2
    assert again.problems() == ()
    # Seeing the same GPUs again changes nothing worth a write.
    mtime = again.path.stat().st_mtime_ns
    assert not again.learn(nvml(U0, U1), 200.0)
    assert again.path.stat().st_mtime_ns == mtime
    # A GPU that is not seen stays expected; NVML down learns nothing.
    assert not again.learn(nvml(U0), 300.0)
    assert not again.learn(nvml(up=False), 300.0)
    assert {g.uuid for g in again.gpus} == {U0, U1}


def test_last_seen_is_written_at_close_unless_the_cli_changed_the_file(tmp_path: Path) -> None:
    b = learned(tmp_path, U0)
    b.learn(nvml(U0), 500.0)
    b.close()
    assert json.loads(b.path.read_text())["gpus"][0]["last_seen"] == 500.0
    b.learn(nvml(U0), 600.0)
    reset_baseline(tmp_path)
    b.close()
    assert json.loads(b.path.read_text())["gpus"] == []


def test_expect_count_overrides_the_learned_count(tmp_path: Path) -> None:
    b = Baseline.open(tmp_path, expect=4)
    b.learn(nvml(U0), 1.0)
    assert b.expected == 4


def test_lost_gpu_without_a_uuid_is_not_learned(tmp_path: Path) -> None:
    b = Baseline.open(tmp_path)
    reading = NvmlReading(up=True, gpus=(GpuReading(index=0, uuid="GPU-unknown-index-0"),))
    assert not b.learn(reading, 1.0)
    assert b.gpus == ()


def test_gpus_learned_beyond_the_cap_forget_the_longest_unseen_and_stay_readable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cloud VM that lands on other physical GPUs at each start: 300 UUIDs over 150 starts.
    The file the daemon writes is always one its next start reads, not moved aside."""
    caplog.set_level(logging.INFO, logger="tfgpud.state")
    uuids = [f"GPU-{i:08x}-0000-4000-8000-000000000000" for i in range(300)]
    # The first GPU is visible at every start, so its last_seen is the oldest when the
    # baseline first fills up (the reading is learned after room is made): never forgotten.
    for start in range(150):
        b = Baseline.open(tmp_path)
        assert b.problems() == ()
        now = 1000.0 + start
        b.learn(nvml(uuids[0], uuids[2 * start], uuids[2 * start + 1]), now)
        b.save_quietly(now)
        b.close()
    assert not list(tmp_path.glob("*.corrupt"))
    kept = {g.uuid for g in Baseline.read(tmp_path).gpus}
    assert len(kept) == state.MAX_BASELINE_GPUS == Baseline.open(tmp_path).expected
    # The newest 255 besides the one always visible; the 44 seen longest ago are forgotten.
    assert kept == {uuids[0], *uuids[-255:]}
    forgotten = [
        r.getMessage()
        for r in caplog.records
        if getattr(r, "MESSAGE_ID", None) == state.MSG_GPU_FORGOTTEN
    ]
    assert len(forgotten) == 22  # one line per start that made room: 2 GPUs each
    assert "forgot the 2 GPU(s) not seen for the longest" in forgotten[0]
    assert uuids[1] in forgotten[0] and uuids[2] in forgotten[0] and uuids[0] not in forgotten[0]


def test_forgetting_a_gpu_with_a_hand_edited_time_does_not_fail_the_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full baseline whose oldest GPU has a last_seen no calendar holds (-1e18, hand-edited):
    forgetting it logs "?" for its time; the log line made learn() raise, after the GPU was
    already gone, so it was forgotten unlogged and that poll failed."""
    monkeypatch.setattr(state, "MAX_BASELINE_GPUS", 2)
    caplog.set_level(logging.WARNING, logger="tfgpud.state")
    odd = {"uuid": U0, "name": A6000, "first_seen": -1e18, "last_seen": -1e18}
    ok = {"uuid": U1, "name": A6000, "first_seen": 1.0, "last_seen": 1.0}
    (tmp_path / "baseline.json").write_text(json.dumps({"version": 1, "gpus": [odd, ok]}))
    b = Baseline.open(tmp_path)
    assert b.problems() == ()
    new = "GPU-cccccccc-0000-4000-8000-000000000002"
    assert b.learn(nvml(new), 100.0)
    assert {g.uuid for g in b.gpus} == {U1, new}
    assert any(U0 in r.getMessage() and "?" in r.getMessage() for r in caplog.records)


def test_a_time_that_is_not_finite_makes_the_file_corrupt(tmp_path: Path) -> None:
    entry = '{"uuid": "' + U0 + '", "last_seen": NaN}'  # json.loads reads NaN
    (tmp_path / "baseline.json").write_text('{"version": 1, "gpus": [' + entry + "]}")
    b = Baseline.open(tmp_path)
    assert b.gpus == () and len(list(tmp_path.glob("*.corrupt"))) == 1


def test_more_gpus_visible_at_once_than_the_cap_learns_only_what_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(state, "MAX_BASELINE_GPUS", 3)
    caplog.set_level(logging.WARNING, logger="tfgpud.state")
    b = Baseline.open(tmp_path)
    five = [f"GPU-{i:08x}-0000-4000-8000-000000000000" for i in range(5)]
    assert b.learn(nvml(*five), 1.0)
    assert not b.learn(nvml(*five), 2.0)  # the same shortfall is not logged again
    b.save(2.0)
    assert [g.uuid for g in Baseline.read(tmp_path).gpus] == five[:3]
    [rec] = caplog.records
    assert "NVML lists 5 GPUs, more than the baseline holds (3): 2 new one(s)" in rec.getMessage()


# --- corrupt, unreadable, unwritable ------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"version": 2, "gpus": []}',
        b'{"version": 1}',
        b'{"version": 1, "gpus": [{"name": "x"}]}',
        b'{"version": 1, "gpus": [{"uuid": "GPU-1", "first_seen": "yesterday"}]}',
        b"",
    ],
)
def test_corrupt_file_is_moved_aside_reported_and_rebuilt(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "baseline.json").write_bytes(content)
    b = Baseline.open(tmp_path)  # never raises
    assert b.gpus == ()
    corrupt = list(tmp_path.glob("baseline.json.*.corrupt"))
    assert len(corrupt) == 1 and corrupt[0].read_bytes() == content
    assert not b.path.exists()
    assert len(b.problems()) == 1 and str(corrupt[0]) in b.problems()[0]
    # Rebuilt from what is seen now, and written back as a valid file.
    assert b.learn(nvml(U0), 1.0)
    b.save_quietly()
    assert [g.uuid for g in Baseline.read(tmp_path).gpus] == [U0]
    # Reported as a finding until the person deletes the .corrupt file.
    snap = Snapshot(taken_at=1.0, nvml=nvml(U0), baseline=b.gpus, baseline_problems=b.problems())
    finding = next(f for f in diagnose(snap, Config()) if f.code == "baseline-state-error")
    assert str(corrupt[0]) in finding.evidence[0]
    corrupt[0].unlink()
    assert b.problems() == ()


def test_a_second_corruption_keeps_the_first_corrupt_file(tmp_path: Path) -> None:
    for text in (b"one", b"two"):
        (tmp_path / "baseline.json").write_bytes(text)
        Baseline.open(tmp_path)
    kept = sorted(p.read_bytes() for p in tmp_path.glob("*.corrupt"))
    assert kept == [b"one", b"two"]


@pytest.mark.parametrize("seconds_apart", [0, 1])
def test_only_the_newest_corrupt_files_are_kept(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    seconds_apart: int,
) -> None:
    """A tool that keeps writing a bad baseline: the state dir keeps the newest 10 moved-aside
    files (the one just moved always), whether they share one second's name or not."""
    caplog.set_level(logging.WARNING, logger="tfgpud.state")
    t = [1_700_000_000]
    real_gmtime = time.gmtime
    monkeypatch.setattr(
        state.time, "gmtime", lambda *a: real_gmtime(*a) if a else real_gmtime(t[0])
    )
    for i in range(15):
        (tmp_path / "baseline.json").write_bytes(b"bad %d" % i)
        Baseline.open(tmp_path)
        t[0] += seconds_apart
    kept = sorted(int(p.read_bytes().split()[1]) for p in tmp_path.glob("*.corrupt"))
    assert kept == list(range(5, 15))
    deletions = [r.getMessage() for r in caplog.records if r.getMessage().startswith("deleted ")]
    assert len(deletions) == 5 and all("deleted 1 older" in m for m in deletions)


def test_the_finding_names_the_newest_five_corrupt_files_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    names = [f"baseline.json.202401{d:02d}T000000Z.corrupt" for d in range(1, 13)]
    names.append("baseline.json.20240112T000000Z-2.corrupt")  # the newest: same second, later
    for name in names:
        (tmp_path / name).write_text("{")
    b = learned(tmp_path, U0)
    problems = b.problems()
    newest = [tmp_path / n for n in reversed(names[-5:])]
    assert [p.split()[0] for p in problems[:5]] == [str(p) for p in newest]
    assert problems[5:] == (f"and 8 more, older ones: {tmp_path}/baseline.json.*.corrupt",)
    snap = Snapshot(taken_at=1.0, nvml=nvml(U0), baseline=b.gpus, baseline_problems=problems)
    finding = next(f for f in diagnose(snap, Config()) if f.code == "baseline-state-error")
    assert finding.evidence == problems and "delete the `*.corrupt` files" in finding.fix


def test_a_file_repaired_by_the_cli_meanwhile_is_not_moved_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon starts on a corrupt file; `tfgpud baseline reset` (holding the writer lock)
    replaces it with a good one before the daemon moves the corrupt one aside: the good one is
    read, not renamed to .corrupt (a spurious baseline-state-error until someone deleted it)."""
    good = tmp_path / "good"
    good.mkdir()
    learned(good, U0)
    (tmp_path / "baseline.json").write_bytes(b"{not json")
    read = Baseline._read_file
    calls = 0

    def read_then_cli_resets(self: Baseline) -> dict[str, KnownGpu]:
        nonlocal calls
        calls += 1
        try:
            return read(self)
        finally:
            if calls == 1:  # the CLI's atomic replace, right after the daemon's first read
                os.replace(good / "baseline.json", tmp_path / "baseline.json")

    monkeypatch.setattr(Baseline, "_read_file", read_then_cli_resets)
    b = Baseline.open(tmp_path)
    assert [g.uuid for g in b.gpus] == [U0]
    assert not list(tmp_path.glob("*.corrupt")) and b.problems() == ()


def test_unreadable_file_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / "baseline.json").mkdir()  # EISDIR on read, like an I/O error
    b = Baseline.open(tmp_path)
    assert len(list(tmp_path.glob("baseline.json.*.corrupt"))) == 1
    assert b.problems()


def test_unwritable_state_dir_is_reported_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")
    b = Baseline.open(blocker)
    assert b.learn(nvml(U0), 1.0)
    assert b.save_quietly() is False
    assert any("cannot write" in p for p in b.problems())
    with pytest.raises(StateFileError):
        Baseline.read(tmp_path / "state" / "x")  # NotADirectory: unreadable, not "no file"


_DIRS = itertools.count()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200))
def test_any_file_content_loads_or_is_moved_aside(tmp_path: Path, content: bytes) -> None:
    d = tmp_path / f"s{next(_DIRS)}"
    d.mkdir()
    (d / "baseline.json").write_bytes(content)
    b = Baseline.open(d)
    moved = list(d.glob("*.corrupt"))
    assert (b.path.exists() and not moved) or (not b.path.exists() and len(moved) == 1)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_failed_write_is_retried_with_backoff_until_it_succeeds(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")  # like a missing/RO directory
    clock = Clock()
    b = Baseline.open(blocker, clock=clock)
    assert b.learn(nvml(U0), 1.0)
    assert b.save_quietly(1.0) is False
    assert b.unsaved and any("cannot write" in p for p in b.problems())
    # Later polls see no membership change: only flush_if_dirty writes, not before 30 s.
    assert not b.learn(nvml(U0), 2.0)
    blocker.unlink()  # the person fixed it
    assert b.flush_if_dirty(2.0) is False
    clock.t += state.SAVE_RETRY_SECONDS - 1
    assert b.flush_if_dirty(3.0) is False and not b.path.exists()
    clock.t += 1
    assert b.flush_if_dirty(4.0) is True
    assert [g.uuid for g in Baseline.read(blocker).gpus] == [U0]
    assert b.problems() == () and not b.unsaved
    assert b.flush_if_dirty(5.0) is False  # nothing left to write


def test_a_write_that_keeps_failing_is_retried_every_30_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[float] = []
    clock = Clock()

    def full(path: Path, data: bytes, mode: int = 0o644) -> None:
        attempts.append(clock.t)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state, "write_atomically", full)
    b = Baseline.open(tmp_path, clock=clock)
    b.learn(nvml(U0), 1.0)
    assert b.flush_if_dirty(1.0) is False  # due at once: the caller had not saved yet
    for _ in range(90):
        clock.t += 1
        b.flush_if_dirty(clock.t)
    assert attempts == [1000.0, 1030.0, 1060.0, 1090.0]
    assert b.problems() == (f"cannot write {b.path}: No space left on device",)


def test_close_writes_a_change_whose_write_failed(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("x")
    b = Baseline.open(blocker)
    b.learn(nvml(U0, U1), 1.0)
    assert b.save_quietly(1.0) is False
    blocker.unlink()
    b.close()  # ignores the retry pacing
    assert [g.uuid for g in Baseline.read(blocker).gpus] == [U0, U1]


def test_a_cli_change_wins_over_a_pending_retry(tmp_path: Path) -> None:
    clock = Clock()
    b = learned(tmp_path, U0)
    b._clock = clock
    b.learn(nvml(U0, U1), 2.0)  # U1 joins, not saved yet
    assert b.unsaved
    reset_baseline(tmp_path)
    assert b.flush_if_dirty(3.0) is False  # re-read the CLI's file instead of overwriting it
    assert b.gpus == () and Baseline.read(tmp_path).gpus == ()


def _eacces_scenario(state_dir: str) -> dict[str, object]:
    """What the daemon does with the baseline; run where state_dir cannot be searched."""
    b = Baseline.open(state_dir)  # must not raise
    b.refresh()
    changed = b.learn(nvml(U0), 1.0)
    with b.lock():
        b.refresh()
        b.learn(nvml(U0), 1.0)
        saved = b.save_quietly(1.0)
    b.flush_if_dirty(2.0)
    b.close()
    return {"problems": list(b.problems()), "changed": changed, "saved": saved}


def test_unsearchable_state_dir_is_reported_not_raised() -> None:
    """A root-owned 0700 state_dir and a daemon running as another user: Path.exists() raises
    PermissionError on Python 3.11; open/refresh/learn/save/close must not."""
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        sd = Path(top) / "state"
        sd.mkdir()
        (sd / "baseline.json").write_text('{"version": 1, "gpus": []}')
        sd.chmod(0o700 if os.geteuid() == 0 else 0)
        try:
            if os.geteuid() != 0:
                result = _eacces_scenario(str(sd))
            else:
                setpriv = shutil.which("setpriv")
                if setpriv is None:
                    pytest.skip("root without setpriv: cannot drop privileges")
                code = (
                    "import json, sys; from tests.unit.test_state import _eacces_scenario; "
                    "print(json.dumps(_eacces_scenario(sys.argv[1])))"
                )
                argv = ["--reuid=65534", "--regid=65534", "--clear-groups"]
                root = Path(__file__).parents[2]
                env = {**os.environ, "PYTHONPATH": f"{root}:{root / 'tests'}"}
                out = subprocess.run(
                    [setpriv, *argv, sys.executable, "-c", code, str(sd)],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=root,
                    timeout=60,
                    check=False,
                )
                if out.returncode != 0 and "setpriv:" in out.stderr:
                    pytest.skip(f"cannot drop privileges here: {out.stderr.strip()}")
                assert out.returncode == 0, out.stderr
                result = json.loads(out.stdout.splitlines()[-1])
        finally:
            sd.chmod(0o755)
    assert result["changed"] is True and result["saved"] is False
    problems = result["problems"]
    assert isinstance(problems, list) and len(problems) == 2
    assert problems[0].startswith("cannot read") and "could not be moved aside" in problems[0]
    assert problems[1].startswith("cannot write") and "Permission denied" in problems[1]


def test_move_aside_does_not_raise_when_it_cannot_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "baseline.json").write_text("{")
    real_lstat = os.lstat

    def lstat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).endswith(".corrupt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(state.os, "lstat", lstat)
    monkeypatch.setattr(state.Path, "exists", lambda self: bool(lstat(self)))
    b = Baseline.open(tmp_path)
    assert b.gpus == () and "could not be moved aside" in b.problems()[0]


# --- the writer lock ----------------------------------------------------------------------------


def _deny_writable_lock_open(monkeypatch: pytest.MonkeyPatch, always: bool = False) -> None:
    """A root-owned 0644 .baseline.lock seen by the daemon's user: no write access."""
    real_open = os.open

    def fake_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if str(path).endswith(state.LOCK_FILE) and (always or flags & (os.O_WRONLY | os.O_RDWR)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(state.os, "open", fake_open)


def test_a_read_only_lock_file_still_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / state.LOCK_FILE).write_text("")
    b = Baseline(tmp_path)
    _deny_writable_lock_open(monkeypatch)
    with b.lock():
        other = os.open(tmp_path / state.LOCK_FILE, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # held: another writer would wait
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)


def test_a_lock_file_that_cannot_be_opened_is_warned_about_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tfgpud.state")
    b = learned(tmp_path, U0)
    _deny_writable_lock_open(monkeypatch, always=True)
    for _ in range(3):
        with b.lock():
            b.save_quietly(2.0)  # the work goes on unlocked
    [rec] = caplog.records
    assert "cannot open" in rec.getMessage() and "without the lock" in rec.getMessage()
    assert json.loads(b.path.read_text())["updated_at"] == 2.0


# --- changes from the CLI, seen by the daemon --------------------------------------------------


def test_daemon_rereads_the_file_after_forget_and_reset(tmp_path: Path) -> None:
    daemon = learned(tmp_path, U0, U1)
    assert not daemon.refresh()
    forget_gpu(tmp_path, U1)
    assert daemon.refresh()
    assert [g.uuid for g in daemon.gpus] == [U0]
    removed, moved = reset_baseline(tmp_path)
    assert [g.uuid for g in removed] == [U0] and moved is None
    assert daemon.refresh()
    assert daemon.gpus == ()
    with pytest.raises(KeyError):
        forget_gpu(tmp_path, U0)


def test_forget_refuses_a_corrupt_file_and_reset_moves_it_aside(tmp_path: Path) -> None:
    (tmp_path / "baseline.json").write_text("{")
    with pytest.raises(StateFileError):
        forget_gpu(tmp_path, U0)
    removed, moved = reset_baseline(tmp_path)
    assert removed == () and moved is not None and moved.read_text() == "{"
    assert Baseline.read(tmp_path).gpus == ()


def cli(tmp_path: Path, *args: str) -> int:
    cfg = tmp_path / "tfgpud.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    return main(["baseline", *args[:1], "--config", str(cfg), *args[1:]])


def test_cli_show_forget_reset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(tmp_path, "show") == EX_OK
    assert "(not written yet): 0 GPU(s) expected" in capsys.readouterr().out
    learned(tmp_path / "state", U0, U1)
    assert cli(tmp_path, "show") == EX_OK
    out = capsys.readouterr().out
    assert U0 in out and A6000 in out and "00000000:02:00.0" in out
    assert cli(tmp_path, "show", "--json") == EX_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["expected_gpus"] == 2 and doc["gpus"][1]["uuid"] == U1
    assert cli(tmp_path, "forget", "GPU-nope") == EX_FAILURE
    assert f"known: {U0}, {U1}" in capsys.readouterr().err
    assert cli(tmp_path, "forget", U1) == EX_OK
    assert [g.uuid for g in Baseline.read(tmp_path / "state").gpus] == [U0]
    assert cli(tmp_path, "reset") == EX_OK
    assert Baseline.read(tmp_path / "state").gpus == ()


def test_cli_reports_a_corrupt_file_and_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "baseline.json").write_text("garbage")
    assert cli(tmp_path, "show") == EX_FAILURE
    err = capsys.readouterr().err
    assert "is corrupt" in err and "tfgpud baseline reset" in err and "Traceback" not in err
    assert (tmp_path / "state" / "baseline.json").read_text() == "garbage"  # show changes nothing
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nnope = 1\n")
    assert main(["baseline", "show", "--config", str(bad)]) == EX_CONFIG


def test_cli_forget_unknown_uuid_with_a_file_gone_bad_meanwhile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    learned(tmp_path / "state", U0)

    def unreadable(cls: type[Baseline], *args: object, **kwargs: object) -> Baseline:
        raise StateFileError("baseline.json is corrupt: not valid JSON")

    monkeypatch.setattr(state.Baseline, "read", classmethod(unreadable))
    assert cli(tmp_path, "forget", "GPU-nope") == EX_FAILURE
    err = capsys.readouterr().err
    assert "GPU-nope is not in the baseline" in err and "not valid JSON" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state").write_text("not a directory")
    assert cli(tmp_path, "reset") == EX_FAILURE
    assert "cannot write the baseline" in capsys.readouterr().err


# --- diagnosis from the baseline ----------------------------------------------------------------


def test_vanished_names_uuid_name_and_pci_address(tmp_path: Path) -> None:
    b = learned(tmp_path, U0, U1)
    snap = Snapshot(
        taken_at=1.0, pci=PciReading(), nvml=nvml(U0), baseline=b.gpus, expected_gpus=b.expected
    )
    [f] = [f for f in diagnose(snap, Config()) if f.code == "gpu-vanished"]
    assert f.subject == U1 and f.severity.value == "critical"
    assert U1 in f.summary and A6000 in f.summary and "00000000:02:00.0" in f.summary
    assert "tfgpud baseline forget" in f.fix


def test_nvml_down_reports_every_baseline_gpu_beside_the_driver_finding(tmp_path: Path) -> None:
    b = learned(tmp_path, U0, U1)
    snap = Snapshot(
        taken_at=1.0,
        pci=PciReading(),
        nvml=nvml(up=False),
        baseline=b.gpus,
        expected_gpus=b.expected,
    )
    codes = {(f.code, f.subject) for f in diagnose(snap, Config())}
    assert {("gpu-vanished", U0), ("gpu-vanished", U1), ("driver-not-loaded", "host")} <= codes


def test_expect_count_without_a_baseline_reports_the_shortfall() -> None:
    cfg = Config.model_validate({"expect": {"gpus": 2}})
    snap = Snapshot(taken_at=1.0, pci=PciReading(), nvml=nvml(U0), expected_gpus=2)
    [f] = [f for f in diagnose(snap, cfg) if f.code == "gpu-vanished"]
    assert f.subject == "host" and "1 of the 2" in f.summary
    ok = Snapshot(taken_at=1.0, pci=PciReading(), nvml=nvml(U0, U1), expected_gpus=2)
    assert not [f for f in diagnose(ok, cfg) if f.code == "gpu-vanished"]


def test_a_long_name_in_the_file_is_cut_to_what_nvml_can_return(tmp_path: Path) -> None:
    # A hand-edited or tampered file: such strings must not live on in the daemon's memory.
    doc = {"version": 1, "gpus": [{"uuid": U0, "name": "A" * 500_000, "pci_bus_id": "0" * 999}]}
    (tmp_path / "baseline.json").write_text(json.dumps(doc))
    b = Baseline.open(tmp_path)
    assert b.problems() == ()
    (g,) = b.gpus
    assert g.uuid == U0 and g.name == "A" * 96 and g.pci_bus_id == "0" * 32


def test_a_file_larger_than_any_baseline_is_moved_aside_unread(tmp_path: Path) -> None:
    doc = {"version": 1, "gpus": [{"uuid": U0, "name": "A" * 50_000_000}]}
    (tmp_path / "baseline.json").write_text(json.dumps(doc))
    b = Baseline.open(tmp_path)
    assert b.gpus == ()
    assert len(b.problems()) == 1
    (corrupt,) = tmp_path.glob("baseline.json.*.corrupt")
    assert corrupt.stat().st_size > 50_000_000


def test_a_uuid_longer_than_nvml_allows_makes_the_file_corrupt(tmp_path: Path) -> None:
    doc = {"version": 1, "gpus": [{"uuid": "GPU-" + "f" * 200}]}
    (tmp_path / "baseline.json").write_text(json.dumps(doc))
    b = Baseline.open(tmp_path)
    assert b.gpus == () and len(b.problems()) == 1


def test_more_gpus_than_any_machine_has_makes_the_file_corrupt(tmp_path: Path) -> None:
    doc = {"version": 1, "gpus": [{"uuid": f"GPU-{i}"} for i in range(300)]}
    (tmp_path / "baseline.json").write_text(json.dumps(doc))
    b = Baseline.open(tmp_path)
    assert b.gpus == () and len(b.problems()) == 1
