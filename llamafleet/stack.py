"""The whole fabric on one machine: SeaweedFS, storage, the MPI scheduler with its
llama-server workers, postproc and gateway — what `llamafleet up` (and `make up`) runs,
and what the end-to-end tests start on free ports.

`service_commands` is the single description of how each service is started (command and
environment); docker-compose.yml runs the same commands with the same variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

from llamafleet import defaults
from llamafleet.channels import wait_serving
from llamafleet.hosts import HostSpec, remote_command
from llamafleet.models import ensure_model
from llamafleet.processes import ManagedProcess, free_port, mpiexec_argv, port_is_free
from llamafleet.seaweed import SeaweedServer, weed_binary
from llamafleet.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

Report = Callable[[str], None]


@dataclass
class StackConfig:
    """Where everything listens and lives. Defaults are the documented local ports."""

    root: Path = Path(".llamafleet")
    host: str = "127.0.0.1"
    gateway_port: int = defaults.GATEWAY_PORT
    gateway_http_port: int = defaults.GATEWAY_HTTP_PORT
    scheduler_port: int = defaults.SCHEDULER_PORT
    storage_port: int = defaults.STORAGE_PORT
    postproc_port: int = defaults.POSTPROC_PORT
    gateway_metrics_port: int = defaults.GATEWAY_METRICS_PORT
    scheduler_metrics_port: int = defaults.SCHEDULER_METRICS_PORT
    storage_metrics_port: int = defaults.STORAGE_METRICS_PORT
    postproc_metrics_port: int = defaults.POSTPROC_METRICS_PORT
    weed_master_port: int = 9333
    weed_volume_port: int = 8080
    weed_filer_port: int = 8888
    # Explicit (weed's default is the HTTP port + 10000): storage creates its blobs' entries there.
    weed_filer_grpc_port: int = 18888
    workers: int = 2
    slots: int = 2
    # The GGUF served at start; None means the built-in demo model.
    model_path: Path | None = None
    model_name: str = defaults.DEFAULT_MODEL
    llama_server: str = ""
    postproc_backend: str = "auto"
    extra_env: dict[str, str] = field(default_factory=dict)
    # Also run a local Prometheus (Debian's `prometheus`) with deploy/'s scrape jobs and alert rules.
    with_prometheus: bool = False
    prometheus_port: int = 9090
    scrape_interval_s: float = 5.0
    # Hosts other than this one (`llamafleet up --hosts`): each runs a SeaweedFS volume server
    # and a host agent with its workers, started there through `rsh` (ssh's form: RSH HOST CMD).
    remote_hosts: list[HostSpec] = field(default_factory=list)
    rsh: list[str] = field(default_factory=lambda: ["ssh"])

    def __post_init__(self) -> None:
        # Children run in other working directories (weed does): every path they get is absolute.
        self.root = self.root.resolve()

    @classmethod
    def on_free_ports(cls, root: Path, **overrides: object) -> StackConfig:
        """A config whose every port was free a moment ago (tests run beside a live stack)."""
        ports = {name: free_port() for name in cls.port_fields()}
        return cls(root=root, **ports, **overrides)  # type: ignore[arg-type]

    @staticmethod
    def port_fields() -> list[str]:
        return [name for name in StackConfig.__dataclass_fields__ if name.endswith("_port")]

    def address(self, port: int) -> str:
        return f"{self.host}:{port}"

    @property
    def filer_url(self) -> str:
        return f"http://{self.host}:{self.weed_filer_port}"

    @property
    def master_url(self) -> str:
        return f"http://{self.host}:{self.weed_master_port}"

    def metrics_urls(self) -> dict[str, str]:
        return {
            name: f"http://{self.host}:{getattr(self, f'{name}_metrics_port')}/metrics"
            for name in ("gateway", "scheduler", "storage", "postproc")
        }


def host_agent_argv() -> list[str]:
    """The host agent of a host other than rank 0's (services/scheduler/host_agent.py), an MPI
    job of its own; its settings come from LLAMAFLEET_HOST_AGENT_* variables."""
    return [*mpiexec_argv(1, fault_tolerant=True), sys.executable, "-m", "services.scheduler.host_agent"]


def service_commands(cfg: StackConfig) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each service's command line and environment, in start order."""
    python = sys.executable
    a = cfg.address
    common = {"PYTHONUNBUFFERED": "1", **cfg.extra_env}
    return {
        "storage": (
            [python, "-m", "services.storage"],
            common
            | {
                "LLAMAFLEET_STORAGE_HOST": cfg.host,
                "LLAMAFLEET_STORAGE_PORT": str(cfg.storage_port),
                "LLAMAFLEET_STORAGE_METRICS_PORT": str(cfg.storage_metrics_port),
                "LLAMAFLEET_STORAGE_FILER_URL": cfg.filer_url,
                "LLAMAFLEET_STORAGE_MASTER_URL": cfg.master_url,
                "LLAMAFLEET_STORAGE_FILER_GRPC_PORT": str(cfg.weed_filer_grpc_port),
            },
        ),
        "scheduler": (
            [*mpiexec_argv(1, fault_tolerant=True), python, "-m", "services.scheduler"],
            common
            | {
                "LLAMAFLEET_SCHEDULER_HOST": cfg.host,
                "LLAMAFLEET_SCHEDULER_PORT": str(cfg.scheduler_port),
                "LLAMAFLEET_SCHEDULER_METRICS_PORT": str(cfg.scheduler_metrics_port),
                "LLAMAFLEET_SCHEDULER_STORAGE_ADDRESS": a(cfg.storage_port),
                "LLAMAFLEET_SCHEDULER_MODEL": cfg.model_name,
                "LLAMAFLEET_SCHEDULER_WORKERS": str(cfg.workers),
                "LLAMAFLEET_SCHEDULER_SLOTS": str(cfg.slots),
                # One node cache per host, even where hosts share this filesystem.
                "LLAMAFLEET_SCHEDULER_CACHE_DIR": str(cfg.root / "cache" / "{host}"),
                "LLAMAFLEET_SCHEDULER_LOG_DIR": str(cfg.root / "logs"),
                "LLAMAFLEET_SCHEDULER_LLAMA_SERVER": cfg.llama_server,
            },
        ),
        "postproc": (
            [python, "-m", "services.postproc"],
            common
            | {
                "LLAMAFLEET_POSTPROC_HOST": cfg.host,
                "LLAMAFLEET_POSTPROC_PORT": str(cfg.postproc_port),
                "LLAMAFLEET_POSTPROC_METRICS_PORT": str(cfg.postproc_metrics_port),
                "LLAMAFLEET_POSTPROC_BACKEND": cfg.postproc_backend,
            },
        ),
        "gateway": (
            [python, "-m", "services.gateway"],
            common
            | {
                "LLAMAFLEET_GATEWAY_HOST": cfg.host,
                "LLAMAFLEET_GATEWAY_PORT": str(cfg.gateway_port),
                "LLAMAFLEET_GATEWAY_HTTP_PORT": str(cfg.gateway_http_port),
                "LLAMAFLEET_GATEWAY_METRICS_PORT": str(cfg.gateway_metrics_port),
                "LLAMAFLEET_GATEWAY_SCHEDULER_ADDRESS": a(cfg.scheduler_port),
                "LLAMAFLEET_GATEWAY_STORAGE_ADDRESS": a(cfg.storage_port),
                "LLAMAFLEET_GATEWAY_POSTPROC_ADDRESS": a(cfg.postproc_port),
            },
        ),
    }


# A service that exits on its own is started again after RESTART_DELAY_S, doubling up to
# RESTART_DELAY_MAX_S while it keeps exiting within RESTART_RESET_S of its start.
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0
RESTART_RESET_S = 60.0

# mpiexec kills its processes right after forwarding SIGTERM; SIGUSR1 it forwards and waits,
# so rank 0 can stop its workers and their llama-servers in order.
STOP_SIGNALS = {"scheduler": signal.SIGUSR1}

# What a host agent passes on to its workers, besides its own settings.
FORWARDED_ENV_PREFIXES = ("OTEL_", "LLAMAFLEET_", "LLAMA_SERVER")


def remote_processes(cfg: StackConfig, seaweed: SeaweedServer) -> dict[str, ManagedProcess]:
    """Per host of `cfg.remote_hosts`, its SeaweedFS volume server and its host agent, each
    started through `cfg.rsh` and stopped when its connection closes."""
    processes = {}
    inherited = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    master = f"{cfg.host}:{seaweed.master_port}.{seaweed.master_grpc_port}"
    for i, host in enumerate(cfg.remote_hosts, start=1):
        data = cfg.root / "seaweedfs" / f"volume-{host.name}"
        # A port of its own per host: weed also listens on a unix socket in /tmp named by its
        # port, so hosts sharing one /tmp (containers, namespaces) must not share port numbers.
        port = cfg.weed_volume_port + i
        volume = [
            weed_binary(),
            "volume",
            f"-mserver={master}",
            f"-ip={host.address}",
            f"-ip.bind={host.address}",
            f"-port={port}",
            f"-port.grpc={port + 10000}",
            f"-dir={data}",
        ]
        agent_env = {
            **inherited,
            "PYTHONUNBUFFERED": "1",
            **cfg.extra_env,
            "LLAMAFLEET_HOST_AGENT_SCHEDULER_ADDRESS": cfg.address(cfg.scheduler_port),
            "LLAMAFLEET_HOST_AGENT_HOST": host.name,
            "LLAMAFLEET_HOST_AGENT_WORKERS": str(host.workers),
        }
        commands = {
            # The data folder is made there, on that host's disk.
            f"volume@{host.name}": (
                ["sh", "-c", f"mkdir -p {shlex.quote(str(data))} && exec {shlex.join(volume)}"],
                {},
                "TERM",
            ),
            f"host-agent@{host.name}": (host_agent_argv(), agent_env, "USR1"),
        }
        for name, (argv, env, stop) in commands.items():
            processes[name] = ManagedProcess(
                name,
                [*cfg.rsh, host.address, remote_command(argv, env, Path.cwd(), stop)],
                log_path=cfg.root / "logs" / f"{name}.log",
                stop_by_closing_stdin=True,
            )
    return processes


ALERT_RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"


def prometheus_config(cfg: StackConfig, rules: Path = ALERT_RULES) -> dict:
    """deploy/prometheus's jobs and rules, with this stack's metrics endpoints as targets."""
    interval = f"{cfg.scrape_interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": name, "static_configs": [{"targets": [cfg.address(getattr(cfg, f"{name}_metrics_port"))]}]}
            for name in ("gateway", "scheduler", "storage", "postproc")
        ],
    }


def prometheus_process(cfg: StackConfig) -> ManagedProcess:
    """A Prometheus scraping the stack, its data and log under the stack's root."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed (Debian: apt-get install --no-install-recommends prometheus)")
    root = cfg.root / "prometheus"
    root.mkdir(parents=True, exist_ok=True)
    (root / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(cfg)))
    argv = [
        binary,
        f"--config.file={root / 'prometheus.yml'}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address={cfg.address(cfg.prometheus_port)}",
        # Keeps the trace ids the gateway attaches to its latency buckets.
        "--enable-feature=exemplar-storage",
    ]
    return ManagedProcess("prometheus", argv, log_path=cfg.root / "logs" / "prometheus.log")


class Stack:
    """Start with `await stack.start()`, stop with `await stack.stop()` (always safe to call),
    or both with `async with Stack(cfg) as stack:`."""

    def __init__(self, cfg: StackConfig, report: Report = lambda _msg: None) -> None:
        self.cfg = cfg
        self.report = report
        self.seaweed = SeaweedServer(
            data_dir=cfg.root / "seaweedfs",
            ip=cfg.host,
            master_port=cfg.weed_master_port,
            volume_port=cfg.weed_volume_port,
            filer_port=cfg.weed_filer_port,
            filer_grpc_port=cfg.weed_filer_grpc_port,
        )
        self.processes: dict[str, ManagedProcess] = {}
        # Times each service was restarted after its process exited on its own.
        self.restarts: dict[str, int] = {}
        self._supervisors: list[asyncio.Task[None]] = []

    def check_ports(self) -> None:
        """Refuse to start when a port is taken, naming it, before anything runs."""
        taken = [
            f"{name.removesuffix('_port').replace('_', ' ')} port {getattr(self.cfg, name)}"
            for name in StackConfig.port_fields()
            if (name != "prometheus_port" or self.cfg.with_prometheus)
            and not port_is_free(self.cfg.host, getattr(self.cfg, name))
        ]
        if taken:
            raise RuntimeError(
                f"cannot start: {', '.join(taken)} on {self.cfg.host} already in use "
                "(is a stack already up? try `llamafleet down`)"
            )

    async def start(self, timeout: float = 180.0) -> None:
        self.check_ports()
        try:
            self.report("starting SeaweedFS")
            await self.seaweed.start()
            await self.seaweed.wait_ready(60.0)
            commands = service_commands(self.cfg)
            for name, (argv, env) in commands.items():
                self.report(f"starting {name}")
                process = ManagedProcess(
                    name,
                    argv,
                    log_path=self.cfg.root / "logs" / f"{name}.log",
                    env=os.environ | env,
                    stop_signal=STOP_SIGNALS.get(name, signal.SIGTERM),
                )
                self.processes[name] = process
                await process.start()
                await wait_serving(self.cfg.address(getattr(self.cfg, f"{name}_port")), timeout, process)
                if name == "storage":
                    await self._ensure_model()
            for name, process in remote_processes(self.cfg, self.seaweed).items():
                self.report(f"starting {name}")
                self.processes[name] = process
                await process.start()
            self.report("waiting for the workers' llama-servers")
            await self.wait_workers_ready(timeout)
            if self.cfg.with_prometheus:
                self.report("starting Prometheus")
                self.processes["prometheus"] = prometheus_process(self.cfg)
                await self.processes["prometheus"].start()
        except BaseException:
            await self.stop()
            raise
        self._supervisors = [
            asyncio.create_task(self._supervise(name)) for name in self.processes if name != "prometheus"
        ]

    async def _supervise(self, name: str) -> None:
        """Start a service again whenever its process exits while the stack runs (a crash, an
        OOM kill): what compose's restart policy does for containers. A service that keeps
        dying right after its start waits longer each time."""
        process = self.processes[name]
        delay = RESTART_DELAY_S
        while True:
            started = asyncio.get_running_loop().time()
            code = await process.wait()
            if asyncio.get_running_loop().time() - started > RESTART_RESET_S:
                delay = RESTART_DELAY_S
            self.restarts[name] = self.restarts.get(name, 0) + 1
            log.error(
                "%s exited with code %s; restarting it in %.0fs (restart %d)", name, code, delay, self.restarts[name]
            )
            self.report(f"{name} exited with code {code}; restarting it")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX_S)
            await process.start()
            if port := getattr(self.cfg, f"{name}_port", None):
                with contextlib.suppress(Exception):
                    await wait_serving(self.cfg.address(port), 120.0, process)

    async def _ensure_model(self) -> None:
        await ensure_model(
            self.cfg.address(self.cfg.storage_port),
            self.cfg.model_name,
            self.cfg.model_path,
            self.cfg.root / "models",
            self.report,
        )

    async def wait_workers_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        async with grpc.aio.insecure_channel(self.cfg.address(self.cfg.scheduler_port)) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            while True:
                self.processes["scheduler"].check_running()
                status = await stub.ClusterStatus(scheduler_pb2.ClusterStatusRequest(), timeout=5.0)
                ready = [w for w in status.workers if w.state == scheduler_pb2.WORKER_STATE_READY]
                expected = self.cfg.workers + sum(h.workers for h in self.cfg.remote_hosts)
                if len(ready) == expected:
                    return
                if loop.time() > give_up:
                    raise TimeoutError(
                        f"only {len(ready)} of {expected} workers ready after {timeout:.0f}s; "
                        f"see {self.cfg.root / 'logs'}"
                    )
                await asyncio.sleep(0.3)

    async def stop(self, seaweed_grace: float = 25.0) -> None:
        """Stop every service in reverse order, then SeaweedFS; nothing is left running."""
        for supervisor in self._supervisors:
            supervisor.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        self._supervisors = []
        for name in reversed(list(self.processes)):
            # The scheduler and host agents stop their workers and llama-servers before they exit.
            grace = 45.0 if name == "scheduler" or name.startswith("host-agent@") else 10.0
            await self.processes[name].stop(grace)
        self.processes.clear()
        await self.seaweed.stop(seaweed_grace)

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def endpoints(self) -> dict[str, str]:
        c = self.cfg
        return {
            "gateway (gRPC)": c.address(c.gateway_port),
            "gateway (OpenAI HTTP)": f"http://{c.address(c.gateway_http_port)}/v1",
            "scheduler (gRPC)": c.address(c.scheduler_port),
            "storage (gRPC)": c.address(c.storage_port),
            "postproc (gRPC)": c.address(c.postproc_port),
            **{f"{name} metrics": url for name, url in c.metrics_urls().items()},
            **({"Prometheus": f"http://{c.address(c.prometheus_port)}"} if c.with_prometheus else {}),
            "SeaweedFS filer": c.filer_url,
            "SeaweedFS master": c.master_url,
        }
