"""The cache filter: lookup, serving, fetching with a streaming tee, invalidation.

The three other concerns live beside it: storable.py (what may be stored and
for how long), coalesce.py (single-flight misses) and refresh.py (background
refresh for stale-while-revalidate).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from multidict import CIMultiDict

from proxy.chain import Exchange, Filter, Handler, ProxyResponse
from proxy.errors import SidecarError
from proxy.tenants import TopCounts

from .coalesce import Flights
from .config import Config
from .refresh import Refresher
from .rules import (ERROR_STATUSES, credential_scope, delta, etag_matches, parse_cache_control,
                    primary_key, request_use, variant_key)
from .storable import Storability, add_validators, is_strict
from .store import Entry, MemoryStore, RedisStore, VaryMarker

NAME = "cache"
_EMPTY: dict[str, str | None] = {}

_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Headers a 304 to the client carries from the stored response (RFC 9110 15.4.5).
_304_FIELDS = ("Cache-Control", "Content-Location", "Date", "ETag", "Expires", "Vary", "Last-Modified")


class CacheMiss(SidecarError):
    status, code, message = 504, "cache_miss", "only-if-cached: no stored response for this request"


class CacheFilter(Filter):
    def __init__(self, config: Config, route: str, store: MemoryStore | RedisStore,
                 counter: Any, injects_credentials: bool, route_timeout: float) -> None:
        self.config = config
        self.route = route
        self.store = store
        self.rules = Storability(config)
        self.methods = frozenset(config.methods)
        self.key_headers = config.key_headers
        self.authorized = config.authorized
        self.max_body = config.max_body
        self.lock = config.lock
        self.flights = Flights(config.lock_timeout)
        self.refresher = Refresher()
        # A route whose [auth] injects credentials makes every upstream request
        # an authorized one, though the cache (outside auth) never sees the header.
        self.injects = injects_credentials
        self.route_timeout = route_timeout
        self._inc = {r: counter.labels(route, r).inc
                     for r in ("hit", "miss", "stale", "bypass", "revalidated")}
        self.counts = dict.fromkeys(self._inc, 0)
        self.tenants = TopCounts(tuple(self._inc))   # /admin/cache?tenant=T

    @property
    def refreshing(self) -> dict[str, asyncio.Task[None]]:
        return self.refresher.refreshing

    # ---- per request ------------------------------------------------------

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        if ex.method not in self.methods:
            if ex.method in _SAFE:
                return await call_next(ex)
            return await self._invalidating(ex, call_next)
        h = ex.headers
        cc_value = ",".join(h.getall("Cache-Control")) if "Cache-Control" in h else None
        req_cc = parse_cache_control(cc_value) if cc_value else _EMPTY
        if "no-store" in req_cc or "Range" in h:
            return await self._bypass(ex, call_next, "no-store" if "Range" not in h else "range")
        no_cache = ("no-cache" in req_cc or ("max-age" in req_cc and delta(req_cc["max-age"]) == 0)
                    or (cc_value is None and "no-cache" in h.get("Pragma", "")))
        credentialed = self.injects or "Authorization" in h
        scope = credential_scope(ex.tenant, h.get("Authorization")) if credentialed and self.authorized else ""
        primary = primary_key(ex.path, ex.query, h, self.key_headers, scope)
        key, entry = (primary, None) if no_cache else await self._lookup(primary, h)

        if entry is not None:
            age = entry.age(time.time())
            # RFC 9111 5.2.1: the request's max-age, min-fresh and max-stale
            # narrow (or widen) which stored answers it accepts.
            use = request_use(req_cc, entry.lifetime, age, entry.swr,
                              "max-stale" in req_cc and is_strict(entry))
            if use == "fresh":
                return self._serve(ex, entry, age, "HIT", "hit")
            if use == "stale-while-revalidate" and ex.method == "GET":
                self.refresher.start(self, key, primary, entry, ex, call_next)
                return self._serve(ex, entry, age, "STALE", "stale", "stale-while-revalidate")
            if use == "max-stale":
                return self._serve(ex, entry, age, "STALE", "stale", "stale (max-stale)")
        if "only-if-cached" in req_cc:
            raise CacheMiss()

        flights = self.flights
        flight: asyncio.Future[None] | None = None
        if self.lock and ex.method == "GET" and not no_cache:
            waiting = flights.current(key)
            if waiting is not None:
                await flights.wait(waiting)
                key2, e2 = await self._lookup(primary, h)
                if e2 is not None:
                    age = e2.age(time.time())
                    if request_use(req_cc, e2.lifetime, age, 0.0, False) == "fresh":
                        return self._serve(ex, e2, age, "HIT", "hit", "hit (coalesced)")
                # Not stored (uncacheable, too large, failed) or not fresh
                # enough for this request: go on alone.
            else:
                flight = flights.take_off(key)

        try:
            return await self._fetch(ex, call_next, req_cc, credentialed, primary, key, entry, flight)
        except BaseException:
            flights.land(key, flight)
            raise

    async def _fetch(self, ex: Exchange, call_next: Handler, req_cc: dict[str, str | None],
                     credentialed: bool, primary: str, key: str, entry: Entry | None,
                     flight: asyncio.Future[None] | None) -> ProxyResponse:
        # The request as the cache saw it: inner filters (auth) may edit ex.headers.
        seen = ex.headers.copy()
        revalidating = entry is not None and add_validators(ex.headers, entry)
        t_req = time.time()
        try:
            resp = await call_next(ex)
        except SidecarError as e:
            # Connection failure, timeout, an open breaker or a failed credential:
            # RFC 5861 4 lets a stale entry answer instead.
            if e.status >= 500 and entry is not None and self._usable_on_error(entry):
                self._land(key, flight)
                return self._serve(ex, entry, entry.age(time.time()), "STALE", "stale",
                                   f"stale-if-error ({e.code})", seen)
            raise
        t_resp = time.time()
        if resp.status in ERROR_STATUSES and entry is not None and self._usable_on_error(entry):
            resp.close()
            self._land(key, flight)
            return self._serve(ex, entry, entry.age(t_resp), "STALE", "stale",
                               f"stale-if-error ({resp.status})", seen)
        if revalidating and resp.status == 304 and entry is not None:
            fresh = await self.freshen(key, entry, resp, t_req, t_resp)
            self._land(key, flight)
            if fresh is not None:
                return self._serve(ex, fresh, fresh.age(t_resp), "HIT", "revalidated", request_headers=seen)
            # The 304 made the entry unstorable: the client did not ask for a
            # conditional answer, so fetch the full response once more.
            ex.headers.popall("If-None-Match", None)
            ex.headers.popall("If-Modified-Since", None)
            resp = await call_next(ex)

        decision = self.rules.decide(ex.method, ex.path, resp, credentialed, t_req, t_resp)
        if isinstance(decision, str):
            self._land(key, flight)
            self._count("miss", ex.tenant)
            ex.log[NAME] = f"miss (not stored: {decision})"
            resp.headers["X-Cache"] = "MISS"
            return resp
        stored, vary = decision
        store_key = variant_key(primary, vary, seen) if vary else primary
        self._count("miss", ex.tenant)
        ex.log[NAME] = "miss"
        resp.headers["X-Cache"] = "MISS"
        body = resp.body
        if body is None or isinstance(body, bytes | bytearray):
            data = bytes(body or b"")
            if len(data) <= self.max_body:
                stored.body = data
                await self.put(primary, store_key, stored, vary)
            self._land(key, flight)
        else:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length is not None and length.isdigit() else None
            resp.body = self._tee(body, primary, store_key, stored, vary, expected, key, flight)
        return resp

    async def _invalidating(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        """RFC 9111 4.4: a successful unsafe request (PUT, POST, DELETE...) makes
        the stored responses for its URI stale, here by deleting them: the shared
        entry and the requester's own (per-tenant) one."""
        h = ex.headers
        keys = {primary_key(ex.path, ex.query, h, self.key_headers, "")}
        if self.authorized and (self.injects or "Authorization" in h):
            keys.add(primary_key(ex.path, ex.query, h, self.key_headers,
                                 credential_scope(ex.tenant, h.get("Authorization"))))
        resp = await call_next(ex)
        if 200 <= resp.status < 400:
            for key in keys:
                await self.store.delete(key)  # a Vary marker: its variants become unreachable
            ex.log[NAME] = "invalidated"
        return resp

    async def _bypass(self, ex: Exchange, call_next: Handler, why: str) -> ProxyResponse:
        self._count("bypass", ex.tenant)
        ex.log[NAME] = f"bypass ({why})"
        resp = await call_next(ex)
        resp.headers["X-Cache"] = "BYPASS"
        return resp

    def _serve(self, ex: Exchange, entry: Entry, age: float, xcache: str, result: str,
               note: str | None = None, request_headers: Any = None) -> ProxyResponse:
        self._count(result, ex.tenant)
        ex.log[NAME] = note or result
        # The client's own If-None-Match, not the one the cache added to revalidate.
        inm = (request_headers if request_headers is not None else ex.headers).get("If-None-Match")
        if inm is not None and entry.etag is not None and entry.status == 200 and etag_matches(inm, entry.etag):
            stored = CIMultiDict(entry.headers)
            headers = CIMultiDict((k, v) for k in _304_FIELDS for v in stored.getall(k, []))
            status, body = 304, b""
        else:
            headers = CIMultiDict(entry.headers)
            status, body = entry.status, b"" if ex.method == "HEAD" else entry.body
            if status != 204:
                headers["Content-Length"] = str(len(entry.body))
        headers["Age"] = str(int(age))
        headers["X-Cache"] = xcache
        # upstream=True: the answer is the provider's, not a sidecar error.
        return ProxyResponse(status, headers, body, upstream=True)

    # ---- storing ------------------------------------------------------------

    async def put(self, primary: str, store_key: str, entry: Entry, vary: list[str]) -> None:
        # The Vary marker and its variant land together (one MULTI in Redis).
        await self.store.put_many([(primary, VaryMarker(vary, entry.expires_at())), (store_key, entry)]
                                  if vary else [(store_key, entry)])

    async def _tee(self, body: AsyncIterator[bytes], primary: str, store_key: str, entry: Entry,
                   vary: list[str], expected: int | None, key: str,
                   flight: asyncio.Future[None] | None) -> AsyncIterator[bytes]:
        """The body to the client as it arrives, with a copy kept up to max_body."""
        parts: list[bytes] | None = []
        size = 0
        try:
            async for chunk in body:
                if parts is not None:
                    size += len(chunk)
                    if size > self.max_body:
                        parts = None
                        self._land(key, flight)
                    else:
                        parts.append(chunk)
                        if size == expected:
                            # Store before the last chunk goes out, so the
                            # client's next request already finds it.
                            self._complete(primary, store_key, entry, vary, b"".join(parts), key, flight)
                            parts = None
                yield chunk
            if parts is not None:
                self._complete(primary, store_key, entry, vary, b"".join(parts), key, flight)
                parts = None
        finally:
            if parts is not None:
                self._land(key, flight)  # cut short: nothing stored

    def _complete(self, primary: str, store_key: str, entry: Entry, vary: list[str], data: bytes,
                  key: str, flight: asyncio.Future[None] | None) -> None:
        entry.body = data

        async def put() -> None:
            try:
                await self.put(primary, store_key, entry, vary)
            finally:
                self._land(key, flight)

        if self.store.shared:
            self.refresher.spawn(put())  # the client's last bytes do not wait for Redis
        else:
            # The memory store never suspends: run it to completion right here.
            coro = put()
            try:
                coro.send(None)
            except StopIteration:
                pass
            else:  # pragma: no cover - a memory store that suspends is a bug
                coro.close()
                raise RuntimeError("memory store suspended")

    async def freshen(self, key: str, entry: Entry, resp: ProxyResponse,
                      t_req: float, t_resp: float) -> Entry | None:
        """RFC 9111 4.3.4: a 304 refreshes the stored entry's headers and age."""
        try:
            await resp.read(64 * 1024)
        except ValueError:
            pass
        new = self.rules.freshened(entry, resp.headers, t_req, t_resp)
        if new is None:
            await self.store.delete(key)
        else:
            await self.store.put(key, new)
        return new

    # ---- helpers --------------------------------------------------------------

    async def _lookup(self, primary: str, headers: Any) -> tuple[str, Entry | None]:
        item = await self.store.get(primary)
        if isinstance(item, VaryMarker):
            key = variant_key(primary, item.names, headers)
            got = await self.store.get(key)
            return key, got if isinstance(got, Entry) else None
        return primary, item

    def _usable_on_error(self, entry: Entry) -> bool:
        return entry.age(time.time()) < entry.lifetime + entry.sie

    def _land(self, key: str, flight: asyncio.Future[None] | None) -> None:
        self.flights.land(key, flight)

    def _count(self, result: str, tenant: str | None = None) -> None:
        self.tenants.add(tenant, result)
        self.counts[result] += 1
        self._inc[result]()

    async def stats(self) -> dict[str, Any]:
        c = self.counts
        return {**await self.store.stats(), "hits": c["hit"], "misses": c["miss"], "stale": c["stale"],
                "bypass": c["bypass"], "revalidated": c["revalidated"], "refreshing": len(self.refreshing)}

    async def purge(self) -> int:
        return await self.store.purge()

    async def close(self) -> None:
        self.refresher.close()
        await self.store.close()

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"store": self.store.kind, "ttl": c.ttl, "max_body": c.max_body,
                "authorized": c.authorized, "injected_credentials": self.injects,
                "stale_if_error": c.stale_if_error, "stale_while_revalidate": c.stale_while_revalidate}
