"""The cache filter: lookup, single-flight misses, streaming tee, stale serving."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from multidict import CIMultiDict

from proxy.chain import Exchange, Filter, Handler, ProxyResponse
from proxy.errors import SidecarError
from proxy.tenants import TopCounts

from .config import Config
from .rules import (ERROR_STATUSES, credential_scope, delta, etag_matches, explicit_lifetime,
                    initial_age, parse_cache_control, primary_key, variant_key, vary_names)
from .store import Entry, MemoryStore, RedisStore, VaryMarker

log = logging.getLogger("sidecar.cache")

NAME = "cache"
_EMPTY: dict[str, str | None] = {}

# Never part of a stored response: recomputed per answer, or per request.
_NOT_STORED = frozenset({"age", "x-cache", "x-request-id", "content-length", "set-cookie"})
# RFC 9111 4.3.4: a 304 does not replace these stored fields.
_NOT_FRESHENED = _NOT_STORED | {"content-encoding", "content-type", "content-range", "etag"}
_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_CONDITIONALS = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range")
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
        self.methods = frozenset(config.methods)
        self.statuses = frozenset(config.statuses)
        self.vary_allowed = frozenset(config.vary_headers)
        self.key_headers = config.key_headers
        self.authorized = config.authorized
        self.ttl = config.ttl
        self.max_ttl = config.max_ttl
        self.max_body = config.max_body
        self.default_swr = config.stale_while_revalidate
        self.default_sie = config.stale_if_error
        self.keep = config.keep
        self.lock = config.lock
        self.lock_timeout = config.lock_timeout
        # A route whose [auth] injects credentials makes every upstream request
        # an authorized one, though the cache (outside auth) never sees the header.
        self.injects = injects_credentials
        self.route_timeout = route_timeout
        self._inc = {r: counter.labels(route, r).inc
                     for r in ("hit", "miss", "stale", "bypass", "revalidated")}
        self.counts = dict.fromkeys(self._inc, 0)
        self.tenants = TopCounts(tuple(self._inc))   # /admin/cache?tenant=T
        self.flights: dict[str, asyncio.Future[None]] = {}
        self.refreshing: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

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
            if age < entry.lifetime and _acceptable(req_cc, entry, age):
                return self._serve(ex, entry, age, "HIT", "hit")
            if age < entry.lifetime + entry.swr and ex.method == "GET":
                self._refresh(key, primary, entry, ex, call_next)
                return self._serve(ex, entry, age, "STALE", "stale", "stale-while-revalidate")
        if "only-if-cached" in req_cc:
            raise CacheMiss()

        flight: asyncio.Future[None] | None = None
        if self.lock and ex.method == "GET" and not no_cache:
            waiting = self.flights.get(key)
            if waiting is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(waiting), self.lock_timeout)
                except asyncio.TimeoutError:
                    pass
                key2, e2 = await self._lookup(primary, h)
                if e2 is not None:
                    age = e2.age(time.time())
                    if age < e2.lifetime:
                        return self._serve(ex, e2, age, "HIT", "hit", "hit (coalesced)")
                # Not stored (uncacheable, too large, failed): go on alone.
            else:
                flight = self.flights[key] = asyncio.get_running_loop().create_future()

        try:
            return await self._fetch(ex, call_next, req_cc, credentialed, primary, key, entry, flight)
        except BaseException:
            self._land(key, flight)
            raise

    async def _fetch(self, ex: Exchange, call_next: Handler, req_cc: dict[str, str | None],
                     credentialed: bool, primary: str, key: str, entry: Entry | None,
                     flight: asyncio.Future[None] | None) -> ProxyResponse:
        # The request as the cache saw it: inner filters (auth) may edit ex.headers.
        seen = ex.headers.copy()
        revalidating = entry is not None and _add_validators(ex.headers, entry)
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
            fresh = await self._freshen(primary, key, entry, resp, t_req, t_resp)
            self._land(key, flight)
            if fresh is not None:
                return self._serve(ex, fresh, fresh.age(t_resp), "HIT", "revalidated", request_headers=seen)
            # The 304 made the entry unstorable: the client did not ask for a
            # conditional answer, so fetch the full response once more.
            ex.headers.popall("If-None-Match", None)
            ex.headers.popall("If-Modified-Since", None)
            resp = await call_next(ex)

        decision = self._decide(ex.method, ex.path, req_cc, resp, credentialed, t_req, t_resp)
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
                await self._put(primary, store_key, stored, vary)
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

    def _lifetimes(self, cc: dict[str, str | None], headers: Any, now: float) -> tuple[float, float, float]:
        """Freshness lifetime, stale-while-revalidate and stale-if-error windows."""
        lifetime = explicit_lifetime(cc, headers, now)
        if lifetime is None:
            lifetime = self.ttl  # heuristic freshness, RFC 9111 4.2.2, only as configured
        lifetime = min(lifetime, self.max_ttl)
        # must-revalidate/proxy-revalidate/s-maxage (RFC 9111 5.2.2.2, .8, .10) forbid
        # serving stale on our own initiative; a response's explicit RFC 5861 window still holds.
        strict = "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc
        swr = float(delta(cc["stale-while-revalidate"])) if "stale-while-revalidate" in cc else (
            0.0 if strict else self.default_swr)
        sie = float(delta(cc["stale-if-error"])) if "stale-if-error" in cc else (
            0.0 if strict else self.default_sie)
        return lifetime, min(swr, self.max_ttl), min(sie, self.max_ttl)

    def _decide(self, method: str, path: str, req_cc: dict[str, str | None], resp: ProxyResponse,
                credentialed: bool, t_req: float, t_resp: float) -> tuple[Entry, list[str]] | str:
        """The entry to store (body still empty) and its Vary names, or why not (RFC 9111 3)."""
        if method != "GET":
            return "HEAD responses are not stored"
        if resp.status not in self.statuses:
            return f"status {resp.status}"
        rh = resp.headers
        cc = parse_cache_control(",".join(rh.getall("Cache-Control", [])))
        for d in ("no-store", "private", "no-cache"):
            if d in cc:
                return d
        if "Set-Cookie" in rh:
            return "set-cookie"
        if credentialed and not self.authorized and not (
                "public" in cc or "s-maxage" in cc or "must-revalidate" in cc):
            return "authorization"  # RFC 9111 3.5
        vary = vary_names(",".join(rh.getall("Vary", [])))
        if vary == ["*"]:
            return "vary *"
        for name in vary or ():
            if name not in self.vary_allowed:
                return f"vary {name} not in vary_headers"
        length = rh.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return "larger than max_body"
        lifetime, swr, sie = self._lifetimes(cc, rh, t_resp)
        etag, lm = rh.get("ETag"), rh.get("Last-Modified")
        keep = self.keep if (etag or lm) else 0.0
        if lifetime <= 0 and max(swr, sie, keep) <= 0:
            return "no freshness (set ttl for responses without Cache-Control/Expires)"
        age0 = initial_age(rh, t_req, t_resp)
        entry = Entry(resp.status, [(k, v) for k, v in rh.items() if k.lower() not in _NOT_STORED],
                      b"", t_resp, age0, lifetime, swr, sie, keep, etag, lm, path)
        if entry.expires_at() <= t_resp:
            return "stale on arrival"
        return entry, vary or []

    async def _put(self, primary: str, store_key: str, entry: Entry, vary: list[str]) -> None:
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
                await self._put(primary, store_key, entry, vary)
            finally:
                self._land(key, flight)

        if self.store.shared:
            self._spawn(put())  # the client's last bytes do not wait for Redis
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

    async def _freshen(self, primary: str, key: str, entry: Entry, resp: ProxyResponse,
                       t_req: float, t_resp: float) -> Entry | None:
        """RFC 9111 4.3.4: a 304 refreshes the stored entry's headers and age."""
        try:
            await resp.read(64 * 1024)
        except ValueError:
            pass
        headers = CIMultiDict(entry.headers)
        fresh = resp.headers
        for name in {k.lower() for k in fresh.keys()} - _NOT_FRESHENED:
            headers.popall(name, None)
            for v in fresh.getall(name):
                headers.add(name, v)
        cc = parse_cache_control(",".join(headers.getall("Cache-Control", [])))
        if "no-store" in cc or "private" in cc or "no-cache" in cc:
            await self.store.delete(key)
            return None
        lifetime, swr, sie = self._lifetimes(cc, headers, t_resp)
        new = Entry(entry.status, list(headers.items()), entry.body, t_resp,
                    initial_age(fresh, t_req, t_resp), lifetime, swr, sie, entry.keep,
                    headers.get("ETag"), headers.get("Last-Modified"), entry.path)
        await self.store.put(key, new)
        return new

    # ---- stale-while-revalidate: one background refresh per key ------------

    def _refresh(self, key: str, primary: str, entry: Entry, ex: Exchange, call_next: Handler) -> None:
        if key in self.refreshing:
            return
        headers = ex.headers.copy()
        for name in _CONDITIONALS:
            headers.popall(name, None)
        now = time.monotonic()
        bg = ex.derive(method="GET", headers=headers, started=now,
                       deadline=now + self.route_timeout if self.route_timeout else None)
        credentialed = self.injects or "Authorization" in headers
        seen = headers.copy()

        async def run() -> None:
            try:
                revalidating = _add_validators(bg.headers, entry)
                t_req = time.time()
                resp = await call_next(bg)
                t_resp = time.time()
                if revalidating and resp.status == 304:
                    await self._freshen(primary, key, entry, resp, t_req, t_resp)
                    return
                if resp.status >= 500:
                    resp.close()
                    return
                decision = self._decide("GET", bg.path, _EMPTY, resp, credentialed, t_req, t_resp)
                if isinstance(decision, str):
                    resp.close()
                    await self.store.delete(key)  # no longer cacheable: stop serving the old one
                    return
                stored, vary = decision
                try:
                    stored.body = await resp.read(self.max_body)
                except ValueError:
                    await self.store.delete(key)
                    return
                store_key = variant_key(primary, vary, seen) if vary else primary
                await self._put(primary, store_key, stored, vary)
            except SidecarError as e:
                log.info("cache: background refresh on %s failed: %s", self.route, e.code)
            except Exception:
                log.exception("cache: background refresh on %s failed", self.route)
            finally:
                self.refreshing.pop(key, None)

        self.refreshing[key] = self._spawn(run())

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
        if flight is None:
            return
        if self.flights.get(key) is flight:
            del self.flights[key]
        if not flight.done():
            flight.set_result(None)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _count(self, result: str, tenant: str | None = None) -> None:
        self.counts[result] += 1
        self._inc[result]()
        self.tenants.add(tenant, result)

    async def stats(self) -> dict[str, Any]:
        c = self.counts
        return {**await self.store.stats(), "hits": c["hit"], "misses": c["miss"], "stale": c["stale"],
                "bypass": c["bypass"], "revalidated": c["revalidated"], "refreshing": len(self.refreshing)}

    async def purge(self) -> int:
        return await self.store.purge()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.store.close()

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"store": self.store.kind, "ttl": c.ttl, "max_body": c.max_body,
                "authorized": c.authorized, "injected_credentials": self.injects,
                "stale_if_error": c.stale_if_error, "stale_while_revalidate": c.stale_while_revalidate}


def _acceptable(req_cc: dict[str, str | None], entry: Entry, age: float) -> bool:
    """The request's own limits on a fresh entry (RFC 9111 5.2.1.1, 5.2.1.3)."""
    if not req_cc:
        return True
    if "max-age" in req_cc and age > delta(req_cc["max-age"]):
        return False
    if "min-fresh" in req_cc and entry.lifetime - age < delta(req_cc["min-fresh"]):
        return False
    return True


def _add_validators(headers: Any, entry: Entry) -> bool:
    """Make the upstream request conditional on the stored entry (RFC 9111 4.3.1),
    unless the client sent conditionals of its own."""
    if entry.etag is None and entry.last_modified is None:
        return False
    if any(name in headers for name in _CONDITIONALS):
        return False
    if entry.etag is not None:
        headers["If-None-Match"] = entry.etag
    if entry.last_modified is not None:
        headers["If-Modified-Since"] = entry.last_modified
    return True
