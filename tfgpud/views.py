"""Every rendering of status: the /status JSON, the systemd STATUS= line, the HTML page at /,
the ``tfgpud status`` text and the ``tfgpud doctor`` report."""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tfgpud import __version__
from tfgpud.model import Finding, Snapshot, to_jsonable
from tfgpud.text import gib


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


def status_document(snap: Snapshot | None, host: str) -> dict[str, Any]:
    """The /status JSON (also what the HTML page and `tfgpud status` render)."""
    if snap is None:
        return {"host": host, "version": __version__, "summary": "starting", "findings": []}
    nv = snap.nvml
    doc: dict[str, Any] = {
        "host": host,
        "version": __version__,
        "taken_at": snap.taken_at,
        "polls": snap.sequence,
        "summary": summarize(snap),
        "pci_gpus": len(snap.pci.gpus) if snap.pci else None,
        "expected_gpus": snap.expected_gpus,
        "driver": {
            "up": bool(nv and nv.up),
            "error": nv.error if nv else None,
            "driver_version": nv.driver_version if nv else None,
            "cuda_driver_version": nv.cuda_driver_version_str if nv else None,
        },
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "pci_bus_id": g.pci_bus_id,
                "lost": g.lost,
                "memory_total_bytes": g.memory_total_bytes,
                "memory_used_bytes": g.memory_used_bytes,
                "compute_capability": g.compute_capability_str,
                "processes": [
                    {"pid": p.pid, "name": p.name, "used_memory_bytes": p.used_memory_bytes}
                    for p in g.processes
                ],
            }
            for g in (nv.gpus if nv else ())
        ],
        "tensorflow": [
            {
                "env": r.env,
                "python": r.python,
                "status": r.status.value,
                "tf_version": r.tf_version,
                "visible_gpus": len(r.gpus) if r.ok else None,
                "probed_at": r.started_at,
            }
            for r in snap.tf
        ],
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
        "findings": [to_jsonable(f) for f in snap.findings],
    }
    return doc


def render_status_text(doc: Mapping[str, Any]) -> str:
    """``tfgpud status``: the running daemon's /status document, for a person."""
    out: list[str] = []
    out.append(
        f"tfgpud {doc.get('version', '?')} on {doc.get('host', '?')}: {doc.get('summary', '')}"
    )
    for g in doc.get("gpus", []):
        state = "LOST" if g.get("lost") else "ok"
        out.append(f"  GPU {g['index']}  {g.get('name') or '?':<28} {g['uuid']}  {state}")
    for t in doc.get("tensorflow", []):
        seen = t.get("visible_gpus")
        out.append(
            f"  TF env {t['env']}: {t['status']}, sees {'?' if seen is None else seen} GPU(s)"
        )
    findings = doc.get("findings", [])
    if not findings:
        out.append("  no findings")
    for f in findings:
        out.append(f"  [{f['severity']}] {f['code']} ({f['subject']}): {f['summary']}")
        if f.get("fix"):
            out.append(f"      fix: {f['fix']}")
    return "\n".join(out) + "\n"


def _or_dash(value: object) -> str:
    return "-" if value is None else html.escape(str(value))


def render_page(status: dict[str, Any]) -> str:
    """A small page a person can read: GPUs, driver, TensorFlow envs, findings."""
    e = html.escape
    rows = []
    for g in status.get("gpus", []):
        mem = ""
        if g.get("memory_total_bytes"):
            used = gib(g.get("memory_used_bytes") or 0, unit=False)
            mem = f"{used} / {gib(g['memory_total_bytes'])}"
        state = "lost" if g.get("lost") else "ok"
        rows.append(
            f"<tr><td>{g['index']}</td><td>{e(g.get('name') or '?')}</td>"
            f"<td><code>{e(g['uuid'])}</code></td><td>{e(g.get('pci_bus_id') or '')}</td>"
            f"<td>{mem}</td><td class={state}>{state}</td></tr>"
        )
    envs = []
    for t in status.get("tensorflow", []):
        envs.append(
            f"<tr><td>{e(t['env'])}</td><td>{e(t.get('tf_version') or '-')}</td>"
            f"<td>{e(t['status'])}</td><td>{_or_dash(t.get('visible_gpus'))}</td></tr>"
        )
    findings = []
    for f in status.get("findings", []):
        evidence = "".join(f"<li>{e(x)}</li>" for x in f.get("evidence", []))
        fix = f"<p><b>Fix:</b> {e(f['fix'])}</p>" if f.get("fix") else ""
        findings.append(
            f"<div class='f {e(f['severity'])}'><h3>[{e(f['severity'])}] {e(f['code'])} "
            f"— {e(f['subject'])}</h3><p>{e(f['summary'])}</p><ul>{evidence}</ul>{fix}</div>"
        )
    driver = status.get("driver") or {}
    nvml = (
        f"driver {e(driver.get('driver_version') or '?')}, "
        f"CUDA {e(driver.get('cuda_driver_version') or '?')}"
        if driver.get("up")
        else f"NVML unavailable ({e(str(driver.get('error') or 'not polled yet'))})"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tfgpud — {e(status.get("host", ""))}</title>
<meta http-equiv="refresh" content="10">
<style>body{{font-family:sans-serif;max-width:60em;margin:1em auto}}
td,th{{padding:.2em .6em;text-align:left}} .lost{{color:#b00}} .f{{border-left:4px solid #888;
padding-left:.6em;margin:.6em 0}} .critical{{border-color:#b00}} .warning{{border-color:#d80}}
.info{{border-color:#48c}}</style></head><body>
<h1>tfgpud on {e(status.get("host", ""))}</h1>
<p>{e(status.get("summary", ""))}</p>
<h2>Driver</h2><p>{nvml}; {status.get("pci_gpus", "?")} NVIDIA GPU(s) on the PCI bus.</p>
<h2>GPUs</h2><table><tr><th>#</th><th>name</th><th>UUID</th><th>PCI</th><th>memory</th>
<th>state</th></tr>{"".join(rows) or "<tr><td colspan=6>none</td></tr>"}</table>
<h2>TensorFlow</h2><table><tr><th>env</th><th>version</th><th>probe</th><th>GPUs seen</th></tr>
{"".join(envs) or "<tr><td colspan=4>no env configured</td></tr>"}</table>
<h2>Findings</h2>{"".join(findings) or "<p>none</p>"}
<p><a href="/metrics">/metrics</a> · <a href="/status">/status</a> ·
<a href="/healthz">/healthz</a></p></body></html>
"""


def render_report(snap: Snapshot, findings: Sequence[Finding], code: int, host: str) -> str:
    """The report a person reads top to bottom: hardware, driver, each env, findings."""
    lines: list[str] = [
        f"tfgpud doctor on {host} at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(snap.taken_at))}",
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
        for g in nvml.gpus:
            state = "LOST" if g.lost else f"mem {gib(g.memory_used_bytes)}/"
            state += "" if g.lost else gib(g.memory_total_bytes)
            lines.append(
                f"  GPU {g.index}  {g.name or '?'}  {g.uuid}  cc {g.compute_capability_str or '?'}"
                f"  {g.pci_bus_id or '?'}  {state}"
            )
    for r in snap.tf:
        lines += ["", f"TensorFlow env `{r.env}` ({r.python})"]
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
        for k, v in sorted(r.environment.items()):
            lines.append(f"  {k}={v}")
        if r.smoke_ok is not None:
            lines.append(f"  smoke test: {'ok' if r.smoke_ok else r.smoke_error}")
    lines += ["", f"Findings ({len(findings)})"]
    if not findings:
        lines.append("  none: TensorFlow can use every GPU this machine has")
    for f in findings:
        lines += ["", f"  [{f.severity.value.upper()}] {f.code}  ({f.subject})", f"  {f.summary}"]
        lines += [f"    - {e}" for e in f.evidence]
        if f.fix:
            lines.append(f"  Fix: {f.fix}")
    verdict = {0: "healthy", 1: "warnings", 2: "critical"}[code]
    lines += ["", f"Result: {verdict} (exit {code})", ""]
    return "\n".join(lines)
