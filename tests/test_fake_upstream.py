"""The fake upstream behaves like a real engine: the gateway's tests are only as honest as their fakes.

Spoken to over real HTTP (httpx), without the gateway: what an engine sends is checked here, so a gateway
test that fails with these fakes fails because of the gateway.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream, count_tokens, expected_text


@pytest.fixture
async def started() -> AsyncIterator[list[FakeUpstream]]:
    ups: list[FakeUpstream] = []
    yield ups
    for up in ups:
        await up.stop()


async def start(ups: list[FakeUpstream], up: FakeUpstream) -> FakeUpstream:
    ups.append(await up.start())
    return up


def events(raw: str) -> list[Any]:
    out: list[Any] = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def stream(up: FakeUpstream, body: dict[str, Any], path: str = "/chat/completions") -> list[Any]:
    async with httpx.AsyncClient(timeout=5) as http:
        resp = await http.post(up.url + path, json={"model": "m", "stream": True, **body})
        assert resp.status_code == 200, resp.text
        return events(resp.text)


def chat_text(chunks: list[Any]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c != "[DONE]" and c["choices"]
    )


USER = [{"role": "user", "content": "write code"}]


async def test_several_tokens_per_chunk_and_usage_counts_tokens(started: list[FakeUpstream]) -> None:
    up = await start(started, FakeUpstream(tokens=10))
    chunks = await stream(up, {"messages": USER, "stream_options": {"include_usage": True}})
    content = [c for c in chunks[:-1] if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert [c["choices"][0]["delta"]["content"] for c in content] == [
        "t0 ", "t1 t2 t3 ", "t4 t5 ", "t6 t7 t8 t9 ",
    ]  # fmt: skip
    assert content[-1]["choices"][0]["finish_reason"] == "stop"  # vLLM: the reason rides on the last tokens
    usage = chunks[-2]["usage"]
    assert usage["completion_tokens"] == 10 and usage["prompt_tokens"] == count_tokens(
        "<|user|>\nwrite code<|end|>\n<|assistant|>\n"
    )
    assert chunks[-1] == "[DONE]" and up.sent_tokens == [10]


async def test_a_trimming_template_continues_with_the_whitespace_it_cut(started: list[FakeUpstream]) -> None:
    trim = await start(started, FakeUpstream(tokens=8, chunking=(1,)))
    verbatim = await start(started, FakeUpstream(tokens=8, chunking=(1,), template="verbatim"))
    prefill = {
        "messages": [*USER, {"role": "assistant", "content": expected_text(4)}],
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    trimmed = await stream(trim, prefill)
    assert chat_text(trimmed) == " t4 t5 t6 t7 "  # the model saw "t0 t1 t2 t3": its next token is " t4 "
    assert chat_text(await stream(verbatim, prefill)) == "t4 t5 t6 t7 "
    completion = await stream(trim, {"prompt": "def f():" + expected_text(4)}, "/completions")
    assert (
        "".join(c["choices"][0]["text"] for c in completion if c != "[DONE]") == "t4 t5 t6 t7 "
    )  # no template


async def test_backends_that_restart_or_reject_a_prefill(started: list[FakeUpstream]) -> None:
    restart = await start(started, FakeUpstream(tokens=6, prefill="restart"))
    reject = await start(started, FakeUpstream(tokens=6, prefill="reject", can_continue=True))
    assert restart.can_continue and reject.can_continue  # what their pools declare
    assert not FakeUpstream(can_continue=False).can_continue
    prefill = {
        "messages": [*USER, {"role": "assistant", "content": expected_text(3)}],
        "continue_final_message": True,
    }
    assert chat_text(await stream(restart, prefill)) == expected_text(6)  # the client has t0-t2 twice now
    async with httpx.AsyncClient() as http:
        resp = await http.post(reject.url + "/chat/completions", json={"model": "m", **prefill})
        assert resp.status_code == 400 and "not supported" in resp.json()["error"]["message"]
        plain = await http.post(reject.url + "/chat/completions", json={"model": "m", "messages": USER})
        assert plain.json()["choices"][0]["message"]["content"] == expected_text(6)


async def test_faults_land_after_exactly_k_tokens(started: list[FakeUpstream]) -> None:
    up = await start(started, FakeUpstream(tokens=12).then({"error_after": 5}, {"no_finish_after": 7}))
    errored = await stream(up, {"messages": USER})
    assert chat_text(errored[:-1]) == expected_text(5) and errored[-1] == {
        "error": {"message": "engine crashed", "type": "server_error"}
    }
    unfinished = await stream(up, {"messages": USER})
    assert chat_text(unfinished) == expected_text(7)
    assert not any(c["choices"][0]["finish_reason"] for c in unfinished if c["choices"])
    assert up.sent_tokens == [5, 7]


async def test_max_tokens_and_n_choices(started: list[FakeUpstream]) -> None:
    up = await start(started, FakeUpstream(tokens=10))
    chunks = await stream(
        up, {"messages": USER, "max_tokens": 4, "n": 2, "stream_options": {"include_usage": True}}
    )
    for index in (0, 1):
        mine = [c for c in chunks[:-2] if c["choices"][0]["index"] == index]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in mine) == expected_text(4)
        assert [c["choices"][0]["finish_reason"] for c in mine if c["choices"][0]["finish_reason"]] == [
            "length"
        ]
    assert chunks[-2]["usage"]["completion_tokens"] == 8


async def test_connections_that_hang_after_the_headers(started: list[FakeUpstream]) -> None:
    up = await start(started, FakeUpstream(tokens=4).then("hang_after_headers", "hang_mid_body"))
    async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=0.3)) as http:
        async with http.stream(
            "POST", up.url + "/chat/completions", json={"model": "m", "messages": USER, "stream": True}
        ) as resp:
            assert resp.status_code == 200  # headers came
            with pytest.raises(httpx.ReadTimeout):
                await resp.aread()
        async with http.stream(
            "POST", up.url + "/chat/completions", json={"model": "m", "messages": USER}
        ) as resp:
            assert resp.status_code == 200
            got = b""
            with pytest.raises(httpx.ReadTimeout):
                async for piece in resp.aiter_raw():
                    got += piece
            assert got.startswith(b'{"id"') and 0 < len(got) < int(resp.headers["content-length"])


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not a JSON object"),
        (b"[1, 2]", 400, "not a JSON object"),
        (b'{"model": "m"}', 400, "messages"),
        (b'{"model": "other", "messages": [{"role": "user", "content": "x"}]}', 404, "does not exist"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}',
            400,
            "max_tokens",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": {"a": 1}}]}', 400, "content"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 9000}',
            400,
            "context",
        ),
    ],
)
async def test_hostile_input_gets_an_engines_error_not_a_crash(
    started: list[FakeUpstream], body: bytes, status: int, needle: str
) -> None:
    up = await start(started, FakeUpstream())
    async with httpx.AsyncClient() as http:
        resp = await http.post(up.url + "/chat/completions", content=body)
        assert resp.status_code == status
        assert needle in resp.json()["error"]["message"]
        ok = await http.post(up.url + "/chat/completions", json={"model": "m", "messages": USER})
        assert ok.status_code == 200


async def test_a_huge_prompt_is_refused_at_once(started: list[FakeUpstream]) -> None:
    up = await start(started, FakeUpstream())
    huge = "word " * 6_000_000  # 30 MB: read whole, refused before it is counted
    started_at = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.post(up.url + "/completions", json={"model": "m", "prompt": huge, "max_tokens": 4})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - started_at < 5.0


async def test_continuous_usage_stats_count_tokens_per_chunk(started: list[FakeUpstream]) -> None:
    up = await start(started, FakeUpstream(tokens=10))
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = await stream(up, {"messages": USER, "stream_options": options})
    so_far = [c["usage"]["completion_tokens"] for c in chunks[:-2]]
    assert so_far == [0, 1, 4, 6, 10]  # the role chunk, then chunks of 1, 3, 2 and 4 tokens
    assert chunks[-2]["usage"]["completion_tokens"] == 10
