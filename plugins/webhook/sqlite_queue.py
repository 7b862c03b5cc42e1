"""The embedded durable queue: SQLite in WAL mode, on one dedicated thread."""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from .queue import _COLUMNS, Event, _row_to_event


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
            # Column names are constants; every value is a ? parameter.
            f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",  # noqa: S608
            (ev.id, ev.source, ev.type, ev.provider_id, ev.method, ev.query, orjson.dumps(ev.headers).decode(),
             ev.body, ev.received_at, ev.status, ev.attempts, ev.next_at, ev.last_error, ev.last_status,
             ev.delivered_at))

    async def add(self, ev: Event) -> None:
        """Commit the event (autocommit: durable when this returns)."""
        await self._run(self._add, ev)

    def _one(self, sql: str, args: tuple[Any, ...]) -> Event | None:
        assert self._db is not None
        # `sql` is one of this module's constant WHERE clauses; values are ? parameters.
        row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM events {sql}", args).fetchone()  # noqa: S608
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
        sql = f"SELECT {', '.join(_COLUMNS)} FROM events"  # noqa: S608 -- constant columns, ? parameters
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
