"""End-to-end tests of ``skyfabric replica``: a real subprocess on loopback, driven with the official SDK.

One replica (tiny random Llama, CPU) serves the whole module; tests leave it idle when they finish.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from click.testing import CliRunner

from skyfabric.engine.replica import replica_command

from .conftest import Reference, ReplicaProcess, read_metrics, start_replica

pytestmark = pytest.mark.timeout(120)

IGNORE_EOS = {"ignore_eos": True}


def sync_client(replica: ReplicaProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=replica.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def async_client(replica: ReplicaProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=replica.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(replica: ReplicaProcess, path: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    req = urllib.request.Request(
        replica.base_url + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, orjson.loads(err.read())


def wait_idle(replica: ReplicaProcess, timeout: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics(replica.base_url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"replica not idle: {m}")
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------ discovery


def test_health_models_and_metrics_names(replica: ReplicaProcess) -> None:
    with urllib.request.urlopen(replica.base_url + "/health") as resp:
        assert resp.status == 200
    models = sync_client(replica).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    raw = orjson.loads(urllib.request.urlopen(replica.base_url + "/v1/models").read())
    assert raw["data"][0]["capabilities"] == {
        "continue_final_message": True,
        "completions": True,
        "chat": True,
    }
    m = read_metrics(replica.base_url)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "skyfabric:forward_passes_total",
    ):
        assert name in m, name


# ------------------------------------------------------------------------------------------------ chat


def test_chat_sync_matches_reference_greedy(replica: ReplicaProcess, reference: Reference) -> None:
    messages = [{"role": "user", "content": "Write a function"}]
    resp = sync_client(replica).chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, extra_body=IGNORE_EOS
    )
    prompt_ids = reference.chat_ids(messages)
    expected = reference.greedy(prompt_ids, 12)
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "tiny"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == reference.decode(expected)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(prompt_ids), 12)
    assert resp.usage.total_tokens == len(prompt_ids) + 12


async def test_chat_stream_async_with_usage(replica: ReplicaProcess, reference: Reference) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    client = async_client(replica)
    stream = await client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    prompt_ids = reference.chat_ids(messages)
    assert usage_chunk.usage.prompt_tokens == len(prompt_ids)
    assert usage_chunk.usage.completion_tokens == 20
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.decode(reference.greedy(prompt_ids, 20))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed


async def test_chat_stream_continuous_usage(replica: ReplicaProcess) -> None:
    """vLLM's ``continuous_usage_stats``: every chunk with text says how many tokens are done so far."""
    client = async_client(replica)
    stream = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        extra_body=IGNORE_EOS,
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    counts = [
        c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].delta.content and c.usage
    ]
    assert len(counts) == sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert counts == sorted(counts) and counts[-1] == 12 and chunks[-1].usage.completion_tokens == 12


def test_chat_stream_sync_equals_non_stream(replica: ReplicaProcess) -> None:
    client = sync_client(replica)
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "Zürich"}], "max_tokens": 30}
    full = client.chat.completions.create(**kwargs, temperature=0, extra_body=IGNORE_EOS)
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kwargs, temperature=0, stream=True, extra_body=IGNORE_EOS)
        if c.choices
    ]
    assert "".join(parts) == full.choices[0].message.content


def test_chat_continue_final_message_continues_exactly(replica: ReplicaProcess, reference: Reference) -> None:
    """Greedy: continuing the first k tokens as an assistant prefix must produce exactly the rest."""
    messages = [{"role": "user", "content": "hi"}]
    n = 24
    client = sync_client(replica)
    full = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=n, temperature=0, extra_body=IGNORE_EOS
    )
    full_text = full.choices[0].message.content or ""
    ids = reference.greedy(reference.chat_ids(messages), n)
    assert full_text == reference.decode(ids)
    for k in (3, 11):
        prefix = reference.decode(ids[:k])
        assert full_text.startswith(prefix)
        history = [*messages, {"role": "assistant", "content": prefix}]
        # Token boundary check: the prefix re-tokenizes to the same ids, so greedy must continue identically.
        assert (
            reference.chat_ids(history, continue_final_message=True) == reference.chat_ids(messages) + ids[:k]
        )
        for extra in ({"continue_final_message": True}, {"add_generation_prompt": False}):
            cont = client.chat.completions.create(
                model="tiny",
                messages=history,
                max_tokens=n - k,
                temperature=0,
                extra_body={**IGNORE_EOS, **extra},
            )
            assert prefix + (cont.choices[0].message.content or "") == full_text, (k, extra)
            assert cont.usage is not None and cont.usage.completion_tokens == n - k


def test_completions_continue_by_construction(replica: ReplicaProcess, reference: Reference) -> None:
    prompt = "def add(a, b):"
    n, k = 20, 8
    client = sync_client(replica)
    full = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=n, temperature=0, extra_body=IGNORE_EOS
    )
    prompt_ids = reference.prompt_ids(prompt)
    ids = reference.greedy(prompt_ids, n)
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    assert full.choices[0].text == reference.decode(ids)
    assert full.usage is not None
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(prompt_ids), n)
    # As text (re-tokenized), and as token ids (exact by construction).
    prefix = reference.decode(ids[:k])
    as_text = client.completions.create(
        model="tiny", prompt=prompt + prefix, max_tokens=n - k, temperature=0, extra_body=IGNORE_EOS
    )
    as_ids = client.completions.create(
        model="tiny", prompt=prompt_ids + ids[:k], max_tokens=n - k, temperature=0, extra_body=IGNORE_EOS
    )
    assert prefix + as_text.choices[0].text == full.choices[0].text
    assert prefix + as_ids.choices[0].text == full.choices[0].text


async def test_completions_stream_async(replica: ReplicaProcess, reference: Reference) -> None:
    client = async_client(replica)
    stream = await client.completions.create(
        model="tiny",
        prompt="import os",
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
    )
    chunks = [c async for c in stream]
    await client.close()
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference.decode(reference.greedy(reference.prompt_ids("import os"), 16))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


# ------------------------------------------------------------------------------------------------ sampling


def test_eos_ignore_eos_and_min_tokens_force_exact_lengths(
    replica: ReplicaProcess, reference: Reference
) -> None:
    client = sync_client(replica)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    eos = reference.tokenizer.eos_token_id
    assert eos in reference.greedy(
        reference.chat_ids(messages), 8
    )  # this prompt's greedy output hits EOS early
    natural = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    assert natural.choices[0].finish_reason == "stop"
    assert natural.usage is not None and natural.usage.completion_tokens < 8
    for length in (1, 9, 40):
        forced = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=length, temperature=0, extra_body=IGNORE_EOS
        )
        assert forced.usage is not None and forced.usage.completion_tokens == length
        assert forced.choices[0].finish_reason == "length"
        at_least = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=length,
            temperature=0,
            extra_body={"min_tokens": length},
        )
        assert at_least.usage is not None and at_least.usage.completion_tokens == length
        assert at_least.choices[0].finish_reason == "length"
    sampled = client.completions.create(
        model="tiny", prompt="x", max_tokens=64, temperature=1.0, extra_body={"min_tokens": 64}
    )
    assert sampled.usage is not None and sampled.usage.completion_tokens == 64
    # ignore_eos + min_tokens (what a gateway's continuation asks for): EOS is banned, not generated and
    # hidden. Every token this checkpoint can emit is a whole word, so the text must hold exactly 40 words;
    # an EOS token would count in usage but be invisible in the text, and a continuation from that text
    # would not see it.
    both = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=40,
        temperature=0,
        extra_body={**IGNORE_EOS, "min_tokens": 40},
    )
    assert both.usage is not None and both.usage.completion_tokens == 40
    assert len((both.choices[0].message.content or "").split()) == 40


def test_stop_strings_truncate(replica: ReplicaProcess) -> None:
    client = sync_client(replica)
    kwargs = {"model": "tiny", "prompt": "hello", "temperature": 0, "extra_body": IGNORE_EOS}
    full = client.completions.create(max_tokens=30, **kwargs).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = client.completions.create(max_tokens=30, stop=[stop, "\x00never"], **kwargs)
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    parts = [
        c.choices[0].text for c in client.completions.create(max_tokens=30, stop=stop, stream=True, **kwargs)
    ]
    assert "".join(parts) == full[: full.index(stop)]


def test_seed_top_k_top_p_and_n(replica: ReplicaProcess) -> None:
    client = sync_client(replica)
    base = {"model": "tiny", "prompt": "The quick", "max_tokens": 16, "extra_body": IGNORE_EOS}
    greedy = client.completions.create(temperature=0, **base).choices[0].text
    assert client.completions.create(temperature=1.0, top_p=1e-6, **base).choices[0].text == greedy
    top1 = client.completions.create(temperature=1.0, **{**base, "extra_body": {**IGNORE_EOS, "top_k": 1}})
    assert top1.choices[0].text == greedy
    a = client.completions.create(temperature=1.5, seed=1234, **base).choices[0].text
    b = client.completions.create(temperature=1.5, seed=1234, **base).choices[0].text
    c = client.completions.create(temperature=1.5, seed=99, **base).choices[0].text
    assert a == b and a != c
    many = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], n=3, max_tokens=8, temperature=0
    )
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in many.choices}) == 1  # greedy: identical choices


# ------------------------------------------------------------------------------------------------ load


async def test_concurrent_requests_share_forward_passes(
    replica: ReplicaProcess, reference: Reference
) -> None:
    wait_idle(replica)
    before = read_metrics(replica.base_url)
    client = async_client(replica)
    prompts = [f"Request number {i} of the batch" for i in range(16)]
    results = await asyncio.gather(
        *(
            client.completions.create(
                model="tiny", prompt=p, max_tokens=32, temperature=0, extra_body=IGNORE_EOS
            )
            for p in prompts
        )
    )
    await client.close()
    after = read_metrics(replica.base_url)
    generated = sum(r.usage.completion_tokens for r in results if r.usage)
    assert generated == 16 * 32
    passes = after["skyfabric:forward_passes_total"] - before["skyfabric:forward_passes_total"]
    assert passes < generated / 4, (passes, generated)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == generated
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == sum(
        len(reference.prompt_ids(p)) for p in prompts
    )
    # Batched greedy output is the same as unbatched greedy output.
    for prompt, result in list(zip(prompts, results, strict=True))[:4]:
        assert result.choices[0].text == reference.decode(reference.greedy(reference.prompt_ids(prompt), 32))


async def _stream_some(session: aiohttp.ClientSession, url: str, body: dict, lines: int) -> None:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200
        seen = 0
        async for line in resp.content:
            if line.startswith(b"data: "):
                seen += 1
                if seen >= lines:
                    return  # leaving the context closes the connection mid-stream: a disconnect


async def test_load_signals_and_cancellation_on_disconnect(replica: ReplicaProcess) -> None:
    wait_idle(replica)
    before = read_metrics(replica.base_url)
    url = replica.base_url + "/v1/completions"
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1000, "stream": True, **IGNORE_EOS}
    async with aiohttp.ClientSession() as session:
        hold = asyncio.Event()

        async def long_stream(i: int) -> None:
            async with session.post(url, json={**body, "seed": i, "temperature": 1.0}) as resp:
                assert resp.status == 200
                async for _ in resp.content:
                    if hold.is_set():
                        return

        tasks = [asyncio.create_task(long_stream(i)) for i in range(6)]
        running = 0.0
        deadline = time.monotonic() + 10
        while running < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            m = await asyncio.to_thread(read_metrics, replica.base_url)
            running = m["vllm:num_requests_running"]
        assert running >= 1
        assert m["vllm:kv_cache_usage_perc"] > 0
        hold.set()  # every client walks away mid-generation
        await asyncio.gather(*tasks)
        await _stream_some(session, url, body, lines=2)

    after = await asyncio.to_thread(wait_idle, replica, 5.0)
    aborted = after['vllm:request_success_total{finished_reason="abort",model_name="tiny"}']
    assert aborted - before['vllm:request_success_total{finished_reason="abort",model_name="tiny"}'] == 7
    # The cancelled requests stopped generating: far fewer than 7 x 1000 tokens were produced.
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 7 * 1000 / 2
    await asyncio.sleep(0.3)
    settled = await asyncio.to_thread(read_metrics, replica.base_url)
    assert settled["vllm:generation_tokens_total"] == after["vllm:generation_tokens_total"]
    assert settled["vllm:kv_cache_usage_perc"] == 0


async def test_non_streaming_disconnect_cancels(replica: ReplicaProcess) -> None:
    wait_idle(replica)
    before = read_metrics(replica.base_url)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1000, **IGNORE_EOS}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(replica.base_url + "/v1/completions", json=body) as resp:
                await resp.read()
    after = await asyncio.to_thread(wait_idle, replica, 5.0)
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 1
    key = 'vllm:request_success_total{finished_reason="abort",model_name="tiny"}'
    assert after[key] - before[key] == 1


# ------------------------------------------------------------------------------------------------ errors


def test_errors_have_openai_shape_and_status(replica: ReplicaProcess) -> None:
    long_prompt = " ".join(["word"] * 1100)
    cases = [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", b"[1, 2]", 400, None),
        ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
        ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "model",
        ),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"prompt": "hi", "stop": 3}, 400, "stop"),
        ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        ("/v1/completions", {"prompt": long_prompt}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_prompt}]}, 400, "messages"),
    ]
    for path, body, status, param in cases:
        code, payload = post(replica, path, body)
        assert code == status, (body, payload)
        error = payload["error"]
        assert set(error) == {"message", "type", "param", "code"}, payload
        assert error["message"], payload
        if param is not None:
            assert error["param"] == param, (body, payload)
    code, payload = post(replica, "/v1/completions", {"prompt": long_prompt})
    assert payload["error"]["code"] == "context_length_exceeded"
    assert "maximum context length" in payload["error"]["message"]
    with pytest.raises(openai.BadRequestError) as info:
        sync_client(replica).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": long_prompt}], max_tokens=10
        )
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        sync_client(replica).completions.create(model="other", prompt="hi", max_tokens=2)
    # Token ids outside the vocabulary are the client's error, and the replica keeps serving.
    for body, param in (
        ({"prompt": [5, 10**6], "max_tokens": 2}, "prompt"),
        ({"prompt": [5, -1], "max_tokens": 2}, "prompt"),
        ({"prompt": "hi", "max_tokens": 2, "stop_token_ids": [10**6], "min_tokens": 2}, "stop_token_ids"),
    ):
        code, payload = post(replica, "/v1/completions", body)
        assert (code, payload["error"]["param"]) == (400, param), payload
    code, payload = post(replica, "/v1/completions", {"prompt": [5, 6], "max_tokens": 2, **IGNORE_EOS})
    assert code == 200 and payload["usage"]["completion_tokens"] == 2
    # Unknown fields are ignored.
    code, payload = post(
        replica, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "frobnicate": {"x": 1}, **IGNORE_EOS}
    )
    assert code == 200 and payload["usage"]["completion_tokens"] == 2


# ------------------------------------------------------------------------------------------------ lifecycle


async def test_max_num_seqs_queues_then_sigterm_stops_cleanly(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """With 4 slots, 6 streams show as 4 running + 2 waiting; SIGTERM mid-stream ends them and exits 0."""
    rep = await asyncio.to_thread(
        start_replica, tiny_checkpoint, tmp_path / "replica.log", "--max-num-seqs", "4"
    )
    try:
        url = rep.base_url + "/v1/completions"
        body = {"prompt": "x", "max_tokens": 1000, "stream": True, **IGNORE_EOS}
        async with aiohttp.ClientSession() as session:

            async def consume(i: int) -> bytes:
                async with session.post(url, json={**body, "seed": i, "temperature": 1.0}) as resp:
                    return await resp.read()  # returns once the server ends the stream

            tasks = [asyncio.create_task(consume(i)) for i in range(6)]
            deadline = time.monotonic() + 10
            m: dict[str, float] = {}
            while time.monotonic() < deadline:
                m = await asyncio.to_thread(read_metrics, rep.base_url)
                if m["vllm:num_requests_running"] == 4 and m["vllm:num_requests_waiting"] == 2:
                    break
                await asyncio.sleep(0.02)
            assert (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]) == (4, 2)
            rep.proc.send_signal(signal.SIGTERM)
            _, pending = await asyncio.wait(tasks, timeout=20)
            assert not pending  # nobody hangs
        assert await asyncio.to_thread(rep.proc.wait, 20) == 0
        assert "stopped" in rep.log_path.read_text()
    finally:
        if rep.proc.poll() is None:
            rep.proc.kill()
            rep.proc.wait()


def test_replica_command_help_lists_options() -> None:
    from click.testing import CliRunner

    from skyfabric.engine.replica import replica_command

    result = CliRunner().invoke(replica_command, ["--help"])
    assert result.exit_code == 0
    assert replica_command.name == "replica"
    for option in (
        "--model-dir",
        "--host",
        "--port",
        "--served-model-name",
        "--max-num-seqs",
        "--engine",
        "--threads",
    ):
        assert option in result.output


async def test_native_core_death_fails_requests_and_exits_nonzero(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Kill the native engine's core under a stream: the client gets an error, never a hang, and the replica
    exits 1 (its supervisor restarts it) instead of serving 503s forever."""
    rep = await asyncio.to_thread(
        start_replica, tiny_checkpoint, tmp_path / "replica.log", "--engine", "native"
    )
    try:
        children_file = Path(f"/proc/{rep.proc.pid}/task/{rep.proc.pid}/children")
        children = (await asyncio.to_thread(children_file.read_text)).split()
        assert len(children) == 1  # the core process
        core_pid = int(children[0])
        body = {"prompt": "x", "max_tokens": 1000, "stream": True, **IGNORE_EOS}
        url = rep.base_url + "/v1/completions"
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
            assert resp.status == 200
            await resp.content.readline()  # the stream is running
            os.kill(core_pid, signal.SIGKILL)
            rest = await asyncio.wait_for(resp.read(), timeout=20)
        assert b'"error"' in rest and rest.rstrip().endswith(b"data: [DONE]")
        assert await asyncio.to_thread(rep.proc.wait, 20) == 1
        assert "engine core exited" in rep.log_path.read_text()
    finally:
        if rep.proc.poll() is None:
            rep.proc.kill()
            rep.proc.wait()


def test_core_cpus_binds_the_core_and_keeps_http_off_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    rep = start_replica(tiny_checkpoint, tmp_path / "replica.log", "--engine", "native", "--core-cpus", "0")
    try:
        children = Path(f"/proc/{rep.proc.pid}/task/{rep.proc.pid}/children").read_text().split()
        assert os.sched_getaffinity(int(children[0])) == {0}
        others = os.sched_getaffinity(0) - {0}
        assert os.sched_getaffinity(rep.proc.pid) == (others or {0})
        out = sync_client(rep).completions.create(
            model="tiny", prompt="x", max_tokens=3, extra_body=IGNORE_EOS
        )
        assert out.usage is not None and out.usage.completion_tokens == 3
    finally:
        rep.proc.terminate()
        rep.proc.wait(timeout=15)


def test_core_cpus_is_checked() -> None:
    runner = CliRunner()
    result = runner.invoke(replica_command, ["--port", "8000", "--core-cpus", "zero"])
    assert result.exit_code == 2 and "not a CPU list" in result.output
    result = runner.invoke(replica_command, ["--port", "8000", "--core-cpus", "4096"])
    assert result.exit_code == 2 and "may run on CPUs" in result.output
    result = runner.invoke(
        replica_command, ["--port", "8000", "--engine", "transformers", "--core-cpus", "0"]
    )
    assert result.exit_code == 2 and "--core-cpus is for the native engine" in result.output


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_native_memory_is_bounded_and_the_frontend_has_no_torch(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """bf16 (the dtype whose oneDNN kernels are kept per shape): new batch sizes, prompt lengths and context
    lengths in every round must not grow the core; the frontend process never maps libtorch."""
    import random

    rep = await asyncio.to_thread(
        start_replica, tiny_checkpoint, tmp_path / "replica.log", "--engine", "native", "--dtype", "bfloat16"
    )
    try:
        children_file = Path(f"/proc/{rep.proc.pid}/task/{rep.proc.pid}/children")
        core_pid = int((await asyncio.to_thread(children_file.read_text)).split()[0])
        maps = await asyncio.to_thread(Path(f"/proc/{rep.proc.pid}/maps").read_text)
        assert "libtorch" not in maps
        rng = random.Random(0)
        words = ["def", "class", "return", "import", "for", "while", "print", "x", "(", ")"]
        url = rep.base_url + "/v1/completions"

        async def one(session: aiohttp.ClientSession) -> None:
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 150)))
            body = {"prompt": prompt, "max_tokens": rng.randint(1, 90), **IGNORE_EOS}
            async with session.post(url, json=body) as resp:
                assert resp.status == 200
                await resp.read()

        rss: list[float] = []
        async with aiohttp.ClientSession() as session:
            for _ in range(4):
                await asyncio.gather(*(one(session) for _ in range(rng.randint(5, 24))))
                rss.append(await asyncio.to_thread(_rss_mib, core_pid))
        frontend = await asyncio.to_thread(_rss_mib, rep.proc.pid)
        assert rss[-1] - rss[0] < 40, rss
        assert rss[-1] + frontend < 1024, (rss, frontend)
    finally:
        rep.proc.terminate()
        rep.proc.wait(timeout=15)


async def test_one_token_per_chunk_under_load(replica: ReplicaProcess) -> None:
    """A gateway continuing a broken stream counts the tokens it has sent by the chunks it has seen, so every
    token is its own chunk even when 16 streams keep the replica's event loop behind (this checkpoint's
    tokens are whole words: every one carries text)."""
    client = async_client(replica)

    async def chunks() -> tuple[int, int]:
        stream = await client.completions.create(
            model="tiny",
            prompt="for i in",
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={**IGNORE_EOS, "min_tokens": 30},
        )
        count, usage = 0, 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                count += 1
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return count, usage

    results = await asyncio.gather(*(chunks() for _ in range(16)))
    assert results == [(30, 30)] * 16
