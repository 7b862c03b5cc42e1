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
        sets = [(self._key(k), item.encode(), int((item.expires_at() - now) * 1000)) for k, item in items]
        sets = [s for s in sets if s[2] > 0]
        if not sets:
            return
        try:
            if len(sets) == 1:
                await self.redis.set(sets[0][0], sets[0][1], px=sets[0][2])
                return
            async with self.redis.pipeline(transaction=True) as p:
                for k, v, ttl_ms in sets:
                    p.set(k, v, px=ttl_ms)
                await p.execute()
        except Exception as e:
            self._failed("write", e)

    async def delete(self, key: str) -> None:
        try:
            await self.redis.delete(self._key(key))
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
        return n

    async def stats(self) -> dict[str, Any]:
        entries = 0
        try:
            async for _ in self.redis.scan_iter(match=self._match, count=500):
                entries += 1
        except Exception as e:
            self._failed("scan", e)
            entries = None  # type: ignore[assignment]
        # Counts keys (entries and Vary markers); bytes are Redis's to report.
        return {"store": "redis", "entries": entries, "bytes": None, "errors": self.errors}

    async def close(self) -> None:
        """The connection belongs to runtime.state."""
