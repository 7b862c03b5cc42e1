"""The Redis store: one atomic Lua script per decision, on the server's clock.

The script is the same GCRA as gcra.decide, in integer microseconds (Lua's
numbers are doubles; microsecond timestamps stay exact below 2**53). It reads
every limit's TAT, decides, and writes all of them or none, so concurrent
sidecars sharing the Redis cannot both take the last slot. ``TIME`` is the
Redis server's clock, so sidecars on hosts with skewed clocks still agree.
Each key expires when its TAT passes, when it is the same as absent anyway.
redis-py's Script runs EVALSHA and loads the script again after NOSCRIPT (a
restarted or flushed Redis).
"""

from __future__ import annotations

import hashlib
from typing import Literal

from proxy.state import StateBackend

from .gcra import Decision, LimitSpec

# KEYS: one per limit. ARGV[1]: max wait (us); ARGV[2]: "1" decide, "0" peek;
# then per limit i: ARGV[1+2i] interval (us), ARGV[2+2i] tolerance (us).
# Returns {admitted, wait_us, worst (1-based, 0 none), then per limit: remaining, reset_us}.
LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait = tonumber(ARGV[1])
local n = #KEYS
local tats = {}
for i = 1, n do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tats[i] = tat
end
if ARGV[2] == '0' then
  local out = {1, 0, 0}
  for i = 1, n do
    local T = tonumber(ARGV[1 + 2 * i])
    local tol = tonumber(ARGV[2 + 2 * i])
    out[#out + 1] = math.floor((now + tol - tats[i]) / T)
    out[#out + 1] = tats[i] - now
  end
  return out
end
local wait = 0
local worst = 0
for i = 1, n do
  local w = tats[i] + tonumber(ARGV[1 + 2 * i]) - tonumber(ARGV[2 + 2 * i]) - now
  if w > wait then wait = w; worst = i end
end
local admitted = wait <= max_wait
local at = now
if admitted then at = now + wait end
local out = {admitted and 1 or 0, wait, worst}
for i = 1, n do
  local T = tonumber(ARGV[1 + 2 * i])
  local tol = tonumber(ARGV[2 + 2 * i])
  local nt = tats[i]
  if nt < at then nt = at end
  if admitted then
    nt = nt + T
    redis.call('SET', KEYS[i], string.format('%.0f', nt), 'PX', math.ceil((nt - now) / 1000) + 1)
  end
  out[#out + 1] = math.floor((at + tol - nt) / T)
  out[#out + 1] = nt - at
end
return out
"""


class RedisStore:
    """Decisions in a shared Redis or Redis Cluster (``runtime.state.redis``).

    The filter names buckets (``sidecar:<service>:rl:<route>:<scope>:<shape>:<key>``);
    this store maps them to Redis keys. The keys of one decision (one per
    limit of the group, same client key) go to the script together, so in a
    cluster they must share a slot: each gets the hash tag of its group's
    first bucket, ``sidecar:<service>:{<service>/<digest>}:rl:...``. Different
    clients' buckets hash apart, spreading them over the masters.
    """

    shared = True
    sync: Literal[False] = False

    def __init__(self, state: StateBackend) -> None:
        client = state.redis
        assert client is not None
        self.kind = state.kind
        self.client = client
        self.script = client.register_script(LUA)
        self._tagged = state.tagged
        self._cut = len(state.namespace)

    def redis_keys(self, keys: list[str]) -> list[str]:
        """The Redis keys of one decision's buckets (same hash tag, so one slot)."""
        cut = self._cut
        tag = hashlib.blake2b(keys[0].encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
        return [self._tagged(tag, k[cut:]) for k in keys]

    @staticmethod
    def _args(limits: tuple[LimitSpec, ...], max_wait: float, mode: str) -> list[int | str]:
        args: list[int | str] = [int(max_wait * 1_000_000), mode]
        for lim in limits:
            us = lim.interval_us
            args += [us, us * lim.burst]
        return args

    @staticmethod
    def _parse(raw: list[int], n: int) -> Decision:
        admitted, wait, worst = int(raw[0]), int(raw[1]), int(raw[2])
        remaining = [max(int(raw[3 + 2 * i]), 0) for i in range(n)]
        reset = [max(int(raw[4 + 2 * i]), 0) / 1_000_000 for i in range(n)]
        return Decision(bool(admitted), wait / 1_000_000, worst - 1, remaining, reset)

    async def decide(self, keys: list[str], limits: tuple[LimitSpec, ...], max_wait: float) -> Decision:
        raw = await self.script(keys=self.redis_keys(keys), args=self._args(limits, max_wait, "1"))
        return self._parse(raw, len(limits))

    async def peek(self, keys: list[str], limits: tuple[LimitSpec, ...]) -> list[tuple[int, float]]:
        raw = await self.script(keys=self.redis_keys(keys), args=self._args(limits, 0, "0"))
        d = self._parse(raw, len(limits))
        return list(zip(d.remaining, d.reset))

    def close(self) -> None:
        """The client belongs to the runtime's state; nothing to release."""
