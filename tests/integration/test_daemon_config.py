"""Configurations that once crashed or misled the real ``tfgpud run``: at start they exit 78
(systemd does not restart an EX_CONFIG failure forever); on SIGHUP they are refused and the
daemon keeps running the old configuration."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess
from helpers import write_scenario

DEEP = "[" * 500 + "]" * 500  # ~1 KB of nested arrays


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (f"[memory]\nx = {DEEP}\n", "nested too deeply"),
        (f"[workloads]\nprocess_names = {DEEP}\n", "nested too deeply"),
        (
            '[[alerts.webhook]]\nurl = "http://127.0.0.1:9/"\n'
            'headers = { "X-Token" = "a\\r\\nX-Evil: 1" }\n',
            "control character",
        ),
    ],
)
def test_bad_configs_exit_78_at_start(tmp_path: Path, body: str, problem: str) -> None:
    with DaemonProcess(tmp_path, config_body=body) as d:
        d.start(wait_ready=False)
        assert d.proc is not None
        assert d.proc.wait(20) == 78
        err = d.stderr()
    assert problem in err and str(d.config) in err
    assert "Traceback" not in err


def test_interval_zero_exits_78(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, interval=0) as d:
        d.start(wait_ready=False)
        assert d.proc is not None
        assert d.proc.wait(20) == 78
        assert "`daemon.interval_seconds`" in d.stderr()


def _reload_refused(d: DaemonProcess, text: str, why: str) -> None:
    failures = d.stderr().count("reload failed")
    d.config.write_text(text)
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while d.stderr().count("reload failed") == failures and time.monotonic() < deadline:
        time.sleep(0.05)
    err = d.stderr()
    assert err.count("reload failed; keeping the running configuration") == failures + 1, err
    assert why in err
    before = d.metrics()["tfgpud_polls_total"]
    d.wait_metric(lambda m: m["tfgpud_polls_total"] > before + 1)  # still polling


def test_reload_refuses_what_start_would_refuse(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    write_scenario(scenario_path, gpus=[{"name": "NVIDIA A100-SXM4-80GB"}])
    with DaemonProcess(tmp_path, scenario=scenario_path, interval=0.3) as d:
        d.start()
        good = d.config.read_text()
        _reload_refused(d, f"{good}[expect]\ngpus = {DEEP}\n", "nested too deeply")
        missing = tmp_path / "no-such-web-config.yml"
        with_web = good.replace("[nvml]", f'web_config_file = "{missing}"\n[nvml]')
        _reload_refused(d, with_web, f"invalid web configuration {missing}")
        assert d.stop() == 0
        assert "Traceback" not in d.stderr()
