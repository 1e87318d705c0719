"""Checks shared by the systemd-unit and Debian-package tests (systemd-analyze, unit parsing)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

ANALYZE = shutil.which("systemd-analyze")


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
    """A root to verify ``unit`` in: the host's units, /bin/kill, the binaries Exec*= names."""
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
    shutil.copy2("/usr/bin/kill", root / "usr" / "bin" / "kill")
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
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return float(m.group(1)), proc.stdout
