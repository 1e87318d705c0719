"""packaging/systemd: the unit parses cleanly, scores ≤ 2.2 exposure, and agrees with the code.

systemd is not PID 1 here, so the unit is checked with systemd-analyze against a scratch root
that holds the host's unit directory, /bin/kill and the binary the unit names; sysusers and
tmpfiles are applied to a scratch root with ``--root``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from packaging_helpers import (
    ANALYZE,
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
# 1.5 without CAP_SETUID/CAP_SETGID and with PrivateUsers=yes; both are what probing discovered
# envs as their owners costs (README: "Probing envs safely").
MAX_EXPOSURE = 2.2
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
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
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
