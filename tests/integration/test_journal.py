"""Structured journal logging, received on a real journald-protocol socket.

The daemon writes journald's native protocol to /run/systemd/journal/socket. This machine runs
no journald, so the test binds that socket itself and reads what the daemon sends when its
stderr is "the journal" (JOURNAL_STREAM names stderr's device:inode, as systemd sets it).
Under a real journald: tests/e2e/test_systemd_nspawn.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess
from helpers import parse_journal_entry, write_scenario

from tfgpud import systemd
from tfgpud.alerts import message_id

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
U0 = "GPU-dddddddd-0000-4000-8000-000000000000"
U1 = "GPU-dddddddd-0000-4000-8000-000000000001"


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or JOURNAL_SOCKET.exists(),
    reason="needs root, and no running journald to stand in for",
)


@pytest.fixture
def journal() -> Iterator[socket.socket]:
    JOURNAL_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(str(JOURNAL_SOCKET))
        except OSError as exc:  # another test run on this machine stands in right now
            pytest.skip(f"{JOURNAL_SOCKET} is taken: {exc.strerror}")
        sock.settimeout(0.5)
        try:
            yield sock
        finally:
            JOURNAL_SOCKET.unlink()


def _entries(sock: socket.socket, want: int, budget: float = 15.0) -> list[dict[str, str]]:
    import time

    out: list[dict[str, str]] = []
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline and len(out) < want:
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        out.append(parse_journal_entry(data))
    return out


def _run_on_the_journal(d: DaemonProcess, journal: socket.socket) -> list[dict[str, str]]:
    """Start ``d`` with stderr as "the journal", collect what it sends for a while, stop it."""
    d.stderr_path.touch()
    st = d.stderr_path.stat()
    d.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    d.start()
    entries = _entries(journal, want=50, budget=4.0)
    assert d.stop() == 0
    return entries


def test_transitions_and_xids_reach_the_journal_with_fields(
    tmp_path: Path, fakedriver: Path, scenario_path: Path, journal: socket.socket
) -> None:
    write_scenario(
        scenario_path,
        [{"uuid": U0, "xids": [79]}, {"uuid": U1, "lost": True}],
        driver_version="550.54.15",
    )
    with DaemonProcess(
        tmp_path,
        config_body="[alerts]\nfor_seconds = 0\n",
        scenario=scenario_path,
    ) as d:
        entries = _run_on_the_journal(d, journal)
    by_code = {e.get("FINDING_CODE"): e for e in entries if "FINDING_CODE" in e}
    lost = by_code["gpu-lost"]
    assert lost["SUBJECT"] == "GPU-unknown-index-1"  # lost from the start: no UUID to read
    assert lost["SEVERITY"] == "critical" and lost["PRIORITY"] == "3"
    assert lost["MESSAGE_ID"] == message_id("gpu-lost")
    assert lost["SYSLOG_IDENTIFIER"] == "tfgpud"
    assert lost["MESSAGE"].startswith("FIRING [critical] gpu-lost")
    assert lost["ALERT_STATE"] == "firing"
    # Where it was logged, not the journal handler: the line named holds the logging call.
    assert lost["CODE_FILE"].endswith(".py") and lost["CODE_FILE"] != systemd.__file__
    line = Path(lost["CODE_FILE"]).read_text().splitlines()[int(lost["CODE_LINE"]) - 1]
    assert "log" in line and lost["CODE_FUNC"] != "emit"
    xid = [e for e in entries if e.get("GPU_UUID") == U0]
    assert xid and "Xid 79" in xid[0]["MESSAGE"] and xid[0]["PRIORITY"] == "4"
    # Nothing went to stderr in the plain format while the journal was in use.
    assert "<3>" not in d.stderr() and "FIRING" not in d.stderr()


def test_journal_entries_carry_no_escape_sequences_from_a_probed_env(
    tmp_path: Path, fakedriver: Path, scenario_path: Path, journal: socket.socket
) -> None:
    from helpers import fake_tf_python

    title = "\x1b]0;pwned\x07"
    write_scenario(scenario_path, [{"uuid": U0}], driver_version="550.54.15")
    python = fake_tf_python(
        tmp_path / "python",
        0,
        report={"import_error": f"ImportError: {title}"},
        stderr=f"Error: {title}\n".encode(),
    )
    body = f'[alerts]\nfor_seconds = 0\n[[tensorflow.envs]]\nname = "evil"\npython = "{python}"\n'
    with DaemonProcess(tmp_path, config_body=body, scenario=scenario_path) as d:
        entries = _run_on_the_journal(d, journal)
    fired = [e for e in entries if e.get("FINDING_CODE") == "tf-import-failed"]
    assert fired and "\\x1b]0;pwned\\x07" in fired[0]["MESSAGE"]
    for e in entries:
        assert not any("\x1b" in v or "\x07" in v for v in e.values()), e
