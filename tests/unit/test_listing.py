from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tfgpud import listing
from tfgpud.listing import DirectoryListing

LONG_AGO = 1_700_000_000 * 10**9


def test_a_failed_listing_is_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """listdir failing once (out of file descriptors) on a directory that then stays the same:
    the next call lists it again, instead of keeping "empty" until the directory changes (a
    false missing-/dev/nvidia* finding, or hidden corrupt state files)."""
    (tmp_path / "nvidia0").touch()
    os.utime(tmp_path, ns=(LONG_AGO, LONG_AGO))
    real = os.listdir
    failures = iter([OSError(errno.EMFILE, "Too many open files")])

    def listdir(path: str) -> list[str]:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real(path)

    monkeypatch.setattr(listing.os, "listdir", listdir)
    d = DirectoryListing()
    assert d.names(str(tmp_path)) == ()
    assert d.names(str(tmp_path)) == ("nvidia0",)
    assert d.names(str(tmp_path)) == ("nvidia0",)
    assert d.listings == 2  # listed again after the failure, then kept


def test_a_settled_listing_is_kept_until_the_directory_changes(tmp_path: Path) -> None:
    (tmp_path / "a").touch()
    os.utime(tmp_path, ns=(LONG_AGO, LONG_AGO))
    d = DirectoryListing()
    assert d.names(str(tmp_path)) == ("a",)
    assert d.names(str(tmp_path)) == ("a",) and d.listings == 1
    (tmp_path / "b").touch()
    os.utime(tmp_path, ns=(LONG_AGO + 10**9, LONG_AGO + 10**9))
    assert d.names(str(tmp_path)) == ("a", "b") and d.listings == 2
