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

import os
import time
from dataclasses import dataclass, field
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
