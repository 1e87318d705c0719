"""Rules about running TensorFlow jobs: a job that computes on the CPU while GPUs are usable."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tfgpud.config import Config
from tfgpud.diagnosis.readings import (
    WARN,
    cvd_visible,
    finding,
    gpu_label,
    usable_gpus,
)
from tfgpud.diagnosis.tensorflow import env_findings
from tfgpud.model import (
    Finding,
    Snapshot,
    TfProbeResult,
    TfProcess,
)
from tfgpud.text import duration

# tf-job-on-cpu: a finding per pid for the longest on the CPU, one for the rest (subject "other").
MAX_JOB_FINDINGS = 8
OTHER_JOBS = "other"
_SITE_PACKAGES = re.compile(r"^(.*)/lib(?:64)?/python3[^/]*/(?:site|dist)-packages/")


def _python_of(p: TfProcess) -> str | None:
    """The interpreter to probe the job's env with: its argv[0] when absolute, else the
    ``bin/python3`` of the prefix its TensorFlow was loaded from, else its executable."""
    argv0 = p.cmdline.split(" ", 1)[0]
    if argv0.startswith("/"):
        return argv0
    m = _SITE_PACKAGES.match(p.tensorflow_library or "")
    if m:
        return f"{m.group(1)}/bin/python3"
    return p.python


def env_of(p: TfProcess, s: Snapshot) -> TfProbeResult | None:
    """The configured env whose TensorFlow this process loaded (by site dir, then python)."""
    lib = p.tensorflow_library or ""
    for r in s.tf:
        if lib and any(lib.startswith(d.rstrip("/") + "/") for d in r.package_dirs):
            return r
    argv0 = p.cmdline.split(" ", 1)[0]
    return next((r for r in s.tf if r.python in (p.python, argv0)), None)


def _why_on_cpu(p: TfProcess, s: Snapshot, c: Config) -> tuple[list[str], str]:
    """Evidence on why the job computes on the CPU, and the fix."""
    py = _python_of(p) or "<its python>"
    doctor = f"`tfgpud doctor --python {py}`"
    ev: list[str] = []
    cvd = p.environment.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        visible = cvd_visible(cvd, s)
        ev.append(f"its environment has CUDA_VISIBLE_DEVICES={cvd!r}: {visible} GPU(s) visible")
        if visible == 0:
            return ev, (
                f"Its CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU: restart pid {p.pid} with "
                "CUDA_VISIBLE_DEVICES unset or naming GPUs (e.g. 0 or a GPU UUID); check the "
                "launcher or scheduler that sets it."
            )
    r = env_of(p, s)
    if r is None:
        names = ", ".join(f"`{x.env}`" for x in s.tf) or "none"
        ev.append(
            f"no [[tensorflow.envs]] entry matches its TensorFlow (configured: {names}), so "
            "no probe tells why"
        )
        return ev, (
            f"Run {doctor} to see why its TensorFlow cannot use the GPU, and add that env to "
            "[[tensorflow.envs]] so tfgpud watches it."
        )
    if not r.ok or not r.gpus:
        found = env_findings(r, s, c)
        codes = ", ".join(f.code for f in found) or "none"
        seen = f"sees {len(r.gpus)} GPU(s)" if r.ok else f"failed ({r.status.value})"
        ev.append(f"its env `{r.env}` ({r.python}): the probe {seen}; findings: {codes}")
        ev += [f"{f.code}: {f.summary}" for f in found[:3]]
        return ev, (
            f"Fix env `{r.env}` first (see {codes} for `{r.env}`; {doctor} explains), then "
            f"restart pid {p.pid}."
        )
    ev.append(
        f"its env `{r.env}` ({r.python}): the probe sees {len(r.gpus)} GPU(s), so the install "
        "can use them; the job itself keeps off the GPU (tf.device('/CPU:0') or "
        "tf.config.set_visible_devices in its code, CUDA_VISIBLE_DEVICES from its launcher), "
        "or it has not reached its GPU work yet"
    )
    return ev, (
        f"Check the job's code and launcher: `tr '\\0' '\\n' < /proc/{p.pid}/environ | grep "
        f"CUDA`; {doctor} shows what TensorFlow in that env sees."
    )


def rule_tf_job_on_cpu(s: Snapshot, c: Config) -> Iterable[Finding]:
    if not c.workloads.enabled or not s.tf_processes:
        return
    usable = usable_gpus(s)
    if not usable:
        return
    late: list[tuple[float, TfProcess]] = []
    for p in s.tf_processes:
        if p.placement != "cpu":
            continue
        # Seen on the CPU since; a record without it (older collectors) falls back to its start.
        since = p.cpu_since if p.cpu_since is not None else p.started_at
        if since is None or s.taken_at - since < c.workloads.job_on_cpu_seconds:
            continue
        late.append((since, p))
    late.sort(key=lambda sp: (sp[0], sp[1].pid))  # the longest on the CPU first
    for since, p in late[:MAX_JOB_FINDINGS]:
        on_cpu = duration(s.taken_at - since)
        running = (
            f" (running for {duration(s.taken_at - p.started_at)})"
            if p.started_at is not None
            else ""
        )
        why, fix = _why_on_cpu(p, s, c)
        yield finding(
            "tf-job-on-cpu",
            WARN,
            str(p.pid),
            f"TensorFlow job pid {p.pid} (user {p.user or '?'}) has computed on the CPU for "
            f"{on_cpu} while {len(usable)} GPU(s) are usable",
            [
                f"pid {p.pid}, user {p.user or '?'}: on the CPU for {on_cpu}{running}",
                f"command: {p.cmdline[:200] or '?'}",
                f"TensorFlow: {p.tensorflow_library or '?'} (executable {p.python or '?'})",
                f"{len(usable)} usable GPU(s), none held by this process: "
                + ", ".join(gpu_label(g) for g in usable[:4]),
                *why,
            ],
            fix,
        )
    rest = late[MAX_JOB_FINDINGS:]
    if rest:
        # One finding for the rest: a fleet of CPU workers is one thing to look at, and each
        # pid a series, an alert and journal lines of its own would grow with the fleet.
        users = sorted({p.user or "?" for _, p in rest})
        yield finding(
            "tf-job-on-cpu",
            WARN,
            OTHER_JOBS,
            f"{len(rest)} more TensorFlow job(s) (users {', '.join(users[:5])}"
            f"{', ...' if len(users) > 5 else ''}) have computed on the CPU for over "
            f"{duration(c.workloads.job_on_cpu_seconds)} while {len(usable)} GPU(s) are usable",
            [
                "pids (longest on the CPU first): "
                + ", ".join(str(p.pid) for _, p in rest[:20])
                + (f" and {len(rest) - 20} more" if len(rest) > 20 else ""),
                f"the {MAX_JOB_FINDINGS} longest on the CPU have a finding each",
            ],
            "See the per-pid `tf-job-on-cpu` findings: these jobs likely share their cause; "
            "`tfgpud status` lists every TensorFlow process and where it runs.",
        )
