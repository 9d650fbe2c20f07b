"""Fixtures shared by the suite: fake upstreams and an in-process gateway on a loopback port."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import parse_fleet
from skyfabric.gateway.app import Gateway
from skyfabric.gateway.serve import make_listener
from skyfabric.http.server import Listener
from tests.support.fake_upstream import FakeUpstream


@dataclass
class RunningGateway:
    gateway: Gateway
    listener: Listener
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.base_url, api_key="sk-test-key-0001", max_retries=0, **kwargs)

    def claude(self, **kwargs: Any) -> Any:
        """The Anthropic SDK's client for the gateway's ``/v1/messages``."""
        from anthropic import AsyncAnthropic

        return AsyncAnthropic(base_url=self.root, api_key="sk-test-key-0001", max_retries=0, **kwargs)


MakeGateway = Callable[..., Awaitable[RunningGateway]]


def _credentials(upstream: Any) -> dict[str, str]:
    """The pool's ``api_key_env`` for an upstream that checks a key (set in the environment here)."""
    key = getattr(upstream, "api_key", None)
    if not key:
        return {}
    name = f"SKYFABRIC_TEST_KEY_{abs(hash(key)) % 10**8}"
    os.environ[name] = key
    return {"api_key_env": name}


def fleet_data(
    providers: dict[str, list[FakeUpstream]] | dict[str, dict[str, list[FakeUpstream]]],
    **extra: Any,
) -> dict[str, Any]:
    """A fleet whose model ``m`` (alias ``alias-m``) is served by the given upstreams, one pool per region."""
    data: dict[str, Any] = {
        "models": extra.pop("models", [{"name": "m", "aliases": ["alias-m"]}]),
        "providers": [],
    }
    for provider, regions in providers.items():
        if isinstance(regions, list):
            regions = {"r1": regions}
        data["providers"].append(
            {
                "name": provider,
                "regions": [
                    {
                        "name": region,
                        "pools": [
                            {
                                "name": "pool",
                                "accelerator": "cpu",
                                # an upstream that speaks another protocol says so (the Anthropic stand-in)
                                "engine": getattr(ups[0], "engine", "vllm"),
                                "model": getattr(ups[0], "fleet_model", None)
                                or getattr(ups[0], "model", "m"),
                                **(
                                    {"upstream_model": ups[0].model}
                                    if getattr(ups[0], "fleet_model", None)
                                    else {}
                                ),
                                "endpoints": [u.url for u in ups],
                                "continuation": all(u.can_continue for u in ups),
                                **_credentials(ups[0]),
                                # engine-specific settings (a managed cloud's section), when it has any
                                **getattr(ups[0], "pool_extra", {}),
                                # engine-specific pool fields a stand-in asks for (Vertex's `vertex:`)
                                **getattr(ups[0], "pool_settings", {}),
                            }
                        ],
                    }
                    for region, ups in regions.items()
                ],
            }
        )
    data.update(extra)
    # The continuation self-test sends requests at start; tests that script upstreams opt in to it.
    data["health"] = {"selftest": False, **data.get("health", {})}
    # The suite runs with the dashboard and the GenAI metrics on (they are off by default for speed).
    data["observability"] = {"dashboard": True, "metrics": True, **data.get("observability", {})}
    return data


@pytest.fixture
async def make_gateway() -> AsyncIterator[MakeGateway]:
    listeners: list[Listener] = []
    gateways: list[Gateway] = []
    upstreams: list[FakeUpstream] = []

    async def make(providers: dict[str, Any], **extra: Any) -> RunningGateway:
        for regions in providers.values():
            groups = regions.values() if isinstance(regions, dict) else [regions]
            for ups in groups:
                for up in ups:
                    if not up.port:
                        await up.start()
                        upstreams.append(up)
        fleet = parse_fleet(fleet_data(providers, **extra))
        gateway = Gateway(fleet, fleet_endpoints(fleet))
        await gateway.start()
        gateways.append(gateway)
        listener = make_listener(gateway, fleet.listener)
        port = await listener.start("127.0.0.1", 0)
        listeners.append(listener)
        return RunningGateway(gateway, listener, port)

    yield make
    for listener in listeners:
        await listener.stop(grace=0.5)
    for gateway in gateways:
        await gateway.close()
    for up in upstreams:
        await up.stop()
