"""Xids on the real daemon over the simulated driver: what findings rely on is kept per GPU and
per code, and the Xid series stay bounded whatever the driver sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon_harness import DaemonProcess
from helpers import finding_value, write_scenario

from tfgpud.exporter import WATCHED_XIDS
from tfgpud.xids import KNOWN_XIDS

U = [f"GPU-dddddddd-0000-4000-8000-00000000000{i}" for i in range(4)]


def gpus(xids: dict[int, list[int]]) -> list[dict[str, Any]]:
    return [
        {"uuid": u, "pci_bus_id": f"00000000:{i + 1:02X}:00.0", "xids": xids.get(i, [])}
        for i, u in enumerate(U)
    ]


def xid_series(m: dict[str, float], uuid: str, xid: int | str) -> float | None:
    index = U.index(uuid)
    return m.get(f'tfgpud_gpu_xid_errors_total{{gpu="{index}",uuid="{uuid}",xid="{xid}"}}')


def critical(m: dict[str, float], uuid: str) -> float | None:
    return finding_value(m, "gpu-xid-critical", uuid)


def test_xid_79_outlives_300_harmless_xids_on_other_gpus(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    write_scenario(scenario_path, gpus({0: [79]}))
    with DaemonProcess(tmp_path, scenario=scenario_path, interval=0.3) as d:
        d.start()
        d.wait_metric(lambda m: critical(m, U[0]) == 1)
        # Then 300 Xid 13 (an application error) on the other three GPUs, after the 79.
        write_scenario(scenario_path, gpus({0: [79], 1: [13] * 100, 2: [13] * 100, 3: [13] * 100}))
        _, m = d.wait_metric(
            lambda m: sum(xid_series(m, u, 13) or 0 for u in U[1:]) == 300, timeout=20
        )
        polls = m["tfgpud_polls_total"]
        _, m = d.wait_metric(lambda m: m["tfgpud_polls_total"] >= polls + 2)
        assert critical(m, U[0]) == 1, "gpu-xid-critical for Xid 79 resolved within its hour"
        assert xid_series(m, U[0], 79) == 1
        assert all(critical(m, u) is None for u in U[1:])
        assert d.stop() == 0
    # One journal line per GPU and code for the first event of the minute, not 301 lines.
    lines = [x for x in d.stderr().splitlines() if "Xid " in x and " on GPU " in x]
    assert len(lines) == 4, lines


def test_xids_outside_the_known_table_are_one_series(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    unknown = [x for x in range(1, 200) if x not in KNOWN_XIDS][:128]  # the scenario's maximum
    write_scenario(scenario_path, gpus({0: unknown, 1: unknown}))
    with DaemonProcess(tmp_path, scenario=scenario_path, interval=0.3) as d:
        d.start()
        _, m = d.wait_metric(
            lambda m: xid_series(m, U[0], "other") == 128 and xid_series(m, U[1], "other") == 128
        )
        series = [k for k in m if k.startswith("tfgpud_gpu_xid_errors_total{")]
        # Per GPU the watched codes (at 0 before any event) and one "other": 256 values, 2 series.
        assert len(series) == len(U) * len(WATCHED_XIDS) + 2, sorted(series)
        assert d.stop() == 0
    lines = [x for x in d.stderr().splitlines() if "Xid " in x and " on GPU " in x]
    assert len(lines) == 2, lines  # 256 events, one line per GPU within the minute
