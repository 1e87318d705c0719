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
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from tfgpud import codes
from tfgpud.config import Config, TfEnvConfig
from tfgpud.diagnosis import compat
from tfgpud.diagnosis.advice import (
    below_listing_minimum_fix,
    blackwell_fix,
    context_failure_fix,
    driver_upgrade,
    is_system_dir,
    keep_off_gpu,
    ld_library_path_fix,
    missing_interpreter_fix,
    old_gpu_fix,
    older_tf,
    other_cc_fix,
    pip_install,
    reinstall_with_cuda,
    use_new_venv,
)
from tfgpud.diagnosis.readings import (
    CRIT,
    HOST,
    INFO,
    WARN,
    cvd_entries,
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
    GpuReading,
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


def _runpath(r: TfProbeResult) -> list[str]:
    """The RUNPATH directories of TF's framework library, as the loader expands them."""
    dirs: list[str] = []
    for d in r.loader_search:
        norm = os.path.normpath(d.path)
        if d.source == "RUNPATH" and norm not in dirs:
            dirs.append(norm)
    return dirs


def _searched(r: TfProbeResult) -> str:
    ld = r.environment.get("LD_LIBRARY_PATH")
    parts = [f"LD_LIBRARY_PATH={ld}" if ld else "LD_LIBRARY_PATH unset"]
    if r.loader_search:
        lib = os.path.basename(r.loader_object or "libtensorflow_framework.so.2")
        parts.append(f"the RUNPATH of {lib} ({len(_runpath(r))} dirs)")
    else:
        parts = [
            *(
                list(r.library_search_dirs)
                or ["no site-packages/nvidia/*/lib dirs (no CUDA pip packages)"]
            ),
            *parts,
        ]
    parts.append("the ld.so cache")
    if r.loader_search:
        parts.append("the default dirs")
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


def _cvd_origin(r: TfProbeResult, c: Config) -> str:
    cfg = _env_cfg(c, r.env)
    if cfg is not None and "CUDA_VISIBLE_DEVICES" in cfg.environment:
        return f"set in the [[tensorflow.envs]] `{r.env}` environment table"
    return "set inside the interpreter (sitecustomize, a .pth file or the env's activation)"


def cause_gpus_hidden_by_env(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    cvd = r.environment.get("CUDA_VISIBLE_DEVICES")
    if cvd is None or cvd_visible(cvd, s) > 0:
        return None
    origin = _cvd_origin(r, c)
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


def _missing_cuda_libs(r: TfProbeResult) -> list[LibraryCheck]:
    """The CUDA libraries TensorFlow could not load: the ones its own loader named (at
    TF_CPP_MAX_VLOG_LEVEL=1), else those the probe's loader-order check could not open."""
    wanted = compat.cuda_library_sonames(
        r.build_info.get("cuda_version"), r.build_info.get("cudnn_version")
    )
    checks = {lib.soname: lib for lib in _cuda_libs(r)}
    named = [so for so in wanted.values() if so in r.loader_failures]
    if named:
        return [
            checks.get(so) or LibraryCheck(name, so, False, error=r.loader_failures[so])
            for name, so in wanted.items()
            if so in named
        ]
    return [lib for lib in _cuda_libs(r) if not lib.loaded and lib.soname not in r.loader_opened]


def _site_relative(path: str) -> str:
    """A RUNPATH or pip directory as the wheels name it: ``.../nvidia/cusolver/lib`` ->
    ``nvidia/cusolver/lib`` (TF's RUNPATH has each as $ORIGIN/../ and $ORIGIN/../../)."""
    parts = os.path.normpath(path).split(os.sep)
    for marker in ("nvidia", "tensorrt"):
        if marker in parts:
            return os.sep.join(parts[len(parts) - 1 - parts[::-1].index(marker) :])
    return os.path.normpath(path)


def cause_cuda_libs_missing(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    if not _is_true(r.build_info.get("is_cuda_build")):
        return None
    missing = _missing_cuda_libs(r)
    if _cudnn_other_major(r) is not None:  # tf-cudnn-mismatch names that one
        missing = [lib for lib in missing if lib.name != "cudnn"]
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
    elsewhere = {lib.soname: lib.found_elsewhere[0] for lib in missing if lib.found_elsewhere}
    summary = (
        f"{_tf_name(r)} was built for CUDA {cuda_s} / cuDNN {cudnn}; "
        f"{_join_names(names)} cannot be loaded (searched: {_searched(r)})"
    )
    runpath = _runpath(r)
    gap_dirs = sorted({os.path.dirname(p) for p in elsewhere.values()})
    lib = os.path.basename(r.loader_object or "libtensorflow_framework.so.2")
    if elsewhere:
        rel = ", ".join(sorted({_site_relative(d) for d in gap_dirs}))
        summary += (
            f": {_join_names(sorted(elsewhere))} is installed in {rel}, which is not on the "
            f"RUNPATH of {lib}" + (" nor on LD_LIBRARY_PATH" if runpath else "")
        )
    evidence = [
        *(
            f"{m.soname}: {m.error or 'not found'}"
            + (
                f"; present at {elsewhere[m.soname]}, where the loader does not look"
                if m.soname in elsewhere
                else ""
            )
            for m in missing
        ),
        *(
            f"TensorFlow's loader: Could not load dynamic library '{so}'; dlerror: {err}"
            for so, err in r.loader_failures.items()
            if so in names
        ),
    ]
    if runpath:
        evidence.append(
            f"RUNPATH of {r.loader_object}: "
            + ", ".join(dict.fromkeys(_site_relative(d) for d in runpath))
        )
    evidence += [
        "CUDA pip packages installed: " + (", ".join(nvidia_pkgs) or "none"),
        *_logs(r, "Cannot dlopen", "Could not find cuda"),
    ]
    if elsewhere and len(elsewhere) == len(missing):
        cfg = _env_cfg(c, r.env)
        current = cfg.environment.get("LD_LIBRARY_PATH") if cfg is not None else None
        fix = ld_library_path_fix(r.env, gap_dirs, current, cfg is not None)
    else:
        major = _cuda_major(r) or 12
        wheels = sorted(
            {f"{compat.CUDA_LIB_WHEELS[m.name]}-cu{major}" for m in missing}
            if all(m.name in compat.CUDA_LIB_WHEELS for m in missing)
            else set()
        )
        fix = reinstall_with_cuda(r)
        if wheels and len(missing) < len(_cuda_libs(r)):  # some: say which wheels matter
            fix += f"  (it brings {', '.join(wheels)}, which TensorFlow's RUNPATH finds)"
    return finding("tf-cuda-libs-missing", CRIT, r.env, summary, evidence, fix)


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
        for label, cc, _ in _gpu_ccs(r, s)
        if compat.runs_on(cc, sm, ptx) == "ptx"
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


def _cvd_gpus(r: TfProbeResult, s: Snapshot) -> list[GpuReading]:
    """NVML's usable GPUs that the env's CUDA_VISIBLE_DEVICES leaves to TensorFlow (all when it
    is unset): indexes in NVML's order, ``GPU-`` UUID prefixes; CUDA stops at the first bad
    entry. A ``MIG-`` entry names an instance of a GPU NVML's list does not say: all stay."""
    gpus = list(usable_gpus(s))
    cvd = r.environment.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return gpus
    out: list[GpuReading] = []
    for entry in cvd_entries(cvd):
        if entry.startswith("MIG-"):
            return gpus
        if entry.isdigit():
            g = gpus[int(entry)] if int(entry) < len(gpus) else None
        else:
            g = next(
                (x for x in gpus if entry.startswith("GPU-") and x.uuid.startswith(entry)), None
            )
        if g is None:
            break
        if g not in out:
            out.append(g)
    return out


def _gpu_ccs(r: TfProbeResult, s: Snapshot) -> list[tuple[str, tuple[int, int], str | None]]:
    """(label, compute capability, UUID) of each GPU this env's TensorFlow may use: NVML's
    (what TF's own filter sees too), else TF's list."""
    out: list[tuple[str, tuple[int, int], str | None]] = [
        (gpu_label(g), g.compute_capability, g.uuid)
        for g in _cvd_gpus(r, s)
        if g.compute_capability
    ]
    if not out:
        out = [
            (g.device_name or g.name, g.compute_capability, None)
            for g in r.gpus
            if g.compute_capability
        ]
    return out


def _targets(sm: list[tuple[int, int]], ptx: list[tuple[int, int]]) -> str:
    t = ", ".join(f"{a}.{b}" for a, b in sm) or "none"
    if ptx:
        t += " + PTX " + ", ".join(f"{a}.{b}" for a, b in ptx)
    return t


def _tf_gpu_list(r: TfProbeResult) -> str:
    """TensorFlow's own GPU list, as evidence."""
    if not r.gpus:
        return "TensorFlow lists no GPU"
    return "TensorFlow lists " + ", ".join(
        f"{g.name.rsplit('/', 1)[-1].replace('physical_device:', '')} {g.device_name or '?'}"
        + (
            f" (cc {g.compute_capability[0]}.{g.compute_capability[1]})"
            if g.compute_capability
            else ""
        )
        for g in r.gpus
    )


def _cc_kind(cc: tuple[int, int], sm: list[tuple[int, int]]) -> str:
    """Why a GPU has no kernel in a build: "below" TF's listing minimum (TF ignores it),
    "blackwell" (cc >= 10.0), "old" (below the build's binaries, 3.5-5.x), "other"."""
    if cc < compat.TF_LISTING_MIN_CC:
        return "below"
    if cc >= compat.BLACKWELL_CC:
        return "blackwell"
    if sm and cc < min(sm) and cc < (6, 0):
        return "old"
    return "other"


def _cc_evidence(
    label: str,
    cc: tuple[int, int],
    kind: str,
    sm: list[tuple[int, int]],
    ptx: list[tuple[int, int]],
    r: TfProbeResult,
) -> str:
    a, b = cc
    ptx_s = "/".join(f"compute_{x}{y}" for x, y in ptx) or "no PTX"
    listed = any(g.compute_capability == cc for g in r.gpus)
    if kind == "below":
        m = compat.TF_LISTING_MIN_CC
        return (
            f"{label}: compute capability {a}.{b}, below TensorFlow's minimum {m[0]}.{m[1]}: "
            "TensorFlow ignores it"
        )
    if kind == "blackwell":
        return (
            f"{label}: compute capability {a}.{b} (Blackwell): no sm_{a}{b} kernel, and {ptx_s} "
            "does not run there; TensorFlow 2.19-2.21 wheels list such GPUs, then every kernel "
            "fails with CUDA_ERROR_INVALID_PTX and CUDA_ERROR_INVALID_HANDLE (tensorflow#99592, "
            "#97387, #101746, #89272, #90291)"
        )
    oldest = f"sm_{min(sm)[0]}{min(sm)[1]}" if sm else "none"
    return (
        f"{label}: compute capability {a}.{b}: no binary kernel for it (the oldest is {oldest}), "
        f"and {ptx_s} runs only on GPUs of that compute capability or newer"
        + ("; TensorFlow lists it all the same, and its first kernel there fails" if listed else "")
    )


def cause_compute_capability_unsupported(
    r: TfProbeResult, s: Snapshot, c: Config
) -> Finding | None:
    """A GPU the env may use that has neither a binary kernel nor a PTX it can compile in this
    build, whether TensorFlow lists it (3.5-5.x, Blackwell) or drops it (below 3.5)."""
    sm, ptx = compat.compute_targets(r.build_info.get("cuda_compute_capabilities"))
    if not sm and not ptx:
        return None
    gpus = _gpu_ccs(r, s)
    bad = [
        (label, cc, _cc_kind(cc, sm))
        for label, cc, _ in gpus
        if compat.runs_on(cc, sm, ptx) == "none"
    ]
    if not bad:
        return None
    good = [u for _, cc, u in gpus if u is not None and compat.runs_on(cc, sm, ptx) != "none"]
    kinds = {k for _, _, k in bad}
    who = (
        f"{bad[0][0]} (cc {bad[0][1][0]}.{bad[0][1][1]})"
        if len(bad) == 1
        else f"{len(bad)} GPUs (cc " + ", ".join(sorted({f"{a}.{b}" for _, (a, b), _ in bad})) + ")"
    )
    them = "it" if len(bad) == 1 else "them"
    listed = all(any(g.compute_capability == cc for g in r.gpus) for _, cc, _ in bad)
    low = compat.TF_LISTING_MIN_CC
    state = {
        frozenset({"below"}): f"; TensorFlow ignores {them} (below its minimum {low[0]}.{low[1]})",
        frozenset({"blackwell"}): f"; TensorFlow lists {them}, then every kernel fails there "
        "with CUDA_ERROR_INVALID_PTX",
        frozenset({"old"}): f"; TensorFlow lists {them}, and the first kernel there fails",
    }.get(frozenset(kinds), "")
    if "lists" in state and not listed:  # TF listed nothing (another cause): no claim
        state = ""
    nvml = s.nvml
    fixes: list[str] = []
    seen: set[tuple[str, tuple[int, int]]] = set()
    for label, cc, kind in bad:
        key = (kind, cc)
        if key in seen:
            continue
        seen.add(key)
        if kind == "below":
            text = below_listing_minimum_fix(cc)
        elif kind == "old":
            text = old_gpu_fix(r, cc)
        elif kind == "blackwell":
            text = blackwell_fix(cc, nvml.cuda_driver_version if nvml is not None else None)
        else:
            text = other_cc_fix(cc, _targets(sm, ptx))
        fixes.append(
            text if len(bad) == 1 or len({b[1] for b in bad}) == 1 else f"For {label}: {text}"
        )
    fix = " ".join(fixes) + keep_off_gpu(r.env, good, _env_cfg(c, r.env) is not None)
    return finding(
        "tf-compute-capability-unsupported",
        CRIT,
        r.env,
        f"{_tf_name(r)} cannot run on {who}: its kernels are for compute capability "
        f"{_targets(sm, ptx)} only{state}",
        [
            *(_cc_evidence(label, cc, kind, sm, ptx, r) for label, cc, kind in bad),
            _tf_gpu_list(r),
            *_logs(r, "Ignoring visible gpu", "not built with CUDA kernel", "Adding visible gpu"),
            f"TensorFlow build: cuda_compute_capabilities "
            f"{r.build_info.get('cuda_compute_capabilities')}",
        ],
        fix,
    )


def _cuda_major(r: TfProbeResult) -> int | None:
    cuda = compat.cuda_major_minor(r.build_info.get("cuda_version"))
    return cuda[0] if cuda is not None else None


def _cudnn_wheel(r: TfProbeResult) -> str:
    """The cuDNN wheel TF's RUNPATH loads: ``nvidia-cudnn-cu<CUDA major of the build>``."""
    return f"nvidia-cudnn-cu{_cuda_major(r) or 12}"


def _cudnn_check(r: TfProbeResult) -> LibraryCheck | None:
    return next((lib for lib in r.libraries if lib.name == "cudnn"), None)


def _version_s(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def _cudnn_other_major(r: TfProbeResult) -> tuple[LibraryCheck | None, tuple[int, ...]] | None:
    """The build's cuDNN is missing but another major is installed: (that library, when the
    probe opened it, and its version). None otherwise."""
    lib = _cudnn_check(r)
    built = compat.parse_version(r.build_info.get("cudnn_version"))
    if lib is None or lib.loaded or not built:
        return None
    for other in lib.other_versions:
        if other.version:
            v = compat.cudnn_version_tuple(other.version)
            if v[0] != built[0]:
                return other, v
    pkg = compat.parse_version(r.packages.get(_cudnn_wheel(r)))
    if pkg and pkg[0] != built[0]:
        return None, pkg
    return None


def _cudnn_have(r: TfProbeResult) -> tuple[tuple[int, ...], str, LibraryCheck | None] | None:
    """The cuDNN this env gives TensorFlow: (version, as text, the library it was read from).

    The version the loaded library reports (cudnnGetVersion(), what TF checks) first; then a
    cuDNN of another major when the build's is missing; then the ``nvidia-cudnn-cu<major>``
    wheel (not nvidia-cudnn-frontend, nor a wheel for another CUDA major); then the file name.
    """
    lib = _cudnn_check(r)
    if lib is not None and lib.loaded and lib.version:
        loaded = compat.cudnn_version_tuple(lib.version)
        return loaded, _version_s(loaded), lib
    other = _cudnn_other_major(r)
    if other is not None and other[0] is not None:
        return other[1], _version_s(other[1]), other[0]
    if _cuda_major(r) is not None and _cudnn_wheel(r) in r.packages:
        text = r.packages[_cudnn_wheel(r)]
        wheel = compat.parse_version(text)
        return (wheel, text, None) if wheel else None
    name = lib_version(lib.path if lib is not None and lib.loaded else None, "libcudnn")
    from_name = compat.parse_version(name)
    return (from_name, name, lib) if from_name and name else None


_COMPILED = re.compile(r"TensorFlow compiled with CUDA [\d.]+ and cuDNN (\d+\.\d+(?:\.\d+)?)")


def _cudnn_compiled(r: TfProbeResult) -> tuple[int, ...] | None:
    """The cuDNN the build was compiled with: TF's own line, else the tested configuration."""
    for line in r.log_lines:
        m = _COMPILED.search(line)
        if m:
            return compat.parse_version(m.group(1))
    tested = compat.tested_build(r.tf_version)
    if tested is None:
        return None
    return compat.parse_version(compat.COMPILED_CUDNN.get(tested.tf, tested.cudnn))


def _cudnn_fix(
    r: TfProbeResult, have: tuple[int, ...], lib: LibraryCheck | None, need_s: str, major: int
) -> str:
    """Install the wheel TF's RUNPATH finds, and clear what the loader would find before it."""
    install = pip_install(r, f"{_cudnn_wheel(r)}>={need_s},<{major + 1}")
    where = os.path.dirname(lib.path) if lib is not None and lib.path else None
    if lib is not None and lib.via == "LD_LIBRARY_PATH" and where and lib.loaded:
        return (
            f"`{install}` and remove {where} from LD_LIBRARY_PATH (the env's `environment` "
            "table and the jobs' environment): LD_LIBRARY_PATH is searched before TensorFlow's "
            f"RUNPATH, so cuDNN {_version_s(have)} there would still win. Or put a cuDNN "
            f"≥ {need_s} (of major {major}) into {where}."
        )
    if lib is not None and lib.via in ("ld.so.cache", "default") and where and lib.loaded:
        return (
            f"`{install}`: TensorFlow's RUNPATH finds that wheel before the system's cuDNN "
            f"{_version_s(have)} in {where}."
        )
    if have[0] != major:
        return (
            f"`{install}`: {_tf_name(r)} loads only libcudnn.so.{major}, which that wheel "
            "puts where TensorFlow's RUNPATH looks."
        )
    return f"{reinstall_with_cuda(r)}  (installs the matching nvidia-cudnn wheel; or `{install}`)"


def cause_cudnn_mismatch(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    """The cuDNN the env gives TensorFlow is of another major than the build's, or an older
    minor than it was compiled with: TF checks the loaded cuDNN at its first use and refuses
    it ("Loaded runtime CuDNN library: A but source was compiled with: B"), even when it lists
    the GPUs."""
    if not gpus_exist(s):  # no GPU, no cuDNN in use: a version difference harms nothing
        return None
    lines = _logs(r, "Loaded runtime CuDNN library")
    built = compat.parse_version(r.build_info.get("cudnn_version"))
    need = _cudnn_compiled(r) or built
    got = _cudnn_have(r)
    problem = bool(lines)
    if got is not None and built and got[0][0] != built[0]:
        problem = True
    if got is not None and need and got[0][0] == need[0] and got[0][:2] < need[:2]:
        problem = True
    if not problem:
        return None
    have, have_s, lib = got if got is not None else ((), "?", None)
    major = (need or built or (9,))[0]
    need_s = _version_s(need[:2]) if need else "?"
    compiled_s = _version_s(need) if need and len(need) > 2 else need_s
    summary = (
        f"{_tf_name(r)} was built with cuDNN {r.build_info.get('cudnn_version', '?')} (tested "
        f"with {need_s}) but cuDNN {have_s} is installed"
    )
    if lib is not None and lib is _cudnn_check(r) and lib.loaded and lib.path:
        summary += f" and is what it loads ({lib.path}, via {lib.via or '?'})"
    elif lib is not None and lib.path:
        summary += f" ({lib.path})"
    if have and have[0] != major:
        summary += f": it loads only libcudnn.so.{major}, so it has no cuDNN at all"
    elif have:
        summary += (
            ': TensorFlow refuses an older minor version at its first cuDNN call ("Loaded '
            f"runtime CuDNN library: {_version_s(have[:3])} but source was compiled with: "
            f'{compiled_s}")'
        )
    evidence = [f"cuDNN installed: {have_s}"]
    if lib is not None and lib.version:
        evidence.append(f"cudnnGetVersion() of {lib.path}: {lib.version}")
    if lib is not None and lib.via:
        evidence.append(f"found by TensorFlow's loader via {lib.via}")
    evidence += [
        f"TensorFlow {r.tf_version or '?'} was compiled with cuDNN {compiled_s}; TensorFlow "
        "needs the same major and an equal or newer minor at run time",
        *_logs(r, "TensorFlow compiled with CUDA"),
        *lines,
    ]
    return finding(
        "tf-cudnn-mismatch",
        CRIT,
        r.env,
        summary,
        evidence,
        _cudnn_fix(r, have or (major,), lib, need_s, major),
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
            fix = (
                f'`{r.python} -c "import tensorflow"` shows the whole error; reinstall with '
                f"`{reinstall_with_cuda(r)} --force-reinstall`."
            )
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


_SMOKE_STAGES = {
    "context": "creating the CUDA context of GPU:0 (tf.config.list_logical_devices)",
    "matmul": "the matmul on GPU:0",
}


def _smoke_failed(r: TfProbeResult, s: Snapshot) -> Finding | None:
    """``tf-smoke-failed``: TF listed the GPU but could not initialise it (stage "context":
    no CUDA context) or a small matmul on GPU:0 failed; the fix follows the error."""
    if r.smoke_ok is not False:
        return None
    err = r.smoke_error or "unknown error"
    low = err.lower()
    tf_cuda = compat.cuda_major_minor(r.build_info.get("cuda_version"))
    at_context = r.smoke_stage == "context"
    if "ptx" in low:
        need = compat.min_driver_for(tf_cuda) if tf_cuda is not None else None
        cuda_s = f"CUDA {tf_cuda[0]}.{tf_cuda[1]}" if tf_cuda is not None else "its CUDA"
        fix = (
            f"The driver cannot compile this build's PTX: upgrade to a driver that supports "
            f"{cuda_s}: {driver_upgrade(need)} (see tf-driver-too-old / tf-ptx-jit-only)."
        )
    elif at_context:
        nodes = s.pci.device_nodes if s.pci is not None else ()
        uvm_missing = bool(nodes) and "nvidia-uvm" not in nodes
        gpu0 = next(iter(_cvd_gpus(r, s)), None)
        persistence_off = gpu0 is not None and gpu0.persistence_mode is False
        fix = context_failure_fix(
            err, uvm_missing, persistence_off, str(gpu0.index) if gpu0 is not None else "<gpu>"
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
            "GPU:0 came up but the computation failed: look for a GPU fault (`nvidia-smi`, "
            "`sudo journalctl -k | grep -i xid`), then run the same matmul with TensorFlow's "
            f'loader and kernel messages: `TF_CPP_MAX_VLOG_LEVEL=1 {r.python} -c "import '
            'tensorflow as tf; print(tf.linalg.matmul(tf.ones((2, 2)), tf.ones((2, 2))))"`.'
        )
    gpus = ", ".join(f"{g.name} {g.device_name or ''}".strip() for g in r.gpus) or "none listed"
    what = (
        "could not initialise GPU:0 (no CUDA context)" if at_context else "a matmul on GPU:0 failed"
    )
    return finding(
        "tf-smoke-failed",
        CRIT,
        r.env,
        f"{_tf_name(r)} lists {len(r.gpus)} GPU(s) but {what}: {err[:200]}",
        [
            f"smoke test: {err}",
            f"failed at: {_SMOKE_STAGES.get(r.smoke_stage, r.smoke_stage)}"
            if r.smoke_stage
            else "",
            f"TF GPUs: {gpus}",
            *_logs(r, "PTX", "out of memory", "OOM", "DNN", "CUDA_ERROR")[:10],
        ],
        fix,
    )


def check_gpus_selected_by_env(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    """``tf-gpus-selected-by-env`` (info): CUDA_VISIBLE_DEVICES gives TensorFlow some of the
    GPUs, it sees exactly those: on purpose, so said, not a partial-visibility alarm."""
    cvd = r.environment.get("CUDA_VISIBLE_DEVICES")
    total = gpu_count_expected(s)
    if cvd is None or not (0 < len(r.gpus) == _expected_visible(r, s) < total):
        return None
    chosen = _cvd_gpus(r, s)
    hidden = [g for g in usable_gpus(s) if g not in chosen]
    return finding(
        "tf-gpus-selected-by-env",
        INFO,
        r.env,
        f"{_tf_name(r)} uses {len(r.gpus)} of the {total} GPUs, on purpose: "
        f"CUDA_VISIBLE_DEVICES={cvd} ({_cvd_origin(r, c)})",
        [
            *(f"used: {gpu_label(g)}" for g in chosen),
            *(f"left to other jobs: {gpu_label(g)}" for g in hidden),
            _tf_gpu_list(r),
        ],
        "Nothing to do if that is intended; to give it every GPU, remove CUDA_VISIBLE_DEVICES "
        "from the env.",
    )


def check_ptx_jit_only(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    """``tf-ptx-jit-only``: GPUs that run this build only by JIT-compiling its PTX, on a driver
    new enough to do so (else that is ``tf-driver-too-old``)."""
    if _ptx_driver_too_old(r, s) is not None:
        return None
    sm, ptx = compat.compute_targets(r.build_info.get("cuda_compute_capabilities"))
    if not ptx:
        return None
    jit = [(label, cc) for label, cc, _ in _gpu_ccs(r, s) if compat.runs_on(cc, sm, ptx) == "ptx"]
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
    # TF lists GPUs through libcuda whatever CUDA the driver supports; a driver older than the
    # build's CUDA fails at the first use ("CUDA driver version is insufficient"), and PTX from
    # a newer CUDA than the driver's at the first kernel: critical even when TF lists the GPUs.
    TfCheck("tf-driver-too-old", ALWAYS, cause_driver_too_old),
    TfCheck("tf-driver-dso-mismatch", ON_FALLBACK, cause_driver_dso_mismatch),
    # A GPU without a kernel it can run is unusable whether TF lists it (3.5-5.x, Blackwell)
    # or drops it (below 3.5).
    TfCheck("tf-compute-capability-unsupported", ALWAYS, cause_compute_capability_unsupported),
    # A cuDNN mismatch breaks the first convolution even when TF lists the GPUs.
    TfCheck("tf-cudnn-mismatch", ALWAYS, cause_cudnn_mismatch),
    TfCheck("tf-device-permission", ON_FALLBACK, cause_device_permission),
    TfCheck("tf-smoke-failed", ALWAYS, check_smoke_failed),
    # With a driver new enough for the build's PTX, PTX JIT only costs start-up time.
    TfCheck("tf-ptx-jit-only", ALWAYS, check_ptx_jit_only),
    TfCheck("tf-gpus-selected-by-env", ALWAYS, check_gpus_selected_by_env),
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
        f"See {', '.join(f.code for f in causes)}."
        if causes
        else "Check `nvidia-smi -q -d COMPUTE` (compute mode, MIG) and the log lines.",
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
        looks = "set [tensorflow.discover] enabled = true: " + looks
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
