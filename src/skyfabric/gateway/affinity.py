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
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
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


def prefer(key: int, states: Sequence[C], loads: Sequence[float]) -> C | None:
    """The first endpoint in the key's rendezvous order whose load is within the bound, else None.

    ``loads`` are the balancer's (requests per unit of capacity), in the order of ``states``.
    """
    if not states:
        return None
    mean = sum(loads) / len(loads)
    load_of = {id(s): load for s, load in zip(states, loads, strict=True)}
    for state in rendezvous(key, states):
        if load_of[id(state)] <= BOUND * mean + 1.0 / state.endpoint.concurrency:
            return state
    return None
