"""NVIDIA GPUs on the PCI bus, the kernel driver bound to each, and the driver's host traces.

Reads only sysfs/procfs/devfs; the three roots are parameters so tests use fixture trees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tfgpud.listing import DirectoryListing
from tfgpud.model import PciGpu, PciReading

NVIDIA_VENDOR = "0x10de"
GPU_CLASSES = ("0x0300", "0x0302")  # VGA-compatible and 3D controllers


def _read(path: str) -> str | None:
    # os calls on plain strings, not pathlib or open(): this runs every poll.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 1 << 16).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


@dataclass
class PciCache:
    """What one poll can hand the next (the daemon keeps one; doctor reads everything afresh).

    ``identities``: PCI address -> (device id, class) of an NVIDIA GPU there, or None for any
    other device; vendor and class do not change while a device stays listed, so only new
    addresses are read (a server lists hundreds of devices). ``/dev`` is listed again only when
    it changed (:mod:`tfgpud.listing`); the kernel release is read once.
    """

    identities: dict[str, tuple[str, str] | None] = field(default_factory=dict)
    dev: DirectoryListing = field(default_factory=DirectoryListing)
    osrelease: str | None = None


def _identity(dev: str) -> tuple[str, str] | None:
    if _read(f"{dev}/vendor") != NVIDIA_VENDOR:
        return None
    cls = _read(f"{dev}/class") or ""
    if not cls.startswith(GPU_CLASSES):
        return None
    return _read(f"{dev}/device") or "", cls


def _gpu(devices: str, address: str, known: dict[str, tuple[str, str] | None]) -> PciGpu | None:
    dev = f"{devices}/{address}"
    if address not in known:
        known[address] = _identity(dev)
    ident = known[address]
    if ident is None:
        return None
    try:
        driver: str | None = os.path.basename(os.readlink(f"{dev}/driver"))
    except OSError:
        driver = None  # the binding can change at any time: read every poll
    return PciGpu(address=address, device_id=ident[0], class_code=ident[1], driver=driver)


def collect_pci(
    sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
    dev_root: Path = Path("/dev"),
    cache: PciCache | None = None,
) -> PciReading:
    """Read what the host says about NVIDIA hardware. Missing paths mean "not there".

    ``cache`` (kept by the caller between polls, see :class:`PciCache`) spares re-reading what
    cannot have changed; without one everything is read.
    """
    sys_, proc, dev = str(sys_root), str(proc_root), str(dev_root)
    cache = PciCache() if cache is None else cache
    devices = f"{sys_}/bus/pci/devices"
    try:
        addresses = sorted(os.listdir(devices))
    except OSError:
        addresses = []
    known = cache.identities
    for gone in known.keys() - set(addresses):
        del known[gone]
    gpus = tuple(g for g in (_gpu(devices, a, known) for a in addresses) if g is not None)
    proc_version = _read(f"{proc}/driver/nvidia/version")
    if cache.osrelease is None:
        cache.osrelease = _read(f"{proc}/sys/kernel/osrelease") or ""
    return PciReading(
        gpus=gpus,
        nvidia_module_version=_read(f"{sys_}/module/nvidia/version"),
        proc_driver_version=proc_version.splitlines()[0] if proc_version else None,
        nouveau_loaded=os.path.exists(f"{sys_}/module/nouveau"),
        device_nodes=tuple(n for n in cache.dev.names(dev) if n.startswith("nvidia")),
        wsl="microsoft" in cache.osrelease.lower() or os.path.exists(f"{dev}/dxg"),
    )
