"""NvmlSession against the simulated driver, for the cases a whole daemon run hides.

Where the simulated driver cannot produce a failure (NO_PERMISSION on one device, a failing
device count), one pynvml function is replaced inside the child process; everything else is
the real binding talking to the simulated library.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_python, write_scenario

U = [f"GPU-cccccccc-0000-4000-8000-00000000000{i}" for i in range(3)]

PRELUDE = """
import json, pynvml
from tfgpud.collectors.nvml import NvmlSession
from tfgpud.model import to_jsonable
real_handle = pynvml.nvmlDeviceGetHandleByIndex
s = NvmlSession()
def dump(r):
    return {"up": r.up, "error": r.error,
            "gpus": [[g.index, g.uuid, g.lost, g.error] for g in r.gpus]}
"""


def watching(wait_ms: int) -> str:
    """Child code: an XidWatcher ``w`` on session ``s``, blocked in its first wait."""
    return f"""
import os, time
from helpers import write_scenario
from tfgpud.collectors.nvml import XidWatcher
first = s.poll()
w = XidWatcher(s, wait_ms={wait_ms})
w.watch(g.uuid for g in first.gpus)
w.start()
deadline = time.monotonic() + 20
while not s.waiting and time.monotonic() < deadline:
    time.sleep(0.01)
"""


def three_gpus(path: Path, **gpu1: object) -> None:
    write_scenario(
        path,
        [
            {"uuid": U[0], "pci_bus_id": "00000000:01:00.0"},
            {"uuid": U[1], "pci_bus_id": "00000000:02:00.0", **gpu1},
            {"uuid": U[2], "pci_bus_id": "00000000:03:00.0"},
        ],
    )


def test_no_permission_on_one_gpu_hides_only_that_gpu(
    fakedriver: Path, scenario_path: Path
) -> None:
    three_gpus(scenario_path)
    code = (
        PRELUDE
        + """
first = dump(s.poll())
def handle(i):
    if i == 1:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
    return real_handle(i)
pynvml.nvmlDeviceGetHandleByIndex = handle
second = dump(s.poll())
third = dump(s.poll())
print(json.dumps([first, second, third]))
"""
    )
    r = run_python(code, scenario=scenario_path)
    assert r.returncode == 0, r.stderr
    first, second, third = r.data
    assert first["up"] and [g[1] for g in first["gpus"]] == U
    for reading in (second, third):  # and it stays so: no drop and re-init each poll
        assert reading["up"] is True
        assert reading["gpus"][0] == [0, U[0], False, None]
        assert reading["gpus"][1] == [1, U[1], False, "NO_PERMISSION"]  # known from poll 1
        assert reading["gpus"][2] == [2, U[2], False, None]
    assert "lost the driver" not in r.stderr


def test_lost_gpu_does_not_borrow_an_identity_that_answered_elsewhere(
    fakedriver: Path, scenario_path: Path
) -> None:
    three_gpus(scenario_path)
    code = (
        PRELUDE
        + """
first = dump(s.poll())
import os, time
"""
        + f"""
from helpers import write_scenario
write_scenario({str(scenario_path)!r}, [
    {{"uuid": {U[1]!r}, "pci_bus_id": "00000000:02:00.0"}},
    {{"uuid": {U[2]!r}, "pci_bus_id": "00000000:03:00.0", "lost": True}},
])
second = dump(s.poll())
print(json.dumps([first, second]))
"""
    )
    tests_dir = str(Path(__file__).resolve().parents[1])
    r = run_python(code, scenario=scenario_path, env={"PYTHONPATH": tests_dir})
    assert r.returncode == 0, r.stderr
    first, second = r.data
    assert [g[1] for g in first["gpus"]] == U
    # GPU 0 removed: U[1] now answers at index 0; index 1 (U[2], lost) remembered U[1] from
    # the last poll, which must not be reported twice.
    assert second["gpus"][0] == [0, U[1], False, None]
    assert second["gpus"][1][1] != U[1]
    assert second["gpus"][1][2] is True


@pytest.mark.parametrize(
    ("error", "reading"), [("UNKNOWN", "DEVICE_COUNT_FAILED"), ("GPU_IS_LOST", "GPU_IS_LOST")]
)
def test_a_failing_device_count_is_not_zero_gpus(
    fakedriver: Path, scenario_path: Path, error: str, reading: str
) -> None:
    three_gpus(scenario_path)
    code = (
        PRELUDE
        + f"""
def count():
    raise pynvml.NVMLError(pynvml.NVML_ERROR_{error})
pynvml.nvmlDeviceGetCount = count
print(json.dumps(dump(s.poll())))
"""
    )
    r = run_python(code, scenario=scenario_path)
    assert r.returncode == 0, r.stderr
    # Never "zero GPUs", and never a collector that raised (a GPU-level code for the count).
    assert r.data == {"up": False, "error": reading, "gpus": []}


def test_a_driver_loss_during_a_long_xid_wait_never_blocks_the_poll(
    fakedriver: Path, scenario_path: Path
) -> None:
    three_gpus(scenario_path)
    code = (
        PRELUDE
        + watching(60_000)  # one wait outlasts this test unless an Xid ends it
        + f"""
real = pynvml.nvmlDeviceGetCount
def gone():
    raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
pynvml.nvmlDeviceGetCount = gone
lost = dump(s.poll())  # must not wait for the Xid thread's wait to end
waiting_after_loss = s.waiting
pynvml.nvmlDeviceGetCount = real
held = dump(s.poll())  # the lost session is still held by the wait: not re-initialised
# An Xid ends the wait; that thread then frees the set and shuts the lost session down.
write_scenario(os.environ["TFGPUD_FAKE_DRIVER"], [
    {{"uuid": "{U[0]}", "pci_bus_id": "00000000:01:00.0", "xids": [79]}},
    {{"uuid": "{U[1]}", "pci_bus_id": "00000000:02:00.0"}},
    {{"uuid": "{U[2]}", "pci_bus_id": "00000000:03:00.0"}},
])
while not w.view().counts and time.monotonic() < deadline:
    time.sleep(0.01)
back = dump(s.poll())
print(json.dumps({{"lost": lost, "waiting": waiting_after_loss, "held": held, "back": back,
                   "counts": [[u, x, n] for (u, x), n in w.view().counts.items()]}}))
"""
    )
    r = run_python(code, scenario=scenario_path)
    assert r.returncode == 0, r.stderr
    assert r.data["lost"]["up"] is False and r.data["lost"]["error"] == "DRIVER_NOT_LOADED"
    assert r.data["waiting"] is True  # the poll returned while the wait went on
    assert r.data["held"]["up"] is False
    assert r.data["counts"] == [[U[0], 79, 1]]
    assert r.data["back"]["up"] is True and len(r.data["back"]["gpus"]) == 3


def test_process_names_are_read_once_per_stretch_on_a_gpu(
    fakedriver: Path, scenario_path: Path, tmp_path: Path
) -> None:
    proc = tmp_path / "proc"
    for pid, comm in ((501, "python3"), (502, "jupyter")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(comm + "\n")

    def listing(pids: list[int], memory: list[int]) -> None:
        write_scenario(
            scenario_path,
            [{"uuid": U[0], "process_pids": pids, "process_memory": memory}],
        )

    listing([501, 502], [1 << 30, 2 << 30])
    code = f"""
import json, os, time
from helpers import write_scenario
from tfgpud.collectors.nvml import NvmlSession
from pathlib import Path
s = NvmlSession(proc_root=Path({str(proc)!r}))
def procs():
    return [[p.pid, p.used_memory_bytes, p.name] for p in s.poll().gpus[0].processes]
def listing(pids, memory):
    write_scenario({str(scenario_path)!r}, [{{"uuid": {U[0]!r}, "process_pids": pids,
                                             "process_memory": memory}}])
out = [procs()]
Path({str(proc / "501" / "comm")!r}).write_text("renamed\\n")
listing([501, 502], [3 << 30, 2 << 30])
out.append(procs())  # still listed: the name is not read again; the memory is
listing([502], [2 << 30])
out.append(procs())
listing([501, 502], [1 << 30, 2 << 30])
out.append(procs())  # back after a poll without it: read again
print(json.dumps(out))
"""
    r = run_python(code, scenario=scenario_path)
    assert r.returncode == 0, r.stderr
    first, second, third, fourth = r.data
    gib = 1 << 30
    assert first == [[501, gib, "python3"], [502, 2 * gib, "jupyter"]]
    assert second == [[501, 3 * gib, "python3"], [502, 2 * gib, "jupyter"]]
    assert third == [[502, 2 * gib, "jupyter"]]
    assert fourth == [[501, gib, "renamed"], [502, 2 * gib, "jupyter"]]


def test_gpu_settings_are_read_once_a_minute_and_versions_once_per_session(
    fakedriver: Path, scenario_path: Path
) -> None:
    write_scenario(scenario_path, [{"uuid": U[0], "persistence_mode": False}])
    code = f"""
import json
from helpers import write_scenario
from tfgpud.collectors.nvml import SETTINGS_SECONDS, NvmlSession
t = [100.0]
s = NvmlSession(clock=lambda: t[0])
def read():
    r = s.poll()
    return [r.driver_version, r.gpus[0].persistence_mode]
out = [read()]
write_scenario({str(scenario_path)!r}, [{{"uuid": {U[0]!r}, "persistence_mode": True}}],
               driver_version="999.1.2")
out.append(read())  # the same session: neither is read again yet
t[0] += SETTINGS_SECONDS
out.append(read())  # the setting is due; the library's version stays the session's
print(json.dumps(out))
"""
    r = run_python(code, scenario=scenario_path)
    assert r.returncode == 0, r.stderr
    first, second, third = r.data
    assert first[1] is False and second == first
    assert third == [first[0], True]


def test_an_xid_storm_is_logged_as_a_line_and_a_summary(
    fakedriver: Path, scenario_path: Path
) -> None:
    three_gpus(scenario_path)
    code = (
        PRELUDE
        + watching(200)
        + f"""
import logging
from tfgpud.xids import XidLogLines
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("tfgpud").addHandler(Keep())
logging.getLogger("tfgpud").setLevel(logging.INFO)
w._lines = XidLogLines(window=1.0)  # no Xid yet: the first comes with the scenario below
write_scenario(os.environ["TFGPUD_FAKE_DRIVER"], [
    {{"uuid": "{U[0]}", "pci_bus_id": "00000000:01:00.0", "xids": [13] * 50}},
    {{"uuid": "{U[1]}", "pci_bus_id": "00000000:02:00.0"}},
    {{"uuid": "{U[2]}", "pci_bus_id": "00000000:03:00.0"}},
])
while sum(w.view().counts.values()) < 50 and time.monotonic() < deadline:
    time.sleep(0.01)
while not any("more" in r for r in records) and time.monotonic() < deadline:
    time.sleep(0.05)
w.stop()
print(json.dumps([r for r in records if "Xid" in r]))
"""
    )
    r = run_python(code, scenario=scenario_path)
    assert r.returncode == 0, r.stderr
    assert r.data == [
        f"Xid 13 on GPU {U[0]} (graphics engine exception (application error))",
        f"Xid 13 on GPU {U[0]}: 49 more in the last 1 s, not logged one by one",
    ]


def test_a_gpu_that_does_not_list_its_processes_is_read_without_them(
    fakedriver: Path, scenario_path: Path
) -> None:
    three_gpus(scenario_path)
    code = (
        PRELUDE
        + """
import logging
import tfgpud.collectors.nvml as nvml
logging.basicConfig(level=logging.DEBUG)
def refused(handle):
    raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
nvml._RAW_PROCESSES = False  # through pynvml's own call, which this child makes refuse
pynvml.nvmlDeviceGetComputeRunningProcesses = refused
r = s.poll()
print(json.dumps([dump(r), [list(g.processes) for g in r.gpus]]))
"""
    )
    r = run_python(code, scenario=scenario_path)
    assert r.returncode == 0, r.stderr
    reading, processes = r.data
    assert reading["up"] is True and [g[1] for g in reading["gpus"]] == U
    assert processes == [[], [], []]
    assert "nvmlDeviceGetComputeRunningProcesses_v3: NOT_SUPPORTED (value omitted)" in r.stderr
