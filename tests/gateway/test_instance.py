"""An instance of several workers (``skyfabric serve --workers 2``) shows its whole traffic on every scrape.

Each worker counts what it routed; whichever worker answers ``/metrics`` or ticks a dashboard merges the
others' figures (``gateway/instance.py``). The end-to-end test sends known traffic over fresh connections
(the kernel spreads them over both workers), then scrapes repeatedly — landing on both workers — and checks
exact sums every time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
from openai import AsyncOpenAI

from skyfabric.gateway.instance import Family, merge
from tests.gateway.test_serve import free_port
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import samples


def total(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


def test_merge_sums_counters_and_buckets_and_labels_a_workers_own_judgement() -> None:
    def worker(requests: float, le_1: float, available: float, price: float) -> list[Family]:
        return [
            (
                "skyfabric_requests",
                "counter",
                "requests",
                [("skyfabric_requests_total", {"model": "m"}, requests)],
            ),
            (
                "lat",
                "histogram",
                "latency",
                [
                    ("lat_bucket", {"le": "1.0"}, le_1),
                    ("lat_bucket", {"le": "+Inf"}, requests),
                    ("lat_count", {}, requests),
                    ("lat_sum", {}, requests * 0.5),
                ],
            ),
            (
                "skyfabric_endpoint_outstanding",
                "gauge",
                "in flight",
                [("skyfabric_endpoint_outstanding", {}, 2)],
            ),
            (
                "skyfabric_endpoint_available",
                "gauge",
                "up",
                [("skyfabric_endpoint_available", {"e": "a"}, available)],
            ),
            (
                "skyfabric_pool_cost_usd_per_hour",
                "gauge",
                "$",
                [("skyfabric_pool_cost_usd_per_hour", {}, price)],
            ),
        ]

    merged = {m.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in m.samples} for m in
              merge([(0, worker(3, 1, 1, 4.0)), (1, worker(5, 4, 0, 4.0))])}  # fmt: skip
    assert merged["skyfabric_requests"] == {("skyfabric_requests_total", (("model", "m"),)): 8}
    assert merged["lat"] == {
        ("lat_bucket", (("le", "1.0"),)): 5,
        ("lat_bucket", (("le", "+Inf"),)): 8,
        ("lat_count", ()): 8,
        ("lat_sum", ()): 4.0,
    }
    assert merged["skyfabric_endpoint_outstanding"] == {("skyfabric_endpoint_outstanding", ()): 4}
    # Each worker's own view of an endpoint's health: neither a sum nor a pick would be true.
    assert merged["skyfabric_endpoint_available"] == {
        ("skyfabric_endpoint_available", (("e", "a"), ("worker", "0"))): 1,
        ("skyfabric_endpoint_available", (("e", "a"), ("worker", "1"))): 0,
    }
    assert merged["skyfabric_pool_cost_usd_per_hour"] == {("skyfabric_pool_cost_usd_per_hour", ()): 4.0}


async def test_two_workers_every_scrape_shows_the_whole_instance(tmp_path: Path) -> None:
    upstream = await FakeUpstream("a", tokens=4).start()
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "models: [{name: m}]\n"
        "providers: [{name: p, regions: [{name: r, pools: [{name: x, accelerator: cpu, engine: vllm,"
        f" model: m, endpoints: ['{upstream.url}']}}]}}]}}]\n"
        "health: {probe_interval: 0}\n"
        "observability: {metrics: true, dashboard: true, dashboard_interval: 0.2}\n"
    )
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "skyfabric.cli", "serve", "--config", str(fleet), "--port", str(port),
        "--workers", "2",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                async with httpx.AsyncClient() as http:
                    if (await http.get(f"{root}/healthz", timeout=1)).status_code == 200:
                        break
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
        messages = [{"role": "user", "content": "hi"}]
        whole, streams = 24, 8
        for i in range(whole + streams):
            # A fresh connection each time: the kernel picks a worker per connection.
            async with AsyncOpenAI(base_url=f"{root}/v1", api_key="none") as client:
                if i < whole:
                    await client.chat.completions.create(model="m", messages=messages)
                else:
                    stream = await client.chat.completions.create(model="m", messages=messages, stream=True)
                    async for _ in stream:
                        pass
        # Each worker counted only its share; every scrape, whichever worker answers, sums both.
        answered_by = set()
        for _ in range(16):
            async with httpx.AsyncClient() as http:
                scrape = await http.get(f"{root}/metrics")
            assert scrape.status_code == 200
            answered_by.add(scrape.headers["x-skyfabric-worker"])
            found = samples(scrape.text)
            assert total(found, "skyfabric_workers_reporting") == 2
            assert total(found, "skyfabric_requests_total", model="m", status="200") == whole + streams
            assert total(found, "skyfabric_attempts_total", outcome="ok") == whole + streams
            assert total(found, "skyfabric_request_seconds_count") == whole
            assert total(found, "skyfabric_request_seconds_bucket", le="+Inf") == whole
            assert total(found, "skyfabric_time_to_first_token_seconds_count") == streams
            assert total(found, "gen_ai_client_inference_duration_seconds_count") == whole + streams
            assert total(found, "gen_ai_client_inference_time_to_first_chunk_seconds_count") == streams
            assert total(found, "gen_ai_client_inference_usage_output_tokens_total") == 4 * (whole + streams)
            assert total(found, "skyfabric_upstream_attempts_total", outcome="ok") == whole + streams
            # Each worker's own view of the endpoint, labelled by worker.
            available = {
                dict(ls)["worker"]: v for (n, ls), v in found.items() if n == "skyfabric_endpoint_available"
            }
            assert available == {"0": 1.0, "1": 1.0}
        assert answered_by == {"0", "1"}, answered_by
        # The dashboard's state is the instance's too: both workers' attempts on the endpoint.
        async with httpx.AsyncClient() as http:
            state = (await http.get(f"{root}/dashboard/state")).json()
        [endpoint] = state["topology"][0]["regions"][0]["pools"][0]["endpoints"]
        assert state["workers"] == 2 and endpoint["successes"] == whole + streams
        # A drill's phases land on whichever worker accepts each POST; the timeline is the union.
        phases = [
            {"event": "start", "scenario": "provider-down", "duration": 30},
            {"event": "fault_on", "fault": "refuse p", "target": "p", "mode": "refuse"},
            {"event": "fault_off", "fault": "refuse p", "target": "p", "mode": "refuse"},
            {"event": "end"},
        ]
        for seq, phase in enumerate(phases, 1):
            async with httpx.AsyncClient() as http:  # a fresh connection each time
                posted = await http.post(f"{root}/dashboard/drill", json={"drill": "d", "seq": seq, **phase})
                assert posted.status_code == 202
        for _ in range(4):
            async with httpx.AsyncClient() as http:
                drill = (await http.get(f"{root}/dashboard/state")).json()["drill"]
            assert drill["scenario"] == "provider-down" and drill["ended"] is not None
            assert [len(f["windows"]) for f in drill["faults"]] == [1] and drill["faults"][0]["windows"][0][1]
        # A live dashboard's chart points count both workers' attempts, tick by tick.
        async with (
            httpx.AsyncClient(timeout=10) as http,
            http.stream("GET", f"{root}/dashboard/events") as events,
        ):
            lines = events.aiter_lines()
            assert (await anext(lines)).startswith("retry:")
            more = 12
            for _ in range(more):
                async with AsyncOpenAI(base_url=f"{root}/v1", api_key="none") as client:
                    await client.chat.completions.create(model="m", messages=messages)
            counted, deadline = 0, time.monotonic() + 10
            while counted < more and time.monotonic() < deadline:
                line = await asyncio.wait_for(anext(lines), 5)
                if line.startswith("data: ") and '"points"' in line:
                    tick = orjson.loads(line[6:])
                    assert tick["workers"] == 2
                    counted += tick["points"]["p"][2]  # [time, seconds, attempts, failed, …]
            assert counted == more
    finally:
        os.killpg(parent.pid, signal.SIGTERM)
        await asyncio.wait_for(parent.wait(), 10)
        await upstream.stop()
