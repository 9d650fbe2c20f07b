"""Starts the embedded fleet: replica processes for every ``local`` pool, then the gateway.

Children get ``PR_SET_PDEATHSIG`` so they die with the supervisor even if it is killed with SIGKILL, and
the supervisor restarts a replica that crashes (with backoff) so the fleet heals the way a cluster
manager would. SIGINT/SIGTERM stop everything, gateway first so no client is cut by a replica stop.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skyfabric.core.errors import SkyfabricError
from skyfabric.core.fleet import Fleet
from skyfabric.core.lifetime import die_with_parent

log = logging.getLogger("skyfabric.up")


#: Embedded replicas compute in float32 unless ``SKYFABRIC_DTYPE`` says otherwise: bf16's rounding depends
#: on the batch, and in float32 a stream continued on another replica after a failover reads exactly like the
#: uninterrupted answer, which the fleet's tests and drills check.
REPLICA_ENV = {"SKYFABRIC_DTYPE": os.environ.get("SKYFABRIC_DTYPE", "float32")}
#: Coding clients send 20k-token prompts: replicas take the shipped model's 32k context, 16 sequences at once
#: (16 slots x 128 MiB in float32) and a prefix cache of ~170k tokens. Mapped lazily, so a replica's memory
#: follows the tokens it holds (bounded by this budget), not the budget.
REPLICA_ENV.update(
    {
        "SKYFABRIC_MAX_MODEL_LEN": os.environ.get("SKYFABRIC_MAX_MODEL_LEN", "32768"),
        "SKYFABRIC_KV_CACHE_MIB": os.environ.get("SKYFABRIC_KV_CACHE_MIB", "2752"),
    }
)


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    health_url: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment

    def start(self) -> None:
        out = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            self.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env} if self.env else None,
            preexec_fn=die_with_parent,
        )
        out.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _own_child_tls() -> ssl.SSLContext:
    """For readiness checks of our own gateway on loopback: its certificate names the public host, not
    127.0.0.1, and may be issued by a CA this machine does not hold; the check is about liveness only."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def healthy(url: str, timeout: float = 1.0) -> bool:
    """GET ``url`` answers 200 (over TLS too: the gateway's listener may terminate it)."""
    context = _own_child_tls() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@dataclass
class EmbeddedFleet:
    """The processes of an embedded fleet and the resolved fleet file the gateway reads."""

    fleet: Fleet
    host: str = "127.0.0.1"
    port: int = 8080
    replica_base_port: int = 8100
    workers: int = 1
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="skyfabric-")))
    replicas: list[Child] = field(default_factory=list)
    gateway: Child | None = None

    def resolve(self) -> dict[str, Any]:
        """The fleet as data, with every ``local`` pool given the URLs of the replicas started for it."""
        data = self.fleet.model_dump(mode="json", exclude_none=True)
        port = self.replica_base_port
        python = sys.executable
        for provider in data["providers"]:
            for region in provider["regions"]:
                for pool in region["pools"]:
                    if pool["engine"] != "local":
                        continue
                    urls = []
                    for i in range(pool.get("replicas", 1)):
                        name = f"{provider['name']}/{region['name']}/{pool['name']}/{i}"
                        argv = [
                            python,
                            "-m",
                            "skyfabric.cli",
                            "replica",
                            "--port",
                            str(port),
                            "--served-model-name",
                            pool["model"],
                        ]
                        if pool.get("model_dir"):
                            argv += ["--model-dir", pool["model_dir"]]
                        log_path = self.run_dir / f"replica-{name.replace('/', '-')}.log"
                        health = f"http://127.0.0.1:{port}/health"
                        self.replicas.append(Child(name, argv, health, log_path, env=REPLICA_ENV))
                        urls.append(f"http://127.0.0.1:{port}/v1")
                        port += 1
                    pool["endpoints"] = urls
        data.setdefault("listener", {}).update({"host": self.host, "port": self.port})
        return data

    def start(self, timeout: float = 120.0) -> Path:
        """Start replicas, wait for them, start the gateway, wait for it; returns the resolved fleet file."""
        resolved = self.resolve()
        fleet_file = self.run_dir / "fleet.resolved.yaml"
        fleet_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
        for child in self.replicas:
            child.start()
        self._wait(self.replicas, timeout)
        argv = [
            sys.executable,
            "-m",
            "skyfabric.cli",
            "serve",
            "--config",
            str(fleet_file),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        scheme = "https" if resolved["listener"].get("tls_cert") else "http"
        self.gateway = Child(
            "gateway", argv, f"{scheme}://{self.host}:{self.port}/readyz", self.run_dir / "gateway.log"
        )
        self.gateway.start()
        self._wait([self.gateway], timeout)
        return fleet_file

    def _wait(self, children: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(children)
        while pending:
            for child in list(pending):
                if not child.alive():
                    tail = (
                        child.log_path.read_text(errors="replace")[-2000:] if child.log_path.exists() else ""
                    )
                    raise SkyfabricError(f"{child.name} exited while starting; its log ends:\n{tail}")
                if healthy(child.health_url, 0.5):
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise SkyfabricError(f"not ready after {timeout:.0f}s: {names} (logs in {self.run_dir})")
            if pending:
                time.sleep(0.1)

    def watch_once(self, now: float) -> None:
        """Restart crashed replicas (backoff doubles per restart, capped at 30 s)."""
        for child in self.replicas:
            if child.proc is not None and not child.alive():
                if child.next_start == 0.0:
                    delay = min(30.0, 0.5 * 2**child.restarts)
                    child.next_start = now + delay
                    log.warning(
                        "%s exited with %s; restarting in %.1fs", child.name, child.proc.returncode, delay
                    )
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start()
        if self.gateway is not None and not self.gateway.alive():
            raise SkyfabricError(
                f"the gateway exited with {self.gateway.proc and self.gateway.proc.returncode}"
            )

    def stop(self) -> None:
        """Gateway first (drains clients), then replicas."""
        if self.gateway is not None:
            self.gateway.stop()
        for child in self.replicas:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.terminate()
        for child in self.replicas:
            child.stop()


def run_embedded(fleet: Fleet, host: str, port: int, replica_base_port: int, workers: int) -> int:
    """``skyfabric up``: start, print how to call it, supervise until a signal, stop everything."""
    embedded = EmbeddedFleet(fleet, host, port, replica_base_port, workers)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    try:
        embedded.start()
        print(ready_banner(fleet, host, port, time.monotonic() - started, embedded.run_dir), flush=True)
        while not stopping:
            embedded.watch_once(time.monotonic())
            time.sleep(0.2)
        return 0
    except SkyfabricError as exc:
        print(f"skyfabric up: {exc}", file=sys.stderr)
        return 1
    finally:
        embedded.stop()


def ready_banner(fleet: Fleet, host: str, port: int, seconds: float, run_dir: Path) -> str:
    """What a person needs to start calling the fleet."""
    model = fleet.models[0].name
    key = fleet.api_keys[0].key if fleet.api_keys else "none"
    base = f"{'https' if fleet.listener.tls_cert else 'http'}://{host}:{port}/v1"
    pools = [
        f"  {p.name}/{r.name}/{pool.name}: {pool.replicas if pool.engine == 'local' else len(pool.endpoints)}"
        f" × {pool.engine} on {pool.accelerator}"
        for p in fleet.providers
        for r in p.regions
        for pool in r.pools
    ]
    return "\n".join(
        [
            f"skyfabric is up in {seconds:.1f}s: {base}  (logs: {run_dir})",
            *pools,
            "",
            "Try it:",
            f"  curl {base}/chat/completions -H 'Content-Type: application/json' \\",
            f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", '
            '"content": "Write a function that reverses a string."}], "max_tokens": 64}\'',
            "",
            "  from openai import OpenAI",
            f'  client = OpenAI(base_url="{base}", api_key="{key}")',
            f'  client.chat.completions.create(model="{model}", messages=[{{"role": "user", '
            '"content": "def add(a, b):"}])',
            "",
            "Ctrl-C stops everything.",
        ]
    )
