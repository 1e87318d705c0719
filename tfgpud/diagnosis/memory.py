"""Rules about GPU memory: who holds it, and whether TensorFlow maps it all."""

from __future__ import annotations

from collections.abc import Iterable

from tfgpud.config import Config
from tfgpud.diagnosis.readings import (
    WARN,
    finding,
    gpu_label,
    nvml_gpus,
)
from tfgpud.model import (
    Finding,
    Snapshot,
    TfProcess,
)
from tfgpud.text import duration, gib


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


def rule_gpu_memory_pressure(s: Snapshot, c: Config) -> Iterable[Finding]:
    tf_by_pid = {p.pid: p for p in (s.tf_processes or ())}
    users = _process_users(s)
    ratio = c.memory.pressure_ratio
    for g in nvml_gpus(s):
        since = s.pressure_since.get(g.uuid)
        if since is None or s.taken_at - since < c.memory.for_seconds:
            continue
        used, total = g.memory_used_bytes, g.memory_total_bytes
        if not used or not total or used / total < ratio:
            continue
        held = duration(s.taken_at - since)
        ranked = sorted(g.processes, key=lambda p: (-(p.used_memory_bytes or 0), p.pid))
        ev = [f"memory used {gib(used)} of {gib(total)} ({used / total:.0%}) for {held}"]
        if not ranked:
            ev.append(
                "NVML lists no compute process on this GPU (they may run in another PID "
                "namespace, e.g. a container: `nvidia-smi` on the host shows them)"
            )
        for p in ranked[:5]:
            tags = [p.name or "?"]
            if p.pid in users:
                tags.append(f"user {users[p.pid]}")
            if p.pid in tf_by_pid:
                tags.append("TensorFlow")
            ev.append(f"pid {p.pid} ({', '.join(tags)}): {gib(p.used_memory_bytes)}")
        if len(ranked) > 5:
            rest = sum(p.used_memory_bytes or 0 for p in ranked[5:])
            ev.append(f"{len(ranked) - 5} more process(es): {gib(rest)}")
        here = [(tf_by_pid[p.pid], p.used_memory_bytes) for p in ranked if p.pid in tf_by_pid]
        greedy = [t for t, _ in here if _without_growth(t)]
        for t, mem in here:
            share = f"; it holds {mem / total:.0%} of this GPU" if mem else ""
            if _without_growth(t):
                ev.append(
                    f"pid {t.pid} is TensorFlow without memory growth (TF_FORCE_GPU_ALLOW_GROWTH "
                    f"is not true in its environment){share}: unless its code calls "
                    "set_memory_growth, TensorFlow maps nearly all memory of every visible GPU"
                )
            elif t.allow_growth is None:
                ev.append(
                    f"pid {t.pid} is TensorFlow; whether it uses memory growth is unknown "
                    f"(tfgpud may not read its environment){share}"
                )
        if greedy:
            pids = ", ".join(str(t.pid) for t in greedy)
            fix = (
                f"Restart TensorFlow pid(s) {pids} with TF_FORCE_GPU_ALLOW_GROWTH=true in their "
                "environment (or call tf.config.experimental.set_memory_growth(gpu, True) for "
                "each GPU before first use), and give each job only its GPUs with "
                "CUDA_VISIBLE_DEVICES."
            )
        else:
            fix = (
                "Free memory: stop or shrink the jobs listed (`nvidia-smi --query-compute-apps="
                "pid,used_memory --format=csv`); TensorFlow jobs should use "
                "TF_FORCE_GPU_ALLOW_GROWTH=true."
            )
        yield finding(
            "gpu-memory-pressure",
            WARN,
            g.uuid,
            f"{gpu_label(g)} memory is {used / total:.0%} full for {held} "
            f"(threshold {ratio:.0%} for {c.memory.for_seconds:g} s)",
            ev,
            fix,
        )
