"""Fix texts: the commands and upgrade paths a finding's ``fix`` names."""

from __future__ import annotations

from tfgpud.diagnosis import compat
from tfgpud.model import (
    TfProbeResult,
)


def pip_install(r: TfProbeResult, spec: str) -> str:
    return f"{r.python} -m pip install '{spec}'"


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
    return (
        f" A TensorFlow {why} (newest: {any_py.tf}, CUDA {any_py.cuda}) supports Python "
        f"{any_py.python} only, not this env's Python {py}: it would need a new env with such a "
        f"Python (e.g. `python{any_py.python.split('-')[-1]} -m venv <dir>`)."
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
