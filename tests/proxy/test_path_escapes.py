"""Paths that climb out of an upstream's base path are refused (issue 11, item 2).

With ``upstream = "http://host/v1"`` a request for ``/p/<x>`` goes to
``/v1/<x>``; any segment that the upstream, or something behind it, may read
as "." or ".." after decoding would reach a path outside ``/v1``. Table-driven
(Traefik style): every form goes through a running sidecar on a raw socket;
refused ones must never reach the upstream, ordinary ones must arrive as sent.
"""

from __future__ import annotations

import pytest

from proxy.http import has_dot_segment
from tests.proxy.test_http_rules import raw_request

ESCAPES = [
    # (name, path after the route prefix)
    ("plain dot-dot", "/../admin"),
    ("plain dot", "/./admin"),
    ("trailing dot-dot", "/a/.."),
    ("percent-encoded", "/%2e%2e/admin"),
    ("percent-encoded upper", "/%2E%2E/admin"),
    ("half encoded", "/.%2e/admin"),
    ("encoded slash", "/..%2fadmin"),
    ("encoded backslash", "/..%5cadmin"),
    ("raw backslash", "/..\\admin"),
    ("double-encoded", "/%252e%252e/admin"),
    ("double-encoded slash", "/..%252fadmin"),
    ("nibble double-encoded (CVE-2021-42013)", "/%%32%65%%32%65/admin"),
    ("mixed double-encoded", "/.%252e/admin"),
    ("%u form", "/%u002e%u002e/admin"),
    ("%u form upper", "/%U002E%u002E/admin"),
    ("%u slash", "/..%u002fadmin"),
    ("overlong 2-byte", "/%c0%ae%c0%ae/admin"),
    ("overlong 3-byte", "/%e0%80%ae%e0%80%ae/admin"),
    ("overlong 4-byte", "/%f0%80%80%ae./admin"),
    ("overlong slash", "/a%c0%af..%c0%afadmin"),
    ("double-encoded overlong", "/%25c0%25ae%25c0%25ae/admin"),
    ("fullwidth dots (NFKC)", "/%ef%bc%8e%ef%bc%8e/admin"),
    ("one-dot leaders (NFKC)", "/%e2%80%a4%e2%80%a4/admin"),
    ("two-dot leader (NFKC)", "/%e2%80%a5/admin"),
    ("path parameter", "/..;x/admin"),
    ("empty path parameter", "/..;/admin"),
    ("encoded path parameter", "/%2e%2e%3bjsessionid=1/admin"),
    ("single dot with parameter", "/.;x/admin"),
    ("trailing NUL", "/..%00/admin"),
    ("trailing double-encoded NUL", "/..%2500/admin"),
    ("trailing space", "/..%20/admin"),
    ("trailing tab", "/..%09/admin"),
    ("space then parameter", "/..%20;x/admin"),
    ("at the end, encoded", "/a/%2e%2e"),
    ("at the end, NUL", "/a/..%00"),
]

ORDINARY = [
    ("plain", "/chat/completions"),
    ("file name", "/files/report.v2.pdf"),
    ("three dots", "/a/.../b"),
    ("dotfile", "/a/.well-known/x"),
    ("dots inside", "/a/..b/c..d"),
    ("encoded dots inside", "/a/%2e%2eb"),
    ("encoded space", "/files/a%20b"),
    ("path parameter", "/a;v=1/b"),
    ("utf-8", "/caf%c3%a9/x"),
    ("bad percent", "/a%zz/b"),
    ("encoded percent", "/a%2525/b"),
]


def policy(url: str) -> str:
    return f'route = "/p"\nupstream = "{url}/v1"\n'


@pytest.mark.parametrize("name,path", [pytest.param(n, p, id=n) for n, p in ESCAPES])
async def test_escape_is_refused_before_the_upstream(sidecar_factory, upstream, name, path):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    status, head, body = await raw_request(sc.url, f"GET /p{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 400, (name, head)
    assert b'"bad_request"' in body
    assert b"X-Sidecar-Error: bad_request" in head
    assert upstream.seen == []


@pytest.mark.parametrize("name,path", [pytest.param(n, p, id=n) for n, p in ORDINARY])
async def test_ordinary_path_is_forwarded_as_sent(sidecar_factory, upstream, name, path):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    status, head, body = await raw_request(sc.url, f"GET /p{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 200, (name, head, body)
    assert [s.path_qs for s in upstream.seen] == [f"/v1{path}"]


def test_table_matches_the_function():
    # The same table against the function the listeners call, so a form that
    # the HTTP parser happened to refuse first is still covered here.
    assert [n for n, p in ESCAPES if not has_dot_segment("/p" + p)] == []
    assert [n for n, p in ORDINARY if has_dot_segment("/p" + p)] == []


INBOUND_FORMS = ["/../admin", "/%2e%2e/admin", "/%252e%252e/admin", "/%c0%ae%c0%ae/admin", "/..;x/admin",
                 "/..%00/admin"]


@pytest.mark.parametrize("path", INBOUND_FORMS)
async def test_inbound_routes_refuse_escapes_too(sidecar_factory, upstream, path):
    # The inbound listener faces the internet: same function, same refusals.
    from tests.support.inbound import inbound_config, inbound_url

    sc = await sidecar_factory({}, inbound_config(f"{upstream.url}/v1", extra='[inbound.routes."/api"]\n'))
    base = inbound_url(sc)
    status, head, body = await raw_request(base, f"GET /api{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 400 and b'"bad_request"' in body, head
    status, _, _ = await raw_request(base, b"GET /api/ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and [s.path_qs for s in upstream.seen] == ["/v1/api/ok"]
