from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tfgpud.config import parse_config
from tfgpud.daemon import Daemon, HostPaths


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
