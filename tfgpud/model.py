"""Frozen records that flow from the collectors through diagnosis to the exporter.

Collectors gather facts into these; nothing here does I/O. ``None`` always means
"unknown / not supported" and is never exported as 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Literal


def frozen_map(items: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """Return a read-only copy of ``items`` (for mapping fields of frozen records)."""
    return MappingProxyType(dict(items or {}))


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "critical": 2}[self.value]


@dataclass(frozen=True)
class PciGpu:
    """One NVIDIA display/3D controller on the PCI bus."""

    address: str  # sysfs name, e.g. "0000:01:00.0"
    device_id: str  # e.g. "0x2330"
    class_code: str  # e.g. "0x030200"
    driver: str | None  # bound kernel driver: nvidia, nouveau, vfio-pci, or None


@dataclass(frozen=True)
class PciReading:
    gpus: tuple[PciGpu, ...] = ()
    nvidia_module_version: str | None = None  # /sys/module/nvidia/version
    proc_driver_version: str | None = None  # first line of /proc/driver/nvidia/version
    nouveau_loaded: bool = False
    device_nodes: tuple[str, ...] = ()  # names under /dev, e.g. ("nvidia0", "nvidiactl")
    wsl: bool = False


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None
    name: str | None = None  # comm of the process when /proc tells


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML reports it. A lost GPU keeps its identity with ``lost=True``."""

    index: int
    uuid: str
    name: str | None = None
    pci_bus_id: str | None = None
    lost: bool = False
    error: str | None = None  # the NVML error that made this GPU unreadable
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    utilization_gpu_ratio: float | None = None
    utilization_memory_ratio: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    compute_capability: tuple[int, int] | None = None
    ecc_uncorrected_total: int | None = None
    persistence_mode: bool | None = None
    mig_mode: bool | None = None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def compute_capability_str(self) -> str | None:
        cc = self.compute_capability
        return f"{cc[0]}.{cc[1]}" if cc else None


@dataclass(frozen=True)
class NvmlReading:
    """What the driver said. ``up`` is False when NVML could not be initialised."""

    up: bool
    error: str | None = None  # NVML error name, e.g. "DRIVER_NOT_LOADED", "LIBRARY_NOT_FOUND"
    error_code: int | None = None
    library_path: str | None = None
    driver_version: str | None = None
    cuda_driver_version: int | None = None  # e.g. 12040
    nvml_version: str | None = None
    gpus: tuple[GpuReading, ...] = ()
    device_count: int | None = None
    # The library this process loaded was deleted (replaced by a driver upgrade): the mismatch
    # is in tfgpud's own process, and restarting tfgpud is the fix.
    library_stale: bool = False

    @property
    def cuda_driver_version_str(self) -> str | None:
        v = self.cuda_driver_version
        return None if v is None else f"{v // 1000}.{(v % 1000) // 10}"


@dataclass(frozen=True)
class LibraryCheck:
    """Whether one shared library TensorFlow needs could be dlopened in the env, searched the
    way TensorFlow's loader searches (see ``TfProbeResult.loader_search``)."""

    name: str  # short name, e.g. "cudnn"
    soname: str  # e.g. "libcudnn.so.9"
    loaded: bool
    path: str | None = None  # where it was found (symlinks resolved)
    error: str | None = None  # dlerror text when it was not
    # Where the loader found it: "LD_LIBRARY_PATH", "RUNPATH", "ld.so.cache", "default" (the
    # loader's built-in dirs), "pip" (search path unknown: pip's nvidia/*/lib dirs tried first).
    via: str | None = None
    version: int | None = None  # cuDNN: cudnnGetVersion() of the loaded library, e.g. 90300
    # Not loadable, but a file of that soname exists where the loader does not search
    # (e.g. site-packages/nvidia/cusolver/lib, absent from TF's RUNPATH).
    found_elsewhere: tuple[str, ...] = ()
    # cuDNN not loadable: other majors present (e.g. libcudnn.so.8), with their versions.
    other_versions: tuple[LibraryCheck, ...] = ()


@dataclass(frozen=True)
class SearchDir:
    """One directory of the loader's search path for TF's CUDA libraries."""

    path: str
    source: str  # "LD_LIBRARY_PATH", "RUNPATH" (of TF's framework library) or "default"


@dataclass(frozen=True)
class TfGpu:
    name: str  # "/physical_device:GPU:0"
    device_name: str | None = None
    compute_capability: tuple[int, int] | None = None


class ProbeStatus(StrEnum):
    OK = "ok"
    IMPORT_FAILED = "import-failed"
    CRASHED = "crashed"
    TIMEOUT = "timeout"
    MISSING_INTERPRETER = "missing-interpreter"
    BAD_OUTPUT = "bad-output"
    REFUSED = "refused"
    NO_ACCESS = "no-access"  # the probe's user cannot reach/execute the interpreter (EACCES)
    ERROR = "error"
    # A discovered env whose probe cannot run without more privilege than its owner has:
    # only its metadata is reported (TfEnvRecord.metadata).
    NOT_RUN = "not-run"


@dataclass(frozen=True)
class TfProbeResult:
    """TensorFlow's own view of the GPUs from inside one Python environment."""

    env: str
    python: str
    status: ProbeStatus
    started_at: float  # unix time
    duration_seconds: float
    tf_version: str | None = None
    build_info: Mapping[str, str] = field(default_factory=frozen_map)
    gpus: tuple[TfGpu, ...] = ()
    environment: Mapping[str, str] = field(default_factory=frozen_map)
    packages: Mapping[str, str] = field(default_factory=frozen_map)
    libraries: tuple[LibraryCheck, ...] = ()
    log_lines: tuple[str, ...] = ()
    returncode: int | None = None
    signal_name: str | None = None
    error: str | None = None
    # Filled from the TF probe's report; all optional so older records still build.
    python_version: str | None = None
    traceback: tuple[str, ...] = ()  # tail of the import traceback when TF failed to import
    library_search_dirs: tuple[str, ...] = ()  # where the probe looked for the CUDA libraries
    package_dirs: tuple[str, ...] = ()  # metadata dirs (+ their site dirs): mtimes = install change
    device_access: Mapping[str, str] = field(default_factory=frozen_map)  # /dev node -> "ok"/why
    smoke_ok: bool | None = None  # None = smoke test not run
    smoke_error: str | None = None
    smoke_stage: str | None = None  # where it failed: "context" (GPU:0 init) or "matmul"
    # The library whose dlopen calls load the CUDA libraries (libtensorflow_framework.so.2) and
    # the loader's search path for those calls; empty when the probe could not tell.
    loader_object: str | None = None
    loader_search: tuple[SearchDir, ...] = ()
    # TensorFlow's own loader lines (TF_CPP_MAX_VLOG_LEVEL=1): soname -> dlerror of each
    # library it could not load, and the sonames it opened.
    loader_failures: Mapping[str, str] = field(default_factory=frozen_map)
    loader_opened: tuple[str, ...] = ()
    cpu_seconds: float | None = None  # the probe child's user+system CPU time
    max_rss_bytes: int | None = None
    # REFUSED for safety: who besides root can write the env's code (user names, "group:x",
    # "everyone"); see tfgpud.collectors.tensorflow.safety.
    refused_writers: tuple[str, ...] = ()
    # NO_ACCESS: the user the probe ran as, and the paths whose permissions stop it.
    probe_user: str | None = None
    denied_paths: tuple[str, ...] = ()
    # The killed probe child did not exit in time (stuck in the kernel); tfgpud.runner's
    # reaper waits for it and no new probe of the env starts while it exists.
    abandoned_pid: int | None = None

    @property
    def ok(self) -> bool:
        return self.status is ProbeStatus.OK


@dataclass(frozen=True)
class CollectorRun:
    name: str
    success: bool
    duration_seconds: float
    error: str | None = None


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    subject: str  # env name, GPU UUID, pid, or "host"
    summary: str
    evidence: tuple[str, ...] = ()
    fix: str = ""
    # The root cause's code when another finding present now explains this one (``gpu-vanished``
    # while the driver is down names ``driver-not-loaded``); None for a root cause.
    cause: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.code, self.subject)


# An Xid outside the known table (tfgpud.xids) is counted under this one code.
OTHER_XID: Literal["other"] = "other"
XidCode = int | Literal["other"]


@dataclass(frozen=True)
class XidEvent:
    uuid: str
    xid: int  # the value the driver sent, also when it is counted as "other"
    at: float  # unix time the daemon received it


@dataclass(frozen=True)
class TfProcess:
    """A running process with TensorFlow loaded (workloads collector)."""

    pid: int
    placement: str  # "gpu" or "cpu"
    user: str | None = None
    cmdline: str = ""
    started_at: float | None = None  # unix time
    python: str | None = None  # the executable, to match against configured envs
    allow_growth: bool | None = None  # TF_FORCE_GPU_ALLOW_GROWTH=true in its environment
    # Filled by the workloads collector; optional so older records still build.
    cpu_since: float | None = None  # unix time since which it has been seen computing on the CPU
    tensorflow_library: str | None = None  # the libtensorflow_framework.so it mapped (its env)
    # CUDA_VISIBLE_DEVICES, TF_FORCE_GPU_ALLOW_GROWTH, TF_GPU_ALLOCATOR when set and readable
    environment: Mapping[str, str] = field(default_factory=frozen_map)


@dataclass(frozen=True)
class GpuProcessFacts:
    """What ``/proc`` tells about a process NVML lists on a GPU (workloads collector); each
    piece may be unreadable (the process exited, or is another user's)."""

    pid: int
    user: str | None = None
    cmdline: str = ""
    tensorflow: bool | None = None  # libtensorflow_framework.so mapped; None = maps unreadable


@dataclass(frozen=True)
class WorkloadScan:
    """What one workloads scan looked at (its cost) and what it could not see."""

    processes: int = 0  # entries under /proc
    candidates: int = 0  # inspected: a python-like name, or in NVML's process list
    unreadable: int = 0  # candidates whose maps the daemon may not read (other users')
    maps_read: int = 0  # maps files read by this scan (0 once every candidate is cached)
    gpu_process_users: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))
    # pid -> facts, for every process NVML lists on a GPU that /proc shows
    gpu_processes: Mapping[int, GpuProcessFacts] = field(
        default_factory=lambda: MappingProxyType({})
    )


@dataclass(frozen=True)
class WorkloadsReading:
    """The workloads collector's result: TensorFlow processes and the scan's own numbers."""

    processes: tuple[TfProcess, ...] = ()
    scan: WorkloadScan = field(default_factory=WorkloadScan)


@dataclass(frozen=True)
class KnownGpu:
    """A GPU the machine is expected to have (baseline), keyed by UUID."""

    uuid: str
    name: str | None = None
    pci_bus_id: str | None = None
    first_seen: float | None = None
    last_seen: float | None = None


@dataclass(frozen=True)
class SinkStats:
    """Delivery counters of one ``[[alerts.alertmanager]]`` or ``[[alerts.webhook]]`` sink."""

    sink: str  # e.g. "alertmanager[0]"
    sent: int = 0  # messages accepted by the receiver
    failed: int = 0  # delivery attempts that failed (each retry counts)
    dropped: int = 0  # messages given up on (retry bound reached, or queue overflow)
    queued: int = 0  # messages waiting now


@dataclass(frozen=True)
class AlertStats:
    firing: int = 0  # findings firing after for_seconds damping
    sinks: tuple[SinkStats, ...] = ()


@dataclass(frozen=True)
class TfEnvRecord:
    """One env on the probe schedule: where it came from and, when discovered, what its
    metadata alone shows (what is reported when its probe may not run)."""

    env: str
    python: str
    source: str  # "configured" | "discovered"
    prefix: str | None = None  # discovered: the env's directory
    owner: str | None = None  # discovered: the owner of that directory
    kind: str | None = None  # discovered: venv, conda, system, jupyter-kernel
    found_by: str | None = None  # discovered: pyvenv.cfg, conda-meta, kernel.json, ...
    metadata: tuple[str, ...] = ()  # discovered: the metadata facts, in words


@dataclass(frozen=True)
class DiscoverySummary:
    """The last search for TensorFlow envs ([tensorflow.discover]), as the snapshot keeps it."""

    enabled: bool
    found: int | None = None  # envs found; None while the first search has not finished
    searched: tuple[str, ...] = ()  # what was searched, in words
    finished_at: float | None = None  # unix time the last search ended

    @property
    def done(self) -> bool:
        return self.found is not None


@dataclass(frozen=True)
class Snapshot:
    """Everything one poll saw. Scrapes and /status read the latest one; nothing mutates it."""

    taken_at: float
    sequence: int = 0  # polls completed by this process, this one included
    pci: PciReading | None = None
    nvml: NvmlReading | None = None
    tf: tuple[TfProbeResult, ...] = ()
    # Xid events received per (uuid, code), codes outside the known table as "other"
    xid_counts: Mapping[tuple[str, XidCode], int] = field(
        default_factory=lambda: MappingProxyType({})
    )
    collectors: tuple[CollectorRun, ...] = ()
    findings: tuple[Finding, ...] = ()
    # Baseline: GPUs expected (learned or from [expect]); None = nothing known yet.
    baseline: tuple[KnownGpu, ...] = ()
    expected_gpus: int | None = None
    # The last events per GPU and code (tfgpud.xids.EVENTS_PER_CODE each), oldest first
    xid_events: tuple[XidEvent, ...] = ()
    tf_processes: tuple[TfProcess, ...] | None = None  # None = workloads not collected
    workloads: WorkloadScan | None = None  # the scan behind tf_processes
    # uuid -> unix time since which memory used/total has stayed >= [memory] pressure_ratio
    pressure_since: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    # uuid -> unix time since which the GPU's utilisation has stayed <= poll.IDLE_UTILIZATION
    idle_since: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    # State-file problems to report (baseline-state-error); empty when all is well.
    baseline_problems: tuple[str, ...] = ()
    alert_stats: AlertStats | None = None  # None = alert delivery not running (e.g. doctor)
    # The envs on the probe schedule (None = not known to this snapshot's builder) and the
    # last discovery (None = discovery not in play, e.g. `doctor --python`).
    tf_envs: tuple[TfEnvRecord, ...] | None = None
    discovery: DiscoverySummary | None = None


def to_jsonable(obj: object) -> object:
    """Turn a record (dataclass, enum, mapping, tuple) into plain JSON-serialisable values.

    ``dataclasses.asdict`` cannot copy the read-only mappings these records hold, hence this.
    Tuple keys (``xid_counts``) become ``"a/b"`` strings.
    """
    if isinstance(obj, Enum):
        return obj.value
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {
            ("/".join(map(str, k)) if isinstance(k, tuple) else str(k)): to_jsonable(v)
            for k, v in obj.items()
        }
    if isinstance(obj, tuple | list):
        return [to_jsonable(v) for v in obj]
    return obj
