"""Mid-stream failover: a stream that breaks after k tokens goes on from another backend, seamlessly."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest

from skyfabric.gateway.balancer import eject
from tests.conftest import MakeGateway, RunningGateway
from tests.support.fake_upstream import FakeUpstream, expected_text

FAST = {"connect": 0.5, "first_byte": 0.5, "first_token": 0.5, "idle": 0.4, "response": 1.0, "total": 10}


async def read_stream(gw: RunningGateway, kind: str = "chat", **kwargs: Any) -> list[Any]:
    client = gw.client()
    if kind == "chat":
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "code"}], stream=True, **kwargs
        )
    else:
        stream = await client.completions.create(model="m", prompt="def f():", stream=True, **kwargs)
    return [chunk async for chunk in stream]


def chat_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def pinned(
    make_gateway: MakeGateway, first: FakeUpstream, second: FakeUpstream, **extra: Any
) -> RunningGateway:
    """A gateway where ``first`` (aws) takes the first attempt and ``second`` (gcp) the rescue."""
    gw = await make_gateway({"aws": [first], "gcp": [second]}, timeouts=FAST, **extra)
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000
    return gw


def unpin(gw: RunningGateway) -> None:
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding -= 1000


@pytest.mark.parametrize(
    "fault",
    [{"cut_after": 4}, {"stall_after": 4}, {"malformed_after": 4}, {"no_finish_after": 4}],
    ids=["cut", "stall", "malformed-event", "ends-without-finish"],
)
async def test_broken_stream_is_continued_with_exact_text(make_gateway: MakeGateway, fault: Any) -> None:
    first, second = FakeUpstream("first", tokens=10).then(fault), FakeUpstream("second", tokens=10)
    first.token_delay = 0.01  # tokens arrive one by one, so the first ones are committed before the fault
    gw = await pinned(make_gateway, first, second)
    chunks = await read_stream(gw, stream_options={"include_usage": True})
    unpin(gw)
    assert chat_text(chunks) == expected_text(10)  # no gap, no repeat
    assert {c.id for c in chunks} == {chunks[0].id}  # one stream id throughout
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]  # the continuation's opening chunk is not repeated
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 10  # both parts counted
    # the continuation asked the second backend to go on from the exact prefix (trailing space left out:
    # chat templates trim it; the engine's own next token brings it back, and the relay drops it)
    cont = second.requests[-1]
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False
    assert cont["messages"][-1] == {"role": "assistant", "content": expected_text(4).rstrip()}
    assert gw.gateway.proxy.metrics.rescued._value.get() == 1


async def test_completions_stream_is_continued_from_the_prompt(make_gateway: MakeGateway) -> None:
    first, second = FakeUpstream("first", tokens=8).then({"cut_after": 3}), FakeUpstream("second", tokens=8)
    gw = await pinned(make_gateway, first, second)
    chunks = await read_stream(gw, kind="completions")
    assert "".join(c.choices[0].text for c in chunks) == expected_text(8)
    assert second.requests[-1]["prompt"] == "def f():" + expected_text(3).rstrip()


async def test_max_tokens_is_reduced_by_what_was_already_sent(make_gateway: MakeGateway) -> None:
    first, second = FakeUpstream("first", tokens=20).then({"cut_after": 5}), FakeUpstream("second", tokens=20)
    gw = await pinned(make_gateway, first, second)
    chunks = await read_stream(gw, max_tokens=8, extra_body={"min_tokens": 8})
    assert chat_text(chunks) == expected_text(8)
    assert second.requests[-1]["max_tokens"] == 3 and second.requests[-1]["min_tokens"] == 3


async def test_stream_finished_but_without_done_is_completed_not_failed(make_gateway: MakeGateway) -> None:
    first, second = FakeUpstream("first", tokens=6).then("no_done"), FakeUpstream("second", tokens=6)
    gw = await pinned(make_gateway, first, second)
    chunks = await read_stream(gw)
    assert chat_text(chunks) == expected_text(6)
    assert second.requests == []  # nothing to rescue: the answer was complete


async def test_backend_that_cannot_continue_is_never_sent_a_prefill(make_gateway: MakeGateway) -> None:
    """It is asked for the whole answer again instead (a replay), checked against what was sent."""
    first = FakeUpstream("first", tokens=10, default={"cut_after": 4})  # the only capable one keeps dying
    first.token_delay = 0.01
    no_prefill = FakeUpstream("no-prefill", tokens=10, can_continue=False)
    gw = await pinned(make_gateway, first, no_prefill, retry={"outage_wait": 0.2})
    assert chat_text(await read_stream(gw)) == expected_text(10)
    assert len(no_prefill.requests) == 1
    assert "continue_final_message" not in no_prefill.requests[0]  # a replay, never a prefill
    assert no_prefill.requests[0]["messages"] == [{"role": "user", "content": "code"}]


async def test_stream_error_is_in_band_and_never_looks_finished(make_gateway: MakeGateway) -> None:
    first = FakeUpstream("first", tokens=10, default={"cut_after": 4})  # every answer dies at 4 tokens
    gw = await make_gateway({"aws": [first]}, timeouts=FAST, retry={"outage_wait": 0.2})
    async with (
        httpx.AsyncClient() as http,
        http.stream(
            "POST",
            f"{gw.base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True},
        ) as resp,
    ):
        events = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
    assert resp.status_code == 200
    assert events[-1] != "data: [DONE]"
    last = orjson.loads(events[-1][6:])
    assert last["error"]["code"] == "stream_interrupted"
    finishes = [orjson.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert not any(finishes)


async def test_second_break_is_continued_again(make_gateway: MakeGateway) -> None:
    a = FakeUpstream("a", tokens=12).then({"cut_after": 3})
    b = FakeUpstream("b", tokens=12).then({"stall_after": 3})  # breaks 3 tokens into its continuation
    c = FakeUpstream("c", tokens=12)
    gw = await make_gateway({"aws": [a], "gcp": [b], "azure": [c]}, timeouts=FAST)
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000
    gw.gateway.proxy.states["azure/r1/pool/0"].outstanding = 2000
    chunks = await read_stream(gw)
    assert chat_text(chunks) == expected_text(12)
    assert c.requests[-1]["messages"][-1]["content"] == expected_text(6).rstrip()


async def test_in_band_upstream_error_event_is_rescued(make_gateway: MakeGateway) -> None:
    first = FakeUpstream("first", tokens=6).then({"error_after": 2})  # vLLM's in-band error event
    first.token_delay = 0.01  # the first tokens reach the client before the error: a mid-stream rescue
    second = FakeUpstream("second", tokens=6)
    gw = await pinned(make_gateway, first, second)
    chunks = await read_stream(gw)
    assert chat_text(chunks) == expected_text(6)
    assert second.requests[-1]["continue_final_message"] is True
    assert gw.gateway.proxy.metrics.rescued._value.get() == 1


# -- the defects realistic backends expose (issue 10), one at a time --------------------------------------


async def test_continuation_through_a_trimming_chat_template_has_no_doubled_whitespace(
    make_gateway: MakeGateway,
) -> None:
    """One token per chunk, so only the template matters: it trims the prefix "t0 t1 t2 t3 " and the model
    goes on with " t4 "; the client must still get "t3 t4", not "t3  t4"."""
    first = FakeUpstream("first", tokens=10, chunking=(1,)).then({"cut_after": 4})
    second = FakeUpstream("second", tokens=10, chunking=(1,))  # template="trim", like Llama 3's and most
    first.token_delay = 0.01
    gw = await pinned(make_gateway, first, second)
    chunks = await read_stream(gw)
    assert chat_text(chunks) == expected_text(10)


async def test_limits_and_usage_count_tokens_not_chunks(make_gateway: MakeGateway) -> None:
    """Several tokens per chunk, a template that keeps whitespace: only the counting matters."""
    first = FakeUpstream("first", tokens=20, template="verbatim").then({"cut_after": 5})
    second = FakeUpstream("second", tokens=20, template="verbatim")
    first.token_delay = 0.01
    gw = await pinned(make_gateway, first, second)
    chunks = await read_stream(gw, max_tokens=8, stream_options={"include_usage": True})
    assert first.sent_tokens == [5]  # in 3 chunks: "t0 ", "t1 t2 t3 ", "t4 "
    assert second.requests[-1]["max_tokens"] == 3  # 8 asked, 5 sent
    assert chat_text(chunks) == expected_text(8)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 8


# -- which backends may take a stream over (issue 10, item 3) --------------------------------------------


async def idle(gw: RunningGateway) -> None:
    """Every in-flight count back to zero (waits briefly for the stream's last cleanup to run)."""
    proxy = gw.gateway.proxy
    for _ in range(50):
        counts = [(s.outstanding, s.streaming, len(s.inflight)) for s in proxy.states.values()]
        gates = [g.inflight for g in proxy.admission.gates.values()]
        if all(c == (0, 0, 0) for c in counts) and not any(gates):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still in flight: {counts} admission {gates}")


async def raw_stream(gw: RunningGateway, path: str, body: dict[str, Any]) -> list[str]:
    """The ``data:`` lines of a stream, as sent (no SDK in between to hide an event)."""
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("POST", f"{gw.base_url}{path}", json={"model": "m", "stream": True, **body}) as resp,
    ):
        assert resp.status_code == 200
        return [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]


def assert_interrupted(events: list[str], sent: str, kind: str = "chat") -> None:
    """The stream ends with an in-band ``stream_interrupted`` error after exactly ``sent``; no finish."""
    assert events[-1] != "[DONE]" and "[DONE]" not in events
    assert orjson.loads(events[-1])["error"]["code"] == "stream_interrupted"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert not any(c["choices"][0].get("finish_reason") for c in chunks if c.get("choices"))
    key = "delta" if kind == "chat" else None
    text = "".join(
        (ch[key].get("content") or "") if key else ch.get("text", "")
        for c in chunks
        for ch in c.get("choices", [])
        if ch.get("index", 0) == 0
    )
    assert text == sent


async def test_continuation_refused_with_4xx_is_remembered_not_ejected(make_gateway: MakeGateway) -> None:
    first = FakeUpstream("first", tokens=10).then({"cut_after": 4})
    refuses = FakeUpstream("refuses", tokens=10)
    refuses.rejects_prefill = True  # says it continues (engine vllm), answers a prefill with 400
    third = FakeUpstream("third", tokens=10)
    gw = await make_gateway({"aws": [first], "gcp": [refuses], "azure": [third]}, timeouts=FAST)
    proxy = gw.gateway.proxy
    proxy.states["gcp/r1/pool/0"].outstanding = 1000  # first pick: aws; first rescue: gcp
    proxy.states["azure/r1/pool/0"].outstanding = 2000
    started = time.monotonic()
    chunks = await read_stream(gw)
    took = time.monotonic() - started
    proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    proxy.states["azure/r1/pool/0"].outstanding -= 2000
    assert chat_text(chunks) == expected_text(10)
    assert len(refuses.requests) == 1  # asked once, not again
    gcp = proxy.states["gcp/r1/pool/0"]
    assert gcp.available(proxy.clock()) and gcp.ejections == 0 and gcp.consecutive_failures == 0
    assert third.requests[-1]["messages"][-1]["content"] == expected_text(4).rstrip()
    assert took < 1.0
    await idle(gw)


async def test_stream_does_not_go_back_to_the_endpoint_that_broke_it(make_gateway: MakeGateway) -> None:
    """Without a probe since, the endpoint whose stream broke is not trusted with it again."""
    first = FakeUpstream("first", tokens=10).then({"cut_after": 4})  # would continue fine the second time
    refuses = FakeUpstream("refuses", tokens=10)
    refuses.rejects_prefill = True
    gw = await pinned(
        make_gateway,
        first,
        refuses,
        retry={"outage_wait": 0.6},
        health={"probe_interval": 0, "base_ejection": 0.2},
    )
    started = time.monotonic()
    events = await raw_stream(gw, "/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    took = time.monotonic() - started
    unpin(gw)
    assert_interrupted(events, expected_text(4))
    assert len(first.requests) == 1  # its ejection ran out, but nothing says it is well: not asked again
    assert len(refuses.requests) == 1
    assert took < 1.5
    await idle(gw)


async def test_stream_goes_back_to_an_endpoint_that_passed_a_probe_since(make_gateway: MakeGateway) -> None:
    first = FakeUpstream("first", tokens=10).then({"cut_after": 4})
    refuses = FakeUpstream("refuses", tokens=10)
    refuses.rejects_prefill = True
    gw = await pinned(
        make_gateway,
        first,
        refuses,
        retry={"outage_wait": 2.0},
        health={"probe_interval": 0.1, "base_ejection": 0.2},
    )
    started = time.monotonic()
    chunks = await read_stream(gw)
    took = time.monotonic() - started
    unpin(gw)
    assert chat_text(chunks) == expected_text(10)
    assert first.requests[-1]["messages"][-1]["content"] == expected_text(4).rstrip()
    assert took < 1.5
    await idle(gw)


# -- backends that claim to continue but do not (item 4) ----------------------------------------------------


@pytest.mark.parametrize(
    ("flaw", "continues"),
    [("restarts", False), ("rejects_prefill", False), ("trims_prefill", True), (None, True)],
)
async def test_selftest_checks_what_a_pool_claims(
    make_gateway: MakeGateway, flaw: str | None, continues: bool
) -> None:
    good, tested = FakeUpstream("good", tokens=10), FakeUpstream("tested", tokens=10)
    if flaw:
        setattr(tested, flaw, True)
    gw = await make_gateway({"aws": [good], "gcp": [tested]}, timeouts=FAST, health={"selftest": True})
    await asyncio.wait_for(gw.gateway.selftests.wait(), 2.0)
    assert gw.gateway.proxy.states["gcp/r1/pool/0"].continues is continues
    assert gw.gateway.proxy.states["aws/r1/pool/0"].continues is True
    sent = tested.requests[-1]
    assert sent["temperature"] == 0 and sent["continue_final_message"] is True and sent["max_tokens"] <= 8
    await idle(gw)


async def test_selftest_failure_keeps_streams_away_from_a_restarting_pool(make_gateway: MakeGateway) -> None:
    """A pool that restarts on a prefill is never sent one: it may only replay, checked character by
    character (its deterministic answer passes)."""
    first = FakeUpstream("first", tokens=10, default={"cut_after": 4})
    first.token_delay = 0.01
    restarts = FakeUpstream("restarts", tokens=10)
    restarts.restarts = True
    gw = await pinned(make_gateway, first, restarts, health={"selftest": True}, retry={"outage_wait": 0.2})
    await asyncio.wait_for(gw.gateway.selftests.wait(), 2.0)
    assert gw.gateway.proxy.states["gcp/r1/pool/0"].continues is False
    asked = len(restarts.requests)
    chunks = await read_stream(gw)
    unpin(gw)
    assert chat_text(chunks) == expected_text(10)
    sent = restarts.requests[asked:]
    assert len(sent) == 1 and "continue_final_message" not in sent[0]
    await idle(gw)


async def test_restart_at_run_time_is_caught_before_text_is_repeated(make_gateway: MakeGateway) -> None:
    first = FakeUpstream("first", tokens=10).then({"cut_after": 4})
    restarts = FakeUpstream("restarts", tokens=10)
    restarts.restarts = True  # the self-test is off: only the run-time check stands in the way
    third = FakeUpstream("third", tokens=10)
    gw = await make_gateway({"aws": [first], "gcp": [restarts], "azure": [third]}, timeouts=FAST)
    proxy = gw.gateway.proxy
    proxy.states["gcp/r1/pool/0"].outstanding = 1000
    proxy.states["azure/r1/pool/0"].outstanding = 2000
    started = time.monotonic()
    chunks = await read_stream(gw)
    took = time.monotonic() - started
    proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    proxy.states["azure/r1/pool/0"].outstanding -= 2000
    assert chat_text(chunks) == expected_text(10)  # not "t0 t1 t2 t3 t0 t1 …"
    assert len(restarts.requests) == 1
    gcp = proxy.states["gcp/r1/pool/0"]
    assert gcp.ejections == 0 and gcp.available(proxy.clock())  # it works; it just cannot continue
    assert took < 1.0
    await idle(gw)


async def test_restart_with_no_other_backend_is_an_in_band_error(make_gateway: MakeGateway) -> None:
    first = FakeUpstream("first", tokens=10, default={"cut_after": 4})
    restarts = FakeUpstream("restarts", tokens=10)
    restarts.restarts = True
    gw = await pinned(make_gateway, first, restarts, retry={"outage_wait": 0.2})
    events = await raw_stream(gw, "/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    unpin(gw)
    assert_interrupted(events, expected_text(4))
    await idle(gw)


async def test_template_that_trims_whitespace_does_not_double_it(make_gateway: MakeGateway) -> None:
    first = FakeUpstream("first", tokens=10).then({"cut_after": 4})
    trims = FakeUpstream("trims", tokens=10)
    trims.trims_prefill = True  # "t0 t1 t2 t3 " reaches the model as "t0 t1 t2 t3", which goes on " t4 "
    gw = await pinned(make_gateway, first, trims)
    chunks = await asyncio.wait_for(read_stream(gw), 1.0)  # the worst case, bounded
    unpin(gw)
    assert chat_text(chunks) == expected_text(10)
    await idle(gw)


# -- streams that cannot be continued exactly, and tokens counted by usage (item 8) --------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/completions", {"prompt": [1, 2, 3]}),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}),
        ("/completions", {"prompt": "def f():", "echo": True}),
    ],
    # (a request with tools is continued since the protocol seam: tests/gateway/test_protocols.py)
    ids=["token-id-prompt", "n2", "logprobs", "echo"],
)
async def test_uncontinuable_stream_ends_with_an_error_not_a_finish(
    make_gateway: MakeGateway, path: str, body: dict[str, Any]
) -> None:
    first, second = FakeUpstream("first", tokens=10).then({"cut_after": 4}), FakeUpstream("second", tokens=10)
    gw = await pinned(make_gateway, first, second)
    started = time.monotonic()
    events = await raw_stream(gw, path, body)
    took = time.monotonic() - started
    unpin(gw)
    assert_interrupted(events, expected_text(4), "chat" if path == "/chat/completions" else "completions")
    assert second.requests == []  # no continuation that would mix choices or lose what it cannot track
    assert took < 1.0
    await idle(gw)


async def test_a_reasoning_stream_is_continued_only_where_a_replay_matches(make_gateway: MakeGateway) -> None:
    first, second = FakeUpstream("first", tokens=10).then({"cut_after": 4}), FakeUpstream("second", tokens=10)
    first.reasoning = 2
    gw = await pinned(make_gateway, first, second)
    messages = {"messages": [{"role": "user", "content": "x"}]}
    events = await asyncio.wait_for(raw_stream(gw, "/chat/completions", messages), 10.0)
    unpin(gw)
    # The second backend could only replay, and its replay (no reasoning) differs at once: refused. The
    # stream waits for its own endpoint's probe and replays there, exactly.
    assert events[-1] == "[DONE]"
    assert all(not r.get("continue_final_message") for r in second.requests)
    chunks = [orjson.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text == expected_text(10)
    await idle(gw)


async def test_token_limit_counts_tokens_not_chunks(make_gateway: MakeGateway) -> None:
    first, second = FakeUpstream("first", tokens=20).then({"cut_after": 6}), FakeUpstream("second", tokens=20)
    first.tokens_per_chunk = second.tokens_per_chunk = 3  # 6 tokens in 2 chunks, as real engines send them
    gw = await pinned(make_gateway, first, second)
    usage = {"include_usage": True}
    chunks = await asyncio.wait_for(read_stream(gw, max_tokens=8, stream_options=usage), 1.0)
    unpin(gw)
    assert chat_text(chunks) == expected_text(8)
    assert second.requests[-1]["max_tokens"] == 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])  # the usage asked for in every chunk is not passed on
    assert first.requests[0]["stream_options"]["continuous_usage_stats"] is True
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    await idle(gw)


async def test_limit_reached_exactly_at_the_break_finishes_with_length(make_gateway: MakeGateway) -> None:
    first, second = FakeUpstream("first", tokens=20).then({"cut_after": 4}), FakeUpstream("second", tokens=20)
    first.tokens_per_chunk = 2  # all 4 tokens sent in 2 chunks, then the connection drops before the finish
    gw = await pinned(make_gateway, first, second)
    events = await raw_stream(
        gw, "/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    )
    unpin(gw)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected_text(4)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == [
        "length"
    ]
    assert second.requests == []
    assert all("usage" not in c or not c["usage"] for c in chunks)  # the client asked for no usage
    assert first.requests[0]["stream_options"]["include_usage"] is True  # the gateway did, to count tokens
    await idle(gw)


async def test_selftest_runs_again_when_an_endpoint_is_readmitted(make_gateway: MakeGateway) -> None:
    good, changes = FakeUpstream("good", tokens=10), FakeUpstream("changes", tokens=10)
    gw = await make_gateway(
        {"aws": [good], "gcp": [changes]},
        timeouts=FAST,
        health={"selftest": True, "probe_interval": 0.05, "base_ejection": 0.1},
    )
    await asyncio.wait_for(gw.gateway.selftests.wait(), 2.0)
    proxy = gw.gateway.proxy
    state = proxy.states["gcp/r1/pool/0"]
    assert state.continues is True
    changes.restarts = True  # redeployed with an engine that ignores prefills
    proxy.eject_now(state, proxy.clock(), reason="probe: test")
    started = time.monotonic()
    while state.continues or state.needs_probe or gw.gateway.selftests.tasks:
        assert time.monotonic() - started < 2.0, "not readmitted and re-tested"
        await asyncio.sleep(0.02)
    assert state.continues is False and state.available(proxy.clock())
    await idle(gw)


def test_restart_verdict_reads_text_not_whitespace() -> None:
    from skyfabric.gateway.relay import normalized, repeats_itself, restart_verdict

    prefix = normalized("The quick brown fox jumps over ")
    assert restart_verdict(prefix, normalized("the lazy dog."), final=False) is False
    assert restart_verdict(prefix, normalized("The quick"), final=False) is None  # could still be a restart
    assert restart_verdict(prefix, normalized("The  quick\nbrown fox jumps"), final=False) is True
    assert restart_verdict(prefix, normalized("The quick"), final=True) is True  # it ended repeating
    resent_tail = normalized("brown fox jumps over the")
    assert restart_verdict(prefix, resent_tail, final=False) is True
    assert repeats_itself("ha ha ha ha") and repeats_itself("word") and not repeats_itself(prefix)


def test_selftest_judges_by_text_not_spacing() -> None:
    from skyfabric.gateway.selftest import judge, split_answer

    answer = "1 2 3 4 5 6 7 8"
    prefix = split_answer(answer)
    assert prefix == "1 2 3 4"
    assert judge(answer, prefix, " 5 6 7") is True
    assert judge(answer, prefix, "5 6 7") is True  # an engine that trims and re-spaces still continues
    assert judge(answer, prefix, "1 2 3 4") is False
    assert judge(answer, prefix, "Sure! Here") is None  # neither: the pool's claim stands


@pytest.mark.parametrize("declared", [False, True])
async def test_a_stream_goes_on_only_on_the_same_model(make_gateway: MakeGateway, declared: bool) -> None:
    """A fallback model is another model: a stream cut mid-answer is not spliced with its words unless the
    fleet declares the two the same (``continue_on``)."""
    first = FakeUpstream("first", tokens=10).then({"cut_after": 4})
    first.token_delay = 0.01
    backup = FakeUpstream("backup", tokens=10)
    backup.model = "m-twin"
    models = [
        {"name": "m", "fallbacks": ["m-twin"], **({"continue_on": ["m-twin"]} if declared else {})},
        {"name": "m-twin"},
    ]
    gw = await make_gateway({"aws": [first], "gcp": [backup]}, models=models, timeouts=FAST)
    if declared:
        assert chat_text(await read_stream(gw)) == expected_text(10)
        assert len(backup.requests) == 1
    else:
        # held until its own endpoint passes a probe, then continued there; the other model gets nothing
        assert chat_text(await read_stream(gw)) == expected_text(10)
        assert len(first.requests) == 2 and backup.requests == []
    await idle(gw)


async def test_a_cut_stream_goes_on_a_later_model_in_rotation_not_an_ejected_endpoint_of_its_own(
    make_gateway: MakeGateway,
) -> None:
    """The stream's own model has no endpoint left in rotation (the one that broke it aside): it goes on
    on the model declared the same (``continue_on``), not into the balancer's panic pick of an ejected
    endpoint."""
    first = FakeUpstream("first", tokens=10).then({"cut_after": 4})
    first.token_delay = 0.01
    ejected = FakeUpstream("ejected", tokens=10)
    backup = FakeUpstream("backup", tokens=10)
    backup.model = "m-twin"
    models = [{"name": "m", "continue_on": ["m-twin"]}, {"name": "m-twin"}]
    gw = await make_gateway({"aws": [first, ejected], "gcp": [backup]}, models=models, timeouts=FAST)
    proxy = gw.gateway.proxy
    eject(proxy.states["aws/r1/pool/1"], proxy.clock(), proxy.outlier)  # the pool's second: ``ejected``
    assert chat_text(await read_stream(gw)) == expected_text(10)
    assert [b for b in ejected.requests if "messages" in b] == []  # health probes aside: never called
    assert len(backup.requests) == 1
    await idle(gw)
