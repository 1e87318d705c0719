"""The Xid log: per GPU and per code retention, bounded codes and GPUs, and what reads it."""

from __future__ import annotations

import threading

from prometheus_client.exposition import generate_latest

from tfgpud.collectors.nvml import NvmlSession
from tfgpud.config import Config
from tfgpud.diagnosis.gpus import XID_WINDOW_SECONDS, rule_gpu_xid_critical
from tfgpud.exporter import WATCHED_XIDS, make_registry
from tfgpud.model import GpuReading, NvmlReading, Snapshot
from tfgpud.xids import EVENTS_PER_CODE, KNOWN_XIDS, XidLog, xid_code

A = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
B = "GPU-bbbbbbbb-0000-4000-8000-000000000001"
T0 = 1_800_000_000.0


def snapshot(log: XidLog, at: float) -> Snapshot:
    view = log.view()
    gpus = (GpuReading(index=0, uuid=A), GpuReading(index=1, uuid=B))
    return Snapshot(
        taken_at=at,
        nvml=NvmlReading(up=True, gpus=gpus),
        xid_counts=view.counts,
        xid_events=view.events,
    )


def critical_subjects(log: XidLog, at: float) -> list[str]:
    return [f.subject for f in rule_gpu_xid_critical(snapshot(log, at), Config())]


def test_a_burst_of_harmless_xids_on_one_gpu_keeps_a_critical_one_on_another() -> None:
    log = XidLog()
    log.record(A, 79, T0)
    for i in range(300):
        log.record(B, 13, T0 + 1 + i)
    # The whole hour after Xid 79, and not a second longer.
    assert critical_subjects(log, T0 + XID_WINDOW_SECONDS) == [A]
    assert critical_subjects(log, T0 + XID_WINDOW_SECONDS + 1) == []
    counts = log.view().counts
    assert counts[(A, 79)] == 1 and counts[(B, 13)] == 300


def test_each_gpu_and_code_keeps_exactly_its_bound_of_events_the_latest_among_them() -> None:
    log = XidLog()
    for i in range(EVENTS_PER_CODE):
        log.record(A, 48, T0 + i)
    log.record(A, 79, T0)
    kept = [e.at for e in log.view().events if (e.uuid, e.xid) == (A, 48)]
    assert kept == [T0 + i for i in range(EVENTS_PER_CODE)]  # at the bound: nothing dropped
    log.record(A, 48, T0 + EVENTS_PER_CODE)
    view = log.view()
    kept = [e.at for e in view.events if (e.uuid, e.xid) == (A, 48)]
    assert kept == [T0 + i for i in range(1, EVENTS_PER_CODE + 1)]  # the oldest went
    assert [e.xid for e in view.events if e.xid == 79] == [79]  # another code is untouched
    assert view.counts[(A, 48)] == EVENTS_PER_CODE + 1  # the count is not bounded by retention


def test_ten_thousand_distinct_xids_are_one_other_code() -> None:
    log = XidLog()
    unknown = [x for x in range(10_000 + len(KNOWN_XIDS)) if x not in KNOWN_XIDS][:10_000]
    for i, x in enumerate(unknown):
        log.record(A, x, T0 + i)
    log.record(A, 79, T0)
    view = log.view()
    assert dict(view.counts) == {(A, "other"): 10_000, (A, 79): 1}
    assert len(view.events) == EVENTS_PER_CODE + 1
    # The raw values of the latest are kept as evidence.
    assert [e.xid for e in view.events if xid_code(e.xid) == "other"] == unknown[-EVENTS_PER_CODE:]

    text = generate_latest(make_registry(lambda: snapshot(log, T0))).decode()
    series = [x for x in text.splitlines() if x.startswith("tfgpud_gpu_xid_errors_total{")]
    # Per GPU: the watched codes at 0 (or counted), plus one "other".
    assert len(series) == 2 * len(WATCHED_XIDS) + 1
    assert f'tfgpud_gpu_xid_errors_total{{gpu="0",uuid="{A}",xid="other"}} 10000.0' in series


def test_gpus_beyond_the_bound_forget_the_one_quiet_longest() -> None:
    log = XidLog(max_gpus=2)
    log.record(A, 13, T0)
    log.record(B, 13, T0 + 1)
    log.record(A, 13, T0 + 2)  # A is the more recent now
    log.record("GPU-c", 13, T0 + 3)
    assert {u for u, _ in log.view().counts} == {A, "GPU-c"}


def test_the_view_is_rebuilt_only_after_a_new_event() -> None:
    log = XidLog()
    log.record(A, 79, T0)
    first = log.view()
    assert log.view() is first  # a poll without new Xids copies nothing
    log.record(A, 79, T0 + 1)
    assert log.view() is not first and log.view().counts[(A, 79)] == 2


def test_an_xid_storm_gets_one_line_then_one_summary_a_window() -> None:
    from tfgpud.xids import LOG_VALUES_NAMED, XidLogLines

    lines = XidLogLines(window=60.0)
    first = lines.event("GPU-a", 13, 1000.0)
    assert first == "Xid 13 on GPU GPU-a (graphics engine exception (application error))"
    # 299 more of the same within the minute: counted, not logged; another code or GPU is.
    assert all(lines.event("GPU-a", 13, 1000.0 + i / 10) is None for i in range(1, 300))
    assert lines.event("GPU-a", 79, 1001.0) is not None
    assert lines.event("GPU-b", 13, 1001.0) is not None
    assert lines.due(1059.0) == []  # no window has ended yet
    assert lines.due(1061.0) == [
        ("GPU-a", "Xid 13 on GPU GPU-a: 299 more in the last 60 s, not logged one by one")
    ]
    # The storm goes on: one summary a window; when it stops, the key is dropped and the
    # next event after that gets its own line again.
    assert lines.event("GPU-a", 13, 1070.0) is None
    assert [u for u, _ in lines.due(1122.0)] == ["GPU-a"]
    assert lines.due(1183.0) == []
    assert lines.event("GPU-a", 13, 1200.0) is not None
    # Values outside the table share one key; the summary names some of them, bounded.
    assert lines.event("GPU-c", 1000, 2000.0) == "Xid 1000 on GPU GPU-c"
    for xid in range(1001, 1100):
        assert lines.event("GPU-c", xid, 2001.0) is None
    (_, summary), *rest = [d for d in lines.due(2061.0) if d[0] == "GPU-c"]
    named = ", ".join(str(x) for x in range(1001, 1001 + LOG_VALUES_NAMED))
    assert not rest and summary == (
        f"Xids outside the known table on GPU GPU-c: 99 more ({named}, …) in the last 60 s, "
        "not logged one by one"
    )


def test_a_gpu_set_changed_as_the_watcher_reads_it_is_not_slept_through() -> None:
    """The poll's watch() lands as the Xid thread reads the GPU set: its wake() must end the
    idle wait that follows (read before the wait listened, it was lost, and the new GPUs went
    unwatched for a whole wait, 30 s by default)."""
    session = NvmlSession()  # never initialised: nothing to wait on, so it sleeps until woken

    def watched() -> tuple[str, ...]:
        session.wake()  # as watch() does when the set changes just now
        return ()

    done = threading.Event()
    waiter = threading.Thread(target=lambda: (session.wait_xids(watched, 600_000), done.set()))
    waiter.daemon = True
    waiter.start()
    assert done.wait(30), "slept through the wake of a change made as the set was read"
