"""Small formatters shared by the rules, the collectors and the views."""

from __future__ import annotations

import logging
import pwd
import re
from collections.abc import Iterable

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


# Bidirectional overrides and isolates reorder what a terminal shows (CVE-2021-42574); they
# are "printable" to Python, so they are named here.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r"}


def _escape_char(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    n = ord(ch)
    if n < 0x100:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` safe to show on a terminal or in a log line: every control character (ESC,
    CR, BEL, C1 controls such as CSI), format and bidi-override character becomes a visible
    ``\\x1b``-style escape. Tabs stay; newlines stay only with ``newlines=True``.

    Apply it to every string that came from outside (probe reports, process names, files)
    before it reaches a terminal or the journal; JSON needs no such care.
    """
    if text.isprintable() and not _BIDI.intersection(text):
        return text
    keep = "\t\n" if newlines else "\t"
    return "".join(
        ch if ch in keep or (ch.isprintable() and ch not in _BIDI) else _escape_char(ch)
        for ch in text
    )


class PrintableLogFilter(logging.Filter):
    """Makes every record's message, its traceback and its journal fields (``extra`` keys in
    UPPER_CASE) printable (see :func:`printable`), newlines kept: a handler with this filter
    never writes an escape sequence that came from a probe's output, a process name or a file
    into the journal or onto a terminal."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = printable(message, newlines=True), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = printable(record.exc_text, newlines=True)
        if record.stack_info:
            record.stack_info = printable(record.stack_info, newlines=True)
        for key, value in list(vars(record).items()):
            if key.isupper() and isinstance(value, str):
                setattr(record, key, printable(value, newlines=True))
        return True


_FRAME = re.compile(r'^\s*File "([^"]*)", line \d+')
_CARETS = re.compile(r"^\s*[~^]*\^[~^]*\s*$")
_TRACEBACK_HEAD = "Traceback (most recent call last):"


def trim_traceback(lines: Iterable[str]) -> list[str]:
    """Evidence lines a person reads: each run of Python traceback frames is reduced to its
    last meaningful frame (not ``<frozen importlib…>``) with its source line, or to nothing when
    none is meaningful; ``Traceback (most recent call last):`` headers, ``^^^^`` caret lines and
    source lines whose frame was cut off are dropped. The exception lines and every other line
    are kept, in order."""
    src = list(lines)
    out: list[str] = []
    current: list[str] | None = None  # the frame being read: its File line, then its source
    chosen: list[str] | None = None  # the last meaningful frame of this run
    for i, line in enumerate(src):
        m = _FRAME.match(line)
        if m is not None:
            current = [line]
            if not m.group(1).startswith("<"):
                chosen = current
            continue
        if _CARETS.match(line) or line.strip() == _TRACEBACK_HEAD:
            continue
        if line.startswith("    "):
            if current is not None:
                current.append(line)
                continue
            if i + 1 < len(src) and _FRAME.match(src[i + 1]):
                continue  # the source line of a frame cut off above
        out.extend(chosen or ())
        current, chosen = None, None
        out.append(line)
    out.extend(chosen or ())
    return out
