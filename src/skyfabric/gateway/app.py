"""The gateway's service: routes requests by path and turns client mistakes into clear 4xx answers."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import ClientError
from skyfabric.core.fleet import Fleet
from skyfabric.gateway import pipeline
from skyfabric.gateway.admin import handle_admin
from skyfabric.gateway.api_errors import client_error_response, error_response, frontend_client_error
from skyfabric.gateway.counting import count_tokens
from skyfabric.gateway.instance import WorkerPeers, families_of
from skyfabric.gateway.operations import Operations
from skyfabric.gateway.proxy import Proxy
from skyfabric.gateway.selftest import SelfTests
from skyfabric.gateway.telemetry import install
from skyfabric.http.messages import Request, Response, StreamResponse
from skyfabric.protocols.frontends.anthropic import AnthropicFrontend, models_body
from skyfabric.protocols.frontends.openai import OpenAIFrontend

_OK = Response(200, b'{"status":"ok"}')
_ROOT = Response(200, b'{"service":"skyfabric","status":"ok"}')


class Gateway:
    """The whole data plane as one service (an async function from request to response)."""

    def __init__(
        self,
        fleet: Fleet,
        endpoints: list[Endpoint],
        *,
        clock: Callable[[], float] = time.monotonic,
        fleet_path: str | Path | None = None,
    ):
        self.fleet = fleet
        self.endpoints = endpoints
        #: The fleet file to watch for endpoint changes (discovery), when the gateway was started from one.
        self.fleet_path = fleet_path
        self.proxy = Proxy(fleet, endpoints, clock=clock)
        #: The continuation self-tests (at start, and after each readmission by a probe).
        self.selftests = SelfTests(self.proxy)
        self.keys = {k.key.encode() for k in fleet.api_keys}
        #: The client protocols' frontends.
        self.openai = OpenAIFrontend()
        self.anthropic = AnthropicFrontend()
        #: Steps between parsing and admission (keys and limits plug in here; see ``gateway/pipeline.py``).
        self.filters: list[pipeline.Filter] = []
        # -- operations (gateway/operations.py): each part wired here, once --
        self.operations = Operations(self.proxy, fleet_path)
        #: Managed keys (None: only the fleet file's ``api_keys``, checked against ``self.keys``).
        self.keyring = self.operations.keyring
        if self.operations.keys_filter is not None:
            self.filters.append(self.operations.keys_filter)
        if self.operations.admin_secret is not None:
            self.keys.add(self.operations.admin_secret.encode())  # the admin credential opens the dashboard
        self._models_body = self.proxy.model_list()
        self.model_names = sorted(n for m in fleet.models for n in [m.name, *m.aliases])
        self._anthropic_models = models_body(self.model_names)
        self._routes: dict[tuple[bytes, bytes], Callable[[Request], Any]] = {
            (b"POST", b"/v1/chat/completions"): self.chat_completions,
            (b"POST", b"/v1/completions"): self.completions,
            (b"POST", b"/v1/messages"): self.messages,
            (b"POST", b"/v1/messages/count_tokens"): self.count_tokens,
            (b"GET", b"/v1/models"): self.models,
            (b"GET", b"/healthz"): self.healthz,
            (b"GET", b"/readyz"): self.readyz,
            (b"GET", b"/metrics"): self.metrics,
            (b"GET", b"/"): self.root,
        }
        # HEAD wherever GET (the listener drops the body); clients probe `HEAD /` before they start.
        for method, path in list(self._routes):
            if method == b"GET":
                self._routes[(b"HEAD", path)] = self._routes[(method, path)]
        allowed: dict[bytes, list[bytes]] = {}
        for method, path in self._routes:
            allowed.setdefault(path, []).append(method)
        self._allow = {path: b", ".join(sorted(methods)) for path, methods in allowed.items()}
        admin = self.operations.admin_secret
        self.dashboard = install(
            self.proxy, self.keys, self.operations.observers(), admin.encode() if admin is not None else None
        )
        self.traceparent = fleet.observability.tracing.enabled
        #: The instance's other workers (``--workers N``): /metrics and the dashboard sum over them.
        self.peers: WorkerPeers | None = None

    async def start(self) -> None:
        """Start the background loops: health (probes, load signals, stall watchdog) and discovery."""
        from skyfabric.gateway.discovery import Discovery
        from skyfabric.gateway.health import HealthChecker

        await self.operations.start()
        # Adapters with a life of their own (Vertex's token refresh) start first: the first request, probe
        # or self-test must find their credentials ready.
        for backend in self.proxy.backends.values():
            start = getattr(backend, "start", None)
            if start is not None:
                started = start(self.endpoints)
                if inspect.isawaitable(started):
                    await started
        checker = HealthChecker(self.proxy)
        discovery = None
        pools = [p for provider in self.fleet.providers for r in provider.regions for p in r.pools]
        if self.fleet_path is not None or any(p.discovery for p in pools):
            # Built first: a discovery source that cannot work (ConfigError) stops the start cleanly.
            discovery = Discovery(self.proxy, self.fleet, fleet_path=self.fleet_path, probe=checker.probe)
        if self.fleet.health.selftest:
            checker.on_readmit = self.selftests.after_readmission
            self.selftests.start()
        self._health = asyncio.get_running_loop().create_task(checker.run())
        if discovery is not None:
            await discovery.step()  # serve with the discovered endpoints from the first request on
            self._discovery = asyncio.get_running_loop().create_task(discovery.run())

    async def close(self) -> None:
        """Stop the health and discovery loops and close idle upstream connections."""
        for name in ("_discovery", "_health"):
            task = getattr(self, name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.selftests.close()
        await self.operations.close()  # after the listener has finished the streams in flight
        for backend in self.proxy.backends.values():
            stop = getattr(backend, "close", None)
            if stop is not None:
                stopped = stop()  # a token refresher's thread (sync) or task (async)
                if inspect.isawaitable(stopped):
                    await stopped
        if self.dashboard is not None:
            await self.dashboard.hub.close()
        pipeline = getattr(self.proxy.sampler, "pipeline", None)
        if pipeline is not None:  # spans finished since the last batch are exported, not lost
            await asyncio.to_thread(pipeline.shutdown)
        self.proxy.client.close()

    async def __call__(self, request: Request) -> Response | StreamResponse:
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            if self.operations.admin is not None and request.path.startswith(b"/admin/"):
                return await handle_admin(self.operations.admin, request)
            if self.dashboard is not None and request.path.startswith(b"/dashboard"):
                return await self.dashboard.handle(request)
            allow = self._allow.get(request.path)
            if allow is not None:
                return error_response(
                    405,
                    f"method {request.method.decode()} not allowed on {request.path.decode()}",
                    headers=[(b"allow", allow)],
                )
            return error_response(404, f"no route for {request.path.decode(errors='replace')}")
        try:
            result: Response | StreamResponse = await handler(request)
            return result
        except ClientError as exc:
            return client_error_response(exc)

    # -- routes -----------------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response | StreamResponse:
        return await pipeline.inference(self, request, self.openai)

    async def completions(self, request: Request) -> Response | StreamResponse:
        return await pipeline.inference(self, request, self.openai)

    async def messages(self, request: Request) -> Response | StreamResponse:
        return await pipeline.inference(self, request, self.anthropic)

    async def count_tokens(self, request: Request) -> Response:
        try:
            pipeline.authenticate(self, request)
            parsed = self.anthropic.parse_count_tokens(request.body, request.headers)
            model = pipeline.resolve_model(self, parsed)
            return await count_tokens(
                self.proxy, self.anthropic, parsed, model, pipeline.deadline(self, request)
            )
        except ClientError as exc:
            return frontend_client_error(self.anthropic, exc)

    async def models(self, request: Request) -> Response:
        """Both shapes: Anthropic's for its clients (they send ``anthropic-version``), else OpenAI's."""
        anthropic = request.header(b"anthropic-version") is not None
        try:
            pipeline.authenticate(self, request)
        except ClientError as exc:
            return frontend_client_error(self.anthropic if anthropic else self.openai, exc)
        return Response(200, self._anthropic_models if anthropic else self._models_body)

    async def healthz(self, request: Request) -> Response:
        return _OK

    async def root(self, request: Request) -> Response:
        return _ROOT

    async def metrics(self, request: Request) -> Response:
        peers = self.peers
        if peers is None:
            return Response(200, self.proxy.metrics.render(), content_type=b"text/plain; version=0.0.4")
        body = await peers.render_metrics(self.proxy.metrics.registry)
        # Which worker merged this scrape (the figures are the instance's either way): for debugging.
        worker = [(b"x-skyfabric-worker", str(peers.worker).encode())]
        return Response(200, body, worker, content_type=b"text/plain; version=0.0.4")

    def join_workers(self, peers: WorkerPeers) -> None:
        """Serve ``/metrics`` and the dashboard for the whole instance (``peers``: its other workers)."""
        self.peers = peers
        registry = self.proxy.metrics.registry
        peers.providers["metrics"] = lambda: families_of(registry)
        if self.dashboard is not None:
            self.dashboard.join_workers(peers)

    async def readyz(self, request: Request) -> Response:
        now = self.proxy.clock()
        ready = {
            name: sum(1 for s in cluster.states if s.available(now))
            for name, cluster in self.proxy.clusters.items()
        }
        detail: dict[str, Any] = {"ready": any(ready.values()), "endpoints_available": ready}
        operations = self.operations.readiness()
        if operations:
            detail["operations"] = operations
        body = orjson.dumps(detail)
        return Response(200 if any(ready.values()) else 503, body)
