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
import shlex
from collections.abc import Sequence

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


# --- compute capability -----------------------------------------------------------------------


def _cc_s(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def keep_off_gpu(env: str, usable_uuids: Sequence[str], configured: bool) -> str:
    """ "Keep this env on the GPUs it can run on" with CUDA_VISIBLE_DEVICES (UUIDs: CUDA's
    indexes need not match nvidia-smi's)."""
    if not usable_uuids:
        return ""
    value = ",".join(usable_uuids)
    table = (
        f' and CUDA_VISIBLE_DEVICES = "{value}" in the `environment` table of the '
        f"[[tensorflow.envs]] entry `{env}`"
        if configured
        else ""
    )
    return (
        f" Meanwhile keep TensorFlow on the GPUs it can use: `export CUDA_VISIBLE_DEVICES={value}` "
        f"in the jobs' environment{table}."
    )


def below_listing_minimum_fix(cc: tuple[int, int]) -> str:
    """A GPU below TensorFlow's listing minimum (3.5): no release to name, only what works."""
    return (
        f"No TensorFlow pip release has kernels for compute capability {_cc_s(cc)}: the pip "
        f"builds have started at {_cc_s(compat.TF_LISTING_MIN_CC)} since TensorFlow 1.x, and "
        "CUDA 11 and later cannot compile for it. TensorFlow can only use the CPU instead of it; "
        f"a GPU of compute capability 6.0 or higher runs TensorFlow {compat.LATEST_TF}."
    )


def old_gpu_fix(r: TfProbeResult, cc: tuple[int, int]) -> str:
    """A 3.5-5.x GPU: the newest TensorFlow with binary kernels for it, in a separate env."""
    tf = compat.OLD_GPU_TF
    build = compat.tested_build(tf)
    py_range = build.python if build is not None else "?"
    fits = build is not None and compat.supports_python(build, r.python_version)
    base = r.python if fits else f"python{py_range.split('-')[-1]}"
    dest = f"$HOME/tf-{tf}"
    cmd = (
        f"{shlex.quote(base)} -m venv {dest} && {dest}/bin/python -m pip install "
        f"'tensorflow[and-cuda]=={tf}.*'"
    )
    text = (
        f"TensorFlow {tf} has kernels for compute capability {_cc_s(cc)} (a CUDA "
        f"{build.cuda if build else '11.8'} build: {compat.KERNEL_TARGETS[tf]}; Python "
        f"{py_range}); run this GPU's jobs in an env of their own: `{cmd}`."
    )
    if not fits:
        text += f" (This env's Python {compat.python_range(r.python_version)} is too new for it.)"
    if cc[0] == 3:
        text += (
            f" A Kepler GPU also needs a driver no newer than the "
            f"{compat.KEPLER_LAST_DRIVER_BRANCH} branch, the last that supports Kepler (CUDA 11 "
            "builds run on it)."
        )
    return text


def blackwell_fix(cc: tuple[int, int], cuda_driver_version: int | None) -> str:
    """cc >= 10.0 with no sm_100/sm_120 kernels in any pip release: what is known to work."""
    sm = f"sm_{cc[0]}{cc[1]}"
    need = compat.min_driver_for(compat.BLACKWELL_CUDA)
    cuda_s = f"{compat.BLACKWELL_CUDA[0]}.{compat.BLACKWELL_CUDA[1]}"
    drv = ""
    if cuda_driver_version is not None:
        d = compat.driver_cuda(cuda_driver_version)
        ok = d >= compat.BLACKWELL_CUDA
        drv = f"; this driver supports CUDA {d[0]}.{d[1]}" + ("" if ok else ", so upgrade it")
    return (
        f"No TensorFlow pip release up to {compat.LATEST_TF} has {sm} kernels, and its "
        "compute_90 PTX does not run on this GPU. What works: NVIDIA's NGC TensorFlow container "
        "(`docker run --gpus all --rm -it nvcr.io/nvidia/tensorflow:<release>-tf2-py3` with "
        "the NVIDIA Container Toolkit; pick a release whose notes list Blackwell), as users "
        f"report in tensorflow#99592; or TensorFlow built from source with "
        f"`--repo_env=HERMETIC_CUDA_COMPUTE_CAPABILITIES={sm}` and CUDA ≥ {cuda_s} (driver "
        f"≥ {need}{drv})."
    )


def other_cc_fix(cc: tuple[int, int], targets: str) -> str:
    sm = f"sm_{cc[0]}{cc[1]}"
    return (
        f"Use a TensorFlow build whose kernels include {sm} or a PTX target ≤ {_cc_s(cc)} "
        f"(this one has {targets}), or build TensorFlow from source with "
        f"`--repo_env=HERMETIC_CUDA_COMPUTE_CAPABILITIES={sm}`."
    )


# --- libraries the loader cannot find -----------------------------------------------------------


def ld_library_path_fix(
    env: str, dirs: Sequence[str], current: str | None, configured: bool
) -> str:
    """Put ``dirs`` ahead on LD_LIBRARY_PATH: in the env's table (the probe) and for the jobs."""
    value = ":".join([*dirs, *([current] if current else [])])
    shell = ":".join(shlex.quote(d) for d in dirs)
    table = (
        f'add LD_LIBRARY_PATH = "{value}" to the `environment` table of the [[tensorflow.envs]] '
        f"entry `{env}` (tfgpud's probe), and "
        if configured
        else ""
    )
    return (
        f"TensorFlow's loader searches LD_LIBRARY_PATH before its RUNPATH: {table}set it where "
        "the jobs start (their launch script, or the venv's bin/activate): "
        f"`export LD_LIBRARY_PATH={shell}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}`."
    )


# --- context creation ---------------------------------------------------------------------------


def context_failure_fix(error: str, uvm_missing: bool, persistence_off: bool, gpu: str) -> str:
    """What to check when TensorFlow lists a GPU but CUDA refuses it a context, by the error."""
    low = error.lower()
    if "out_of_memory" in low or "out of memory" in low:
        return (
            "The GPU's memory is taken before TensorFlow starts: `nvidia-smi --query-compute-apps="
            "pid,process_name,used_memory --format=csv` shows by whom; stop those processes or "
            "give TensorFlow another GPU."
        )
    if "devices_unavailable" in low or "busy or unavailable" in low:
        return (
            "The GPU is in an exclusive compute mode and another process holds it: "
            "`nvidia-smi -q -d COMPUTE` shows the mode, `nvidia-smi --query-compute-apps=pid,"
            "process_name --format=csv` the holder; stop it, or allow sharing with "
            f"`sudo nvidia-smi -i {gpu} -c DEFAULT`."
        )
    if "system_not_ready" in low:
        return (
            "CUDA is not ready on this system (CUDA_ERROR_SYSTEM_NOT_READY): on NVSwitch systems "
            "(HGX/DGX) the fabric manager must run: `sudo systemctl enable --now "
            "nvidia-fabricmanager` (its version must match the driver's)."
        )
    steps = []
    if uvm_missing:
        steps.append("create the missing /dev/nvidia-uvm with `sudo nvidia-modprobe -u -c 0`")
    steps += [
        "check that `nvidia-smi` lists the GPU without errors",
        "check `nvidia-smi -q -d COMPUTE`: in Exclusive_Process mode a second process gets no "
        "context (`nvidia-smi --query-compute-apps=pid,process_name --format=csv` shows the "
        f"holder; `sudo nvidia-smi -i {gpu} -c DEFAULT` allows sharing), in Prohibited mode none",
        "look for a GPU fault: `sudo journalctl -k | grep -i xid`",
    ]
    if not uvm_missing:
        steps.append("`ls -l /dev/nvidia-uvm` (if missing: `sudo nvidia-modprobe -u -c 0`)")
    text = (
        "TensorFlow lists the GPU, but CUDA refuses to create a context on it: "
        + "; ".join(steps)
        + "."
    )
    if persistence_off:
        text += (
            " Persistence mode is off: `sudo systemctl enable --now nvidia-persistenced` keeps "
            "the driver initialised between processes."
        )
    return text
