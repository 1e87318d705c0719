"""packaging/prometheus: rules parse, their promtool unit tests pass, each is documented."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "packaging" / "prometheus"
RULES = PROM / "tfgpud.rules.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt install prometheus)"
)
REQUIRED = {
    "TfgpudDown",
    "TfgpudCollectorFailing",
    "TfgpudNvidiaDriverUnavailable",
    "TfgpudGpuVanished",
    "TfgpudGpuLost",
    "TfgpudGpuXidCritical",
    "TfgpudTensorflowCpuFallback",
    "TfgpudTensorflowProbeFailing",
    "TfgpudTensorflowNotProbed",
    "TfgpudGpuMemoryPressure",
    "TfgpudGpuMemoryHeldIdle",
    "TfgpudTensorflowJobOnCpu",
}
# Its finding is a warning (processes sharing a full GPU) or critical (an allocation failed):
# the alert takes the finding's severity label.
SEVERITY_FROM_FINDING = {"TfgpudGpuMemoryPressure"}


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


@needs_promtool
def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    out = promtool("test", "rules", "tfgpud.rules.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_test_rules_fails_when_a_rule_is_broken(tmp_path: Path) -> None:
    """The unit tests can fail: a fallback rule that also takes the TF causes of envs that do
    not fall back (they belong to TfgpudTensorflowCpuFallback only beside a fallback) is caught."""
    text = RULES.read_text()
    broken = text.replace(
        "              and on (job, instance, subject)\n"
        '              tfgpud_finding{job="tfgpud", code=~"tf-cpu-fallback|tf-partial-visibility"}',
        "              or on (job, instance, subject)\n"
        '              tfgpud_finding{job="tfgpud", code=~"tf-cpu-fallback|tf-partial-visibility"}',
    )
    assert broken != text
    (tmp_path / "tfgpud.rules.yml").write_text(broken)
    shutil.copy(PROM / "tfgpud.rules.test.yml", tmp_path)
    out = promtool("test", "rules", "tfgpud.rules.test.yml", cwd=tmp_path)
    assert out.returncode == 1 and "TfgpudTensorflowCpuFallback" in out.stdout + out.stderr


@needs_promtool
def test_example_scrape_config_is_valid(tmp_path: Path) -> None:
    text = (PROM / "scrape-config.example.yml").read_text()
    text = text.replace("/etc/prometheus/rules/tfgpud.rules.yml", str(RULES))
    text = text.replace(
        "/etc/prometheus/file_sd/tfgpud/*.yml", str(PROM / "file_sd.tfgpud.example.yml")
    )
    (tmp_path / "prometheus.yml").write_text(text)
    out = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    targets = yaml.safe_load((PROM / "file_sd.tfgpud.example.yml").read_text())
    assert all(t["targets"] for t in targets)


def test_required_alerts_have_severity_summary_description_and_a_runbook_section() -> None:
    by_name = {str(r["alert"]): r for r in rules()}
    assert set(by_name) >= REQUIRED
    runbook = RUNBOOK.read_text()
    for name, rule in by_name.items():
        labels = rule.get("labels")
        annotations = rule.get("annotations")
        if name in SEVERITY_FROM_FINDING:
            assert not labels and "tfgpud_finding" in str(rule["expr"]), name
        else:
            assert isinstance(labels, dict) and labels.get("severity") in {"warning", "critical"}
        assert isinstance(annotations, dict)
        assert annotations.get("summary") and annotations.get("description"), name
        assert f"docs/runbook.md#{name.lower()}" in str(annotations["description"]), name
        assert f"\n## {name}\n" in runbook, f"docs/runbook.md has no section for {name}"
        section = runbook.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**Means**", "**Confirm**", "**Do**"):
            assert part in section, f"runbook section {name} lacks {part}"


def test_critical_finding_routes_every_code_excluded_elsewhere_back_conditionally() -> None:
    """TfgpudCriticalFinding's first part excludes exactly the codes the always-covered set and
    the two conditional parts (driver findings, TF causes) name: no code is dropped or doubled.
    (The third `code=~` is the fallback finding the TF causes are set against.)"""
    by_name = {str(r["alert"]): r for r in rules()}
    expr = str(by_name["TfgpudCriticalFinding"]["expr"])
    excluded = set(re.search(r'code!~"([^"]+)"', expr).group(1).split("|"))  # type: ignore[union-attr]
    parts = [set(m.split("|")) for m in re.findall(r'code=~"([^"]+)"', expr)]
    assert len(parts) == 3 and not parts[0] & parts[1]
    always = {
        "gpu-vanished",
        "gpu-lost",
        "gpu-xid-critical",
        "tf-cpu-fallback",
        "tf-partial-visibility",
        "tf-import-failed",
        "tf-import-crashed",
        "gpu-memory-pressure",
    }
    assert parts[2] == {"tf-cpu-fallback", "tf-partial-visibility"}
    assert excluded == always | parts[0] | parts[1]
    # The always-covered codes each have their alert.
    other = " ".join(str(r["expr"]) for n, r in by_name.items() if n != "TfgpudCriticalFinding")
    for code in ("gpu-vanished", "tf-import-failed", "tf-import-crashed"):
        assert code in other


AMTOOL = shutil.which("amtool")
AM_EXAMPLE = PROM / "alertmanager.example.yml"


@pytest.mark.skipif(
    AMTOOL is None, reason="amtool not installed (apt install prometheus-alertmanager)"
)
def test_alertmanager_example_is_valid_and_routes_findings_by_root_cause() -> None:
    def amtool(*args: str) -> subprocess.CompletedProcess[str]:
        assert AMTOOL is not None
        return subprocess.run(
            [AMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
        )

    check = amtool("check-config", str(AM_EXAMPLE))
    assert check.returncode == 0 and "2 inhibit rules" in check.stdout, check.stdout + check.stderr
    route = ["config", "routes", "test", f"--config.file={AM_EXAMPLE}"]
    cause = ["role=cause", "cause=TfgpudDriverNotLoaded", "host=gpu1"]
    assert amtool(*route, *cause, "severity=critical").stdout.strip() == "tfgpud-pager"
    assert amtool(*route, *cause, "severity=warning").stdout.strip() == "tfgpud-team"
    assert amtool(*route, "alertname=TfgpudDown", "severity=warning").stdout.strip() == (
        "tfgpud-team"
    )


def test_alertmanager_example_pairs_paths_and_causes_on_labels_both_paths_carry() -> None:
    """The contract of alertmanager.example.yml: a finding route grouped by root cause, and the
    two inhibit rules on labels that both the daemon's pushes and the rules' alerts carry."""
    doc = yaml.safe_load(AM_EXAMPLE.read_text())
    assert doc["route"]["receiver"] and doc["receivers"]
    finding_route = next(r for r in doc["route"]["routes"] if "group_by" in r)
    assert finding_route["group_by"] == ["host", "cause"]
    rules_ = [
        (r["source_matchers"], r["target_matchers"], r["equal"]) for r in doc["inhibit_rules"]
    ]
    assert rules_ == [
        (
            ['job="tfgpud"', 'role=~"cause|consequence"'],
            ['origin="tfgpud"'],
            ["host", "code", "subject"],
        ),
        (['role="cause"'], ['role="consequence"'], ["host", "cause"]),
    ]
    # Every label they match on is on both paths: the push (sinks.am_alert) and the rules'
    # alerts (tfgpud_finding's labels, which every finding rule keeps).
    from tfgpud.alerts import Alert, Delivery, am_alert
    from tfgpud.model import Finding, Severity

    f = Finding("gpu-vanished", Severity.CRITICAL, "GPU-1", "gone", cause="driver-not-loaded")
    pushed = am_alert(Delivery("firing", Alert(f, 0.0), 0.0), "gpu1", 0.0, 60.0)["labels"]
    assert {"host", "code", "subject", "cause", "role"} <= set(pushed) and pushed["origin"]
