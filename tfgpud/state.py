"""The persisted baseline: the GPUs this machine is expected to have, keyed by UUID.

The baseline lives in ``<[daemon] state_dir>/baseline.json`` and is learned as the set of GPUs
NVML has ever listed here (until ``tfgpud baseline forget|reset``), or sized by ``[expect] gpus``.
It is what makes "a GPU is gone" visible after a restart or a reboot. Every write is atomic
(temp file, fsync, rename, fsync of the directory); writers (the daemon, the CLI) hold an
advisory lock so a CLI change is never overwritten by the daemon. The daemon re-reads the file
when its identity (inode, mtime, size) changes, so a CLI change takes effect at its next poll.

A corrupt or unreadable file is moved aside as ``baseline.json.<time>.corrupt`` and the baseline
is rebuilt from what is seen now; the problem is reported in :meth:`Baseline.problems` (the
``baseline-state-error`` finding) for as long as the ``*.corrupt`` file is kept. Only the newest
:data:`MAX_CORRUPT_FILES` of them are kept and the newest :data:`SHOWN_CORRUPT_FILES` named, so a
tool that keeps writing a bad file fills neither the state dir nor the finding. A file that can
be neither read nor moved aside (an unreadable ``state_dir``), or a write that fails (disk full,
read-only file system), is reported there too; the daemon's side of this module never raises
OSError. A failed write is retried (:meth:`Baseline.flush_if_dirty`, at most every
:data:`SAVE_RETRY_SECONDS`) until it succeeds, which clears the problem.

The baseline holds at most :data:`MAX_BASELINE_GPUS` GPUs (what the reader accepts): a GPU that
would make it more (a cloud VM that lands on other physical GPUs at each start sees new UUIDs
every time) first makes room by forgetting the GPUs not seen for the longest, never one that is
visible now.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from tfgpud.listing import DirectoryListing, file_stamp
from tfgpud.model import KnownGpu, NvmlReading

log = logging.getLogger(__name__)

BASELINE_FILE = "baseline.json"
CORRUPT_PATTERN = f"{BASELINE_FILE}.*.corrupt"
LOCK_FILE = ".baseline.lock"
FORMAT_VERSION = 1
# A failed baseline write is retried at the next poll at least this long after the failure.
SAVE_RETRY_SECONDS = 30.0
# journald MESSAGE_IDs of the state file's own log entries.
MSG_STATE_UNUSABLE = "8d1a5e0c2f6b4a7e9c3d0b1f4e6a2c58"
MSG_STATE_REREAD = "3f0c6b1e9a2d4c7b8e5f1a0d2c4b6e93"
MSG_GPU_JOINED = "c6e2a9f04b1d4e8a9f3b7d5c1e0a8b24"
MSG_GPU_FORGOTTEN = "1a391aae727d46e3a8e5e38970b51a46"
# Baselines moved aside: the newest this many are kept (older ones are deleted at the next move),
# and the finding names the newest SHOWN_CORRUPT_FILES of those present.
MAX_CORRUPT_FILES = 10
SHOWN_CORRUPT_FILES = 5
# What move_aside names them: baseline.json.<UTC time>[-<n>].corrupt, n counting up within a second.
_CORRUPT_NAME = re.compile(re.escape(BASELINE_FILE) + r"\.(\d{8}T\d{6}Z)(?:-(\d+))?\.corrupt")

Expect = int | Literal["auto"]


class StateFileError(Exception):
    """The state file cannot be read or parsed. The message is for a person."""


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory.

    A reader sees the old or the new content, never a mix, even across a power loss.
    Raises OSError (the temp file is removed).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


# A baseline lists a machine's GPUs: a few hundred bytes each. A file far larger than any real
# one is not read into memory at all; strings are cut to what NVML itself can return (its name
# and UUID buffers are 96 bytes, a PCI bus id 32), so a tampered file cannot bloat the daemon.
MAX_BASELINE_BYTES = 1 << 20
MAX_BASELINE_GPUS = 256
FIELD_LIMITS = {"uuid": 96, "name": 96, "pci_bus_id": 32}


def _corrupt_order(name: str) -> tuple[bool, str, int, str]:
    """Sort key of a moved-aside baseline's file name, oldest first: by the time and counter in
    its name; a name matching ``*.corrupt`` but not written by tfgpud sorts before all of those."""
    m = _CORRUPT_NAME.fullmatch(name)
    if m is None:
        return (False, "", 0, name)
    return (True, m[1], int(m[2] or 1), name)


def _when(t: float | None) -> str:
    """``t`` as a UTC time for a log line; "?" when unknown or out of the calendar's range (a
    hand-edited file): a log line must not make the poll fail."""
    if t is None:
        return "?"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    except (OverflowError, OSError, ValueError):
        return "?"


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of ``path``; ``StateFileError`` when it holds more than ``limit`` bytes (only
    ``limit + 1`` are ever read). ``OSError`` (``FileNotFoundError`` included) passes through."""
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise StateFileError(f"larger than {limit} bytes, far more than tfgpud ever writes")
    return data


def _opt_str(entry: dict[str, Any], key: str) -> str | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, str):
        raise StateFileError(f"gpus[].{key}: expected a string, got {value!r:.80}")
    return None if value is None else value[: FIELD_LIMITS[key]]


def _opt_time(entry: dict[str, Any], key: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StateFileError(f"gpus[].{key}: expected a number, got {value!r}")
    return float(value)


def parse_baseline(data: bytes) -> dict[str, KnownGpu]:
    """The GPUs in a baseline file's bytes; raises StateFileError when they are not valid."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise StateFileError(f"not a version-{FORMAT_VERSION} tfgpud baseline")
    entries = doc.get("gpus")
    if not isinstance(entries, list):
        raise StateFileError("`gpus` is missing or not a list")
    if len(entries) > MAX_BASELINE_GPUS:
        raise StateFileError(f"`gpus` lists {len(entries)} GPUs, more than {MAX_BASELINE_GPUS}")
    gpus: dict[str, KnownGpu] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise StateFileError(f"gpus[]: expected an object, got {entry!r}")
        uuid = entry.get("uuid")
        if not isinstance(uuid, str) or not uuid or len(uuid) > FIELD_LIMITS["uuid"]:
            raise StateFileError(
                f"gpus[].uuid: expected a GPU UUID (1 to {FIELD_LIMITS['uuid']} characters), "
                f"got {uuid!r:.80}"
            )
        gpus[uuid] = KnownGpu(
            uuid=uuid,
            name=_opt_str(entry, "name"),
            pci_bus_id=_opt_str(entry, "pci_bus_id"),
            first_seen=_opt_time(entry, "first_seen"),
            last_seen=_opt_time(entry, "last_seen"),
        )
    return gpus


def render_baseline(gpus: dict[str, KnownGpu], now: float) -> bytes:
    doc = {
        "version": FORMAT_VERSION,
        "updated_at": now,
        "gpus": [
            {
                "uuid": g.uuid,
                "name": g.name,
                "pci_bus_id": g.pci_bus_id,
                "first_seen": g.first_seen,
                "last_seen": g.last_seen,
            }
            for g in sorted(gpus.values(), key=lambda g: g.uuid)
        ],
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


class Baseline:
    """The expected GPUs of this machine, backed by ``<state_dir>/baseline.json``.

    Construct with :meth:`open` (the daemon: repairs a bad file) or :meth:`read` (read-only).
    Not thread-safe: the daemon uses it from the poll loop only.
    """

    def __init__(
        self,
        state_dir: Path | str,
        expect: Expect = "auto",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / BASELINE_FILE
        self.expect: Expect = expect
        self._clock = clock  # paces write retries (SAVE_RETRY_SECONDS)
        self._gpus: dict[str, KnownGpu] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._problem: str | None = None  # a read problem not visible as a .corrupt file
        self._write_problem: str | None = None  # the last write failed (retried)
        self._dirty = False  # last_seen moved on without a membership change: saved at close
        self._unsaved = False  # a membership/identity change not on disk yet: retried
        self._retry_at = float("-inf")  # clock() time the next write retry is due
        self._lock_warned: str | None = None
        self._refused = 0  # visible GPUs left out of a full baseline (logged when it changes)
        self._lock_depth = 0
        self._listing = DirectoryListing()  # state_dir, listed again only when it changed

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        state_dir: Path | str,
        expect: Expect = "auto",
        clock: Callable[[], float] = time.monotonic,
    ) -> Baseline:
        """Load the baseline, moving a corrupt or unreadable file aside. Never raises: a file
        that can be neither read nor moved aside is reported through :meth:`problems`."""
        b = cls(state_dir, expect, clock)
        b._load(repair=True)
        return b

    @classmethod
    def read(cls, state_dir: Path | str, expect: Expect = "auto") -> Baseline:
        """Load read-only; raises StateFileError when the file is corrupt or unreadable."""
        b = cls(state_dir, expect)
        b._gpus = b._read_file()
        return b

    def _read_file(self) -> dict[str, KnownGpu]:
        try:
            data = read_bounded(self.path, MAX_BASELINE_BYTES)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateFileError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except StateFileError as exc:
            raise StateFileError(f"{self.path} is corrupt: {exc}") from None
        try:
            return parse_baseline(data)
        except StateFileError as exc:
            raise StateFileError(f"{self.path} is corrupt: {exc}") from None

    def _load(self, repair: bool) -> None:
        self._stamp = file_stamp(self.path)
        self._unsaved = False  # memory is what the file says now (or empty: re-learned)
        self._retry_at = float("-inf")
        try:
            self._gpus = self._read_file()
            self._problem = None
            return
        except StateFileError:
            self._gpus = {}
            if not repair:
                raise
        with self.lock():  # re-entrant: refresh() holds it already
            self._repair()

    def _repair(self) -> None:
        """Under the writer lock: read the file once more (``tfgpud baseline reset`` may have
        replaced it since, holding the lock) and move it aside only if it is still unusable."""
        self._stamp = file_stamp(self.path)
        try:
            self._gpus = self._read_file()
            self._problem = None
        except StateFileError as exc:
            self._gpus = {}
            try:
                moved = self.move_aside()
            except OSError as err:  # move_aside reports its own failures; belt and braces
                log.error("cannot move %s aside: %s", self.path, err.strerror or err)
                moved = None
            if moved is None:
                self._problem = f"{exc}; it could not be moved aside"
            else:
                self._problem = None  # reported through the .corrupt file from now on
            log.error(
                "baseline state file unusable: %s; %s; rebuilding it from the GPUs seen now",
                exc,
                f"moved aside to {moved}" if moved else "could not move it aside",
                extra={"MESSAGE_ID": MSG_STATE_UNUSABLE, "STATE_FILE": self.path},
            )
            self._stamp = file_stamp(self.path)

    def move_aside(self) -> Path | None:
        """Rename the state file to ``baseline.json.<UTC time>.corrupt``; None if that failed.

        Then deletes the oldest moved-aside files beyond the newest :data:`MAX_CORRUPT_FILES`
        (never the one just moved aside: it is the evidence)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        # Count on past the highest counter of this second, not into a gap left by a deleted
        # file: the name keeps sorting as the newest.
        names = [p.name for p in reversed(self.corrupt_files())]  # oldest first
        n = max((o[2] for o in map(_corrupt_order, names) if o[1] == stamp), default=0) + 1

        def named(n: int) -> Path:
            return self.path.with_name(
                f"{self.path.name}.{stamp}{f'-{n}' if n > 1 else ''}.corrupt"
            )

        target = named(n)
        try:
            # os.lstat, not Path.exists(): on Python 3.11 exists() raises PermissionError when
            # state_dir cannot be searched, and this runs where nothing may raise.
            while True:
                try:
                    os.lstat(target)
                except FileNotFoundError:
                    break
                n += 1
                target = named(n)
            os.rename(self.path, target)
        except OSError as exc:
            log.error("cannot move %s aside: %s", self.path, exc.strerror or exc)
            return None
        self._prune_corrupt(names, target)
        return target

    def _prune_corrupt(self, names: list[str], kept: Path) -> None:
        """Delete the oldest of ``names`` (oldest first) so that, with ``kept``, at most
        :data:`MAX_CORRUPT_FILES` moved-aside files remain. Never raises."""
        older = [n for n in names if n != kept.name]
        excess = older[: max(0, len(older) - (MAX_CORRUPT_FILES - 1))]
        deleted = []
        for name in excess:
            try:
                os.unlink(self.state_dir / name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot delete %s: %s", self.state_dir / name, exc.strerror or exc)
                continue
            deleted.append(name)
        if deleted:
            log.warning(
                "deleted %d older moved-aside baseline file(s) from %s, keeping the newest %d: %s",
                len(deleted),
                self.state_dir,
                MAX_CORRUPT_FILES,
                ", ".join(deleted),
            )

    def refresh(self) -> bool:
        """Re-read the file if someone else (``tfgpud baseline ...``) replaced it. Never raises.

        Returns True when it was re-read.
        """
        if file_stamp(self.path) == self._stamp:
            return False
        with self.lock():
            self._load(repair=True)
        log.info(
            "baseline re-read from %s: %d GPU(s) expected",
            self.path,
            len(self._gpus),
            extra={"MESSAGE_ID": MSG_STATE_REREAD},
        )
        return True

    # -- what it says --------------------------------------------------------------------------

    @property
    def gpus(self) -> tuple[KnownGpu, ...]:
        return tuple(sorted(self._gpus.values(), key=lambda g: g.uuid))

    @property
    def expected(self) -> int:
        """How many GPUs this machine should have: ``[expect] gpus``, else the learned count."""
        return self.expect if isinstance(self.expect, int) else len(self._gpus)

    def corrupt_files(self) -> list[Path]:
        """The baselines moved aside and not yet deleted, newest first (looked for every poll)."""
        names = [
            n for n in self._listing.names(str(self.state_dir)) if fnmatchcase(n, CORRUPT_PATTERN)
        ]
        return [self.state_dir / n for n in sorted(names, key=_corrupt_order, reverse=True)]

    def problems(self) -> tuple[str, ...]:
        """One line per state-file problem a person should look at (empty when all is well);
        moved-aside files beyond the newest :data:`SHOWN_CORRUPT_FILES` are one line."""
        out = [p for p in (self._problem, self._write_problem) if p]
        corrupt = self.corrupt_files()
        out.extend(
            f"{p} holds a baseline that could not be read; it was moved aside and the "
            "baseline rebuilt from the GPUs seen since"
            for p in corrupt[:SHOWN_CORRUPT_FILES]
        )
        if len(corrupt) > SHOWN_CORRUPT_FILES:
            out.append(
                f"and {len(corrupt) - SHOWN_CORRUPT_FILES} more, older ones: "
                f"{self.state_dir / CORRUPT_PATTERN}"
            )
        return tuple(out)

    # -- changing it ---------------------------------------------------------------------------

    def learn(self, nvml: NvmlReading | None, now: float) -> bool:
        """Add the GPUs NVML lists now (and refresh their name/PCI id). True if that changed
        the membership or an identity (then the caller saves); last_seen alone does not."""
        if nvml is None or not nvml.up:
            return False
        # A lost GPU whose UUID this process never read ("GPU-unknown-...") is not learned.
        seen = [g for g in nvml.gpus if not g.uuid.startswith("GPU-unknown")]
        changed = self._make_room({g.uuid for g in seen})
        for g in seen:
            prev = self._gpus.get(g.uuid)
            if prev is None and len(self._gpus) >= MAX_BASELINE_GPUS:
                continue  # more GPUs visible at once than the cap: _make_room logged it
            name = g.name or (prev.name if prev else None)
            bus = g.pci_bus_id or (prev.pci_bus_id if prev else None)
            if prev is None:
                log.info(
                    "GPU %s %s at %s joined the baseline (%s)",
                    name or "?",
                    g.uuid,
                    bus or "?",
                    self.path,
                    extra={"MESSAGE_ID": MSG_GPU_JOINED, "SUBJECT": g.uuid},
                )
            if prev is None or prev.name != name or prev.pci_bus_id != bus:
                changed = True
            self._gpus[g.uuid] = KnownGpu(
                uuid=g.uuid,
                name=name,
                pci_bus_id=bus,
                first_seen=prev.first_seen if prev and prev.first_seen else now,
                last_seen=now,
            )
            self._dirty = True
        if changed:
            self._unsaved = True  # until a save succeeds (flush_if_dirty retries it)
        return changed

    def _make_room(self, visible: set[str]) -> bool:
        """Forget the GPUs not seen for the longest (never one in ``visible``) so that the
        ones in ``visible`` fit within :data:`MAX_BASELINE_GPUS`. True if any was forgotten."""
        over = len(self._gpus.keys() | visible) - MAX_BASELINE_GPUS
        if over <= 0:
            self._refused = 0
            return False
        unseen = sorted(
            (g for g in self._gpus.values() if g.uuid not in visible),
            key=lambda g: (g.last_seen or g.first_seen or float("-inf"), g.uuid),
        )
        gone = unseen[:over]
        for g in gone:
            del self._gpus[g.uuid]
        if gone:
            log.warning(
                "baseline %s is full (%d GPUs): forgot the %d GPU(s) not seen for the longest "
                "to make room for new ones: %s",
                self.path,
                MAX_BASELINE_GPUS,
                len(gone),
                ", ".join(f"{g.uuid} (last seen {_when(g.last_seen)})" for g in gone),
                extra={"MESSAGE_ID": MSG_GPU_FORGOTTEN},
            )
        refused = over - len(gone)  # only when NVML lists more GPUs at once than the cap
        if refused and refused != self._refused:  # logged when it changes, not every poll
            log.warning(
                "NVML lists %d GPUs, more than the baseline holds (%d): %d new one(s) not learned",
                len(visible),
                MAX_BASELINE_GPUS,
                refused,
            )
        self._refused = refused
        return bool(gone)

    def forget(self, uuid: str) -> KnownGpu | None:
        """Remove one GPU (accept that it is gone for good); the removed entry or None."""
        return self._gpus.pop(uuid, None)

    def reset(self) -> tuple[KnownGpu, ...]:
        """Forget every GPU; the daemon re-learns the ones it sees. Returns what was removed."""
        removed = self.gpus
        self._gpus.clear()
        return removed

    def save(self, now: float | None = None) -> None:
        """Write the file atomically (creating state_dir). Raises OSError."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(
            self.path, render_baseline(self._gpus, time.time() if now is None else now)
        )
        self._stamp = file_stamp(self.path)
        self._dirty = self._unsaved = False

    def save_quietly(self, now: float | None = None) -> bool:
        """:meth:`save`, logging (and reporting through :meth:`problems`) instead of raising.

        A failure leaves the baseline dirty: :meth:`flush_if_dirty` retries it (not before
        :data:`SAVE_RETRY_SECONDS`) and :meth:`close` tries once more. A success clears the
        problem: the file on disk is valid and current again.
        """
        try:
            self.save(now)
        except Exception as exc:  # noqa: BLE001 - OSError, or anything else: never raise here
            self._unsaved = True
            self._retry_at = self._clock() + SAVE_RETRY_SECONDS
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            msg = f"cannot write {self.path}: {detail}"
            if msg != self._write_problem:
                log.error(
                    "%s; the baseline is kept in memory and the write retried every %.0f s",
                    msg,
                    SAVE_RETRY_SECONDS,
                )
            self._write_problem = msg
            return False
        if self._write_problem:
            log.info("baseline written to %s again", self.path)
        # The file is valid and current now; a read problem (logged when it happened) is over.
        self._problem = self._write_problem = None
        return True

    @property
    def unsaved(self) -> bool:
        """A membership/identity change is not on disk yet (its write failed or is pending)."""
        return self._unsaved

    def flush_if_dirty(self, now: float | None = None) -> bool:
        """Retry a baseline write that failed (the daemon calls this every poll). Never raises.

        Writes only when a membership/identity change is unsaved and the last failure is at
        least :data:`SAVE_RETRY_SECONDS` old; last_seen alone waits for :meth:`close`. A file
        changed meanwhile by ``tfgpud baseline ...`` wins: it is re-read instead of overwritten
        (the next :meth:`learn` adds back the GPUs seen). Returns True when it wrote the file.
        """
        if not self._unsaved or self._clock() < self._retry_at:
            return False
        with self.lock():
            if file_stamp(self.path) != self._stamp:
                self._load(repair=True)
                return False
            return self.save_quietly(now)

    def close(self) -> None:
        """Persist what is not on disk yet (daemon shutdown): a change whose write failed, and
        last_seen times gathered since the last write. Never raises, ignores the retry pacing,
        and does not clobber a change ``tfgpud baseline ...`` made meanwhile."""
        if self._unsaved or self._dirty:
            with self.lock():
                if file_stamp(self.path) == self._stamp:
                    self.save_quietly()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the advisory writer lock (``state_dir/.baseline.lock``) when it can be had.

        The lock file is opened read-only: flock() needs no write access, so a lock file that
        root created (``sudo tfgpud baseline reset``, mode 0644) still locks for the daemon's
        user. When it cannot be opened or locked at all, the work goes on unlocked (a warning
        is logged once per distinct error). Never raises OSError.
        Re-entrant: flock() on a second descriptor of the same file would wait for ourselves.
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        fd: int | None = None
        self._lock_depth = 1
        lock_path = self.state_dir / LOCK_FILE
        with suppress(OSError):  # else the open below fails and says why
            self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            # O_CREAT asks for no write access to a lock file that exists already (even on a
            # read-only file system), only to the directory when it has to create one.
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self._warn_unlocked(f"cannot open {lock_path}: {exc.strerror or exc}")
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                self._warn_unlocked(f"cannot lock {lock_path}: {exc.strerror or exc}")
        try:
            yield
        finally:
            self._lock_depth = 0
            if fd is not None:
                os.close(fd)

    def _warn_unlocked(self, msg: str) -> None:
        if msg != self._lock_warned:
            self._lock_warned = msg
            log.warning(
                "%s; changing the baseline without the lock (a concurrent `tfgpud baseline` "
                "change may be lost)",
                msg,
            )


# --- `tfgpud baseline forget|reset` -------------------------------------------------------------


def forget_gpu(state_dir: Path | str, uuid: str) -> KnownGpu:
    """Remove ``uuid`` from the persisted baseline. Raises KeyError (not in it),
    StateFileError (file unusable: reset instead) or OSError (cannot write)."""
    b = Baseline(state_dir)
    with b.lock():
        b._gpus = b._read_file()
        gone = b.forget(uuid)
        if gone is None:
            raise KeyError(uuid)
        b.save()
    return gone


def reset_baseline(state_dir: Path | str) -> tuple[tuple[KnownGpu, ...], Path | None]:
    """Empty the persisted baseline (a running daemon re-learns the GPUs it sees). A corrupt
    file is moved aside first. Returns (the GPUs removed, where a corrupt file went).
    Raises OSError when the file cannot be written."""
    b = Baseline(state_dir)
    moved: Path | None = None
    with b.lock():
        try:
            b._gpus = b._read_file()
        except StateFileError:
            moved = b.move_aside()
        removed = b.reset()
        b.save()
    return removed, moved
