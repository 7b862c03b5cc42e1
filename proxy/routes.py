"""The route table: longest path-prefix match on segment boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .chain import Filter, Handler
    from .config import Policy
    from .upstream import Upstream


@dataclass(eq=False)
class Route:
    """A compiled route: everything the data plane needs, precomputed."""

    name: str
    prefix: str
    policy: "Policy"
    upstream: "Upstream | None"   # None: the terminal handler answers (a webhook endpoint)
    filters: "list[Filter]"
    handler: "Handler"
    tenant_header: str
    max_body: int
    max_header_size: int
    max_headers: int
    total_timeout: float
    labels: dict[str, Any] = field(default_factory=dict)
    # True: ``prefix`` is an exact path (a webhook endpoint), matched before
    # any prefix route of its table.
    exact: bool = False
    # The express path of the fast server (proxy/fastserver/express.py):
    # set when every filter is sync and the upstream is the fast client.
    express: Any = None


class RouteTable:
    """Maps a request path to its route. ``/httpbin`` matches ``/httpbin`` and
    ``/httpbin/...``, never ``/httpbinx``; the longest prefix wins. Exact
    routes (webhook paths) win over every prefix."""

    __slots__ = ("_by_prefix", "_exact", "_root", "routes")

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self._exact = {r.prefix: r for r in routes if r.exact}
        self._by_prefix = {r.prefix: r for r in routes if r.prefix != "/" and not r.exact}
        self._root = next((r for r in routes if r.prefix == "/" and not r.exact), None)

    def match(self, path: str) -> tuple[Route, str] | None:
        """The route and the path left after its prefix (always starting with '/')."""
        if self._exact:
            route = self._exact.get(path)
            if route is not None:
                return route, "/"
        by_prefix = self._by_prefix
        candidate = path
        while candidate:
            route = by_prefix.get(candidate)
            if route is not None:
                rest = path[len(candidate):]
                return route, rest or "/"
            cut = candidate.rfind("/")
            if cut <= 0:
                break
            candidate = candidate[:cut]
        if self._root is not None:
            return self._root, path
        return None


@hookimpl
def sidecar_policies_check(runtime: Any, policies: "list[Policy]") -> list[str]:
    """Two policy files may not claim the same outbound route prefix."""
    seen: dict[str, "Policy"] = {}
    problems = []
    for p in policies:
        prefix = p.core.route
        if prefix is None:
            continue
        first = seen.setdefault(prefix, p)
        if first is not p:
            problems.append(f"{p.file}: route: {prefix!r} is already the route of {first.file}")
    return problems
