"""The workloads collector on this machine's real /proc, with real processes it starts.

A real TensorFlow process (import, then sleep) must be found on the CPU, move to the GPU when the
simulated driver lists it as a compute process, and drive `tf-job-on-cpu` in the real daemon;
holding its GPU alone it is not `gpu-memory-pressure`, and holding an idle GPU it is
`gpu-memory-held-idle`. Processes started here stand in as the holders of simulated GPU memory
(their pids in the scenario's process list; utilisation from the scenario). Every process
started here is killed and reaped.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess
from helpers import run_python, write_scenario

from tfgpud.collectors.workloads import WorkloadScanner
from tfgpud.runner import children, run_bounded

GIB = 1024**3
UUID = "GPU-c0ffee00-0000-4000-8000-000000000000"
TF_SCRIPT = "import tensorflow; import time; time.sleep(600)"
TF_LOAD_TIMEOUT = 180.0
ME = pwd.getpwuid(os.getuid()).pw_name


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _maps_have_tf(pid: int) -> bool:
    try:
        return b"libtensorflow_framework.so" in Path(f"/proc/{pid}/maps").read_bytes()
    except OSError:
        return False


@pytest.fixture(scope="module")
def tf_process() -> Iterator[subprocess.Popen[bytes]]:
    """`python -c "import tensorflow; ...; sleep"`, once TensorFlow is in its maps."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "0",  # visible, and no TF_FORCE_GPU_ALLOW_GROWTH: greedy TF
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", TF_SCRIPT],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + TF_LOAD_TIMEOUT
        while not _maps_have_tf(proc.pid):
            assert proc.poll() is None, f"the TensorFlow process exited with {proc.returncode}"
            assert time.monotonic() < deadline, "TensorFlow was not loaded in time"
            time.sleep(0.2)
        yield proc
    finally:
        _kill(proc)


@pytest.fixture
def plain_python() -> Iterator[subprocess.Popen[bytes]]:
    """A Python process without TensorFlow: a candidate by name, never counted."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        deadline = time.monotonic() + 30
        while b"python" not in Path(f"/proc/{proc.pid}/comm").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield proc
    finally:
        _kill(proc)


@pytest.mark.slow
def test_real_tf_process_is_found_on_the_cpu(
    tf_process: subprocess.Popen[bytes], plain_python: subprocess.Popen[bytes]
) -> None:
    scanner = WorkloadScanner()
    reading = scanner.scan(None, time.time())
    mine = {p.pid: p for p in reading.processes}
    assert plain_python.pid not in mine  # python, but no TensorFlow
    p = mine[tf_process.pid]
    assert p.placement == "cpu" and p.cpu_since is not None
    assert p.cmdline == f"{sys.executable} -c {TF_SCRIPT}"
    assert p.python == os.path.realpath(sys.executable)
    assert p.tensorflow_library is not None
    assert "/site-packages/tensorflow/libtensorflow_framework.so" in p.tensorflow_library
    assert p.allow_growth is False and dict(p.environment) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert p.started_at is not None and abs(p.started_at - time.time()) < TF_LOAD_TIMEOUT + 60
    assert reading.scan.candidates >= 2 and reading.scan.unreadable == 0
    # Warm: nothing read again; the placement is still decided.
    again = scanner.scan(None, time.time())
    assert again.scan.maps_read <= reading.scan.maps_read
    assert {q.pid: q.placement for q in again.processes}[tf_process.pid] == "cpu"


@pytest.mark.slow
def test_simulated_driver_listing_the_pid_makes_it_gpu(
    tf_process: subprocess.Popen[bytes], fakedriver: Path, scenario_path: Path
) -> None:
    code = f"""
import json, time
from tfgpud.collectors.nvml import NvmlSession
from tfgpud.collectors.workloads import WorkloadScanner
session = NvmlSession({str(fakedriver / "libnvidia-ml.so.1")!r})
nvml = session.poll()
reading = WorkloadScanner().scan(nvml, time.time())
session.close()
print(json.dumps({{"up": nvml.up, "placement": {{p.pid: p.placement for p in reading.processes}},
                  "users": reading.scan.gpu_process_users.get({tf_process.pid})}}))
"""
    for listed in (False, True):
        pids = [tf_process.pid] if listed else []
        write_scenario(
            scenario_path,
            [{"uuid": UUID, "process_pids": pids, "process_memory": [GIB] * len(pids)}],
        )
        result = run_python(code, scenario=scenario_path)
        assert result.data is not None, result.stderr
        assert result.data["up"] is True
        placement = result.data["placement"][str(tf_process.pid)]
        assert placement == ("gpu" if listed else "cpu")
        assert result.data["users"] == (ME if listed else None)


def test_a_child_the_runner_started_is_never_a_workload(tmp_path: Path) -> None:
    # A probe child, as the daemon starts it: through the runner, in a session of its own.
    # Named so that only it matches the scan's names (other processes here come and go).
    fake = tmp_path / "tfgpud-own-python"
    fake.symlink_to(subprocess.check_output(["which", "sleep"], text=True).strip())
    names = ("tfgpud-own-*",)
    cancel = threading.Event()
    thread = threading.Thread(
        target=run_bounded,
        args=([str(fake), "600"],),
        kwargs={"env": {}, "timeout": 60, "cancel": cancel},
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not children():
            assert time.monotonic() < deadline, "the runner's child did not start"
            time.sleep(0.02)
        everyone = WorkloadScanner(own_sessions=frozenset).scan(None, time.time(), names)
        assert everyone.scan.candidates == 1  # the child is there and would be a candidate
        reading = WorkloadScanner().scan(None, time.time(), names)
        assert reading.scan.candidates == 0 and reading.scan.maps_read == 0
    finally:
        cancel.set()
        thread.join(10)
    assert children() == frozenset()


def test_processes_exiting_mid_scan_cause_no_error(tmp_path: Path) -> None:
    # Short-lived processes named like python (a `sleep` reached through a symlink named
    # python3) come and go while the scanner runs: some vanish between listdir and each read.
    fake = tmp_path / "python3"
    fake.symlink_to(subprocess.check_output(["which", "sleep"], text=True).strip())
    stop = threading.Event()
    started: list[subprocess.Popen[bytes]] = []

    def churn() -> None:
        while not stop.is_set():
            started.append(subprocess.Popen([str(fake), "0.01"]))
            if len(started) > 20:
                started.pop(0).wait(5)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        scanner = WorkloadScanner()
        seen = 0
        for _ in range(200):
            reading = scanner.scan(None, time.time())
            seen = max(seen, reading.scan.candidates)
    finally:
        stop.set()
        thread.join(10)
        for proc in started:
            _kill(proc)
    assert seen >= 1  # the churning processes were candidates


def _finding(m: dict[str, float], code: str, subject: str) -> bool:
    want = (f'code="{code}"', f'subject="{subject}"')
    return any(
        k.startswith("tfgpud_finding{") and all(w in k for w in want) and v == 1
        for k, v in m.items()
    )


def _status_finding(d: DaemonProcess, code: str, subject: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(d.get("/status")[1])
    hits = [f for f in doc["findings"] if f["code"] == code and f["subject"] == subject]
    assert len(hits) == 1, doc["findings"]
    found: dict[str, Any] = hits[0]
    return found


def _evidence(d: DaemonProcess, code: str, subject: str) -> list[str]:
    evidence: list[str] = _status_finding(d, code, subject)["evidence"]
    return evidence


def _gpu(used: int, pids: list[int], memory: list[int], utilization: int = 80) -> dict[str, Any]:
    return {
        "uuid": UUID,
        "memory_total": 40 * GIB,
        "memory_used": used,
        "utilization_gpu": utilization,
        "process_pids": pids,
        "process_memory": memory,
    }


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
    try:
        yield procs
    finally:
        for proc in procs:
            _kill(proc)


def test_memory_pressure_is_processes_sharing_a_full_gpu_not_one_owning_it(
    tmp_path: Path,
    fakedriver: Path,
    scenario_path: Path,
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    a, b = (p.pid for p in sleepers)
    used = 40 * GIB * 97 // 100
    write_scenario(scenario_path, [_gpu(used, [a, b], [used - GIB, GIB])])
    body = "[memory]\npressure_ratio = 0.95\nfor_seconds = 1.5\n"
    with DaemonProcess(tmp_path, body, scenario=scenario_path, interval=0.2) as d:
        d.start()
        assert not _finding(d.metrics(), "gpu-memory-pressure", UUID)  # not for 1.5 s yet
        took, _ = d.wait_metric(lambda m: _finding(m, "gpu-memory-pressure", UUID))
        assert took >= 0.8  # READY came after the first poll, which started the clock
        evidence = _evidence(d, "gpu-memory-pressure", UUID)
        assert evidence[0].startswith("memory used 38.8 GiB of 40.0 GiB (97%)")
        assert evidence[1:4] == [
            "2 process(es) on this GPU:",
            f"pid {a} (sleep, user {ME}): 37.8 GiB",
            f"pid {b} (sleep, user {ME}): 1.0 GiB",
        ]
        # The second process ends: one job owns the full GPU, which is no pressure.
        write_scenario(scenario_path, [_gpu(used, [a], [used])])
        d.wait_metric(lambda m: not _finding(m, "gpu-memory-pressure", UUID))
        time.sleep(2)  # longer than for_seconds: still none
        assert not _finding(d.metrics(), "gpu-memory-pressure", UUID)
        assert d.stop() == 0


KERNEL_ARGS = ["-m", "ipykernel_launcher", "-f", "/tmp/kernel-4242.json"]


@pytest.fixture
def idle_kernel() -> Iterator[subprocess.Popen[bytes]]:
    """A python process whose command line is a Jupyter kernel's (no TensorFlow in it)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *KERNEL_ARGS])
    try:
        yield proc
    finally:
        _kill(proc)


def test_memory_held_idle_names_the_kernel_and_clears_when_the_gpu_works(
    tmp_path: Path, fakedriver: Path, scenario_path: Path, idle_kernel: subprocess.Popen[bytes]
) -> None:
    pid = idle_kernel.pid
    held = 30 * GIB
    write_scenario(scenario_path, [_gpu(held, [pid], [held], utilization=2)])
    body = "[memory]\nidle_seconds = 1\n"  # idle_hold_ratio 0.5 (default): 75 % held
    with DaemonProcess(tmp_path, body, scenario=scenario_path, interval=0.2) as d:
        d.start()
        took, _ = d.wait_metric(lambda m: _finding(m, "gpu-memory-held-idle", UUID))
        assert took >= 0.5  # tracked across polls: the first poll only starts the clock
        f = _status_finding(d, "gpu-memory-held-idle", UUID)
        assert f["severity"] == "warning" and f["cause"] is None
        assert f"pid {pid} (python" in f["summary"] and f"user {ME}) holds 75%" in f["summary"]
        assert any(e.startswith("GPU utilisation <= 5% since ") for e in f["evidence"])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        assert f"pid {pid} ({comm}), user {ME}: holds 30.0 GiB (75% of this GPU)" in f["evidence"]
        command = " ".join([sys.executable, "-c", "import time; time.sleep(600)", *KERNEL_ARGS])
        assert f"command: {command}" in f["evidence"]
        assert "TensorFlow: no" in f["evidence"]
        assert f"notebook kernel pid {pid}" in f["fix"] and f"`kill {pid}`" in f["fix"]
        assert "cull_idle_timeout" in f["fix"]
        # The GPU gets work: not idle any more, nothing held idle.
        write_scenario(scenario_path, [_gpu(held, [pid], [held], utilization=60)])
        d.wait_metric(lambda m: not _finding(m, "gpu-memory-held-idle", UUID))
        assert d.stop() == 0


@pytest.mark.slow
def test_daemon_reports_tf_job_on_cpu_then_gpu_and_its_memory(
    tmp_path: Path,
    fakedriver: Path,
    scenario_path: Path,
    tf_process: subprocess.Popen[bytes],
) -> None:
    pid = tf_process.pid
    write_scenario(scenario_path, [_gpu(20 * GIB, [], [])])
    body = (
        "[memory]\nfor_seconds = 0.5\nidle_seconds = 0.5\n"
        "[workloads]\njob_on_cpu_seconds = 1\nprocess_names = ['python*']\n"
    )
    with DaemonProcess(tmp_path, body, scenario=scenario_path, interval=0.2) as d:
        d.start()
        _, m = d.wait_metric(lambda m: _finding(m, "tf-job-on-cpu", str(pid)), timeout=20)
        assert m['tfgpud_tf_processes{placement="cpu"}'] >= 1
        assert m['tfgpud_collector_success{collector="workloads"}'] == 1
        assert m["tfgpud_workloads_scanned_processes"] >= 2
        evidence = _evidence(d, "tf-job-on-cpu", str(pid))
        assert evidence[0].startswith(f"pid {pid}, user {ME}: on the CPU for ")
        assert evidence[1] == f"command: {sys.executable} -c {TF_SCRIPT}"
        assert any("CUDA_VISIBLE_DEVICES='0': 1 GPU(s) visible" in e for e in evidence)
        assert any("no [[tensorflow.envs]] entry matches" in e for e in evidence)

        # The driver now lists it as a busy compute process holding 97 % of the GPU: TensorFlow
        # maps nearly all memory by default, and one job owning its GPU is not pressure.
        used = 40 * GIB * 97 // 100
        write_scenario(scenario_path, [_gpu(used, [pid], [used])])
        _, m = d.wait_metric(
            lambda m: (
                not _finding(m, "tf-job-on-cpu", str(pid))
                and m.get('tfgpud_tf_processes{placement="gpu"}', 0) >= 1
            ),
            timeout=20,
        )
        time.sleep(1.0)  # twice [memory] for_seconds
        assert not _finding(d.metrics(), "gpu-memory-pressure", UUID)
        tf = f'{{gpu="0",kind="tensorflow",user="{ME}",uuid="{UUID}"}}'
        assert d.metrics()[f"tfgpud_gpu_user_memory_bytes{tf}"] == used
        # The GPU goes idle while the job keeps its memory: held idle, TensorFlow without growth.
        write_scenario(scenario_path, [_gpu(used, [pid], [used], utilization=0)])
        d.wait_metric(lambda m: _finding(m, "gpu-memory-held-idle", UUID), timeout=20)
        f = _status_finding(d, "gpu-memory-held-idle", UUID)
        assert "TensorFlow: yes, without memory growth" in " ".join(f["evidence"])
        assert "TF_FORCE_GPU_ALLOW_GROWTH=true" in f["fix"] and f"`kill {pid}`" in f["fix"]
        assert d.stop() == 0
