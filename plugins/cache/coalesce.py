"""Coalescing: concurrent misses for one key wait for the first one's
response instead of all going upstream (nginx's proxy_cache_lock).

Per process: two workers or two sidecars on one Redis may each fetch once.
"""

from __future__ import annotations

import asyncio


class Flights:
    """The misses in flight, by cache key."""

    __slots__ = ("_flights", "timeout")

    def __init__(self, timeout: float) -> None:
        self._flights: dict[str, asyncio.Future[None]] = {}
        self.timeout = timeout

    def __len__(self) -> int:
        return len(self._flights)

    def current(self, key: str) -> asyncio.Future[None] | None:
        """The miss already in flight for ``key``, if any."""
        return self._flights.get(key)

    def take_off(self, key: str) -> asyncio.Future[None]:
        """This request fetches ``key``; others wait for it to ``land``."""
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        return flight

    async def wait(self, flight: asyncio.Future[None]) -> None:
        """Wait for ``flight`` to land, at most ``timeout``; a waiter that gives
        up (or is cancelled) does not cancel the flight."""
        try:
            await asyncio.wait_for(asyncio.shield(flight), self.timeout)
        except asyncio.TimeoutError:
            pass

    def land(self, key: str, flight: asyncio.Future[None] | None) -> None:
        """The fetch for ``key`` is over (stored, not storable or failed): wake the waiters."""
        if flight is None:
            return
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.done():
            flight.set_result(None)
