"""Strings from outside never drive the operator's terminal: a hostile env's probe report and
stderr, and a GPU name with escape sequences, reach `tfgpud status`, `tfgpud doctor` and the
daemon's log lines only as visible escapes; JSON carries them intact."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemon_harness import DaemonProcess
from helpers import fake_tf_python, write_scenario

TITLE = "\x1b]0;pwned\x07"  # sets the terminal window's title
CLEAR = "\x1b[2J\x1b[H"  # clears the screen
U0 = "GPU-eeeeeeee-0000-4000-8000-000000000000"


def hostile_env(tmp: Path) -> str:
    python = fake_tf_python(
        tmp / "python",
        0,
        report={"import_error": f"ImportError: {TITLE}libfoo.so{CLEAR}"},
        stderr=f"E0000 00:00:1.0 1 x.cc:1] Error: {TITLE}{CLEAR}\n".encode(),
    )
    return f'[alerts]\nfor_seconds = 0\n[[tensorflow.envs]]\nname = "evil"\npython = "{python}"\n'


def scenario(path: Path) -> None:
    write_scenario(path, [{"uuid": U0, "name": f"NVIDIA H100{TITLE}"}], driver_version="550.54.15")


def tfgpud(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tfgpud", *args],
        capture_output=True,
        timeout=60,
        check=False,
        env=env,
    )


def wait_for_finding(d: DaemonProcess, code: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        doc = json.loads(d.get("/status")[1])
        if any(f["code"] == code for f in doc["findings"]):
            return doc
        time.sleep(0.1)
    raise AssertionError(f"no {code} in /status: {doc}")


def test_status_and_log_lines_show_escapes_not_escape_sequences(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    scenario(scenario_path)
    with DaemonProcess(tmp_path, config_body=hostile_env(tmp_path), scenario=scenario_path) as d:
        d.start()
        doc = wait_for_finding(d, "tf-import-failed")
        text = tfgpud("status", "--url", f"127.0.0.1:{d.port}")
        as_json = tfgpud("status", "--url", f"127.0.0.1:{d.port}", "--json")
        assert d.stop() == 0
    # JSON is not a terminal: the strings are intact (and JSON-escaped on the wire).
    summary = next(f["summary"] for f in doc["findings"] if f["code"] == "tf-import-failed")
    assert TITLE in summary
    assert text.returncode == 0 and as_json.returncode == 0
    assert b"\x1b" not in as_json.stdout and TITLE in as_json.stdout.decode("unicode_escape")
    out = text.stdout.decode()
    assert "\x1b" not in out and "\x07" not in out
    assert "ImportError: \\x1b]0;pwned\\x07libfoo.so\\x1b[2J\\x1b[H" in out
    assert "NVIDIA H100\\x1b]0;pwned\\x07" in out
    log = d.stderr()
    assert "\x1b" not in log and "\x07" not in log
    assert "\\x1b]0;pwned" in log  # the alert's log line, escaped


def test_doctor_shows_escapes_not_escape_sequences(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    scenario(scenario_path)
    d = DaemonProcess(tmp_path, config_body=hostile_env(tmp_path), scenario=scenario_path)
    d.notify.close()
    run = tfgpud("doctor", "--config", str(d.config), env=d.env)
    assert run.returncode == 2, run.stderr
    out = run.stdout.decode()
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07libfoo.so" in out and "NVIDIA H100\\x1b]0;pwned" in out
    assert b"\x1b" not in run.stderr
