"""Rules for each probed TensorFlow env: one table of checks, ``TF_CHECKS``.

A probe that did not complete (no interpreter, import failed, refused, timed out, crashed)
gives exactly one finding from its status. For a completed probe every row of ``TF_CHECKS``
whose ``applies`` holds is run: ``ALWAYS``, or ``ON_FALLBACK`` when the env sees fewer GPUs than
exist (``tf-cpu-fallback`` when it sees none, ``tf-partial-visibility`` when it sees some). Those
two findings name, as their cause, the findings whose code :mod:`tfgpud.codes` lists as a cause.

How to add a TF rule: write ``check_x(r, s, c) -> Finding | None`` here (build the finding with
``finding(code, severity, r.env, summary, evidence, fix)``), add a ``TfCheck`` row to
``TF_CHECKS``, add the code to :mod:`tfgpud.codes` (and to ``TF_CAUSES`` there if it explains a
fallback), a runbook section, the fact it rests on to ``docs/diagnosis-facts.md``, and a test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from tfgpud import codes
from tfgpud.config import Config, TfEnvConfig
from tfgpud.diagnosis import compat
from tfgpud.diagnosis.advice import (
    driver_upgrade,
    from_command_line,
    is_system_dir,
    missing_interpreter_fix,
    older_cc_fix,
    older_tf,
    pip_install,
    reinstall_with_cuda,
    use_new_venv,
)
from tfgpud.diagnosis.readings import (
    CRIT,
    HOST,
    WARN,
    cvd_visible,
    finding,
    gpu_count_expected,
    gpu_label,
    gpus_exist,
    lib_version,
    nvml_gpus,
    usable_gpus,
)
from tfgpud.model import (
    Finding,
    LibraryCheck,
    ProbeStatus,
    Snapshot,
    TfProbeResult,
)


def _env_cfg(c: Config, name: str) -> TfEnvConfig | None:
    return next((e for e in c.tensorflow.envs if e.name == name), None)


def _tf_name(r: TfProbeResult) -> str:
    return f"TensorFlow {r.tf_version or '?'} in env `{r.env}`"


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes")


def _expected_visible(r: TfProbeResult, s: Snapshot) -> int:
    n = gpu_count_expected(s)
    cvd = r.environment.get("CUDA_VISIBLE_DEVICES")
    return n if cvd is None else min(n, cvd_visible(cvd, s))


def _searched(r: TfProbeResult) -> str:
    parts = list(r.library_search_dirs) or [
        "no site-packages/nvidia/*/lib dirs (no CUDA pip packages)"
    ]
    ld = r.environment.get("LD_LIBRARY_PATH")
    parts.append(f"LD_LIBRARY_PATH={ld}" if ld else "LD_LIBRARY_PATH unset")
    parts.append("the ld.so cache")
    return "; ".join(parts)


def _join_names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _logs(r: TfProbeResult, *needles: str) -> list[str]:
    low = [n.lower() for n in needles]
    return [line for line in r.log_lines if any(n in line.lower() for n in low)]


def _cuda_libs(r: TfProbeResult) -> list[LibraryCheck]:
    return [lib for lib in r.libraries if lib.name != "cuda"]


def _libcuda(r: TfProbeResult) -> LibraryCheck | None:
    return next((lib for lib in r.libraries if lib.name == "cuda"), None)


def cause_cpu_only_build(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    b = r.build_info
    if _is_true(b.get("is_cuda_build")) or _is_true(b.get("is_rocm_build")):
        return None
    pkg = next((p for p in ("tensorflow-cpu", "tensorflow-intel") if p in r.packages), None)
    what = f"the CPU-only package {pkg} {r.packages[pkg]}" if pkg else "a CPU-only build"
    fix = reinstall_with_cuda(r)
    if pkg:
        fix = f"{r.python} -m pip uninstall -y {pkg} && {fix}"
    return finding(
        "tf-cpu-only-build",
        CRIT,
        r.env,
        f"{_tf_name(r)} is {what} (is_cuda_build={b.get('is_cuda_build', 'absent')}): it can "
        "never use a GPU",
        [
            f"build info: {dict(b)}",
            "packages: " + ", ".join(f"{k} {v}" for k, v in r.packages.items()),
        ],
        fix,
    )


def cause_gpus_hidden_by_env(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    cvd = r.environment.get("CUDA_VISIBLE_DEVICES")
    if cvd is None or cvd_visible(cvd, s) > 0:
        return None
    cfg = _env_cfg(c, r.env)
    origin = (
        f"set in the [[tensorflow.envs]] `{r.env}` environment table"
        if cfg is not None and "CUDA_VISIBLE_DEVICES" in cfg.environment
        else "set inside the interpreter (sitecustomize, a .pth file or the env's activation)"
    )
    return finding(
        "tf-gpus-hidden-by-env",
        CRIT,
        r.env,
        f"CUDA_VISIBLE_DEVICES={cvd!r} in env `{r.env}` hides all {gpu_count_expected(s)} "
        "GPU(s) from TensorFlow",
        [f"CUDA_VISIBLE_DEVICES={cvd!r}: {origin}", *_logs(r, "CUDA_VISIBLE_DEVICES", "NO_DEVICE")],
        "Remove CUDA_VISIBLE_DEVICES from the env (or set it to the GPUs to use, e.g. "
        "CUDA_VISIBLE_DEVICES=0,1 or GPU UUIDs); '' and -1 hide every GPU.",
    )


def cause_cuda_libs_missing(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    if not _is_true(r.build_info.get("is_cuda_build")):
        return None
    missing = [lib for lib in _cuda_libs(r) if not lib.loaded]
    if not missing:
        return None
    cuda = r.build_info.get("cuda_version", "?")
    cuda_mm = compat.cuda_major_minor(cuda)
    cuda_s = f"{cuda_mm[0]}.{cuda_mm[1]}" if cuda_mm else cuda
    names = [lib.soname for lib in missing]
    cudnn = r.build_info.get("cudnn_version", "?")
    nvidia_pkgs = [
        f"{k} {v}" for k, v in r.packages.items() if k.startswith("nvidia-") and k != "nvidia-ml-py"
    ]
    return finding(
        "tf-cuda-libs-missing",
        CRIT,
        r.env,
        f"{_tf_name(r)} was built for CUDA {cuda_s} / cuDNN {cudnn}; "
        f"{_join_names(names)} cannot be loaded (searched: {_searched(r)})",
        [
            *(f"{lib.soname}: {lib.error or 'not found'}" for lib in missing),
            "CUDA pip packages installed: " + (", ".join(nvidia_pkgs) or "none"),
            *_logs(r, "Cannot dlopen", "Could not load dynamic library", "Could not find cuda"),
        ],
        reinstall_with_cuda(r),
    )


def cause_libcuda_missing(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    lib = _libcuda(r)
    if lib is None or lib.loaded:
        return None
    nvml_dir = (
        os.path.dirname(s.nvml.library_path)
        if s.nvml is not None and s.nvml.up and s.nvml.library_path
        else None
    )
    if nvml_dir:
        fix = (
            f"The driver is installed (NVML loaded from {nvml_dir}) but libcuda.so.1 is not on "
            f"this env's loader path: add LD_LIBRARY_PATH = \"{nvml_dir}\" to the env's "
            "environment, or register it with ldconfig."
        )
    else:
        fix = (
            "Install the NVIDIA driver (it provides libcuda.so.1; pip cannot); in a container "
            "start it with `--gpus all` (NVIDIA Container Toolkit)."
        )
    return finding(
        "tf-libcuda-missing",
        CRIT,
        r.env,
        f"The driver's libcuda.so.1 cannot be loaded in env `{r.env}`: {lib.error or 'not found'}",
        [
            f"libcuda.so.1: {lib.error or 'not found'}",
            f"LD_LIBRARY_PATH={r.environment.get('LD_LIBRARY_PATH', '(unset)')}",
            *_logs(r, "cuInit", "kernel driver does not appear"),
        ],
        fix,
    )


def _jit_gpus(r: TfProbeResult, s: Snapshot) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """GPUs that can only run this build through PTX JIT: (label, cc, the PTX target used)."""
    sm, ptx = compat.compute_targets(r.build_info.get("cuda_compute_capabilities"))
    return [
        (label, cc, max(p for p in ptx if p <= cc))
        for label, cc in _gpu_ccs(r, s)
        if _runs_on(cc, sm, ptx) == "ptx"
    ]


def _ptx_driver_too_old(r: TfProbeResult, s: Snapshot) -> Finding | None:
    """``tf-driver-too-old`` for GPUs that run via PTX on a driver older than the build's CUDA.

    Minor-version compatibility lets a CUDA 12.5 build run on a 12.4 driver, but not its PTX:
    PTX from a newer toolkit needs a driver of at least that CUDA version, else every kernel
    fails with CUDA_ERROR_UNSUPPORTED_PTX_VERSION (even when TF lists the GPU).
    """
    nvml = s.nvml
    tf_cuda = compat.cuda_major_minor(r.build_info.get("cuda_version"))
    if nvml is None or nvml.cuda_driver_version is None or tf_cuda is None:
        return None
    drv = compat.driver_cuda(nvml.cuda_driver_version)
    jit = _jit_gpus(r, s)
    if drv >= tf_cuda or not jit:
        return None
    label = jit[0][0]
    who = label if len(jit) == 1 else f"{len(jit)} GPUs ({label}, …)"
    ccs = sorted({g[1] for g in jit})
    cc_s = ", ".join(f"{a}.{b}" for a, b in ccs)
    sm_s = "/".join(f"sm_{a}{b}" for a, b in ccs)
    ptx_s = "/".join(sorted({f"compute_{t[0]}{t[1]}" for _, _, t in jit}))
    need = compat.min_driver_for(tf_cuda)
    need_s = f" (≥ {need})" if need else ""
    cuda_s, drv_s = f"{tf_cuda[0]}.{tf_cuda[1]}", f"{drv[0]}.{drv[1]}"
    fix = (
        f"Upgrade the driver to one that supports CUDA {cuda_s}: "
        + driver_upgrade(need)
        + ". Minor-version compatibility does not cover PTX JIT."
        + older_tf(
            r,
            f"built with CUDA ≤ {drv_s}, whose PTX this driver can compile",
            cuda_major=drv[0],
            max_cuda=drv,
        )
        + f" On a data-centre GPU the CUDA forward-compatibility package (cuda-compat-"
        f"{tf_cuda[0]}-{tf_cuda[1]}) is a third way."
    )
    return finding(
        "tf-driver-too-old",
        CRIT,
        r.env,
        f"{who} (cc {cc_s}) has no {sm_s} kernels in TF {r.tf_version or '?'}; its {ptx_s} "
        f"PTX needs a driver that supports CUDA {cuda_s}{need_s}: driver "
        f"{nvml.driver_version or '?'} supports {drv_s} — PTX JIT fails with "
        "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
        [
            *(
                f"{lbl}: compute capability {a}.{b}, no sm_{a}{b} binary; runs "
                f"compute_{t[0]}{t[1]} PTX"
                for lbl, (a, b), t in jit
            ),
            f"driver {nvml.driver_version}, "
            f"nvmlSystemGetCudaDriverVersion {nvml.cuda_driver_version} (CUDA {drv_s})",
            f"TensorFlow build: cuda_version {r.build_info.get('cuda_version')}, "
            f"cuda_compute_capabilities {r.build_info.get('cuda_compute_capabilities')}",
            *_logs(r, "PTX", "jit-compiled"),
        ],
        fix,
    )


def cause_driver_too_old(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    nvml = s.nvml
    tf_cuda = compat.cuda_major_minor(r.build_info.get("cuda_version"))
    if nvml is None or nvml.cuda_driver_version is None or tf_cuda is None:
        return None
    drv = compat.driver_cuda(nvml.cuda_driver_version)
    if drv >= tf_cuda:
        return None
    minor_min = compat.MINOR_COMPAT_DRIVERS.get(tf_cuda[0])
    drv_version = compat.parse_version(nvml.driver_version)
    below_minor_compat = (
        minor_min is not None
        and drv_version is not None
        and drv_version < (compat.parse_version(minor_min) or ())
    )
    insufficient = _logs(r, "insufficient for CUDA runtime", "driver version is insufficient")
    if drv[0] == tf_cuda[0] and not below_minor_compat and not insufficient:
        # Minor-version compatibility covers the binary kernels, not PTX JIT.
        return _ptx_driver_too_old(r, s)
    ga = compat.min_driver_for(tf_cuda)
    series = (nvml.driver_version or "?").split(".")[0] + ".x"
    want = f"install driver ≥ {ga}" if ga else "install a newer driver"
    jit = _jit_gpus(r, s)
    if minor_min and not jit:
        want += f" (or ≥ {minor_min} with minor-version compatibility)"
    fix = f"Upgrade the driver: {driver_upgrade(ga)}."
    if minor_min and jit:
        fix += (
            f" Not {minor_min}: minor-version compatibility does not cover the PTX that "
            + ", ".join(lbl for lbl, _, _ in jit[:2])
            + " need(s)."
        )
    elif minor_min:
        fix += f" With minor-version compatibility any driver ≥ {minor_min} also works."
    fix += older_tf(r, f"built for CUDA {drv[0]}.x", cuda_major=drv[0])
    return finding(
        "tf-driver-too-old",
        CRIT,
        r.env,
        f"driver {series} supports CUDA ≤ {drv[0]}.{drv[1]}; TF {r.tf_version or '?'} needs "
        f"CUDA {tf_cuda[0]}.{tf_cuda[1]}: {want}",
        [
            f"driver {nvml.driver_version}, "
            f"nvmlSystemGetCudaDriverVersion {nvml.cuda_driver_version}",
            f"TensorFlow build: cuda_version {r.build_info.get('cuda_version')}",
            *insufficient,
        ],
        fix,
    )


def _is_compat_lib(lib: LibraryCheck | None) -> bool:
    """A forward-compatibility libcuda: loaded from a ``compat`` directory (cuda-compat-X-Y
    installs it under /usr/local/cuda-X.Y/compat/)."""
    return lib is not None and lib.path is not None and "compat" in lib.path.split("/")[:-1]


def _forward_compat(
    r: TfProbeResult,
    s: Snapshot,
    lib: LibraryCheck | None,
    lib_ver: str | None,
    module: str | None,
    refused: list[str],
) -> Finding:
    """``tf-driver-dso-mismatch`` for a forward-compatibility libcuda: its version differs from
    the kernel module by design, so a reboot fixes nothing; what matters is whether this GPU and
    module branch support forward compatibility."""
    path = lib.path if lib is not None and lib.path else None
    where = os.path.dirname(path) if path else "a cuda-compat directory"
    older = (
        lib_ver is not None
        and module is not None
        and (compat.parse_version(lib_ver) or ()) < (compat.parse_version(module) or ())
    )
    if refused:
        state = (
            ": CUDA refuses it on this GPU or module (CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE)"
        )
    elif older:
        state = ": it is older than the driver, so it can only hold CUDA back"
    else:
        state = ""
    remove = (
        f"remove {where} from the env's LD_LIBRARY_PATH (or its /etc/ld.so.conf.d entry, then "
        "`sudo ldconfig`) so the driver's own libcuda loads"
    )
    if older:
        fix = f"This is not a reboot problem: {remove}."
    else:
        fix = (
            "This is not a reboot problem: CUDA forward compatibility is in use (a cuda-compat "
            "package's libcuda instead of the driver's). It works only on data-centre GPUs "
            "(e.g. A100, H100, L40; not GeForce and most workstation RTX cards: `nvidia-smi "
            "--query-gpu=name --format=csv`) with a kernel module from a branch that compat "
            f"release supports (module here: {module or '?'}; see NVIDIA's CUDA "
            "forward-compatibility table). If either does not hold, "
            f"{remove}, and upgrade the driver itself instead; otherwise install the "
            "cuda-compat package that supports this module branch."
        )
    return finding(
        "tf-driver-dso-mismatch",
        CRIT,
        r.env,
        f"In env `{r.env}` libcuda.so.1 is the CUDA forward-compatibility library "
        f"{lib_ver or '?'} ({where}) over kernel module {module or '?'}{state}",
        [
            f"libcuda.so.1: {path or '?'} (forward-compatibility library)",
            f"/sys/module/nvidia/version: {module or '?'}",
            f"LD_LIBRARY_PATH={r.environment.get('LD_LIBRARY_PATH', '(unset)')}",
            *refused,
        ],
        fix,
    )


def cause_driver_dso_mismatch(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    lines = _logs(r, "does not match DSO version", "COMPAT_NOT_SUPPORTED")
    lib = _libcuda(r)
    lib_ver = lib_version(lib.path if lib is not None else None, "libcuda")
    module = s.pci.nvidia_module_version if s.pci is not None else None
    differs = lib_ver is not None and module is not None and lib_ver != module
    rm_mismatch = s.nvml is not None and s.nvml.error == "LIB_RM_VERSION_MISMATCH"
    if not (lines or differs or rm_mismatch):
        return None
    refused = [line for line in lines if "COMPAT_NOT_SUPPORTED" in line]
    if (refused or _is_compat_lib(lib)) and not rm_mismatch:
        return _forward_compat(r, s, lib, lib_ver, module, refused)
    fix = (
        "Reboot (the driver was upgraded but the old kernel module is still loaded), or "
        "reload it: `sudo rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia && "
        "sudo modprobe nvidia`."
    )
    return finding(
        "tf-driver-dso-mismatch",
        CRIT,
        r.env,
        f"In env `{r.env}` libcuda {lib_ver or '?'} does not match the loaded kernel module "
        f"{module or '?'}",
        [
            f"libcuda.so.1: {lib.path if lib is not None and lib.path else '?'}",
            f"/sys/module/nvidia/version: {module or '?'}",
            *lines,
        ],
        fix,
    )


def _gpu_ccs(r: TfProbeResult, s: Snapshot) -> list[tuple[str, tuple[int, int]]]:
    out: list[tuple[str, tuple[int, int]]] = [
        (gpu_label(g), g.compute_capability) for g in nvml_gpus(s) if g.compute_capability
    ]
    if not out:
        out = [
            (g.device_name or g.name, g.compute_capability) for g in r.gpus if g.compute_capability
        ]
    return out


def _runs_on(cc: tuple[int, int], sm: list[tuple[int, int]], ptx: list[tuple[int, int]]) -> str:
    """ "binary", "ptx" (JIT from PTX) or "none" for a GPU of compute capability ``cc``."""
    if any(m[0] == cc[0] and m[1] <= cc[1] for m in sm):
        return "binary"
    if any(p <= cc for p in ptx):
        return "ptx"
    return "none"


def _targets(sm: list[tuple[int, int]], ptx: list[tuple[int, int]]) -> str:
    t = ", ".join(f"{a}.{b}" for a, b in sm) or "none"
    if ptx:
        t += " + PTX " + ", ".join(f"{a}.{b}" for a, b in ptx)
    return t


def cause_compute_capability_unsupported(
    r: TfProbeResult, s: Snapshot, c: Config
) -> Finding | None:
    sm, ptx = compat.compute_targets(r.build_info.get("cuda_compute_capabilities"))
    if not sm and not ptx:
        return None
    bad = [(label, cc) for label, cc in _gpu_ccs(r, s) if _runs_on(cc, sm, ptx) == "none"]
    if not bad:
        return None
    ccs = sorted({cc for _, cc in bad})
    cc_s = ", ".join(f"{a}.{b}" for a, b in ccs)
    return finding(
        "tf-compute-capability-unsupported",
        CRIT,
        r.env,
        f"{_tf_name(r)} has kernels for compute capability {_targets(sm, ptx)} only; "
        f"{len(bad)} GPU(s) have {cc_s}",
        [
            *(f"{label}: compute capability {a}.{b}" for label, (a, b) in bad),
            *_logs(r, "Ignoring visible gpu"),
        ],
        older_cc_fix(r, ccs[0], cc_s),
    )


def _cuda_major(r: TfProbeResult) -> int | None:
    cuda = compat.cuda_major_minor(r.build_info.get("cuda_version"))
    return cuda[0] if cuda is not None else None


def _cudnn_wheel(r: TfProbeResult) -> str:
    """The cuDNN wheel TF's RUNPATH loads: ``nvidia-cudnn-cu<CUDA major of the build>``."""
    return f"nvidia-cudnn-cu{_cuda_major(r) or 12}"


def _cudnn_installed(r: TfProbeResult) -> str | None:
    """The cuDNN this build loads: the version of ``nvidia-cudnn-cu<its CUDA major>`` (not
    nvidia-cudnn-frontend, nor a wheel for another CUDA major), else the loaded library's."""
    if _cuda_major(r) is not None and _cudnn_wheel(r) in r.packages:
        return r.packages[_cudnn_wheel(r)]
    lib = next((lib for lib in r.libraries if lib.name == "cudnn" and lib.loaded), None)
    return lib_version(lib.path if lib is not None else None, "libcudnn")


def cause_cudnn_mismatch(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    if not gpus_exist(s):  # no GPU, no cuDNN in use: a version difference harms nothing
        return None
    lines = _logs(r, "Loaded runtime CuDNN library")
    built = compat.parse_version(r.build_info.get("cudnn_version"))
    tested = compat.tested_build(r.tf_version)
    need = compat.parse_version(tested.cudnn) if tested is not None else built
    have_s = _cudnn_installed(r)
    have = compat.parse_version(have_s)
    problem = bool(lines)
    if built and have and have[0] != built[0]:
        problem = True
    if need and have and have[0] == need[0] and have[:2] < need[:2]:
        problem = True
    if not problem:
        return None
    need_s = ".".join(map(str, need[:2])) if need else "?"
    return finding(
        "tf-cudnn-mismatch",
        CRIT,
        r.env,
        f"{_tf_name(r)} was built with cuDNN {r.build_info.get('cudnn_version', '?')} (tested "
        f"with {need_s}) but cuDNN {have_s or '?'} is installed",
        [f"cuDNN installed: {have_s or '?'}", *lines],
        f"{reinstall_with_cuda(r)}  (installs the matching nvidia-cudnn wheel; or "
        f"`{pip_install(r, f'{_cudnn_wheel(r)}>={need_s},<{(need or (9,))[0] + 1}')}`)",
    )


def cause_device_permission(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    denied = {node: why for node, why in r.device_access.items() if why != "ok"}
    if not denied:
        return None
    cfg = _env_cfg(c, r.env)
    who = cfg.run_as if cfg is not None and cfg.run_as else None
    user = who or "the probe's user"
    who = who or "<user>"
    return finding(
        "tf-device-permission",
        CRIT,
        r.env,
        f"TensorFlow in env `{r.env}` cannot open {_join_names(sorted(denied))} as {user}",
        [*(f"{node}: {why}" for node, why in sorted(denied.items())), *_logs(r, "cuInit")],
        "`ls -l /dev/nvidia*` should show crw-rw-rw- (the driver default); if "
        "NVreg_DeviceFileMode/NVreg_DeviceFileGID restrict them, add the user to that group "
        f"(`sudo usermod -aG <group> {who}`).",
    )


def _probe_refused(r: TfProbeResult, c: Config) -> Finding:
    """``tf-probe-refused``: the env was not probed, for safety or because run_as is wrong."""
    cfg = _env_cfg(c, r.env)
    run_as = cfg.run_as if cfg is not None else None
    users = [w for w in r.refused_writers if w != "everyone" and not w.startswith("group:")]
    prefix = os.path.dirname(os.path.dirname(r.python)) or r.python
    # A recursive chown/chmod only on the env's own tree, never on /, /usr or /opt.
    tree_ok = not is_system_dir(prefix)
    if r.status is ProbeStatus.NO_ACCESS:  # the probe's user cannot reach the interpreter
        who = r.probe_user or "tfgpud"
        dirs = " ".join(r.denied_paths) or os.path.dirname(r.python) or r.python
        fix = (
            f"Let `{who}` reach the interpreter: `sudo setfacl -m u:{who}:x {dirs}` (search "
            f"only), or move the env where `{who}` can enter, or (tfgpud as root) set "
            f'`run_as = "<owner>"` in the [[tensorflow.envs]] entry `{r.env}`.'
        )
    elif not r.refused_writers and not (r.error or "").startswith("run_as:"):
        fix = (  # refused for what the env sets or how big it is, not for who can write it
            f'Set `run_as = "<owner>"` in the [[tensorflow.envs]] entry `{r.env}` so the probe '
            "does not run as root, or remove the cause named in the summary."
        )
    elif not r.refused_writers:  # the runner could not switch to run_as
        fix = (
            f"Fix `run_as` in the [[tensorflow.envs]] entry `{r.env}`: the user must exist "
            f"(`getent passwd {run_as or '<user>'}`)."
        )
    elif len(users) == 1 and set(r.refused_writers) - {users[0], f"group:{users[0]}"} == set():
        make_root = (
            f", or make the env root's: `sudo chown -R root: {prefix} && sudo chmod -R go-w "
            f"{prefix}`"
            if tree_ok
            else ""
        )
        fix = (
            f'Add `run_as = "{users[0]}"` to the [[tensorflow.envs]] entry `{r.env}` so the '
            f"probe runs as the env's owner{make_root}."
        )
    elif tree_ok:
        fix = (
            f"Only root and one user may write the env's code: remove the other writers "
            f"(`sudo chmod -R go-w {prefix}`; `sudo chown -R <owner>: {prefix}`), then set "
            f'`run_as = "<owner>"` in the [[tensorflow.envs]] entry `{r.env}`.'
        )
    else:
        fix = (
            f"Only root and one user may write the env's code: take write access from the "
            f"others on the files named above (`ls -ld` each; {prefix} is a system directory, "
            "so no recursive chown/chmod), or use a venv of its own for TensorFlow."
        )
    return finding(
        "tf-probe-refused",
        WARN,
        r.env,
        f"Env `{r.env}` was not probed: {r.error}",
        [*r.log_lines],
        fix,
    )


def _tf_failed_probe(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    spec = (
        f"tensorflow[and-cuda]=={compat.LATEST_TF}"
        if gpus_exist(s)
        else f"tensorflow=={compat.LATEST_TF}"
    )
    pkg_fix = pip_install(r, spec)
    if r.status is ProbeStatus.MISSING_INTERPRETER:
        return finding(
            "tf-import-failed",
            CRIT,
            r.env,
            f"The interpreter of env `{r.env}` does not exist: {r.python}",
            [r.error or "", *r.log_lines],
            missing_interpreter_fix(r, c, spec),
        )
    if r.status in (ProbeStatus.REFUSED, ProbeStatus.NO_ACCESS):
        return _probe_refused(r, c)
    if r.status is ProbeStatus.IMPORT_FAILED:
        missing = "No module named 'tensorflow'" in (r.error or "")
        summary = (
            f"TensorFlow is not installed in env `{r.env}` ({r.python})"
            if missing
            else f"TensorFlow cannot be imported in env `{r.env}` ({r.python}): {r.error}"
        )
        fix = pkg_fix
        if not missing and "tensorflow" in r.packages:
            fix = (
                pip_install(r, f"tensorflow[and-cuda]=={r.packages['tensorflow']}")
                + " --force-reinstall"
            )
        return finding(
            "tf-import-failed",
            CRIT,
            r.env,
            summary,
            [r.error or "", f"python {r.python_version or '?'}", *r.traceback[-6:], *r.log_lines],
            fix,
        )
    if r.status is ProbeStatus.TIMEOUT:
        return finding(
            "tf-probe-timeout",
            WARN,
            r.env,
            f"The TensorFlow probe of env `{r.env}` did not answer in time ({r.error})",
            [f"ran {r.duration_seconds:.1f} s", *r.log_lines],
            "A hang in cuInit usually means a driver or GPU problem: check that `nvidia-smi` "
            "answers and `journalctl -k | grep -i xid`; on a slow or busy machine raise "
            "[tensorflow] timeout_seconds.",
        )
    if r.status in (ProbeStatus.CRASHED, ProbeStatus.ERROR, ProbeStatus.BAD_OUTPUT):
        if r.signal_name == "SIGILL":
            fix = (
                "Use a TensorFlow build for this CPU: the pip wheels need AVX (check `grep -o -w "
                "-e avx -e avx2 /proc/cpuinfo | sort -u`), or build TensorFlow from source."
            )
        elif r.signal_name == "SIGKILL":
            fix = "Check `journalctl -k | grep -i oom`; importing TF needs ~600 MB of memory."
        else:
            see = (
                ""
                if from_command_line(r, c)
                else f"Run `tfgpud doctor --python {r.python}` to see the whole error; "
            )
            fix = f"{see}Reinstall with `{reinstall_with_cuda(r)} --force-reinstall`."
        what = "crashed" if r.status is ProbeStatus.CRASHED else "failed"
        return finding(
            "tf-import-crashed",
            CRIT,
            r.env,
            f"The TensorFlow probe of env `{r.env}` {what}: {r.error}",
            [f"exit status {r.returncode}", *r.log_lines],
            fix,
        )
    return None


def _smoke_failed(r: TfProbeResult, s: Snapshot) -> Finding | None:
    """``tf-smoke-failed``: TF listed the GPU but a small matmul on GPU:0 failed."""
    if r.smoke_ok is not False:
        return None
    err = r.smoke_error or "unknown error"
    low = err.lower()
    tf_cuda = compat.cuda_major_minor(r.build_info.get("cuda_version"))
    if "ptx" in low:
        need = compat.min_driver_for(tf_cuda) if tf_cuda is not None else None
        cuda_s = f"CUDA {tf_cuda[0]}.{tf_cuda[1]}" if tf_cuda is not None else "its CUDA"
        fix = (
            f"The driver cannot compile this build's PTX: upgrade to a driver that supports "
            f"{cuda_s}: {driver_upgrade(need)} (see tf-driver-too-old / tf-ptx-jit-only)."
        )
    elif any(k in low for k in ("out of memory", "out_of_memory", "oom ", "resourceexhausted")):
        fix = (
            "GPU memory is taken: see which processes hold it (`nvidia-smi --query-compute-apps="
            "pid,used_memory --format=csv`); TensorFlow jobs should run with "
            "TF_FORCE_GPU_ALLOW_GROWTH=true and only their GPUs in CUDA_VISIBLE_DEVICES."
        )
    elif any(k in low for k in ("cudnn", "dnn library", "cublas", "cusolver", "cufft")):
        fix = (
            f"The CUDA libraries in the env do not match this build: `{reinstall_with_cuda(r)} "
            "--force-reinstall` (and unset LD_LIBRARY_PATH entries that point at another CUDA)."
        )
    else:
        fix = (
            f"Run `tfgpud doctor --python {r.python}` and check `nvidia-smi` and "
            "`journalctl -k | grep -i xid` for a driver or GPU fault."
        )
    gpus = ", ".join(f"{g.name} {g.device_name or ''}".strip() for g in r.gpus) or "none listed"
    return finding(
        "tf-smoke-failed",
        CRIT,
        r.env,
        f"{_tf_name(r)} lists {len(r.gpus)} GPU(s) but a matmul on GPU:0 failed: {err[:200]}",
        [
            f"smoke test: {err}",
            f"TF GPUs: {gpus}",
            *_logs(r, "PTX", "out of memory", "OOM", "DNN", "CUDA_ERROR")[:10],
        ],
        fix,
    )


def check_ptx_jit_only(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    """``tf-ptx-jit-only``: GPUs that run this build only by JIT-compiling its PTX, on a driver
    new enough to do so (else that is ``tf-driver-too-old``)."""
    if _ptx_driver_too_old(r, s) is not None:
        return None
    sm, ptx = compat.compute_targets(r.build_info.get("cuda_compute_capabilities"))
    if not ptx:
        return None
    jit = [(label, cc) for label, cc in _gpu_ccs(r, s) if _runs_on(cc, sm, ptx) == "ptx"]
    if not jit:
        return None
    ccs = sorted({cc for _, cc in jit})
    return finding(
        "tf-ptx-jit-only",
        WARN,
        r.env,
        f"{_tf_name(r)} has no binary kernels for compute capability "
        + ", ".join(f"{a}.{b}" for a, b in ccs)
        + f" (built for {_targets(sm, ptx)}): kernels are JIT-compiled from PTX",
        [
            *(f"{label}: compute capability {a}.{b}" for label, (a, b) in jit),
            *_logs(r, "jit-compiled", "not built with CUDA kernel"),
        ],
        "Expect a slow first start (minutes) and possible CUDA_ERROR_INVALID_PTX; keep the JIT "
        "cache warm with CUDA_CACHE_MAXSIZE=4294967296 in the job's environment, or use a "
        f"TensorFlow build with sm_{ccs[-1][0]}{ccs[-1][1]} kernels.",
    )


def check_smoke_failed(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    return _smoke_failed(r, s)


def check_ptx_driver_too_old(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    return _ptx_driver_too_old(r, s)


class Applies(Enum):
    """When a check of ``TF_CHECKS`` runs on a completed probe."""

    ALWAYS = "always"
    ON_FALLBACK = "on fallback"  # the env sees fewer GPUs than exist (none, or some)


TfRule = Callable[[TfProbeResult, Snapshot, Config], "Finding | None"]


@dataclass(frozen=True)
class TfCheck:
    code: str  # what ``check`` returns when it finds something
    applies: Applies
    check: TfRule


ALWAYS, ON_FALLBACK = Applies.ALWAYS, Applies.ON_FALLBACK

# Every check of an env whose probe completed, in the order their findings are listed. A check
# whose code is a cause of tf-cpu-fallback (tfgpud.codes) is named by the fallback finding.
TF_CHECKS: tuple[TfCheck, ...] = (
    TfCheck("tf-cpu-only-build", ON_FALLBACK, cause_cpu_only_build),
    TfCheck("tf-gpus-hidden-by-env", ON_FALLBACK, cause_gpus_hidden_by_env),
    TfCheck("tf-cuda-libs-missing", ON_FALLBACK, cause_cuda_libs_missing),
    TfCheck("tf-libcuda-missing", ON_FALLBACK, cause_libcuda_missing),
    TfCheck("tf-driver-too-old", ON_FALLBACK, cause_driver_too_old),
    TfCheck("tf-driver-dso-mismatch", ON_FALLBACK, cause_driver_dso_mismatch),
    TfCheck("tf-compute-capability-unsupported", ON_FALLBACK, cause_compute_capability_unsupported),
    # A cuDNN mismatch breaks the first convolution even when TF lists the GPUs.
    TfCheck("tf-cudnn-mismatch", ALWAYS, cause_cudnn_mismatch),
    TfCheck("tf-device-permission", ON_FALLBACK, cause_device_permission),
    TfCheck("tf-smoke-failed", ALWAYS, check_smoke_failed),
    # PTX from a newer CUDA than the driver's fails at the first kernel, even when TF lists
    # the GPU; with a new enough driver PTX JIT only costs start-up time (a warning).
    TfCheck("tf-driver-too-old", ALWAYS, check_ptx_driver_too_old),
    TfCheck("tf-ptx-jit-only", ALWAYS, check_ptx_jit_only),
)


def env_findings(r: TfProbeResult, s: Snapshot, c: Config) -> list[Finding]:
    """The findings for one env: one from the probe's status when it did not complete; else
    the fallback/partial-visibility finding (naming its causes) and what ``TF_CHECKS`` find,
    one per (code, env), in table order."""
    failed = _tf_failed_probe(r, s, c)
    if failed is not None:
        return _pasteable([failed], r, c)
    if not r.ok:
        return []
    seen = len(r.gpus)
    exist = gpus_exist(s)
    expected = _expected_visible(r, s)
    fallback = exist and seen == 0 and gpu_count_expected(s) > 0
    partial = not fallback and s.nvml is not None and s.nvml.up and 0 < seen < expected
    checked: dict[tuple[str, str], Finding] = {}
    for entry in TF_CHECKS:
        if entry.applies is ON_FALLBACK and not (fallback or partial):
            continue
        f = entry.check(r, s, c)
        if f is not None:
            checked.setdefault(f.key, f)
    causes = [f for f in checked.values() if f.code in codes.TF_CAUSES]
    out: list[Finding] = []
    if fallback:
        out.append(_fallback(r, s, causes))
    if partial:
        out.append(_partial(r, s, expected, causes))
    return _pasteable(out + list(checked.values()), r, c)


def _pasteable(found: list[Finding], r: TfProbeResult, c: Config) -> list[Finding]:
    """The env's findings with fixes that work when pasted (see advice.use_new_venv)."""
    return [replace(f, fix=use_new_venv(r, c, f.fix)) for f in found]


def _fallback(r: TfProbeResult, s: Snapshot, causes: Sequence[Finding]) -> Finding:
    total = gpu_count_expected(s)
    named = ", ".join(f.code for f in causes)
    ev = [
        f"GPUs on this machine: {total} (PCI {len(s.pci.gpus) if s.pci else '?'}, NVML "
        f"{len(nvml_gpus(s)) if s.nvml and s.nvml.up else 'down'}, "
        f"baseline {len(s.baseline)})",
        f"TensorFlow lists {len(r.gpus)} GPU(s); "
        f"is_cuda_build={r.build_info.get('is_cuda_build', '?')}",
        *r.log_lines[:10],
    ]
    if not causes:
        ev.append("no specific cause found by the probe")
    return finding(
        "tf-cpu-fallback",
        CRIT,
        r.env,
        f"{_tf_name(r)} sees 0 of {total} GPU(s): its work runs on the CPU"
        + (f" (cause: {named})" if named else ""),
        ev,
        f"See {named} for env `{r.env}`."
        if named
        else f'Run `TF_CPP_MAX_VLOG_LEVEL=1 {r.python} -c "import tensorflow as tf; '
        "print(tf.config.list_physical_devices('GPU'))\"` and read which library fails.",
    )


def _partial(r: TfProbeResult, s: Snapshot, expected: int, causes: Sequence[Finding]) -> Finding:
    return finding(
        "tf-partial-visibility",
        CRIT,
        r.env,
        f"{_tf_name(r)} sees {len(r.gpus)} of the {expected} GPU(s) NVML reports",
        [
            *(f"NVML: {gpu_label(g)} cc {g.compute_capability_str or '?'}" for g in usable_gpus(s)),
            *(f"TF: {g.name} {g.device_name or ''}" for g in r.gpus),
            f"CUDA_VISIBLE_DEVICES={r.environment.get('CUDA_VISIBLE_DEVICES', '(unset)')}",
            *r.log_lines[:10],
        ],
        (f"See {', '.join(f.code for f in causes)}." if causes else "")
        + " Check `nvidia-smi -q -d COMPUTE` (compute mode, MIG) and the log lines.",
    )


def rule_tensorflow(s: Snapshot, c: Config) -> Iterable[Finding]:
    for r in s.tf:
        yield from env_findings(r, s, c)


FALLBACK_CODES = frozenset({"tf-cpu-fallback", "tf-partial-visibility"})


def cpu_fallback_envs(findings: Iterable[Finding]) -> frozenset[str]:
    """Envs where GPUs exist but TensorFlow sees fewer (``tf-cpu-fallback`` or
    ``tf-partial-visibility``): the ``tfgpud_tf_cpu_fallback`` metric."""
    return frozenset(f.subject for f in findings if f.code in FALLBACK_CODES)


# --- which envs are watched: none at all, or a discovered one not probed ---------------------


def _env_snippet(name: str, python: str, run_as: str | None) -> str:
    """A ``[[tensorflow.envs]]`` table to paste into the configuration."""
    table = f'[[tensorflow.envs]]\nname = "{name}"\npython = "{python}"'
    return table + (f'\nrun_as = "{run_as}"' if run_as else "")


def rule_tf_no_env(s: Snapshot, c: Config) -> Iterable[Finding]:
    """``tf-no-env``: GPUs, and no env configured or discovered to probe (once the first search
    has finished): nothing has checked whether TensorFlow can use them."""
    d = s.discovery
    if s.tf_envs is None or s.tf_envs or not gpus_exist(s) or (d and d.enabled and not d.done):
        return
    gpus = len(nvml_gpus(s)) or gpu_count_expected(s)
    settings = c.tensorflow.discover
    if d is None:
        searched = ["discovery: not run"]
    elif not d.enabled:
        searched = ["discovery is off ([tensorflow.discover] enabled = false)"]
    else:
        searched = ["discovery found no interpreter whose site-packages hold TensorFlow:"]
        searched += list(d.searched)
    looks = (
        f"discovery searches {', '.join(settings.roots) or 'no roots'} (up to {settings.max_depth} "
        "levels down) for venvs (pyvenv.cfg), conda envs (conda-meta/) and Python installs, "
        "each user's ~/.conda/environments.txt and Jupyter kernelspecs: add the directory "
        "above your env to [tensorflow.discover] roots"
    )
    if d is not None and not d.enabled:
        looks = "or set [tensorflow.discover] enabled = true: " + looks
    yield finding(
        "tf-no-env",
        WARN,
        HOST,
        f"This machine has {gpus} GPU(s) but no TensorFlow env is configured or was found: "
        "whether TensorFlow can use them is not checked",
        ["[[tensorflow.envs]]: none configured", *searched],
        "Add the env TensorFlow runs in to the configuration (/etc/tfgpud/tfgpud.toml), then "
        "`sudo systemctl reload tfgpud`:\n"
        + _env_snippet("main", "/home/<user>/<venv>/bin/python", "<user>")
        + f"\nor {looks}.",
    )


def rule_tf_not_probed(s: Snapshot, c: Config) -> Iterable[Finding]:
    """``tf-probe-refused`` for a discovered env whose probe was not run (status ``not-run``):
    why not, what its metadata alone shows, and how to let it be probed."""
    records = {t.env: t for t in s.tf_envs or ()}
    for r in s.tf:
        if r.status is not ProbeStatus.NOT_RUN:
            continue
        t = records.get(r.env)
        prefix = (
            t.prefix if t is not None and t.prefix else os.path.dirname(os.path.dirname(r.python))
        )
        owner = t.owner if t is not None and t.owner else "its owner"
        where = [f"found at {prefix}" + (f" ({t.kind}, {t.found_by})" if t else "")]
        where.append(f"owner {owner}; python {r.python}")
        others = [w for w in r.refused_writers if w not in (owner, f"group:{owner}")]
        if others:
            chown = f"sudo chown -R {owner}: {prefix} && " if owner != "its owner" else ""
            fix = (
                f"Let only its owner write it: `{chown}sudo chmod -R go-w {prefix}`; it is "
                "probed as its owner (as nobody when that is root) at the next check (every "
                "15 minutes)."
            )
        elif r.denied_paths:
            who = r.probe_user or "tfgpud"
            run_as = owner if owner not in ("its owner", "root") else None
            fix = (
                f"Let `{who}` reach the interpreter: `sudo setfacl -m u:{who}:x "
                f"{' '.join(r.denied_paths)}` (search only); or configure the env (a configured "
                "env is probed as run_as, or as tfgpud itself):\n"
                + _env_snippet(r.env, r.python, run_as)
            )
        elif "CAP_SETUID" in (r.error or ""):
            fix = (
                "Let tfgpud switch to the env's owner: run it as root or with CAP_SETUID and "
                "CAP_SETGID (the packaged unit grants both; check `systemctl cat tfgpud` for a "
                "drop-in that removes them)."
            )
        else:
            fix = "Remove the cause named in the summary."
        yield finding(
            "tf-probe-refused",
            WARN,
            r.env,
            f"Discovered env `{r.env}` was not probed: {r.error}",
            [*where, *(t.metadata if t is not None else ()), *r.log_lines],
            fix,
        )
