"""Everything that talks to systemd: sd_notify, the watchdog interval, journal logging.

Both are datagrams to a Unix socket, so no library is needed. sd_notify goes to
``$NOTIFY_SOCKET``. Journal entries go to journald's native socket
(``/run/systemd/journal/socket``) when stderr really is the journal (``$JOURNAL_STREAM``), with
structured fields: any ``extra`` key in UPPER_CASE, and ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``
of the code that logged. The protocol is written here rather than taken from systemd-python
(Debian's python3-systemd): the packaged venv stays isolated from the system's site packages
and needs no compiled extension, and the caller's location comes from the log record itself.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Iterable, Mapping

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


JOURNAL_SOCKET = "/run/systemd/journal/socket"
# One field's value is cut at this size; an entry stays far below journald's own limits.
MAX_FIELD_BYTES = 64 * 1024
_TRUNCATED = b" [truncated]"


def journal_field_name_ok(name: str) -> bool:
    """journald's rule for a field a client may set: A-Z, 0-9 and "_", at most 64 characters,
    not starting with a digit or "_" (those are the journal's trusted fields)."""
    return (
        0 < len(name) <= 64
        and name[0] not in "_0123456789"
        and all(c == "_" or "A" <= c <= "Z" or "0" <= c <= "9" for c in name)
    )


def encode_journal_entry(fields: Iterable[tuple[str, str]]) -> bytes:
    """The native protocol's datagram: ``KEY=value`` lines, or for a value holding a newline
    ``KEY``, a newline, its length as 64-bit little-endian, the bytes, a newline.

    Raises ValueError for a field name journald would reject (it drops the whole entry).
    """
    out = bytearray()
    for name, value in fields:
        if not journal_field_name_ok(name):
            raise ValueError(f"invalid journal field name {name!r}")
        data = value.encode("utf-8", "replace")
        if len(data) > MAX_FIELD_BYTES:
            cut = data[: MAX_FIELD_BYTES - len(_TRUNCATED)].decode("utf-8", "ignore")
            data = cut.encode() + _TRUNCATED
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSocket:
    """Sends encoded entries to journald; an entry too big for one datagram goes as a sealed
    memfd passed over the socket, as sd_journal_send does. ``send`` raises OSError."""

    def __init__(self, path: str = JOURNAL_SOCKET, timeout: float = 1.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)  # a stalled journald must not stall the poll loop

    def send(self, payload: bytes) -> None:
        try:
            self._sock.sendto(payload, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> None:
        fd = os.memfd_create("tfgpud-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self._sock.sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


class JournalHandler(logging.Handler):
    """Log records as journal entries with structured fields; a record journald does not take
    (socket gone, overloaded past the timeout) is written to stderr as a ``<N>`` line instead,
    which systemd also files in the journal, so nothing is lost."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "tfgpud") -> None:
        super().__init__()
        self.identifier = identifier
        self._journal = JournalSocket(path)
        self._fallback = PriorityFormatter("%(name)s: %(message)s")

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        """The entry for ``record``: the record's own location (the caller of ``log.info``,
        not this handler), priority, logger, and every valid UPPER_CASE ``extra`` field."""
        own: dict[str, object] = {
            "MESSAGE": self.format(record),
            "PRIORITY": _priority(record.levelno),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        extra = {k: v for k, v in vars(record).items() if k not in own and journal_field_name_ok(k)}
        return [(k, str(v)) for k, v in (own | extra).items() if v is not None]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._journal.send(encode_journal_entry(self.fields(record)))
        except OSError:
            try:
                sys.stderr.write(self._fallback.format(record) + "\n")
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - logging must never raise
                self.handleError(record)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    def close(self) -> None:
        self._journal.close()
        super().close()


def setup_logging(level: str = "info", environ: Mapping[str, str] | None = None) -> str:
    """Configure the root logger; return "journal" or "stderr" (where logs go)."""
    env = os.environ if environ is None else environ
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level.upper())
    handler: logging.Handler
    if _stderr_is_journal(env) and os.path.exists(JOURNAL_SOCKET):
        where = "journal"
        handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        where = "stderr"
        handler = logging.StreamHandler(sys.stderr)
        if env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"):
            handler.setFormatter(PriorityFormatter("%(name)s: %(message)s"))
        else:
            handler.setFormatter(
                PriorityFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
    root.addHandler(handler)
    return where
