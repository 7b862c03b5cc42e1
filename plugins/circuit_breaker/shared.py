"""The breakers of one runtime, their metric, and their sharing through Redis.

Transitions to open and closed are published on a Redis pub/sub channel and
stored under one key per breaker (for sidecars that start or reconnect later);
every call is redis.asyncio, never a blocking client on the loop (pybreaker's
CircuitRedisStorage blocks, so it is not used).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

import orjson
from pybreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN

from .breaker import STATE_VALUES, Breaker

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("sidecar.circuit_breaker")

# Store the transition for late joiners and publish it, in one round trip
# (a cluster pipeline refuses PUBLISH; a script may publish). KEYS[1]: the
# breaker's key; ARGV: message, channel.
_SHARE = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', 86400)
return redis.call('PUBLISH', ARGV[2], ARGV[1])
"""


class Registry:
    """The breakers of one runtime, their metric, and the Redis sync (one per runtime)."""

    def __init__(self, runtime: "Runtime") -> None:
        # No reference back to the runtime: it is this registry's weak key.
        self.state_backend = runtime.state
        self.breakers: dict[str, Breaker] = {}
        self.instance = os.urandom(8).hex()
        self.gauge = runtime.metrics.gauge(
            "sidecar_circuit_state", "Circuit breaker state by route: 0 closed, 1 open, 2 half-open.",
            ["route"], multiprocess_mode="liveall")  # a state per worker, not a sum of states
        # One hash tag for every breaker key and the channel: the resync
        # MGET reads them all at once (one slot in a cluster).
        self.channel = runtime.state.tagged("breakers", "events")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._follower: asyncio.Task[None] | None = None
        self._share: Any = None
        self.synced = asyncio.Event()

    @property
    def shared(self) -> bool:
        return self.state_backend.redis is not None

    def _key(self, route: str) -> str:
        return self.state_backend.tagged("breakers", "breaker", route)

    def add(self, breaker: Breaker) -> None:
        self.breakers[breaker.route] = breaker
        self.gauge.labels(breaker.route).set(STATE_VALUES[breaker.state])
        if self.shared and self._follower is not None:
            # A breaker built by a reload catches up with its peers.
            self._spawn(self._resync([breaker]))

    def drop(self, breaker: Breaker) -> None:
        if self.breakers.get(breaker.route) is breaker:
            del self.breakers[breaker.route]

    def transitioned(self, b: Breaker, state: str) -> None:
        self.gauge.labels(b.route).set(STATE_VALUES[state])
        # Half-open is a local decision (each sidecar sends its own trials);
        # open and closed are shared.
        if self.shared and not b.remote and state != STATE_HALF_OPEN:
            opened = b.storage.opened_at
            msg = orjson.dumps({"from": self.instance, "route": b.route, "state": state,
                                "opened_at": opened.timestamp() if opened else None, "at": b.changed_at})
            self._spawn(self._publish(b.route, msg))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, route: str, msg: bytes) -> None:
        redis = self.state_backend.redis
        assert redis is not None
        try:
            if self._share is None:
                self._share = redis.register_script(_SHARE)
            await self._share(keys=[self._key(route)], args=[msg, self.channel])
        except Exception as e:
            log.warning("circuit breaker %s: could not share the transition through Redis: %s",
                        route, type(e).__name__)

    def _apply(self, data: bytes | str) -> None:
        try:
            m = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if m.get("from") == self.instance:
            return
        b = self.breakers.get(m.get("route"))
        if b is not None and m.get("state") in (STATE_OPEN, STATE_CLOSED):
            b.apply_remote(m["state"], m.get("opened_at"), float(m.get("at") or 0))

    async def _resync(self, breakers: list[Breaker]) -> None:
        """Catch up with transitions published while we were not listening."""
        if not breakers:
            return
        redis = self.state_backend.redis
        assert redis is not None
        try:
            values = await redis.mget([self._key(b.route) for b in breakers])
        except Exception as e:
            log.warning("circuit breakers: could not read shared state from Redis: %s", type(e).__name__)
            return
        for v in values:
            if v:
                self._apply(v)

    async def follow(self) -> None:
        """Apply peers' transitions as they are published (reconnects with backoff)."""
        redis = self.state_backend.redis
        assert redis is not None
        delay = 0.1
        while True:
            pubsub = None
            try:
                # A cluster client's pub/sub needs the slot map its first command loads.
                await self.state_backend.connect()
                pubsub = redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.channel)
                await self._resync(list(self.breakers.values()))
                self.synced.set()
                delay = 0.1
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._apply(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.synced.clear()
                log.warning("circuit breakers: Redis subscription lost (%s); retrying in %.1fs",
                            type(e).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                try:
                    if pubsub is not None:
                        await asyncio.shield(pubsub.aclose())
                except Exception:
                    pass

    def start(self) -> None:
        if self.shared and self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self.follow())

    async def stop(self) -> None:
        tasks = list(self._tasks)
        if self._follower is not None:
            tasks.append(self._follower)
            self._follower.cancel()
            self._follower = None
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass


def registry_of(runtime: "Runtime") -> Registry:
    """The runtime's breaker registry (one per runtime, created on first use)."""
    return runtime.service("circuit_breaker", lambda: Registry(runtime))
