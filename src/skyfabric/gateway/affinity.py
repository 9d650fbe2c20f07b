"""Cache-aware routing: requests that share a prefix go to the endpoint likely to hold its KV cache.

Serving engines keep the KV blocks of prompts they have seen (vLLM's and the native engine's prefix
caching). A coding agent resends the same long system prompt, tools and conversation with every turn; sent
to the replica that served the last turn, only the new tail is prefilled. Without state from the replicas,
the gateway names a request's prefix by hashing its leading messages (the system prompt and the first
non-system message: a conversation's turns all start with them) and maps the name to an endpoint by rendezvous
(highest-random-weight) hashing: stable as endpoints come and go (only the keys of a vanished endpoint
move), and the same on every gateway worker (the hash is keyed, not Python's per-process ``hash``).

Balanced against load as in consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam): an
endpoint takes an affine request only while its load is under ``BOUND`` times the cluster's mean plus one
request, so one hot prefix spills over to its second choice (the next endpoint in its rendezvous order,
which then warms a copy) instead of melting one replica. Ejected, cooling or already-tried endpoints are
never candidates (the balancer filters them first), so under failure a prefix moves to its next choice
and everything else is plain least-load.

Replicas that report their cache state do better (:class:`PrefixTable`): skyfabric's replicas answer with
``x-skyfabric-prefix-cache: capacity=<tokens>; prompt=<tokens>; epoch=<id>`` (their prefix cache's size,
the prompt they have just cached, and their process). The gateway mirrors each such replica's LRU from
those reports and prefers the endpoint that holds a prefix over the rendezvous choice: a conversation that
spilled over to its second choice, or was moved by a failure, stays where its KV now is instead of being
sent back to a replica that never saw its later turns, and a restarted replica (a new epoch) is known to
hold nothing. Endpoints that report nothing (vLLM, llama.cpp, vendors) get rendezvous hashing alone.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from skyfabric.core.endpoints import Endpoint


class Candidate(Protocol):
    """What routing by prefix needs of an endpoint's state (the balancer's ``EndpointState``)."""

    @property
    def endpoint(self) -> Endpoint: ...


C = TypeVar("C", bound=Candidate)

#: An endpoint stays preferred while its load is at most this many times the mean (plus one request).
BOUND = 1.25

#: Characters of a completions prompt (or of each leading message) that name its prefix.
PREFIX_CHARS = 4096


def prefix_key(body: Mapping[str, Any]) -> int | None:
    """A stable 64-bit name for the request's prefix, or None when it has none worth routing by.

    Chat: the leading system/developer messages and the first user message: each one's role, length, and
    first :data:`PREFIX_CHARS` and last 256 characters (a 100 kB system prompt is not hashed whole, and two
    conversations under the same system prompt still get different names). Completions: the prompt's
    first :data:`PREFIX_CHARS` characters.
    """
    messages = body.get("messages")
    parts: list[str] = []
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                return None
            role = message.get("role")
            text = _text(message.get("content"))
            head = text if len(text) <= PREFIX_CHARS + 256 else text[:PREFIX_CHARS] + text[-256:]
            parts.append(f"{role}\x00{len(text)}\x00{head}\x01")
            if role not in ("system", "developer"):
                break
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return None
        parts.append(prompt[:PREFIX_CHARS])
    if not parts:
        return None
    joined = "".join(parts)
    digest = hashlib.blake2b(joined.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _weight(key: int, endpoint_id: str) -> int:
    digest = hashlib.blake2b(endpoint_id.encode(), digest_size=8, key=key.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little")


def rendezvous(key: int, states: Sequence[C]) -> list[C]:
    """``states`` in the key's order of preference (highest random weight first)."""
    return sorted(states, key=lambda s: _weight(key, s.endpoint.id), reverse=True)


def prefer(key: int, states: Sequence[C], loads: Sequence[float], holder: str | None = None) -> C | None:
    """The endpoint reported to hold the key's prefix (``holder``), else the first in the key's rendezvous
    order, whose load is within the bound; None when none is.

    ``loads`` are the balancer's (requests per unit of capacity), in the order of ``states``.
    """
    if not states:
        return None
    mean = sum(loads) / len(loads)
    load_of = {id(s): load for s, load in zip(states, loads, strict=True)}

    def within(state: C) -> bool:
        return load_of[id(state)] <= BOUND * mean + 1.0 / state.endpoint.concurrency

    if holder is not None:
        held = next((s for s in states if s.endpoint.id == holder), None)
        if held is not None and within(held):
            return held
    for state in rendezvous(key, states):
        if within(state):
            return state
    return None


#: The report header replicas send (``engine/replica.py``).
REPORT_HEADER = b"x-skyfabric-prefix-cache"


def parse_report(value: bytes) -> tuple[int, int, str] | None:
    """``capacity=<int>; prompt=<int>; epoch=<id>`` → (capacity, prompt, epoch); None if malformed."""
    fields: dict[str, str] = {}
    for part in value.decode("latin-1").split(";"):
        name, sep, text = part.strip().partition("=")
        if sep:
            fields[name] = text
    try:
        capacity, prompt = int(fields["capacity"]), int(fields["prompt"])
    except (KeyError, ValueError):
        return None
    if capacity <= 0 or prompt < 0:
        return None
    return capacity, prompt, fields.get("epoch", "")


@dataclass(slots=True)
class _Mirror:
    """One reporting endpoint's cache as the gateway reconstructs it: prefix keys in LRU order."""

    epoch: str
    capacity: int
    keys: OrderedDict[int, int] = field(default_factory=OrderedDict)  # key → tokens, oldest first
    tokens: int = 0


class PrefixTable:
    """Which endpoint holds which prefix, from the reports of endpoints that send them.

    Each report says an endpoint has just cached a prompt of ``prompt`` tokens under a prefix key; the
    table keeps, per endpoint, the keys it holds in least-recently-used order within its reported
    ``capacity`` (as the replica's own pool evicts), and for each key the endpoint that served it last
    (which holds its newest turn). A new ``epoch`` (a restarted replica) empties that endpoint's mirror.
    Bounded: at most ``max_keys`` keys in all, the least recently reported dropped first.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._mirrors: dict[str, _Mirror] = {}
        self._holder: OrderedDict[int, str] = OrderedDict()

    def holder(self, key: int) -> str | None:
        """The endpoint that reported holding the key's prefix last, if its cache still should."""
        return self._holder.get(key)

    def learn(self, key: int, endpoint: str, report: bytes) -> None:
        """``endpoint`` answered a request under ``key`` with this report header."""
        parsed = parse_report(report)
        if parsed is None:
            return
        capacity, prompt, epoch = parsed
        mirror = self._mirrors.get(endpoint)
        if mirror is None or mirror.epoch != epoch:
            if mirror is not None:
                self.forget(endpoint)
            mirror = self._mirrors[endpoint] = _Mirror(epoch, capacity)
        mirror.capacity = capacity
        previous = self._holder.pop(key, None)
        if previous is not None and previous != endpoint:
            self._drop(previous, key)
        mirror.tokens += prompt - mirror.keys.pop(key, 0)
        mirror.keys[key] = prompt
        self._holder[key] = endpoint
        while mirror.tokens > mirror.capacity and len(mirror.keys) > 1:
            old, tokens = mirror.keys.popitem(last=False)
            mirror.tokens -= tokens
            self._holder.pop(old, None)
        while len(self._holder) > self.max_keys:
            old, owner = self._holder.popitem(last=False)
            self._drop(owner, old)

    def forget(self, endpoint: str) -> None:
        """Everything ``endpoint`` was thought to hold (it restarted, or left the fleet)."""
        mirror = self._mirrors.pop(endpoint, None)
        if mirror is not None:
            for key in mirror.keys:
                if self._holder.get(key) == endpoint:
                    del self._holder[key]

    def _drop(self, endpoint: str, key: int) -> None:
        mirror = self._mirrors.get(endpoint)
        if mirror is not None and key in mirror.keys:
            mirror.tokens -= mirror.keys.pop(key)
