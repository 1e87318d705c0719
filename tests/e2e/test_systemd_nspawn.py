"""The Debian package under a real systemd (252, PID 1 of a Debian 12 minbase in systemd-nspawn).

The freshly built .deb is installed with apt, the unit is pointed at the simulated driver with a
drop-in, and everything is checked the way an admin would see it: systemctl, journalctl,
systemd-analyze, the daemon's HTTP port (the machine shares this host's network). The tests run
in file order on one machine, each leaving the service running and healthy for the next.

Not testable here: DeviceAllow= (nspawn does not enforce the device cgroup), nvidia-modprobe
(no driver), real GPUs. The root file system is cached (tests/e2e/nspawn.py); a cold first run
builds it (~3 min), a warm run boots an overlay of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from helpers import write_scenario, write_text_atomically
from nspawn import TF_VENV, Machine, cached_rootfs, unusable_reason
from packaging_helpers import (
    MAX_EXPOSURE,
    SYS_PYTHON,
    build_deb,
    exposure_score,
    python_minor,
)

from tfgpud.alerts import message_id

REASON = unusable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

UNIT = "tfgpud.service"
CONFIG = "/etc/tfgpud/tfgpud.toml"
FAKE_LIBS = "/usr/local/lib/tfgpud-fake"
SCENARIO = "/srv/tfgpud-e2e/scenario.toml"
DROP_IN = "/etc/systemd/system/tfgpud.service.d/e2e.conf"
UUID = "GPU-e2e00000-0000-4000-8000-000000000000"
GPU = {"name": "NVIDIA A100-SXM4-80GB", "uuid": UUID, "pci_bus_id": "00000000:01:00.0"}
DRIVER = "550.54.15"
# Paths whose contents change with every boot or apt run, not with the package.
VOLATILE = (
    "dev", "proc", "sys", "run", "tmp", "var/tmp", "var/log", "var/cache", "var/lib/apt",
    "var/lib/dpkg", "var/lib/systemd/timers", "var/lib/systemd/random-seed", "srv/tfenv",
    "root",
)  # fmt: skip
T = TypeVar("T")


@dataclass
class Box:
    machine: Machine
    port: int
    deb: Path
    before: dict[str, str]  # path -> kind, before the package was installed
    capture: Any  # pytest's capture manager: what say() prints is shown even when captured
    seconds: dict[str, float] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def say(self, line: str) -> None:
        with self.capture.global_and_fixture_disabled():
            print(f"\n[nspawn] {line}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(m: Machine) -> dict[str, str]:
    """Every path in the machine but the volatile ones, with its kind (and a link's target)."""
    out: dict[str, str] = {}
    skip = {str(m.path(p)) for p in VOLATILE}
    for top, dirs, files in os.walk(m.root):
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
        for name in (*dirs, *files):
            full = os.path.join(top, name)
            rel = "/" + os.path.relpath(full, m.root)
            if os.path.islink(full):
                out[rel] = f"link -> {os.readlink(full)}"
            else:
                out[rel] = "dir" if os.path.isdir(full) else "file"
    return out


def _new_paths(box: Box) -> dict[str, str]:
    now = _tree(box.machine)
    return {p: k for p, k in now.items() if box.before.get(p) != k}


def _config(box: Box, *, expect: str = '"auto"', tf: bool = False, extra: str = "") -> None:
    """The admin's /etc/tfgpud/tfgpud.toml: the simulated driver, a fast poll, alerts at once."""
    text = f"""[daemon]
interval_seconds = 1
{extra}
[http]
listen = "127.0.0.1:{box.port}"

[nvml]
library = "{FAKE_LIBS}/libnvidia-ml.so.1"

[expect]
gpus = {expect}

[alerts]
for_seconds = 0
"""
    if tf:
        text += f"""
[[tensorflow.envs]]
name = "tf"
python = "/srv/tfenv/bin/python"

[tensorflow.envs.environment]
LD_LIBRARY_PATH = "{FAKE_LIBS}"
TFGPUD_FAKE_DRIVER = "{SCENARIO}"
"""
    write_text_atomically(box.machine.path(CONFIG), text)


def _scenario(box: Box, *gpus: dict[str, Any]) -> None:
    write_scenario(box.machine.path(SCENARIO), gpus, driver_version=DRIVER)


def _wait(what: str, probe: Callable[[], T | None], timeout: float = 30) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


def _get(box: Box, path: str) -> str | None:
    try:
        with urllib.request.urlopen(box.url(path), timeout=5) as resp:
            return str(resp.read().decode())
    except (urllib.error.URLError, OSError):
        return None


def _metric(box: Box, series: str) -> float | None:
    for line in (_get(box, "/metrics") or "").splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return None


def _findings(box: Box) -> set[tuple[str, str]]:
    doc = json.loads(_get(box, "/status") or "{}")
    return {(f["code"], f["subject"]) for f in doc.get("findings", [])}


def _main_pid(box: Box) -> int:
    return int(box.machine.show(UNIT, "MainPID")["MainPID"])


def _cursor(m: Machine) -> str:
    out = m.run("journalctl", "-n", "0", "--show-cursor", "--no-pager").stdout
    return out.strip().rsplit("cursor: ", 1)[-1]


def _messages_since(m: Machine, cursor: str, *matches: str) -> list[str]:
    entries = m.journal(f"--after-cursor={cursor}", *matches)
    return [str(e.get("MESSAGE", "")) for e in entries]


def _wait_said(m: Machine, cursor: str | None, text: str, timeout: float = 15) -> None:
    """Wait until the unit logs a line containing ``text`` (after ``cursor``, or since boot);
    a timeout shows what it logged."""
    deadline = time.monotonic() + timeout
    while True:
        if cursor is None:
            said = [str(e.get("MESSAGE", "")) for e in m.journal(f"_SYSTEMD_UNIT={UNIT}")]
        else:
            said = _messages_since(m, cursor, f"_SYSTEMD_UNIT={UNIT}")
        if any(text in line for line in said):
            return
        if time.monotonic() > deadline:
            lines = "\n".join(said)
            everything = [
                str(e.get("MESSAGE", ""))
                for e in m.journal(f"UNIT={UNIT}", "+", f"_SYSTEMD_UNIT={UNIT}")
            ]
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {text!r}:\n{lines}\n"
                f"the unit's journal since boot (last 60 lines):\n" + "\n".join(everything[-60:])
            )
        time.sleep(0.25)


def _reload(box: Box) -> None:
    """`systemctl reload tfgpud`, which must succeed; a failure shows the unit's journal since
    and the machine's processes (a missed watchdog ping, a probe that would not end)."""
    m = box.machine
    cursor = _cursor(m)
    proc = m.run("systemctl", "reload", "tfgpud", check=False)
    if proc.returncode != 0:
        said = "\n".join(_messages_since(m, cursor, f"_SYSTEMD_UNIT={UNIT}", "+", f"UNIT={UNIT}"))
        raise AssertionError(
            f"systemctl reload tfgpud exited {proc.returncode}: {proc.stderr.strip()}\n"
            f"journal since:\n{said}\nprocesses:\n{m.processes()}"
        )


def _restarted(box: Box, old_pid: int) -> int:
    def new_pid() -> int | None:
        st = box.machine.show(UNIT, "MainPID", "ActiveState", "SubState")
        pid = int(st["MainPID"])
        running = st["ActiveState"] == "active" and st["SubState"] == "running"
        return pid if running and pid not in (0, old_pid) else None

    pid = _wait("a restarted tfgpud", new_pid, timeout=60)
    _wait("/healthz after the restart", lambda: _get(box, "/healthz"), timeout=30)
    return pid


@pytest.fixture(scope="module")
def box(
    tmp_path_factory: pytest.TempPathFactory, fakedriver: Path, request: pytest.FixtureRequest
) -> Iterator[Box]:
    if python_minor(str(SYS_PYTHON)) != python_minor(sys.executable):
        pytest.skip("the dev venv's Python differs from Debian's python3")
    started = time.monotonic()
    deb = build_deb(tmp_path_factory.mktemp("deb"))
    t = time.monotonic()
    rootfs = cached_rootfs()
    rootfs_s = time.monotonic() - t
    scratch = tmp_path_factory.mktemp("nspawn")
    shutil.rmtree(scratch)
    with Machine(rootfs, scratch, f"tfgpud-e2e-{os.getpid()}") as m:
        t = time.monotonic()
        m.boot()
        boot_s = time.monotonic() - t
        shutil.copytree(fakedriver, m.path(FAKE_LIBS), symlinks=True)
        m.path(SCENARIO).parent.mkdir(parents=True)
        m.path(DROP_IN).parent.mkdir(parents=True)
        # As `systemctl edit tfgpud` would: the simulated driver, a short watchdog, fast restarts.
        m.path(DROP_IN).write_text(
            f"[Service]\nEnvironment=TFGPUD_FAKE_DRIVER={SCENARIO}\nWatchdogSec=3s\nRestartSec=1s\n"
        )
        capture = request.config.pluginmanager.getplugin("capturemanager")
        b = Box(m, _free_port(), deb, before={}, capture=capture)
        _scenario(b, GPU)
        b.before = _tree(m)
        shutil.copy2(deb, m.path(f"/root/{deb.name}"))
        b.seconds.update(rootfs=rootfs_s, boot=boot_s)
        yield b
        total = time.monotonic() - started
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in b.seconds.items())
        b.say(f"{total:.0f} s in all (the root file system is cached after a first run): {steps}")


def test_apt_installs_the_package_and_starts_nothing(box: Box) -> None:
    m = box.machine
    out = m.run(
        "apt-get", "install", "-y", "--no-install-recommends", f"/root/{box.deb.name}",
        env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300,
    ).stdout  # fmt: skip
    status = m.run("dpkg-query", "-W", "-f=${Status}", "tfgpud").stdout
    assert status == "install ok installed"
    box.say("apt: " + next(line for line in out.splitlines() if "newly installed" in line))
    assert "sudo systemctl enable --now tfgpud" in out
    assert m.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "disabled"
    assert m.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "inactive"
    assert m.run("getent", "passwd", "tfgpud").stdout.startswith("tfgpud:")


def test_installed_unit_verifies_clean(box: Box) -> None:
    for name in (UNIT, f"/usr/lib/systemd/system/{UNIT}"):
        proc = box.machine.run("systemd-analyze", "verify", name, check=False)
        assert proc.returncode == 0 and (proc.stdout + proc.stderr).strip() == "", proc


def test_starts_and_is_ready_with_a_status_line(box: Box) -> None:
    m = box.machine
    _config(box)
    t = time.monotonic()
    m.run("systemctl", "daemon-reload")
    m.run("systemctl", "enable", "--now", "tfgpud")  # the README's command
    box.seconds["start"] = time.monotonic() - t
    # Type=notify: the start job ends at READY=1, sent after the first poll with HTTP up.
    assert _get(box, "/healthz") is not None
    st = m.show(UNIT, "ActiveState", "SubState", "StatusText", "NRestarts", "UnitFileState")
    assert st["ActiveState"] == "active" and st["SubState"] == "running", st
    assert st["StatusText"].startswith("1 GPU") and DRIVER in st["StatusText"], st
    assert st["UnitFileState"] == "enabled"
    # Not a "python*" process that the workloads scan would inspect (nor its ExecReload).
    comm = m.run("cat", f"/proc/{_main_pid(box)}/comm").stdout.strip()
    assert comm == "tfgpud-python"
    # It raised its own open-files limit under the unit's system call filter, so the HTTP
    # server's 1024 connections leave descriptors for NVML, probes and /proc reads.
    limits = m.run("cat", f"/proc/{_main_pid(box)}/limits").stdout
    assert re.search(r"Max open files\s+16384\s", limits), limits


def test_reload_of_a_valid_file_is_applied(box: Box) -> None:
    m = box.machine
    pid = _main_pid(box)
    assert _metric(box, "tfgpud_expected_gpus") == 1
    _config(box, expect="2")
    proc = m.run("systemctl", "reload", "tfgpud", check=False)
    assert proc.returncode == 0, proc.stderr
    assert m.show(UNIT, "ReloadResult")["ReloadResult"] == "success"
    _wait("expected_gpus 2", lambda: _metric(box, "tfgpud_expected_gpus") == 2, timeout=15)
    assert _main_pid(box) == pid


def test_reload_of_an_invalid_file_fails_and_the_old_config_keeps_running(box: Box) -> None:
    m = box.machine
    pid = _main_pid(box)
    cursor = _cursor(m)
    _config(box, expect="3", extra="poll_seconds = 1")  # not a [daemon] key
    proc = m.run("systemctl", "reload", "tfgpud", check=False)
    assert proc.returncode != 0
    st = m.show(UNIT, "ReloadResult", "ActiveState", "SubState", "MainPID")
    assert st["ReloadResult"] == "exit-code", st
    assert (st["ActiveState"], st["SubState"], int(st["MainPID"])) == ("active", "running", pid)
    said = "\n".join(_messages_since(m, cursor, f"_SYSTEMD_UNIT={UNIT}"))
    assert "poll_seconds" in said and "Not reloaded" in said, said
    time.sleep(2.5)  # two polls: the daemon got no SIGHUP, the old configuration stays
    assert _metric(box, "tfgpud_expected_gpus") == 2
    _config(box)
    _reload(box)
    _wait("expected_gpus back to 1", lambda: _metric(box, "tfgpud_expected_gpus") == 1)
    # Neither ExecReload (tfgpud-python) nor the probe of the discovered /srv/tfenv (a python
    # run as nobody, whose maps tfgpud may not read) is a workload: had the scan taken one for
    # a candidate, it would have warned that it cannot read its maps.
    said = "\n".join(_messages_since(m, cursor, f"_SYSTEMD_UNIT={UNIT}"))
    assert "cannot read the memory maps" not in said, f"{said}\n{m.processes()}"


def test_tensorflow_probe_works_under_the_sandbox(box: Box) -> None:
    """A TF 2.21 venv probed by the sandboxed service finds what `tfgpud doctor` run
    unsandboxed as root finds."""
    m = box.machine
    # As after a pip install into the discovered /srv/tfenv: it is probed again (as nobody),
    # and the reload below comes while that probe runs. The loop must neither wait for it nor
    # miss a watchdog ping (WatchdogSec=3s); its child must be killed though tfgpud may not
    # signal nobody's processes itself.
    _wait_said(m, None, "TensorFlow env srv-tfenv: ok", timeout=120)  # its first probe ended
    cursor = _cursor(m)
    os.utime(m.path(f"{TF_VENV}/lib/python3.11/site-packages"))
    _wait_said(m, cursor, "probing TensorFlow env srv-tfenv (installed packages changed)", 90)
    _config(box, tf=True)
    t = time.monotonic()
    _reload(box)
    series = 'tfgpud_tf_probe_success{env="tf"}'
    ok = _wait("the TF probe", lambda: _metric(box, series) is not None, timeout=240)
    box.seconds["tf probe"] = time.monotonic() - t
    assert ok == 1, _get(box, "/status")
    # The configured env wins over its discovered duplicate (the same interpreter).
    assert _metric(box, 'tfgpud_tf_probe_success{env="srv-tfenv"}') is None
    nobody = m.run("id", "-u", "nobody").stdout.strip()
    _wait(
        "the cancelled probe's child (nobody's) gone",
        lambda: all(line.split()[2] != nobody for line in m.processes().splitlines()),
        timeout=10,
    )
    daemon = _findings(box)
    t = time.monotonic()
    doctor = m.run(
        "/usr/bin/tfgpud", "doctor", "--json", "--config", CONFIG,
        env={"TFGPUD_FAKE_DRIVER": SCENARIO}, check=False, timeout=300,
    )  # fmt: skip
    box.seconds["doctor"] = time.monotonic() - t
    assert doctor.returncode in (0, 1, 2), doctor.stderr
    unsandboxed = {(f["code"], f["subject"]) for f in json.loads(doctor.stdout)["findings"]}
    assert daemon == unsandboxed
    assert not any(code == "tf-probe-refused" for code, _ in daemon)
    tf_info = [
        line for line in (_get(box, "/metrics") or "").splitlines() if "tfgpud_tf_info{" in line
    ]
    assert tf_info and 'tf_version="2.21.0"' in tf_info[0], tf_info
    box.say(f"TF findings (daemon == doctor): {sorted(daemon)}")
    _config(box)  # later restarts need not import TensorFlow again
    _reload(box)


def test_a_lost_gpu_is_in_the_journal_with_its_fields(box: Box) -> None:
    m = box.machine
    _scenario(box, {**GPU, "lost": True})
    entries = _wait(
        "journalctl FINDING_CODE=gpu-lost",
        lambda: m.journal("FINDING_CODE=gpu-lost", "ALERT_STATE=firing"),
        timeout=20,
    )
    e = entries[-1]
    assert e["_SYSTEMD_UNIT"] == UNIT and e["SYSLOG_IDENTIFIER"] == "tfgpud"
    assert e["_COMM"] == "tfgpud-python" and e["_TRANSPORT"] == "journal"
    assert (e["SEVERITY"], e["SUBJECT"], e["PRIORITY"]) == ("critical", UUID, "3")
    assert e["MESSAGE_ID"] == message_id("gpu-lost")
    assert str(e["MESSAGE"]).startswith("FIRING [critical] gpu-lost")
    # The code that logged it, not the journal handler (nor the logging module).
    code_file = str(e["CODE_FILE"])
    assert code_file.startswith("/opt/tfgpud/lib/python3") and code_file.endswith(".py")
    assert not code_file.endswith(("/tfgpud/systemd.py", "/logging/__init__.py")), code_file
    line = m.path(code_file).read_text().splitlines()[int(str(e["CODE_LINE"])) - 1]
    assert "log" in line and e["CODE_FUNC"] not in ("emit", "handle", "_log"), (line, e)
    _scenario(box, GPU)
    _wait(
        "gpu-lost resolved",
        lambda: m.journal("FINDING_CODE=gpu-lost", "ALERT_STATE=resolved"),
        timeout=20,
    )


def test_watchdog_restarts_a_stopped_daemon(box: Box) -> None:
    m = box.machine
    pid, cursor = _main_pid(box), _cursor(m)
    restarts = int(m.show(UNIT, "NRestarts")["NRestarts"])
    t = time.monotonic()
    m.kill(pid, signal.SIGSTOP)
    _restarted(box, pid)
    box.seconds["watchdog restart"] = time.monotonic() - t
    assert int(m.show(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
    said = _messages_since(m, cursor, f"UNIT={UNIT}")
    assert any("Failed with result 'watchdog'" in s for s in said), said


def test_a_killed_daemon_is_restarted(box: Box) -> None:
    m = box.machine
    pid, cursor = _main_pid(box), _cursor(m)
    m.kill(pid, signal.SIGKILL)
    _restarted(box, pid)
    said = _messages_since(m, cursor, f"UNIT={UNIT}")
    assert any("status=9/KILL" in s for s in said), said


def test_the_baseline_survives_a_restart(box: Box) -> None:
    m = box.machine
    baseline = json.loads(m.path("/var/lib/tfgpud/baseline.json").read_text())
    assert UUID in json.dumps(baseline)
    _scenario(box)  # the GPU is gone while the service restarts
    pid = _main_pid(box)
    m.run("systemctl", "restart", "tfgpud")
    assert _main_pid(box) != pid
    _wait("gpu-vanished", lambda: ("gpu-vanished", UUID) in _findings(box), timeout=15)
    assert _metric(box, "tfgpud_expected_gpus") == 1 and _metric(box, "tfgpud_nvml_gpus") == 0
    _scenario(box, GPU)
    _wait("the GPU back", lambda: ("gpu-vanished", UUID) not in _findings(box), timeout=15)


def test_stop_takes_under_two_seconds_and_exits_cleanly(box: Box) -> None:
    m = box.machine
    m.run("systemctl", "stop", "tfgpud")
    st = m.show(
        UNIT, "ActiveState", "ActiveExitTimestampMonotonic", "InactiveEnterTimestampMonotonic",
        "ExecMainCode", "ExecMainStatus", "Result",
    )  # fmt: skip
    took = (
        int(st["InactiveEnterTimestampMonotonic"]) - int(st["ActiveExitTimestampMonotonic"])
    ) / 1e6
    box.seconds["stop"] = took
    assert st["ActiveState"] == "inactive" and st["Result"] == "success", st
    assert (st["ExecMainCode"], st["ExecMainStatus"]) == ("1", "0"), st  # exited 0, not killed
    assert took < 2.0, st


def test_an_upgrade_restarts_a_running_service(box: Box) -> None:
    m = box.machine
    m.run("systemctl", "start", "tfgpud")
    pid = _main_pid(box)
    m.run(
        "apt-get", "install", "-y", "--reinstall", f"/root/{box.deb.name}",
        env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300,
    )  # fmt: skip
    _restarted(box, pid)
    assert m.path(CONFIG).read_text().count(f"127.0.0.1:{box.port}") == 1  # conffile kept
    assert m.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"


def test_security_exposure_under_systemd(box: Box) -> None:
    report = box.machine.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    score = exposure_score(report)
    open_items = [line.split()[1] for line in report.splitlines() if line.startswith("✗")]
    box.say(f"systemd-analyze security {UNIT}: {score}; not restricted: {open_items}")
    assert score <= MAX_EXPOSURE, report


def test_remove_then_purge_leave_nothing_behind(box: Box) -> None:
    m = box.machine
    apt = {"DEBIAN_FRONTEND": "noninteractive"}
    m.run("apt-get", "remove", "-y", "tfgpud", env=apt, timeout=300)
    assert m.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "inactive"
    kept = _new_paths(box)
    box.say(f"after apt-get remove: {sorted(kept.items())}")
    # The admin's configuration, the learned baseline, the enablement (masked) stay.
    assert kept.get("/etc/tfgpud/tfgpud.toml") == "file"
    assert kept.get("/var/lib/tfgpud/baseline.json") == "file"
    assert kept.get(f"/etc/systemd/system/{UNIT}") == "link -> /dev/null"
    assert f"/etc/systemd/system/multi-user.target.wants/{UNIT}" in kept
    assert not any(p.startswith(("/opt/tfgpud", "/usr/lib/systemd/system/tfgpud")) for p in kept)
    m.run("apt-get", "purge", "-y", "tfgpud", env=apt, timeout=300)
    left = _new_paths(box)
    user = m.run("getent", "passwd", "tfgpud", check=False).stdout.strip()
    box.say(f"after apt-get purge: files {sorted(left.items())}; user kept: {user!r}")
    assert left == {}
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    for said in (
        "keeping `/etc/tfgpud/tfgpud.toml`",
        "`/etc/systemd/system/tfgpud.service` → `/dev/null`",
        "no file of tfgpud's is left",
        "The `tfgpud` user and group stay",
    ):
        assert said in readme, f"README's removal paragraph should say {said!r}"
    assert m.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() in ("", "not-found")
