"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alerting_stack import Service


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Services a test starts (Prometheus, Alertmanager), stopped in reverse order after it."""
    started: list[Service] = []
    yield started
    for s in reversed(started):
        s.stop()
