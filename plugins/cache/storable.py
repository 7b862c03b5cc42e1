"""Storability: whether a response may be stored, for how long, and how a
304 refreshes a stored one (RFC 9111 3, 4.2, 4.3.4; RFC 5861).

Decisions only: nothing here touches a store or the network.
"""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

from proxy.chain import ProxyResponse

from .config import Config
from .rules import delta, explicit_lifetime, initial_age, parse_cache_control, strict_staleness, vary_names
from .store import Entry

# Never part of a stored response: recomputed per answer, or per request.
NOT_STORED = frozenset({"age", "x-cache", "x-request-id", "content-length", "set-cookie"})
# RFC 9111 4.3.4: a 304 does not replace these stored fields.
_NOT_FRESHENED = NOT_STORED | {"content-encoding", "content-type", "content-range", "etag"}
CONDITIONALS = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range")


class Storability:
    """One route's storage rules, from its ``[cache]`` table."""

    def __init__(self, config: Config) -> None:
        self.statuses = frozenset(config.statuses)
        self.vary_allowed = frozenset(config.vary_headers)
        self.authorized = config.authorized
        self.ttl = config.ttl
        self.max_ttl = config.max_ttl
        self.max_body = config.max_body
        self.default_swr = config.stale_while_revalidate
        self.default_sie = config.stale_if_error
        self.keep = config.keep

    def lifetimes(self, cc: dict[str, str | None], headers: Any, now: float) -> tuple[float, float, float]:
        """Freshness lifetime, stale-while-revalidate and stale-if-error windows."""
        lifetime = explicit_lifetime(cc, headers, now)
        if lifetime is None:
            lifetime = self.ttl  # heuristic freshness, RFC 9111 4.2.2, only as configured
        lifetime = min(lifetime, self.max_ttl)
        # must-revalidate/proxy-revalidate/s-maxage forbid serving stale on our
        # own initiative; a response's explicit RFC 5861 window still holds.
        strict = strict_staleness(cc)
        swr = float(delta(cc["stale-while-revalidate"])) if "stale-while-revalidate" in cc else (
            0.0 if strict else self.default_swr)
        sie = float(delta(cc["stale-if-error"])) if "stale-if-error" in cc else (
            0.0 if strict else self.default_sie)
        return lifetime, min(swr, self.max_ttl), min(sie, self.max_ttl)

    def decide(self, method: str, path: str, resp: ProxyResponse, credentialed: bool,
               t_req: float, t_resp: float) -> tuple[Entry, list[str]] | str:
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
        lifetime, swr, sie = self.lifetimes(cc, rh, t_resp)
        etag, lm = rh.get("ETag"), rh.get("Last-Modified")
        keep = self.keep if (etag or lm) else 0.0
        if lifetime <= 0 and max(swr, sie, keep) <= 0:
            return "no freshness (set ttl for responses without Cache-Control/Expires)"
        age0 = initial_age(rh, t_req, t_resp)
        entry = Entry(resp.status, [(k, v) for k, v in rh.items() if k.lower() not in NOT_STORED],
                      b"", t_resp, age0, lifetime, swr, sie, keep, etag, lm, path)
        if entry.expires_at() <= t_resp:
            return "stale on arrival"
        return entry, vary or []

    def freshened(self, entry: Entry, fresh: Any, t_req: float, t_resp: float) -> Entry | None:
        """RFC 9111 4.3.4: the stored entry with a 304's headers and age, or
        None when the 304 makes it unstorable."""
        headers = CIMultiDict(entry.headers)
        for name in {k.lower() for k in fresh.keys()} - _NOT_FRESHENED:
            headers.popall(name, None)
            for v in fresh.getall(name):
                headers.add(name, v)
        cc = parse_cache_control(",".join(headers.getall("Cache-Control", [])))
        if "no-store" in cc or "private" in cc or "no-cache" in cc:
            return None
        lifetime, swr, sie = self.lifetimes(cc, headers, t_resp)
        return Entry(entry.status, list(headers.items()), entry.body, t_resp,
                     initial_age(fresh, t_req, t_resp), lifetime, swr, sie, entry.keep,
                     headers.get("ETag"), headers.get("Last-Modified"), entry.path)


def is_strict(entry: Entry) -> bool:
    """The stored response forbids being served stale (see rules.strict_staleness)."""
    cc = parse_cache_control(",".join(v for k, v in entry.headers if k.lower() == "cache-control"))
    return strict_staleness(cc)


def add_validators(headers: Any, entry: Entry) -> bool:
    """Make the upstream request conditional on the stored entry (RFC 9111 4.3.1),
    unless the client sent conditionals of its own."""
    if entry.etag is None and entry.last_modified is None:
        return False
    if any(name in headers for name in CONDITIONALS):
        return False
    if entry.etag is not None:
        headers["If-None-Match"] = entry.etag
    if entry.last_modified is not None:
        headers["If-Modified-Since"] = entry.last_modified
    return True
