from __future__ import annotations

import os
import shutil
from pathlib import Path

from tfgpud.collectors.pci import PciCache, collect_pci


def _device(root: Path, addr: str, vendor: str, cls: str, device: str, driver: str | None) -> None:
    dev = root / "sys/bus/pci/devices" / addr
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(vendor + "\n")
    (dev / "class").write_text(cls + "\n")
    (dev / "device").write_text(device + "\n")
    if driver:
        drv = root / "sys/bus/pci/drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(drv, dev), dev / "driver")


def test_reads_gpus_drivers_module_and_nodes(tmp_path: Path) -> None:
    _device(tmp_path, "0000:01:00.0", "0x10de", "0x030000", "0x2204", "nvidia")
    _device(tmp_path, "0000:41:00.0", "0x10de", "0x030200", "0x2330", "nouveau")
    _device(tmp_path, "0000:42:00.0", "0x10de", "0x030200", "0x2330", None)
    _device(tmp_path, "0000:01:00.1", "0x10de", "0x040300", "0x1aef", "snd_hda_intel")  # audio
    _device(tmp_path, "0000:00:02.0", "0x8086", "0x030000", "0x9bc5", "i915")  # Intel iGPU
    (tmp_path / "sys/module/nvidia").mkdir(parents=True)
    (tmp_path / "sys/module/nvidia/version").write_text("550.54.15\n")
    (tmp_path / "sys/module/nouveau").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15\nGCC version: 12\n"
    )
    (tmp_path / "dev").mkdir()
    for node in ("nvidia0", "nvidiactl", "nvidia-uvm", "null"):
        (tmp_path / "dev" / node).touch()

    r = collect_pci(tmp_path / "sys", tmp_path / "proc", tmp_path / "dev")

    assert [(g.address, g.driver, g.device_id) for g in r.gpus] == [
        ("0000:01:00.0", "nvidia", "0x2204"),
        ("0000:41:00.0", "nouveau", "0x2330"),
        ("0000:42:00.0", None, "0x2330"),
    ]
    assert r.nvidia_module_version == "550.54.15"
    assert r.proc_driver_version is not None and r.proc_driver_version.endswith("550.54.15")
    assert r.nouveau_loaded
    assert r.device_nodes == ("nvidia-uvm", "nvidia0", "nvidiactl")
    assert not r.wsl


def test_empty_or_missing_roots_mean_nothing_there(tmp_path: Path) -> None:
    r = collect_pci(tmp_path / "nope", tmp_path / "nope", tmp_path / "nope")
    assert r.gpus == ()
    assert r.nvidia_module_version is None
    assert r.device_nodes == ()
    assert not r.nouveau_loaded


def test_wsl_detected_from_kernel_release(tmp_path: Path) -> None:
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text("5.15.153.1-microsoft-standard-WSL2\n")
    assert collect_pci(tmp_path / "sys", tmp_path / "proc", tmp_path / "dev").wsl


def test_what_each_address_is_is_read_once_and_the_driver_binding_every_poll(
    tmp_path: Path,
) -> None:
    _device(tmp_path, "0000:01:00.0", "0x10de", "0x030200", "0x2330", "nvidia")
    _device(tmp_path, "0000:00:1f.0", "0x8086", "0x060100", "0x7a84", None)  # a bridge
    roots = (tmp_path / "sys", tmp_path / "proc", tmp_path / "dev")
    cache = PciCache()
    known = cache.identities
    assert [g.address for g in collect_pci(*roots, cache).gpus] == ["0000:01:00.0"]
    devices = tmp_path / "sys/bus/pci/devices"
    for dev in devices.iterdir():  # a listed device's identity files are not read again
        (dev / "vendor").unlink()
    (devices / "0000:01:00.0/driver").unlink()  # unbound: seen at once
    drv = tmp_path / "sys/bus/pci/drivers/vfio-pci"
    drv.mkdir(parents=True)
    os.symlink(os.path.relpath(drv, devices / "0000:01:00.0"), devices / "0000:01:00.0/driver")
    assert [(g.address, g.driver) for g in collect_pci(*roots, cache).gpus] == [
        ("0000:01:00.0", "vfio-pci")
    ]
    shutil.rmtree(devices / "0000:00:1f.0")  # gone: forgotten (bounded by what is listed)
    _device(tmp_path, "0000:02:00.0", "0x10de", "0x030000", "0x2204", None)  # new: read
    gpus = collect_pci(*roots, cache).gpus
    assert [g.address for g in gpus] == ["0000:01:00.0", "0000:02:00.0"]
    assert set(known) == {"0000:01:00.0", "0000:02:00.0"}


def test_device_nodes_are_listed_again_when_dev_changes(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    roots = (tmp_path / "sys", tmp_path / "proc", dev)
    cache = PciCache()
    changes = iter(range(1_700_000_000, 1_700_001_000, 10))

    def changed(*add: str, remove: str = "") -> None:
        for name in add:
            (dev / name).touch()
        if remove:
            (dev / remove).unlink()
        t = next(changes) * 10**9  # a change long past, each at its own time
        os.utime(dev, ns=(t, t))

    changed("nvidiactl", "null")
    assert collect_pci(*roots, cache).device_nodes == ("nvidiactl",)
    assert cache.dev.listings == 1
    assert collect_pci(*roots, cache).device_nodes == ("nvidiactl",)
    assert cache.dev.listings == 1  # nothing changed: not listed again
    changed("nvidia0", "nvidia-uvm")  # nodes made (udev, nvidia-modprobe)
    assert collect_pci(*roots, cache).device_nodes == ("nvidia-uvm", "nvidia0", "nvidiactl")
    changed(remove="nvidia-uvm")  # and removed (the module unloaded)
    assert collect_pci(*roots, cache).device_nodes == ("nvidia0", "nvidiactl")
    # A change just now: the listing is not trusted to be the last one within its mtime step.
    (dev / "nvidia1").touch()
    listings = cache.dev.listings
    for _ in range(2):
        assert collect_pci(*roots, cache).device_nodes == ("nvidia0", "nvidia1", "nvidiactl")
    assert cache.dev.listings == listings + 2
    shutil.rmtree(dev)
    assert collect_pci(*roots, cache).device_nodes == ()
