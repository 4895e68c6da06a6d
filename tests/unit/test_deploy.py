"""The container and deployment files, checked against the code (no Docker engine or cluster here):
env names, ports, probe paths, metric names in alerts, HPA and dashboard, grace periods, key files, and the
Kubernetes overlays as `kubectl kustomize` renders them (offline): monitoring objects, network policy, Ingress
limits, GPU requests, model volume, topology spread."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from imagegen.api.keys import KeyRing
from imagegen.api.limits import UPLOAD_PATHS
from imagegen.main import create_app, create_ops_app
from imagegen.metrics import Metrics, Snapshot
from imagegen.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
OVERLAYS = ("cpu", "gpu")
SETTINGS = {f"IMAGEGEN_{name.upper()}" for name in Settings.model_fields}
DASHBOARD = REPO / "deploy/grafana/dashboards/imagegen.json"
ALERTS = REPO / "deploy/prometheus/alerts.yml"

Doc = dict[str, Any]


# ---- rendering ----


def kubectl() -> str:
    found = shutil.which("kubectl")
    assert found, "kubectl renders kustomizations offline"
    return found


@functools.cache
def _kustomize(folder: str) -> tuple[Doc, ...]:
    out = subprocess.run([kubectl(), "kustomize", folder], capture_output=True, text=True, check=True).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def kustomize(folder: Path) -> list[Doc]:
    return copy.deepcopy(list(_kustomize(str(folder))))


def rendered(overlay: str) -> list[Doc]:
    return kustomize(K8S / "overlays" / overlay)


@functools.cache
def _rendered_with_proxy(overlay: str) -> tuple[Doc, ...]:
    """An overlay plus the optional proxy component, as a user's kustomization would add it (kustomize takes
    only relative paths, so the temporary kustomization names them relative to itself)."""
    with tempfile.TemporaryDirectory() as tmp:
        relative = functools.partial(os.path.relpath, start=tmp)
        kustomization = {"resources": [relative(K8S / "overlays" / overlay)],
                         "components": [relative(K8S / "components/proxy")]}  # fmt: skip
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return tuple(kustomize(Path(tmp)))


def rendered_with_proxy(overlay: str) -> list[Doc]:
    return copy.deepcopy(list(_rendered_with_proxy(overlay)))


def objects(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str = "imagegen") -> Doc:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def deployment(overlay: str) -> Doc:
    return one(rendered(overlay), "Deployment")


def pod_spec(overlay: str) -> Doc:
    return dict(deployment(overlay)["spec"]["template"]["spec"])


def pod_labels(overlay: str) -> dict[str, str]:
    return dict(deployment(overlay)["spec"]["template"]["metadata"]["labels"])


def container(overlay: str) -> Doc:
    [c] = pod_spec(overlay)["containers"]
    return dict(c)


def container_ports(overlay: str) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(overlay)["ports"]}


def config(overlay: str) -> dict[str, str]:
    return dict(one(rendered(overlay), "ConfigMap")["data"])


def secret(overlay: str) -> dict[str, str]:
    return dict(one(rendered(overlay), "Secret")["stringData"])


def effective_settings(overlay: str) -> Settings:
    """The settings the container starts with: its ConfigMap, its literal env and the Secret's values."""
    env = config(overlay)
    for e in container(overlay).get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        env[e["name"]] = secret(overlay)[ref["key"]] if ref else e["value"]
    fields = {name.removeprefix("IMAGEGEN_").lower(): value for name, value in env.items()}
    return Settings.model_validate(fields)  # the given values and the defaults; no .env, no process env


def matches(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions would need evaluating
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


def resolve(port: int | str, ports: dict[str, int]) -> int:
    return ports[port] if isinstance(port, str) else port


def declared(folder: Path) -> set[tuple[str, str]]:
    """(kind, name) of every object a kustomization's resources, components and generators declare."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    out: set[tuple[str, str]] = set()
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            out |= declared(path)
        else:
            out |= {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(path.read_text()) if d}
    out |= {("ConfigMap", g["name"]) for g in kustomization.get("configMapGenerator", [])}
    return out


# ---- other files ----


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text()))


def dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", text, flags=re.M):
        env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def exposed_sample_names() -> set[str]:
    """Every series name the app can expose: families, with _total / _bucket / _sum / _count forms."""
    metrics = Metrics()
    metrics.watch(lambda: Snapshot(signer_trusted=True, database_up=True))
    names = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names |= {family.name + s for s in suffixes}
    return names


def ops_and_api(tmp_path: Path, **settings: Any) -> tuple[TestClient, TestClient]:
    app = create_app(Settings(models_dir=tmp_path, state_dir=tmp_path, **settings))
    return TestClient(create_ops_app(app.state.services)), TestClient(app)


def served(client: TestClient, path: str) -> bool:  # answered by a route (503 = not ready yet), not a 404
    return client.get(path).status_code in (200, 503)


def deadline(overlay: str) -> float:
    """The synchronous request deadline in force: the overlay's, and never below the setting's default."""
    default = Settings.model_fields["request_deadline_seconds"].default
    configured = effective_settings(overlay).request_deadline_seconds
    assert configured is not None, "without a deadline no proxy timeout can outlast it"
    return max(default, configured)


# ---- tests: settings, ports, probes ----


def test_every_imagegen_env_name_in_the_deploy_files_is_a_setting() -> None:
    files = [REPO / "Dockerfile", REPO / "docker-compose.yml", *K8S.rglob("*.yaml"), REPO / "deploy/README.md"]
    used = {name for f in files for name in re.findall(r"IMAGEGEN_[A-Z0-9_]+", f.read_text())}
    assert used - {"IMAGEGEN_VARIANT"} <= SETTINGS, used - SETTINGS  # IMAGEGEN_VARIANT: compose's build argument
    assert set(dockerfile_env()) & SETTINGS >= {"IMAGEGEN_HOST", "IMAGEGEN_PORT", "IMAGEGEN_METRICS_PORT"}
    for overlay in OVERLAYS:
        assert set(config(overlay)) <= SETTINGS, overlay
        assert {e["name"] for e in container(overlay).get("env", [])} <= SETTINGS, overlay
    for service in ("app-1", "app-2"):
        assert set(compose()["services"][service]["environment"]) <= SETTINGS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rendered_settings_validate(overlay: str) -> None:
    settings = effective_settings(overlay)  # raises on a bad value (a dtype, a port, a bool)
    assert settings.metrics_port is not None and settings.metrics_port != settings.port
    assert settings.api_keys_file is not None and settings.database_url is not None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_agree_everywhere(overlay: str) -> None:
    env = dockerfile_env()
    api, metrics = int(env["IMAGEGEN_PORT"]), int(env["IMAGEGEN_METRICS_PORT"])
    assert api == Settings.model_fields["port"].default
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {api} {metrics}$", dockerfile, flags=re.M)
    ports = container_ports(overlay)
    assert ports == {"http": api, "metrics": metrics}
    assert int(config(overlay)["IMAGEGEN_PORT"]) == api and int(config(overlay)["IMAGEGEN_METRICS_PORT"]) == metrics
    docs = rendered(overlay)
    services = objects(docs, "Service")
    assert services
    for service in services:
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    # The Ingress reaches the API port through the `imagegen` Service, never the metrics port.
    service_ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    for ingress in objects(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == "imagegen", ingress["metadata"]["name"]
                port = service_ports[backend["port"]["name"]]
                assert resolve(port["targetPort"], ports) == api
    scrape = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets and all(t.endswith(f":{metrics}") for t in targets)
    assert {t.split(":")[0] for t in targets} <= set(compose()["services"])
    nginx = compose()["services"]["nginx"]
    assert {nginx["environment"]["APP_1"], nginx["environment"]["APP_2"]} == {f"app-1:{api}", f"app-2:{api}"}
    listen = nginx["environment"]["LISTEN"]
    assert any(p.endswith(f":{listen}") for p in nginx["ports"])
    template = (REPO / "deploy/nginx/imagegen.conf.template").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", template)) == {"APP_1", "APP_2", "LISTEN"}
    assert set(nginx["environment"]["NGINX_ENVSUBST_FILTER"].split("|")) == {"APP_1", "APP_2", "LISTEN"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_routes_of_the_ops_port(overlay: str, tmp_path: Path) -> None:
    ops, _ = ops_and_api(tmp_path)
    c = container(overlay)
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert served(ops, probe["path"]) and probe["port"] == "metrics"
    healthcheck = re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", (REPO / "Dockerfile").read_text(), flags=re.M)
    assert healthcheck and json.loads(healthcheck.group(1)) == ["python", "-m", "imagegen", "probe"]
    [endpoint] = one(rendered(overlay), "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert served(ops, endpoint["path"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_periods_outlast_the_drain(overlay: str) -> None:
    drain = float(config(overlay)["IMAGEGEN_DRAIN_SECONDS"])
    pre_stop = container(overlay)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod_spec(overlay)["terminationGracePeriodSeconds"]
    assert grace > drain + float(pre_stop[1])
    app = compose()["services"]["app-1"]
    assert float(app["stop_grace_period"].removesuffix("s")) > float(app["environment"]["IMAGEGEN_DRAIN_SECONDS"])
    assert re.search(r"^STOPSIGNAL SIGTERM$", (REPO / "Dockerfile").read_text(), flags=re.M)


# ---- tests: metrics, autoscaling, alerts, dashboard ----


def test_metric_names_in_alerts_hpa_adapter_and_dashboard_exist() -> None:
    exposed = exposed_sample_names()
    files = [ALERTS, K8S / "base/hpa.yaml", K8S / "base/prometheusrule.yaml", K8S / "prometheus-adapter/configmap.yaml",
             K8S / "prometheus-adapter/values.yaml", DASHBOARD]  # fmt: skip
    for f in files:
        used = set(re.findall(r"\bimagegen_[a-z0-9_]+", f.read_text()))
        assert used, f
        assert used <= exposed, (f.name, used - exposed)
    for overlay in OVERLAYS:
        [hpa] = objects(rendered(overlay), "HorizontalPodAutoscaler")
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in exposed


def adapter_rules() -> tuple[list[Doc], list[Doc]]:
    """The prometheus-adapter rule in its two forms: the adapter's config file (a ConfigMap) and Helm values."""
    [configmap] = [d for d in yaml.safe_load_all((K8S / "prometheus-adapter/configmap.yaml").read_text()) if d]
    values = yaml.safe_load((K8S / "prometheus-adapter/values.yaml").read_text())
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"], values["rules"]["custom"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_prometheus_adapter_serves_the_metric_the_hpa_reads(overlay: str) -> None:
    as_configmap, as_values = adapter_rules()
    assert as_configmap == as_values
    [hpa] = objects(rendered(overlay), "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "imagegen"}
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    served = {}
    for rule in as_configmap:
        series = re.match(r"'?([a-z_:][a-z0-9_:]*)\{", rule["seriesQuery"])
        assert series and re.fullmatch(rule["name"]["matches"].strip("^$"), series.group(1)), rule
        # per pod: the series carry the labels a PodMonitor target gets (namespace, pod), mapped to resources
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        served[rule["name"]["as"]] = series.group(1)
    assert metric["pods"]["metric"]["name"] in served
    # the adapter's ConfigMap belongs to its own namespace: no overlay applies it into the app's
    assert ("ConfigMap", "prometheus-adapter") not in {(d["kind"], d["metadata"]["name"]) for d in rendered(overlay)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_hpa_and_the_disruption_budget_leave_room_for_drains(overlay: str) -> None:
    docs = rendered(overlay)
    [hpa] = objects(docs, "HorizontalPodAutoscaler")
    [pdb] = objects(docs, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"], pod_labels(overlay))
    # with as many replicas as minAvailable, no node drain could ever evict a pod
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    # the HPA owns the replica count: a value in the Deployment would reset it on every apply
    assert "replicas" not in deployment(overlay)["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_podmonitor_scrapes_the_metrics_port_of_the_pods(overlay: str, tmp_path: Path) -> None:
    docs = rendered(overlay)
    [monitor] = objects(docs, "PodMonitor")
    spec = monitor["spec"]
    assert "namespaceSelector" not in spec  # the PodMonitor's own namespace: the pods'
    assert matches(spec["selector"], pod_labels(overlay))
    proxy_labels = one(rendered_with_proxy(overlay), "Deployment", "imagegen-proxy")["spec"]["template"]["metadata"]
    assert not matches(spec["selector"], proxy_labels["labels"])  # nginx has no /metrics of ours
    metrics_port = int(config(overlay)["IMAGEGEN_METRICS_PORT"])
    ops, api = ops_and_api(tmp_path, metrics_port=metrics_port)
    [endpoint] = spec["podMetricsEndpoints"]
    assert container_ports(overlay)[endpoint["port"]] == metrics_port
    answer = ops.get(endpoint["path"])
    assert answer.status_code == 200 and "imagegen_ready" in answer.text
    # with a metrics port, the API port (the one the Ingress reaches) serves no /metrics
    assert api.get(endpoint["path"]).status_code == 404
    # job="imagegen" in the alerts is the value of the pod label the PodMonitor takes the job name from
    jobs = set(re.findall(r'\bjob="([^"]+)"', ALERTS.read_text()))
    assert jobs and jobs == {pod_labels(overlay)[spec["jobLabel"]]}
    # the same Prometheus selects the PodMonitor and the PrometheusRule (kube-prometheus-stack: by `release`)
    [rule] = objects(docs, "PrometheusRule")
    assert monitor["metadata"]["labels"]["release"] == rule["metadata"]["labels"]["release"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_prometheusrule_carries_the_rules_of_alerts_yml(overlay: str) -> None:
    alerts = yaml.safe_load(ALERTS.read_text())["groups"]
    [rule] = objects(rendered(overlay), "PrometheusRule")
    groups = rule["spec"]["groups"]
    hint = "regenerate it: python deploy/k8s/prometheusrule.py"

    def expressions(gs: list[Doc]) -> list[tuple[str, str, str]]:
        return [(g["name"], r.get("alert") or r["record"], r["expr"]) for g in gs for r in g["rules"]]

    assert len(expressions(alerts)) >= 8
    assert expressions(groups) == expressions(alerts), hint
    assert groups == alerts, hint  # for:, labels and annotations too


def test_grafana_dashboard_picks_its_datasource_through_a_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [variable] = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    assert not variable.get("current")  # empty: Grafana starts at the default data source of that type

    def datasources(node: Any) -> list[Any]:
        if isinstance(node, dict):
            return ([node["datasource"]] if "datasource" in node else []) + datasources(list(node.values()))
        if isinstance(node, list):
            return [d for item in node for d in datasources(item)]
        return []

    used = datasources(dashboard["panels"])
    assert used and all(d == {"type": "prometheus", "uid": "${datasource}"} for d in used), used
    # compose: the variable resolves to the provisioned data source, the only default one of that type
    sources = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    defaults = [d for d in sources["datasources"] if d.get("isDefault")]
    assert [d["type"] for d in defaults] == ["prometheus"]
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/imagegen.yml").read_text())
    mounted = {v.split(":")[1]: v.split(":")[0] for v in compose()["services"]["grafana"]["volumes"] if ":" in v}
    [path] = [p["options"]["path"] for p in provider["providers"]]
    assert (REPO / mounted[path]).resolve() == DASHBOARD.parent


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dashboard_configmap_is_found_by_the_grafana_sidecar(overlay: str) -> None:
    [board] = [d for d in objects(rendered(overlay), "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"][DASHBOARD.name]) == json.loads(DASHBOARD.read_text())


@pytest.mark.parametrize("check", [["check", "rules", "deploy/prometheus/alerts.yml"],
                                   ["check", "config", "deploy/prometheus/prometheus.yml"]])  # fmt: skip
def test_promtool_accepts_the_prometheus_files(check: list[str]) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by .ci/run (Debian package prometheus)"
    result = subprocess.run([promtool, *check], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- tests: the kustomize layout ----

EXPECTED_KINDS = {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                  "NetworkPolicy", "PodMonitor", "PrometheusRule", "Ingress"}  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_every_manifest(overlay: str) -> None:
    docs = rendered(overlay)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))
    assert set(names) == declared(K8S / "overlays" / overlay)  # nothing dropped, renamed or added on the way
    assert {kind for kind, _ in names} >= EXPECTED_KINDS | ({"PersistentVolumeClaim"} if overlay == "gpu" else set())
    # every manifest in base/ is listed in its kustomization (a forgotten file would never be applied)
    listed = set(yaml.safe_load((K8S / "base/kustomization.yaml").read_text())["resources"])
    assert {f.name for f in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"} <= listed
    # one public entry point: the Ingress; the proxy's LoadBalancer only with its component
    assert not [s for s in objects(docs, "Service") if s["spec"].get("type") == "LoadBalancer"]
    with_proxy = rendered_with_proxy(overlay)
    added = {(d["kind"], d["metadata"]["name"]) for d in with_proxy} - set(names)
    assert added == {("ConfigMap", "imagegen-proxy"), ("Deployment", "imagegen-proxy"), ("Service", "imagegen-proxy")}
    assert one(with_proxy, "Service", "imagegen-proxy")["spec"]["type"] == "LoadBalancer"


def test_the_default_kustomization_is_the_cpu_overlay() -> None:
    assert kustomize(K8S) == rendered("cpu")


# ---- tests: the pods ----


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_container_runs_as_a_non_root_user(overlay: str) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    pod = pod_spec(overlay)["securityContext"]
    assert pod["runAsNonRoot"] is True and str(pod["runAsUser"]) == users[-1].split(":")[0]
    assert container(overlay)["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_gpu_overlay_asks_for_one_gpu_and_runs_on_cuda() -> None:
    c = container("gpu")
    limits, requests = c["resources"]["limits"], c["resources"].get("requests", {})
    assert int(limits["nvidia.com/gpu"]) == 1
    assert int(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == 1  # an extended resource: equal
    settings = effective_settings("gpu")
    assert settings.device == "cuda" and settings.dtype == "bfloat16"
    assert c["image"].endswith("-cuda")  # the CUDA variant of the Dockerfile
    spec = pod_spec("gpu")
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    [gpu_hpa], [cpu_hpa] = (objects(rendered(o), "HorizontalPodAutoscaler") for o in ("gpu", "cpu"))
    assert gpu_hpa["spec"]["maxReplicas"] < cpu_hpa["spec"]["maxReplicas"]  # each pod holds a GPU


def test_the_cpu_overlay_stays_off_gpus() -> None:
    c = container("cpu")
    assert "nvidia.com" not in json.dumps(rendered("cpu"))
    settings = effective_settings("cpu")
    assert settings.device == "cpu" and c["image"].endswith("-cpu")
    # torch's threads match the pod's CPU share, not the node's core count
    assert settings.torch_threads == int(c["resources"]["requests"]["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_models_dir_is_what_the_pod_has(overlay: str) -> None:
    models_dir = config(overlay)["IMAGEGEN_MODELS_DIR"]
    mounts = {m["mountPath"]: m for m in container(overlay)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(overlay)["volumes"]}
    if overlay == "cpu":
        # the models baked into the image (Dockerfile), and no mount that would hide them
        assert models_dir == dockerfile_env()["IMAGEGEN_MODELS_DIR"]
        assert re.search(rf"^COPY --from=build {models_dir} {models_dir}$", (REPO / "Dockerfile").read_text(), re.M)
        assert not [m for m in mounts if models_dir == m or models_dir.startswith(m.rstrip("/") + "/")]
        return
    mount = mounts[models_dir]
    assert mount["readOnly"] is True
    claim = volumes[mount["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = one(rendered(overlay), "PersistentVolumeClaim", claim["claimName"])
    # the replicas spread over nodes (topology spread), so the volume must mount on many at once
    assert set(pvc["spec"]["accessModes"]) & {"ReadOnlyMany", "ReadWriteMany"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_topology_spread_selects_the_pods(overlay: str) -> None:
    constraints = {c["topologyKey"]: c for c in pod_spec(overlay)["topologySpreadConstraints"]}
    assert set(constraints) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    selector = deployment(overlay)["spec"]["selector"]
    for c in constraints.values():
        assert matches(c["labelSelector"], pod_labels(overlay)) and c["labelSelector"] == selector
        assert c["maxSkew"] == 1
        assert c.get("nodeTaintsPolicy") == "Honor"  # tainted nodes the pod cannot use are no domain
    # nodes without a zone label (single-zone clusters) must not stop scheduling
    assert constraints["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_example_key_files_load(overlay: str, tmp_path: Path) -> None:
    ring = KeyRing.load(REPO / "deploy/compose/api_keys.toml")
    documented = re.search(r"ig_[\w-]+", (REPO / "deploy/compose/api_keys.toml").read_text())
    assert documented and ring.caller(documented.group(0)) is not None
    (tmp_path / "keys.toml").write_text(secret(overlay)["api_keys.toml"])
    assert len(KeyRing.load(tmp_path / "keys.toml")) >= 1
    referenced = {item["key"] for v in pod_spec(overlay)["volumes"] if "secret" in v
                  for item in v["secret"]["items"]}  # fmt: skip
    referenced |= {e["valueFrom"]["secretKeyRef"]["key"] for e in container(overlay).get("env", []) if "valueFrom" in e}
    assert referenced <= set(secret(overlay))


def test_the_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    ignored = [p for p in ignored if p and not p.startswith("#")]
    sources = [s for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, flags=re.M) for s in line.split()[:-1]]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert source.rstrip("/") not in ignored, source


# ---- tests: the network ----


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_networkpolicy_admits_what_the_service_probes_and_scrapes_use(overlay: str) -> None:
    docs = rendered_with_proxy(overlay)
    [policy] = objects(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert matches(spec["podSelector"], pod_labels(overlay))
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    ports = container_ports(overlay)
    api, metrics = ports["http"], ports["metrics"]

    def peers_of(port: int) -> list[Doc]:
        rules = [r for r in spec["ingress"] if port in {resolve(p["port"], ports) for p in r["ports"]}]
        for rule in rules:
            assert rule.get("from"), rule  # a rule without `from` admits everyone
            assert {p.get("protocol", "TCP") for p in rule["ports"]} == {"TCP"}
        return [peer for r in rules for peer in r["from"]]

    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    # the API port: the ingress controller's pods and the proxy's pods, nobody else
    api_peers = peers_of(api)
    proxy_pods = one(docs, "Deployment", "imagegen-proxy")["spec"]["template"]["metadata"]["labels"]
    assert [p for p in api_peers if set(p) == {"podSelector"} and matches(p["podSelector"], proxy_pods)]
    controller = [p for p in api_peers if "namespaceSelector" in p]
    assert controller and all(p["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ingress-nginx"}
                              for p in controller)  # fmt: skip
    assert monitoring not in api_peers
    # the metrics port (/metrics and the probes' paths): the monitoring namespace only
    assert peers_of(metrics) == [monitoring]
    # every port the Service targets, the probes call and the PodMonitor scrapes is admitted
    admitted = {resolve(p["port"], ports) for r in spec["ingress"] for p in r["ports"]}
    services = objects(rendered(overlay), "Service")
    wanted = {resolve(p["targetPort"], ports) for s in services for p in s["spec"]["ports"]}
    c = container(overlay)
    wanted |= {resolve(c[k]["httpGet"]["port"], ports) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    wanted |= {ports[e["port"]] for e in one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]}
    assert wanted == {api, metrics} and wanted <= admitted
    # out: DNS, and the database of IMAGEGEN_DATABASE_URL
    out = {(p.get("protocol", "TCP"), p["port"]) for r in spec["egress"] for p in r["ports"]}
    database = urlsplit(secret(overlay)["database-url"])
    assert database.scheme.startswith("postgresql")
    assert out == {("UDP", 53), ("TCP", 53), ("TCP", database.port or 5432)}


def size_bytes(value: str) -> int:
    """An nginx size, as ingress-nginx validates it (parser.SizeRegex): digits and an optional b/k/m/g."""
    found = re.fullmatch(r"(\d+)([bkmg]?)", value, flags=re.I)
    assert found, value
    return int(found.group(1)) * {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[found.group(2).lower()]


# ingress-nginx's validator for proxy-next-upstream (internal/ingress/annotations/proxy/main.go)
NEXT_UPSTREAM = re.compile(r"^((error|timeout|invalid_header|http_500|http_502|http_503|http_504|http_403|http_404"
                           r"|http_429|non_idempotent|off)\s?)+$")  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ingress_bounds_bodies_just_above_the_app_and_outlasts_the_deadline(overlay: str) -> None:
    ingresses = {i["metadata"]["name"]: i for i in objects(rendered(overlay), "Ingress")}
    assert set(ingresses) == {"imagegen", "imagegen-uploads"}
    json_limit = Settings.model_fields["max_json_body_bytes"].default
    upload_limit = Settings.model_fields["max_upload_bytes"].default
    settings = effective_settings(overlay)
    assert (settings.max_json_body_bytes, settings.max_upload_bytes) == (json_limit, upload_limit)

    def paths(ingress: Doc) -> dict[str, str]:
        return {p["path"]: p["pathType"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}

    # the upload routes, exactly; everything else under `/`
    assert paths(ingresses["imagegen-uploads"]) == dict.fromkeys(UPLOAD_PATHS, "Exact")
    assert paths(ingresses["imagegen"]) == {"/": "Prefix"}
    limit = {name: size_bytes(i["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"])
             for name, i in ingresses.items()}  # fmt: skip
    assert upload_limit < limit["imagegen-uploads"] <= 1.25 * upload_limit
    assert json_limit < limit["imagegen"] <= 16 * 1024 * 1024
    hosts = set()
    for name, ingress in ingresses.items():
        annotations = ingress["metadata"]["annotations"].items()
        notes = {k.removeprefix("nginx.ingress.kubernetes.io/"): v for k, v in annotations}
        assert ingress["spec"]["ingressClassName"] == "nginx"
        for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
            assert notes[timeout].isdigit(), (name, timeout)  # the controller takes whole seconds only
            assert int(notes[timeout]) >= deadline(overlay), (name, timeout)
        retry = notes["proxy-next-upstream"]
        assert NEXT_UPSTREAM.match(retry) and "http_503" in retry.split()
        assert "timeout" not in retry.split()  # a slow generation must not run twice
        assert notes["proxy-buffering"] == "off"  # server-sent events
        rule_hosts = {r["host"] for r in ingress["spec"]["rules"]}
        assert rule_hosts <= {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
        hosts |= rule_hosts
    # result URLs are made from IMAGEGEN_PUBLIC_BASE_URL: the Ingress's host, over TLS
    assert settings.public_base_url and urlsplit(settings.public_base_url).hostname in hosts and len(hosts) == 1
    assert urlsplit(settings.public_base_url).scheme == "https" and settings.cookie_secure


# ---- tests: the nginx proxies ----


def body_limits(conf: str) -> tuple[int, int]:
    """(server-wide, image uploads) client_max_body_size of an nginx configuration, in bytes; the upload location
    matches exactly the app's upload routes."""

    def size(text: str) -> int:
        value = re.search(r"client_max_body_size (\d+)([km]?);", text)
        assert value, text
        return int(value.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[value.group(2)]

    verify = re.search(r"location ~ (\S+) \{(.*?)\}", conf, flags=re.S)
    assert verify
    uploads = re.compile(verify.group(1))
    assert {p for p in UPLOAD_PATHS | {"/v1/images/generations", "/v1/jobs/x"} if uploads.search(p)} == UPLOAD_PATHS
    return size(conf.replace(verify.group(0), "")), size(verify.group(2))


def proxy_configs() -> dict[str, str]:
    proxy = one(rendered_with_proxy("cpu"), "ConfigMap", "imagegen-proxy")
    template = (REPO / "deploy/nginx/imagegen.conf.template").read_text()
    compose_conf = template.replace("${APP_1}", "127.0.0.1:1").replace("${APP_2}", "127.0.0.1:2")
    return {"compose": compose_conf.replace("${LISTEN}", "127.0.0.1:8080"),
            "k8s": proxy["data"]["default.conf"].replace("server imagegen:80", "server 127.0.0.1:1")}  # fmt: skip


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_the_proxies_bound_bodies_just_above_the_app(where: str) -> None:
    """The app answers an oversized body in its own JSON shape; the proxy stops only what is absurd."""
    whole, verify = body_limits(proxy_configs()[where])
    json_limit = Settings.model_fields["max_json_body_bytes"].default
    upload_limit = Settings.model_fields["max_upload_bytes"].default
    assert json_limit < whole <= 16 * 1024 * 1024
    assert upload_limit < verify <= 1.25 * upload_limit
    conf = proxy_configs()[where]
    for directive in ("client_header_timeout", "client_body_timeout", "send_timeout", "limit_conn ",
                      "proxy_read_timeout", "proxy_next_upstream"):  # fmt: skip
        assert directive in conf, (where, directive)
    read = re.search(r"proxy_read_timeout (\d+)s;", conf)
    assert read and int(read.group(1)) >= deadline("cpu")  # the app's JSON 504 arrives before nginx gives up


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_nginx_accepts_the_proxy_configuration(where: str, tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is installed by .ci/run (Debian package nginx)"
    (tmp_path / "imagegen.conf").write_text(proxy_configs()[where])
    main = (REPO / "deploy/nginx/nginx.conf").read_text()
    (tmp_path / "nginx.conf").write_text(main.replace("include imagegen.conf;", f"include {tmp_path}/imagegen.conf;"))
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
