"""Fix texts: the commands and upgrade paths a finding's ``fix`` names.

A fix is pasted into a shell by a person who trusts it, so it must be safe there: it never
creates a venv over a system directory or an existing directory that is not a venv, never runs
``chown -R``/``chmod -R`` on a system tree, and never pip-installs into an interpreter the
distribution manages (PEP 668). Deciding that needs a look at the file system where the fix
will run (does the directory exist, is it a venv, is there an ``EXTERNALLY-MANAGED`` marker):
those few ``stat`` calls are the only reads here, and they are made for failing envs only.
"""

from __future__ import annotations

import glob
import os

from tfgpud.config import Config
from tfgpud.diagnosis import compat
from tfgpud.model import (
    TfProbeResult,
)

# The env name ``tfgpud doctor --python PATH`` gives the interpreter it checks.
CLI_ENV = "cli"
# Where a fix proposes a new venv: the person's home for doctor's --python, a system-wide
# directory the daemon's user can reach for an env of the configuration.
CLI_VENV = "~/venvs/tf"
CONFIG_VENV = "/opt/tf-venv"
# Never a venv here, nor a recursive chown/chmod (every top-level directory counts too).
SYSTEM_DIRS = frozenset(
    {
        "/usr/bin", "/usr/lib", "/usr/lib64", "/usr/libexec", "/usr/local", "/usr/local/bin",
        "/usr/local/lib", "/usr/sbin", "/usr/share", "/usr/src", "/var/lib", "/var/tmp",
        "/var/cache", "/var/log", "/home",
    }
)  # fmt: skip


def from_command_line(r: TfProbeResult, c: Config) -> bool:
    """True when the env is ``doctor --python``'s, not an entry of the configuration."""
    return r.env == CLI_ENV and not any(e.name == r.env for e in c.tensorflow.envs)


def env_prefix(python: str) -> str | None:
    """The env directory of ``<prefix>/bin/python…``; None for a bare command name or any
    other layout (``/python``, ``/opt/x/python``)."""
    if not os.path.isabs(python):
        return None
    bindir = os.path.dirname(os.path.normpath(python))
    return os.path.dirname(bindir) if os.path.basename(bindir) == "bin" else None


def is_env_dir(path: str) -> bool:
    """A venv (``pyvenv.cfg``) or a conda env (``conda-meta/``)."""
    return os.path.isfile(os.path.join(path, "pyvenv.cfg")) or os.path.isdir(
        os.path.join(path, "conda-meta")
    )


def is_system_dir(path: str) -> bool:
    """``/``, a top-level directory (``/usr``, ``/opt``, ``/nonexistent``) or a known system
    tree: never the target of ``python3 -m venv`` or of a recursive chown/chmod."""
    p = os.path.normpath(path)
    return os.path.dirname(p) == "/" or p == "/" or p in SYSTEM_DIRS


def venv_may_go_at(path: str) -> bool:
    """True when ``python3 -m venv PATH`` cannot harm: not a system directory, and either
    absent or already a venv (re-running venv there repairs it, deleting nothing)."""
    if is_system_dir(path):
        return False
    return is_env_dir(path) if os.path.lexists(path) else True


def externally_managed(r: TfProbeResult) -> bool:
    """PEP 668: ``r.python`` is a distribution's interpreter (an ``EXTERNALLY-MANAGED`` file
    in its stdlib directory) and not a venv, so ``pip install`` into it fails."""
    prefix = env_prefix(r.python)
    if prefix is not None and is_env_dir(prefix):
        return False
    real = os.path.realpath(r.python)
    base = env_prefix(real)
    if base is None:
        return False
    if r.python_version:
        major_minor = ".".join(r.python_version.split(".")[:2])
        marker = os.path.join(base, "lib", f"python{major_minor}", "EXTERNALLY-MANAGED")
        return os.path.isfile(marker)
    return bool(glob.glob(os.path.join(base, "lib", "python3*", "EXTERNALLY-MANAGED")))


def new_venv_dir(r: TfProbeResult) -> str:
    """Where a fix creates a venv for TensorFlow: ``~/venvs/tf`` for doctor's ``--python``,
    ``/opt/tf-venv`` for an env of the configuration; ``…-2``, ``…-3`` when that path is taken
    by something that is not a venv."""
    base = CLI_VENV if r.env == CLI_ENV else CONFIG_VENV
    for candidate in (base, *(f"{base}-{n}" for n in range(2, 10))):
        if venv_may_go_at(os.path.expanduser(candidate)):
            return candidate
    return f"{base}-new"


def pip_install(r: TfProbeResult, spec: str) -> str:
    """The command that installs ``spec`` for the env: pip of the env's interpreter, or, when
    the distribution manages that interpreter (PEP 668), a new venv with it installed there
    (:func:`use_new_venv` then says how to point the env at it)."""
    if externally_managed(r):
        venv = new_venv_dir(r)
        return f"{r.python} -m venv {venv} && {venv}/bin/python -m pip install '{spec}'"
    return f"{r.python} -m pip install '{spec}'"


def use_the_env(r: TfProbeResult, c: Config, python: str) -> str:
    """How to make tfgpud check the interpreter ``python`` instead of the env's."""
    if from_command_line(r, c):
        return (
            f"check it with `tfgpud doctor --python {python}`, and add it to the configuration "
            f'as a [[tensorflow.envs]] entry (`python = "{os.path.expanduser(python)}"`) for '
            "the daemon to watch it"
        )
    return f'set `python = "{python}"` in the [[tensorflow.envs]] entry `{r.env}`'


def use_new_venv(r: TfProbeResult, c: Config, fix: str) -> str:
    """``fix`` as a sentence that works for an externally managed interpreter: why a venv,
    the command (in backticks), and how to make the env use it. Other fixes are returned
    unchanged."""
    venv = new_venv_dir(r)
    if not externally_managed(r) or f"{venv}/bin/python -m pip install" not in fix:
        return fix
    if "`" not in fix:
        fix = f"`{fix}`"
    return (
        f"{r.python} is the distribution's Python (PEP 668: pip refuses to install into it), so "
        f"this creates a venv at {venv} (on Debian/Ubuntu `sudo apt install python3-venv` "
        f"first): {fix.rstrip('.')}; then {use_the_env(r, c, f'{venv}/bin/python')}."
    )


def missing_interpreter_fix(r: TfProbeResult, c: Config, spec: str) -> str:
    """The fix for an env whose interpreter does not exist: create the env where its path says
    when that is safe, else in a new venv elsewhere; and how to point tfgpud at it."""
    prefix = env_prefix(r.python)
    if prefix is not None and venv_may_go_at(prefix):
        create = f"`python3 -m venv {prefix} && {prefix}/bin/python -m pip install '{spec}'`"
        where = ""
    else:
        venv = new_venv_dir(r)
        create = f"`python3 -m venv {venv} && {venv}/bin/python -m pip install '{spec}'`"
        where = f"; then {use_the_env(r, c, f'{venv}/bin/python')}"
    if from_command_line(r, c):
        return (
            f"Pass the interpreter of an existing env with `tfgpud doctor --python "
            f"/path/to/env/bin/python`, or create one: {create}{where}."
        )
    return (
        f"Fix `python` in the [[tensorflow.envs]] entry `{r.env}`, or create the env: "
        f"{create}{where}."
    )


def reinstall_with_cuda(r: TfProbeResult) -> str:
    return pip_install(r, f"tensorflow[and-cuda]=={r.tf_version or compat.LATEST_TF}")


def driver_upgrade(need: str | None) -> str:
    """How to get a driver ≥ ``need``, without naming a short-lived branch the archive lacks."""
    at_least = f" (≥ {need})" if need else ""
    return (
        f"install your distribution's current production NVIDIA driver branch{at_least}, then "
        "reboot: Ubuntu `sudo ubuntu-drivers install` (`ubuntu-drivers list` shows the "
        "branches and versions), elsewhere the `nvidia-driver` package of the distribution or "
        "of NVIDIA's CUDA repository"
    )


def older_tf(
    r: TfProbeResult, why: str, *, cuda_major: int, max_cuda: tuple[int, int] | None = None
) -> str:
    """The "Or keep the driver and use TF X" sentence, naming a release for the env's Python."""
    b = compat.newest_tf_for(r.python_version, cuda_major=cuda_major, max_cuda=max_cuda)
    if b is not None:
        return (
            f" Or keep the driver and use a TensorFlow {why}: "
            f"`{pip_install(r, f'tensorflow[and-cuda]=={b.tf}.*')}` (CUDA {b.cuda})."
        )
    any_py = compat.newest_tf_for(None, cuda_major=cuda_major, max_cuda=max_cuda)
    if any_py is None:
        return ""
    py = compat.python_range(r.python_version)
    newest = any_py.python.split("-")[-1]
    return (
        f" A TensorFlow {why} (newest: {any_py.tf}, CUDA {any_py.cuda}) supports Python "
        f"{any_py.python} only, not this env's Python {py}: it would need a new env with such a "
        f"Python (e.g. `python{newest} -m venv {new_venv_dir(r)}-py{newest}`)."
    )


def older_cc_fix(r: TfProbeResult, cc: tuple[int, int], cc_s: str) -> str:
    """Use an older (CUDA 11) TF whose kernels reach further back, if one fits the Python."""
    source = f"build TensorFlow from source with TF_CUDA_COMPUTE_CAPABILITIES={cc_s}"
    b = compat.newest_tf_for(r.python_version, cuda_major=11)
    if b is not None:
        return (
            f"Use a TensorFlow build that includes sm_{cc[0]}{cc[1]} (CUDA 11 builds such as "
            f"`{pip_install(r, f'tensorflow[and-cuda]=={b.tf}.*')}` support ≥ 3.5), or {source}."
        )
    oldest = compat.newest_tf_for(None, cuda_major=11)
    py = compat.python_range(r.python_version)
    span = f" (newest: {oldest.tf}, Python {oldest.python})" if oldest is not None else ""
    return (
        f"The TensorFlow releases with sm_{cc[0]}{cc[1]} kernels (CUDA 11 builds{span}) do not "
        f"support this env's Python {py}: create an env with an older Python for one, or "
        f"{source}."
    )
