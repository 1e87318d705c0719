from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tfgpud.collectors.tensorflow import TfProbeScheduler
from tfgpud.collectors.tensorflow.discovered import EnvDiscovery
from tfgpud.config import TfEnvConfig, parse_config
from tfgpud.daemon import Daemon, HostPaths
from tfgpud.model import ProbeStatus, TfProbeResult


def test_a_bug_in_the_poll_glue_keeps_the_loop_beating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    empty = tmp_path / "empty"
    d = Daemon(config, paths=HostPaths(sys=empty, proc=empty, dev=empty), environ={})
    first = d.poll_once()
    assert {r.name for r in first.collectors} >= {"pci", "nvml"}

    def broken(*args: Any) -> Any:
        raise RuntimeError("baseline bug")

    monkeypatch.setattr(d, "_baseline", broken)
    second = d.poll_once()
    assert second.sequence == 2 and d.polls == 2
    failed = [r for r in second.collectors if r.name == "poll"]
    assert len(failed) == 1 and not failed[0].success
    assert "baseline bug" in (failed[0].error or "")
    assert second.nvml == first.nvml  # the last good readings are still served
    assert d.health()[0]
    monkeypatch.undo()
    third = d.poll_once()
    assert "poll" not in {r.name for r in third.collectors}
    d.shutdown()


def test_a_reload_of_the_envs_never_waits_for_a_running_probe(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop that reloads is the watchdog's heartbeat: a probe whose child takes long to
    die (or cannot be killed) must not hold it, however long it runs."""
    head = f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[tensorflow.discover]\nenabled = false\n'
    env = '[[tensorflow.envs]]\nname = "main"\npython = "/nonexistent/bin/python"\n'
    config = parse_config(head + env)
    empty = tmp_path / "empty"
    d = Daemon(config, paths=HostPaths(sys=empty, proc=empty, dev=empty), environ={})
    release = threading.Event()

    def stuck(env: TfEnvConfig, *, timeout: float, cancel: threading.Event) -> TfProbeResult:
        release.wait(30)  # ignores the cancel
        return TfProbeResult(env.name, env.python, ProbeStatus.OK, time.time(), 0.0)

    d._tf = TfProbeScheduler(config.tensorflow.envs, interval=21600, timeout=5, probe=stuck)
    d.poll_once()
    assert d._tf.running() == ("main",)
    caplog.set_level(logging.WARNING)
    d._apply(parse_config(head + env + '[tensorflow.envs.environment]\nA = "1"\n'))
    assert d._tf.running() == ("main",)  # the new schedule holds the old probe, not the loop
    assert "still running" not in caplog.text
    release.set()
    assert d._tf.wait_idle(5)
    d.shutdown()


def test_a_reload_of_the_discovery_settings_keeps_the_envs_found_until_it_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New discovery settings start a new search: until it ends, the envs the last search
    found stay on the schedule (they were dropped, and probed anew, with their alerts
    resolving and firing again, whenever a poll fell within that search)."""
    prefix = tmp_path / "roots" / "tf"
    meta = prefix / "lib" / "python3.11" / "site-packages" / "tensorflow-2.21.0.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorflow\nVersion: 2.21.0\n")
    (prefix / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.2\n")
    (prefix / "bin").mkdir()
    (prefix / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (prefix / "bin" / "python").chmod(0o755)
    for made in (prefix / "bin" / "python", meta.parent):  # installed long before the probe
        os.utime(made, ns=(10**18, 10**18))

    def config(interval: int) -> str:
        return (
            f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[tensorflow.discover]\n'
            f'roots = ["{tmp_path / "roots"}"]\njupyter = false\nconda = false\n'
            f"system = false\ninterval_seconds = {interval}\n"
        )

    empty = tmp_path / "empty"
    empty.mkdir()
    d = Daemon(parse_config(config(3600)), paths=HostPaths(empty, empty, empty), environ={})
    d._discovery.run_once()  # the first search, on this thread
    d.poll_once()
    found = [r.env for r in d._tf.env_records() if r.source == "discovered"]
    assert len(found) == 1
    assert d._tf.wait_idle(20)  # its first probe ended (the script exits 1)
    runs = d._tf.runs(found[0])
    monkeypatch.setattr(EnvDiscovery, "start", lambda self: None)  # its search is under way
    d._apply(parse_config(config(7200)))
    d.poll_once()
    assert [r.env for r in d._tf.env_records() if r.source == "discovered"] == found
    assert d._tf.runs(found[0]) == runs  # not dropped, so not due for a first probe again
    d._discovery.run_once()  # the new search ends: what it finds is the schedule
    d.poll_once()
    assert [r.env for r in d._tf.env_records() if r.source == "discovered"] == found
    d.shutdown()


def test_a_reload_of_the_alerts_keeps_what_is_pending(tmp_path: Path) -> None:
    """[alerts] changed: the new dispatcher takes over the old one's timers (alerts.json holds
    only what fires), so a pending finding does not wait for_seconds again."""
    head = f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[tensorflow.discover]\nenabled = false\n'
    empty = tmp_path / "empty"
    empty.mkdir()
    d = Daemon(
        parse_config(head + "[alerts]\nfor_seconds = 600\n"),
        paths=HostPaths(empty, empty, empty),
        environ={},
    )
    d.poll_once()
    pending = dict(d._alerts.transitions._pending)
    assert pending  # the empty host's findings, waiting out for_seconds
    d._apply(parse_config(head + "[alerts]\nfor_seconds = 600\nresend_seconds = 120\n"))
    assert d._alerts.transitions._pending == pending
    d.shutdown()
