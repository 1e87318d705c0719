"""diagnose(): the expert knowledge. Pure rules over a Snapshot, one small function per finding.

Every rule reads only the snapshot and the config, returns zero or more Findings, and says in
the finding what it rests on (evidence) and what to do (fix). The facts behind the rules are in
``reference/tensorflow-gpu-failures.md``; the version tables live in :mod:`tfgpud.compat`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Sequence

from tfgpud import compat
from tfgpud.config import Config, TfEnvConfig
from tfgpud.model import (
    Finding,
    GpuReading,
    LibraryCheck,
    ProbeStatus,
    Severity,
    Snapshot,
    TfProbeResult,
    TfProcess,
)

HOST = "host"
CRIT, WARN, INFO = Severity.CRITICAL, Severity.WARNING, Severity.INFO
GIB = 1024**3

# Xids worth waking someone for (reference §5), with what they mean.
CRITICAL_XIDS: dict[int, str] = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    64: "ECC page retirement / row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP firmware error",
}
XID_WINDOW_SECONDS = 3600.0

Rule = Callable[[Snapshot, Config], Iterable[Finding]]


# --- shared facts -------------------------------------------------------------------------------


def _nvml_gpus(s: Snapshot) -> tuple[GpuReading, ...]:
    return s.nvml.gpus if s.nvml is not None and s.nvml.up else ()


def _usable_gpus(s: Snapshot) -> tuple[GpuReading, ...]:
    return tuple(g for g in _nvml_gpus(s) if not g.lost and g.error is None)


def gpu_count_expected(s: Snapshot) -> int:
    """How many NVIDIA GPUs this machine has, by the best source available.

    NVML's healthy GPUs when NVML is up; otherwise the largest of PCI, baseline and
    ``expected_gpus`` (so a dead driver does not make the GPUs "not exist").
    """
    if s.nvml is not None and s.nvml.up and s.nvml.gpus:
        return len(_usable_gpus(s))
    pci = len(s.pci.gpus) if s.pci is not None else 0
    return max(pci, len(s.baseline), s.expected_gpus or 0)


def gpus_exist(s: Snapshot) -> bool:
    """True when any source says there are NVIDIA GPUs: PCI, NVML, the baseline, [expect]."""
    pci = bool(s.pci.gpus) if s.pci is not None else False
    return pci or bool(_nvml_gpus(s)) or bool(s.baseline) or (s.expected_gpus or 0) > 0


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def _pci_lines(s: Snapshot) -> list[str]:
    if s.pci is None:
        return ["PCI bus: not read"]
    if not s.pci.gpus:
        return ["PCI bus: no NVIDIA display/3D controller (vendor 0x10de)"]
    return [
        f"PCI {g.address}: NVIDIA device {g.device_id}, kernel driver {g.driver or 'none bound'}"
        for g in s.pci.gpus
    ]


def _gpu_label(g: GpuReading) -> str:
    parts = [g.name or "GPU", g.uuid]
    if g.pci_bus_id:
        parts.append(g.pci_bus_id)
    return f"GPU {g.index} " + " ".join(parts)


def _find(
    code: str, sev: Severity, subject: str, summary: str, evidence: Iterable[str], fix: str
) -> Finding:
    return Finding(code, sev, subject, summary, tuple(e for e in evidence if e), fix)


# --- hardware and driver ------------------------------------------------------------------------


def rule_no_nvidia_gpu(s: Snapshot, c: Config) -> Iterable[Finding]:
    if gpus_exist(s):
        return
    ev = _pci_lines(s)
    if s.nvml is not None:
        ev.append("NVML: " + ("up, 0 GPUs" if s.nvml.up else f"not available ({s.nvml.error})"))
    ev.append("baseline: no GPU ever seen here; [expect] gpus: " + str(c.expect.gpus))
    yield _find(
        "no-nvidia-gpu",
        INFO,
        HOST,
        "No NVIDIA GPU on this machine: TensorFlow runs on the CPU, as expected here",
        ev,
        "Nothing to do on a CPU-only machine; on a cloud VM check that the instance type "
        "has a GPU attached.",
    )


def rule_nvml_library_missing(s: Snapshot, c: Config) -> Iterable[Finding]:
    if s.nvml is None or s.nvml.error != "LIBRARY_NOT_FOUND" or not gpus_exist(s):
        return
    n = len(s.pci.gpus) if s.pci is not None else 0
    where = f"the PCI bus has {n} NVIDIA GPU(s)" if n else "GPUs were seen here before"
    yield _find(
        "nvml-library-missing",
        CRIT,
        HOST,
        f"The NVIDIA driver's libnvidia-ml.so.1 is not installed, but {where}",
        [
            *_pci_lines(s),
            f"NVML load failed: LIBRARY_NOT_FOUND (library: {c.nvml.library or 'default search'})",
        ],
        "Install the NVIDIA driver, which provides libnvidia-ml.so.1 and libcuda.so.1 "
        "(pip cannot): Ubuntu `sudo ubuntu-drivers install`, Debian `sudo apt install "
        "nvidia-driver`; in a container start it with `--gpus all` (NVIDIA Container "
        'Toolkit); if the driver lives elsewhere set [nvml] library = "/path/libnvidia-ml.so.1".',
    )


def rule_driver_not_loaded(s: Snapshot, c: Config) -> Iterable[Finding]:
    if s.nvml is None or s.nvml.error != "DRIVER_NOT_LOADED":
        return
    ev = ["NVML init: DRIVER_NOT_LOADED", *_pci_lines(s)]
    if s.pci is not None:
        ev.append(
            "/sys/module/nvidia: "
            + (
                f"version {s.pci.nvidia_module_version}"
                if s.pci.nvidia_module_version
                else "absent"
            )
        )
        if s.pci.nouveau_loaded:
            ev.append("nouveau is loaded (see nouveau-bound)")
    yield _find(
        "driver-not-loaded",
        CRIT,
        HOST,
        "The NVIDIA kernel module is not loaded: no process can use the GPUs",
        ev,
        "`sudo modprobe nvidia`; if that says the module is not found, it was not built for "
        "the running kernel (`uname -r`, e.g. after a kernel upgrade): `sudo dkms autoinstall` "
        "or reinstall the driver package, then reboot.",
    )


def _lib_version(path: str | None, stem: str) -> str | None:
    """ "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.54.14" -> "550.54.14"."""
    if not path:
        return None
    m = re.fullmatch(rf"{re.escape(stem)}\.so\.(\d+\.\d+(?:\.\d+)?)", os.path.basename(path))
    return m.group(1) if m else None


def rule_driver_library_mismatch(s: Snapshot, c: Config) -> Iterable[Finding]:
    if s.nvml is None:
        return
    module = s.pci.nvidia_module_version if s.pci is not None else None
    library = _lib_version(s.nvml.library_path, "libnvidia-ml")
    mismatch = s.nvml.error == "LIB_RM_VERSION_MISMATCH" or (
        module is not None and library is not None and module != library
    )
    if not mismatch:
        return
    if s.nvml.library_stale:
        yield _find(
            "driver-library-mismatch",
            CRIT,
            HOST,
            "tfgpud still has the previous driver's NVML library loaded (the driver was "
            f"upgraded and its module reloaded; kernel module now {module or '?'})",
            [
                f"NVML: {s.nvml.error}",
                f"/sys/module/nvidia/version: {module or 'unknown'}",
                f"libnvidia-ml mapped by tfgpud: {s.nvml.library_path or '?'} (deleted on disk)",
            ],
            "Restart tfgpud so it loads the new library: `sudo systemctl restart tfgpud` (other "
            "long-running GPU programs need a restart too).",
        )
        return
    yield _find(
        "driver-library-mismatch",
        CRIT,
        HOST,
        f"Driver/library version mismatch: kernel module {module or '?'}, user-space "
        f"library {library or '?'} (driver upgraded without a reboot)",
        [
            f"NVML: {s.nvml.error or 'up'}",
            f"/sys/module/nvidia/version: {module or 'unknown'}",
            f"libnvidia-ml: {s.nvml.library_path or 'default search'}",
        ],
        "Reboot; or stop every GPU user and reload the module: `sudo rmmod nvidia_uvm "
        "nvidia_drm nvidia_modeset nvidia && sudo modprobe nvidia`.",
    )


def rule_nouveau_bound(s: Snapshot, c: Config) -> Iterable[Finding]:
    if s.pci is None or not s.pci.gpus:
        return
    bound = [g for g in s.pci.gpus if g.driver == "nouveau"]
    if not bound and not (s.pci.nouveau_loaded and all(g.driver != "nvidia" for g in s.pci.gpus)):
        return
    yield _find(
        "nouveau-bound",
        CRIT,
        HOST,
        "The open-source nouveau driver owns the GPU(s); CUDA needs the NVIDIA driver",
        [*_pci_lines(s), f"nouveau module loaded: {'yes' if s.pci.nouveau_loaded else 'no'}"],
        "Blacklist nouveau and install the NVIDIA driver: `printf 'blacklist nouveau\\noptions "
        "nouveau modeset=0\\n' | sudo tee /etc/modprobe.d/blacklist-nouveau.conf && sudo "
        "update-initramfs -u && sudo reboot`.",
    )


def rule_device_nodes_missing(s: Snapshot, c: Config) -> Iterable[Finding]:
    pci = s.pci
    if pci is None or not pci.gpus:
        return
    nvidia_bound = [g for g in pci.gpus if g.driver == "nvidia"]
    module_loaded = bool(pci.nvidia_module_version or pci.proc_driver_version or nvidia_bound)
    if not module_loaded:
        return
    numbered = [n for n in pci.device_nodes if re.fullmatch(r"nvidia\d+", n)]
    missing = []
    if "nvidiactl" not in pci.device_nodes:
        missing.append("/dev/nvidiactl")
    want = len(nvidia_bound) or 1
    if len(numbered) < want:
        missing.append(f"/dev/nvidia0..{want - 1} (found {len(numbered)})")
    if not missing:
        return
    yield _find(
        "device-nodes-missing",
        CRIT,
        HOST,
        f"The NVIDIA module is loaded but device nodes are missing: {', '.join(missing)}",
        [
            *_pci_lines(s),
            f"nvidia module version: {pci.nvidia_module_version or '?'}",
            "/dev nodes present: " + (" ".join(pci.device_nodes) or "none"),
        ],
        "On the host: `sudo nvidia-modprobe -c 0 -u` (or run `sudo nvidia-smi` once) to create "
        "them; in a container: start it with `--gpus all` (NVIDIA Container Toolkit).",
    )


def rule_nvml_no_permission(s: Snapshot, c: Config) -> Iterable[Finding]:
    nodes = " ".join(s.pci.device_nodes) if s.pci is not None else "?"
    for g in _nvml_gpus(s):
        if g.error == "NO_PERMISSION":
            yield _find(
                "nvml-no-permission",
                CRIT,
                g.uuid,
                f"NVML refused access to {_gpu_label(g)} (NO_PERMISSION); the other GPUs answer",
                [f"NVML index {g.index}: NO_PERMISSION", f"/dev nodes present: {nodes}"],
                f"Check `ls -l /dev/nvidia{g.index}` and the service's DeviceAllow=/cgroup "
                "device rules: tfgpud's user must be able to open every /dev/nvidiaN node.",
            )
    if s.nvml is None or s.nvml.error != "NO_PERMISSION":
        return
    yield _find(
        "nvml-no-permission",
        CRIT,
        HOST,
        "NVML refused access to the driver (NO_PERMISSION): tfgpud's user cannot open the "
        "/dev/nvidia* nodes",
        ["NVML init: NO_PERMISSION", f"/dev nodes present: {nodes}"],
        "`ls -l /dev/nvidia*` should show crw-rw-rw- (the driver default); if "
        "NVreg_DeviceFileMode/NVreg_DeviceFileGID restrict them, add the daemon's user to that "
        "group: `sudo usermod -aG <group> tfgpud`.",
    )


def rule_gpu_lost(s: Snapshot, c: Config) -> Iterable[Finding]:
    for g in _nvml_gpus(s):
        if not g.lost:
            continue
        yield _find(
            "gpu-lost",
            CRIT,
            g.uuid,
            f"{_gpu_label(g)} is lost (NVML GPU_IS_LOST): it has fallen off the bus",
            [f"NVML: {g.error or 'GPU_IS_LOST'}", f"PCI bus id: {g.pci_bus_id or '?'}"],
            "Check `journalctl -k | grep -i xid` (Xid 79); drain its jobs, then `sudo nvidia-smi "
            f"-r -i {g.pci_bus_id or g.index}` or reboot; if it recurs check power, cooling and "
            "seating.",
        )


def rule_gpu_vanished(s: Snapshot, c: Config) -> Iterable[Finding]:
    """Baseline GPUs NVML does not list now. With NVML down none is listed: each is reported
    too (beside the driver finding), so "GPUs are gone" holds after a reboot whose driver
    failed to load. ``[expect] gpus`` beyond what is seen and known is one finding on ``host``."""
    if s.nvml is None:
        return
    up = s.nvml.up
    seen = {g.uuid for g in s.nvml.gpus} if up else set()
    pci_addrs = {_norm_bus(g.address) for g in s.pci.gpus} if s.pci is not None else set()
    nvml_now = (
        f"NVML now reports {len(s.nvml.gpus)} GPU(s): "
        + (", ".join(g.uuid for g in s.nvml.gpus) or "none")
        if up
        else f"NVML is down ({s.nvml.error or 'unknown error'}): the driver lists no GPU"
    )
    fix = (
        "Check `journalctl -k | grep -iE 'xid|nvrm'` and `lspci -d 10de:`; a GPU that fell "
        "off the bus needs a reboot (and reseating/power checks if it recurs). If it was "
        "removed on purpose, accept that with `tfgpud baseline forget UUID` (all GPUs: "
        "`tfgpud baseline reset`)."
    )
    if not up:
        fix = "Bring the driver back first (see the driver finding beside this one). " + fix
    missing = [k for k in s.baseline if k.uuid not in seen]
    for k in missing:
        on_bus = k.pci_bus_id is not None and _norm_bus(k.pci_bus_id) in pci_addrs
        where = (
            "gone from the PCI bus too"
            if s.pci is not None and not on_bus
            else "PCI bus not read"
            if s.pci is None
            else "still on the PCI bus but not visible to the driver"
            if up
            else "still on the PCI bus, but the driver is not answering"
        )
        yield _find(
            "gpu-vanished",
            CRIT,
            k.uuid,
            f"GPU {k.name or '?'} {k.uuid} ({k.pci_bus_id or 'PCI address unknown'}) was here "
            f"before and is gone: {where}",
            [
                f"baseline: {k.uuid} {k.name or ''} at {k.pci_bus_id or '?'}",
                nvml_now,
                *_pci_lines(s),
            ],
            fix,
        )
    expected = s.expected_gpus or 0
    unnamed = expected - len(s.nvml.gpus if up else ()) - len(missing)
    if isinstance(c.expect.gpus, int) and unnamed > 0:
        yield _find(
            "gpu-vanished",
            CRIT,
            HOST,
            f"{unnamed} of the {expected} GPU(s) this machine should have ([expect] gpus) "
            "are not visible",
            [f"[expect] gpus = {c.expect.gpus}", nvml_now, *_pci_lines(s)],
            fix,
        )


def rule_baseline_state_error(s: Snapshot, c: Config) -> Iterable[Finding]:
    if not s.baseline_problems:
        return
    yield _find(
        "baseline-state-error",
        WARN,
        HOST,
        "The GPU baseline could not be read or written; GPUs that vanished before it was "
        "rebuilt are not reported",
        s.baseline_problems,
        "Compare `tfgpud baseline show` with the GPUs this machine should have and `tfgpud "
        "baseline forget` any it should not; then delete the `*.corrupt` file named above (it "
        "is kept for inspection). For a write error, check space and permissions of "
        "[daemon] state_dir.",
    )


def _norm_bus(addr: str) -> str:
    """NVML's "00000000:01:00.0" and sysfs's "0000:01:00.0" -> "01:00.0"."""
    return addr.lower().split(":", 1)[-1] if addr.count(":") >= 2 else addr.lower()


# A GPU that joined an existing baseline is reported (info) for this long after it joined.
APPEARED_WINDOW_SECONDS = 3600.0
# GPUs first seen within this much of the baseline's oldest GPU were part of the initial learning.
INITIAL_LEARNING_SECONDS = 60.0


def rule_gpu_appeared(s: Snapshot, c: Config) -> Iterable[Finding]:
    if not s.baseline:
        return
    known = {k.uuid: k for k in s.baseline}
    firsts = [k.first_seen for k in s.baseline if k.first_seen is not None]
    oldest = min(firsts) if firsts else None
    for g in _nvml_gpus(s):
        if g.lost:  # a lost GPU may not even tell its UUID: not "new"
            continue
        k = known.get(g.uuid)
        if k is None:
            joined = "is not in the baseline yet"
        elif (
            k.first_seen is not None
            and oldest is not None
            and k.first_seen - oldest > INITIAL_LEARNING_SECONDS
            and s.taken_at - k.first_seen <= APPEARED_WINDOW_SECONDS
        ):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(k.first_seen))
            joined = f"joined the baseline at {since}"
        else:
            continue
        others = [b.uuid for b in s.baseline if b.uuid != g.uuid]
        yield _find(
            "gpu-appeared",
            INFO,
            g.uuid,
            f"New GPU: {_gpu_label(g)} {joined}",
            [f"baseline before it: {len(others)} GPU(s): " + ", ".join(others)],
            "Nothing to do if it was installed on purpose: it is now expected on this machine "
            "(`tfgpud baseline forget UUID` removes it again).",
        )


def rule_gpu_xid_critical(s: Snapshot, c: Config) -> Iterable[Finding]:
    recent = [
        e
        for e in s.xid_events
        if e.xid in CRITICAL_XIDS and e.at >= s.taken_at - XID_WINDOW_SECONDS
    ]
    for uuid in sorted({e.uuid for e in recent}):
        mine = [e for e in recent if e.uuid == uuid]
        xids = sorted({e.xid for e in mine})
        fixes = []
        if 79 in xids:
            fixes.append("Xid 79: reboot; check power, cooling and seating if it recurs")
        if {48, 64, 95} & set(xids):
            fixes.append(
                "ECC: `nvidia-smi -q -d ECC,ROW_REMAPPER`; reset the GPU (`sudo nvidia-smi -r`) "
                "to remap rows; RMA if uncorrectable errors recur"
            )
        if 74 in xids:
            fixes.append("NVLink: `nvidia-smi nvlink -s`; reset, then check the bridge/board")
        if {119, 120} & set(xids):
            fixes.append("GSP: reset the GPU, update the driver")
        if 62 in xids:
            fixes.append("reset the GPU (`sudo nvidia-smi -r`) or reboot")
        yield _find(
            "gpu-xid-critical",
            CRIT,
            uuid,
            f"GPU {uuid} reported critical Xid "
            + ", ".join(f"{x} ({CRITICAL_XIDS[x]})" for x in xids)
            + " in the last hour",
            [f"Xid {e.xid} at unix time {e.at:.0f}: {CRITICAL_XIDS[e.xid]}" for e in mine[-10:]],
            "; ".join(fixes) + ". Drain the GPU's jobs first.",
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 120 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _process_users(s: Snapshot) -> dict[int, str]:
    users = dict(s.workloads.gpu_process_users) if s.workloads is not None else {}
    for p in s.tf_processes or ():
        if p.user:
            users.setdefault(p.pid, p.user)
    return users


def _without_growth(t: TfProcess) -> bool:
    """TensorFlow that will map nearly all GPU memory (as far as its environment tells)."""
    async_alloc = t.environment.get("TF_GPU_ALLOCATOR", "").strip() == "cuda_malloc_async"
    return t.allow_growth is False and not async_alloc


def rule_gpu_memory_pressure(s: Snapshot, c: Config) -> Iterable[Finding]:
    tf_by_pid = {p.pid: p for p in (s.tf_processes or ())}
    users = _process_users(s)
    ratio = c.memory.pressure_ratio
    for g in _nvml_gpus(s):
        since = s.pressure_since.get(g.uuid)
        if since is None or s.taken_at - since < c.memory.for_seconds:
            continue
        used, total = g.memory_used_bytes, g.memory_total_bytes
        if not used or not total or used / total < ratio:
            continue
        held = _duration(s.taken_at - since)
        ranked = sorted(g.processes, key=lambda p: (-(p.used_memory_bytes or 0), p.pid))
        ev = [f"memory used {_gib(used)} of {_gib(total)} ({used / total:.0%}) for {held}"]
        if not ranked:
            ev.append(
                "NVML lists no compute process on this GPU (they may run in another PID "
                "namespace, e.g. a container: `nvidia-smi` on the host shows them)"
            )
        for p in ranked[:5]:
            tags = [p.name or "?"]
            if p.pid in users:
                tags.append(f"user {users[p.pid]}")
            if p.pid in tf_by_pid:
                tags.append("TensorFlow")
            ev.append(f"pid {p.pid} ({', '.join(tags)}): {_gib(p.used_memory_bytes)}")
        if len(ranked) > 5:
            rest = sum(p.used_memory_bytes or 0 for p in ranked[5:])
            ev.append(f"{len(ranked) - 5} more process(es): {_gib(rest)}")
        here = [(tf_by_pid[p.pid], p.used_memory_bytes) for p in ranked if p.pid in tf_by_pid]
        greedy = [t for t, _ in here if _without_growth(t)]
        for t, mem in here:
            share = f"; it holds {mem / total:.0%} of this GPU" if mem else ""
            if _without_growth(t):
                ev.append(
                    f"pid {t.pid} is TensorFlow without memory growth (TF_FORCE_GPU_ALLOW_GROWTH "
                    f"is not true in its environment){share}: unless its code calls "
                    "set_memory_growth, TensorFlow maps nearly all memory of every visible GPU"
                )
            elif t.allow_growth is None:
                ev.append(
                    f"pid {t.pid} is TensorFlow; whether it uses memory growth is unknown "
                    f"(tfgpud may not read its environment){share}"
                )
        if greedy:
            pids = ", ".join(str(t.pid) for t in greedy)
            fix = (
                f"Restart TensorFlow pid(s) {pids} with TF_FORCE_GPU_ALLOW_GROWTH=true in their "
                "environment (or call tf.config.experimental.set_memory_growth(gpu, True) for "
                "each GPU before first use), and give each job only its GPUs with "
                "CUDA_VISIBLE_DEVICES."
            )
        else:
            fix = (
                "Free memory: stop or shrink the jobs listed (`nvidia-smi --query-compute-apps="
                "pid,used_memory --format=csv`); TensorFlow jobs should use "
                "TF_FORCE_GPU_ALLOW_GROWTH=true."
            )
        yield _find(
            "gpu-memory-pressure",
            WARN,
            g.uuid,
            f"{_gpu_label(g)} memory is {used / total:.0%} full for {held} "
            f"(threshold {ratio:.0%} for {c.memory.for_seconds:g} s)",
            ev,
            fix,
        )


_SITE_PACKAGES = re.compile(r"^(.*)/lib(?:64)?/python3[^/]*/(?:site|dist)-packages/")


def _python_of(p: TfProcess) -> str | None:
    """The interpreter to probe the job's env with: its argv[0] when absolute, else the
    ``bin/python3`` of the prefix its TensorFlow was loaded from, else its executable."""
    argv0 = p.cmdline.split(" ", 1)[0]
    if argv0.startswith("/"):
        return argv0
    m = _SITE_PACKAGES.match(p.tensorflow_library or "")
    if m:
        return f"{m.group(1)}/bin/python3"
    return p.python


def _env_of(p: TfProcess, s: Snapshot) -> TfProbeResult | None:
    """The configured env whose TensorFlow this process loaded (by site dir, then python)."""
    lib = p.tensorflow_library or ""
    for r in s.tf:
        if lib and any(lib.startswith(d.rstrip("/") + "/") for d in r.package_dirs):
            return r
    argv0 = p.cmdline.split(" ", 1)[0]
    return next((r for r in s.tf if r.python in (p.python, argv0)), None)


def _why_on_cpu(p: TfProcess, s: Snapshot, c: Config) -> tuple[list[str], str]:
    """Evidence on why the job computes on the CPU, and the fix."""
    py = _python_of(p) or "<its python>"
    doctor = f"`tfgpud doctor --python {py}`"
    ev: list[str] = []
    cvd = p.environment.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        visible = _cvd_visible(cvd, s)
        ev.append(f"its environment has CUDA_VISIBLE_DEVICES={cvd!r}: {visible} GPU(s) visible")
        if visible == 0:
            return ev, (
                f"Its CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU: restart pid {p.pid} with "
                "CUDA_VISIBLE_DEVICES unset or naming GPUs (e.g. 0 or a GPU UUID); check the "
                "launcher or scheduler that sets it."
            )
    r = _env_of(p, s)
    if r is None:
        names = ", ".join(f"`{x.env}`" for x in s.tf) or "none"
        ev.append(
            f"no [[tensorflow.envs]] entry matches its TensorFlow (configured: {names}), so "
            "no probe tells why"
        )
        return ev, (
            f"Run {doctor} to see why its TensorFlow cannot use the GPU, and add that env to "
            "[[tensorflow.envs]] so tfgpud watches it."
        )
    if not r.ok or not r.gpus:
        found = _tf_env_findings(r, s, c)
        codes = ", ".join(f.code for f in found) or "none"
        seen = f"sees {len(r.gpus)} GPU(s)" if r.ok else f"failed ({r.status.value})"
        ev.append(f"its env `{r.env}` ({r.python}): the probe {seen}; findings: {codes}")
        ev += [f"{f.code}: {f.summary}" for f in found[:3]]
        return ev, (
            f"Fix env `{r.env}` first (see {codes} for `{r.env}`; {doctor} explains), then "
            f"restart pid {p.pid}."
        )
    ev.append(
        f"its env `{r.env}` ({r.python}): the probe sees {len(r.gpus)} GPU(s), so the install "
        "can use them; the job itself keeps off the GPU (tf.device('/CPU:0') or "
        "tf.config.set_visible_devices in its code, CUDA_VISIBLE_DEVICES from its launcher), "
        "or it has not reached its GPU work yet"
    )
    return ev, (
        f"Check the job's code and launcher: `tr '\\0' '\\n' < /proc/{p.pid}/environ | grep "
        f"CUDA`; {doctor} shows what TensorFlow in that env sees."
    )


def rule_tf_job_on_cpu(s: Snapshot, c: Config) -> Iterable[Finding]:
    if not c.workloads.enabled or not s.tf_processes:
        return
    usable = _usable_gpus(s)
    if not usable:
        return
    for p in s.tf_processes:
        if p.placement != "cpu":
            continue
        # Seen on the CPU since; a record without it (older collectors) falls back to its start.
        since = p.cpu_since if p.cpu_since is not None else p.started_at
        if since is None or s.taken_at - since < c.workloads.job_on_cpu_seconds:
            continue
        on_cpu = _duration(s.taken_at - since)
        running = (
            f" (running for {_duration(s.taken_at - p.started_at)})"
            if p.started_at is not None
            else ""
        )
        why, fix = _why_on_cpu(p, s, c)
        yield _find(
            "tf-job-on-cpu",
            WARN,
            str(p.pid),
            f"TensorFlow job pid {p.pid} (user {p.user or '?'}) has computed on the CPU for "
            f"{on_cpu} while {len(usable)} GPU(s) are usable",
            [
                f"pid {p.pid}, user {p.user or '?'}: on the CPU for {on_cpu}{running}",
                f"command: {p.cmdline[:200] or '?'}",
                f"TensorFlow: {p.tensorflow_library or '?'} (executable {p.python or '?'})",
                f"{len(usable)} usable GPU(s), none held by this process: "
                + ", ".join(_gpu_label(g) for g in usable[:4]),
                *why,
            ],
            fix,
        )


# --- TensorFlow, per env --------------------------------------------------------------------------


def _env_cfg(c: Config, name: str) -> TfEnvConfig | None:
    return next((e for e in c.tensorflow.envs if e.name == name), None)


def _tf_name(r: TfProbeResult) -> str:
    return f"TensorFlow {r.tf_version or '?'} in env `{r.env}`"


def _pip(r: TfProbeResult, spec: str) -> str:
    return f"{r.python} -m pip install '{spec}'"


def _and_cuda(r: TfProbeResult) -> str:
    return _pip(r, f"tensorflow[and-cuda]=={r.tf_version or compat.LATEST_TF}")


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes")


def _cvd_entries(value: str) -> list[str]:
    return [v.strip() for v in value.split(",")] if value.strip() else []


def _cvd_visible(value: str, s: Snapshot) -> int:
    """How many GPUs CUDA_VISIBLE_DEVICES=value leaves visible (CUDA stops at the first bad one).

    A ``MIG-`` entry names a MIG instance, whose UUID NVML's GPU list does not carry: it is
    taken as visible (tfgpud does not enumerate MIG instances), never as hiding the GPUs.
    """
    n = gpu_count_expected(s)
    uuids = [g.uuid for g in _nvml_gpus(s)]
    count = 0
    for entry in _cvd_entries(value):
        index_ok = entry.isdigit() and (int(entry) < n or not uuids)
        uuid_ok = entry.startswith("GPU-") and (
            not uuids or any(u.startswith(entry) for u in uuids)
        )
        mig_ok = entry.startswith("MIG-")
        if index_ok or uuid_ok or mig_ok:
            count += 1
        else:
            break
    return count


def _expected_visible(r: TfProbeResult, s: Snapshot) -> int:
    n = gpu_count_expected(s)
    cvd = r.environment.get("CUDA_VISIBLE_DEVICES")
    return n if cvd is None else min(n, _cvd_visible(cvd, s))


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
    fix = _and_cuda(r)
    if pkg:
        fix = f"{r.python} -m pip uninstall -y {pkg} && {fix}"
    return _find(
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
    if cvd is None or _cvd_visible(cvd, s) > 0:
        return None
    cfg = _env_cfg(c, r.env)
    origin = (
        f"set in the [[tensorflow.envs]] `{r.env}` environment table"
        if cfg is not None and "CUDA_VISIBLE_DEVICES" in cfg.environment
        else "set inside the interpreter (sitecustomize, a .pth file or the env's activation)"
    )
    return _find(
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
    return _find(
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
        _and_cuda(r),
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
    return _find(
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


def _driver_upgrade(need: str | None) -> str:
    """How to get a driver ≥ ``need``, without naming a short-lived branch the archive lacks."""
    at_least = f" (≥ {need})" if need else ""
    return (
        f"install your distribution's current production NVIDIA driver branch{at_least}, then "
        "reboot: Ubuntu `sudo ubuntu-drivers install` (`ubuntu-drivers list` shows the "
        "branches and versions), elsewhere the `nvidia-driver` package of the distribution or "
        "of NVIDIA's CUDA repository"
    )


def _older_tf(
    r: TfProbeResult, why: str, *, cuda_major: int, max_cuda: tuple[int, int] | None = None
) -> str:
    """The "Or keep the driver and use TF X" sentence, naming a release for the env's Python."""
    b = compat.newest_tf_for(r.python_version, cuda_major=cuda_major, max_cuda=max_cuda)
    if b is not None:
        return (
            f" Or keep the driver and use a TensorFlow {why}: "
            f"`{_pip(r, f'tensorflow[and-cuda]=={b.tf}.*')}` (CUDA {b.cuda})."
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
        + _driver_upgrade(need)
        + ". Minor-version compatibility does not cover PTX JIT."
        + _older_tf(
            r,
            f"built with CUDA ≤ {drv_s}, whose PTX this driver can compile",
            cuda_major=drv[0],
            max_cuda=drv,
        )
        + f" On a data-centre GPU the CUDA forward-compatibility package (cuda-compat-"
        f"{tf_cuda[0]}-{tf_cuda[1]}) is a third way."
    )
    return _find(
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
    fix = f"Upgrade the driver: {_driver_upgrade(ga)}."
    if minor_min and jit:
        fix += (
            f" Not {minor_min}: minor-version compatibility does not cover the PTX that "
            + ", ".join(lbl for lbl, _, _ in jit[:2])
            + " need(s)."
        )
    elif minor_min:
        fix += f" With minor-version compatibility any driver ≥ {minor_min} also works."
    fix += _older_tf(r, f"built for CUDA {drv[0]}.x", cuda_major=drv[0])
    return _find(
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
    return _find(
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
    lib_ver = _lib_version(lib.path if lib is not None else None, "libcuda")
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
    return _find(
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
        (_gpu_label(g), g.compute_capability) for g in _nvml_gpus(s) if g.compute_capability
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
    return _find(
        "tf-compute-capability-unsupported",
        CRIT,
        r.env,
        f"{_tf_name(r)} has kernels for compute capability {_targets(sm, ptx)} only; "
        f"{len(bad)} GPU(s) have {cc_s}",
        [
            *(f"{label}: compute capability {a}.{b}" for label, (a, b) in bad),
            *_logs(r, "Ignoring visible gpu"),
        ],
        _older_cc_fix(r, ccs[0], cc_s),
    )


def _older_cc_fix(r: TfProbeResult, cc: tuple[int, int], cc_s: str) -> str:
    """Use an older (CUDA 11) TF whose kernels reach further back, if one fits the Python."""
    source = f"build TensorFlow from source with TF_CUDA_COMPUTE_CAPABILITIES={cc_s}"
    b = compat.newest_tf_for(r.python_version, cuda_major=11)
    if b is not None:
        return (
            f"Use a TensorFlow build that includes sm_{cc[0]}{cc[1]} (CUDA 11 builds such as "
            f"`{_pip(r, f'tensorflow[and-cuda]=={b.tf}.*')}` support ≥ 3.5), or {source}."
        )
    oldest = compat.newest_tf_for(None, cuda_major=11)
    py = compat.python_range(r.python_version)
    span = f" (newest: {oldest.tf}, Python {oldest.python})" if oldest is not None else ""
    return (
        f"The TensorFlow releases with sm_{cc[0]}{cc[1]} kernels (CUDA 11 builds{span}) do not "
        f"support this env's Python {py}: create an env with an older Python for one, or "
        f"{source}."
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
    return _lib_version(lib.path if lib is not None else None, "libcudnn")


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
    return _find(
        "tf-cudnn-mismatch",
        CRIT,
        r.env,
        f"{_tf_name(r)} was built with cuDNN {r.build_info.get('cudnn_version', '?')} (tested "
        f"with {need_s}) but cuDNN {have_s or '?'} is installed",
        [f"cuDNN installed: {have_s or '?'}", *lines],
        f"{_and_cuda(r)}  (installs the matching nvidia-cudnn wheel; or "
        f"`{_pip(r, f'{_cudnn_wheel(r)}>={need_s},<{(need or (9,))[0] + 1}')}`)",
    )


def cause_device_permission(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    denied = {node: why for node, why in r.device_access.items() if why != "ok"}
    if not denied:
        return None
    cfg = _env_cfg(c, r.env)
    who = cfg.run_as if cfg is not None and cfg.run_as else None
    user = who or "the probe's user"
    who = who or "<user>"
    return _find(
        "tf-device-permission",
        CRIT,
        r.env,
        f"TensorFlow in env `{r.env}` cannot open {_join_names(sorted(denied))} as {user}",
        [*(f"{node}: {why}" for node, why in sorted(denied.items())), *_logs(r, "cuInit")],
        "`ls -l /dev/nvidia*` should show crw-rw-rw- (the driver default); if "
        "NVreg_DeviceFileMode/NVreg_DeviceFileGID restrict them, add the user to that group "
        f"(`sudo usermod -aG <group> {who}`).",
    )


CAUSES = (
    cause_cpu_only_build,
    cause_gpus_hidden_by_env,
    cause_cuda_libs_missing,
    cause_libcuda_missing,
    cause_driver_too_old,
    cause_driver_dso_mismatch,
    cause_compute_capability_unsupported,
    cause_cudnn_mismatch,
    cause_device_permission,
)


def _probe_refused(r: TfProbeResult, c: Config) -> Finding:
    """``tf-probe-refused``: the env was not probed, for safety or because run_as is wrong."""
    cfg = _env_cfg(c, r.env)
    run_as = cfg.run_as if cfg is not None else None
    users = [w for w in r.refused_writers if w != "everyone" and not w.startswith("group:")]
    prefix = os.path.dirname(os.path.dirname(r.python)) or r.python
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
        fix = (
            f'Add `run_as = "{users[0]}"` to the [[tensorflow.envs]] entry `{r.env}` so the '
            f"probe runs as the env's owner, or make the env root's: `sudo chown -R root: "
            f"{prefix} && sudo chmod -R go-w {prefix}`."
        )
    else:
        fix = (
            f"Only root and one user may write the env's code: remove the other writers "
            f"(`sudo chmod -R go-w {prefix}`; `sudo chown -R <owner>: {prefix}`), then set "
            f'`run_as = "<owner>"` in the [[tensorflow.envs]] entry `{r.env}`.'
        )
    return _find(
        "tf-probe-refused",
        WARN,
        r.env,
        f"Env `{r.env}` was not probed: {r.error}",
        [*r.log_lines],
        fix,
    )


def _tf_failed_probe(r: TfProbeResult, s: Snapshot, c: Config) -> Finding | None:
    pkg_fix = _pip(
        r,
        f"tensorflow[and-cuda]=={compat.LATEST_TF}"
        if gpus_exist(s)
        else f"tensorflow=={compat.LATEST_TF}",
    )
    venv = os.path.dirname(os.path.dirname(r.python)) or "<dir>"
    if r.status is ProbeStatus.MISSING_INTERPRETER:
        return _find(
            "tf-import-failed",
            CRIT,
            r.env,
            f"The interpreter of env `{r.env}` does not exist: {r.python}",
            [r.error or "", *r.log_lines],
            f"Fix `python` in the [[tensorflow.envs]] entry `{r.env}`, or create the env: "
            f"`python3 -m venv {venv} && {pkg_fix}`.",
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
                _pip(r, f"tensorflow[and-cuda]=={r.packages['tensorflow']}") + " --force-reinstall"
            )
        return _find(
            "tf-import-failed",
            CRIT,
            r.env,
            summary,
            [r.error or "", f"python {r.python_version or '?'}", *r.traceback[-6:], *r.log_lines],
            fix,
        )
    if r.status is ProbeStatus.TIMEOUT:
        return _find(
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
                f"Run `tfgpud doctor --python {r.python}` to see the whole error; reinstall "
                f"with `{_and_cuda(r)} --force-reinstall`."
            )
        what = "crashed" if r.status is ProbeStatus.CRASHED else "failed"
        return _find(
            "tf-import-crashed",
            CRIT,
            r.env,
            f"The TensorFlow probe of env `{r.env}` {what}: {r.error}",
            [f"exit status {r.returncode}", *r.log_lines],
            fix,
        )
    return None


def _tf_env_findings(r: TfProbeResult, s: Snapshot, c: Config) -> list[Finding]:
    failed = _tf_failed_probe(r, s, c)
    if failed is not None:
        return [failed]
    if not r.ok:
        return []
    out: list[Finding] = []
    seen = len(r.gpus)
    exist = gpus_exist(s)
    expected = _expected_visible(r, s)
    fallback = exist and seen == 0 and gpu_count_expected(s) > 0
    partial = not fallback and s.nvml is not None and s.nvml.up and 0 < seen < expected
    causes = (
        [f for f in (rule(r, s, c) for rule in CAUSES) if f is not None]
        if (fallback or partial)
        else []
    )
    # A cuDNN mismatch breaks the first convolution even when GPUs are listed.
    if not causes:
        cudnn = cause_cudnn_mismatch(r, s, c)
        if cudnn is not None:
            out.append(cudnn)
    if fallback:
        total = gpu_count_expected(s)
        named = ", ".join(f.code for f in causes)
        ev = [
            f"GPUs on this machine: {total} (PCI {len(s.pci.gpus) if s.pci else '?'}, NVML "
            f"{len(_nvml_gpus(s)) if s.nvml and s.nvml.up else 'down'}, "
            f"baseline {len(s.baseline)})",
            f"TensorFlow lists {seen} GPU(s); "
            f"is_cuda_build={r.build_info.get('is_cuda_build', '?')}",
            *r.log_lines[:10],
        ]
        if not causes:
            ev.append("no specific cause found by the probe")
        out.append(
            _find(
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
        )
    if partial:
        nv = _usable_gpus(s)
        out.append(
            _find(
                "tf-partial-visibility",
                CRIT,
                r.env,
                f"{_tf_name(r)} sees {seen} of the {expected} GPU(s) NVML reports",
                [
                    *(f"NVML: {_gpu_label(g)} cc {g.compute_capability_str or '?'}" for g in nv),
                    *(f"TF: {g.name} {g.device_name or ''}" for g in r.gpus),
                    f"CUDA_VISIBLE_DEVICES={r.environment.get('CUDA_VISIBLE_DEVICES', '(unset)')}",
                    *r.log_lines[:10],
                ],
                (f"See {', '.join(f.code for f in causes)}." if causes else "")
                + " Check `nvidia-smi -q -d COMPUTE` (compute mode, MIG) and the log lines.",
            )
        )
    out.extend(causes)
    smoke = _smoke_failed(r, s)
    if smoke is not None:
        out.append(smoke)
    # PTX from a newer CUDA than the driver's fails at the first kernel, even when TF lists
    # the GPU; with a new enough driver PTX JIT only costs start-up time (a warning).
    ptx_old = _ptx_driver_too_old(r, s)
    if ptx_old is None:
        out.extend(_ptx_jit_only(r, s))
    elif all(f.key != ptx_old.key for f in out):
        out.append(ptx_old)
    return out


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
            f"{cuda_s}: {_driver_upgrade(need)} (see tf-driver-too-old / tf-ptx-jit-only)."
        )
    elif any(k in low for k in ("out of memory", "out_of_memory", "oom ", "resourceexhausted")):
        fix = (
            "GPU memory is taken: see which processes hold it (`nvidia-smi --query-compute-apps="
            "pid,used_memory --format=csv`); TensorFlow jobs should run with "
            "TF_FORCE_GPU_ALLOW_GROWTH=true and only their GPUs in CUDA_VISIBLE_DEVICES."
        )
    elif any(k in low for k in ("cudnn", "dnn library", "cublas", "cusolver", "cufft")):
        fix = (
            f"The CUDA libraries in the env do not match this build: `{_and_cuda(r)} "
            "--force-reinstall` (and unset LD_LIBRARY_PATH entries that point at another CUDA)."
        )
    else:
        fix = (
            f"Run `tfgpud doctor --python {r.python}` and check `nvidia-smi` and "
            "`journalctl -k | grep -i xid` for a driver or GPU fault."
        )
    gpus = ", ".join(f"{g.name} {g.device_name or ''}".strip() for g in r.gpus) or "none listed"
    return _find(
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


def _ptx_jit_only(r: TfProbeResult, s: Snapshot) -> list[Finding]:
    sm, ptx = compat.compute_targets(r.build_info.get("cuda_compute_capabilities"))
    if not ptx:
        return []
    jit = [(label, cc) for label, cc in _gpu_ccs(r, s) if _runs_on(cc, sm, ptx) == "ptx"]
    if not jit:
        return []
    ccs = sorted({cc for _, cc in jit})
    return [
        _find(
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
    ]


def rule_tensorflow(s: Snapshot, c: Config) -> Iterable[Finding]:
    for r in s.tf:
        yield from _tf_env_findings(r, s, c)


RULES: tuple[Rule, ...] = (
    rule_no_nvidia_gpu,
    rule_nvml_library_missing,
    rule_driver_not_loaded,
    rule_driver_library_mismatch,
    rule_nouveau_bound,
    rule_device_nodes_missing,
    rule_nvml_no_permission,
    rule_gpu_lost,
    rule_gpu_vanished,
    rule_gpu_appeared,
    rule_baseline_state_error,
    rule_gpu_xid_critical,
    rule_gpu_memory_pressure,
    rule_tf_job_on_cpu,
    rule_tensorflow,
)


def diagnose(snapshot: Snapshot, config: Config) -> tuple[Finding, ...]:
    """All findings for ``snapshot``: most severe first, one per (code, subject). Pure."""
    found: dict[tuple[str, str], Finding] = {}
    for rule in RULES:
        for f in rule(snapshot, config):
            found.setdefault(f.key, f)
    return tuple(sorted(found.values(), key=lambda f: (-f.severity.rank, f.code, f.subject)))


def worst_severity(findings: Iterable[Finding]) -> Severity | None:
    """The highest severity among ``findings``; None when there are none."""
    return max((f.severity for f in findings), key=lambda sev: sev.rank, default=None)


FALLBACK_CODES = frozenset({"tf-cpu-fallback", "tf-partial-visibility"})


def cpu_fallback_envs(findings: Iterable[Finding]) -> frozenset[str]:
    """Envs where GPUs exist but TensorFlow sees fewer (``tf-cpu-fallback`` or
    ``tf-partial-visibility``): the ``tfgpud_tf_cpu_fallback`` metric."""
    return frozenset(f.subject for f in findings if f.code in FALLBACK_CODES)
