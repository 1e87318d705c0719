"""Property tests: no scenario file, however broken, crashes the simulated driver.

Each test keeps one long-lived child process and feeds it many inputs (a fresh process per
example would be slow); a child that dies from a signal fails the example, and is restarted so
that Hypothesis can shrink the input.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    FAKEDRIVER_DIR,
    build_fakedriver,
    fakedriver_env,
    render_scenario,
    write_text_atomically,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

FUZZ_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- inputs ---------------------------------------------------------------------------------

names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20)
u32 = st.integers(0, 2**32 - 1)
valid_gpu = st.fixed_dictionaries(
    {},
    optional={
        "name": names,
        "memory_total": st.integers(0, 2**63 - 1),
        "memory_used": st.integers(0, 2**63 - 1),
        "memory_reserved": st.integers(0, 2**40),
        "utilization_gpu": st.integers(0, 100),
        "utilization_memory": st.integers(0, 100),
        "temperature": st.integers(0, 2**31 - 1),
        "power_mw": u32,
        "cc_major": st.integers(0, 12),
        "cc_minor": st.integers(0, 9),
        "lost": st.booleans(),
        "xids": st.lists(st.integers(0, 200), max_size=6),
        "ecc_uncorrected": st.integers(0, 2**63 - 1),
        "persistence_mode": st.booleans(),
        "mig_mode": st.booleans(),
    },
).flatmap(
    lambda gpu: st.lists(st.tuples(u32, st.integers(0, 2**63 - 1)), max_size=4).map(
        lambda procs: {
            **gpu,
            "process_pids": [p for p, _ in procs],
            "process_memory": [m for _, m in procs],
        }
    )
)
valid_top = st.fixed_dictionaries(
    {},
    optional={
        "driver_version": names,
        "nvml_version": names,
        "cuda_driver_version": st.integers(0, 2**31 - 1),
        "cudart_version": st.integers(0, 2**31 - 1),
        "cudnn_version": st.integers(1, 2**31 - 1),
    },
)


@st.composite
def valid_scenarios(draw: st.DrawFn) -> tuple[str, bytes, int]:
    gpus = draw(st.lists(valid_gpu, max_size=6))
    return ("valid", render_scenario(gpus, **draw(valid_top)).encode(), len(gpus))


# Fragments that are likely to reach the parser's corners.
TOKENS = [
    b"[[gpu]]\n",
    b"[gpu]",
    b"[[",
    b"]]",
    b" = ",
    b"=",
    b'"',
    b"'",
    b'"""',
    b"[",
    b"]",
    b",",
    b"#",
    b"\n",
    b"\r\n",
    b"\\",
    b"\\u00e9",
    b"\\U0001F600",
    b"\\ud800",
    b"true",
    b"false",
    b"0x",
    b"0b",
    b"-",
    b"+",
    b"_",
    b".",
    b"1e3",
    b"inf",
    b"9223372036854775807",
    b"9223372036854775808",
    b"-9223372036854775808",
    b"18446744073709551616",
    b"uuid",
    b"pci_bus_id",
    b'"00000000:FF:1F.7"',
    b"xids",
    b"process_pids",
    b"lost",
    b'init_error = "UNKNOWN"\n',
    b"cuda_init_error = 100\n",
    b"cudnn_version = 90300\n",
    b"\x00",
    b"\xff",
    b"\t",
    b"{",
    b"x" * 200,
    b"[" + b"1," * 130 + b"]",
]


@st.composite
def mutated_scenarios(draw: st.DrawFn) -> tuple[str, bytes, int]:
    _, text, _ = draw(valid_scenarios())
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate", "truncate"]))
        pos = draw(st.integers(0, len(text)))
        if op == "insert":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 20)) :]
        elif op == "replace":
            text = text[:pos] + bytes([draw(st.integers(0, 255))]) + text[pos + 1 :]
        elif op == "duplicate":
            lines = text.split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            text = b"\n".join(lines)
        else:
            text = text[:pos]
    return ("mutated", text, -1)


scenarios = st.one_of(
    st.binary(max_size=600).map(lambda b: ("random", b, -1)),
    mutated_scenarios(),
    valid_scenarios(),
)

# --- long-lived children ----------------------------------------------------------------------


class Child:
    """A child process answering one line per request; restarted after it dies."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self.proc = subprocess.Popen(
                self.args,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        return self.proc

    def ask(self, request: bytes, timeout: float = 30.0) -> str:
        """Send a request; the answer line, or 'died: ...' / 'hung' (the child is gone then)."""
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(request)
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        if line.endswith(b"\n"):
            return line.decode(errors="replace").strip()
        if not ready:
            proc.kill()
            proc.wait()
            return "hung"
        rc = proc.wait()
        if rc < 0:
            return f"died: signal {signal.Signals(-rc).name}"
        return f"died: exit {rc}"

    def close(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def scenario_checker() -> Iterator[Child]:
    """build/fakedriver/scenario-check: the parser under AddressSanitizer and UBSan."""
    try:
        build_fakedriver(FAKEDRIVER_DIR, check_tools=True)
    except RuntimeError as e:  # e.g. no libasan on this machine
        pytest.skip(f"sanitizer build unavailable: {e}")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1", UBSAN_OPTIONS="")
    child = Child([str(FAKEDRIVER_DIR / "scenario-check")], env)
    yield child
    child.close()


@FUZZ_SETTINGS
@given(example=scenarios)
def test_parser_under_sanitizers(scenario_checker: Child, example: tuple[str, bytes, int]) -> None:
    kind, data, ngpus = example
    answer = scenario_checker.ask(b"%d\n" % len(data) + data)
    assert answer.startswith(("ok ", "error ")), answer
    event(f"{kind}: {answer.split()[0]}")
    if kind == "valid":
        assert answer == f"ok {ngpus}"


WORKER = textwrap.dedent(
    r"""
    import ctypes, os, struct, sys
    from ctypes import byref, c_int, c_uint, c_ulonglong, c_void_p, c_size_t

    nv = ctypes.CDLL("libnvidia-ml.so.1")
    cu = ctypes.CDLL("libcuda.so.1")
    buf = ctypes.create_string_buffer(256)
    mem = ctypes.create_string_buffer(128)
    u, u2, i1, i2, ull = c_uint(), c_uint(), c_int(), c_int(), c_ulonglong()
    stale = []  # handles from earlier scenarios: their GPU may be gone now

    def device(h):
        nv.nvmlDeviceGetName(h, buf, 96)
        nv.nvmlDeviceGetName(h, buf, 3)
        nv.nvmlDeviceGetUUID(h, buf, 96)
        h2 = c_void_p()
        nv.nvmlDeviceGetHandleByUUID(buf, byref(h2))
        nv.nvmlDeviceGetIndex(h, byref(u))
        nv.nvmlDeviceGetPciInfo_v3(h, mem)
        nv.nvmlDeviceGetPciInfo(h, mem)
        nv.nvmlDeviceGetHandleByPciBusId_v2(mem.raw[36:68].split(b"\0")[0], byref(h2))
        nv.nvmlDeviceGetMemoryInfo(h, mem)
        struct.pack_into("I", mem, 0, 0x02000028)
        nv.nvmlDeviceGetMemoryInfo_v2(h, mem)
        nv.nvmlDeviceGetUtilizationRates(h, mem)
        nv.nvmlDeviceGetTemperature(h, 0, byref(u))
        nv.nvmlDeviceGetPowerUsage(h, byref(u))
        nv.nvmlDeviceGetCudaComputeCapability(h, byref(i1), byref(i2))
        nv.nvmlDeviceGetArchitecture(h, byref(u))
        for fn, size in (("nvmlDeviceGetComputeRunningProcesses_v3", 24),
                         ("nvmlDeviceGetComputeRunningProcesses", 16),
                         ("nvmlDeviceGetGraphicsRunningProcesses_v3", 24)):
            count = c_uint(0)
            if getattr(nv, fn)(h, byref(count), None) == 7:
                arr = ctypes.create_string_buffer(size * count.value)
                getattr(nv, fn)(h, byref(count), arr)
        nv.nvmlDeviceGetTotalEccErrors(h, 1, 0, byref(ull))
        nv.nvmlDeviceGetPersistenceMode(h, byref(u))
        nv.nvmlDeviceGetMigMode(h, byref(u), byref(u2))
        nv.nvmlDeviceGetFanSpeed(h, byref(u))
        es = c_void_p()
        if nv.nvmlEventSetCreate(byref(es)) == 0:
            nv.nvmlDeviceRegisterEvents(h, 8, es)
            for _ in range(200):
                if nv.nvmlEventSetWait_v2(es, mem, 0) != 0:
                    break
            nv.nvmlEventSetFree(es)

    def nvml():
        rc = nv.nvmlInit_v2()
        if rc != 0:
            return rc, -1
        nv.nvmlSystemGetDriverVersion(buf, 80)
        nv.nvmlSystemGetNVMLVersion(buf, 80)
        nv.nvmlSystemGetCudaDriverVersion(byref(i1))
        n = c_uint(0)
        nv.nvmlDeviceGetCount_v2(byref(n))
        for k in range(min(n.value, 70) + 1):
            h = c_void_p()
            if nv.nvmlDeviceGetHandleByIndex_v2(k, byref(h)) == 0:
                device(h)
                stale.append(h)
        for h in stale[-4:]:
            device(h)
        del stale[:-4]
        nv.nvmlShutdown()
        return rc, n.value

    def cuda():
        if cu.cuInit(0) != 0:
            return
        n = c_int(0)
        cu.cuDeviceGetCount(byref(n))
        for d in range(min(n.value, 70) + 1):
            cu.cuDeviceGetName(buf, 256, d)
            for a in (1, 16, 33, 75, 76, 200):
                cu.cuDeviceGetAttribute(byref(i1), a, d)
            size = c_size_t()
            cu.cuDeviceTotalMem_v2(byref(size), d)
            cu.cuDeviceGetPCIBusId(buf, 13, d)
            cu.cuDeviceGetUuid(buf, d)

    for line in sys.stdin:
        rc, count = nvml()
        cuda()
        sys.stdout.write(f"{rc} {count}\n")
        sys.stdout.flush()
    """
)


@pytest.fixture(scope="module")
def library_worker(
    fakedriver: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Child, Path]]:
    scenario = tmp_path_factory.mktemp("fuzz") / "scenario.toml"
    child = Child([sys.executable, "-c", WORKER], fakedriver_env(scenario, libdir=fakedriver))
    yield child, scenario
    child.close()


@FUZZ_SETTINGS
@given(example=scenarios)
def test_libraries_survive_any_scenario(
    library_worker: tuple[Child, Path], example: tuple[str, bytes, int]
) -> None:
    child, scenario = library_worker
    kind, data, ngpus = example
    write_text_atomically(scenario, data)
    answer = child.ask(b"go\n")
    assert not answer.startswith(("died", "hung")), answer
    rc, count = (int(x) for x in answer.split())
    assert rc in (0, 4, 9, 18, 999)  # success, an init_error, or a malformed scenario
    event(f"{kind}: nvmlInit -> {rc}")
    if kind == "valid":
        assert (rc, count) == (0, ngpus)
