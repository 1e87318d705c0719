"""``<state_dir>/alerts.json``: the firing set and each sink's undelivered messages.

It keeps the firing set (with whether each alert was pushed) and each sink's outbox (messages
not delivered yet, keyed by the sink's URL, with the wall-clock time they were first queued).
The dispatcher rewrites it atomically at most once per poll when either changed, and at stop, so
a restart or a reload neither re-fires nor forgets alerts. It is never written larger than
``MAX_STATE_BYTES``, the most a start reads: the dispatcher drops the oldest undelivered
messages first (counted) rather than write a file the next start would refuse whole.
"""

from __future__ import annotations

import errno
import json
import logging
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tfgpud.alerts.sinks import Delivery
from tfgpud.alerts.transitions import Alert, finding_fields
from tfgpud.model import Finding, Severity
from tfgpud.state import StateFileError, read_bounded, write_atomically

log = logging.getLogger("tfgpud.alerts")

ALERTS_FILE = "alerts.json"
# The most a start reads (a larger file was not written by tfgpud and is not read into memory);
# writes keep within it. At 0.5-2 KB per message that is some 30,000-130,000 messages in all.
MAX_STATE_BYTES = 64 << 20


def _alert_to_json(a: Alert) -> dict[str, Any]:
    doc = {**finding_fields(a.finding), "starts_at": a.starts_at}
    if a.ends_at is not None:
        doc["ends_at"] = a.ends_at
    if a.fired_at is not None:
        doc["fired_at"] = a.fired_at
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
        cause=_code_or_none(d.get("cause")),
    )
    ends, fired = d.get("ends_at"), d.get("fired_at")
    return Alert(
        finding,
        starts_at=_finite(d["starts_at"]),
        ends_at=None if ends is None else _finite(ends),
        fired_at=None if fired is None else _finite(fired),
    )


def _code_or_none(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"expected a finding code, got {value!r}")
    return value


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
        doc = json.loads(read_bounded(path, MAX_STATE_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, StateFileError) as exc:
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


def _delivery_to_json(d: Delivery) -> dict[str, Any]:
    return {"state": d.state, "created_at": d.created_at, "alert": _alert_to_json(d.alert)}


def _delivery_from_json(e: Any) -> Delivery:
    if not isinstance(e, dict) or e.get("state") not in ("firing", "resolved"):
        raise ValueError(f"not a queued alert message: {e!r}")
    return Delivery(e["state"], _alert_from_json(e["alert"]), 0.0, _finite(e["created_at"]))


def delivery_bytes(d: Delivery) -> int:
    """At most what leaving ``d`` out of an outbox saves in ``alerts.json`` (the file is
    indented: its entries take more than this compact form and a separator)."""
    return len(json.dumps(_delivery_to_json(d))) + 1


def encode_state(
    firing: Iterable[Alert],
    pushed: Collection[tuple[str, str]],
    outbox: Mapping[str, Iterable[Delivery]],
) -> bytes:
    """The bytes of ``alerts.json`` holding these (see :func:`write_state`)."""
    doc = {
        "version": 1,
        "firing": [{**_alert_to_json(a), "pushed": a.key in pushed} for a in firing],
        "outbox": {key: [_delivery_to_json(d) for d in ds] for key, ds in outbox.items()},
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


def write_state(path: Path, data: bytes) -> None:
    """Write ``data`` (from :func:`encode_state`) to ``path`` atomically. Raises OSError when it
    cannot be written, ``EFBIG`` when it is larger than a start reads (the old file stays)."""
    if len(data) > MAX_STATE_BYTES:
        raise OSError(
            errno.EFBIG,
            f"{len(data)} bytes, more than the {MAX_STATE_BYTES} a start reads",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)
