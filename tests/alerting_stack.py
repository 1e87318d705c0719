"""Real Prometheus and Alertmanager for the e2e tests: started on loopback ports, stopped by PID,
and a webhook that records what Alertmanager notifies.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "packaging" / "prometheus" / "tfgpud.rules.yml"
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")


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


def fast_rules(dest: Path, hold: str = "0s", keep: str = "0s") -> Path:
    """The shipped rules with every ``for:`` set to ``hold`` and every ``keep_firing_for:`` to
    ``keep`` (0s: the test waits for nothing)."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = hold
            if "keep_firing_for" in rule:
                rule["keep_firing_for"] = keep
    dest.write_text(yaml.safe_dump(doc))
    return dest


def start_alertmanager(tmp: Path, config: dict[str, Any], port: int) -> Service:
    (tmp / "am.yml").write_text(yaml.safe_dump(config))
    return Service(
        "alertmanager",
        [
            str(ALERTMANAGER),
            f"--config.file={tmp / 'am.yml'}",
            f"--storage.path={tmp / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        tmp / "alertmanager.log",
    )


def start_prometheus(
    tmp: Path, target_port: int, am_port: int, port: int, hold: str = "0s", keep: str = "0s"
) -> Service:
    """Prometheus scraping the daemon every second, evaluating the shipped rules (``for:`` set
    to ``hold``, ``keep_firing_for:`` to ``keep``) every second, sending to the Alertmanager on
    ``am_port``."""
    (tmp / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(fast_rules(tmp / "rules.yml", hold, keep))],
                "alerting": {
                    "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
                },
                "scrape_configs": [
                    {
                        "job_name": "tfgpud",
                        "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                    }
                ],
            }
        )
    )
    return Service(
        "prometheus",
        [
            str(PROMETHEUS),
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        tmp / "prometheus.log",
    )


class WebhookReceiver:
    """An Alertmanager webhook receiver on loopback: every notification, with its arrival time
    (monotonic) and the path it was posted to. ``on_alert`` sees each alert of each one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.notifications: list[tuple[float, str, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                now = time.monotonic()
                with outer.lock:
                    outer.notifications.append((now, self.path, doc))
                    for a in doc["alerts"]:
                        outer.on_alert(now, a)
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def on_alert(self, now: float, alert: dict[str, Any]) -> None:
        """Called (under ``lock``) for each alert of each notification."""

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
