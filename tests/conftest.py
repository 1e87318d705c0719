"""Fixtures shared by all test suites. Reusable non-fixture helpers live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FAKEDRIVER_DIR, build_fakedriver


@pytest.fixture(scope="session")
def fakedriver() -> Path:
    """build/fakedriver with libnvidia-ml.so.1 and libcuda.so.1, built once per session."""
    return build_fakedriver(FAKEDRIVER_DIR)


@pytest.fixture
def scenario_path(tmp_path: Path) -> Path:
    """Where a test writes its scenario (helpers.write_scenario); nothing is there yet."""
    return tmp_path / "scenario.toml"
