"""The fault proxy's modes, each against a stub backend, with an aiohttp client in place of the gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from skyfabric.drills.faultproxy import PASS, FaultMode, FaultProxy, http_error, is_inference_path

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


@pytest.fixture
async def proxy(stub_url: tuple[str, int]) -> AsyncIterator[FaultProxy]:
    p = FaultProxy(*stub_url, name="aws/r/p/0", seed=1)
    await p.start()
    yield p
    await p.stop()


def url(p: FaultProxy) -> str:
    return f"http://{p.url_authority}/v1/chat/completions"


async def post(
    session: aiohttp.ClientSession, p: FaultProxy, *, stream: bool = True, timeout: float = 5.0
) -> tuple[int, bytes, dict[str, str]]:
    body = {**BODY, "stream": stream}
    async with session.post(url(p), json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


async def test_pass_relays_streams_and_keeps_connections(proxy: FaultProxy) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            status, data, headers = await post(session, proxy)
            assert status == 200
            assert headers["Content-Type"].startswith("text/event-stream")
            assert data.count(b"data: ") == 12  # role chunk + 10 tokens + [DONE]
        status, data, _ = await post(session, proxy, stream=False)
        assert status == 200 and b'"finish_reason":"length"' in data
    assert proxy.connections == 1  # keep-alive through the proxy
    assert [e.action for e in proxy.events] == ["forward"] * 4


async def test_blackhole_holds_connections_then_drops_them(proxy: FaultProxy) -> None:
    async with aiohttp.ClientSession() as session:
        await proxy.set_mode(FaultMode(blackhole=True))
        with pytest.raises(TimeoutError):
            await post(session, proxy, timeout=0.3)
        assert proxy.counts()["hold"] == 1
        # A held request on a connection nobody gave up on: dropped when the blackhole ends.
        pending = asyncio.create_task(post(session, proxy, timeout=5.0))
        await asyncio.sleep(0.2)
        assert not pending.done()
        await proxy.set_mode(PASS)
        with pytest.raises(aiohttp.ClientError):
            await pending
        status, _, _ = await post(session, proxy)
        assert status == 200


async def test_blackhole_freezes_a_stream_in_flight(stub_url: tuple[str, int]) -> None:
    p = FaultProxy(*stub_url, name="x")
    await p.start()
    try:
        async with aiohttp.ClientSession() as session:
            body = {**BODY, "stream": True, "max_tokens": 400}
            async with session.post(url(p), json=body) as resp:
                first = await resp.content.readuntil(b"\n\n")
                assert first.startswith(b"data: ")
                await p.set_mode(FaultMode(blackhole=True))
                await asyncio.sleep(0.05)
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        while await resp.content.read(65536):
                            pass
    finally:
        await p.stop()


async def test_refuse_closes_the_port_and_resets_connections(proxy: FaultProxy) -> None:
    async with aiohttp.ClientSession() as session:
        assert (await post(session, proxy))[0] == 200
        await proxy.set_mode(FaultMode(refuse=True))
        with pytest.raises(aiohttp.ClientConnectorError):
            async with aiohttp.ClientSession() as fresh:
                await post(fresh, proxy)
        await proxy.set_mode(PASS)
        status, _, _ = await post(session, proxy)
        assert status == 200


async def test_latency_multiplies_time_to_first_byte_and_total(proxy: FaultProxy) -> None:
    async with aiohttp.ClientSession() as session:
        await post(session, proxy)
        started = time.monotonic()
        await post(session, proxy)
        normal = time.monotonic() - started
        await proxy.set_mode(FaultMode(latency_factor=5.0, latency_add=0.05))
        started = time.monotonic()
        status, data, _ = await post(session, proxy)
        slow = time.monotonic() - started
    assert status == 200 and data.count(b"data: ") == 12
    assert slow > 3.0 * normal
    assert slow > 0.05 + 0.02 * 5 * 0.8  # at least the stub's TTFT × 5 plus the fixed delay


async def test_error_rate_answers_500_or_503_itself(proxy: FaultProxy) -> None:
    await proxy.set_mode(FaultMode(error_rate=0.5, error_statuses=(500, 503)))
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(30):
            status, data, _ = await post(session, proxy, stream=False)
            statuses.append(status)
            if status != 200:
                assert b"drill_injected_fault" in data
    assert set(statuses) <= {200, 500, 503}
    assert 5 <= sum(s != 200 for s in statuses) <= 25
    assert proxy.connections == 1  # injected errors keep the connection alive
    assert proxy.counts()["error"] == sum(s != 200 for s in statuses)


@pytest.mark.parametrize("retry_after", [2.0, None])
async def test_throttle_answers_429_with_or_without_retry_after(
    proxy: FaultProxy, retry_after: float | None
) -> None:
    await proxy.set_mode(FaultMode(throttle_rate=1.0, retry_after=retry_after))
    async with aiohttp.ClientSession() as session:
        status, _, headers = await post(session, proxy)
    assert status == 429
    assert headers.get("Retry-After") == ("2" if retry_after else None)
    assert proxy.counts()["throttle"] == 1


async def test_cut_closes_a_stream_after_n_events(proxy: FaultProxy) -> None:
    await proxy.set_mode(FaultMode(cut_rate=1.0, cut_after_events=4))
    async with aiohttp.ClientSession() as session:
        async with session.post(url(proxy), json={**BODY, "stream": True}) as resp:
            got = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                while chunk := await resp.content.read(65536):
                    got += chunk
        assert got.count(b"\n\n") == 4
        # Non-streaming answers are not cut by an event count.
        status, _, _ = await post(session, proxy, stream=False)
        assert status == 200
    assert proxy.counts()["cut"] == 1


async def test_cut_after_bytes_cuts_any_answer(proxy: FaultProxy) -> None:
    await proxy.set_mode(FaultMode(cut_rate=1.0, cut_after_bytes=20))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            await post(session, proxy, stream=False)


async def test_upstream_down_resets_the_client(stub_url: tuple[str, int]) -> None:
    from skyfabric.drills.harness import free_port

    p = FaultProxy("127.0.0.1", free_port(), name="dead")
    await p.start()
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                await post(session, p)
        assert p.counts()["upstream_down"] == 1
    finally:
        await p.stop()


def test_modes_combine_and_describe() -> None:
    brownout = FaultMode(latency_factor=10).combine(FaultMode(error_rate=0.2))
    assert brownout.describe() == "latency ×10 + 20% 500/503"
    assert PASS.describe() == "pass"
    assert FaultMode(throttle_rate=1).describe() == "100% 429 (no Retry-After)"
    assert FaultMode(cut_rate=1, cut_after_events=5).combine(FaultMode(cut_rate=0.5, cut_after_events=3)) == (
        FaultMode(cut_rate=1, cut_after_events=3)
    )


def test_http_error_is_a_complete_keep_alive_response() -> None:
    raw = http_error(429, "slow down", retry_after=1.2)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests")
    assert b"retry-after: 2" in head and b"content-length: %d" % len(body) in head


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/chat/completions",
        b"/v1/completions",
        b"/v1/messages",
        b"/v1/messages?beta=true",
        b"/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse-stream",
        b"/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke",
        b"/v1/projects/p/locations/l/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict",
        b"/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
    ],
)
def test_model_calls_of_every_wire_protocol_count_as_inference(target: bytes) -> None:
    # a drill in front of Bedrock or Vertex must tell the clients' requests from the gateway's probes
    assert is_inference_path(target)


@pytest.mark.parametrize("target", [b"/v1/models", b"/health", b"/metrics", b"/v1/messages/count_tokens"])
def test_probes_and_scrapes_are_not_inference(target: bytes) -> None:
    assert not is_inference_path(target)
