"""The durable webhook queue: SQLite (memory backend) or Redis Streams (redis backend).

An event is committed before the provider hears 202, and leaves the queue
only as ``delivered`` or ``dead``. Delivery takes the oldest pending event of a
source (``head``), so a source's events reach the service in arrival order.

- SQLite: one WAL database under ``data_dir``, ``synchronous=FULL``; every
  call runs on one dedicated thread (sqlite3 blocks), never on the loop. With
  several workers every worker enqueues and worker 0 delivers.
- Redis: one stream per source read through a consumer group, plus a hash
  per event (status, attempts, body) and an index. A per-source lease decides
  which sidecar consumes a source, so two sidecars deliver each event once and
  in order; a new lease holder claims what the previous one left pending.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

STATUSES = ("pending", "delivered", "dead")


def new_event_id() -> str:
    """Time-ordered, unique: 13 hex digits of milliseconds + 12 random hex digits."""
    return f"evt_{int(time.time() * 1000):013x}{os.urandom(6).hex()}"


@dataclass
class Event:
    id: str
    source: str
    type: str
    provider_id: str | None
    method: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float
    status: str = "pending"
    attempts: int = 0
    next_at: float = 0.0
    last_error: str | None = None
    last_status: int | None = None
    delivered_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "type": self.type, "provider_id": self.provider_id,
                "status": self.status, "attempts": self.attempts, "received_at": self.received_at,
                "next_attempt_at": self.next_at if self.status == "pending" and self.next_at else None,
                "delivered_at": self.delivered_at, "last_error": self.last_error,
                "last_status": self.last_status, "size": len(self.body)}


_COLUMNS = ("id", "source", "type", "provider_id", "method", "query", "headers", "body", "received_at",
            "status", "attempts", "next_at", "last_error", "last_status", "delivered_at")


def _row_to_event(row: tuple[Any, ...]) -> Event:
    d = dict(zip(_COLUMNS, row, strict=True))
    d["headers"] = [tuple(h) for h in orjson.loads(d["headers"])]
    d["body"] = bytes(d["body"])
    return Event(**d)


class SqliteQueue:
    kind = "sqlite"

    def __init__(self, path: Path, deliver: bool = True) -> None:
        self.path = path
        # This process delivers (worker 0 with the SQLite queue).
        self.deliver = deliver
        self._ex = ThreadPoolExecutor(1, thread_name_prefix="sidecar-webhook-sqlite")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._ex, fn, *args)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed event survives a power cut, not only a kill -9.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("""CREATE TABLE IF NOT EXISTS events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, source TEXT NOT NULL,
            type TEXT NOT NULL, provider_id TEXT, method TEXT NOT NULL, query TEXT NOT NULL,
            headers TEXT NOT NULL, body BLOB NOT NULL, received_at REAL NOT NULL,
            status TEXT NOT NULL, attempts INTEGER NOT NULL, next_at REAL NOT NULL,
            last_error TEXT, last_status INTEGER, delivered_at REAL)""")
        db.execute("CREATE INDEX IF NOT EXISTS events_source_status ON events(source, status, seq)")
        db.execute("CREATE INDEX IF NOT EXISTS events_status ON events(status, seq)")
        self._db = db

    async def open(self) -> None:
        await self._run(self._open)

    async def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(_close)
        self._ex.shutdown(wait=True)

    def _add(self, ev: Event) -> None:
        assert self._db is not None
        self._db.execute(
            f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            (ev.id, ev.source, ev.type, ev.provider_id, ev.method, ev.query, orjson.dumps(ev.headers).decode(),
             ev.body, ev.received_at, ev.status, ev.attempts, ev.next_at, ev.last_error, ev.last_status,
             ev.delivered_at))

    async def add(self, ev: Event) -> None:
        """Commit the event (autocommit: durable when this returns)."""
        await self._run(self._add, ev)

    def _one(self, sql: str, args: tuple[Any, ...]) -> Event | None:
        assert self._db is not None
        row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM events {sql}", args).fetchone()
        return None if row is None else _row_to_event(row)

    async def head(self, source: str) -> Event | None:
        if not self.deliver:
            return None
        return await self._run(self._one, "WHERE source = ? AND status = 'pending' ORDER BY seq LIMIT 1", (source,))

    async def get(self, event_id: str) -> Event | None:
        return await self._run(self._one, "WHERE id = ?", (event_id,))

    def _save(self, ev: Event) -> None:
        assert self._db is not None
        self._db.execute("UPDATE events SET status=?, attempts=?, next_at=?, last_error=?, last_status=?, "
                         "delivered_at=? WHERE id=?",
                         (ev.status, ev.attempts, ev.next_at, ev.last_error, ev.last_status, ev.delivered_at, ev.id))

    async def save(self, ev: Event) -> None:
        await self._run(self._save, ev)

    def _list(self, status: str | None, source: str | None, limit: int) -> list[Event]:
        assert self._db is not None
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if source:
            where.append("source = ?")
            args.append(source)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        return [_row_to_event(r) for r in self._db.execute(sql, (*args, limit)).fetchall()]

    async def list(self, status: str | None, source: str | None, limit: int = 100) -> list[Event]:
        return await self._run(self._list, status, source, limit)

    def _retry(self, event_id: str) -> Event | None:
        assert self._db is not None
        cur = self._db.execute("UPDATE events SET status='pending', attempts=0, next_at=0 "
                               "WHERE id=? AND status='dead'", (event_id,))
        return self._one("WHERE id = ?", (event_id,)) if cur.rowcount else None

    async def retry(self, event_id: str) -> Event | None:
        """A dead event back to pending (attempts reset); None if not dead."""
        return await self._run(self._retry, event_id)

    def _stats(self, source: str) -> tuple[int, float | None]:
        assert self._db is not None
        n, oldest = self._db.execute("SELECT COUNT(*), MIN(received_at) FROM events "
                                     "WHERE source=? AND status='pending'", (source,)).fetchone()
        return n, oldest

    async def stats(self, source: str) -> tuple[int, float | None]:
        """(pending count, oldest pending received_at)."""
        return await self._run(self._stats, source)

    def _prune(self, before: float) -> int:
        assert self._db is not None
        return self._db.execute("DELETE FROM events WHERE status='delivered' AND delivered_at < ?",
                                (before,)).rowcount

    async def prune(self, before: float) -> int:
        """Forget delivered events older than ``before``."""
        return await self._run(self._prune, before)


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

    def __init__(self, state: Any, consumer: str, lease_ttl: float = 5.0, retention: float = 7 * 86400) -> None:
        self.r = state.redis
        self.prefix = state.key("webhooks")
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
