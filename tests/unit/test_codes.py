"""The one table of finding codes (tfgpud/codes.py): complete, and what derives from it agrees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers import emitted_codes

from tfgpud.codes import CODES, DRIVER_CODES, MESSAGE_IDS, TF_CAUSES, causes_of
from tfgpud.config import AlertsConfig, DaemonConfig
from tfgpud.model import Severity

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = (ROOT / "docs" / "runbook.md").read_text()
RULES = yaml.safe_load((ROOT / "packaging" / "prometheus" / "tfgpud.rules.yml").read_text())
ALERTS = {str(r["alert"]) for g in RULES["groups"] for r in g["rules"]}


def runbook_section(heading: str) -> str | None:
    if f"\n## {heading}\n" not in RUNBOOK:
        return None
    return RUNBOOK.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_every_code_the_rules_emit_is_in_the_table() -> None:
    emitted = emitted_codes()
    assert len(emitted) >= 31  # the scan still finds the rules' codes
    assert emitted - set(CODES) == set()


@pytest.mark.parametrize("code", sorted(CODES))
def test_each_code_has_severity_message_id_and_a_runbook_section_naming_it(code: str) -> None:
    c = CODES[code]
    assert c.code == code and re.fullmatch(r"[a-z]+(-[a-z0-9]+)+", code)
    assert isinstance(c.severity, Severity)
    assert re.fullmatch(r"[0-9a-f]{32}", c.message_id)
    assert c.meaning
    section = runbook_section(c.runbook)
    assert section is not None, f"docs/runbook.md has no section '## {c.runbook}' for {code}"
    named = c.runbook == code or f"`{code}`" in section
    assert named, f"runbook section {c.runbook} does not name {code}"
    if c.runbook.startswith("Tfgpud"):  # an alert's section: that rule exists
        assert c.runbook in ALERTS, f"{code}: no Prometheus rule {c.runbook}"


def test_message_ids_are_unique_and_consequences_name_known_codes() -> None:
    ids = list(MESSAGE_IDS.values())
    assert len(ids) == len(CODES) == len(set(ids))
    for c in CODES.values():
        assert set(c.consequence_of) <= set(CODES), c.code
        assert c.code not in c.consequence_of
    assert causes_of("tf-cpu-fallback") == frozenset(TF_CAUSES) | DRIVER_CODES
    assert causes_of("gpu-vanished") == DRIVER_CODES
    assert causes_of("no-such-code") == frozenset()


def test_the_cause_graph_has_no_cycle_and_causes_are_at_least_as_severe() -> None:
    """A cycle would let two findings silence each other (nothing pages); a cause less severe
    by default than its consequence would be skipped (the consequence pages), so say so here."""

    def roots(code: str, path: tuple[str, ...]) -> None:
        assert code not in path, f"cycle: {' -> '.join((*path, code))}"
        for cause in CODES[code].consequence_of:
            roots(cause, (*path, code))

    for code in CODES:
        roots(code, ())
    weaker = {
        (c.code, cause)
        for c in CODES.values()
        for cause in c.consequence_of
        if CODES[cause].severity.rank < c.severity.rank
    }
    # gpu-memory-pressure is critical only when an allocation failed: then it explains a failed
    # smoke test; the warning (shared, full) never does.
    assert weaker == {("tf-smoke-failed", "gpu-memory-pressure")}


BY_NAME = {str(r["alert"]): r for g in RULES["groups"] for r in g["rules"]}


def test_critical_finding_rule_splits_the_codes_as_the_table_relates_them() -> None:
    """TfgpudCriticalFinding's conditional parts are the driver causes of gpu-vanished and the
    TF causes of tf-cpu-fallback (those beside a fallback alert as TfgpudTensorflowCpuFallback):
    the rules file and the table name the same codes."""
    expr = str(BY_NAME["TfgpudCriticalFinding"]["expr"])
    parts = [frozenset(m.split("|")) for m in re.findall(r'code=~"([^"]+)"', expr)]
    fallback = frozenset({"tf-cpu-fallback", "tf-partial-visibility"})
    assert parts == [DRIVER_CODES, frozenset(TF_CAUSES), fallback]
    beside = [
        frozenset(m.split("|"))
        for m in re.findall(r'code=~"([^"]+)"', str(BY_NAME["TfgpudTensorflowCpuFallback"]["expr"]))
    ]
    assert beside == [fallback, frozenset(TF_CAUSES), fallback]


def test_driver_unavailable_rule_takes_every_driver_code() -> None:
    """A driver code the rule does not name would alert, while NVML is down, only as a bare
    host alert without its code (and its pushed twin would page beside it)."""
    expr = str(BY_NAME["TfgpudNvidiaDriverUnavailable"]["expr"])
    [named] = re.findall(r'code=~"([^"]+)"', expr)
    assert frozenset(named.split("|")) == DRIVER_CODES
    assert "nvml-unusable" in DRIVER_CODES


def _seconds(value: object) -> int:
    text = str(value or "0s")
    return sum(
        int(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+)([smh])", text)
    )


FALLBACKS = {"tf-cpu-fallback", "tf-partial-visibility"}


def _rules_of(code: str, cause_of: str | None = None) -> list[str]:
    """The rules that can carry ``code``'s finding (as the cause of ``cause_of``): its runbook
    section's alert, and the catch-all TfgpudCriticalFinding where it takes the code — not for
    a driver finding explaining another (that holds only while NVML is down, when
    TfgpudNvidiaDriverUnavailable has it), nor for a TF cause beside its env's fallback."""
    c = CODES[code]
    as_cause = cause_of is not None
    if cause_of in FALLBACKS and code in TF_CAUSES:
        return ["TfgpudTensorflowCpuFallback"]
    rules = [c.runbook] if c.runbook in BY_NAME else []
    expr = str(BY_NAME["TfgpudCriticalFinding"]["expr"])
    excluded = set(re.findall(r'code!~"([^"]+)"', expr)[0].split("|"))
    catch_all = code not in excluded or code in DRIVER_CODES | set(TF_CAUSES)
    if c.severity is Severity.CRITICAL and catch_all and not (as_cause and code in DRIVER_CODES):
        rules.append("TfgpudCriticalFinding")
    return rules


def test_a_consequence_never_fires_before_its_cause_and_rules_outlive_pushes() -> None:
    """Inhibition needs the cause's alert to exist: a rule that carries a consequence never has a
    shorter `for:` than the rules carrying its causes, nor comes before them (Prometheus sends
    each rule's alerts after evaluating it). Every rule built on tfgpud_finding keeps firing
    longer than the daemon takes to resolve the pushed twin it stands for ([alerts] for_seconds
    plus a poll), so fixing a cause never lets the push page on its own."""
    position = {name: i for i, name in enumerate(BY_NAME)}
    for c in CODES.values():
        for cause in c.consequence_of:
            for rule in _rules_of(c.code):
                for cause_rule in _rules_of(cause, cause_of=c.code):
                    assert _seconds(BY_NAME[rule].get("for")) >= _seconds(
                        BY_NAME[cause_rule].get("for")
                    ), (c.code, rule, cause, cause_rule)
                    assert position[rule] >= position[cause_rule], (c.code, rule, cause_rule)
    on_findings = [n for n, r in BY_NAME.items() if "tfgpud_finding" in str(r["expr"])]
    assert len(on_findings) >= 11
    daemon_resolve = AlertsConfig().for_seconds + DaemonConfig().interval_seconds
    for name in on_findings:
        assert _seconds(BY_NAME[name].get("keep_firing_for")) > daemon_resolve, name
