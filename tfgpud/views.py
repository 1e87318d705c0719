"""Every rendering of status: the /status JSON, the systemd STATUS= line, the HTML page at /,
the ``tfgpud status`` text and the ``tfgpud doctor`` report.

The page and the texts render the /status document (doctor's report builds one from its own
snapshot), so they say the same thing. Strings from outside (probe reports, process names, GPU
names, files) are made printable in the texts (:func:`tfgpud.text.printable`) and escaped in
the page; the JSON carries them as they are.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tfgpud import __version__, codes
from tfgpud.diagnosis import worst_severity
from tfgpud.diagnosis.readings import gpu_label, nvml_gpus, usable_gpus
from tfgpud.model import Finding, GpuReading, Severity, Snapshot, TfProbeResult, to_jsonable
from tfgpud.text import gib, printable, trim_traceback

# Memory used at or above this share of a GPU's total is "nearly full" on the page and in text.
NEARLY_FULL = 0.95
# Processes listed per GPU in the page and the text (the rest are counted).
TOP_PROCESSES = 3
# Evidence lines per finding in `tfgpud status` (the page and doctor show them all).
STATUS_EVIDENCE_LINES = 6

# How the verdict says why an env runs on the CPU, for each cause code (codes.TF_CAUSES).
CAUSE_PHRASES: dict[str, str] = {
    "tf-cpu-only-build": "it is a CPU-only build",
    "tf-gpus-hidden-by-env": "CUDA_VISIBLE_DEVICES hides the GPUs",
    "tf-cuda-libs-missing": "its CUDA libraries are missing",
    "tf-libcuda-missing": "the driver's libcuda.so.1 cannot be loaded",
    "tf-driver-too-old": "the driver is too old for its CUDA version",
    "tf-driver-dso-mismatch": "its libcuda does not match the loaded driver",
    "tf-compute-capability-unsupported": "it has no kernels for these GPUs",
    "tf-cudnn-mismatch": "its cuDNN does not match the one it was built for",
    "tf-device-permission": "it may not open the GPU device nodes",
}
_FALLBACK = ("tf-cpu-fallback", "tf-partial-visibility")
_GPU_GONE = ("gpu-lost", "gpu-vanished")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summarize(snap: Snapshot) -> str:
    """One line for systemd's STATUS= and the page: GPUs, driver, envs, findings."""
    parts = []
    nv = snap.nvml
    if nv is not None and nv.up:
        lost = sum(1 for g in nv.gpus if g.lost)
        gpus = f"{len(nv.gpus)} GPU{'s' if len(nv.gpus) != 1 else ''}"
        parts.append(gpus + (f" ({lost} lost)" if lost else ""))
        parts.append(f"driver {nv.driver_version or '?'}")
        if nv.cuda_driver_version_str:
            parts.append(f"CUDA {nv.cuda_driver_version_str}")
    else:
        pci = len(snap.pci.gpus) if snap.pci else 0
        why = nv.error if nv is not None else "not polled"
        parts.append(f"NVML unavailable ({why}), {pci} NVIDIA GPU(s) on PCI")
    for r in snap.tf:
        seen = f"{len(r.gpus)} GPU(s)" if r.ok else r.status.value
        parts.append(f"TF[{r.env}]: {seen}")
    worst = [f for f in snap.findings if f.severity.value != "info"]
    parts.append(f"{len(worst)} problem(s)" if worst else "no problems")
    return ", ".join(parts)


# --- what the machine has, and the verdict ------------------------------------------------------


def gpus_total(snap: Snapshot) -> int:
    """How many GPUs this machine should have: the most any source (NVML, PCI, the baseline,
    ``[expect]``) says, lost and missing ones included."""
    pci = len(snap.pci.gpus) if snap.pci is not None else 0
    listed = len(nvml_gpus(snap))
    return max(listed, pci, len(snap.baseline), snap.expected_gpus or 0)


def gpu_state(g: GpuReading) -> str:
    """``ok``, ``lost`` (NVML: GPU_IS_LOST) or ``failing`` (unreadable for another error)."""
    return "lost" if g.lost else "failing" if g.error else "ok"


def tf_sees(r: TfProbeResult, snap: Snapshot) -> tuple[str, str]:
    """(state, text) of what TensorFlow in the env sees: ``("ok", "sees 2 of 2 GPUs")``,
    ``("critical", "sees 0 of 2 GPUs: on the CPU")``, or why the probe did not tell."""
    if not r.ok:
        state = "warning" if r.status.value in ("timeout", "refused", "no-access") else "critical"
        return state, f"probe {r.status.value}: {r.error or 'no report'}"
    total = gpus_total(snap)
    seen = len(r.gpus)
    if total == 0:
        return "ok", f"sees {_plural(seen, 'GPU')} (this machine has none)"
    text = f"sees {seen} of {_plural(total, 'GPU')}"
    if seen == 0:
        return "critical", text + ": on the CPU"
    answer = len(usable_gpus(snap))
    if answer < seen:  # a GPU stopped answering since the probe
        return "warning", f"{text} at its probe; {answer} of them answer now"
    return ("ok" if seen >= total else "critical"), text


def _usable_by_tf(snap: Snapshot) -> int | None:
    """GPUs every probed env can use now (TF's list, capped by the GPUs that answer); None
    when no env has been probed successfully."""
    ok = [r for r in snap.tf if r.ok]
    if not ok:
        return None
    usable = len(usable_gpus(snap))
    return min(min(len(r.gpus), usable) for r in ok)


def _is_consequence(f: Finding, findings: Sequence[Finding]) -> bool:
    return bool(causes_present(f, findings))


def causes_present(f: Finding, findings: Sequence[Finding]) -> list[Finding]:
    """The findings present that explain ``f`` (codes.causes_of), about its subject or the
    host."""
    why = codes.causes_of(f.code)
    return [g for g in findings if g.code in why and g.subject in (f.subject, "host") and g != f]


def _tf_sentence(snap: Snapshot) -> str | None:
    total = gpus_total(snap)
    can = _usable_by_tf(snap)
    if can is None:
        return None
    envs = [r for r in snap.tf if r.ok]
    where = f" in {'both' if len(envs) == 2 else 'all'} {len(envs)} envs" if len(envs) > 1 else ""
    return f"TensorFlow can use {can} of {_plural(total, 'GPU')}{where}"


def _short_summary(f: Finding, snap: Snapshot) -> str:
    """``f``'s summary with a GPU named as "GPU 0 (NVIDIA H100)", not by its whole label."""
    for g in nvml_gpus(snap):
        if g.uuid == f.subject:
            short = f"GPU {g.index}" + (f" ({g.name})" if g.name else "")
            return f.summary.replace(gpu_label(g), short)
    return f.summary


def _headline(f: Finding, findings: Sequence[Finding], snap: Snapshot) -> str:
    """The verdict's sentence when ``f`` is the most important problem."""
    env = next((r for r in snap.tf if r.env == f.subject), None)
    if env is not None and (f.code in _FALLBACK or f.code in CAUSE_PHRASES):
        on_env = [g for g in findings if g.subject == env.env]
        why = [CAUSE_PHRASES[g.code] for g in on_env if g.code in CAUSE_PHRASES]
        phrase = " and ".join(dict.fromkeys(why)) or "the probe found no specific cause"
        if any(g.code == "tf-cpu-fallback" for g in on_env):
            return f"TensorFlow in env `{env.env}` runs on the CPU: {phrase}"
        state, sees = tf_sees(env, snap)
        if state != "ok" or f.code == "tf-partial-visibility":
            return f"TensorFlow in env `{env.env}` {sees}: {phrase}"
    if f.code in _GPU_GONE:
        gone = [g for g in findings if g.code in _GPU_GONE]
        nv = {g.uuid: g for g in nvml_gpus(snap)}
        known = {k.uuid: k for k in snap.baseline}
        if len(gone) == 1:
            g = nv.get(f.subject)
            k = known.get(f.subject)
            name = (g.name if g else None) or (k.name if k else None)
            label = f"GPU {g.index}" if g is not None else "A GPU"
            label += f" ({name})" if name else ""
            what = f"{label} is {'lost' if f.code == 'gpu-lost' else 'gone'}"
        else:
            what = f"{len(gone)} GPUs are lost or gone"
        tf = _tf_sentence(snap)
        return what + (f"; {tf}" if tf else "")
    return _short_summary(f, snap)


def verdict(snap: Snapshot | None, findings: Sequence[Finding]) -> tuple[str, str]:
    """(state, sentence): ``ok``, ``warning`` or ``critical`` (the worst finding), and the one
    sentence that answers "can TensorFlow use the GPUs?"."""
    if snap is None:
        return "warning", "tfgpud is starting: no poll has completed yet"
    worst = worst_severity(findings)
    state = "ok" if worst in (None, Severity.INFO) else worst.value
    problems = [f for f in findings if f.severity is not Severity.INFO]
    critical = [f for f in problems if f.severity is Severity.CRITICAL]
    if critical:
        roots = [f for f in critical if not _is_consequence(f, findings)] or critical
        # The table of codes runs from the host through the GPUs to TensorFlow: the first
        # root there is the one the others most likely follow from.
        order = {code: i for i, code in enumerate(codes.CODES)}
        roots.sort(key=lambda f: order.get(f.code, len(order)))
        return state, _headline(roots[0], findings, snap)
    tf = _tf_sentence(snap) if gpus_total(snap) else None
    if tf is None:
        if gpus_total(snap) == 0:
            tf = "No NVIDIA GPU on this machine: TensorFlow runs on the CPU, as expected here"
        else:
            answer = len(usable_gpus(snap))
            tf = f"{answer} of {_plural(gpus_total(snap), 'GPU')} answer; " + (
                "TensorFlow has not been probed yet"
                if snap.tf or not snap.findings
                else "no TensorFlow env is probed"
            )
    if problems:
        return state, f"{tf}; {_short_summary(problems[0], snap)}"
    return state, tf


# --- the /status document -----------------------------------------------------------------------


def anchor(code: str, subject: str) -> str:
    """The page's element id of the finding (code, subject)."""
    return "f-" + re.sub(r"[^A-Za-z0-9_-]+", "-", f"{code}-{subject}").strip("-")


def _gpu_doc(g: GpuReading) -> dict[str, Any]:
    procs = sorted(g.processes, key=lambda p: (-(p.used_memory_bytes or 0), p.pid))
    return {
        "index": g.index,
        "uuid": g.uuid,
        "name": g.name,
        "pci_bus_id": g.pci_bus_id,
        "lost": g.lost,
        "state": gpu_state(g),
        "error": g.error,
        "memory_total_bytes": g.memory_total_bytes,
        "memory_used_bytes": g.memory_used_bytes,
        "utilization_ratio": g.utilization_gpu_ratio,
        "temperature_celsius": g.temperature_celsius,
        "power_watts": g.power_watts,
        "compute_capability": g.compute_capability_str,
        "processes": [
            {"pid": p.pid, "name": p.name, "used_memory_bytes": p.used_memory_bytes} for p in procs
        ],
    }


def status_document(snap: Snapshot | None, host: str) -> dict[str, Any]:
    """The /status JSON (also what the HTML page and `tfgpud status` render)."""
    if snap is None:
        state, sentence = verdict(None, ())
        return {
            "host": host,
            "version": __version__,
            "summary": "starting",
            "verdict": {"state": state, "sentence": sentence},
            "findings": [],
        }
    return report_document(snap, snap.findings, host)


def report_document(snap: Snapshot, findings: Sequence[Finding], host: str) -> dict[str, Any]:
    """The /status document of ``snap`` with ``findings`` (doctor's come beside its snapshot)."""
    nv = snap.nvml
    state, sentence = verdict(snap, findings)
    listed = {g.uuid for g in nvml_gpus(snap)}
    tf = []
    for r in snap.tf:
        seen_state, sees = tf_sees(r, snap)
        tf.append(
            {
                "env": r.env,
                "python": r.python,
                "status": r.status.value,
                "tf_version": r.tf_version,
                "cuda_build": r.build_info.get("cuda_version"),
                "visible_gpus": len(r.gpus) if r.ok else None,
                "gpus_total": gpus_total(snap),
                "state": seen_state,
                "sees": sees,
                "error": r.error,
                "probed_at": r.started_at,
            }
        )
    return {
        "host": host,
        "version": __version__,
        "taken_at": snap.taken_at,
        "polls": snap.sequence,
        "summary": summarize(snap),
        "verdict": {"state": state, "sentence": sentence},
        "pci_gpus": len(snap.pci.gpus) if snap.pci else None,
        "expected_gpus": snap.expected_gpus,
        "driver": {
            "up": bool(nv and nv.up),
            "error": nv.error if nv else None,
            "driver_version": nv.driver_version if nv else None,
            "cuda_driver_version": nv.cuda_driver_version_str if nv else None,
        },
        "gpus": [_gpu_doc(g) for g in (nv.gpus if nv else ())],
        # Baseline GPUs the driver does not list now (gpu-vanished).
        "missing_gpus": [
            {"uuid": k.uuid, "name": k.name, "pci_bus_id": k.pci_bus_id}
            for k in snap.baseline
            if k.uuid not in listed
        ],
        "tensorflow": tf,
        "tf_processes": [
            {
                "pid": p.pid,
                "placement": p.placement,
                "user": p.user,
                "cmdline": p.cmdline,
                "started_at": p.started_at,
            }
            for p in snap.tf_processes or ()
        ],
        "collectors": [
            {"name": c.name, "success": c.success, "duration_seconds": c.duration_seconds}
            for c in snap.collectors
        ],
        "findings": [
            {
                **_as_dict(to_jsonable(f)),
                "anchor": anchor(f.code, f.subject),
                "causes": [
                    {"code": g.code, "subject": g.subject, "anchor": anchor(g.code, g.subject)}
                    for g in causes_present(f, findings)
                ],
            }
            for f in findings
        ],
    }


def _as_dict(value: object) -> dict[str, Any]:
    assert isinstance(value, dict)
    return value


def shown_evidence(findings: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Evidence per finding as a person should read it: traceback frames trimmed, and each
    line shown once: not under a finding when one of its causes has it, nor again after an
    earlier finding showed it (TF's log lines back several findings of one env)."""
    by_key = {(f["code"], f["subject"]): f for f in findings}
    seen: set[str] = set()
    out: list[list[str]] = []
    for f in findings:
        in_causes: set[str] = set()
        for c in f.get("causes", ()):
            cause = by_key.get((c["code"], c["subject"]))
            in_causes.update(cause.get("evidence", ()) if cause else ())
        lines = []
        for line in trim_traceback(f.get("evidence", ())):
            if line in in_causes or line in seen:
                continue
            seen.add(line)
            lines.append(line)
        out.append(lines)
    return out


# --- fixes: prose and the commands to copy ------------------------------------------------------

_BACKTICKS = re.compile(r"`([^`]+)`")
_COMMAND_START = re.compile(r"(?:sudo|python[\d.]*|/\S+|~/\S+|\w[\w.-]*\s+-\S*|[\w.-]+ \S)")


def _is_command(text: str) -> bool:
    """A backticked span a person runs (``sudo modprobe nvidia``), not a setting or a name."""
    setting = re.match(r"[\w.\[\]]+ = ", text)  # `run_as = "alice"`: a line of the config
    return " " in text.strip() and not setting and bool(_COMMAND_START.match(text))


def fix_commands(fix: str) -> list[str]:
    """The shell commands in a fix, in order: its backticked commands, or the whole fix when
    it is one bare command (``/opt/venv/bin/python -m pip install …``)."""
    spans = [s for s in _BACKTICKS.findall(fix) if _is_command(s)]
    if spans or "`" in fix:
        return list(dict.fromkeys(spans))
    bare = fix.strip()
    looks_like_command = bool(re.match(r"(?:/|~/|sudo |python)", bare)) and not bare.endswith(".")
    return [bare] if looks_like_command else []


# --- `tfgpud status` and `tfgpud doctor` text ---------------------------------------------------

_PAINT = {
    "critical": "1;31",
    "warning": "1;33",
    "info": "36",
    "ok": "1;32",
    "bad": "31",
    "good": "32",
    "head": "1",
}
_COLOUR_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"^(CRITICAL|WARNING|OK)(?= )"), lambda m: m.group(1).lower()),
    (re.compile(r"\[(?:critical|CRITICAL)\]"), lambda m: "critical"),
    (re.compile(r"\[(?:warning|WARNING)\]"), lambda m: "warning"),
    (re.compile(r"\[(?:info|INFO)\]"), lambda m: "info"),
    (re.compile(r"(?<=  )(?:LOST|MISSING|FAILING|NEARLY FULL|on the CPU)\b"), lambda m: "bad"),
    (
        re.compile(r"^(?:GPUs|TensorFlow|Findings.*|Hardware.*|Driver.*|Result: .*)$"),
        lambda m: "head",
    ),
)


def _painter(style: Callable[[re.Match[str]], str]) -> Callable[[re.Match[str]], str]:
    def paint(m: re.Match[str]) -> str:
        return f"\x1b[{_PAINT[style(m)]}m{m.group(0)}\x1b[0m"

    return paint


def colourize(text: str) -> str:
    """ANSI colour for the severity tags, states and headings of a rendered text. Apply it to
    printable text only: colour is then the only escape sequence in it."""
    lines = []
    for line in text.split("\n"):
        for pattern, style in _COLOUR_RULES:
            line = pattern.sub(_painter(style), line)
        lines.append(line)
    return "\n".join(lines)


def _finish(text: str, colour: bool) -> str:
    safe = printable(text, newlines=True)
    return colourize(safe) if colour else safe


def _one_line(value: object) -> str:
    return printable("?" if value is None else str(value))


def _block(value: object, indent: str) -> str:
    """A text that may span lines (a fix with a configuration snippet): each line after the
    first indented by ``indent``, so it stays under the finding it belongs to."""
    return printable(str(value), newlines=True).replace("\n", "\n" + indent)


def _when(ts: float | None) -> str:
    return "?" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _memory_text(g: Mapping[str, Any]) -> str:
    total, used = g.get("memory_total_bytes"), g.get("memory_used_bytes")
    if not total or used is None:
        return ""
    share = used / total
    full = "  NEARLY FULL" if share >= NEARLY_FULL else ""
    return f"{gib(used, unit=False)}/{gib(total)} ({share:.0%}){full}"


def _gpu_lines(g: Mapping[str, Any]) -> list[str]:
    state = str(g.get("state") or ("lost" if g.get("lost") else "ok"))
    shown = "ok" if state == "ok" else state.upper()
    parts = [f"  GPU {g['index']}  {_one_line(g.get('name')):<24} {shown}"]
    for text in (
        _memory_text(g),
        f"util {g['utilization_ratio']:.0%}" if g.get("utilization_ratio") is not None else "",
        f"{g['temperature_celsius']:.0f} °C" if g.get("temperature_celsius") is not None else "",
        f"{g['power_watts']:.0f} W" if g.get("power_watts") is not None else "",
    ):
        if text:
            parts.append(text)
    lines = ["  ".join(parts), f"         {_one_line(g.get('uuid'))}"]
    procs = list(g.get("processes") or ())
    for p in procs[:TOP_PROCESSES]:
        mem = p.get("used_memory_bytes")
        lines.append(
            f"         pid {p['pid']:<7} {_one_line(p.get('name') or ''):<16} "
            f"{gib(mem) if mem is not None else '? GiB'}"
        )
    if len(procs) > TOP_PROCESSES:
        lines.append(f"         and {len(procs) - TOP_PROCESSES} more process(es)")
    return lines


def render_status_text(doc: Mapping[str, Any], *, colour: bool = False) -> str:
    """``tfgpud status``: the running daemon's /status document, for a person: the verdict,
    each GPU with its top processes, each env, and the findings with evidence and fix."""
    out: list[str] = []
    v = doc.get("verdict") or {}
    if v:
        out.append(f"{str(v.get('state', '?')).upper()}  {v.get('sentence', '')}")
    poll = f", last poll {_when(doc['taken_at'])}" if doc.get("taken_at") is not None else ""
    out.append(
        f"tfgpud {doc.get('version', '?')} on {doc.get('host', '?')}{poll}: "
        f"{doc.get('summary', '')}"
    )
    gpus = list(doc.get("gpus", []))
    missing = list(doc.get("missing_gpus", []))
    if gpus or missing:
        out += ["", "GPUs"]
    for g in gpus:
        out += _gpu_lines(g)
    for k in missing:
        out.append(
            f"  GPU -  {_one_line(k.get('name')):<24} MISSING  {_one_line(k.get('uuid'))} at "
            f"{_one_line(k.get('pci_bus_id'))} (in the baseline, not listed by the driver)"
        )
    envs = list(doc.get("tensorflow", []))
    if envs:
        out += ["", "TensorFlow"]
    for t in envs:
        sees = t.get("sees")
        if sees is None:  # a daemon older than this client
            seen = t.get("visible_gpus")
            sees = f"{t['status']}, sees {'?' if seen is None else seen} GPU(s)"
        version = f"TensorFlow {t['tf_version']}: " if t.get("tf_version") else ""
        out.append(f"  env {_one_line(t['env'])}  {version}{_one_line(sees)}")
    findings = list(doc.get("findings", []))
    out += ["", f"Findings ({len(findings)})"]
    if not findings:
        out.append("  none")
    for f, evidence in zip(findings, shown_evidence(findings), strict=True):
        out.append(
            f"  [{f['severity']}] {f['code']} ({_one_line(f['subject'])}): "
            f"{_one_line(f['summary'])}"
        )
        causes = [c["code"] for c in f.get("causes", ())]
        if causes:
            out.append(f"      caused by: {', '.join(causes)}")
        for line in evidence[:STATUS_EVIDENCE_LINES]:
            out.append(f"      - {_one_line(line)}")
        if len(evidence) > STATUS_EVIDENCE_LINES:
            more = len(evidence) - STATUS_EVIDENCE_LINES
            out.append(f"      - … {more} more line(s): `tfgpud status --json`")
        if f.get("fix"):
            out.append(f"      fix: {_block(f['fix'], ' ' * 11)}")
    return _finish("\n".join(out) + "\n", colour)


def render_report(
    snap: Snapshot, findings: Sequence[Finding], code: int, host: str, *, colour: bool = False
) -> str:
    """The report a person reads top to bottom: hardware, driver, each env, findings."""
    doc = report_document(snap, findings, host)
    v = doc["verdict"]
    lines: list[str] = [
        f"tfgpud doctor on {host} at {_when(snap.taken_at)}",
        f"{v['state'].upper()}  {v['sentence']}",
        "",
        "Hardware (PCI bus)",
    ]
    pci = snap.pci
    if pci is None:
        lines.append("  not read (collector failed)")
    else:
        lines.append(f"  {len(pci.gpus)} NVIDIA GPU(s)")
        lines += [
            f"  {g.address}  device {g.device_id}  driver {g.driver or '-'}" for g in pci.gpus
        ]
        lines.append(f"  nvidia module: {pci.nvidia_module_version or 'not loaded'}")
        if pci.nouveau_loaded:
            lines.append("  nouveau module: loaded")
        lines.append(f"  /dev nodes: {' '.join(pci.device_nodes) or 'none'}")
    lines += ["", "Driver (NVML)"]
    nvml = snap.nvml
    if nvml is None:
        lines.append("  not read (collector failed)")
    elif not nvml.up:
        lines.append(f"  not available: {nvml.error}")
    else:
        lines.append(
            f"  driver {nvml.driver_version}, supports CUDA {nvml.cuda_driver_version_str or '?'}"
            f" ({nvml.library_path or 'libnvidia-ml.so.1'})"
        )
        for g in doc["gpus"]:
            lines += _gpu_lines(g)
    for r in snap.tf:
        lines += ["", f"TensorFlow env `{_one_line(r.env)}` ({_one_line(r.python)})"]
        if not r.ok:
            lines.append(f"  probe {r.status.value} after {r.duration_seconds:.1f} s: {r.error}")
            continue
        b = r.build_info
        build = (
            f"CUDA {b.get('cuda_version')}, cuDNN {b.get('cudnn_version')}"
            if b.get("cuda_version")
            else "CPU-only build"
        )
        lines.append(
            f"  TensorFlow {r.tf_version} ({build}), Python {r.python_version or '?'}; "
            f"probe {r.duration_seconds:.1f} s"
        )
        lines.append(f"  GPUs TensorFlow sees: {len(r.gpus)}")
        lines += [f"    {g.name}  {g.device_name or ''}" for g in r.gpus]
        for lib in r.libraries:
            where = lib.path if lib.loaded else f"MISSING ({lib.error})"
            lines.append(f"  {lib.soname:<20} {where}")
        for k, val in sorted(r.environment.items()):
            lines.append(f"  {k}={_one_line(val)}")
        if r.smoke_ok is not None:
            lines.append(f"  smoke test: {'ok' if r.smoke_ok else r.smoke_error}")
    lines += ["", f"Findings ({len(findings)})"]
    if not findings:
        lines.append("  none: TensorFlow can use every GPU this machine has")
    for f, evidence in zip(doc["findings"], shown_evidence(doc["findings"]), strict=True):
        lines += [
            "",
            f"  [{f['severity'].upper()}] {f['code']}  ({_one_line(f['subject'])})",
            f"  {_one_line(f['summary'])}",
        ]
        causes = [c["code"] for c in f["causes"]]
        if causes:
            lines.append(f"  Caused by: {', '.join(causes)}")
        lines += [f"    - {_one_line(e)}" for e in evidence]
        if f["fix"]:
            lines.append(f"  Fix: {_block(f['fix'], ' ' * 7)}")
    verdict_word = {0: "healthy", 1: "warnings", 2: "critical"}[code]
    lines += ["", f"Result: {verdict_word} (exit {code})", ""]
    return _finish("\n".join(lines), colour)


# --- the page at / -------------------------------------------------------------------------------


def _e(value: object) -> str:
    """HTML-escaped and printable: what the page shows of any value."""
    return html.escape(printable("" if value is None else str(value)))


def _or_dash(value: object) -> str:
    return "–" if value is None or value == "" else _e(value)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _memory_cell(g: Mapping[str, Any]) -> str:
    total, used = g.get("memory_total_bytes"), g.get("memory_used_bytes")
    if not total or used is None:
        return "<td class=num>–</td>"
    share = used / total
    full = share >= NEARLY_FULL
    cls = "mem full" if full else "mem"
    note = " <strong class=badge-full>nearly full</strong>" if full else ""
    return (
        f"<td class='{cls}' data-ratio='{share:.3f}'><div class=memtext>"
        f"{gib(used, unit=False)} / {gib(total)} <span class=pct>{share:.0%}</span>{note}</div>"
        f"<div class=bar><span style='width:{min(share, 1.0) * 100:.1f}%'></span></div></td>"
    )


def _processes_cell(g: Mapping[str, Any]) -> str:
    procs = list(g.get("processes") or ())
    if not procs:
        return "<td class=procs>–</td>" if g.get("state") == "ok" else "<td class=procs></td>"
    items = []
    for p in procs[:TOP_PROCESSES]:
        mem = p.get("used_memory_bytes")
        name = f" {_e(p['name'])}" if p.get("name") else ""
        items.append(
            f"<li><code>pid {_e(p['pid'])}</code>{name} "
            f"<span class=dim>{gib(mem) if mem is not None else '?'}</span></li>"
        )
    if len(procs) > TOP_PROCESSES:
        items.append(f"<li class=dim>and {len(procs) - TOP_PROCESSES} more</li>")
    return f"<td class=procs><ul>{''.join(items)}</ul></td>"


def _gpu_rows(status: Mapping[str, Any]) -> str:
    rows = []
    for g in status.get("gpus", []):
        state = str(g.get("state") or ("lost" if g.get("lost") else "ok"))
        util = g.get("utilization_ratio")
        temp = g.get("temperature_celsius")
        power = g.get("power_watts")
        rows.append(
            f"<tr class='gpu state-{_e(state)}' data-uuid='{_e(g['uuid'])}' "
            f"data-state='{_e(state)}'>"
            f"<td class=num>{_e(g['index'])}</td>"
            f"<td><div>{_e(g.get('name') or '?')}</div><div class=uuid><code>{_e(g['uuid'])}"
            f"</code> {_e(g.get('pci_bus_id') or '')}</div></td>"
            f"{_memory_cell(g)}"
            f"<td class=num>{f'{util:.0%}' if util is not None else '–'}</td>"
            f"<td class=num>{f'{temp:.0f} °C' if temp is not None else '–'}</td>"
            f"<td class=num>{f'{power:.0f} W' if power is not None else '–'}</td>"
            f"{_processes_cell(g)}"
            f"<td><span class='pill {_e(state)}'>{_e(state)}</span></td></tr>"
        )
    for k in status.get("missing_gpus", []):
        rows.append(
            f"<tr class='gpu state-missing' data-uuid='{_e(k['uuid'])}' data-state='missing'>"
            f"<td class=num>–</td><td><div>{_e(k.get('name') or '?')}</div><div class=uuid>"
            f"<code>{_e(k['uuid'])}</code> {_e(k.get('pci_bus_id') or '')}</div></td>"
            "<td colspan=5 class=dim>in the baseline, not listed by the driver</td>"
            "<td><span class='pill missing'>missing</span></td></tr>"
        )
    return "".join(rows) or "<tr><td colspan=8 class=dim>no GPU</td></tr>"


def _env_rows(status: Mapping[str, Any]) -> str:
    rows = []
    for t in status.get("tensorflow", []):
        state = str(t.get("state") or ("ok" if t.get("status") == "ok" else "critical"))
        sees = t.get("sees") or f"probe {t.get('status')}"
        probed = t.get("probed_at")
        when = f"<time datetime='{_iso(probed)}'>{_when(probed)}</time>" if probed else "–"
        rows.append(
            f"<tr class='env state-{_e(state)}' data-env='{_e(t['env'])}' data-state='{_e(state)}'>"
            f"<td><strong>{_e(t['env'])}</strong><div class=uuid><code>{_e(t.get('python'))}"
            f"</code></div></td><td>{_or_dash(t.get('tf_version'))}</td>"
            f"<td>{_or_dash(t.get('cuda_build'))}</td>"
            f"<td class='sees'><span class='pill {_e(state)}'>{_e(sees)}</span></td>"
            f"<td>{when}</td></tr>"
        )
    return "".join(rows) or "<tr><td colspan=5 class=dim>no TensorFlow env configured</td></tr>"


_CODE_WORD = re.compile(r"(?<![\w/-])[a-z][a-z0-9]*(?:-[a-z0-9]+)+(?![\w/-])")


def _prose_html(text: str, links: Mapping[str, str]) -> str:
    """Escaped prose: backticked spans as ``<code>``, finding codes in ``links`` (code →
    anchor) as links to those findings on the page."""

    def link(escaped: str) -> str:
        return _CODE_WORD.sub(
            lambda m: (
                f"<a href='#{links[m.group(0)]}'>{m.group(0)}</a>"
                if m.group(0) in links
                else m.group(0)
            ),
            escaped,
        )

    pieces = text.split("`")  # odd pieces were in backticks
    return "".join(
        f"<code>{link(_e(piece))}</code>" if i % 2 else link(_e(piece))
        for i, piece in enumerate(pieces)
    )


def _fix_html(fix: str, links: Mapping[str, str]) -> str:
    commands = fix_commands(fix)
    prose = "" if commands == [fix.strip()] else fix
    parts = []
    if prose:
        parts.append(f"<p>{_prose_html(prose, links)}</p>")
    for cmd in commands:
        parts.append(
            f"<div class=cmd><pre><code>{_e(cmd)}</code></pre>"
            "<button type=button class=copy hidden>Copy</button></div>"
        )
    return f"<div class=fix><h4>Fix</h4>{''.join(parts)}</div>"


def _finding_html(
    f: Mapping[str, Any], evidence: Sequence[str], anchors: Mapping[tuple[str, str], str]
) -> str:
    sev = str(f["severity"])
    # Codes named in the prose link to those findings: of this subject first, else the host's.
    links = {code: a for (code, subj), a in anchors.items() if subj == "host"}
    links.update({code: a for (code, subj), a in anchors.items() if subj == f["subject"]})
    causes = "".join(
        f"<li><a href='#{_e(c['anchor'])}'>{_e(c['code'])}</a>"
        + ("" if c["subject"] == f["subject"] else f" ({_e(c['subject'])})")
        + "</li>"
        for c in f.get("causes", ())
    )
    caused = f"<div class=causes>Caused by <ul>{causes}</ul></div>" if causes else ""
    ev = "".join(f"<li><code>{_e(line)}</code></li>" for line in evidence)
    ev_html = (
        f"<details class=evidence open><summary>Evidence ({len(evidence)})</summary>"
        f"<ul>{ev}</ul></details>"
        if evidence
        else ""
    )
    fix = _fix_html(str(f["fix"]), links) if f.get("fix") else ""
    return (
        f"<article class='finding {_e(sev)}' id='{_e(f['anchor'])}' data-code='{_e(f['code'])}' "
        f"data-severity='{_e(sev)}'><header><span class='pill {_e(sev)}'>{_e(sev)}</span> "
        f"<a class=code href='#{_e(f['anchor'])}'>{_e(f['code'])}</a> "
        f"<span class=subject>{_e(f['subject'])}</span></header>"
        f"<p class=summary>{_prose_html(str(f['summary']), links)}</p>{caused}{ev_html}{fix}"
        "</article>"
    )


def _findings_html(findings: Sequence[Mapping[str, Any]]) -> str:
    if not findings:
        return "<p class=dim>No findings.</p>"
    anchors = {(f["code"], f["subject"]): f["anchor"] for f in findings}
    return "".join(
        _finding_html(f, ev, anchors)
        for f, ev in zip(findings, shown_evidence(findings), strict=True)
    )


_STYLE = """
:root{--ok:#1a7f37;--ok-bg:#e9f7ee;--warn:#9a6700;--warn-bg:#fff6dd;--crit:#c62828;
--crit-bg:#fdeceb;--info:#0969da;--info-bg:#e8f1fd;--line:#d8dee4;--dim:#57606a;--code:#f3f5f7}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
margin:0;background:#f6f8fa}
main{max-width:76rem;margin:0 auto;padding:1.2rem 1.4rem 3rem}
h1{font-size:1.3rem;margin:0 0 .2rem} h2{font-size:1.05rem;margin:1.8rem 0 .6rem}
.meta{color:var(--dim);font-size:.9rem;margin:0 0 1rem}
#verdict{border-radius:10px;padding:1rem 1.2rem 1rem 3.4rem;position:relative;font-size:1.25rem;
font-weight:600;border:1px solid}
#verdict::before{position:absolute;left:1.1rem;top:.95rem;font-size:1.4rem;line-height:1.2}
#verdict[data-state=ok]{background:var(--ok-bg);border-color:#a6dcb6;color:#0f5323}
#verdict[data-state=ok]::before{content:"\\2714";color:var(--ok)}
#verdict[data-state=warning]{background:var(--warn-bg);border-color:#f0d58c;color:#6b4700}
#verdict[data-state=warning]::before{content:"\\26A0";color:var(--warn)}
#verdict[data-state=critical]{background:var(--crit-bg);border-color:#f2b8b5;color:#8e1b1b}
#verdict[data-state=critical]::before{content:"\\2716";color:var(--crit)}
#verdict p{margin:0} #verdict .more{font-size:.9rem;font-weight:400;margin-top:.3rem}
#verdict .more a{color:inherit}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid var(--line);
border-radius:8px;overflow:hidden}
th,td{padding:.5rem .7rem;text-align:left;vertical-align:top;border-bottom:1px solid var(--line)}
th{background:#f0f3f6;font-size:.8rem;text-transform:uppercase;letter-spacing:.03em;
color:var(--dim)}
tr:last-child td{border-bottom:0}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.uuid{font-size:.78rem;color:var(--dim)} .dim{color:var(--dim)}
code{font:.85em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.mem{min-width:12rem}.memtext{white-space:nowrap;font-variant-numeric:tabular-nums}
.bar{height:6px;background:#e6eaef;border-radius:3px;margin-top:.3rem;overflow:hidden}
.bar span{display:block;height:100%;background:#4c8bf5}
.mem.full{background:var(--crit-bg)} .mem.full .bar span{background:var(--crit)}
.mem.full .pct{color:var(--crit);font-weight:700}
.badge-full{color:#fff;background:var(--crit);border-radius:4px;padding:0 .35rem;
font-size:.75rem;margin-left:.3rem}
.procs ul{list-style:none;margin:0;padding:0;font-size:.85rem}
.pill{display:inline-block;border-radius:999px;padding:.05rem .6rem;font-size:.82rem;
font-weight:600;border:1px solid}
.pill.ok{color:var(--ok);background:var(--ok-bg);border-color:#a6dcb6}
.pill.warning,.pill.failing{color:var(--warn);background:var(--warn-bg);border-color:#f0d58c}
.pill.critical,.pill.lost{color:var(--crit);background:var(--crit-bg);border-color:#f2b8b5}
.pill.missing{color:#fff;background:var(--crit);border-color:var(--crit)}
.pill.info{color:var(--info);background:var(--info-bg);border-color:#b6d4fb}
tr.state-lost td,tr.state-missing td{background:#fff8f8}
.finding{background:#fff;border:1px solid var(--line);border-left:5px solid var(--dim);
border-radius:8px;padding:.8rem 1rem;margin:.8rem 0}
.finding.critical{border-left-color:var(--crit)} .finding.warning{border-left-color:var(--warn)}
.finding.info{border-left-color:var(--info)} .finding:target{box-shadow:0 0 0 3px #9ec5fe}
.finding header{display:flex;gap:.6rem;align-items:center;flex-wrap:wrap}
.finding .code{font-weight:700;color:inherit;text-decoration:none;
font-family:ui-monospace,monospace}
.finding .subject{color:var(--dim);font-size:.85rem;word-break:break-all}
.summary{margin:.5rem 0}
.causes{font-size:.9rem} .causes ul{display:inline;padding:0;margin:0}
.causes li{display:inline;margin-right:.5rem}
.evidence summary{cursor:pointer;color:var(--dim);font-size:.85rem}
.evidence ul{margin:.3rem 0;padding-left:1.2rem;font-size:.85rem}
.evidence code{white-space:pre-wrap;word-break:break-word}
.fix h4{margin:.7rem 0 .2rem;font-size:.85rem;text-transform:uppercase;color:var(--ok)}
.fix p{margin:.2rem 0 .4rem}
.cmd{position:relative}
.cmd pre{background:#0d1117;color:#e6edf3;border-radius:6px;padding:.6rem .8rem;margin:.3rem 0;
overflow-x:auto;white-space:pre-wrap;word-break:break-all}
.cmd button{position:absolute;top:.35rem;right:.4rem;font-size:.75rem;border:1px solid #3d444d;
background:#21262d;color:#e6edf3;border-radius:4px;padding:.1rem .5rem;cursor:pointer}
footer{margin-top:2rem;color:var(--dim);font-size:.85rem} footer a{color:var(--dim)}
"""

# Copy buttons where the browser can copy; everything else works without JavaScript.
_SCRIPT = """
if (navigator.clipboard) for (const b of document.querySelectorAll("button.copy")) {
  b.hidden = false;
  b.addEventListener("click", () => navigator.clipboard.writeText(
    b.parentElement.querySelector("code").textContent).then(() => { b.textContent = "Copied"; }));
}
"""


def render_page(status: Mapping[str, Any]) -> str:
    """The page a person reads: the verdict first, the last poll, each GPU, each env, and the
    findings with their causes linked and their fixes as copyable commands."""
    v = status.get("verdict") or {"state": "warning", "sentence": status.get("summary", "")}
    findings = list(status.get("findings", []))
    problems = [f for f in findings if f.get("severity") != "info"]
    more = ""
    if len(problems) > 1:
        more = (
            f"<p class=more><a href='#findings'>{_plural(len(problems), 'problem')}</a> "
            "below, most severe first.</p>"
        )
    taken = status.get("taken_at")
    if taken is not None:
        polled = (
            f"last poll <time id=last-poll datetime='{_iso(taken)}'>{_when(taken)}</time> "
            f"(poll {_e(status.get('polls'))})"
        )
    else:
        polled = "no poll yet"
    driver = status.get("driver") or {}
    nvml = (
        f"driver {_e(driver.get('driver_version') or '?')}, "
        f"CUDA {_e(driver.get('cuda_driver_version') or '?')}"
        if driver.get("up")
        else f"NVML unavailable ({_e(driver.get('error') or 'not polled yet')})"
    )
    host = _e(status.get("host", ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tfgpud — {host}</title>
<meta http-equiv="refresh" content="10">
<style>{_STYLE}</style></head><body><main>
<h1>tfgpud on {host}</h1>
<p class=meta>{polled} · {nvml} · {_e(status.get("pci_gpus", "?"))} NVIDIA GPU(s) on the
PCI bus · tfgpud {_e(status.get("version", "?"))}</p>
<section id="verdict" data-state="{_e(v["state"])}" role="status">
<p class=sentence>{_e(v["sentence"])}</p>{more}</section>
<h2>GPUs</h2>
<table id=gpus><thead><tr><th>#</th><th>GPU</th><th>memory</th><th>util</th><th>temp</th>
<th>power</th><th>processes</th><th>state</th></tr></thead>
<tbody>{_gpu_rows(status)}</tbody></table>
<h2>TensorFlow</h2>
<table id=envs><thead><tr><th>env</th><th>TensorFlow</th><th>CUDA build</th><th>what it sees</th>
<th>probed</th></tr></thead><tbody>{_env_rows(status)}</tbody></table>
<h2 id=findings>Findings</h2>
{_findings_html(findings)}
<footer><a href="/metrics">/metrics</a> · <a href="/status">/status</a> ·
<a href="/healthz">/healthz</a> · refreshes every 10 s</footer>
</main><script>{_SCRIPT}</script></body></html>
"""
