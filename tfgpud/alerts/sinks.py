"""Where alerts go: a :class:`Sink` says how to address and render messages; a
:class:`SinkWorker` delivers them to it from its own bounded queue and thread.

Alertmanager (API v2; firing alerts re-sent every ``resend_seconds``) and generic JSON webhooks
(one POST per transition). A message that cannot be delivered is retried with exponential backoff
(1 s doubling to 60 s) for up to ``max_retry_seconds`` from when it was first queued, then
dropped and counted (``tfgpud_alerts_dropped_total``): nothing older is ever sent, whether it
is retried or still waits behind others. A redirect (3xx) is a failed delivery: urllib would
turn the POST into a body-less GET.

A sink down for days must not flood the journal: the first failure and the first message
dropped for each reason are logged, then one line per ``WINDOW_SECONDS`` (10 min) counts the
rest, and the line saying the sink works again sums up the outage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.message import Message
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from typing import Any, Protocol

from tfgpud.alerts.transitions import Alert, State, finding_fields
from tfgpud.codes import alert_name, cause_labels, message_id
from tfgpud.config import AlertmanagerConfig, WebhookConfig
from tfgpud.model import SinkStats
from tfgpud.recurring import WINDOW_SECONDS, Repeats

log = logging.getLogger("tfgpud.alerts")

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
AM_BATCH = 64  # alerts per Alertmanager POST

# Why a message was dropped (the kinds of SinkWorker's journal lines and their counts).
FULL, EXPIRED, TOO_BIG = "full", "expired", "too-big"


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Delivery:
    """One message waiting for a sink."""

    state: State
    alert: Alert
    created: float  # monotonic time it was queued (in this process: the retry bound)
    created_at: float | None = None  # wall-clock time it was first queued (kept across restarts)


@dataclass
class Request:
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class Sink(Protocol):
    """What a SinkWorker needs from a receiver: where it is, how messages coalesce, how a batch
    becomes one HTTP request, and whether firing alerts are re-sent while they last."""

    name: str
    url: str  # where messages go; also the key of its outbox in alerts.json
    timeout: float
    batch: int  # messages per request
    resends_firing: bool  # True: every firing alert is re-sent each [alerts] resend_seconds

    def queue_key(self, d: Delivery) -> tuple[Any, ...]:
        """Messages with the same key replace each other in the queue (the newest wins)."""
        ...

    def render(self, batch: list[Delivery], now: float) -> Request:
        """The request that delivers ``batch`` (at most ``batch`` messages)."""
        ...


class AlertmanagerSink:
    """``POST /api/v2/alerts``. Only the newest state of an alert is worth delivering; firing
    alerts are refreshed, so Alertmanager resolves them by itself if the daemon dies."""

    def __init__(self, name: str, cfg: AlertmanagerConfig, instance: str, resend: float) -> None:
        self.name = name
        self.timeout = cfg.timeout_seconds
        self.url = cfg.url.rstrip("/") + "/api/v2/alerts"
        self.instance = instance
        self.valid_for = 4 * resend  # Alertmanager resolves it by itself if refreshes stop
        self.batch = AM_BATCH
        self.resends_firing = True

    def queue_key(self, d: Delivery) -> tuple[Any, ...]:
        # The cause is part of the alert's identity in Alertmanager (its labels): a resolve of
        # the alert as it was labelled must not be replaced by the alert as it is now.
        return (*d.alert.key, d.alert.finding.cause)

    def render(self, batch: list[Delivery], now: float) -> Request:
        return Request(
            self.url,
            json.dumps([am_alert(d, self.instance, now, self.valid_for) for d in batch]).encode(),
            {"Content-Type": "application/json"},
        )


def am_alert(d: Delivery, instance: str, now: float, valid_for: float) -> dict[str, Any]:
    """One Alertmanager v2 ``postableAlert``. ``host`` repeats ``instance``: the label the
    Prometheus rules' alerts carry too (from ``tfgpud_finding``), which inhibit rules match on.
    ``startsAt`` is when it fired: Alertmanager notifies an alert that began more than
    group_wait ago at once, before the cause sent with it can inhibit it."""
    f = d.alert.finding
    ends = d.alert.ends_at if d.state == "resolved" and d.alert.ends_at else now + valid_for
    return {
        "labels": {
            "alertname": alert_name(f.code),
            "severity": f.severity.value,
            "instance": instance,
            "host": instance,
            "code": f.code,
            "subject": f.subject,
            **cause_labels(f.code, f.cause),
            "origin": "tfgpud",
        },
        "annotations": {
            "summary": f.summary,
            "description": "\n".join([f.summary, *_explained(f.cause), *f.evidence]),
            "fix": f.fix,
        },
        "startsAt": rfc3339(d.alert.fired_at or d.alert.starts_at),
        "endsAt": rfc3339(ends),
    }


def _explained(cause: str | None) -> list[str]:
    if cause is None:
        return []
    return [f"A consequence of {cause}: it pages as {alert_name(cause)}, not on its own."]


class WebhookSink:
    """One JSON POST per transition (nothing is coalesced: each is an event)."""

    def __init__(self, name: str, cfg: WebhookConfig, instance: str) -> None:
        self.name = name
        self.timeout = cfg.timeout_seconds
        self.url = cfg.url
        self.headers = {"Content-Type": "application/json", **cfg.headers}
        self.instance = instance
        self.batch = 1
        self.resends_firing = False

    def queue_key(self, d: Delivery) -> tuple[Any, ...]:
        return (*d.alert.key, d.state, d.alert.starts_at)

    def render(self, batch: list[Delivery], now: float) -> Request:
        return Request(
            self.url, json.dumps(webhook_event(batch[0], self.instance)).encode(), self.headers
        )


def webhook_event(d: Delivery, instance: str) -> dict[str, Any]:
    """The generic webhook body (documented in README.md). ``cause`` and ``role`` as in the
    Alertmanager labels: a receiver that pages should skip ``role == "consequence"``."""
    a, f = d.alert, d.alert.finding
    return {
        "version": 1,
        "status": d.state,
        "alertname": alert_name(f.code),
        "instance": instance,
        **finding_fields(f),
        **cause_labels(f.code, f.cause),
        "starts_at": rfc3339(a.starts_at),
        "ends_at": rfc3339(a.ends_at) if d.state == "resolved" and a.ends_at else None,
        "message_id": message_id(f.code),
    }


def http_post(req: Request, timeout: float) -> None:
    """POST ``req`` and read the answer, all within ``timeout`` seconds: connecting, sending and
    the whole answer. A receiver that accepts and then trickles its answer a byte at a time is
    cut at that deadline (a socket timeout alone applies to each read, so it would never be).

    Raises ``urllib.error.URLError`` (an ``OSError``) on any failure: the deadline, a refused or
    reset connection, a malformed answer; ``urllib.error.HTTPError`` for any non-2xx answer. A
    redirect is a failure too, not followed (a POST re-sent as a GET would be lost): the error
    names where it pointed.
    """
    url = urllib.parse.urlsplit(req.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise urllib.error.URLError(f"not an http(s) URL: {req.url}")
    conn_class = HTTPSConnection if url.scheme == "https" else HTTPConnection
    conn = conn_class(url.hostname, url.port, timeout=timeout)
    expired = threading.Event()

    def cut() -> None:  # on the timer's thread: unblocks whatever read or write is waiting
        expired.set()
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(timeout, cut)
    timer.daemon = True
    timer.start()
    try:
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        conn.request("POST", target, body=req.body, headers=req.headers)
        resp = conn.getresponse()
        resp.read(65536)
        status, reason, location = resp.status, resp.reason, resp.getheader("Location")
    except (OSError, HTTPException) as exc:
        if expired.is_set():
            raise urllib.error.URLError(
                f"no complete answer within {timeout:g} s (the receiver stalls or trickles)"
            ) from exc
        raise urllib.error.URLError(str(exc) or type(exc).__name__) from exc
    finally:
        timer.cancel()
        conn.close()
    if expired.is_set():  # the answer ended exactly as the deadline cut it: not trusted
        raise urllib.error.URLError(f"no complete answer within {timeout:g} s")
    if 300 <= status < 400:
        msg = (
            f"HTTP {status} {reason}: redirected to {urllib.parse.urljoin(req.url, location or '')}"
            " (not followed: set the sink's url to the final address)"
        )
        raise urllib.error.HTTPError(req.url, status, msg, Message(), None)
    if not 200 <= status < 300:
        raise urllib.error.HTTPError(req.url, status, f"HTTP {status} {reason}", Message(), None)


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
        self._losses = Repeats(WINDOW_SECONDS)  # messages dropped, for the journal
        self._down_since = 0.0  # when the current run of failed attempts began
        self._failures = 0  # failed attempts in that run

    def put(self, d: Delivery) -> None:
        """Queue ``d`` (replacing an older message for the same key). Never blocks for long."""
        self.put_all([d])

    def put_all(self, deliveries: Iterable[Delivery]) -> None:
        """Queue ``deliveries`` in order, at once: the thread takes them together, so one poll's
        alerts reach the receiver in as few requests as the batch size allows."""
        with self._cond:
            now = self._clock()
            for d in deliveries:
                if d.created_at is None:
                    d = replace(d, created_at=self._wall() - max(0.0, now - d.created))
                key = self.sink.queue_key(d)
                if key in self._queue:
                    del self._queue[key]  # superseded, not lost: the newer message says more
                elif len(self._queue) >= self.queue_size:
                    self._queue.popitem(last=False)
                    self._lost(FULL, 1, now)
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

    def queued(self) -> list[Delivery]:
        """The messages waiting in the queue (not the ones being tried), oldest first."""
        with self._cond:
            return list(self._queue.values())

    def evict(self, deliveries: Iterable[Delivery]) -> int:
        """Drop these messages from the queue (the oldest, when the outboxes together would not
        fit in ``alerts.json``), counted and logged. A message no longer queued (taken by the
        thread, superseded) is left alone. Returns how many were dropped."""
        with self._cond:
            n = 0
            for d in deliveries:
                key = self.sink.queue_key(d)
                if self._queue.get(key) is d:
                    del self._queue[key]
                    n += 1
            if n:
                self._lost(TOO_BIG, n, self._clock())
            return n

    def pending(self) -> list[Delivery]:
        """The undelivered messages, oldest first: the one being tried, then the queue."""
        with self._cond:
            queued = list(self._queue.values())
            keys = set(self._queue)
            inflight = [d for d in self._inflight if self.sink.queue_key(d) not in keys]
            return inflight + queued

    def stats(self) -> SinkStats:
        """The counters (read at every poll, which also sums up drops counted since the last
        line once its window has passed, on a sink that is working as on one that is not)."""
        with self._cond:
            self._sum_up(self._losses.due(self._clock()))
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
        with self._cond:
            self._sum_up(self._losses.end())
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
                now = self._clock()
                wait = self._next_try - now
                if self._queue and wait <= 0 and (batch := self._next_batch(now)):
                    return batch
                self._cond.wait(wait if self._queue else None)

    def _next_batch(self, now: float) -> list[Delivery]:
        """(Holding the lock.) Take the oldest messages, at most a batch, as in flight. Those
        older than ``max_retry_seconds`` are dropped on the way: the queue is in the order messages
        were queued, so after a long outage every stale one goes at the first attempt, unsent."""
        batch: list[Delivery] = []
        expired = 0
        while self._queue and len(batch) < self.sink.batch:
            d = self._queue.popitem(last=False)[1]
            if now - d.created >= self.max_retry_seconds:
                expired += 1
            else:
                batch.append(d)
        if expired:
            self._lost(EXPIRED, expired, now)
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
                now = self._clock()
                gone = self._losses.end()
                log.info(
                    "alerts to %s delivered again, after %d failed attempt(s) in %.0f s%s",
                    self.sink.name,
                    self._failures,
                    now - self._down_since,
                    f"; since the last line, {self._tally(gone)}" if gone else "",
                )
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
            if first:
                self._down_since, self._failures = now, 0
            self._failures += 1
            self._backoff = min(2 * self._backoff or BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS)
            self._next_try = now + self._backoff
            keep = [d for d in batch if now - d.created < self.max_retry_seconds]
            if expired := len(batch) - len(keep):
                self._lost(EXPIRED, expired, now)
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
            if overflow:
                self._lost(FULL, overflow, now)
            self._sum_up(self._losses.due(now))
        if first:
            log.warning(
                "cannot deliver %d alert message(s) to %s (%s): %s; retrying with backoff "
                "for up to %.0f s",
                len(batch),
                self.sink.name,
                self.sink.url,
                getattr(exc, "reason", None) or exc,
                self.max_retry_seconds,
            )

    def _lost(self, why: str, n: int, now: float) -> None:
        """(Holding the lock.) Count ``n`` messages dropped for reason ``why``; the first of
        each reason in an episode gets a journal line, the rest are summed up per window."""
        self.dropped += n
        self.changes += 1
        if self._losses.note(why, now, n):
            log.warning(
                "%s (%s): %s; further drops are summed up every %.0f s",
                self.sink.name,
                self.sink.url,
                self._tally({why: n}),
                self._losses.window,
            )
        self._sum_up(self._losses.due(now))

    def _sum_up(self, counts: dict[str, int]) -> None:
        if counts:
            log.warning(
                "%s (%s): since the last line, %s",
                self.sink.name,
                self.sink.url,
                self._tally(counts),
            )

    def _tally(self, counts: dict[str, int]) -> str:
        """``{FULL: 3, EXPIRED: 2}`` in words."""
        why = {
            FULL: f"the queue was full (queue_size {self.queue_size})",
            EXPIRED: "undeliverable for max_retry_seconds "
            f"({self.max_retry_seconds:.0f} s) since queued",
            TOO_BIG: "the oldest of all sinks' messages, to keep alerts.json within the size a "
            "start reads",
        }
        return "; ".join(
            f"dropped {counts[kind]} alert message(s): {text}"
            for kind, text in why.items()
            if counts.get(kind)
        )
