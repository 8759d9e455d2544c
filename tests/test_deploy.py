"""The deployment files (deploy/, .dockerignore) agree with the code they deploy.

The Helm chart is rendered by Helm's own Go engine (helm-python-sdk binds libhelm_c, no
helm binary), its manifests validated offline against the Kubernetes schemas
(kubernetes-validate), and the custom resources (KEDA ScaledObject, ServiceMonitor)
checked field by field. compose, Prometheus, Grafana, the Dockerfiles and the edge unit
are checked against transports/: metric names, CLI flags, environment variables, port
and probe paths. No network, no docker, no cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics_core import Metric

import rawcast.transports.cli as cli
from rawcast.transports.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "rawcast"
KUBE_VERSIONS = ("1.27", "1.37")  # the chart's kubeVersion floor, and the newest schemas
NAME, NAMESPACE = "rc", "media"
FULLNAME = "rc-rawcast"

# The value sets the tests render: the defaults, and every option switched on.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything": {
        "gpu": {"enabled": True},
        "ingress": {"enabled": True, "tlsSecret": "rawcast-tls", "hashByClientAddress": True},
        "autoscaling": {"mode": "keda"},
        "apiKeys": {"create": True, "value": "k1,k2"},
        "serviceMonitor": {"enabled": True},
        "server": {"allowedOrigins": ["https://app.example.org"]},
        "webrtc": {
            "iceServers": ["stun:stun.example.org:3478", "turn:turn.example.org:3478"],
            "turn": {"username": "rawcast", "existingSecret": "turn"},
        },
    },
    "fixed": {"autoscaling": {"mode": "none"}, "podDisruptionBudget": {"enabled": False}},
    "turn-secret": {
        "webrtc": {
            "iceServers": ["turns:turn.example.org:5349"],
            "turn": {
                "existingSecret": "coturn",
                "authSecretKey": "static-auth-secret",
                "ttlSeconds": 3600,
            },
        },
    },
}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _values() -> dict[str, Any]:
    values: dict[str, Any] = _yaml(CHART / "values.yaml")
    return values


def _render(values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Template path -> the manifests it renders (empty when switched off)."""
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name=NAME, namespace=NAMESPACE, is_install=True)
    return {
        path.rsplit("/", 1)[-1]: [d for d in yaml.safe_load_all(text) if d]
        for path, text in out.items()
        if path.endswith(".yaml")
    }


def _manifests(scenario: str) -> list[dict[str, Any]]:
    return [d for docs in _render(SCENARIOS[scenario]).values() for d in docs]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def _metric_names() -> set[str]:
    """Every series name the app's registry can expose (suffixes by metric type)."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created")}  # fmt: skip
    families: Iterator[Metric] = Metrics().registry.collect()
    return {f.name + s for f in families for s in suffixes[f.type]}


def _used_metrics(text: str) -> set[str]:
    return set(re.findall(r"\brawcast_[a-z0-9_]+", text))


# --- Helm chart ------------------------------------------------------------------------


def test_chart_lints_clean() -> None:
    """`helm lint --strict` finds no error or warning, with the defaults and every option."""
    for values in SCENARIOS.values():
        report = helm.lint(CHART, values, strict=True)
        assert not report["errors"], report
        assert all(m["severity"] < 2 for m in report["messages"]), report


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_rendered_manifests_are_valid_kubernetes(scenario: str) -> None:
    """Every rendered built-in kind validates against the Kubernetes schemas (strict: no
    unknown fields); the custom resources have the fields their operators require."""
    docs = _manifests(scenario)
    for doc in docs:
        assert doc["metadata"]["name"].startswith(FULLNAME)
        if doc["kind"] == "ScaledObject":
            _check_scaledobject(doc, docs)
        elif doc["kind"] == "ServiceMonitor":
            _check_servicemonitor(doc, docs)
        else:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


def test_every_template_renders_in_some_scenario() -> None:
    """Each template file yields a manifest under at least one tested value set."""
    rendered: dict[str, int] = {}
    for values in SCENARIOS.values():
        for path, docs in _render(values).items():
            rendered[path] = rendered.get(path, 0) + len(docs)
    templates = {p.name for p in (CHART / "templates").glob("*.yaml")}
    assert set(rendered) == templates
    assert all(rendered.values()), rendered


def _check_scaledobject(doc: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """KEDA's CRD is not in kubernetes-validate: its required fields, by hand."""
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    spec = doc["spec"]
    allowed = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
               "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback",
               "advanced", "triggers"}  # fmt: skip
    assert set(spec) <= allowed, set(spec) - allowed
    assert spec["scaleTargetRef"]["name"] == _one(docs, "Deployment")["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert isinstance(spec["cooldownPeriod"], int)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                    "maxReplicas": 2, "behavior": behavior}}  # fmt: skip
    kubernetes_validate.validate(hpa, KUBE_VERSIONS[-1], strict=True)
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        assert trigger.get("metricType", "AverageValue") in {"AverageValue", "Value"}
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
        assert meta["serverAddress"].startswith(("http://", "https://"))
        assert float(meta["threshold"]) > 0
        assert _used_metrics(meta["query"]) == {"rawcast_active_sessions"}
        assert f'namespace="{NAMESPACE}"' in meta["query"]
        assert f'service="{_one(docs, "Service")["metadata"]["name"]}"' in meta["query"]


def _check_servicemonitor(doc: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """The ServiceMonitor selects the Service, names its port and sends the metrics key."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    service = _one(docs, "Service")
    labels = service["metadata"]["labels"]
    assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    for ep in doc["spec"]["endpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics"
        cred = ep["authorization"]["credentials"]
        secret = _one(docs, "Secret")
        assert cred["name"] == secret["metadata"]["name"] and cred["key"] in secret["stringData"]


# --- The pod drains its sessions --------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_container_args_and_env_are_what_rawcast_serve_reads(
    scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Deployment's args parse with the real CLI parser, and its environment reaches
    the settings it is meant for (API keys, TURN, host, device)."""
    docs = _manifests(scenario)
    c = _container(docs)
    values = _values()
    env: dict[str, str] = {}
    for e in c["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        env[e["name"]] = f"secret:{ref['name']}/{ref['key']}" if ref else str(e["value"])
    for name in [n for n in os.environ if n.startswith("RAWCAST_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = cli.build_parser().parse_args(c["args"])
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    assert args.port == values["server"]["port"] == c["ports"][0]["containerPort"]
    assert args.max_sessions == values["server"]["maxSessions"]
    assert args.drain_timeout == values["drain"]["drainTimeoutSeconds"]
    assert args.api_key == [env["RAWCAST_API_KEYS"]]
    assert env["RAWCAST_API_KEYS"].startswith("secret:")
    if scenario == "everything":
        assert args.device == "cuda" and args.dtype == "bf16"
        assert args.ice_server == SCENARIOS[scenario]["webrtc"]["iceServers"]
        assert args.turn_username == "rawcast"
        assert args.turn_credential == "secret:turn/credential"
        assert args.allowed_origin == ["https://app.example.org"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["image"].endswith(":" + values["gpu"]["imageTag"])
    else:
        assert args.device == "cpu" and "nvidia.com/gpu" not in c["resources"].get("limits", {})
        assert c["image"].endswith(":" + values["image"]["tag"])
    if scenario == "turn-secret":  # the shared secret, never a static password
        assert args.turn_secret == "secret:coturn/static-auth-secret" and args.turn_ttl == 3600
        assert args.turn_credential is None
    else:
        assert args.turn_secret is None
    consumed = {"RAWCAST_HOST", "RAWCAST_DEVICE", "RAWCAST_API_KEYS", "RAWCAST_ICE_SERVERS",
                "RAWCAST_TURN_USERNAME", "RAWCAST_TURN_CREDENTIAL", "RAWCAST_TURN_SECRET",
                "RAWCAST_TURN_TTL"}  # fmt: skip
    assert {n for n in env if n.startswith("RAWCAST_")} <= consumed
    assert env["OMP_NUM_THREADS"] == str(values["server"]["torchThreads"])
    assert int(env["OMP_NUM_THREADS"]) == int(c["resources"]["requests"]["cpu"])


def test_probes_and_grace_period_let_a_pod_drain() -> None:
    """Readiness on /readyz, liveness on /healthz, and a grace period that covers the
    preStop wait, the drain deadline and uvicorn's own graceful shutdown after it."""
    docs = _manifests("defaults")
    c = _container(docs)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["ports"][0]["name"] == "http"
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain = float(c["args"][c["args"].index("--drain-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + 2 * drain + 10
    assert pod["securityContext"]["runAsNonRoot"] is True
    strategy = _one(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        _render({"drain": {"drainTimeoutSeconds": 60, "terminationGracePeriodSeconds": 75}})


def test_service_ingress_and_disruption_budget() -> None:
    """The Service and Ingress reach the container's named port; nginx keeps WebSockets
    open for an hour; the PodDisruptionBudget selects the pods."""
    docs = _manifests("everything")
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    ingress = _one(docs, "Ingress")
    notes = ingress["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{key}"]) >= 3600
    assert "http_503" in notes["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_autoscaling_modes_scale_on_active_sessions() -> None:
    """prometheus-adapter: an HPA on the per-pod custom metric rawcast_active_sessions that
    the adapter rule serves; keda: a ScaledObject and no HPA; none: fixed replicas."""
    registered = _metric_names()
    adapter = _one(_manifests("defaults"), "HorizontalPodAutoscaler")
    (metric,) = adapter["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "rawcast_active_sessions" and name in registered
    target = float(metric["pods"]["target"]["averageValue"])
    assert 0 < target <= _values()["server"]["maxSessions"]
    (rule,) = _yaml(DEPLOY / "helm" / "prometheus-adapter-values.yaml")["rules"]["custom"]
    assert _used_metrics(rule["seriesQuery"]) == {name} and rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}

    keda = _manifests("everything")
    assert not [d for d in keda if d["kind"] == "HorizontalPodAutoscaler"]
    _one(keda, "ScaledObject")

    fixed = _manifests("fixed")
    assert not [d for d in fixed if d["kind"] in {"HorizontalPodAutoscaler", "ScaledObject"}]
    assert _one(fixed, "Deployment")["spec"]["replicas"] == _values()["replicaCount"]
    assert "replicas" not in _one(_manifests("defaults"), "Deployment")["spec"]


# --- compose, Prometheus, Grafana -------------------------------------------------------


def test_compose_runs_rawcast_with_prometheus_and_grafana(monkeypatch: pytest.MonkeyPatch) -> None:
    """compose has the three services; rawcast's command parses and has a /healthz
    healthcheck; Prometheus scrapes rawcast's service and port with the API key."""
    compose = _yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"rawcast", "prometheus", "grafana"} <= set(services)
    rawcast = services["rawcast"]
    assert (ROOT / "deploy" / rawcast["build"]["context"]).resolve() == ROOT
    assert (ROOT / rawcast["build"]["dockerfile"]).is_file()
    monkeypatch.delenv("RAWCAST_PORT", raising=False)
    args = cli.build_parser().parse_args(rawcast["command"])
    assert args.command == "serve" and args.port == 8000
    assert "/healthz" in " ".join(rawcast["healthcheck"]["test"])
    assert "RAWCAST_API_KEYS" in rawcast["environment"]
    published = {int(p.split(":")[-1]) for p in rawcast["ports"]}
    assert args.port in published

    prom = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "rawcast" and int(port) == args.port
    secret = job["authorization"]["credentials_file"]
    assert secret == f"/run/secrets/{services['prometheus']['secrets'][0]}"
    assert compose["secrets"]["rawcast_api_key"]["environment"] == "RAWCAST_API_KEY"

    grafana = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    provider = _yaml(DEPLOY / "grafana/provisioning/dashboards/rawcast.yaml")["providers"][0]
    assert grafana[provider["options"]["path"]] == "./grafana/dashboards"
    assert grafana["/etc/grafana/provisioning"] == "./grafana/provisioning"
    (ds,) = _yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert ds["url"] == "http://prometheus:9090"


def test_dashboard_uses_only_registered_metrics() -> None:
    """Every query of the provisioned dashboard names a series that transports/metrics.py
    registers, and the dashboard covers sessions, step latency, batch size, event latency
    and drops."""
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "rawcast.json").read_text())
    (ds,) = _yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    exprs = []
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"]
        exprs += [t["expr"] for t in panel["targets"]]
    used = set().union(*(_used_metrics(e) for e in exprs))
    assert used <= _metric_names(), used - _metric_names()
    needed = {
        "rawcast_active_sessions",
        "rawcast_step_seconds_bucket",
        "rawcast_batch_rows_sum",
        "rawcast_event_latency_seconds_bucket",
        "rawcast_dropped_audio_frames_total",
        "rawcast_dropped_video_frames_total",
    }
    assert needed <= used, needed - used


# --- Images ------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles(dockerfile: str) -> None:
    """Non-root user, /healthz healthcheck, the chart's port exposed, torch pinned as in
    pyproject (CPU index for the CPU image), the package folders (and so the bundled
    model) copied in."""
    ins = _instructions(DEPLOY / dockerfile)
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    (user,) = [a for w, a in final if w == "USER"]
    assert user.split(":")[0] not in {"root", "0"}
    (check,) = [a for w, a in final if w == "HEALTHCHECK"]
    assert "/healthz" in check
    (expose,) = [a for w, a in final if w == "EXPOSE"]
    port = _values()["server"]["port"]
    assert int(expose) == port and f"127.0.0.1:{port}/healthz" in check
    env = " ".join(a for w, a in final if w == "ENV")
    assert f"RAWCAST_PORT={port}" in env and "RAWCAST_HOST=0.0.0.0" in env

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [d for d in meta["project"]["dependencies"] if d.startswith("torch")]
    runs = [a for w, a in ins if w == "RUN"]
    torch = [r for r in runs if "install torch" in r]
    assert len(torch) == 1 and pin == "torch==2.13.0" and pin in torch[0]
    if dockerfile == "Dockerfile":
        assert "--index-url https://download.pytorch.org/whl/cpu" in torch[0]
    else:
        assert any("onnxruntime-gpu" in r for r in runs)
    copied = {
        src for w, a in ins if w == "COPY" and not a.startswith("--") for src in a.split()[:-1]
    }
    folders = set(meta["tool"]["setuptools"]["package-dir"].values())
    assert folders | {"pyproject.toml", "README.md"} <= copied


def test_dockerignore_keeps_the_context_small() -> None:
    """The root .dockerignore leaves out the venv, build outputs, data, runs and .git,
    and none of what the images copy."""
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()}
    assert {".git", ".venv", "build", "data", "runs", "**/__pycache__"} <= lines
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    kept = set(meta["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml", "README.md"}
    assert not kept & lines
    assert not any(ln.startswith(("*", "model/")) and "weights" in ln for ln in lines)


# --- Edge --------------------------------------------------------------------------------


def test_edge_unit_runs_narrate_without_root() -> None:
    """The systemd unit starts `rawcast narrate` as a dynamic user in the video group,
    restarts it, and passes only options the CLI knows."""
    unit: dict[str, list[str]] = {}
    for line in (DEPLOY / "edge" / "rawcast-narrate.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            unit.setdefault(key, []).append(value)
    (exec_start,) = unit["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/rawcast") and "narrate" in argv
    assert unit["DynamicUser"] == ["yes"] and "User" not in unit
    assert unit["SupplementaryGroups"] == ["video"]
    assert unit["Restart"] == ["always"]
    before = argv[1 : argv.index("narrate")]
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert parser.parse_args([*before, "serve"]).log_format == "json"
    if "narrate" in sub.choices:  # being written; its flags are checked once it lands
        parser.parse_args([*before, "narrate", "/dev/video0", "--webhook", "http://x/y"])
