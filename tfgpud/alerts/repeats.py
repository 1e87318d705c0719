"""Journal lines for trouble that lasts: a sink down for a week, a poll that fails the same way
each time. The first occurrence of each kind is logged in full; the rest are counted, and one
line per window sums them up, so the journal says what happened without a line per message.
"""

from __future__ import annotations

SUMMARY_WINDOW_SECONDS = 600.0
MAX_KINDS = 16  # kinds logged in full per episode; any further kind is counted as OTHER
OTHER = "other"


class Repeats:
    """Counts occurrences of trouble by kind. An episode begins with the first occurrence and
    ends at :meth:`end` (the trouble is over) or after a window in which nothing was counted.

    The caller logs an occurrence in full when :meth:`note` says so, and one summary line when
    :meth:`due` returns counts. Bounded: at most ``MAX_KINDS`` kinds (+ ``OTHER``) are kept.
    """

    def __init__(self, window: float = SUMMARY_WINDOW_SECONDS) -> None:
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
