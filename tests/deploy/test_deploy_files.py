"""The deployment files validate: every check of deploy/validate.py as a test.

A check whose tool is not installed is skipped with the install line (CI installs them
all: deploy/requirements-validate.txt); a check that runs must pass.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_validate():
    spec = importlib.util.spec_from_file_location("sol_deploy_validate", ROOT / "deploy" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


validate = _load_validate()


@pytest.mark.parametrize("check", validate.CHECKS, ids=[c.name for c in validate.CHECKS])
def test_check(check):
    try:
        notes = check.run()
    except validate.Skip as err:
        pytest.skip(f"{check.name}: {err}")
    except validate.Failed as err:
        pytest.fail(f"{check.name}: {check.doc}\n" + "\n".join(err.problems), pytrace=False)
    assert notes


def test_prometheusrule_is_generated_from_rules():
    """The k8s copy of the alerts is rules.yml wrapped in a PrometheusRule: no second
    place to edit."""
    yaml = pytest.importorskip("yaml")
    on_disk = yaml.safe_load(validate.PROMETHEUSRULE.read_text())
    assert on_disk == validate.prometheusrule_from_rules()


def test_every_alert_has_a_runbook_section():
    yaml = pytest.importorskip("yaml")
    readme = (ROOT / "deploy" / "README.md").read_text().lower()
    for group in yaml.safe_load(validate.RULES.read_text())["groups"]:
        for rule in group["rules"]:
            anchor = rule["annotations"]["runbook"].split("#", 1)[1]
            assert f"### {rule['alert'].lower()}" in readme, f"deploy/README.md lacks a section for {rule['alert']}"
            assert anchor == rule["alert"].lower()


def test_every_alert_has_a_unit_test():
    yaml = pytest.importorskip("yaml")
    tests = yaml.safe_load((validate.PROM / "rules_test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])}
    alerts = {r["alert"] for g in yaml.safe_load(validate.RULES.read_text())["groups"] for r in g["rules"]}
    assert alerts <= tested, f"alerts without a promtool test: {sorted(alerts - tested)}"


def test_exported_metrics_parser_reads_the_server_module():
    """The metrics-contract check is only as good as its reading of server/metrics.py."""
    source = '''NS = "sol"
self.ttft = Histogram(f"{NS}_time_to_first_token_seconds", "x", m)
self.requests = Counter(f"{NS}_grpc_requests", "x", m)
waiting = GaugeMetricFamily(f"{NS}_num_requests_waiting", "x", labels=["model"])
'''
    names = validate.exported_metrics(source)
    assert {"sol_time_to_first_token_seconds_bucket", "sol_grpc_requests_total",
            "sol_num_requests_waiting"} <= names
