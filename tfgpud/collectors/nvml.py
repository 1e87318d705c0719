"""The driver's view through NVML. The only module that imports ``pynvml``.

NVML being absent, the driver not loaded, or a GPU fallen off the bus are *readings*, not
errors: :meth:`NvmlSession.poll` always returns an :class:`NvmlReading`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pynvml

from tfgpud.model import GpuProcess, GpuReading, NvmlReading
from tfgpud.recurring import Recurring
from tfgpud.xids import XidLog, XidLogLines, XidView

log = logging.getLogger(__name__)
T = TypeVar("T")

# Error codes that mean "this field does not exist here": omit it, don't complain each poll.
_ABSENT = {pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND}
# Errors on a device call that mean the whole driver went away (unloaded, upgraded, revoked).
# NO_PERMISSION is not among them: NVML returns it for one device a cgroup or a 0660 node
# keeps from us, and one GPU must never hide the others (init-time NO_PERMISSION is driver-wide).
_DRIVER_GONE = {
    pynvml.NVML_ERROR_UNINITIALIZED,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
}
_GPU_GONE = {pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED}
# The GPU answers nothing useful, but it is not lost: reported as unreadable, not as fallen off.
_GPU_UNREADABLE = {pynvml.NVML_ERROR_NO_PERMISSION}

_ERROR_NAMES: dict[int, str] = {
    value: name[len("NVML_ERROR_") :]
    for name, value in vars(pynvml).items()
    if name.startswith("NVML_ERROR_") and isinstance(value, int)
}

XID_EVENT = pynvml.nvmlEventTypeXidCriticalError
REGISTER_RETRY_SECONDS = 30.0  # a GPU whose Xid registration failed is tried again this often
# One NVML wait lasts this long when nothing happens: an Xid ends it at once, so this bounds only
# how late a changed GPU set (a GPU back after a reset, NVML re-initialised) is registered, and
# costs one wake-up per wait.
XID_WAIT_MS = 30_000
# After an event wait failed (not a timeout), wait this long before building a new set.
XID_RETRY_MS = 1_000
# Persistence and MIG mode of a GPU are read again after this long (settings, not readings).
SETTINGS_SECONDS = 60.0


def error_name(code: int) -> str:
    """NVML return code → its short name (``15`` → ``"GPU_IS_LOST"``)."""
    return _ERROR_NAMES.get(code, f"CODE_{code}")


class DriverGone(Exception):
    """NVML stopped answering for the whole driver during a poll."""

    def __init__(self, code: int) -> None:
        super().__init__(error_name(code))
        self.code = code


class GpuGone(Exception):
    """One GPU stopped answering (lost, needs reset)."""

    def __init__(self, code: int) -> None:
        super().__init__(error_name(code))
        self.code = code


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _loaded_library() -> tuple[str | None, bool]:
    """Path of the libnvidia-ml this process has mapped, and whether that file was deleted
    since (a driver upgrade replaced it: only a restart of this process loads the new one)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                if "libnvidia-ml.so" in line:
                    path = line.split(None, 5)[-1].strip()
                    deleted = path.endswith(" (deleted)")
                    return path.removesuffix(" (deleted)"), deleted
    except OSError:
        pass
    return None, False


_NOT_AVAILABLE = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value


class _ProcessInfo(ctypes.Structure):
    """``nvmlProcessInfo_v2_t``/``_v3_t`` as a plain ctypes struct: pynvml's own class converts
    every field access through a Python ``__getattribute__``, most of the cost of reading a busy
    GPU's process list."""

    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


# Whether this pynvml lets the process lists be read into _ProcessInfo structs directly.
_RAW_PROCESSES = hasattr(pynvml, "_nvmlGetFunctionPointer") and ctypes.sizeof(
    getattr(pynvml, "c_nvmlProcessInfo_v3_t", ctypes.c_char)
) == ctypes.sizeof(_ProcessInfo)


class _ProcessLister:
    """Reads a GPU's compute process list into a buffer kept from poll to poll (one for every
    GPU: what a call returns is a copy).

    Its one reader is named after the NVML call it makes, the name ``NvmlSession._q`` logs
    when that call fails. It returns the list as NVML wrote it (the struct array's bytes,
    comparable with the last poll's), or, where this pynvml lacks the pieces used here (or lays
    the struct out otherwise), what ``pynvml.nvmlDeviceGetComputeRunningProcesses`` returns as
    (pid, used) pairs. One NVML call per GPU while the buffer has room (NVML fills in how many
    there are); it grows, and the call is repeated, when it has not.
    """

    def __init__(self) -> None:
        self._buf = (_ProcessInfo * 32)()
        self._count = ctypes.c_uint(0)

    def nvmlDeviceGetComputeRunningProcesses_v3(
        self, handle: Any
    ) -> bytes | list[tuple[int, int | None]]:
        if not _RAW_PROCESSES:
            return [
                (int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory))
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            ]
        fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetComputeRunningProcesses_v3")
        for _ in range(4):
            self._count.value = len(self._buf)
            ret = fn(handle, ctypes.byref(self._count), self._buf)
            if ret == pynvml.NVML_SUCCESS:
                n = min(self._count.value, len(self._buf))
                return ctypes.string_at(self._buf, n * ctypes.sizeof(_ProcessInfo))
            if ret != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
                raise pynvml.NVMLError(ret)
            # Room for processes started since NVML counted them.
            self._buf = (_ProcessInfo * (self._count.value * 2 + 5))()
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)

    def pairs(self, got: bytes | list[tuple[int, int | None]]) -> list[tuple[int, int | None]]:
        """(pid, used GPU memory or None) of each process in what the reader returned."""
        if isinstance(got, list):
            return got
        out = []
        for p in (_ProcessInfo * (len(got) // ctypes.sizeof(_ProcessInfo))).from_buffer_copy(got):
            used = p.usedGpuMemory
            out.append((p.pid, None if used == _NOT_AVAILABLE else used))
        return out


def _proc_name(proc_root: str, pid: int) -> str | None:
    # Plain strings, not pathlib: this runs for every GPU process on every poll.
    try:
        with open(f"{proc_root}/{pid}/comm", "rb") as f:
            return f.read().decode("utf-8", "replace").strip() or None
    except OSError:
        return None


class NvmlSession:
    """Owns NVML initialisation: init on first poll, re-init after the driver comes back.

    ``library`` is an explicit path to ``libnvidia-ml.so.1``; loading it first by path makes
    pynvml's own ``CDLL("libnvidia-ml.so.1")`` reuse it (same soname).
    """

    def __init__(
        self,
        library: str | None = None,
        proc_root: Path = Path("/proc"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._library = library
        self._proc_root_str = str(proc_root)
        self._clock = clock
        self._up = False
        self._lock = threading.Lock()
        # Held by the Xid thread for as long as it uses the event set, waits included; poll()
        # never blocks on it (a driver loss it finds while a wait is in progress is finished by
        # whoever holds this lock next: see _drop).
        self._event_lock = threading.Lock()
        self._shutdown_due = False  # NVML must be shut down (and the event set freed) first
        self._waiting = False  # the Xid thread is inside an NVML event wait
        self._changed = threading.Event()  # wakes an idle Xid thread: NVML up, GPUs changed
        self._next_attempt = 0.0
        self._backoff = 0.0
        self._last_error: tuple[str, int] | None = None
        self._warned: set[tuple[str, int]] = set()
        # Identity of each index from the last good read: a lost GPU may not tell its UUID.
        self._identity: dict[int, tuple[str, str | None, str | None]] = {}
        # uuid -> (name, bus id, compute capability) of the GPUs of the last poll
        self._fixed_by_uuid: dict[str, tuple[str | None, str | None, tuple[int, int] | None]] = {}
        self._library_path: str | None = None
        self._generation = 0  # bumped at each successful init; event sets die with NVML
        self._events: tuple[tuple[frozenset[str], int], Any, dict[int, str]] | None = None
        self._pending: list[tuple[str, int]] = []  # drained from a set that was rebuilt
        self._register_failed = False
        self._register_retry_at = 0.0
        # pid -> what some GPU listed for it in the last poll: a pid listed poll after poll is
        # the same process (its context would have gone with it), so its name is read once.
        self._procs: dict[int, GpuProcess] = {}
        # GPU index -> its process list as read (see _ProcessLister) and as parsed, last poll
        # and this one so far.
        self._lists: dict[int, tuple[Any, tuple[GpuProcess, ...]]] = {}
        self._lists_now: dict[int, tuple[Any, tuple[GpuProcess, ...]]] = {}
        self._lister = _ProcessLister()
        # Driver, CUDA and NVML versions of this session; uuid -> (next read due, persistence
        # mode, MIG mode).
        self._system: tuple[Any, Any, Any] | None = None
        self._settings: dict[str, tuple[float, bool | None, bool | None]] = {}

    @property
    def up(self) -> bool:
        return self._up

    # -- init / shutdown -----------------------------------------------------------------------

    def _try_init(self) -> tuple[str, int] | None:
        """Initialise NVML; return None on success or (error name, code)."""
        if self._library:
            try:
                ctypes.CDLL(self._library)
            except OSError as exc:
                log.debug("cannot load %s: %s", self._library, exc)
                return ("LIBRARY_NOT_FOUND", pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            return (error_name(exc.value), int(exc.value))
        self._library_path = _loaded_library()[0]
        return None

    def _ensure_up(self) -> tuple[str, int] | None:
        if self._up:
            return None
        if self._shutdown_due and not self._finish_shutdown(blocking=False):
            # The Xid thread is in a wait on the lost session's event set; until it returns,
            # re-initialising would only add a reference to that session.
            return self._last_error
        now = self._clock()
        if now < self._next_attempt and self._last_error is not None:
            return self._last_error
        err = self._try_init()
        if err is None:
            if self._last_error is not None:
                log.info("NVML initialised (driver available again)")
            self._up, self._last_error, self._backoff = True, None, 0.0
            self._generation += 1
            self._identity.clear()  # indexes may have moved while the driver was away
            self._fixed_by_uuid.clear()
            self._procs.clear()
            self._system = None
            self._settings.clear()
            self._lists.clear()
            self._changed.set()
            return None
        # No library at all: back off up to 30 s (a dlopen search each poll is waste).
        # Any other init error is a loaded-but-unhappy driver: retry every poll, it is cheap.
        if err[1] == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
            self._backoff = min(30.0, max(1.0, self._backoff * 2))
            self._next_attempt = now + self._backoff
        if err != self._last_error:
            log.warning("NVML unavailable: %s", err[0])
        self._last_error = err
        return err

    def _drop(self, code: int) -> None:
        """The driver went away (poll thread, under ``_lock``): NVML is down from now on. The
        event set is freed and NVML shut down at once, or, while the Xid thread waits on the
        set, by that thread when its wait returns (never under a wait in progress)."""
        self._up = False
        self._shutdown_due = True
        self._last_error = (error_name(code), code)
        self._next_attempt = 0.0
        self._finish_shutdown(blocking=False)

    def _finish_shutdown(self, blocking: bool, timeout: float = -1) -> bool:
        """Free the event set and shut NVML down if that is due; False when the Xid thread
        holds the set (it finishes the job itself when its wait returns)."""
        if not self._event_lock.acquire(blocking, timeout):
            return False
        try:
            self._shutdown_locked()
        finally:
            self._event_lock.release()
        return True

    def _shutdown_locked(self) -> None:
        if self._shutdown_due:
            self._free_events()
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()
            self._shutdown_due = False

    @property
    def waiting(self) -> bool:
        """True while the Xid thread is blocked in an NVML event wait."""
        return self._waiting

    def close(self, timeout: float = 1.0) -> None:
        """Shut NVML down if this session initialised it.

        While the Xid thread is blocked in an event wait, NVML is left to the process exit (the
        driver frees what the wait holds) rather than waiting up to the wait's length; a
        drain in progress is waited for up to ``timeout``.
        """
        with self._lock:
            if self._up:
                self._up = False
                self._shutdown_due = True
            if not self._shutdown_due or self._finish_shutdown(blocking=False):
                return
            if self._waiting:
                log.debug("an Xid wait is in progress; NVML is left to the process exit")
                return
            if not self._finish_shutdown(blocking=True, timeout=timeout):
                log.warning("NVML event wait did not return; exiting without nvmlShutdown")

    # -- queries -----------------------------------------------------------------------------

    def _q(self, fn: Callable[..., T], *args: Any) -> T | None:
        """Call one NVML getter; None when absent or failing, raise on GPU/driver loss."""
        try:
            return fn(*args)
        except pynvml.NVMLError as exc:
            code = int(exc.value)
            if code in _GPU_GONE:
                raise GpuGone(code) from None
            if code in _DRIVER_GONE:
                raise DriverGone(code) from None
            key = (fn.__name__, code)
            if key not in self._warned:
                self._warned.add(key)
                level = logging.DEBUG if code in _ABSENT else logging.WARNING
                log.log(level, "%s: %s (value omitted)", fn.__name__, error_name(code))
            return None

    def _processes(self, index: int, handle: Any) -> tuple[GpuProcess, ...]:
        """The GPU's compute processes, sorted by pid. The same list as the last poll's (the
        usual case: a training job's memory is set once) is the last poll's tuple, unparsed."""
        got = self._q(self._lister.nvmlDeviceGetComputeRunningProcesses_v3, handle)
        if got is None:
            return ()
        last = self._lists.get(index)
        if last is not None and last[0] == got:
            self._lists_now[index] = last
            return last[1]
        out = []
        for pid, used in sorted(self._lister.pairs(got)):
            known = self._procs.get(pid)
            if known is None:
                known = GpuProcess(pid, used, _proc_name(self._proc_root_str, pid))
            elif known.used_memory_bytes != used:
                known = GpuProcess(pid, used, known.name)
            out.append(known)
        procs = tuple(out)
        self._lists_now[index] = (got, procs)
        return procs

    def _gpu(self, index: int) -> GpuReading:
        handle = None
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as exc:
            code = int(exc.value)
            if code in _DRIVER_GONE:
                raise DriverGone(code) from None
            return self._unreadable(index, code)
        try:
            try:
                uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            except pynvml.NVMLError as exc:
                code = int(exc.value)
                if code in _DRIVER_GONE:
                    raise DriverGone(code) from None
                return self._unreadable(index, code)
            name, bus_id, cc = self._fixed(uuid, handle)
            self._identity[index] = (uuid, name, bus_id)
            mem = self._q(pynvml.nvmlDeviceGetMemoryInfo, handle, pynvml.nvmlMemory_v2)
            reserved = None
            if mem is not None:
                reserved = int(mem.reserved)
            else:
                mem = self._q(pynvml.nvmlDeviceGetMemoryInfo, handle)
            util = self._q(pynvml.nvmlDeviceGetUtilizationRates, handle)
            temp = self._q(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
            power = self._q(pynvml.nvmlDeviceGetPowerUsage, handle)
            ecc = self._q(
                pynvml.nvmlDeviceGetTotalEccErrors,
                handle,
                pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                pynvml.NVML_VOLATILE_ECC,
            )
            persistence, mig = self._settings_of(uuid, handle)
            return GpuReading(
                index=index,
                uuid=uuid,
                name=name,
                pci_bus_id=bus_id,
                memory_total_bytes=int(mem.total) if mem is not None else None,
                memory_used_bytes=int(mem.used) if mem is not None else None,
                memory_free_bytes=int(mem.free) if mem is not None else None,
                memory_reserved_bytes=reserved,
                utilization_gpu_ratio=util.gpu / 100.0 if util is not None else None,
                utilization_memory_ratio=util.memory / 100.0 if util is not None else None,
                temperature_celsius=float(temp) if temp is not None else None,
                power_watts=power / 1000.0 if power is not None else None,
                compute_capability=cc,
                ecc_uncorrected_total=int(ecc) if ecc is not None else None,
                persistence_mode=persistence,
                mig_mode=mig,
                processes=self._processes(index, handle),
            )
        except GpuGone as gone:
            return self._unreadable(index, gone.code)

    def _fixed(
        self, uuid: str, handle: Any
    ) -> tuple[str | None, str | None, tuple[int, int] | None]:
        """Name, PCI bus id and compute capability: fixed for a GPU, so read once per UUID and
        NVML session (again while one of them could not be read)."""
        known = self._fixed_by_uuid.get(uuid)
        if known is not None:
            return known
        name = self._q(pynvml.nvmlDeviceGetName, handle)
        pci = self._q(pynvml.nvmlDeviceGetPciInfo, handle)
        cc = self._q(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
        fixed = (
            _text(name) if name else None,
            _text(pci.busId) if pci is not None else None,
            (int(cc[0]), int(cc[1])) if cc is not None else None,
        )
        if None not in fixed:
            self._fixed_by_uuid[uuid] = fixed
        return fixed

    def _settings_of(self, uuid: str, handle: Any) -> tuple[bool | None, bool | None]:
        """Persistence and MIG mode: settings an admin changes (MIG only with a GPU reset),
        read once per ``SETTINGS_SECONDS`` per GPU rather than every poll."""
        now = self._clock()
        known = self._settings.get(uuid)
        if known is not None and now < known[0]:
            return known[1], known[2]
        persistence = self._q(pynvml.nvmlDeviceGetPersistenceMode, handle)
        mig = self._q(pynvml.nvmlDeviceGetMigMode, handle)
        value = (
            bool(persistence) if persistence is not None else None,
            bool(mig[0]) if mig is not None else None,
        )
        self._settings[uuid] = (now + SETTINGS_SECONDS, *value)
        return value

    def _dedupe(self, gpus: tuple[GpuReading, ...]) -> tuple[GpuReading, ...]:
        """An unreadable GPU must not borrow the identity of a GPU that answered this poll."""
        healthy = {g.uuid for g in gpus if g.error is None}
        out = []
        for g in gpus:
            if g.error is not None and g.uuid in healthy:
                self._identity.pop(g.index, None)
                g = replace(g, uuid=f"GPU-unknown-index-{g.index}", name=None, pci_bus_id=None)
            out.append(g)
        return tuple(out)

    def _unreadable(self, index: int, code: int) -> GpuReading:
        uuid, name, bus_id = self._identity.get(index, (f"GPU-unknown-index-{index}", None, None))
        return GpuReading(
            index=index,
            uuid=uuid,
            name=name,
            pci_bus_id=bus_id,
            lost=code in _GPU_GONE,
            error=error_name(code),
        )

    def _down(self, error: str, code: int) -> NvmlReading:
        if code != pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
            return NvmlReading(up=False, error=error, error_code=code)
        path, deleted = _loaded_library()
        return NvmlReading(
            up=False, error=error, error_code=code, library_path=path, library_stale=deleted
        )

    def poll(self) -> NvmlReading:
        """Read the driver and every GPU. Never raises for driver or GPU trouble."""
        with self._lock:
            err = self._ensure_up()
            if err is not None:
                return self._down(err[0], err[1])
            try:
                if self._system is None:
                    # The versions of the library this session loaded: fixed until re-init.
                    self._system = (
                        self._q(pynvml.nvmlSystemGetDriverVersion),
                        self._q(pynvml.nvmlSystemGetCudaDriverVersion),
                        self._q(pynvml.nvmlSystemGetNVMLVersion),
                    )
                driver, cuda, nvml_version = self._system
                count = self._q(pynvml.nvmlDeviceGetCount)
                if count is None:
                    # Without a count every GPU would look gone: say the driver is unusable.
                    return NvmlReading(up=False, error="DEVICE_COUNT_FAILED")
                self._lists_now = {}
                gpus = self._dedupe(tuple(self._gpu(i) for i in range(count)))
                self._lists, self._lists_now = self._lists_now, {}
                self._procs = {p.pid: p for _, procs in self._lists.values() for p in procs}
                seen = {g.uuid for g in gpus}
                for gone in self._fixed_by_uuid.keys() - seen:  # bounded by the GPUs now
                    del self._fixed_by_uuid[gone]
                for gone in self._settings.keys() - seen:
                    del self._settings[gone]
            except DriverGone as gone:
                log.warning("NVML lost the driver: %s", gone)
                self._drop(gone.code)
                return self._down(error_name(gone.code), gone.code)
            except GpuGone as gone:
                # A GPU-level error from a driver-wide call (the count, the versions): NVML is
                # unusable this poll; the session is kept and asked again next poll.
                return NvmlReading(up=False, error=error_name(gone.code), error_code=gone.code)
            return NvmlReading(
                up=True,
                library_path=self._library_path,
                driver_version=_text(driver) if driver is not None else None,
                cuda_driver_version=int(cuda) if cuda is not None else None,
                nvml_version=_text(nvml_version) if nvml_version is not None else None,
                gpus=gpus,
                device_count=count,
            )

    # -- Xid events ------------------------------------------------------------------------

    def _event_set_for(self, uuids: frozenset[str]) -> tuple[Any, dict[int, str]] | None:
        """The registered event set for ``uuids``, (re)created when the set or NVML changed."""
        current = self._events is not None and self._events[0] == (uuids, self._generation)
        retry_due = self._register_failed and self._clock() >= self._register_retry_at
        if self._events is not None and current and not retry_due:
            return self._events[1], self._events[2]
        self._drain_pending()
        self._free_events()
        try:
            event_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError:
            return None
        by_handle: dict[int, str] = {}
        failed = False
        for uuid in uuids:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
                pynvml.nvmlDeviceRegisterEvents(handle, XID_EVENT, event_set)
                by_handle[ctypes.cast(handle, ctypes.c_void_p).value or 0] = uuid
            except pynvml.NVMLError:
                failed = True  # retried below, not forgotten until the GPU set changes
        self._register_failed = failed
        self._register_retry_at = self._clock() + REGISTER_RETRY_SECONDS
        self._events = ((uuids, self._generation), event_set, by_handle)
        return event_set, by_handle

    def _drain_pending(self) -> None:
        """Collect what the old set still holds before it is freed (a rebuild often follows
        exactly the GPU trouble that raised the event)."""
        if self._events is None or self._events[0][1] != self._generation:
            return
        self._pending.extend(self._drain(self._events[1], self._events[2], 0)[0])

    def _free_events(self) -> None:
        if self._events is not None:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlEventSetFree(self._events[1])
            self._events = None

    def wake(self) -> None:
        """Wake an idle :meth:`wait_xids` (one that has no event set to wait on)."""
        self._changed.set()

    def wait_xids(
        self, uuids: Iterable[str] | Callable[[], Iterable[str]], timeout_ms: int
    ) -> list[tuple[str, int]]:
        """Block up to ``timeout_ms`` for Xid events on the GPUs named; return (uuid, xid).

        One NVML wait for the whole timeout, not slices of it: a thread that waits here wakes
        for an event or the deadline only. The event set persists across calls (events are not
        lost between waits) and is rebuilt at the start of a call when the GPU set changed or
        NVML was re-initialised, so a change made during a wait applies when it returns. With
        nothing to wait on (NVML down, no GPU registered) it sleeps until :meth:`wake` or the
        timeout, and returns []. ``uuids`` may be a function giving them: it is called once
        that sleep listens for :meth:`wake`, so a change woken for as the set is read is kept.
        """
        self._changed.clear()  # a wake() from here on ends the idle sleep below
        wanted = frozenset(uuids() if callable(uuids) else uuids)
        idle_ms = timeout_ms
        with self._event_lock:
            self._shutdown_locked()
            registered = self._event_set_for(wanted) if self._up and wanted else None
            events, self._pending = self._pending, []
            if not events and registered is not None and registered[1]:
                self._waiting = True
                try:
                    events, failed = self._drain(registered[0], registered[1], timeout_ms)
                finally:
                    self._waiting = False
                self._shutdown_locked()  # a driver loss poll() found during the wait
                if not failed:
                    return events
                idle_ms = min(timeout_ms, XID_RETRY_MS)  # the set is gone: do not spin
        if not events:
            self._changed.wait(idle_ms / 1000.0)
        return events

    def _drain(
        self, event_set: Any, by_handle: dict[int, str], wait: int
    ) -> tuple[list[tuple[str, int]], bool]:
        """Events from ``event_set``: the first within ``wait`` ms, then what is already
        queued. Returns (events, failed); on a failure other than a timeout the set is freed."""
        events: list[tuple[str, int]] = []
        while True:
            try:
                data = pynvml.nvmlEventSetWait_v2(event_set, wait)
            except pynvml.NVMLError as exc:
                if int(exc.value) == pynvml.NVML_ERROR_TIMEOUT:
                    return events, False
                log.debug("NVML event wait failed: %s", error_name(int(exc.value)))
                self._free_events()
                return events, True
            uuid = by_handle.get(ctypes.cast(data.device, ctypes.c_void_p).value or 0)
            if uuid is not None and data.eventType & XID_EVENT:
                events.append((uuid, int(data.eventData)))
            wait = 0  # drain what is already pending, then return


class XidWatcher:
    """A thread blocked in ``nvmlEventSetWait_v2``; records each Xid in an :class:`XidLog`."""

    def __init__(
        self, session: NvmlSession, wait_ms: int = XID_WAIT_MS, xids: XidLog | None = None
    ) -> None:
        self._session = session
        self._wait_ms = wait_ms
        self._lock = threading.Lock()
        self._uuids: tuple[str, ...] = ()
        self.xids = xids or XidLog()
        self._lines = XidLogLines()  # which events get a journal line of their own
        self._stop = threading.Event()
        self._failures = Recurring(log)
        self._thread = threading.Thread(target=self._run, name="tfgpud-xid", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, uuids: Iterable[str]) -> None:
        """Set the GPUs to listen on (healthy ones from the last poll)."""
        wanted = tuple(sorted(set(uuids)))
        with self._lock:
            changed, self._uuids = wanted != self._uuids, wanted
        if changed:
            self._session.wake()

    def view(self) -> XidView:
        return self.xids.view()

    def _watched(self) -> tuple[str, ...]:
        with self._lock:
            return self._uuids

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                got = self._session.wait_xids(self._watched, self._wait_ms)
            except Exception as exc:  # noqa: BLE001 - logged by Recurring (retried every second)
                self._failures.failed("Xid watcher", "Xid watcher failed; retrying", exc)
                self._stop.wait(1.0)
                continue
            self._failures.ok("Xid watcher")
            now = time.time()
            for uuid, xid in got:
                self.xids.record(uuid, xid, now)
                line = self._lines.event(uuid, xid, now)
                if line is not None:
                    log.warning("%s", line, extra={"GPU_UUID": uuid})
            for uuid, line in self._lines.due(now):  # waits return at least every wait_ms
                log.warning("%s", line, extra={"GPU_UUID": uuid})

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread. One blocked in an NVML wait is not waited for: it is a daemon
        thread, and the wait may last ``wait_ms``."""
        self._stop.set()
        self._session.wake()
        if self._thread.is_alive() and not self._session.waiting:
            self._thread.join(timeout)


def read_nvml(library: str | None = None, proc_root: Path = Path("/proc")) -> NvmlReading:
    """One-shot reading for ``tfgpud doctor``: init, read everything, shut down."""
    session = NvmlSession(library, proc_root=proc_root)
    try:
        return session.poll()
    finally:
        session.close()
