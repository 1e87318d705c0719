"""End to end: the daemon on the simulated driver, real Prometheus evaluating the shipped rules,
real Alertmanager routing to a webhook in this test. A GPU is lost, then removed, then restored;
Alertmanager must deliver the matching alerts from the Prometheus rules *and* from the daemon's
own push (told apart by ``origin="tfgpud"``), then their resolution. Prints the latencies.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_harness import DaemonProcess, free_port, healthy_tf_env
from helpers import write_scenario

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "packaging" / "prometheus" / "tfgpud.rules.yml"
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
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


class Notifications:
    """Alertmanager's webhook: first arrival time of each (alertname, origin, status)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str, str], tuple[float, dict[str, str]]] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                now = time.monotonic()
                with outer.lock:
                    for a in doc["alerts"]:
                        labels = a["labels"]
                        origin = "daemon" if labels.get("origin") == "tfgpud" else "prometheus"
                        key = (labels["alertname"], origin, a["status"])
                        outer.seen.setdefault(key, (now, labels))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/am"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

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

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Service:
    """A child process, stopped by its PID (SIGTERM, then SIGKILL) however the test ends."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def wait_http(self, url: str, ok: Callable[[bytes], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if ok(resp.read()):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready at {url}: {self.log.read_text()[-2000:]}")


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in reversed(started):
        s.stop()


def fast_rules(dest: Path) -> Path:
    """The shipped rules with every ``for:`` set to 0s (the test waits for nothing else)."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "0s"
    dest.write_text(yaml.safe_dump(doc))
    return dest


def test_alerts_from_rules_and_daemon_push_reach_alertmanager(
    tmp_path: Path, fakedriver: Path, scenario_path: Path, services: list[Service]
) -> None:
    assert PROMETHEUS is not None and ALERTMANAGER is not None
    hook = Notifications()
    try:
        am_port, prom_port = free_port(), free_port()
        am_url = f"http://127.0.0.1:{am_port}"
        (tmp_path / "am.yml").write_text(
            yaml.safe_dump(
                {
                    "route": {
                        "receiver": "hook",
                        "group_by": ["alertname", "origin", "job"],
                        "group_wait": "0s",
                        "group_interval": "1s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [
                        {
                            "name": "hook",
                            "webhook_configs": [{"url": hook.url, "send_resolved": True}],
                        }
                    ],
                }
            )
        )
        am = Service(
            "alertmanager",
            [
                ALERTMANAGER,
                f"--config.file={tmp_path / 'am.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
            tmp_path / "alertmanager.log",
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
            (tmp_path / "prometheus.yml").write_text(
                yaml.safe_dump(
                    {
                        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": [str(fast_rules(tmp_path / "rules.yml"))],
                        "alerting": {
                            "alertmanagers": [
                                {"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}
                            ]
                        },
                        "scrape_configs": [
                            {
                                "job_name": "tfgpud",
                                "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}],
                            }
                        ],
                    }
                )
            )
            prom = Service(
                "prometheus",
                [
                    PROMETHEUS,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                tmp_path / "prometheus.log",
            )
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
