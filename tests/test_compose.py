"""docker-compose.yml for real: its images built here, the core stack started with
`docker compose up -d --wait`, and used only through its published ports, as a user on the host.

Runs where a Docker daemon answers or can be started (tests/docker_daemon.py; skipped otherwise).
No registry of images is assumed: scripts/docker_offline.sh (`make docker-offline`) prepares the
machine and the stack runs with docker-compose.offline.yml. Its own project name, image tags and
ephemeral host ports keep it apart from a stack a user runs; `docker compose down -v` removes it
even when a test fails. On 2 cores: ~2.5 min with the build cache warm, ~5 min cold (base image
and pip downloads included).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from docker_daemon import DockerUnavailable, docker_daemon
from live_metrics import deployment_expressions, drive_load, expressions_without_data

from llamafleet.keys import KeyStore
from llamafleet.storage_client import StorageClient
from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "demo:latest"
SERVICES = ("gateway", "scheduler", "storage", "postproc")


@dataclass
class ComposeStack:
    project: str
    env: dict[str, str]
    env_file: Path
    api_key: str
    scratch: Path

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`docker compose ARGS` for this project (its .env ignored: the test sets what it needs)."""
        argv = ["docker", "compose", "--env-file", str(self.env_file), *args]
        result = subprocess.run(argv, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def address(self, service: str, port: int) -> str:
        """Where the host reaches `service`'s `port` (published on an ephemeral port)."""
        return self.compose("port", service, str(port)).stdout.strip()

    def diagnosis(self) -> str:
        """What `ps` and the services' last log lines say, for a failure message."""
        ps = self.compose("ps", "--all", check=False).stdout
        logs = self.compose("logs", "--no-color", "--tail", "30", check=False).stdout
        return f"{ps}\n{logs}"

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes of this project that Docker still has."""
        label = f"label=com.docker.compose.project={self.project}"
        found = {}
        for kind, argv in {
            "containers": ["docker", "ps", "--all", "--quiet", "--filter", label],
            "networks": ["docker", "network", "ls", "--quiet", "--filter", label],
            "volumes": ["docker", "volume", "ls", "--quiet", "--filter", label],
        }.items():
            found[kind] = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.split()
        return found


def _prepare_machine() -> None:
    """Base image and compose plugin, as `make docker-offline` does (quick once done)."""
    if (
        shutil.which("mmdebstrap") is None
        and subprocess.run(["docker", "image", "inspect", "llamafleet-base:bookworm"], capture_output=True).returncode
    ):
        pytest.skip("mmdebstrap is not installed (apt-get install --no-install-recommends mmdebstrap)")
    result = subprocess.run(
        [str(ROOT / "scripts" / "docker_offline.sh")], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def compose_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    with contextlib.ExitStack() as resources:
        try:
            resources.enter_context(docker_daemon())
        except DockerUnavailable as exc:
            pytest.skip(str(exc))
        _prepare_machine()
        scratch = tmp_path_factory.mktemp("compose")
        keys = KeyStore(scratch / "api-keys.json")
        _, api_key = keys.create("compose-test")
        # The gateway runs as its own user in the container; the file holds only salted hashes.
        keys.path.chmod(0o644)
        env_file = scratch / "empty.env"
        env_file.touch()
        project = f"llamafleet-test-{os.getpid()}"
        env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": project,
            "COMPOSE_FILE": "docker-compose.yml:docker-compose.offline.yml",
            "COMPOSE_PROFILES": "",
            "LLAMAFLEET_IMAGE": "llamafleet:compose-test",
            "LLAMAFLEET_PROMETHEUS_IMAGE": "llamafleet-prometheus:compose-test",
            "GATEWAY_API_KEYS_FILE": str(keys.path),
            "LLAMAFLEET_BIND": "127.0.0.1",
            # Port 0: Docker picks free host ports (no race with other processes); `port` finds them.
            **{f"{name}_PUBLISHED_PORT": "0" for name in ("GATEWAY", "GATEWAY_HTTP", "STORAGE", "PROMETHEUS")},
        }
        stack = ComposeStack(project, env, env_file, api_key, scratch)
        # Registered before `up`, so that a failed start is cleaned up too.
        resources.callback(stack.compose, "down", "--volumes", "--remove-orphans", timeout=300, check=False)
        stack.compose("build", timeout=1200)
        up = stack.compose("up", "--detach", "--wait", "--wait-timeout", "600", timeout=700, check=False)
        assert up.returncode == 0, f"up --wait failed:\n{up.stderr}\n{stack.diagnosis()}"
        yield stack


def _buf_curl(address: str, body: dict, api_key: str | None) -> subprocess.CompletedProcess[str]:
    """Gateway.Generate through `buf curl` (schema by server reflection)."""
    argv = [str(BIN / "buf"), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", json.dumps(body)]
    if api_key:
        argv += ["-H", f"authorization: Bearer {api_key}"]
    argv.append(f"http://{address}/llamafleet.v1.Gateway/Generate")
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _json_stream(text: str) -> list[dict]:
    """The JSON messages `buf curl` prints one after another."""
    decoder, messages, at = json.JSONDecoder(), [], 0
    while at < len(text.rstrip()):
        message, at = decoder.raw_decode(text, at)
        messages.append(message)
        while at < len(text) and text[at].isspace():
            at += 1
    return messages


def test_generate_with_buf_curl_through_the_published_grpc_port(compose_stack: ComposeStack) -> None:
    address = compose_stack.address("gateway", 50051)
    result = _buf_curl(address, {"prompt": "hello", "max_tokens": 8}, compose_stack.api_key)
    assert result.returncode == 0, result.stderr
    *chunks, final = _json_stream(result.stdout)
    assert chunks and all("chunk" in message for message in chunks)
    assert 1 <= final["result"]["usage"]["completionTokens"] <= 8
    assert final["result"]["modelSha256"]
    # Auth is on (the keys file is a compose secret): no key, no generation.
    refused = _buf_curl(address, {"prompt": "hello", "max_tokens": 8}, None)
    assert refused.returncode != 0 and "unauthenticated" in refused.stderr.lower()


def test_openai_sdk_through_the_published_http_port(compose_stack: ComposeStack) -> None:
    base_url = f"http://{compose_stack.address('gateway', 8000)}/v1"
    client = openai.OpenAI(base_url=base_url, api_key=compose_stack.api_key, max_retries=0, timeout=60)
    assert [model.id for model in client.models.list().data] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt="hello", max_tokens=8)
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 8
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
    )
    finishes = [choice.finish_reason for chunk in stream for choice in chunk.choices if choice.finish_reason]
    assert finishes in (["length"], ["stop"])


@pytest.mark.asyncio
async def test_models_push_from_the_host_to_storage(compose_stack: ComposeStack, demo_model: Path) -> None:
    address = compose_stack.address("storage", 50053)
    push = subprocess.run(
        [str(BIN / "llamafleet"), "models", "push", str(demo_model), "--name", "pushed:compose", "--storage", address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert push.returncode == 0, push.stdout + push.stderr
    async with StorageClient(address) as storage:
        info = await storage.resolve("pushed:compose")
    assert info.sha256 == hashlib.sha256(demo_model.read_bytes()).hexdigest()
    assert info.size_bytes == demo_model.stat().st_size


@pytest.mark.asyncio
async def test_prometheus_scrapes_every_service_and_every_query_has_data(compose_stack: ComposeStack) -> None:
    stack = compose_stack
    await drive_load(
        stack.address("gateway", 50051),
        stack.address("gateway", 8000),
        stack.address("storage", 50053),
        MODEL,
        stack.scratch,
        api_key=stack.api_key,
    )
    prometheus = f"http://{stack.address('prometheus', 9090)}"
    async with httpx.AsyncClient(timeout=10) as client:
        targets = (await client.get(f"{prometheus}/api/v1/targets")).json()["data"]["activeTargets"]
        health = {target["labels"]["job"]: target["health"] for target in targets}
        assert {job: health.get(job) for job in SERVICES} == dict.fromkeys(SERVICES, "up"), targets
    # The compose Prometheus scrapes every 5 s: a rate needs two scrapes after the load.
    empty = await expressions_without_data(prometheus, deployment_expressions(), timeout_s=90, poll_s=2)
    assert not empty, "queries without data:\n" + "\n".join(empty)
    async with httpx.AsyncClient(timeout=10) as client:
        groups = (await client.get(f"{prometheus}/api/v1/rules")).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules and all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert not [rule["name"] for rule in rules if rule["state"] == "firing"]


async def _generate(address: str, api_key: str) -> gateway_pb2.GenerateResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GenerateRequest(prompt="after the crash", max_tokens=4)
        responses = [
            r async for r in stub.Generate(request, timeout=10, metadata=(("authorization", f"Bearer {api_key}"),))
        ]
    return responses[-1]


@pytest.mark.asyncio
async def test_a_crashed_scheduler_is_restarted_by_its_policy_and_the_gateway_serves_again(
    compose_stack: ComposeStack,
) -> None:
    """The scheduler container dies as in a crash or an OOM kill: its init gets SIGKILL from the
    host. (`docker compose kill` would not do: Docker counts a kill as a deliberate stop, which
    restart policies leave stopped.) `restart: unless-stopped` brings it back."""
    stack = compose_stack
    container = stack.compose("ps", "--quiet", "scheduler").stdout.strip()

    def state() -> dict:
        inspect = ["docker", "inspect", "--format", "{{json .State}} {{.RestartCount}}", container]
        out = subprocess.run(inspect, capture_output=True, text=True, timeout=30, check=True).stdout
        state_json, restarts = out.rsplit(" ", 1)
        return {**json.loads(state_json), "RestartCount": int(restarts)}

    before = state()
    os.kill(before["Pid"], signal.SIGKILL)
    gateway = stack.address("gateway", 50051)
    deadline = time.monotonic() + 180
    while True:
        try:
            final = await _generate(gateway, stack.api_key)
            break
        except grpc.aio.AioRpcError as exc:
            # UNAVAILABLE while the scheduler is down, or a deadline while its workers load the model.
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
            assert time.monotonic() < deadline, f"no generation 180 s after the crash:\n{stack.diagnosis()}"
            await asyncio.sleep(1)
    assert final.result.usage.completion_tokens >= 1
    after = state()
    assert after["RestartCount"] == before["RestartCount"] + 1 and after["Pid"] != before["Pid"]


def test_down_removes_every_container_network_and_volume(compose_stack: ComposeStack) -> None:
    assert all(compose_stack.leftovers().values()), "the stack should be up before down"
    compose_stack.compose("down", "--volumes", timeout=300)
    assert compose_stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
