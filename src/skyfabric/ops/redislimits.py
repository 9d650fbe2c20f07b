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

    async def settle(self, batch: list[tuple[Ask, int, int]]) -> None:
        """Settle many requests in one round trip: (ask, tokens used, micro-USD spent) each."""
        await self.client.evalsha(self._settlements(batch))

    async def load(self) -> None:
        """Load the scripts (after a start or a restart of Redis): the first burst then finds them there."""
        await self.client.load_scripts()

    async def heartbeat(self, instance: str, alive: float, leases: list[Ask]) -> int:
        """Beat for ``instance`` and renew its requests' slots; the instances beating within ``alive``."""
        calls: list[tuple[bytes, list[Any], list[Any]]] = [(self._beat, [INSTANCES], [instance, alive])]
        for ask in leases:
            calls.append((self._renew, [_keys(ask)[3]], [ask.lease, int(ask.lease_ttl * 1000)]))
        results = await self.client.evalsha(calls)
        return int(results[0])

    async def leave(self, instance: str) -> None:
        await self.client.call("ZREM", INSTANCES, instance)

    async def close(self) -> None:
        await self.client.close()
