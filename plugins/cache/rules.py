"""RFC 9111 rules as pure functions: Cache-Control, freshness, age, keys.

Nothing here touches a store or the network, so each rule is unit-tested
directly (tests/plugins/test_cache.py).
"""

from __future__ import annotations

import hashlib
import re
from email.utils import parsedate_to_datetime
from typing import Any

# RFC 9111 5.2: a directive is a token with an optional token or quoted-string argument.
_DIRECTIVE = re.compile(r'([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*))?')

# Statuses on which stale-if-error applies (RFC 5861 4).
ERROR_STATUSES = frozenset({500, 502, 503, 504})


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """Directives by lower-case name; the argument (unquoted) or None.

    A repeated directive keeps its smallest numeric argument (RFC 9111 4.2.1:
    with conflicting values, the most restrictive one is the safe reading).
    """
    out: dict[str, str | None] = {}
    if not value:
        return out
    for m in _DIRECTIVE.finditer(value):
        name = m.group(1).lower()
        arg = m.group(2)
        if arg is not None and arg.startswith('"'):
            arg = arg[1:-1]
        if name in out and arg is not None and out[name] is not None:
            a, b = delta(arg), delta(out[name])
            arg = str(min(a, b))
        out[name] = arg
    return out


def delta(arg: str | None) -> int:
    """A delta-seconds argument; anything invalid reads as 0 (stale), RFC 9111 1.2.2."""
    if arg is None:
        return 0
    arg = arg.strip()
    return int(arg) if arg.isdigit() else 0


def http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def explicit_lifetime(cc: dict[str, str | None], headers: Any, now: float) -> float | None:
    """RFC 9111 4.2.1 for a shared cache: s-maxage, then max-age, then Expires - Date.

    None when the response gives no explicit freshness.
    """
    if "s-maxage" in cc:
        return float(delta(cc["s-maxage"]))
    if "max-age" in cc:
        return float(delta(cc["max-age"]))
    expires = headers.get("Expires")
    if expires is not None:
        exp = http_date(expires)
        if exp is None:
            return 0.0  # an invalid Expires (often "0") means already expired
        date = http_date(headers.get("Date"))
        return max(0.0, exp - (date if date is not None else now))
    return None


def initial_age(headers: Any, request_time: float, response_time: float) -> float:
    """RFC 9111 4.2.3 corrected_initial_age at the time the response arrived."""
    date = http_date(headers.get("Date"))
    apparent = max(0.0, response_time - date) if date is not None else 0.0
    age_value = float(delta(headers.get("Age"))) if headers.get("Age") is not None else 0.0
    corrected = age_value + max(0.0, response_time - request_time)
    return max(apparent, corrected)


def vary_names(value: str | None) -> list[str] | None:
    """Lower-case names listed by Vary (all Vary fields joined); ["*"] for Vary: *."""
    if not value:
        return []
    names = sorted({v.strip().lower() for v in value.split(",") if v.strip()})
    return ["*"] if "*" in names else names


def _norm(values: list[str]) -> str:
    # Field values compare after joining repeated fields and dropping optional
    # whitespace (RFC 9111 4.1).
    return ",".join(p.strip() for v in values for p in v.split(","))


def _digest(parts: list[str]) -> str:
    return hashlib.blake2b("\x00".join(parts).encode("utf-8", "surrogateescape"),
                           digest_size=16).hexdigest()


def primary_key(path: str, query: str, headers: Any, key_headers: list[str], scope: str) -> str:
    """The URL, configured key headers and credential scope. HEAD and GET share keys."""
    parts = [path, query, scope]
    for name in key_headers:
        parts.append(f"{name}:{_norm(headers.getall(name, []))}")
    return _digest(parts)


def variant_key(primary: str, names: list[str], headers: Any) -> str:
    """The key of one variant of ``primary`` selected by the request's Vary headers:
    ``<primary>.<digest>``, so a store can keep a URL's variants with its Vary
    marker (one Redis Cluster slot)."""
    parts = [primary]
    for name in names:
        values = headers.getall(name, None)
        parts.append(f"{name}:" if values is None else f"{name}={_norm(values)}")
    return primary + "." + _digest(parts)


def credential_scope(tenant: str | None, authorization: str | None) -> str:
    """Who a private entry belongs to: the tenant and a hash of the credential
    (never the credential itself, which would end up in Redis keys)."""
    cred = hashlib.blake2b(authorization.encode("utf-8", "surrogateescape"),
                           digest_size=12).hexdigest() if authorization else "-"
    return f"tenant={tenant or '-'};cred={cred}"


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2), used for If-None-Match."""
    if if_none_match.strip() == "*":
        return True
    want = etag.strip().removeprefix("W/")
    return any(t.strip().removeprefix("W/") == want for t in if_none_match.split(","))


def request_use(req_cc: dict[str, str | None], lifetime: float, age: float, swr: float,
                strict: bool) -> str | None:
    """How a stored answer of this ``age`` may answer a request, by the request's
    own directives (RFC 9111 5.2.1) and the stored ones (RFC 9111 4.2, RFC 5861 3):
    ``"fresh"``, ``"stale-while-revalidate"``, ``"max-stale"``, or None: forward
    it (revalidating when the entry has a validator).

    ``strict``: the stored response said must-revalidate, proxy-revalidate or
    s-maxage, which a request's max-stale cannot override (RFC 9111 5.2.2.2).
    """
    left = lifetime - age
    if req_cc:
        if "max-age" in req_cc and age > delta(req_cc["max-age"]):
            return None
        if "min-fresh" in req_cc and left < delta(req_cc["min-fresh"]):
            return None
    if left > 0:
        return "fresh"
    stale_for = -left
    max_stale = False
    if "max-stale" in req_cc and not strict:
        limit = req_cc["max-stale"]
        max_stale = limit is None or stale_for <= delta(limit)
    # 5.2.1.1: with max-age (or min-fresh), unless max-stale is also present,
    # the client does not want a stale answer, whatever the stored windows say.
    wants_fresh = "max-age" in req_cc or "min-fresh" in req_cc
    if stale_for < swr and (max_stale or not wants_fresh):
        return "stale-while-revalidate"
    return "max-stale" if max_stale else None


def strict_staleness(cc: dict[str, str | None]) -> bool:
    """Directives that forbid serving the response stale on the cache's own
    initiative (RFC 9111 5.2.2.2, 5.2.2.8, 5.2.2.10)."""
    return "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc
