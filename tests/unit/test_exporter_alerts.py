"""The alert-delivery and baseline series the exporter adds."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.exposition import generate_latest

from tfgpud.exporter import make_registry
from tfgpud.model import AlertStats, KnownGpu, SinkStats, Snapshot

U0 = "GPU-aaaaaaaa-0000-4000-8000-000000000000"


def render(snap: Snapshot) -> str:
    return generate_latest(make_registry(lambda: snap)).decode()


def test_alert_stats_and_baseline_identity_are_exported() -> None:
    snap = Snapshot(
        taken_at=1.0,
        baseline=(KnownGpu(U0, "NVIDIA RTX A6000", "00000000:01:00.0"),),
        alert_stats=AlertStats(
            firing=2,
            sinks=(
                SinkStats("alertmanager[0]", sent=5, failed=3, dropped=1, queued=2),
                SinkStats("webhook[0]"),
            ),
        ),
    )
    text = render(snap)
    for line in (
        'tfgpud_baseline_gpu_info{name="NVIDIA RTX A6000",pci_bus_id="00000000:01:00.0",'
        f'uuid="{U0}"}} 1.0',
        "tfgpud_alerts_firing 2.0",
        'tfgpud_alerts_sent_total{sink="alertmanager[0]"} 5.0',
        'tfgpud_alerts_failed_total{sink="alertmanager[0]"} 3.0',
        'tfgpud_alerts_dropped_total{sink="alertmanager[0]"} 1.0',
        'tfgpud_alert_queue_length{sink="alertmanager[0]"} 2.0',
        'tfgpud_alerts_dropped_total{sink="webhook[0]"} 0.0',
    ):
        assert line in text.splitlines(), line
    if shutil.which("promtool"):
        out = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stdout + out.stderr


def test_nothing_is_exported_without_alert_delivery_or_baseline() -> None:
    text = render(Snapshot(taken_at=1.0))
    assert "tfgpud_alert" not in text and "tfgpud_baseline_gpu_info" not in text


@pytest.mark.parametrize("firing", [0, 3])
def test_firing_count(firing: int) -> None:
    assert f"tfgpud_alerts_firing {firing}.0" in render(
        Snapshot(taken_at=1.0, alert_stats=AlertStats(firing=firing))
    )
