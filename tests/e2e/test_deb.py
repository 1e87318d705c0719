"""`make deb`: the package builds, lintian finds no errors, files land where the README says,
the maintainer scripts enable nothing, and the daemon runs from the packaged venv.

The package is built once per module (~10 s) into a temp dir and unpacked with ``dpkg -x``
into a scratch root; nothing is installed on this machine.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fakedriver_env, write_scenario
from packaging_helpers import ANALYZE, SYS_PYTHON, build_deb, python_minor, verify

from tfgpud.config import Config

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed"),
    pytest.mark.skipif(not SYS_PYTHON.exists(), reason="no /usr/bin/python3"),
]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if python_minor(str(SYS_PYTHON)) != python_minor(sys.executable):
        pytest.skip("the dev venv's Python differs from Debian's python3")
    return build_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=60)
    ctl = root / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctl)], check=True, timeout=60)
    return root


def _field(root: Path, name: str) -> str:
    for line in (root / "DEBIAN" / "control").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in control")


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed")
def test_lintian_reports_no_errors(deb: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.run(
        ["lintian", "--tag-display-limit", "0", str(deb)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    tags = [line for line in proc.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "O:")]
    errors = [t for t in tags if t.startswith("E:")]
    with capsys.disabled():
        print(f"\n[deb] {deb.name}: {deb.stat().st_size / 1e6:.1f} MB; lintian: {len(errors)} E, "
              f"{sum(t.startswith('W:') for t in tags)} W")  # fmt: skip
    assert not errors, proc.stdout + proc.stderr


def test_files_land_where_the_readme_says(unpacked: Path, deb: Path) -> None:
    r = unpacked
    same = {
        "usr/lib/systemd/system/tfgpud.service": "packaging/systemd/tfgpud.service",
        "usr/lib/sysusers.d/tfgpud.conf": "packaging/systemd/tfgpud.sysusers",
        "usr/lib/tmpfiles.d/tfgpud.conf": "packaging/systemd/tfgpud.tmpfiles",
        "etc/tfgpud/tfgpud.toml": "config/tfgpud.toml",
    }
    for installed, source in same.items():
        assert (r / installed).read_bytes() == (ROOT / source).read_bytes(), installed
    readme = (ROOT / "README.md").read_text()
    for path in (
        "/opt/tfgpud",
        "/etc/tfgpud/tfgpud.toml",
        "/usr/lib/systemd/system/tfgpud.service",
    ):
        assert path in readme
    assert (r / "DEBIAN" / "conffiles").read_text().split() == ["/etc/tfgpud/tfgpud.toml"]
    launcher = r / "opt" / "tfgpud" / "bin" / "tfgpud"
    assert os.access(launcher, os.X_OK)
    assert os.readlink(r / "usr" / "bin" / "tfgpud") == "/opt/tfgpud/bin/tfgpud"
    assert os.readlink(r / "opt" / "tfgpud" / "bin" / "python3") == str(SYS_PYTHON)
    site = next((r / "opt" / "tfgpud" / "lib").glob("python3*/site-packages"))
    names = {re.split(r"[-.]", p.name)[0].lower() for p in site.iterdir()}
    assert {"tfgpud", "pydantic", "prometheus_client", "yaml", "bcrypt", "pynvml"} <= names
    assert "tensorflow" not in names  # the daemon never imports it
    assert not list(r.rglob("__pycache__")) and not list(r.rglob("*.pyc"))
    assert (r / "usr/share/doc/tfgpud/copyright").exists()
    assert (r / "usr/share/tfgpud/grafana/tfgpud.json").exists()
    assert "python3 (<< " in _field(r, "Depends")
    # md5sums match the payload.
    for line in (r / "DEBIAN" / "md5sums").read_text().splitlines():
        digest, path = line.split(maxsplit=1)
        assert hashlib.md5((r / path).read_bytes()).hexdigest() == digest, path
    size_kib = int(_field(r, "Installed-Size"))
    assert 2_000 < size_kib < 60_000
    assert deb.stat().st_size < 15e6


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
def test_depends_cover_the_c_libraries_the_wheels_link(unpacked: Path) -> None:
    """An extension module needing a newer glibc than Depends says would install, then fail
    to import (bcrypt's wheel needs GLIBC_2.34)."""
    depends = _field(unpacked, "Depends")
    m = re.search(r"libc6 \(>= ([0-9.]+)\)", depends)
    assert m, depends
    needed: list[tuple[int, ...]] = []
    for so in unpacked.rglob("*.so"):
        out = subprocess.run(
            ["objdump", "-p", "-T", str(so)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        needed += [_version(v) for v in re.findall(r"GLIBC_([0-9]+\.[0-9]+)", out)]
        if re.search(r"NEEDED\s+libgcc_s\.so\.1", out):
            assert "libgcc-s1" in depends, (so, depends)
    assert needed and max(needed) <= _version(m.group(1)), (max(needed), depends)


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_installed_unit_verifies_against_the_installed_launcher(
    unpacked: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(unpacked, root, symlinks=True, ignore=shutil.ignore_patterns("DEBIAN"))
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True,
                    dirs_exist_ok=True)  # fmt: skip
    (root / "bin").symlink_to("usr/bin")  # and no /bin/kill: minbase has no procps
    assert verify(root) == ""


def test_maintainer_scripts_are_valid_sh(unpacked: Path) -> None:
    for name in ("postinst", "prerm", "postrm"):
        script = unpacked / "DEBIAN" / name
        assert os.access(script, os.X_OK)
        subprocess.run(["sh", "-n", str(script)], check=True, timeout=10)
        if shutil.which("shellcheck"):
            proc = subprocess.run(
                ["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == 0, proc.stdout


def _stubs(d: Path) -> Path:
    """Commands the scripts may call, each logging its argv to d/calls."""
    d.mkdir()
    for cmd in ("systemctl", "deb-systemd-invoke", "deb-systemd-helper", "systemd-sysusers",
                "systemd-tmpfiles", "adduser", "python3"):  # fmt: skip
        stub = d / cmd
        stub.write_text(f'#!/bin/sh\necho "{cmd} $*" >> {d}/calls\n')
        stub.chmod(0o755)
    return d


def _as_if_systemd(script: Path, stubs: Path, *args: str) -> tuple[str, list[str]]:
    """Run a maintainer script where /run/systemd/system exists (a private mount namespace)."""
    cmd = (
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && "
        f'PATH="{stubs}:$PATH" sh "$0" "$@"'
    )
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", cmd, str(script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = stubs / "calls"
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return proc.stdout, lines


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_install_and_upgrade_enable_and_start_nothing(unpacked: Path, tmp_path: Path) -> None:
    stubs = _stubs(tmp_path / "stubs")
    ctl = unpacked / "DEBIAN"
    out, calls = _as_if_systemd(ctl / "postinst", stubs, "configure")
    assert calls == [
        "systemd-sysusers tfgpud.conf",
        "systemd-tmpfiles --create tfgpud.conf",
        "python3 -m compileall -q /opt/tfgpud/lib",
        "deb-systemd-helper unmask tfgpud.service",
        "deb-systemd-helper update-state tfgpud.service",  # records links, enables nothing
        "systemctl --system daemon-reload",
    ]
    assert "sudo systemctl enable --now tfgpud" in out  # says how, does not do it
    _, calls = _as_if_systemd(ctl / "postinst", stubs, "configure", "0.0.9")
    assert "deb-systemd-invoke try-restart tfgpud.service" in calls  # only if already running
    assert not any(" enable" in c or c.endswith(" start tfgpud.service") for c in calls)
    _, calls = _as_if_systemd(ctl / "prerm", stubs, "remove")
    assert calls == ["deb-systemd-invoke stop tfgpud.service"]
    _, calls = _as_if_systemd(ctl / "postrm", stubs, "remove")
    assert calls == ["deb-systemd-helper mask tfgpud.service", "systemctl --system daemon-reload"]
    _, calls = _as_if_systemd(ctl / "postrm", stubs, "purge")
    assert calls == [
        "deb-systemd-helper purge tfgpud.service",
        "deb-systemd-helper unmask tfgpud.service",
        "systemctl --system daemon-reload",
    ]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_postinst_and_purge_in_a_scratch_root(unpacked: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(unpacked, root, symlinks=True)
    # As dpkg runs them (deb-systemd-helper refuses to run without DPKG_MAINTSCRIPT_PACKAGE).
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DPKG_ROOT": str(root),
        "DPKG_MAINTSCRIPT_PACKAGE": "tfgpud",
    }
    ctl = root / "DEBIAN"

    def run(script: str, *args: str) -> str:
        proc = subprocess.run(
            ["sh", str(ctl / script), *args],
            env={**env, "DPKG_MAINTSCRIPT_NAME": script},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    run("postinst", "configure")
    passwd = (root / "etc" / "passwd").read_text()
    assert any(line.startswith("tfgpud:") for line in passwd.splitlines())
    state = root / "var" / "lib" / "tfgpud"
    assert state.is_dir() and oct(state.stat().st_mode & 0o777) == "0o750"
    assert list((root / "opt" / "tfgpud").rglob("cli.cpython-*.pyc"))  # byte-compiled
    # The admin enables it (`systemctl enable tfgpud` makes this link).
    system = root / "etc" / "systemd" / "system"
    wants = system / "multi-user.target.wants" / "tfgpud.service"
    wants.parent.mkdir(parents=True, exist_ok=True)
    wants.symlink_to("/usr/lib/systemd/system/tfgpud.service")
    run("prerm", "remove")
    assert not list((root / "opt" / "tfgpud").rglob("__pycache__"))
    (root / "usr" / "lib" / "systemd" / "system" / "tfgpud.service").unlink()  # dpkg removes it
    run("postrm", "remove")
    if shutil.which("deb-systemd-helper"):
        # Removed, not purged: the enablement is kept for a reinstall, the unit is masked.
        assert os.readlink(system / "tfgpud.service") == "/dev/null"
        assert wants.is_symlink()
    run("postrm", "purge")
    assert not state.exists()
    assert not wants.is_symlink() and not wants.exists()  # no dangling link left
    assert not (system / "tfgpud.service").is_symlink()  # the mask is lifted


def test_the_packaged_venv_runs_the_daemon(
    unpacked: Path, tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    python = unpacked / "opt" / "tfgpud" / "bin" / "python3"
    check = subprocess.run(
        [str(python), "-c", "import yaml, tfgpud.webconfig, tfgpud.daemon; "
         "print(yaml.__with_libyaml__); import tensorflow"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert check.stdout.strip() == "False"  # pure-Python YAML (no embedded libyaml)
    assert "No module named 'tensorflow'" in check.stderr
    etc = unpacked / "etc" / "tfgpud" / "tfgpud.toml"
    ok = subprocess.run(
        [str(python), "-m", "tfgpud", "check-config", str(etc)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    write_scenario(scenario_path, gpus=[{"name": "NVIDIA A100-SXM4-80GB"}])
    cfg = tmp_path / "t.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\n[nvml]\nlibrary = "{fakedriver}/libnvidia-ml.so.1"\n'
    )
    doctor = subprocess.run(
        [str(python), "-m", "tfgpud", "doctor", "--json", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**fakedriver_env(scenario_path), "PYTHONPATH": ""},
    )
    assert doctor.returncode in (0, 1, 2), doctor.stderr
    doc = json.loads(doctor.stdout)
    assert "findings" in doc


def test_launcher_is_isolated_from_the_current_directory(unpacked: Path, tmp_path: Path) -> None:
    """`sudo tfgpud doctor` in a directory holding pydantic.py must not import it; -I still
    finds the packaged venv's site-packages (pyvenv.cfg sets the prefix)."""
    launcher = unpacked / "opt" / "tfgpud" / "bin" / "tfgpud"
    assert launcher.read_bytes() == (ROOT / "packaging" / "debian" / "tfgpud-launcher").read_bytes()
    local = tmp_path / "tfgpud"
    interpreter = unpacked / "opt" / "tfgpud" / "bin" / "tfgpud-python"
    local.write_text(
        launcher.read_text().replace("/opt/tfgpud/bin/tfgpud-python", str(interpreter))
    )
    local.chmod(0o755)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "trap-ran"
    (cwd / "pydantic.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    etc = unpacked / "etc" / "tfgpud" / "tfgpud.toml"
    proc = subprocess.run(
        [str(local), "check-config", str(etc)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()


def test_the_launcher_runs_python_under_its_own_name(unpacked: Path) -> None:
    """The daemon and its ExecReload are not "python*" processes (the workloads scan's
    default names), yet the interpreter finds the packaged venv."""
    launcher = (unpacked / "opt" / "tfgpud" / "bin" / "tfgpud").read_text()
    assert "exec /opt/tfgpud/bin/tfgpud-python -I -m tfgpud" in launcher
    venv = unpacked / "opt" / "tfgpud"
    assert os.readlink(venv / "bin" / "tfgpud-python") == "python3"
    proc = subprocess.run(
        [str(venv / "bin" / "tfgpud-python"), "-I", "-c",
         "import sys, tfgpud; print(open('/proc/self/comm').read().strip(), sys.prefix)"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, check=True,
    )  # fmt: skip
    comm, prefix = proc.stdout.split()
    assert comm == "tfgpud-python" and prefix == str(venv)
    names = Config().workloads.process_names
    assert not any(fnmatch.fnmatch(comm, pattern) for pattern in names), names
