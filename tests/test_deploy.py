"""deploy/ and the Dockerfile, checked offline: the manifests parse, the
probes and ports agree with the config they ship, the configs they ship
validate, and every metric the Grafana dashboard queries exists in /metrics
of a running sidecar."""

from __future__ import annotations

import ast
import os
import re
import tomllib
from pathlib import Path

import orjson
import yaml

from proxy.cli import check
from proxy.clients import is_loopback
from tests.support.inbound import inbound_config, webhook_policy

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for d in docs(path):
            out[(d["kind"], d["metadata"]["name"] if "metadata" in d else path.stem)] = d
    return out


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def materialise(tmp: Path, config_text: str, policies: dict[str, str]) -> Path:
    (tmp / "policies").mkdir(parents=True, exist_ok=True)
    for name, text in policies.items():
        (tmp / "policies" / name).write_text(text)
    (tmp / "config.toml").write_text(config_text)
    return tmp / "config.toml"


def test_kubernetes_manifests_agree_with_their_config(tmp_path):
    objs = k8s()
    dep = objs[("Deployment", "orders")]
    config_text = objs[("ConfigMap", "sidecar-config")]["data"]["config.toml"]
    policies = objs[("ConfigMap", "sidecar-policies")]["data"]
    config = tomllib.loads(config_text)
    admin_port = port_of(config["admin"]["listen"])
    inbound_port = port_of(config["inbound"]["listen"])
    assert is_loopback(config["outbound"]["listen"].rpartition(":")[0])
    assert "allowed_clients" not in config["outbound"]
    assert config["admin"]["token"] == "env:SIDECAR_ADMIN_TOKEN"

    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == admin_port and ann["prometheus.io/path"] == "/metrics"
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert len(containers) == 2            # a sample service and the sidecar
    sc = containers["sidecar"]
    assert sc["readinessProbe"]["httpGet"] == {"path": "/ready", "port": admin_port}
    assert sc["livenessProbe"]["httpGet"] == {"path": "/health", "port": admin_port}
    ports = {p["name"]: p["containerPort"] for p in sc["ports"]}
    assert ports == {"inbound": inbound_port, "admin": admin_port}
    # the service's own listener is the sidecar's service_url
    app_args = containers["orders"]["args"]
    assert f"http://{app_args[app_args.index('--listen') + 1]}" == config["inbound"]["service_url"]

    svc = objs[("Service", "orders-webhooks")]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["inbound"]

    # every volume mounted exists; config and policies come from the ConfigMaps,
    # secrets from the Secret, and each file: reference points at a mounted key
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in sc["volumeMounts"]}
    assert {m["name"] for m in sc["volumeMounts"]} <= set(volumes)
    assert volumes[mounts["/app/policies"]["name"]]["configMap"]["name"] == "sidecar-policies"
    assert volumes[mounts["/app/config.toml"]["name"]]["configMap"]["name"] == "sidecar-config"
    secret = objs[("Secret", "sidecar-secrets")]
    sec_vol = volumes[mounts["/var/run/secrets/providers"]["name"]]["secret"]
    assert sec_vol["secretName"] == "sidecar-secrets"
    mounted = {"/var/run/secrets/providers/" + i["path"] for i in sec_vol["items"]}
    assert {i["key"] for i in sec_vol["items"]} <= set(secret["stringData"])
    refs = set(re.findall(r'"file:([^"]+)"', "\n".join(policies.values())))
    assert refs and refs <= mounted
    env = {e["name"]: e for e in sc["env"]}
    key = env["SIDECAR_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert key["name"] == "sidecar-secrets" and key["key"] in secret["stringData"]
    data_mount = next(m for m in sc["volumeMounts"] if m["mountPath"] == config["inbound"]["data_dir"])
    assert "emptyDir" in volumes[data_mount["name"]]
    # the config and policies the pod runs validate as a set
    path = materialise(tmp_path, config_text, policies)
    assert check(str(path)) == []
    kust = docs(DEPLOY / "kubernetes" / "kustomization.yaml")[0]
    assert sorted(kust["resources"]) == sorted(p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")
                                               if p.name != "kustomization.yaml")


def test_dockerfile_keeps_outbound_on_loopback_and_exposes_inbound_and_admin():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 8443 9901$", text, re.M)
    assert "COPY deploy/container/config.toml ./config.toml" in text
    assert "SIDECAR_ADMIN_TOKEN" in text
    config = tomllib.loads((DEPLOY / "container" / "config.toml").read_text())
    assert is_loopback(config["outbound"]["listen"].rpartition(":")[0])
    assert {port_of(config["inbound"]["listen"]), port_of(config["admin"]["listen"])} == {8443, 9901}
    assert config["admin"]["token"] == "env:SIDECAR_ADMIN_TOKEN"
    assert "9901/health" in text       # HEALTHCHECK on the admin port


def test_the_image_compiles_the_request_path_with_the_modules_setup_py_names():
    text = (REPO / "Dockerfile").read_text()
    assert "COPY pyproject.toml setup.py README.md ./" in text
    assert re.search(r"SIDECAR_COMPILE=1 \S*pip wheel .*--no-build-isolation", text)
    assert 'python -c "import proxy; assert proxy.compiled()"' in text
    # setup.py is read, not imported: importing it would run setup().
    tree = ast.parse((REPO / "setup.py").read_text())
    COMPILED = next(ast.literal_eval(n.value) for n in tree.body
                    if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "COMPILED")
    assert all((REPO / m).is_file() for m in COMPILED)
    assert "proxy/fastserver/express.py" in COMPILED   # what compiled() looks for


def test_compiled_says_what_python_imports():
    """``sidecar --version`` (tests/proxy/test_cli.py) and the start-up log
    report ``compiled()``; .ci/run runs the suite a second time on the
    extensions with SIDECAR_EXPECT_COMPILED=1, and this holds it to that."""
    import proxy.fastserver.express as express
    from proxy import compiled

    assert compiled() == (not express.__file__.endswith(".py"))
    expected = os.environ.get("SIDECAR_EXPECT_COMPILED")
    if expected is not None:
        assert compiled() == (expected == "1")


def test_container_config_validates_with_the_shipped_policies(tmp_path):
    text = (DEPLOY / "container" / "config.toml").read_text()
    shipped = {p.name: p.read_text() for p in (REPO / "policies").glob("*.toml")}
    path = materialise(tmp_path, text.replace('data_dir = "/app/data"', f'data_dir = "{tmp_path}/data"'), shipped)
    assert check(str(path)) == []


def test_compose_stack_is_wired(tmp_path):
    compose = docs(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert {"sidecar", "redis", "otel-collector", "prometheus", "grafana"} <= set(services)
    config = tomllib.loads((DEPLOY / "compose" / "config.toml").read_text())
    admin_port, inbound_port = port_of(config["admin"]["listen"]), port_of(config["inbound"]["listen"])
    assert is_loopback(config["outbound"]["listen"].rpartition(":")[0])
    assert f"{admin_port}:{admin_port}" in services["sidecar"]["ports"]
    assert f"{inbound_port}:{inbound_port}" in services["sidecar"]["ports"]
    # the app shares the sidecar's network namespace: loopback reaches the outbound listener
    assert services["app"]["network_mode"] == "service:sidecar"
    assert config["state"]["url"].startswith("redis://redis:")
    collector = docs(DEPLOY / "otel-collector.yaml")[0]
    otlp_http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert config["tracing"]["endpoint"] == f"http://otel-collector:{port_of(otlp_http)}/v1/traces"
    assert collector["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]
    prom = docs(DEPLOY / "prometheus.yml")[0]
    [job] = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == [f"sidecar:{admin_port}"]
    mounts = services["grafana"]["volumes"]
    assert any(m.startswith("./grafana/sidecar.json:") for m in mounts)
    ds = docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")[0]["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["uid"] == "prometheus"
    # the compose config and its policies validate (state on Redis, tracing on)
    policies = {p.name: p.read_text() for p in (DEPLOY / "compose" / "policies").glob("*.toml")}
    path = materialise(tmp_path, (DEPLOY / "compose" / "config.toml").read_text()
                       .replace('data_dir = "/app/data"', f'data_dir = "{tmp_path}/data"'), policies)
    assert check(str(path)) == []


def grafana_metrics() -> set[str]:
    dash = orjson.loads((DEPLOY / "grafana" / "sidecar.json").read_bytes())
    names: set[str] = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "prometheus"
        for target in panel["targets"]:
            names |= set(re.findall(r"\b(sidecar_[a-z0-9_]+)", target["expr"]))
    return names


async def test_every_grafana_metric_exists_in_a_running_sidecars_metrics(sidecar_factory, upstream, client,
                                                                         monkeypatch):
    monkeypatch.setenv("DEPLOY_TEST_TOKEN", "t")
    monkeypatch.setenv("DEPLOY_WH_SECRET", "whsec_x")
    sc = await sidecar_factory({
        "p": f'route = "/p"\nupstream = "{upstream.url}"\n[auth]\ntype = "bearer"\nsecret = "env:DEPLOY_TEST_TOKEN"\n'
             '[rate_limit]\nkey = "tenant"\nlimits = [{ requests = 100, per = "1s" }]\n[cache]\n'
             '[circuit_breaker]\n[retry]\n',
        "hooks": webhook_policy("/webhooks/stripe", "stripe", ["env:DEPLOY_WH_SECRET"]),
    }, inbound_config(upstream.url))
    for _ in range(3):
        async with client.get(f"{sc.url}/p/x") as r:
            assert r.status == 200
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    wanted = grafana_metrics()
    assert len(wanted) >= 10
    missing = []
    for name in sorted(wanted):
        if name in samples:
            continue
        # a labelled family with no child yet is declared (HELP/TYPE) all the
        # same; prometheus-client's text format names a counter's TYPE line
        # with its _total suffix, a histogram's without _bucket
        if name.endswith("_total"):
            declared = types.get(name) == "counter"
        elif name.endswith("_bucket"):
            declared = types.get(name[: -len("_bucket")]) == "histogram"
        else:
            declared = types.get(name) == "gauge"
        if not declared:
            missing.append(name)
    assert not missing, f"queried by deploy/grafana/sidecar.json but not in /metrics: {missing}"
