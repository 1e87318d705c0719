"""What poll.py tracks across polls for the memory rules: pressure and idleness per GPU."""

from __future__ import annotations

from typing import Any

from tfgpud.model import GpuReading, NvmlReading
from tfgpud.poll import IDLE_UTILIZATION, PressureTracker

U0, U1 = "GPU-0", "GPU-1"


def reading(*gpus: GpuReading, up: bool = True) -> NvmlReading:
    return NvmlReading(up=up, gpus=gpus)


def g(uuid: str, util: float | None, used: int = 10, **kw: Any) -> GpuReading:
    return GpuReading(
        index=0,
        uuid=uuid,
        memory_total_bytes=100,
        memory_used_bytes=used,
        utilization_gpu_ratio=util,
        **kw,
    )


def test_idle_since_holds_across_polls_and_ends_with_work_or_an_unknown() -> None:
    t = PressureTracker()
    t.update(reading(g(U0, 0.0), g(U1, IDLE_UTILIZATION)), 0.95, 100.0)
    t.update(reading(g(U0, 0.02), g(U1, 0.0)), 0.95, 200.0)
    assert dict(t.idle_since) == {U0: 100.0, U1: 100.0}
    t.update(reading(g(U0, 0.5), g(U1, None)), 0.95, 300.0)  # U0 works, U1 unknown
    assert dict(t.idle_since) == {}
    t.update(reading(g(U0, 0.0), g(U1, 0.0)), 0.95, 400.0)
    assert dict(t.idle_since) == {U0: 400.0, U1: 400.0}  # a new idle stretch starts now


def test_a_lost_gpu_or_nvml_down_is_not_idle() -> None:
    t = PressureTracker()
    t.update(reading(g(U0, 0.0, lost=True), g(U1, 0.0, error="UNKNOWN")), 0.95, 1.0)
    assert dict(t.idle_since) == {}
    t.update(reading(g(U0, 0.0)), 0.95, 2.0)
    t.update(reading(g(U0, 0.0), up=False), 0.95, 3.0)
    assert dict(t.idle_since) == {}


def test_pressure_since_is_kept_beside_idleness() -> None:
    t = PressureTracker()
    assert dict(t.update(reading(g(U0, 0.0, used=96)), 0.95, 10.0)) == {U0: 10.0}
    assert dict(t.update(reading(g(U0, 0.0, used=97)), 0.95, 20.0)) == {U0: 10.0}
    assert dict(t.idle_since) == {U0: 10.0}
    assert dict(t.update(reading(g(U0, 0.0, used=50)), 0.95, 30.0)) == {}
