"""Findings → alerts: transitions (fire/resolve, damped), the journal, and push delivery.

``Transitions`` turns each poll's findings into ``firing`` / ``resolved`` events: a finding fires
once it has held for ``[alerts] for_seconds`` and resolves once it has been gone that long, so a
finding that flickers for less than that never pages anyone. Every transition is logged with
journal fields ``MESSAGE_ID`` (one fixed id per finding code, :data:`MESSAGE_IDS`),
``FINDING_CODE``, ``SEVERITY``, ``SUBJECT`` and ``ALERT_STATE``.

``AlertDispatcher`` pushes transitions at or above ``[alerts] min_severity`` to the sinks:
Alertmanager (API v2; firing alerts re-sent every ``resend_seconds``) and generic JSON webhooks
(one POST per transition). Each sink has its own bounded queue and thread, so a receiver that
hangs or fails costs the poll loop nothing. A message that cannot be delivered is retried with
exponential backoff (1 s doubling to 60 s) for up to ``max_retry_seconds`` from when it was first
queued, then dropped and counted (``tfgpud_alerts_dropped_total``). A redirect (3xx) is a failed
delivery: urllib would turn the POST into a body-less GET.

``<state_dir>/alerts.json`` keeps the firing set (with whether each alert was pushed) and each
sink's outbox (messages not delivered yet, keyed by the sink's URL, with the wall-clock time they
were first queued). It is rewritten atomically at most once per poll when either changed, and at
stop, so a restart or a reload neither re-fires nor forgets alerts. Messages for a sink whose URL
is no longer configured are dropped at the next start, counted (sink ``removed``) and logged.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

from tfgpud.config import AlertmanagerConfig, AlertsConfig, WebhookConfig
from tfgpud.model import AlertStats, Finding, Severity, SinkStats, to_jsonable
from tfgpud.state import write_atomically

log = logging.getLogger(__name__)

ALERTS_FILE = "alerts.json"
REMOVED_SINK = "removed"  # SinkStats name counting messages left for sinks no longer configured
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
AM_BATCH = 64  # alerts per Alertmanager POST

# journald MESSAGE_ID per finding code (`journalctl MESSAGE_ID=...`); never change one.
MESSAGE_IDS: dict[str, str] = {
    "no-nvidia-gpu": "80288b3bce544d1a981941066cecc641",
    "nvml-library-missing": "df7f81cb46ca40dd88af34f4e79e2740",
    "driver-not-loaded": "ed2145d361e6434db4ec0bdce383c0ca",
    "driver-library-mismatch": "0b5baa979b534ca793e523a1c1f4159f",
    "nouveau-bound": "cff761cec351444189d4e25902b935e9",
    "device-nodes-missing": "413ee3833984409da7644856e12f6460",
    "nvml-no-permission": "dd0b2f0049d943e996a3d08a2a590501",
    "gpu-lost": "907c1ae275214d1188582433cbf12be2",
    "gpu-vanished": "90005464d5674e6cbf52456ae5edfed9",
    "gpu-appeared": "69401bf13da84521a762a180e2b39b02",
    "gpu-xid-critical": "09f63ede971f4c0292eef03ef81c9295",
    "gpu-memory-pressure": "3b8bebca432a405a91d64d8d9299d2bf",
    "tf-cpu-fallback": "ea93791d3fb0411384dfb0928b6a1f6a",
    "tf-cpu-only-build": "65e4d0c797574608bd68d548443c06bb",
    "tf-gpus-hidden-by-env": "e66ceeea30944b85a564c0e9cf11964a",
    "tf-cuda-libs-missing": "5b76505c76fb48b5a2453bd3bd369b26",
    "tf-libcuda-missing": "9679f57d230b41dbb510aa91d2303a9b",
    "tf-driver-too-old": "8de6b7d8440f4408b86e0aba005367b8",
    "tf-driver-dso-mismatch": "5c0ebc3fc1e6478d84d8b235091da9be",
    "tf-compute-capability-unsupported": "0c2869bdb6d645a5bd83a0d34897eece",
    "tf-cudnn-mismatch": "773bbcc00a4c4edbb20f476d205497c8",
    "tf-device-permission": "a1d087d65a144613a4ba7be644fcea71",
    "tf-partial-visibility": "d02e34c10307444097827f2a79091354",
    "tf-ptx-jit-only": "98dcd8ab2e4c4159bea38b7669f5af27",
    "tf-import-failed": "8f2ac00d35114e19b80897d0de48563a",
    "tf-import-crashed": "a6855a0937514649a2a465e50bdff6a5",
    "tf-probe-timeout": "ee4ce0205867431bac7d38d3aaa4e88e",
    "tf-job-on-cpu": "5507116cfe344c5ab63e73c5c163b1ea",
    "tf-probe-refused": "b0c4f1d2e8a94c6f8a1e3d5b7c9f2a64",
    "tf-smoke-failed": "76769cffefaa42a18683dffc7c537c8b",
    "baseline-state-error": "e3f4cd57e3714186bbd8032a376318e6",
}
_ID_NAMESPACE = uuid.UUID("1b4e28ba-2fa1-41d2-883f-0016d3cca427")


def message_id(code: str) -> str:
    """The journal MESSAGE_ID for ``code`` (32 hex digits); derived for a code not listed."""
    return MESSAGE_IDS.get(code) or uuid.uuid5(_ID_NAMESPACE, code).hex


def alertname(code: str) -> str:
    """``gpu-vanished`` → ``TfgpudGpuVanished``, ``tf-cpu-fallback`` →
    ``TfgpudTensorflowCpuFallback``: the matching Prometheus rule's name, where one exists."""
    parts = code.split("-")
    if parts[0] == "tf":
        parts[0] = "tensorflow"
    return "Tfgpud" + "".join(p[:1].upper() + p[1:] for p in parts)


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- transitions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """A finding that fired. ``starts_at``: when it first appeared; ``ends_at``: when it went."""

    finding: Finding
    starts_at: float
    ends_at: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.finding.key


State = Literal["firing", "resolved"]


@dataclass(frozen=True)
class Transition:
    state: State
    alert: Alert
    at: float  # unix time of the poll that made the change


@dataclass
class _Firing:
    alert: Alert
    absent_since: float | None = None


class Transitions:
    """Fire/resolve state machine over successive finding sets (one ``update`` per poll).

    A finding fires when it has been present in every poll for ``for_seconds`` (at once when 0)
    and resolves when it has been absent from every poll for ``for_seconds``.
    """

    def __init__(self, for_seconds: float, firing: Iterable[Alert] = ()) -> None:
        self.for_seconds = for_seconds
        self._pending: dict[tuple[str, str], float] = {}
        self._firing: dict[tuple[str, str], _Firing] = {a.key: _Firing(a) for a in firing}

    @property
    def firing(self) -> tuple[Alert, ...]:
        return tuple(f.alert for f in self._firing.values())

    def update(self, findings: Iterable[Finding], now: float) -> list[Transition]:
        current = {f.key: f for f in findings}
        out: list[Transition] = []
        for key, finding in current.items():
            fs = self._firing.get(key)
            if fs is not None:
                fs.alert = replace(fs.alert, finding=finding)
                fs.absent_since = None
                continue
            since = self._pending.setdefault(key, now)
            if now - since >= self.for_seconds:
                del self._pending[key]
                alert = Alert(finding, starts_at=since)
                self._firing[key] = _Firing(alert)
                out.append(Transition("firing", alert, now))
        for key in [k for k in self._pending if k not in current]:
            del self._pending[key]  # flickered: never fired
        for key, fs in list(self._firing.items()):
            if key in current:
                continue
            if fs.absent_since is None:
                fs.absent_since = now
            if now - fs.absent_since >= self.for_seconds:
                del self._firing[key]
                out.append(Transition("resolved", replace(fs.alert, ends_at=fs.absent_since), now))
        return out


def log_transition(t: Transition) -> None:
    """One journal entry per transition, with fields to filter on."""
    f = t.alert.finding
    level = logging.INFO
    if t.state == "firing" and f.severity is not Severity.INFO:
        level = logging.ERROR if f.severity is Severity.CRITICAL else logging.WARNING
    verb = "FIRING" if t.state == "firing" else "RESOLVED"
    log.log(
        level,
        "%s [%s] %s (%s): %s%s",
        verb,
        f.severity.value,
        f.code,
        f.subject,
        f.summary,
        f" — fix: {f.fix}" if t.state == "firing" and f.fix else "",
        extra={
            "MESSAGE_ID": message_id(f.code),
            "FINDING_CODE": f.code,
            "SEVERITY": f.severity.value,
            "SUBJECT": f.subject,
            "ALERT_STATE": t.state,
        },
    )


def _finding_fields(f: Finding) -> dict[str, Any]:
    return cast(dict[str, Any], to_jsonable(f))


def _alert_to_json(a: Alert) -> dict[str, Any]:
    doc = {**_finding_fields(a.finding), "starts_at": a.starts_at}
    if a.ends_at is not None:
        doc["ends_at"] = a.ends_at
    return doc


def _alert_from_json(d: Any) -> Alert:
    if not isinstance(d, dict):
        raise ValueError("alert entry is not an object")
    finding = Finding(
        code=str(d["code"]),
        severity=Severity(d["severity"]),
        subject=str(d["subject"]),
        summary=str(d.get("summary", "")),
        evidence=tuple(str(e) for e in d.get("evidence", ())),
        fix=str(d.get("fix", "")),
    )
    ends = d.get("ends_at")
    return Alert(
        finding,
        starts_at=_finite(d["starts_at"]),
        ends_at=None if ends is None else _finite(ends),
    )


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SavedState:
    """What ``alerts.json`` holds: the firing set and each sink's undelivered messages."""

    firing: tuple[Alert, ...] = ()
    pushed: frozenset[tuple[str, str]] = frozenset()  # firing alerts that were pushed to sinks
    outbox: dict[str, list[Delivery]] = field(default_factory=dict)  # sink key -> messages


def _read_doc(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s (%s): alerts firing before the restart fire again", path, exc)
        return None
    if not isinstance(doc, dict):
        log.warning(
            "ignoring %s (not an object): alerts firing before the restart fire again",
            path,
        )
        return None
    return doc


def load_state(path: Path, min_rank: int) -> SavedState:
    """``alerts.json`` as the last process left it; empty parts where unknown or unreadable.

    ``min_rank``: an alert saved by a version that did not record ``pushed`` counts as pushed
    when its severity is at least this.
    """
    doc = _read_doc(path)
    if doc is None:
        return SavedState()
    firing: list[Alert] = []
    pushed: set[tuple[str, str]] = set()
    try:
        for entry in doc["firing"]:
            a = _alert_from_json(entry)
            firing.append(a)
            flag = entry.get("pushed")
            if flag if isinstance(flag, bool) else a.finding.severity.rank >= min_rank:
                pushed.add(a.key)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring %s (%s): alerts firing before the restart fire again", path, exc)
        firing, pushed = [], set()
    outbox: dict[str, list[Delivery]] = {}
    try:
        for key, entries in (doc.get("outbox") or {}).items():
            outbox[str(key)] = [_delivery_from_json(e) for e in entries]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning(
            "ignoring the outbox in %s (%s): alert messages undelivered at the last stop are lost",
            path,
            exc,
        )
        outbox = {}
    return SavedState(tuple(firing), frozenset(pushed), outbox)


def load_firing(path: Path) -> list[Alert]:
    """The alerts that were firing when the last process stopped; [] when unknown."""
    return list(load_state(path, Severity.INFO.rank).firing)


# --- sinks --------------------------------------------------------------------------------------


@dataclass
class Delivery:
    """One message waiting for a sink."""

    state: State
    alert: Alert
    created: float  # monotonic time it was queued (in this process: the retry bound)
    created_at: float | None = None  # wall-clock time it was first queued (kept across restarts)


def _delivery_to_json(d: Delivery) -> dict[str, Any]:
    return {"state": d.state, "created_at": d.created_at, "alert": _alert_to_json(d.alert)}


def _delivery_from_json(e: Any) -> Delivery:
    if not isinstance(e, dict) or e.get("state") not in ("firing", "resolved"):
        raise ValueError(f"not a queued alert message: {e!r}")
    return Delivery(e["state"], _alert_from_json(e["alert"]), 0.0, _finite(e["created_at"]))


@dataclass
class Request:
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class Sink:
    name: str
    url: str  # where messages go; also the key of its outbox in alerts.json
    timeout: float
    batch: int = 1

    def queue_key(self, d: Delivery) -> tuple[Any, ...]:
        raise NotImplementedError

    def render(self, batch: list[Delivery], now: float) -> Request:
        raise NotImplementedError


class AlertmanagerSink(Sink):
    """``POST /api/v2/alerts``. Only the newest state of an alert is worth delivering."""

    batch = AM_BATCH

    def __init__(self, name: str, cfg: AlertmanagerConfig, instance: str, resend: float) -> None:
        self.name = name
        self.timeout = cfg.timeout_seconds
        self.url = cfg.url.rstrip("/") + "/api/v2/alerts"
        self.instance = instance
        self.valid_for = 4 * resend  # Alertmanager resolves it by itself if refreshes stop

    def queue_key(self, d: Delivery) -> tuple[Any, ...]:
        return d.alert.key

    def render(self, batch: list[Delivery], now: float) -> Request:
        return Request(
            self.url,
            json.dumps([am_alert(d, self.instance, now, self.valid_for) for d in batch]).encode(),
            {"Content-Type": "application/json"},
        )


def am_alert(d: Delivery, instance: str, now: float, valid_for: float) -> dict[str, Any]:
    """One Alertmanager v2 ``postableAlert``."""
    f = d.alert.finding
    ends = d.alert.ends_at if d.state == "resolved" and d.alert.ends_at else now + valid_for
    return {
        "labels": {
            "alertname": alertname(f.code),
            "severity": f.severity.value,
            "instance": instance,
            "code": f.code,
            "subject": f.subject,
            "origin": "tfgpud",
        },
        "annotations": {
            "summary": f.summary,
            "description": "\n".join([f.summary, *f.evidence]),
            "fix": f.fix,
        },
        "startsAt": rfc3339(d.alert.starts_at),
        "endsAt": rfc3339(ends),
    }


class WebhookSink(Sink):
    """One JSON POST per transition (nothing is coalesced: each is an event)."""

    def __init__(self, name: str, cfg: WebhookConfig, instance: str) -> None:
        self.name = name
        self.timeout = cfg.timeout_seconds
        self.url = cfg.url
        self.headers = {"Content-Type": "application/json", **cfg.headers}
        self.instance = instance

    def queue_key(self, d: Delivery) -> tuple[Any, ...]:
        return (*d.alert.key, d.state, d.alert.starts_at)

    def render(self, batch: list[Delivery], now: float) -> Request:
        return Request(
            self.url, json.dumps(webhook_event(batch[0], self.instance)).encode(), self.headers
        )


def webhook_event(d: Delivery, instance: str) -> dict[str, Any]:
    """The generic webhook body (documented in README.md)."""
    a, f = d.alert, d.alert.finding
    return {
        "version": 1,
        "status": d.state,
        "alertname": alertname(f.code),
        "instance": instance,
        **_finding_fields(f),
        "starts_at": rfc3339(a.starts_at),
        "ends_at": rfc3339(a.ends_at) if d.state == "resolved" and a.ends_at else None,
        "message_id": message_id(f.code),
    }


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a failed delivery: urllib would re-send a POST answered 301/302/303 as a
    GET without the body and report success. The error names where it pointed."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        raise urllib.error.HTTPError(
            req.full_url,
            code,
            f"HTTP {code} {msg}: redirected to {newurl} (not followed: set the sink's url to "
            "the final address)",
            headers,
            fp,
        )


_opener = urllib.request.build_opener(_RefuseRedirects)


def http_post(req: Request, timeout: float) -> None:
    """POST; raises OSError/URLError on any failure (non-2xx, redirects included)."""
    r = urllib.request.Request(req.url, data=req.body, headers=req.headers, method="POST")
    try:
        with _opener.open(r, timeout=timeout) as resp:  # any other non-2xx raises HTTPError
            resp.read(65536)
    except urllib.error.HTTPError as exc:
        exc.close()  # the answer's connection: not left for the garbage collector
        raise


Poster = Callable[[Request, float], None]


class SinkWorker:
    """A bounded queue and a thread delivering to one sink, with backoff and a retry bound."""

    def __init__(
        self,
        sink: Sink,
        queue_size: int,
        max_retry_seconds: float,
        post: Poster = http_post,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.sink = sink
        self.queue_size = queue_size
        self.max_retry_seconds = max_retry_seconds
        self._post = post
        self._clock = clock
        self._wall = wall
        self._queue: OrderedDict[tuple[Any, ...], Delivery] = OrderedDict()
        self._inflight: list[Delivery] = []  # taken by the thread, not delivered yet
        self._cond = threading.Condition()
        self._stop = False
        self._backoff = 0.0
        self._next_try = 0.0
        self.sent = self.failed = self.dropped = 0
        self.changes = 0  # bumped whenever the set of undelivered messages changes
        self._thread: threading.Thread | None = None

    def put(self, d: Delivery) -> None:
        """Queue ``d`` (replacing an older message for the same key). Never blocks for long."""
        if d.created_at is None:
            d = replace(d, created_at=self._wall() - max(0.0, self._clock() - d.created))
        with self._cond:
            key = self.sink.queue_key(d)
            if key in self._queue:
                del self._queue[key]  # superseded, not lost: the newer message says more
            elif len(self._queue) >= self.queue_size:
                self._queue.popitem(last=False)
                self.dropped += 1
                log.warning("alert queue of %s full: dropped the oldest message", self.sink.name)
            self._queue[key] = d
            self.changes += 1
            self._cond.notify()

    def restore(self, saved: Iterable[Delivery]) -> None:
        """Queue messages a previous process left undelivered (from ``alerts.json``), keeping
        their original creation time: one older than ``max_retry_seconds`` is dropped."""
        now, wall = self._clock(), self._wall()
        expired = 0
        for d in saved:
            age = max(0.0, wall - (d.created_at if d.created_at is not None else wall))
            if age >= self.max_retry_seconds:
                expired += 1
                continue
            self.put(replace(d, created=now - age))
        if expired:
            with self._cond:
                self.dropped += expired
                self.changes += 1
            log.warning(
                "%s: dropped %d alert message(s) left undelivered by the previous run: older "
                "than max_retry_seconds (%.0f s)",
                self.sink.name,
                expired,
                self.max_retry_seconds,
            )

    def pending(self) -> list[Delivery]:
        """The undelivered messages, oldest first: the one being tried, then the queue."""
        with self._cond:
            queued = list(self._queue.values())
            keys = set(self._queue)
            inflight = [d for d in self._inflight if self.sink.queue_key(d) not in keys]
            return inflight + queued

    def stats(self) -> SinkStats:
        with self._cond:
            return SinkStats(self.sink.name, self.sent, self.failed, self.dropped, len(self._queue))

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"alerts-{self.sink.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float, kept: bool = False) -> None:
        """Stop the thread (waiting up to ``timeout`` for a delivery in progress). ``kept``:
        the caller saves :meth:`pending` for the next start, else undelivered messages are lost.
        """
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        pending = len(self.pending())
        if pending and kept:
            log.info(
                "%s: %d undelivered alert message(s) kept for the next start",
                self.sink.name,
                pending,
            )
        elif pending:
            log.warning(
                "%s: %d undelivered alert message(s) given up at stop", self.sink.name, pending
            )

    def _take(self) -> list[Delivery] | None:
        with self._cond:
            while True:
                if self._stop:
                    return None
                wait = self._next_try - self._clock()
                if self._queue and wait <= 0:
                    break
                self._cond.wait(wait if self._queue else None)
            batch: list[Delivery] = []
            while self._queue and len(batch) < self.sink.batch:
                batch.append(self._queue.popitem(last=False)[1])
            self._inflight = batch
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self.deliver(batch)

    def deliver(self, batch: list[Delivery]) -> bool:
        """One attempt (the thread's body; tests call it directly). True when delivered."""
        try:
            self._post(self.sink.render(batch, self._wall()), self.sink.timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means: retry later
            self._failed(batch, exc)
            return False
        with self._cond:
            if self._backoff:
                log.info("alerts to %s delivered again", self.sink.name)
            self.sent += len(batch)
            self._backoff = 0.0
            self._next_try = 0.0
            self._inflight = []
            self.changes += 1
        return True

    def _failed(self, batch: list[Delivery], exc: Exception) -> None:
        now = self._clock()
        with self._cond:
            self._inflight = []
            self.failed += len(batch)
            first = not self._backoff
            self._backoff = min(2 * self._backoff or BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS)
            self._next_try = now + self._backoff
            keep = [d for d in batch if now - d.created < self.max_retry_seconds]
            expired = len(batch) - len(keep)
            self.dropped += expired
            for d in reversed(keep):
                key = self.sink.queue_key(d)
                if key not in self._queue:  # else a newer message replaced it meanwhile
                    self._queue[key] = d
                    self._queue.move_to_end(key, last=False)
                else:
                    self.changes += 1  # superseded by a newer message: gone from the outbox
            overflow = max(0, len(self._queue) - self.queue_size)
            for _ in range(overflow):
                self._queue.popitem(last=False)
            self.dropped += overflow
            if expired or overflow:
                self.changes += 1
        if first or expired:
            log.warning(
                "cannot deliver %d alert message(s) to %s (%s): %s; retrying with backoff "
                "for up to %.0f s%s",
                len(batch),
                self.sink.name,
                getattr(self.sink, "url", "?"),
                getattr(exc, "reason", None) or exc,
                self.max_retry_seconds,
                f"; {expired} message(s) dropped after that" if expired else "",
            )


class AlertDispatcher:
    """Transitions + journal + sinks. ``process()`` is called once per poll and never blocks."""

    def __init__(
        self,
        config: AlertsConfig,
        state_dir: Path | None,
        host: str,
        post: Poster = http_post,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.instance = config.instance or host
        self._state_path = state_dir / ALERTS_FILE if state_dir is not None else None
        self._clock = clock
        self._wall = wall
        self._min_rank = Severity(config.min_severity).rank
        saved = (
            load_state(self._state_path, self._min_rank)
            if self._state_path is not None
            else SavedState()
        )
        self.transitions = Transitions(config.for_seconds, saved.firing)
        # Firing alerts that were pushed to the sinks: their resolve is pushed too, whatever
        # their severity by then. An alert is pushed once its severity reaches min_severity.
        self._pushed: set[tuple[str, str]] = set(saved.pushed)
        self.workers: list[SinkWorker] = []
        sinks: list[Sink] = [
            AlertmanagerSink(f"alertmanager[{i}]", am, self.instance, config.resend_seconds)
            for i, am in enumerate(config.alertmanager)
        ]
        sinks += [
            WebhookSink(f"webhook[{i}]", wh, self.instance) for i, wh in enumerate(config.webhook)
        ]
        self._outbox_keys: list[str] = []
        for sink in sinks:
            self.workers.append(
                SinkWorker(sink, config.queue_size, config.max_retry_seconds, post, clock, wall)
            )
            key, n = sink.url, 1
            while key in self._outbox_keys:  # the same URL twice: map them by order
                n += 1
                key = f"{sink.url}#{n}"
            self._outbox_keys.append(key)
        # Messages left undelivered by the previous process go back to the sink with that URL
        # (so a reordered or extended list maps them right); those of a removed sink are lost.
        for w, key in zip(self.workers, self._outbox_keys, strict=True):
            w.restore(saved.outbox.get(key, ()))
        self.removed_dropped = 0
        for key, deliveries in saved.outbox.items():
            if key in self._outbox_keys or not deliveries:
                continue
            self.removed_dropped += len(deliveries)
            log.warning(
                "dropped %d undelivered alert message(s) for %s: no [[alerts.alertmanager]] or "
                "[[alerts.webhook]] has that URL any more",
                len(deliveries),
                key,
            )
        # Alertmanager needs firing alerts refreshed; -inf = send at the first poll (restart).
        self._last_push: dict[tuple[str, str], float] = {
            a.key: float("-inf") for a in self.transitions.firing if a.key in self._pushed
        }
        expired = any(w.dropped for w in self.workers)
        # None: alerts.json does not match memory yet (a message was dropped while loading).
        self._saved_sig: tuple[int, ...] | None = (
            None if expired or self.removed_dropped else self._sig()
        )
        self._save_error: str | None = None

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the sink threads, then save what is still undelivered for the next start."""
        deadline = time.monotonic() + timeout
        kept = self._state_path is not None
        for w in self.workers:
            w.stop(max(0.0, deadline - time.monotonic()), kept=kept)
        if kept:
            self._save()

    def _wanted(self, a: Alert) -> bool:
        return a.finding.severity.rank >= self._min_rank

    def _sig(self) -> tuple[int, ...]:
        return tuple(w.changes for w in self.workers)

    def _push(self, d: Delivery, workers: Iterable[SinkWorker] | None = None) -> None:
        for w in self.workers if workers is None else workers:
            w.put(d)

    def process(self, findings: Iterable[Finding], now: float) -> AlertStats:
        """Update transitions for this poll's findings, log them, queue deliveries, and save
        ``alerts.json`` when the firing set or an outbox changed (at most once per call)."""
        try:
            transitions = self.transitions.update(findings, now)
            mono, wall = self._clock(), self._wall()
            changed = bool(transitions)
            for t in transitions:
                log_transition(t)
                key = t.alert.key
                if t.state == "firing":
                    if not self._wanted(t.alert):
                        continue
                    self._pushed.add(key)
                    self._last_push[key] = mono
                else:
                    # Pushed when it fired (or since): its resolve is, whatever its severity now.
                    if key not in self._pushed:
                        continue
                    self._pushed.discard(key)
                    self._last_push.pop(key, None)
                self._push(Delivery(t.state, t.alert, mono, wall))
            for a in self.transitions.firing:
                if a.key not in self._pushed and self._wanted(a):
                    # Fired below min_severity and has risen to it: announce it now.
                    self._pushed.add(a.key)
                    self._last_push[a.key] = mono
                    self._push(Delivery("firing", a, mono, wall))
                    changed = True
            self._resend(mono, wall)
            if changed or self._sig() != self._saved_sig:
                self._save()
        except Exception:
            log.exception("alert processing failed")
        return self.stats()

    def _resend(self, mono: float, wall: float) -> None:
        ams = [w for w in self.workers if isinstance(w.sink, AlertmanagerSink)]
        for a in self.transitions.firing:
            if a.key not in self._pushed:
                continue
            last = self._last_push.get(a.key, float("-inf"))
            if mono - last >= self.config.resend_seconds:
                self._last_push[a.key] = mono
                self._push(Delivery("firing", a, mono, wall), ams)

    def _save(self) -> None:
        """Write the firing set and every sink's outbox atomically. Never raises."""
        if self._state_path is None:
            return
        sig = self._sig()  # before the snapshot: a change after it is saved next time
        outbox = {
            key: [_delivery_to_json(d) for d in pending]
            for w, key in zip(self.workers, self._outbox_keys, strict=True)
            if (pending := w.pending())
        }
        doc = {
            "version": 1,
            "firing": [
                {**_alert_to_json(a), "pushed": a.key in self._pushed}
                for a in self.transitions.firing
            ],
            "outbox": outbox,
        }
        try:
            self._state_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self._state_path, (json.dumps(doc, indent=1) + "\n").encode())
        except OSError as exc:
            msg = f"cannot write {self._state_path}: {exc.strerror or exc}"
            if msg != self._save_error:
                log.error("%s; a restart may re-announce or lose alerts", msg)
            self._save_error = msg
            return
        if self._save_error:
            log.info("%s written again", self._state_path)
            self._save_error = None
        self._saved_sig = sig

    def stats(self) -> AlertStats:
        sinks = [w.stats() for w in self.workers]
        if self.removed_dropped:
            sinks.append(SinkStats(REMOVED_SINK, dropped=self.removed_dropped))
        return AlertStats(firing=len(self.transitions.firing), sinks=tuple(sinks))
