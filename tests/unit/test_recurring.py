"""A failure recurring at every poll: one traceback, then a line a window, then "works again"."""

from __future__ import annotations

import logging

import pytest

from tfgpud.collectors.base import timed
from tfgpud.recurring import Recurring


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def boom(message: str = "no such file") -> None:
    raise OSError(message)


def test_a_failure_at_every_poll_for_a_day_logs_a_few_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test.recurring")
    clock = Clock()
    r = Recurring(log, window=600, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.recurring"):
        for _ in range(8640):  # a day of polls at 10 s
            try:
                boom()
            except OSError as exc:
                r.failed("pci", "collector pci failed", exc)
            clock.t += 10
    records = caplog.records
    assert records[0].exc_info is not None  # the first, with its traceback
    assert all(rec.exc_info is None for rec in records[1:])
    assert len(records) == 1 + 8640 * 10 // 600 - 1  # then one line a window (143)
    assert "again 60 time(s) in the last 600 s" in records[1].getMessage()


def test_a_different_failure_is_logged_at_once_and_a_success_ends_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test.recurring")
    clock = Clock()
    r = Recurring(log, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.recurring"):
        for message in ("one", "one", "two", "two"):
            try:
                boom(message)
            except OSError as exc:
                r.failed("nvml", "collector nvml failed", exc)
            clock.t += 1
        r.ok("nvml")
        r.ok("nvml")  # nothing to end now
        try:
            boom("two")
        except OSError as exc:
            r.failed("nvml", "collector nvml failed", exc)
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines == [
        "collector nvml failed: OSError: one",
        "collector nvml failed: OSError: two",
        "nvml works again after 2 failure(s) in 2 s (OSError: two)",
        "collector nvml failed: OSError: two",  # a new run: in full again
    ]


def test_a_collector_failing_at_every_poll_logs_one_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="tfgpud.collectors.base"):
        for _ in range(50):
            result, run = timed("test-recurring", boom)
            assert result is None and not run.success
        timed("test-recurring", lambda: 1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "collector test-recurring failed: OSError: no such file"
    assert lines[1].startswith("test-recurring works again after 50 failure(s)")
    assert len(lines) == 2
