"""The wrapper every collector runs behind: it times the call and never lets it raise."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from tfgpud.model import CollectorRun
from tfgpud.recurring import Recurring

T = TypeVar("T")
log = logging.getLogger(__name__)
_failures = Recurring(log)  # a collector failing at every poll: one traceback, then a count


def timed(name: str, fn: Callable[[], T]) -> tuple[T | None, CollectorRun]:
    """Run ``fn``; return its result (None on failure) and a CollectorRun. Never raises.

    A collector reports an unhealthy *subject* (driver missing, GPU lost) in its result and
    still succeeds; success 0 means the collector itself broke (a bug or an unexpected OS error).
    """
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - logged by Recurring
        duration = time.perf_counter() - start
        _failures.failed(name, f"collector {name} failed", exc)
        return None, CollectorRun(name, False, duration, f"{type(exc).__name__}: {exc}")
    _failures.ok(name)
    return result, CollectorRun(name, True, time.perf_counter() - start)
