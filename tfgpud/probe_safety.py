"""Who may run the TensorFlow probe of an env: never more privilege than the env's owner.

The probe executes the env's interpreter and whatever its site-packages import. Run by root,
an env that another user can write is a root shell for that user. So, when tfgpud runs as root,
:func:`decide_probe_user` looks at who can write the code the probe would run — the interpreter
(the path as configured and what it resolves to), the directories above it, the env's prefix,
``pyvenv.cfg``, ``lib/python3*`` and its site-packages (and their entries), and the
``PYTHONPATH``/``LD_LIBRARY_PATH`` directories the env's ``environment`` table adds — and
refuses unless every such writer is root or the user ``run_as`` names (the probe then runs as
that user). Not root: the probe runs as tfgpud's own user and nothing is switched.
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tfgpud.config import TfEnvConfig

EVERYONE = "everyone"
_MAX_EVIDENCE = 8
_MAX_SITE_ENTRIES = 2000  # a TF env's site-packages has a few hundred top-level entries


@dataclass(frozen=True)
class ProbeDecision:
    """Run the probe as ``user`` (None: as tfgpud itself), or not at all when ``refused``."""

    user: str | None
    refused: str | None = None  # one line: why not
    writers: tuple[str, ...] = ()  # who can write the env's code: user names, "group:x", everyone
    evidence: tuple[str, ...] = ()  # "path: owner alice, mode -rwxr-xr-x" lines


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


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


def code_paths(env: TfEnvConfig) -> list[str]:
    """Every path whose writer could change what the probe of ``env`` executes."""
    python = os.path.abspath(env.python)
    real = os.path.realpath(python)
    paths: list[str] = [*_ancestors(python), *_ancestors(real)]
    for prefix in {
        os.path.dirname(os.path.dirname(python)),
        os.path.dirname(os.path.dirname(real)),
    }:
        paths.append(os.path.join(prefix, "pyvenv.cfg"))
        paths.append(os.path.join(prefix, "lib"))
        for libdir in sorted(glob.glob(os.path.join(prefix, "lib", "python3*"))):
            paths.append(libdir)
            for name in ("site-packages", "dist-packages"):
                site = os.path.join(libdir, name)
                if os.path.isdir(site):
                    paths.append(site)
                    paths.extend(_entries(site))
        for site in glob.glob(os.path.join(prefix, "lib", "python3", "dist-packages")):
            paths.append(site)
            paths.extend(_entries(site))
    for var in ("PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD"):
        for entry in env.environment.get(var, "").replace(" ", ":").split(":"):
            if entry and os.path.isabs(entry):
                paths.extend(_ancestors(entry))
    return list(dict.fromkeys(paths))


def _entries(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))[:_MAX_SITE_ENTRIES]
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names]


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


def decide_probe_user(
    env: TfEnvConfig,
    *,
    euid: int | None = None,
    lstat: Callable[[str], os.stat_result] = os.lstat,
) -> ProbeDecision:
    """Whether, and as whom, the probe of ``env`` may run. Never raises."""
    if (os.geteuid() if euid is None else euid) != 0:
        return ProbeDecision(user=None)  # already unprivileged: probe as ourselves
    writers: set[str] = set()
    evidence: list[str] = []
    for path in code_paths(env):
        try:
            st = lstat(path)
        except OSError:
            continue  # absent: nothing to run there (a missing interpreter is reported later)
        found = path_writers(st)
        if found:
            writers |= found
            if len(evidence) < _MAX_EVIDENCE:
                evidence.append(_describe(path, st, found))
    if not writers:
        return ProbeDecision(user=env.run_as)
    allowed = _allowed_for(env.run_as) if env.run_as else set()
    if writers <= allowed:
        return ProbeDecision(user=env.run_as, writers=tuple(sorted(writers)))
    others = sorted(writers - allowed)
    why = (
        f"tfgpud runs as root and env `{env.name}`'s interpreter or packages are writable by "
        f"{', '.join(others)}"
        + (f" (run_as = {env.run_as!r} covers only that user)" if env.run_as else "")
        + ": running them as root would hand root to that user"
    )
    return ProbeDecision(
        user=None, refused=why, writers=tuple(sorted(writers)), evidence=tuple(evidence)
    )
