"""Parent side of the TF probe: environment, output parsing, log filtering, scheduling."""

from __future__ import annotations

import itertools
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest

from tfgpud import runner
from tfgpud.collectors.tensorflow import (
    TfProbeScheduler,
    meaningful_log_lines,
    parse_probe_run,
    probe_env,
    probe_environment,
)
from tfgpud.collectors.tensorflow.child import tfprobe
from tfgpud.collectors.tensorflow.safety import SAFE_PATH
from tfgpud.config import Config, TensorflowConfig, TfEnvConfig
from tfgpud.diagnosis import compat, diagnose
from tfgpud.exporter import make_registry
from tfgpud.model import GpuReading, NvmlReading, ProbeStatus, Snapshot, TfProbeResult
from tfgpud.runner import RunResult

ENV = TfEnvConfig(name="main", python="/opt/venv/bin/python")
REPORT: dict[str, Any] = {
    "schema": 1,
    "python": {"version": "3.11.7", "executable": "/opt/venv/bin/python"},
    "tf_version": "2.21.0",
    "build_info": {"cuda_version": "12.5.1", "cudnn_version": "9", "is_cuda_build": "True"},
    "gpus": [
        {
            "name": "/physical_device:GPU:0",
            "device_name": "NVIDIA H100",
            "compute_capability": [9, 0],
        }
    ],
    "environment": {"CUDA_VISIBLE_DEVICES": "0"},
    "packages": {"tensorflow": "2.21.0"},
    "package_dirs": ["/opt/venv/lib/python3.11/site-packages"],
    "libraries": [
        {"name": "cudart", "soname": "libcudart.so.12", "loaded": True, "path": "/x", "error": None}
    ],
    "library_search_dirs": ["/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib"],
    "device_access": {"/dev/nvidia0": "ok"},
}
# Real TF 2.21 stderr shapes (absl and TSL prefixes), one message per line.
TF_STDERR = "\n".join(
    [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1758131045.203198 3722035 cudart_stub.cc:31] Could not find cuda drivers "
        "on your machine, GPU will not be used.",
        "I0000 00:00:1758131045.203198 3722035 port.cc:153] oneDNN custom operations are on.",
        "2025-09-17 14:44:05.157831: E external/local_xla/xla/stream_executor/cuda/"
        "cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to "
        "cuInit: UNKNOWN ERROR (303)",
        "2025-09-17 14:44:05.157831: I tensorflow/core/util/port.cc:113] Could not find TensorRT",
        "W0000 00:00:1758131045.9 3722035 gpu_device.cc:2344] Cannot dlopen some GPU libraries. "
        "Skipping registering GPU devices...",
        "W0000 00:00:1758131045.9 3722035 gpu_device.cc:2344] Cannot dlopen some GPU libraries. "
        "Skipping registering GPU devices...",
    ]
).encode()


def run(**kw: Any) -> RunResult:
    base: dict[str, Any] = {
        "argv": ("/opt/venv/bin/python", "tfprobe.py"),
        "returncode": 0,
        "signal_name": None,
        "stdout": json.dumps(REPORT).encode(),
        "stderr": TF_STDERR,
        "stdout_truncated": False,
        "stderr_truncated": False,
        "timed_out": False,
        "duration_seconds": 3.0,
        "cpu_seconds": 3.1,
        "max_rss_bytes": 540_000_000,
    }
    base.update(kw)
    return RunResult(**base)


def parse(r: RunResult) -> TfProbeResult:
    return parse_probe_run(ENV, r, started_at=100.0, timeout=120)


def test_parses_a_full_report() -> None:
    res = parse(run())
    assert res.status is ProbeStatus.OK and res.tf_version == "2.21.0"
    assert res.gpus[0].compute_capability == (9, 0) and res.gpus[0].device_name == "NVIDIA H100"
    assert res.libraries[0].loaded and res.libraries[0].soname == "libcudart.so.12"
    assert res.environment["CUDA_VISIBLE_DEVICES"] == "0"
    assert res.cpu_seconds == 3.1 and res.max_rss_bytes == 540_000_000
    assert res.package_dirs == ("/opt/venv/lib/python3.11/site-packages",)


def test_log_lines_keep_meaning_drop_noise_and_prefixes() -> None:
    lines = meaningful_log_lines(TF_STDERR)
    assert lines == (
        "Could not find cuda drivers on your machine, GPU will not be used.",
        "failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
        "Cannot dlopen some GPU libraries. Skipping registering GPU devices...",
    )


# What TF 2.21's loader prints at TF_CPP_MAX_VLOG_LEVEL=1 in the pip wheel layout (measured).
VLOG_STDERR = "\n".join(
    [
        "I0000 00:00:1796162326.766958    8718 dso_loader.cc:133] Successfully opened dynamic "
        "library libcuda.so.1",
        "I0000 00:00:1796162326.772901    8718 dso_loader.cc:133] Successfully opened dynamic "
        "library libcudart.so.12",
        "I0000 00:00:1796162326.773121    8718 dso_loader.cc:133] Could not load dynamic library "
        "'libcusolver.so.11'; dlerror: libcusolver.so.11: cannot open shared object file: No such "
        "file or directory; LD_LIBRARY_PATH: /drv",
        "W0000 00:00:1796162326.9 8718 gpu_device.cc:2344] Cannot dlopen some GPU libraries. "
        "Please make sure the missing libraries mentioned above are installed properly if you "
        "would like to use GPU. Skipping registering GPU devices...",
    ]
).encode()


def test_tensorflows_loader_lines_name_what_failed_and_what_opened() -> None:
    res = parse(run(stderr=VLOG_STDERR))
    assert dict(res.loader_failures) == {
        "libcusolver.so.11": "libcusolver.so.11: cannot open shared object file: No such file or "
        "directory"
    }
    assert res.loader_opened == ("libcuda.so.1", "libcudart.so.12")
    assert any("Could not load dynamic library 'libcusolver.so.11'" in x for x in res.log_lines)
    assert not any("Successfully opened" in x for x in res.log_lines)  # noise, not evidence


def test_parses_where_the_loader_found_each_library() -> None:
    report = {
        **REPORT,
        "libraries": [
            {
                "name": "cudnn",
                "soname": "libcudnn.so.9",
                "loaded": False,
                "path": None,
                "error": "libcudnn.so.9: cannot open shared object file",
                "via": None,
                "found_elsewhere": ["/sp/nvidia/cudnn/lib/libcudnn.so.9"],
                "other_versions": [
                    {"soname": "libcudnn.so.8", "path": "/opt/libcudnn.so.8", "version": 8907}
                ],
            },
            {
                "name": "cudart",
                "soname": "libcudart.so.12",
                "loaded": True,
                "path": "/x",
                "error": None,
                "via": "RUNPATH",
                "version": None,
            },
        ],
        "loader": {
            "object": "/sp/tensorflow/libtensorflow_framework.so.2",
            "search_path": [
                {"dir": "/drv", "source": "LD_LIBRARY_PATH"},
                {"dir": "/sp/tensorflow/../nvidia/cudnn/lib", "source": "RUNPATH"},
            ],
        },
        "smoke": {
            "ok": False,
            "error": "RuntimeError: CUDA_ERROR_NOT_SUPPORTED",
            "stage": "context",
        },
    }
    res = parse(run(stdout=json.dumps(report).encode()))
    assert res.status is ProbeStatus.OK
    cudnn, cudart = res.libraries
    assert cudnn.found_elsewhere == ("/sp/nvidia/cudnn/lib/libcudnn.so.9",)
    (other,) = cudnn.other_versions
    assert other.soname == "libcudnn.so.8" and other.loaded and other.version == 8907
    assert cudart.via == "RUNPATH" and cudart.loaded
    assert res.loader_object == "/sp/tensorflow/libtensorflow_framework.so.2"
    assert [(d.path, d.source) for d in res.loader_search] == [
        ("/drv", "LD_LIBRARY_PATH"),
        ("/sp/tensorflow/../nvidia/cudnn/lib", "RUNPATH"),
    ]
    assert res.smoke_ok is False and res.smoke_stage == "context"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"libraries": [{"name": "cudnn", "version": "9.3"}]}, "version"),
        ({"libraries": [{"name": "cudnn", "other_versions": "8"}]}, "other_versions"),
        ({"loader": "libtensorflow_framework.so.2"}, "loader"),
        ({"loader": {"search_path": ["/drv"]}}, "search_path"),
    ],
)
def test_malformed_loader_fields_are_bad_output(extra: dict[str, Any], needle: str) -> None:
    res = parse(run(stdout=json.dumps({**REPORT, **extra}).encode()))
    assert res.status is ProbeStatus.BAD_OUTPUT and needle in (res.error or "")


def test_log_lines_are_bounded() -> None:
    spam = b"".join(b"CUDA_ERROR number %d\n" % i for i in range(1000))
    assert len(meaningful_log_lines(spam)) == 40


def test_a_report_from_hostile_code_is_bounded() -> None:
    """The env's owner controls the probe's output: a fake `tensorflow` answering with a
    megabyte version, thousands of packages and dirs must not make a megabyte label or a
    snapshot that grows with it, nor thousands of paths stat()ed every poll."""
    huge = "9" * 500_000
    report = {
        **REPORT,
        "tf_version": huge,
        "build_info": {**REPORT["build_info"], "cuda_version": huge},
        "packages": {f"pkg{i}": "1.0" for i in range(5000)},
        "package_dirs": [f"/env/lib/site-packages/d{i}" for i in range(5000)],
    }
    res = parse(run(stdout=json.dumps(report).encode()))
    assert res.status is ProbeStatus.OK
    assert len(res.tf_version or "") <= 4096 and len(res.build_info["cuda_version"]) <= 4096
    assert len(res.packages) <= 256 and len(res.package_dirs) <= 64
    snap = Snapshot(taken_at=1.0, tf=(res,))
    exposition = generate_latest(make_registry(lambda: snap)).decode()
    info = next(line for line in exposition.splitlines() if line.startswith("tfgpud_tf_info{"))
    assert len(info) < 400, info[:200]


def test_import_failure() -> None:
    report = {"schema": 1, "import_error": "ModuleNotFoundError: No module named 'tensorflow'"}
    res = parse(run(stdout=json.dumps(report).encode()))
    assert res.status is ProbeStatus.IMPORT_FAILED and "No module named" in (res.error or "")


@pytest.mark.parametrize(
    ("kw", "status", "needle"),
    [
        (
            {"error": "executable not found: /opt/venv/bin/python"},
            "missing-interpreter",
            "not found",
        ),
        ({"error": "unknown user 'x'"}, "refused", "run_as"),
        ({"error": "permission denied starting x"}, "no-access", "permission denied"),
        ({"timed_out": True, "returncode": -9, "signal_name": "SIGKILL"}, "timeout", "120 s"),
        ({"signal_name": "SIGILL", "returncode": -4, "stdout": b""}, "crashed", "lacks instr"),
        ({"signal_name": "SIGSEGV", "returncode": -11, "stdout": b""}, "crashed", "SIGSEGV"),
        ({"stdout": b"x" * 100, "stdout_truncated": True}, "bad-output", "more than"),
        ({"stdout": b"hello world"}, "bad-output", "not JSON"),
        ({"stdout": b'{"schema": 99}'}, "bad-output", "schema 99"),
        ({"stdout": b"[1, 2]"}, "bad-output", "schema None"),
        ({"stdout": b'{"schema": 1, "gpus": "many"}'}, "bad-output", "gpus"),
        ({"stdout": b"", "returncode": 1}, "error", "status 1"),
        ({"cancelled": True, "returncode": -9}, "error", "cancelled"),
    ],
)
def test_every_failure_is_a_status(kw: dict[str, Any], status: str, needle: str) -> None:
    res = parse(run(**kw))
    assert res.status.value == status
    assert needle in (res.error or "")


def test_probe_environment_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/leak")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    env = TfEnvConfig(
        name="e",
        python="/opt/venv/bin/python",
        environment={"TF_CPP_MIN_LOG_LEVEL": "3", "WATCHDOG_USEC": "1", "FOO": "bar"},
    )
    got = probe_environment(env, home="/home/x")
    assert got == {
        "PATH": "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/home/x",
        "LANG": "C.UTF-8",
        "FOO": "bar",
        "TF_CPP_MIN_LOG_LEVEL": "0",
        "TF_CPP_MAX_VLOG_LEVEL": "1",  # TF's loader names each library it cannot load
    }
    with_ld = TfEnvConfig(name="e", python="/p", environment={"LD_LIBRARY_PATH": "/drv"})
    assert probe_environment(with_ld)["LD_LIBRARY_PATH"] == "/drv"


def test_probe_env_passes_argv_env_and_limits() -> None:
    seen: dict[str, Any] = {}

    def fake_runner(argv: Sequence[str], *, env: Mapping[str, str], **kw: Any) -> RunResult:
        seen.update(argv=list(argv), env=dict(env), **kw)
        return run()

    env = TfEnvConfig(name="main", python="/opt/venv/bin/python", smoke_test=True)
    res = probe_env(env, timeout=7, runner=fake_runner)
    assert res.ok
    assert seen["argv"][0] == "/opt/venv/bin/python" and seen["argv"][1] == "-s"
    assert seen["argv"][2].endswith("tfprobe.py") and seen["argv"][3] == "--smoke"
    assert seen["timeout"] == 7 and seen["max_output"] == 1024 * 1024 and seen["cwd"] == "/"


def test_probe_env_survives_a_broken_runner() -> None:
    def broken(argv: Sequence[str], **kw: Any) -> RunResult:
        raise RuntimeError("boom")

    res = probe_env(ENV, timeout=1, runner=broken)
    assert res.status is ProbeStatus.ERROR and "boom" in (res.error or "")


def test_soname_tables_agree() -> None:
    build = {"cuda_version": "12.5.1", "cudnn_version": "9"}
    probe_side = dict(tfprobe.sonames(build))
    parent_side = compat.cuda_library_sonames("12.5.1", "9")
    assert probe_side == {**parent_side, "cuda": "libcuda.so.1"}
    assert parent_side["cufft"] == "libcufft.so.11" and parent_side["cudnn"] == "libcudnn.so.9"
    assert dict(tfprobe.sonames({"is_cuda_build": False})) == {"cuda": "libcuda.so.1"}
    assert dict(tfprobe.sonames({"cuda_version": "11.8", "cudnn_version": "8"}))["cudart"] == (
        "libcudart.so.11.0"
    )


# --- scheduler -----------------------------------------------------------------------------------


def answer(env: TfEnvConfig, status: ProbeStatus, **fields: Any) -> TfProbeResult:
    """What a probe of ``env`` returns, started now: ``status`` and any other ``fields``."""
    fields.setdefault("duration_seconds", 0.0)
    return TfProbeResult(
        env=env.name, python=env.python, status=status, started_at=time.time(), **fields
    )


class FakeProbe:
    def __init__(self, status: ProbeStatus = ProbeStatus.OK, delay: float = 0.0) -> None:
        self.calls: list[str] = []
        self.status = status
        self.delay = delay
        self.package_dirs: tuple[str, ...] = ()
        self.during: Callable[[], None] | None = None  # run while the probe runs

    def __call__(
        self, env: TfEnvConfig, *, timeout: float, cancel: threading.Event
    ) -> TfProbeResult:
        self.calls.append(env.name)
        if self.during is not None:
            self.during()
        if self.delay:
            cancel.wait(self.delay)
        return answer(env, self.status, duration_seconds=self.delay, package_dirs=self.package_dirs)


def nvml(driver: str = "550.54.14", uuids: tuple[str, ...] = ("GPU-a",)) -> NvmlReading:
    return NvmlReading(
        up=True, driver_version=driver, gpus=tuple(GpuReading(i, u) for i, u in enumerate(uuids))
    )


def sched(
    fake: FakeProbe, envs: Sequence[TfEnvConfig] = (ENV,), max_concurrent: int = 1
) -> TfProbeScheduler:
    return TfProbeScheduler(
        envs,
        interval=21600,
        timeout=5,
        probe=fake,
        retry_seconds=900,
        max_concurrent=max_concurrent,
    )


def test_an_install_while_the_probe_runs_is_probed_again(tmp_path: Path) -> None:
    """pip writing into the env while its probe runs: the result may predate the install, so
    the next poll probes again (the fingerprint is taken as the probe ends, and would otherwise
    hold the new mtime as if already seen)."""
    fake = FakeProbe()
    site = tmp_path / "site-packages"
    site.mkdir()
    fake.package_dirs = (str(site),)
    fake.during = lambda: (site / "tensorflow-2.21.0.dist-info").mkdir()
    fake.delay = 0.05  # the probe goes on for some clock ticks after pip wrote
    s = sched(fake)
    assert s.maybe_start(None, 0.0) == ("main",)
    assert s.wait_idle(2)
    fake.during = None
    assert s.maybe_start(None, 1.0) == ("main",)
    assert s.last_reason("main") == "installed packages changed"
    assert s.wait_idle(2)
    assert s.maybe_start(None, 2.0) == ()  # nothing changed during the second probe
    s.close()


def test_a_flapping_driver_is_probed_at_a_bounded_rate() -> None:
    """NVML down and up at every 10 s poll for two hours: each flap is a change TF's answer
    depends on, but a probe imports TensorFlow (seconds of CPU, a GB of memory). A burst of 10
    is probed at once (break, fix, break again stays prompt), then one every 5 min."""
    fake = FakeProbe()
    s = sched(fake)
    down = NvmlReading(up=False, error="DRIVER_NOT_LOADED")
    starts: list[float] = []
    for step in range(720):
        t = 10.0 * step
        if s.maybe_start(down if step % 2 else nvml(), t):
            starts.append(t)
            assert s.wait_idle(2)
    assert starts[:11] == [10.0 * i for i in range(11)]  # the first probe, then 10 changes
    # Then one per 5 min (a flap is seen every other poll, so one gap is 10 s short, the next
    # 10 s long; the first is shorter by what refilled during the burst).
    gaps = [b - a for a, b in itertools.pairwise(starts[10:])]
    assert all(220.0 <= g <= 320.0 for g in gaps) and 290 <= sum(gaps[1:]) / len(gaps[1:]) <= 310
    assert len(starts) <= 11 + 7200 // 300  # 720 changes in two hours: 720 probes before
    # After a quiet hour, a change is probed at once again.
    t = 7200.0 + 3600.0
    assert s.maybe_start(nvml(driver="555.42.02"), t) == ("main",)
    s.close()


def test_cadence_start_interval_and_changes(tmp_path: Path) -> None:
    fake = FakeProbe()
    site = tmp_path / "site-packages"
    site.mkdir()
    os.utime(site, ns=(0, 10**9))  # installed long ago, not while the first probe runs
    fake.package_dirs = (str(site),)
    s = sched(fake)
    assert s.maybe_start(nvml(), 0.0) == ("main",)
    assert s.wait_idle(2)
    assert s.results()[0].env == "main"
    assert s.maybe_start(nvml(), 10.0) == ()  # nothing changed
    assert s.maybe_start(nvml(driver="555.42.02"), 20.0) == ("main",)
    assert s.last_reason("main") == "driver version changed: 550.54.14 -> 555.42.02"
    s.wait_idle(2)
    assert s.maybe_start(nvml(driver="555.42.02", uuids=("GPU-a", "GPU-b")), 30.0) == ("main",)
    assert s.last_reason("main") == "NVML GPU set changed"
    s.wait_idle(2)
    assert s.maybe_start(None, 40.0) == ()  # NVML not read: no change inferred
    (site / "nvidia_cudnn_cu12-9.3.0.dist-info").mkdir()
    os.utime(site, ns=(0, 10**18))
    assert s.maybe_start(None, 50.0) == ("main",)
    assert s.last_reason("main") == "installed packages changed"
    s.wait_idle(2)
    assert s.maybe_start(None, 50.0 + 21599) == ()
    assert s.maybe_start(None, 50.0 + 21600) == ("main",)
    assert s.last_reason("main") == "interval elapsed"
    s.close()
    assert s.runs("main") == 5 and len(fake.calls) == 5


def test_never_two_probes_of_one_env_and_caller_never_blocks() -> None:
    fake = FakeProbe(delay=5.0)
    s = sched(fake)
    t0 = time.monotonic()
    assert s.maybe_start(nvml(), 0.0) == ("main",)
    assert s.maybe_start(nvml(driver="9"), 1.0) == ()  # due, but still running
    assert time.monotonic() - t0 < 0.5
    assert s.running() == ("main",)
    t1 = time.monotonic()
    s.close()
    assert time.monotonic() - t1 < 2.5
    assert s.running() == ()
    assert s.maybe_start(nvml(), 99999.0) == ()  # closed


def test_failed_probe_retried_sooner() -> None:
    fake = FakeProbe(status=ProbeStatus.TIMEOUT)
    s = sched(fake)
    s.maybe_start(nvml(), 0.0)
    s.wait_idle(2)
    assert s.maybe_start(nvml(), 899.0) == ()
    assert s.maybe_start(nvml(), 900.0) == ("main",)
    assert s.last_reason("main") == "retry after timeout"
    s.close()


def test_envs_are_independent() -> None:
    fake = FakeProbe()
    other = TfEnvConfig(name="other", python="/opt/other/bin/python")
    s = sched(fake, (ENV, other), max_concurrent=2)
    assert set(s.maybe_start(nvml(), 0.0)) == {"main", "other"}
    s.wait_idle(2)
    assert {r.env for r in s.results()} == {"main", "other"}
    s.close()


def test_a_raising_probe_still_leaves_a_result() -> None:
    def bad(env: TfEnvConfig, *, timeout: float, cancel: threading.Event) -> TfProbeResult:
        raise RuntimeError("kaput")

    s = TfProbeScheduler([ENV], interval=60, timeout=1, probe=bad)
    s.maybe_start(None, 0.0)
    s.wait_idle(2)
    (res,) = s.results()
    assert res.status is ProbeStatus.ERROR and "kaput" in (res.error or "")
    s.close()


def test_adopt_keeps_results_of_unchanged_envs_across_a_reload() -> None:
    other = TfEnvConfig(name="other", python="/other/bin/python")
    fake = FakeProbe()
    old = sched(fake, envs=(ENV, other), max_concurrent=2)
    assert old.maybe_start(nvml(), 0.0) == ("main", "other")
    assert old.wait_idle(2)
    old.close()
    changed = TfEnvConfig(name="other", python="/elsewhere/bin/python")
    new = TfProbeScheduler(
        [ENV, changed], interval=21600, timeout=30, probe=fake, retry_seconds=900
    )
    new.adopt(old)
    assert [r.env for r in new.results()] == ["main"]  # kept; `other` changed: no stale result
    assert new.maybe_start(nvml(), 10.0) == ("other",)  # `main` is not re-probed
    assert new.wait_idle(2)
    new.close()


class StuckProbe:
    """A probe whose child the cancel cannot end (a child of another user, before tfgpud could
    kill those): it returns only when released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []

    def __call__(
        self, env: TfEnvConfig, *, timeout: float, cancel: threading.Event
    ) -> TfProbeResult:
        self.calls.append(env.name)
        self.release.wait(30)
        return answer(env, ProbeStatus.CRASHED if cancel.is_set() else ProbeStatus.OK)


def test_a_reload_waits_for_no_probe_and_never_runs_two_of_one_env() -> None:
    stuck = StuckProbe()
    other = TfEnvConfig(name="other", python="/other/bin/python")
    old = TfProbeScheduler([ENV], interval=21600, timeout=5, probe=stuck)
    assert old.maybe_start(nvml(), 0.0) == ("main",)
    old.cancel()  # returns at once; the probe has not ended
    assert old.running() == ("main",)
    new = TfProbeScheduler([ENV, other], interval=21600, timeout=5, probe=stuck, max_concurrent=2)
    new.adopt(old)
    # `main`'s cancelled probe still runs: not a second one of it; `other` may start.
    assert new.maybe_start(nvml(), 1.0) == ("other",)
    assert set(new.running()) == {"main", "other"}
    stuck.release.set()
    assert new.wait_idle(5)
    assert new.results() == tuple(r for r in new.results() if r.env == "other")
    assert new.maybe_start(nvml(), 2.0) == ("main",)  # probed anew once the old one ended
    assert new.last_reason("main") == "first probe"
    assert new.wait_idle(5)
    new.close()
    assert stuck.calls == ["main", "other", "main"]


class OkThenCancelled:
    """The first probe answers OK; later ones run until cancelled, then end as a cancelled run
    does (ERROR), after ``release`` when one is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.release: threading.Event | None = None

    def __call__(
        self, env: TfEnvConfig, *, timeout: float, cancel: threading.Event
    ) -> TfProbeResult:
        self.calls += 1
        ok = self.calls == 1
        if not ok:
            cancel.wait(30)
            if self.release is not None:
                self.release.wait(30)
        if ok:
            return answer(env, ProbeStatus.OK)
        return answer(env, ProbeStatus.ERROR, error="probe cancelled (daemon shutting down)")


@pytest.mark.parametrize("ended_before_adopt", [True, False])
def test_a_probe_cut_short_by_a_reload_leaves_the_last_result_standing(
    ended_before_adopt: bool,
) -> None:
    """A reload cancels a probe in flight: the env keeps its last good result across the
    reload (its metrics and findings do not blank, nor turn into the cancel's ERROR for the
    15 min of a retry) and is probed anew at once."""
    probe = OkThenCancelled()
    old = TfProbeScheduler([ENV], interval=100, timeout=5, probe=probe)
    assert old.maybe_start(nvml(), 0.0) == ("main",)
    assert old.wait_idle(2)
    assert old.maybe_start(nvml(), 100.0) == ("main",)  # interval elapsed: now in flight
    if not ended_before_adopt:
        probe.release = threading.Event()
    old.cancel()
    if ended_before_adopt:
        assert old.wait_idle(2)
    new = TfProbeScheduler([ENV], interval=100, timeout=5, probe=probe)
    new.adopt(old)
    assert [r.status for r in new.results()] == [ProbeStatus.OK]
    if probe.release is not None:
        assert new.maybe_start(nvml(), 101.0) == ()  # its cancelled probe has not ended yet
        probe.release.set()
        assert new.wait_idle(2)
    assert new.maybe_start(nvml(), 102.0) == ("main",)
    new.cancel()  # as a stop does: that probe, cut short too, leaves the result as it was
    assert new.wait_idle(2)
    assert [r.status for r in new.results()] == [ProbeStatus.OK]


# --- probe invocation: isolation, interpreter resolution, access -------------------------------


def _capture_runner(seen: dict[str, Any]) -> Any:
    def fake_runner(argv: Sequence[str], *, env: Mapping[str, str], **kw: Any) -> RunResult:
        home = env.get("HOME", "")
        seen.update(
            argv=list(argv),
            env=dict(env),
            home_existed=os.path.isdir(home),
            home_mode=os.stat(home).st_mode & 0o777 if os.path.isdir(home) else None,
            **kw,
        )
        return run()

    return fake_runner


def test_probe_not_run_as_a_named_user_gets_no_user_site_and_a_private_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # the caller's HOME must not reach the probe
    seen: dict[str, Any] = {}
    res = probe_env(ENV, timeout=7, runner=_capture_runner(seen), euid=0)
    assert res.ok
    assert seen["argv"][1] == "-s" and seen["user"] is None
    assert seen["env"]["PYTHONNOUSERSITE"] == "1"
    home = seen["env"]["HOME"]
    assert home != str(tmp_path) and seen["home_existed"] and seen["home_mode"] == 0o700
    assert not os.path.exists(home)  # removed after the probe


def test_probe_run_as_gets_that_users_home_and_user_site() -> None:
    seen: dict[str, Any] = {}
    env = TfEnvConfig(name="u", python="/opt/venv/bin/python", run_as="nobody")
    probe_env(env, timeout=7, runner=_capture_runner(seen), euid=0)
    assert seen["user"] == "nobody" and "-s" not in seen["argv"]
    assert seen["env"]["HOME"] == pwd.getpwnam("nobody").pw_dir
    assert "PYTHONNOUSERSITE" not in seen["env"]


def test_bare_interpreter_name_is_resolved_on_the_probe_path_not_the_cwd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    trap = tmp_path / "python3"
    trap.write_text("#!/bin/sh\necho trap\n")
    trap.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    expected = shutil.which("python3", path=SAFE_PATH)
    if expected is None:
        pytest.skip("no python3 on the safe PATH")
    seen: dict[str, Any] = {}
    probe_env(TfEnvConfig(name="b", python="python3"), timeout=7, runner=_capture_runner(seen))
    assert seen["argv"][0] == os.path.abspath(expected) and os.path.isabs(seen["argv"][0])

    def never(*a: Any, **kw: Any) -> RunResult:
        raise AssertionError("must not run")

    res = probe_env(TfEnvConfig(name="b", python="no-such-python-tfgpud"), timeout=7, runner=never)
    assert res.status is ProbeStatus.MISSING_INTERPRETER and "not found" in (res.error or "")


def test_a_signal_after_a_complete_report_keeps_the_report() -> None:
    res = parse(run(signal_name="SIGSEGV", returncode=-11))
    assert res.status is ProbeStatus.OK and res.tf_version == "2.21.0"
    assert res.signal_name == "SIGSEGV"
    assert any("SIGSEGV after writing a complete report" in line for line in res.log_lines)
    half = json.dumps(REPORT).encode()[:50]
    assert parse(run(signal_name="SIGSEGV", returncode=-11, stdout=half)).status is (
        ProbeStatus.CRASHED
    )


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A world-traversable scratch dir (pytest's tmp_path is 0700: nobody cannot enter)."""
    d = Path(tempfile.mkdtemp(prefix="tfgpud-noaccess-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_permission_denied_is_no_access_naming_the_directory(scratch: Path) -> None:
    tmp_path = scratch
    home = tmp_path / "home"
    python = home / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    tmp_path.chmod(0o755)
    home.chmod(0o700)  # owned by us, not by nobody
    env = TfEnvConfig(name="h", python=str(python))
    r = run(error=f"permission denied starting {python}: Permission denied", stdout=b"")
    res = parse_probe_run(env, r, started_at=1.0, timeout=5, user="nobody", python=str(python))
    assert res.status is ProbeStatus.NO_ACCESS
    assert res.denied_paths == (str(home),) and res.probe_user == "nobody"
    snap = Snapshot(taken_at=0.0, sequence=1, tf=(res,))
    (f,) = [f for f in diagnose(snap, Config()) if f.subject == "h"]
    assert f.code == "tf-probe-refused" and f.severity.value == "warning"
    assert f"setfacl -m u:nobody:x {home}" in f.fix and "run_as" in f.fix
    assert "tf-import-crashed" not in {x.code for x in diagnose(snap, Config())}


# --- scheduler: concurrency, abandoned children, retries ----------------------------------------


def test_at_most_one_probe_at_a_time_by_default() -> None:
    fake = FakeProbe(delay=0.3)
    other = TfEnvConfig(name="other", python="/opt/other/bin/python")
    s = sched(fake, (ENV, other))
    assert s.maybe_start(nvml(), 0.0) == ("main",)
    assert s.maybe_start(nvml(), 1.0) == ()  # `other` is due but the one slot is taken
    assert s.wait_idle(3)
    assert s.maybe_start(nvml(), 2.0) == ("other",)
    assert s.wait_idle(3)
    s.close()


def test_max_concurrent_probes_comes_from_the_config() -> None:
    assert TensorflowConfig().max_concurrent_probes == 1
    cfg = TensorflowConfig(envs=[ENV], max_concurrent_probes=3)
    assert TfProbeScheduler.from_config(cfg)._max_concurrent == 3


def test_no_new_probe_while_the_previous_child_still_exists() -> None:
    child = subprocess.Popen(["sleep", "0.5"])
    child.returncode = 0  # the reaper owns it now
    runner.hand_to_reaper(child.pid)
    fake = FakeProbe()
    s = sched(fake)

    def probe_leaving_a_child(
        env: TfEnvConfig, *, timeout: float, cancel: threading.Event
    ) -> TfProbeResult:
        fake.calls.append(env.name)
        return answer(env, ProbeStatus.TIMEOUT, abandoned_pid=child.pid)

    s._probe = probe_leaving_a_child
    assert s.maybe_start(nvml(), 0.0) == ("main",)
    assert s.wait_idle(2)
    assert s.maybe_start(nvml(), 1e9) == ()  # due, but its last child is still there
    deadline = time.monotonic() + 5
    while child.pid in runner.abandoned_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s.maybe_start(nvml(), 1e9) == ("main",)
    s.close()


@pytest.mark.parametrize(("reloads", "late_reload"), [(1, False), (2, False), (1, True)])
def test_a_reload_holds_back_for_the_stuck_child_of_the_probe_it_waited_for(
    reloads: int, late_reload: bool
) -> None:
    """A reload during a probe whose child gets stuck (a hung GPU): the new schedule waits for
    the old probe's thread, then also for its killed child, as the old schedule would have;
    it did not see that child (landed in the old schedule's state) and started another."""
    child = subprocess.Popen(["sleep", "0.5"])
    child.returncode = 0  # the reaper owns it now
    release = threading.Event()

    def stuck_then_abandoned(
        env: TfEnvConfig, *, timeout: float, cancel: threading.Event
    ) -> TfProbeResult:
        release.wait(30)
        runner.hand_to_reaper(child.pid)
        return answer(env, ProbeStatus.TIMEOUT, abandoned_pid=child.pid)

    old = TfProbeScheduler([ENV], interval=21600, timeout=5, probe=stuck_then_abandoned)
    assert old.maybe_start(nvml(), 0.0) == ("main",)
    for _ in range(reloads):
        old.cancel()
        new = TfProbeScheduler([ENV], interval=21600, timeout=5, probe=stuck_then_abandoned)
        new.adopt(old)
        old = new
    release.set()
    assert new.wait_idle(5)
    if late_reload:  # one more reload once the probe ended, before the schedule polled
        new.cancel()
        new = TfProbeScheduler([ENV], interval=21600, timeout=5, probe=stuck_then_abandoned)
        new.adopt(old)
    assert new.maybe_start(nvml(), 1.0) == ()  # its killed child still exists
    deadline = time.monotonic() + 5
    while child.pid in runner.abandoned_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert new.maybe_start(nvml(), 2.0) == ("main",)
    new.close()


def test_import_failed_is_retried_on_the_failure_cadence() -> None:
    fake = FakeProbe(status=ProbeStatus.IMPORT_FAILED)
    s = sched(fake)
    s.maybe_start(nvml(), 0.0)
    s.wait_idle(2)
    assert s.maybe_start(nvml(), 899.0) == ()
    assert s.maybe_start(nvml(), 900.0) == ("main",)
    assert s.last_reason("main") == "retry after import-failed"
    s.close()
