"""End to end: one root cause, one page, with both alert paths on at once.

The daemon runs on the simulated driver with a real TensorFlow env (.venv) and pushes to a real
Alertmanager configured from the shipped ``alertmanager.example.yml`` (its route and
``inhibit_rules``; only the receivers point at this test); a real Prometheus scrapes the daemon
and evaluates the shipped rules. ``[alerts] instance`` is left at its default (the host name)
while Prometheus calls the target ``127.0.0.1:PORT``: the pairing must not depend on them
agreeing. For each root cause — the driver gone under two GPUs (with the env falling back to the
CPU), NVML failing under them with UNKNOWN (no other driver finding names it), one GPU lost, the
env without its CUDA libraries — Alertmanager must hold exactly one
active, uninhibited alert (the rule's alert for the root cause; the rules alert on root causes
only), with every other alert for it (its pushed twin, the pushed consequences) present and
inhibited; only the root cause is ever notified (by either path); and everything clears when the
cause is fixed, without a page. Both paths hold a
finding ``HOLD`` seconds before it fires (``[alerts] for_seconds``, the rules' ``for:``), as in
production (30 s, 1 m): the env's fallback outlives the driver by one probe after the driver comes
back, and must not page then; the rules keep firing a little longer than the daemon's resolve
(``keep_firing_for``, 2 m in production), so fixing a cause does not let its push page. Prints
the alerts and pages per phase.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from alerting_stack import (
    ALERTMANAGER,
    PROMETHEUS,
    ROOT,
    Service,
    WebhookReceiver,
    start_alertmanager,
    start_prometheus,
)
from daemon_harness import FAKEDRIVER, DaemonProcess, free_port
from helpers import write_scenario

EXAMPLE = ROOT / "packaging" / "prometheus" / "alertmanager.example.yml"
TF_PYTHON = ROOT / ".venv" / "bin" / "python"
U0 = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
U1 = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
# TensorFlow 2.21 lists GPUs only when all of these dlopen; empty objects with these sonames do.
CUDA_SONAMES = (
    "libcudart.so.12",
    "libcublas.so.12",
    "libcublasLt.so.12",
    "libcufft.so.11",
    "libcusolver.so.11",
    "libcusparse.so.12",
    "libcudnn.so.9",
)
WAIT = 120.0  # a phase that re-probes TensorFlow (~3 CPU-s) on a loaded 2-core machine
HOLD = 20  # seconds; a TensorFlow probe takes 4-7 s here

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None or ALERTMANAGER is None or not TF_PYTHON.exists(),
        reason="needs Debian's prometheus and prometheus-alertmanager, and .venv's TensorFlow",
    ),
]

Alert = dict[str, Any]


def gpu(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": "NVIDIA RTX A6000",
        "uuid": [U0, U1][i],
        "pci_bus_id": f"00000000:{i + 1:02X}:00.0",
        "memory_total": 48 * 2**30,
        "memory_used": 2**30,
        "utilization_gpu": 30,
        **extra,
    }


def cuda_stubs(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "empty.c").write_text("")
    src = str(dest / "empty.c")
    for soname in CUDA_SONAMES:
        subprocess.run(
            ["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(dest / soname), src],
            check=True,
            timeout=60,
        )
    return dest


def example_config(receiver_url: str) -> dict[str, Any]:
    """The shipped example with its receivers pointed here and short group timers."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    for r in doc["receivers"]:
        r["webhook_configs"] = [{"url": f"{receiver_url}/{r['name']}", "send_resolved": True}]

    def shorten(route: dict[str, Any]) -> None:
        route.update({"group_wait": "6s", "group_interval": "2s", "repeat_interval": "1h"})
        for child in route.get("routes", ()):
            shorten(child)

    shorten(doc["route"])
    return doc


class Pages(WebhookReceiver):
    """Every firing alert notified, per phase."""

    def __init__(self) -> None:
        self.phase = "start"
        self.paged: dict[str, list[dict[str, str]]] = {}
        super().__init__()

    def on_alert(self, now: float, alert: dict[str, Any]) -> None:
        if alert["status"] == "firing":
            self.paged.setdefault(self.phase, []).append(alert["labels"])


def who(a: Alert) -> str:
    labels = a["labels"]
    path = "push" if labels.get("origin") == "tfgpud" else "rule"
    what = f"{labels['alertname']}[{path}, {labels.get('role', '-')}]"
    return f"{what} {labels.get('code', '')} {labels.get('subject', '')}"


class Alertmanager:
    def __init__(self, url: str) -> None:
        self.url = url

    def alerts(self) -> list[Alert]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as resp:
            return list(json.load(resp))

    def wait(
        self, done: Callable[[list[Alert]], bool], what: str, timeout: float = WAIT
    ) -> list[Alert]:
        deadline = time.monotonic() + timeout
        alerts: list[Alert] = []
        while time.monotonic() < deadline:
            alerts = self.alerts()
            if done(alerts):
                return alerts
            time.sleep(0.25)
        raise AssertionError(f"{what}: not reached in {timeout}s; alerts: {list(map(who, alerts))}")


def active(alerts: Iterable[Alert]) -> list[Alert]:
    return [a for a in alerts if a["status"]["state"] == "active"]


def has(alerts: Iterable[Alert], alertname: str, path: str, code: str, subject: str) -> bool:
    return any(
        a["labels"]["alertname"] == alertname
        and (a["labels"].get("origin") == "tfgpud") == (path == "push")
        and a["labels"].get("code") == code
        and a["labels"].get("subject") == subject
        for a in alerts
    )


def env_config(name: str, scenario: Path, stubs: Path | None) -> str:
    libs = f"{FAKEDRIVER}:{stubs}" if stubs is not None else str(FAKEDRIVER)
    return (
        "[tensorflow]\ninterval_seconds = 21600\ntimeout_seconds = 120\n"
        f'[[tensorflow.envs]]\nname = "{name}"\npython = "{TF_PYTHON}"\n'
        f'environment = {{ LD_LIBRARY_PATH = "{libs}", TFGPUD_FAKE_DRIVER = "{scenario}" }}\n'
    )


def test_one_root_cause_is_one_page_with_both_paths_on(
    tmp_path: Path, fakedriver: Path, scenario_path: Path, services: list[Service]
) -> None:
    stubs = cuda_stubs(tmp_path / "cuda-stubs")
    pages = Pages()
    report: list[str] = []
    causes: dict[str, tuple[str, str]] = {}
    try:
        am_port, prom_port = free_port(), free_port()
        am = Alertmanager(f"http://127.0.0.1:{am_port}")
        services.append(start_alertmanager(tmp_path, example_config(pages.url), am_port))
        write_scenario(scenario_path, [gpu(0), gpu(1)])
        alerts_body = (
            f"[alerts]\nfor_seconds = {HOLD}\nresend_seconds = 1\n"
            f'[[alerts.alertmanager]]\nurl = "{am.url}"\ntimeout_seconds = 2\n'
        )
        daemon = DaemonProcess(
            tmp_path / "daemon",
            alerts_body + env_config("research", scenario_path, stubs),
            scenario=scenario_path,
            interval=0.5,
        )
        config_head = daemon.config.read_text().split("[alerts]")[0]

        def reconfigure(stubs_dir: Path | None) -> None:
            body = alerts_body + env_config("research", scenario_path, stubs_dir)
            daemon.config.write_text(config_head + body)
            daemon.signal(signal.SIGHUP)

        with daemon:
            daemon.start()
            prom = start_prometheus(
                tmp_path, daemon.port, am_port, prom_port, f"{HOLD}s", f"{HOLD + 10}s"
            )
            services.append(prom)
            services[0].wait_http(f"{am.url}/-/ready", lambda b: True)
            q = f"http://127.0.0.1:{prom_port}/api/v1/query?query=tfgpud_tf_visible_gpus"
            prom.wait_http(q, lambda b: b'"2"]' in b, timeout=WAIT)
            am.wait(lambda a: not a, "a healthy machine without alerts", timeout=20)

            def phase(
                name: str,
                cause: tuple[str, str, str],
                inhibited: list[tuple[str, str, str, str]],
                break_it: Callable[[], None],
                fix_it: Callable[[], None],
            ) -> None:
                pages.phase = name
                break_it()
                rule_alert, code, subject = cause
                causes[name] = (code, subject)
                expected = [(rule_alert, "rule", code, subject), *inhibited]
                alerts = am.wait(
                    lambda a: all(has(a, *e) for e in expected),
                    f"{name}: every alert of the root cause",
                )
                time.sleep(3)  # stragglers from either path would show now
                for _ in range(12):  # and the count holds
                    alerts = am.alerts()
                    up = active(alerts)
                    assert [who(a) for a in up] == [who(a) for a in up if has([a], *expected[0])]
                    assert len(up) == 1, [who(a) for a in up]
                    time.sleep(0.25)
                for e in inhibited:
                    match = [a for a in alerts if has([a], *e)]
                    assert match and all(a["status"]["inhibitedBy"] for a in match), e
                report.append(f"{name}: {len(alerts)} alerts, 1 active: {who(up[0])}")
                report.extend(f"    inhibited: {who(a)}" for a in alerts if a not in up)
                pages.phase = f"{name} fixed"
                fix_it()
                am.wait(lambda a: not a, f"{name}: cleared when fixed")

            # 1. The driver goes away under two GPUs: the env falls back to the CPU too.
            push = "push"
            phase(
                "driver gone",
                ("TfgpudNvidiaDriverUnavailable", "driver-not-loaded", "host"),
                [
                    ("TfgpudDriverNotLoaded", push, "driver-not-loaded", "host"),
                    *(("TfgpudGpuVanished", push, "gpu-vanished", u) for u in (U0, U1)),
                    ("TfgpudTensorflowCpuFallback", push, "tf-cpu-fallback", "research"),
                ],
                lambda: write_scenario(
                    scenario_path,
                    [gpu(0), gpu(1)],
                    init_error="DRIVER_NOT_LOADED",
                    cuda_init_error=100,
                ),
                lambda: write_scenario(scenario_path, [gpu(0), gpu(1)]),
            )
            # 2. NVML fails for the whole driver with an error no other finding names: one
            # nvml-unusable, the cause of both vanished GPUs and of the env's fallback.
            phase(
                "NVML unusable",
                ("TfgpudNvidiaDriverUnavailable", "nvml-unusable", "host"),
                [
                    ("TfgpudNvmlUnusable", push, "nvml-unusable", "host"),
                    *(("TfgpudGpuVanished", push, "gpu-vanished", u) for u in (U0, U1)),
                    ("TfgpudTensorflowCpuFallback", push, "tf-cpu-fallback", "research"),
                ],
                lambda: write_scenario(scenario_path, [gpu(0), gpu(1)], init_error="UNKNOWN"),
                lambda: write_scenario(scenario_path, [gpu(0), gpu(1)]),
            )
            # 3. One GPU falls off the bus.
            phase(
                "one GPU lost",
                ("TfgpudGpuLost", "gpu-lost", U1),
                [("TfgpudGpuLost", push, "gpu-lost", U1)],
                lambda: write_scenario(scenario_path, [gpu(0), gpu(1, lost=True)]),
                lambda: write_scenario(scenario_path, [gpu(0), gpu(1)]),
            )
            # 4. The env loses its CUDA libraries (the real probe says tf-cuda-libs-missing).
            phase(
                "TF env without CUDA libraries",
                ("TfgpudTensorflowCpuFallback", "tf-cuda-libs-missing", "research"),
                [
                    ("TfgpudTensorflowCudaLibsMissing", push, "tf-cuda-libs-missing", "research"),
                    ("TfgpudTensorflowCpuFallback", push, "tf-cpu-fallback", "research"),
                ],
                lambda: reconfigure(None),
                lambda: reconfigure(stubs),
            )
            daemon.stop()
        print("\n" + "\n".join(report))
        paged = {n: sorted({who({"labels": x}) for x in ls}) for n, ls in pages.paged.items()}
        for name, alerts in paged.items():
            print(f"pages in '{name}': " + ", ".join(alerts))
        # Each phase paged its root cause only (the rule's alert, or the push if it came first),
        # and fixing it paged nothing.
        log = daemon.stderr()[-6000:] + "\n".join(
            f"{t - pages.notifications[0][0]:6.1f}s {path}: "
            + "; ".join(f"{a['status']} {who(a)}" for a in doc["alerts"])
            for t, path, doc in pages.notifications
        )
        assert set(paged) == set(causes), log
        for name, (code, subject) in causes.items():
            assert all(p.endswith(f" {code} {subject}") for p in paged[name]), log
    finally:
        pages.close()
