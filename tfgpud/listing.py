"""A directory's names, listed again only when the directory changed.

A poll looks at a few directories whose contents change rarely (``/dev``, the state
directory). Listing one is a syscall and a Python list per poll; its ``stat`` is one syscall
and no allocation. Making or removing an entry changes the directory's mtime, so the last
listing stands while the (device, inode, mtime) stays the same. An mtime moves in coarse steps,
so a listing is kept only once the last change is ``settle_seconds`` old: an entry made within
the step of the change just seen cannot then be missed.
"""

from __future__ import annotations

import os
import time

SETTLE_SECONDS = 2.0


def file_stamp(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size) of ``path``, None when it cannot be stat()ed: changes when the
    file is rewritten in place or replaced (renamed over), even within one coarse mtime step."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class DirectoryListing:
    """``names(path)``: the sorted names in ``path``, () when it cannot be listed."""

    def __init__(self, settle_seconds: float = SETTLE_SECONDS) -> None:
        self._settle = settle_seconds
        self._key: tuple[str, int, int, int] | None = None
        self._names: tuple[str, ...] = ()
        self.listings = 0  # how many times a directory was listed (tests, benchmarks)

    def names(self, path: str) -> tuple[str, ...]:
        try:
            st = os.stat(path)
        except OSError:
            self._key, self._names = None, ()
            return ()
        key = (path, st.st_dev, st.st_ino, st.st_mtime_ns)
        if key != self._key:
            self.listings += 1
            try:
                names = tuple(sorted(os.listdir(path)))
                listed = True
            except OSError:  # EMFILE, ENOMEM, EACCES: listed again at the next call
                names, listed = (), False
            settled = listed and time.time() - st.st_mtime > self._settle
            self._key, self._names = (key if settled else None), names
        return self._names
