"""Everything that talks to systemd: sd_notify, the watchdog interval, journal logging.

sd_notify is a datagram to ``$NOTIFY_SOCKET``; no library is needed for it. Journal logging uses
systemd-python when it is installed *and* stderr really is the journal (``$JOURNAL_STREAM``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

# Syslog priorities for the "<N>" prefix systemd parses on stderr (sd-daemon.h).
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class Notifier:
    """Sends sd_notify messages; a no-op when not started by systemd (no NOTIFY_SOCKET)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if path.startswith("@"):
            self._address = "\0" + path[1:]  # abstract namespace
        elif path.startswith("/"):
            self._address = path
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (e.g. ``send(READY=1, STATUS="ok")``); False if not sent."""
        if self._sock is None or self._address is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def reloading(self) -> None:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload).
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(STOPPING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, if it is meant for us."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


class PriorityFormatter(logging.Formatter):
    """``<N>message`` lines that systemd turns into journal priorities."""

    def format(self, record: logging.LogRecord) -> str:
        # journald makes each line its own entry: every line carries the priority, so the
        # reasons under "reload failed" or a traceback are not filed as info.
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def _stderr_is_journal(environ: Mapping[str, str]) -> bool:
    stream = environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def _journal_handler() -> logging.Handler | None:
    try:
        from systemd import journal  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None

    class Handler(logging.Handler):
        """Sends records with structured fields (any ``extra`` key in UPPER_CASE)."""

        def emit(self, record: logging.LogRecord) -> None:
            try:
                fields: dict[str, Any] = {
                    k: str(v)
                    for k, v in vars(record).items()
                    if k.isupper() and k.replace("_", "").isalnum()
                }
                journal.send(
                    self.format(record),
                    PRIORITY=str(_priority(record.levelno)),
                    LOGGER=record.name,
                    SYSLOG_IDENTIFIER="tfgpud",
                    **fields,
                )
            except Exception:  # noqa: BLE001 - logging must never raise
                self.handleError(record)

    return Handler()


def setup_logging(level: str = "info", environ: Mapping[str, str] | None = None) -> str:
    """Configure the root logger; return "journal" or "stderr" (where logs go)."""
    env = os.environ if environ is None else environ
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level.upper())
    handler: logging.Handler | None = _journal_handler() if _stderr_is_journal(env) else None
    where = "journal"
    if handler is None:
        where = "stderr"
        handler = logging.StreamHandler(sys.stderr)
        if env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"):
            handler.setFormatter(PriorityFormatter("%(name)s: %(message)s"))
        else:
            handler.setFormatter(
                PriorityFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    return where
