"""Cache-aware routing: prefix keys, rendezvous order, the load bound, the fallback under failure, and the
table of where reporting replicas hold their prefixes."""

from __future__ import annotations

import random
import time

import openai

from skyfabric.core.endpoints import Endpoint
from skyfabric.gateway.affinity import BOUND, PrefixTable, parse_report, prefer, prefix_key, rendezvous
from skyfabric.gateway.balancer import Cluster, EndpointState, OutlierPolicy, record_failure
from tests.conftest import MakeGateway
from tests.support.fake_upstream import FakeUpstream

SYSTEM = {"role": "system", "content": "You are a coding agent. " * 200}


def endpoint(provider: str, index: int, concurrency: int = 16) -> Endpoint:
    return Endpoint(
        provider, "r", "p", index, f"http://127.0.0.1:{9000 + index}/v1", "m", "m", "vllm", "cpu", True,
        concurrency, 1.0,
    )  # fmt: skip


def cluster(n: int = 3) -> Cluster:
    return Cluster("m", [EndpointState(endpoint(p, i)) for i, p in enumerate(("aws", "gcp", "azure")[:n])])


def conversation(i: int, turns: int) -> dict[str, object]:
    messages: list[dict[str, object]] = [SYSTEM, {"role": "user", "content": f"task {i}"}]
    for t in range(turns):
        messages += [
            {"role": "assistant", "content": f"answer {t}"},
            {"role": "user", "content": f"more {t}"},
        ]
    return {"model": "m", "messages": messages}


def test_prefix_key_names_the_conversation_not_the_turn() -> None:
    assert prefix_key(conversation(1, 0)) == prefix_key(conversation(1, 5))
    assert prefix_key(conversation(1, 0)) != prefix_key(conversation(2, 0))
    parts = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "task 1"}]}]}
    plain = {"model": "m", "messages": [{"role": "user", "content": "task 1"}]}
    assert prefix_key(parts) == prefix_key(plain) is not None
    assert prefix_key({"prompt": "def f():"}) == prefix_key({"prompt": "def f():", "max_tokens": 3})
    assert prefix_key({"prompt": ""}) is None and prefix_key({"messages": ["bad"]}) is None


def test_rendezvous_moves_only_the_keys_of_a_vanished_endpoint() -> None:
    states = cluster().states
    keys = [prefix_key(conversation(i, 0)) for i in range(200)]
    first = {k: rendezvous(k, states)[0].endpoint.id for k in keys if k is not None}
    assert len(set(first.values())) == 3  # spread over all three
    gone = states[1].endpoint.id
    after = {k: rendezvous(k, [states[0], states[2]])[0].endpoint.id for k in first}
    assert all(after[k] == first[k] for k in first if first[k] != gone)


def test_turns_land_where_their_prefix_is_and_fall_back_when_it_fails() -> None:
    """30 interleaved conversations over three endpoints: every turn returns to its first endpoint."""
    c = cluster()
    home: dict[int, str] = {}
    landed = 0
    rng = random.Random(0)
    order = [i for i in range(30) for _ in range(4)]
    rng.shuffle(order)
    turns = dict.fromkeys(range(30), 0)
    for i in order:
        key = prefix_key(conversation(i, turns[i]))
        state = c.pick(100.0, affinity=key)
        assert state is not None
        landed += home.setdefault(i, state.endpoint.id) == state.endpoint.id
        turns[i] += 1
    assert landed == len(order)
    assert len(set(home.values())) == 3
    # The preferred endpoint of conversation 0 fails hard: its turns go to the same second choice.
    key = prefix_key(conversation(0, 0))
    preferred, second = rendezvous(key, c.states)[:2]
    record_failure(preferred, 100.0, OutlierPolicy(), hard=True)
    assert not preferred.available(100.5)
    assert all(c.pick(100.5, affinity=key) is second for _ in range(10))
    # A retry avoids the endpoint already tried, and still follows the key's order.
    assert c.pick(100.5, affinity=key, avoid_endpoints=[second.endpoint.id]) is rendezvous(key, c.states)[2]


def test_a_hot_prefix_spills_over_within_the_bound() -> None:
    """One prefix sent 60 times at once: its endpoint takes its share up to the bound, the rest spill."""
    c = cluster()
    key = prefix_key(conversation(7, 0))
    picks: dict[str, int] = {}
    for _ in range(60):
        state = c.pick(100.0, affinity=key)
        assert state is not None
        state.outstanding += 1  # in flight: the balancer's load
        picks[state.endpoint.id] = picks.get(state.endpoint.id, 0) + 1
    preferred = rendezvous(key, c.states)[0].endpoint.id
    loads = [s.load(100.0) for s in c.states]
    mean = sum(loads) / len(loads)
    assert picks[preferred] == max(picks.values())
    assert max(loads) <= BOUND * mean + 2 / 16  # no replica far above the others
    assert len(picks) == 3
    for s in c.states:
        s.outstanding = 0
    assert all(s.outstanding == 0 for s in c.states)


def test_without_a_key_the_balancer_is_least_loaded() -> None:
    c = cluster()
    c.states[0].outstanding = 3
    c.states[1].outstanding = 1
    c.states[2].outstanding = 2
    assert c.pick(100.0) is c.states[1]
    assert c.pick(100.0, affinity=None) is c.states[1]


async def test_gateway_sends_a_conversation_back_to_its_replica_and_past_a_failure(
    make_gateway: MakeGateway,
) -> None:
    """Through the gateway (OpenAI SDK): 9 conversations x 3 turns each stay on one upstream; when one's
    upstream dies, its next turns all go to one other upstream; nothing stays counted in flight."""
    ups = [FakeUpstream(f"u{i}", tokens=2) for i in range(3)]
    gw = await make_gateway(
        {"aws": ups[:1], "gcp": ups[1:2], "azure": ups[2:]}, models=[{"name": "m", "affinity": True}]
    )
    client = gw.client()

    async def turn(i: int, t: int) -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model="m",
            messages=conversation(i, t)["messages"],  # type: ignore[arg-type]
        )
        return str(raw.headers["x-skyfabric-backend"])

    homes: dict[int, set[str]] = {i: set() for i in range(9)}
    for t in range(3):
        for i in range(9):
            homes[i].add(await turn(i, t))
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) >= 2  # conversations spread over the upstreams
    # Conversation 0's upstream dies: the next turns are answered elsewhere, all by the same one.
    home = next(iter(homes[0]))
    dead = next(up for up, name in zip(ups, ("aws", "gcp", "azure"), strict=True) if home.startswith(name))
    await dead.stop()
    started = time.monotonic()
    after = {await turn(0, 3 + k) for k in range(4)}
    assert len(after) == 1 and after != {home}
    assert time.monotonic() - started < 5.0  # the worst case: one refused connection, then a retry
    assert all(s.outstanding == 0 and s.streaming == 0 for s in gw.gateway.proxy.states.values())


def report(capacity: int, prompt: int, epoch: str = "e1") -> bytes:
    return f"capacity={capacity}; prompt={prompt}; epoch={epoch}".encode()


def test_reports_parse_and_malformed_ones_are_ignored() -> None:
    assert parse_report(report(1000, 20)) == (1000, 20, "e1")
    assert parse_report(b"capacity=10;prompt=3") == (10, 3, "")
    for bad in (b"", b"capacity=x; prompt=3", b"prompt=3", b"capacity=0; prompt=3", b"capacity=5; prompt=-1"):
        assert parse_report(bad) is None
    table = PrefixTable()
    table.learn(1, "a", b"garbage")
    assert table.holder(1) is None


def test_table_mirrors_each_replica_lru_within_its_reported_capacity() -> None:
    table = PrefixTable()
    for key in (1, 2, 3):
        table.learn(key, "a", report(1000, 400))  # 1,200 tokens > 1,000: key 1 (the oldest) is evicted
    assert [table.holder(k) for k in (1, 2, 3)] == [None, "a", "a"]
    table.learn(2, "a", report(1000, 450))  # key 2 used again: now key 3 is the oldest
    table.learn(4, "a", report(1000, 100))
    assert [table.holder(k) for k in (2, 3, 4)] == ["a", "a", "a"]
    table.learn(5, "a", report(1000, 200))
    assert [table.holder(k) for k in (2, 3, 4, 5)] == ["a", None, "a", "a"]
    # The newest turn of a conversation is where it was served last; the old copy no longer counts there.
    table.learn(2, "b", report(5000, 500))
    assert table.holder(2) == "b"
    table.learn(6, "a", report(1000, 600))  # a holds 4 (100) + 5 (200) + 6 (600): all fit without 2
    assert [table.holder(k) for k in (4, 5, 6)] == ["a", "a", "a"]
    # A restarted replica (a new epoch) holds nothing it held before.
    table.learn(7, "a", report(1000, 10, epoch="e2"))
    assert [table.holder(k) for k in (4, 5, 6, 7)] == [None, None, None, "a"]
    table.forget("b")
    assert table.holder(2) is None


def test_table_is_bounded_in_keys() -> None:
    table = PrefixTable(max_keys=50)
    for key in range(200):
        table.learn(key, f"e{key % 3}", report(10**9, 10))
    assert sum(table.holder(k) is not None for k in range(200)) == 50
    assert all(table.holder(k) is not None for k in range(150, 200))


def test_the_reported_holder_comes_before_the_rendezvous_choice_within_the_bound() -> None:
    c = cluster()
    key = prefix_key(conversation(3, 0))
    assert key is not None
    first, second, third = rendezvous(key, c.states)
    loads = [0.0, 0.0, 0.0]
    assert prefer(key, c.states, loads) is first
    assert prefer(key, c.states, loads, holder=third.endpoint.id) is third
    # A holder over the bound is passed over for the rendezvous order, as is one not among the candidates.
    busy = [10.0 if s is third else 0.0 for s in c.states]
    assert prefer(key, c.states, busy, holder=third.endpoint.id) is first
    assert prefer(key, [first, second], [0.0, 0.0], holder=third.endpoint.id) is first
    assert c.pick(100.0, affinity=key, holder=third.endpoint.id) is third
    record_failure(third, 100.0, OutlierPolicy(), hard=True)
    assert c.pick(100.5, affinity=key, holder=third.endpoint.id) is first


async def test_gateway_follows_where_reporting_replicas_hold_a_prefix(make_gateway: MakeGateway) -> None:
    """A conversation pushed off its rendezvous choice by load stays where its turns were cached when the
    upstreams report their cache; with upstreams that report nothing it goes back to the rendezvous choice."""
    for reporting in (True, False):
        ups = [FakeUpstream(f"u{i}", tokens=2, prefix_cache=100_000 if reporting else 0) for i in range(3)]
        gw = await make_gateway(
            {"aws": ups[:1], "gcp": ups[1:2], "azure": ups[2:]}, models=[{"name": "m", "affinity": True}]
        )
        client = gw.client()
        proxy = gw.gateway.proxy

        async def turn(t: int, client: openai.AsyncOpenAI = client) -> str:
            raw = await client.chat.completions.with_raw_response.create(
                model="m",
                messages=conversation(5, t)["messages"],  # type: ignore[arg-type]
            )
            return str(raw.headers["x-skyfabric-backend"])

        home = await turn(0)
        key = prefix_key(conversation(5, 0))
        assert key is not None
        assert home == rendezvous(key, list(proxy.states.values()))[0].endpoint.id
        proxy.states[home].outstanding += 100  # busy for one turn: it spills over
        moved = await turn(1)
        proxy.states[home].outstanding -= 100
        assert moved != home
        later = {await turn(t) for t in range(2, 5)}
        assert later == ({moved} if reporting else {home}), (reporting, later)
        assert (proxy.prefix_table.holder(key) == moved) is reporting
