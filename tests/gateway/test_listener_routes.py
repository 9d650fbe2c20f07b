"""What clients probe before they start: `HEAD /`, HEAD wherever GET, 405 with `Allow`, errors in shape."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from skyfabric.core.errors import ConfigError
from skyfabric.core.fleet import Listener as ListenerSettings
from skyfabric.core.fleet import parse_fleet
from skyfabric.gateway.app import Gateway
from skyfabric.gateway.serve import make_listener
from tests.conftest import MakeGateway, fleet_data
from tests.support.fake_upstream import FakeUpstream


async def test_head_and_get_on_the_root_answer_200(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]})
    async with httpx.AsyncClient(base_url=gw.root) as client:
        got = await client.get("/")
        head = await client.head("/")
    assert got.status_code == 200 and got.json()["status"] == "ok"
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(got.content))


async def test_head_is_allowed_wherever_get_is_and_sends_no_body(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]})
    auth = {"authorization": "Bearer sk-test-key-0001"}
    async with httpx.AsyncClient(base_url=gw.root, headers=auth) as client:
        for path in ("/v1/models", "/healthz", "/readyz", "/metrics"):
            got = await client.get(path)
            head = await client.head(path)
            assert head.status_code == got.status_code, path
            assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
        # The same connection still works after the bodiless answers (no stray bytes were sent).
        assert (await client.get("/v1/models")).json()["data"][0]["id"] == "m"


async def test_a_wrong_method_gets_405_with_allow_in_openais_shape(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]})
    async with httpx.AsyncClient(base_url=gw.root) as client:
        wrong = await client.post("/v1/models", json={})
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
        assert wrong.json()["error"]["type"] == "invalid_request_error"
        wrong = await client.get("/v1/chat/completions")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        assert (await client.delete("/")).headers["allow"] == "GET, HEAD"
        assert (await client.get("/nowhere")).status_code == 404


async def test_the_listeners_own_errors_come_in_openais_shape(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(200))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    async with asyncio.timeout(3):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431") and b"content-type: application/json" in head
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and "header fields" in error["message"]


def test_every_listener_setting_reaches_the_listener() -> None:
    settings = ListenerSettings(
        max_body_bytes=2048,
        max_request_line_bytes=1000,
        max_header_bytes=5000,
        max_headers=20,
        header_timeout=3.0,
        body_timeout=4.0,
        write_timeout=5.0,
        keepalive_timeout=6.0,
        max_connections=70,
    )
    up = FakeUpstream("a")
    up.port = 9
    fleet = parse_fleet(fleet_data({"aws": [up]}))
    listener = make_listener(Gateway(fleet, []), settings)
    for name in ListenerSettings.model_fields:
        if name in ("host", "port", "tls_cert", "tls_key"):  # used by serve_fleet's start and ssl_context
            continue
        assert getattr(listener, name) == getattr(settings, name), name


@pytest.mark.parametrize(
    ("listener", "says"),
    [
        ({"tls_cert": "/etc/hostname"}, "tls_cert and tls_key go together"),
        ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.key"}, "no readable file"),
        ({"tls_cert": "/etc/hostname", "tls_key": "/etc/hostname"}, "cannot be loaded"),
        ({"max_headers": 0}, "max_headers"),
        ({"header_timeout": 0}, "header_timeout"),
        ({"max_connections": 0}, "max_connections"),
        ({"keep_alive": 5}, "keep_alive"),
    ],
)
def test_listener_settings_are_validated_at_load(listener: dict[str, object], says: str) -> None:
    up = FakeUpstream("a")
    up.port = 9
    with pytest.raises(ConfigError, match=says):
        parse_fleet(fleet_data({"aws": [up]}, listener=listener))
