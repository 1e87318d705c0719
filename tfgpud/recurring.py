"""Failures that recur at every poll or scrape, logged without flooding the journal.

A collector that breaks on some state of the machine breaks again at the next poll: 8,640
tracebacks a day at the default interval, and the Xid thread retries every second. The first
failure is logged with its traceback; the same failure again (same place, same exception type
and message) is counted, and one line a window says how many times it recurred; a different
failure is logged in full at once; the first success after failures says so
(:class:`Recurring`). Trouble that comes in kinds and counts (messages dropped, by reason) is
summed up the same way, a line per window (:class:`Repeats`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_SECONDS = 600.0
MAX_KINDS = 16  # Repeats: kinds logged in full per episode; any further kind is counted as OTHER
OTHER = "other"


@dataclass
class _Run:
    what: str  # "TypeName: message" of the failure that is recurring
    since: float  # clock time of its first occurrence
    count: int = 1  # occurrences, the first included
    told_at: float = 0.0  # clock time of the last line about it
    told_count: int = 1  # ``count`` at that line


class Recurring:
    """Per place (a collector's name, "poll", "metrics"), the failure recurring there."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.WARNING,
        window: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._level = level
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}

    def failed(self, place: str, message: str, exc: BaseException) -> None:
        """Call from an ``except`` block: log ``message`` with the traceback the first time,
        then at most one line a window while the same failure recurs at ``place``."""
        what = f"{type(exc).__name__}: {exc}"
        now = self._clock()
        summary: str | None = None
        with self._lock:
            run = self._runs.get(place)
            if run is None or run.what != what:
                self._runs[place] = _Run(what, now, told_at=now)
            else:
                run.count += 1
                if now - run.told_at < self._window:
                    return
                summary = (
                    f"again {run.count - run.told_count} time(s) in the last "
                    f"{now - run.told_at:.0f} s; {run.count} since it began "
                    f"{now - run.since:.0f} s ago"
                )
                run.told_at, run.told_count = now, run.count
        if summary is None:
            self._log.log(self._level, "%s: %s", message, what, exc_info=exc)
        else:
            self._log.log(self._level, "%s: %s (%s)", message, what, summary)

    def ok(self, place: str) -> None:
        """Call after a success at ``place``: ends a recurring failure there, saying so."""
        if place not in self._runs:  # no lock: the common case costs a dict lookup
            return
        with self._lock:
            run = self._runs.pop(place, None)
        if run is not None:
            self._log.log(
                self._level,
                "%s works again after %d failure(s) in %.0f s (%s)",
                place,
                run.count,
                self._clock() - run.since,
                run.what,
            )


MAX_KINDS = 16  # kinds logged in full per episode; any further kind is counted as OTHER
OTHER = "other"


class Repeats:
    """Trouble that lasts and comes in kinds (messages a sink down for days drops, by reason):
    the first occurrence of each kind is logged in full, the rest counted, and one line per
    window sums them up. An episode begins with the first occurrence and ends at :meth:`end`
    (the trouble is over) or after a window in which nothing was counted.

    The caller logs an occurrence in full when :meth:`note` says so, and one summary line when
    :meth:`due` returns counts. Bounded: at most ``MAX_KINDS`` kinds (+ ``OTHER``) are kept.
    """

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        self._ends: float | None = None  # when the open window ends; None: no episode
        self._seen: set[str] = set()  # kinds logged in full in this episode
        self._counts: dict[str, int] = {}  # occurrences not summed up yet, by kind

    @property
    def active(self) -> bool:
        """True from the first occurrence until the episode ends."""
        return self._ends is not None

    def note(self, kind: str, now: float, n: int = 1) -> bool:
        """Record ``n`` occurrences of ``kind`` at ``now``. True: the caller logs them in full
        (the first of their kind in this episode); False: they are counted for :meth:`due`."""
        if self._ends is not None and now >= self._ends and not self._counts:
            self.end()  # a window passed with nothing counted: this is a new episode
        if self._ends is None:
            self._ends = now + self.window
        if kind not in self._seen and len(self._seen) < MAX_KINDS:
            self._seen.add(kind)
            return True
        key = kind if kind in self._seen else OTHER
        self._counts[key] = self._counts.get(key, 0) + n
        return False

    def due(self, now: float) -> dict[str, int]:
        """The counts for one summary line once the window has ended with something counted
        (the next window opens then); {} otherwise."""
        if self._ends is None or now < self._ends or not self._counts:
            return {}
        counts, self._counts = self._counts, {}
        self._ends = now + self.window
        return counts

    def end(self) -> dict[str, int]:
        """End the episode: the next occurrence is logged in full again. Returns what was
        counted and not summed up yet."""
        counts, self._counts = self._counts, {}
        self._ends = None
        self._seen.clear()
        return counts
