"""TLS on the gateway's public ports (gRPC and HTTP), with a self-signed certificate. The gateway
runs alone: authentication is refused before any backend is needed, which proves that both faces
answer over TLS without starting a stack."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from llamafleet.channels import wait_serving
from llamafleet.processes import ManagedProcess, free_port
from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewaySettings


def test_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="both"):
        GatewaySettings(tls_cert_file=tmp_path / "cert.pem")


@dataclass
class TlsGateway:
    grpc_address: str
    http_url: str
    cert: Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.cert.read_bytes())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(
    certificate: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TlsGateway]:
    cert, key = certificate
    root = tmp_path_factory.mktemp("gateway")
    ports = {name: free_port() for name in ("PORT", "HTTP_PORT", "METRICS_PORT")}
    env = os.environ | {f"LLAMAFLEET_GATEWAY_{name}": str(port) for name, port in ports.items()}
    env |= {
        "LLAMAFLEET_GATEWAY_TLS_CERT_FILE": str(cert),
        "LLAMAFLEET_GATEWAY_TLS_KEY_FILE": str(key),
        "LLAMAFLEET_GATEWAY_API_KEYS_FILE": str(root / "keys.json"),
        # Nothing listens there: no request in this module gets that far.
        "LLAMAFLEET_GATEWAY_SCHEDULER_ADDRESS": f"127.0.0.1:{free_port()}",
        "LLAMAFLEET_GATEWAY_STORAGE_ADDRESS": f"127.0.0.1:{free_port()}",
    }
    process = ManagedProcess(
        "gateway", [sys.executable, "-m", "services.gateway"], log_path=root / "gateway.log", env=env
    )
    tls = TlsGateway(f"localhost:{ports['PORT']}", f"https://localhost:{ports['HTTP_PORT']}", cert)
    await process.start()
    try:
        await wait_serving(tls.grpc_address, 30, process, tls.credentials())
        yield tls
    finally:
        await process.stop(5)


@pytest.mark.asyncio(loop_scope="module")
async def test_grpc_over_tls_reaches_the_servicer(gateway: TlsGateway) -> None:
    async with grpc.aio.secure_channel(gateway.grpc_address, gateway.credentials()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GenerateRequest(prompt="hi")):
                pass
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Plaintext is not spoken on the TLS port.
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio(loop_scope="module")
async def test_http_over_tls_reaches_the_handler(gateway: TlsGateway) -> None:
    context = ssl.create_default_context(cafile=gateway.cert)
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"{gateway.http_url}/v1/models", ssl=context)
        assert response.status == 401
        assert (await response.json())["error"]["type"] == "authentication_error"
