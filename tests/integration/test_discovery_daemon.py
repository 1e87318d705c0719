"""Discovery in the real daemon (``tfgpud run`` on the simulated driver): envs found in a root
made by the test join the probe schedule, rediscovery adds and drops them without a restart
(a vanished env's series and findings end), and a GPU machine with nothing to probe says so
(``tf-no-env``) in ``/status``, the page, ``tfgpud status`` and ``tfgpud doctor`` — a CPU-only
machine never does.

The envs' interpreters are scripts that answer like the probe (a CUDA build that sees no GPU)
and report who ran them. Roots are in a scratch dir every user can traverse: run as root, a
root-owned env is probed as ``nobody``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess
from helpers import fakedriver_env, finding_value, write_scenario

from tfgpud.collectors.discovery import base_label

INTERVAL = 0.3
GPUS = [
    {"name": "NVIDIA RTX A6000", "uuid": f"GPU-eeeeeeee-0000-4000-8000-00000000000{i}"}
    for i in range(2)
]
# Answers like tfprobe.py (schema 1): a CUDA build that lists no GPU; says who ran it in a file.
FAKE_PYTHON = """#!/bin/sh
id -u > {ran_as}
printf '{{"schema": 1, "tf_version": "2.21.0", "gpus": [], "build_info": {{"is_cuda_build": "True",
 "cuda_version": "12.5.1"}}}}\\n'
"""


def tf_venv(prefix: Path, ran_as: Path | None = None) -> Path:
    """A venv discovery recognises (pyvenv.cfg, a tensorflow dist-info) with a fake python
    that writes the uid it runs as to ``ran_as``."""
    python = FAKE_PYTHON.format(ran_as=ran_as or "/dev/null")
    meta = prefix / "lib" / "python3.11" / "site-packages" / "tensorflow-2.21.0.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorflow\nVersion: 2.21.0\n")
    (prefix / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.2\n")
    (prefix / "bin").mkdir()
    (prefix / "bin" / "python").write_text(python)
    (prefix / "bin" / "python").chmod(0o755)
    return prefix


def discover_only(root: Path, interval: int = 3600) -> str:
    """[tensorflow.discover] searching ``root`` only (not this machine's homes or /usr)."""
    return (
        f'[tensorflow.discover]\nroots = ["{root}"]\njupyter = false\nconda = false\n'
        f"system = false\ninterval_seconds = {interval}\n"
    )


def status(d: DaemonProcess) -> dict[str, Any]:
    _, body = d.get("/status")
    doc: dict[str, Any] = json.loads(body)
    return doc


def wait_status(d: DaemonProcess, pred: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = status(d)
        if pred(doc):
            return doc
        time.sleep(0.1)
    raise AssertionError(f"/status never matched: {doc}\n{d.stderr()}")


def probed(doc: dict[str, Any]) -> dict[str, str]:
    return {t["env"]: t["status"] for t in doc["tensorflow"]}


def subjects(doc: dict[str, Any], code: str) -> set[str]:
    return {f["subject"] for f in doc["findings"] if f["code"] == code}


def test_rediscovery_adds_and_drops_envs_and_a_vanished_envs_series_end(
    tmp_path: Path, shared_tmp: Path, fakedriver: Path, scenario_path: Path
) -> None:
    write_scenario(scenario_path, GPUS, driver_version="550.54.15", cuda_driver_version=12040)
    root = shared_tmp / "srv"
    ran = shared_tmp / "ran"
    ran.mkdir(mode=0o777)
    ran.chmod(0o777)  # whoever the probe runs as can say so
    a = tf_venv(root / "team-a", ran / "a")
    b = root / "team-b"
    la, lb = base_label(str(a)), base_label(str(b))
    body = discover_only(root, interval=1)
    with DaemonProcess(tmp_path, body, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        pid = d.proc.pid if d.proc else None
        doc = wait_status(d, lambda doc: probed(doc).get(la) == "ok")
        assert la in subjects(doc, "tf-cpu-fallback")  # diagnosed like any env
        # Its owner's privilege, never more: root's env runs as nobody, one's own as oneself.
        me = os.geteuid()
        assert (ran / "a").read_text().strip() == str(
            pwd.getpwnam("nobody").pw_uid if me == 0 else me
        )
        m = d.metrics()
        assert m['tfgpud_tf_envs{source="discovered"}'] == 1
        assert m['tfgpud_tf_envs{source="configured"}'] == 0
        assert m[f'tfgpud_tf_probe_success{{env="{la}"}}'] == 1
        assert m[f'tfgpud_tf_cpu_fallback{{env="{la}"}}'] == 1
        assert m['tfgpud_collector_success{collector="discovery"}'] == 1
        assert 'tfgpud_collector_duration_seconds{collector="discovery"}' in m
        assert "tf-no-env" not in {f["code"] for f in doc["findings"]}

        tf_venv(b, ran / "b")  # a new env: found by the next search, probed without a restart
        wait_status(d, lambda doc: probed(doc).get(lb) == "ok")
        d.wait_metric(lambda m: m['tfgpud_tf_envs{source="discovered"}'] == 2)

        shutil.rmtree(a)  # gone: its series end and its findings clear
        _, m = d.wait_metric(lambda m: f'tfgpud_tf_probe_success{{env="{la}"}}' not in m)
        assert not any(f'env="{la}"' in k or f'subject="{la}"' in k for k in m), sorted(m)
        assert m['tfgpud_tf_envs{source="discovered"}'] == 1
        doc = status(d)
        assert set(probed(doc)) == {lb} and subjects(doc, "tf-cpu-fallback") == {lb}
        assert d.proc is not None and d.proc.pid == pid and d.proc.poll() is None
        assert d.stop() == 0
    err = d.stderr()
    assert f"TensorFlow env {lb} discovered" in err and f"TensorFlow env {la} is no longer" in err


def doctor(config: Path, scenario: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tfgpud", "doctor", "--config", str(config)],
        env=fakedriver_env(scenario),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_tf_no_env_on_a_gpu_machine_with_nothing_to_probe_everywhere_it_shows(
    tmp_path: Path, fakedriver: Path, scenario_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tfgpud.cli import main

    empty = tmp_path / "roots" / "home"
    empty.mkdir(parents=True)
    write_scenario(scenario_path, GPUS)
    body = discover_only(empty)
    with DaemonProcess(tmp_path / "d", body, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        f = next(f for f in status(d)["findings"] if f["code"] == "tf-no-env")
        assert (f["severity"], f["subject"]) == ("warning", "host")
        assert f"root {empty}: searched" in f["evidence"]
        assert "[[tensorflow.envs]]" in f["fix"] and str(empty) in f["fix"]
        _, page = d.get("/")
        assert "tf-no-env" in page and f"root {empty}: searched" in page
        assert main(["status", "--url", d.url]) == 0
        assert "[warning] tf-no-env (host)" in capsys.readouterr().out
        assert finding_value(d.metrics(), "tf-no-env", "host") == 1
        code, report = doctor(d.config, scenario_path)
        assert code == 1, report
        assert "[WARNING] tf-no-env  (host)" in report and f"root {empty}: searched" in report
        assert d.stop() == 0


def test_never_tf_no_env_on_a_cpu_only_machine(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    empty = tmp_path / "roots" / "home"
    empty.mkdir(parents=True)
    write_scenario(scenario_path, [])  # the driver answers, no GPU (and none on this PCI bus)
    body = discover_only(empty)
    with DaemonProcess(tmp_path / "d", body, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        doc = wait_status(d, lambda doc: doc.get("polls", 0) >= 3)
        assert "tf-no-env" not in {f["code"] for f in doc["findings"]}
        code, report = doctor(d.config, scenario_path)
        assert d.stop() == 0
    assert code == 0 and "tf-no-env" not in report, report


def test_reload_turns_discovery_off_and_on_without_a_restart(
    tmp_path: Path, shared_tmp: Path, fakedriver: Path, scenario_path: Path
) -> None:
    import signal

    write_scenario(scenario_path, GPUS)
    root = shared_tmp / "opt"
    label = base_label(str(tf_venv(root / "tf")))
    on = discover_only(root)
    with DaemonProcess(tmp_path, on, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        wait_status(d, lambda doc: probed(doc).get(label) == "ok")
        d.config.write_text(
            d.config.read_text().replace(on, "[tensorflow.discover]\nenabled = false\n")
        )
        d.signal(signal.SIGHUP)
        doc = wait_status(d, lambda doc: not doc["tensorflow"])
        assert "tf-no-env" in {f["code"] for f in doc["findings"]}  # nothing left to probe
        d.wait_metric(lambda m: 'tfgpud_collector_success{collector="discovery"}' not in m)
        d.config.write_text(
            d.config.read_text().replace("[tensorflow.discover]\nenabled = false\n", on)
        )
        d.signal(signal.SIGHUP)
        doc = wait_status(d, lambda doc: probed(doc).get(label) == "ok")
        assert "tf-no-env" not in {f["code"] for f in doc["findings"]}
        assert d.stop() == 0
