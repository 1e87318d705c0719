from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from tfgpud.systemd import Notifier, PriorityFormatter, _watchdog_interval


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
