"""A real Prometheus scrapes the real daemon (simulated driver) through TLS + basic auth, and
every PromQL expression in the Grafana dashboard returns data from what it scraped.

One daemon and one Prometheus (1 s scrape interval, temp TSDB, loopback port) per module; both
are stopped by PID whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess, free_port
from helpers import fake_tf_python, write_scenario
from tlsutil import Pki, bcrypt_hash, make_pki, web_config_yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "packaging" / "grafana" / "tfgpud.json"
PROMETHEUS = shutil.which("prometheus")
PASSWORD = "scrape-me"
GIB = 1024**3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None, reason="prometheus not installed (apt install prometheus)"
    ),
]


@dataclass
class Stack:
    prom_url: str
    instance: str
    envs: tuple[str, ...]


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    try:
        doc = _get_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{expr}: {exc.read().decode(errors='replace')}") from None
    assert doc["status"] == "success", doc
    result = doc["data"]["result"]
    if doc["data"]["resultType"] == "scalar":
        return [{"value": result}]
    return list(result)


def _wait(what: str, ok: Any, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except OSError as exc:
            last = exc
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what} ({last}); log tail:\n{tail}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fakedriver: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("promstack")
    pki: Pki = make_pki(tmp / "pki")
    scenario = tmp / "scenario.toml"
    write_scenario(
        scenario,
        gpus=[
            {
                "name": "NVIDIA A100-SXM4-80GB",
                "memory_total": 80 * GIB,
                "memory_used": 30 * GIB,
                "utilization_gpu": 87,
                "process_pids": [os.getpid()],
                "process_memory": [30 * GIB],
            },
            {"name": "NVIDIA A100-SXM4-80GB", "memory_total": 80 * GIB, "xids": [79, 13]},
        ],
        driver_version="550.54.14",
        cuda_driver_version=12040,
    )
    envs = ("research", "cpuonly")
    body = (
        f'[[tensorflow.envs]]\nname = "research"\npython = "{fake_tf_python(tmp / "py2", 2)}"\n'
        f'[[tensorflow.envs]]\nname = "cpuonly"\npython = "{fake_tf_python(tmp / "py0", 0)}"\n'
    )
    web = tmp / "web-config.yml"
    web.write_text(web_config_yaml(pki, {"prometheus": bcrypt_hash(PASSWORD)}))
    daemon = DaemonProcess(tmp / "daemon", body, scenario=scenario, interval=0.5)
    daemon.config.write_text(
        daemon.config.read_text().replace("[http]\n", f'[http]\nweb_config_file = "{web}"\n', 1)
    )
    instance = f"127.0.0.1:{daemon.port}"
    prom_port = free_port()
    prom_url = f"http://127.0.0.1:{prom_port}"
    job = {
        "scheme": "https",
        "tls_config": {"ca_file": str(pki.ca_crt)},
        "static_configs": [{"targets": [instance]}],
    }
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "tfgpud", "basic_auth": {"username": "prometheus", "password": PASSWORD},
             **job},
            {"job_name": "wrong-password",
             "basic_auth": {"username": "prometheus", "password": "nope"}, **job},
        ],
    }  # fmt: skip
    (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    log = tmp / "prometheus.log"
    prom: subprocess.Popen[bytes] | None = None
    with daemon:
        daemon.start()
        try:
            with open(log, "wb") as out:
                prom = subprocess.Popen(
                    [
                        str(PROMETHEUS),
                        f"--config.file={tmp / 'prometheus.yml'}",
                        f"--storage.tsdb.path={tmp / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                        "--log.level=warn",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            _wait(
                "five scrapes with both TF envs probed",
                lambda: query(
                    prom_url,
                    'count_over_time(up{job="tfgpud"}[1m]) >= 5 and on() '
                    "count(tfgpud_tf_info) == 2 and on() "
                    'count_over_time(tfgpud_tf_info{env="cpuonly"}[1m]) >= 2',
                ),
                timeout=60,
                log=log,
            )
            yield Stack(prom_url=prom_url, instance=instance, envs=envs)
        finally:
            if prom is not None:
                prom.terminate()
                try:
                    prom.wait(10)
                except subprocess.TimeoutExpired:
                    prom.kill()
                    prom.wait(5)
            daemon.stop()


def test_prometheus_scrapes_through_tls_and_basic_auth(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    up = {r["metric"]["job"]: r["value"][1] for r in query(stack.prom_url, "up")}
    assert up == {"tfgpud": "1", "wrong-password": "0"}
    targets = _get_json(f"{stack.prom_url}/api/v1/targets")["data"]["activeTargets"]
    errors = {t["labels"]["job"]: t["lastError"] for t in targets}
    assert errors["tfgpud"] == ""
    assert "401" in errors["wrong-password"]
    durations = query(
        stack.prom_url, 'quantile_over_time(0.5, scrape_duration_seconds{job="tfgpud"}[1m])'
    )
    p50 = float(durations[0]["value"][1])
    worst = float(
        query(stack.prom_url, 'max_over_time(scrape_duration_seconds{job="tfgpud"}[1m])')[0][
            "value"
        ][1]
    )
    with capsys.disabled():
        print(
            f"\n[prometheus] TLS + basic-auth scrape of the daemon: median "
            f"{p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms"
        )
    assert p50 < 0.5


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((f"{p['title']} / {t['refId']}", t["expr"]))

    walk(dash["panels"])
    return out


def _substitute(expr: str, stack: Stack) -> str:
    values = {
        "job": "tfgpud",
        "instance": stack.instance,  # Grafana's single value; a regex match of itself
        "env": "|".join(stack.envs),
        "__rate_interval": "1m",
        "__interval": "15s",
        "__range": "5m",
    }
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


def test_every_dashboard_expression_returns_data(stack: Stack) -> None:
    exprs = _dashboard_exprs()
    assert len(exprs) >= 25
    empty = []
    for where, expr in exprs:
        if not query(stack.prom_url, _substitute(expr, stack)):
            empty.append(f"{where}: {expr}")
    assert not empty, "expressions without data:\n" + "\n".join(empty)


def test_dashboard_variables_resolve_and_the_layers_agree(stack: Stack) -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    for name in ("job", "instance", "env"):
        q = variables[name]["query"]["query"]
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", q)
        assert m, q
        selector, label = _substitute(m.group(1), stack), m.group(2)
        url = f"{stack.prom_url}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
            {"match[]": selector}
        )
        values = _get_json(url)["data"]
        assert values, q
    assert set(_get_json(f"{stack.prom_url}/api/v1/label/env/values")["data"]) >= set(stack.envs)

    # The three layers as the dashboard shows them: 2 on PCI? (the fake PCI tree is the host's,
    # so only NVML and TF are pinned), 2 in NVML, 2 and 0 in the two envs, cpuonly falls back.
    def one(expr: str) -> float:
        return float(query(stack.prom_url, expr)[0]["value"][1])

    assert one("tfgpud_nvml_gpus") == 2
    assert one('tfgpud_tf_visible_gpus{env="research"}') == 2
    assert one('tfgpud_tf_visible_gpus{env="cpuonly"}') == 0
    assert one('tfgpud_tf_cpu_fallback{env="cpuonly"}') == 1
    assert one('tfgpud_finding{code="gpu-xid-critical"}') == 1
    assert one("sum(tfgpud_gpu_xid_errors_total)") == 2
