"""Active health: probes, load signals from the endpoints' own metrics, and the stall watchdog.

Passive detection (``balancer.record_failure``) needs traffic to fail first. This loop adds what traffic
cannot tell: whether an ejected endpoint is back (half-open probe before any client request is risked on
it), how loaded each endpoint says it is (vLLM's ``num_requests_waiting``), and whether an endpoint has
gone silent while streams are running on it — the signature of a blackholed provider, which produces no
error at all, only silence. A stalled endpoint is ejected and its connections are aborted, so its
streams fail over within ``health.stall`` instead of each waiting out its own idle timeout.

The watchdog's tick never waits on the network: probes run in tasks of their own (owned by the checker,
cancelled when it stops), each bounded by ``probe_timeout``, so a blackholed endpoint's probes — which
time out — cannot delay the stall check that finds it. The loop's own lateness (GC, a busy host) is
measured as the event loop's, from when its sleep was due to when it woke. Silence counts against an
endpoint only while a stream waits on it: a stream held up by its own slow client reads nothing, and
that is not the endpoint's silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from skyfabric.core.errors import ConnectError, UpstreamError, UpstreamTimeout
from skyfabric.gateway.balancer import EndpointState, eject, readmit, record_failure
from skyfabric.protocols.base import UpstreamCall

if TYPE_CHECKING:
    from skyfabric.gateway.proxy import Proxy

log = logging.getLogger("skyfabric.gateway.health")

_VLLM_ENGINES = frozenset({"local", "vllm", "vllm-tpu", "vllm-neuron"})
_METRIC = re.compile(
    rb"^(vllm:num_requests_running|vllm:num_requests_waiting|vllm:kv_cache_usage_perc)"
    rb"(?:\{[^}]*\})?\s+([0-9.eE+-]+)",
    re.M,
)


def stalled(state: EndpointState, now: float, stall: float) -> bool:
    """Streams are committed on the endpoint and it has sent nothing for ``stall`` seconds."""
    return state.streaming > 0 and now - state.last_activity > stall


def parse_load(text: bytes) -> dict[bytes, float]:
    """Sum vLLM's load gauges over their label sets (one per model / engine)."""
    out: dict[bytes, float] = {}
    for name, value in _METRIC.findall(text):
        out[name] = out.get(name, 0.0) + float(value)
    return out


class HealthChecker:
    """The background loop of one gateway process."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.health = proxy.fleet.health
        self.tick = min(0.1, self.health.stall / 4)
        self._last_probe = -1e9
        #: Called with an endpoint a probe has just readmitted (the continuation self-test hooks in here).
        self.on_readmit: Callable[[EndpointState], None] | None = None
        #: Probes running now, by endpoint id: at most one each; cancelled when the loop stops.
        self.probes: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Watch until cancelled; then cancel the probes still running."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                now = self.proxy.clock()
                self.spare_client_bound(now)
                self.watch_stalls(now)
                self.proxy.admission.dispatch_all()
                interval = self.health.probe_interval
                if interval > 0 and now - self._last_probe >= interval:
                    self._last_probe = now
                    self.start_probes()
                due = loop.time() + self.tick
                await asyncio.sleep(self.tick)
                lag = loop.time() - due  # the event loop's lateness only: nothing else is awaited here
                if lag > self.health.stall / 2:
                    # We were paused ourselves (GC, a busy host): the silence we would measure is ours.
                    log.warning("health loop ran %.2fs late: stall checks skipped this round", lag)
                    now = self.proxy.clock()
                    for state in self.proxy.states.values():
                        state.last_activity = max(state.last_activity, now)
        finally:
            await self.stop_probes()

    def spare_client_bound(self, now: float) -> None:
        """Restart the silence clock of endpoints whose streams all wait on their clients, not on them.

        A client that stops reading holds its relay in ``yield``: nothing is read from the endpoint, which
        is then silent through no fault of its own (back-pressure). Only a stream waiting for the
        endpoint's next bytes (``awaited``, set by the HTTP client) lets its silence count.
        """
        for state in self.proxy.states.values():
            if state.streaming > 0 and not any(conn.awaited for conn in state.inflight):
                state.last_activity = max(state.last_activity, now)

    def start_probes(self) -> None:
        """Start one round of probes, one task per endpoint, skipping those whose last probe still runs."""
        loop = asyncio.get_running_loop()
        for state in self.proxy.states.values():
            key = state.endpoint.id
            if key not in self.probes and not state.draining:  # a drained endpoint is going away
                task = loop.create_task(self.probe(state), name=f"probe {key}")
                self.probes[key] = task
                task.add_done_callback(functools.partial(self._probe_done, key))

    def _probe_done(self, key: str, task: asyncio.Task[None]) -> None:
        if self.probes.get(key) is task:
            del self.probes[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("probe of %s failed unexpectedly", key, exc_info=task.exception())

    async def stop_probes(self) -> None:
        """Cancel the probes still running and wait for them to end."""
        tasks = list(self.probes.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def watch_stalls(self, now: float) -> None:
        """Eject endpoints gone silent under committed streams; abort their connections.

        Every streaming endpoint falling silent at the same moment is more likely our own network or
        host than every cloud at once: then nothing is ejected (each stream still has its idle timeout).
        """
        streaming = [s for s in self.proxy.states.values() if s.streaming > 0 and s.available(now)]
        silent = [s for s in streaming if stalled(s, now, self.health.stall)]
        if len(silent) >= 2 and len(silent) == len(streaming):
            log.warning("all %d streaming endpoints silent at once: not ejecting any", len(silent))
            return
        for state in silent:
            if state.available(now):
                log.warning(
                    "%s silent for %.2fs with %d streams: ejecting",
                    state.endpoint.id,
                    now - state.last_activity,
                    state.streaming,
                )
                self.proxy.eject_now(state, now, reason="stall")

    async def probe(self, state: EndpointState) -> None:
        """One probe, bounded as a whole by ``probe_timeout`` (connect, answer and body together).

        Readmits a half-open endpoint that answers, counts a failure otherwise.
        """
        proxy, endpoint = self.proxy, state.endpoint
        now = proxy.clock()
        if not state.available(now) and not (state.needs_probe and now >= state.ejected_until):
            return  # still serving its ejection time
        timeout = self.health.probe_timeout
        half_open = state.needs_probe  # a probe begun before an ejection must not end it
        try:
            try:
                async with asyncio.timeout(timeout):
                    await self._ask(state, now + timeout)
            except TimeoutError:
                raise UpstreamTimeout("probe", timeout, endpoint=endpoint.id) from None
        except UpstreamError as exc:
            if half_open:
                eject(state, proxy.clock(), proxy.outlier)  # still down: wait longer
                if isinstance(exc, ConnectError | UpstreamTimeout) and state.inflight:
                    # Ejected for one request's failure, it now answers no probe either: what is still in
                    # flight there (a whole answer, which no stall watchdog sees) is stuck in a blackhole.
                    # Move it now rather than after its response timeout (minutes).
                    log.warning(
                        "%s answers no probe: moving its %d requests in flight",
                        endpoint.id,
                        len(state.inflight),
                    )
                    for conn in list(state.inflight):
                        conn.abort()
            elif record_failure(state, proxy.clock(), proxy.outlier, hard=isinstance(exc, ConnectError)):
                proxy.after_ejection(state, f"probe: {exc}")
            return
        state.probed_ok = now  # when it began: a probe begun before a failure says nothing after it
        if half_open and state.needs_probe:
            log.warning("%s answered its probe: readmitting with slow start", endpoint.id)
            readmit(state, proxy.clock())
            if self.on_readmit is not None:
                self.on_readmit(state)
        if self.health.load_signals and endpoint.engine in _VLLM_ENGINES:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.read_load(state)

    async def _ask(self, state: EndpointState, deadline: float) -> None:
        """The probe request itself; raises :class:`UpstreamError` when the endpoint does not answer well."""
        proxy, endpoint = self.proxy, state.endpoint
        timeout = self.health.probe_timeout
        if self.health.probe == "completion" and proxy.backend(endpoint).family == "openai":
            body = b'{"model":"%s","prompt":"def","max_tokens":1}' % endpoint.upstream_model.encode()
            headers = [(b"content-type", b"application/json"), *proxy.auth_headers(endpoint)]
            resp = await proxy.open(state, UpstreamCall(b"/completions", headers, body), False, deadline)
        else:
            resp = await proxy.client.request(
                endpoint.origin,
                b"GET",
                endpoint.base_path.encode() + b"/models",
                proxy.auth_headers(endpoint),
                b"",
                connect_timeout=timeout,
                first_byte_timeout=timeout,
                endpoint=endpoint.id,
            )
        await resp.read(timeout)
        if resp.status >= 500:
            raise UpstreamError(f"probe answered {resp.status}", endpoint=endpoint.id)

    async def read_load(self, state: EndpointState) -> None:
        """Read the endpoint's own view of its load from its vLLM-style ``/metrics``."""
        endpoint, proxy = state.endpoint, self.proxy
        timeout = self.health.probe_timeout
        with contextlib.suppress(UpstreamError):
            resp = await proxy.client.request(
                endpoint.origin,
                b"GET",
                b"/metrics",
                proxy.auth_headers(endpoint),
                b"",
                connect_timeout=timeout,
                first_byte_timeout=timeout,
                endpoint=endpoint.id,
            )
            text = await resp.read(timeout)
            if resp.status == 200:
                load = parse_load(text)
                state.reported_running = load.get(b"vllm:num_requests_running", 0.0)
                state.reported_waiting = load.get(b"vllm:num_requests_waiting", 0.0)
                state.reported_kv_usage = load.get(b"vllm:kv_cache_usage_perc", 0.0)
