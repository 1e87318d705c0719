from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tfgpud.collectors.tensorflow import TfProbeScheduler
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
