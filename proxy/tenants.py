"""Per-tenant counters bounded to the busiest tenants.

A tenant id comes from a request header: counting every value a client
sends would grow without bound. ``TopCounts`` keeps at most ``cap`` tenants
plus a quarter of slack; when the slack fills, the least busy are dropped in
one pass (amortised O(1) per new tenant), so the busiest ``cap`` by traffic
stay (a newcomer has its slack window to prove itself).
"""

from __future__ import annotations

from typing import Any


class TopCounts:
    __slots__ = ("fields", "cap", "counts", "_index")

    def __init__(self, fields: tuple[str, ...], cap: int = 1000) -> None:
        self.fields = fields
        self.cap = cap
        self.counts: dict[str, list[int]] = {}
        self._index = {f: i for i, f in enumerate(fields)}

    def add(self, tenant: str | None, field: str) -> None:
        if tenant is None:
            return
        c = self.counts.get(tenant)
        if c is None:
            if len(self.counts) >= self.cap + self.cap // 4:
                self._prune()
            c = self.counts[tenant] = [0] * len(self.fields)
        c[self._index[field]] += 1

    def _prune(self) -> None:
        busiest = sorted(self.counts.items(), key=lambda kv: sum(kv[1]), reverse=True)[:self.cap]
        self.counts = dict(busiest)

    def get(self, tenant: str) -> dict[str, int] | None:
        c = self.counts.get(tenant)
        return None if c is None else dict(zip(self.fields, c))

    def top(self, n: int = 1000) -> list[tuple[str, dict[str, Any]]]:
        ranked = sorted(self.counts.items(), key=lambda kv: sum(kv[1]), reverse=True)[:min(n, self.cap)]
        return [(t, dict(zip(self.fields, c))) for t, c in ranked]
