"""The embedded fleet end to end: real replicas of the shipped model, the real gateway, the openai SDK.

These start processes and run the model on the CPU, so they are marked slow; they still run in CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from skyfabric.control import EMBEDDED_FLEET
from skyfabric.control.supervisor import EmbeddedFleet
from skyfabric.core.fleet import load_fleet
from skyfabric.drills.faultproxy import FaultMode, FaultProxy

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Write a function that reverses a string."}]


def free_block(n: int) -> int:
    """A base port with ``n`` consecutive free ports after it."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65000:
            continue
        try:
            socks = []
            for port in range(base, base + n):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                socks.append(sock)
            for sock in socks:
                sock.close()
            return base
        except OSError:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port block")


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmbeddedFleet]:
    base = free_block(4)
    embedded = EmbeddedFleet(load_fleet(EMBEDDED_FLEET), port=base, replica_base_port=base + 1)
    embedded.start(timeout=180)
    yield embedded
    embedded.stop()


def client(fleet: EmbeddedFleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{fleet.port}/v1", api_key="none", max_retries=0)


def aclient(fleet: EmbeddedFleet) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{fleet.port}/v1", api_key="none", max_retries=0)


def test_sync_chat_answers_with_python(fleet: EmbeddedFleet) -> None:
    raw = client(fleet).chat.completions.with_raw_response.create(
        model="skyfabric-code", messages=PROMPT, max_tokens=48, temperature=0
    )
    completion = raw.parse()
    text = completion.choices[0].message.content or ""
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 48
    assert any(word in text for word in ("def ", "return", "self", "(", ":"))
    provider = raw.headers["x-skyfabric-backend"].split("/")[0]
    assert provider in {"aws", "gcp", "azure"}
    assert completion.model == "skyfabric-code"


def test_sync_streaming_and_completions(fleet: EmbeddedFleet) -> None:
    stream = client(fleet).chat.completions.create(
        model="code", messages=PROMPT, max_tokens=24, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None
    completion = client(fleet).completions.create(model="code", prompt="def fibonacci(n):", max_tokens=16)
    assert completion.choices[0].text


async def test_async_concurrent_requests_spread_over_providers(fleet: EmbeddedFleet) -> None:
    api = aclient(fleet)

    async def one(i: int) -> str:
        # Twelve conversations: the fleet routes by prefix (affinity), so identical prompts would share
        # replicas by design; different ones spread by their rendezvous hash and the load bound.
        messages = [{"role": "user", "content": f"Write function number {i} that reverses a string."}]
        raw = await api.chat.completions.with_raw_response.create(
            model="skyfabric-code",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
        )
        return raw.headers["x-skyfabric-backend"].split("/")[0]

    providers = await asyncio.gather(*[one(i) for i in range(12)])
    assert set(providers) == {"aws", "gcp", "azure"}
    models = await api.models.list()
    assert {"skyfabric-code", "code"} <= {m.id for m in models.data}


def test_bad_input_gets_clear_errors_and_the_fleet_stays_up(fleet: EmbeddedFleet) -> None:
    with pytest.raises(openai.NotFoundError, match="Models: code, default, skyfabric-code"):
        client(fleet).chat.completions.create(model="gpt-5", messages=PROMPT)
    resp = httpx.post(f"http://127.0.0.1:{fleet.port}/v1/chat/completions", content=b"{oops")
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
    long_prompt = [{"role": "user", "content": "x = 1\n" * 9000}]  # ~36k tokens: past the 32k context
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client(fleet).chat.completions.create(model="code", messages=long_prompt, max_tokens=8)
    assert client(fleet).chat.completions.create(model="code", messages=PROMPT, max_tokens=4).choices


TOOL = {
    "name": "run_tests",
    "description": "Run the project's tests",
    "input_schema": {
        "type": "object",
        "properties": {"path": {"type": "string"}, "verbose": {"type": "boolean"}},
        "required": ["path"],
    },
}


def test_anthropic_sdk_on_the_embedded_fleet(fleet: EmbeddedFleet) -> None:
    """The Anthropic front door on the embedded fleet: text, streaming, a streamed tool call, thinking."""
    api = anthropic.Anthropic(base_url=f"http://127.0.0.1:{fleet.port}", api_key="none", max_retries=0)
    message = api.messages.create(model="code", max_tokens=24, messages=PROMPT)  # type: ignore[arg-type]
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens > 0
    with api.messages.stream(model="code", max_tokens=24, messages=PROMPT) as stream:  # type: ignore[arg-type]
        streamed = stream.get_final_message()
    assert streamed.content[0].type == "text" and streamed.usage.input_tokens > 0
    with api.messages.stream(
        model="code",
        max_tokens=64,
        tools=[TOOL],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "run_tests"},
        messages=[{"role": "user", "content": "Run the tests of src/"}],
    ) as stream:
        kinds = [event.delta.type for event in stream if event.type == "content_block_delta"]
        called = stream.get_final_message()
    assert "input_json_delta" in kinds
    use = called.content[-1]
    assert use.type == "tool_use" and use.name == "run_tests" and isinstance(use.input, dict)
    assert set(use.input) == {"path", "verbose"} and isinstance(use.input["path"], str)
    assert called.stop_reason == "tool_use"
    thought = api.messages.create(
        model="code",
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=PROMPT,  # type: ignore[arg-type]
    )
    assert thought.content[0].type == "thinking" and thought.content[0].thinking
    assert thought.content[-1].type == "text"
    counted = api.messages.count_tokens(model="code", messages=PROMPT)  # type: ignore[arg-type]
    assert counted.input_tokens > 5


@dataclass
class _Replica:
    """A running replica of the module's fleet, as ``fleet_data`` (tests/conftest.py) reads an upstream."""

    url: str
    port: int
    model: str = "skyfabric-code"
    fleet_model: str = "m"
    engine: str = "local"
    can_continue: bool = True


async def _over_a_cutting_proxy(fleet: EmbeddedFleet, make_gateway: Any, events: int) -> tuple[Any, Any]:
    """A gateway over two replicas of the fleet; the first behind a proxy that cuts a stream after
    ``events`` SSE events, and preferred (the other looks busy), so every stream starts there."""
    children = [c for c in fleet.replicas if c.name.startswith(("gcp/", "azure/"))][:2]
    urls = [c.health_url.rsplit("/", 1)[0] for c in children]
    host, port = urls[0].removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port), name="cut")
    await proxy.start()
    await proxy.set_mode(FaultMode(cut_rate=1.0, cut_after_events=events))
    first = _Replica(f"http://127.0.0.1:{proxy.port}/v1", proxy.port)
    second = _Replica(urls[1] + "/v1", int(urls[1].rsplit(":", 1)[1]))
    gw = await make_gateway({"one": [first], "two": [second]}, retry={"outage_wait": 1.0})
    gw.gateway.proxy.states["two/r1/pool/0"].outstanding = 1000  # looks busy: the stream starts on "one"
    return gw, proxy


@pytest.mark.parametrize("cut", ["tool_call", "thinking"])
async def test_a_stream_cut_mid_tool_call_or_thinking_on_the_embedded_fleet_completes_identically(
    fleet: EmbeddedFleet, make_gateway: Any, cut: str
) -> None:
    """Both client protocols; the replica continues the cut part natively (its arguments or thinking), so
    the answer cut after six events equals the uncut one."""
    kwargs: dict[str, Any] = {"model": "m", "temperature": 0, "seed": 7}
    if cut == "tool_call":
        openai_extra = {
            "tools": [
                {"type": "function", "function": {"name": TOOL["name"], "parameters": TOOL["input_schema"]}}
            ],
            "tool_choice": "required",
            "max_tokens": 64,
        }
    else:
        openai_extra = {"reasoning_effort": "medium", "max_tokens": 48}
    messages = [{"role": "user", "content": "Run the tests of src/"}]
    gw, proxy = await _over_a_cutting_proxy(fleet, make_gateway, 6)
    try:
        api = gw.client()

        async def answer() -> tuple[str, str, str]:
            stream = await api.chat.completions.create(
                messages=messages,
                stream=True,
                **kwargs,
                **openai_extra,  # type: ignore[arg-type]
            )
            text = reasoning = arguments = ""
            async for chunk in stream:
                if chunk.choices:
                    delta = chunk.choices[0].delta
                    text += delta.content or ""
                    reasoning += getattr(delta, "reasoning_content", None) or ""
                    for call in delta.tool_calls or []:
                        arguments += call.function.arguments or "" if call.function else ""
            return text, reasoning, arguments

        cut_answer = await answer()
        await proxy.set_mode(FaultMode())
        whole = await answer()
        assert gw.gateway.proxy.metrics.rescued._value.get() >= 1
        assert cut_answer == whole
        if cut == "tool_call":
            assert json.loads(whole[2])
        else:
            assert whole[1]

        # The same through the Anthropic front door: the blocks of the cut answer are the whole one's.
        claude = anthropic.AsyncAnthropic(base_url=gw.root, api_key="none", max_retries=0)
        extra: dict[str, Any] = (
            {"tools": [TOOL], "tool_choice": {"type": "any"}, "max_tokens": 64}
            if cut == "tool_call"
            else {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 1100}
        )

        async def blocks() -> list[dict[str, Any]]:
            async with claude.messages.stream(
                model="m",
                messages=messages,
                extra_body={"temperature": 0},
                **extra,  # type: ignore[arg-type]
            ) as stream:
                final = await stream.get_final_message()
            return [b.model_dump() for b in final.content]

        await proxy.set_mode(FaultMode(cut_rate=1.0, cut_after_events=6))
        one = gw.gateway.proxy.states["one/r1/pool/0"]
        one.ejected_until, one.needs_probe = 0.0, False  # the cut ejected it: take it back at once
        rescued = gw.gateway.proxy.metrics.rescued._value.get()
        cut_blocks = await blocks()
        await proxy.set_mode(FaultMode())
        assert gw.gateway.proxy.metrics.rescued._value.get() > rescued
        assert cut_blocks == await blocks()
    finally:
        await proxy.stop()


async def test_killing_a_provider_mid_stream_loses_no_stream(fleet: EmbeddedFleet) -> None:
    """32 concurrent streams; every replica of one provider is killed while they run."""
    api = aclient(fleet)
    n_tokens = 120
    received = 0
    midway = asyncio.Event()
    prompts = [f"Write a function number {i} that parses a config file." for i in range(4)]
    params = {
        "max_tokens": n_tokens,
        "temperature": 0,
        "extra_body": {"min_tokens": n_tokens, "ignore_eos": True},
    }
    # the reference: each prompt answered whole, greedily, before anything is killed
    reference = {}
    for p in prompts:
        done = await api.chat.completions.create(
            model="code",
            messages=[{"role": "user", "content": p}],
            **params,  # type: ignore[arg-type]
        )
        reference[p] = done.choices[0].message.content

    # which provider answers each stream, and how far along it is: with affinity on, the four prompts
    # may all sit on two providers, so the provider to kill is the one carrying the most live streams
    provider_of: dict[int, str] = {}
    progress: dict[int, int] = {}
    finished: set[int] = set()

    async def stream(i: int) -> tuple[str, str, str | None, int]:
        p = prompts[i % len(prompts)]
        raw = await api.chat.completions.with_raw_response.create(
            model="code",
            messages=[{"role": "user", "content": p}],
            stream=True,
            stream_options={"include_usage": True},
            **params,  # type: ignore[arg-type]
        )
        provider_of[i] = raw.headers["x-skyfabric-backend"].split("/")[0]
        s = raw.parse()
        text, reason, usage = "", None, 0
        nonlocal received
        async for chunk in s:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                received += 1
                progress[i] = progress.get(i, 0) + 1
                if received >= 32 * 12:  # every stream is well under way, none is near its end
                    midway.set()
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        finished.add(i)
        return p, text, reason, usage

    killed: list[str] = []

    async def kill_busiest() -> None:
        await midway.wait()
        live: dict[str, int] = {}
        for i, provider in provider_of.items():
            if i not in finished and progress.get(i, 0) > 0:
                live[provider] = live.get(provider, 0) + 1
        victim = max(live, key=live.__getitem__)
        killed.append(victim)
        for child in fleet.replicas:
            if child.name.startswith(f"{victim}/") and child.proc is not None:
                child.proc.kill()

    results, _ = await asyncio.gather(asyncio.gather(*[stream(i) for i in range(32)]), kill_busiest())
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"http://127.0.0.1:{fleet.port}/metrics")).text
    rescued = next(
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("skyfabric_rescued_streams_total")
    )
    assert rescued >= 1  # some streams really were cut mid-answer and continued
    print(f"\nkilled {killed[0]} under 32 streams: {rescued:.0f} rescued mid-answer, {len(results)} complete")
    for prompt, text, reason, usage in results:
        assert reason == "length"
        assert usage == n_tokens
        assert text == reference[prompt]


def test_up_prints_how_to_call_and_leaves_no_orphans(tmp_path: Path) -> None:
    base = free_block(4)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "skyfabric.cli",
            "up",
            "--port",
            str(base),
            "--replica-base-port",
            str(base + 1),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Ctrl-C stops everything" in line or not line:
            break
    banner = "".join(lines)
    assert f"http://127.0.0.1:{base}/v1" in banner and "OpenAI(base_url=" in banner
    children = [
        int(p)
        for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ]
    assert len(children) == 4  # three replicas and the gateway
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    time.sleep(0.5)
    alive = [
        pid
        for pid in children
        if os.path.exists(f"/proc/{pid}") and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    ]
    assert alive == []
