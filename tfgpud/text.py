"""Small formatters shared by the rules, the collectors and the views."""

from __future__ import annotations

import pwd

GIB = 1024**3


def gib(n: int | None, *, unit: bool = True) -> str:
    """Bytes as ``"12.3 GiB"`` (``"12.3"`` without the unit); ``"?"`` when unknown."""
    if n is None:
        return "?"
    return f"{n / GIB:.1f} GiB" if unit else f"{n / GIB:.1f}"


def duration(seconds: float) -> str:
    """``"42 s"``, ``"15 min"`` or ``"3.5 h"``: the unit a person reads at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 120 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def user_name(uid: int) -> str | None:
    """The passwd name of ``uid``; None for a uid without an entry (common in containers)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
