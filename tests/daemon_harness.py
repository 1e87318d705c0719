"""Start the real ``tfgpud run`` process for integration tests and watch what it says.

The daemon gets a real ``NOTIFY_SOCKET`` (an AF_UNIX datagram socket bound here), the simulated
driver through ``[nvml] library``, and a free loopback port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKEDRIVER = ROOT / "build" / "fakedriver"
DISCOVERY_OFF = "[tensorflow.discover]\nenabled = false\n"


@dataclass(frozen=True)
class ThreadStat:
    """One thread of a process, from /proc/PID/task/TID: its name, CPU and wake-ups so far."""

    tid: int
    name: str
    cpu_ticks: int  # utime + stime from task/TID/stat, in clock ticks
    cpu_ns: int | None  # run time from task/TID/schedstat (ns resolution), when the kernel has it
    voluntary: int  # voluntary_ctxt_switches: each one is a block followed by a wake-up
    involuntary: int


def _thread_stat(task: Path) -> ThreadStat | None:
    try:
        stat = (task / "stat").read_text()
        status = (task / "status").read_text()
        name = (task / "comm").read_text().strip()
    except OSError:  # the thread exited while we looked
        return None
    after_name = stat.rsplit(")", 1)[1].split()  # fields from the 3rd on
    ticks = int(after_name[11]) + int(after_name[12])  # fields 14 and 15: utime, stime
    switches = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key.endswith("ctxt_switches"):
            switches[key] = int(value)
    try:
        cpu_ns: int | None = int((task / "schedstat").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        cpu_ns = None
    return ThreadStat(
        int(task.name),
        name,
        ticks,
        cpu_ns,
        switches.get("voluntary_ctxt_switches", 0),
        switches.get("nonvoluntary_ctxt_switches", 0),
    )


def thread_stats(pid: int) -> dict[int, ThreadStat]:
    """Every live thread of ``pid`` by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        st = _thread_stat(task)
        if st is not None:
            out[st.tid] = st
    return out


def process_cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process, exited threads included (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy_tf_env(directory: Path, gpus: int = 2, name: str = "main") -> str:
    """A ``[[tensorflow.envs]]`` table whose interpreter (a script in ``directory``) answers like
    the probe for a CUDA build of TensorFlow that lists ``gpus`` GPUs: a machine whose TensorFlow
    is fine, so the only findings are the ones a test causes (with GPUs and no env at all, the
    daemon reports ``tf-no-env``)."""
    listed = ", ".join(f'{{"name": "/physical_device:GPU:{i}"}}' for i in range(gpus))
    report = (
        f'{{"schema": 1, "tf_version": "2.21.0", "gpus": [{listed}], '
        '"build_info": {"is_cuda_build": "True", "cuda_version": "12.5.1"}}'
    )
    python = directory / f"{name}-python"
    directory.mkdir(parents=True, exist_ok=True)
    python.write_text(f"#!/bin/sh\ncat <<'EOF'\n{report}\nEOF\n")
    python.chmod(0o755)
    return f'[[tensorflow.envs]]\nname = "{name}"\npython = "{python}"\n'


class NotifyListener:
    """Collects sd_notify datagrams (with arrival times) on a thread."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def snapshot(self) -> list[dict[str, str]]:
        with self._lock:
            return [m for _, m in self.messages]

    def wait_for(
        self, pred: Callable[[dict[str, str]], bool], timeout: float = 20.0, after: int = 0
    ) -> int:
        """Index of the first message (from ``after``) satisfying ``pred``; AssertionError else."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.snapshot()
            for i in range(after, len(msgs)):
                if pred(msgs[i]):
                    return i
            time.sleep(0.02)
        raise AssertionError(f"no matching notify message in {timeout}s; got {self.snapshot()}")

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class DaemonProcess:
    """A ``tfgpud run`` child. Use as a context manager; it is always reaped."""

    def __init__(
        self,
        tmp: Path,
        config_body: str = "",
        scenario: Path | None = None,
        interval: float = 0.3,
        env: dict[str, str] | None = None,
        with_library: bool = True,
        watchdog_usec: int | None = 1_000_000,
    ) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "tfgpud.toml"
        lib = FAKEDRIVER / "libnvidia-ml.so.1"
        library = f'[nvml]\nlibrary = "{lib}"\n' if with_library else ""
        # Hermetic: the daemon searches this machine for TensorFlow envs only when told where.
        # Last, so that bare keys at the start of config_body stay in [http] or [nvml].
        discover = "" if "[tensorflow.discover]" in config_body else DISCOVERY_OFF
        self.config.write_text(
            f'[daemon]\ninterval_seconds = {interval}\nstate_dir = "{tmp / "state"}"\n'
            f'[http]\nlisten = "127.0.0.1:{self.port}"\n{library}{config_body}\n{discover}'
        )
        self.notify = NotifyListener(tmp / "notify.sock")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp),
            "NOTIFY_SOCKET": self.notify.path,
            "PYTHONUNBUFFERED": "1",
        }
        if watchdog_usec:
            self.env["WATCHDOG_USEC"] = str(watchdog_usec)
        if scenario is not None:
            self.env["TFGPUD_FAKE_DRIVER"] = str(scenario)
        self.env.update(env or {})
        self.stderr_path = tmp / "daemon.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tfgpud", "run", "--config", str(self.config)],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=self.tmp,
            )
        if wait_ready:
            try:
                self.notify.wait_for(lambda m: m.get("READY") == "1", timeout=30)
            except AssertionError:
                raise AssertionError(f"daemon not READY; stderr:\n{self.stderr()}") from None
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> dict[str, float]:
        """``series{labels}`` → value, from /metrics."""
        _, text = self.get("/metrics")
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def wait_metric(
        self, pred: Callable[[dict[str, float]], bool], timeout: float = 10.0
    ) -> tuple[float, dict[str, float]]:
        """Poll /metrics until ``pred`` holds; return (seconds it took, metrics)."""
        start = time.monotonic()
        last: dict[str, float] = {}
        while time.monotonic() - start < timeout:
            last = self.metrics()
            if pred(last):
                return time.monotonic() - start, last
            time.sleep(0.05)
        raise AssertionError(f"metrics never matched in {timeout}s; last: {last}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 5.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.notify.close()
