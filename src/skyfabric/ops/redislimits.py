"""The limits' state shared by every instance: the algorithm of ``ratelimit.py`` as atomic Lua in Redis.

One script call admits a request (all four limits checked and charged together, or none), one settles it;
settlements are batched into one pipelined round trip by the caller. Time inside the scripts is Redis'
own clock (``TIME``), so instances in different clouds with skewed clocks still share one timeline. A key's
keys share a hash tag (``{key id}``): one Redis Cluster slot, as a script needs.

Instances also heartbeat here (a sorted set of instance ids by last beat): while Redis is down, each
instance enforces ``limit / N`` with N the instances it last saw alive.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from skyfabric.ops.grants import FACTOR, Grant, Want
from skyfabric.ops.ratelimit import BUDGET, Ask, Verdict
from skyfabric.ops.resp import Resp

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local W = 60.0
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local budget, cost, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[7])
local rtat = tonumber(redis.call('GET', KEYS[1]) or '0')
local ttat = tonumber(redis.call('GET', KEYS[2]) or '0')
local rnew, tnew = now, now
local function left(x) if x > now then return x - now end return 0 end
local function wait(r) return {r, tostring(left(rtat)), tostring(left(ttat))} end
if rpm > 0 then
  rnew = math.max(rtat, now) + W / rpm
  if rnew - now > W + 1e-6 then local w = wait(rnew - W - now) return {1, tostring(w[1]), w[2], w[3], 0} end
end
if tpm > 0 then
  tnew = math.max(ttat, now) + tokens * W / tpm
  if tnew - now > W + 1e-6 then local w = wait(tnew - W - now) return {2, tostring(w[1]), w[2], w[3], 0} end
end
local spent = 0
if budget >= 0 then
  spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if spent + cost > budget then return {3, ARGV[6], '0', '0', spent} end
end
if cap > 0 then
  local ms = now * 1000
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ms)
  if redis.call('ZCARD', KEYS[4]) >= cap then local w = wait(1) return {4, '1', w[2], w[3], 0} end
  redis.call('ZADD', KEYS[4], ms + tonumber(ARGV[9]), ARGV[8])
  redis.call('PEXPIRE', KEYS[4], 2 * tonumber(ARGV[9]))
end
if rpm > 0 then redis.call('SET', KEYS[1], tostring(rnew), 'PX', math.ceil((rnew - now) * 1000) + 1000) end
if tpm > 0 then redis.call('SET', KEYS[2], tostring(tnew), 'PX', math.ceil((tnew - now) * 1000) + 1000) end
if budget >= 0 then
  redis.call('INCRBY', KEYS[3], cost)
  redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[6])) + 86400)
end
return {0, '0', tostring(rnew - now), tostring(tnew - now), spent + cost}
"""

_SETTLE = """
local tpm, delta, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 and delta ~= 0 then
  local tat = redis.call('GET', KEYS[1])
  if tat then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    local new = math.max(now, tonumber(tat) + delta * 60.0 / tpm)
    redis.call('SET', KEYS[1], tostring(new), 'PX', math.ceil((new - now) * 1000) + 1000)
  end
end
if cost ~= 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  local v = redis.call('INCRBY', KEYS[2], cost)
  if v < 0 then redis.call('SET', KEYS[2], 0, 'KEEPTTL') end
end
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[3], ARGV[4]) end
return 1
"""

_RENEW = """
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZADD', KEYS[1], 'XX', ms + tonumber(ARGV[2]), ARGV[1])
return 1
"""

_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 60)
return redis.call('ZCARD', KEYS[1])
"""

#: A grant (``grants.py``): ``want`` of each limit charged at once, all or none, and only while what is
#: left of each is at least ``factor`` times that. Returns {0} (refused: the key is near a limit) or
#: {1, requests reset, tokens reset, spent}.
_GRANT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local W = 60.0
local rpm, tpm, wr, wt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local budget, wb, cap, wk = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[8]), tonumber(ARGV[9])
local f, ttl = tonumber(ARGV[12]), tonumber(ARGV[11])
local rbase = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local tbase = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), now)
if rpm > 0 and rbase - now + f * wr * W / rpm > W + 1e-6 then return {0} end
if tpm > 0 and tbase - now + f * wt * W / tpm > W + 1e-6 then return {0} end
local spent = 0
if budget >= 0 then
  spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if spent + f * wb > budget then return {0} end
end
local ms = now * 1000
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ms)
  if redis.call('ZCARD', KEYS[4]) + f * wk > cap then return {0} end
end
local rnew, tnew = rbase + wr * W / math.max(rpm, 1), tbase + wt * W / math.max(tpm, 1)
if rpm > 0 then redis.call('SET', KEYS[1], tostring(rnew), 'PX', math.ceil((rnew - now) * 1000) + 1000) end
if tpm > 0 then redis.call('SET', KEYS[2], tostring(tnew), 'PX', math.ceil((tnew - now) * 1000) + 1000) end
if budget >= 0 then
  redis.call('INCRBY', KEYS[3], wb)
  redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[7])) + 86400)
end
if wk > 0 then
  for i = 1, wk do redis.call('ZADD', KEYS[4], ms + ttl, ARGV[10] .. i) end
  redis.call('PEXPIRE', KEYS[4], 2 * ttl)
end
return {1, tostring(rnew - now), tostring(tnew - now), spent + wb}
"""

#: A grant's unused part given back: the counters move back (never before now, never below zero), the
#: free slots are removed. Negative amounts (a grant's requests used more tokens than reserved) move on.
_RETURN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm, r, tk = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = tonumber(ARGV[5])
local function back(name, units, limit)
  if limit <= 0 or units == 0 then return end
  local tat = redis.call('GET', name)
  if not tat then return end
  local new = math.max(now, tonumber(tat) - units * 60.0 / limit)
  redis.call('SET', name, tostring(new), 'PX', math.ceil((new - now) * 1000) + 1000)
end
back(KEYS[1], r, rpm)
back(KEYS[2], tk, tpm)
if b ~= 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  local v = redis.call('DECRBY', KEYS[3], b)
  if v < 0 then redis.call('SET', KEYS[3], 0, 'KEEPTTL') end
end
if #ARGV > 5 then redis.call('ZREM', KEYS[4], unpack(ARGV, 6)) end
return 1
"""

INSTANCES = "skyfabric:instances"


@functools.lru_cache(maxsize=4096)
def _names(key: str, period: str) -> tuple[str, str, str, str]:
    tag = "skyfabric:{" + key + "}"
    return tag + ":rpm", tag + ":tpm", tag + ":spent:" + period, tag + ":leases"


def _keys(ask: Ask) -> list[str]:
    return list(_names(ask.key, ask.period))


class RedisLimits:
    """Admission and settlement against Redis; raises :class:`RedisUnavailable` when it cannot be reached."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self.client = Resp(url, timeout=timeout)
        self._admit = self.client.script(_ADMIT)
        self._settle = self.client.script(_SETTLE)
        self._renew = self.client.script(_RENEW)
        self._beat = self.client.script(_BEAT)
        self._grant = self.client.script(_GRANT)
        self._return = self.client.script(_RETURN)

    def _settlements(self, batch: list[tuple[Ask, int, int]]) -> list[tuple[bytes, list[Any], list[Any]]]:
        calls: list[tuple[bytes, list[Any], list[Any]]] = []
        for done, tokens, cost in batch:
            keys = _keys(done)
            args = [done.tpm, tokens - done.tokens, cost - done.cost, done.lease]
            calls.append((self._settle, [keys[1], keys[2], keys[3]], args))
        return calls

    async def admit(self, ask: Ask, settle: list[tuple[Ask, int, int]] | None = None) -> Verdict:
        """Admit ``ask``; settlements still pending go first in the same round trip (and count for it)."""
        args = [
            ask.rpm,
            ask.tpm,
            ask.tokens,
            ask.budget,
            ask.cost,
            repr(ask.period_end),
            ask.max_concurrent,
            ask.lease,
            int(ask.lease_ttl * 1000),
        ]
        calls = self._settlements(settle) if settle else []
        calls.append((self._admit, _keys(ask), args))
        reason, retry, rreset, treset, spent = (await self.client.evalsha(calls))[-1]
        retry_after = float(retry)
        if reason == BUDGET:  # the budget's wait is until the period's end, in wall time
            retry_after = max(1.0, retry_after - time.time())
        return Verdict(int(reason), retry_after, float(rreset), float(treset), int(spent))

    async def grant(self, ask: Ask, want: Want, prefix: str) -> tuple[float, float, int] | None:
        """Charge a grant of ``want`` for ``ask``'s key (slot members ``prefix1``, ``prefix2``…): the
        seconds until the request and token allowances are whole again, and the spend; None: refused."""
        args = [
            ask.rpm,
            ask.tpm,
            want.requests,
            want.tokens,
            ask.budget,
            want.budget,
            repr(ask.period_end),
            ask.max_concurrent,
            want.slots,
            prefix,
            int(ask.lease_ttl * 1000),
            FACTOR,
        ]
        reply = (await self.client.evalsha([(self._grant, _keys(ask), args)]))[0]
        if int(reply[0]) != 1:
            return None
        return float(reply[1]), float(reply[2]), int(reply[3])

    async def give_back(self, grants: list[Grant]) -> None:
        """Give the unused part of ``grants`` back, in one round trip."""
        calls: list[tuple[bytes, list[Any], list[Any]]] = []
        for g in grants:
            rpm, tpm, _, _, period = g.shape
            keys = list(_names(g.key, period))
            calls.append((self._return, keys, [rpm, tpm, g.requests, g.tokens, g.budget, *g.slots]))
        if calls:
            await self.client.evalsha(calls)

    async def settle(self, batch: list[tuple[Ask, int, int]]) -> None:
        """Settle many requests in one round trip: (ask, tokens used, micro-USD spent) each."""
        await self.client.evalsha(self._settlements(batch))

    async def load(self) -> None:
        """Load the scripts (after a start or a restart of Redis): the first burst then finds them there."""
        await self.client.load_scripts()

    async def heartbeat(
        self, instance: str, alive: float, leases: list[Ask], held: list[tuple[Grant, float]] | None = None
    ) -> int:
        """Beat for ``instance`` and renew its requests' slots and its grants' free slots (grant and
        lease ttl); the instances beating within ``alive``."""
        calls: list[tuple[bytes, list[Any], list[Any]]] = [(self._beat, [INSTANCES], [instance, alive])]
        for ask in leases:
            calls.append((self._renew, [_keys(ask)[3]], [ask.lease, int(ask.lease_ttl * 1000)]))
        for g, ttl in held or ():
            slots = _names(g.key, g.shape[4])[3]
            for member in g.slots:
                calls.append((self._renew, [slots], [member, int(ttl * 1000)]))
        results = await self.client.evalsha(calls)
        return int(results[0])

    async def leave(self, instance: str) -> None:
        await self.client.call("ZREM", INSTANCES, instance)

    async def close(self) -> None:
        await self.client.close()
