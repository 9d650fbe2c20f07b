"""TLS termination from the fleet file's `listener` section, through the official SDK verifying a test CA."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import trustme

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import parse_fleet
from skyfabric.gateway.app import Gateway
from skyfabric.gateway.serve import make_listener
from tests.conftest import fleet_data
from tests.support.fake_upstream import FakeUpstream, expected_text


async def test_the_gateway_serves_https_with_the_fleets_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    up = await FakeUpstream("a", tokens=4).start()
    fleet = parse_fleet(fleet_data({"aws": [up]}, listener={"tls_cert": str(cert), "tls_key": str(key)}))
    gateway = Gateway(fleet, fleet_endpoints(fleet))
    listener = make_listener(gateway, fleet.listener)
    port = await listener.start("127.0.0.1", 0, ssl=fleet.listener.ssl_context())
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    try:
        async with httpx.AsyncClient(verify=trusted) as http:
            client = openai.AsyncOpenAI(
                base_url=f"https://localhost:{port}/v1", api_key="sk-x", http_client=http, max_retries=0
            )
            answer = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.choices[0].message.content == expected_text(4)
            stream = await client.completions.create(model="m", prompt="hi", stream=True)
            text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
            assert text == expected_text(4)
            assert (await http.head(f"https://localhost:{port}/")).status_code == 200
        # A client that does not trust the CA refuses the certificate: the port really speaks TLS.
        async with httpx.AsyncClient() as untrusting:
            client = openai.AsyncOpenAI(
                base_url=f"https://localhost:{port}/v1", api_key="sk-x", http_client=untrusting, max_retries=0
            )
            with pytest.raises(openai.APIConnectionError):
                await client.models.list()
        # And plain HTTP on the TLS port gets nothing useful.
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        await listener.stop(0.5)
        await gateway.close()
        await up.stop()


def test_skyfabric_serve_with_workers_terminates_tls_from_the_fleet_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        f"listener: {{port: {port}, tls_cert: {cert}, tls_key: {key}}}\n"
        "models: [{name: m}]\n"
        "providers: [{name: p, regions: [{name: r, pools: [{name: x, accelerator: cpu, engine: vllm,"
        " model: m, endpoints: ['http://127.0.0.1:9/v1']}]}]}]\n"
        "health: {probe_interval: 0}\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "skyfabric.cli", "serve", "--config", str(fleet), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    try:
        deadline, status = time.monotonic() + 30, None
        while time.monotonic() < deadline and status is None:
            try:
                status = httpx.head(f"https://127.0.0.1:{port}/", verify=trusted, timeout=1).status_code
            except httpx.HTTPError:
                time.sleep(0.1)
        assert status == 200
        with pytest.raises(httpx.HTTPError):  # it is TLS, not plain HTTP
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        server.terminate()
        server.wait(10)


async def test_skyfabric_up_checks_and_announces_a_tls_gateway_over_https(tmp_path: Path) -> None:
    import asyncio

    from skyfabric.control.supervisor import healthy, ready_banner

    ca = trustme.CA()
    issued = ca.issue_cert("gateway.example.com")  # names the public host, not the loopback address
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    up = await FakeUpstream("a", tokens=2).start()
    fleet = parse_fleet(fleet_data({"aws": [up]}, listener={"tls_cert": str(cert), "tls_key": str(key)}))
    gateway = Gateway(fleet, fleet_endpoints(fleet))
    listener = make_listener(gateway, fleet.listener)
    port = await listener.start("127.0.0.1", 0, ssl=fleet.listener.ssl_context())
    try:
        assert await asyncio.to_thread(healthy, f"https://127.0.0.1:{port}/readyz")
        assert not await asyncio.to_thread(healthy, f"http://127.0.0.1:{port}/readyz")  # it speaks TLS only
        assert f"https://127.0.0.1:{port}/v1" in ready_banner(fleet, "127.0.0.1", port, 1.0, tmp_path)
    finally:
        await listener.stop(0.1)
        await gateway.close()
        await up.stop()
