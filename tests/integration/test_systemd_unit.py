"""packaging/systemd: the unit parses cleanly, scores ≤ 2.2 exposure, and agrees with the code.

systemd is not PID 1 here, so the unit is checked with systemd-analyze against a scratch root
that holds the host's unit directory and the binaries the unit names; sysusers and
tmpfiles are applied to a scratch root with ``--root``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess
from helpers import write_scenario
from packaging_helpers import (
    ANALYZE,
    MAX_EXPOSURE,
    exec_binaries,
    exposure,
    parse_unit,
    scratch_root,
    verify,
)

from tfgpud.config import DEFAULT_CONFIG_PATH, Config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "tfgpud.service"
SYSUSERS = ROOT / "packaging" / "systemd" / "tfgpud.sysusers"
TMPFILES = ROOT / "packaging" / "systemd" / "tfgpud.tmpfiles"
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
# What README.md tells to add with `systemctl edit tfgpud` to see other users' TF jobs.
DROP_IN = """
[Service]
CapabilityBoundingSet=CAP_SYS_PTRACE
AmbientCapabilities=CAP_SYS_PTRACE
"""
# What README.md tells to add to give the user switch up (discovered envs of other users are
# then reported by their metadata only).
NO_USER_SWITCH = """
[Service]
CapabilityBoundingSet=
AmbientCapabilities=
PrivateUsers=yes
"""


@needs_analyze
def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    assert verify(scratch_root(tmp_path, UNIT)) == ""


@needs_analyze
def test_verify_does_complain_about_a_broken_unit(tmp_path: Path) -> None:
    broken = tmp_path / "src" / "tfgpud.service"
    broken.parent.mkdir()
    broken.write_text(UNIT.read_text().replace("LockPersonality=yes", "LockPersonalty=yes"))
    assert "Unknown key 'LockPersonalty'" in verify(scratch_root(tmp_path / "root", broken))


@needs_analyze
def test_verify_checks_the_modprobe_pre_command(tmp_path: Path) -> None:
    """verify sees ExecStartPre's binary (the scratch root has it); without the "-" prefix a
    machine lacking nvidia-modprobe would fail to start the daemon, and verify says so."""
    assert "/usr/bin/nvidia-modprobe" in exec_binaries(UNIT)
    strict = tmp_path / "src" / "tfgpud.service"
    strict.parent.mkdir()
    strict.write_text(UNIT.read_text().replace("ExecStartPre=-+", "ExecStartPre=+"))
    root = scratch_root(tmp_path / "root", strict)
    assert verify(root) == ""
    (root / "usr" / "bin" / "nvidia-modprobe").unlink()
    assert "nvidia-modprobe is not executable" in verify(root)


@needs_analyze
@pytest.mark.parametrize(
    ("drop_in", "needle"),
    [(DROP_IN, "CAP_SYS_PTRACE"), (NO_USER_SWITCH, "PrivateUsers=")],
    ids=["ptrace", "no-user-switch"],
)
def test_readme_drop_ins_exposure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], drop_in: str, needle: str
) -> None:
    """The README's drop-ins (CAP_SYS_PTRACE; giving up the user switch): exposure as stated."""
    merged = tmp_path / "tfgpud.service"
    merged.write_text(UNIT.read_text().replace("[Install]", drop_in.strip() + "\n\n[Install]", 1))
    score, report = exposure(merged)
    with capsys.disabled():
        print(f"\n[systemd] exposure with the README's drop-in {drop_in.split()[1:]}: {score}")
    assert needle in report
    readme = (ROOT / "README.md").read_text()
    block = "```ini\n" + drop_in.strip() + "\n```"
    assert block in readme, f"README must show the drop-in\n{block}"
    after = readme.split(block, 1)[1][:600]
    assert f"exposure {score}" in after, f"README must state the drop-in's exposure {score}"


@needs_analyze
def test_security_exposure_is_at_most_2_2(capsys: pytest.CaptureFixture[str]) -> None:
    score, report = exposure(UNIT)
    with capsys.disabled():
        print(f"\n[systemd] systemd-analyze security --offline=true exposure: {score}")
    assert score <= MAX_EXPOSURE, report
    assert f"exposure {score}" in (ROOT / "README.md").read_text(), "README must state it"


def test_unit_matches_the_daemon_and_the_package() -> None:
    unit = parse_unit(UNIT)
    svc = unit["Service"]
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert svc["ExecStart"] == [f"/opt/tfgpud/bin/tfgpud run --config {DEFAULT_CONFIG_PATH}"]
    # Validate, then signal, with the package's own command (no procps on a minimal system).
    assert svc["ExecReload"] == ["/opt/tfgpud/bin/tfgpud reload --pid $MAINPID"]
    assert svc["Restart"] == ["on-failure"] and svc["RestartPreventExitStatus"] == ["78"]
    assert svc["WatchdogSec"] and svc["User"] == ["tfgpud"]
    assert f"/var/lib/{svc['StateDirectory'][0]}" == Config().daemon.state_dir
    assert svc["DevicePolicy"] == ["closed"]
    # DeviceAllow= names resolve at start: the modules must be loaded before (After= only:
    # the daemon also runs where these units do not exist), and nvidia-uvm loaded privileged.
    after = unit["Unit"]["After"][0].split()
    assert {"systemd-modules-load.service", "nvidia-persistenced.service"} <= set(after)
    assert "Wants" not in unit["Unit"] and "Requires" not in unit["Unit"]
    assert svc["ExecStartPre"] == ["-+/usr/bin/nvidia-modprobe -u -c0"]
    allowed = {v.split()[0] for v in svc["DeviceAllow"]}
    assert {"char-nvidia-frontend", "char-nvidia-uvm"} <= allowed
    assert "PrivateDevices" not in svc  # it would hide /dev/nvidia*
    # The probe runs TensorFlow (JIT) and reads envs in /home.
    assert svc.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    assert svc["ProtectHome"] == ["read-only"]
    # Only what switching to an env's owner needs; the probe child drops it (tfgpud.runner).
    assert svc["CapabilityBoundingSet"] == ["CAP_SETUID CAP_SETGID"]
    assert svc["AmbientCapabilities"] == ["CAP_SETUID CAP_SETGID"]
    assert svc["PrivateUsers"] == ["no"] and svc["NoNewPrivileges"] == ["yes"]
    # @privileged is denied but for the user switch and setpriv's capset.
    assert svc["SystemCallFilter"][-2:] == ["~@privileged @resources", "@setuid capset"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_and_tmpfiles_create_the_user_and_state_dir(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    passwd = (tmp_path / "etc" / "passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("tfgpud:"))
    fields = entry.split(":")
    assert int(fields[2]) < 1000  # a system user
    assert fields[5] == "/var/lib/tfgpud" and fields[6] in ("/usr/sbin/nologin", "/sbin/nologin")
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(TMPFILES)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    state = tmp_path / "var" / "lib" / "tfgpud"
    st = state.stat()
    assert oct(st.st_mode & 0o777) == "0o750"
    assert st.st_uid == int(fields[2])


def _reload(pid: int) -> subprocess.CompletedProcess[str]:
    """What ExecReload runs, against ``pid``."""
    return subprocess.run(
        [sys.executable, "-m", "tfgpud", "reload", "--pid", str(pid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_exec_reload_validates_then_signals_the_daemon(
    tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    write_scenario(scenario_path, [{"name": "NVIDIA A100-SXM4-80GB"}])
    with DaemonProcess(tmp_path, scenario=scenario_path) as d:
        d.start()
        assert d.proc is not None
        d.wait_metric(lambda m: m.get("tfgpud_expected_gpus") == 1)
        good = d.config.read_text()
        seen = len(d.notify.snapshot())
        d.config.write_text(good + "[expect]\ngpus = 3\nbogus = 1\n")
        bad = _reload(d.proc.pid)
        assert bad.returncode == 78, bad.stderr
        assert "bogus" in bad.stderr and "Not reloaded" in bad.stderr
        d.config.write_text(good + "[expect]\ngpus = 2\n")
        ok = _reload(d.proc.pid)
        assert ok.returncode == 0, ok.stderr
        assert f"{d.config}: valid" in ok.stdout
        d.wait_metric(lambda m: m.get("tfgpud_expected_gpus") == 2)
        reloads = [m for m in d.notify.snapshot()[seen:] if m.get("RELOADING") == "1"]
        assert len(reloads) == 1  # the invalid file sent no SIGHUP
        assert d.stop() == 0


def test_exec_reload_signals_nothing_but_tfgpud_run(tmp_path: Path) -> None:
    # SIGHUP's default action ends a process: a wrong PID must not be signalled.
    other = subprocess.Popen(["sleep", "30"])
    try:
        proc = _reload(other.pid)
        assert proc.returncode == 1 and "is not `tfgpud run`" in proc.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(5)
    gone = _reload(other.pid)
    assert gone.returncode == 1 and "is tfgpud running?" in gone.stderr
