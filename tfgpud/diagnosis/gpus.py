"""Rules about each GPU against the baseline: lost, vanished, appeared, Xid errors, and the
baseline file itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from tfgpud.config import Config
from tfgpud.diagnosis.host import DRIVER_RULES
from tfgpud.diagnosis.readings import (
    CRIT,
    HOST,
    INFO,
    WARN,
    finding,
    gpu_label,
    norm_bus,
    nvml_gpus,
    pci_lines,
)
from tfgpud.model import (
    Finding,
    Snapshot,
)
from tfgpud.xids import KNOWN_XIDS

# Xids worth waking someone for, with what they mean (tfgpud.xids, docs/diagnosis-facts.md).
CRITICAL_XIDS: dict[int, str] = {
    xid: info.meaning for xid, info in KNOWN_XIDS.items() if info.kind == "critical"
}


XID_WINDOW_SECONDS = 3600.0


# A GPU that joined an existing baseline is reported (info) for this long after it joined.
APPEARED_WINDOW_SECONDS = 3600.0


# GPUs first seen within this much of the baseline's oldest GPU were part of the initial learning.
INITIAL_LEARNING_SECONDS = 60.0


def rule_gpu_lost(s: Snapshot, c: Config) -> Iterable[Finding]:
    for g in nvml_gpus(s):
        if not g.lost:
            continue
        yield finding(
            "gpu-lost",
            CRIT,
            g.uuid,
            f"{gpu_label(g)} is lost (NVML GPU_IS_LOST): it has fallen off the bus",
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
    pci_addrs = {norm_bus(g.address) for g in s.pci.gpus} if s.pci is not None else set()
    nvml_now = (
        f"NVML now reports {len(s.nvml.gpus)} GPU(s): "
        + (", ".join(g.uuid for g in s.nvml.gpus) or "none")
        if up
        else f"NVML is down ({s.nvml.error or 'unknown error'}): the driver lists no GPU"
    )
    missing = [k for k in s.baseline if k.uuid not in seen]
    for k in missing:
        on_bus = k.pci_bus_id is not None and norm_bus(k.pci_bus_id) in pci_addrs
        where = (
            "gone from the PCI bus too"
            if s.pci is not None and not on_bus
            else "PCI bus not read"
            if s.pci is None
            else "still on the PCI bus but not visible to the driver"
            if up
            else "still on the PCI bus, but the driver is not answering"
        )
        yield finding(
            "gpu-vanished",
            CRIT,
            k.uuid,
            f"GPU {k.name or '?'} {k.uuid} ({k.pci_bus_id or 'PCI address unknown'}) was here "
            f"before and is gone: {where}",
            [
                f"baseline: {k.uuid} {k.name or ''} at {k.pci_bus_id or '?'}",
                nvml_now,
                *pci_lines(s),
            ],
            _vanished_fix(s, c, k.uuid),
        )
    expected = s.expected_gpus or 0
    unnamed = expected - len(s.nvml.gpus if up else ()) - len(missing)
    if isinstance(c.expect.gpus, int) and unnamed > 0:
        yield finding(
            "gpu-vanished",
            CRIT,
            HOST,
            f"{unnamed} of the {expected} GPU(s) this machine should have ([expect] gpus) "
            "are not visible",
            [f"[expect] gpus = {c.expect.gpus}", nvml_now, *pci_lines(s)],
            _vanished_fix(s, c, None),
        )


def _vanished_fix(s: Snapshot, c: Config, uuid: str | None) -> str:
    """What to do about a vanished GPU (``uuid``; None: one counted by ``[expect] gpus``):
    the driver first when it is down, naming only a driver finding that is present."""
    fix = (
        "Check `journalctl -k | grep -iE 'xid|nvrm'` and `lspci -d 10de:`; a GPU that fell "
        "off the bus needs a reboot (and reseating/power checks if it recurs). "
    )
    if uuid is not None:
        fix += (
            f"If it was removed on purpose, accept that with `tfgpud baseline forget {uuid}` "
            "(all GPUs: `tfgpud baseline reset`)."
        )
    else:
        fix += (
            f"If the machine has fewer GPUs on purpose now, lower [expect] gpus ({c.expect.gpus})."
        )
    if s.nvml is None or s.nvml.up:
        return fix
    # NVML down with GPUs expected always has a driver finding (nvml-unusable for any error
    # no other rule names).
    present = [f.code for rule in DRIVER_RULES for f in rule(s, c)]
    return f"Bring the driver back first (see {', '.join(present)}). " + fix if present else fix


def rule_baseline_state_error(s: Snapshot, c: Config) -> Iterable[Finding]:
    if not s.baseline_problems:
        return
    yield finding(
        "baseline-state-error",
        WARN,
        HOST,
        "The GPU baseline could not be read or written; GPUs that vanished before it was "
        "rebuilt are not reported",
        s.baseline_problems,
        "Compare `tfgpud baseline show` with the GPUs this machine should have and `tfgpud "
        "baseline forget` any it should not; then delete the `*.corrupt` files named above "
        "(tfgpud keeps the newest few for inspection). For a write error, check space and "
        "permissions of [daemon] state_dir.",
    )


def rule_gpu_appeared(s: Snapshot, c: Config) -> Iterable[Finding]:
    if not s.baseline:
        return
    known = {k.uuid: k for k in s.baseline}
    firsts = [k.first_seen for k in s.baseline if k.first_seen is not None]
    oldest = min(firsts) if firsts else None
    for g in nvml_gpus(s):
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
        yield finding(
            "gpu-appeared",
            INFO,
            g.uuid,
            f"New GPU: {gpu_label(g)} {joined}",
            [f"baseline before it: {len(others)} GPU(s): " + ", ".join(others)],
            "Nothing to do if it was installed on purpose: it is now expected on this machine "
            f"(`tfgpud baseline forget {g.uuid}` removes it again).",
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
        yield finding(
            "gpu-xid-critical",
            CRIT,
            uuid,
            f"GPU {uuid} reported critical Xid "
            + ", ".join(f"{x} ({CRITICAL_XIDS[x]})" for x in xids)
            + " in the last hour",
            [f"Xid {e.xid} at unix time {e.at:.0f}: {CRITICAL_XIDS[e.xid]}" for e in mine[-10:]],
            "; ".join(fixes) + ". Drain the GPU's jobs first.",
        )
