"""Who may run the TensorFlow probe of an env: never more privilege than the env's owner.

The probe executes the env's interpreter and whatever it imports. Run by root, an env that
another user can write is a root shell for that user. So, when tfgpud runs as root — or may
switch users (CAP_SETUID and CAP_SETGID, as the packaged unit grants: that is as good as root)
— :func:`decide_probe_user` finds who can write any code the probe could run and refuses unless
every such writer is root or the user ``run_as`` names (the probe then runs as that user).
Otherwise the probe runs as tfgpud's own user and nothing is switched.

What is checked (each path's owner, group-write and other-write bits; symlinks are followed to
their targets, whose directories above are checked too):

* the interpreter: a bare name (``python3``) is first resolved on the probe's PATH, and that
  absolute path is what is checked and executed; every symlink hop, the final file, and every
  directory above each of them; ``lib*/libpython3*.so*`` of its prefix;
* the probe script (``child/tfprobe.py``), the directories above it, and its whole directory
  (``child/``, which holds nothing else: it is ``sys.path[0]`` while the probe runs);
* ``pyvenv.cfg`` and, for a venv, its ``home =`` base interpreter (``venv --copies`` included);
* the interpreter's import path, **recursively** (every file and directory below, so a writable
  sub-package or ``__pycache__`` is found): the stdlib (``lib/python3.X`` of the base prefix,
  ``lib-dynload`` included), the venv's and — when it is on the path — the base install's
  site-packages, Debian's ``/usr/local/lib/python3.X/dist-packages`` and
  ``/usr/lib/python3/dist-packages`` for an interpreter in ``/usr``, the directories ``.pth``
  files add (a ``.pth``'s ``import`` lines are code inside the ``.pth``, which is checked as a
  file), and ``PYTHONPATH`` from the env's ``environment`` table;
* the real ``sys.path`` as well: the interpreter is asked for it (``-c 'print(sys.path)'``) as
  an unprivileged user (``run_as``, else ``nobody``) — that runs the env's ``site``/``.pth``
  code, but not as root — and every entry it names is checked like the above. When that query
  fails (e.g. ``nobody`` cannot enter the directory) the static list above stands;
* the top-level entries of each ``LD_LIBRARY_PATH`` and ``PATH`` directory the table sets.

The walk is bounded: more than :data:`MAX_WALK_ENTRIES` entries in all is refused (fail
closed), as is any ``PYTHON*`` variable other than ``PYTHONPATH`` and a few flag-like ones
(``PYTHONHOME``, ``PYTHONSTARTUP``, ``PYTHONUSERBASE`` ... could point the interpreter at
unchecked code), ``HOME``, ``GCONV_PATH`` and ``LD_*`` other than ``LD_LIBRARY_PATH``
(``LD_PRELOAD``, ``LD_AUDIT``) in the ``environment`` table of an env probed as root. The probe
run as root also gets ``-s``, ``PYTHONNOUSERSITE=1`` and a fresh private ``HOME`` (see
:func:`tfgpud.collectors.tensorflow.launch.probe_env`), so no user site-packages are imported.
"""

from __future__ import annotations

import glob
import grp
import json
import logging
import os
import pwd
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tfgpud.config import TfEnvConfig
from tfgpud.runner import can_switch_user, run_bounded
from tfgpud.text import user_name

log = logging.getLogger(__name__)

EVERYONE = "everyone"
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_WALK_ENTRIES = 300_000  # a TF venv is ~40k files, a stdlib ~10-60k
_MAX_EVIDENCE = 8
_QUERY_TIMEOUT = 20.0
_QUERY_USER = "nobody"
# Variables of the env's `environment` table that stay allowed when the probe runs as root:
# PYTHONPATH (its directories are checked) and flags that name no code.
_ROOT_OK_PYTHON_VARS = frozenset(
    {
        "PYTHONPATH",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONFAULTHANDLER",
        "PYTHONHASHSEED",
        "PYTHONIOENCODING",
        "PYTHONUTF8",
        "PYTHONNOUSERSITE",
        "PYTHONWARNINGS",
    }
)
_ROOT_FORBIDDEN = re.compile(r"^(PYTHON\w*|HOME|GCONV_PATH|LD_\w+)$")

QueryFn = Callable[[str, TfEnvConfig, str | None], list[str] | None]


@dataclass(frozen=True)
class ProbeDecision:
    """Run the probe as ``user`` (None: as tfgpud itself), or not at all when ``refused``."""

    user: str | None
    refused: str | None = None  # one line: why not
    writers: tuple[str, ...] = ()  # who can write the env's code: user names, "group:x", everyone
    evidence: tuple[str, ...] = ()  # "path: owner alice, mode -rwxr-xr-x" lines
    checked: int = 0  # how many paths were lstat()ed


def _user_name(uid: int) -> str:
    return user_name(uid) or f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def path_writers(st: os.stat_result) -> set[str]:
    """Who besides root can change what this inode holds (or, for a directory, its entries)."""
    if stat.S_ISLNK(st.st_mode):
        return set()  # a symlink cannot be changed; its directory and target are checked
    out: set[str] = set()
    if st.st_uid != 0:
        out.add(_user_name(st.st_uid))  # an owner can always chmod u+w
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        out.add(f"group:{_group_name(st.st_gid)}")
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    # In a sticky directory (/tmp) others may add entries but not replace ours; the entries
    # on the path are checked themselves.
    if st.st_mode & stat.S_IWOTH and not sticky_dir:
        out.add(EVERYONE)
    return out


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` → [``/``, ``/a``, ``/a/b``, ``/a/b/c``]."""
    parts = os.path.normpath(path).split(os.sep)
    out = ["/"]
    for i in range(2, len(parts) + 1):
        out.append(os.sep.join(parts[:i]) or "/")
    return out


def resolve_interpreter(python: str, path: str = SAFE_PATH) -> str | None:
    """The absolute interpreter the probe executes: a bare name is looked up on ``path``
    (the probe's own PATH), never in the current directory. None when not found."""
    if os.sep not in python:
        found = shutil.which(python, path=path)
        return os.path.abspath(found) if found else None
    return os.path.abspath(python)


def _symlink_hops(path: str) -> list[str]:
    """``path`` and every path its symlink chain passes through (bounded), absolute."""
    out = [path]
    current = path
    for _ in range(40):
        try:
            target = os.readlink(current)
        except OSError:
            break
        current = os.path.normpath(os.path.join(os.path.dirname(current), target))
        out.append(current)
    return out


def _read_pyvenv(cfg: str) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        with open(cfg, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition("=")
                if sep:
                    values[key.strip().lower()] = value.strip()
    except OSError:
        pass
    return values


def _pth_dirs(site: str) -> list[str]:
    """Directories the ``.pth`` files in ``site`` add to sys.path (as site.addpackage does)."""
    out: list[str] = []
    for pth in sorted(glob.glob(os.path.join(glob.escape(site), "*.pth"))):
        try:
            with open(pth, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if not line.strip() or line.startswith("#"):
                continue
            if line.startswith(("import ", "import\t")):
                continue  # code in the .pth itself, which is checked as a file
            d = os.path.normpath(os.path.join(site, line.rstrip()))
            if os.path.isdir(d):
                out.append(d)
    return out


@dataclass
class CodePlan:
    """What to check: ``paths`` themselves, ``trees`` recursively, ``flat`` dirs' entries."""

    paths: list[str] = field(default_factory=list)
    trees: list[str] = field(default_factory=list)
    flat: list[str] = field(default_factory=list)
    exclude: set[str] = field(default_factory=set)  # not walked (a base site-packages off path)

    def tree(self, d: str) -> None:
        self.paths.extend(_ancestors(d))
        self.trees.append(os.path.normpath(d))


def code_plan(
    env: TfEnvConfig,
    python: str,
    *,
    script: str | None = None,
    sys_path: Sequence[str] = (),
) -> CodePlan:
    """Every path whose writer could change what the probe of ``env`` (run as ``python``)
    executes: see the module docstring."""
    plan = CodePlan()
    hops = _symlink_hops(python)
    real = os.path.realpath(python)
    for p in [*hops, real]:
        plan.paths.extend(_ancestors(p))
    if script is not None:
        plan.paths.extend(_ancestors(script))
        plan.tree(os.path.dirname(os.path.abspath(script)))
    prefixes = list(dict.fromkeys(os.path.dirname(os.path.dirname(p)) for p in [*hops, real]))
    base_prefixes = list(prefixes)
    include_system = True
    cfg = None
    for d in (os.path.dirname(python), os.path.dirname(os.path.dirname(python))):
        candidate = os.path.join(d, "pyvenv.cfg")
        plan.paths.append(candidate)
        if cfg is None and os.path.isfile(candidate):
            cfg = candidate
    sites: list[str] = []
    if cfg is not None:
        venv = os.path.dirname(cfg)
        values = _read_pyvenv(cfg)
        include_system = values.get("include-system-site-packages", "false").lower() == "true"
        for libdir in _libdirs(venv):
            for name in ("site-packages", "dist-packages"):
                sites.append(os.path.join(libdir, name))
        home = values.get("home")
        base_prefixes = []
        if home and os.path.isabs(home):
            for exe in [home, *glob.glob(os.path.join(glob.escape(home), "python3*"))]:
                for p in [*_symlink_hops(exe), os.path.realpath(exe)]:
                    plan.paths.extend(_ancestors(p))
            base_prefixes = list(
                dict.fromkeys(os.path.dirname(h) for h in (home, os.path.realpath(home)))
            )
        base_prefixes += [p for p in prefixes if p != venv]
    for prefix in base_prefixes:
        for libdir in _libdirs(prefix):
            plan.tree(libdir)  # the stdlib (lib-dynload included)
            for name in ("site-packages", "dist-packages"):
                site = os.path.join(libdir, name)
                if include_system:
                    sites.append(site)
                else:
                    plan.exclude.add(os.path.normpath(site))
        for lib in ("lib", "lib64"):
            plan.paths.extend(glob.glob(os.path.join(glob.escape(prefix), lib, "libpython3*.so*")))
        if include_system and os.path.realpath(prefix) == "/usr":
            sites += glob.glob("/usr/local/lib/python3*/dist-packages")
            sites += glob.glob("/usr/local/lib/python3*/site-packages")
            sites += ["/usr/lib/python3/dist-packages"]
    for site in dict.fromkeys(sites):
        if os.path.isdir(site):
            plan.tree(site)
            for d in _pth_dirs(site):
                plan.tree(d)
    for entry in env.environment.get("PYTHONPATH", "").split(":"):
        if entry and os.path.isabs(entry):
            plan.tree(entry)
    for entry in sys_path:
        if entry and os.path.isabs(entry) and os.path.exists(entry):
            if os.path.isdir(entry):
                plan.tree(entry)
            else:
                plan.paths.extend(_ancestors(entry))  # a zip on sys.path
    for var in ("LD_LIBRARY_PATH", "PATH"):
        if var not in env.environment:
            continue
        for entry in env.environment[var].replace(" ", ":").split(":"):
            if entry and os.path.isabs(entry):
                plan.paths.extend(_ancestors(entry))
                plan.flat.append(os.path.normpath(entry))
    plan.paths = list(dict.fromkeys(plan.paths))
    plan.trees = list(dict.fromkeys(plan.trees))
    plan.flat = list(dict.fromkeys(plan.flat))
    return plan


def _libdirs(prefix: str) -> list[str]:
    """``prefix/lib*/python3*`` directories (the stdlib of an install, or a venv's lib dir)."""
    out: list[str] = []
    for lib in ("lib", "lib64"):
        out += sorted(glob.glob(os.path.join(glob.escape(prefix), lib, "python3*")))
    return [d for d in out if os.path.isdir(d)]


def query_sys_path(python: str, env: TfEnvConfig, user: str | None) -> list[str] | None:
    """``sys.path`` as the interpreter reports it when run as ``user`` (default ``nobody``),
    with the env's PYTHONPATH and the probe's flags; None when that fails."""
    as_user = user or _QUERY_USER
    child_env = {"PATH": SAFE_PATH, "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    if "PYTHONPATH" in env.environment:
        child_env["PYTHONPATH"] = env.environment["PYTHONPATH"]
    flags = [] if user else ["-s"]
    if not user:
        child_env["PYTHONNOUSERSITE"] = "1"
    else:
        try:
            child_env["HOME"] = pwd.getpwnam(user).pw_dir
        except KeyError:
            return None
    code = "import sys, json; print(json.dumps(sys.path))"
    run = run_bounded(
        [python, *flags, "-c", code],
        env=child_env,
        timeout=_QUERY_TIMEOUT,
        max_output=1024 * 1024,
        cwd="/",
        user=as_user,
    )
    if run.error or run.returncode != 0 or run.stdout_truncated:
        log.debug("sys.path query of %s as %s failed: %s", python, as_user, run.error or run)
        return None
    try:
        lines = run.stdout.decode("utf-8", errors="replace").strip().splitlines()
        value = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return value


def _describe(path: str, st: os.stat_result, writers: Iterable[str]) -> str:
    who = ", ".join(sorted(writers))
    return (
        f"{path}: owner {_user_name(st.st_uid)}, group {_group_name(st.st_gid)}, "
        f"mode {stat.filemode(st.st_mode)} (writable by {who})"
    )


def _allowed_for(user: str) -> set[str]:
    """The writers that probing as ``user`` makes harmless: the user and its private group."""
    allowed = {user}
    try:
        pw = pwd.getpwnam(user)
        group = grp.getgrgid(pw.pw_gid)
    except KeyError:
        return allowed
    if set(group.gr_mem) <= {user}:
        allowed.add(f"group:{group.gr_name}")
    return allowed


class _TooMany(Exception):
    pass


class _Checker:
    """lstat()s paths once each, collecting writers and evidence; follows symlinks."""

    def __init__(self, lstat: Callable[[str], os.stat_result], limit: int) -> None:
        self.lstat = lstat
        self.limit = limit
        self.stats: dict[str, os.stat_result | None] = {}
        self.walked: set[str] = set()
        self.writers: set[str] = set()
        self.evidence: list[str] = []
        self.pending_trees: list[str] = []

    def check(self, path: str) -> os.stat_result | None:
        """Check ``path``; a symlink's target and the directories above it are checked too."""
        if path in self.stats:
            return self.stats[path]
        if len(self.stats) >= self.limit:
            raise _TooMany(path)
        try:
            st: os.stat_result | None = self.lstat(path)
        except OSError:
            st = None  # absent: nothing to run there
        self.stats[path] = st
        if st is None:
            return None
        found = path_writers(st)
        if found:
            self.writers |= found
            if len(self.evidence) < _MAX_EVIDENCE:
                self.evidence.append(_describe(path, st, found))
        if stat.S_ISLNK(st.st_mode):
            for p in _ancestors(os.path.realpath(path)):
                self.check(p)
        return st

    def entry(self, path: str) -> os.stat_result | None:
        """Check an entry of a walked directory: a symlink to a directory is walked too (a
        symlink met as a directory *above* a checked path is not: /lib -> usr/lib)."""
        st = self.check(path)
        if st is not None and stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(path)
            if os.path.isdir(target) and target not in self.walked:
                self.pending_trees.append(target)
        return st

    def walk(self, root: str, exclude: set[str]) -> None:
        stack = [root]
        while stack:
            d = stack.pop()
            real = os.path.realpath(d)
            if real in self.walked or d in exclude:
                continue
            self.walked.add(real)
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                p = os.path.join(d, name)
                st = self.entry(p)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    stack.append(p)

    def flat(self, d: str) -> None:
        try:
            names = os.listdir(d)
        except OSError:
            return
        for name in names:
            self.check(os.path.join(d, name))


def root_forbidden_vars(env: TfEnvConfig) -> list[str]:
    """Variables of the env's ``environment`` table not allowed in a probe run as root."""
    return sorted(
        k
        for k in env.environment
        if _ROOT_FORBIDDEN.match(k) and k not in _ROOT_OK_PYTHON_VARS and k != "LD_LIBRARY_PATH"
    )


def decide_probe_user(
    env: TfEnvConfig,
    *,
    euid: int | None = None,
    lstat: Callable[[str], os.stat_result] = os.lstat,
    python: str | None = None,
    script: str | None = None,
    query: QueryFn | None = query_sys_path,
    limit: int = MAX_WALK_ENTRIES,
) -> ProbeDecision:
    """Whether, and as whom, the probe of ``env`` may run. Never raises.

    ``python`` is the resolved interpreter (default: ``env.python`` resolved on the safe PATH);
    ``script`` the probe script; ``query`` asks the interpreter for its sys.path (None: don't).
    A process that may switch users (root, or CAP_SETUID and CAP_SETGID) is checked as root
    is; ``euid`` given, only that uid decides (0: checked).
    """
    privileged = can_switch_user() if euid is None else euid == 0
    if not privileged:
        return ProbeDecision(user=None)  # already unprivileged: probe as ourselves
    if (os.geteuid() if euid is None else euid) == 0:
        runs, me = "tfgpud runs as root", "root"
    else:
        runs, me = "tfgpud can switch users (CAP_SETUID, CAP_SETGID)", "tfgpud's user"
    if not env.run_as:
        bad = root_forbidden_vars(env)
        if bad:
            return ProbeDecision(
                user=None,
                refused=(
                    f"{runs} and env `{env.name}`'s environment table sets "
                    f"{', '.join(bad)}, which could make the interpreter run unchecked code: "
                    f"remove it or set run_as so the probe does not run as {me}"
                ),
            )
    if python is None:
        python = resolve_interpreter(env.python, env.environment.get("PATH", SAFE_PATH))
    if python is None:
        return ProbeDecision(user=env.run_as)  # not found: reported as a missing interpreter
    sys_path: list[str] = []
    if query is not None:
        try:
            sys_path = query(python, env, env.run_as) or []
        except Exception:  # a failed query leaves the static list
            log.debug("sys.path query failed", exc_info=True)
    plan = code_plan(env, python, script=script, sys_path=sys_path)
    checker = _Checker(lstat, limit)
    try:
        for path in plan.paths:
            checker.check(path)
        for d in plan.flat:
            checker.flat(d)
        trees = list(plan.trees)
        while trees or checker.pending_trees:
            if not trees:
                trees, checker.pending_trees = checker.pending_trees, []
                continue
            checker.walk(trees.pop(0), plan.exclude)
    except _TooMany as exc:
        return ProbeDecision(
            user=None,
            refused=(
                f"{runs} and env `{env.name}`'s code spans more than {limit} files "
                f"(at {exc}): too many to verify who can write them; set run_as so the probe "
                f"does not run as {me}"
            ),
        )
    writers, evidence, checked = checker.writers, checker.evidence, len(checker.stats)
    log.debug("env %s: %d paths checked, writers %s", env.name, checked, sorted(writers))
    if not writers:
        return ProbeDecision(user=env.run_as, checked=checked)
    allowed = _allowed_for(env.run_as) if env.run_as else set()
    if writers <= allowed:
        return ProbeDecision(user=env.run_as, writers=tuple(sorted(writers)), checked=checked)
    others = sorted(writers - allowed)
    why = (
        f"{runs} and env `{env.name}`'s interpreter or packages are writable by "
        f"{', '.join(others)}"
        + (f" (run_as = {env.run_as!r} covers only that user)" if env.run_as else "")
        + f": running them as {me} would hand its privileges to that user"
    )
    return ProbeDecision(
        user=None,
        refused=why,
        writers=tuple(sorted(writers)),
        evidence=tuple(evidence),
        checked=checked,
    )


def _ids(user: str | None) -> tuple[int, int, set[int]] | None:
    if user is None:
        return os.geteuid(), os.getegid(), {os.getegid(), *os.getgroups()}
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid, set(os.getgrouplist(pw.pw_name, pw.pw_gid))


def access_denials(python: str, user: str | None) -> list[str]:
    """The paths (directories above the interpreter, or the interpreter itself, also along its
    symlink target) whose mode keeps ``user`` (None: this process) from executing ``python``.
    ACLs are not read; a path this process cannot stat ends that line."""
    ids = _ids(user)
    if ids is None or ids[0] == 0:
        return []
    uid, _, gids = ids
    out: list[str] = []
    seen: set[str] = set()
    for target in (os.path.abspath(python), os.path.realpath(python)):
        parts = target.split(os.sep)
        for i in range(1, len(parts) + 1):
            p = os.sep.join(parts[:i]) or "/"
            if p in seen:
                continue
            seen.add(p)
            try:
                st = os.stat(p)
            except OSError:
                break
            if st.st_uid == uid:
                ok = st.st_mode & stat.S_IXUSR
            elif st.st_gid in gids:
                ok = st.st_mode & stat.S_IXGRP
            else:
                ok = st.st_mode & stat.S_IXOTH
            if not ok:
                out.append(p)  # every denying component: each needs the fix
    return out
