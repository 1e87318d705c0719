"""The packaged launcher (/opt/tfgpud/bin/tfgpud): never imports from the caller's directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "packaging" / "debian" / "tfgpud-launcher"


def run_launcher(
    text: str, cwd: Path, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``text`` (a launcher) with this venv's Python in place of /opt/tfgpud's, from ``cwd``
    holding a trap ``pydantic.py`` that tfgpud's CLI would import if ``cwd`` were on sys.path."""
    marker = tmp_path / "trap-ran"
    (cwd / "pydantic.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    launcher = tmp_path / "tfgpud"
    launcher.write_text(text.replace("/opt/tfgpud/bin/tfgpud-python", sys.executable))
    launcher.chmod(0o755)
    proc = subprocess.run(
        [str(launcher), "check-config", str(ROOT / "config" / "tfgpud.toml")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd), "HOME": str(cwd)},
        check=False,
    )
    return proc, marker


def test_launcher_ignores_modules_in_the_current_directory(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    text = LAUNCHER.read_text()
    assert ' -I -m tfgpud "$@"' in text and text.startswith("#!/bin/sh\n")
    proc, marker = run_launcher(text, cwd, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "the launcher imported pydantic.py from the current directory"


def test_without_isolation_the_trap_would_run(tmp_path: Path) -> None:
    """The trap is real: the pre-fix launcher (no -I) runs it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    old = LAUNCHER.read_text().replace(" -I -m ", " -m ")
    _, marker = run_launcher(old, cwd, tmp_path)
    assert marker.exists()
