"""`tfgpud doctor` and the daemon's poll build the snapshot one way (tfgpud/poll.py): for the
same machine (the simulated driver) and the same baseline they give the same findings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import run_python, write_scenario

U0 = "GPU-dddddddd-0000-4000-8000-000000000000"
U1 = "GPU-dddddddd-0000-4000-8000-000000000001"
BASELINE = [
    (U0, "NVIDIA RTX A6000", "00000000:01:00.0"),
    (U1, "NVIDIA RTX A6000", "00000000:02:00.0"),
]

CHILD = """
import json
from pathlib import Path
from tfgpud.config import parse_config
from tfgpud.model import GpuReading, NvmlReading
from tfgpud.state import Baseline

state, empty, side, known = {state!r}, Path({empty!r}), {side!r}, {known!r}
b = Baseline.open(state)
b.learn(NvmlReading(up=True, gpus=tuple(
    GpuReading(i, u, name, pci_bus_id=bus) for i, (u, name, bus) in enumerate(known))), 1.0)
b.save(1.0)
b.close()
config = parse_config(
    f'[daemon]\\nstate_dir = "{{state}}"\\n[tensorflow.discover]\\nenabled = false\\n'
)
if side == "daemon":
    from tfgpud.daemon import Daemon, HostPaths
    d = Daemon(config, paths=HostPaths(sys=empty, proc=empty, dev=empty), environ={{}})
    findings = d.poll_once().findings
    d.shutdown()
else:
    from tfgpud.diagnosis import diagnose
    from tfgpud.doctor import collect_snapshot
    snap = collect_snapshot(config, sys_root=empty, proc_root=empty, dev_root=empty)
    findings = diagnose(snap, config)
print(json.dumps(sorted([f.code, f.severity.value, f.subject, f.summary] for f in findings)))
"""


def findings(tmp_path: Path, scenario: Path, side: str) -> list[list[str]]:
    state = tmp_path / side
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    code = CHILD.format(state=str(state), empty=str(empty), side=side, known=BASELINE)
    result = run_python(code, scenario=scenario)
    assert result.returncode == 0, result.stderr
    data: Any = result.data
    return [list(f) for f in data]


def gpu(uuid: str, index: int, **extra: Any) -> dict[str, Any]:
    return {"name": "NVIDIA RTX A6000", "uuid": uuid, "pci_bus_id": BASELINE[index][2], **extra}


CASES = {
    # Lost before this process could read its UUID; its identity is in the baseline.
    "lost-before-uuid": ([gpu(U0, 0), gpu(U1, 1, lost=True)], {}),
    "vanished": ([gpu(U0, 0)], {}),
    "driver-down": ([gpu(U0, 0), gpu(U1, 1)], {"init_error": "DRIVER_NOT_LOADED"}),
    "nvml-unknown": ([gpu(U0, 0), gpu(U1, 1)], {"init_error": "UNKNOWN"}),
    "healthy": ([gpu(U0, 0), gpu(U1, 1)], {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_doctor_and_daemon_agree_on_the_findings(
    case: str, tmp_path: Path, fakedriver: Path, scenario_path: Path
) -> None:
    gpus, top = CASES[case]
    write_scenario(scenario_path, gpus, **top)
    daemon = findings(tmp_path, scenario_path, "daemon")
    doctor = findings(tmp_path, scenario_path, "doctor")
    assert doctor == daemon
    keys = {(code, subject) for code, _, subject, _ in daemon}
    if case == "lost-before-uuid":
        # One failure, reported once, by the GPU's real name.
        assert ("gpu-lost", U1) in keys
        assert not any(k[0] == "gpu-vanished" or k[1].startswith("GPU-unknown") for k in keys)
    elif case == "vanished":
        assert ("gpu-vanished", U1) in keys
    elif case == "driver-down":
        assert {("driver-not-loaded", "host"), ("gpu-vanished", U0), ("gpu-vanished", U1)} <= keys
    elif case == "nvml-unknown":
        assert {("nvml-unusable", "host"), ("gpu-vanished", U0), ("gpu-vanished", U1)} <= keys
    # GPUs and no env to probe (none configured, discovery off): said by both, never all-clear.
    assert ("tf-no-env", "host") in keys
