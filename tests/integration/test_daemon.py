"""The real `tfgpud run` process on the simulated driver, with a real NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess, free_port
from helpers import write_scenario

INTERVAL = 0.3
U0 = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
U1 = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
U2 = "GPU-aaaaaaaa-0000-4000-8000-000000000002"


def gpu(uuid: str, index: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "NVIDIA RTX A6000",
        "uuid": uuid,
        "pci_bus_id": f"00000000:{index + 1:02X}:00.0",
        "memory_total": 51527024640,
        "memory_used": 1000000000 * (index + 1),
        "utilization_gpu": 10 * (index + 1),
        "temperature": 40 + index,
        "power_mw": 100000 + index * 1000,
        "cc_major": 8,
        "cc_minor": 6,
    }
    base.update(extra)
    return base


def two_gpus(path: Path, **top: Any) -> None:
    write_scenario(
        path,
        [gpu(U0, 0, process_pids=[4242], process_memory=[123456789]), gpu(U1, 1)],
        driver_version="550.54.15",
        cuda_driver_version=12040,
        **top,
    )


def up(m: dict[str, float], uuid: str, index: int) -> float | None:
    return m.get(f'tfgpud_gpu_up{{gpu="{index}",uuid="{uuid}"}}')


@pytest.fixture
def daemon(tmp_path: Path, fakedriver: Path, scenario_path: Path) -> Any:
    two_gpus(scenario_path)
    with DaemonProcess(tmp_path, scenario=scenario_path, interval=INTERVAL) as d:
        yield d


def test_notify_protocol_in_order(daemon: DaemonProcess) -> None:
    d = daemon.start()
    n = d.notify
    ready = n.wait_for(lambda m: m.get("READY") == "1")
    first = n.snapshot()[ready]
    assert first["STATUS"].startswith("2 GPUs, driver 550.54.15, CUDA 12.4")
    wd = n.wait_for(lambda m: m.get("WATCHDOG") == "1", after=ready)
    # Pings keep coming while the loop advances (WATCHDOG_USEC=1 s -> every 0.5 s).
    n.wait_for(lambda m: m.get("WATCHDOG") == "1", after=wd + 1, timeout=3)
    d.signal(signal.SIGHUP)
    rel = n.wait_for(lambda m: m.get("RELOADING") == "1", after=wd)
    assert int(n.snapshot()[rel]["MONOTONIC_USEC"]) > 0
    n.wait_for(lambda m: m.get("READY") == "1", after=rel + 1)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc is not None
    assert d.proc.wait(5) == 0
    assert time.monotonic() - t0 < 2.0
    n.wait_for(lambda m: m.get("STOPPING") == "1", after=rel, timeout=1)
    assert "Traceback" not in d.stderr()


def test_metrics_match_the_scenario(daemon: DaemonProcess) -> None:
    m = daemon.start().metrics()
    assert m["tfgpud_nvml_up"] == 1
    assert m["tfgpud_nvml_gpus"] == 2
    assert m['tfgpud_driver_info{cuda_driver_version="12.4",driver_version="550.54.15"}'] == 1
    ids = f'gpu="0",uuid="{U0}"'
    assert m[f"tfgpud_gpu_memory_total_bytes{{{ids}}}"] == 51527024640
    assert m[f"tfgpud_gpu_memory_used_bytes{{{ids}}}"] == 1000000000
    assert m[f"tfgpud_gpu_memory_free_bytes{{{ids}}}"] == 51527024640 - 1000000000
    assert m[f"tfgpud_gpu_utilization_ratio{{{ids}}}"] == pytest.approx(0.1)
    assert m[f"tfgpud_gpu_temperature_celsius{{{ids}}}"] == 40
    assert m[f"tfgpud_gpu_power_watts{{{ids}}}"] == 100
    # Pid 4242 is not this host's (or another user's): memory by user "other", no pid series.
    by = f'{{gpu="0",kind="other",user="other",uuid="{U0}"}}'
    assert m[f"tfgpud_gpu_user_memory_bytes{by}"] == 123456789
    assert m[f"tfgpud_gpu_user_processes{by}"] == 1
    assert not [k for k in m if k.startswith("tfgpud_gpu_process_memory_bytes")]
    info = (
        f'tfgpud_gpu_info{{compute_capability="8.6",gpu="1",name="NVIDIA RTX A6000",'
        f'pci_bus_id="00000000:02:00.0",uuid="{U1}"}}'
    )
    assert m[info] == 1
    assert m[f'tfgpud_gpu_xid_errors_total{{gpu="1",uuid="{U1}",xid="79"}}'] == 0
    assert m['tfgpud_collector_success{collector="nvml"}'] == 1
    status, body = daemon.get("/healthz")
    assert status == 200 and body.startswith("ok")
    status, page = daemon.get("/")
    assert status == 200 and U0 in page and "550.54.15" in page


def test_scenario_changes_are_seen_within_one_interval(
    daemon: DaemonProcess, scenario_path: Path
) -> None:
    d = daemon.start()
    timings: dict[str, float] = {}

    def change(name: str, check: Any, **write: Any) -> None:
        write_scenario(scenario_path, **write)
        took, _ = d.wait_metric(check, timeout=10)
        timings[name] = took

    base = dict(driver_version="550.54.15", cuda_driver_version=12040)
    change(
        "lost",
        lambda m: up(m, U1, 1) == 0,
        gpus=[gpu(U0, 0), gpu(U1, 1, lost=True)],
        **base,
    )
    change(
        "removed",
        lambda m: m.get("tfgpud_nvml_gpus") == 1 and up(m, U1, 1) is None,
        gpus=[gpu(U0, 0)],
        **base,
    )
    change(
        "added",
        lambda m: m.get("tfgpud_nvml_gpus") == 2 and up(m, U2, 1) == 1,
        gpus=[gpu(U0, 0), gpu(U2, 1)],
        **base,
    )
    change(
        "driver unloaded",
        lambda m: m.get("tfgpud_nvml_up") == 0 and "tfgpud_nvml_gpus" not in m,
        gpus=[gpu(U0, 0), gpu(U2, 1)],
        init_error="DRIVER_NOT_LOADED",
        **base,
    )
    change(
        "driver back",
        lambda m: m.get("tfgpud_nvml_up") == 1 and up(m, U2, 1) == 1,
        gpus=[gpu(U0, 0), gpu(U2, 1)],
        **base,
    )
    assert d.proc is not None and d.proc.poll() is None, d.stderr()
    # One interval plus the scrape loop's own granularity and slack for a loaded 2-core CI box.
    print("scenario change -> metrics (s):", {k: round(v, 3) for k, v in timings.items()})
    slow = {k: v for k, v in timings.items() if v > INTERVAL + 0.7}
    assert not slow, timings
    _, status = d.get("/status")
    assert "gpu-vanished" in status  # U1 was seen, then disappeared: the baseline remembers
    assert d.stop() == 0


def test_without_any_nvml_library_it_serves_nvml_up_zero(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, with_library=False) as d:
        m = d.start().metrics()
        assert m["tfgpud_nvml_up"] == 0
        assert "tfgpud_nvml_gpus" not in m
        assert m['tfgpud_collector_success{collector="nvml"}'] == 1
        _, status = d.get("/status")
        assert "LIBRARY_NOT_FOUND" in status
        assert d.stop() == 0


def test_port_in_use_is_one_paragraph_and_exit_1(tmp_path: Path, fakedriver: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with DaemonProcess(tmp_path) as d:
            d.config.write_text(d.config.read_text().replace(str(d.port), str(port)))
            d.start(wait_ready=False)
            assert d.proc is not None
            assert d.proc.wait(10) == 1
            err = d.stderr()
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err
    assert not any(m.get("READY") == "1" for m in d.notify.snapshot())


@pytest.mark.parametrize("problem", ["invalid", "unreadable", "missing"])
def test_bad_config_exits_78_without_traceback(tmp_path: Path, problem: str) -> None:
    with DaemonProcess(tmp_path) as d:
        if problem == "invalid":
            d.config.write_text("[daemon]\ninterval_seconds = -1\n")
        elif problem == "unreadable":
            d.config.write_bytes(b"\xff\xfe not utf-8")
        else:
            d.config.unlink()
        d.start(wait_ready=False)
        assert d.proc is not None
        assert d.proc.wait(10) == 78
        err = d.stderr()
    assert str(d.config) in err
    assert "Traceback" not in err


def test_reload_with_invalid_config_keeps_the_old_one(
    daemon: DaemonProcess, scenario_path: Path
) -> None:
    d = daemon.start()
    good = d.config.read_text()
    d.config.write_text(good + "\n[bogus]\nx = 1\n")
    d.signal(signal.SIGHUP)
    d.notify.wait_for(lambda m: m.get("RELOADING") == "1")
    deadline = time.monotonic() + 5
    while "reload failed" not in d.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reload failed; keeping the running configuration" in d.stderr()
    assert "unknown key `bogus`" in d.stderr()
    # Still serving, still polling.
    before = d.metrics()["tfgpud_polls_total"]
    d.wait_metric(lambda m: m["tfgpud_polls_total"] > before + 1)
    # A valid change is applied: a new port is not (restart), a new interval is.
    d.config.write_text(good.replace(f"interval_seconds = {INTERVAL}", "interval_seconds = 5"))
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "configuration reloaded" not in d.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "configuration reloaded" in d.stderr()
    assert d.stop() == 0


def test_status_command_reads_the_running_daemon(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    from tfgpud.cli import main

    d = daemon.start()
    assert main(["status", "--url", d.url]) == 0
    out = capsys.readouterr().out
    assert "2 GPUs, driver 550.54.15" in out
    assert U0 in out
    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    assert "cannot read" in capsys.readouterr().err


GOLDEN = Path(__file__).parent / "golden" / "two_gpus.prom"
# Values that change from run to run: timings, timestamps, counts of polls.
# The workloads collector reads this host's real /proc: its counts depend on what else runs.
VOLATILE = (
    "_duration_seconds",
    "_timestamp_seconds",
    "tfgpud_polls_total",
    "tfgpud_build_info",
    "tfgpud_tf_processes",
    "tfgpud_workloads_",
)


def test_exposition_for_a_fixture_scenario_matches_golden(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    import os

    write_scenario(
        scenario_path,
        [
            gpu(U0, 0, process_pids=[4194303], process_memory=[123456789], xids=[79]),
            gpu(U1, 1, lost=True),
        ],
        driver_version="550.54.15",
        cuda_driver_version=12040,
    )
    # The host label of tfgpud_finding is [alerts] instance (default: this machine's name).
    body = '[alerts]\ninstance = "gpu-node-01"\n'
    with DaemonProcess(tmp_path, body, scenario=scenario_path, interval=INTERVAL) as d:
        d.start()
        # The Xid arrives on its own thread; wait until it is counted.
        d.wait_metric(
            lambda m: m.get(f'tfgpud_gpu_xid_errors_total{{gpu="0",uuid="{U0}",xid="79"}}') == 1
        )
        _, text = d.get("/metrics")
        assert d.stop() == 0
    stable = "".join(
        line + "\n"
        for line in text.splitlines()
        if not any(v in line.split("{")[0].split(" ")[0] for v in VOLATILE) or line.startswith("#")
    )
    if os.environ.get("TFGPUD_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(stable)
    assert stable == GOLDEN.read_text()


def test_a_landed_probe_is_diagnosed_at_once_not_at_the_next_tick(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    two_gpus(scenario_path)
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\nsleep 1\necho 'not json'\n")
    fake_python.chmod(0o755)
    env = f'[[tensorflow.envs]]\nname = "slow"\npython = "{fake_python}"\n'
    with DaemonProcess(tmp_path, config_body=env, scenario=scenario_path, interval=60) as d:
        d.start()
        assert 'tfgpud_tf_probe_success{env="slow"}' not in d.metrics()  # still probing
        took, m = d.wait_metric(lambda m: 'tfgpud_tf_probe_success{env="slow"}' in m, timeout=10)
        assert m['tfgpud_tf_probe_success{env="slow"}'] == 0
        assert took < 5, took  # the poll interval is 60 s
        assert d.stop() == 0


def test_reload_reconfigures_alert_sinks(daemon: DaemonProcess) -> None:
    d = daemon.start()
    port = free_port()
    d.config.write_text(
        d.config.read_text() + f'\n[[alerts.webhook]]\nurl = "http://127.0.0.1:{port}/hook"\n'
    )
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "alert sinks reconfigured" not in d.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "alert sinks reconfigured: 1 sink(s)" in d.stderr()
    d.wait_metric(lambda m: 'tfgpud_alerts_sent_total{sink="webhook[0]"}' in m)
    assert d.stop() == 0


def test_reload_to_a_shorter_interval_applies_at_once(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    two_gpus(scenario_path)
    with DaemonProcess(tmp_path, scenario=scenario_path, interval=3600) as d:
        d.start()
        before = d.metrics()["tfgpud_polls_total"]
        d.config.write_text(
            d.config.read_text().replace("interval_seconds = 3600", "interval_seconds = 0.2")
        )
        d.signal(signal.SIGHUP)
        took, _ = d.wait_metric(lambda m: m["tfgpud_polls_total"] >= before + 5, timeout=10)
        assert took < 5, took
        assert d.stop() == 0


def test_driver_upgrade_under_a_running_daemon_says_restart_tfgpud(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    import shutil

    two_gpus(scenario_path)
    libdir = tmp_path / "driver-550"
    libdir.mkdir()
    lib = libdir / "libnvidia-ml.so.1"
    shutil.copy(fakedriver / "libnvidia-ml.so.1", lib)
    with DaemonProcess(
        tmp_path / "d",
        config_body=f'[nvml]\nlibrary = "{lib}"\n',
        scenario=scenario_path,
        with_library=False,
    ) as d:
        d.start()
        assert d.metrics()["tfgpud_nvml_up"] == 1
        # The upgrade replaces the library file and reloads the module: this process still
        # maps the old (now deleted) file, and NVML answers "version mismatch".
        lib.unlink()
        two_gpus(scenario_path, init_error="LIB_RM_VERSION_MISMATCH")
        d.wait_metric(lambda m: m.get("tfgpud_nvml_up") == 0)
        _, status = d.get("/status")
        assert "systemctl restart tfgpud" in status
        assert "previous driver's NVML library" in status
        assert d.stop() == 0
