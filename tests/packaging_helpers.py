"""Checks shared by the systemd-unit and Debian-package tests (systemd-analyze, unit parsing)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ANALYZE = shutil.which("systemd-analyze")
REPO = Path(__file__).resolve().parents[1]
SYS_PYTHON = Path("/usr/bin/python3")
# The most systemd-analyze security may score the shipped unit, offline and under systemd.
# 1.5 without CAP_SETUID/CAP_SETGID and with PrivateUsers=yes; both are what probing discovered
# envs as their owners costs (README: "Probing envs safely").
MAX_EXPOSURE = 2.2


def python_minor(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip()


def build_deb(out: Path) -> Path:
    """`make deb` into ``out`` (packaging/debian/build.sh, ~10 s); the .deb's path."""
    proc = subprocess.run(
        ["bash", "packaging/debian/build.sh", str(out)],
        cwd=REPO,
        env={**os.environ, "PY": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def exposure_score(report: str) -> float:
    """The overall exposure level in a `systemd-analyze security` report."""
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", report)
    assert m, report
    return float(m.group(1))


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section → key → values (repeated keys keep every value, as systemd does)."""
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out[section][key.strip()].append(value.strip())
    return out


def exec_binaries(unit: Path) -> list[str]:
    """The programs the unit's Exec*= lines run, without the -+@:! prefixes."""
    service = parse_unit(unit)["Service"]
    lines = [v for k, vs in service.items() if k.startswith("Exec") for v in vs]
    return [line.split()[0].lstrip("-+@:!") for line in lines if line.split()]


def scratch_root(root: Path, unit: Path) -> Path:
    """A root to verify ``unit`` in: the host's units and the binaries its Exec*= lines name
    (nothing else: Debian's minbase has no procps, so no /bin/kill)."""
    for program in exec_binaries(unit):
        binary = root / program.lstrip("/")
        binary.parent.mkdir(parents=True, exist_ok=True)
        if not binary.exists():
            binary.write_text("#!/bin/sh\n")
            binary.chmod(0o755)
    units = root / "usr" / "lib" / "systemd" / "system"
    if not (units / "sysinit.target").exists():
        shutil.copytree("/usr/lib/systemd/system", units, symlinks=True, dirs_exist_ok=True)
    (root / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    if not (root / "bin").exists():
        (root / "bin").symlink_to("usr/bin")
    (root / "etc" / "systemd" / "system").mkdir(parents=True, exist_ok=True)
    shutil.copy2(unit, root / "etc" / "systemd" / "system" / unit.name)
    return root


def verify(root: Path, name: str = "tfgpud.service") -> str:
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "verify", f"--root={root}", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0 else " [rc != 0]")


def exposure(unit: Path) -> tuple[float, str]:
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return exposure_score(proc.stdout + proc.stderr), proc.stdout
