"""Background refresh for stale-while-revalidate (RFC 5861 3): one refresh
per key however many requests are served the stale entry meanwhile."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from proxy.chain import Exchange, Handler
from proxy.errors import SidecarError

from .rules import variant_key
from .storable import CONDITIONALS, add_validators
from .store import Entry

if TYPE_CHECKING:
    from .filter import CacheFilter

log = logging.getLogger("sidecar.cache")



class Refresher:
    """The background refreshes of one route's cache, and every task the
    cache spawns (so close() can cancel them)."""

    __slots__ = ("refreshing", "_tasks")

    def __init__(self) -> None:
        self.refreshing: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start(self, cache: "CacheFilter", key: str, primary: str, entry: Entry, ex: Exchange,
              call_next: Handler) -> None:
        """Refresh ``entry`` (stored under ``key``) in the background, unless
        a refresh of it already runs. ``ex`` is the request served stale."""
        if key in self.refreshing:
            return
        headers = ex.headers.copy()
        for name in CONDITIONALS:
            headers.popall(name, None)
        now = time.monotonic()
        bg = ex.derive(method="GET", headers=headers, started=now,
                       deadline=now + cache.route_timeout if cache.route_timeout else None)
        self.refreshing[key] = self.spawn(self._run(cache, key, primary, entry, bg, call_next))

    async def _run(self, cache: "CacheFilter", key: str, primary: str, entry: Entry, bg: Exchange,
                   call_next: Handler) -> None:
        credentialed = cache.injects or "Authorization" in bg.headers
        seen = bg.headers.copy()
        try:
            revalidating = add_validators(bg.headers, entry)
            t_req = time.time()
            resp = await call_next(bg)
            t_resp = time.time()
            if revalidating and resp.status == 304:
                await cache.freshen(key, entry, resp, t_req, t_resp)
                return
            if resp.status >= 500:
                resp.close()
                return
            decision = cache.rules.decide("GET", bg.path, resp, credentialed, t_req, t_resp)
            if isinstance(decision, str):
                resp.close()
                await cache.store.delete(key)  # no longer cacheable: stop serving the old one
                return
            stored, vary = decision
            try:
                stored.body = await resp.read(cache.rules.max_body)
            except ValueError:
                await cache.store.delete(key)
                return
            store_key = variant_key(primary, vary, seen) if vary else primary
            await cache.put(primary, store_key, stored, vary)
        except SidecarError as e:
            log.info("cache: background refresh on %s failed: %s", cache.route, e.code)
        except Exception:
            log.exception("cache: background refresh on %s failed", cache.route)
        finally:
            self.refreshing.pop(key, None)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
