"""State backends: in-process memory (the embedded default), one Redis, or a Redis Cluster.

Every plugin's store is written against ``StateBackend``: namespaced keys,
the few primitives several plugins share (get/set with TTL, set-if-absent,
delete), and ``redis`` -- the redis.asyncio client itself (``Redis`` or
``RedisCluster``), or None for memory -- for a plugin that needs scripts,
streams or pub/sub. A plugin asks ``state.redis is not None``, never a kind
string.

Keys: ``key(*parts)`` is ``sidecar:<service>:<parts>``. ``tagged(tag, *parts)``
puts a Redis Cluster hash tag right after the namespace,
``sidecar:<service>:{<service>/<tag>}:<parts>``, so every key made with the
same tag hashes to one slot: keys a Lua script or a MULTI touches together
must share a tag (a cluster refuses a cross-slot script or transaction). The
layout is the same on one Redis, so moving to a cluster changes no key.

Failures (issue 11 item 5): a pooled connection found dead (Redis restarted
while the sidecar was idle) is retried once on a fresh connection, so a
restart costs no request. Connecting and reading a reply are each bounded
by ``[state] timeout`` (waiting for a free pooled connection by 4 times it);
after ``BACKOFF_AFTER`` consecutive failures to reach a node, commands to it
fail at once with ``StateBackingOff`` for ``[state] backoff`` instead of each
paying the timeout; then one command probes the node. Plugins answer those
errors with their own fail-open/closed setting.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from .config import StateSettings

log = logging.getLogger("sidecar.state")

#: Consecutive failures to reach a Redis node (timeouts, refused or broken
#: connections) after which commands to it stop for ``[state] backoff``.
BACKOFF_AFTER = 3
#: The URL scheme that selects the cluster client (``rediss+cluster`` for TLS).
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


class StateBackingOff(RedisError):
    """A Redis node failed repeatedly; commands to it are refused for a short back-off.

    A ``RedisError`` (not a ``ConnectionError``): plugins treat it as "backend
    down" like any Redis error, while redis-py neither retries it nor drops
    the pooled connection it was refused on.
    """


@runtime_checkable
class StateBackend(Protocol):
    """What every plugin store is written against (memory, Redis, Redis Cluster)."""

    #: "memory", "redis" or "redis-cluster": for logs and /admin output only.
    kind: str
    #: Seen by every sidecar sharing the backend (not only this process).
    shared: bool
    #: ``sidecar:<service>:`` -- every key starts with it.
    namespace: str

    @property
    def redis(self) -> "Redis | RedisCluster | None":
        """The redis.asyncio client for scripts, streams and pub/sub; None for memory."""
        ...

    def key(self, *parts: str) -> str: ...

    def tagged(self, tag: str, *parts: str) -> str: ...

    async def connect(self) -> None:
        """Reach the backend now (a cluster client learns its slot map); raises when it cannot."""
        ...

    async def ping(self) -> bool: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes | str, ttl: float | None = None) -> None: ...

    async def set_nx(self, key: str, value: bytes | str, ttl: float | None = None) -> bool: ...

    async def delete(self, key: str) -> None: ...

    async def close(self) -> None: ...


def _escape(s: str) -> str:
    # A brace in the namespace would become the hash tag of every key.
    return s.replace("%", "%25").replace("{", "%7B").replace("}", "%7D") if ("{" in s or "}" in s) else s


def _tag(tag: str) -> str:
    # Redis hashes what lies between the first "{" and the next "}": a tag
    # must not contain "}", and a long one is as good as its digest.
    if "}" in tag or len(tag) > 64:
        return hashlib.blake2b(tag.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()
    return tag


class _Keys:
    """Key layout shared by every backend (see the module docstring)."""

    def __init__(self, service: str) -> None:
        self.service = _escape(service)
        self.namespace = f"sidecar:{self.service}:"

    def key(self, *parts: str) -> str:
        return self.namespace + ":".join(parts)

    def tagged(self, tag: str, *parts: str) -> str:
        return f"{self.namespace}{{{self.service}/{_tag(tag)}}}:" + ":".join(parts)


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value


class MemoryState(_Keys):
    """Per-process state with TTLs; needs nothing else. Values come back as bytes, as from Redis."""

    kind = "memory"
    shared = False

    def __init__(self, service: str) -> None:
        super().__init__(service)
        self._data: dict[str, tuple[bytes, float | None]] = {}

    @property
    def redis(self) -> None:
        return None

    async def connect(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    def _live(self, key: str) -> tuple[bytes, float | None] | None:
        item = self._data.get(key)
        if item is not None and item[1] is not None and item[1] <= time.monotonic():
            del self._data[key]
            return None
        return item

    async def get(self, key: str) -> bytes | None:
        item = self._live(key)
        return None if item is None else item[0]

    async def set(self, key: str, value: bytes | str, ttl: float | None = None) -> None:
        self._data[key] = (_bytes(value), time.monotonic() + ttl if ttl else None)
        if len(self._data) % 1024 == 0:
            self._sweep()

    async def set_nx(self, key: str, value: bytes | str, ttl: float | None = None) -> bool:
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


class Backoff:
    """Consecutive failures to reach one Redis node -> refuse commands to it for a pause.

    The hot path is ``admit()`` with nothing wrong: one attribute test. After
    the pause one command probes the node (the others are still refused for
    as long as the probe may take); its success ends the back-off, its
    failure starts another pause at once.
    """

    def __init__(self, node: str, timeout: float, pause: float, after: int = BACKOFF_AFTER) -> None:
        self.node = node
        self.timeout = timeout
        self.pause = pause
        self.after = after
        self.failures = 0
        self.until = 0.0
        self.refused = 0

    def admit(self) -> None:
        if self.until:
            now = time.monotonic()
            if now < self.until:
                self.refused += 1
                raise StateBackingOff(f"Redis {self.node} failed {self.failures} times in a row; "
                                      f"backing off")
            self.until = now + self.timeout + 0.05

    def failed(self) -> None:
        self.failures += 1
        if self.failures >= self.after and self.pause > 0:
            if self.failures == self.after:
                log.warning("Redis %s: %d consecutive failures; not calling it for %.2gs at a time until "
                            "it answers", self.node, self.failures, self.pause)
            self.until = time.monotonic() + self.pause

    def succeeded(self) -> None:
        if self.failures >= self.after:
            log.warning("Redis %s answers again (%d commands refused while backing off)",
                        self.node, self.refused)
        self.failures = 0
        self.until = 0.0
        self.refused = 0


def _guarded_connection(base: type, guards: dict[str, Backoff], timeout: float, pause: float) -> type:
    """A redis.asyncio connection class that reports to, and obeys, the Backoff of its node.

    Hooks redis-py 8's public connection methods (send_packed_command,
    read_response, connect_check_health): the one place every command, script,
    pipeline and pub/sub read of both the single and the cluster client passes.
    """

    class GuardedConnection(base):
        _guard: Backoff | None = None
        _inside = False

        @property
        def guard(self) -> Backoff:
            g = self._guard
            if g is None:
                path = getattr(self, "path", None)  # a unix socket has no host and port
                node = path if isinstance(path, str) and path else f"{self.host}:{self.port}"
                g = guards.get(node)
                if g is None:
                    g = guards[node] = Backoff(node, timeout, pause)
                self._guard = g
            return g

        async def connect_check_health(self, check_health: bool = True,
                                       retry_socket_connect: bool = True) -> None:
            if self.is_connected:
                return
            guard = self.guard
            outer = self._inside
            if not outer:
                guard.admit()
            # The handshake's own commands belong to this admitted call.
            self._inside = True
            before = guard.failures
            try:
                await super().connect_check_health(check_health, retry_socket_connect)
            except (RedisConnectionError, RedisTimeoutError):
                if guard.failures == before:  # not already counted by the handshake's read
                    guard.failed()
                raise
            finally:
                self._inside = outer

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            outer = self._inside
            if not outer:
                self.guard.admit()
            # A reconnect inside (a dead connection) belongs to this admitted call.
            self._inside = True
            try:
                await super().send_packed_command(command, check_health)
            finally:
                self._inside = outer

        async def read_response(self, disable_decoding: bool = False, timeout: float | None = None,
                                *, disconnect_on_error: bool = True, push_request: bool | None = False) -> Any:
            try:
                response = await super().read_response(disable_decoding, timeout,
                                                       disconnect_on_error=disconnect_on_error,
                                                       push_request=push_request)
            except RedisTimeoutError:
                self.guard.failed()
                raise
            # A pub/sub read with its own timeout answers None when nothing came: no news.
            if timeout is None and self.guard.failures:
                self.guard.succeeded()
            return response

    return GuardedConnection


class RedisState(_Keys):
    """Shared state in one Redis or a Redis Cluster (redis.asyncio)."""

    shared = True

    def __init__(self, service: str, url: str, *, cluster: bool = False, max_connections: int = 64,
                 timeout: float = 0.25, backoff: float = 1.0) -> None:
        super().__init__(service)
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.timeout = timeout
        #: One Backoff per node ("host:port"), made on first use.
        self.guards: dict[str, Backoff] = {}
        for scheme in CLUSTER_SCHEMES:
            if url.startswith(scheme):
                url = scheme.replace("+cluster", "") + url[len(scheme):]
                cluster = True
        self.cluster = cluster
        self.kind = "redis-cluster" if cluster else "redis"
        common: dict[str, Any] = dict(
            socket_connect_timeout=timeout, socket_timeout=timeout, health_check_interval=10,
            decode_responses=False,
            # Keys carry client header values, which aiohttp decodes with
            # surrogateescape: send them back as their original bytes rather
            # than fail the command on a non-UTF-8 byte (a 500).
            encoding_errors="surrogateescape")
        self._client: Redis | RedisCluster
        if cluster:
            self._client = _cluster_client(url, common, max_connections, self.guards, timeout, backoff)
        else:
            import redis.asyncio as aioredis
            from redis.asyncio.connection import parse_url

            # The URL picks the connection class (TCP, TLS, unix socket): guard that one.
            options = {**common, **parse_url(url)}
            base = options.pop("connection_class", aioredis.Connection)
            conn_cls = _guarded_connection(base, self.guards, timeout, backoff)
            # A blocking pool: past max_connections a caller waits for a free
            # connection instead of failing at once. Not only ``timeout``: a
            # burst on a busy loop can queue longer than one command may
            # take, and on a frozen Redis the waits end with the back-off.
            pool = aioredis.BlockingConnectionPool(
                max_connections=max_connections, timeout=max(1.0, 4 * timeout), connection_class=conn_cls,
                # Once, on a fresh connection, when a pooled one turns out
                # dead (a restarted Redis closed it): not on a timeout, which
                # would double the wait on a frozen Redis.
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), **options)
            self._client = aioredis.Redis(connection_pool=pool)

    @property
    def redis(self) -> "Redis | RedisCluster":
        return self._client

    async def connect(self) -> None:
        if self.cluster:
            await self._client.initialize()  # the slot map, from any node
        else:
            await self._client.ping()

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except Exception:
            return False

    async def get(self, key: str) -> bytes | None:
        value = await self._client.get(key)
        # Never str: the client does not decode (decode_responses=False).
        return value.encode() if isinstance(value, str) else value

    async def set(self, key: str, value: bytes | str, ttl: float | None = None) -> None:
        await self._client.set(key, value, px=int(ttl * 1000) if ttl else None)

    async def set_nx(self, key: str, value: bytes | str, ttl: float | None = None) -> bool:
        return bool(await self._client.set(key, value, nx=True, px=int(ttl * 1000) if ttl else None))

    async def delete(self, key: str) -> None:
        await self._client.delete(key)

    async def close(self) -> None:
        await self._client.aclose()
        if not self.cluster:
            await self._client.connection_pool.disconnect()  # type: ignore[union-attr]


def _cluster_client(url: str, common: dict[str, Any], max_connections: int, guards: dict[str, Backoff],
                    timeout: float, backoff: float) -> "RedisCluster":
    from redis.asyncio import Connection, SSLConnection
    from redis.asyncio.cluster import ClusterDownError, RedisCluster, SlotNotCoveredError
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    class Cluster(RedisCluster):
        # After a connection error the client re-reads the slot map and tries
        # once more (a restarted or moved node); a timeout is not retried: on
        # a frozen node that would double the wait.
        ERRORS_ALLOW_RETRY = (RedisConnectionError, ClusterDownError, SlotNotCoveredError)  # type: ignore[assignment]

        #: The node of the last connection error or timeout.
        failed_node: str | None = None

        async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            # redis-py's cluster nodes fail a command at once past
            # max_connections (MaxConnectionsError) where the one-Redis pool
            # waits: queue here instead, as many commands as connections.
            async with slots:
                try:
                    return await super().execute_command(*args, **kwargs)
                except (RedisConnectionError, RedisTimeoutError) as e:
                    self.failed_node = getattr(e, "last_failed_node_name", None) or self.failed_node
                    raise

        async def initialize(self, additional_startup_nodes_info: Any = None,
                             last_failed_node_name: str | None = None) -> "Cluster":
            # A timeout or connection error makes the next command re-read
            # the slot map, from the start-up nodes in random order; redis-py
            # asks the failed node last only within one command's retry. A
            # frozen master asked first would cost that next command a second
            # timeout: it is asked last until another node fails.
            await super().initialize(additional_startup_nodes_info, last_failed_node_name or self.failed_node)
            return self

    slots = asyncio.Semaphore(max_connections)
    # Twice as many per node as may be in use: a connection marked for
    # reconnect after an error still counts until its background close ends.
    client = Cluster.from_url(url, max_connections=2 * max_connections, retry=Retry(NoBackoff(), 1), **common)
    # redis-py's cluster client builds each node's connections from its
    # connection_kwargs (no constructor argument for the class): the nodes it
    # discovers later read the same dict, the start-up nodes have their own.
    base = SSLConnection if url.startswith("rediss://") else Connection
    conn_cls = _guarded_connection(base, guards, timeout, backoff)
    client.nodes_manager.connection_kwargs["connection_class"] = conn_cls
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = conn_cls
    return client



def make_state(settings: "StateSettings", service: str) -> StateBackend:
    if settings.backend == "redis":
        return RedisState(service, settings.url, cluster=settings.cluster,
                          max_connections=settings.max_connections, timeout=settings.timeout,
                          backoff=settings.backoff)
    return MemoryState(service)
