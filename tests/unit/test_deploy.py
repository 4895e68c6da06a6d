"""The container and deployment files, checked against the code (no Docker engine or cluster here):
env names, ports, probe paths, metric names in alerts, HPA and dashboard, grace periods, key files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

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
SETTINGS = {f"IMAGEGEN_{name.upper()}" for name in Settings.model_fields}


def k8s(kind: str) -> list[dict[str, Any]]:
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return [d for d in docs if d["kind"] == kind]


def deployment() -> dict[str, Any]:
    [d] = [d for d in k8s("Deployment") if d["metadata"]["name"] == "imagegen"]
    return d


def container() -> dict[str, Any]:
    [c] = deployment()["spec"]["template"]["spec"]["containers"]
    return dict(c)


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


def test_every_imagegen_env_name_in_the_deploy_files_is_a_setting() -> None:
    files = [REPO / "Dockerfile", REPO / "docker-compose.yml", *K8S.glob("*.yaml"), REPO / "deploy/README.md"]
    used = {name for f in files for name in re.findall(r"IMAGEGEN_[A-Z0-9_]+", f.read_text())}
    assert used - {"IMAGEGEN_VARIANT"} <= SETTINGS, used - SETTINGS  # IMAGEGEN_VARIANT: compose's build argument
    assert set(dockerfile_env()) & SETTINGS >= {"IMAGEGEN_HOST", "IMAGEGEN_PORT", "IMAGEGEN_METRICS_PORT"}
    [configmap] = [c for c in k8s("ConfigMap") if c["metadata"]["name"] == "imagegen"]
    assert set(configmap["data"]) <= SETTINGS
    for service in ("app-1", "app-2"):
        assert set(compose()["services"][service]["environment"]) <= SETTINGS


def test_ports_agree_everywhere() -> None:
    env = dockerfile_env()
    api, metrics = int(env["IMAGEGEN_PORT"]), int(env["IMAGEGEN_METRICS_PORT"])
    assert api == Settings.model_fields["port"].default
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {api} {metrics}$", dockerfile, flags=re.M)
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": api, "metrics": metrics}
    [configmap] = [c for c in k8s("ConfigMap") if c["metadata"]["name"] == "imagegen"]
    assert int(configmap["data"]["IMAGEGEN_PORT"]) == api and int(configmap["data"]["IMAGEGEN_METRICS_PORT"]) == metrics
    for service in k8s("Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
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


def test_probes_hit_routes_of_the_ops_port(tmp_path: Path) -> None:
    ops = TestClient(create_ops_app(create_app(Settings(models_dir=tmp_path, state_dir=tmp_path)).state.services))

    def served(path: str) -> bool:  # answered by a route (503 = not ready yet), not a 404
        return ops.get(path).status_code in (200, 503)

    c = container()
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert served(probe["path"]) and probe["port"] == "metrics"
    healthcheck = re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", (REPO / "Dockerfile").read_text(), flags=re.M)
    assert healthcheck and json.loads(healthcheck.group(1)) == ["python", "-m", "imagegen", "probe"]
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert served(annotations["prometheus.io/path"])


def test_grace_periods_outlast_the_drain() -> None:
    [configmap] = [c for c in k8s("ConfigMap") if c["metadata"]["name"] == "imagegen"]
    drain = float(configmap["data"]["IMAGEGEN_DRAIN_SECONDS"])
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain + float(pre_stop[1])
    app = compose()["services"]["app-1"]
    assert float(app["stop_grace_period"].removesuffix("s")) > float(app["environment"]["IMAGEGEN_DRAIN_SECONDS"])
    assert re.search(r"^STOPSIGNAL SIGTERM$", (REPO / "Dockerfile").read_text(), flags=re.M)


def test_metric_names_in_alerts_hpa_adapter_and_dashboard_exist() -> None:
    exposed = exposed_sample_names()
    files = [REPO / "deploy/prometheus/alerts.yml", K8S / "hpa.yaml", K8S / "prometheus-adapter-rules.yaml",
             REPO / "deploy/grafana/dashboards/imagegen.json"]  # fmt: skip
    for f in files:
        used = set(re.findall(r"\bimagegen_[a-z0-9_]+", f.read_text()))
        assert used, f
        assert used <= exposed, (f.name, used - exposed)
    [hpa] = k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in exposed


def test_the_container_runs_as_a_non_root_user() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    pod = deployment()["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and str(pod["runAsUser"]) == users[-1].split(":")[0]


def test_the_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    ignored = [p for p in ignored if p and not p.startswith("#")]
    sources = [s for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, flags=re.M) for s in line.split()[:-1]]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert source.rstrip("/") not in ignored, source


def test_example_key_files_load(tmp_path: Path) -> None:
    ring = KeyRing.load(REPO / "deploy/compose/api_keys.toml")
    documented = re.search(r"ig_[\w-]+", (REPO / "deploy/compose/api_keys.toml").read_text())
    assert documented and ring.caller(documented.group(0)) is not None
    [secret] = k8s("Secret")
    (tmp_path / "keys.toml").write_text(secret["stringData"]["api_keys.toml"])
    assert len(KeyRing.load(tmp_path / "keys.toml")) >= 1
    referenced = {item["key"] for v in deployment()["spec"]["template"]["spec"]["volumes"] if "secret" in v
                  for item in v["secret"]["items"]}  # fmt: skip
    referenced |= {e["valueFrom"]["secretKeyRef"]["key"] for e in container().get("env", []) if "valueFrom" in e}
    assert referenced <= set(secret["stringData"])


def test_grafana_dashboard_uses_the_provisioned_datasource() -> None:
    sources = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in sources["datasources"]}
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/imagegen.json").read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert used and used <= uids


@pytest.mark.parametrize("check", [["check", "rules", "deploy/prometheus/alerts.yml"],
                                   ["check", "config", "deploy/prometheus/prometheus.yml"]])  # fmt: skip
def test_promtool_accepts_the_prometheus_files(check: list[str]) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by .ci/run (Debian package prometheus)"
    result = subprocess.run([promtool, *check], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomize_renders_every_manifest() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl renders kustomizations offline"
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out) if d}
    files = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs() if d["kind"] != "Kustomization"}
    # everything but the prometheus-adapter rules, which belong to the adapter's own namespace
    assert rendered == files - {(d["kind"], d["metadata"]["name"]) for d in adapter_rules()}
    assert ("Service", "imagegen-proxy") in rendered and ("Deployment", "imagegen-proxy") in rendered


def k8s_docs() -> list[dict[str, Any]]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def adapter_rules() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / "prometheus-adapter-rules.yaml").read_text()) if d]


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
    [proxy] = [c for c in k8s("ConfigMap") if c["metadata"]["name"] == "imagegen-proxy"]
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
