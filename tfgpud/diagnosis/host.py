"""Rules about the host: the PCI bus, the kernel module, device nodes and NVML itself."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tfgpud.config import Config
from tfgpud.diagnosis.readings import (
    CRIT,
    HOST,
    INFO,
    finding,
    gpu_label,
    gpus_exist,
    lib_version,
    nvml_gpus,
    pci_lines,
)
from tfgpud.model import (
    Finding,
    Snapshot,
)


def rule_no_nvidia_gpu(s: Snapshot, c: Config) -> Iterable[Finding]:
    if gpus_exist(s):
        return
    ev = pci_lines(s)
    if s.nvml is not None:
        ev.append("NVML: " + ("up, 0 GPUs" if s.nvml.up else f"not available ({s.nvml.error})"))
    ev.append("baseline: no GPU ever seen here; [expect] gpus: " + str(c.expect.gpus))
    yield finding(
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
    yield finding(
        "nvml-library-missing",
        CRIT,
        HOST,
        f"The NVIDIA driver's libnvidia-ml.so.1 is not installed, but {where}",
        [
            *pci_lines(s),
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
    ev = ["NVML init: DRIVER_NOT_LOADED", *pci_lines(s)]
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
    yield finding(
        "driver-not-loaded",
        CRIT,
        HOST,
        "The NVIDIA kernel module is not loaded: no process can use the GPUs",
        ev,
        "`sudo modprobe nvidia`; if that says the module is not found, it was not built for "
        "the running kernel (`uname -r`, e.g. after a kernel upgrade): `sudo dkms autoinstall` "
        "or reinstall the driver package, then reboot.",
    )


def rule_driver_library_mismatch(s: Snapshot, c: Config) -> Iterable[Finding]:
    if s.nvml is None:
        return
    module = s.pci.nvidia_module_version if s.pci is not None else None
    library = lib_version(s.nvml.library_path, "libnvidia-ml")
    mismatch = s.nvml.error == "LIB_RM_VERSION_MISMATCH" or (
        module is not None and library is not None and module != library
    )
    if not mismatch:
        return
    if s.nvml.library_stale:
        yield finding(
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
    yield finding(
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
    yield finding(
        "nouveau-bound",
        CRIT,
        HOST,
        "The open-source nouveau driver owns the GPU(s); CUDA needs the NVIDIA driver",
        [*pci_lines(s), f"nouveau module loaded: {'yes' if s.pci.nouveau_loaded else 'no'}"],
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
    yield finding(
        "device-nodes-missing",
        CRIT,
        HOST,
        f"The NVIDIA module is loaded but device nodes are missing: {', '.join(missing)}",
        [
            *pci_lines(s),
            f"nvidia module version: {pci.nvidia_module_version or '?'}",
            "/dev nodes present: " + (" ".join(pci.device_nodes) or "none"),
        ],
        "On the host: `sudo nvidia-modprobe -c 0 -u` (or run `sudo nvidia-smi` once) to create "
        "them; in a container: start it with `--gpus all` (NVIDIA Container Toolkit).",
    )


def rule_nvml_no_permission(s: Snapshot, c: Config) -> Iterable[Finding]:
    nodes = " ".join(s.pci.device_nodes) if s.pci is not None else "?"
    for g in nvml_gpus(s):
        if g.error == "NO_PERMISSION":
            yield finding(
                "nvml-no-permission",
                CRIT,
                g.uuid,
                f"NVML refused access to {gpu_label(g)} (NO_PERMISSION); the other GPUs answer",
                [f"NVML index {g.index}: NO_PERMISSION", f"/dev nodes present: {nodes}"],
                f"Check `ls -l /dev/nvidia{g.index}` and the service's DeviceAllow=/cgroup "
                "device rules: tfgpud's user must be able to open every /dev/nvidiaN node.",
            )
    if s.nvml is None or s.nvml.error != "NO_PERMISSION":
        return
    yield finding(
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


# The NVML errors for the whole driver that a rule above names; nvml-unusable takes the rest.
NAMED_NVML_ERRORS = frozenset(
    {"LIBRARY_NOT_FOUND", "DRIVER_NOT_LOADED", "LIB_RM_VERSION_MISMATCH", "NO_PERMISSION"}
)
# A GPU in a state the driver cannot work with: a reset or a reboot clears it.
_GPU_STATE_ERRORS = frozenset(
    {"UNKNOWN", "DEVICE_COUNT_FAILED", "GPU_IS_LOST", "RESET_REQUIRED", "TIMEOUT"}
)
_HELD_ERRORS = frozenset({"IN_USE", "INSUFFICIENT_RESOURCES"})


def rule_nvml_unusable(s: Snapshot, c: Config) -> Iterable[Finding]:
    """NVML is down for the whole driver with an error no other rule names, and GPUs exist:
    the one driver finding the vanished GPUs and the envs' fallbacks follow from."""
    if s.nvml is None or s.nvml.up or s.nvml.error in NAMED_NVML_ERRORS or not gpus_exist(s):
        return
    error = s.nvml.error or "no error name"
    pci = s.pci
    failed = (
        "NVML initialised, but counting the GPUs failed (DEVICE_COUNT_FAILED)"
        if error == "DEVICE_COUNT_FAILED"
        else f"NVML fails for the whole driver: {error}"
        + (f" ({s.nvml.error_code})" if s.nvml.error_code is not None else "")
    )
    ev = [failed, *pci_lines(s)]
    if pci is not None:
        ev += [
            f"/sys/module/nvidia/version: {pci.nvidia_module_version or 'absent'}",
            f"/proc/driver/nvidia/version: {pci.proc_driver_version or 'absent'}",
            "/dev nodes present: " + (" ".join(pci.device_nodes) or "none"),
        ]
    yield finding(
        "nvml-unusable",
        CRIT,
        HOST,
        f"The NVIDIA driver does not answer NVML ({error}): no program can use the GPUs",
        ev,
        _unusable_fix(error, s),
    )


def _unusable_fix(error: str, s: Snapshot) -> str:
    """What to do about NVML failing with ``error``; says what tfgpud cannot tell."""
    first = (
        "Run `nvidia-smi`: it goes through NVML too and should fail the same way. The "
        "driver's own reason is in the kernel log: `sudo dmesg | grep -iE 'NVRM|Xid'`. "
    )
    addresses = " ".join(g.address for g in s.pci.gpus) if s.pci is not None else ""
    if error in _GPU_STATE_ERRORS:
        which = f" (this machine's: {addresses})" if addresses else ""
        count = (
            "tfgpud logged NVML's error for the count when it first failed: `journalctl -u "
            "tfgpud -g nvmlDeviceGetCount`. "
            if error == "DEVICE_COUNT_FAILED"
            else ""
        )
        return (
            first
            + count
            + "Often one GPU is in a state the driver cannot work with: an Xid line names its "
            "PCI address (tfgpud cannot tell which GPU; NVML gives it only the error). If "
            "`nvidia-smi` still answers for the others, reset that one once no process uses it "
            "(`sudo fuser -v /dev/nvidia*` lists them): `sudo nvidia-smi -r -i ADDRESS`, with "
            f"ADDRESS its PCI address{which}. If `nvidia-smi` fails as a whole, or the reset "
            "does, reboot."
        )
    if error == "CORRUPTED_INFOROM":
        return (
            first + "A GPU's InfoROM (its on-board configuration memory) is corrupted: that "
            "board needs service (its vendor: an RMA, or an InfoROM update they supply); drain "
            "the machine. `nvidia-smi` ('infoROM is corrupted at gpu ...') or the kernel log "
            "names the board; tfgpud cannot."
        )
    if error in _HELD_ERRORS:
        return (
            first + "Something else holds the driver or a GPU (a reset, a MIG or mode change in "
            "progress, or a process using up its resources): `sudo fuser -v /dev/nvidia*` lists "
            "the processes that have the GPUs open. Wait for it to finish or stop that process; "
            "tfgpud cannot tell which one it is."
        )
    return (
        first + f"tfgpud has no specific advice for NVML's error {error}: look it up in "
        "NVML's list of return codes (nvml.h, the NVML API reference). If the kernel log shows "
        "Xid errors or nothing explains it, reboot; if it persists after a reboot, reinstall the "
        "driver for the running kernel."
    )


# The rules whose findings explain a driver that does not answer (what a vanished GPU's fix
# points at, when one of them is present), in the order diagnose() runs them.
DRIVER_RULES = (
    rule_nvml_library_missing,
    rule_driver_not_loaded,
    rule_driver_library_mismatch,
    rule_nouveau_bound,
    rule_device_nodes_missing,
    rule_nvml_no_permission,
    rule_nvml_unusable,
)
