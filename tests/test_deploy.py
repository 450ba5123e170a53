"""The deployment files (deploy/, docker-compose*.yml, .env.example, docs/METRICS.md) against
the code and the tools that read them. Nothing here starts Docker; everything runs in seconds.

- promtool (Debian package `prometheus`) checks the Prometheus configs and rules, parses every
  dashboard and alert expression, and runs unit tests of the alerts on synthetic series;
  these tests skip when promtool is not installed.
- docker-compose.yml validates against the Compose Specification schema
  (deploy/schema/compose-spec.json) and runs the commands, with the variables, that
  `service_commands()` gives `llamafleet up`.
- Every llamafleet_* metric the dashboards and alerts read is exported by the code, and
  docs/METRICS.md is what scripts/metrics_catalog.py generates.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from promql import (
    ALERTS_FILE,
    alert_expressions,
    alert_names,
    as_rules_file,
    comparisons_as_bool,
    dashboard_expressions,
    referenced_metrics,
)

from llamafleet import defaults
from llamafleet.stack import StackConfig, service_commands
from llamafleet.v1 import scheduler_pb2, scheduler_pb2_grpc, storage_pb2, storage_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml", ROOT / "docker-compose.offline.yml"]
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_SCHEMA = DEPLOY / "schema" / "compose-spec.json"
SERVICES = ("storage", "scheduler", "postproc", "gateway")

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian: apt-get install -y --no-install-recommends prometheus)",
)


# LLAMAFLEET_* variables compose sets that service_commands() does not, and why.
COMPOSE_ONLY_ENV = {
    # The metrics endpoint binds 127.0.0.1 by default: Prometheus in another container needs 0.0.0.0.
    **{f"LLAMAFLEET_{s.upper()}_METRICS_HOST": "0.0.0.0" for s in SERVICES},
    # Log level from .env.
    **{f"LLAMAFLEET_{s.upper()}_LOG_LEVEL": None for s in SERVICES},
    # Auth on in compose; `llamafleet up` runs the local demo without keys.
    "LLAMAFLEET_GATEWAY_API_KEYS_FILE": "/run/secrets/gateway_api_keys",
}


def run(argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# --- compose files: loading and interpolation like `docker compose config` --------------------

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_VAR_EXPR = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def variables(text: str) -> dict[str, str | None]:
    """Each ${VAR} a compose file reads -> its default (None when it has none)."""
    found: dict[str, str | None] = {}
    for match in _VAR.finditer(text):
        expr = match.group("braced") or match.group("named")
        if expr:
            parts = _VAR_EXPR.fullmatch(expr)
            assert parts, f"cannot parse ${{{expr}}}"
            found[parts["name"]] = parts["arg"] if parts["op"] in (":-", "-") else None
    return found


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution ($$ escapes, ${VAR}, ${VAR:-default}, ${VAR-default})."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        parts = _VAR_EXPR.fullmatch(match.group("braced") or match.group("named"))
        assert parts, match.group(0)
        current = env.get(parts["name"])
        op, arg = parts["op"], parts["arg"]
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?") and not current:
            raise AssertionError(f"${parts['name']} is required: {arg}")
        return current or ""

    return _VAR.sub(substitute, value)


def load_compose(path: Path = COMPOSE_FILES[0]) -> dict[str, Any]:
    """The compose file as Compose sees it with .env.example as .env (YAML merge keys resolved)."""
    return interpolate(yaml.safe_load(path.read_text()), read_env_file(ENV_EXAMPLE))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


# --- Prometheus: configs, rules, alert behaviour ----------------------------------------------


@needs_promtool
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.local.yml"])
def test_promtool_check_config(config: str) -> None:
    # Also checks the rule files the config names (alerts.yml).
    result = run([PROMTOOL, "check", "config", str(PROMETHEUS_DIR / config)])  # type: ignore[list-item]
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    result = run([PROMTOOL, "check", "rules", str(ALERTS_FILE)])  # type: ignore[list-item]
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_dashboard_and_alert_expression_parses(tmp_path: Path) -> None:
    # promtool check rules parses each rule's expr: one recording rule per expression.
    # The alerts as written, and as the live tests query them (comparisons made bool).
    expressions = [*dashboard_expressions(), *alert_expressions()]
    expressions += [(where, comparisons_as_bool(expr)) for where, expr in alert_expressions()]
    assert len(expressions) > 50, "the extraction found too few expressions"
    rules = tmp_path / "expressions.yml"
    rules.write_text(yaml.safe_dump(as_rules_file(expressions)))
    result = run([PROMTOOL, "check", "rules", str(rules)])  # type: ignore[list-item]
    assert result.returncode == 0, result.stdout + result.stderr


def test_comparisons_as_bool_changes_operators_not_matchers() -> None:
    assert comparisons_as_bool('up{job!="x"} == 0') == 'up{job!="x"} == bool 0'
    assert (
        comparisons_as_bool('a{code=~"A|B"} > 0.05 and on (job) b >= 10')
        == 'a{code=~"A|B"} > bool 0.05 and on (job) b >= bool 10'
    )
    assert comparisons_as_bool('x < bool 2 or y{l="<"} <= 1') == 'x < bool 2 or y{l="<"} <= bool 1'


# Each alert against synthetic series: (name, input series, eval time, alert, expected labels;
# [] means "must not fire"). The rules are copied without annotations (promtool would otherwise
# compare their rendered text too; `check rules` validates the templates).
ALERT_CASES: list[tuple[str, list[tuple[str, str]], str, str, list[dict[str, str]]]] = [
    (
        "service down",
        [('up{job="storage", instance="storage:9103"}', "0x10")],
        "5m",
        "LlamafleetServiceDown",
        [{"job": "storage", "instance": "storage:9103", "severity": "critical"}],
    ),
    (
        "every worker down",
        [('llamafleet_scheduler_worker_up{worker="1"}', "0x10")],
        "5m",
        "LlamafleetNoHealthyWorker",
        [{"severity": "critical"}],
    ),
    (
        "scheduler gone: no worker series",
        [('up{job="gateway"}', "1x10")],
        "5m",
        "LlamafleetNoHealthyWorker",
        [{"severity": "critical"}],
    ),
    (
        "one worker ready",
        [
            ('llamafleet_scheduler_worker_up{worker="1"}', "1x10"),
            ('llamafleet_scheduler_worker_up{worker="2"}', "0x10"),
        ],
        "5m",
        "LlamafleetNoHealthyWorker",
        [],
    ),
    (
        "one worker down long",
        [
            ('llamafleet_scheduler_worker_up{worker="1"}', "1x10"),
            ('llamafleet_scheduler_worker_up{worker="2"}', "0x10"),
        ],
        "8m",
        "LlamafleetWorkersDegraded",
        [{"severity": "warning"}],
    ),
    (
        "llama-server crash loop",
        [('llamafleet_scheduler_worker_llama_server_restarts_total{worker="2"}', "0+1x10")],
        "5m",
        "LlamafleetLlamaServerRestarting",
        [{"worker": "2", "severity": "warning"}],
    ),
    (
        "a worker process lost",
        [("llamafleet_scheduler_worker_losses_total", "0 0 1 1 1")],
        "3m",
        "LlamafleetWorkerLost",
        [{"severity": "warning"}],
    ),
    (
        "a worker's replacements keep dying",
        [('llamafleet_scheduler_worker_respawns_total{worker="3"}', "0+1x10")],
        "5m",
        "LlamafleetWorkerRespawnLoop",
        [{"worker": "3", "severity": "critical"}],
    ),
    (
        "a third of calls fail",
        [
            ('llamafleet_gateway_grpc_requests_total{job="gateway", method="Generate", code="OK"}', "0+60x20"),
            ('llamafleet_gateway_grpc_requests_total{job="gateway", method="Generate", code="INTERNAL"}', "0+30x20"),
        ],
        "15m",
        "LlamafleetGrpcErrorRatioHigh",
        [{"job": "gateway", "severity": "critical"}],
    ),
    (
        "client errors do not count",
        [
            ('llamafleet_storage_grpc_requests_total{job="storage", method="Resolve", code="OK"}', "0+60x20"),
            ('llamafleet_storage_grpc_requests_total{job="storage", method="Resolve", code="NOT_FOUND"}', "0+60x20"),
        ],
        "15m",
        "LlamafleetGrpcErrorRatioHigh",
        [],
    ),
    (
        "one failed call on an idle stack",
        [
            ('llamafleet_gateway_grpc_requests_total{job="gateway", method="Generate", code="INTERNAL"}', "0 1x20"),
        ],
        "15m",
        "LlamafleetGrpcErrorRatioHigh",
        [],
    ),
    (
        "slow first tokens",
        [
            ('llamafleet_gateway_time_to_first_token_seconds_bucket{le="0.5"}', "0x30"),
            ('llamafleet_gateway_time_to_first_token_seconds_bucket{le="5"}', "0+10x30"),
            ('llamafleet_gateway_time_to_first_token_seconds_bucket{le="+Inf"}', "0+10x30"),
        ],
        "20m",
        "LlamafleetGatewayTtftP95High",
        [{"severity": "warning"}],
    ),
    (
        "fast first tokens",
        [
            ('llamafleet_gateway_time_to_first_token_seconds_bucket{le="0.5"}', "0+10x30"),
            ('llamafleet_gateway_time_to_first_token_seconds_bucket{le="+Inf"}', "0+10x30"),
        ],
        "20m",
        "LlamafleetGatewayTtftP95High",
        [],
    ),
    (
        "queue full",
        [('llamafleet_scheduler_rejected_requests_total{reason="queue_full"}', "0+10x20")],
        "5m",
        "LlamafleetSchedulerQueueFull",
        [{"severity": "critical"}],
    ),
    (
        "queue longer than all slots",
        [
            ("llamafleet_scheduler_queue_depth", "8x20"),
            ('llamafleet_scheduler_worker_slots{worker="1", state="total"}', "2x20"),
            ('llamafleet_scheduler_worker_slots{worker="1", state="busy"}', "2x20"),
            ('llamafleet_scheduler_worker_slots{worker="2", state="total"}', "2x20"),
        ],
        "10m",
        "LlamafleetSchedulerQueueSaturated",
        [{"severity": "warning"}],
    ),
    (
        "empty queue, no workers",
        [("llamafleet_scheduler_queue_depth", "0x20")],
        "10m",
        "LlamafleetSchedulerQueueSaturated",
        [],
    ),
    (
        "corrupt blob",
        [('llamafleet_storage_verification_failures_total{job="storage"}', "0 0 0 1 1 1 1")],
        "5m",
        "LlamafleetStorageVerificationFailures",
        [{"job": "storage", "severity": "critical"}],
    ),
]


@needs_promtool
def test_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    rules = yaml.safe_load(ALERTS_FILE.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = [
        {
            "name": name,
            "interval": "1m",
            "input_series": [{"series": series, "values": values} for series, values in inputs],
            "alert_rule_test": [
                {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": labels} for labels in expected]}
            ],
        }
        for name, inputs, at, alert, expected in ALERT_CASES
    ]
    (tmp_path / "alerts_test.yml").write_text(
        yaml.safe_dump({"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests})
    )
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"],  # type: ignore[list-item]
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert has a case that makes it fire.
    fired = {alert for _n, _i, _at, alert, expected in ALERT_CASES if expected}
    assert fired == set(alert_names())


def _jobs(path: Path) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in yaml.safe_load(path.read_text())["scrape_configs"]}


def test_local_prometheus_config_is_the_compose_one_on_localhost() -> None:
    compose_cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    local_cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.local.yml").read_text())
    # The same rules and intervals: one source of truth for what alerts.
    assert local_cfg["rule_files"] == compose_cfg["rule_files"] == ["alerts.yml"]
    assert local_cfg["global"] == compose_cfg["global"]
    compose_jobs, local_jobs = _jobs(PROMETHEUS_DIR / "prometheus.yml"), _jobs(PROMETHEUS_DIR / "prometheus.local.yml")
    assert set(SERVICES) <= set(local_jobs) <= set(compose_jobs)
    for name, job in local_jobs.items():
        on_localhost = json.loads(re.sub(r'"[\w.-]+:(\d+)"', r'"127.0.0.1:\1"', json.dumps(compose_jobs[name])))
        assert job == on_localhost, f"job {name} differs between prometheus.yml and prometheus.local.yml"
    # The local targets are where `llamafleet up` serves metrics.
    urls = StackConfig().metrics_urls()
    for service in SERVICES:
        [target] = local_jobs[service]["static_configs"][0]["targets"]
        assert f"http://{target}/metrics" == urls[service]


def test_compose_prometheus_scrapes_each_service_where_it_listens(compose: dict[str, Any]) -> None:
    jobs = _jobs(PROMETHEUS_DIR / "prometheus.yml")
    for service in SERVICES:
        [target] = jobs[service]["static_configs"][0]["targets"]
        env = compose["services"][service]["environment"]
        prefix = f"LLAMAFLEET_{service.upper()}_"
        assert target == f"{service}:{env[prefix + 'METRICS_PORT']}"
        assert env[prefix + "METRICS_HOST"] == "0.0.0.0", f"{service}: metrics would bind 127.0.0.1 only"


# --- docker-compose.yml -------------------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_validates_against_the_compose_spec(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (a dev dependency)")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(load_compose(path)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_env_example_lists_every_compose_variable_with_its_default() -> None:
    example = read_env_file(ENV_EXAMPLE)
    used: dict[str, str | None] = {}
    for path in COMPOSE_FILES:
        used |= variables(path.read_text())
    assert set(used) == set(example), (
        f"in compose, not in .env.example: {sorted(set(used) - set(example))}; "
        f"in .env.example, unused: {sorted(set(example) - set(used))}"
    )
    # `cp .env.example .env` must not change what the compose files do without one.
    for name, default in used.items():
        if default is not None:
            assert example[name] == default, f"{name}: .env.example says {example[name]!r}, compose {default!r}"


def _normalise_argv(argv: list[str]) -> list[str]:
    """The argv as a container runs it: executables by name, and no --allow-run-as-root
    (mpiexec_argv adds it only for root; the image runs unprivileged)."""
    out = []
    for arg in argv:
        if arg == "--allow-run-as-root":
            continue
        if arg == sys.executable:
            arg = "python"
        elif "/" in arg and Path(arg).name == "mpiexec":
            arg = "mpiexec"
        out.append(arg)
    return out


def _volume_targets(service: dict[str, Any]) -> list[str]:
    return [v.split(":")[1] if isinstance(v, str) else v["target"] for v in service.get("volumes", [])]


@pytest.mark.parametrize("name", SERVICES)
def test_compose_runs_what_service_commands_runs(compose: dict[str, Any], name: str) -> None:
    """Same argv after the executable, same LLAMAFLEET_* variables with the same values, except
    where a container legitimately differs: it binds 0.0.0.0, reaches its peers by compose
    service name (on the same ports), and keeps its directories on volumes."""
    expected_argv, expected_env = service_commands(StackConfig())[name]
    service = compose["services"][name]
    assert service["command"] == _normalise_argv(expected_argv)

    env = {k: str(v) for k, v in service["environment"].items()}
    ports = {s: compose["services"][s]["environment"][f"LLAMAFLEET_{s.upper()}_PORT"] for s in SERVICES}
    prefix = f"LLAMAFLEET_{name.upper()}_"
    for key, local in expected_env.items():
        assert key in env, f"{name}: compose lacks {key} (service_commands sets it to {local!r})"
        value = env[key]
        if key.endswith("_HOST"):
            assert value == "0.0.0.0", f"{key}: a container must listen on all interfaces"
        elif key.endswith("_ADDRESS"):
            peer = key.removeprefix(prefix).removesuffix("_ADDRESS").lower()
            port = local.rsplit(":", 1)[1]
            assert value == f"{peer}:{port}", f"{key}: expected the compose service {peer} on port {port}"
            assert ports[peer] == port
        elif key.endswith(("_FILER_URL", "_MASTER_URL")):
            seaweed = "seaweedfs-" + key.rsplit("_", 2)[1].lower()
            port = local.rsplit(":", 1)[1]
            assert value == f"http://{seaweed}:{port}"
            assert f"-port={port}" in compose["services"][seaweed]["command"]
        elif key.endswith("_DIR"):
            assert any(value.startswith(target.rstrip("/") + "/") for target in _volume_targets(service)), (
                f"{key}={value} is not on a volume of {name}"
            )
        else:
            assert value == local, f"{key}: compose {value!r}, service_commands {local!r}"
    extra = {k for k in env if k.startswith("LLAMAFLEET_")} - set(expected_env)
    unexplained = extra - set(COMPOSE_ONLY_ENV)
    assert not unexplained, f"{name}: add {sorted(unexplained)} to service_commands() or to COMPOSE_ONLY_ENV"
    for key in extra:
        if COMPOSE_ONLY_ENV[key] is not None:
            assert env[key] == COMPOSE_ONLY_ENV[key], key
    # The documented port, and the healthcheck asks that port.
    assert ports[name] == str(getattr(defaults, f"{name.upper()}_PORT"))
    assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{ports[name]}"


def test_compose_dependencies_wait_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["scheduler"]["depends_on"]["model-init"]["condition"] == "service_completed_successfully"
    for name, wants in {
        "model-init": ["storage"],
        "scheduler": ["storage"],
        "gateway": ["scheduler", "storage", "postproc"],
    }.items():
        for dependency in wants:
            assert services[name]["depends_on"][dependency]["condition"] == "service_healthy", (name, dependency)
    # Every service_healthy dependency has a healthcheck to become healthy with.
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}, which has none"


def test_model_init_pushes_the_model_the_scheduler_serves(compose: dict[str, Any]) -> None:
    services = compose["services"]
    init = services["model-init"]
    script = init["command"][-1]
    assert "python -m llamafleet.demo_model" in script and "llamafleet models push" in script
    assert init["environment"]["MODEL_NAME"] == services["scheduler"]["environment"]["LLAMAFLEET_SCHEDULER_MODEL"]
    assert init["environment"]["MODEL_FILE"].startswith("/models/") and "/models" in _volume_targets(init)


def test_gateway_api_keys_come_from_a_secret(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    [secret] = gateway["secrets"]
    assert gateway["environment"]["LLAMAFLEET_GATEWAY_API_KEYS_FILE"] == f"/run/secrets/{secret}"
    assert "file" in compose["secrets"][secret]


def test_gpu_override_reserves_a_gpu_and_installs_cupy() -> None:
    override = load_compose(COMPOSE_FILES[1])["services"]["postproc"]
    [device] = override["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert override["build"]["args"]["GPU"] == "1"
    assert override["environment"]["LLAMAFLEET_POSTPROC_BACKEND"] == "cupy"
    assert 'if [ "$GPU" = "1" ]; then echo "cupy-cuda12x[ctk]' in (DEPLOY / "Dockerfile").read_text()


def test_one_service_builds_the_llamafleet_image_the_others_run() -> None:
    services = load_compose()["services"]
    image = services["storage"]["image"]
    users = {name for name, service in services.items() if service.get("image") == image}
    assert set(SERVICES) | {"model-init", "seaweedfs-master", "seaweedfs-volume", "seaweedfs-filer"} <= users
    # Built once: a build in each service would export the same image once per service.
    assert [name for name in users if "build" in services[name]] == ["seaweedfs-master"]
    assert services["seaweedfs-master"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_offline_override_builds_every_image_on_the_local_base_with_the_ca_bundle() -> None:
    built = {name for name, service in load_compose()["services"].items() if "build" in service}
    assert built == {"seaweedfs-master", "prometheus"}
    offline = load_compose(ROOT / "docker-compose.offline.yml")
    assert set(offline["services"]) == built
    for service in offline["services"].values():
        assert service["build"]["args"]["BASE_IMAGE"] == "llamafleet-base:bookworm"
        assert service["build"]["secrets"] == ["pip_ca"]
    assert offline["secrets"]["pip_ca"]["file"] == "/etc/ssl/certs/ca-certificates.crt"
    script = (ROOT / "scripts" / "docker_offline.sh").read_text()
    assert "${LLAMAFLEET_BASE_IMAGE:-llamafleet-base:bookworm}" in script
    # Online, the images keep their public bases; both take the base as a build argument.
    for dockerfile, base in [
        (DEPLOY / "Dockerfile", "python:3.11-slim"),
        (DEPLOY / "prometheus-image" / "Dockerfile", "debian:bookworm-slim"),
    ]:
        text = dockerfile.read_text()
        assert f"ARG BASE_IMAGE={base}\nFROM ${{BASE_IMAGE}}\n" in text
    assert "--mount=type=secret,id=pip_ca" in (DEPLOY / "Dockerfile").read_text()


def test_observability_is_a_profile_the_core_stack_does_not_need() -> None:
    services = load_compose()["services"]
    observability = {name for name, service in services.items() if "observability" in service.get("profiles", [])}
    assert observability == {"otel-collector", "tempo-init", "tempo", "grafana"}
    for name, service in services.items():
        if name not in observability:
            assert "profiles" not in service, name
            assert not set(service.get("depends_on", {})) & observability, f"{name} needs the observability profile"


def test_dockerfile_sends_only_what_it_copies() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert dockerfile.startswith("#")
    copied = {src for line in dockerfile.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]}
    allowed = {
        line.lstrip("!").rstrip("/")
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied == allowed


# --- healthchecks: the one-liners against real gRPC servers ----------------------------------


class _Scheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self) -> None:
        self.states: list[int] = []

    def ClusterStatus(self, request: Any, context: Any) -> scheduler_pb2.ClusterStatusResponse:
        return scheduler_pb2.ClusterStatusResponse(
            workers=[scheduler_pb2.WorkerStatus(rank=i + 1, state=s) for i, s in enumerate(self.states)]
        )


class _Storage(storage_pb2_grpc.StorageServicer):
    def __init__(self) -> None:
        self.names: set[str] = set()

    def Resolve(self, request: Any, context: grpc.ServicerContext) -> storage_pb2.ResolveResponse:
        if request.ref not in self.names:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.ref} not found")
        return storage_pb2.ResolveResponse(info=storage_pb2.BlobInfo(sha256="0" * 64))


@pytest.fixture
def grpc_server() -> Iterator[tuple[str, health.HealthServicer, _Scheduler, _Storage]]:
    """One server with health, a scheduler whose workers a test sets, and a storage that knows
    the names a test gives it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_servicer = health.HealthServicer()
    scheduler = _Scheduler()
    storage = _Storage()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, server)
    storage_pb2_grpc.add_StorageServicer_to_server(storage, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", health_servicer, scheduler, storage
    finally:
        server.stop(None)


def _probe(compose: dict[str, Any], service: str, address: str) -> int:
    test = compose["services"][service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    return run([sys.executable, "-c", test[3], address]).returncode


def test_grpc_healthcheck_passes_only_when_serving(
    compose: dict[str, Any], grpc_server: tuple[str, health.HealthServicer, _Scheduler, _Storage]
) -> None:
    address, health_servicer, _, _ = grpc_server
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert _probe(compose, "storage", address) == 0
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _probe(compose, "gateway", address) != 0


def test_scheduler_healthcheck_needs_a_ready_worker(
    compose: dict[str, Any], grpc_server: tuple[str, health.HealthServicer, _Scheduler, _Storage]
) -> None:
    address, _, scheduler, _ = grpc_server
    scheduler.states = [scheduler_pb2.WORKER_STATE_STARTING, scheduler_pb2.WORKER_STATE_UNHEALTHY]
    assert _probe(compose, "scheduler", address) != 0
    scheduler.states = [scheduler_pb2.WORKER_STATE_STARTING, scheduler_pb2.WORKER_STATE_READY]
    assert _probe(compose, "scheduler", address) == 0


@pytest.mark.parametrize(
    ("name", "stored", "file_exists", "outcome"),
    [
        ("qwen:0.5b", True, False, "kept"),  # pushed from the host: never re-tagged
        ("demo:latest", True, True, "kept"),
        ("qwen:0.5b", False, True, "pushed"),  # a GGUF copied into the models volume
        ("demo:latest", False, False, "generated"),  # the first `up`
        ("qwen:0.5b", False, False, "failed"),  # never a demo model under a real model's name
    ],
)
def test_model_init_script(
    compose: dict[str, Any],
    grpc_server: tuple[str, health.HealthServicer, _Scheduler, _Storage],
    tmp_path: Path,
    name: str,
    stored: bool,
    file_exists: bool,
    outcome: str,
) -> None:
    address, _, _, storage = grpc_server
    if stored:
        storage.names.add(name)
    # The real python (the image calls it `python`) and a `llamafleet` that records its argv.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A wrapper, not a symlink: a symlinked venv interpreter would not find the venv's packages.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    calls = tmp_path / "llamafleet-calls"
    (bin_dir / "llamafleet").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "llamafleet").chmod(0o755)
    model = tmp_path / "models" / "model.gguf"
    model.parent.mkdir()
    if file_exists:
        model.write_bytes(b"GGUF")
    service = compose["services"]["model-init"]
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "LLAMAFLEET_STORAGE": address,
        "MODEL_FILE": str(model),
        "MODEL_NAME": name,
    }
    assert set(env) - {"PATH"} <= set(service["environment"])
    result = subprocess.run(service["command"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    pushed = calls.read_text().split() if calls.exists() else []
    if outcome == "failed":
        assert result.returncode != 0 and not pushed and not model.exists()
        return
    assert result.returncode == 0, result.stdout + result.stderr
    if outcome == "kept":
        assert pushed == []
    else:
        assert pushed == ["models", "push", str(model), "--name", name]
        assert model.read_bytes()[:4] == b"GGUF" and (outcome == "pushed") == (model.stat().st_size == 4)


# --- Grafana --------------------------------------------------------------------------------------


def _datasources() -> dict[str, str]:
    found = {}
    for path in (DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.yml"):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            found[source["uid"]] = source["type"]
    return found


def test_dashboards_are_well_formed() -> None:
    datasources = _datasources()
    assert datasources == {"prometheus": "prometheus", "tempo": "tempo"}
    uids = set()
    boards = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert [b.stem for b in boards] == ["overview", "postproc", "storage", "workers"]
    for path in boards:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids
        uids.add(board["uid"])
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{path.name}: {panel['title']} overflows the grid"
            if panel["type"] == "row":
                continue
            # deploy/README.md describes the panels; the UI shows the same text on hover.
            assert panel.get("description"), f"{path.name}: {panel['title']} has no description"
            for target in panel["targets"]:
                source = target.get("datasource", panel["datasource"])
                assert datasources.get(source["uid"]) == source["type"], f"{path.name}: {panel['title']}"


def test_readme_describes_every_panel() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            assert f"| {panel['title']} |" in readme or f"**{panel['title']}**" in readme, (
                f"deploy/README.md does not describe {path.name}: {panel['title']}"
            )


def test_grafana_is_provisioned_from_the_mounted_dashboards(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    [provider] = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/llamafleet.yml").read_text())["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/overview.json"


# --- metrics: what the dashboards read exists, and the catalog is current --------------------


@pytest.fixture(scope="module")
def catalog() -> dict[str, Any]:
    # Its own process: the catalog registers every metric in prometheus_client's default registry.
    result = run([sys.executable, "scripts/metrics_catalog.py", "--json"])
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_dashboards_and_alerts_read_only_exported_metrics(catalog: dict[str, Any]) -> None:
    series = [s for metric in catalog["metrics"] for s in metric["series"]]
    unknown = {}
    for reference, places in referenced_metrics().items():
        if not any(s == reference or re.fullmatch(reference, s) for s in series):
            unknown[reference] = places
    assert not unknown, f"names no code exports (a typo, or a metric the code lost): {json.dumps(unknown, indent=1)}"
    assert not catalog["missing"]


def test_metric_names_follow_prometheus_conventions(catalog: dict[str, Any]) -> None:
    for metric in catalog["metrics"]:
        name = metric["name"]
        assert re.fullmatch(r"llamafleet_(gateway|scheduler|storage|postproc)_[a-z0-9_]+", name), name
        if metric["type"] == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        assert not re.search(r"_(milliseconds|ms|kb|mb|percent)(_|$)", name), f"{name}: use base units"


def test_metrics_doc_is_up_to_date() -> None:
    result = run([sys.executable, "scripts/metrics_catalog.py", "--check"])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
