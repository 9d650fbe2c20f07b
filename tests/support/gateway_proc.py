"""Gateways and stub backends as real processes (``skyfabric serve``), for tests that need several
instances, a crash, or a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.private_redis import free_port

SRC = Path(__file__).resolve().parents[2] / "src"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    path = str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def fleet_file(path: Path, endpoints: str | list[str], **extra: Any) -> Path:
    """A one-model fleet (``m``, $1/$2 per million tokens in/out) over ``endpoints`` (engine vllm), with
    ``extra`` top-level sections."""
    pool = {
        "name": "x",
        "accelerator": "cpu",
        "engine": "vllm",
        "model": "m",
        "endpoints": [endpoints] if isinstance(endpoints, str) else endpoints,
        "capacity": {"concurrency": 256},
    }
    data: dict[str, Any] = {
        "models": [{"name": "m", "price_per_mtok_in": 1.0, "price_per_mtok_out": 2.0}],
        "providers": [{"name": "p", "regions": [{"name": "r", "pools": [pool]}]}],
        "health": {"probe_interval": 0, "selftest": False},
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def wait_http(url: str, proc: subprocess.Popen[bytes], within: float = 30.0, log: Path | None = None) -> None:
    """Until ``url`` answers 200 (raises if ``proc`` exits first, with the end of its log)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {url} answered: {tail}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {within}s")


def start_stub(port: int, *, ttft: float = 0.02, token_delay: float = 0.004) -> subprocess.Popen[bytes]:
    """The drills' stub backend (exact ``max_tokens`` tokens, usage on request) on ``port``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyfabric.drills.stub", "--port", str(port), "--ttft", str(ttft),
         "--token-delay", str(token_delay)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def spawn_gateway(
    fleet: Path, port: int, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``skyfabric serve`` for ``fleet`` on ``port``, started; its log (stderr) is appended to ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "skyfabric.cli", "--log-level", "info", "serve", "--config", str(fleet),
         "--port", str(port)],
        env=_env(env), stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
    )  # fmt: skip


def start_gateway(
    fleet: Path, port: int, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """:func:`spawn_gateway`, once it answers ``/healthz``."""
    proc = spawn_gateway(fleet, port, log, env)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, log=log)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a clean stop), then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class GatewayProcess:
    """One ``skyfabric serve`` process on a free port (started at once), healthy once :meth:`wait_ready`
    returns."""

    def __init__(self, fleet: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = log
        self.proc = spawn_gateway(fleet, self.port, log, env)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_http(f"{self.root}/healthz", self.proc, timeout, self.log)

    def stop(self) -> None:
        stop(self.proc)
