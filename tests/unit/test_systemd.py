from __future__ import annotations

import fcntl
import inspect
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import parse_journal_entry

from tfgpud.systemd import (
    MAX_FIELD_BYTES,
    JournalHandler,
    JournalSocket,
    Notifier,
    PriorityFormatter,
    _watchdog_interval,
    encode_journal_entry,
    journal_field_name_ok,
)


def test_notifier_sends_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    n.ready("2 GPUs")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 GPUs"
    n.reloading()
    msg = sock.recv(4096).decode()
    assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert int(msg.rsplit("=", 1)[1]) > 0
    n.close()
    sock.close()


def test_notifier_without_socket_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.send(READY=1) is False


def test_watchdog_interval_is_half_and_only_for_this_pid() -> None:
    assert _watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert _watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15
    assert _watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert _watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    assert _watchdog_interval({}) is None


def test_priority_prefix() -> None:
    fmt = PriorityFormatter("%(message)s")
    rec = logging.LogRecord("t", logging.WARNING, __file__, 1, "careful", None, None)
    assert fmt.format(rec) == "<4>careful"
    rec = logging.LogRecord("t", logging.ERROR, __file__, 1, "bad", None, None)
    assert fmt.format(rec) == "<3>bad"


def test_every_line_of_a_multi_line_record_carries_the_priority() -> None:
    fmt = PriorityFormatter("%(message)s")
    rec = logging.LogRecord(
        "t", logging.ERROR, __file__, 1, "reload failed:\n  - line 3", None, None
    )
    assert fmt.format(rec) == "<3>reload failed:\n<3>  - line 3"


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def test_encoding_is_binary_safe_for_newlines() -> None:
    data = encode_journal_entry([("MESSAGE", "two\nlines"), ("SUBJECT", "host")])
    assert data == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\nSUBJECT=host\n"
    assert parse_journal_entry(data) == {"MESSAGE": "two\nlines", "SUBJECT": "host"}


def test_field_names_follow_journald() -> None:
    assert journal_field_name_ok("FINDING_CODE") and journal_field_name_ok("X1")
    for bad in ("", "_PID", "1X", "lower", "WITH-DASH", "A" * 65):
        assert not journal_field_name_ok(bad)
        with pytest.raises(ValueError):
            encode_journal_entry([(bad, "x")])


def test_a_long_value_is_cut_to_the_bound() -> None:
    fields = parse_journal_entry(encode_journal_entry([("MESSAGE", "x" * (MAX_FIELD_BYTES * 2))]))
    assert len(fields["MESSAGE"].encode()) == MAX_FIELD_BYTES
    assert fields["MESSAGE"].endswith(" [truncated]")


def _log_here(logger: logging.Logger) -> int:
    line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
    logger.warning("GPU %s\ngone", "X", extra={"FINDING_CODE": "gpu-lost", "_PID": "1", "x": 1})
    return line


def test_handler_names_the_caller_and_sends_extra_fields(
    journal_socket: tuple[str, socket.socket],
) -> None:
    path, sock = journal_socket
    handler = JournalHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tfgpud.test-journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        line = _log_here(logger)
    finally:
        logger.removeHandler(handler)
        handler.close()
    entry = parse_journal_entry(sock.recv(1 << 16))
    assert entry["MESSAGE"] == "GPU X\ngone"
    assert (entry["PRIORITY"], entry["SYSLOG_IDENTIFIER"]) == ("4", "tfgpud")
    assert entry["CODE_FILE"] == __file__ and entry["CODE_LINE"] == str(line)
    assert entry["CODE_FUNC"] == "_log_here" and entry["LOGGER"] == "tfgpud.test-journal"
    assert entry["FINDING_CODE"] == "gpu-lost"
    assert "_PID" not in entry and "x" not in entry  # trusted and lowercase names are not sent


def test_an_entry_too_big_for_a_datagram_goes_as_a_sealed_memfd(
    journal_socket: tuple[str, socket.socket],
) -> None:
    path, sock = journal_socket
    payload = encode_journal_entry([(f"F{i}", "y" * 60_000) for i in range(8)])  # ~480 KB
    journal = JournalSocket(path)
    journal.send(payload)  # too big for one datagram (EMSGSIZE)
    journal.close()
    msg, anc, _, _ = sock.recvmsg(16, socket.CMSG_SPACE(4))
    assert msg == b"" and anc and anc[0][:2] == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    (fd,) = struct.unpack("i", anc[0][2][:4])
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
        assert os.pread(fd, len(payload) + 1, 0) == payload  # journald reads it from 0
    finally:
        os.close(fd)


def test_without_journald_the_record_goes_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = JournalHandler(str(tmp_path / "no-journal"))
    rec = logging.LogRecord("tfgpud.x", logging.ERROR, __file__, 1, "bad\nworse", None, None)
    handler.handle(rec)
    handler.close()
    assert capsys.readouterr().err == "<3>tfgpud.x: bad\n<3>worse\n"
