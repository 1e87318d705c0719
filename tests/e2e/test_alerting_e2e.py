"""End to end: the daemon on the simulated driver, real Prometheus evaluating the shipped rules,
real Alertmanager routing to a webhook in this test. A GPU is lost, then removed, then restored;
Alertmanager must deliver the matching alerts from the Prometheus rules *and* from the daemon's
own push (told apart by ``origin="tfgpud"``), then their resolution. Prints the latencies.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from alerting_stack import (
    ALERTMANAGER,
    PROMETHEUS,
    Service,
    WebhookReceiver,
    start_alertmanager,
    start_prometheus,
)
from daemon_harness import DaemonProcess, free_port, healthy_tf_env
from helpers import write_scenario

U0 = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
U1 = "GPU-aaaaaaaa-0000-4000-8000-000000000001"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None or ALERTMANAGER is None,
        reason="needs Debian's prometheus and prometheus-alertmanager",
    ),
]


def gpu(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": "NVIDIA RTX A6000",
        "uuid": [U0, U1][i],
        "pci_bus_id": f"00000000:{i + 1:02X}:00.0",
        **extra,
    }


class Notifications(WebhookReceiver):
    """Alertmanager's webhook: first arrival time of each (alertname, origin, status)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str, str], tuple[float, dict[str, str]]] = {}
        super().__init__()
        self.url += "/am"

    def on_alert(self, now: float, alert: dict[str, Any]) -> None:
        labels = alert["labels"]
        origin = "daemon" if labels.get("origin") == "tfgpud" else "prometheus"
        self.seen.setdefault((labels["alertname"], origin, alert["status"]), (now, labels))

    def wait(self, key: tuple[str, str, str], since: float, timeout: float = 30.0) -> float:
        """Seconds from ``since`` to the first notification for ``key``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                hit = self.seen.get(key)
            if hit is not None:
                return hit[0] - since
            time.sleep(0.05)
        raise AssertionError(f"Alertmanager never notified {key}; got {sorted(self.seen)}")

    def labels(self, key: tuple[str, str, str]) -> dict[str, str]:
        with self.lock:
            return self.seen[key][1]


def test_alerts_from_rules_and_daemon_push_reach_alertmanager(
    tmp_path: Path, fakedriver: Path, scenario_path: Path, services: list[Service]
) -> None:
    assert PROMETHEUS is not None and ALERTMANAGER is not None
    hook = Notifications()
    try:
        am_port, prom_port = free_port(), free_port()
        am_url = f"http://127.0.0.1:{am_port}"
        am = start_alertmanager(
            tmp_path,
            {
                "route": {
                    "receiver": "hook",
                    "group_by": ["alertname", "origin", "job"],
                    "group_wait": "0s",
                    "group_interval": "1s",
                    "repeat_interval": "1h",
                },
                "receivers": [
                    {"name": "hook", "webhook_configs": [{"url": hook.url, "send_resolved": True}]}
                ],
            },
            am_port,
        )
        services.append(am)

        write_scenario(scenario_path, [gpu(0), gpu(1)])
        body = (
            '[alerts]\nfor_seconds = 0\nresend_seconds = 1\ninstance = "e2e-host"\n'
            f'[[alerts.alertmanager]]\nurl = "{am_url}"\ntimeout_seconds = 2\n'
        ) + healthy_tf_env(tmp_path / "tf")  # so the only alerts are the GPU's
        daemon = DaemonProcess(tmp_path / "daemon", body, scenario=scenario_path, interval=0.5)
        with daemon:
            daemon.start()
            prom = start_prometheus(tmp_path, daemon.port, am_port, prom_port)
            services.append(prom)
            am.wait_http(f"{am_url}/-/ready", lambda b: True)
            query = f"http://127.0.0.1:{prom_port}/api/v1/query?query=tfgpud_nvml_gpus"
            prom.wait_http(query, lambda b: b'"2"]' in b, timeout=40)

            timings: dict[str, float] = {}

            def expect(alert: str, status: str, since: float, *, timeout: float = 30) -> None:
                for origin in ("prometheus", "daemon"):
                    t = hook.wait((alert, origin, status), since, timeout)
                    timings[f"{alert} {status} via {origin}"] = t

            # 1. GPU 1 is lost (NVML GPU_IS_LOST).
            t0 = time.monotonic()
            write_scenario(scenario_path, [gpu(0), gpu(1, lost=True)])
            expect("TfgpudGpuLost", "firing", t0)
            pushed = hook.labels(("TfgpudGpuLost", "daemon", "firing"))
            ruled = hook.labels(("TfgpudGpuLost", "prometheus", "firing"))
            assert pushed["subject"] == U1 and pushed["instance"] == "e2e-host"
            assert pushed["severity"] == "critical" and pushed["code"] == "gpu-lost"
            assert (
                ruled["uuid"] == U1 and ruled["job"] == "tfgpud" and ruled["severity"] == "critical"
            )
            assert ruled["pci_bus_id"] == "00000000:02:00.0"

            # 2. It is gone from the driver: vanished (named from the baseline); lost resolves.
            t1 = time.monotonic()
            write_scenario(scenario_path, [gpu(0)])
            expect("TfgpudGpuVanished", "firing", t1)
            expect("TfgpudGpuLost", "resolved", t1)
            ruled = hook.labels(("TfgpudGpuVanished", "prometheus", "firing"))
            assert ruled["subject"] == U1 and ruled["name"] == "NVIDIA RTX A6000"
            assert ruled["pci_bus_id"] == "00000000:02:00.0"
            assert hook.labels(("TfgpudGpuVanished", "daemon", "firing"))["subject"] == U1

            # 3. Restored: everything resolves.
            t2 = time.monotonic()
            write_scenario(scenario_path, [gpu(0), gpu(1)])
            expect("TfgpudGpuVanished", "resolved", t2)

            print("\nscenario change -> Alertmanager notification (seconds):")
            for what, t in timings.items():
                print(f"  {what:<45} {t:5.1f}")
            daemon.stop()
            unexpected = {
                k for k in hook.seen if k[0] not in {"TfgpudGpuLost", "TfgpudGpuVanished"}
            }
            assert not unexpected, unexpected
    finally:
        hook.close()
