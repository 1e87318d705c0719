"""The one table of finding codes (tfgpud/codes.py): complete, and what derives from it agrees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers import emitted_codes

from tfgpud.codes import CODES, MESSAGE_IDS, TF_CAUSES, causes_of
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
    assert causes_of("tf-cpu-fallback") == frozenset(TF_CAUSES)
    assert "driver-not-loaded" in causes_of("gpu-vanished")
    assert causes_of("no-such-code") == frozenset()


def test_critical_finding_rule_splits_the_codes_as_the_table_relates_them() -> None:
    """TfgpudCriticalFinding's conditional parts are the driver causes of gpu-vanished and the
    TF causes of tf-cpu-fallback: the rules file and the table name the same codes."""
    by_name = {str(r["alert"]): r for g in RULES["groups"] for r in g["rules"]}
    expr = str(by_name["TfgpudCriticalFinding"]["expr"])
    parts = [frozenset(m.split("|")) for m in re.findall(r'code=~"([^"]+)"', expr)]
    assert parts == [causes_of("gpu-vanished"), causes_of("tf-cpu-fallback")]
