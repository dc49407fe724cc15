"""Deployment files: docker compose, nginx, the Dockerfile, Kubernetes and Grafana.

Runs without a Docker engine and without network. It needs PyYAML,
kubernetes-validate (JSON schemas of the Kubernetes API ship inside the
package) and dockerfile-parse, plus Debian's `nginx` for the proxy tests.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
GRAFANA = DEPLOY / "grafana"
NGINX_CONF = DEPLOY / "nginx.conf"

# API.md, "Operations": the endpoints orchestrators probe.
LIVE = "/api/health/live"
READY = "/api/health/ready"
APP_PORT = 4343
NGINX_INSTALL = "apt-get install -y --no-install-recommends nginx"

# What the app exports (prometheus_client: counters end in _total).
COUNTERS = {
    "chat_http_requests_total", "chat_requests_total", "chat_cache_hits_total",
    "chat_cache_misses_total", "chat_rate_limited_total", "chat_upstream_errors_total",
    "chat_upstream_retries_total", "chat_load_shed_total",
}
HISTOGRAMS = {"chat_request_duration_seconds", "chat_upstream_duration_seconds"}
GAUGES = {
    "chat_cache_entries", "chat_inflight", "chat_threadpool_busy", "chat_threadpool_queued",
    "chat_eventloop_pending", "chat_db_pool_size", "chat_db_pool_waiting",
}
SERIES = COUNTERS | GAUGES | {f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


# ----------------------------------------------------------------- compose ---


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def test_app_waits_for_healthy_postgres_and_redis(services: dict[str, Any]) -> None:
    depends = services["app"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"


def test_app_uses_the_compose_database_and_redis(services: dict[str, Any]) -> None:
    env = environment(services["app"])
    database = urlsplit(env["DATABASE_URL"])
    assert database.scheme in {"postgresql", "postgres"}
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert database.path == "/" + environment(services["postgres"])["POSTGRES_DB"]
    redis = urlsplit(env["REDIS_URL"])
    assert (redis.scheme, redis.hostname) == ("redis", "redis")
    # nginx in front is exactly one hop.
    assert env["TRUSTED_PROXY_HOPS"] == "1"


def test_app_settings_file_is_optional(services: dict[str, Any]) -> None:
    assert {"path": ".docker.env", "required": False} in services["app"]["env_file"]
    assert (ROOT / ".docker.env.example").is_file()


def test_app_replicas_sit_behind_nginx(services: dict[str, Any]) -> None:
    app = services["app"]
    assert app["build"] in (".", {"context": "."})
    assert app["deploy"]["replicas"] == 2
    # A host port would clash between replicas and bypass the proxy.
    assert "ports" not in app


def test_nginx_publishes_port_4343_with_the_project_config(services: dict[str, Any]) -> None:
    nginx = services["nginx"]
    assert nginx["image"].startswith("nginx:")
    assert "4343:80" in [str(port) for port in nginx["ports"]]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert nginx["depends_on"]["app"]["condition"] == "service_healthy"


@pytest.mark.parametrize(
    ("service", "needle"),
    [
        ("app", f"http://127.0.0.1:{APP_PORT}{LIVE}"),
        ("postgres", "pg_isready"),
        ("redis", "redis-cli ping"),
        ("nginx", LIVE),
    ],
)
def test_always_on_services_have_healthchecks(services: dict[str, Any], service: str, needle: str) -> None:
    assert needle in healthcheck_command(services[service])


def test_images_are_pinned_to_a_version(services: dict[str, Any]) -> None:
    assert services["postgres"]["image"] == "postgres:17"
    assert services["redis"]["image"] == "redis:7-alpine"
    for name, service in services.items():
        image = service.get("image", "")
        assert not image.endswith(":latest") or "build" in service, f"{name} floats on :latest"


def test_monitoring_services_only_start_with_their_profile(services: dict[str, Any]) -> None:
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    for name in ("app", "postgres", "redis", "nginx"):
        assert "profiles" not in services[name], f"{name} must start without a profile"


def test_compose_references_resolve(compose: dict[str, Any], services: dict[str, Any]) -> None:
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named_volumes, f"{name} uses undeclared volume {source}"
    assert "postgres-data" in named_volumes


def compose_cli_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_compose_cli_accepts_the_file(compose: dict[str, Any]) -> None:
    # The top level holds only what the Compose specification allows.
    assert set(compose) - {"name", "services", "volumes", "networks"} <= {
        key for key in compose if key.startswith("x-")
    }
    # `docker compose config` is client-side (no engine needed); the plugin
    # is optional on CI machines, so use it when it is there.
    if compose_cli_available():
        result = subprocess.run(
            ["docker", "compose", "-f", "docker-compose.yml", "--profile", "monitoring", "config", "-q"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------- nginx ---


def strip_comments(text: str) -> str:
    return re.sub(r"#[^\n]*", "", text)


def block_body(text: str, header: str) -> str:
    """Return the text inside the braces that follow `header`."""
    match = re.search(re.escape(header) + r"\s*\{", text)
    assert match, f"no block {header!r} in nginx.conf"
    depth, start = 1, match.end()
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    raise AssertionError(f"unbalanced braces after {header!r}")


def seconds(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0, None: 1, "s": 1, "m": 60, "h": 3600}[unit]


@pytest.fixture(scope="module")
def nginx_conf() -> str:
    return strip_comments(NGINX_CONF.read_text(encoding="utf-8"))


@pytest.mark.parametrize("location", ["/api/chat", "/v1/"])
def test_nginx_streams_chat_endpoints_unbuffered(nginx_conf: str, location: str) -> None:
    body = block_body(nginx_conf, f"location {location}")
    assert re.search(r"\bproxy_buffering\s+off;", body)
    read_timeout = re.search(r"\bproxy_read_timeout\s+(\w+);", body)
    assert read_timeout and seconds(read_timeout.group(1)) >= 120
    assert "proxy_pass" in body


def test_nginx_passes_the_client_address(nginx_conf: str) -> None:
    server = block_body(nginx_conf, "server")
    assert re.search(r"proxy_set_header\s+X-Forwarded-For\s+\$proxy_add_x_forwarded_for;", server)
    assert "http://app:4343" in server


def nginx_binary() -> str:
    binary = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(path).exists()), None
    )
    assert binary, f"nginx is needed for these tests: {NGINX_INSTALL}"
    return binary


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    result = subprocess.run(
        [nginx_binary(), "-t", "-q", "-p", str(tmp_path), "-c", str(NGINX_CONF),
         "-e", str(tmp_path / "error.log"), "-g", f"pid {tmp_path / 'nginx.pid'};"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeApp(BaseHTTPRequestHandler):
    """Answer like the chat endpoints: one event, a pause until released, the last event."""

    release: threading.Event
    seen: list[dict[str, str]]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(b'data: {"delta": "Hel"}\n\n')
        self.wfile.flush()
        self.release.wait(timeout=10)
        self.wfile.write(b'data: {"done": true}\n\n')
        self.wfile.flush()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def proxied_app(tmp_path: Path) -> Iterator[tuple[int, type[FakeApp]]]:
    """Run the real nginx.conf on loopback in front of a fake app; yield nginx's port."""
    handler = type("Handler", (FakeApp,), {"release": threading.Event(), "seen": []})
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()

    conf = NGINX_CONF.read_text(encoding="utf-8")
    edits = {
        "listen 80;": f"listen 127.0.0.1:{port};",
        "set $chat_upstream http://app:4343;": f"set $chat_upstream http://127.0.0.1:{upstream.server_port};",
        "access_log /dev/stdout chat;": f"access_log {tmp_path}/access.log chat;",
        "http {": "http {\n" + "".join(
            f"    {kind}_temp_path {tmp_path}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        ),
    }
    for old, new in edits.items():
        assert conf.count(old) == 1, f"nginx.conf changed: {old!r} not found once"
        conf = conf.replace(old, new)
    (tmp_path / "nginx.conf").write_text(conf, encoding="utf-8")

    log = (tmp_path / "nginx.out").open("w")
    nginx = subprocess.Popen(
        [nginx_binary(), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
         "-e", str(tmp_path / "error.log"),
         "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert nginx.poll() is None, (tmp_path / "nginx.out").read_text() + (
                (tmp_path / "error.log").read_text() if (tmp_path / "error.log").exists() else "")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.05)
        yield port, handler
    finally:
        handler.release.set()
        nginx.terminate()
        nginx.wait(timeout=10)
        log.close()
        upstream.shutdown()
        upstream.server_close()


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_nginx_delivers_events_while_the_stream_is_open(
    proxied_app: tuple[int, type[FakeApp]], path: str
) -> None:
    port, app = proxied_app
    client = HTTPConnection("127.0.0.1", port, timeout=5)
    client.request(
        "POST", path, body=b'{"message": "hi", "stream": true}',
        headers={"Content-Type": "application/json", "X-Forwarded-For": "203.0.113.7",
                 "X-Request-ID": "req-123"},
    )
    response = client.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    # The upstream is still holding the stream open: the first event must
    # already be here (a buffering proxy would hold it back and time out).
    first = b""
    while not first.startswith(b"data:"):
        first = response.readline()
    assert first.strip() == b'data: {"delta": "Hel"}'
    app.release.set()
    assert b'data: {"done": true}' in response.read()
    client.close()

    seen = app.seen[-1]
    assert seen["path"] == path
    # The client's claimed chain, then the address nginx saw: the app trusts
    # only that last hop (TRUSTED_PROXY_HOPS=1).
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert seen["x-request-id"] == "req-123"


# -------------------------------------------------------------- Dockerfile ---


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def final_stage(parser: DockerfileParser) -> list[dict[str, Any]]:
    froms = [i for i, item in enumerate(parser.structure) if item["instruction"] == "FROM"]
    return parser.structure[froms[-1]:]


def instructions(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [item["value"] for item in stage if item["instruction"] == name]


def test_images_build_on_python_312_slim(dockerfile: DockerfileParser) -> None:
    # Not 3.13+: gevent delivers run_in_executor results late there (#2213).
    assert dockerfile.is_multistage
    images = dockerfile.parent_images
    assert images
    assert all(image == "python:3.12-slim" or image.startswith("python:3.12-slim@") for image in images)


def test_builder_makes_the_venv_and_final_stage_copies_it(dockerfile: DockerfileParser) -> None:
    text = " ".join(item["value"] for item in dockerfile.structure if item["instruction"] == "RUN")
    assert "python -m venv /opt/venv" in text
    assert re.search(r"pip install\b.*-r \S*requirements\.txt", text)
    copies = instructions(final_stage(dockerfile), "COPY")
    assert any(re.match(r"--from=\w+ /opt/venv /opt/venv$", value) for value in copies)


def test_server_runs_as_non_root_user_10001(dockerfile: DockerfileParser) -> None:
    stage = final_stage(dockerfile)
    users = instructions(stage, "USER")
    assert users, "final stage sets no USER"
    assert users[-1].split(":")[0] in {"10001", "app"}
    runs = " ".join(instructions(stage, "RUN"))
    assert re.search(r"useradd\b[^&]*--uid 10001\b[^&]*\bapp\b", runs)


def test_settings_port_and_workdir(dockerfile: DockerfileParser) -> None:
    stage = final_stage(dockerfile)
    assert dockerfile.envs["PORT"] == str(APP_PORT)
    assert dockerfile.envs["DATA_DIR"] == "/app/data"
    assert dockerfile.envs["PYTHONUNBUFFERED"] == "1"
    assert instructions(stage, "WORKDIR")[-1] == "/app"
    assert str(APP_PORT) in instructions(stage, "EXPOSE")[-1].split()


def test_healthcheck_asks_the_live_endpoint_with_urllib(dockerfile: DockerfileParser) -> None:
    checks = instructions(final_stage(dockerfile), "HEALTHCHECK")
    assert len(checks) == 1
    assert LIVE in checks[0] and "http://127.0.0.1:" in checks[0]
    assert "urllib.request" in checks[0] and "curl" not in checks[0]


def test_cmd_execs_gunicorn_through_the_entrypoint(dockerfile: DockerfileParser) -> None:
    cmd = json.loads(instructions(final_stage(dockerfile), "CMD")[-1])
    assert cmd[0].endswith("docker/entrypoint.sh")
    script = (ROOT / "docker" / "entrypoint.sh").read_text(encoding="utf-8")
    assert script.startswith("#!/bin/sh\n")
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.startswith("#")]
    # exec: gunicorn replaces the shell and gets SIGTERM itself.
    assert re.fullmatch(r'exec gunicorn -c gunicorn\.conf\.py (?:"\$@" )?app:app', commands[-1])
    syntax = subprocess.run(
        ["sh", "-n", str(ROOT / "docker" / "entrypoint.sh")], capture_output=True, text=True
    )
    assert syntax.returncode == 0, syntax.stderr


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Tell whether .dockerignore keeps `path` (top-level name) out of the context; last match wins."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if re.fullmatch(pattern.replace(".", r"\.").replace("*", "[^/]*"), path):
            excluded = not negate
    return excluded


def test_copied_files_exist_and_reach_the_build_context(dockerfile: DockerfileParser) -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for item in dockerfile.structure:
        if item["instruction"] == "COPY" and not item["value"].startswith("--from"):
            sources += [part for part in item["value"].split()[:-1] if not part.startswith("--")]
    assert {"requirements.txt", "app.py", "gunicorn.conf.py", "chat/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
        assert not dockerignore_excludes(source.split("/")[0], patterns), f".dockerignore drops {source}"
    for secret in (".env", ".docker.env", ".git", ".venv", "data", "tests", "bench"):
        assert dockerignore_excludes(secret, patterns), f"{secret} would reach the build context"


# -------------------------------------------------------------- Kubernetes ---

MANIFESTS = sorted(path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name in MANIFESTS:
        for doc in load_yaml_docs(K8S / name):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            assert "namespace" not in doc["metadata"], f"{key}: manifests stay namespace-free"
            found[key] = doc
    return found


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == MANIFESTS
    assert {
        "configmap.yaml", "secret.yaml", "deployment.yaml", "service.yaml", "hpa.yaml",
        "postgres.yaml", "redis.yaml", "pdb.yaml",
    } <= set(MANIFESTS)
    images = {image["name"] for image in kustomization.get("images", [])}
    assert "chat-backend" in images


# The oldest release still common in managed clusters, and the newest the
# package knows.
@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
@pytest.mark.parametrize("manifest", MANIFESTS)
def test_manifests_match_the_kubernetes_schema(manifest: str, version: str) -> None:
    docs = load_yaml_docs(K8S / manifest)
    assert docs
    for doc in docs:
        # strict: unknown fields (typos) fail too.
        kubernetes_validate.validate(doc, version, strict=True)


def pod_spec(resources: dict[tuple[str, str], dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return resources[(kind, name)]["spec"]["template"]["spec"]


def app_container(resources: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_spec(resources, "Deployment", "chat")["containers"]
    return container


def test_probes_ask_the_health_endpoints(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = app_container(resources)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == APP_PORT
    expected = {"livenessProbe": LIVE, "readinessProbe": READY, "startupProbe": LIVE}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == APP_PORT, probe


def test_app_pods_run_safely_and_drain(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = resources[("Deployment", "chat")]
    spec = pod_spec(resources, "Deployment", "chat")
    container = app_container(resources)
    assert deployment["spec"]["replicas"] == 2
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["terminationGracePeriodSeconds"] == 40
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and 0 < int(sleep[1]) < 40
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind


def test_app_pods_find_their_settings_and_services(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = app_container(resources)
    sources = container["envFrom"]
    assert ("ConfigMap", "chat-config") in resources and {"configMapRef": {"name": "chat-config"}} in sources
    assert ("Secret", "chat-secrets") in resources and {"secretRef": {"name": "chat-secrets"}} in sources
    env = {item["name"]: item for item in container["env"]}
    url = env["DATABASE_URL"]["value"]
    database = urlsplit(url)
    assert ("Service", database.hostname) in resources and database.port == 5432
    # Kubernetes expands $(NAME) only from `env` entries listed before it.
    assert "$(POSTGRES_PASSWORD)" in url
    names = list(env)
    assert names.index("POSTGRES_PASSWORD") < names.index("DATABASE_URL")
    password = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password["name"] == "chat-secrets"
    assert password["key"] in resources[("Secret", "chat-secrets")]["stringData"]
    redis = urlsplit(resources[("ConfigMap", "chat-config")]["data"]["REDIS_URL"])
    assert ("Service", redis.hostname) in resources and (redis.port or 6379) == 6379


def test_selectors_and_targets_match(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod_labels = [
        doc["spec"]["template"]["metadata"]["labels"]
        for (kind, _), doc in resources.items() if kind in {"Deployment", "StatefulSet"}
    ]

    def selects_some_pod(selector: dict[str, str]) -> bool:
        return any(selector.items() <= labels.items() for labels in pod_labels)

    for (kind, name), doc in resources.items():
        if kind == "Service":
            assert selects_some_pod(doc["spec"]["selector"]), f"Service {name} selects no pods"
        if kind in {"Deployment", "StatefulSet"}:
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    assert selects_some_pod(resources[("PodDisruptionBudget", "chat")]["spec"]["selector"]["matchLabels"])
    target = resources[("HorizontalPodAutoscaler", "chat")]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in resources
    statefulset = resources[("StatefulSet", "postgres")]["spec"]
    assert ("Service", statefulset["serviceName"]) in resources
    assert statefulset["volumeClaimTemplates"]
    service_ports = resources[("Service", "chat")]["spec"]["ports"]
    assert any(port["targetPort"] in ("http", APP_PORT) for port in service_ports)


def test_secret_holds_only_marked_placeholders(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    secret = resources[("Secret", "chat-secrets")]
    assert "data" not in secret
    for key, value in secret["stringData"].items():
        assert value == "" or "CHANGE-ME" in value, f"{key} looks like a real secret"


# ---------------------------------------------------- settings names used ---


def known_setting_names() -> set[str]:
    from chat.settings import Settings

    names = {name.upper() for name in Settings.model_fields}
    gunicorn_conf = (ROOT / "gunicorn.conf.py").read_text(encoding="utf-8")
    names |= set(re.findall(r"[\"']([A-Z][A-Z0-9_]+)[\"']", gunicorn_conf))
    return names


def test_example_and_configmap_name_real_settings(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    example = (ROOT / ".docker.env.example").read_text(encoding="utf-8")
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    assert {"LLM_PROVIDER", "LLM_MODEL", "LLM_BASE_URL", "LLM_API_KEY", "API_KEYS", "ADMIN_KEY",
            "WEB_CONCURRENCY", "RATE_LIMIT_CHAT"} <= listed
    configured = set(resources[("ConfigMap", "chat-config")]["data"])
    configured |= set(resources[("Secret", "chat-secrets")]["stringData"]) - {"POSTGRES_PASSWORD"}
    unknown = (listed | configured) - known_setting_names()
    assert not unknown, f"not settings of the app: {sorted(unknown)}"


# ----------------------------------------------------------------- Grafana ---

PROMQL_WORDS = {
    # functions and aggregations used in dashboards
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "delta", "deriv",
    "histogram_quantile", "clamp_min", "clamp_max", "topk", "bottomk", "abs", "round",
    "vector", "scalar", "time", "sort", "sort_desc", "avg_over_time", "max_over_time",
    "min_over_time", "sum_over_time", "label_replace",
    # keywords
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset",
}


def metric_names(expr: str) -> set[str]:
    """Return the series names a PromQL expression reads (label and grouping names left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", " ", text)
    return set(re.findall(r"[A-Za-z_:][\w:]*", text)) - PROMQL_WORDS


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboard.json").read_text(encoding="utf-8"))


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])
    return panels


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in all_panels(dashboard) for target in panel.get("targets", [])]


def test_metric_name_parser_sees_through_promql() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, provider) (rate(chat_upstream_duration_seconds_bucket'
            '{instance=~"$instance",status=~"5.."}[$__rate_interval]))) / clamp_min(up, 1e-9)')
    assert metric_names(expr) == {"chat_upstream_duration_seconds_bucket", "up"}


def test_dashboard_reads_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    exprs = expressions(dashboard)
    assert exprs
    for expr in exprs:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= SERIES, f"unknown metric(s) {sorted(names - SERIES)} in {expr!r}"
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        for metric in re.findall(r"label_values\(\s*([\w:]+)\s*,", query):
            assert metric in SERIES, variable["name"]


def test_dashboard_shows_what_operators_need(dashboard: dict[str, Any]) -> None:
    text = "\n".join(expressions(dashboard))
    for phi in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({phi}, sum by (le) (rate(chat_request_duration_seconds_bucket" in text
    assert re.search(r'chat_http_requests_total\{[^}]*status=~"5\.\."', text)  # 5xx share
    assert "by (processing_method)" in text
    used = set().union(*(metric_names(expr) for expr in expressions(dashboard)))
    assert COUNTERS | GAUGES <= used
    assert {f"{h}_bucket" for h in HISTOGRAMS} <= used


def test_dashboard_uses_the_provisioned_datasource(
    dashboard: dict[str, Any], services: dict[str, Any]
) -> None:
    (source,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    url = urlsplit(source["url"])
    assert url.hostname in services and url.port == 9090
    for panel in all_panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
    assert dashboard["uid"] and dashboard["title"]


def test_grafana_loads_the_dashboard_where_compose_mounts_it(services: dict[str, Any]) -> None:
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"])
    target = mounts["./deploy/grafana/dashboard.json"]
    assert str(Path(target).parent) == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["./deploy/grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"


def test_prometheus_scrapes_every_app_replica(services: dict[str, Any]) -> None:
    config = load_yaml(GRAFANA / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "chat"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [f"{name}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for name in sd["names"]]
    targets += [t for static in job.get("static_configs", []) for t in static["targets"]]
    assert f"app:{APP_PORT}" in targets
    mounts = dict(volume.split(":")[:2] for volume in services["prometheus"]["volumes"])
    assert mounts["./deploy/grafana/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
