"""TLS termination from the fleet file's `listener` section, through the official SDK verifying a test CA."""

from __future__ import annotations

import ssl
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
