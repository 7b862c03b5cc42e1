"""Where entries live: a bounded LRU in memory, or Redis shared by every sidecar.

Both stores hold two kinds of item under a key: an ``Entry`` (a stored
response) or a ``VaryMarker`` (the request headers that pick a variant, kept
at the URL's primary key). Redis values are a compact binary form (orjson
metadata + raw body), never pickle: another process, or an attacker who can
write to Redis, must not be able to run code through a cache entry.

Why our own LRU rather than aiocache's SimpleMemoryCache: that backend has no
size bound (no LRU, no byte budget), its per-call ``asyncio.wait_for`` costs
~12 us unless timeout=None, and its 1.0 line drops the Redis backend
(ARCHITECTURE.md). An OrderedDict gives O(1) LRU with a byte budget in ~60 lines.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.state import StateBackend

log = logging.getLogger("sidecar.cache")


@dataclass
class Entry:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stored_at: float          # wall-clock time the response arrived (shared across processes)
    initial_age: float        # RFC 9111 4.2.3 corrected_initial_age
    lifetime: float           # freshness lifetime, seconds
    swr: float = 0.0          # stale-while-revalidate window, seconds
    sie: float = 0.0          # stale-if-error window, seconds
    keep: float = 0.0         # extra retention for conditional revalidation
    etag: str | None = None
    last_modified: str | None = None
    path: str = ""

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.stored_at)

    def expires_at(self) -> float:
        """When the entry is useless even stale: freshness plus the longest stale window."""
        validators = self.etag is not None or self.last_modified is not None
        extra = max(self.swr, self.sie, self.keep if validators else 0.0)
        return self.stored_at - self.initial_age + self.lifetime + extra

    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 200

    def encode(self) -> bytes:
        meta = orjson.dumps({"s": self.status, "h": self.headers, "t": self.stored_at,
                             "a": self.initial_age, "l": self.lifetime, "w": self.swr,
                             "e": self.sie, "k": self.keep, "et": self.etag,
                             "lm": self.last_modified, "p": self.path})
        return b"E" + struct.pack(">I", len(meta)) + meta + self.body


@dataclass
class VaryMarker:
    names: list[str]
    expires: float = field(default=0.0)

    def size(self) -> int:
        return 100 + sum(len(n) for n in self.names)

    def expires_at(self) -> float:
        return self.expires

    def encode(self) -> bytes:
        return b"V" + orjson.dumps(self.names)


Item = Entry | VaryMarker


def decode(data: bytes) -> Item | None:
    """An item from its Redis form; None for anything unreadable (treated as a miss)."""
    try:
        if data[:1] == b"E":
            (n,) = struct.unpack(">I", data[1:5])
            m = orjson.loads(data[5:5 + n])
            return Entry(m["s"], [(k, v) for k, v in m["h"]], bytes(data[5 + n:]), m["t"], m["a"],
                         m["l"], m["w"], m["e"], m["k"], m["et"], m["lm"], m["p"])
        if data[:1] == b"V":
            return VaryMarker(list(orjson.loads(data[1:])))
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        pass
    return None


class MemoryStore:
    """Per-route LRU bounded by entry count and bytes."""

    kind = "memory"
    shared = False

    def __init__(self, max_entries: int, max_memory: int) -> None:
        self.max_entries = max_entries
        self.max_memory = max_memory
        self._items: OrderedDict[str, tuple[Item, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    async def get(self, key: str) -> Item | None:
        got = self._items.get(key)
        if got is None:
            return None
        item = got[0]
        if item.expires_at() <= time.time():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item

    async def put(self, key: str, item: Item) -> None:
        if key in self._items:
            self._drop(key)
        size = item.size()
        if size > self.max_memory:
            return
        self._items[key] = (item, size)
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_memory:
            oldest = next(iter(self._items))
            self._drop(oldest)
            self.evictions += 1

    async def put_many(self, items: list[tuple[str, Item]]) -> None:
        for key, item in items:
            await self.put(key, item)

    async def delete(self, key: str) -> None:
        if key in self._items:
            self._drop(key)

    def _drop(self, key: str) -> None:
        _, size = self._items.pop(key)
        self.bytes -= size

    async def purge(self) -> int:
        n = len(self._items)
        self._items.clear()
        self.bytes = 0
        return n

    async def stats(self) -> dict[str, Any]:
        return {"store": "memory", "entries": len(self._items), "bytes": self.bytes,
                "max_entries": self.max_entries, "max_memory": self.max_memory,
                "evictions": self.evictions}

    async def close(self) -> None:
        self._items.clear()
        self.bytes = 0


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


# The admin count of a route's keys without walking the keyspace (which a
# shared Redis fills with millions of other keys, and the dashboard asks every
# 2 s): a per-route index, a sorted set of store key -> expiry in ms on the
# Redis clock (TIME, so skewed sidecars agree). It is its own key in its own
# slot (Redis Cluster), so it is written after the entry's SET/MULTI, never
# inside it. Every write drops the members already expired and keeps the index
# alive as long as its longest entry.
# KEYS[1]: the index; ARGV: store key, TTL ms, store key, TTL ms, ...
_INDEX_ADD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local longest = 0
for i = 1, #ARGV, 2 do
  local ttl = tonumber(ARGV[i + 1])
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  if ttl > longest then longest = ttl end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('PTTL', KEYS[1]) < longest then
  redis.call('PEXPIRE', KEYS[1], longest)
end
return 1
"""

# KEYS[1]: the index. Members not yet expired: O(log n).
_INDEX_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%d', now), '+inf')
"""


class RedisStore:
    """Entries in Redis (one or a cluster) with a TTL per key.

    A URL's entry or Vary marker and all its variants share the hash tag of
    the URL's primary key, ``sidecar:<service>:{<service>/<primary>}:cache:<route>:<variant or ->``:
    one slot, so the marker and a variant are written in one MULTI, while
    different URLs spread over a cluster's masters.

    A Redis failure never fails a request: a read error is a miss, a write
    error leaves the response unstored (both logged).
    """

    kind = "redis"
    shared = True

    def __init__(self, state: StateBackend, route: str) -> None:
        assert state.redis is not None
        self.redis = state.redis
        self.route = route
        self._tagged = state.tagged
        self._match = _glob_escape(state.namespace) + "{*}:cache:" + _glob_escape(route) + ":*"
        # Not matched by _match (":cache-index:"), so purge's SCAN leaves it to purge itself.
        self._index = state.tagged("cache-index/" + route, "cache-index", route)
        self._index_add = self.redis.register_script(_INDEX_ADD)
        self._index_count = self.redis.register_script(_INDEX_COUNT)
        self.errors = 0

    def _key(self, key: str) -> str:
        primary, _, variant = key.partition(".")
        return self._tagged(primary, "cache", self.route, variant or "-")

    async def get(self, key: str) -> Item | None:
        try:
            data = await self.redis.get(self._key(key))
        except Exception as e:  # redis.exceptions.RedisError, OSError, timeouts
            self._failed("read", e)
            return None
        # bytes: the client does not decode (decode_responses=False)
        return decode(data) if isinstance(data, bytes) and data else None

    async def put(self, key: str, item: Item) -> None:
        await self.put_many([(key, item)])

    async def put_many(self, items: list[tuple[str, Item]]) -> None:
        now = time.time()
        sets = [(k, self._key(k), item.encode(), int((item.expires_at() - now) * 1000)) for k, item in items]
        sets = [s for s in sets if s[3] > 0]
        if not sets:
            return
        try:
            if len(sets) == 1:
                await self.redis.set(sets[0][1], sets[0][2], px=sets[0][3])
            else:
                async with self.redis.pipeline(transaction=True) as p:
                    for _, k, v, ttl_ms in sets:
                        p.set(k, v, px=ttl_ms)
                    await p.execute()
        except Exception as e:
            self._failed("write", e)
            return
        try:
            await self._index_add(keys=[self._index], args=[a for k, _, _, ttl_ms in sets for a in (k, ttl_ms)])
        except Exception as e:
            self._failed("index", e)

    async def delete(self, key: str) -> None:
        try:
            await self.redis.delete(self._key(key))
            await self.redis.zrem(self._index, key)
        except Exception as e:
            self._failed("delete", e)

    def _failed(self, what: str, e: Exception) -> None:
        self.errors += 1
        log.warning("cache: Redis %s failed (%s); serving without the cache", what, type(e).__name__)

    async def purge(self) -> int:
        n = 0
        batch: list[bytes] = []
        async for k in self.redis.scan_iter(match=self._match, count=500):
            batch.append(k)
            if len(batch) >= 500:
                n += await self.redis.unlink(*batch)
                batch.clear()
        if batch:
            n += await self.redis.unlink(*batch)
        await self.redis.unlink(self._index)
        return n

    async def stats(self) -> dict[str, Any]:
        entries: int | None
        try:
            entries = int(await self._index_count(keys=[self._index]))
        except Exception as e:
            self._failed("count", e)
            entries = None
        # Counts keys (entries and Vary markers) from the index; bytes are Redis's to report.
        return {"store": "redis", "entries": entries, "bytes": None, "errors": self.errors}

    async def close(self) -> None:
        """The connection belongs to runtime.state."""
