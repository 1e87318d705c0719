from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from tfgpud.exporter import MAX_PROCESS_SERIES, MAX_USER_SERIES, ExportOptions, make_registry
from tfgpud.model import (
    CollectorRun,
    Finding,
    GpuProcess,
    GpuProcessFacts,
    GpuReading,
    KnownGpu,
    NvmlReading,
    PciGpu,
    PciReading,
    ProbeStatus,
    Severity,
    Snapshot,
    TfGpu,
    TfProbeResult,
    TfProcess,
    WorkloadScan,
    frozen_map,
)

GOLDEN = Path(__file__).parent / "golden" / "exposition.prom"
UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"


def fixture_snapshot() -> Snapshot:
    healthy = GpuReading(
        index=0,
        uuid=UUID0,
        name="NVIDIA H100 80GB HBM3",
        pci_bus_id="00000000:01:00.0",
        memory_total_bytes=85899345920,
        memory_used_bytes=42949672960,
        memory_free_bytes=42949672960,
        utilization_gpu_ratio=0.5,
        temperature_celsius=61.0,
        power_watts=312.5,
        compute_capability=(9, 0),
        ecc_uncorrected_total=0,
        processes=(
            GpuProcess(pid=4242, used_memory_bytes=40000000000, name="python3"),
            GpuProcess(pid=4343, used_memory_bytes=None, name="gone"),
            GpuProcess(pid=4444, used_memory_bytes=2000000000, name="blender"),
        ),
    )
    # Lost while this daemon ran: NVML still tells name and bus id, not the compute capability.
    lost = GpuReading(
        index=1, uuid=UUID1, name="NVIDIA H100 80GB HBM3", pci_bus_id="00000000:02:00.0", lost=True
    )
    # Lost before this process ever read its UUID, and not matched to the baseline.
    unnamed = GpuReading(index=2, uuid="GPU-unknown-index-2", lost=True)
    probe = TfProbeResult(
        env="research",
        python="/opt/venv/bin/python",
        status=ProbeStatus.OK,
        started_at=1764150000.0,
        duration_seconds=3.25,
        tf_version="2.21.0",
        build_info=frozen_map(
            {"cuda_version": "12.5.1", "cudnn_version": "9", "is_cuda_build": "True"}
        ),
        gpus=(TfGpu(name="/physical_device:GPU:0"),),
        smoke_ok=False,
        smoke_error="InternalError: CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
    )
    broken = TfProbeResult(
        env="old",
        python="/usr/bin/python3",
        status=ProbeStatus.IMPORT_FAILED,
        started_at=1764150001.0,
        duration_seconds=0.5,
    )
    return Snapshot(
        taken_at=1764150010.0,
        pci=PciReading(
            gpus=(
                PciGpu("0000:01:00.0", "0x2330", "0x030200", "nvidia"),
                PciGpu("0000:02:00.0", "0x2330", "0x030200", "nvidia"),
            )
        ),
        nvml=NvmlReading(
            up=True,
            driver_version="550.54.15",
            cuda_driver_version=12040,
            gpus=(healthy, lost, unnamed),
        ),
        tf=(probe, broken),
        xid_counts=MappingProxyType({(UUID1, 79): 1, (UUID0, 13): 2}),
        collectors=(
            CollectorRun("pci", True, 0.001),
            CollectorRun("nvml", True, 0.002),
            CollectorRun("workloads", True, 0.003),
        ),
        findings=(
            Finding("gpu-lost", Severity.CRITICAL, UUID1, "GPU 1 fell off the bus"),
            Finding("gpu-xid-critical", Severity.CRITICAL, UUID1, "Xid 79", cause="gpu-lost"),
            Finding("tf-partial-visibility", Severity.CRITICAL, "research", "TF sees 1 of 2"),
            Finding("tf-import-failed", Severity.CRITICAL, "old", "no TF"),
        ),
        baseline=(
            KnownGpu(UUID0, "NVIDIA H100 80GB HBM3", "00000000:01:00.0"),
            KnownGpu(UUID1, "NVIDIA H100 80GB HBM3", "00000000:02:00.0"),
        ),
        expected_gpus=3,
        tf_processes=(TfProcess(4242, "gpu"), TfProcess(5151, "cpu"), TfProcess(5252, "cpu")),
        workloads=WorkloadScan(
            processes=812,
            candidates=9,
            unreadable=1,
            gpu_process_users=MappingProxyType({4242: "ana", 4444: "bob"}),
            gpu_processes=MappingProxyType(
                {
                    4242: GpuProcessFacts(4242, "ana", "python3 train.py", True),
                    4444: GpuProcessFacts(4444, "bob", "blender -b x.blend", False),
                }
            ),
        ),
    )


HOST = ExportOptions(host="gpu-node-01")


def render(snap: Snapshot | None, options: ExportOptions = HOST) -> str:
    return generate_latest(make_registry(lambda: snap, lambda: options)).decode()


def test_exposition_matches_golden_file() -> None:
    text = render(fixture_snapshot())
    if os.environ.get("TFGPUD_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_unknown_values_are_omitted_not_zero() -> None:
    text = render(fixture_snapshot())
    lost = f'gpu="1",uuid="{UUID1}"'
    assert f"tfgpud_gpu_up{{{lost}}} 0.0" in text
    assert f"tfgpud_gpu_memory_total_bytes{{{lost}}}" not in text
    assert f"tfgpud_gpu_temperature_celsius{{{lost}}}" not in text
    assert "pid=" not in text  # per-process series are opt-in
    assert "NaN" not in text
    # A probe that failed exports success 0 and no visibility/fallback values.
    assert 'tfgpud_tf_probe_success{env="old"} 0.0' in text
    assert 'tfgpud_tf_visible_gpus{env="old"}' not in text
    assert 'tfgpud_tf_cpu_fallback{env="research"} 1.0' in text
    # The smoke test ran (and failed) in research only: no series for the other env.
    assert 'tfgpud_tf_smoke_success{env="research"} 0.0' in text
    assert 'tfgpud_tf_smoke_success{env="old"}' not in text


def test_xid_series_exist_at_zero_from_first_appearance() -> None:
    text = render(fixture_snapshot())
    assert f'tfgpud_gpu_xid_errors_total{{gpu="0",uuid="{UUID0}",xid="79"}} 0.0' in text
    assert f'tfgpud_gpu_xid_errors_total{{gpu="1",uuid="{UUID1}",xid="79"}} 1.0' in text
    assert f'tfgpud_gpu_xid_errors_total{{gpu="0",uuid="{UUID0}",xid="13"}} 2.0' in text


def test_process_series_are_opt_in_and_capped() -> None:
    procs = tuple(GpuProcess(pid=1000 + i, used_memory_bytes=i + 1) for i in range(40))
    gpu = GpuReading(index=0, uuid=UUID0, processes=procs)
    snap = Snapshot(taken_at=0.0, nvml=NvmlReading(up=True, gpus=(gpu,)))
    assert "tfgpud_gpu_process_memory" not in render(snap)
    text = render(snap, ExportOptions(per_process_metrics=True))
    lines = [x for x in text.splitlines() if x.startswith("tfgpud_gpu_process_memory")]
    assert len(lines) == MAX_PROCESS_SERIES + 1
    other = [x for x in lines if 'pid="other"' in x]
    assert other == [
        f'tfgpud_gpu_process_memory_bytes{{gpu="0",pid="other",process="other",'
        f'uuid="{UUID0}"}} {float(sum(range(1, 25)))}'
    ]
    assert f'tfgpud_gpu_processes{{gpu="0",uuid="{UUID0}"}} 40.0' in text
    # Memory unknown: no series for that process.
    unknown = GpuReading(index=0, uuid=UUID0, processes=(GpuProcess(7, None, "gone"),))
    one = Snapshot(taken_at=0.0, nvml=NvmlReading(up=True, gpus=(unknown,)))
    assert 'pid="7"' not in render(one, ExportOptions(per_process_metrics=True))


def by_user(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("tfgpud_gpu_user_"):
            key, value = line.rsplit(" ", 1)
            out[key.replace(f',uuid="{UUID0}"', "").replace('gpu="0",', "")] = float(value)
    return out


def test_memory_and_processes_by_user_and_kind_are_bounded() -> None:
    """40 processes of 6 users on one GPU: the 3 users holding most are named, the rest (and
    processes whose user is unknown) are user="other"; TensorFlow or not is the kind."""
    users = {1000 + i: f"u{i % 6}" for i in range(39)}
    procs = tuple(
        GpuProcess(pid=1000 + i, used_memory_bytes=(i % 6 + 1) * 2**30) for i in range(40)
    )
    gpu = GpuReading(index=0, uuid=UUID0, processes=procs)
    tf = tuple(TfProcess(1000 + i, "gpu") for i in range(0, 40, 6))  # u0's processes
    snap = Snapshot(
        taken_at=0.0,
        nvml=NvmlReading(up=True, gpus=(gpu,)),
        tf_processes=tf,
        workloads=WorkloadScan(gpu_process_users=MappingProxyType(users)),
    )
    series = by_user(render(snap))
    named = {k.split('user="')[1].split('"')[0] for k in series}
    assert named == {"u5", "u4", "u3", "other"} and MAX_USER_SERIES == 3
    assert series['tfgpud_gpu_user_memory_bytes{kind="other",user="u5"}'] == 6 * 6 * 2**30
    assert series['tfgpud_gpu_user_processes{kind="other",user="u5"}'] == 6
    # u0 holds least: its 7 TensorFlow processes are counted under user="other"
    assert series['tfgpud_gpu_user_processes{kind="tensorflow",user="other"}'] == 7
    assert sum(v for k, v in series.items() if "user_processes" in k) == 40
    assert len(series) <= 2 * 2 * (MAX_USER_SERIES + 1)
    # A new job of a known user adds no series (pids are not labels).
    more = replace(gpu, processes=(*procs, GpuProcess(9999, 2**30)))
    users2 = {**users, 9999: "u5"}
    snap2 = replace(
        snap,
        nvml=NvmlReading(up=True, gpus=(more,)),
        workloads=WorkloadScan(gpu_process_users=MappingProxyType(users2)),
    )
    assert set(by_user(render(snap2))) == set(series)


def test_finding_series_carry_cause_role_and_the_alert_host() -> None:
    text = render(fixture_snapshot())
    assert (
        'tfgpud_finding{cause="TfgpudGpuLost",code="gpu-xid-critical",host="gpu-node-01",'
        f'role="consequence",severity="critical",subject="{UUID1}"}} 1.0'
    ) in text
    assert (
        'tfgpud_finding{cause="TfgpudGpuLost",code="gpu-lost",host="gpu-node-01",'
        f'role="cause",severity="critical",subject="{UUID1}"}} 1.0'
    ) in text
    # Without a host (no daemon around it) the label is left out, not empty.
    assert 'host="' not in render(fixture_snapshot(), ExportOptions())


def test_before_first_poll_only_build_info() -> None:
    text = render(None)
    assert 'tfgpud_build_info{version="' in text
    assert "tfgpud_nvml_up" not in text


def test_openmetrics_negotiation_renders() -> None:
    text = generate_openmetrics(make_registry(fixture_snapshot, lambda: HOST)).decode()
    assert text.endswith("# EOF\n")
    assert "tfgpud_gpu_xid_errors_total" in text


def test_nvml_down_exports_up_zero_and_no_gpu_series() -> None:
    snap = Snapshot(taken_at=0.0, nvml=NvmlReading(up=False, error="LIBRARY_NOT_FOUND"))
    text = render(snap)
    assert "tfgpud_nvml_up 0.0" in text
    assert "tfgpud_nvml_gpus" not in text
    assert "tfgpud_driver_info{" not in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_check_metrics_accepts_the_exposition() -> None:
    proc = subprocess.run(
        ["promtool", "check", "metrics"],
        input=render(fixture_snapshot()).encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_exposition_cache_renders_once_per_snapshot() -> None:
    from tfgpud.exporter import Exposition

    current: list[Snapshot] = [fixture_snapshot()]
    calls = {"n": 0}

    def source() -> Snapshot:
        calls["n"] += 1
        return current[0]

    registry = make_registry(source)
    expo = Exposition(registry, source)
    first, ctype = expo("")
    assert ctype.startswith("text/plain")
    n = calls["n"]
    assert expo("")[0] is first  # cached: the registry was not walked again
    assert calls["n"] == n + 1  # only the identity check
    om, om_type = expo("application/openmetrics-text; version=1.0.0")
    assert om_type.startswith("application/openmetrics-text") and om.endswith(b"# EOF\n")
    current[0] = Snapshot(taken_at=1.0, nvml=NvmlReading(up=False, error="DRIVER_NOT_LOADED"))
    fresh, _ = expo("")
    assert fresh != first and b"tfgpud_nvml_up 0.0" in fresh


def test_family_by_family_encoding_is_the_encoders_own_text_and_skips_what_repeats() -> None:
    from tfgpud.exporter import FamilyEncoder, Format

    base = fixture_snapshot()
    assert base.nvml is not None
    gpu0 = base.nvml.gpus[0]
    hotter = replace(gpu0, temperature_celsius=75.0, utilization_gpu_ratio=float("nan"))
    snaps = [
        base,
        replace(base, taken_at=base.taken_at + 10),  # only the poll's own figures move
        replace(base, nvml=replace(base.nvml, gpus=(hotter, *base.nvml.gpus[1:]))),
        Snapshot(taken_at=1.0, nvml=NvmlReading(up=False, error="DRIVER_NOT_LOADED")),
        base,
    ]
    current = [base]
    registry = make_registry(lambda: current[0], lambda: HOST)
    for fmt, whole in ((Format.TEXT, generate_latest), (Format.OPENMETRICS, generate_openmetrics)):
        encoder = FamilyEncoder(fmt)
        counts = []
        for snap in snaps:
            current[0] = snap
            before = encoder.encoded
            assert encoder(registry) == whole(registry)  # byte for byte
            counts.append(encoder.encoded - before)
        families = sum(1 for _ in registry.collect())
        assert counts[0] == families  # the first rendering encodes everything
        assert 0 < counts[1] < families / 4  # the next, only what changed
        assert counts[2] > counts[1]  # a GPU's readings changed too (NaN never repeats)
        assert counts[4] > families / 2  # after the driver was gone, nearly all of it again


def test_gpu_info_of_a_lost_gpu_is_what_was_last_known_or_absent() -> None:
    text = render(fixture_snapshot())
    info = [line for line in text.splitlines() if line.startswith("tfgpud_gpu_info{")]
    # Never an empty label value or an invented UUID: the GPU lost before the daemon knew its
    # compute capability, and the one whose UUID was never read, have no identity series.
    assert len(info) == 1 and f'uuid="{UUID0}"' in info[0]
    assert not any('=""' in line or "GPU-unknown" in line for line in info)
    # Its health is still visible: tfgpud_gpu_up and the count by state.
    assert f'tfgpud_gpu_up{{gpu="1",uuid="{UUID1}"}} 0.0' in text
    assert 'tfgpud_gpus{state="lost"} 2.0' in text and 'tfgpud_gpus{state="ok"} 1.0' in text
    assert 'uuid="GPU-unknown-index-2",xid=' not in text


def test_a_gpu_lost_while_the_daemon_runs_keeps_its_identity_labels() -> None:
    healthy = GpuReading(
        index=1,
        uuid=UUID1,
        name="NVIDIA A100-SXM4-80GB",
        pci_bus_id="00000000:41:00.0",
        compute_capability=(8, 0),
    )
    # NVML no longer answers for it; only the UUID comes from the collector's own memory.
    lost = GpuReading(index=1, uuid=UUID1, lost=True, error="GPU_IS_LOST")
    current = [Snapshot(taken_at=0.0, nvml=NvmlReading(up=True, gpus=(healthy,)))]
    registry = make_registry(lambda: current[0])
    generate_latest(registry)
    current[0] = Snapshot(taken_at=1.0, nvml=NvmlReading(up=True, gpus=(lost,)))
    text = generate_latest(registry).decode()
    assert (
        'tfgpud_gpu_info{compute_capability="8.0",gpu="1",name="NVIDIA A100-SXM4-80GB",'
        f'pci_bus_id="00000000:41:00.0",uuid="{UUID1}"}} 1.0'
    ) in text
    assert 'tfgpud_gpus{state="lost"} 1.0' in text


def test_gpu_identity_memory_is_bounded() -> None:
    from tfgpud.exporter import GpuIdentities

    ids = GpuIdentities(limit=4)
    snap = Snapshot(taken_at=0.0)
    for i in range(10):
        g = GpuReading(
            index=i, uuid=f"GPU-{i:08d}", name="n", pci_bus_id="b", compute_capability=(9, 0)
        )
        assert ids.identify(g, snap) == ("n", "b", "9.0")
    first = GpuReading(index=0, uuid="GPU-00000000", lost=True)
    last = GpuReading(index=9, uuid="GPU-00000009", lost=True)
    assert ids.identify(first, snap) is None  # forgotten: the oldest went first
    assert ids.identify(last, snap) == ("n", "b", "9.0")


@pytest.mark.parametrize(
    ("nvml", "expected", "states"),
    [
        # NVML down: every expected GPU is missing, and at least those on the PCI bus.
        (NvmlReading(up=False, error="DRIVER_NOT_LOADED"), 1, (0, 0, 0, 2)),
        # One of the two baseline GPUs vanished from NVML's list.
        (NvmlReading(up=True, gpus=(GpuReading(index=0, uuid=UUID0),)), 2, (1, 0, 0, 1)),
        # Listed but unreadable for something other than GPU_IS_LOST.
        (
            NvmlReading(
                up=True,
                gpus=(
                    GpuReading(index=0, uuid=UUID0, error="UNKNOWN"),
                    GpuReading(index=1, uuid=UUID1),
                ),
            ),
            2,
            (1, 0, 1, 0),
        ),
    ],
)
def test_gpus_by_state(nvml: NvmlReading, expected: int, states: tuple[int, ...]) -> None:
    snap = Snapshot(
        taken_at=0.0,
        pci=fixture_snapshot().pci,
        nvml=nvml,
        baseline=(KnownGpu(UUID0), KnownGpu(UUID1)),
        expected_gpus=expected,
    )
    text = render(snap)
    for state, n in zip(("ok", "lost", "failing", "missing"), states, strict=True):
        assert f'tfgpud_gpus{{state="{state}"}} {float(n)}' in text


def test_the_render_cache_holds_one_body_per_format_whatever_is_asked() -> None:
    from tfgpud.exporter import CONTENT_TYPES, Exposition

    snap = fixture_snapshot()
    expo = Exposition(make_registry(lambda: snap), lambda: snap)
    types = set()
    for i in range(500):
        types.add(expo(f"application/openmetrics-text; version=1.0.{i}; x={'y' * i}")[1])
        types.add(expo(f"application/openmetrics-text; escaping=dots{i}")[1])
    assert types <= set(CONTENT_TYPES.values()) and len(types) == 2
    assert len(expo._cache) == 2


def series_of(text: str, uuid: str) -> int:
    return sum(1 for x in text.splitlines() if not x.startswith("#") and f'uuid="{uuid}"' in x)


@pytest.mark.parametrize(
    ("jobs", "per_process", "expected"),
    [
        (1, False, 19 + 2),  # one user's TensorFlow job (docs/metrics.md, "Series per GPU")
        (20, False, 19 + 2 * 2),  # 20 jobs of 2 users
        (20, True, 19 + 2 * 2 + 17),  # and the per-process series: 16 + pid="other"
    ],
)
def test_series_per_gpu_are_as_documented(jobs: int, per_process: bool, expected: int) -> None:
    procs = tuple(
        GpuProcess(pid=100 + i, used_memory_bytes=2**30, name="python") for i in range(jobs)
    )
    gpu = GpuReading(
        index=0,
        uuid=UUID0,
        name="NVIDIA H100 80GB HBM3",
        pci_bus_id="00000000:01:00.0",
        compute_capability=(9, 0),
        memory_total_bytes=80 * 2**30,
        memory_used_bytes=jobs * 2**30,
        memory_free_bytes=(80 - jobs) * 2**30,
        utilization_gpu_ratio=0.9,
        temperature_celsius=60.0,
        power_watts=300.0,
        ecc_uncorrected_total=0,
        processes=procs,
    )
    snap = Snapshot(
        taken_at=0.0,
        nvml=NvmlReading(up=True, gpus=(gpu,)),
        tf_processes=tuple(TfProcess(p.pid, "gpu") for p in procs),
        workloads=WorkloadScan(
            gpu_process_users=MappingProxyType({p.pid: f"u{p.pid % 2}" for p in procs})
        ),
    )
    text = render(snap, ExportOptions(per_process_metrics=per_process))
    assert series_of(text, UUID0) == expected
