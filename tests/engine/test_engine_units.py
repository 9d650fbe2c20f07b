"""Unit tests of the engine's text handling and of the replica's HTTP layer over a fake engine (no torch)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from skyfabric.engine.base import (
    Engine,
    EngineCapabilities,
    EngineStats,
    GenerationDelta,
    GenerationRequest,
    create_engine,
)
from skyfabric.engine.replica import ReplicaApp
from skyfabric.engine.text import IncrementalDetokenizer, StopStringMatcher

# ------------------------------------------------------------------------------------------------ detokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint, local_files_only=True)


def _stream(tokenizer: Any, ids: list[int], rng: random.Random) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas, i = [], 0
    while i < len(ids):
        step = rng.choice([1, 1, 1, 2, 3])
        deltas.append(detok.push(ids[i : i + step]))
        i += step
    deltas.append(detok.flush())
    return deltas


def test_detokenizer_never_splits_characters(tokenizer: Any) -> None:
    text = "Café naïve → ∑ π 日本語のテキスト 🚀 👍🏽 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters really span several tokens
    rng = random.Random(0)
    for _ in range(20):
        deltas = _stream(tokenizer, ids, rng)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
        assert all("\ufffd" not in d for d in deltas)


def test_detokenizer_matches_full_decode_on_arbitrary_ids(tokenizer: Any) -> None:
    rng = random.Random(1)
    vocab = len(tokenizer)
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        deltas = _stream(tokenizer, ids, rng)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_stop_string_matcher_holds_back_and_cuts() -> None:
    m = StopStringMatcher(["STOP", "\n\n"])
    assert m.feed("hello S") == ("hello ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("Oink") == ("STOink", False)
    assert m.feed(" x\n") == (" x", False)
    assert m.feed("\nrest") == ("", True)
    m = StopStringMatcher(["abc", "b"])
    assert m.feed("xab") == ("xa", True)  # earliest match wins
    m = StopStringMatcher(["END"])
    assert m.feed("all EN") == ("all ", False)
    assert m.flush() == "EN"
    assert StopStringMatcher([]).feed("anything") == ("anything", False)


# ------------------------------------------------------------------------------------------------ fake engine


class EchoEngine(Engine):
    """Echoes the prompt's characters back one token at a time; proves the HTTP layer needs only the ABC."""

    def __init__(self) -> None:
        self.capabilities = EngineCapabilities(continue_final_message=True, completions=True)
        self._ready = False
        self.fail_after: int | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def max_model_len(self) -> int:
        return 64

    async def start(self) -> None:
        self._ready = True

    async def stop(self) -> None:
        self._ready = False

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def tokenize_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        return self.tokenize("".join(str(m["content"]) for m in messages))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        out = [chr(t) for t in request.prompt_ids][: request.max_tokens]
        for i, ch in enumerate(out):
            await asyncio.sleep(0)
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("boom")
            last = i == len(out) - 1
            yield GenerationDelta(ch, (ord(ch),), "length" if last else None)

    def stats(self) -> EngineStats:
        return EngineStats(running=1, waiting=2, kv_cache_usage=0.5, finished_total={"stop": 3})


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, EchoEngine, ReplicaApp]]:
    engine = EchoEngine()
    replica = ReplicaApp(engine, "echo")
    runner = web.AppRunner(replica.application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", engine, replica
    finally:
        await runner.cleanup()


async def test_health_is_503_until_engine_ready(echo_server: tuple[str, EchoEngine, ReplicaApp]) -> None:
    url, engine, replica = echo_server
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/health") as resp:
            assert resp.status == 503
        async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "engine_not_ready"
        await engine.start()
        replica.state = "ready"
        async with session.get(url + "/health") as resp:
            assert resp.status == 200


async def test_raw_sse_wire_format_and_metrics(echo_server: tuple[str, EchoEngine, ReplicaApp]) -> None:
    url, engine, replica = echo_server
    await engine.start()
    replica.state = "ready"
    body = {"model": "echo", "messages": [{"role": "user", "content": "abc"}], "stream": True, "n": 2}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = await resp.read()
        events = raw.split(b"\n\n")
        assert events[-1] == b"" and events[-2] == b"data: [DONE]"
        chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
        assert all(e.startswith(b"data: ") for e in events[:-1])
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        for index in (0, 1):
            text = "".join(
                c["choices"][0]["delta"].get("content", "")
                for c in chunks[1:]
                if c["choices"][0]["index"] == index
            )
            assert text == "abc"
        async with session.get(url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'vllm:num_requests_waiting{model_name="echo"} 2.0' in metrics
        assert 'vllm:gpu_cache_usage_perc{model_name="echo"} 0.5' in metrics
        assert 'vllm:request_success_total{finished_reason="stop",model_name="echo"} 3.0' in metrics


async def test_engine_failure_mid_stream_is_reported(echo_server: tuple[str, EchoEngine, ReplicaApp]) -> None:
    url, engine, replica = echo_server
    await engine.start()
    replica.state = "ready"
    engine.fail_after = 2
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", json={"prompt": "abcdef"}) as resp:
            assert resp.status == 500
            assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}
        async with session.post(url + "/v1/completions", json={"prompt": "abcdef", "stream": True}) as resp:
            raw = await resp.read()
        assert b'"error"' in raw and raw.endswith(b"data: [DONE]\n\n")


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        create_engine("llama.cpp", model_dir="/nowhere")


def test_built_in_engines_are_data_resolved_only_when_chosen() -> None:
    """The registry names every built-in engine; listing them imports none (no torch for ``--help``)."""
    import subprocess
    import sys

    from skyfabric.engine import registry
    from skyfabric.engine.base import engine_names
    from skyfabric.engine.external import ServerSpec, server_command, server_engine_names

    assert engine_names() == ["native", "transformers"]
    assert server_engine_names() == ["llama-cpp", "vllm"]
    for name, target in registry.ENGINES.items():
        factory = registry.resolve(target)
        assert isinstance(factory, type) and issubclass(factory, Engine), name
    for name, target in registry.SERVER_ENGINES.items():
        assert callable(registry.resolve(target)), name
    with pytest.raises(ValueError, match="unknown server engine 'sglang'; available: llama-cpp, vllm"):
        server_command(
            "sglang", ServerSpec(model_dir=Path("/nowhere"), host="h", port=1, served_model_name="m")
        )
    probe = (
        "import sys\n"
        "from skyfabric.engine.base import engine_names\n"
        "from skyfabric.engine.external import server_engine_names\n"
        "engine_names(); server_engine_names()\n"
        "loaded = sorted(m for m in sys.modules if m.endswith('_engine') or m in ('torch', 'transformers'))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def test_a_plug_in_registers_at_run_time() -> None:
    from skyfabric.engine import base

    base.register_engine("echo", EchoEngine)
    try:
        assert "echo" in base.engine_names()
        assert isinstance(create_engine("echo"), EchoEngine)
    finally:
        del base._REGISTRY["echo"]
    with pytest.raises(ValueError, match="unknown engine 'echo'; available: native, transformers"):
        create_engine("echo")
