"""State backends: in-process memory (the embedded default) or a shared Redis.

Plugins keep their own algorithms (a GCRA in Python for memory, a Lua script
for Redis); this module gives them the connection, key namespacing and the
few primitives several plugins share (get/set with TTL, set-if-absent).
"""

from __future__ import annotations

import time
from typing import Any


class MemoryState:
    """Per-process state with TTLs; needs nothing else."""

    kind = "memory"

    def __init__(self, service: str) -> None:
        self.namespace = f"sidecar:{service}:"
        self._data: dict[str, tuple[Any, float | None]] = {}

    def key(self, *parts: str) -> str:
        return self.namespace + ":".join(parts)

    async def ping(self) -> bool:
        return True

    def _live(self, key: str) -> tuple[Any, float | None] | None:
        item = self._data.get(key)
        if item is not None and item[1] is not None and item[1] <= time.monotonic():
            del self._data[key]
            return None
        return item

    async def get(self, key: str) -> Any:
        item = self._live(key)
        return None if item is None else item[0]

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        self._data[key] = (value, time.monotonic() + ttl if ttl else None)
        if len(self._data) % 1024 == 0:
            self._sweep()

    async def set_nx(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store only if absent; True when this call stored it."""
        if self._live(key) is not None:
            return False
        await self.set(key, value, ttl)
        return True

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def _sweep(self) -> None:
        now = time.monotonic()
        for k in [k for k, (_, exp) in self._data.items() if exp is not None and exp <= now]:
            del self._data[k]

    async def close(self) -> None:
        self._data.clear()


class RedisState:
    """Shared state in Redis (redis.asyncio); keys are namespaced by service."""

    kind = "redis"

    def __init__(self, service: str, url: str, max_connections: int = 64) -> None:
        import redis.asyncio as aioredis

        self.namespace = f"sidecar:{service}:"
        self.url = url
        # A blocking pool: past max_connections a caller waits (up to the
        # timeout) for a free connection instead of failing at once, which
        # redis-py's default pool does at 100 concurrent commands.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=2.0, socket_connect_timeout=1.0,
            socket_timeout=2.0, health_check_interval=10, decode_responses=False,
            # Keys carry client header values, which aiohttp decodes with
            # surrogateescape: send them back as their original bytes rather
            # than fail the command on a non-UTF-8 byte (a 500).
            encoding_errors="surrogateescape")
        self.redis = aioredis.Redis(connection_pool=pool)

    def key(self, *parts: str) -> str:
        return self.namespace + ":".join(parts)

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except Exception:
            return False

    async def get(self, key: str) -> Any:
        return await self.redis.get(key)

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        await self.redis.set(key, value, px=int(ttl * 1000) if ttl else None)

    async def set_nx(self, key: str, value: Any, ttl: float | None = None) -> bool:
        return bool(await self.redis.set(key, value, nx=True, px=int(ttl * 1000) if ttl else None))

    async def delete(self, key: str) -> None:
        await self.redis.delete(key)

    async def close(self) -> None:
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()


State = MemoryState | RedisState


def make_state(backend: str, service: str, url: str, max_connections: int = 64) -> State:
    if backend == "redis":
        return RedisState(service, url, max_connections)
    return MemoryState(service)
