"""Every finding code the rules emit, from fixture snapshots and probe results."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from helpers import emitted_codes

from tfgpud.config import Config, parse_config
from tfgpud.diagnosis import cpu_fallback_envs, diagnose, worst_severity
from tfgpud.model import (
    DiscoverySummary,
    Finding,
    GpuProcess,
    GpuProcessFacts,
    GpuReading,
    KnownGpu,
    LibraryCheck,
    NvmlReading,
    PciGpu,
    PciReading,
    ProbeStatus,
    SearchDir,
    Severity,
    Snapshot,
    TfEnvRecord,
    TfGpu,
    TfProbeResult,
    TfProcess,
    WorkloadScan,
    XidEvent,
    frozen_map,
)

NOW = 1_800_000_000.0
UUID0 = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
UUID1 = "GPU-bbbbbbbb-1111-1111-1111-111111111111"
PY = "/opt/research/bin/python"
GPU_BUILD = {
    "cuda_compute_capabilities": "sm_60,sm_70,sm_80,sm_89,compute_90",
    "cuda_version": "12.5.1",
    "cudnn_version": "9",
    "is_cuda_build": "True",
    "is_rocm_build": "False",
    "is_tensorrt_build": "False",
}
CPU_BUILD = {"is_cuda_build": "False", "is_rocm_build": "False", "is_tensorrt_build": "False"}
SONAMES = [
    ("cudart", "libcudart.so.12"),
    ("cublas", "libcublas.so.12"),
    ("cublasLt", "libcublasLt.so.12"),
    ("cufft", "libcufft.so.11"),
    ("cusolver", "libcusolver.so.11"),
    ("cusparse", "libcusparse.so.12"),
    ("cudnn", "libcudnn.so.9"),
]
PIP_DIRS = tuple(
    f"/opt/research/lib/python3.11/site-packages/nvidia/{d}/lib"
    for d in ("cublas", "cuda_runtime", "cudnn", "cufft", "cusolver", "cusparse")
)
CONFIG = Config()


def libs(missing: set[str] = frozenset(), libcuda: bool = True) -> tuple[LibraryCheck, ...]:
    out = []
    for name, soname in SONAMES:
        if name in missing:
            err = f"{soname}: cannot open shared object file: No such file or directory"
            out.append(LibraryCheck(name, soname, False, None, err))
        else:
            out.append(LibraryCheck(name, soname, True, f"{PIP_DIRS[0]}/{soname}"))
    if libcuda:
        out.append(LibraryCheck("cuda", "libcuda.so.1", True, "/usr/lib/libcuda.so.550.54.14"))
    else:
        err = "libcuda.so.1: cannot open shared object file: No such file or directory"
        out.append(LibraryCheck("cuda", "libcuda.so.1", False, None, err))
    return tuple(out)


def probe(**kw: Any) -> TfProbeResult:
    base: dict[str, Any] = {
        "env": "research",
        "python": PY,
        "status": ProbeStatus.OK,
        "started_at": NOW - 10,
        "duration_seconds": 3.1,
        "tf_version": "2.21.0",
        "build_info": frozen_map(GPU_BUILD),
        "gpus": (TfGpu("/physical_device:GPU:0"), TfGpu("/physical_device:GPU:1")),
        "packages": frozen_map(
            {"tensorflow": "2.21.0", "nvidia-cudnn-cu12": "9.3.0.75", "nvidia-cublas-cu12": "12.5"}
        ),
        "libraries": libs(),
        "library_search_dirs": PIP_DIRS,
        "environment": frozen_map({"TF_CPP_MIN_LOG_LEVEL": "0"}),
    }
    for key in ("build_info", "packages", "environment", "device_access", "loader_failures"):
        if key in kw and isinstance(kw[key], dict):
            kw[key] = frozen_map(kw[key])
    base.update(kw)
    return TfProbeResult(**base)


def gpu(i: int, uuid: str, **kw: Any) -> GpuReading:
    base: dict[str, Any] = {
        "index": i,
        "uuid": uuid,
        "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": f"00000000:0{i + 1}:00.0",
        "memory_total_bytes": 80 * 1024**3,
        "memory_used_bytes": 1024**3,
        "compute_capability": (8, 0),
    }
    base.update(kw)
    return GpuReading(**base)


PCI2 = PciReading(
    gpus=(
        PciGpu("0000:01:00.0", "0x2330", "0x030200", "nvidia"),
        PciGpu("0000:02:00.0", "0x2330", "0x030200", "nvidia"),
    ),
    nvidia_module_version="550.54.14",
    device_nodes=("nvidia-uvm", "nvidia0", "nvidia1", "nvidiactl"),
)
NVML2 = NvmlReading(
    up=True,
    library_path="/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.54.14",
    driver_version="550.54.14",
    cuda_driver_version=12040,
    gpus=(gpu(0, UUID0), gpu(1, UUID1)),
    device_count=2,
)
NO_NVML = NvmlReading(up=False, error="LIBRARY_NOT_FOUND", error_code=12)


def snap(**kw: Any) -> Snapshot:
    base: dict[str, Any] = {"taken_at": NOW, "pci": PCI2, "nvml": NVML2, "tf": (probe(),)}
    base.update(kw)
    return Snapshot(**base)


def codes(findings: tuple[Finding, ...]) -> set[str]:
    return {f.code for f in findings}


def one(findings: tuple[Finding, ...], code: str, subject: str | None = None) -> Finding:
    hits = [f for f in findings if f.code == code and (subject is None or f.subject == subject)]
    assert len(hits) == 1, f"expected one {code}, got {[f.key for f in findings]}"
    return hits[0]


def text(f: Finding) -> str:
    return "\n".join([f.summary, *f.evidence, f.fix])


# --- healthy baselines: a rule that fires here is a false alarm -------------------------------


def test_healthy_gpu_machine_has_no_findings() -> None:
    assert diagnose(snap(), CONFIG) == ()


def test_no_nvidia_gpu_is_info_and_no_cpu_fallback() -> None:
    s = snap(
        pci=PciReading(),
        nvml=NO_NVML,
        tf=(probe(gpus=(), libraries=libs(missing={n for n, _ in SONAMES}, libcuda=False)),),
    )
    found = diagnose(s, CONFIG)
    assert codes(found) == {"no-nvidia-gpu"}
    f = one(found, "no-nvidia-gpu", "host")
    assert f.severity is Severity.INFO
    assert "LIBRARY_NOT_FOUND" in text(f)
    assert worst_severity(found) is Severity.INFO
    assert cpu_fallback_envs(found) == frozenset()


# --- hardware / driver -------------------------------------------------------------------------


def test_nvml_library_missing_is_critical_when_pci_has_gpus() -> None:
    found = diagnose(snap(nvml=NO_NVML, tf=()), CONFIG)
    f = one(found, "nvml-library-missing", "host")
    assert f.severity is Severity.CRITICAL
    assert "2 NVIDIA GPU" in f.summary and "0000:01:00.0" in text(f)
    assert "install" in f.fix.lower() and "--gpus all" in f.fix
    assert "no-nvidia-gpu" not in codes(found)


def test_nvml_library_missing_silent_without_gpus() -> None:
    found = diagnose(snap(pci=PciReading(), nvml=NO_NVML, tf=()), CONFIG)
    assert "nvml-library-missing" not in codes(found)


def test_driver_not_loaded() -> None:
    pci = replace(PCI2, nvidia_module_version=None, device_nodes=())
    nvml = NvmlReading(up=False, error="DRIVER_NOT_LOADED", error_code=9)
    f = one(diagnose(snap(pci=pci, nvml=nvml, tf=()), CONFIG), "driver-not-loaded", "host")
    assert f.severity is Severity.CRITICAL
    assert "/sys/module/nvidia: absent" in f.evidence
    assert "modprobe nvidia" in f.fix and "dkms" in f.fix


def test_driver_library_mismatch_from_nvml_error() -> None:
    nvml = NvmlReading(
        up=False,
        error="LIB_RM_VERSION_MISMATCH",
        error_code=18,
        library_path="/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.90.07",
    )
    f = one(diagnose(snap(nvml=nvml, tf=()), CONFIG), "driver-library-mismatch", "host")
    assert "kernel module 550.54.14" in f.summary and "library 550.90.07" in f.summary
    assert "Reboot" in f.fix


def test_driver_library_mismatch_from_versions_only() -> None:
    nvml = replace(NVML2, library_path="/usr/lib/libnvidia-ml.so.555.42.02")
    assert "driver-library-mismatch" in codes(diagnose(snap(nvml=nvml, tf=()), CONFIG))


def test_nouveau_bound() -> None:
    pci = PciReading(
        gpus=(PciGpu("0000:01:00.0", "0x1b80", "0x030000", "nouveau"),), nouveau_loaded=True
    )
    nvml = NvmlReading(up=False, error="DRIVER_NOT_LOADED")
    f = one(diagnose(snap(pci=pci, nvml=nvml, tf=()), CONFIG), "nouveau-bound", "host")
    assert "kernel driver nouveau" in text(f)
    assert "blacklist nouveau" in f.fix


def test_device_nodes_missing() -> None:
    pci = replace(PCI2, device_nodes=())
    nvml = NvmlReading(up=False, error="NO_PERMISSION")
    found = diagnose(snap(pci=pci, nvml=nvml, tf=()), CONFIG)
    f = one(found, "device-nodes-missing", "host")
    assert "/dev/nvidiactl" in f.summary and "/dev/nvidia0..1" in f.summary
    assert "--gpus all" in f.fix and "nvidia-modprobe" in f.fix


def test_device_nodes_present_is_quiet() -> None:
    assert "device-nodes-missing" not in codes(diagnose(snap(), CONFIG))


def test_nvml_no_permission() -> None:
    nvml = NvmlReading(up=False, error="NO_PERMISSION", error_code=4)
    f = one(diagnose(snap(nvml=nvml, tf=()), CONFIG), "nvml-no-permission", "host")
    assert "ls -l /dev/nvidia*" in f.fix and "usermod" in f.fix


PROC_VERSION = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024"
)
PCI2_LOADED = replace(PCI2, proc_driver_version=PROC_VERSION)
BASELINE2 = (KnownGpu(UUID0), KnownGpu(UUID1))


@pytest.mark.parametrize(
    ("nvml", "says"),
    [
        (NvmlReading(up=False, error="UNKNOWN", error_code=999), "whole driver: UNKNOWN (999)"),
        (NvmlReading(up=False, error="DEVICE_COUNT_FAILED"), "counting the GPUs failed"),
        (NvmlReading(up=False, error="CODE_31337", error_code=31337), "CODE_31337 (31337)"),
        (NvmlReading(up=False, error="CORRUPTED_INFOROM", error_code=14), "CORRUPTED_INFOROM"),
        (NvmlReading(up=False, error="IN_USE", error_code=19), "IN_USE (19)"),
        (NvmlReading(up=False), "no error name"),
    ],
)
def test_nvml_unusable_for_an_error_no_other_rule_names(nvml: NvmlReading, says: str) -> None:
    found = diagnose(snap(pci=PCI2_LOADED, nvml=nvml, tf=()), CONFIG)
    f = one(found, "nvml-unusable", "host")
    assert f.severity is Severity.CRITICAL
    assert says in f.evidence[0]
    for line in (
        "PCI 0000:01:00.0: NVIDIA device 0x2330, kernel driver nvidia",
        "/sys/module/nvidia/version: 550.54.14",
        f"/proc/driver/nvidia/version: {PROC_VERSION}",
        "/dev nodes present: nvidia-uvm nvidia0 nvidia1 nvidiactl",
    ):
        assert line in f.evidence
    assert "`nvidia-smi`" in f.fix and "`sudo dmesg | grep -iE 'NVRM|Xid'`" in f.fix
    # The other driver rules have nothing to say: this is the only driver finding.
    assert codes(found) == {"nvml-unusable"}


def test_nvml_unusable_fix_follows_the_error() -> None:
    def fix(error: str) -> str:
        nvml = NvmlReading(up=False, error=error)
        return one(diagnose(snap(nvml=nvml, tf=()), CONFIG), "nvml-unusable").fix

    for error in ("UNKNOWN", "DEVICE_COUNT_FAILED"):
        reset = fix(error)
        assert (
            "`sudo nvidia-smi -r -i ADDRESS`" in reset and "`sudo fuser -v /dev/nvidia*`" in reset
        )
        assert "0000:01:00.0 0000:02:00.0" in reset and "reboot" in reset
        assert "tfgpud cannot tell which GPU" in reset
    assert "`journalctl -u tfgpud -g nvmlDeviceGetCount`" in fix("DEVICE_COUNT_FAILED")
    assert "nvmlDeviceGetCount" not in fix("UNKNOWN")
    inforom = fix("CORRUPTED_INFOROM")
    assert "needs service" in inforom and "nvidia-smi -r" not in inforom
    for error in ("IN_USE", "INSUFFICIENT_RESOURCES"):
        held = fix(error)
        assert "holds the driver" in held and "`sudo fuser -v /dev/nvidia*`" in held
        assert "nvidia-smi -r" not in held
    other = fix("CODE_31337")
    assert (
        "no specific advice for NVML's error CODE_31337" in other and "nvidia-smi -r" not in other
    )


@pytest.mark.parametrize(
    ("error", "named_by"),
    [
        ("LIBRARY_NOT_FOUND", "nvml-library-missing"),
        ("DRIVER_NOT_LOADED", "driver-not-loaded"),
        ("LIB_RM_VERSION_MISMATCH", "driver-library-mismatch"),
        ("NO_PERMISSION", "nvml-no-permission"),
    ],
)
def test_nvml_unusable_leaves_the_errors_another_rule_names(error: str, named_by: str) -> None:
    nvml = NvmlReading(up=False, error=error)
    found = diagnose(snap(nvml=nvml, tf=(), baseline=BASELINE2), CONFIG)
    assert named_by in codes(found) and "nvml-unusable" not in codes(found)


def test_nvml_unusable_needs_gpus_here_and_nvml_down() -> None:
    unknown = NvmlReading(up=False, error="UNKNOWN", error_code=999)
    none = snap(pci=PciReading(), nvml=unknown, tf=())
    assert codes(diagnose(none, CONFIG)) == {"no-nvidia-gpu"}
    # No GPU on the bus, but the baseline or [expect] gpus says there are some.
    known = replace(none, baseline=BASELINE2)
    assert one(diagnose(known, CONFIG), "nvml-unusable").evidence[1].startswith("PCI bus: no")
    expected = replace(none, expected_gpus=2)
    cfg = parse_config("[expect]\ngpus = 2\n")
    assert "nvml-unusable" in codes(diagnose(expected, cfg))
    assert "nvml-unusable" not in codes(diagnose(snap(), CONFIG))
    assert "nvml-unusable" not in codes(diagnose(snap(nvml=None), CONFIG))


def test_gpu_lost() -> None:
    nvml = replace(NVML2, gpus=(gpu(0, UUID0), gpu(1, UUID1, lost=True, error="GPU_IS_LOST")))
    found = diagnose(snap(nvml=nvml, tf=(probe(gpus=(TfGpu("/physical_device:GPU:0"),)),)), CONFIG)
    f = one(found, "gpu-lost", UUID1)
    assert f.severity is Severity.CRITICAL and "00000000:02:00.0" in f.fix
    # The lost GPU is not a TF visibility problem: TF sees all the healthy one.
    assert "tf-partial-visibility" not in codes(found)


def test_gpu_vanished_names_uuid_name_and_address() -> None:
    baseline = (
        KnownGpu(UUID0, "NVIDIA H100 80GB HBM3", "00000000:01:00.0"),
        KnownGpu(UUID1, "NVIDIA H100 80GB HBM3", "00000000:02:00.0"),
    )
    nvml = replace(NVML2, gpus=(gpu(0, UUID0),))
    pci = replace(PCI2, gpus=PCI2.gpus[:1])
    tf = (probe(gpus=(TfGpu("/physical_device:GPU:0"),)),)
    found = diagnose(snap(nvml=nvml, pci=pci, baseline=baseline, tf=tf), CONFIG)
    f = one(found, "gpu-vanished", UUID1)
    assert "NVIDIA H100 80GB HBM3" in f.summary and "00000000:02:00.0" in f.summary
    assert "gone from the PCI bus too" in f.summary
    assert "gpu-vanished" not in {x.code for x in found if x.subject == UUID0}


def test_gpu_vanished_but_still_on_bus() -> None:
    baseline = (KnownGpu(UUID1, "NVIDIA H100", "00000000:02:00.0"),)
    nvml = replace(NVML2, gpus=(gpu(0, UUID0),))
    f = one(diagnose(snap(nvml=nvml, baseline=baseline, tf=()), CONFIG), "gpu-vanished", UUID1)
    assert "still on the PCI bus" in f.summary


def test_gpu_appeared_only_with_a_baseline() -> None:
    found = diagnose(snap(baseline=(KnownGpu(UUID0),), tf=()), CONFIG)
    f = one(found, "gpu-appeared", UUID1)
    assert f.severity is Severity.INFO
    assert "gpu-appeared" not in codes(diagnose(snap(baseline=(), tf=()), CONFIG))


def test_gpu_appeared_after_joining_an_existing_baseline_for_an_hour() -> None:
    def baseline(joined: float) -> tuple[KnownGpu, ...]:
        return (
            KnownGpu(UUID0, first_seen=NOW - 86400),
            KnownGpu(UUID1, first_seen=joined),
        )

    f = one(diagnose(snap(baseline=baseline(NOW - 600), tf=()), CONFIG), "gpu-appeared", UUID1)
    assert "joined the baseline at" in f.summary and UUID0 in f.evidence[0]
    # Joined more than an hour ago: old news.
    assert "gpu-appeared" not in codes(diagnose(snap(baseline=baseline(NOW - 7200), tf=()), CONFIG))
    # Learned together with the others on the first start: not "new".
    together = (KnownGpu(UUID0, first_seen=NOW - 5), KnownGpu(UUID1, first_seen=NOW - 5))
    assert "gpu-appeared" not in codes(diagnose(snap(baseline=together, tf=()), CONFIG))


def test_gpu_xid_critical_within_the_hour_only() -> None:
    events = (
        XidEvent(UUID0, 79, NOW - 60),
        XidEvent(UUID0, 13, NOW - 30),  # application error: ignored
        XidEvent(UUID1, 48, NOW - 7200),  # too old
        XidEvent(UUID1, 31, NOW - 10),  # application error: ignored
    )
    found = diagnose(snap(xid_events=events, tf=()), CONFIG)
    f = one(found, "gpu-xid-critical", UUID0)
    assert "79 (GPU has fallen off the bus)" in f.summary and "13" not in f.summary
    assert "reboot" in f.fix.lower()
    assert [x for x in found if x.code == "gpu-xid-critical" and x.subject == UUID1] == []


GIB = 1024**3


def shared_gpu(*procs: GpuProcess, used: int = 79 * GIB) -> GpuReading:
    return gpu(0, UUID0, memory_used_bytes=used, processes=procs)


def test_gpu_memory_pressure_names_tf_without_allow_growth() -> None:
    g = shared_gpu(GpuProcess(4242, 78 * GIB, "python"), GpuProcess(7, GIB, "Xorg"))
    nvml = replace(NVML2, gpus=(g, gpu(1, UUID1)))
    tfp = (TfProcess(4242, "gpu", user="ana", allow_growth=False, started_at=NOW - 999),)
    scan = WorkloadScan(gpu_process_users=MappingProxyType({4242: "ana", 7: "root"}))
    s = snap(nvml=nvml, pressure_since={UUID0: NOW - 600}, tf_processes=tfp, workloads=scan, tf=())
    f = one(diagnose(s, CONFIG), "gpu-memory-pressure", UUID0)
    assert f.severity is Severity.WARNING and f.cause is None
    assert "99%" in f.summary and "10 min" in f.summary and "shared by 2 processes" in f.summary
    assert f.evidence[1:4] == (
        "2 process(es) on this GPU:",
        "pid 4242 (python, user ana, TensorFlow): 78.0 GiB",
        "pid 7 (Xorg, user root): 1.0 GiB",
    )
    assert "pid 4242 is TensorFlow without memory growth" in text(f)
    assert "it holds 98% of this GPU" in text(f)
    assert "TF_FORCE_GPU_ALLOW_GROWTH=true" in f.fix and "4242" in f.fix
    assert "set_memory_growth" in f.fix
    assert [x.subject for x in diagnose(s, CONFIG) if x.code == "gpu-memory-pressure"] == [UUID0]


def test_one_busy_process_owning_its_gpu_is_not_memory_pressure() -> None:
    """TensorFlow maps nearly all memory of its GPU by default: a training job that owns the GPU
    keeps it 99% full for its whole life, and that is normal."""
    g = shared_gpu(GpuProcess(4242, 79 * GIB, "python"))
    tfp = (TfProcess(4242, "gpu", user="ana", allow_growth=False),)
    s = snap(nvml=replace(NVML2, gpus=(g,)), pressure_since={UUID0: NOW - 86400}, tf_processes=tfp)
    assert "gpu-memory-pressure" not in codes(diagnose(s, CONFIG))
    # Nor a full GPU whose processes NVML does not list (another PID namespace): no sharing seen.
    unseen = replace(s, nvml=replace(NVML2, gpus=(shared_gpu(),)))
    assert "gpu-memory-pressure" not in codes(diagnose(unseen, CONFIG))


def test_gpu_memory_pressure_growth_unknown_or_async_is_not_blamed() -> None:
    procs = tuple(GpuProcess(100 + i, (10 - i) * GIB, "python") for i in range(8))
    g = shared_gpu(*procs, used=78 * GIB)
    tfp = (
        TfProcess(100, "gpu", allow_growth=None),  # environ not readable
        TfProcess(
            101,
            "gpu",
            allow_growth=False,
            environment=frozen_map({"TF_GPU_ALLOCATOR": "cuda_malloc_async"}),
        ),
        TfProcess(102, "gpu", allow_growth=True),
    )
    s = snap(nvml=replace(NVML2, gpus=(g,)), pressure_since={UUID0: NOW - 600}, tf_processes=tfp)
    f = one(diagnose(s, CONFIG), "gpu-memory-pressure", UUID0)
    assert "pid 100 is TensorFlow; whether it uses memory growth is unknown" in text(f)
    assert "without memory growth" not in text(f)
    assert "3 more process(es): 12.0 GiB" in f.evidence  # 5 + 4 + 3 GiB beyond the top 5
    assert f.fix.startswith("Free memory")


def test_gpu_memory_pressure_clears_below_the_ratio_and_follows_the_config() -> None:
    g = shared_gpu(
        GpuProcess(1, 40 * GIB, "python"), GpuProcess(2, 38 * GIB, "python"), used=78 * GIB
    )
    s = snap(nvml=replace(NVML2, gpus=(g,)), pressure_since={UUID0: NOW - 600}, tf=())
    assert one(diagnose(s, CONFIG), "gpu-memory-pressure", UUID0).severity is Severity.WARNING
    # Below the ratio it clears, whatever pressure_since still says.
    low = replace(s, nvml=replace(NVML2, gpus=(replace(g, memory_used_bytes=40 * GIB),)))
    assert "gpu-memory-pressure" not in codes(diagnose(low, CONFIG))
    # for_seconds and pressure_ratio come from [memory].
    strict = parse_config("[memory]\npressure_ratio = 0.99\nfor_seconds = 30\n")
    assert "gpu-memory-pressure" not in codes(diagnose(s, strict))  # 97.5% < 99%
    quick = parse_config("[memory]\nfor_seconds = 30\n")
    young = replace(s, pressure_since={UUID0: NOW - 40})
    assert "gpu-memory-pressure" in codes(diagnose(young, quick))
    assert "gpu-memory-pressure" not in codes(diagnose(young, CONFIG))


def test_gpu_memory_pressure_needs_duration() -> None:
    g = shared_gpu(GpuProcess(1, 40 * GIB, "python"), GpuProcess(2, 39 * GIB, "python"))
    s = snap(nvml=replace(NVML2, gpus=(g,)), pressure_since={UUID0: NOW - 60}, tf=())
    assert "gpu-memory-pressure" not in codes(diagnose(s, CONFIG))


@pytest.mark.parametrize(
    ("error", "cvd"),
    [
        ("OOM when allocating tensor with shape[4096,4096]", None),
        ("CUDA_ERROR_OUT_OF_MEMORY: out of memory", "0"),
        ("failed to allocate: RESOURCE_EXHAUSTED", f"{UUID0[:12]}"),
    ],
)
def test_a_failed_allocation_is_critical_memory_pressure_and_explains_the_smoke_failure(
    error: str, cvd: str | None
) -> None:
    """The one failed allocation tfgpud can read is its own smoke test's: even with one process
    on the GPU, no memory to give is pressure, and it is why the smoke test failed."""
    g = shared_gpu(GpuProcess(4242, 79 * GIB, "python"))
    env = {"CUDA_VISIBLE_DEVICES": cvd} if cvd is not None else {}
    r = probe(smoke_ok=False, smoke_error=error, environment=env)
    found = diagnose(snap(nvml=replace(NVML2, gpus=(g, gpu(1, UUID1))), tf=(r,)), CONFIG)
    f = one(found, "gpu-memory-pressure", UUID0)
    assert f.severity is Severity.CRITICAL and f.cause is None
    assert "env(s) research could not allocate on it (99% full)" in f.summary
    assert (
        f"the smoke test of env `research` could not get memory on this GPU: {error}" in f.evidence
    )
    smoke = one(found, "tf-smoke-failed", "research")
    assert smoke.cause == "gpu-memory-pressure"
    assert [x.subject for x in found if x.code == "gpu-memory-pressure"] == [UUID0]


def test_a_failed_allocation_on_a_gpu_with_room_is_not_pressure() -> None:
    r = probe(smoke_ok=False, smoke_error="CUDA_ERROR_OUT_OF_MEMORY")  # both GPUs nearly empty
    found = diagnose(snap(tf=(r,)), CONFIG)
    assert "gpu-memory-pressure" not in codes(found)
    assert one(found, "tf-smoke-failed", "research").cause is None
    other = probe(smoke_ok=False, smoke_error="CUDA_ERROR_INVALID_PTX")
    full = replace(NVML2, gpus=(shared_gpu(GpuProcess(1, 79 * GIB, "python")),))
    assert "gpu-memory-pressure" not in codes(diagnose(snap(nvml=full, tf=(other,)), CONFIG))


KERNEL = "/home/ana/venv/bin/python -m ipykernel_launcher -f /home/ana/.local/share/jupyter/k.json"


def idle_snap(*procs: GpuProcess, idle_for: float = 3600, **kw: Any) -> Snapshot:
    g = replace(
        shared_gpu(*procs, used=sum(p.used_memory_bytes or 0 for p in procs) or 60 * GIB),
        utilization_gpu_ratio=0.0,
    )
    return snap(
        nvml=replace(NVML2, gpus=(g, gpu(1, UUID1, utilization_gpu_ratio=0.0))),
        idle_since={UUID0: NOW - idle_for, UUID1: NOW - idle_for},
        tf=(),
        **kw,
    )


def test_gpu_memory_held_idle_names_the_kernel_and_how_to_free_it() -> None:
    tfp = (TfProcess(4242, "gpu", user="ana", cmdline=KERNEL, allow_growth=False),)
    facts = {4242: GpuProcessFacts(4242, "ana", KERNEL, True)}
    s = idle_snap(
        GpuProcess(4242, 70 * GIB, "python3"),
        tf_processes=tfp,
        workloads=WorkloadScan(gpu_processes=MappingProxyType(facts)),
    )
    f = one(diagnose(s, CONFIG), "gpu-memory-held-idle", UUID0)
    assert f.severity is Severity.WARNING
    assert "pid 4242 (python3, user ana) holds 88% of its memory" in f.summary
    assert "idle for 60 min" in f.summary
    assert f.evidence[0].startswith("GPU utilisation <= 5% since ")
    assert "pid 4242 (python3), user ana: holds 70.0 GiB (88% of this GPU)" in f.evidence
    assert f"command: {KERNEL}" in f.evidence
    assert "TensorFlow: yes, without memory growth" in text(f)
    assert "notebook kernel pid 4242 (user ana)" in f.fix and "`kill 4242`" in f.fix
    assert "TF_FORCE_GPU_ALLOW_GROWTH=true" in f.fix and "set_memory_growth" in f.fix
    assert "memory_limit" in f.fix and "cull_idle_timeout" in f.fix
    # The other GPU is idle too, but holds nothing: no finding for it.
    assert [x.subject for x in diagnose(s, CONFIG) if x.code == "gpu-memory-held-idle"] == [UUID0]


def test_gpu_memory_held_idle_by_a_process_that_is_not_tensorflow() -> None:
    facts = {77: GpuProcessFacts(77, "bob", "/usr/bin/blender -b scene.blend", False)}
    s = idle_snap(
        GpuProcess(77, 50 * GIB, "blender"),
        workloads=WorkloadScan(gpu_processes=MappingProxyType(facts)),
    )
    f = one(diagnose(s, CONFIG), "gpu-memory-held-idle", UUID0)
    assert (
        "TensorFlow: no" in f.evidence and "command: /usr/bin/blender -b scene.blend" in f.evidence
    )
    assert "end or restart pid 77 (user bob)" in f.fix and "`kill 77`" in f.fix
    assert "memory limit" in f.fix and "TF_FORCE_GPU_ALLOW_GROWTH" not in f.fix


def test_gpu_memory_held_idle_with_growth_on_says_growth_returns_nothing() -> None:
    tfp = (TfProcess(5, "gpu", user="ana", cmdline="python train.py", allow_growth=True),)
    f = one(
        diagnose(idle_snap(GpuProcess(5, 50 * GIB, "python"), tf_processes=tfp), CONFIG),
        "gpu-memory-held-idle",
        UUID0,
    )
    assert "TensorFlow: yes, with memory growth" in text(f)
    assert "never gives memory back" in f.fix and "memory_limit" in f.fix


def test_gpu_memory_held_idle_thresholds() -> None:
    busy = GpuProcess(5, 30 * GIB, "python")
    # Below idle_hold_ratio (here 30 of 80 GiB = 38% < 50%): nothing.
    assert "gpu-memory-held-idle" not in codes(diagnose(idle_snap(busy), CONFIG))
    held = GpuProcess(5, 41 * GIB, "python")
    assert "gpu-memory-held-idle" in codes(diagnose(idle_snap(held), CONFIG))
    # Idle for less than idle_seconds (default 1800): nothing yet.
    assert "gpu-memory-held-idle" not in codes(diagnose(idle_snap(held, idle_for=600), CONFIG))
    cfg = parse_config("[memory]\nidle_seconds = 300\nidle_hold_ratio = 0.3\n")
    assert "gpu-memory-held-idle" in codes(diagnose(idle_snap(busy, idle_for=600), cfg))
    # A GPU that is not idle (no idle_since) holds memory for its work: nothing.
    working = replace(idle_snap(held), idle_since={})
    assert "gpu-memory-held-idle" not in codes(diagnose(working, CONFIG))


def test_gpu_memory_held_idle_without_per_process_figures_uses_the_gpus_memory() -> None:
    s = idle_snap(GpuProcess(9, None, "python"))
    f = one(diagnose(s, CONFIG), "gpu-memory-held-idle", UUID0)
    assert "(the GPU's used memory: NVML gives no per-process figure)" in text(f)
    assert "TensorFlow: unknown" in text(f)
    two = idle_snap(GpuProcess(9, None, "python"), GpuProcess(10, None, "python"))
    assert "gpu-memory-held-idle" not in codes(diagnose(two, CONFIG))


def test_shared_pressure_on_an_idle_gpu_is_a_consequence_of_the_idle_holder() -> None:
    s = idle_snap(
        GpuProcess(1, 60 * GIB, "python"),
        GpuProcess(2, 18 * GIB, "python"),
        pressure_since={UUID0: NOW - 600},
    )
    found = diagnose(s, CONFIG)
    assert one(found, "gpu-memory-held-idle", UUID0).cause is None
    assert one(found, "gpu-memory-pressure", UUID0).cause == "gpu-memory-held-idle"


TF_LIB = "/opt/research/lib/python3.11/site-packages/tensorflow/libtensorflow_framework.so.2"
RESEARCH_DIRS = (
    "/opt/research/lib/python3.11/site-packages/tensorflow-2.21.0.dist-info",
    "/opt/research/lib/python3.11/site-packages",
)


def test_a_fleet_of_cpu_jobs_is_eight_findings_and_one_for_the_rest() -> None:
    """200 TensorFlow workers on the CPU on purpose: not 200 findings, series and alerts (a
    churning fleet made a new series per job forever), but the 8 longest on the CPU and one
    finding naming the others."""
    procs = tuple(
        TfProcess(1000 + i, "cpu", user=f"u{i % 7}", started_at=NOW - 4000 + i) for i in range(200)
    )
    jobs = [f for f in diagnose(snap(tf_processes=procs), CONFIG) if f.code == "tf-job-on-cpu"]
    assert [f.subject for f in jobs] == [str(1000 + i) for i in range(8)] + ["other"]
    rest = jobs[-1]
    assert rest.summary.startswith("192 more TensorFlow job(s) (users u0, u1, u2, u3, u4, ...)")
    assert rest.evidence[0].startswith("pids (longest on the CPU first): 1008, 1009, 1010")
    assert rest.evidence[0].endswith("and 172 more")


def test_tf_job_on_cpu() -> None:
    procs = (
        TfProcess(
            100, "cpu", user="bob", cmdline="python train.py", started_at=NOW - 900, python=PY
        ),
        TfProcess(101, "cpu", started_at=NOW - 10),  # too young
        TfProcess(102, "gpu", started_at=NOW - 9000),
        TfProcess(103, "cpu", started_at=NOW - 9000, cpu_since=NOW - 60),  # just lost its GPU
    )
    found = diagnose(snap(tf_processes=procs), CONFIG)
    f = one(found, "tf-job-on-cpu", "100")
    assert f.severity is Severity.WARNING and "15 min" in f.summary and "bob" in f.summary
    assert f.evidence[:2] == (
        "pid 100, user bob: on the CPU for 15 min (running for 15 min)",
        "command: python train.py",
    )
    # The env probe sees the GPUs: the install is fine, the job keeps off them.
    assert "its env `research` (/opt/research/bin/python): the probe sees 2 GPU(s)" in text(f)
    assert f"tfgpud doctor --python {PY}" in f.fix
    assert {x.subject for x in found if x.code == "tf-job-on-cpu"} == {"100"}
    off = parse_config("[workloads]\nenabled = false\n")
    assert "tf-job-on-cpu" not in codes(diagnose(snap(tf_processes=procs), off))
    quick = parse_config("[workloads]\njob_on_cpu_seconds = 30\n")
    subjects = {x.subject for x in diagnose(snap(tf_processes=procs), quick)}
    assert {"100", "103"} <= subjects and "101" not in subjects


def test_tf_job_on_cpu_cites_the_env_probe_by_tensorflow_path() -> None:
    p = TfProcess(
        100,
        "cpu",
        user="bob",
        cmdline="python -m trainer --epochs 3",
        cpu_since=NOW - 3 * 3600,
        python="/usr/bin/python3.11",  # a venv's python resolves to the base interpreter
        tensorflow_library=TF_LIB,
    )
    broken = probe(
        gpus=(),
        libraries=libs({"cudnn"}),
        package_dirs=RESEARCH_DIRS,
        python="/opt/research/bin/python",
    )
    f = one(diagnose(snap(tf_processes=(p,), tf=(broken,)), CONFIG), "tf-job-on-cpu", "100")
    assert "3.0 h" in f.summary
    assert "its env `research` (/opt/research/bin/python): the probe sees 0 GPU(s)" in text(f)
    assert "tf-cpu-fallback" in text(f) and "tf-cuda-libs-missing" in text(f)
    assert "Fix env `research` first" in f.fix
    assert "tfgpud doctor --python /opt/research/bin/python3" in f.fix


def test_tf_job_on_cpu_hidden_by_its_cuda_visible_devices() -> None:
    p = TfProcess(
        100,
        "cpu",
        cmdline="/opt/research/bin/python train.py",
        cpu_since=NOW - 900,
        environment=frozen_map({"CUDA_VISIBLE_DEVICES": "-1"}),
    )
    f = one(diagnose(snap(tf_processes=(p,)), CONFIG), "tf-job-on-cpu", "100")
    assert "CUDA_VISIBLE_DEVICES='-1': 0 GPU(s) visible" in text(f)
    assert "hides every GPU" in f.fix


@pytest.mark.parametrize(
    "cvd", ["MIG-8d0f0a5e-1b2c-5d6e-9f00-112233445566", "MIG-GPU-aaaaaaaa-0000/1/0"]
)
def test_mig_devices_in_cuda_visible_devices_do_not_hide_the_gpus(cvd: str) -> None:
    nvml = replace(NVML2, gpus=(gpu(0, UUID0, mig_mode=True), gpu(1, UUID1)))
    p = TfProcess(
        100,
        "cpu",
        cmdline="/opt/research/bin/python train.py",
        cpu_since=NOW - 900,
        environment=frozen_map({"CUDA_VISIBLE_DEVICES": cvd}),
    )
    f = one(diagnose(snap(nvml=nvml, tf_processes=(p,)), CONFIG), "tf-job-on-cpu", "100")
    assert "1 GPU(s) visible" in text(f) and "hides every GPU" not in f.fix
    r = probe(gpus=(), environment={"CUDA_VISIBLE_DEVICES": cvd})
    found = diagnose(snap(nvml=nvml, tf=(r,)), CONFIG)
    assert "tf-gpus-hidden-by-env" not in codes(found)


def test_tf_job_on_cpu_without_a_matching_env() -> None:
    p = TfProcess(
        100,
        "cpu",
        cmdline="python train.py",
        cpu_since=NOW - 900,
        tensorflow_library="/home/z/.venv/lib/python3.12/site-packages/tensorflow/"
        "libtensorflow_framework.so.2",
    )
    f = one(diagnose(snap(tf_processes=(p,)), CONFIG), "tf-job-on-cpu", "100")
    assert "no [[tensorflow.envs]] entry matches its TensorFlow (configured: `research`)" in text(f)
    assert "tfgpud doctor --python /home/z/.venv/bin/python3" in f.fix
    assert "[[tensorflow.envs]]" in f.fix


def test_tf_job_on_cpu_not_without_gpus() -> None:
    procs = (TfProcess(100, "cpu", started_at=NOW - 900),)
    s = snap(pci=PciReading(), nvml=NO_NVML, tf=(), tf_processes=procs)
    assert "tf-job-on-cpu" not in codes(diagnose(s, CONFIG))
    lost = replace(NVML2, gpus=(gpu(0, UUID0, lost=True),))
    assert "tf-job-on-cpu" not in codes(diagnose(snap(nvml=lost, tf_processes=procs), CONFIG))


# --- TensorFlow per env ------------------------------------------------------------------------


def test_cuda_libs_missing_matches_issue_wording() -> None:
    r = probe(
        gpus=(),
        libraries=libs(missing={"cudnn", "cudart"}),
        library_search_dirs=(),
        packages={"tensorflow": "2.21.0"},
        log_lines=("Cannot dlopen some GPU libraries. Skipping registering GPU devices...",),
    )
    found = diagnose(snap(tf=(r,)), CONFIG)
    fb = one(found, "tf-cpu-fallback", "research")
    assert fb.severity is Severity.CRITICAL
    assert "sees 0 of 2 GPU(s)" in fb.summary and "tf-cuda-libs-missing" in fb.summary
    f = one(found, "tf-cuda-libs-missing", "research")
    assert f.summary.startswith(
        "TensorFlow 2.21.0 in env `research` was built for CUDA 12.5 / cuDNN 9; "
        "libcudart.so.12 and libcudnn.so.9 cannot be loaded (searched: "
    )
    assert "LD_LIBRARY_PATH unset" in f.summary and "ld.so cache" in f.summary
    assert f.fix.startswith(f"{PY} -m pip install 'tensorflow[and-cuda]==2.21.0'")
    assert "nvidia-cuda-runtime-cu12, nvidia-cudnn-cu12" in f.fix  # the two that are missing
    assert any("Cannot dlopen" in e for e in f.evidence)
    assert cpu_fallback_envs(found) == {"research"}


def test_cpu_only_build() -> None:
    r = probe(
        gpus=(), build_info=CPU_BUILD, libraries=libs(), packages={"tensorflow-cpu": "2.21.0"}
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-cpu-only-build", "research")
    assert "tensorflow-cpu 2.21.0" in f.summary
    assert f.fix.startswith(f"{PY} -m pip uninstall -y tensorflow-cpu && ")
    assert "tensorflow[and-cuda]==2.21.0" in f.fix


@pytest.mark.parametrize("value", ["-1", "", "none"])
def test_gpus_hidden_by_env(value: str) -> None:
    r = probe(gpus=(), environment={"CUDA_VISIBLE_DEVICES": value})
    cfg = parse_config(
        f'[[tensorflow.envs]]\nname = "research"\npython = "{PY}"\n'
        f'environment = {{ CUDA_VISIBLE_DEVICES = "{value}" }}\n'
    )
    found = diagnose(snap(tf=(r,)), cfg)
    assert {"tf-cpu-fallback", "tf-gpus-hidden-by-env"} <= codes(found)
    f = one(found, "tf-gpus-hidden-by-env", "research")
    assert f"CUDA_VISIBLE_DEVICES={value!r}" in f.summary and "all 2 GPU(s)" in f.summary
    assert "environment table" in text(f)
    assert "Remove CUDA_VISIBLE_DEVICES" in f.fix


def test_cuda_visible_devices_subset_is_intentional_and_said() -> None:
    r = probe(gpus=(TfGpu("/physical_device:GPU:0"),), environment={"CUDA_VISIBLE_DEVICES": "1"})
    cfg = parse_config(
        f'[[tensorflow.envs]]\nname = "research"\npython = "{PY}"\n'
        'environment = { CUDA_VISIBLE_DEVICES = "1" }\n'
    )
    found = diagnose(snap(tf=(r,)), cfg)
    f = one(found, "tf-gpus-selected-by-env", "research")
    assert f.severity is Severity.INFO and worst_severity(found) is Severity.INFO
    assert f.summary == (
        "TensorFlow 2.21.0 in env `research` uses 1 of the 2 GPUs, on purpose: "
        "CUDA_VISIBLE_DEVICES=1 (set in the [[tensorflow.envs]] `research` environment table)"
    )
    assert f"used: GPU 1 NVIDIA H100 80GB HBM3 {UUID1}" in " ".join(f.evidence)
    assert f"left to other jobs: GPU 0 NVIDIA H100 80GB HBM3 {UUID0}" in " ".join(f.evidence)
    assert codes(found) == {"tf-gpus-selected-by-env"}
    # Every GPU given (or no variable): nothing to say.
    r = replace(r, gpus=r.gpus * 2, environment=frozen_map({"CUDA_VISIBLE_DEVICES": "0,1"}))
    assert diagnose(snap(tf=(r,)), cfg) == ()
    # Fewer seen than given is partial visibility, not a choice.
    r = replace(r, gpus=r.gpus[:1])
    assert codes(diagnose(snap(tf=(r,)), cfg)) == {"tf-partial-visibility"}


def test_libcuda_missing_points_at_the_nvml_dir() -> None:
    r = probe(gpus=(), libraries=libs(libcuda=False))
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-libcuda-missing", "research")
    assert "cannot open shared object file" in f.summary
    assert 'LD_LIBRARY_PATH = "/usr/lib/x86_64-linux-gnu"' in f.fix


def test_libcuda_missing_without_driver_says_install_driver() -> None:
    r = probe(gpus=(), libraries=libs(libcuda=False))
    found = diagnose(snap(nvml=NO_NVML, tf=(r,)), CONFIG)
    f = one(found, "tf-libcuda-missing", "research")
    assert "Install the NVIDIA driver" in f.fix
    assert "tf-cpu-fallback" in codes(found)  # PCI says the GPUs exist


def test_driver_too_old_names_the_fixing_drivers() -> None:
    nvml = replace(NVML2, driver_version="470.256.02", cuda_driver_version=11040)
    r = probe(gpus=(), log_lines=("CUDA driver version is insufficient for CUDA runtime version",))
    f = one(diagnose(snap(nvml=nvml, tf=(r,)), CONFIG), "tf-driver-too-old", "research")
    assert f.summary == (
        "driver 470.x supports CUDA ≤ 11.4; TF 2.21.0 needs CUDA 12.5: install driver ≥ "
        "555.42.02 (or ≥ 525.60.13 with minor-version compatibility)"
    )
    assert "tensorflow[and-cuda]==2.14.*" in f.fix


def test_driver_too_old_is_critical_even_when_tensorflow_lists_the_gpus() -> None:
    """TF lists GPUs through libcuda on any driver; a 12.5 build on a CUDA 11.4 driver fails at
    the first op ("CUDA driver version is insufficient for CUDA runtime version")."""
    nvml = replace(NVML2, driver_version="470.256.02", cuda_driver_version=11040)
    found = diagnose(snap(nvml=nvml, tf=(probe(),)), CONFIG)
    f = one(found, "tf-driver-too-old", "research")
    assert f.severity is Severity.CRITICAL and f.summary.startswith("driver 470.x supports CUDA")
    assert "tf-cpu-fallback" not in codes(found) and "tf-partial-visibility" not in codes(found)


def test_driver_same_major_older_minor_is_covered_by_minor_compat() -> None:
    nvml = replace(NVML2, driver_version="535.54.03", cuda_driver_version=12020)
    r = probe(gpus=(), libraries=libs(missing={"cudnn"}))
    found = diagnose(snap(nvml=nvml, tf=(r,)), CONFIG)
    assert "tf-driver-too-old" not in codes(found)
    assert "tf-cuda-libs-missing" in codes(found)


def test_driver_dso_mismatch_from_log() -> None:
    r = probe(
        gpus=(),
        log_lines=(
            "kernel version 550.54.14 does not match DSO version 555.42.2 -- cannot find working "
            "devices in this configuration",
        ),
        libraries=tuple(
            replace(x, path="/usr/lib/libcuda.so.555.42.02") if x.name == "cuda" else x
            for x in libs()
        ),
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-driver-dso-mismatch", "research")
    assert "libcuda 555.42.02" in f.summary and "kernel module 550.54.14" in f.summary
    assert "Reboot" in f.fix


COMPAT_LIBCUDA = "/usr/local/cuda-12.5/compat/libcuda.so.555.42.02"


def test_forward_compat_libcuda_is_not_a_reboot_problem() -> None:
    lib = tuple(replace(x, path=COMPAT_LIBCUDA) if x.name == "cuda" else x for x in libs())
    r = probe(
        gpus=(),
        libraries=lib,
        environment={"LD_LIBRARY_PATH": "/usr/local/cuda-12.5/compat"},
        log_lines=("failed call to cuInit: CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",),
    )
    found = diagnose(snap(tf=(r,)), CONFIG)
    f = one(found, "tf-driver-dso-mismatch", "research")
    assert "forward-compatibility library 555.42.02 (/usr/local/cuda-12.5/compat)" in f.summary
    assert "COMPAT_NOT_SUPPORTED_ON_DEVICE" in f.summary
    assert "Reboot" not in f.fix and "rmmod" not in f.fix
    assert "not a reboot problem" in f.fix and "data-centre GPU" in f.fix
    assert "module branch" in f.fix and "LD_LIBRARY_PATH" in f.fix
    # Without the error line, the path alone tells forward compatibility is in use.
    r = replace(r, log_lines=())
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-driver-dso-mismatch", "research")
    assert "forward-compatibility" in f.summary and "Reboot" not in f.fix


def test_compute_capability_unsupported() -> None:
    nvml = replace(NVML2, gpus=(gpu(0, UUID0, compute_capability=(5, 2), name="Tesla M60"),))
    r = probe(gpus=(), log_lines=("Ignoring visible gpu device (compute capability: 5.2)",))
    found = diagnose(snap(nvml=nvml, tf=(r,)), CONFIG)
    f = one(found, "tf-compute-capability-unsupported", "research")
    assert "5.2" in f.summary and "6.0" in f.summary and "PTX 9.0" in f.summary
    assert "lists it" not in text(f) and "TensorFlow lists no GPU" in f.evidence
    assert "tensorflow[and-cuda]==2.14.*" in f.fix and "sm_50" in f.fix
    assert "Kepler" not in f.fix  # a Maxwell GPU: current drivers still support it
    assert "CUDA_VISIBLE_DEVICES" not in f.fix  # no other GPU to keep TensorFlow on
    assert "tf-cpu-fallback" in codes(found)


K80 = gpu(0, UUID0, compute_capability=(3, 7), name="Tesla K80")
A6000 = gpu(1, UUID1, compute_capability=(8, 6), name="NVIDIA RTX A6000")
LISTED_BOTH = (
    TfGpu("/physical_device:GPU:0", "Tesla K80", (3, 7)),
    TfGpu("/physical_device:GPU:1", "NVIDIA RTX A6000", (8, 6)),
)
NOT_BUILT_37 = (
    "TensorFlow was not built with CUDA kernel binaries compatible with compute capability 3.7. "
    "CUDA kernels will be jit-compiled from PTX, which could take 30 minutes or longer."
)


def test_a_gpu_tensorflow_lists_without_a_kernel_for_it_is_critical() -> None:
    """TF 2.21 lists a K80 (3.7 >= its listing minimum 3.5); its build has sm_60+ and compute_90:
    nothing the K80 can run, whatever TF's "will be jit-compiled" line says."""
    nvml = replace(NVML2, gpus=(K80, A6000))
    r = probe(gpus=LISTED_BOTH, python_version="3.11.9", log_lines=(NOT_BUILT_37,))
    found = diagnose(snap(nvml=nvml, tf=(r,)), CONFIG)
    f = one(found, "tf-compute-capability-unsupported", "research")
    assert f.severity is Severity.CRITICAL
    assert f.summary == (
        f"TensorFlow 2.21.0 in env `research` cannot run on GPU 0 Tesla K80 {UUID0} "
        "00000000:01:00.0 (cc 3.7): its kernels are for compute capability 6.0, 7.0, 8.0, 8.9 "
        "+ PTX 9.0 only; TensorFlow lists it, and the first kernel there fails"
    )
    assert NOT_BUILT_37 in f.evidence
    assert (
        "TensorFlow lists GPU:0 Tesla K80 (cc 3.7), GPU:1 NVIDIA RTX A6000 (cc 8.6)" in f.evidence
    )
    assert f"{PY} -m venv $HOME/tf-2.14" in f.fix and "'tensorflow[and-cuda]==2.14.*'" in f.fix
    assert (
        "470 branch, the last that supports Kepler" in f.fix
    )  # Kepler: the last driver branch that supports it
    assert f"export CUDA_VISIBLE_DEVICES={UUID1}" in f.fix  # the A6000 stays usable
    assert "tf-ptx-jit-only" not in codes(found) and "tf-partial-visibility" not in codes(found)
    # Kept off the K80 by CUDA_VISIBLE_DEVICES (UUID or index): nothing unusable is left.
    for cvd in (UUID1, "1"):
        r2 = replace(r, gpus=LISTED_BOTH[1:], environment=frozen_map({"CUDA_VISIBLE_DEVICES": cvd}))
        assert codes(diagnose(snap(nvml=nvml, tf=(r2,)), CONFIG)) == {"tf-gpus-selected-by-env"}


def test_blackwell_without_its_kernels_is_critical_not_a_jit_warning() -> None:
    rtx5090 = gpu(0, UUID0, compute_capability=(12, 0), name="NVIDIA GeForce RTX 5090")
    nvml = replace(NVML2, gpus=(rtx5090,), driver_version="570.86.10", cuda_driver_version=12080)
    r = probe(gpus=(TfGpu("/physical_device:GPU:0", "NVIDIA GeForce RTX 5090", (12, 0)),))
    found = diagnose(snap(nvml=nvml, tf=(r,)), CONFIG)
    f = one(found, "tf-compute-capability-unsupported", "research")
    assert f.severity is Severity.CRITICAL
    assert "TensorFlow lists it, then every kernel fails there with CUDA_ERROR_INVALID_PTX" in (
        f.summary
    )
    assert "tensorflow#99592" in text(f) and "CUDA_ERROR_INVALID_HANDLE" in text(f)
    assert "nvcr.io/nvidia/tensorflow" in f.fix
    assert "HERMETIC_CUDA_COMPUTE_CAPABILITIES=sm_120" in f.fix
    assert "this driver supports CUDA 12.8)" in f.fix  # 570 is enough for a source build
    assert codes(found) == {"tf-compute-capability-unsupported"}  # no tf-ptx-jit-only
    # B200 (10.0) likewise; a driver older than CUDA 12.8 is named as such.
    b200 = replace(rtx5090, name="NVIDIA B200", compute_capability=(10, 0))
    nvml = replace(nvml, gpus=(b200,), cuda_driver_version=12040)
    f = one(diagnose(snap(nvml=nvml, tf=(r,)), CONFIG), "tf-compute-capability-unsupported")
    assert "sm_100" in f.fix and "supports CUDA 12.4, so upgrade it" in f.fix


def test_below_tensorflows_minimum_is_never_a_build_with_its_kernels() -> None:
    """cc 3.0: TF drops it at listing; no pip release ever had sm_30 kernels."""
    k4200 = gpu(0, UUID0, compute_capability=(3, 0), name="Quadro K4200")
    nvml = replace(NVML2, gpus=(k4200, A6000))
    ignoring = (
        "Ignoring visible gpu device (device: 0, name: Quadro K4200, pci bus id: 0000:01:00.0, "
        "compute capability: 3.0) with Cuda compute capability 3.0. The minimum required Cuda "
        "capability is 3.5."
    )
    r = probe(gpus=LISTED_BOTH[1:], log_lines=(ignoring, "Adding visible gpu devices: 1"))
    found = diagnose(snap(nvml=nvml, tf=(r,)), CONFIG)
    f = one(found, "tf-compute-capability-unsupported", "research")
    assert "TensorFlow ignores it (below its minimum 3.5)" in f.summary
    assert ignoring in f.evidence and "Adding visible gpu devices: 1" in f.evidence
    assert "sm_30" not in f.fix and "2.14" not in f.fix
    assert f.fix.startswith("No TensorFlow pip release has kernels for compute capability 3.0")
    assert f"export CUDA_VISIBLE_DEVICES={UUID1}" in f.fix
    partial = one(found, "tf-partial-visibility", "research")
    assert "tf-compute-capability-unsupported" in partial.fix


def test_cudnn_mismatch_from_package_version() -> None:
    r = probe(packages={"tensorflow": "2.21.0", "nvidia-cudnn-cu12": "9.1.0.70"})
    found = diagnose(snap(tf=(r,)), CONFIG)
    f = one(found, "tf-cudnn-mismatch", "research")
    assert "cuDNN 9.1.0.70 is installed" in f.summary and "tested with 9.3" in f.summary
    assert "nvidia-cudnn-cu12>=9.3,<10" in f.fix


@pytest.mark.parametrize(
    "pkgs",
    [
        {"nvidia-cudnn-frontend": "1.5.2", "nvidia-cudnn-cu12": "9.3.0.75"},
        {"nvidia-cudnn-cu11": "8.6.0.163", "nvidia-cudnn-cu12": "9.3.0.75"},
        {"nvidia-cudnn-frontend": "1.5.2"},  # no cu12 wheel: the loaded library decides
    ],
)
def test_cudnn_only_the_wheel_for_the_builds_cuda_major_counts(pkgs: dict[str, str]) -> None:
    r = probe(packages={"tensorflow": "2.21.0", **pkgs})
    assert "tf-cudnn-mismatch" not in codes(diagnose(snap(tf=(r,)), CONFIG))


def test_cudnn_mismatch_not_on_a_machine_without_gpus() -> None:
    r = probe(gpus=(), packages={"tensorflow": "2.21.0", "nvidia-cudnn-cu12": "8.9.7.29"})
    found = diagnose(snap(pci=PciReading(), nvml=NO_NVML, tf=(r,)), CONFIG)
    assert codes(found) == {"no-nvidia-gpu"}


def test_cudnn_fix_names_the_wheel_of_the_builds_cuda_major() -> None:
    build = {**GPU_BUILD, "cuda_version": "11.8", "cudnn_version": "8"}
    r = probe(
        tf_version="2.14.1",
        build_info=build,
        packages={"tensorflow": "2.14.1", "nvidia-cudnn-cu11": "8.5.0.96"},
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-cudnn-mismatch", "research")
    assert "cuDNN 8.5.0.96 is installed" in f.summary
    assert "nvidia-cudnn-cu11>=8.7,<9" in f.fix and "cu12" not in f.fix


def test_cudnn_major_mismatch_under_fallback() -> None:
    r = probe(gpus=(), packages={"nvidia-cudnn-cu12": "8.9.7.29"}, libraries=libs({"cudnn"}))
    assert {"tf-cpu-fallback", "tf-cudnn-mismatch"} <= codes(diagnose(snap(tf=(r,)), CONFIG))


SITE = "/opt/research/lib/python3.11/site-packages"
FRAMEWORK = f"{SITE}/tensorflow/libtensorflow_framework.so.2"
# TF 2.21's framework RUNPATH as the loader expands it: no nvidia/cusolver/lib.
RUNPATH = tuple(
    SearchDir(f"{SITE}/tensorflow/python/platform/../../../nvidia/{d}/lib", "RUNPATH")
    for d in ("nccl", "cuda_cupti", "cublas", "cudnn", "cufft", "cusparse", "cuda_runtime")
)
DEFAULT_DIRS = tuple(SearchDir(d, "default") for d in ("/lib/x86_64-linux-gnu", "/usr/lib"))


def lib_at(name: str, path: str, via: str, **kw: Any) -> LibraryCheck:
    return LibraryCheck(name, path.rsplit("/", 1)[-1], True, path, via=via, **kw)


def with_cudnn(check: LibraryCheck) -> tuple[LibraryCheck, ...]:
    return tuple(check if x.name == "cudnn" else x for x in libs())


def test_cudnn_older_minor_than_compiled_is_critical_even_when_tf_lists_the_gpus() -> None:
    """cudnnGetVersion() of the library TF loads says 9.1.0; TF 2.21 was compiled with 9.3.0
    and refuses an older minor at its first cuDNN call."""
    cudnn = lib_at("cudnn", "/opt/cuda/lib/libcudnn.so.9", "LD_LIBRARY_PATH", version=90100)
    r = probe(
        libraries=with_cudnn(cudnn),
        packages={"tensorflow": "2.21.0"},  # no wheel: only the loaded library tells
        environment={"LD_LIBRARY_PATH": "/opt/cuda/lib"},
        log_lines=("TensorFlow compiled with CUDA 12.5 and cuDNN 9.3.0",),
    )
    found = diagnose(snap(tf=(r,)), CONFIG)
    f = one(found, "tf-cudnn-mismatch", "research")
    assert f.severity is Severity.CRITICAL and "tf-cpu-fallback" not in codes(found)
    assert (
        "cuDNN 9.1.0 is installed and is what it loads (/opt/cuda/lib/libcudnn.so.9, via "
        "LD_LIBRARY_PATH)" in f.summary
    )
    assert "Loaded runtime CuDNN library: 9.1.0 but source was compiled with: 9.3.0" in f.summary
    assert "cudnnGetVersion() of /opt/cuda/lib/libcudnn.so.9: 90100" in f.evidence
    assert f"`{PY} -m pip install 'nvidia-cudnn-cu12>=9.3,<10'` and remove /opt/cuda/lib from " in (
        f.fix
    )
    # The wheel's 9.3.0.75 metadata does not hide the 9.1 library the loader finds first.
    r = replace(r, packages=frozen_map({"nvidia-cudnn-cu12": "9.3.0.75"}))
    assert "tf-cudnn-mismatch" in codes(diagnose(snap(tf=(r,)), CONFIG))
    # The same version via the ld.so cache: the wheel is found first through the RUNPATH.
    cudnn = lib_at("cudnn", "/usr/lib/x86_64-linux-gnu/libcudnn.so.9", "ld.so.cache", version=90102)
    f = one(
        diagnose(snap(tf=(replace(r, libraries=with_cudnn(cudnn)),)), CONFIG), "tf-cudnn-mismatch"
    )
    assert "RUNPATH finds that wheel before the system's cuDNN 9.1.2" in f.fix
    # 9.3 or newer 9.x: fine.
    for ok in (90300, 90501):
        cudnn = lib_at("cudnn", "/opt/cuda/lib/libcudnn.so.9", "LD_LIBRARY_PATH", version=ok)
        assert diagnose(snap(tf=(replace(r, libraries=with_cudnn(cudnn)),)), CONFIG) == ()


def test_cudnn_8_only_is_one_cause_the_cudnn_mismatch() -> None:
    cudnn8 = LibraryCheck(
        "cudnn", "libcudnn.so.8", True, "/opt/cuda/lib/libcudnn.so.8", version=8907
    )
    missing = LibraryCheck(
        "cudnn",
        "libcudnn.so.9",
        False,
        error="libcudnn.so.9: cannot open shared object file: No such file or directory",
        other_versions=(cudnn8,),
    )
    r = probe(
        gpus=(),
        libraries=with_cudnn(missing),
        packages={"tensorflow": "2.21.0"},
        loader_failures={"libcudnn.so.9": "libcudnn.so.9: cannot open shared object file"},
    )
    found = diagnose(snap(tf=(r,)), CONFIG)
    f = one(found, "tf-cudnn-mismatch", "research")
    assert "cuDNN 8.9.7 is installed (/opt/cuda/lib/libcudnn.so.8)" in f.summary
    assert "it loads only libcudnn.so.9, so it has no cuDNN at all" in f.summary
    assert f.fix.startswith(f"`{PY} -m pip install 'nvidia-cudnn-cu12>=9.3,<10'`")
    assert "tf-cuda-libs-missing" not in codes(found)
    assert "(cause: tf-cudnn-mismatch)" in one(found, "tf-cpu-fallback", "research").summary


def test_a_library_outside_tensorflows_search_path_is_missing_with_the_dir_to_add() -> None:
    """The pip wheel layout: nvidia/cusolver/lib exists but is not on the framework library's
    RUNPATH. TF's own loader line and the probe's loader-order check agree."""
    gap = f"{SITE}/nvidia/cusolver/lib"
    missing = LibraryCheck(
        "cusolver",
        "libcusolver.so.11",
        False,
        error="libcusolver.so.11: cannot open shared object file: No such file or directory",
        found_elsewhere=(f"{gap}/libcusolver.so.11",),
    )
    r = probe(
        gpus=(),
        libraries=tuple(missing if x.name == "cusolver" else x for x in libs()),
        loader_object=FRAMEWORK,
        loader_search=(*RUNPATH, *DEFAULT_DIRS),
        loader_failures={"libcusolver.so.11": "libcusolver.so.11: cannot open shared object file"},
        log_lines=("Cannot dlopen some GPU libraries. Skipping registering GPU devices...",),
    )
    cfg = parse_config(f'[[tensorflow.envs]]\nname = "research"\npython = "{PY}"\n')
    found = diagnose(snap(tf=(r,)), cfg)
    f = one(found, "tf-cuda-libs-missing", "research")
    assert f.summary.endswith(
        ": libcusolver.so.11 is installed in nvidia/cusolver/lib, which is not on the RUNPATH of "
        "libtensorflow_framework.so.2 nor on LD_LIBRARY_PATH"
    )
    assert "the RUNPATH of libtensorflow_framework.so.2 (7 dirs)" in f.summary
    assert (
        f"RUNPATH of {FRAMEWORK}: nvidia/nccl/lib, nvidia/cuda_cupti/lib, nvidia/cublas/lib, "
        "nvidia/cudnn/lib, nvidia/cufft/lib, nvidia/cusparse/lib, nvidia/cuda_runtime/lib"
    ) in f.evidence
    assert any(
        e.startswith("TensorFlow's loader: Could not load dynamic library") for e in f.evidence
    )
    assert (
        f'add LD_LIBRARY_PATH = "{gap}" to the `environment` table of the [[tensorflow.envs]] '
        in (f.fix)
    )
    assert f"`export LD_LIBRARY_PATH={gap}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}`" in f.fix
    assert "pip install" not in f.fix  # the wheel is installed; reinstalling changes nothing
    assert "(cause: tf-cuda-libs-missing)" in one(found, "tf-cpu-fallback", "research").summary
    # An env the config does not name (discovered): only the shell part; an existing table
    # value is kept behind the new directory.
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-cuda-libs-missing", "research")
    assert "environment` table" not in f.fix and "export LD_LIBRARY_PATH=" in f.fix
    cfg = parse_config(
        f'[[tensorflow.envs]]\nname = "research"\npython = "{PY}"\n'
        'environment = { LD_LIBRARY_PATH = "/drv" }\n'
    )
    f = one(diagnose(snap(tf=(r,)), cfg), "tf-cuda-libs-missing", "research")
    assert f'LD_LIBRARY_PATH = "{gap}:/drv"' in f.fix


def test_tensorflows_own_loader_lines_decide_which_library_is_missing() -> None:
    # The probe opened libcufft, but TF's loader said it could not: TF's word counts.
    r = probe(
        gpus=(),
        loader_failures={"libcufft.so.11": "libcufft.so.11: wrong ELF class: ELFCLASS32"},
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-cuda-libs-missing", "research")
    assert "libcufft.so.11 cannot be loaded" in f.summary and "wrong ELF class" in text(f)
    # The probe could not open libcudnn, but TF opened it: not missing.
    r = probe(gpus=(), libraries=libs(missing={"cudnn"}), loader_opened=("libcudnn.so.9",))
    assert "tf-cuda-libs-missing" not in codes(diagnose(snap(tf=(r,)), CONFIG))


CONTEXT_ERROR = (
    "RuntimeError: Bad StatusOr access: INTERNAL: CUDA error: : CUDA_ERROR_NOT_SUPPORTED"
)


def test_smoke_failing_at_context_creation_says_what_to_check() -> None:
    r = probe(smoke_ok=False, smoke_error=CONTEXT_ERROR, smoke_stage="context")
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-smoke-failed", "research")
    assert "could not initialise GPU:0 (no CUDA context)" in f.summary
    assert any(e.startswith("failed at: creating the CUDA context of GPU:0") for e in f.evidence)
    assert "tfgpud doctor" not in f.fix
    assert "nvidia-smi -q -d COMPUTE" in f.fix and "journalctl -k | grep -i xid" in f.fix
    assert "`sudo nvidia-smi -i 0 -c DEFAULT`" in f.fix  # GPU:0 is NVML's GPU 0 here
    assert f.fix.index("`nvidia-smi`") < f.fix.index("nvidia-modprobe -u -c 0")  # uvm is there
    # /dev/nvidia-uvm missing on the host: that first; persistence mode off: said.
    pci = replace(PCI2, device_nodes=("nvidia0", "nvidia1", "nvidiactl"))
    nvml = replace(NVML2, gpus=tuple(replace(g, persistence_mode=False) for g in NVML2.gpus))
    f = one(diagnose(snap(pci=pci, nvml=nvml, tf=(r,)), CONFIG), "tf-smoke-failed")
    assert "create the missing /dev/nvidia-uvm with `sudo nvidia-modprobe -u -c 0`" in f.fix
    assert f.fix.index("nvidia-modprobe") < f.fix.index("`nvidia-smi`")
    assert "nvidia-persistenced" in f.fix
    # Errors that name their cause get that fix.
    for err, needle in (
        ("CUDA_ERROR_OUT_OF_MEMORY: out of memory", "--query-compute-apps"),
        (
            "CUDA_ERROR_DEVICES_UNAVAILABLE: CUDA-capable device(s) is/are busy or unavailable",
            "-c DEFAULT",
        ),
        ("CUDA_ERROR_SYSTEM_NOT_READY: system not yet initialized", "nvidia-fabricmanager"),
    ):
        r2 = replace(r, smoke_error=f"InternalError: {err}")
        assert needle in one(diagnose(snap(tf=(r2,)), CONFIG), "tf-smoke-failed").fix, err


def test_device_permission() -> None:
    r = probe(
        gpus=(),
        device_access={"/dev/nvidiactl": "ok", "/dev/nvidia0": "no read-write access (mode 660)"},
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-device-permission", "research")
    assert "/dev/nvidia0" in f.summary and "/dev/nvidiactl" not in f.summary
    assert "usermod" in f.fix


def test_partial_visibility() -> None:
    r = probe(gpus=(TfGpu("/physical_device:GPU:0"),))
    found = diagnose(snap(tf=(r,)), CONFIG)
    f = one(found, "tf-partial-visibility", "research")
    assert f.severity is Severity.CRITICAL and "sees 1 of the 2 GPU(s)" in f.summary
    assert "tf-cpu-fallback" not in codes(found)


H100_ON_550 = replace(
    NVML2, driver_version="550.54.15", gpus=(gpu(0, UUID0, compute_capability=(9, 0)),)
)
H100_ON_555 = replace(H100_ON_550, driver_version="555.42.02", cuda_driver_version=12050)


def test_ptx_jit_only() -> None:
    # The driver supports the build's CUDA 12.5: PTX JIT works, it is only slow to start.
    r = probe(gpus=(TfGpu("/physical_device:GPU:0"),))
    found = diagnose(snap(nvml=H100_ON_555, tf=(r,)), CONFIG)
    f = one(found, "tf-ptx-jit-only", "research")
    assert f.severity is Severity.WARNING and "9.0" in f.summary
    assert "CUDA_CACHE_MAXSIZE" in f.fix
    assert worst_severity(found) is Severity.WARNING
    assert "tf-driver-too-old" not in codes(found)


def test_ptx_from_newer_cuda_than_the_driver_is_critical_even_when_tf_lists_the_gpu() -> None:
    # TF 2.21 (CUDA 12.5) has only compute_90 PTX for an H100; driver 550 supports CUDA 12.4.
    # Minor-version compatibility covers the binaries, not PTX: every kernel fails.
    r = probe(gpus=(TfGpu("/physical_device:GPU:0"),), python_version="3.12.3")
    found = diagnose(snap(nvml=H100_ON_550, tf=(r,)), CONFIG)
    f = one(found, "tf-driver-too-old", "research")
    assert f.severity is Severity.CRITICAL
    assert f.summary == (
        f"GPU 0 NVIDIA H100 80GB HBM3 {UUID0} 00000000:01:00.0 (cc 9.0) has no sm_90 kernels "
        "in TF 2.21.0; its compute_90 PTX needs a driver that supports CUDA 12.5 "
        "(≥ 555.42.02): driver 550.54.15 supports 12.4 — PTX JIT fails with "
        "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"
    )
    assert "ubuntu-drivers install" in f.fix and "nvidia-driver-555" not in f.fix
    assert "tensorflow[and-cuda]==2.17.*" in f.fix  # CUDA 12.3 ≤ 12.4, supports Python 3.12
    assert "tf-ptx-jit-only" not in codes(found)  # the critical replaces the warning
    assert "tf-cpu-fallback" not in codes(found)


def test_ptx_driver_too_old_is_named_as_the_fallback_cause() -> None:
    r = probe(gpus=())
    found = diagnose(snap(nvml=H100_ON_550, tf=(r,)), CONFIG)
    assert "cause: tf-driver-too-old" in one(found, "tf-cpu-fallback", "research").summary
    assert "compute_90 PTX" in one(found, "tf-driver-too-old", "research").summary


def test_driver_too_old_fix_suggests_a_tf_for_the_envs_python() -> None:
    nvml = replace(NVML2, driver_version="470.256.02", cuda_driver_version=11040)
    r = probe(gpus=(), python_version="3.12.1")
    f = one(diagnose(snap(nvml=nvml, tf=(r,)), CONFIG), "tf-driver-too-old", "research")
    assert "==2.14" not in f.fix  # 2.14 does not support Python 3.12
    assert "Python 3.9-3.11 only, not this env's Python 3.12" in f.fix
    assert "nvidia-driver-555" not in f.fix and "sudo ubuntu-drivers install" in f.fix
    # With PTX-only GPUs the minor-version driver is no way out either.
    nvml = replace(nvml, gpus=(gpu(0, UUID0, compute_capability=(9, 0)),))
    f = one(diagnose(snap(nvml=nvml, tf=(r,)), CONFIG), "tf-driver-too-old", "research")
    assert "525.60.13 with minor-version" not in f.summary
    assert "Not 525.60.13: minor-version compatibility does not cover the PTX" in f.fix


def test_compute_capability_fix_respects_the_envs_python() -> None:
    nvml = replace(NVML2, gpus=(gpu(0, UUID0, compute_capability=(5, 2), name="Tesla M60"),))
    r = probe(gpus=(), python_version="3.11.9")
    f = one(diagnose(snap(nvml=nvml, tf=(r,)), CONFIG), "tf-compute-capability-unsupported")
    assert f"`{PY} -m venv $HOME/tf-2.14 && " in f.fix
    r = probe(gpus=(), python_version="3.12.3")
    f = one(diagnose(snap(nvml=nvml, tf=(r,)), CONFIG), "tf-compute-capability-unsupported")
    assert "`python3.11 -m venv $HOME/tf-2.14 && " in f.fix  # 2.14 supports Python 3.9-3.11
    assert "This env's Python 3.12 is too new for it" in f.fix


@pytest.mark.parametrize(
    ("error", "in_fix"),
    [
        (
            "InternalError: CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled with "
            "an unsupported toolchain",
            "ubuntu-drivers install",
        ),
        (
            "ResourceExhaustedError: OOM when allocating tensor with shape[2,2]",
            "TF_FORCE_GPU_ALLOW_GROWTH=true",
        ),
        ("UnimplementedError: DNN library is not found.", "--force-reinstall"),
        ("InternalError: something else", "journalctl -k | grep -i xid"),
    ],
)
def test_smoke_failed(error: str, in_fix: str) -> None:
    r = probe(smoke_ok=False, smoke_error=error)
    found = diagnose(snap(tf=(r,)), CONFIG)
    f = one(found, "tf-smoke-failed", "research")
    assert f.severity is Severity.CRITICAL
    assert f"smoke test: {error}" in f.evidence
    assert in_fix in f.fix
    assert "tfgpud doctor" not in f.fix  # the doctor has just run
    assert "tf-smoke-failed" not in codes(diagnose(snap(tf=(probe(smoke_ok=True),)), CONFIG))
    assert "tf-smoke-failed" not in codes(diagnose(snap(tf=(probe(),)), CONFIG))


def test_import_failed_not_installed() -> None:
    r = probe(
        status=ProbeStatus.IMPORT_FAILED,
        error="ModuleNotFoundError: No module named 'tensorflow'",
        tf_version=None,
        build_info={},
        gpus=(),
        packages={},
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-import-failed", "research")
    assert f.summary == f"TensorFlow is not installed in env `research` ({PY})"
    assert f.fix == f"{PY} -m pip install 'tensorflow[and-cuda]==2.21.0'"


def test_import_failed_other_error_reinstalls_that_version() -> None:
    r = probe(
        status=ProbeStatus.IMPORT_FAILED,
        error="ImportError: numpy.core.multiarray failed to import",
        gpus=(),
        packages={"tensorflow": "2.20.0"},
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-import-failed", "research")
    assert "numpy.core.multiarray" in f.summary and "==2.20.0" in f.fix


def test_missing_interpreter_is_a_clear_import_failure() -> None:
    r = probe(status=ProbeStatus.MISSING_INTERPRETER, error=f"interpreter {PY} not found")
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-import-failed", "research")
    assert f.summary == f"The interpreter of env `research` does not exist: {PY}"
    assert "python3 -m venv /opt/research" in f.fix


def test_import_crashed_sigill() -> None:
    r = probe(
        status=ProbeStatus.CRASHED,
        signal_name="SIGILL",
        returncode=-4,
        error="probe killed by SIGILL: the CPU lacks instructions",
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-import-crashed", "research")
    assert "SIGILL" in f.summary and "AVX" in f.fix


@pytest.mark.parametrize("status", [ProbeStatus.ERROR, ProbeStatus.BAD_OUTPUT])
def test_probe_error_and_garbage_are_crash_findings(status: ProbeStatus) -> None:
    r = probe(status=status, error="probe output is not JSON: 'hello'")
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-import-crashed", "research")
    assert "not JSON" in f.summary
    assert "tfgpud doctor" not in f.fix  # the doctor that reports this has just run
    assert f'`{PY} -c "import tensorflow"` shows the whole error' in f.fix


def test_probe_timeout_is_warning() -> None:
    r = probe(status=ProbeStatus.TIMEOUT, error="no answer within 120 s; process group killed")
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-probe-timeout", "research")
    assert f.severity is Severity.WARNING and "120 s" in f.summary
    assert "timeout_seconds" in f.fix


def test_unreadable_baseline_is_a_warning_naming_the_problem() -> None:
    problem = "baseline.json is not JSON; kept as baseline.json.corrupt"
    f = one(diagnose(snap(baseline_problems=(problem,)), CONFIG), "baseline-state-error", "host")
    assert f.severity is Severity.WARNING and problem in f.evidence


def test_refused_probe_names_the_writer_and_run_as() -> None:
    r = probe(
        status=ProbeStatus.REFUSED,
        error="the env's code can be written by alice",
        refused_writers=("alice",),
    )
    f = one(diagnose(snap(tf=(r,)), CONFIG), "tf-probe-refused", "research")
    assert f.severity is Severity.WARNING and 'run_as = "alice"' in f.fix


def test_every_emitted_code_is_asserted_by_a_test() -> None:
    source = Path(__file__).read_text()
    # Codes passed to one(found | diagnose(...), CODE): each asserts that exact finding.
    asserted = set(re.findall(r'(?:found|CONFIG\)|cfg\)), "([a-z0-9-]+)"', source))
    assert emitted_codes() - asserted == set()
    assert len(emitted_codes()) >= 31


def test_findings_sorted_most_severe_first_and_unique() -> None:
    r = probe(gpus=(), libraries=libs(missing={"cudnn"}))
    nvml = replace(NVML2, gpus=(gpu(0, UUID0, compute_capability=(9, 0)), gpu(1, UUID1)))
    found = diagnose(snap(nvml=nvml, tf=(r,), baseline=(KnownGpu(UUID0),)), CONFIG)
    ranks = [f.severity.rank for f in found]
    assert ranks == sorted(ranks, reverse=True)
    assert len({f.key for f in found}) == len(found)


# --- which envs are watched ---------------------------------------------------------------------

SEARCHED = ("root /home: searched (4 entries)", "system /usr: searched (69 entries)")
DISCOVERED_RECORD = TfEnvRecord(
    env="home-alice-tf",
    python="/home/alice/tf/bin/python",
    source="discovered",
    prefix="/home/alice/tf",
    owner="alice",
    kind="venv",
    found_by="/home/alice/tf/pyvenv.cfg",
    metadata=("tensorflow 2.21.0 in /home/alice/tf/lib/python3.11/site-packages",),
)


def nothing_to_probe(**kw: Any) -> Snapshot:
    d = DiscoverySummary(enabled=True, found=0, searched=SEARCHED, finished_at=NOW)
    return snap(**{"tf": (), "tf_envs": (), "discovery": d, **kw})


def test_gpus_and_nothing_to_probe_is_tf_no_env_with_what_was_searched() -> None:
    found = diagnose(nothing_to_probe(), CONFIG)
    f = one(found, "tf-no-env", "host")
    assert f.severity is Severity.WARNING and "2 GPU(s)" in f.summary
    assert set(SEARCHED) <= set(f.evidence)
    assert "[[tensorflow.envs]]\nname = " in f.fix and "/home, /opt, /srv, /root" in f.fix
    assert worst_severity(found) is Severity.WARNING


def test_tf_no_env_with_discovery_off_says_so_and_how_to_turn_it_on() -> None:
    s = nothing_to_probe(discovery=DiscoverySummary(enabled=False))
    f = one(diagnose(s, CONFIG), "tf-no-env", "host")
    assert "discovery is off ([tensorflow.discover] enabled = false)" in f.evidence
    assert "\nor set [tensorflow.discover] enabled = true: discovery searches" in f.fix
    assert "or or" not in f.fix


@pytest.mark.parametrize(
    "case",
    ["cpu-only machine", "first search still running", "an env to probe", "not known"],
)
def test_no_tf_no_env(case: str) -> None:
    s = {
        "cpu-only machine": nothing_to_probe(pci=PciReading(), nvml=NvmlReading(up=True)),
        "first search still running": nothing_to_probe(discovery=DiscoverySummary(enabled=True)),
        "an env to probe": nothing_to_probe(tf_envs=(DISCOVERED_RECORD,)),
        "not known": nothing_to_probe(tf_envs=None),
    }[case]
    assert "tf-no-env" not in codes(diagnose(s, CONFIG))


def test_a_discovered_env_not_probed_reports_its_metadata_and_the_fix() -> None:
    r = probe(
        env="home-alice-tf",
        python="/home/alice/tf/bin/python",
        status=ProbeStatus.NOT_RUN,
        error="writable by everyone besides its owner alice",
        refused_writers=("alice", "everyone"),
        log_lines=("/home/alice/tf/bin: owner alice, mode drwxrwxrwx (writable by everyone)",),
    )
    found = diagnose(snap(tf=(r,), tf_envs=(DISCOVERED_RECORD,)), CONFIG)
    f = one(found, "tf-probe-refused", "home-alice-tf")
    assert f.severity is Severity.WARNING and "was not probed" in f.summary
    assert DISCOVERED_RECORD.metadata[0] in f.evidence and r.log_lines[0] in f.evidence
    assert "sudo chown -R alice: /home/alice/tf && sudo chmod -R go-w /home/alice/tf" in f.fix
    assert codes(found) == {"tf-probe-refused"}  # no probe: no verdict on its GPUs


# --- causes: every consequence names its root cause --------------------------------------------


def causes_by_key(found: tuple[Finding, ...]) -> dict[tuple[str, str], str | None]:
    return {f.key: f.cause for f in found}


def test_the_driver_gone_under_two_gpus_explains_the_vanished_gpus_and_the_fallback() -> None:
    unbound = tuple(replace(g, driver=None) for g in PCI2.gpus)
    pci = replace(PCI2, gpus=unbound, nvidia_module_version=None, device_nodes=())
    nvml = NvmlReading(up=False, error="DRIVER_NOT_LOADED", error_code=9)
    s = snap(pci=pci, nvml=nvml, tf=(probe(gpus=()),), baseline=(KnownGpu(UUID0), KnownGpu(UUID1)))
    assert causes_by_key(diagnose(s, CONFIG)) == {
        ("driver-not-loaded", "host"): None,
        ("gpu-vanished", UUID0): "driver-not-loaded",
        ("gpu-vanished", UUID1): "driver-not-loaded",
        ("tf-cpu-fallback", "research"): "driver-not-loaded",
    }


@pytest.mark.parametrize("error", ["UNKNOWN", "DEVICE_COUNT_FAILED", "CODE_31337"])
def test_nvml_unusable_is_the_one_root_cause_of_the_vanished_gpus_and_the_fallback(
    error: str,
) -> None:
    nvml = NvmlReading(up=False, error=error)
    s = snap(nvml=nvml, tf=(probe(gpus=()),), baseline=BASELINE2)
    assert causes_by_key(diagnose(s, CONFIG)) == {
        ("nvml-unusable", "host"): None,
        ("gpu-vanished", UUID0): "nvml-unusable",
        ("gpu-vanished", UUID1): "nvml-unusable",
        ("tf-cpu-fallback", "research"): "nvml-unusable",
    }
    # [expect] gpus beyond the baseline: the unnamed GPUs follow from it too.
    cfg = parse_config("[expect]\ngpus = 3\n")
    found = diagnose(replace(s, tf=(), expected_gpus=3), cfg)
    assert one(found, "gpu-vanished", "host").cause == "nvml-unusable"


def test_nvml_unusable_beside_a_named_driver_cause_follows_from_it() -> None:
    """Device nodes missing (or nouveau, or a library/module version mismatch) explain an NVML
    error too: that finding is the root, nvml-unusable and the vanished GPUs name it."""
    pci = replace(PCI2, device_nodes=())
    nvml = NvmlReading(up=False, error="UNKNOWN", error_code=999)
    found = diagnose(snap(pci=pci, nvml=nvml, tf=(), baseline=BASELINE2), CONFIG)
    assert causes_by_key(found) == {
        ("device-nodes-missing", "host"): None,
        ("nvml-unusable", "host"): "device-nodes-missing",
        ("gpu-vanished", UUID0): "device-nodes-missing",
        ("gpu-vanished", UUID1): "device-nodes-missing",
    }
    mismatch = replace(nvml, library_path="/usr/lib/libnvidia-ml.so.555.42.02")
    found = diagnose(snap(nvml=mismatch, tf=(), baseline=BASELINE2), CONFIG)
    assert one(found, "nvml-unusable").cause == "driver-library-mismatch"


def test_a_chain_names_its_root_nouveau_under_the_driver_under_the_vanished_gpu() -> None:
    pci = PciReading(
        gpus=(PciGpu("0000:01:00.0", "0x2330", "0x030200", "nouveau"),), nouveau_loaded=True
    )
    nvml = NvmlReading(up=False, error="DRIVER_NOT_LOADED")
    found = diagnose(snap(pci=pci, nvml=nvml, tf=(), baseline=(KnownGpu(UUID0),)), CONFIG)
    assert causes_by_key(found) == {
        ("nouveau-bound", "host"): None,
        ("driver-not-loaded", "host"): "nouveau-bound",
        ("gpu-vanished", UUID0): "nouveau-bound",
    }


def test_a_driver_that_still_answers_explains_no_vanished_gpu() -> None:
    """A version mismatch NVML survives does not hide a GPU NVML lists no more: that GPU really
    went away, and pages on its own."""
    nvml = replace(NVML2, library_path="/usr/lib/libnvidia-ml.so.555.42.02", gpus=(gpu(0, UUID0),))
    found = diagnose(snap(nvml=nvml, tf=(), baseline=(KnownGpu(UUID0), KnownGpu(UUID1))), CONFIG)
    assert one(found, "driver-library-mismatch", "host").cause is None
    assert one(found, "gpu-vanished", UUID1).cause is None


def test_a_named_tf_cause_explains_its_envs_fallback_and_only_that_env() -> None:
    broken = probe(gpus=(), libraries=libs(missing={"cudnn", "cublas"}))
    unknown = probe(env="mystery", gpus=())  # sees nothing, no cause the probe can name
    found = diagnose(snap(tf=(broken, unknown)), CONFIG)
    assert one(found, "tf-cuda-libs-missing", "research").cause is None
    assert one(found, "tf-cpu-fallback", "research").cause == "tf-cuda-libs-missing"
    assert one(found, "tf-cpu-fallback", "mystery").cause is None


def test_a_job_on_the_cpu_names_the_root_cause_of_its_envs_fallback() -> None:
    r = probe(gpus=(), libraries=libs(missing={"cudnn"}), package_dirs=RESEARCH_DIRS)
    job = TfProcess(
        4242,
        "cpu",
        user="ana",
        cmdline=f"{PY} train.py",
        cpu_since=NOW - 900,
        tensorflow_library=TF_LIB,
    )
    found = diagnose(snap(tf=(r,), tf_processes=(job,)), CONFIG)
    assert one(found, "tf-job-on-cpu", "4242").cause == "tf-cuda-libs-missing"
    # A job from an env tfgpud does not probe is its own cause.
    stray = replace(job, cmdline="/srv/other/bin/python x.py", tensorflow_library="/srv/other/x.so")
    alone = diagnose(snap(tf=(r,), tf_processes=(stray,)), CONFIG)
    assert one(alone, "tf-job-on-cpu", "4242").cause is None


def test_an_xid_on_a_lost_gpu_is_a_consequence_of_the_loss() -> None:
    nvml = replace(NVML2, gpus=(gpu(0, UUID0), gpu(1, UUID1, lost=True, error="GPU_IS_LOST")))
    xids = (XidEvent(UUID1, 79, NOW - 60), XidEvent(UUID0, 48, NOW - 60))
    found = diagnose(snap(nvml=nvml, tf=(), xid_events=xids), CONFIG)
    assert one(found, "gpu-xid-critical", UUID1).cause == "gpu-lost"
    assert one(found, "gpu-xid-critical", UUID0).cause is None  # that GPU is not lost


def test_a_cause_less_severe_than_its_consequence_does_not_silence_it() -> None:
    from tfgpud.diagnosis.causes import attribute_causes

    info = Finding("nvml-library-missing", Severity.INFO, "host", "s")
    vanished = Finding("gpu-vanished", Severity.CRITICAL, UUID0, "s")
    s = snap(nvml=NO_NVML, tf=())
    assert [f.cause for f in attribute_causes([info, vanished], s, CONFIG)] == [None, None]
    crit = replace(info, severity=Severity.CRITICAL)
    assert [f.cause for f in attribute_causes([crit, vanished], s, CONFIG)] == [
        None,
        "nvml-library-missing",
    ]
