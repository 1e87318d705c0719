"""Fixtures shared by all test suites. Reusable non-fixture helpers live in helpers.py."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import FAKEDRIVER_DIR, REPO_ROOT, build_fakedriver


@pytest.fixture(scope="session")
def fakedriver() -> Path:
    """build/fakedriver with libnvidia-ml.so.1 and libcuda.so.1, built once per session."""
    return build_fakedriver(FAKEDRIVER_DIR)


@pytest.fixture
def scenario_path(tmp_path: Path) -> Path:
    """Where a test writes its scenario (helpers.write_scenario); nothing is there yet."""
    return tmp_path / "scenario.toml"


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A scratch dir every user can traverse (tmp_path is 0700: `nobody` cannot enter it),
    removed afterwards even where the test made parts of it unreadable."""
    d = Path(tempfile.mkdtemp(prefix="tfgpud-shared-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in [d, *d.rglob("*")]:
            if not p.is_symlink() and p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(d)


@pytest.fixture(scope="module")
def wheel_parent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where wheel venvs (tests/cuda_userspace.py) go: their hard-linked TensorFlow needs the
    filesystem of .venv, so build/ when the temp dir is elsewhere."""
    parent = tmp_path_factory.mktemp("wheel-venvs")
    if parent.stat().st_dev == (REPO_ROOT / ".venv").stat().st_dev:
        yield parent
        return
    (REPO_ROOT / "build").mkdir(exist_ok=True)
    local = Path(tempfile.mkdtemp(prefix="wheel-venvs-", dir=REPO_ROOT / "build"))
    try:
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)
