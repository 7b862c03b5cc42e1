"""The shared durable queue: Redis Streams with a consumer group and a per-source lease.

Every key of a service's queue (event hashes, the index, each source's
stream and lease) carries one hash tag, ``{<service>/webhooks}``: add, save
and retry are MULTI transactions over an event hash, the index and a stream,
which a Redis Cluster only runs within one slot. The queue of one service
thus lives on one master; webhook rates are far below what one serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from .queue import Event

if TYPE_CHECKING:
    from proxy.state import StateBackend

_LEASE = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""

GROUP = "delivery"


def _enc(ev: Event) -> dict[str, Any]:
    return {"id": ev.id, "source": ev.source, "type": ev.type, "provider_id": ev.provider_id or "",
            "method": ev.method, "query": ev.query, "headers": orjson.dumps(ev.headers), "body": ev.body,
            "received_at": repr(ev.received_at), "status": ev.status, "attempts": ev.attempts,
            "next_at": repr(ev.next_at), "last_error": ev.last_error or "",
            "last_status": ev.last_status or 0, "delivered_at": repr(ev.delivered_at or 0.0)}


def _dec(h: dict[bytes, bytes]) -> Event:
    g = {k.decode(): v for k, v in h.items()}
    s = {k: v.decode() for k, v in g.items() if k != "body"}
    return Event(id=s["id"], source=s["source"], type=s["type"], provider_id=s["provider_id"] or None,
                 method=s["method"], query=s["query"],
                 headers=[tuple(x) for x in orjson.loads(s["headers"])], body=bytes(g["body"]),
                 received_at=float(s["received_at"]), status=s["status"], attempts=int(s["attempts"]),
                 next_at=float(s["next_at"]), last_error=s["last_error"] or None,
                 last_status=int(s["last_status"]) or None, delivered_at=float(s["delivered_at"]) or None)


class RedisQueue:
    kind = "redis"
    deliver = True

    def __init__(self, state: "StateBackend", consumer: str, lease_ttl: float = 5.0,
                 retention: float = 7 * 86400) -> None:
        assert state.redis is not None
        # Any: redis-py types replies as bytes | str | ... for either client
        # mode; this client never decodes (decode_responses=False): bytes.
        self.r: Any = state.redis
        self.prefix = state.tagged("webhooks", "webhooks")
        self.consumer = consumer
        self.lease_ms = int(lease_ttl * 1000)
        self.retention = retention
        self._lease = self.r.register_script(_LEASE)
        self._groups: set[str] = set()
        self._owned: set[str] = set()
        self._entries: dict[str, tuple[str, bytes]] = {}

    def stream(self, source: str) -> str:
        return f"{self.prefix}:stream:{source}"

    def _event_key(self, event_id: str) -> str:
        return f"{self.prefix}:event:{event_id}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}:index"

    async def open(self) -> None:
        # No ping: a Redis that is down at start-up must not stop the sidecar;
        # enqueue answers 503 and the delivery loops retry until it is back.
        return None

    async def close(self) -> None:
        # Give up leases so another sidecar takes over at once.
        for source in list(self._owned):
            try:
                key = f"{self.prefix}:lease:{source}"
                if await self.r.get(key) == self.consumer.encode():
                    await self.r.delete(key)
            except Exception:
                pass
        self._owned.clear()

    async def _group(self, source: str) -> None:
        if source in self._groups:
            return
        try:
            await self.r.xgroup_create(self.stream(source), GROUP, id="0", mkstream=True)
        except Exception as e:  # BUSYGROUP: it exists already
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add(source)

    async def add(self, ev: Event) -> None:
        """HSET + index + XADD in one MULTI: acknowledged means stored in Redis."""
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self._event_key(ev.id), mapping=_enc(ev))
            p.zadd(self._index, {ev.id: ev.received_at})
            p.xadd(self.stream(ev.source), {"id": ev.id})
            await p.execute()

    async def get(self, event_id: str) -> Event | None:
        h = await self.r.hgetall(self._event_key(event_id))
        return _dec(h) if h else None

    async def _hold(self, source: str) -> bool:
        got = await self._lease(keys=[f"{self.prefix}:lease:{source}"], args=[self.consumer, self.lease_ms])
        if not got:
            self._owned.discard(source)
            return False
        if source not in self._owned:
            # New holder: take over whatever the previous one left unacknowledged.
            await self._group(source)
            cursor = "0-0"
            while True:
                res = await self.r.xautoclaim(self.stream(source), GROUP, self.consumer, 0, cursor, count=100)
                cursor = res[0]
                if cursor in (b"0-0", "0-0"):
                    break
            self._owned.add(source)
        return True

    async def head(self, source: str) -> Event | None:
        await self._group(source)
        if not await self._hold(source):
            return None
        stream = self.stream(source)
        while True:
            # Our own unacknowledged entries first (a retry waiting), then new ones.
            for start in ("0", ">"):
                res = await self.r.xreadgroup(GROUP, self.consumer, {stream: start}, count=1)
                entries = res[0][1] if res else []
                if entries:
                    break
            else:
                return None
            entry_id, fields = entries[0]
            ev = await self.get(fields[b"id"].decode())
            if ev is not None and ev.status == "pending":
                self._entries[ev.id] = (stream, entry_id)
                return ev
            # Already finished (a manual retry re-added it, then it was delivered): skip.
            await self.r.xack(stream, GROUP, entry_id)

    async def save(self, ev: Event) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self._event_key(ev.id), mapping={k: v for k, v in _enc(ev).items()
                                                    if k not in ("body", "headers")})
            if ev.status != "pending":
                entry = self._entries.pop(ev.id, None)
                if entry is not None:
                    p.xack(entry[0], GROUP, entry[1])
                if ev.status == "delivered":
                    p.expire(self._event_key(ev.id), int(self.retention))
            await p.execute()

    async def list(self, status: str | None, source: str | None, limit: int = 100) -> list[Event]:
        ids = await self.r.zrevrange(self._index, 0, 999)
        out: list[Event] = []
        if not ids:
            return out
        async with self.r.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(self._event_key(i.decode()))
            rows = await p.execute()
        gone = []
        for i, h in zip(ids, rows, strict=True):
            if not h:
                gone.append(i)
                continue
            ev = _dec(h)
            if (status is None or ev.status == status) and (source is None or ev.source == source):
                out.append(ev)
                if len(out) >= limit:
                    break
        if gone:
            await self.r.zrem(self._index, *gone)
        return out

    async def retry(self, event_id: str) -> Event | None:
        ev = await self.get(event_id)
        if ev is None or ev.status != "dead":
            return None
        ev.status, ev.attempts, ev.next_at = "pending", 0, 0.0
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self._event_key(ev.id), mapping={"status": "pending", "attempts": 0, "next_at": "0.0"})
            p.xadd(self.stream(ev.source), {"id": ev.id})
            await p.execute()
        return ev

    async def stats(self, source: str) -> tuple[int, float | None]:
        await self._group(source)
        stream = self.stream(source)
        groups = await self.r.xinfo_groups(stream)
        g = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
        if g is None:
            return 0, None
        pending = int(g.get("pending") or 0)
        lag = int(g.get("lag") or 0)
        oldest: float | None = None
        if pending:
            first = await self.r.xpending_range(stream, GROUP, "-", "+", 1)
            if first:
                oldest = int(first[0]["message_id"].split(b"-")[0]) / 1000
        elif lag:
            last = g.get("last-delivered-id") or b"0-0"
            nxt = await self.r.xrange(stream, min=b"(" + last, count=1)
            if nxt:
                oldest = int(nxt[0][0].split(b"-")[0]) / 1000
        return pending + lag, oldest

    async def prune(self, before: float) -> int:
        """Delivered hashes expire on their own; trim the index, and drop stream
        entries every consumer is done with (below the oldest unacknowledged one)."""
        n = await self.r.zremrangebyscore(self._index, "-inf", before)
        for source in list(self._groups):
            stream = self.stream(source)
            groups = await self.r.xinfo_groups(stream)
            g = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
            if g is None:
                continue
            floor = g.get("last-delivered-id") or b"0-0"
            summary = await self.r.xpending(stream, GROUP)
            if summary.get("pending"):
                floor = summary["min"]
            await self.r.xtrim(stream, minid=floor, approximate=False)
        return int(n)
