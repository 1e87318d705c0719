"""The renderings a person reads: the verdict, `tfgpud status`, the doctor report, the page;
and that no string from outside can drive the terminal they are printed on."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import replace
from html.parser import HTMLParser
from typing import Any

import pytest
from test_diagnosis import NVML2, PCI2, UUID0, UUID1, gpu, libs, probe, snap

from tfgpud import codes
from tfgpud.config import Config
from tfgpud.diagnosis import diagnose
from tfgpud.model import GpuProcess, KnownGpu, NvmlReading, ProbeStatus, Snapshot
from tfgpud.text import PrintableLogFilter, printable
from tfgpud.views import (
    CAUSE_PHRASES,
    colourize,
    fix_commands,
    render_page,
    render_report,
    render_status_text,
    shown_evidence,
    status_document,
    verdict,
)

CONFIG = Config()
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202e"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def diagnosed(s: Snapshot) -> Snapshot:
    return replace(s, findings=diagnose(s, CONFIG))


def doc(s: Snapshot) -> dict[str, Any]:
    return status_document(diagnosed(s), "gpu1")


# --- the verdict ---------------------------------------------------------------------------------


def test_verdict_healthy() -> None:
    s = diagnosed(snap())
    assert verdict(s, s.findings) == ("ok", "TensorFlow can use 2 of 2 GPUs")


def test_verdict_env_on_the_cpu_names_the_cause() -> None:
    s = diagnosed(snap(tf=(probe(gpus=(), libraries=libs(missing={"cudart", "cudnn"})),)))
    assert verdict(s, s.findings) == (
        "critical",
        "TensorFlow in env `research` runs on the CPU: its CUDA libraries are missing",
    )


def test_verdict_partial_visibility() -> None:
    s = diagnosed(snap(tf=(probe(gpus=probe().gpus[:1]),)))
    state, sentence = verdict(s, s.findings)
    assert state == "critical" and sentence.startswith("TensorFlow in env `research` sees 1 of 2")


def test_verdict_lost_gpu_says_how_many_tensorflow_can_use() -> None:
    nvml = replace(NVML2, gpus=(gpu(0, UUID0), gpu(1, UUID1, lost=True, memory_total_bytes=None)))
    s = diagnosed(snap(nvml=nvml))
    assert verdict(s, s.findings) == (
        "critical",
        "GPU 1 (NVIDIA H100 80GB HBM3) is lost; TensorFlow can use 1 of 2 GPUs",
    )


def test_verdict_driver_down_is_the_root_cause_not_the_vanished_gpus() -> None:
    pci = replace(PCI2, nvidia_module_version=None, device_nodes=())
    nvml = NvmlReading(up=False, error="DRIVER_NOT_LOADED")
    s = diagnosed(snap(pci=pci, nvml=nvml, tf=(), baseline=(KnownGpu(UUID0), KnownGpu(UUID1))))
    state, sentence = verdict(s, s.findings)
    assert state == "critical" and sentence.startswith("The NVIDIA kernel module is not loaded")


def test_verdict_memory_nearly_full_is_a_warning_with_a_short_gpu_name() -> None:
    # Two jobs sharing the GPU fill it: pressure (one job owning a full GPU is not).
    shared = (GpuProcess(4242, 40 * 1024**3, "python3"), GpuProcess(4343, 39 * 1024**3, "python3"))
    full = gpu(0, UUID0, memory_used_bytes=79 * 1024**3, processes=shared)
    s = diagnosed(
        snap(
            nvml=replace(NVML2, gpus=(full, gpu(1, UUID1))),
            pressure_since={UUID0: 1_800_000_000.0 - 600},
        )
    )
    state, sentence = verdict(s, s.findings)
    assert state == "warning"
    assert sentence.startswith("TensorFlow can use 2 of 2 GPUs; GPU 0 (NVIDIA H100 80GB HBM3) ")
    assert UUID0 not in sentence


def test_verdict_before_the_first_poll_and_without_gpus() -> None:
    assert status_document(None, "h")["verdict"]["state"] == "warning"
    s = diagnosed(snap(pci=replace(PCI2, gpus=()), nvml=replace(NVML2, gpus=()), tf=()))
    assert verdict(s, s.findings)[0] == "ok"
    assert verdict(s, s.findings)[1].startswith("No NVIDIA GPU on this machine")
    # The same with TensorFlow probed and NVML not installed (a CPU-only machine, `make run`):
    # not "TensorFlow can use 0 of 0 GPUs".
    cpu_only = diagnosed(
        snap(
            pci=replace(PCI2, gpus=()),
            nvml=NvmlReading(up=False, error="LIBRARY_NOT_FOUND"),
            tf=(probe(gpus=()),),
        )
    )
    assert verdict(cpu_only, cpu_only.findings) == (
        "ok",
        "No NVIDIA GPU on this machine: TensorFlow runs on the CPU, as expected here",
    )


def test_every_cause_of_a_fallback_has_a_verdict_phrase() -> None:
    assert set(CAUSE_PHRASES) == set(codes.TF_CAUSES)


# --- tfgpud status -------------------------------------------------------------------------------


def test_status_text_shows_top_processes_per_gpu() -> None:
    procs = tuple(GpuProcess(1000 + i, (i + 1) * 1024**3, f"job{i}") for i in range(5))
    nvml = replace(
        NVML2,
        gpus=(
            gpu(
                0,
                UUID0,
                processes=procs,
                utilization_gpu_ratio=0.63,
                temperature_celsius=67.0,
                power_watts=212.0,
            ),
            gpu(1, UUID1),
        ),
    )
    text = render_status_text(doc(snap(nvml=nvml)))
    gpu0 = text[text.index("GPU 0") : text.index("GPU 1")]
    # The three largest, largest first, then how many more.
    assert re.findall(r"pid (\d+)", gpu0) == ["1004", "1003", "1002"]
    assert "job4" in gpu0 and "5.0 GiB" in gpu0 and "and 2 more process(es)" in gpu0
    assert "util 63%" in gpu0 and "67 °C" in gpu0 and "212 W" in gpu0


def test_status_text_says_what_tensorflow_sees_and_why() -> None:
    text = render_status_text(doc(snap(tf=(probe(gpus=(), libraries=libs(missing={"cudnn"})),))))
    assert text.startswith("CRITICAL  TensorFlow in env `research` runs on the CPU: ")
    assert "env research  TensorFlow 2.21.0: sees 0 of 2 GPUs: on the CPU" in text
    assert "probe ok" not in text and "ok, sees" not in text
    assert "caused by: tf-cudnn-mismatch" in text or "caused by: tf-cuda-libs-missing" in text
    assert "libcudnn.so.9: cannot open shared object file" in text  # evidence is shown


def test_status_text_of_a_vanished_gpu_lists_it_as_missing() -> None:
    gone = KnownGpu(UUID1, "NVIDIA H100", "00000000:02:00.0")
    s = snap(nvml=replace(NVML2, gpus=(gpu(0, UUID0),)), baseline=(KnownGpu(UUID0), gone))
    text = render_status_text(doc(s))
    assert re.search(rf"GPU -  NVIDIA H100 +MISSING  {UUID1} at 00000000:02:00.0", text)


def test_evidence_is_shown_once_and_under_the_cause() -> None:
    line = "Cannot dlopen some GPU libraries. Skipping registering GPU devices..."
    r = probe(gpus=(), libraries=libs(missing={"cudart"}), log_lines=(line,))
    d = doc(snap(tf=(r,)))
    by_code = dict(
        zip([f["code"] for f in d["findings"]], shown_evidence(d["findings"]), strict=True)
    )
    assert line not in by_code["tf-cpu-fallback"] and line in by_code["tf-cuda-libs-missing"]
    assert sum(lines.count(line) for lines in by_code.values()) == 1
    assert render_status_text(d).count(line) == 1


# --- nothing from outside reaches the terminal raw ------------------------------------------------


def hostile_snapshot() -> Snapshot:
    nvml = replace(
        NVML2,
        gpus=(
            gpu(
                0,
                UUID0,
                name=f"H100{HOSTILE}",
                processes=(GpuProcess(7, 1024**3, f"evil{HOSTILE}"),),
            ),
            gpu(1, UUID1),
        ),
    )
    r = probe(
        status=ProbeStatus.IMPORT_FAILED,
        error=f"ImportError: {HOSTILE}",
        log_lines=(f"Error: {HOSTILE}",),
        traceback=(f'  File "{HOSTILE}", line 1',),
        environment={"CUDA_VISIBLE_DEVICES": HOSTILE},
        gpus=(),
    )
    return diagnosed(snap(nvml=nvml, tf=(r,)))


def test_status_text_escapes_what_came_from_outside() -> None:
    text = render_status_text(status_document(hostile_snapshot(), "h"))
    assert not CONTROL.search(text)
    assert "\\x1b]0;pwned\\x07" in text and "evil\\x1b]0;pwned" in text
    coloured = render_status_text(status_document(hostile_snapshot(), "h"), colour=True)
    # Colour is on, and its SGR codes are the only escape sequences in the output.
    assert "\x1b[1;31m" in coloured
    assert not CONTROL.search(re.sub(r"\x1b\[[\d;]*m", "", coloured))


def test_doctor_report_escapes_what_came_from_outside() -> None:
    s = hostile_snapshot()
    report = render_report(s, s.findings, 2, "h")
    assert not CONTROL.search(report) and "\\x1b]0;pwned" in report
    coloured = render_report(s, s.findings, 2, "h", colour=True)
    assert not CONTROL.search(re.sub(r"\x1b\[[\d;]*m", "", coloured))


def test_page_escapes_markup_and_controls() -> None:
    s = hostile_snapshot()
    d = status_document(s, "<script>alert(1)</script>")
    page = render_page(d)
    assert not CONTROL.search(page)
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page


def test_log_lines_are_printable_message_traceback_and_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(PrintableLogFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("tfgpud.test.escaping")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError(f"bad {HOSTILE}")
        except ValueError:
            log.exception("probe said %s", HOSTILE, extra={"SUMMARY": HOSTILE})
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert not CONTROL.search(out) and out.count("\\x1b]0;pwned") == 2
    assert "Traceback" in out and "\n" in out  # still lines, still a traceback


def test_printable_keeps_ordinary_text() -> None:
    text = "GPU 0 NVIDIA H100 80GB HBM3 — 61 °C, müde, 中文, tab\there"
    assert printable(text) == text
    assert printable("a\nb") == "a\\nb" and printable("a\nb", newlines=True) == "a\nb"
    assert printable("\x1b[31m") == "\\x1b[31m" and printable("\u202e") == "\\u202e"


def test_colourize_paints_only_known_tokens() -> None:
    out = colourize("CRITICAL  x\n  [warning] y\n  GPU 1  H100  LOST\nplain")
    assert out.splitlines()[-1] == "plain"
    assert "\x1b[1;31mCRITICAL\x1b[0m" in out and "\x1b[1;33m[warning]\x1b[0m" in out
    assert "\x1b[31mLOST\x1b[0m" in out


# --- the page ------------------------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def tags(page: str) -> list[tuple[str, dict[str, str]]]:
    p = _Tags()
    p.feed(page)
    return p.tags


def test_page_verdict_time_links_and_unique_anchors() -> None:
    page = render_page(doc(snap(tf=(probe(gpus=(), libraries=libs(missing={"cudart"})),))))
    t = tags(page)
    verdict_el = [a for tag, a in t if a.get("id") == "verdict"]
    assert verdict_el == [{"id": "verdict", "data-state": "critical", "role": "status"}]
    times = [a for tag, a in t if tag == "time" and a.get("id") == "last-poll"]
    assert times and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", times[0]["datetime"])
    ids = [a["id"] for _, a in t if "id" in a]
    assert len(ids) == len(set(ids))
    hrefs = {
        a["href"]
        for tag, a in t
        if tag == "a" and a.get("href", "").startswith("#f-") and a.get("class") != "code"
    }
    assert hrefs == {"#f-tf-cuda-libs-missing-research"} and hrefs <= {f"#{i}" for i in ids}
    assert "<pre><code>/opt/research/bin/python -m pip install" in page


@pytest.mark.parametrize(
    ("fix", "commands"),
    [
        (
            "/opt/v/bin/python -m pip install 'tensorflow[and-cuda]==2.21.0'",
            ["/opt/v/bin/python -m pip install 'tensorflow[and-cuda]==2.21.0'"],
        ),
        (
            "Reboot; or run `sudo rmmod nvidia_uvm nvidia && sudo modprobe nvidia`.",
            ["sudo rmmod nvidia_uvm nvidia && sudo modprobe nvidia"],
        ),
        (
            'Set `run_as = "alice"` in the entry `research` (`getent passwd alice`).',
            ["getent passwd alice"],
        ),
        ("See tf-cuda-libs-missing for env `research`.", []),
        ("Nothing to do on a CPU-only machine.", []),
    ],
)
def test_fix_commands_are_the_runnable_spans(fix: str, commands: list[str]) -> None:
    assert fix_commands(fix) == commands
