"""A Debian 12 machine booted with systemd-nspawn, for tests that need systemd as PID 1.

The root file system (debootstrap minbase + systemd + Python, a TensorFlow venv at
``/srv/tfenv``, apt's package lists) is built once and cached under ``build/nspawn/``, keyed by
a hash of what goes into it. Each machine boots an overlay on top of the cache (or a copy where
overlayfs is not available), so runs never change the cache. Commands run inside through
``nsenter`` with a clean environment.

``python tests/e2e/nspawn.py`` builds the cache (``make nspawn-rootfs``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "nspawn"
SUITE = "bookworm"
PYTHON_MINOR = "3.11"  # bookworm's python3: the .deb's venv and the TF wheels are built for it
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv")
TF_VENV = "/srv/tfenv"
# Bump when the recipe below changes in a way the key does not see.
RECIPE = 1
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def tf_requirement() -> str:
    """The TensorFlow the dev venv gets (pyproject's ``tensorflow`` extra)."""
    with open(REPO / "pyproject.toml", "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["tensorflow"]
    return str(extra[0])


def cache_key() -> str:
    spec = {"suite": SUITE, "packages": PACKAGES, "tf": tf_requirement(), "recipe": RECIPE}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _sources() -> Iterator[tuple[list[str], list[str], list[str], list[str]]]:
    """(types, uris, suites, components) of each entry in this machine's apt sources."""
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, list[str]] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[0].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
                if fields.get("enabled", ["yes"]) != ["no"]:
                    yield (
                        fields.get("types", []),
                        fields.get("uris", []),
                        fields.get("suites", []),
                        fields.get("components", []),
                    )
        elif path.name == "sources.list" or path.suffix == ".list":
            for raw in text.splitlines():
                # "deb [options] URI suite component...", options dropped
                words = re.sub(r"\[[^]]*\]", " ", raw.split("#", 1)[0]).split()
                if len(words) >= 3:
                    yield [words[0]], [words[1]], [words[2]], words[3:]


def debian_mirror() -> str | None:
    """The Debian archive this machine's apt uses for bookworm (main), if any."""
    for types, uris, suites, components in _sources():
        if "deb" in types and SUITE in suites and "main" in components:
            for uri in uris:
                if uri.startswith(("http://", "https://", "file:/")) and "security" not in uri:
                    return uri
    return None


def unusable_reason() -> str | None:
    """Why a machine cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    caps = re.search(r"^CapEff:\s*([0-9a-f]+)", Path("/proc/self/status").read_text(), re.M)
    effective = int(caps.group(1), 16) if caps else 0
    if not effective & (1 << 21):  # CAP_SYS_ADMIN: mounts, namespaces
        return "no CAP_SYS_ADMIN (an unprivileged container?): systemd-nspawn cannot run here"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make apt-test-deps installs it as root)"
    minor = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()
    if minor != PYTHON_MINOR:
        return f"the .deb is built for this machine's python3 {minor}; {SUITE} has {PYTHON_MINOR}"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup file system"
    if debian_mirror() is None and not _complete(CACHE / f"rootfs-{cache_key()}"):
        return f"no Debian {SUITE} mirror in this machine's apt sources to debootstrap from"
    return None


def _complete(root: Path) -> bool:
    return (root / ".tfgpud-rootfs-complete").exists()


def _run(argv: Sequence[str], timeout: float) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )


def _wheels(requirement: str) -> Path:
    """TensorFlow and its dependencies as wheels for Python 3.11, downloaded once."""
    name = re.sub(r"[^A-Za-z0-9.]+", "-", requirement)
    wheels = CACHE / f"wheels-{name}"
    if (wheels / ".complete").exists():
        return wheels
    tmp = wheels.with_name(wheels.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            "--python-version",
            PYTHON_MINOR,
            "-d",
            str(tmp),
            requirement,
        ],
        timeout=1800,
    )
    (tmp / ".complete").touch()
    shutil.rmtree(wheels, ignore_errors=True)
    tmp.rename(wheels)
    return wheels


def _in_root(root: Path, *argv: str, bind_ro: Sequence[str] = (), timeout: float = 900) -> None:
    """Run a command in ``root`` (not booted) with systemd-nspawn."""
    binds = [f"--bind-ro={b}" for b in bind_ro]
    _run(
        [
            "systemd-nspawn",
            "-q",
            "-D",
            str(root),
            "--register=no",
            "--keep-unit",
            *binds,
            "--setenv=LANG=C.UTF-8",
            *argv,
        ],
        timeout=timeout,
    )


def cached_rootfs() -> Path:
    """The booted machines' root file system: built on first use (~3 min), then reused."""
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / f"rootfs-{cache_key()}"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and reuse it
        if _complete(root):
            return root
        mirror = debian_mirror()
        if mirror is None:
            raise RuntimeError(f"no Debian {SUITE} mirror in the apt sources")
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(tmp),
                mirror,
            ],
            timeout=1800,
        )
        # Package lists, so that `apt-get install ./tfgpud_*.deb` can fetch a dependency the
        # base lacks (and a test fails on one that does not exist).
        _in_root(tmp, "apt-get", "update", "-q")
        requirement = tf_requirement()
        wheels = _wheels(requirement)
        _in_root(tmp, "/usr/bin/python3", "-m", "venv", TF_VENV)
        _in_root(
            tmp, f"{TF_VENV}/bin/pip", "install", "-q", "--no-index", "--no-cache-dir",
            "--disable-pip-version-check", "--find-links", "/mnt/wheels", requirement,
            bind_ro=[f"{wheels}:/mnt/wheels"],
        )  # fmt: skip
        (tmp / ".tfgpud-rootfs-complete").write_text(f"{cache_key()}\n")
        tmp.rename(root)
        for old in CACHE.glob("rootfs-*"):  # one cached root at a time
            if old != root:
                shutil.rmtree(old, ignore_errors=True)
        return root


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


_PS = """
import os
for p in sorted((int(n) for n in os.listdir("/proc") if n.isdigit())):
    try:
        stat = open(f"/proc/{p}/stat", "rb").read()
        uid = [l for l in open(f"/proc/{p}/status") if l.startswith("Uid:")][0].split()[1]
        cmd = open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")
    except (OSError, IndexError):
        continue
    close = stat.rfind(b")")
    comm = stat[stat.find(b"(") + 1 : close].decode(errors="replace")
    ppid = stat[close + 2 :].split()[1].decode()
    print(p, ppid, uid, comm, " ".join(cmd.replace("\\0", " ").split())[:160])
"""


class Machine:
    """One booted container. Use as a context manager; ``close()`` powers it off, unmounts the
    overlay and removes the scratch directory."""

    def __init__(self, rootfs: Path, scratch: Path, name: str) -> None:
        self.name = name
        self.scratch = scratch
        self.root = scratch / "merged"
        self._overlay = False
        self._proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self._log = scratch / "console.log"
        for d in ("upper", "work", "merged"):
            (scratch / d).mkdir(parents=True)
        mount = subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={rootfs},upperdir={scratch / 'upper'},workdir={scratch / 'work'}",
                str(self.root),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if mount.returncode == 0:
            self._overlay = True
        else:  # no overlayfs here: a private copy
            self.root.rmdir()
            _run(["cp", "-a", "--reflink=auto", str(rootfs), str(self.root)], timeout=900)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def boot(self, timeout: float = 90) -> None:
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "-q",
                    "-D",
                    str(self.root),
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--console=read-only",
                    "-M",
                    self.name,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": CLEAN_PATH, "LANG": "C.UTF-8"},
            )
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd-nspawn did not boot:\n{self.console()}")
            for child in _children(self._proc.pid):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{child}/exe").endswith("/systemd"):
                        self.leader = child
            time.sleep(0.1)
        # Until its bus is up, systemctl in the machine answers nothing (or "offline").
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the machine is {state!r}:\n{self.console()}")
            time.sleep(0.1)
            state = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=10
            ).stdout.strip()

    def console(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def path(self, inside: str) -> Path:
        """Where the machine's ``inside`` path is, seen from this side."""
        return self.root / inside.lstrip("/")

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the machine, with a clean environment (nsenter passes ours)."""
        variables = [
            f"{k}={v}" for k, v in {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", **(env or {})}.items()
        ]
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *variables, *argv],
            capture_output=True,
            text=True,
            timeout=max(timeout, 1),
            input=input,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches: str) -> list[dict[str, object]]:
        """Journal entries (``journalctl -o json``) matching ``FIELD=value`` terms."""
        out = self.run("journalctl", "--no-pager", "-o", "json", *matches).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def processes(self) -> str:
        """One line per process in the machine: pid, parent, uid, name and command line (for
        failure messages: minbase has no ps(1))."""
        return self.run("/usr/bin/python3", "-c", _PS).stdout

    def kill(self, pid: int, sig: signal.Signals) -> None:
        """Send ``sig`` to the machine's process ``pid`` (minbase has no kill(1))."""
        self.run("/usr/bin/python3", "-c", f"import os; os.kill({pid}, {int(sig)})")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn asks the machine's systemd to power off
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                if self.leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                proc.kill()
                proc.wait(timeout=30)
        if self._overlay:
            if subprocess.run(["umount", str(self.root)], timeout=60, check=False).returncode:
                subprocess.run(["umount", "-l", str(self.root)], timeout=60, check=False)
            self._overlay = False
        shutil.rmtree(self.scratch, ignore_errors=True)


if __name__ == "__main__":
    reason = unusable_reason()
    if reason:
        print(f"not building the nspawn root file system: {reason}")
        sys.exit(0)
    print(cached_rootfs())
