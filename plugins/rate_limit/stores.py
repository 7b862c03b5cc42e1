"""What a rate-limit store is: decided on the loop (memory) or awaited (Redis).

The filter reads ``store.sync`` once at build time instead of guessing from
the method's kind; the memory stores stay synchronous because a coroutine per
decision costs more than the decision itself (docs/performance.md).
"""

from __future__ import annotations

from typing import Literal, Protocol

from .gcra import Decision, LimitSpec


class SyncStore(Protocol):
    """In-process decisions (MemoryStore, SharedStore): called without await."""

    sync: Literal[True]
    kind: str
    shared: bool

    def decide(self, keys: list[str], limits: tuple[LimitSpec, ...], max_wait: float) -> Decision: ...

    def peek(self, keys: list[str], limits: tuple[LimitSpec, ...]) -> list[tuple[int, float]]: ...

    def close(self) -> None: ...


class AsyncStore(Protocol):
    """Decisions over the network (RedisStore on the state backend's client): awaited."""

    sync: Literal[False]
    kind: str
    shared: bool

    async def decide(self, keys: list[str], limits: tuple[LimitSpec, ...], max_wait: float) -> Decision: ...

    async def peek(self, keys: list[str], limits: tuple[LimitSpec, ...]) -> list[tuple[int, float]]: ...

    def close(self) -> None: ...


Store = SyncStore | AsyncStore
