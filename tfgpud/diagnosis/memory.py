"""Rules about GPU memory: memory held on an idle GPU, and memory pressure that is real.

TensorFlow maps nearly all memory of every GPU it sees unless memory growth is on, so a GPU
that one training job owns is full for the job's whole life: that is normal, not pressure.
What hurts on a shared machine is memory that others need:

- ``gpu-memory-held-idle``: a process holds at least ``[memory] idle_hold_ratio`` of a GPU's
  memory while the GPU has done nothing (utilisation <= ``poll.IDLE_UTILIZATION``) for
  ``[memory] idle_seconds`` — typically a notebook kernel that imported TensorFlow hours ago;
  the next job on that GPU fails with out-of-memory.
- ``gpu-memory-pressure``: several processes share the GPU and together keep its memory at or
  above ``[memory] pressure_ratio`` for ``[memory] for_seconds``; or a process could not get
  memory. The only failed allocation tfgpud can see is its own (the opt-in smoke test of an env,
  which is then critical): NVML reports no allocation failures, and other programs' errors are
  in their own output.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence

from tfgpud.config import Config
from tfgpud.diagnosis.readings import (
    CRIT,
    WARN,
    cvd_entries,
    finding,
    gpu_label,
    nvml_gpus,
    usable_gpus,
)
from tfgpud.model import (
    Finding,
    GpuProcess,
    GpuReading,
    Snapshot,
    TfProbeResult,
    TfProcess,
)
from tfgpud.poll import IDLE_UTILIZATION
from tfgpud.text import duration, gib

# How a failed allocation reads in TensorFlow's and CUDA's errors.
_OOM = re.compile(r"out of memory|out_of_memory|\bOOM\b|RESOURCE_?EXHAUSTED", re.IGNORECASE)
MAX_LISTED = 5  # processes named in the evidence; the rest are summed


def _process_users(s: Snapshot) -> dict[int, str]:
    users = dict(s.workloads.gpu_process_users) if s.workloads is not None else {}
    for p in s.tf_processes or ():
        if p.user:
            users.setdefault(p.pid, p.user)
    return users


def _without_growth(t: TfProcess) -> bool:
    """TensorFlow that will map nearly all GPU memory (as far as its environment tells)."""
    async_alloc = t.environment.get("TF_GPU_ALLOCATOR", "").strip() == "cuda_malloc_async"
    return t.allow_growth is False and not async_alloc


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _visible(r: TfProbeResult, s: Snapshot) -> list[GpuReading]:
    """The usable GPUs an env's probe sees, in CUDA's order as far as NVML tells it."""
    gpus = list(usable_gpus(s))
    cvd = r.environment.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return gpus
    out = []
    for entry in cvd_entries(cvd):
        match = next(
            (
                g
                for g in gpus
                if (entry.isdigit() and g.index == int(entry))
                or (entry.startswith("GPU-") and g.uuid.startswith(entry))
            ),
            None,
        )
        if match is None:
            break  # CUDA stops at the first entry it cannot resolve
        out.append(match)
    return out


def _full(g: GpuReading, ratio: float) -> bool:
    used, total = g.memory_used_bytes, g.memory_total_bytes
    return bool(used and total and used / total >= ratio)


def oom_gpus(s: Snapshot, c: Config) -> dict[str, tuple[str, ...]]:
    """GPU UUID -> envs whose smoke test could not get memory there: the env's visible GPUs
    that are at or above ``[memory] pressure_ratio`` full (an allocation that fails on a GPU
    with room is not pressure)."""
    out: dict[str, list[str]] = {}
    for r in s.tf:
        if r.smoke_ok is not False or not _OOM.search(r.smoke_error or ""):
            continue
        for g in _visible(r, s):
            if _full(g, c.memory.pressure_ratio):
                out.setdefault(g.uuid, []).append(r.env)
    return {uuid: tuple(envs) for uuid, envs in out.items()}


def _process_line(p: GpuProcess, users: dict[int, str], tf: dict[int, TfProcess]) -> str:
    tags = [p.name or "?"]
    if p.pid in users:
        tags.append(f"user {users[p.pid]}")
    if p.pid in tf:
        tags.append("TensorFlow")
    return f"pid {p.pid} ({', '.join(tags)}): {gib(p.used_memory_bytes)}"


def _growth_lines(ranked: Sequence[GpuProcess], total: int, tf: dict[int, TfProcess]) -> list[str]:
    out = []
    for p in ranked:
        t = tf.get(p.pid)
        if t is None:
            continue
        mem = p.used_memory_bytes
        share = f"; it holds {mem / total:.0%} of this GPU" if mem else ""
        if _without_growth(t):
            out.append(
                f"pid {t.pid} is TensorFlow without memory growth (TF_FORCE_GPU_ALLOW_GROWTH "
                f"is not true in its environment){share}: unless its code calls "
                "set_memory_growth, TensorFlow maps nearly all memory of every visible GPU"
            )
        elif t.allow_growth is None:
            out.append(
                f"pid {t.pid} is TensorFlow; whether it uses memory growth is unknown "
                f"(tfgpud may not read its environment){share}"
            )
    return out


def rule_gpu_memory_pressure(s: Snapshot, c: Config) -> Iterable[Finding]:
    tf_by_pid = {p.pid: p for p in (s.tf_processes or ())}
    users = _process_users(s)
    ratio = c.memory.pressure_ratio
    oom = oom_gpus(s, c)
    for g in nvml_gpus(s):
        used, total = g.memory_used_bytes, g.memory_total_bytes
        if not used or not total:
            continue
        envs = oom.get(g.uuid, ())
        since = s.pressure_since.get(g.uuid)
        held = since is not None and s.taken_at - since >= c.memory.for_seconds
        shared = len({p.pid for p in g.processes}) >= 2
        if not envs and not (held and shared and used / total >= ratio):
            continue  # one process owning its GPU, however full, is not pressure
        ranked = sorted(g.processes, key=lambda p: (-(p.used_memory_bytes or 0), p.pid))
        full = f"memory used {gib(used)} of {gib(total)} ({used / total:.0%})"
        ev = [full + (f" for {duration(s.taken_at - since)}" if since is not None else "")]
        by_env = {r.env: r for r in s.tf}
        ev += [
            f"the smoke test of env `{e}` could not get memory on this GPU: "
            f"{(by_env[e].smoke_error or '')[:300]}"
            for e in envs
        ]
        if ranked:
            ev.append(f"{len(ranked)} process(es) on this GPU:")
        ev += [_process_line(p, users, tf_by_pid) for p in ranked[:MAX_LISTED]]
        if len(ranked) > MAX_LISTED:
            rest = sum(p.used_memory_bytes or 0 for p in ranked[MAX_LISTED:])
            ev.append(f"{len(ranked) - MAX_LISTED} more process(es): {gib(rest)}")
        ev += _growth_lines(ranked, total, tf_by_pid)
        greedy = [p.pid for p in ranked if p.pid in tf_by_pid and _without_growth(tf_by_pid[p.pid])]
        if greedy:
            pids = ", ".join(str(pid) for pid in greedy)
            fix = (
                f"Restart TensorFlow pid(s) {pids} with TF_FORCE_GPU_ALLOW_GROWTH=true in their "
                "environment (or call tf.config.experimental.set_memory_growth(gpu, True) for "
                "each GPU before first use), and give each job only its GPUs with "
                "CUDA_VISIBLE_DEVICES."
            )
        else:
            fix = (
                "Free memory: stop or shrink the jobs listed (`nvidia-smi --query-compute-apps="
                "pid,used_memory --format=csv`), or run the next job on another GPU "
                "(CUDA_VISIBLE_DEVICES); TensorFlow jobs should use TF_FORCE_GPU_ALLOW_GROWTH=true."
            )
        if envs:
            summary = (
                f"{gpu_label(g)} has no memory to give: env(s) {', '.join(envs)} could not "
                f"allocate on it ({used / total:.0%} full)"
            )
        else:
            summary = (
                f"{gpu_label(g)} memory is {used / total:.0%} full for "
                f"{duration(s.taken_at - since) if since is not None else '?'}, shared by "
                f"{len(ranked)} processes (threshold {ratio:.0%} for {c.memory.for_seconds:g} s)"
            )
        yield finding("gpu-memory-pressure", CRIT if envs else WARN, g.uuid, summary, ev, fix)


def _holders(g: GpuReading, limit: float) -> tuple[list[tuple[GpuProcess, int]], bool]:
    """The processes holding at least ``limit`` bytes of ``g``, largest first, and whether the
    amount is the GPU's used memory (NVML gives no per-process figure; one process listed)."""
    held = [(p, p.used_memory_bytes) for p in g.processes if p.used_memory_bytes is not None]
    found = sorted(((p, m) for p, m in held if m >= limit), key=lambda pm: (-pm[1], pm[0].pid))
    if found or len(g.processes) != 1 or g.processes[0].used_memory_bytes is not None:
        return found, False
    used = g.memory_used_bytes
    return ([(g.processes[0], used)] if used is not None and used >= limit else []), True


def _is_kernel(cmdline: str) -> bool:
    return "ipykernel" in cmdline or "jupyter-kernel" in cmdline


def rule_gpu_memory_held_idle(s: Snapshot, c: Config) -> Iterable[Finding]:
    facts = s.workloads.gpu_processes if s.workloads is not None else {}
    tf_by_pid = {p.pid: p for p in (s.tf_processes or ())}
    users = _process_users(s)
    for g in usable_gpus(s):
        since, total = s.idle_since.get(g.uuid), g.memory_total_bytes
        if since is None or not total or s.taken_at - since < c.memory.idle_seconds:
            continue
        holders, estimated = _holders(g, c.memory.idle_hold_ratio * total)
        if not holders:
            continue
        idle_for = duration(s.taken_at - since)
        ev = [
            f"GPU utilisation <= {IDLE_UTILIZATION:.0%} since {_clock(since)} ({idle_for}; "
            f"[memory] idle_seconds = {c.memory.idle_seconds:g})",
            f"memory used {gib(g.memory_used_bytes)} of {gib(total)}",
        ]
        frees, recurs = [], []
        for p, mem in holders:
            fact = facts.get(p.pid)
            t = tf_by_pid.get(p.pid)
            user = users.get(p.pid) or (fact.user if fact is not None else None) or "?"
            cmdline = (t.cmdline if t is not None else "") or (fact.cmdline if fact else "")
            tf = True if t is not None else (fact.tensorflow if fact is not None else None)
            how = " (the GPU's used memory: NVML gives no per-process figure)" if estimated else ""
            ev += [
                f"pid {p.pid} ({p.name or '?'}), user {user}: holds {gib(mem)} "
                f"({mem / total:.0%} of this GPU){how}",
                f"command: {cmdline[:200] or '?'}",
                _tf_line(t, tf),
            ]
            kernel = _is_kernel(cmdline)
            frees.append(
                f"shut down or restart the notebook kernel pid {p.pid} (user {user}) from its "
                f"notebook (Kernel > Shut Down), or `kill {p.pid}`"
                if kernel
                else f"end or restart pid {p.pid} (user {user}) once its work is done: "
                f"`kill {p.pid}`"
            )
            recurs.append(_recurrence(t, tf, kernel))
        first, mem = holders[0]
        who = f"pid {first.pid} ({first.name or '?'}, user {users.get(first.pid) or '?'})"
        others = f" and {len(holders) - 1} more" if len(holders) > 1 else ""
        yield finding(
            "gpu-memory-held-idle",
            WARN,
            g.uuid,
            f"{gpu_label(g)}: {who}{others} holds {mem / total:.0%} of its memory while the "
            f"GPU has been idle for {idle_for}",
            ev,
            "Free it: "
            + "; ".join(frees)
            + ". Stop it recurring: "
            + " ".join(dict.fromkeys(recurs)),
        )


def _tf_line(t: TfProcess | None, tf: bool | None) -> str:
    if tf is None:
        return "TensorFlow: unknown (tfgpud may not read its memory maps)"
    if not tf:
        return "TensorFlow: no"
    if t is None or t.allow_growth is None:
        return "TensorFlow: yes; memory growth unknown (tfgpud may not read its environment)"
    if _without_growth(t):
        return "TensorFlow: yes, without memory growth: it maps nearly all memory of its GPUs"
    return "TensorFlow: yes, with memory growth (memory it has grown into is never returned)"


def _recurrence(t: TfProcess | None, tf: bool | None, kernel: bool) -> str:
    limit = (
        "cap it with tf.config.set_logical_device_configuration(gpu, "
        "[tf.config.LogicalDeviceConfiguration(memory_limit=MiB)]) before first use"
    )
    if tf and (t is None or _without_growth(t) or t.allow_growth is None):
        text = (
            "start TensorFlow with TF_FORCE_GPU_ALLOW_GROWTH=true in its environment (or call "
            "tf.config.experimental.set_memory_growth(gpu, True) for each GPU before first "
            f"use) so it takes only what it uses, or {limit}."
        )
    elif tf:
        text = f"memory growth never gives memory back: {limit}, or end the job when idle."
    else:
        text = "give the program a memory limit (its framework's setting), or end it when idle."
    if kernel:
        text += (
            " Jupyter can end idle kernels itself: c.MappingKernelManager.cull_idle_timeout = "
            "3600 in jupyter_server_config.py."
        )
    return text[:1].upper() + text[1:]
