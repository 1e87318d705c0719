"""Snapshot → Prometheus metric families, on a private registry.

Scrapes only read the last snapshot: nothing here calls NVML or starts a process. Unknown values
are omitted, never exported as 0 or NaN.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.registry import Collector, CollectorRegistry

from tfgpud import __version__
from tfgpud.codes import cause_labels
from tfgpud.config import Config
from tfgpud.diagnosis import cpu_fallback_envs
from tfgpud.model import GpuReading, Snapshot, XidCode
from tfgpud.recurring import Recurring
from tfgpud.xids import KNOWN_XIDS

# What ``tfgpud_gpus{state}`` counts; see gpu_state_counts().
GPU_STATES = ("ok", "lost", "failing", "missing")
# GPUs whose identity the exporter remembers for when they stop answering (oldest dropped).
MAX_REMEMBERED_GPUS = 64
Identity = tuple[str, str, str]  # name, pci_bus_id, compute_capability

log = logging.getLogger(__name__)

# Pre-created at 0 per GPU so `increase()` sees the first event of the critical and warning
# Xids (docs/diagnosis-facts.md): 48, 62, 64, 74, 79, 94, 95, 119, 120.
WATCHED_XIDS = tuple(x for x, info in KNOWN_XIDS.items() if info.kind != "application")
# Per-GPU cap on process series; the rest are summed into pid="other".
MAX_PROCESS_SERIES = 16
MAX_VERSION_LABEL = 64  # tfgpud_tf_info version labels (TF says "2.21.0", CUDA "12.5.1")
# Per-GPU cap on the users named in the by-user series; the rest are summed into user="other".
MAX_USER_SERIES = 3
OTHER = "other"


@dataclass(frozen=True)
class ExportOptions:
    """What the exposition takes from the configuration rather than from the snapshot."""

    per_process_metrics: bool = False  # [workloads] per_process_metrics
    # The `host` label of tfgpud_finding: what the daemon's pushed alerts carry ([alerts]
    # instance, default the host name), so Alertmanager can pair rule alerts with them.
    host: str | None = None


def export_options(config: Config, host: str) -> ExportOptions:
    return ExportOptions(config.workloads.per_process_metrics, host)


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class SnapshotCollector(Collector):
    """Yields every tfgpud metric from whatever snapshot ``source`` returns."""

    def __init__(
        self,
        source: Callable[[], Snapshot | None],
        options: Callable[[], ExportOptions] = ExportOptions,
    ) -> None:
        self._source = source
        self._identities = GpuIdentities()
        self._options = options
        self._failures = Recurring(log, logging.ERROR)

    def describe(self) -> Iterable[Metric]:
        return []  # never collect at registration

    def collect(self) -> Iterator[Metric]:
        build = _gauge("tfgpud_build_info", "tfgpud build; value is 1.", ["version"])
        build.add_metric([__version__], 1)
        yield build
        snap = self._source()
        if snap is None:
            return
        try:
            families = list(_families(snap, self._identities, self._options()))
        except Exception as exc:  # noqa: BLE001 - logged by Recurring (fails at every scrape)
            self._failures.failed(
                "metrics", "building metrics failed; serving build_info only", exc
            )
            return
        self._failures.ok("metrics")
        yield from families


class GpuIdentities:
    """The last complete identity (name, PCI bus id, compute capability) of each GPU seen
    answering, so that ``tfgpud_gpu_info`` of a GPU that is lost now still names it. Bounded:
    the GPUs least recently seen are forgotten first."""

    def __init__(self, limit: int = MAX_REMEMBERED_GPUS) -> None:
        self._limit = limit
        self._known: OrderedDict[str, Identity] = OrderedDict()
        self._lock = threading.Lock()

    def identify(self, g: GpuReading, snap: Snapshot) -> Identity | None:
        """``g``'s identity labels: what NVML says now, else what was last known (this
        process's memory, then the baseline); None when any of them is unknown or the GPU's
        UUID itself was never read."""
        if is_placeholder_uuid(g.uuid):
            return None
        with self._lock:
            known = self._known.get(g.uuid)
            if g.name and g.pci_bus_id and g.compute_capability_str and not g.lost:
                self._known[g.uuid] = (g.name, g.pci_bus_id, g.compute_capability_str)
                self._known.move_to_end(g.uuid)
                while len(self._known) > self._limit:
                    self._known.popitem(last=False)
        base = next((k for k in snap.baseline if k.uuid == g.uuid), None)
        name = g.name or (known[0] if known else None) or (base.name if base else None)
        bus = g.pci_bus_id or (known[1] if known else None) or (base.pci_bus_id if base else None)
        cc = g.compute_capability_str or (known[2] if known else None)
        return (name, bus, cc) if name and bus and cc else None


def is_placeholder_uuid(uuid: str) -> bool:
    """True for the stand-in NVML readings carry for a GPU whose UUID was never read."""
    return uuid.startswith("GPU-unknown")


def gpu_state_counts(snap: Snapshot) -> dict[str, int] | None:
    """GPUs by state, for ``tfgpud_gpus{state}``: ``ok`` (NVML lists it and it answers),
    ``lost`` (NVML: GPU_IS_LOST), ``failing`` (listed but unreadable for another error),
    ``missing`` (expected by the baseline or ``[expect] gpus`` but not listed, all of them
    while NVML is down, then also counting the GPUs on the PCI bus). None before NVML was read.
    """
    nv = snap.nvml
    if nv is None:
        return None
    listed = nv.gpus if nv.up else ()
    counts = dict.fromkeys(GPU_STATES, 0)
    for g in listed:
        counts["lost" if g.lost else "failing" if g.error else "ok"] += 1
    seen = {g.uuid for g in listed}
    unseen = sum(1 for k in snap.baseline if k.uuid not in seen)
    pci = len(snap.pci.gpus) if snap.pci is not None and not nv.up else 0
    counts["missing"] = max(unseen, (snap.expected_gpus or 0) - len(listed), pci, 0)
    return counts


def _families(
    snap: Snapshot, identities: GpuIdentities, options: ExportOptions
) -> Iterator[Metric]:
    ok = _gauge("tfgpud_collector_success", "1 if the collector's last run worked.", ["collector"])
    dur = _gauge(
        "tfgpud_collector_duration_seconds", "Duration of the collector's last run.", ["collector"]
    )
    for run in snap.collectors:
        ok.add_metric([run.name], 1.0 if run.success else 0.0)
        dur.add_metric([run.name], run.duration_seconds)
    yield ok
    yield dur

    poll = _gauge("tfgpud_last_poll_timestamp_seconds", "Unix time of the last completed poll.")
    poll.add_metric([], snap.taken_at)
    yield poll
    polls = CounterMetricFamily("tfgpud_polls", "Polls completed since the daemon started.")
    polls.add_metric([], snap.sequence)
    yield polls

    if snap.pci is not None:
        pci = _gauge("tfgpud_pci_gpus", "NVIDIA GPUs on the PCI bus.")
        pci.add_metric([], len(snap.pci.gpus))
        yield pci

    if snap.expected_gpus is not None:
        exp = _gauge("tfgpud_expected_gpus", "GPUs this machine should have (config or learned).")
        exp.add_metric([], snap.expected_gpus)
        yield exp

    nv = snap.nvml
    if nv is not None:
        up = _gauge("tfgpud_nvml_up", "1 if NVML initialised.")
        up.add_metric([], 1.0 if nv.up else 0.0)
        yield up
        states = gpu_state_counts(snap)
        if states is not None:
            by_state = _gauge(
                "tfgpud_gpus",
                "GPUs by state: ok, lost, failing (NVML lists them), missing (expected, unlisted).",
                ["state"],
            )
            for state, n in states.items():
                by_state.add_metric([state], n)
            yield by_state
        if nv.up:
            count = _gauge("tfgpud_nvml_gpus", "GPUs NVML lists, lost or failing ones included.")
            count.add_metric([], len(nv.gpus))
            yield count
            if nv.driver_version is not None:
                drv = _gauge(
                    "tfgpud_driver_info",
                    "NVIDIA driver; value is 1.",
                    ["driver_version", "cuda_driver_version"],
                )
                drv.add_metric([nv.driver_version, nv.cuda_driver_version_str or ""], 1)
                yield drv
        yield from _gpu_families(nv.gpus, snap, identities)
        yield from _memory_by_families(nv.gpus, snap, options)

    yield from _tf_families(snap)
    yield from _env_families(snap)
    yield _finding_family(snap, options)
    yield from _alert_families(snap)


def _finding_family(snap: Snapshot, options: ExportOptions) -> Metric:
    """``tfgpud_finding``: one series per finding, labelled like the alert the daemon pushes
    for it (``cause``, ``role``, ``host``), so rules built on it pair with the pushed alerts."""
    labels = ["code", "severity", "subject", "cause", "role"]
    host = [options.host] if options.host else []
    finding = _gauge(
        "tfgpud_finding", "1 for each active finding.", labels + (["host"] if host else [])
    )
    for f in snap.findings:
        c = cause_labels(f.code, f.cause)
        finding.add_metric([f.code, f.severity.value, f.subject, c["cause"], c["role"], *host], 1)
    return finding


def _alert_families(snap: Snapshot) -> Iterator[Metric]:
    """The baseline's GPUs, and alert delivery (tfgpud.alerts): what fires, and per sink what was
    sent, failed, dropped."""
    if snap.baseline:
        # Identity of the expected GPUs, so an alert on a vanished one can name it.
        known = _gauge(
            "tfgpud_baseline_gpu_info",
            "A GPU this machine is expected to have (baseline); value is 1.",
            ["uuid", "name", "pci_bus_id"],
        )
        for k in snap.baseline:
            known.add_metric([k.uuid, k.name or "", k.pci_bus_id or ""], 1)
        yield known
    stats = snap.alert_stats
    if stats is None:
        return
    firing = _gauge("tfgpud_alerts_firing", "Findings firing after [alerts] for_seconds damping.")
    firing.add_metric([], stats.firing)
    yield firing
    sink = ["sink"]
    sent = CounterMetricFamily("tfgpud_alerts_sent", "Alert messages delivered.", labels=sink)
    failed = CounterMetricFamily(
        "tfgpud_alerts_failed", "Alert message delivery attempts that failed.", labels=sink
    )
    dropped = CounterMetricFamily(
        "tfgpud_alerts_dropped",
        "Alert messages given up on (retry bound reached or queue full).",
        labels=sink,
    )
    queued = _gauge("tfgpud_alert_queue_length", "Alert messages waiting for delivery.", sink)
    for s in stats.sinks:
        sent.add_metric([s.sink], s.sent)
        failed.add_metric([s.sink], s.failed)
        dropped.add_metric([s.sink], s.dropped)
        queued.add_metric([s.sink], s.queued)
    yield from (sent, failed, dropped, queued)


def _gpu_families(
    gpus: tuple[GpuReading, ...], snap: Snapshot, identities: GpuIdentities
) -> Iterator[Metric]:
    ids = ["gpu", "uuid"]
    info = _gauge(
        "tfgpud_gpu_info",
        "GPU identity; value is 1.",
        ["gpu", "uuid", "name", "pci_bus_id", "compute_capability"],
    )
    up = _gauge("tfgpud_gpu_up", "1 if the GPU answers, 0 if lost or failing.", ids)
    Getter = Callable[[GpuReading], float | None]
    fields: list[tuple[GaugeMetricFamily | CounterMetricFamily, Getter]] = [
        (
            _gauge("tfgpud_gpu_memory_total_bytes", "Total GPU memory.", ids),
            lambda g: g.memory_total_bytes,
        ),
        (
            _gauge("tfgpud_gpu_memory_used_bytes", "Used GPU memory.", ids),
            lambda g: g.memory_used_bytes,
        ),
        (
            _gauge("tfgpud_gpu_memory_free_bytes", "Free GPU memory.", ids),
            lambda g: g.memory_free_bytes,
        ),
        (
            _gauge("tfgpud_gpu_utilization_ratio", "GPU busy fraction (0-1).", ids),
            lambda g: g.utilization_gpu_ratio,
        ),
        (
            _gauge("tfgpud_gpu_temperature_celsius", "GPU core temperature.", ids),
            lambda g: g.temperature_celsius,
        ),
        (
            _gauge("tfgpud_gpu_power_watts", "GPU power draw.", ids),
            lambda g: g.power_watts,
        ),
        (
            CounterMetricFamily(
                "tfgpud_gpu_ecc_uncorrected_errors",
                "Uncorrected ECC errors since the driver loaded.",
                labels=ids,
            ),
            lambda g: g.ecc_uncorrected_total,
        ),
    ]
    nprocs = _gauge("tfgpud_gpu_processes", "Compute processes NVML lists on the GPU.", ids)
    xid = CounterMetricFamily(
        "tfgpud_gpu_xid_errors", "Xid error events received.", labels=["gpu", "uuid", "xid"]
    )
    counts = snap.xid_counts
    for g in gpus:
        labels = [str(g.index), g.uuid]
        up.add_metric(labels, 0.0 if g.lost or g.error else 1.0)
        if is_placeholder_uuid(g.uuid):
            continue  # tfgpud_gpus{state} counts it; no series under an invented UUID
        identity = identities.identify(g, snap)
        if identity is not None:
            info.add_metric([*labels, *identity], 1)
        for family, get in fields:
            value = get(g)
            if value is not None:
                family.add_metric(labels, float(value))
        if not g.lost:
            nprocs.add_metric(labels, len(g.processes))
        # Codes outside the known table arrive as one "other" key (tfgpud.xids): bounded.
        seen: set[XidCode] = {x for (u, x) in counts if u == g.uuid}
        for x in sorted(
            seen | set(WATCHED_XIDS), key=lambda c: c if isinstance(c, int) else 1 << 31
        ):
            xid.add_metric([*labels, str(x)], float(counts.get((g.uuid, x), 0)))
    yield info
    yield up
    for family, _ in fields:
        yield family
    yield nprocs
    yield xid


def _memory_by_families(
    gpus: tuple[GpuReading, ...], snap: Snapshot, options: ExportOptions
) -> Iterator[Metric]:
    """GPU memory and process counts by user and kind (``tensorflow``, ``other``): a bounded set
    per GPU (the ``MAX_USER_SERIES`` users holding most, the rest as ``user="other"``). The
    per-process series (a ``pid`` label: a new series for every job) only when configured."""
    facts = snap.workloads.gpu_processes if snap.workloads is not None else {}
    users = dict(snap.workloads.gpu_process_users) if snap.workloads is not None else {}
    tf = {t.pid: t for t in snap.tf_processes or ()}
    for t in tf.values():
        if t.user:
            users.setdefault(t.pid, t.user)
    by = ["gpu", "uuid", "user", "kind"]
    memory = _gauge(
        "tfgpud_gpu_user_memory_bytes",
        "GPU memory used by the compute processes of a user, by kind (tensorflow, other).",
        by,
    )
    count = _gauge(
        "tfgpud_gpu_user_processes",
        "Compute processes of a user on the GPU, by kind (tensorflow, other).",
        by,
    )
    for g in gpus:
        if g.lost:
            continue
        held: dict[str, int] = {}
        for p in g.processes:
            user = users.get(p.pid) or OTHER
            held[user] = held.get(user, 0) + (p.used_memory_bytes or 0)
        named = sorted((u for u in held if u != OTHER), key=lambda u: (-held[u], u))
        named = named[:MAX_USER_SERIES]
        sums: dict[tuple[str, str], tuple[int, int | None]] = {}
        for p in g.processes:
            user = users.get(p.pid) or OTHER
            fact = facts.get(p.pid)
            is_tf = p.pid in tf or (fact is not None and fact.tensorflow is True)
            key = (user if user in named else OTHER, "tensorflow" if is_tf else "other")
            n, mem = sums.get(key, (0, None))
            if p.used_memory_bytes is not None:
                mem = (mem or 0) + p.used_memory_bytes
            sums[key] = (n + 1, mem)
        for (user, kind), (n, mem) in sorted(sums.items()):
            labels = [str(g.index), g.uuid, user, kind]
            count.add_metric(labels, n)
            if mem is not None:
                memory.add_metric(labels, float(mem))
    yield memory
    yield count
    if options.per_process_metrics:
        yield _process_family(gpus)


def _process_family(gpus: tuple[GpuReading, ...]) -> Metric:
    procs = _gauge(
        "tfgpud_gpu_process_memory_bytes",
        "GPU memory used by a process (top processes per GPU; the rest as pid=other).",
        ["gpu", "uuid", "pid", "process"],
    )
    for g in gpus:
        labels = [str(g.index), g.uuid]
        ranked = sorted(
            (p for p in g.processes if p.used_memory_bytes is not None),
            key=lambda p: (-(p.used_memory_bytes or 0), p.pid),
        )
        for p in ranked[:MAX_PROCESS_SERIES]:
            procs.add_metric([*labels, str(p.pid), p.name or ""], float(p.used_memory_bytes or 0))
        rest = ranked[MAX_PROCESS_SERIES:]
        if rest:
            # Constant labels: a count in a label would make a new series whenever it changes.
            procs.add_metric(
                [*labels, OTHER, OTHER], float(sum(p.used_memory_bytes or 0 for p in rest))
            )
    return procs


def _tf_families(snap: Snapshot) -> Iterator[Metric]:
    env = ["env"]
    info = _gauge(
        "tfgpud_tf_info",
        "TensorFlow in an env; value is 1.",
        ["env", "tf_version", "cuda_version", "cudnn_version", "cuda_build"],
    )
    visible = _gauge("tfgpud_tf_visible_gpus", "GPUs TensorFlow lists in the env.", env)
    fallback = _gauge(
        "tfgpud_tf_cpu_fallback", "1 when GPUs exist but TensorFlow in the env sees fewer.", env
    )
    success = _gauge("tfgpud_tf_probe_success", "1 if the last TensorFlow probe worked.", env)
    duration = _gauge("tfgpud_tf_probe_duration_seconds", "Duration of the last probe.", env)
    stamp = _gauge("tfgpud_tf_probe_timestamp_seconds", "Unix time the last probe started.", env)
    smoke = _gauge(
        "tfgpud_tf_smoke_success",
        "1 if the probe's smoke test (a matmul on GPU:0) worked; only where it ran.",
        env,
    )
    falling = cpu_fallback_envs(snap.findings)
    for r in snap.tf:
        success.add_metric([r.env], 1.0 if r.ok else 0.0)
        duration.add_metric([r.env], r.duration_seconds)
        stamp.add_metric([r.env], r.started_at)
        if not r.ok:
            continue
        bi = r.build_info
        info.add_metric(
            [  # versions as the env's own code reports them: clipped, a label is no document
                r.env,
                (r.tf_version or "")[:MAX_VERSION_LABEL],
                str(bi.get("cuda_version", ""))[:MAX_VERSION_LABEL],
                str(bi.get("cudnn_version", ""))[:MAX_VERSION_LABEL],
                "true" if str(bi.get("is_cuda_build", "")).lower() == "true" else "false",
            ],
            1,
        )
        visible.add_metric([r.env], len(r.gpus))
        fallback.add_metric([r.env], 1.0 if r.env in falling else 0.0)
        if r.smoke_ok is not None:
            smoke.add_metric([r.env], 1.0 if r.smoke_ok else 0.0)
    yield from (info, visible, fallback, success, duration, stamp)
    if smoke.samples:  # no smoke test configured anywhere: no family at all
        yield smoke
    if snap.tf_processes is not None:
        procs = _gauge(
            "tfgpud_tf_processes", "Running TensorFlow processes by placement.", ["placement"]
        )
        for placement in ("gpu", "cpu"):
            n = sum(1 for p in snap.tf_processes if p.placement == placement)
            procs.add_metric([placement], n)
        yield procs
    scan = snap.workloads
    if scan is not None:
        for name, doc, value in (
            ("scanned", "Processes the last workloads scan saw under /proc.", scan.processes),
            (
                "candidate",
                "Processes it inspected for TensorFlow (by name or NVML).",
                scan.candidates,
            ),
            (
                "unreadable",
                "Candidates whose memory maps tfgpud may not read (other users' processes).",
                scan.unreadable,
            ),
        ):
            family = _gauge(f"tfgpud_workloads_{name}_processes", doc)
            family.add_metric([], value)
            yield family


def _env_families(snap: Snapshot) -> Iterator[Metric]:
    """The envs on the probe schedule by where they come from (configured or discovered)."""
    if snap.tf_envs is None:
        return
    envs = _gauge("tfgpud_tf_envs", "TensorFlow envs on the probe schedule, by source.", ["source"])
    for source in ("configured", "discovered"):
        envs.add_metric([source], sum(1 for e in snap.tf_envs if e.source == source))
    yield envs


class Format(enum.Enum):
    """The two exposition formats tfgpud serves; the only keys of the render cache."""

    TEXT = "text"  # Prometheus text 0.0.4
    OPENMETRICS = "openmetrics"  # OpenMetrics 1.0.0


CONTENT_TYPES = {
    Format.TEXT: exposition.CONTENT_TYPE_PLAIN_0_0_4,
    Format.OPENMETRICS: openmetrics_exposition.CONTENT_TYPE_LATEST,
}
_ENCODERS: dict[Format, Callable[[CollectorRegistry], bytes]] = {
    Format.TEXT: exposition.generate_latest,
    Format.OPENMETRICS: openmetrics_exposition.generate_latest,
}


def _param(params: list[str], name: str) -> str | None:
    for p in params:
        key, sep, value = p.partition("=")
        if sep and key.strip().lower() == name:
            return value.strip().strip('"')
    return None


def negotiate(accept: str) -> Format:
    """OpenMetrics when ``accept`` lists ``application/openmetrics-text`` without a version or
    with version 1.0.0 (and not q=0); the Prometheus text format otherwise.

    Nothing of the header reaches the response: the answer is one of :data:`CONTENT_TYPES`,
    so a client cannot make the server produce (or cache) anything new.
    """
    for part in accept.split(","):
        media, *params = part.split(";")
        if media.strip().lower() != "application/openmetrics-text":
            continue
        if _param(params, "version") not in (None, "1.0.0"):
            continue  # a version we do not write; the text format always is an answer
        if _param(params, "q") in ("0", "0.", "0.0", "0.00", "0.000"):
            continue  # q=0: "not acceptable"
        return Format.OPENMETRICS
    return Format.TEXT


class _OneFamily:
    """A registry of one metric family: what the encoders take, to encode a family alone."""

    __slots__ = ("family",)

    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> list[Metric]:
        return [self.family]


_EOF = b"# EOF\n"
# A family's encoding is reused while it has the same (type, help, unit) and samples.
_FamilyKey = tuple[str, str, str]


class FamilyEncoder:
    """Encodes a registry family by family, each family's text reused while it is unchanged.

    Every poll publishes a new snapshot, but most families repeat (a GPU's identity, its
    findings, memory held by a job that allocated once): only the families whose samples
    changed are encoded again, by prometheus_client's own encoder, so the body is byte for byte
    what that encoder gives for the whole registry. Holds the families of the last rendering
    only.
    """

    def __init__(self, fmt: Format) -> None:
        self._encode = _ENCODERS[fmt]
        self._eof = fmt is Format.OPENMETRICS  # OpenMetrics ends the body, once, with # EOF
        self._last: dict[str, tuple[_FamilyKey, list[Any], bytes]] = {}
        self.encoded = 0  # families encoded afresh (tests, benchmarks)

    def __call__(self, registry: CollectorRegistry) -> bytes:
        parts: list[bytes] = []
        now: dict[str, tuple[_FamilyKey, list[Any], bytes]] = {}
        for family in registry.collect():
            key = (family.type, family.documentation, family.unit)
            hit = self._last.get(family.name)
            if hit is not None and hit[0] == key and hit[1] == family.samples:
                text = hit[2]
            else:
                self.encoded += 1
                text = self._encode(_OneFamily(family))  # type: ignore[arg-type]
                if self._eof and text.endswith(_EOF):
                    text = text[: -len(_EOF)]
            now[family.name] = (key, family.samples, text)
            parts.append(text)
        if self._eof:
            parts.append(_EOF)
        self._last = now
        return b"".join(parts)


class Exposition:
    """Renders the registry once per snapshot and format; scrapes in between get the bytes.

    Everything exported derives from the snapshot, so the text cannot change until the next
    poll publishes a new one; caching makes a scrape a dictionary lookup. The cache holds at
    most one body per :class:`Format`, whatever the clients send. A new snapshot re-encodes
    only the families that changed (:class:`FamilyEncoder`).
    """

    def __init__(self, registry: CollectorRegistry, source: Callable[[], Snapshot | None]) -> None:
        self._registry = registry
        self._source = source
        self._lock = threading.Lock()
        # format -> (the snapshot it was rendered from, body)
        self._cache: dict[Format, tuple[Snapshot, bytes]] = {}
        self._encoders = {fmt: FamilyEncoder(fmt) for fmt in Format}
        self._render_lock = threading.Lock()  # one rendering at a time: the encoders' state

    def __call__(self, accept: str) -> tuple[bytes, str]:
        """(body, content type) for a request with this ``Accept`` header."""
        fmt = negotiate(accept)
        return self.render(fmt), CONTENT_TYPES[fmt]

    def render(self, fmt: Format) -> bytes:
        snap = self._source()
        if snap is None:
            return _ENCODERS[fmt](self._registry)
        with self._lock:
            hit = self._cache.get(fmt)
        if hit is not None and hit[0] is snap:
            return hit[1]
        with self._render_lock:
            body = self._encoders[fmt](self._registry)  # may see a newer snapshot: not cached
        if self._source() is snap:
            with self._lock:
                self._cache[fmt] = (snap, body)
        return body


def make_registry(
    source: Callable[[], Snapshot | None],
    options: Callable[[], ExportOptions] = ExportOptions,
) -> CollectorRegistry:
    """A private registry holding only tfgpud's collector (no process/platform defaults).
    ``options`` is read at each rendering, so a reload applies from the next poll on."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source, options))
    return registry
