"""diagnose(): the expert knowledge. Pure rules over a Snapshot, one small function per finding.

Every rule reads only the snapshot and the config, returns zero or more Findings, and says in
the finding what it rests on (evidence) and what to do (fix). The facts the rules rest on, with
their sources, are in ``docs/diagnosis-facts.md``; the version tables are in
:mod:`tfgpud.diagnosis.compat`. Modules by subject:

- :mod:`.host`: PCI bus, kernel module, device nodes, NVML;
- :mod:`.gpus`: lost, vanished, appeared, Xid errors, the baseline file;
- :mod:`.memory`: memory held on idle GPUs, real memory pressure; :mod:`.workloads`:
  TensorFlow jobs on the CPU;
- :mod:`.tensorflow`: each probed env, driven by one table of checks (``TF_CHECKS``);
- :mod:`.advice`: fix texts; :mod:`.readings`: shared facts and the Finding constructor;
- :mod:`.causes`: after the rules, which finding explains which (``Finding.cause``).

How to add a rule:

1. Add the code to :mod:`tfgpud.codes` (severity, a new MESSAGE_ID, its runbook section, its
   meaning, the codes it may follow from) and write that section in ``docs/runbook.md``.
2. A rule about one TensorFlow env: write ``def check_x(r, s, c) -> Finding | None`` in
   :mod:`.tensorflow` and add one ``TfCheck(code, applies, check_x)`` row to ``TF_CHECKS``
   (``ALWAYS``, or ``ON_FALLBACK`` for a cause of the env seeing fewer GPUs than exist: the
   fallback finding then names it). Any other rule: ``def rule_x(s, c) -> Iterable[Finding]``
   in the module of its subject, and add it to ``RULES`` below.
3. Build the finding with :func:`.readings.finding` (evidence lines, a concrete fix; fix texts
   shared by several rules go to :mod:`.advice`), add the fact it rests on, with its source,
   to ``docs/diagnosis-facts.md``, and a test in ``tests/unit/test_diagnosis.py`` that asserts
   the finding with ``one(found, CODE)``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tfgpud.config import Config
from tfgpud.diagnosis.causes import attribute_causes
from tfgpud.diagnosis.gpus import (
    rule_baseline_state_error,
    rule_gpu_appeared,
    rule_gpu_lost,
    rule_gpu_vanished,
    rule_gpu_xid_critical,
)
from tfgpud.diagnosis.host import DRIVER_RULES, rule_no_nvidia_gpu
from tfgpud.diagnosis.memory import rule_gpu_memory_held_idle, rule_gpu_memory_pressure
from tfgpud.diagnosis.readings import Rule
from tfgpud.diagnosis.tensorflow import (
    cpu_fallback_envs,
    rule_tensorflow,
    rule_tf_no_env,
    rule_tf_not_probed,
)
from tfgpud.diagnosis.workloads import rule_tf_job_on_cpu
from tfgpud.model import Finding, Severity, Snapshot

__all__ = ["RULES", "cpu_fallback_envs", "diagnose", "worst_severity"]


RULES: tuple[Rule, ...] = (
    rule_no_nvidia_gpu,
    *DRIVER_RULES,
    rule_gpu_lost,
    rule_gpu_vanished,
    rule_gpu_appeared,
    rule_baseline_state_error,
    rule_gpu_xid_critical,
    rule_gpu_memory_pressure,
    rule_gpu_memory_held_idle,
    rule_tf_job_on_cpu,
    rule_tensorflow,
    rule_tf_not_probed,
    rule_tf_no_env,
)


def diagnose(snapshot: Snapshot, config: Config) -> tuple[Finding, ...]:
    """All findings for ``snapshot``: most severe first, one per (code, subject), each
    consequence naming its root cause (``Finding.cause``). Pure."""
    found: dict[tuple[str, str], Finding] = {}
    for rule in RULES:
        for f in rule(snapshot, config):
            found.setdefault(f.key, f)
    named = attribute_causes(list(found.values()), snapshot, config)
    return tuple(sorted(named, key=lambda f: (-f.severity.rank, f.code, f.subject)))


def worst_severity(findings: Iterable[Finding]) -> Severity | None:
    """The highest severity among ``findings``; None when there are none."""
    return max((f.severity for f in findings), key=lambda sev: sev.rank, default=None)
