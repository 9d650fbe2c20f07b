"""Fixtures for drill tests: stub backends (fast fake OpenAI-compatible upstreams) and fleets of them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from skyfabric.drills.harness import free_port
from skyfabric.drills.stub import Stub

#: Short timeouts so that faults are detected within a few-second drill.
STUB_TIMEOUTS = {
    "connect": 0.5,
    "first_byte": 1.0,
    "first_token": 1.0,
    "idle": 0.5,
    "response": 2.0,
    "total": 20.0,
}


@pytest.fixture
async def stub_url() -> AsyncIterator[tuple[str, int]]:
    """An in-process stub backend: (host, port)."""
    runner = web.AppRunner(Stub(ttft=0.02, token_delay=0.005).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    yield "127.0.0.1", port
    await runner.cleanup()


@pytest.fixture(scope="module")
def stub_ports() -> Iterator[list[int]]:
    """Four stub backends in one child process (as real backends are: outside the drill's process)."""
    ports = [free_port() for _ in range(4)]
    argv = [sys.executable, "-m", "skyfabric.drills.stub", "--ttft", "0.02", "--token-delay", "0.005"]
    for port in ports:
        argv += ["--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    line = b""
    while time.monotonic() < deadline and b"ready" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError("the stub backend exited")
    try:
        yield ports
    finally:
        proc.terminate()
        proc.wait(10)


def stub_fleet_data(ports: list[int], **extra: Any) -> dict[str, Any]:
    """Three providers; aws has two regions (for region-loss), each region one stub endpoint."""

    def pool(port: int, accelerator: str) -> dict[str, Any]:
        return {
            "name": "p",
            "accelerator": accelerator,
            "engine": "vllm",
            "model": "stub-model",
            "endpoints": [f"http://127.0.0.1:{port}/v1"],
        }

    data: dict[str, Any] = {
        "version": 1,
        "models": [{"name": "stub-model", "aliases": ["default"], "context_length": 256}],
        "providers": [
            {
                "name": "aws",
                "regions": [
                    {"name": "us-east-1", "pools": [pool(ports[0], "nvidia-h100")]},
                    {"name": "us-west-2", "pools": [pool(ports[3], "trainium2")]},
                ],
            },
            {"name": "gcp", "regions": [{"name": "us-central1", "pools": [pool(ports[1], "tpu-v6e")]}]},
            {"name": "azure", "regions": [{"name": "eastus", "pools": [pool(ports[2], "nvidia-h100")]}]},
        ],
        "timeouts": dict(STUB_TIMEOUTS),
        "retry": {"max_attempts": 3, "budget_percent": 50},
    }
    data.update(extra)
    return data


@pytest.fixture
def stub_fleet(stub_ports: list[int], tmp_path: Path) -> Path:
    """A fleet file of the stub backends."""
    path = tmp_path / "stub-fleet.yaml"
    path.write_text(yaml.safe_dump(stub_fleet_data(stub_ports), sort_keys=False))
    return path
