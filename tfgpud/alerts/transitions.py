"""Findings -> firing/resolved transitions (damped by ``[alerts] for_seconds``) and the journal.

A finding fires once it has held for ``for_seconds`` and resolves once it has been gone that
long, so a finding that flickers for less than that never pages anyone. Every transition is
logged with journal fields ``MESSAGE_ID`` (one fixed id per finding code, from
:mod:`tfgpud.codes`), ``FINDING_CODE``, ``SEVERITY``, ``SUBJECT`` and ``ALERT_STATE``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from tfgpud.codes import message_id
from tfgpud.model import Finding, Severity, to_jsonable

log = logging.getLogger("tfgpud.alerts")


@dataclass(frozen=True)
class Alert:
    """A finding that fired. ``starts_at``: when it first appeared; ``ends_at``: when it went."""

    finding: Finding
    starts_at: float
    ends_at: float | None = None
    # When it fired (held for_seconds); the alert as labelled now, after a cause changed.
    fired_at: float | None = None

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

    def carry(self, old: Transitions) -> None:
        """Take over ``old``'s timers (a reload rebuilt this from the firing set alone): a
        finding pending there keeps the time it appeared, and a firing alert whose finding is
        gone keeps the time it went, so neither waits ``for_seconds`` anew."""
        for key, since in old._pending.items():
            if key not in self._firing:
                self._pending.setdefault(key, since)
        for key, fs in self._firing.items():
            before = old._firing.get(key)
            if before is not None and fs.absent_since is None:
                fs.absent_since = before.absent_since

    def refire(self, key: tuple[str, str], now: float) -> None:
        """Record that the alert of ``key`` fired again, as a new alert, at ``now`` (its labels
        changed); it keeps the time its finding appeared."""
        fs = self._firing.get(key)
        if fs is not None:
            fs.alert = replace(fs.alert, fired_at=now)

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
                alert = Alert(finding, starts_at=since, fired_at=now)
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


def finding_fields(f: Finding) -> dict[str, Any]:
    return cast(dict[str, Any], to_jsonable(f))
