"""Gateways and stub backends as real processes, for the tests that kill them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def start_stub(port: int, *, ttft: float = 0.02, token_delay: float = 0.004) -> subprocess.Popen[bytes]:
    """The drills' stub backend (exact ``max_tokens`` tokens, usage on request) on ``port``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyfabric.drills.stub", "--port", str(port), "--ttft", str(ttft),
         "--token-delay", str(token_delay)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def write_fleet(path: Path, endpoints: list[str], **extra: Any) -> Path:
    """A one-model fleet (``m``) over ``endpoints`` (engine vllm), with ``extra`` top-level sections."""
    data: dict[str, Any] = {
        "models": [{"name": "m", "price_per_mtok_in": 1.0, "price_per_mtok_out": 2.0}],
        "providers": [
            {
                "name": "p",
                "regions": [
                    {
                        "name": "r",
                        "pools": [{"name": "x", "accelerator": "cpu", "engine": "vllm", "model": "m",
                                   "endpoints": endpoints}],
                    }
                ],
            }
        ],
        "health": {"selftest": False},
        **extra,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return path


def start_gateway(fleet: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``skyfabric serve`` for ``fleet`` on ``port``; its log (stderr) goes to ``log``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyfabric.cli", "--log-level", "info", "serve", "--config", str(fleet),
         "--port", str(port)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=open(log, "ab"),  # noqa: SIM115
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


def wait_http(url: str, proc: subprocess.Popen[bytes], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {within}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
