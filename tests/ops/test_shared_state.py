"""Ejections shared between gateway processes through Redis pub/sub; Redis down: each works alone."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from skyfabric.ops.shared_state import Ejection, decode, encode
from tests.support.gateway_proc import fleet_file, start_gateway, start_stub, stop
from tests.support.private_redis import free_port

DEAD = "http://127.0.0.1:9/v1"  # nothing listens: connection refused, a hard failure that ejects at once


def test_messages_are_versioned_and_an_instance_ignores_its_own() -> None:
    wire = encode(Ejection("p/r/x/0", 12.5, "ConnectError"), "me", 1)
    assert decode(wire, "me") is None
    got = decode(wire, "other")
    assert got is not None and (got.endpoint, got.remaining) == ("p/r/x/0", 12.5)
    assert decode(wire.replace(b'"v":1', b'"v":2'), "other") is None
    assert decode(b"not json", "other") is None
    assert decode(wire.replace(b"12.5", b"-1"), "other") is None


def readyz(port: int) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()
    return body


def available(port: int) -> int:
    return int(readyz(port)["endpoints_available"]["m"])


def start_redis(port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (
            subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip()
            == b"PONG"
        ):
            return proc
        time.sleep(0.05)
    raise AssertionError("private redis-server did not start")


def wait_for(check: Any, within: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"not within {within}s: {what}")


@pytest.mark.slow
def test_an_ejection_learnt_by_one_gateway_reaches_the_other_within_a_second(tmp_path: Path) -> None:
    redis_port, stub_port, a_port, b_port = free_port(), free_port(), free_port(), free_port()
    redis = start_redis(redis_port, tmp_path)
    stub = start_stub(stub_port)
    shared = {
        "keys": False,
        "redis": f"redis://127.0.0.1:{redis_port}/0",
        "shared_state": {"reconnect_interval": 0.2},
    }
    fleet = fleet_file(
        tmp_path / "fleet.yaml",
        [f"http://127.0.0.1:{stub_port}/v1", DEAD],
        operations=shared,
        # No probes: B can only learn of the dead endpoint from A. Long ejections: it stays out meanwhile.
        health={"selftest": False, "probe_interval": 0, "base_ejection": 30, "max_ejection": 60},
    )
    a = start_gateway(fleet, a_port, tmp_path / "a.log")
    b = start_gateway(fleet, b_port, tmp_path / "b.log")
    try:
        for port in (a_port, b_port):
            wait_for(
                lambda p=port: readyz(p)["operations"]["shared_state"]["redis"] == "connected", 5, "connected"
            )
        assert available(a_port) == available(b_port) == 2
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        while available(a_port) == 2:  # A meets the dead endpoint (and retries on the live one)
            assert httpx.post(f"http://127.0.0.1:{a_port}/v1/chat/completions", json=body).status_code == 200
        took = wait_for(lambda: available(b_port) == 1, 1.0, "B ejects the endpoint A found dead")
        time.sleep(0.3)  # give an echo, were there one, time to travel
        a_state, b_state = (readyz(p)["operations"]["shared_state"] for p in (a_port, b_port))
        assert (a_state["published"], a_state["applied"]) == (1, 0)
        assert (b_state["published"], b_state["applied"]) == (0, 1)  # applied, never re-published
        assert "p/r/x/1" in (tmp_path / "b.log").read_text()
        print(f"ejection shared in {took * 1000:.0f} ms")

        # Redis goes away: both keep serving, alone, and say so; it returns: they share again.
        redis.kill()
        redis.wait(5)
        for port in (a_port, b_port):
            wait_for(lambda p=port: "alone" in readyz(p)["operations"]["shared_state"]["redis"], 8, "alone")
            assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body).status_code == 200
        assert "works alone" in (tmp_path / "a.log").read_text()
        redis = start_redis(redis_port, tmp_path)
        for port in (a_port, b_port):
            wait_for(
                lambda p=port: readyz(p)["operations"]["shared_state"]["redis"] == "connected", 5, "back"
            )
    finally:
        for proc in (a, b, stub, redis):
            stop(proc)
