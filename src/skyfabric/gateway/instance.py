"""The whole instance's figures when it runs as several workers: ``/metrics`` and the dashboard fleet-wide.

With ``skyfabric serve --workers N`` the kernel hands each connection to one of N processes
(SO_REUSEPORT), and each counts only what it routed. A scrape or a dashboard lands on one of them, so
without this each would show a different fraction of the truth. Here every worker also listens on a Unix
socket in a run directory the supervisor made for the instance (``w<index>.sock``); the worker that
answers a scrape — or ticks a dashboard — asks its peers for their snapshot at that moment and merges it
with its own. Nothing is shared or written on the request path: the cost is one round trip per peer per
scrape (per dashboard tick while one is open), on loopback, off the hot path.

Why ask peers at scrape time rather than have workers publish snapshots periodically: the answer is
exact for everything counted before the scrape (a test can check exact sums, an operator never sees a
counter lag), and an idle instance does no work at all. A peer that does not answer within
``PEER_TIMEOUT`` is left out of that answer and ``skyfabric_workers_reporting`` says how many were
counted, so a partial figure is never mistaken for a whole one.

Merging follows Prometheus' semantics: counters and histograms (bucket by bucket, ``_sum``, ``_count``)
are summed; gauges that are amounts (requests in flight, queued, the retry budget) are summed; gauges
that are the same in every worker (a pool's price, what discovery found) are taken once; a gauge that is
each worker's own judgement (``skyfabric_endpoint_available``: each worker ejects on what it saw) gets a
``worker`` label instead, since neither a sum nor a pick would be true.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger("skyfabric.gateway")

#: Seconds a peer has to answer before a scrape goes on without it.
PEER_TIMEOUT = 1.0
#: Gauges whose value is an amount: the instance's is the sum of its workers'.
SUMMED_GAUGES = frozenset(
    {
        "skyfabric_endpoint_outstanding",
        "skyfabric_admission_queued",
        "skyfabric_retry_budget_active_requests",
        "skyfabric_retry_budget_active_retries",
        "skyfabric_retry_budget_limit",
    }
)
#: Gauges every worker reports alike (configuration, what discovery found): taken once.
SAME_GAUGES = frozenset({"skyfabric_pool_cost_usd_per_hour", "skyfabric_discovery_endpoints"})
#: Any other gauge is a worker's own judgement and is labelled by worker.

Sample = tuple[str, dict[str, str], float]
Family = tuple[str, str, str, list[Sample]]


def families_of(registry: Collector | CollectorRegistry) -> list[Family]:
    """The registry's metric families now, as plain data (name, type, help, samples)."""
    out: list[Family] = []
    for metric in registry.collect():
        samples = [(s.name, dict(s.labels), float(s.value)) for s in metric.samples]
        out.append((metric.name, metric.type, metric.documentation, samples))
    return out


def merge(workers: list[tuple[int, list[Family]]]) -> list[Metric]:
    """The instance's families from each worker's ``(index, families)``, by the rules above."""
    order: list[str] = []
    meta: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index, families in workers:
        for name, kind, doc, samples in families:
            if name not in meta:
                order.append(name)
                meta[name] = (kind, doc)
                values[name] = {}
            table = values[name]
            per_worker = kind == "gauge" and name not in SUMMED_GAUGES and name not in SAME_GAUGES
            for sample, labels, value in samples:
                if per_worker:
                    labels = {**labels, "worker": str(index)}
                key = (sample, tuple(sorted(labels.items())))
                if kind == "gauge" and name in SAME_GAUGES:
                    table[key] = max(table.get(key, value), value)
                else:
                    table[key] = table.get(key, 0.0) + value
    out = []
    for name in order:
        kind, doc = meta[name]
        metric = Metric(name, doc, kind)
        for (sample, pairs), value in values[name].items():
            metric.add_sample(sample, dict(pairs), value)
        out.append(metric)
    return out


class _Merged(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


class WorkerPeers:
    """This worker's place among the instance's workers: serves its snapshots, gathers the others'.

    ``providers`` maps a request name (``metrics``, ``dashboard``) to a function returning this worker's
    snapshot as JSON-ready data; peers ask for one by name.
    """

    def __init__(self, run_dir: str | Path, worker: int, workers: int) -> None:
        self.run_dir = Path(run_dir)
        self.worker = worker
        self.workers = workers
        self.providers: dict[str, Callable[[], Any]] = {}
        self._server: asyncio.AbstractServer | None = None

    def path(self, worker: int) -> Path:
        """The Unix socket worker ``worker`` answers on."""
        return self.run_dir / f"w{worker}.sock"

    async def start(self) -> None:
        """Listen for peers' requests (before the listener takes clients: a scrape may come at once)."""
        path = self.path(self.worker)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a previous run's worker with this index
        self._server = await asyncio.start_unix_server(self._answer, path=str(path))

    async def close(self) -> None:
        """Stop answering; the last worker out removes the run directory (the supervisor does too, but
        a supervisor killed outright cannot, and its workers still stop on SIGTERM: PR_SET_PDEATHSIG)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.path(self.worker).unlink()
            with contextlib.suppress(OSError):  # not empty: another worker is still there
                self.run_dir.rmdir()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            name = (await asyncio.wait_for(reader.readline(), PEER_TIMEOUT)).strip().decode()
            provider = self.providers.get(name)
            writer.write(orjson.dumps(provider() if provider is not None else None))
            await writer.drain()
        except (OSError, TimeoutError, UnicodeDecodeError) as exc:
            log.debug("peer request failed: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _ask(self, worker: int, name: str) -> Any:
        reader, writer = await asyncio.open_unix_connection(str(self.path(worker)))
        try:
            writer.write(name.encode() + b"\n")
            await writer.drain()
            return orjson.loads(await reader.read())
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def gather(self, name: str) -> list[tuple[int, Any]]:
        """Every other worker's ``name`` snapshot, as ``(index, data)``; those that fail are left out."""
        others = [w for w in range(self.workers) if w != self.worker]

        async def one(worker: int) -> tuple[int, Any] | None:
            try:
                data = await asyncio.wait_for(self._ask(worker, name), PEER_TIMEOUT)
            except (OSError, TimeoutError, orjson.JSONDecodeError) as exc:
                log.warning("worker %d did not answer for %s: %s", worker, name, exc)
                return None
            return None if data is None else (worker, data)

        found = await asyncio.gather(*(one(w) for w in others))
        return [f for f in found if f is not None]

    async def render_metrics(self, registry: CollectorRegistry) -> bytes:
        """The Prometheus text of the whole instance: this worker's registry merged with its peers'."""
        own = families_of(registry)
        peers = await self.gather("metrics")
        workers = [(self.worker, own), *((w, [_family(f) for f in data]) for w, data in peers)]
        merged = merge(workers)
        reporting = Metric("skyfabric_workers_reporting", "workers whose figures this scrape sums", "gauge")
        reporting.add_sample("skyfabric_workers_reporting", {}, float(len(workers)))
        merged.append(reporting)
        return generate_latest(_Merged(merged))


def _family(data: Iterable[Any]) -> Family:
    name, kind, doc, samples = data
    return name, kind, doc, [(s, dict(labels), float(v)) for s, labels, v in samples]
