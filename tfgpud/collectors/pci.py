"""NVIDIA GPUs on the PCI bus, the kernel driver bound to each, and the driver's host traces.

Reads only sysfs/procfs/devfs; the three roots are parameters so tests use fixture trees.
"""

from __future__ import annotations

import os
from pathlib import Path

from tfgpud.model import PciGpu, PciReading

NVIDIA_VENDOR = "0x10de"
GPU_CLASSES = ("0x0300", "0x0302")  # VGA-compatible and 3D controllers


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


# PCI address -> (device id, class) of an NVIDIA GPU there, or None for any other device
Identities = dict[str, tuple[str, str] | None]


def _identity(dev: Path) -> tuple[str, str] | None:
    if _read(dev / "vendor") != NVIDIA_VENDOR:
        return None
    cls = _read(dev / "class") or ""
    if not cls.startswith(GPU_CLASSES):
        return None
    return _read(dev / "device") or "", cls


def _gpu(dev: Path, known: Identities) -> PciGpu | None:
    if dev.name not in known:
        known[dev.name] = _identity(dev)
    ident = known[dev.name]
    if ident is None:
        return None
    try:
        driver: str | None = os.path.basename(os.readlink(dev / "driver"))
    except OSError:
        driver = None  # the binding can change at any time: read every poll
    return PciGpu(address=dev.name, device_id=ident[0], class_code=ident[1], driver=driver)


def collect_pci(
    sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
    dev_root: Path = Path("/dev"),
    known: Identities | None = None,
) -> PciReading:
    """Read what the host says about NVIDIA hardware. Missing paths mean "not there".

    ``known`` (kept by the caller between polls) holds what each PCI address is: vendor and
    class do not change while a device stays listed, so only new addresses are read (a server
    lists hundreds of devices); addresses no longer listed are dropped from it.
    """
    devices = sys_root / "bus" / "pci" / "devices"
    try:
        entries = sorted(devices.iterdir())
    except OSError:
        entries = []
    known = {} if known is None else known
    listed = {d.name for d in entries}
    for gone in known.keys() - listed:
        del known[gone]
    gpus = tuple(g for g in (_gpu(d, known) for d in entries) if g is not None)
    proc_version = _read(proc_root / "driver" / "nvidia" / "version")
    try:
        nodes = tuple(sorted(n for n in os.listdir(dev_root) if n.startswith("nvidia")))
    except OSError:
        nodes = ()
    osrelease = _read(proc_root / "sys" / "kernel" / "osrelease") or ""
    return PciReading(
        gpus=gpus,
        nvidia_module_version=_read(sys_root / "module" / "nvidia" / "version"),
        proc_driver_version=proc_version.splitlines()[0] if proc_version else None,
        nouveau_loaded=(sys_root / "module" / "nouveau").exists(),
        device_nodes=nodes,
        wsl="microsoft" in osrelease.lower() or (dev_root / "dxg").exists(),
    )
