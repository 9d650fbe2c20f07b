"""``/metrics`` after known traffic: the GenAI conventions' series and skyfabric's own, exact values."""

from __future__ import annotations

import httpx

from tests.conftest import MakeGateway
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import samples

BACKEND = ("skyfabric_accelerator", "cpu"), ("skyfabric_client_protocol", "openai")


def op(operation: str, provider: str, **extra: str) -> frozenset[tuple[str, str]]:
    labels = {
        "gen_ai_operation_name": operation,
        "gen_ai_request_model": "m",
        "gen_ai_provider_name": provider,
        "skyfabric_region": "r1",
        "skyfabric_pool": "pool",
        "skyfabric_accelerator": "cpu",
        "skyfabric_client_protocol": "openai",
        **extra,
    }
    return frozenset(labels.items())


async def test_metrics_after_known_traffic(make_gateway: MakeGateway) -> None:
    aws = FakeUpstream("a", tokens=5).then("ok", {"status": 503}, {"cut_after": 2})
    gcp = FakeUpstream("b", tokens=5)
    gw = await make_gateway({"aws": [aws], "gcp": [gcp]}, health={"probe_interval": 0})
    # gcp looks busier, so aws gets each request unless it failed it: the traffic below is deterministic.
    gw.gateway.proxy.states["gcp/r1/pool/0"].reported_waiting = 1
    client = gw.client()
    messages = [{"role": "user", "content": "hi"}]
    whole = await client.chat.completions.create(model="m", messages=messages)  # aws, non-streaming
    assert whole.usage is not None
    for _ in range(2):  # aws 503 → retried on gcp; then aws cut after 2 tokens → continued on gcp
        # With usage asked for, the gateway asks the backend for its running count: a stream broken
        # mid-answer is then counted exactly across the break (without it, the part before the break is
        # counted by chunks, a lower bound: docs/observability.md).
        stream = await client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == (
            "t0 t1 t2 t3 t4 "
        )
    stream = await client.completions.create(model="m", prompt="x", stream=True)  # aws is out: gcp
    async for _ in stream:
        pass

    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{gw.root}/metrics")).text
    got = samples(text)

    def value(name: str, labels: frozenset[tuple[str, str]]) -> float:
        return got.get((name, labels), 0.0)

    # The GenAI conventions' series, attributed to the backend that answered.
    duration = "gen_ai_client_inference_duration_seconds_count"
    assert value(duration, op("chat", "aws", error_type="")) == 1  # the non-streaming answer
    assert value(duration, op("chat", "gcp", error_type="")) == 2  # both streams ended on gcp
    assert value(duration, op("text_completion", "gcp", error_type="")) == 1
    ttfc = "gen_ai_client_inference_time_to_first_chunk_seconds_count"
    assert value(ttfc, op("chat", "gcp")) == 1 and value(ttfc, op("chat", "aws")) == 1
    assert value(ttfc, op("text_completion", "gcp")) == 1
    tokens = "gen_ai_client_inference_usage_output_tokens_total"
    assert value(tokens, op("chat", "aws", gen_ai_token_modality="unknown")) == 5
    assert value(tokens, op("chat", "gcp", gen_ai_token_modality="unknown")) == 10
    assert value(tokens, op("text_completion", "gcp", gen_ai_token_modality="unknown")) == 5
    inputs = "gen_ai_client_inference_usage_input_tokens_total"
    assert value(inputs, op("chat", "aws", gen_ai_token_modality="unknown")) == whole.usage.prompt_tokens
    # Chunk gaps of the two chat streams that ended on gcp: 4 + 4 (5 tokens each).
    tpoc = "gen_ai_client_inference_time_per_output_chunk_seconds_count"
    assert value(tpoc, op("chat", "gcp")) == 8 and value(tpoc, op("text_completion", "gcp")) == 4
    bucket = "gen_ai_client_inference_duration_seconds_bucket"
    assert value(bucket, op("chat", "gcp", error_type="", le="+Inf")) == 2

    # skyfabric's own.
    def attempts(provider: str, outcome: str) -> float:
        labels = {"gen_ai_request_model": "m", "gen_ai_provider_name": provider, "skyfabric_region": "r1",
                  "skyfabric_pool": "pool", "outcome": outcome}  # fmt: skip
        return value("skyfabric_upstream_attempts_total", frozenset(labels.items()))

    assert attempts("aws", "ok") == 2 and attempts("aws", "status_503") == 1
    assert attempts("aws", "RemoteProtocolError") == 1
    assert attempts("gcp", "ok") == 2 and attempts("gcp", "continued") == 1
    failovers = "skyfabric_failovers_total"
    phase = lambda p: frozenset({"gen_ai_request_model": "m", "phase": p}.items())  # noqa: E731
    assert value(failovers, phase("before_first_token")) == 1
    assert value(failovers, phase("after_first_token")) == 1
    ejected = frozenset(
        {"gen_ai_provider_name": "aws", "skyfabric_region": "r1", "skyfabric_pool": "pool",
         "cause": "RemoteProtocolError"}.items()
    )  # fmt: skip
    assert value("skyfabric_endpoint_ejections_total", ejected) == 1
    assert value("skyfabric_admission_queued", frozenset({"gen_ai_request_model": "m"}.items())) == 0
    assert value("skyfabric_retry_budget_active_requests", frozenset()) == 0
    assert value("skyfabric_retry_budget_limit", frozenset()) == 10
    # The names tests and drills already read are still there.
    assert 'skyfabric_requests_total{model="m",status="200"} 4.0' in text
    assert "skyfabric_rescued_streams_total 1.0" in text
    # Bounded cardinality: no label carries a key, a prompt or a request id.
    assert "sk-test" not in text and '"hi"' not in text and "chatcmpl" not in text
    for state in gw.gateway.proxy.states.values():
        assert state.outstanding == 0 and state.streaming == 0


async def test_cost_appears_only_when_the_fleet_prices_its_pools(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]})
    async with httpx.AsyncClient() as http:
        assert "skyfabric_pool_cost_usd_per_hour" not in (await http.get(f"{gw.root}/metrics")).text


def test_usage_is_read_from_the_end_of_an_answer_without_parsing_it() -> None:
    from skyfabric.gateway.spend import answer_usage

    def counts(body: bytes) -> tuple[int | None, int | None, int] | None:
        usage = answer_usage(body, "openai")
        return None if usage is None else (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens)

    body = (
        b'{"choices":[{"message":{"content":"\\"completion_tokens\\": 99"}}],"usage":{"prompt_tokens": 12,'
        b'"completion_tokens":7,"total_tokens":19,"prompt_tokens_details":{"cached_tokens":3}}}'
    )
    assert counts(body) == (12, 7, 3)
    assert counts(b'{"choices":[]}') is None
    assert counts(b'{"choices":[],"usage":null}') is None
    # The compact layouts engines write (vLLM puts total_tokens between the two), and spaced ones.
    assert counts(b'{"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}') == (5, 2, 0)
    assert counts(b'{"usage":{"prompt_tokens":5,"total_tokens":7,"completion_tokens":2}}') == (5, 2, 0)
    assert counts(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}') == (5, 2, 0)
    spaced = (
        b'{"usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details"'
    )
    assert counts(spaced + b': {"cached_tokens": 4}}}') == (5, 2, 4)
    # Cached tokens are read inside the prompt tokens' details only, never from a later object.
    later = b'{"usage":{"prompt_tokens":5,"completion_tokens":2,"prompt_tokens_details":null},'
    later += b'"m":{"cached_tokens":7}}'
    assert counts(later) == (5, 2, 0)
    # Any other order of the fields is searched field by field.
    assert counts(b'{"usage": {"total_tokens": 7, "completion_tokens": 2, "prompt_tokens": 5}}') == (5, 2, 0)
    # Content that mentions usage is escaped JSON: it cannot pass for the real key.
    fake = (
        b'{"choices":[{"message":{"content":"\\"usage\\":{\\"prompt_tokens\\":1}"}}],'
        b'"usage":{"prompt_tokens":9,"completion_tokens":4}}'
    )
    assert counts(fake) == (9, 4, 0)


async def test_an_anthropic_clients_answers_are_counted_under_its_protocol(make_gateway: MakeGateway) -> None:
    # Usage is read in the client's protocol: an Anthropic answer's input_tokens and output_tokens, cached
    # reads included in the input, labelled skyfabric_client_protocol="anthropic".
    gw = await make_gateway({"aws": [FakeUpstream("a", tokens=4)]})
    kwargs = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    whole = await gw.claude().messages.create(**kwargs)  # type: ignore[call-overload]
    await gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    async with httpx.AsyncClient() as http:
        got = samples((await http.get(f"{gw.root}/metrics")).text)

    def value(name: str, protocol: str, **extra: str) -> float:
        labels = dict(op("chat", "aws", **extra))
        labels["skyfabric_client_protocol"] = protocol
        return got.get((name, frozenset(labels.items())), 0.0)

    out, into = (
        "gen_ai_client_inference_usage_output_tokens_total",
        "gen_ai_client_inference_usage_input_tokens_total",
    )
    assert value(out, "anthropic", gen_ai_token_modality="unknown") == whole.usage.output_tokens == 4
    prompt = whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0)
    assert value(into, "anthropic", gen_ai_token_modality="unknown") == prompt > 0
    assert value(out, "openai", gen_ai_token_modality="unknown") == 4
    duration = "gen_ai_client_inference_duration_seconds_count"
    assert value(duration, "anthropic", error_type="") == 1 and value(duration, "openai", error_type="") == 1


async def test_the_endpoints_of_one_pool_add_up_to_its_series(make_gateway: MakeGateway) -> None:
    # Each endpoint keeps its own figures, the labels stop at the pool: the scrape adds them up (it used
    # to keep only the last endpoint's).
    gw = await make_gateway({"aws": [FakeUpstream("a", tokens=3), FakeUpstream("b", tokens=3)]})
    client = gw.client()
    for _ in range(24):  # ties between the two idle endpoints break at random: both answer some
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    served = {s.endpoint.id for s in gw.gateway.proxy.states.values() if s.successes}
    assert len(served) == 2
    async with httpx.AsyncClient() as http:
        got = samples((await http.get(f"{gw.root}/metrics")).text)
    assert got[("gen_ai_client_inference_duration_seconds_count", op("chat", "aws", error_type=""))] == 24
    tokens = (
        "gen_ai_client_inference_usage_output_tokens_total",
        op("chat", "aws", gen_ai_token_modality="unknown"),
    )
    assert got[tokens] == 72
    attempts = {"gen_ai_request_model": "m", "gen_ai_provider_name": "aws", "skyfabric_region": "r1",
                "skyfabric_pool": "pool", "outcome": "ok"}  # fmt: skip
    assert got[("skyfabric_upstream_attempts_total", frozenset(attempts.items()))] == 24
