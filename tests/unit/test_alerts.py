"""Transitions, journal fields, payloads and delivery (tfgpud/alerts/), without a network."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import socket
import threading
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import ALL_CODES, emitted_codes

from tfgpud.alerts import (
    MESSAGE_IDS,
    Alert,
    AlertDispatcher,
    AlertmanagerSink,
    Delivery,
    Request,
    SinkWorker,
    Transitions,
    WebhookSink,
    alertname,
    am_alert,
    http_post,
    log_transition,
    message_id,
    store,
    webhook_event,
)
from tfgpud.config import AlertmanagerConfig, AlertsConfig, WebhookConfig
from tfgpud.model import Finding, Severity

ALERTABLE_CODES = [*ALL_CODES, "baseline-state-error"]
U1 = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
VANISHED = Finding(
    "gpu-vanished",
    Severity.CRITICAL,
    U1,
    f"GPU NVIDIA RTX A6000 {U1} (00000000:02:00.0) was here before and is gone",
    ("baseline: ...", "NVML now reports 1 GPU(s)"),
    "Check `lspci -d 10de:`.",
)
LOST = Finding("gpu-lost", Severity.CRITICAL, U1, "GPU 1 is lost", (), "reboot")
INFO = Finding("gpu-appeared", Severity.INFO, U1, "new GPU", (), "")


# --- names and ids ------------------------------------------------------------------------------


def test_every_finding_code_has_its_own_journal_message_id() -> None:
    emitted = emitted_codes()
    assert len(emitted) >= 25  # the scan still finds the codes in tfgpud/diagnosis/
    for code in set(ALERTABLE_CODES) | emitted:
        assert code in MESSAGE_IDS, f"{code} has no MESSAGE_ID"
    ids = list(MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert re.fullmatch(r"[0-9a-f]{32}", message_id("some-future-code"))
    assert message_id("some-future-code") == message_id("some-future-code")


@pytest.mark.parametrize(
    ("code", "name"),
    [
        ("gpu-vanished", "TfgpudGpuVanished"),
        ("gpu-lost", "TfgpudGpuLost"),
        ("tf-cpu-fallback", "TfgpudTensorflowCpuFallback"),
        ("tf-job-on-cpu", "TfgpudTensorflowJobOnCpu"),
        ("gpu-memory-pressure", "TfgpudGpuMemoryPressure"),
    ],
)
def test_alertnames_match_the_prometheus_rules(code: str, name: str) -> None:
    assert alertname(code) == name
    rules = Path(__file__).parents[2] / "packaging" / "prometheus" / "tfgpud.rules.yml"
    assert f"alert: {name}\n" in rules.read_text()


# --- transitions --------------------------------------------------------------------------------


def states(ts: list[Any]) -> list[tuple[str, str]]:
    return [(t.state, t.alert.finding.code) for t in ts]


def test_without_damping_fires_and_resolves_at_once() -> None:
    tr = Transitions(for_seconds=0)
    assert states(tr.update([VANISHED], 10.0)) == [("firing", "gpu-vanished")]
    assert tr.update([VANISHED], 20.0) == []
    [resolved] = tr.update([], 30.0)
    assert resolved.state == "resolved"
    assert resolved.alert.starts_at == 10.0 and resolved.alert.ends_at == 30.0


def test_for_seconds_damps_flapping_both_ways() -> None:
    tr = Transitions(for_seconds=30)
    # Flickering: present 20 s, gone, present again: never fires.
    assert tr.update([VANISHED], 0.0) == []
    assert tr.update([VANISHED], 20.0) == []
    assert tr.update([], 25.0) == []
    assert tr.update([VANISHED], 30.0) == []
    assert tr.update([VANISHED], 50.0) == []
    [fired] = tr.update([VANISHED], 60.0)
    assert fired.state == "firing" and fired.alert.starts_at == 30.0
    # Gone briefly: stays firing, no transition.
    assert tr.update([], 70.0) == []
    assert tr.update([VANISHED], 80.0) == []
    assert [a.key for a in tr.firing] == [VANISHED.key]
    # Gone for for_seconds: resolves, ending when it was first seen gone.
    assert tr.update([], 90.0) == []
    [resolved] = tr.update([], 120.0)
    assert resolved.state == "resolved" and resolved.alert.ends_at == 90.0
    assert tr.firing == ()


def test_a_reload_keeps_the_fire_and_resolve_timers() -> None:
    """A reload rebuilds the dispatcher from alerts.json, which holds the firing set only: a
    pending finding then waited for_seconds anew, as did a firing alert's resolve."""
    other = Finding("gpu-lost", Severity.CRITICAL, "GPU-1", "lost")
    tr = Transitions(for_seconds=30)
    tr.update([VANISHED], 0.0)
    assert [t.state for t in tr.update([VANISHED], 30.0)] == ["firing"]
    assert tr.update([other], 40.0) == []  # VANISHED gone since 40 s, `other` pending since
    rebuilt = Transitions(30, tr.firing)  # what a reload loads
    rebuilt.carry(tr)
    moved = rebuilt.update([other], 70.0)
    assert sorted((t.state, t.alert.finding.code) for t in moved) == [
        ("firing", "gpu-lost"),
        ("resolved", "gpu-vanished"),
    ]
    assert next(t for t in moved if t.state == "resolved").alert.ends_at == 40.0


def test_firing_alert_keeps_its_start_and_takes_the_newest_text() -> None:
    tr = Transitions(for_seconds=0)
    tr.update([VANISHED], 1.0)
    newer = Finding(VANISHED.code, VANISHED.severity, VANISHED.subject, "newer text")
    tr.update([newer], 2.0)
    [a] = tr.firing
    assert a.starts_at == 1.0 and a.finding.summary == "newer text"


def test_transition_is_logged_with_journal_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tfgpud.alerts")
    [t] = Transitions(0).update([VANISHED], 1.0)
    log_transition(t)
    [rec] = caplog.records
    assert rec.levelno == logging.ERROR
    assert vars(rec)["MESSAGE_ID"] == MESSAGE_IDS["gpu-vanished"]
    assert vars(rec)["FINDING_CODE"] == "gpu-vanished"
    assert vars(rec)["SEVERITY"] == "critical"
    assert vars(rec)["SUBJECT"] == U1
    assert vars(rec)["ALERT_STATE"] == "firing"
    assert rec.getMessage().startswith("FIRING [critical] gpu-vanished")


# --- payloads -----------------------------------------------------------------------------------


def test_alertmanager_payload_firing_and_resolved() -> None:
    alert = Alert(VANISHED, starts_at=1_700_000_000.0)
    firing = am_alert(Delivery("firing", alert, 0.0), "gpu1", 1_700_000_100.0, 240.0)
    assert firing["labels"] == {
        "alertname": "TfgpudGpuVanished",
        "severity": "critical",
        "instance": "gpu1",
        "host": "gpu1",
        "code": "gpu-vanished",
        "subject": U1,
        "cause": "TfgpudGpuVanished",
        "role": "cause",
        "origin": "tfgpud",
    }
    assert firing["annotations"]["summary"] == VANISHED.summary
    assert firing["annotations"]["fix"] == VANISHED.fix
    assert "NVML now reports 1 GPU(s)" in firing["annotations"]["description"]
    assert firing["startsAt"] == "2023-11-14T22:13:20.000Z"
    assert firing["endsAt"] == "2023-11-14T22:19:00.000Z"  # now + 4 resend intervals
    done = Alert(VANISHED, starts_at=1_700_000_000.0, ends_at=1_700_000_050.0)
    resolved = am_alert(Delivery("resolved", done, 0.0), "gpu1", 1_700_000_100.0, 240.0)
    assert resolved["endsAt"] == "2023-11-14T22:14:10.000Z"
    # startsAt is when it fired (not when the finding appeared, for_seconds earlier), so
    # Alertmanager waits group_wait for the rest of the poll's alerts before it notifies.
    fired = Alert(VANISHED, starts_at=1_700_000_000.0, fired_at=1_700_000_030.0)
    assert am_alert(Delivery("firing", fired, 0.0), "gpu1", 0.0, 240.0)["startsAt"] == (
        "2023-11-14T22:13:50.000Z"
    )


def test_a_consequence_names_its_causes_alert_in_labels_and_text() -> None:
    """What alertmanager.example.yml's inhibit_rules match: role and cause (the cause's pushed
    alert name), with host, on the consequence; the same on the webhook event."""
    under = Alert(replace(VANISHED, cause="driver-not-loaded"), starts_at=1_700_000_000.0)
    labels = am_alert(Delivery("firing", under, 0.0), "gpu1", 1_700_000_100.0, 240.0)["labels"]
    assert labels["role"] == "consequence" and labels["cause"] == "TfgpudDriverNotLoaded"
    assert labels["alertname"] == "TfgpudGpuVanished" and labels["host"] == "gpu1"
    text = am_alert(Delivery("firing", under, 0.0), "gpu1", 0.0, 240.0)["annotations"]
    assert (
        "A consequence of driver-not-loaded: it pages as TfgpudDriverNotLoaded"
        in (text["description"])
    )
    event = webhook_event(Delivery("firing", under, 0.0), "gpu1")
    assert event["role"] == "consequence" and event["cause"] == "TfgpudDriverNotLoaded"
    libs = Finding("tf-cuda-libs-missing", Severity.CRITICAL, "research", "no cuDNN")
    root = am_alert(Delivery("firing", Alert(libs, 1.0), 0.0), "gpu1", 2.0, 240.0)["labels"]
    assert root["role"] == "cause" and root["cause"] == "TfgpudTensorflowCudaLibsMissing"


def test_webhook_payload() -> None:
    done = Alert(VANISHED, starts_at=1_700_000_000.0, ends_at=1_700_000_050.0)
    body = webhook_event(Delivery("resolved", done, 0.0), "gpu1")
    assert body["status"] == "resolved" and body["code"] == "gpu-vanished"
    assert body["alertname"] == "TfgpudGpuVanished" and body["subject"] == U1
    assert body["evidence"] == list(VANISHED.evidence) and body["fix"] == VANISHED.fix
    assert body["ends_at"] == "2023-11-14T22:14:10.000Z"
    assert body["message_id"] == MESSAGE_IDS["gpu-vanished"]
    json.dumps(body)


# --- delivery -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Receiver:
    """Stands in for the HTTP POST: records bodies, or fails while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.bodies: list[Any] = []
        self.attempts = 0

    def __call__(self, req: Request, timeout: float) -> None:
        self.attempts += 1
        if self.down:
            raise OSError("connection refused")
        self.bodies.append(json.loads(req.body))


def am_worker(clock: Clock, rx: Receiver, size: int = 10, max_retry: float = 300.0) -> SinkWorker:
    sink = AlertmanagerSink("alertmanager[0]", AlertmanagerConfig(url="http://am"), "h", 60.0)
    return SinkWorker(sink, size, max_retry, rx, clock, wall=lambda: 1_700_000_000.0)


def drain(w: SinkWorker) -> list[bool]:
    """What the worker thread would do once: take due messages and try them."""
    out = []
    with w._cond:
        batch = w._next_batch(w._clock())
    if batch:
        out.append(w.deliver(batch))
    return out


def test_failed_delivery_is_retried_with_backoff_then_delivered() -> None:
    clock, rx = Clock(), Receiver()
    w = am_worker(clock, rx)
    rx.down = True
    w.put(Delivery("firing", Alert(VANISHED, 1.0), clock()))
    assert drain(w) == [False]
    assert w._next_try == clock() + 1.0
    assert drain(w) == [False]
    assert w._next_try == clock() + 2.0  # doubling
    assert w.stats().queued == 1 and w.stats().failed == 2
    rx.down = False
    assert drain(w) == [True]
    assert rx.bodies[0][0]["labels"]["code"] == "gpu-vanished"
    s = w.stats()
    assert (s.sent, s.failed, s.dropped, s.queued) == (1, 2, 0, 0)


def test_backoff_is_capped() -> None:
    clock, rx = Clock(), Receiver()
    w = am_worker(clock, rx, max_retry=1e9)
    rx.down = True
    w.put(Delivery("firing", Alert(VANISHED, 1.0), clock()))
    for _ in range(12):
        drain(w)
    assert w._next_try - clock() == 60.0


def test_undeliverable_message_is_dropped_after_the_retry_bound() -> None:
    clock, rx = Clock(), Receiver()
    w = am_worker(clock, rx, max_retry=300.0)
    rx.down = True
    w.put(Delivery("firing", Alert(VANISHED, 1.0), clock()))
    drain(w)
    clock.t += 299.0
    drain(w)
    assert w.stats().queued == 1 and w.stats().dropped == 0
    clock.t += 1.0
    drain(w)
    s = w.stats()
    assert (s.queued, s.dropped, s.sent) == (0, 1, 0)


def test_alertmanager_queue_keeps_only_the_newest_state_per_alert() -> None:
    clock, rx = Clock(), Receiver()
    w = am_worker(clock, rx)
    a = Alert(VANISHED, 1.0)
    w.put(Delivery("firing", a, clock()))
    w.put(Delivery("resolved", Alert(VANISHED, 1.0, ends_at=5.0), clock()))
    w.put(Delivery("firing", Alert(LOST, 1.0), clock()))
    assert w.stats().queued == 2 and w.stats().dropped == 0
    drain(w)
    [batch] = rx.bodies
    assert [(x["labels"]["code"], x["endsAt"]) for x in batch] == [
        ("gpu-vanished", "1970-01-01T00:00:05.000Z"),
        ("gpu-lost", "2023-11-14T22:17:20.000Z"),  # wall clock + 4 x 60 s
    ]


def test_full_queue_drops_the_oldest_and_counts_it() -> None:
    clock, rx = Clock(), Receiver()
    sink = WebhookSink("webhook[0]", WebhookConfig(url="http://hook"), "h")
    w = SinkWorker(sink, 2, 300.0, rx, clock)
    for i in range(3):
        f = Finding("gpu-lost", Severity.CRITICAL, f"GPU-{i}", "lost")
        w.put(Delivery("firing", Alert(f, 1.0), clock()))
    assert w.stats().queued == 2 and w.stats().dropped == 1
    drain(w)
    drain(w)
    assert [b["subject"] for b in rx.bodies] == ["GPU-1", "GPU-2"]


def test_webhook_gets_every_transition_in_order() -> None:
    clock, rx = Clock(), Receiver()
    sink = WebhookSink("webhook[0]", WebhookConfig(url="http://hook"), "h")
    w = SinkWorker(sink, 10, 300.0, rx, clock)
    rx.down = True
    w.put(Delivery("firing", Alert(VANISHED, 1.0), clock()))
    drain(w)  # fails; goes back to the front
    w.put(Delivery("resolved", Alert(VANISHED, 1.0, ends_at=2.0), clock()))
    rx.down = False
    drain(w)
    drain(w)
    assert [b["status"] for b in rx.bodies] == ["firing", "resolved"]


def dispatcher(
    tmp: Path, rx: Receiver, clock: Clock, wall: Clock | None = None, **settings: Any
) -> AlertDispatcher:
    cfg = AlertsConfig.model_validate(
        {
            "alertmanager": [{"url": "http://am"}],
            "webhook": [{"url": "http://hook"}],
            "for_seconds": 0,
            "resend_seconds": 60,
            **settings,
        }
    )
    return AlertDispatcher(cfg, tmp, "host1", post=rx, clock=clock, wall=wall or time.time)


def test_dispatcher_routes_resends_to_alertmanager_only_and_filters_severity(
    tmp_path: Path,
) -> None:
    clock, rx = Clock(), Receiver()
    d = dispatcher(tmp_path, rx, clock)
    am, hook = d.workers
    stats = d.process([VANISHED, INFO], 1.0)
    assert stats.firing == 2  # both fire (and are logged) ...
    assert am.stats().queued == 1 and hook.stats().queued == 1  # ... info is not pushed
    drain(am)
    drain(hook)
    clock.t += 30
    d.process([VANISHED, INFO], 31.0)
    assert am.stats().queued == 0  # not yet: resend_seconds is 60
    clock.t += 30
    d.process([VANISHED, INFO], 61.0)
    assert am.stats().queued == 1 and hook.stats().queued == 0


def test_firing_set_survives_a_restart_without_refiring(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, rx = Clock(), Receiver()
    first = dispatcher(tmp_path, rx, clock)
    first.process([VANISHED], 1.0)
    for w in first.workers:
        drain(w)  # delivered before the restart
    first.stop()
    caplog.set_level(logging.INFO, logger="tfgpud.alerts")
    caplog.clear()
    again = dispatcher(tmp_path, rx, clock)
    am, hook = again.workers
    assert [a.starts_at for a in again.transitions.firing] == [1.0]
    again.process([VANISHED], 100.0)
    assert not [r for r in caplog.records if "FIRING" in r.getMessage()]
    assert am.stats().queued == 1 and hook.stats().queued == 0  # refreshed, not re-announced
    again.process([], 200.0)  # it cleared while we were down: resolved now
    assert [r.getMessage().split()[0] for r in caplog.records] == ["RESOLVED"]
    assert dispatcher(tmp_path, rx, clock).transitions.firing == ()


def test_unreadable_alert_state_starts_empty(tmp_path: Path) -> None:
    (tmp_path / "alerts.json").write_text("{broken")
    assert dispatcher(tmp_path, Receiver(), Clock()).transitions.firing == ()


def test_worker_thread_delivers_and_stops(tmp_path: Path) -> None:
    rx = Receiver()
    cfg = AlertsConfig.model_validate({"webhook": [{"url": "http://hook"}], "for_seconds": 0})
    d = AlertDispatcher(cfg, None, "h", post=rx)
    d.start()
    try:
        d.process([VANISHED], 1.0)
        for _ in range(200):
            if rx.bodies:
                break
            time.sleep(0.01)
    finally:
        d.stop(1.0)
    assert rx.bodies and rx.bodies[0]["code"] == "gpu-vanished"
    assert not any(w._thread and w._thread.is_alive() for w in d.workers)


# --- the outbox across restarts and reloads -----------------------------------------------------


def test_undelivered_messages_survive_a_restart_mapped_by_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, wall, rx = Clock(), Clock(), Receiver()
    wall.t = 1_700_000_000.0
    rx.down = True
    first = dispatcher(tmp_path, rx, clock, wall)
    first.process([VANISHED], 1.0)
    for w in first.workers:
        drain(w)  # fails: stays queued
    first.stop()
    saved = json.loads((tmp_path / "alerts.json").read_text())
    assert set(saved["outbox"]) == {"http://am/api/v2/alerts", "http://hook"}
    assert saved["outbox"]["http://hook"][0]["created_at"] == 1_700_000_000.0
    # Restarted with the Alertmanager removed and a new webhook listed before the old one.
    caplog.set_level(logging.INFO, logger="tfgpud.alerts")
    caplog.clear()
    wall.t += 120
    rx.down = False
    again = dispatcher(
        tmp_path,
        rx,
        clock,
        wall,
        alertmanager=[],
        webhook=[{"url": "http://new"}, {"url": "http://hook"}],
    )
    new, hook = again.workers
    assert new.stats().queued == 0 and hook.stats().queued == 1
    [kept] = hook.pending()
    assert kept.created_at == 1_700_000_000.0 and kept.state == "firing"
    dropped = [
        r.getMessage() for r in caplog.records if "http://am/api/v2/alerts" in r.getMessage()
    ]
    assert dropped and "dropped 1 undelivered" in dropped[0]
    assert [(s.sink, s.dropped) for s in again.stats().sinks if s.dropped] == [("removed", 1)]
    again.process([VANISHED], 200.0)  # still firing: not re-announced
    assert hook.stats().queued == 1
    drain(hook)
    assert [(b["status"], b["code"]) for b in rx.bodies] == [("firing", "gpu-vanished")]
    # Delivered: the outbox on disk is empty after the next poll.
    again.process([VANISHED], 201.0)
    assert json.loads((tmp_path / "alerts.json").read_text())["outbox"] == {}


def test_restored_messages_keep_their_age_for_the_retry_bound(tmp_path: Path) -> None:
    clock, wall, rx = Clock(), Clock(), Receiver()
    rx.down = True
    d = dispatcher(tmp_path, rx, clock, wall, max_retry_seconds=300, alertmanager=[])
    d.process([VANISHED], 1.0)
    d.stop()
    wall.t += 290  # down for 290 s: 10 s of retrying left
    d = dispatcher(tmp_path, rx, clock, wall, max_retry_seconds=300, alertmanager=[])
    [hook] = d.workers
    assert drain(hook) == [False] and hook.stats().queued == 1
    clock.t += 10
    assert drain(hook) == []  # expired: dropped when its turn came, not tried again
    assert (hook.stats().queued, hook.stats().dropped) == (0, 1)
    # Down longer than the bound: dropped (and counted) when loaded.
    d.process([], 2.0)  # resolves: a new message
    d.stop()
    wall.t += 301
    d = dispatcher(tmp_path, rx, clock, wall, max_retry_seconds=300, alertmanager=[])
    [hook] = d.workers
    assert (hook.stats().queued, hook.stats().dropped) == (0, 1)
    d.process([], 3.0)
    assert json.loads((tmp_path / "alerts.json").read_text())["outbox"] == {}


def test_alerts_json_is_written_once_per_poll_and_only_on_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[Any] = []
    real = store.write_atomically

    def counting(path: Path, data: bytes, mode: int = 0o644) -> None:
        writes.append(json.loads(data))
        real(path, data, mode)

    monkeypatch.setattr(store, "write_atomically", counting)
    clock, rx = Clock(), Receiver()
    d = dispatcher(tmp_path, rx, clock)
    am, hook = d.workers
    d.process([VANISHED, LOST], 1.0)  # two transitions, four messages: one write
    assert len(writes) == 1 and len(writes[0]["outbox"]["http://hook"]) == 2
    d.process([VANISHED, LOST], 2.0)
    assert len(writes) == 1  # nothing changed
    rx.down = True
    drain(am)
    d.process([VANISHED, LOST], 3.0)
    assert len(writes) == 1  # a failed attempt changes nothing worth writing
    rx.down = False
    drain(am)
    drain(hook)
    d.process([VANISHED, LOST], 4.0)
    assert len(writes) == 2
    assert writes[-1]["outbox"] == {"http://hook": writes[0]["outbox"]["http://hook"][1:]}


def test_a_message_being_delivered_at_stop_is_kept(tmp_path: Path) -> None:
    clock, rx = Clock(), Receiver()
    d = dispatcher(tmp_path, rx, clock, alertmanager=[])
    d.process([VANISHED], 1.0)
    [hook] = d.workers
    assert hook._take() is not None  # the thread took it and hangs on the receiver
    assert hook.stats().queued == 0 and len(hook.pending()) == 1
    d.stop(0.0)
    [kept] = json.loads((tmp_path / "alerts.json").read_text())["outbox"]["http://hook"]
    assert kept["state"] == "firing" and kept["alert"]["code"] == "gpu-vanished"


def test_alerts_json_without_an_outbox_still_loads(tmp_path: Path) -> None:
    doc = {"version": 1, "firing": [{**store._alert_to_json(Alert(VANISHED, 5.0))}]}
    (tmp_path / "alerts.json").write_text(json.dumps(doc))
    d = dispatcher(tmp_path, Receiver(), Clock())
    assert [a.starts_at for a in d.transitions.firing] == [5.0]
    d.process([], 10.0)  # resolved: pushed (critical: it was pushed when it fired)
    assert [w.stats().queued for w in d.workers] == [1, 1]


def test_a_broken_outbox_keeps_the_firing_set(tmp_path: Path) -> None:
    doc = {
        "version": 1,
        "firing": [store._alert_to_json(Alert(VANISHED, 5.0))],
        "outbox": {"http://hook": [{"state": "maybe"}]},
    }
    (tmp_path / "alerts.json").write_text(json.dumps(doc))
    d = dispatcher(tmp_path, Receiver(), Clock())
    assert [a.starts_at for a in d.transitions.firing] == [5.0]
    assert [w.stats().queued for w in d.workers] == [0, 0]


# --- severity changes while firing --------------------------------------------------------------


def test_resolve_is_pushed_when_the_severity_dropped_while_firing(tmp_path: Path) -> None:
    clock, rx = Clock(), Receiver()
    d = dispatcher(tmp_path, rx, clock)
    am, hook = d.workers
    warning = Finding("gpu-memory-pressure", Severity.WARNING, U1, "memory nearly full")
    d.process([warning], 1.0)
    drain(am)
    drain(hook)
    calmer = Finding(warning.code, Severity.INFO, U1, "memory getting full")
    clock.t += 61
    d.process([calmer], 62.0)  # still pushed: refreshed in Alertmanager
    assert am.stats().queued == 1
    drain(am)
    d.process([], 63.0)
    assert hook.stats().queued == 1 and am.stats().queued == 1
    drain(hook)
    assert rx.bodies[-1]["status"] == "resolved"


def test_an_alert_that_rises_to_min_severity_is_pushed_then(tmp_path: Path) -> None:
    clock, rx = Clock(), Receiver()
    d = dispatcher(tmp_path, rx, clock)
    am, hook = d.workers
    d.process([INFO], 1.0)
    assert hook.stats().queued == 0
    worse = Finding(INFO.code, Severity.WARNING, U1, "new GPU, unexpected")
    d.process([worse], 2.0)
    assert hook.stats().queued == 1 and am.stats().queued == 1
    drain(hook)
    d.stop()
    # Survives a restart (pushed is saved), so the resolve still goes out.
    d = dispatcher(tmp_path, rx, clock)
    d.process([INFO], 3.0)
    d.process([], 4.0)
    drain(d.workers[1])
    assert [b["status"] for b in rx.bodies] == ["firing", "resolved"]


# --- a cause that appears or clears while its consequence fires ---------------------------------


def pushed(rx: Receiver) -> list[tuple[str, str]]:
    """(status, role) of each alert Alertmanager received, in order."""
    out = []
    for body in rx.bodies:
        for a in body if isinstance(body, list) else []:
            ended = a["endsAt"] <= a["startsAt"] or a["endsAt"] < "2023-11-14T22:14:00"
            out.append(("resolved" if ended else "firing", a["labels"]["role"]))
    return out


def test_a_consequence_whose_cause_clears_is_relabelled_once_it_has_held(tmp_path: Path) -> None:
    """Alertmanager keys alerts by labels: when the driver comes back but the GPU stays gone,
    the consequence's alert resolves and the GPU's own fires (it pages now); a cause that
    clears only for a moment (less than for_seconds) relabels nothing."""
    clock, rx = Clock(), Receiver()
    d = dispatcher(tmp_path, rx, clock, wall=lambda: 1_700_000_000.0, for_seconds=30)
    am = d.workers[0]
    under = replace(VANISHED, cause="driver-not-loaded")
    d.process([under], 0.0)
    d.process([under], 30.0)  # fires after 30 s, as a consequence
    drain(am)
    assert pushed(rx) == [("firing", "consequence")]
    d.process([VANISHED], 40.0)  # the driver is back, the GPU still gone ...
    d.process([under], 50.0)  # ... only for a moment
    d.process([VANISHED], 60.0)
    d.process([VANISHED], 80.0)
    assert am.stats().queued == 0  # 20 s without a cause: not yet
    d.process([VANISHED], 90.0)
    drain(am)
    assert pushed(rx)[1:] == [("resolved", "consequence"), ("firing", "cause")]
    assert d.transitions.firing[0].starts_at == 0.0  # the same finding, present since 0 ...
    assert d.transitions.firing[0].fired_at == 90.0  # ... whose alert fired anew at 90
    d.process([], 100.0)
    d.process([], 130.0)
    drain(am)
    assert pushed(rx)[-1] == ("resolved", "cause")


def test_one_polls_alerts_go_in_one_request_root_causes_first(tmp_path: Path) -> None:
    """Alertmanager notifies an alert that began before group_wait at once: a consequence that
    arrived before its cause would page before the cause could inhibit it."""
    clock, rx = Clock(), Receiver()
    d = dispatcher(tmp_path, rx, clock, wall=lambda: 1_700_000_000.0)
    driver = Finding("driver-not-loaded", Severity.CRITICAL, "host", "no module")
    under = [replace(VANISHED, subject=f"GPU-{i}", cause="driver-not-loaded") for i in range(3)]
    d.process([*under, driver], 1.0)  # consequences first, as diagnose() may sort them
    assert drain(d.workers[0]) == [True]
    assert [a["labels"]["role"] for a in rx.bodies[0]] == ["cause"] + ["consequence"] * 3


def test_a_resolving_consequence_keeps_its_labels(tmp_path: Path) -> None:
    clock, rx = Clock(), Receiver()
    d = dispatcher(tmp_path, rx, clock, wall=lambda: 1_700_000_000.0, for_seconds=10)
    am = d.workers[0]
    d.process([replace(VANISHED, cause="driver-not-loaded")], 0.0)
    d.process([replace(VANISHED, cause="driver-not-loaded")], 10.0)
    drain(am)
    d.process([VANISHED], 11.0)  # the cause went first, then the GPU came back too
    for t in (12.0, 25.0, 30.0):
        d.process([], t)
    drain(am)
    assert pushed(rx) == [("firing", "consequence"), ("resolved", "consequence")]


def test_the_cause_survives_a_restart(tmp_path: Path) -> None:
    clock, rx = Clock(), Receiver()
    first = dispatcher(tmp_path, rx, clock)
    first.process([replace(VANISHED, cause="driver-not-loaded")], 1.0)
    first.stop()
    again = dispatcher(tmp_path, rx, clock)
    assert again.transitions.firing[0].finding.cause == "driver-not-loaded"


def test_an_info_alert_that_stays_info_is_never_pushed(tmp_path: Path) -> None:
    d = dispatcher(tmp_path, Receiver(), Clock())
    d.process([INFO], 1.0)
    d.process([], 2.0)
    assert [w.stats().queued for w in d.workers] == [0, 0]


# --- redirects ----------------------------------------------------------------------------------


class RedirectingServer:
    """POST /hook answers ``code`` with Location /landing; records every request."""

    def __init__(self, code: int) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                outer.requests.append((self.command, self.path, self.rfile.read(n)))
                if self.path == "/hook":
                    self.send_response(code)
                    self.send_header("Location", "/landing")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _record

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=[301, 302, 303, 307, 308])
def redirecting(request: pytest.FixtureRequest) -> Iterator[RedirectingServer]:
    srv = RedirectingServer(request.param)
    yield srv
    srv.close()


def test_a_redirect_is_a_failed_delivery_not_a_get(
    redirecting: RedirectingServer, caplog: pytest.LogCaptureFixture
) -> None:
    req = Request(f"{redirecting.base}/hook", b'{"a": 1}', {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        http_post(req, 5.0)
    assert f"{redirecting.base}/landing" in str(err.value.reason)
    assert [(m, p) for m, p, _ in redirecting.requests] == [("POST", "/hook")]
    # Through a sink worker: counted as failed, retried, the Location logged.
    caplog.set_level(logging.WARNING, logger="tfgpud.alerts")
    sink = WebhookSink("webhook[0]", WebhookConfig(url=f"{redirecting.base}/hook"), "h")
    clock = Clock()
    w = SinkWorker(sink, 10, 300.0, http_post, clock)
    w.put(Delivery("firing", Alert(VANISHED, 1.0), clock()))
    assert drain(w) == [False]
    s = w.stats()
    assert (s.sent, s.failed, s.queued) == (0, 1, 1)
    assert any(
        "redirected to" in r.getMessage() and "/landing" in r.getMessage() for r in caplog.records
    )


# --- a receiver that never finishes its answer --------------------------------------------------


class TricklingReceiver:
    """Accepts, reads the request, then sends its answer one byte every 0.2 s for up to
    ``for_seconds`` (a status line that never ends): each read gets a byte well inside any
    per-read timeout, so only a deadline on the whole attempt ends it."""

    def __init__(self, for_seconds: float = 20.0) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.for_seconds = for_seconds
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.recv(65536)
                end = time.monotonic() + self.for_seconds
                for byte in itertools.cycle(b"HTTP/1.1 200 OK"):
                    if time.monotonic() > end or self.stopped.wait(0.2):
                        break
                    conn.sendall(bytes([byte]))

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


def test_a_receiver_that_trickles_its_answer_is_cut_at_the_attempt_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = TricklingReceiver()
    caplog.set_level(logging.WARNING, logger="tfgpud.alerts")
    sink = WebhookSink("webhook[0]", WebhookConfig(url=receiver.url, timeout_seconds=1.0), "h")
    clock = Clock()
    w = SinkWorker(sink, 10, 300.0, http_post, clock)
    w.put(Delivery("firing", Alert(VANISHED, 1.0), clock()))
    started = time.monotonic()
    try:
        assert drain(w) == [False]
    finally:
        receiver.close()
    # Cut near its 1 s deadline; a per-read timeout would have waited the receiver's 20 s.
    assert time.monotonic() - started < 10
    s = w.stats()
    assert (s.sent, s.failed, s.queued) == (0, 1, 1)
    assert any("within 1 s" in r.getMessage() for r in caplog.records)


# --- a sink down for days: the journal, the queue and alerts.json stay bounded ------------------


def webhook_worker(clock: Clock, rx: Receiver, size: int, max_retry: float) -> SinkWorker:
    sink = WebhookSink("webhook[0]", WebhookConfig(url="http://hook"), "h")
    return SinkWorker(sink, size, max_retry, rx, clock, wall=lambda: 1_700_000_000.0)


def lost(n: int) -> list[Finding]:
    return [Finding("gpu-lost", Severity.CRITICAL, f"GPU-{i}", "lost") for i in range(n)]


def attempt(w: SinkWorker, clock: Clock) -> bool:
    """What the worker thread does once the backoff has passed. ``_take`` returns at once: the
    newest message is too young to expire."""
    clock.t = max(clock.t, w._next_try)
    assert any(clock.t - d.created < w.max_retry_seconds for d in w.queued())
    batch = w._take()
    assert batch is not None
    return w.deliver(batch)


def dropped_in(records: list[logging.LogRecord]) -> int:
    return sum(int(n) for r in records for n in re.findall(r"dropped (\d+)", r.getMessage()))


def test_drops_on_a_working_sink_are_summed_up_within_a_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A working sink whose queue overflows once: the drops after the first line are summed up
    at the next poll past the window (stats(), read every poll), not held until some later
    drop, failure or stop."""
    caplog.set_level(logging.INFO, logger="tfgpud.alerts")
    clock, rx = Clock(), Receiver()
    w = webhook_worker(clock, rx, size=2, max_retry=300.0)
    findings = iter(lost(10))
    for _ in range(2):  # two bursts in one window, each overflowing the queue
        w.put_all(Delivery("firing", Alert(next(findings), clock.t), clock()) for _ in range(5))
    assert w.stats().dropped == 8
    clock.t += 601
    w.stats()  # a poll
    assert dropped_in(caplog.records) == 8


def test_a_sink_down_for_hours_logs_its_drops_once_per_window_and_all_at_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tfgpud.alerts")
    clock, rx = Clock(), Receiver()
    w = webhook_worker(clock, rx, size=5, max_retry=50.0)
    rx.down = True
    findings = iter(lost(1000))
    for _ in range(120):  # two hours: 3 new messages a minute, an attempt a minute
        clock.t += 60
        w.put_all(Delivery("firing", Alert(next(findings), clock.t), clock()) for _ in range(3))
        assert not attempt(w, clock)
    s = w.stats()
    assert s.dropped > 300 and s.sent == 0  # the queue overflowed and messages expired
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "cannot deliver" in m]) == 1  # the first failure
    assert len([m for m in lines if "queue was full" in m and "further drops" in m]) == 1
    assert len([m for m in lines if "max_retry_seconds" in m and "further drops" in m]) == 1
    summaries = [m for m in lines if "since the last line" in m]
    assert 10 <= len(summaries) <= 12  # one per 10 minutes, not one per message or attempt
    rx.down = False
    clock.t += 60
    w.put(Delivery("firing", Alert(next(findings), clock.t), clock()))
    assert attempt(w, clock)
    recovered = caplog.records[-1].getMessage()
    assert "delivered again, after 120 failed attempt(s)" in recovered
    assert "since the last line, dropped" in recovered
    assert dropped_in(caplog.records) == w.stats().dropped  # every drop is in the journal


def test_after_an_outage_nothing_older_than_max_retry_seconds_is_sent() -> None:
    clock, rx = Clock(), Receiver()
    w = webhook_worker(clock, rx, size=100, max_retry=300.0)
    rx.down = True
    stale, fresh = lost(10), lost(12)[10:]
    w.put_all(Delivery("firing", Alert(f, 1.0), clock()) for f in stale)
    assert not attempt(w, clock)  # one tried: the other nine wait behind it
    clock.t += 400
    w.put_all(Delivery("firing", Alert(f, 2.0), clock()) for f in fresh)
    rx.down = False
    while w.stats().queued:
        assert attempt(w, clock)
    assert [b["subject"] for b in rx.bodies] == ["GPU-10", "GPU-11"]
    s = w.stats()
    assert (s.sent, s.dropped, s.queued) == (2, 10, 0)


def test_alerts_json_never_outgrows_what_a_start_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(store, "MAX_STATE_BYTES", 8000)
    caplog.set_level(logging.WARNING, logger="tfgpud.alerts")
    clock, wall, rx = Clock(), Clock(), Receiver()
    rx.down = True
    d = dispatcher(tmp_path, rx, clock, wall, alertmanager=[])
    for t in range(1, 41):  # fires, resolves, fires again: 40 messages for the webhook
        wall.t += 1
        d.process([VANISHED] if t % 2 else [], float(t))
    d.stop()
    assert (tmp_path / "alerts.json").stat().st_size <= 8000
    [hook] = d.workers
    dropped = hook.stats().dropped
    too_big = [r for r in caplog.records if "keep alerts.json within" in r.getMessage()]
    assert dropped > 10 and len(too_big) == 2  # the first drop, then the rest summed up at stop
    assert dropped_in(too_big) == dropped
    # The next start reads it: the newest messages, the oldest dropped.
    again = dispatcher(tmp_path, rx, clock, wall, alertmanager=[])
    [hook] = again.workers
    kept = hook.pending()
    assert len(kept) == 40 - dropped
    assert kept[-1].state == "resolved" and kept[-1].alert.ends_at == 40.0


def test_a_firing_set_too_large_for_alerts_json_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(store, "MAX_STATE_BYTES", 100)
    d = dispatcher(tmp_path, Receiver(), Clock(), alertmanager=[], webhook=[])
    d.process([VANISHED], 1.0)
    assert not (tmp_path / "alerts.json").exists()
    assert any("more than the 100 a start reads" in r.getMessage() for r in caplog.records)


def test_a_failure_on_every_poll_logs_its_traceback_once_then_a_line_per_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tfgpud.alerts")
    clock, rx = Clock(), Receiver()
    d = dispatcher(tmp_path, rx, clock)

    def broken(findings: Any, now: float) -> Any:
        raise RuntimeError("the state is inconsistent")

    monkeypatch.setattr(d.transitions, "update", broken)
    for t in range(30):  # half an hour of polls, every minute
        clock.t += 60
        d.process([VANISHED], float(t))
    with_traceback = [r for r in caplog.records if r.exc_info]
    assert len(with_traceback) == 1
    repeats = [r.getMessage() for r in caplog.records if "again " in r.getMessage()]
    assert len(repeats) == 2 and "the state is inconsistent" in repeats[0]
    monkeypatch.undo()
    d.process([VANISHED], 31.0)
    assert "alert processing works again after 30 failure(s)" in caplog.records[-1].getMessage()
