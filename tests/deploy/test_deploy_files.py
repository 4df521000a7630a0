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


# --- the inference gateway overlay ----------------------------------------------------------------
GATEWAY = "examples/cpu-inference-gateway"


def _gateway_objects():
    try:
        return validate.render(GATEWAY)
    except validate.Skip as err:
        pytest.skip(str(err))


def test_the_crd_in_test_data_is_the_projects():
    yaml = pytest.importorskip("yaml")
    (crd,) = list(yaml.safe_load_all((validate.CRDS / "inference.networking.k8s.io_inferencepools.yaml").read_text()))
    assert crd["metadata"]["annotations"]["inference.networking.k8s.io/bundle-version"] == "v1.5.0"
    assert ("inference.networking.k8s.io/v1", "InferencePool") in validate._crd_versions()


@pytest.mark.parametrize(("change", "expected"), [
    (lambda s: s.update(targetPort=[{"number": 8000}]), "Additional properties"),          # a typo
    (lambda s: s.update(targetPorts=[{"number": 8000}, {"number": 8000}]), "port number must be unique"),
    (lambda s: s["endpointPickerRef"].pop("port"), "port is required"),
    (lambda s: s.update(appProtocol="grpc"), "is not one of"),
    (lambda s: s.update(targetPorts=[]), "should be non-empty"),
    (lambda s: s.pop("selector"), "'selector' is a required property"),
])
def test_inferencepool_schema_catches(change, expected):
    pytest.importorskip("jsonschema")
    (pool,) = [o for o in _gateway_objects() if o["kind"] == "InferencePool"]
    assert validate._check_custom_resource(pool) == []
    change(pool["spec"])
    problems = validate._check_custom_resource(pool)
    assert any(expected in p for p in problems), problems


def _rules_with(mutate) -> list[str]:
    objs = _gateway_objects()
    by_kind: dict = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    mutate(by_kind)
    return validate._gateway_rules(GATEWAY, objs, by_kind)


def _epp_args(by_kind) -> list[str]:
    return by_kind["Deployment"]["sol-epp"]["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda k: None, None),
    (lambda k: _epp_args(k).remove("--model-server-metrics-port=9400"), "--model-server-metrics-port=9400"),
    (lambda k: _epp_args(k).append("--total-queued-requests-metric=vllm:num_requests_queued"),
     "vllm:num_requests_queued"),
    (lambda k: _epp_args(k).append("--kv-cache-usage-percentage-metric=vllm:kv_cache_usage_perc{model_name=demo}"),
     None),
    (lambda k: k["InferencePool"]["sol"]["spec"].update(targetPorts=[{"number": 50051}]), "HTTP port"),
    (lambda k: _epp_args(k).__setitem__(0, "--pool-name=other"), "--pool-name"),
    (lambda k: k["NetworkPolicy"]["sol-server"]["spec"]["ingress"].pop(), "metrics port"),
])
def test_gateway_rules(mutate, expected):
    pytest.importorskip("yaml")
    problems = _rules_with(mutate)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_gateway_metric_names_are_read_from_the_server():
    exported = validate.gateway_exported_metrics(validate.GATEWAY_METRICS_SOURCE.read_text())
    assert set(validate.EPP_METRIC_FLAGS.values()) <= exported
