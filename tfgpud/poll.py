"""Readings + baseline → Snapshot: the one builder, used by the daemon's poll and by doctor.

The collectors gather facts; this module turns one poll's facts and the GPUs expected into the
:class:`Snapshot` that ``diagnose()`` reads. Whatever differs between a daemon poll and a
``tfgpud doctor`` run is in the readings (doctor has no Xid thread, a fresh memory tracker, a
read-only baseline), never in how they are put together, so both give the same findings for
the same machine state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from tfgpud.model import (
    CollectorRun,
    DiscoverySummary,
    KnownGpu,
    NvmlReading,
    PciReading,
    Snapshot,
    TfEnvRecord,
    TfProbeResult,
    WorkloadsReading,
    XidCode,
    XidEvent,
)


@dataclass(frozen=True)
class Readings:
    """What the collectors returned in one poll (None: that collector failed or did not run)."""

    taken_at: float
    pci: PciReading | None = None
    nvml: NvmlReading | None = None
    tf: tuple[TfProbeResult, ...] = ()
    collectors: tuple[CollectorRun, ...] = ()
    workloads: WorkloadsReading | None = None
    xid_counts: Mapping[tuple[str, XidCode], int] = field(
        default_factory=lambda: MappingProxyType({})
    )
    xid_events: tuple[XidEvent, ...] = ()
    tf_envs: tuple[TfEnvRecord, ...] | None = None  # the envs on the probe schedule
    discovery: DiscoverySummary | None = None


@dataclass(frozen=True)
class Expected:
    """The GPUs this machine should have: the baseline, its count, and why it may be wrong."""

    gpus: tuple[KnownGpu, ...] = ()
    count: int | None = None
    problems: tuple[str, ...] = ()


# A GPU at or below this utilisation does no work (gpu-memory-held-idle).
IDLE_UTILIZATION = 0.05


class PressureTracker:
    """What the memory rules need to have held across polls, per GPU: since when its memory
    has been at or above ``ratio`` full (``update``), and since when it has been idle
    (utilisation <= ``IDLE_UTILIZATION``; ``idle_since``, refreshed by ``update``). Bounded by
    the GPUs of the last reading: a GPU that leaves a state, or goes away, is forgotten; an
    unknown utilisation ends an idle stretch (idleness must be seen, not assumed)."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}
        self._idle: dict[str, float] = {}

    def update(self, nvml: NvmlReading | None, ratio: float, now: float) -> Mapping[str, float]:
        current: dict[str, float] = {}
        idle: dict[str, float] = {}
        for g in nvml.gpus if nvml is not None and nvml.up else ():
            total, used = g.memory_total_bytes, g.memory_used_bytes
            if total and used is not None and used / total >= ratio:
                current[g.uuid] = self._since.get(g.uuid, now)
            util = g.utilization_gpu_ratio
            if util is not None and util <= IDLE_UTILIZATION and not g.lost and g.error is None:
                idle[g.uuid] = self._idle.get(g.uuid, now)
        self._since, self._idle = current, idle
        return MappingProxyType(dict(current))

    @property
    def idle_since(self) -> Mapping[str, float]:
        return MappingProxyType(dict(self._idle))


def identify_lost(nvml: NvmlReading | None, baseline: tuple[KnownGpu, ...]) -> NvmlReading | None:
    """Give a GPU that was lost before NVML ever told its UUID the identity it must have.

    A GPU lost before this process read it (a restart after it fell off the bus) has no UUID.
    When exactly one such GPU and exactly one expected GPU unseen by UUID remain, they are the
    same GPU: reporting both ``gpu-lost`` (placeholder) and ``gpu-vanished`` (baseline) would
    count one failure twice and hide which GPU it is.
    """
    if nvml is None or not nvml.up:
        return nvml
    unknown = [g for g in nvml.gpus if g.uuid.startswith("GPU-unknown")]
    seen = {g.uuid for g in nvml.gpus}
    missing = [k for k in baseline if k.uuid not in seen]
    if len(unknown) != 1 or len(missing) != 1:
        return nvml
    g, k = unknown[0], missing[0]
    named = replace(g, uuid=k.uuid, name=g.name or k.name, pci_bus_id=g.pci_bus_id or k.pci_bus_id)
    return replace(nvml, gpus=tuple(named if x is g else x for x in nvml.gpus))


def build_snapshot(
    readings: Readings,
    expected: Expected,
    pressure: PressureTracker,
    pressure_ratio: float,
    *,
    sequence: int = 0,
) -> Snapshot:
    """The snapshot ``diagnose()`` reads (without findings). Updates ``pressure`` (memory
    pressure and idleness, tracked across polls)."""
    nvml = identify_lost(readings.nvml, expected.gpus)
    w = readings.workloads
    pressure_since = pressure.update(nvml, pressure_ratio, readings.taken_at)
    return Snapshot(
        taken_at=readings.taken_at,
        sequence=sequence,
        pci=readings.pci,
        nvml=nvml,
        tf=readings.tf,
        xid_counts=readings.xid_counts,
        xid_events=readings.xid_events,
        collectors=readings.collectors,
        baseline=expected.gpus,
        expected_gpus=expected.count,
        baseline_problems=expected.problems,
        pressure_since=pressure_since,
        idle_since=pressure.idle_since,
        tf_processes=w.processes if w is not None else None,
        workloads=w.scan if w is not None else None,
        tf_envs=readings.tf_envs,
        discovery=readings.discovery,
    )
