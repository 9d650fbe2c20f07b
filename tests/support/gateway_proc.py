"""Gateway processes (``skyfabric serve``) for tests that need several instances or a crash."""

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


def fleet_file(path: Path, upstream_url: str, **extra: Any) -> Path:
    """A one-model fleet (``m``) on ``upstream_url`` with the given extra sections."""
    data: dict[str, Any] = {
        "models": [{"name": "m", "price": {"input": 1.0, "output": 2.0}}],
        "providers": [
            {
                "name": "p",
                "regions": [
                    {
                        "name": "r",
                        "pools": [
                            {
                                "name": "x",
                                "accelerator": "cpu",
                                "engine": "vllm",
                                "model": "m",
                                "endpoints": [upstream_url],
                                "capacity": {"concurrency": 256},
                            }
                        ],
                    }
                ],
            }
        ],
        "health": {"probe_interval": 0, "selftest": False},
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


class GatewayProcess:
    """One ``skyfabric serve`` process; its stderr (the log) goes to ``log``."""

    def __init__(self, fleet: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "skyfabric.cli", "--log-level", "info", "serve", "--config", str(fleet),
             "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
            env={**os.environ, "PYTHONPATH": str(SRC), **(env or {})},
        )  # fmt: skip

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.root}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("gateway never became healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
