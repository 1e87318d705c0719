"""The real daemon on the simulated driver: the persisted baseline across restarts, a corrupt
state file, `tfgpud baseline forget` while running, and alert delivery to a webhook that hangs
or fails (it must never slow the poll loop)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess, healthy_tf_env
from helpers import write_scenario

INTERVAL = 0.2
U0 = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
U1 = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
NAME = "NVIDIA RTX A6000"


def gpu(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": NAME,
        "uuid": [U0, U1][i],
        "pci_bus_id": f"00000000:{i + 1:02X}:00.0",
        "memory_total": 51527024640,
        **extra,
    }


def findings(d: DaemonProcess) -> dict[tuple[str, str], dict[str, Any]]:
    _, body = d.get("/status")
    return {(f["code"], f["subject"]): f for f in json.loads(body)["findings"]}


def wait_findings(
    d: DaemonProcess, pred: Any, timeout: float = 10.0
) -> dict[tuple[str, str], dict[str, Any]]:
    deadline = time.monotonic() + timeout
    last: dict[tuple[str, str], dict[str, Any]] = {}
    while time.monotonic() < deadline:
        last = findings(d)
        if pred(last):
            return last
        time.sleep(0.05)
    raise AssertionError(f"findings never matched in {timeout}s: {sorted(last)}")


def baseline_uuids(state: Path) -> list[str]:
    try:
        return [g["uuid"] for g in json.loads((state / "baseline.json").read_text())["gpus"]]
    except (OSError, ValueError):
        return []


def learn_two(tmp: Path, scenario: Path) -> None:
    """A first daemon run that learns two GPUs and stops."""
    write_scenario(scenario, [gpu(0), gpu(1)])
    with DaemonProcess(tmp, scenario=scenario, interval=INTERVAL) as d:
        d.start()
        assert baseline_uuids(tmp / "state") == [U0, U1]
        assert d.stop() == 0
    (tmp / "notify.sock").unlink()  # the next DaemonProcess in ``tmp`` binds it again


def test_restart_with_one_gpu_fewer_reports_it_vanished(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    learn_two(tmp_path, scenario_path)
    write_scenario(scenario_path, [gpu(0)])  # GPU 1 gone while the daemon was down
    body = "[alerts]\nfor_seconds = 0\n"
    with DaemonProcess(tmp_path, body, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        f = findings(d)[("gpu-vanished", U1)]  # right at the first poll
        assert f["severity"] == "critical"
        assert U1 in f["summary"] and NAME in f["summary"] and "00000000:02:00.0" in f["summary"]
        assert ("gpu-vanished", U0) not in findings(d)
        m = d.metrics()
        host = socket.gethostname()
        key = (
            f'tfgpud_finding{{cause="TfgpudGpuVanished",code="gpu-vanished",host="{host}",'
            f'role="cause",severity="critical",subject="{U1}"}}'
        )
        assert m[key] == 1
        assert m["tfgpud_expected_gpus"] == 2 and m["tfgpud_nvml_gpus"] == 1
        assert m["tfgpud_alerts_firing"] >= 1
        d.stop()
    assert f"FIRING [critical] gpu-vanished ({U1})" in d.stderr()
    assert baseline_uuids(tmp_path / "state") == [U0, U1]  # still expected


def test_restart_with_a_gpu_lost_before_it_could_be_read_names_it_once(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    learn_two(tmp_path, scenario_path)
    # GPU 1 fell off the bus while the daemon was down: NVML cannot even tell its UUID now.
    write_scenario(scenario_path, [gpu(0), {**gpu(1), "lost": True}])
    with DaemonProcess(tmp_path, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        f = findings(d)
        assert ("gpu-lost", U1) in f  # the baseline says which GPU it must be
        assert ("gpu-vanished", U1) not in f  # and it is not counted twice
        assert not any(s.startswith("GPU-unknown") for _, s in f)
        assert NAME in f[("gpu-lost", U1)]["summary"]
        d.stop()


def test_restart_with_the_driver_down_reports_every_gpu_vanished(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    learn_two(tmp_path, scenario_path)
    write_scenario(scenario_path, [gpu(0), gpu(1)], init_error="DRIVER_NOT_LOADED")
    with DaemonProcess(tmp_path, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        f = findings(d)
        assert {("gpu-vanished", U0), ("gpu-vanished", U1), ("driver-not-loaded", "host")} <= set(f)
        assert "driver is not answering" in f[("gpu-vanished", U1)]["summary"] or (
            "gone from the PCI bus" in f[("gpu-vanished", U1)]["summary"]
        )
        assert d.metrics()["tfgpud_nvml_up"] == 0
        # The driver comes back: the vanished findings clear.
        write_scenario(scenario_path, [gpu(0), gpu(1)])
        wait_findings(d, lambda f: not any(code == "gpu-vanished" for code, _ in f))


def test_nvml_failing_for_a_reason_no_rule_names_is_the_one_cause_of_the_vanished_gpus(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    """NVML's init answers UNKNOWN after a restart, then (driver back, then failing again under
    the running daemon) the GPU count fails: each time one nvml-unusable finding, the cause of
    both vanished GPUs, so the alerts carry one root cause."""
    learn_two(tmp_path, scenario_path)
    write_scenario(scenario_path, [gpu(0), gpu(1)], init_error="UNKNOWN")
    host = socket.gethostname()

    def one_cause(f: dict[tuple[str, str], dict[str, Any]], says: str) -> None:
        cause = f[("nvml-unusable", "host")]
        assert cause["severity"] == "critical" and cause["cause"] is None
        assert says in cause["evidence"][0] and "nvidia-smi" in cause["fix"]
        assert [f[("gpu-vanished", u)]["cause"] for u in (U0, U1)] == ["nvml-unusable"] * 2
        assert "Bring the driver back first (see nvml-unusable)" in f[("gpu-vanished", U0)]["fix"]

    with DaemonProcess(tmp_path, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        one_cause(findings(d), "NVML fails for the whole driver: UNKNOWN (999)")
        m = d.metrics()

        def series(code: str, role: str, subject: str) -> str:
            return (
                f'tfgpud_finding{{cause="TfgpudNvmlUnusable",code="{code}",host="{host}",'
                f'role="{role}",severity="critical",subject="{subject}"}}'
            )

        assert m[series("nvml-unusable", "cause", "host")] == 1
        assert m[series("gpu-vanished", "consequence", U0)] == 1
        assert m[series("gpu-vanished", "consequence", U1)] == 1
        # The driver comes back, then fails under the running daemon: NVML stays initialised
        # but every call answers UNKNOWN, so the count fails.
        write_scenario(scenario_path, [gpu(0), gpu(1)])
        wait_findings(d, lambda f: not any(code == "gpu-vanished" for code, _ in f))
        assert ("nvml-unusable", "host") not in findings(d)
        write_scenario(scenario_path, [gpu(0), gpu(1)], init_error="UNKNOWN")
        f = wait_findings(d, lambda f: ("nvml-unusable", "host") in f)
        one_cause(f, "counting the GPUs failed (DEVICE_COUNT_FAILED)")
        assert d.stop() == 0
    assert "Traceback" not in d.stderr()


def test_corrupt_state_file_is_recovered_and_reported(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "baseline.json").write_bytes(b'{"version": 1, "gpus": [{"uuid": 4')
    write_scenario(scenario_path, [gpu(0), gpu(1)])
    with DaemonProcess(tmp_path, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        [corrupt] = state.glob("baseline.json.*.corrupt")
        assert corrupt.read_bytes() == b'{"version": 1, "gpus": [{"uuid": 4'
        assert baseline_uuids(state) == [U0, U1]  # rebuilt from what is seen
        f = findings(d)[("baseline-state-error", "host")]
        assert f["severity"] == "warning" and str(corrupt) in " ".join(f["evidence"])
        # The person looked at it and deleted it: the finding clears.
        corrupt.unlink()
        wait_findings(d, lambda f: ("baseline-state-error", "host") not in f)
        d.stop()
    err = d.stderr()
    assert "baseline state file unusable" in err and "Traceback" not in err


def test_baseline_forget_is_picked_up_by_the_running_daemon(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    write_scenario(scenario_path, [gpu(0), gpu(1)])
    with DaemonProcess(tmp_path, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        write_scenario(scenario_path, [gpu(0)])
        wait_findings(d, lambda f: ("gpu-vanished", U1) in f)
        out = subprocess.run(
            [sys.executable, "-m", "tfgpud", "baseline", "forget", U1, "--config", str(d.config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        wait_findings(d, lambda f: ("gpu-vanished", U1) not in f)
        assert d.metrics()["tfgpud_expected_gpus"] == 1
        assert baseline_uuids(tmp_path / "state") == [U0]


# --- delivery to a webhook that misbehaves ------------------------------------------------------


class Receiver:
    """A local webhook: mode "ok" records the JSON, "500" fails, "hang" never answers."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.attempts = 0
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.attempts += 1
                if outer.mode == "hang":
                    outer.release.wait(30)
                    return
                if outer.mode == "500":
                    self.send_response(500)
                    self.end_headers()
                    return
                outer.events.append((time.monotonic(), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def poll_cadence(d: DaemonProcess, seconds: float) -> tuple[float, float]:
    """(polls per second, longest gap between polls) measured from /metrics over ``seconds``."""
    start = d.metrics()
    stamps: list[float] = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        ts = d.metrics()["tfgpud_last_poll_timestamp_seconds"]
        if not stamps or ts != stamps[-1]:
            stamps.append(ts)
        time.sleep(0.02)
    end = d.metrics()
    rate = (end["tfgpud_polls_total"] - start["tfgpud_polls_total"]) / (
        end["tfgpud_last_poll_timestamp_seconds"] - start["tfgpud_last_poll_timestamp_seconds"]
    )
    gap = max(b - a for a, b in itertools.pairwise(stamps))
    return rate, gap


@pytest.mark.parametrize("mode", ["hang", "500"])
def test_bad_webhook_does_not_delay_polls_and_gets_the_alert_once_it_recovers(
    tmp_path: Path, fakedriver: Path, scenario_path: Path, receiver: Receiver, mode: str
) -> None:
    body = (
        "[alerts]\nfor_seconds = 0\n"
        f'[[alerts.webhook]]\nurl = "{receiver.url}"\ntimeout_seconds = 5\n'
    ) + healthy_tf_env(tmp_path / "tf")  # healthy until the test breaks a GPU
    write_scenario(scenario_path, [gpu(0), gpu(1)])
    with DaemonProcess(tmp_path, body, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        calm_rate, calm_gap = poll_cadence(d, 2.0)
        receiver.mode = mode
        write_scenario(scenario_path, [gpu(0), gpu(1, lost=True)])
        wait_findings(d, lambda f: ("gpu-lost", U1) in f)
        bad_rate, bad_gap = poll_cadence(d, 4.0)
        assert receiver.attempts >= 1  # the receiver really was being called meanwhile
        m = d.metrics()
        assert m['tfgpud_alerts_sent_total{sink="webhook[0]"}'] == 0
        if mode == "500":
            assert m['tfgpud_alerts_failed_total{sink="webhook[0]"}'] >= 2  # retried
        assert m['tfgpud_alerts_dropped_total{sink="webhook[0]"}'] == 0
        print(
            f"\n[{mode}] poll cadence (interval {INTERVAL}s): healthy receiver "
            f"{calm_rate:.2f}/s (longest gap {calm_gap:.2f}s); {mode} receiver "
            f"{bad_rate:.2f}/s (longest gap {bad_gap:.2f}s), {receiver.attempts} attempt(s)"
        )
        # A poll blocked on the 5 s timeout would show as a gap >= 5 s and the rate dropping.
        assert bad_gap < 2.0
        assert bad_rate > 0.6 / INTERVAL
        t_ok = time.monotonic()
        receiver.mode = "ok"
        receiver.release.set()
        deadline = time.monotonic() + 70
        while time.monotonic() < deadline and not receiver.events:
            time.sleep(0.05)
        assert receiver.events, "the alert was not delivered after the receiver recovered"
        at, event = receiver.events[0]
        assert (event["status"], event["code"], event["subject"]) == ("firing", "gpu-lost", U1)
        print(f"[{mode}] delivered {at - t_ok:.1f}s after the receiver recovered")
        d.wait_metric(lambda m: m['tfgpud_alerts_sent_total{sink="webhook[0]"}'] >= 1)
        assert os.path.exists(tmp_path / "state" / "alerts.json")


def test_an_alert_undelivered_at_stop_is_delivered_after_the_restart(
    tmp_path: Path, fakedriver: Path, scenario_path: Path, receiver: Receiver
) -> None:
    body = (
        "[alerts]\nfor_seconds = 0\n"
        f'[[alerts.webhook]]\nurl = "{receiver.url}"\ntimeout_seconds = 2\n'
    ) + healthy_tf_env(tmp_path / "tf")
    write_scenario(scenario_path, [gpu(0), gpu(1)])
    receiver.mode = "500"
    with DaemonProcess(tmp_path, body, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        write_scenario(scenario_path, [gpu(0)])  # GPU 1 gone: stays gone across the restart
        wait_findings(d, lambda f: ("gpu-vanished", U1) in f)
        d.wait_metric(lambda m: m['tfgpud_alerts_failed_total{sink="webhook[0]"}'] >= 1)
        assert d.stop() == 0
    assert "kept for the next start" in d.stderr()
    outbox = json.loads((tmp_path / "state" / "alerts.json").read_text())["outbox"]
    [kept] = outbox[receiver.url]
    assert (kept["state"], kept["alert"]["code"]) == ("firing", "gpu-vanished")
    (tmp_path / "notify.sock").unlink()
    receiver.mode = "ok"
    with DaemonProcess(tmp_path, body, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        d.wait_metric(lambda m: m['tfgpud_alerts_sent_total{sink="webhook[0]"}'] >= 1)
        time.sleep(3 * INTERVAL)  # a re-announcement would be a second event by now
        d.stop()
    events = [(e["status"], e["code"], e["subject"]) for _, e in receiver.events]
    assert events == [("firing", "gpu-vanished", U1)]  # once: not forgotten nor re-announced
    assert "FIRING" not in d.stderr()
