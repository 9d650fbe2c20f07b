"""Local admission from a grant: a slice of a key's limits that Redis handed this instance in advance.

Why: one Redis round trip per request cost the gateway more CPU than the rest of the request (issue 13's
speed bar). A key far from its limits does not need it: the instance asks Redis — one atomic script — for
a *grant* (``want`` requests, tokens, micro-USD and concurrency slots, about 1/64 of each per-minute limit:
roughly one second of the key's full rate), which Redis charges to the key's shared state exactly as it
would charge that many admissions. The instance then admits from the grant in process, with no round trip,
and tops it up in the background before it runs out.

What it guarantees: every request is charged to the key's shared state before it is admitted — a grant
is charged when handed out, from the same atomic counters as direct admissions — so the sum of the grants
outstanding and the requests admitted directly never exceeds what the limits allow, across any number of
instances, and the overshoot bound is the one of direct admission (the one request whose usage ran past
its reservation). What changes is only *when* a granted unit is used: up to the grant's lifetime
(``GRANT_TTL``, renewed with each top-up) after it was charged. Unused parts go back to Redis when the
grant expires (so an idle instance holds nothing for long), when a fresh grant replaces one still in use
near its end (``RENEW_AHEAD``: a busy key's requests never wait for a grant), when the key's limits
change, and at shutdown;
an instance that crashes loses its grants' unused parts — the others then admit less, never more.

A key close to its limits gets no grant: Redis refuses one that would take more than ``1 / FACTOR`` of what
is left, and a limit too small to slice (a grant under ``MIN_REQUESTS`` requests or ``MIN_SLOTS`` slots)
never gets one. Such keys, and a request that does not fit what is left of the grant, are admitted by the
synchronous script, as before. So "three instances share 60 requests a minute" stays exact to the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from skyfabric.ops.ratelimit import OK, WINDOW, Ask, Verdict

#: Seconds a grant lives after its last top-up before its unused part is given back.
GRANT_TTL = 1.0
#: Seconds before its end that a grant still in use is replaced by a fresh one (``Limiter._renew``): time
#: for the round trip, so that a busy key never waits for a grant.
RENEW_AHEAD = GRANT_TTL / 4
#: A grant is 1/SLICE of each per-minute limit (about a second of the key's full rate).
SLICE = 64
#: Redis grants only while what is left of each limit is at least FACTOR times the grant.
FACTOR = 4
#: Limits too small to slice: such keys are always admitted by the synchronous script.
MIN_REQUESTS = 8
MIN_SLOTS = 4
#: Concurrency slots one grant holds at most (each is a member of the key's slot set in Redis).
MAX_SLOTS = 32
#: A top-up is asked for when what is left falls under 1/LOW of the grant's size (bursts eat a lot at once).
LOW = 2


Shape = tuple[int, int, int, int, str]

#: What :meth:`Grant.admit` says: not admitted; admitted; admitted, and the grant is running low.
REFUSED, ADMITTED, ADMITTED_LOW = 0, 1, 2


def shape(ask: Ask) -> Shape:
    """The limits a grant was cut from: a key whose limits (or budget period) change needs a new one."""
    return (ask.rpm, ask.tpm, ask.budget, ask.max_concurrent, ask.period)


@dataclass(slots=True)
class Want:
    """How much a grant asks for: zero for a limit the key does not have."""

    requests: int
    tokens: int
    budget: int
    slots: int


def want(ask: Ask) -> Want | None:
    """The grant's size for ``ask``'s key, or None when its limits are too small to be sliced."""
    requests = tokens = budget = slots = 0
    if ask.rpm > 0:
        requests = ask.rpm // SLICE
        if requests < MIN_REQUESTS:
            return None
    if ask.tpm > 0:
        tokens = ask.tpm // SLICE
        if tokens < ask.tokens:
            return None
    if ask.budget >= 0:
        budget = ask.budget // SLICE
        if budget < ask.cost:
            return None
    if ask.max_concurrent > 0:
        slots = min(MAX_SLOTS, ask.max_concurrent // SLICE)
        if slots < MIN_SLOTS:
            return None
    return Want(requests, tokens, budget, slots)


@dataclass(slots=True)
class Grant:
    """What is left of one key's grant on this instance (monotonic times)."""

    key: str
    shape: Shape
    size: Want
    requests: int = 0
    tokens: int = 0
    budget: int = 0
    #: Slot members held and free (a running request holds its own until it settles).
    slots: list[str] = field(default_factory=list)
    expires: float = 0.0
    #: Where the key's shared counters stood after the last top-up (for the rate-limit headers).
    requests_tat: float = 0.0
    tokens_tat: float = 0.0
    spent: int = 0
    #: False once given back: a request admitted from it then settles with Redis directly.
    live: bool = True
    #: A top-up is in flight.
    fetching: bool = False
    #: Redis refused a grant (the key is near a limit): direct admission until then.
    near_until: float = 0.0
    #: The rate-limit headers last built for an admission from it: (anthropic, until (wall), headers).
    headers_memo: tuple[bool, float, list[tuple[bytes, bytes]]] | None = None
    #: The key's record the grant's shape was last checked against (``Limiter.granted``'s fast path: the
    #: same object means the same limits) and the end of its budget period (wall clock).
    record: object = None
    period_end: float = 0.0

    def admit(self, ask: Ask, now: float) -> int:
        """Admit ``ask`` if what is left, now, covers it (its slot member becomes ``ask.lease``): then
        :data:`ADMITTED`, or :data:`ADMITTED_LOW` when a top-up should be asked for now (what is left fell
        under 1/:data:`LOW` of the grant's size: before it runs out); else :data:`REFUSED`, with nothing
        taken. One call for all three: it runs for nearly every request of a limited key."""
        if not (
            now < self.expires
            and (ask.rpm <= 0 or self.requests >= 1)
            and (ask.tpm <= 0 or self.tokens >= ask.tokens)
            and (ask.budget < 0 or self.budget >= ask.cost)
            and (ask.max_concurrent <= 0 or self.slots)
        ):
            return REFUSED
        if ask.rpm > 0:
            self.requests -= 1
        if ask.tpm > 0:
            self.tokens -= ask.tokens
        if ask.budget >= 0:
            self.budget -= ask.cost
        if ask.max_concurrent > 0:
            ask.lease = self.slots.pop()
        size = self.size
        if (
            self.requests * LOW < size.requests
            or self.tokens * LOW < size.tokens
            or self.budget * LOW < size.budget
            or len(self.slots) * LOW < size.slots
        ):
            return ADMITTED_LOW
        return ADMITTED

    def verdict(self, ask: Ask, now: float) -> Verdict:
        """What the rate-limit headers of an admission from the grant say: the shared state as of the last
        top-up, less what is still unused here."""
        requests_reset = tokens_reset = 0.0
        if ask.rpm > 0:
            requests_reset = max(0.0, self.requests_tat - now - self.requests * WINDOW / ask.rpm)
        if ask.tpm > 0:
            tokens_reset = max(0.0, self.tokens_tat - now - self.tokens * WINDOW / ask.tpm)
        return Verdict(OK, 0.0, requests_reset, tokens_reset, self.spent - self.budget)

    def settle(self, ask: Ask, tokens: int, cost: int) -> None:
        """A request admitted from this (live) grant ended: what it did not use comes back to the grant."""
        if ask.tpm > 0:
            self.tokens += ask.tokens - tokens
        if ask.budget >= 0:
            self.budget += ask.cost - cost
        if ask.lease:
            self.slots.append(ask.lease)

    def add(self, requests: int, tokens: int, budget: int, slots: list[str], expires: float) -> None:
        """A top-up arrived: it adds to what is left, and the grant lives on."""
        self.requests += requests
        self.tokens += tokens
        self.budget += budget
        self.slots += slots
        self.expires = expires

    def missing(self) -> Want:
        """What a top-up asks for: the grant's size (slots: only those it lacks)."""
        size = self.size
        return Want(size.requests, size.tokens, size.budget, max(0, size.slots - len(self.slots)))
