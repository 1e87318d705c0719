"""Collector ``discovery``: find the Python envs on this machine whose site-packages hold
TensorFlow, by reading metadata only — nothing is imported, nothing is executed.

Where it looks (``[tensorflow.discover]``):

* **roots** (``/home``, ``/opt``, ``/srv``, ``/root``), walked breadth-first, names sorted. A
  directory holding ``pyvenv.cfg`` is a venv, one holding ``conda-meta/`` a conda env, one with
  ``bin/python3*`` and a standard library (``lib/python3.X/os.py``) a Python install (pyenv,
  ``/opt/python3.12``); none of them is entered further. Version-control, ``node_modules``,
  ``__pycache__`` and ``site-packages`` directories are not entered either, nor ``/proc``,
  ``/sys``, ``/dev`` and ``/run``.
* **conda**: ``envs/*`` of each conda install met on the walk, and each user's
  ``~/.conda/environments.txt``. A listed path is followed wherever it is (conda records envs
  created with ``-p`` anywhere) but only when it is a real directory — not a symlink — holding
  a real ``conda-meta/`` directory; relative or malformed lines are ignored.
* **jupyter**: ``kernel.json`` under ``/usr/share/jupyter/kernels``,
  ``/usr/local/share/jupyter/kernels`` and each user's ``~/.local/share/jupyter/kernels``. A
  kernelspec counts when ``argv[0]`` is a Python interpreter whose prefix holds TensorFlow: an
  absolute path as written; a bare name (``python3``) as Jupyter resolves it for a kernelspec
  installed into a prefix (``<prefix>/share/jupyter/kernels``: ``<prefix>/bin/<name>``),
  otherwise on the standard PATH (``/usr/local/bin:/usr/bin:/bin``).
* **system**: the interpreters of ``/usr`` and ``/usr/local`` with their ``site-packages`` and
  Debian ``dist-packages`` (``/usr/local/lib/python3.X/dist-packages`` included).

Per-user places come from the password database (every distinct existing home directory);
users NSS does not enumerate are found only by the roots walk.

Bounds: ``max_depth`` levels below a root; ``max_entries_per_root`` directory entries read per
root (the env inspections inside it included; everything outside the roots shares one more such
budget); ``max_entries_per_dir`` entries of any one directory; small file reads
(:data:`MAX_FILE_BYTES`, regular files only: a FIFO or a device is never opened). A symlink
to a directory is followed only when its target lies inside the same root (an env reached that
way is named by where it is), and no directory is read twice (by device and inode), so loops
end. What cannot be read is counted and skipped. What hit a bound is named in ``truncated``.

An interpreter counts only when its site-packages holds a TensorFlow distribution
(:data:`TF_DISTRIBUTIONS`, or any ``tensorflow*``/``tf-nightly*`` distribution whose
``top_level.txt`` names the ``tensorflow`` package). Configured envs win over discovered ones
with the same interpreter and prefix (:func:`merge_envs`). Each env gets a label derived from
its path (:func:`env_labels`). :func:`plan_probe` decides, from who can write an env, whether
and as whom its probe may run; :func:`metadata_facts` says what metadata alone shows.
"""

from __future__ import annotations

import errno
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import stat
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from tfgpud.config import DiscoverConfig, TfEnvConfig
from tfgpud.diagnosis import compat
from tfgpud.model import frozen_map
from tfgpud.runner import can_switch_user

SYSTEM_KERNEL_DIRS = ("/usr/share/jupyter/kernels", "/usr/local/share/jupyter/kernels")
USER_KERNEL_DIR = ".local/share/jupyter/kernels"
CONDA_ENVIRONMENTS = ".conda/environments.txt"
SYSTEM_PREFIXES = ("/usr", "/usr/local")
# Where a kernelspec's bare `python3` is looked up when it was not installed into a prefix.
KERNEL_PATH = ("/usr/local/bin", "/usr/bin", "/bin")
UNPRIVILEGED_USER = "nobody"

MAX_FILE_BYTES = 64 * 1024  # METADATA headers, kernel.json, environments.txt, pyvenv.cfg
MAX_LIST_LINES = 1024  # lines of one environments.txt
MAX_KERNELS_PER_DIR = 256
MAX_HOMES = 10_000
MAX_KERNEL_ENV = 64  # variables kept from a kernelspec's "env"
MAX_SAMPLES = 8  # unreadable paths and truncation notes kept for evidence
LABEL_MAX = 64  # TfEnvConfig.name's length limit

# Distributions that install the `tensorflow` package itself (PEP 503 normalised names).
TF_DISTRIBUTIONS = frozenset(
    {
        "tensorflow",
        "tensorflow-cpu",
        "tensorflow-gpu",
        "tensorflow-intel",
        "tensorflow-macos",
        "tensorflow-aarch64",
        "tensorflow-cpu-aws",
        "tensorflow-rocm",
        "tf-nightly",
        "tf-nightly-cpu",
        "tf-nightly-gpu",
        "tf-nightly-intel",
        "tf-nightly-macos",
        "intel-tensorflow",
        "intel-tensorflow-avx512",
    }
)
# Builds that never use an NVIDIA GPU on Linux, and the ones that can.
CPU_ONLY_DISTRIBUTIONS = frozenset(
    {
        "tensorflow-cpu",
        "tensorflow-intel",
        "tensorflow-macos",
        "tensorflow-aarch64",
        "tensorflow-cpu-aws",
        "tensorflow-rocm",
        "tf-nightly-cpu",
        "tf-nightly-intel",
        "tf-nightly-macos",
        "intel-tensorflow",
        "intel-tensorflow-avx512",
    }
)
CUDA_DISTRIBUTIONS = frozenset({"tensorflow", "tensorflow-gpu", "tf-nightly", "tf-nightly-gpu"})
_TF_PREFIXES = ("tensorflow", "tf-nightly", "intel-tensorflow")
_CUDA_WHEEL = re.compile(r"nvidia-[a-z0-9-]+-cu\d+")
_META_DIR = re.compile(r"(?P<name>.+?)-(?P<version>\d[^-]*)(?:-py[\d.]+.*)?\.(?:dist|egg)-info")
_PY_DIR = re.compile(r"python(\d+)\.(\d+)")
_INTERPRETER = re.compile(r"python(\d+(\.\d+)?)?")
_NOT_ENTERED = frozenset(
    {".git", ".hg", ".svn", "node_modules", "__pycache__", "site-packages", "dist-packages"}
)
_PSEUDO_FS = frozenset({"/proc", "/sys", "/dev", "/run"})  # never entered, even from root /


class EnvKind(StrEnum):
    VENV = "venv"
    CONDA = "conda"
    SYSTEM = "system"
    JUPYTER_KERNEL = "jupyter-kernel"


class EnvSource(StrEnum):
    CONFIGURED = "configured"
    DISCOVERED = "discovered"


@dataclass(frozen=True)
class Distribution:
    """An installed distribution: PEP 503 name (``tensorflow-cpu``) and version if known."""

    name: str
    version: str | None


@dataclass(frozen=True)
class Requirement:
    """One ``Requires-Dist`` of TensorFlow's ``and-cuda`` extra: name and specifier."""

    name: str
    specifier: str  # ">=9.3.0.75,<10.0"; "" when unconstrained


@dataclass(frozen=True)
class DiscoveredEnv:
    """One interpreter whose site-packages holds TensorFlow, as its metadata describes it."""

    env: str  # label: stable, unique in the result, valid as a [[tensorflow.envs]] name
    python: str  # the interpreter to execute (not resolved: a venv's python stays a symlink)
    prefix: str  # the env's directory (sys.prefix)
    kind: EnvKind
    source: str  # what it was found by: pyvenv.cfg, conda-meta, environments.txt, kernel.json
    owner_uid: int  # of the prefix directory
    owner: str | None  # user name; None when the uid has none
    tensorflow: Distribution  # the TF distribution whose files are there (newest installed)
    site_packages: str
    python_version: str | None = None  # "3.11.7" from pyvenv.cfg, else "3.11" from lib/
    other_tensorflow: tuple[Distribution, ...] = ()  # more TF distributions over the same files
    cuda_wheels: tuple[Distribution, ...] = ()  # nvidia-*-cuNN
    cuda_requirements: tuple[Requirement, ...] = ()  # what TF's `and-cuda` extra asks for
    kernel: str | None = None  # kernelspec name (jupyter-kernel)
    kernel_environment: Mapping[str, str] = field(default_factory=frozen_map)


@dataclass(frozen=True)
class SearchedPlace:
    """A root, system prefix or system kernelspec dir, and what became of it."""

    path: str
    what: str  # "root" | "system" | "kernels"
    state: str  # "searched" | "missing" | "unreadable" | "truncated"
    entries: int = 0


@dataclass(frozen=True)
class DiscoveryResult:
    envs: tuple[DiscoveredEnv, ...]  # sorted by prefix, at most max_envs
    found: int  # envs found before max_envs
    searched: tuple[SearchedPlace, ...] = ()
    homes: int = 0  # home directories whose per-user places were checked
    dirs_visited: int = 0  # directories listed
    entries_seen: int = 0  # directory entries read
    unreadable: int = 0  # directories and files that could not be read (skipped)
    unreadable_paths: tuple[str, ...] = ()  # the first few
    beyond_depth: int = 0  # directories not entered because of max_depth
    symlinks_not_followed: int = 0  # symlinks to directories outside their root
    truncated: tuple[str, ...] = ()  # each bound that was hit, in words
    duration_seconds: float = 0.0


# --- small readers ------------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """PEP 503: ``Tensorflow_CPU`` -> ``tensorflow-cpu``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _read_head(path: str, limit: int = MAX_FILE_BYTES) -> str | None:
    """The first ``limit`` bytes of a regular file as text; None for anything else (a FIFO
    would block the reader forever, a device never end). Raise OSError."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        return None  # not even opened: opening some devices has effects
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # swapped since the stat
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def _headers(text: str) -> list[tuple[str, str]]:
    """RFC 822 style headers of a METADATA/PKG-INFO text, up to the first blank line."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep and not line[0].isspace():
            out.append((key.strip().lower(), value.strip()))
    return out


def _cuda_requirement(value: str) -> Requirement | None:
    """``nvidia-cudnn-cu12<10.0,>=9.3.0.75; extra == "and-cuda"`` -> Requirement."""
    spec, _, marker = value.partition(";")
    if not re.search(r"""extra\s*==\s*["']and[-_]cuda["']""", marker):
        return None
    m = re.match(r"\s*([A-Za-z0-9._-]+)\s*(.*)", spec)
    if not m or not _CUDA_WHEEL.fullmatch(normalize_name(m.group(1))):
        return None
    return Requirement(normalize_name(m.group(1)), re.sub(r"[\s()]", "", m.group(2)))


def _pyvenv_version(text: str) -> str | None:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip().lower()] = value.strip()
    for key in ("version", "version_info"):
        m = re.match(r"(\d+\.\d+(?:\.\d+)?)", values.get(key, ""))
        if m:
            return m.group(1)
    return None


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _user(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def default_homes() -> tuple[str, ...]:
    """Every distinct home directory in the password database (sorted, at most MAX_HOMES)."""
    homes = sorted(
        {p.pw_dir for p in pwd.getpwall() if p.pw_dir.startswith("/") and p.pw_dir != "/"}
    )
    return tuple(homes[:MAX_HOMES])


# --- labels -------------------------------------------------------------------------------------


def _short_hash(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8", errors="surrogateescape")).hexdigest()[:8]


def _with_hash(label: str, path: str) -> str:
    return f"{label[: LABEL_MAX - 9].rstrip('-')}-{_short_hash(path)}"


def base_label(path: str) -> str:
    """A readable label for the env at ``path``: its components joined by ``-``, ``home/``
    dropped, leading dots stripped, other characters outside ``[A-Za-z0-9_.-]`` as ``_``
    (``/home/alice/proj/.venv`` -> ``alice-proj-venv``). Longer than 64: the tail plus a hash
    of the path."""
    parts = [p for p in path.split("/") if p]
    if len(parts) > 1 and parts[0] == "home":
        parts = parts[1:]
    cleaned = [re.sub(r"[^A-Za-z0-9_.-]+", "_", p.lstrip(".")) or "_" for p in parts]
    label = "-".join(cleaned) or "root"
    if len(label) > LABEL_MAX:
        tail = label[-(LABEL_MAX - 9) :].lstrip("-._") or "env"
        label = f"{tail}-{_short_hash(path)}"
    return label


def env_labels(paths: Iterable[str]) -> dict[str, str]:
    """A unique label per path (see :func:`base_label`). Paths whose readable labels collide
    all get a hash of their path appended, so a label never depends on the order envs are
    found in; it changes only when such a twin appears or goes."""
    unique = sorted(set(paths))
    by_label: dict[str, list[str]] = {}
    for p in unique:
        by_label.setdefault(base_label(p), []).append(p)
    out: dict[str, str] = {}
    for label, group in by_label.items():
        for p in group:
            out[p] = label if len(group) == 1 else _with_hash(label, p)
    return out


# --- the walk -----------------------------------------------------------------------------------


@dataclass
class _Budget:
    """Directory entries still allowed for one root (or for everything outside the roots)."""

    name: str
    left: int
    used: int = 0
    hit: bool = False


@dataclass
class _Prefix:
    """What a prefix directory holds, before TensorFlow is looked for."""

    python: str
    sites: list[tuple[str, str]]  # (site-packages path, "3.11" of its lib dir or "")
    version: str | None  # pyvenv.cfg's; else "3.11" of the interpreter's python3.X name


@dataclass
class _Candidate:
    vprefix: str
    env: DiscoveredEnv


_NOT_PREFIX = object()  # a directory that is not a Python prefix: the walk enters it


class _Discovery:
    def __init__(self, settings: DiscoverConfig, fsroot: str) -> None:
        self.s = settings
        self.fsroot = os.path.abspath(fsroot)
        self.visited: set[tuple[int, int]] = set()
        self.candidates: dict[tuple[str, str], _Candidate] = {}
        self.prefixes_seen: set[str] = set()
        self.searched: list[SearchedPlace] = []
        self.dirs = self.entries = self.unreadable = self.beyond_depth = self.symlinks = 0
        self.unreadable_paths: list[str] = []
        self.notes: list[str] = []
        self.extra_notes = 0
        self.outside = _Budget("outside the roots", settings.max_entries_per_root)

    # -- bookkeeping

    def real(self, vpath: str) -> str:
        """The path on this machine of ``vpath`` as seen inside the searched filesystem."""
        if self.fsroot == "/":
            return vpath
        return os.path.join(self.fsroot, vpath.lstrip("/"))

    def virtual(self, real: str) -> str:
        if self.fsroot == "/":
            return real
        rel = os.path.relpath(real, self.fsroot)
        return "/" if rel == "." else "/" + rel

    def failed(self, vpath: str, exc: OSError) -> None:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return  # gone or never there: nothing to read, nothing hidden
        self.unreadable += 1
        if len(self.unreadable_paths) < MAX_SAMPLES:
            self.unreadable_paths.append(f"{vpath}: {exc.strerror or exc}")

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_SAMPLES:
            self.notes.append(text)
        else:
            self.extra_notes += 1

    def listdir(self, real: str, vpath: str, budget: _Budget) -> list[os.DirEntry[str]] | None:
        """Entries of a directory, sorted by name, within the budgets; None when unreadable."""
        if budget.left <= 0:
            budget.hit = True
            return None
        out: list[os.DirEntry[str]] = []
        try:
            with os.scandir(real) as it:
                for entry in it:
                    if budget.left <= 0:
                        budget.hit = True
                        break
                    if len(out) >= self.s.max_entries_per_dir:
                        self.note(f"{vpath}: more than {self.s.max_entries_per_dir} entries read")
                        break
                    budget.left -= 1
                    budget.used += 1
                    self.entries += 1
                    out.append(entry)
        except OSError as exc:
            self.failed(vpath, exc)
            return None
        self.dirs += 1
        out.sort(key=lambda e: e.name)
        return out

    def read(self, real: str, vpath: str) -> str | None:
        try:
            return _read_head(real)
        except OSError as exc:
            self.failed(vpath, exc)
            return None

    # -- prefixes

    def python_of(self, real: str, vpath: str, budget: _Budget) -> str | None:
        """``bin/python``, ``bin/python3`` or the newest ``bin/python3.X`` (may dangle)."""
        bindir = os.path.join(real, "bin")
        for name in ("python", "python3"):
            if os.path.lexists(os.path.join(bindir, name)):
                return os.path.join(bindir, name)
        entries = self.listdir(bindir, vpath + "/bin", budget) or []
        versions = [
            (int(m.group(1)), int(m.group(2)), e.name)
            for e in entries
            if (m := _PY_DIR.fullmatch(e.name))
        ]
        return os.path.join(bindir, max(versions)[2]) if versions else None

    def prefix(
        self, real: str, vpath: str, kind: EnvKind, budget: _Budget, *, require_stdlib: bool
    ) -> _Prefix | None:
        """The interpreter and site directories of a prefix; None when it has no interpreter
        (or, with ``require_stdlib``, no ``lib/python3.X/os.py``: not a Python install)."""
        python = self.python_of(real, vpath, budget)
        if python is None:
            return None
        version: str | None = None
        if kind is EnvKind.VENV:
            text = self.read(os.path.join(real, "pyvenv.cfg"), vpath + "/pyvenv.cfg")
            version = _pyvenv_version(text or "")
        libdirs: list[tuple[str, str]] = []  # (real lib/python3.X, "3.X")
        m = _PY_DIR.fullmatch(os.path.basename(os.path.realpath(python)))
        guesses = [f"{m.group(1)}.{m.group(2)}"] if m else []
        if version:
            guesses.insert(0, ".".join(version.split(".")[:2]))
        for lib in ("lib", "lib64"):
            base = os.path.join(real, lib)
            found = [g for g in dict.fromkeys(guesses) if os.path.isdir(f"{base}/python{g}")]
            if not found:
                entries = self.listdir(base, f"{vpath}/{lib}", budget) or []
                pys = sorted(
                    (
                        (int(x.group(1)), int(x.group(2)))
                        for e in entries
                        if _is_dir(e)
                        if (x := _PY_DIR.fullmatch(e.name))
                    ),
                    reverse=True,
                )
                found = [f"{a}.{b}" for a, b in pys]
            libdirs += [(f"{base}/python{v}", v) for v in found]
            if libdirs:
                break
        if require_stdlib and not any(os.path.isfile(f"{d}/os.py") for d, _ in libdirs):
            return None
        sites: list[tuple[str, str]] = []
        for d, v in libdirs:
            sites += [(f"{d}/site-packages", v), (f"{d}/dist-packages", v)]
        if kind is EnvKind.SYSTEM:
            # Debian: /usr/lib/python3/dist-packages, and pip's /usr/local/lib/python3.X/...
            sites.append((os.path.join(real, "lib", "python3", "dist-packages"), ""))
            sites += [
                (os.path.join(real, "local", "lib", f"python{v}", "dist-packages"), v)
                for _, v in libdirs
            ]
        if version is None and guesses:
            version = guesses[-1]
        return _Prefix(python, [(p, v) for p, v in sites if os.path.isdir(p)], version)

    def tensorflow_in(
        self, site: str, vsite: str, budget: _Budget
    ) -> tuple[list[Distribution], list[Distribution], list[Requirement]] | None:
        """(TF distributions newest first, CUDA wheels, TF's and-cuda requirements) of a
        site-packages directory; None when it holds no TensorFlow."""
        entries = self.listdir(site, vsite, budget)
        if not entries:
            return None
        tf: list[tuple[int, Distribution, list[Requirement]]] = []
        cuda: list[Distribution] = []
        for e in entries:
            m = _META_DIR.fullmatch(e.name)
            if not m:
                continue
            name = normalize_name(m.group("name"))
            if _CUDA_WHEEL.fullmatch(name):
                cuda.append(Distribution(name, m.group("version")))
            elif name in TF_DISTRIBUTIONS or (
                name.startswith(_TF_PREFIXES) and self.top_level_is_tf(e, vsite)
            ):
                dist, reqs = self.distribution(e, vsite, name, m.group("version"))
                try:
                    mtime = e.stat(follow_symlinks=False).st_mtime_ns
                except OSError:
                    mtime = 0
                tf.append((mtime, dist, reqs))
        if not tf:
            return None
        tf.sort(key=lambda t: (-t[0], t[1].name))
        return [d for _, d, _ in tf], sorted(cuda, key=lambda d: d.name), tf[0][2]

    def top_level_is_tf(self, entry: os.DirEntry[str], vsite: str) -> bool:
        if not _is_dir(entry):
            return False
        path = os.path.join(entry.path, "top_level.txt")
        if not os.path.exists(path):
            return False
        text = self.read(path, f"{vsite}/{entry.name}/top_level.txt") or ""
        return "tensorflow" in text.split()

    def distribution(
        self, entry: os.DirEntry[str], vsite: str, name: str, version: str
    ) -> tuple[Distribution, list[Requirement]]:
        """Name and version from METADATA (PKG-INFO for an egg-info), else the dir name."""
        if _is_dir(entry):
            meta = "METADATA" if entry.name.endswith(".dist-info") else "PKG-INFO"
            path, vpath = os.path.join(entry.path, meta), f"{vsite}/{entry.name}/{meta}"
        else:  # a single-file .egg-info is the PKG-INFO itself
            path, vpath = entry.path, f"{vsite}/{entry.name}"
        headers = _headers(self.read(path, vpath) or "")
        fields = dict(headers)
        reqs = [
            r for k, v in headers if k == "requires-dist" if (r := _cuda_requirement(v)) is not None
        ]
        return (
            Distribution(
                normalize_name(fields.get("name") or name), fields.get("version") or version
            ),
            reqs,
        )

    def consider(
        self,
        real: str,
        vpath: str,
        kind: EnvKind,
        source: str,
        budget: _Budget,
        *,
        kernel: tuple[str, str, Mapping[str, str]] | None = None,
    ) -> object:
        """Inspect the prefix at ``real``; record it when it holds TensorFlow. Returns
        :data:`_NOT_PREFIX` when it is no Python prefix at all (the walk then enters it)."""
        real_prefix = os.path.realpath(real)
        if real_prefix in self.prefixes_seen:
            return None  # inspected already (found another way, or through a symlink)
        prefix_kind = kind
        if kernel is not None:
            prefix_kind = EnvKind.SYSTEM
            if os.path.lexists(os.path.join(real, "pyvenv.cfg")):
                prefix_kind = EnvKind.VENV
            elif os.path.isdir(os.path.join(real, "conda-meta")):
                prefix_kind = EnvKind.CONDA
        found = self.prefix(
            real, vpath, prefix_kind, budget, require_stdlib=prefix_kind is EnvKind.SYSTEM
        )
        if found is None:
            return _NOT_PREFIX if kind is EnvKind.SYSTEM else None
        self.prefixes_seen.add(real_prefix)
        python = found.python if kernel is None else kernel[1]  # as the kernelspec names it
        key = (os.path.realpath(python), real_prefix)
        for site, pyver in found.sites:
            tf = self.tensorflow_in(site, self.virtual(site), budget)
            if tf is None:
                continue
            dists, cuda, reqs = tf
            try:
                uid = os.stat(real).st_uid
            except OSError as exc:
                self.failed(vpath, exc)
                return None
            env = DiscoveredEnv(
                env="",
                python=python,
                prefix=real,
                kind=kind,
                source=source,
                owner_uid=uid,
                owner=_user(uid),
                tensorflow=dists[0],
                site_packages=site,
                python_version=found.version or pyver or None,  # pyvenv.cfg's is exact
                other_tensorflow=tuple(dists[1:]),
                cuda_wheels=tuple(cuda),
                cuda_requirements=tuple(reqs),
                kernel=kernel[0] if kernel else None,
                kernel_environment=frozen_map(kernel[2] if kernel else None),
            )
            self.candidates[key] = _Candidate(vpath, env)
            return None
        return None

    # -- places

    def recognise(
        self, real: str, vpath: str, names: Mapping[str, os.DirEntry[str]], budget: _Budget
    ) -> bool:
        """Record the env that directory ``real`` is, if any; True when it is a prefix (the
        walk does not enter it)."""
        cfg = names.get("pyvenv.cfg")
        if cfg is not None and not _is_dir(cfg):
            self.consider(real, vpath, EnvKind.VENV, vpath + "/pyvenv.cfg", budget)
            return True
        meta = names.get("conda-meta")
        if meta is not None and _is_dir(meta):
            self.consider(real, vpath, EnvKind.CONDA, vpath + "/conda-meta", budget)
            envs = names.get("envs")
            if self.s.conda and envs is not None and _is_dir(envs):
                self.conda_envs(os.path.join(real, "envs"), vpath + "/envs", budget)
            return True
        bindir, lib = names.get("bin"), names.get("lib")
        if bindir is not None and lib is not None and _is_dir(bindir) and _is_dir(lib):
            found = self.consider(real, vpath, EnvKind.SYSTEM, vpath, budget)
            return found is not _NOT_PREFIX
        return False

    def conda_envs(self, real: str, vpath: str, budget: _Budget) -> None:
        for e in self.listdir(real, vpath, budget) or []:
            if _is_dir(e) and os.path.isdir(os.path.join(e.path, "conda-meta")):
                v = f"{vpath}/{e.name}"
                self.consider(e.path, v, EnvKind.CONDA, vpath, budget)

    def walk(self, vroot: str) -> None:
        real_root = self.real(vroot)
        budget = _Budget(vroot, self.s.max_entries_per_root)
        try:
            st = os.stat(real_root)
        except OSError as exc:
            missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
            self.failed(vroot, exc)
            self.searched.append(
                SearchedPlace(vroot, "root", "missing" if missing else "unreadable")
            )
            return
        if not stat.S_ISDIR(st.st_mode):
            self.searched.append(SearchedPlace(vroot, "root", "missing"))
            return
        top = os.path.realpath(real_root)
        # (path, path inside fsroot, depth, reached through a symlink)
        queue: deque[tuple[str, str, int, bool]] = deque([(real_root, vroot, 0, False)])
        while queue and not budget.hit:
            real, vpath, depth, linked = queue.popleft()
            try:
                st = os.stat(real)
            except OSError as exc:
                self.failed(vpath, exc)
                continue
            if (st.st_dev, st.st_ino) in self.visited:
                continue
            self.visited.add((st.st_dev, st.st_ino))
            entries = self.listdir(real, vpath, budget)
            if entries is None:
                continue
            names = {e.name: e for e in entries}
            here, vhere = real, vpath
            if linked:  # an env is named by where it is in the root, not by the way here
                rel = os.path.relpath(os.path.realpath(real), top)
                if rel != ".":
                    here, vhere = os.path.join(real_root, rel), f"{vroot.rstrip('/')}/{rel}"
                else:
                    here, vhere = real_root, vroot
            if self.recognise(here, vhere, names, budget):
                continue
            for e in entries:
                child = vpath.rstrip("/") + "/" + e.name
                if e.name in _NOT_ENTERED or child in _PSEUDO_FS:
                    continue
                how = self.enters(e, top)
                if how is None:
                    continue
                if depth + 1 > self.s.max_depth:
                    self.beyond_depth += 1
                    continue
                queue.append((e.path, child, depth + 1, linked or how == "link"))
        if budget.hit:
            self.note(f"{budget.name}: stopped after {budget.used} entries (max_entries_per_root)")
        state = "truncated" if budget.hit else "searched"
        self.searched.append(SearchedPlace(vroot, "root", state, budget.used))

    def enters(self, entry: os.DirEntry[str], top: str) -> str | None:
        """Whether the walk goes into ``entry``: ``"dir"``, ``"link"`` for a symlink to a
        directory inside the root being walked (one outside it is counted, not followed), or
        None."""
        try:
            if entry.is_dir(follow_symlinks=False):
                return "dir"
            if not entry.is_symlink():
                return None
        except OSError:
            return None
        target = os.path.realpath(entry.path)
        if not os.path.isdir(target):
            return None
        if not _inside(target, top):
            self.symlinks += 1
            return None
        return "link"

    def environments_txt(self, vhome: str) -> None:
        vlist = f"{vhome.rstrip('/')}/{CONDA_ENVIRONMENTS}"
        real_list = self.real(vlist)
        if not os.path.lexists(real_list):
            return
        text = self.read(real_list, vlist)
        if text is None:
            return
        lines = text.splitlines()
        if len(lines) > MAX_LIST_LINES:
            self.note(f"{vlist}: only the first {MAX_LIST_LINES} lines read")
        for line in lines[:MAX_LIST_LINES]:
            vpath = line.strip()
            if not vpath.startswith("/") or "\0" in vpath:
                continue
            vpath = os.path.normpath(vpath)
            real = self.real(vpath)
            try:
                st = os.lstat(real)
                meta = os.lstat(os.path.join(real, "conda-meta"))
            except OSError as exc:
                self.failed(vpath, exc)
                continue
            if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(meta.st_mode):
                self.consider(real, vpath, EnvKind.CONDA, vlist, self.outside)

    def kernels(self, vdir: str, *, record: bool) -> None:
        real_dir = self.real(vdir)
        if not os.path.isdir(real_dir):
            if record:
                self.searched.append(SearchedPlace(vdir, "kernels", "missing"))
            return
        before = self.outside.used
        entries = self.listdir(real_dir, vdir, self.outside)
        if entries is None:
            if record:
                self.searched.append(SearchedPlace(vdir, "kernels", "unreadable"))
            return
        if len(entries) > MAX_KERNELS_PER_DIR:
            self.note(f"{vdir}: only the first {MAX_KERNELS_PER_DIR} kernelspecs read")
        for e in entries[:MAX_KERNELS_PER_DIR]:
            if _is_dir(e):
                self.kernel(e.path, f"{vdir}/{e.name}", e.name, vdir)
        if record:
            used = self.outside.used - before
            self.searched.append(SearchedPlace(vdir, "kernels", "searched", used))

    def kernel(self, real: str, vpath: str, name: str, vdir: str) -> None:
        vspec = vpath + "/kernel.json"
        if not os.path.lexists(os.path.join(real, "kernel.json")):
            return
        text = self.read(os.path.join(real, "kernel.json"), vspec)
        try:
            spec = json.loads(text) if text is not None else None
        except (ValueError, RecursionError):  # malformed, or nested past the parser's depth
            return
        if not isinstance(spec, dict):
            return
        argv = spec.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            return
        vpython = self.kernel_python(argv[0], vdir)
        if vpython is None or os.path.basename(os.path.dirname(vpython)) != "bin":
            return  # not <prefix>/bin/python*: no prefix to read site-packages from
        env = spec.get("env")
        kernel_env = {}
        if isinstance(env, dict):
            pairs = [(k, v) for k, v in env.items() if isinstance(k, str) and isinstance(v, str)]
            kernel_env = dict(sorted(pairs)[:MAX_KERNEL_ENV])
        vprefix = os.path.dirname(os.path.dirname(vpython))
        self.consider(
            self.real(vprefix),
            vprefix,
            EnvKind.JUPYTER_KERNEL,
            vspec,
            self.outside,
            kernel=(name, self.real(vpython), kernel_env),
        )

    def kernel_python(self, exe: str, vdir: str) -> str | None:
        """The interpreter a kernelspec's ``argv[0]`` names (a path in the searched fs)."""
        if not _INTERPRETER.fullmatch(os.path.basename(exe)):
            return None  # not a Python interpreter (a wrapper script, `env`, another language)
        if "/" in exe:
            path = os.path.normpath(exe)
            return path if exe.startswith("/") and os.path.lexists(self.real(path)) else None
        suffix = "/share/jupyter/kernels"
        dirs = [vdir[: -len(suffix)] + "/bin"] if vdir.endswith(suffix) else []
        for d in [*dirs, *KERNEL_PATH]:
            candidate = f"{d}/{exe}"
            if os.path.lexists(self.real(candidate)):
                return candidate
        return None

    def system(self, vprefix: str) -> None:
        real = self.real(vprefix)
        if not os.path.isdir(real):
            self.searched.append(SearchedPlace(vprefix, "system", "missing"))
            return
        before = self.outside.used
        self.consider(real, vprefix, EnvKind.SYSTEM, vprefix, self.outside)
        self.searched.append(
            SearchedPlace(vprefix, "system", "searched", self.outside.used - before)
        )


def discover_envs(
    settings: DiscoverConfig,
    *,
    fsroot: str = "/",
    homes: Sequence[str] | None = None,
    kernel_dirs: Sequence[str] = SYSTEM_KERNEL_DIRS,
    system_prefixes: Sequence[str] = SYSTEM_PREFIXES,
    clock: Callable[[], float] = time.monotonic,
) -> DiscoveryResult:
    """Find the TensorFlow envs of this machine now (see the module docstring); nothing when
    ``settings.enabled`` is false. Never raises for what it finds: unreadable places are
    counted, bounds are reported in ``truncated``; only a regular file is ever opened.

    Paths in ``settings.roots``, ``homes``, ``kernel_dirs``, ``system_prefixes`` and in the
    files read (environments.txt, kernel.json) are taken inside ``fsroot``; the paths of the
    result are real paths on this machine, labels are derived from the paths inside
    ``fsroot``. ``homes`` defaults to :func:`default_homes` (only when ``fsroot`` is ``/``).
    """
    start = clock()
    if not settings.enabled:
        return DiscoveryResult(envs=(), found=0)
    d = _Discovery(settings, fsroot)
    for root in settings.roots:
        d.walk(root)
    if homes is None:
        homes = default_homes() if d.fsroot == "/" else ()
    homes = [h for h in dict.fromkeys(homes) if os.path.isdir(d.real(h))][:MAX_HOMES]
    if settings.conda:
        for home in homes:
            d.environments_txt(home)
    if settings.system:
        for prefix in system_prefixes:
            d.system(prefix)
    if settings.jupyter:
        for kdir in kernel_dirs:
            d.kernels(kdir, record=True)
        for home in homes:
            d.kernels(f"{home.rstrip('/')}/{USER_KERNEL_DIR}", record=False)
    if d.outside.hit:
        d.note(f"{d.outside.name}: stopped after {d.outside.used} entries (max_entries_per_root)")
    labels = env_labels(c.vprefix for c in d.candidates.values())
    found = sorted(d.candidates.values(), key=lambda c: (c.vprefix, c.env.python))
    envs = [replace(c.env, env=labels[c.vprefix]) for c in found]
    if len(envs) > settings.max_envs:
        dropped = [e.env for e in envs[settings.max_envs :]]
        d.note(
            f"max_envs ({settings.max_envs}): {len(envs)} found, {len(dropped)} not kept: "
            + ", ".join(dropped[:MAX_SAMPLES])
            + (" …" if len(dropped) > MAX_SAMPLES else "")
        )
    notes = list(d.notes)
    if d.extra_notes:
        notes.append(f"and {d.extra_notes} more")
    return DiscoveryResult(
        envs=tuple(envs[: settings.max_envs]),
        found=len(envs),
        searched=tuple(d.searched),
        homes=len(homes),
        dirs_visited=d.dirs,
        entries_seen=d.entries,
        unreadable=d.unreadable,
        unreadable_paths=tuple(d.unreadable_paths),
        beyond_depth=d.beyond_depth,
        symlinks_not_followed=d.symlinks,
        truncated=tuple(notes),
        duration_seconds=clock() - start,
    )


# --- configured vs discovered -------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTarget:
    """One env to probe: its config (a discovered env's is made from what was found)."""

    config: TfEnvConfig
    source: EnvSource
    discovered: DiscoveredEnv | None = None


def env_key(python: str, prefix: str | None = None) -> tuple[str, str]:
    """(realpath of the interpreter, realpath of its prefix): one env, however it is named.
    A bare name is looked up on the standard PATH; the prefix defaults to the directory
    above the interpreter's ``bin/`` (not resolved: a venv's python links out of it)."""
    if "/" not in python:
        python = shutil.which(python, path=os.pathsep.join(KERNEL_PATH)) or python
    python = os.path.abspath(python)
    if prefix is None:
        prefix = os.path.dirname(os.path.dirname(python))
    return os.path.realpath(python), os.path.realpath(prefix)


def merge_envs(
    configured: Sequence[TfEnvConfig], discovered: Sequence[DiscoveredEnv]
) -> tuple[ProbeTarget, ...]:
    """The probe list: every configured env, then each discovered env that is not one of them
    (same interpreter and prefix, by realpath). A discovered label equal to a configured name
    gets a hash of its prefix appended."""
    keys = {env_key(c.python) for c in configured}
    names = {c.name for c in configured}
    out = [ProbeTarget(c, EnvSource.CONFIGURED) for c in configured]
    for d in discovered:
        if env_key(d.python, d.prefix) in keys:
            continue
        name = d.env if d.env not in names else _with_hash(d.env, d.prefix)
        if name in names:
            continue
        names.add(name)
        config = TfEnvConfig(name=name, python=d.python, environment=dict(d.kernel_environment))
        out.append(ProbeTarget(config, EnvSource.DISCOVERED, d))
    return tuple(out)


# --- safety -------------------------------------------------------------------------------------


class ProbeAs(StrEnum):
    OWNER = "owner"  # run_as the env's owner
    UNPRIVILEGED = "unprivileged"  # run_as an unprivileged user: the owner is root
    SELF = "self"  # as tfgpud's own (unprivileged) user, without switching
    NOT_RUN = "not-run"


@dataclass(frozen=True)
class ProbePlan:
    how: ProbeAs
    user: str | None  # the run_as user (OWNER, UNPRIVILEGED); None otherwise
    reason: str  # one line: why this way (for NOT_RUN, why not and what would allow it)


def plan_probe(
    *,
    owner_uid: int,
    owner: str | None,
    owner_group: str | None,
    writers: Collection[str],
    daemon_uid: int,
    daemon_user: str | None,
    can_switch_user: bool,
    unprivileged_user: str = UNPRIVILEGED_USER,
) -> ProbePlan:
    """How the probe of a discovered env may run, never with more privilege than its owner.

    ``writers`` are who besides root can change the env's code (user names, ``group:NAME``,
    ``everyone``), as :func:`~tfgpud.collectors.tensorflow.safety.path_writers` reports them
    over the import path; ``owner_group`` is the owner's private group (one with no other
    member), whose write access is the owner's own. Anyone else among the writers: not run.
    Owner root: as ``unprivileged_user`` (or as tfgpud itself when it is unprivileged and cannot
    switch). Owner another user: as that user (needs root or CAP_SETUID+CAP_SETGID), or as
    tfgpud itself when tfgpud is that user.
    """
    own = set() if owner_uid == 0 else {owner or f"uid {owner_uid}"}
    if owner_group and owner_uid != 0:
        own.add(f"group:{owner_group}")
    others = sorted(set(writers) - own)
    who = owner or f"uid {owner_uid}"
    me = daemon_user or f"uid {daemon_uid}"
    if others:
        return ProbePlan(
            ProbeAs.NOT_RUN,
            None,
            f"writable by {', '.join(others)} besides its owner {who}: running it as anyone "
            "else would hand that user their privileges; make it writable by its owner only, "
            "or configure it in [[tensorflow.envs]] with run_as",
        )
    if owner_uid == 0:
        if can_switch_user:
            return ProbePlan(
                ProbeAs.UNPRIVILEGED,
                unprivileged_user,
                f"owned by root: probed as {unprivileged_user}, never as root",
            )
        if daemon_uid != 0:
            return ProbePlan(ProbeAs.SELF, None, f"owned by root: probed as {me}")
        return ProbePlan(
            ProbeAs.NOT_RUN,
            None,
            f"owned by root and tfgpud cannot switch to {unprivileged_user} "
            "(needs CAP_SETUID and CAP_SETGID): it is not probed as root",
        )
    if daemon_uid == owner_uid:
        return ProbePlan(ProbeAs.SELF, None, f"owned by {who}, the user tfgpud runs as")
    if owner is None:
        return ProbePlan(
            ProbeAs.NOT_RUN, None, f"owned by uid {owner_uid}, which has no user name to run as"
        )
    if can_switch_user:
        return ProbePlan(ProbeAs.OWNER, owner, f"owned by {owner}: probed as {owner}")
    return ProbePlan(
        ProbeAs.NOT_RUN,
        None,
        f"owned by {owner} and tfgpud runs as {me} without CAP_SETUID/CAP_SETGID: running "
        f"{owner}'s code as {me} would hand {owner} tfgpud's privileges",
    )


def private_group(user: str) -> str | None:
    """The user's primary group when no one else is a member of it, else None."""
    try:
        pw = pwd.getpwnam(user)
        group = grp.getgrgid(pw.pw_gid)
    except KeyError:
        return None
    return group.gr_name if set(group.gr_mem) <= {user} else None


def plan_discovered_probe(
    env: DiscoveredEnv,
    writers: Collection[str],
    *,
    daemon_uid: int | None = None,
    switch: bool | None = None,
) -> ProbePlan:
    """:func:`plan_probe` for ``env`` with this process's identity filled in."""
    uid = os.geteuid() if daemon_uid is None else daemon_uid
    return plan_probe(
        owner_uid=env.owner_uid,
        owner=env.owner,
        owner_group=private_group(env.owner) if env.owner else None,
        writers=writers,
        daemon_uid=uid,
        daemon_user=_user(uid),
        can_switch_user=can_switch_user() if switch is None else switch,
    )


# --- what metadata alone shows ------------------------------------------------------------------


@dataclass(frozen=True)
class CudaWheelCheck:
    """An ``and-cuda`` requirement of the TF release against what is installed."""

    name: str
    specifier: str
    installed: str | None  # version; None: not installed
    satisfied: bool | None  # None when the versions cannot be compared


@dataclass(frozen=True)
class MetadataFacts:
    env: str
    distribution: str
    version: str | None
    cpu_only_build: bool | None  # from the distribution name; None when the name says nothing
    python_version: str | None
    supported_python: str | None  # "3.10-3.13" for this TF release; None when not known
    python_supported: bool | None  # None when either side is unknown
    cuda_wheels: tuple[Distribution, ...]
    cuda_checks: tuple[CudaWheelCheck, ...]
    other_tensorflow: tuple[Distribution, ...]
    lines: tuple[str, ...]  # the facts in words, for evidence


def _compare(version: str, spec: str) -> bool | None:
    """Whether ``version`` satisfies a simple specifier (``>=9.3,<10``); None if unparsable."""
    have = compat.parse_version(version)
    if have is None:
        return None
    for clause in filter(None, spec.split(",")):
        m = re.fullmatch(r"(<=|>=|==|!=|~=|<|>)(\d+(?:\.\d+)*)(\.\*)?", clause)
        if not m:
            return None
        op, want_s, star = m.groups()
        want = tuple(int(p) for p in want_s.split("."))
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        if star:
            a = have[: len(want)]
            b = want
        ok = {
            "<": a < b,
            "<=": a <= b,
            ">": a > b,
            ">=": a >= b,
            "==": a == b,
            "!=": a != b,
            "~=": a >= b and have[: len(want) - 1] == want[:-1],
        }[op]
        if not ok:
            return False
    return True


def metadata_facts(env: DiscoveredEnv) -> MetadataFacts:
    """What ``env``'s metadata shows without running it: the TF distribution and version,
    whether the distribution is a CPU-only build, the Python version against the release's
    tested range, the CUDA wheels installed and how they meet TF's ``and-cuda`` extra."""
    tf = env.tensorflow
    cpu_only = None
    if tf.name in CPU_ONLY_DISTRIBUTIONS or tf.name in CUDA_DISTRIBUTIONS:
        cpu_only = tf.name in CPU_ONLY_DISTRIBUTIONS
    build = compat.tested_build(tf.version)
    py = env.python_version
    py_mm = compat.parse_version(py)
    supported = None
    if build is not None and py_mm is not None and len(py_mm) >= 2:
        supported = compat.supports_python(build, py)
    installed = {w.name: w.version for w in env.cuda_wheels}
    checks = []
    for r in env.cuda_requirements:
        have = installed.get(r.name)
        ok = _compare(have, r.specifier) if have is not None else None
        checks.append(CudaWheelCheck(r.name, r.specifier, have, ok))
    lines = [f"{tf.name} {tf.version or '(version unknown)'} in {env.site_packages}"]
    if env.other_tensorflow:
        others = ", ".join(f"{d.name} {d.version or '?'}" for d in env.other_tensorflow)
        lines.append(f"also installed over the same files: {others}")
    if cpu_only:
        lines.append(f"{tf.name} is a CPU-only build: it never uses an NVIDIA GPU")
    if py:
        if build is None:
            lines.append(f"Python {py}; TensorFlow {tf.version or '?'} is not in the table")
        else:
            verdict = {True: "within", False: "OUTSIDE", None: "against"}[supported]
            lines.append(
                f"Python {py}: {verdict} the range TensorFlow {build.tf} was tested with "
                f"({build.python})"
            )
    if env.cuda_wheels:
        wheels = ", ".join(f"{w.name} {w.version or '?'}" for w in env.cuda_wheels)
        lines.append(f"CUDA wheels: {wheels}")
    elif cpu_only is not True:
        lines.append("no nvidia-*-cu* wheels: CUDA libraries must come from the system")
    bad = [c for c in checks if c.satisfied is False]
    missing = [c for c in checks if c.installed is None]
    if bad:
        lines.append(
            "not what TensorFlow's [and-cuda] asks for: "
            + ", ".join(f"{c.name} {c.installed} (wants {c.specifier})" for c in bad)
        )
    if env.cuda_wheels and missing:
        lines.append("missing from TensorFlow's [and-cuda]: " + ", ".join(c.name for c in missing))
    return MetadataFacts(
        env=env.env,
        distribution=tf.name,
        version=tf.version,
        cpu_only_build=cpu_only,
        python_version=py,
        supported_python=build.python if build else None,
        python_supported=supported,
        cuda_wheels=env.cuda_wheels,
        cuda_checks=tuple(checks),
        other_tensorflow=env.other_tensorflow,
        lines=tuple(lines),
    )


def searched_lines(result: DiscoveryResult) -> tuple[str, ...]:
    """What discovery searched, in words (evidence for "no TensorFlow env found")."""
    lines = [
        f"{p.what} {p.path}: {p.state}" + (f" ({p.entries} entries)" if p.entries else "")
        for p in result.searched
    ]
    lines.append(
        f"{result.homes} home directories checked for environments.txt and kernelspecs; "
        f"{result.dirs_visited} directories, {result.entries_seen} entries read, "
        f"{result.unreadable} unreadable"
    )
    lines += [f"not read: {p}" for p in result.unreadable_paths]
    lines += [f"bound hit: {t}" for t in result.truncated]
    return tuple(lines)
