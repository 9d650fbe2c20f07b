"""The gateway's service: routes requests by path and turns client mistakes into clear 4xx answers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import AuthenticationError, ClientError, InvalidRequest, UnknownModel
from skyfabric.core.fleet import Fleet
from skyfabric.gateway.admission import parse_priority
from skyfabric.gateway.api_errors import client_error_response, error_response
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.proxy import Proxy
from skyfabric.gateway.selftest import SelfTests
from skyfabric.gateway.telemetry import install
from skyfabric.http.messages import Request, Response, StreamResponse

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
        #: The fleet file to watch for endpoint changes (discovery), when the gateway was started from one.
        self.fleet_path = fleet_path
        self.proxy = Proxy(fleet, endpoints, clock=clock)
        #: The continuation self-tests (at start, and after each readmission by a probe).
        self.selftests = SelfTests(self.proxy)
        self.keys = {k.key.encode() for k in fleet.api_keys}
        self._models_body = self.proxy.model_list()
        self._model_names = sorted(n for m in fleet.models for n in [m.name, *m.aliases])
        self._routes: dict[tuple[bytes, bytes], Callable[[Request], Any]] = {
            (b"POST", b"/v1/chat/completions"): self.chat_completions,
            (b"POST", b"/v1/completions"): self.completions,
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
        self.dashboard = install(self.proxy, self.keys)
        self._traceparent = fleet.observability.tracing.enabled

    async def start(self) -> None:
        """Start the background loops: health (probes, load signals, stall watchdog) and discovery."""
        from skyfabric.gateway.discovery import Discovery
        from skyfabric.gateway.health import HealthChecker

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
        if self.dashboard is not None:
            await self.dashboard.hub.close()
        self.proxy.client.close()

    async def __call__(self, request: Request) -> Response | StreamResponse:
        handler = self._routes.get((request.method, request.path))
        if handler is None:
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
        ctx = self._context(request, "chat")
        return await self.proxy.forward(ctx)

    async def completions(self, request: Request) -> Response | StreamResponse:
        ctx = self._context(request, "completions")
        return await self.proxy.forward(ctx)

    async def models(self, request: Request) -> Response:
        self._authenticate(request)
        return Response(200, self._models_body)

    async def healthz(self, request: Request) -> Response:
        return _OK

    async def root(self, request: Request) -> Response:
        return _ROOT

    async def metrics(self, request: Request) -> Response:
        return Response(200, self.proxy.metrics.render(), content_type=b"text/plain; version=0.0.4")

    async def readyz(self, request: Request) -> Response:
        now = self.proxy.clock()
        ready = {
            name: sum(1 for s in cluster.states if s.available(now))
            for name, cluster in self.proxy.clusters.items()
        }
        body = orjson.dumps({"ready": any(ready.values()), "endpoints_available": ready})
        return Response(200 if any(ready.values()) else 503, body)

    # -- parsing ----------------------------------------------------------------------------------------

    def _authenticate(self, request: Request) -> None:
        if not self.keys:
            return
        value = request.header(b"authorization")
        key = value[7:].strip() if value and value[:7].lower() == b"bearer " else request.header(b"x-api-key")
        if key is None:
            raise AuthenticationError("no API key: send `Authorization: Bearer <key>`")
        if key not in self.keys:
            raise AuthenticationError("the API key is not valid", code="invalid_api_key")

    def _context(self, request: Request, kind: str) -> RequestContext:
        self._authenticate(request)
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("you must provide a model parameter", param="model")
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise InvalidRequest("`messages` must be a non-empty array of messages", param="messages")
            for i, message in enumerate(messages):
                if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                    raise InvalidRequest(
                        f"messages[{i}] must be an object with a `role`", param=f"messages.{i}"
                    )
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str | list):
                raise InvalidRequest("`prompt` must be a string or an array", param="prompt")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise InvalidRequest("`stream` must be a boolean", param="stream")
        canonical = self.fleet.canonical(model)
        if canonical is None:
            raise UnknownModel(
                f"The model `{model}` does not exist here. Models: {', '.join(self._model_names)}",
                param="model",
                code="model_not_found",
            )
        total = self.fleet.timeouts.total
        asked = request.header(b"x-skyfabric-deadline")
        if asked is not None:
            try:
                total = min(total, float(asked))
            except ValueError:
                raise InvalidRequest("x-skyfabric-deadline must be a number of seconds") from None
            if total <= 0:
                raise InvalidRequest("x-skyfabric-deadline must be positive")
        ctx = RequestContext(kind, body, request.body, canonical, stream, self.proxy.clock() + total)
        priority = request.header(b"x-skyfabric-priority")
        if priority is not None:
            ctx.priority = parse_priority(priority)
        if self._traceparent:
            ctx.traceparent = request.header(b"traceparent")
        return ctx
