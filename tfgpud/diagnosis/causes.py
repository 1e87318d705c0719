"""Which present finding explains which: the root cause of each consequence in one snapshot.

:mod:`tfgpud.codes` says which codes *may* explain a code (``consequence_of``); this module
decides, for one snapshot, which finding present does. A candidate explains a finding when

- its code is one of the finding's causes in the table;
- it is at least as severe: a cause that would not page must not silence a consequence that
  would (``nvml-library-missing`` is info on a machine without PCI GPUs);
- it concerns the same thing: the same subject, the whole host (subject ``host``), or a subject
  the snapshot links to the finding (the env a TensorFlow job runs from; the GPU on which an
  env's smoke test could not get memory);
- a driver finding explains others only while NVML is down: a driver that still answers (a
  version mismatch NVML survives, one GPU refused) hides no GPU it lists.

Chains are followed to the root (``gpu-vanished`` → ``driver-not-loaded`` → ``nouveau-bound``),
and the finding records the root's code in ``Finding.cause``. Pure, like every rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from tfgpud.codes import CODES, DRIVER_CODES, causes_of
from tfgpud.config import Config
from tfgpud.diagnosis.memory import oom_gpus
from tfgpud.diagnosis.readings import HOST
from tfgpud.diagnosis.workloads import env_of
from tfgpud.model import Finding, Snapshot

Key = tuple[str, str]


def _linked(f: Finding, s: Snapshot, c: Config) -> frozenset[str]:
    """Subjects other than its own and ``host`` whose findings may explain ``f``."""
    if f.code == "tf-job-on-cpu":
        p = next((p for p in s.tf_processes or () if str(p.pid) == f.subject), None)
        r = env_of(p, s) if p is not None else None
        return frozenset({r.env}) if r is not None else frozenset()
    if f.code == "tf-smoke-failed":
        return frozenset(uuid for uuid, envs in oom_gpus(s, c).items() if f.subject in envs)
    return frozenset()


def _order(code: str, cause: str) -> int:
    c = CODES.get(code)
    return c.consequence_of.index(cause) if c is not None else 0


def _direct_cause(
    f: Finding, present: Mapping[str, list[Finding]], s: Snapshot, c: Config
) -> Finding | None:
    """The finding that explains ``f`` directly, if any: the first by the table's order."""
    wanted = causes_of(f.code)
    if not wanted:
        return None
    nvml_down = s.nvml is not None and not s.nvml.up
    scope = {f.subject, HOST} | _linked(f, s, c)
    candidates = [
        g
        for code in wanted
        if not (code in DRIVER_CODES and not nvml_down)
        for g in present.get(code, ())
        if g.subject in scope and g.severity.rank >= f.severity.rank and g.key != f.key
    ]
    candidates.sort(key=lambda g: (_order(f.code, g.code), g.subject))
    return candidates[0] if candidates else None


def attribute_causes(findings: Sequence[Finding], s: Snapshot, c: Config) -> tuple[Finding, ...]:
    """``findings`` with ``cause`` set to the root cause's code where one is present."""
    present: dict[str, list[Finding]] = {}
    for f in findings:
        present.setdefault(f.code, []).append(f)
    direct: dict[Key, Finding] = {}
    for f in findings:
        d = _direct_cause(f, present, s, c)
        if d is not None:
            direct[f.key] = d
    return tuple(_with_root(f, direct) for f in findings)


def _with_root(f: Finding, direct: Mapping[Key, Finding]) -> Finding:
    root = direct.get(f.key)
    seen = {f.key}
    while root is not None:
        seen.add(root.key)
        up = direct.get(root.key)
        if up is None or up.key in seen:  # the table has no cycles; a test keeps it so
            break
        root = up
    return replace(f, cause=root.code) if root is not None else f
