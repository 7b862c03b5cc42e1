"""Reading the provider's quota headers: which response says the quota is
exhausted, and until when (``[rate_limit.upstream]``, upstream.py).

Nothing here compiles a pattern or reads config per response: ``Signals`` is
built once per route from its validated table.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from proxy.http import retry_after

# Go's time.Duration text, as OpenAI sends it: "6m0s", "1s", "20ms", "1h2m3.5s".
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float | None:
    value = value.strip()
    total, pos = 0.0, 0
    for m in _GO_DURATION.finditer(value):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(value) or pos == 0:
        try:   # a bare number: seconds
            return float(value)
        except ValueError:
            return None
    return total


def _seconds(value: str, now: float) -> float | None:
    return float(value)


def _epoch(value: str, now: float) -> float | None:
    return float(value) - now


def _duration(value: str, now: float) -> float | None:
    return parse_duration(value)


def _rfc3339(value: str, now: float) -> float | None:
    when = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if when.tzinfo is None:
        return None
    return when.timestamp() - now


RESET_PARSERS: dict[str, Callable[[str, float], float | None]] = {
    "epoch": _epoch, "seconds": _seconds, "duration": _duration, "rfc3339": _rfc3339}


def provider_now(headers: Any, local: float) -> float:
    """The provider's clock, which its absolute resets (epoch, RFC 3339, an
    HTTP-date Retry-After) are on: its ``Date`` header (RFC 9110 6.6.1) when
    that is more than 2 s from ours (Date has whole seconds), else ours. A host
    clock minutes off would otherwise block a route for those minutes, or
    not at all."""
    date = headers.get("Date")
    if not date:
        return local
    try:
        when = parsedate_to_datetime(date)
    except (TypeError, ValueError, IndexError):
        return local
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    t = when.timestamp()
    age = headers.get("Age")
    if age and age.strip().isdigit():
        t += int(age)   # kept by a cache on the way: Date is when it was made (RFC 9111 4.2.3)
    return t if abs(t - local) > 2.0 else local


def parse_ratelimit_field(value: str) -> list[tuple[float, float]]:
    """(remaining, reset seconds) per quota in an IETF ``RateLimit`` field.

    draft-ietf-httpapi-ratelimit-headers-09/-10 (what the sidecar itself
    sends): a List of Items ``"name";r=<remaining>;t=<seconds>``; the older
    Dictionary form ``limit=10, remaining=0, reset=5`` (drafts 03-07) too.
    """
    out: list[tuple[float, float]] = []
    legacy: dict[str, str] = {}
    for item in _split_list(value):
        head, *params = item.split(";")
        p = {}
        for param in params:
            k, _, v = param.strip().partition("=")
            p[k.strip()] = v.strip()
        if "r" in p and "t" in p:
            try:
                out.append((float(p["r"]), float(p["t"])))
            except ValueError:
                continue
        else:
            k, _, v = head.strip().partition("=")
            legacy[k.strip().lower()] = v.strip()
    if "remaining" in legacy and "reset" in legacy:
        try:
            out.append((float(legacy["remaining"]), float(legacy["reset"])))
        except ValueError:
            pass
    return out


def _split_list(value: str) -> list[str]:
    """Split an RFC 8941 List on commas outside sf-strings."""
    items, cur, quoted, esc = [], [], False, False
    for c in value:
        if quoted:
            cur.append(c)
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
            cur.append(c)
        elif c == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    items.append("".join(cur))
    return [i for i in (s.strip() for s in items) if i]


# (remaining header, reset header, reset format) per preset.
PRESET_SIGNALS: dict[str, tuple[tuple[str, str, str], ...]] = {
    # platform.openai.com/docs/guides/rate-limits: "Rate limits in headers".
    "openai": (("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests", "duration"),
               ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "duration")),
    # docs.anthropic.com/en/api/rate-limits: "Response headers" (RFC 3339 resets).
    "anthropic": tuple((f"anthropic-ratelimit-{k}-remaining", f"anthropic-ratelimit-{k}-reset", "rfc3339")
                       for k in ("requests", "tokens", "input-tokens", "output-tokens")),
    # docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api: epoch seconds.
    "github": (("x-ratelimit-remaining", "x-ratelimit-reset", "epoch"),),
    # The separate fields of drafts 00-06, beside the RateLimit field itself.
    "ietf": (("ratelimit-remaining", "ratelimit-reset", "seconds"),),
    "retry_after": (),
}

# GitHub's secondary rate limits answer 403 with Retry-After (its REST docs).
RETRY_AFTER_STATUSES = {"github": frozenset({403, 429})}

# GitHub keeps a separate quota per resource and names the one a response
# counted against in x-ratelimit-resource (core, search, code_search, graphql,
# ...; docs.github.com "Rate limits for the REST API" and GET /rate_limit).
GITHUB_RESOURCE = "x-ratelimit-resource"
UNSCOPED = "*"   # a block that holds for every resource (secondary limits' Retry-After)


def github_resource(path: str) -> str:
    """The quota a request will count against, by GitHub's documented split:
    the code search endpoint has its own, the rest of /search/ shares one,
    GraphQL its own, everything else is ``core``. GitHub Enterprise Server
    serves the same under /api/v3 and GraphQL at /api/graphql."""
    if path.startswith("/api/v3/"):
        path = path[7:]
    elif path == "/api/graphql":
        return "graphql"
    if path.startswith("/search/"):
        return "code_search" if path == "/search/code" else "search"
    return "graphql" if path == "/graphql" else "core"


def _resource_name(value: str | None) -> str:
    """The response's resource as a block scope; anything but a plain name
    (absent, garbage) scopes the block to every resource, as before."""
    if value:
        value = value.strip().lower()
        if 0 < len(value) <= 40 and value.isascii() and value.replace("_", "").isalpha():
            return value
    return UNSCOPED


class Signals:
    """What one preset reads from a response: the longest block it implies."""

    def __init__(self, config: Any) -> None:   # an UpstreamQuota
        if config.preset == "custom":
            assert config.remaining and config.reset and config.reset_format
            triples: tuple[tuple[str, str, str], ...] = ((config.remaining, config.reset, config.reset_format),)
        else:
            triples = PRESET_SIGNALS[config.preset]
        self.signals = tuple((rem, reset, RESET_PARSERS[fmt]) for rem, reset, fmt in triples)
        self.ietf = config.preset == "ietf"
        self.reserve = config.reserve
        self.statuses = RETRY_AFTER_STATUSES.get(config.preset, frozenset({429}))
        self.max_block = config.max_block
        # Blocks scoped per resource (github): a spent search quota leaves core open.
        self.by_resource = config.preset == "github"
        self.describe = [{"remaining": r, "reset": s, "reset_format": f} for r, s, f in triples]
        if self.ietf:
            self.describe.insert(0, {"field": "RateLimit", "syntax": "draft-ietf-httpapi-ratelimit-headers-09"})

    def block(self, status: int, headers: Any, now: float) -> tuple[float, str]:
        """Seconds the quota is exhausted for (0: not exhausted), and why."""
        secs, why, _ = self.block_scoped(status, headers, now)
        return secs, why

    def block_scoped(self, status: int, headers: Any, now: float) -> tuple[float, str, str]:
        """``block`` and the scope it holds for: the resource the response
        names for a spent quota (``by_resource``), else ``UNSCOPED``; a
        Retry-After (GitHub's secondary limits) holds for every resource."""
        longest, why, scope = 0.0, "", UNSCOPED
        reserve = self.reserve
        for rem_name, reset_name, parse in self.signals:
            rem = headers.get(rem_name)
            if rem is None:
                continue
            try:
                if float(rem) > reserve:
                    continue
                reset = headers.get(reset_name)
                secs = parse(reset, provider_now(headers, now)) if reset else None
            except (ValueError, OverflowError):
                continue
            if secs is not None and secs > longest:
                longest, why = secs, f"{rem_name}: {rem.strip()[:32]}"
                if self.by_resource:
                    scope = _resource_name(headers.get(GITHUB_RESOURCE))
        if self.ietf:
            field = headers.get("RateLimit")
            if field:
                for rem_f, secs in parse_ratelimit_field(field):
                    if rem_f <= reserve and secs > longest:
                        longest, why = secs, f"RateLimit: r={rem_f:g}"
        if status in self.statuses:
            ra = headers.get("Retry-After")
            secs = retry_after(ra, provider_now(headers, now)) if ra else None
            if secs is not None and secs > longest:
                longest, why, scope = secs, f"{status} Retry-After: {ra.strip()[:32]}", UNSCOPED
        if longest <= 0 or longest != longest:   # NaN from a malformed value
            return 0.0, "", UNSCOPED
        return min(longest, self.max_block), why, scope
