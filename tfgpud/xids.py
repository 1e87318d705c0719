"""Xid codes: the table tfgpud knows, and the bounded log of the events received.

What findings and metrics rely on is kept per GPU and per code, never in one ring shared by all
GPUs: a burst of harmless Xids on one GPU cannot push out a critical one on another, and
``gpu-xid-critical``'s "in the last hour" holds for the full hour after the last event. An Xid
outside the table is counted under one key, ``"other"``, so the label values of
``tfgpud_gpu_xid_errors_total`` stay bounded whatever the driver sends (the exact value is in
the journal: a line for the first event of each GPU and code in a minute, then one line a minute
summing up the rest, see :class:`XidLogLines`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from tfgpud.model import OTHER_XID, XidCode, XidEvent


@dataclass(frozen=True)
class XidInfo:
    meaning: str
    kind: Literal["critical", "warning", "application"]


# docs/diagnosis-facts.md: the Xids worth a person, the warning one, and the application-level
# Xids health checkers usually ignore.
KNOWN_XIDS: Mapping[int, XidInfo] = MappingProxyType(
    {
        13: XidInfo("graphics engine exception (application error)", "application"),
        31: XidInfo("GPU memory page fault (application error)", "application"),
        43: XidInfo("GPU stopped processing (application error)", "application"),
        45: XidInfo("preemptive cleanup after an application error", "application"),
        48: XidInfo("double-bit ECC error", "critical"),
        62: XidInfo("internal micro-controller halt", "critical"),
        64: XidInfo("ECC page retirement / row remapping failure", "critical"),
        68: XidInfo("video processor exception (application error)", "application"),
        74: XidInfo("NVLink error", "critical"),
        79: XidInfo("GPU has fallen off the bus", "critical"),
        94: XidInfo("contained ECC error", "warning"),
        95: XidInfo("uncontained ECC error", "critical"),
        109: XidInfo("context switch timeout (application error)", "application"),
        119: XidInfo("GSP RPC timeout", "critical"),
        120: XidInfo("GSP firmware error", "critical"),
    }
)

# Events kept per (GPU, code): the latest is always among them, so a window measured from the
# last event is exact; the others are evidence (a finding shows up to this many).
EVENTS_PER_CODE = 10
# GPUs whose Xids are kept; past this the GPU whose latest Xid is oldest is forgotten.
MAX_GPUS = 64


def xid_code(xid: int) -> XidCode:
    """The key an Xid is counted under: itself when known, else ``"other"``."""
    return xid if xid in KNOWN_XIDS else OTHER_XID


@dataclass(frozen=True)
class XidView:
    """What the log held at one moment: counts per (uuid, code) and the kept events."""

    counts: Mapping[tuple[str, XidCode], int]
    events: tuple[XidEvent, ...]  # oldest first


class XidLog:
    """Xid events per GPU and per code, bounded: at most ``max_gpus`` GPUs, each with one count
    and the last ``per_code`` events for each known code and for ``"other"``. Thread-safe: the
    Xid thread records, the poll reads :meth:`view` (the same object until something changes).
    """

    def __init__(self, per_code: int = EVENTS_PER_CODE, max_gpus: int = MAX_GPUS) -> None:
        self._per_code = per_code
        self._max_gpus = max_gpus
        self._lock = threading.Lock()
        # uuid -> code -> (count, last events); ordered by the GPU's latest event, oldest first
        self._gpus: OrderedDict[str, dict[XidCode, tuple[int, deque[XidEvent]]]] = OrderedDict()
        self._view: XidView | None = XidView(MappingProxyType({}), ())

    def record(self, uuid: str, xid: int, at: float) -> None:
        with self._lock:
            codes = self._gpus.get(uuid)
            if codes is None:
                codes = self._gpus[uuid] = {}
                while len(self._gpus) > self._max_gpus:
                    self._gpus.popitem(last=False)
            self._gpus.move_to_end(uuid)
            code = xid_code(xid)
            count, kept = codes.get(code) or (0, deque(maxlen=self._per_code))
            kept.append(XidEvent(uuid=uuid, xid=xid, at=at))
            codes[code] = (count + 1, kept)
            self._view = None  # built by the next view(): a burst costs one build, not one each

    def view(self) -> XidView:
        with self._lock:
            if self._view is None:
                self._view = self._build()
            return self._view

    def _build(self) -> XidView:
        counts = {(u, c): n for u, codes in self._gpus.items() for c, (n, _) in codes.items()}
        events = [e for codes in self._gpus.values() for _, kept in codes.values() for e in kept]
        events.sort(key=lambda e: e.at)
        return XidView(MappingProxyType(counts), tuple(events))


# An Xid gets a journal line of its own at most once per (GPU, code) in this long; the events
# in between are counted, and one line sums them up when the window has passed.
LOG_WINDOW_SECONDS = 60.0
# Exact values an "other" summary names (the rest are counted).
LOG_VALUES_NAMED = 8


@dataclass
class _Window:
    ends: float
    more: int = 0
    values: tuple[int, ...] = ()  # exact Xid values among the ``more`` (bounded)


class XidLogLines:
    """Which Xid events get a journal line: an Xid storm (a job hitting Xid 13 hundreds of
    times a second) must not flood the journal, and no event may go unmentioned.

    :meth:`event` returns the line for the first event of a (GPU, code) in a window of
    ``window`` seconds (None for the others: they are counted); :meth:`due` returns one line
    per window that ended with events counted, and opens a new window for it. Bounded: a key
    is kept only while its window is open, and codes are keyed as :func:`xid_code` keys them.
    """

    def __init__(self, window: float = LOG_WINDOW_SECONDS) -> None:
        self._window = window
        self._open: dict[tuple[str, XidCode], _Window] = {}

    def event(self, uuid: str, xid: int, now: float) -> str | None:
        key = (uuid, xid_code(xid))
        w = self._open.get(key)
        if w is not None and now < w.ends:
            w.more += 1
            if xid not in w.values and len(w.values) < LOG_VALUES_NAMED:
                w.values = (*w.values, xid)
            return None
        self._open[key] = _Window(ends=now + self._window)
        info = KNOWN_XIDS.get(xid)
        return f"Xid {xid} on GPU {uuid}" + (f" ({info.meaning})" if info is not None else "")

    def due(self, now: float) -> list[tuple[str, str]]:
        """(uuid, line) for each window that has ended with events counted in it."""
        lines = []
        for key, w in list(self._open.items()):
            if now < w.ends:
                continue
            if not w.more:
                del self._open[key]
                continue
            uuid, code = key
            what = f"Xid {code}" if code != OTHER_XID else "Xids outside the known table"
            values = ""
            if code == OTHER_XID:
                values = " (" + ", ".join(map(str, sorted(w.values)))
                values += ", …)" if len(w.values) == LOG_VALUES_NAMED else ")"
            lines.append(
                (
                    uuid,
                    f"{what} on GPU {uuid}: {w.more} more{values} in the last "
                    f"{self._window:.0f} s, not logged one by one",
                )
            )
            self._open[key] = _Window(ends=now + self._window)
        return lines
