"""The alert path of one poll: transitions, the journal, the sinks and ``alerts.json``.

``AlertDispatcher.process()`` is called once per poll and never blocks: each sink has its own
bounded queue and thread, so a receiver that hangs or fails costs the poll loop nothing.
Transitions at or above ``[alerts] min_severity`` are pushed. Messages for a sink whose URL is
no longer configured are dropped at the next start, counted (sink ``removed``) and logged.
Should the outboxes together outgrow what ``alerts.json`` may hold, the oldest messages are
dropped (counted by their sink) so that the next start can read it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from tfgpud.alerts import store
from tfgpud.alerts.sinks import (
    AlertmanagerSink,
    Delivery,
    Poster,
    Sink,
    SinkWorker,
    WebhookSink,
    http_post,
)
from tfgpud.alerts.store import ALERTS_FILE, SavedState, load_state
from tfgpud.alerts.transitions import Alert, Transitions, log_transition
from tfgpud.config import AlertsConfig
from tfgpud.model import AlertStats, Finding, Severity, SinkStats
from tfgpud.recurring import Recurring

log = logging.getLogger("tfgpud.alerts")

REMOVED_SINK = "removed"  # SinkStats name counting messages left for sinks no longer configured
SAVE_TRIES = 3  # snapshots taken to fit alerts.json (a sink's thread may take messages meanwhile)


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
        # The cause each pushed alert carries (its labels), and since when its finding has named
        # another one (the relabel is damped like a new finding).
        self._shown: dict[tuple[str, str], str | None] = {
            a.key: a.finding.cause for a in self.transitions.firing if a.key in self._pushed
        }
        self._relabel_since: dict[tuple[str, str], float] = {}
        # id(worker) -> (worker, messages of this poll), handed over by _send()
        self._outgoing: dict[int, tuple[SinkWorker, list[Delivery]]] = {}
        expired = any(w.dropped for w in self.workers)
        # None: alerts.json does not match memory yet (a message was dropped while loading).
        self._saved_sig: tuple[int, ...] | None = (
            None if expired or self.removed_dropped else self._sig()
        )
        self._save_error: str | None = None
        self._failures = Recurring(log, logging.ERROR, clock=self._clock)

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
            self._outgoing.setdefault(id(w), (w, []))[1].append(d)

    def _send(self) -> None:
        """Hand this poll's messages to each sink at once, root causes first: Alertmanager
        notifies an alert that began before group_wait at once, so a consequence must not
        arrive before the cause that inhibits it."""
        for w, ds in self._outgoing.values():
            w.put_all(
                sorted(ds, key=lambda d: d.state == "firing" and d.alert.finding.cause is not None)
            )
        self._outgoing.clear()

    def process(self, findings: Iterable[Finding], now: float) -> AlertStats:
        """Update transitions for this poll's findings, log them, queue deliveries, and save
        ``alerts.json`` when the firing set or an outbox changed (at most once per call)."""
        try:
            findings = tuple(findings)
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
                    self._shown[key] = t.alert.finding.cause
                    self._last_push[key] = mono
                    alert = t.alert
                else:
                    # Pushed when it fired (or since): its resolve is, whatever its severity now.
                    if key not in self._pushed:
                        continue
                    alert = self._as_shown(t.alert)
                    self._pushed.discard(key)
                    self._forget(key)
                self._push(Delivery(t.state, alert, mono, wall))
            for a in self.transitions.firing:
                if a.key not in self._pushed and self._wanted(a):
                    # Fired below min_severity and has risen to it: announce it now.
                    self._pushed.add(a.key)
                    self._shown[a.key] = a.finding.cause
                    self._last_push[a.key] = mono
                    self._push(Delivery("firing", a, mono, wall))
                    changed = True
            changed |= self._relabel({f.key for f in findings}, now, mono, wall)
            self._resend(mono, wall)
            self._send()
            if changed or self._sig() != self._saved_sig:
                self._save()
        except Exception as exc:  # noqa: BLE001 - the poll loop goes on; logged by Recurring
            # At every poll: the traceback once, then one line a window with the count.
            self._failures.failed("alert processing", "alert processing failed", exc)
            self._send()
        else:
            self._failures.ok("alert processing")
        return self.stats()

    def _as_shown(self, a: Alert) -> Alert:
        """``a`` with the cause its pushed alert carries (a new cause shows once it has held)."""
        shown = self._shown.get(a.key, a.finding.cause)
        return (
            a if shown == a.finding.cause else replace(a, finding=replace(a.finding, cause=shown))
        )

    def _forget(self, key: tuple[str, str]) -> None:
        self._last_push.pop(key, None)
        self._shown.pop(key, None)
        self._relabel_since.pop(key, None)

    def _relabel(self, present: set[tuple[str, str]], now: float, mono: float, wall: float) -> bool:
        """Pushed alerts whose cause changed (it appeared, or cleared first) and has stayed so
        for ``for_seconds``: their labels change, and Alertmanager keys alerts by labels, so the
        alert as it was labelled resolves and the alert as it is now fires (a consequence whose
        cause cleared pages on its own). Damped like a new finding: a consequence that outlives
        its cause by a moment (an env's probe not yet repeated after the driver came back) never
        pages. A finding gone (resolving) keeps its labels."""
        changed = False
        for a in self.transitions.firing:
            key, cause = a.key, a.finding.cause
            if (
                key not in present
                or key not in self._pushed
                or self._shown.get(key, cause) == cause
            ):
                self._relabel_since.pop(key, None)
                continue
            since = self._relabel_since.setdefault(key, now)
            if now - since < self.config.for_seconds:
                continue
            old = self._as_shown(a)
            log.info(
                "%s (%s): %s",
                a.finding.code,
                a.finding.subject,
                f"a consequence of {cause} now"
                if cause
                else f"no longer a consequence of {old.finding.cause}",
            )
            self._push(Delivery("resolved", replace(old, ends_at=now), mono, wall))
            self._push(Delivery("firing", replace(a, fired_at=now), mono, wall))
            self.transitions.refire(key, now)
            self._shown[key] = cause
            del self._relabel_since[key]
            self._last_push[key] = mono
            changed = True
        return changed

    def _resend(self, mono: float, wall: float) -> None:
        refreshed = [w for w in self.workers if w.sink.resends_firing]
        for a in self.transitions.firing:
            if a.key not in self._pushed:
                continue
            last = self._last_push.get(a.key, float("-inf"))
            if mono - last >= self.config.resend_seconds:
                self._last_push[a.key] = mono
                self._push(Delivery("firing", self._as_shown(a), mono, wall), refreshed)

    def _save(self) -> None:
        """Write the firing set and every sink's outbox atomically, dropping the oldest queued
        messages first should they not fit in what a start reads. Never raises."""
        if self._state_path is None:
            return
        for _ in range(SAVE_TRIES):
            sig = self._sig()  # before the snapshot: a change after it is saved next time
            outbox = {
                key: pending
                for w, key in zip(self.workers, self._outbox_keys, strict=True)
                if (pending := w.pending())
            }
            data = store.encode_state(self.transitions.firing, self._pushed, outbox)
            excess = len(data) - store.MAX_STATE_BYTES
            if excess <= 0 or not self._make_room(excess):
                break
        try:
            store.write_state(self._state_path, data)
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

    def _make_room(self, excess: int) -> bool:
        """Drop the oldest queued messages, whichever their sink, that take at least ``excess``
        bytes of ``alerts.json``. False when none could be dropped (all in flight, or the
        firing set alone is too large)."""
        queued = [(d.created_at or 0.0, w, d) for w in self.workers for d in w.queued()]
        queued.sort(key=lambda q: q[0])
        chosen: dict[int, tuple[SinkWorker, list[Delivery]]] = {}
        freed = 0
        for _, w, d in queued:
            if freed >= excess:
                break
            chosen.setdefault(id(w), (w, []))[1].append(d)
            freed += store.delivery_bytes(d)
        return sum(w.evict(ds) for w, ds in chosen.values()) > 0

    def stats(self) -> AlertStats:
        sinks = [w.stats() for w in self.workers]
        if self.removed_dropped:
            sinks.append(SinkStats(REMOVED_SINK, dropped=self.removed_dropped))
        return AlertStats(firing=len(self.transitions.firing), sinks=tuple(sinks))
