"""The simulated NVIDIA driver (tests/fakedriver) against the real clients: nvidia-ml-py,
gpustat, nvitop and TensorFlow. Every client runs in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import fakedriver_env, run_python, write_scenario, write_text_atomically

GiB = 1024**3
MiB = 1024**2


def eight_gpus() -> list[dict[str, Any]]:
    gpus = []
    for i in range(8):
        npids = i % 3
        gpus.append(
            {
                "name": f"NVIDIA Test GPU {i}",
                "uuid": f"GPU-{i:08x}-1111-2222-3333-{0xABC000 + i:012x}",
                "pci_bus_id": f"{i:08X}:{0x10 + i:02X}:{i:02X}.0",
                "memory_total": (i + 1) * 16 * GiB,
                "memory_used": i * GiB + 123,
                "memory_reserved": i * MiB + 7,
                "utilization_gpu": 10 + i,
                "utilization_memory": 20 + i,
                "temperature": 40 + i,
                "power_mw": 100_000 + i * 1111,
                "cc_major": 7 + i % 3,
                "cc_minor": i % 10,
                "process_pids": [1000 + i, 2000 + i][:npids],
                "process_memory": [(i + 1) * MiB, (i + 2) * MiB][:npids],
                "ecc_uncorrected": i * 3,
                "persistence_mode": i % 2 == 0,
                "mig_mode": i % 2 == 1,
            }
        )
    return gpus


READ_EVERYTHING = textwrap.dedent(
    """
    import ctypes, json
    import pynvml as N

    class ProcV1(ctypes.Structure):
        _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]

    def procs_v1(h):
        fn = N._nvmlGetFunctionPointer("nvmlDeviceGetComputeRunningProcesses")
        count = ctypes.c_uint(0)
        rc = fn(h, ctypes.byref(count), None)
        if rc == 0:
            return []
        assert rc == N.NVML_ERROR_INSUFFICIENT_SIZE, rc
        buf = (ProcV1 * count.value)()
        assert fn(h, ctypes.byref(count), buf) == 0
        return [[p.pid, p.usedGpuMemory] for p in buf[: count.value]]

    def text(v):
        return v.decode() if isinstance(v, bytes) else v

    N.nvmlInit()
    out = {
        "driver_version": N.nvmlSystemGetDriverVersion(),
        "nvml_version": N.nvmlSystemGetNVMLVersion(),
        "cuda_driver_version": N.nvmlSystemGetCudaDriverVersion(),
        "cuda_driver_version_v2": N.nvmlSystemGetCudaDriverVersion_v2(),
        "gpus": [],
    }
    for i in range(N.nvmlDeviceGetCount()):
        h = N.nvmlDeviceGetHandleByIndex(i)
        pci = N.nvmlDeviceGetPciInfo(h)
        pci2 = N.nvmlPciInfo_t()
        assert N._nvmlGetFunctionPointer("nvmlDeviceGetPciInfo_v2")(h, ctypes.byref(pci2)) == 0
        m1 = N.nvmlDeviceGetMemoryInfo(h)
        m2 = N.nvmlDeviceGetMemoryInfo(h, version=N.nvmlMemory_v2)
        util = N.nvmlDeviceGetUtilizationRates(h)
        uuid = N.nvmlDeviceGetUUID(h)
        out["gpus"].append({
            "index": N.nvmlDeviceGetIndex(h),
            "name": N.nvmlDeviceGetName(h),
            "uuid": uuid,
            "pci_bus_id": text(pci.busId),
            "pci": [pci.domain, pci.bus, pci.device, pci.pciDeviceId, pci.pciSubSystemId],
            "pci_legacy": text(pci.busIdLegacy),
            "pci_v2": text(pci2.busId),
            "by_uuid": N.nvmlDeviceGetIndex(N.nvmlDeviceGetHandleByUUID(uuid)),
            "by_pci": N.nvmlDeviceGetIndex(N.nvmlDeviceGetHandleByPciBusId(pci.busId)),
            "by_legacy_pci": N.nvmlDeviceGetIndex(
                N.nvmlDeviceGetHandleByPciBusId(pci.busIdLegacy)),
            "same_handle": ctypes.cast(h, ctypes.c_void_p).value
                == ctypes.cast(N.nvmlDeviceGetHandleByIndex(i), ctypes.c_void_p).value,
            "mem_v1": [m1.total, m1.free, m1.used],
            "mem_v2": [m2.version, m2.total, m2.reserved, m2.free, m2.used],
            "util": [util.gpu, util.memory],
            "temperature": N.nvmlDeviceGetTemperature(h, N.NVML_TEMPERATURE_GPU),
            "power_mw": N.nvmlDeviceGetPowerUsage(h),
            "cc": list(N.nvmlDeviceGetCudaComputeCapability(h)),
            "procs_v3": [[p.pid, p.usedGpuMemory]
                         for p in N.nvmlDeviceGetComputeRunningProcesses(h)],
            "procs_v2": [[p.pid, p.usedGpuMemory]
                         for p in N.nvmlDeviceGetComputeRunningProcesses_v2(h)],
            "procs_v1": procs_v1(h),
            "graphics": len(N.nvmlDeviceGetGraphicsRunningProcesses(h)),
            "ecc": [
                N.nvmlDeviceGetTotalEccErrors(
                    h, N.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, N.NVML_VOLATILE_ECC),
                N.nvmlDeviceGetTotalEccErrors(
                    h, N.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, N.NVML_AGGREGATE_ECC),
                N.nvmlDeviceGetTotalEccErrors(
                    h, N.NVML_MEMORY_ERROR_TYPE_CORRECTED, N.NVML_VOLATILE_ECC),
            ],
            "persistence": N.nvmlDeviceGetPersistenceMode(h),
            "mig": list(N.nvmlDeviceGetMigMode(h)),
            "minor": N.nvmlDeviceGetMinorNumber(h),
        })
    N.nvmlShutdown()
    print(json.dumps(out))
    """
)


def test_pynvml_reads_back_every_key(fakedriver: Path, scenario_path: Path) -> None:
    gpus = eight_gpus()
    write_scenario(
        scenario_path,
        gpus,
        driver_version="535.183.01",
        cuda_driver_version=12020,
        nvml_version="12.535.183.01",
    )
    result = run_python(READ_EVERYTHING, scenario=scenario_path)
    assert result.returncode == 0, result.stderr
    out = result.data
    assert out["driver_version"] == "535.183.01"
    assert out["nvml_version"] == "12.535.183.01"
    assert out["cuda_driver_version"] == out["cuda_driver_version_v2"] == 12020
    assert len(out["gpus"]) == 8
    for i, (want, got) in enumerate(zip(gpus, out["gpus"], strict=True)):
        total, used, reserved = want["memory_total"], want["memory_used"], want["memory_reserved"]
        procs = [list(p) for p in zip(want["process_pids"], want["process_memory"], strict=True)]
        assert got == {
            "index": i,
            "name": want["name"],
            "uuid": want["uuid"],
            "pci_bus_id": want["pci_bus_id"],
            "pci": [i, 0x10 + i, i, 0x20B010DE, 0x134F10DE],
            "pci_legacy": f"{i:04X}:{0x10 + i:02X}:{i:02X}.0",
            "pci_v2": want["pci_bus_id"],
            "by_uuid": i,
            "by_pci": i,
            "by_legacy_pci": i,
            "same_handle": True,
            "mem_v1": [total, total - used, used],
            "mem_v2": [0x02000028, total, reserved, total - used - reserved, used],
            "util": [want["utilization_gpu"], want["utilization_memory"]],
            "temperature": want["temperature"],
            "power_mw": want["power_mw"],
            "cc": [want["cc_major"], want["cc_minor"]],
            "procs_v3": procs,
            "procs_v2": procs,
            "procs_v1": procs,
            "graphics": 0,
            "ecc": [want["ecc_uncorrected"], want["ecc_uncorrected"], 0],
            "persistence": int(want["persistence_mode"]),
            "mig": [int(want["mig_mode"])] * 2,
            "minor": i,
        }, f"GPU {i}"


def test_defaults_for_absent_keys(fakedriver: Path, scenario_path: Path) -> None:
    write_scenario(scenario_path, [{}, {}])
    code = textwrap.dedent(
        """
        import json, pynvml as N
        N.nvmlInit()
        hs = [N.nvmlDeviceGetHandleByIndex(i) for i in range(N.nvmlDeviceGetCount())]
        print(json.dumps({
            "driver": N.nvmlSystemGetDriverVersion(),
            "cuda": N.nvmlSystemGetCudaDriverVersion(),
            "uuids": [N.nvmlDeviceGetUUID(h) for h in hs],
            "pci": [N.nvmlDeviceGetPciInfo(h).busId for h in hs],
            "cc": [list(N.nvmlDeviceGetCudaComputeCapability(h)) for h in hs],
        }))
        """
    )
    result = run_python(code, scenario=scenario_path)
    assert result.returncode == 0, result.stderr
    assert result.data == {
        "driver": "550.54.15",
        "cuda": 12040,
        "uuids": [
            "GPU-fa4e0000-0000-4000-8000-000000000000",
            "GPU-fa4e0000-0000-4000-8000-000000000001",
        ],
        "pci": ["00000000:01:00.0", "00000000:02:00.0"],
        "cc": [[8, 0], [8, 0]],
    }


INIT = textwrap.dedent(
    """
    import json, pynvml as N
    try:
        N.nvmlInit()
    except N.NVMLError as e:
        print(json.dumps({"error": type(e).__name__, "value": e.value}))
    else:
        print(json.dumps({"error": None, "count": N.nvmlDeviceGetCount()}))
    """
)


@pytest.mark.parametrize(
    ("init_error", "exception", "code"),
    [
        ("DRIVER_NOT_LOADED", "NVMLError_DriverNotLoaded", 9),
        ("LIB_RM_VERSION_MISMATCH", "NVMLError_LibRmVersionMismatch", 18),
        ("NO_PERMISSION", "NVMLError_NoPermission", 4),
        ("UNKNOWN", "NVMLError_Unknown", 999),
    ],
)
def test_init_error(
    fakedriver: Path, scenario_path: Path, init_error: str, exception: str, code: int
) -> None:
    write_scenario(scenario_path, [{}], init_error=init_error)
    result = run_python(INIT, scenario=scenario_path)
    assert result.data == {"error": exception, "value": code}, result.stderr
    assert result.fakedriver_lines() == []


def test_init_refcount_and_uninitialized(fakedriver: Path, scenario_path: Path) -> None:
    write_scenario(scenario_path, [{}, {}])
    code = textwrap.dedent(
        """
        import ctypes, json
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        n = ctypes.c_uint(0)
        count = lambda: lib.nvmlDeviceGetCount_v2(ctypes.byref(n))
        steps = [count(), lib.nvmlInit_v2(), lib.nvmlInitWithFlags(0), count(), n.value,
                 lib.nvmlShutdown(), count(), lib.nvmlShutdown(), count(), lib.nvmlShutdown(),
                 lib.nvmlDeviceGetFanSpeed(None, ctypes.byref(n))]
        lib.nvmlInit()
        h = ctypes.c_void_p()
        lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(h))
        steps += [lib.nvmlDeviceGetFanSpeed(h, ctypes.byref(n)),
                  lib.nvmlDeviceGetHandleByIndex_v2(2, ctypes.byref(h)),
                  lib.nvmlDeviceGetName(ctypes.c_void_p(12345), ctypes.create_string_buffer(9), 9)]
        lib.nvmlErrorString.restype = ctypes.c_char_p
        steps += [lib.nvmlErrorString(15).decode(), lib.nvmlErrorString(999).decode()]
        print(json.dumps(steps))
        """
    )
    result = run_python(code, scenario=scenario_path)
    assert result.returncode == 0, result.stderr
    assert result.data == [1, 0, 0, 0, 2, 0, 0, 0, 1, 1, 1, 3, 2, 2, "GPU is lost", "Unknown Error"]


LOST_CALLS = textwrap.dedent(
    """
    import json, pynvml as N
    CALLS = {
        "index": N.nvmlDeviceGetIndex,
        "name": N.nvmlDeviceGetName,
        "uuid": N.nvmlDeviceGetUUID,
        "pci": N.nvmlDeviceGetPciInfo,
        "memory": N.nvmlDeviceGetMemoryInfo,
        "memory_v2": lambda h: N.nvmlDeviceGetMemoryInfo(h, version=N.nvmlMemory_v2),
        "util": N.nvmlDeviceGetUtilizationRates,
        "temperature": lambda h: N.nvmlDeviceGetTemperature(h, 0),
        "power": N.nvmlDeviceGetPowerUsage,
        "cc": N.nvmlDeviceGetCudaComputeCapability,
        "procs": N.nvmlDeviceGetComputeRunningProcesses,
        "graphics": N.nvmlDeviceGetGraphicsRunningProcesses,
        "ecc": lambda h: N.nvmlDeviceGetTotalEccErrors(h, 1, 0),
        "persistence": N.nvmlDeviceGetPersistenceMode,
        "mig": N.nvmlDeviceGetMigMode,
        "events": N.nvmlDeviceGetSupportedEventTypes,
        "register": lambda h: N.nvmlDeviceRegisterEvents(h, 8, N.nvmlEventSetCreate()),
    }

    def probe(h):
        out = {}
        for key, fn in CALLS.items():
            try:
                fn(h)
                out[key] = "ok"
            except N.NVMLError as e:
                out[key] = type(e).__name__
        return out

    N.nvmlInit()
    n = N.nvmlDeviceGetCount()
    print(json.dumps([probe(N.nvmlDeviceGetHandleByIndex(i)) for i in range(n)]))
    """
)


def test_lost_gpu(fakedriver: Path, scenario_path: Path) -> None:
    write_scenario(scenario_path, [{}, {"lost": True}, {}])
    result = run_python(LOST_CALLS, scenario=scenario_path)
    assert result.returncode == 0, result.stderr
    healthy, lost, other = result.data
    assert set(healthy.values()) == {"ok"}
    assert set(other.values()) == {"ok"}
    assert lost == dict.fromkeys(healthy, "NVMLError_GpuIsLost")


REWRITES = textwrap.dedent(
    """
    import json, os
    import pynvml as N
    from helpers import write_scenario

    path = os.environ["TFGPUD_FAKE_DRIVER"]
    A = {"name": "A", "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000"}
    B = {"name": "B", "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000"}
    C = {"name": "C", "uuid": "GPU-cccccccc-0000-0000-0000-000000000000"}

    def attempt(fn, *args):
        try:
            return fn(*args)
        except N.NVMLError as e:
            return type(e).__name__

    N.nvmlInit()
    log = []
    ha, hb = N.nvmlDeviceGetHandleByIndex(0), N.nvmlDeviceGetHandleByIndex(1)
    log.append(["start", N.nvmlDeviceGetCount(), N.nvmlDeviceGetName(hb)])
    write_scenario(path, [A])                                   # B removed
    log.append(["removed", N.nvmlDeviceGetCount(), attempt(N.nvmlDeviceGetName, hb),
                N.nvmlDeviceGetName(ha)])
    write_scenario(path, [A, C, B])                             # C added, B back
    hc = N.nvmlDeviceGetHandleByIndex(1)
    log.append(["added", N.nvmlDeviceGetCount(), N.nvmlDeviceGetName(hc),
                N.nvmlDeviceGetName(hb), N.nvmlDeviceGetIndex(hb)])
    write_scenario(path, [dict(A, lost=True), C, B])            # A falls off the bus
    log.append(["lost", attempt(N.nvmlDeviceGetName, ha),
                attempt(N.nvmlDeviceGetName, N.nvmlDeviceGetHandleByIndex(0)),
                N.nvmlDeviceGetName(hc)])
    write_scenario(path, [A, C, B])                             # and is back
    log.append(["unlost", N.nvmlDeviceGetName(ha)])
    write_scenario(path, [A, C, B], init_error="DRIVER_NOT_LOADED")  # driver unloaded
    log.append(["unloaded", attempt(N.nvmlDeviceGetName, ha), attempt(N.nvmlDeviceGetCount)])
    write_scenario(path, [A, C, B])                             # driver back, no re-init
    log.append(["reloaded", N.nvmlDeviceGetName(ha), N.nvmlDeviceGetCount()])
    print(json.dumps(log))
    """
)


def test_scenario_rewrites_seen_by_next_call(fakedriver: Path, scenario_path: Path) -> None:
    write_scenario(
        scenario_path,
        [
            {"name": "A", "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000"},
            {"name": "B", "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000"},
        ],
    )
    result = run_python(REWRITES, scenario=scenario_path)
    assert result.returncode == 0, result.stderr
    assert result.data == [
        ["start", 2, "B"],
        ["removed", 1, "NVMLError_GpuIsLost", "A"],
        ["added", 3, "C", "B", 2],
        ["lost", "NVMLError_GpuIsLost", "NVMLError_GpuIsLost", "C"],
        ["unlost", "A"],
        ["unloaded", "NVMLError_DriverNotLoaded", "NVMLError_DriverNotLoaded"],
        ["reloaded", "A", 3],
    ]


IN_PLACE = textwrap.dedent(
    """
    import json, os
    import pynvml as N
    path = os.environ["TFGPUD_FAKE_DRIVER"]
    N.nvmlInit()
    h = N.nvmlDeviceGetHandleByIndex(0)
    seen = [N.nvmlDeviceGetName(h)]
    st = os.stat(path)
    # same inode, same mtime (restored), different size
    with open(path, "r+") as f:
        text = f.read()
        f.seek(0); f.truncate(); f.write(text.replace('"abc"', '"abcdef"'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    seen.append(N.nvmlDeviceGetName(h))
    # same inode, same size, different mtime (1 ns later)
    st = os.stat(path)
    with open(path, "r+") as f:
        text = f.read()
        f.seek(0); f.write(text.replace('"abcdef"', '"uvwxyz"'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    seen.append(N.nvmlDeviceGetName(h))
    print(json.dumps(seen))
    """
)


def test_in_place_rewrites_noticed_by_size_and_mtime_ns(
    fakedriver: Path, scenario_path: Path
) -> None:
    write_scenario(scenario_path, [{"name": "abc"}])
    result = run_python(IN_PLACE, scenario=scenario_path)
    assert result.returncode == 0, result.stderr
    assert result.data == ["abc", "abcdef", "uvwxyz"]


XIDS = textwrap.dedent(
    """
    import json, os, threading, time
    import pynvml as N
    from helpers import write_scenario

    path = os.environ["TFGPUD_FAKE_DRIVER"]
    gpus = json.loads(os.environ["GPUS"])
    N.nvmlInit()
    handles = [N.nvmlDeviceGetHandleByIndex(i) for i in range(N.nvmlDeviceGetCount())]
    es = N.nvmlEventSetCreate()
    for h in handles:
        N.nvmlDeviceRegisterEvents(h, N.nvmlEventTypeXidCriticalError, es)

    def drain():
        got = []
        while True:
            try:
                d = N.nvmlEventSetWait_v2(es, 50)
            except N.NVMLError_Timeout:
                return got
            got.append([N.nvmlDeviceGetUUID(d.device), d.eventType, d.eventData,
                        d.gpuInstanceId, d.computeInstanceId])

    out = {"first": drain()}
    t0 = time.monotonic()
    try:
        N.nvmlEventSetWait_v2(es, 300)
        out["timeout"] = None
    except N.NVMLError as e:
        out["timeout"] = [type(e).__name__, time.monotonic() - t0]

    # more xids for GPU 1: only the new one is delivered; delivered while a waiter blocks,
    # with pollers hammering the library from other threads
    stop = threading.Event()
    polls = [0]
    def poller():
        while not stop.is_set():
            for h in handles:
                N.nvmlDeviceGetMemoryInfo(h)
            polls[0] += 1
    threads = [threading.Thread(target=poller) for _ in range(2)]
    for t in threads:
        t.start()
    def rewrite():
        time.sleep(0.3)
        gpus[1]["xids"] = gpus[1]["xids"] + [94]
        write_scenario(path, gpus)
    w = threading.Thread(target=rewrite)
    w.start()
    t0 = time.monotonic()
    d = N.nvmlEventSetWait_v2(es, 10000)
    out["late"] = [N.nvmlDeviceGetUUID(d.device), d.eventData, time.monotonic() - t0]
    w.join()
    stop.set()
    for t in threads:
        t.join()
    out["polls"] = polls[0]
    out["after"] = drain()
    N.nvmlEventSetFree(es)
    print(json.dumps(out))
    """
)


def test_xid_events_delivered_once(fakedriver: Path, scenario_path: Path) -> None:
    gpus = [
        {"uuid": "GPU-00000000-0000-0000-0000-0000000000a0", "xids": [13, 79]},
        {"uuid": "GPU-00000000-0000-0000-0000-0000000000a1", "xids": [48]},
        {"uuid": "GPU-00000000-0000-0000-0000-0000000000a2"},
    ]
    write_scenario(scenario_path, gpus)
    result = run_python(XIDS, scenario=scenario_path, env={"GPUS": json.dumps(gpus)})
    assert result.returncode == 0, result.stderr
    out = result.data
    none = 0xFFFFFFFF
    assert sorted(out["first"]) == sorted(
        [
            [gpus[0]["uuid"], 8, 13, none, none],
            [gpus[0]["uuid"], 8, 79, none, none],
            [gpus[1]["uuid"], 8, 48, none, none],
        ]
    )
    # per GPU, in scenario order
    assert [e[2] for e in out["first"] if e[0] == gpus[0]["uuid"]] == [13, 79]
    name, waited = out["timeout"]
    assert name == "NVMLError_Timeout"
    assert 0.25 <= waited < 5
    uuid, xid, latency = out["late"]
    assert (uuid, xid) == (gpus[1]["uuid"], 94)
    assert 0.2 <= latency < 5
    assert out["polls"] > 0
    assert out["after"] == []


EVENT_WAIT_BLOCKS = textwrap.dedent(
    """
    import ctypes, json, os, resource, threading, time
    import pynvml as N
    from helpers import write_scenario

    path = os.environ["TFGPUD_FAKE_DRIVER"]
    gpus = json.loads(os.environ["GPUS"])
    N.nvmlInit()
    h = N.nvmlDeviceGetHandleByIndex(0)
    es = N.nvmlEventSetCreate()
    N.nvmlDeviceRegisterEvents(h, N.nvmlEventTypeXidCriticalError, es)
    out = {}

    def idle_wait():  # what this thread spends in a 2 s wait that nothing ends early
        r0, c0 = resource.getrusage(resource.RUSAGE_THREAD), time.thread_time()
        try:
            N.nvmlEventSetWait_v2(es, 2000)
            return "event"
        except N.NVMLError_Timeout:
            r1 = resource.getrusage(resource.RUSAGE_THREAD)
            return {"cpu_s": time.thread_time() - c0, "nvcsw": r1.ru_nvcsw - r0.ru_nvcsw}

    out["idle"] = idle_wait()

    class DataV1(ctypes.Structure):
        _fields_ = [("device", ctypes.c_void_p), ("eventType", ctypes.c_ulonglong),
                    ("eventData", ctypes.c_ulonglong)]
    legacy = N._nvmlGetFunctionPointer("nvmlEventSetWait")

    def wait_v2():
        return N.nvmlEventSetWait_v2(es, 10000).eventData
    def wait_v1():
        d = DataV1()
        assert legacy(es, ctypes.byref(d), ctypes.c_uint(10000)) == 0
        return d.eventData

    # an Xid written while a wait is in progress: delivered when the file changes
    for name, wait, xid in (("v2", wait_v2, 31), ("v1", wait_v1, 43)):
        written = []
        def rewrite():
            time.sleep(0.5)
            gpus[0]["xids"] = gpus[0].get("xids", []) + [xid]
            write_scenario(path, gpus)
            written.append(time.monotonic())
        t = threading.Thread(target=rewrite)
        t.start()
        got = wait()
        returned = time.monotonic()
        t.join()
        out[name] = [got, returned - written[0]]

    # idle again after those changes: re-targeting the watches on a change must not itself
    # count as one (each removed watch queues an IN_IGNORED event)
    out["idle_after"] = idle_wait()
    print(json.dumps(out))
    """
)


def test_event_wait_blocks_until_the_scenario_changes(
    fakedriver: Path, scenario_path: Path
) -> None:
    """The wait sleeps while nothing is due (it does not poll) and wakes when the file changes."""
    gpus: list[dict[str, Any]] = [{"uuid": "GPU-00000000-0000-0000-0000-0000000000b0"}]
    write_scenario(scenario_path, gpus)
    result = run_python(EVENT_WAIT_BLOCKS, scenario=scenario_path, env={"GPUS": json.dumps(gpus)})
    assert result.returncode == 0, result.stderr
    out = result.data
    # 2 s of waiting: a 10 ms poll costs ~200 wake-ups and several ms of CPU
    for idle in ("idle", "idle_after"):
        assert out[idle]["nvcsw"] < 20, out
        assert out[idle]["cpu_s"] < 0.005, out
    for name, xid in (("v2", 31), ("v1", 43)):
        got, latency = out[name]
        assert got == xid
        assert latency < 1.0, out


def test_event_wait_follows_a_symlinked_scenario(fakedriver: Path, tmp_path: Path) -> None:
    """A scenario path that is a symlink: a rewrite of the file it points to wakes the wait."""
    gpus: list[dict[str, Any]] = [{"uuid": "GPU-00000000-0000-0000-0000-0000000000d0"}]
    (tmp_path / "real").mkdir()
    target = write_scenario(tmp_path / "real" / "machine.toml", gpus)
    link = tmp_path / "scenario.toml"
    link.symlink_to(target)
    code = textwrap.dedent(
        """
        import json, os, threading, time
        import pynvml as N
        from helpers import write_scenario

        N.nvmlInit()
        es = N.nvmlEventSetCreate()
        h = N.nvmlDeviceGetHandleByIndex(0)
        N.nvmlDeviceRegisterEvents(h, N.nvmlEventTypeXidCriticalError, es)
        gpus = json.loads(os.environ["GPUS"])
        written = []
        def rewrite():
            time.sleep(0.3)
            write_scenario(os.environ["TARGET"], [{**gpus[0], "xids": [62]}])
            written.append(time.monotonic())
        t = threading.Thread(target=rewrite)
        t.start()
        xid = N.nvmlEventSetWait_v2(es, 10000).eventData
        returned = time.monotonic()
        t.join()
        print(json.dumps([xid, returned - written[0]]))
        """
    )
    result = run_python(code, scenario=link, env={"GPUS": json.dumps(gpus), "TARGET": str(target)})
    assert result.returncode == 0, result.stderr
    xid, latency = result.data
    assert xid == 62 and latency < 1.0, result.data


FORKED_WAIT = textwrap.dedent(
    """
    import json, os, threading, time
    import pynvml as N
    from helpers import write_scenario

    path = os.environ["TFGPUD_FAKE_DRIVER"]
    gpus = json.loads(os.environ["GPUS"])
    N.nvmlInit()
    es = N.nvmlEventSetCreate()
    N.nvmlDeviceRegisterEvents(N.nvmlDeviceGetHandleByIndex(0), N.nvmlEventTypeXidCriticalError, es)
    # the parent's thread is asleep in the wait (leading it) when the process forks
    parent = threading.Thread(target=lambda: N.nvmlEventSetWait_v2(es, 3000))
    parent.start()
    time.sleep(0.3)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        t0 = time.monotonic()
        try:
            res = [N.nvmlEventSetWait_v2(es, 10000).eventData, time.monotonic() - t0]
        except N.NVMLError as e:
            res = [str(e), time.monotonic() - t0]
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    time.sleep(0.3)
    write_scenario(path, [{**gpus[0], "xids": [92]}])
    _, status = os.waitpid(pid, 0)
    parent.join()
    print(os.read(r, 1000).decode())
    """
)


def test_event_wait_in_a_forked_child(fakedriver: Path, scenario_path: Path) -> None:
    """A child forked while a parent thread waits has its own watch: not the parent's."""
    gpus: list[dict[str, Any]] = [{"uuid": "GPU-00000000-0000-0000-0000-0000000000e0"}]
    write_scenario(scenario_path, gpus)
    result = run_python(FORKED_WAIT, scenario=scenario_path, env={"GPUS": json.dumps(gpus)})
    assert result.returncode == 0, result.stderr
    xid, waited = result.data
    assert xid == 92 and waited < 1.5, result.data


EVENT_WAITS_IN_THREADS = textwrap.dedent(
    """
    import json, os, threading, time
    import pynvml as N
    from helpers import write_scenario

    path = os.environ["TFGPUD_FAKE_DRIVER"]
    gpus = json.loads(os.environ["GPUS"])
    N.nvmlInit()
    sets = []
    for i in range(2):
        es = N.nvmlEventSetCreate()
        h = N.nvmlDeviceGetHandleByIndex(i)
        N.nvmlDeviceRegisterEvents(h, N.nvmlEventTypeXidCriticalError, es)
        sets.append(es)
    got = {}

    def waiter(name, es, timeout_ms):
        try:
            got[name] = [N.nvmlEventSetWait_v2(es, timeout_ms).eventData, time.monotonic()]
        except N.NVMLError_Timeout:
            got[name] = ["timeout", time.monotonic()]

    def add_xids(xids):
        for i, xid in xids.items():
            gpus[i]["xids"] = gpus[i].get("xids", []) + [xid]
        write_scenario(path, gpus)
        return time.monotonic()

    # a short wait and a long one: the long one goes on after the short one timed out
    short = threading.Thread(target=waiter, args=("short", sets[0], 300))
    long_ = threading.Thread(target=waiter, args=("long", sets[1], 10000))
    short.start()
    time.sleep(0.1)
    long_.start()
    time.sleep(0.7)
    written = add_xids({1: 45})
    short.join()
    long_.join()
    out = {"short": got["short"][0], "long": [got["long"][0], got["long"][1] - written]}

    # two long waits at once, one change for both
    threads = [threading.Thread(target=waiter, args=(f"w{i}", sets[i], 10000)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    written = add_xids({0: 13, 1: 48})
    for t in threads:
        t.join()
    out["both"] = [[got[f"w{i}"][0], got[f"w{i}"][1] - written] for i in range(2)]
    print(json.dumps(out))
    """
)


def test_event_waits_in_several_threads(fakedriver: Path, scenario_path: Path) -> None:
    """Waits in several threads each get their event promptly, also after another wait ended."""
    gpus: list[dict[str, Any]] = [
        {"uuid": f"GPU-00000000-0000-0000-0000-0000000000c{i}"} for i in range(2)
    ]
    write_scenario(scenario_path, gpus)
    result = run_python(
        EVENT_WAITS_IN_THREADS, scenario=scenario_path, env={"GPUS": json.dumps(gpus)}
    )
    assert result.returncode == 0, result.stderr
    out = result.data
    assert out["short"] == "timeout"
    xid, latency = out["long"]
    assert xid == 45 and latency < 1.0, out
    assert [xid for xid, _ in out["both"]] == [13, 48]
    assert all(latency < 1.0 for _, latency in out["both"]), out


MALFORMED = [
    ("missing", None, None, "cannot read scenario: No such file or directory"),
    (
        "wrong type",
        'driver_version = "1"\n\n[[gpu]]\nname = "x"\nmemory_total = "80GB"\n',
        5,
        "expected integer for key 'memory_total'",
    ),
    ("unknown key", '[[gpu]]\nname = "x"\nfan = 3\n', 3, "unknown key 'fan' in [[gpu]]"),
    ("plain table", "[gpu]\n", 1, "only [[gpu]] tables are supported"),
    ("other table", "[[cpu]]\n", 1, "unknown table '[[cpu]]'"),
    ("float", "[[gpu]]\ntemperature = 41.5\n", 2, "floats are not supported"),
    ("duplicate", "[[gpu]]\nlost = true\nlost = false\n", 3, "duplicate key 'lost'"),
    ("bad init_error", 'init_error = "BROKEN"\n', 1, "init_error must be one of"),
    ("unterminated", 'nvml_version = "12.5\n', 1, "unterminated string"),
    ("negative", "[[gpu]]\npower_mw = -1\n", 2, "out of range"),
    ("cudnn_version 0", "cudnn_version = 0\n", 1, "out of range [1, 2147483647]"),
    ("cudart_version text", 'cudart_version = "12.5"\n', 1, "expected integer for key 'cudart"),
    (
        "parallel arrays",
        "[[gpu]]\nprocess_pids = [1, 2]\nprocess_memory = [\n  10,\n]\n",
        3,
        "process_pids has 2 elements but process_memory has 1",
    ),
    (
        "same uuid",
        '[[gpu]]\nuuid = "GPU-1"\n[[gpu]]\nuuid = "GPU-1"\n',
        4,
        "uuid 'GPU-1' is already used",
    ),
    ("bad pci", '[[gpu]]\npci_bus_id = "0000:01:00"\n', 2, "pci_bus_id '0000:01:00'"),
    ("garbage", "\x00\x01\x02", 1, "NUL byte"),
]


@pytest.mark.parametrize(
    ("case", "text", "line", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_missing_or_malformed_scenario(
    fakedriver: Path,
    scenario_path: Path,
    case: str,
    text: str | None,
    line: int | None,
    reason: str,
) -> None:
    if text is not None:
        write_text_atomically(scenario_path, text)
    result = run_python(INIT, scenario=scenario_path)
    assert result.data == {"error": "NVMLError_Unknown", "value": 999}, result.stderr
    where = f"{scenario_path}:{line}: " if line else f"{scenario_path}: "
    lines = result.fakedriver_lines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fakedriver: {where}"), lines[0]
    assert reason in lines[0]


def test_unset_scenario_variable(fakedriver: Path) -> None:
    result = run_python(INIT, scenario=None)
    assert result.data == {"error": "NVMLError_Unknown", "value": 999}
    assert result.fakedriver_lines() == [
        "fakedriver: TFGPUD_FAKE_DRIVER is not set: no scenario to simulate"
    ]


def test_broken_then_fixed_scenario_recovers(fakedriver: Path, scenario_path: Path) -> None:
    write_text_atomically(scenario_path, "[[gpu]]\nname = 1\n")
    code = textwrap.dedent(
        """
        import json, os
        import pynvml as N
        from helpers import write_scenario
        out = []
        try:
            N.nvmlInit()
        except N.NVMLError as e:
            out.append(type(e).__name__)
        write_scenario(os.environ["TFGPUD_FAKE_DRIVER"], [{"name": "fixed"}])
        N.nvmlInit()
        out.append(N.nvmlDeviceGetName(N.nvmlDeviceGetHandleByIndex(0)))
        print(json.dumps(out))
        """
    )
    result = run_python(code, scenario=scenario_path)
    assert result.data == ["NVMLError_Unknown", "fixed"], result.stderr
    assert len(result.fakedriver_lines()) == 1


# --- libcuda ----------------------------------------------------------------------------------

CUDA = textwrap.dedent(
    """
    import ctypes, json
    cu = ctypes.CDLL("libcuda.so.1")
    def err(rc):
        p = ctypes.c_char_p()
        cu.cuGetErrorName(rc, ctypes.byref(p))
        return p.value.decode() if p.value else rc
    out = {"init": err(cu.cuInit(0))}
    v = ctypes.c_int()
    cu.cuDriverGetVersion(ctypes.byref(v))
    out["version"] = v.value
    n = ctypes.c_int(-1)
    out["count_rc"] = err(cu.cuDeviceGetCount(ctypes.byref(n)))
    out["devices"] = []
    for i in range(max(n.value, 0)):
        dev = ctypes.c_int()
        assert cu.cuDeviceGet(ctypes.byref(dev), i) == 0
        name = ctypes.create_string_buffer(256)
        cu.cuDeviceGetName(name, 256, dev)
        attrs = {}
        for a in (75, 76, 16, 10):
            x = ctypes.c_int()
            assert cu.cuDeviceGetAttribute(ctypes.byref(x), a, dev) == 0
            attrs[a] = x.value
        mem = ctypes.c_size_t()
        cu.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
        pci = ctypes.create_string_buffer(32)
        cu.cuDeviceGetPCIBusId(pci, 32, dev)
        uuid = ctypes.create_string_buffer(16)
        cu.cuDeviceGetUuid(uuid, dev)
        out["devices"].append([name.value.decode(), attrs, mem.value, pci.value.decode(),
                               uuid.raw.hex()])
    s = ctypes.c_char_p()
    cu.cuGetErrorString(100, ctypes.byref(s))
    out["no_device_text"] = s.value.decode()
    fn = ctypes.c_void_p()
    out["proc_known"] = cu.cuGetProcAddress(b"cuDeviceTotalMem", ctypes.byref(fn), 12040, 0)
    out["proc_known_is_v2"] = fn.value == ctypes.cast(cu.cuDeviceTotalMem_v2, ctypes.c_void_p).value
    out["proc_unknown"] = cu.cuGetProcAddress(b"cuNoSuchThing", ctypes.byref(fn), 12040, 0)
    ctx = ctypes.c_void_p()
    out["ctx"] = err(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0))
    print(json.dumps(out))
    """
)


def test_libcuda_enumeration(fakedriver: Path, scenario_path: Path) -> None:
    write_scenario(
        scenario_path,
        [
            {
                "name": "NVIDIA H100 80GB HBM3",
                "uuid": "GPU-0123abcd-4567-89ab-cdef-0123456789ab",
                "memory_total": 80 * GiB,
                "cc_major": 9,
                "cc_minor": 0,
                "pci_bus_id": "00000000:3B:00.0",
            },
            {"lost": True},
            {"name": "Tesla T4", "cc_major": 7, "cc_minor": 5},
        ],
        cuda_driver_version=12080,
    )
    result = run_python(CUDA, scenario=scenario_path)
    assert result.returncode == 0, result.stderr
    out = result.data
    assert out["init"] == "CUDA_SUCCESS"
    assert out["version"] == 12080
    assert out["count_rc"] == "CUDA_SUCCESS"
    h100, t4 = out["devices"]  # the lost GPU is not enumerated
    assert h100 == [
        "NVIDIA H100 80GB HBM3",
        {"75": 9, "76": 0, "16": 108, "10": 32},
        80 * GiB,
        "0000:3B:00.0",
        "0123abcd456789abcdef0123456789ab",
    ]
    assert t4[0] == "Tesla T4"
    assert t4[1]["75"] == 7
    assert t4[1]["76"] == 5
    assert t4[3] == "0000:03:00.0"
    assert out["no_device_text"] == "no CUDA-capable device is detected"
    assert out["proc_known"] == 0
    assert out["proc_known_is_v2"] is True
    assert out["proc_unknown"] == 500
    assert out["ctx"] == "CUDA_ERROR_NOT_SUPPORTED"


@pytest.mark.parametrize(
    ("top", "env", "expected"),
    [
        ({"cuda_init_error": 100}, {}, "CUDA_ERROR_NO_DEVICE"),
        ({"cuda_init_error": 804}, {}, "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE"),
        ({"init_error": "DRIVER_NOT_LOADED"}, {}, "CUDA_ERROR_NO_DEVICE"),
        ({"init_error": "NO_PERMISSION"}, {}, "CUDA_ERROR_NO_DEVICE"),
        ({"init_error": "LIB_RM_VERSION_MISMATCH"}, {}, "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH"),
        ({"init_error": "UNKNOWN"}, {}, "CUDA_ERROR_UNKNOWN"),
        ({}, {"CUDA_VISIBLE_DEVICES": "-1"}, "CUDA_ERROR_NO_DEVICE"),
        ({}, {"CUDA_VISIBLE_DEVICES": ""}, "CUDA_ERROR_NO_DEVICE"),
    ],
)
def test_cuinit_errors(
    fakedriver: Path,
    scenario_path: Path,
    top: dict[str, Any],
    env: dict[str, str],
    expected: str,
) -> None:
    write_scenario(scenario_path, [{}], **top)
    result = run_python(CUDA, scenario=scenario_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.data["init"] == expected
    assert result.data["count_rc"] == "CUDA_ERROR_NOT_INITIALIZED"


def test_cuda_visible_devices_selects_and_orders(fakedriver: Path, scenario_path: Path) -> None:
    write_scenario(
        scenario_path,
        [{"name": "zero"}, {"name": "one", "uuid": "GPU-11111111-aaaa"}, {"name": "two"}],
    )
    result = run_python(
        CUDA, scenario=scenario_path, env={"CUDA_VISIBLE_DEVICES": "2,GPU-1111,-1,0"}
    )
    assert result.returncode == 0, result.stderr
    assert [d[0] for d in result.data["devices"]] == ["two", "one"]


def test_malformed_scenario_fails_cuinit(fakedriver: Path, scenario_path: Path) -> None:
    write_text_atomically(scenario_path, "[[gpu]]\nname = 1\n")
    result = run_python(CUDA, scenario=scenario_path)
    assert result.data["init"] == "CUDA_ERROR_UNKNOWN"
    assert result.fakedriver_lines() == [
        f"fakedriver: {scenario_path}:2: expected string for key 'name'"
    ]


# --- gpustat and nvitop -------------------------------------------------------------------------

FOUR_GPUS = [
    {"name": "NVIDIA H100 80GB HBM3", "memory_total": 80 * GiB, "memory_used": 10 * GiB},
    {"name": "NVIDIA A100-SXM4-40GB", "memory_total": 40 * GiB, "memory_used": 1536 * MiB},
    {"name": "Tesla T4", "memory_total": 15 * GiB, "memory_used": 0, "temperature": 71},
    {
        "name": "NVIDIA L4",
        "memory_total": 24 * GiB,
        "memory_used": 20 * GiB,
        "process_pids": [os.getpid()],
        "process_memory": [20 * GiB],
    },
]


def _run_tool(args: list[str], scenario: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        env=fakedriver_env(scenario, extra={"COLUMNS": "120", "TERM": "dumb"}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_gpustat(fakedriver: Path, scenario_path: Path) -> None:
    write_scenario(scenario_path, FOUR_GPUS)
    proc = _run_tool([str(Path(sys.executable).parent / "gpustat"), "--no-color"], scenario_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "550.54.15" in lines[0]
    rows = lines[1:]
    assert len(rows) == 4
    for i, (gpu, row) in enumerate(zip(FOUR_GPUS, rows, strict=True)):
        assert row.startswith(f"[{i}] {gpu['name']}")
        used, total = gpu["memory_used"] // MiB, gpu["memory_total"] // MiB
        assert f"{used:>5} / {total:>5} MB" in row, row
    assert "71°C" in rows[2]
    proc = _run_tool([str(Path(sys.executable).parent / "gpustat"), "--json"], scenario_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [g["name"] for g in data["gpus"]] == [g["name"] for g in FOUR_GPUS]
    assert [g["processes"] for g in data["gpus"]][3][0]["pid"] == os.getpid()


def test_nvitop(fakedriver: Path, scenario_path: Path) -> None:
    write_scenario(scenario_path, FOUR_GPUS)
    proc = _run_tool([sys.executable, "-m", "nvitop", "--once"], scenario_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Driver Version: 550.54.15" in out
    assert "CUDA Driver Version: 12.4" in out
    for short in ("H100 80GB HBM3", "A100-SXM4-40GB", "Tesla T4", "L4"):
        assert short in out
    assert "10.00GiB / 80.00GiB" in out or "10240MiB / 80.00GiB" in out, out

    code = textwrap.dedent(
        """
        import json
        from nvitop import Device
        print(json.dumps([[d.name(), d.memory_total(), d.memory_used(), d.uuid(),
                           d.cuda_compute_capability()] for d in Device.all()]))
        """
    )
    result = run_python(code, scenario=scenario_path)
    assert result.returncode == 0, result.stderr
    assert [row[:3] for row in result.data] == [
        [g["name"], g["memory_total"], g["memory_used"]] for g in FOUR_GPUS
    ]


# --- TensorFlow ---------------------------------------------------------------------------------

TF_LIST = "import tensorflow as tf; print(tf.config.list_physical_devices('GPU'))"


def _run_tensorflow(scenario: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", TF_LIST],
        env=fakedriver_env(scenario, extra={"TF_CPP_MIN_LOG_LEVEL": "0"}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_tensorflow_cuinit_talks_to_fake_driver(fakedriver: Path, scenario_path: Path) -> None:
    write_scenario(scenario_path, FOUR_GPUS)
    out = _run_tensorflow(scenario_path)
    assert "failed call to cuInit" not in out
    assert "(303)" not in out
    # cuInit worked: TF went on to look for the CUDA runtime libraries, which are not installed
    assert "Cannot dlopen some GPU libraries" in out or "cudaGetRuntimeVersion" in out

    write_scenario(scenario_path, FOUR_GPUS, cuda_init_error=100)
    out = _run_tensorflow(scenario_path)
    assert "failed call to cuInit" in out
    assert "CUDA_ERROR_NO_DEVICE" in out
