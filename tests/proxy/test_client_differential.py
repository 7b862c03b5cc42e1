"""Differential test: the same varied requests through the fast client and the
aiohttp client must reach the upstream identically and come back identically."""

from __future__ import annotations


import orjson
import pytest

from tests.proxy.test_fastclient import start
from tests.support.upstream import FakeUpstream, varied


async def chunks():
    for i in range(4):
        yield b"chunk-%d-" % i * 100


CASES = [
    ("GET", "/up/a?x=1&y=%20z&e=", {"X-Dup": ["1", "2"], "X-Utf8": ["h\u00e9llo \u2603"], "X-Empty": [""],
                                   "Accept-Encoding": ["gzip"], "User-Agent": ["probe/1"],
                                   "Cookie": ["c=1"]}, None),
    ("HEAD", "/up/h", {}, None),
    ("POST", "/up/json", {"Content-Type": ["application/json"]}, b'{"a": 1}'),
    ("POST", "/up/stream", {"Content-Type": ["application/octet-stream"]}, "chunks"),
    ("PUT", "/up/empty", {"Content-Length": ["0"]}, b""),
    ("DELETE", "/up/thing/1", {}, None),
    ("OPTIONS", "/up/opt", {"Access-Control-Request-Method": ["POST"]}, None),
    ("PATCH", "/up/p", {}, b"x" * 70000),
    ("PURGE", "/up/custom-method", {}, None),
    ("GET", "/up/hopreq", {"Connection": ["keep-alive, X-Custom-Hop"], "X-Custom-Hop": ["gone"],
                           "TE": ["trailers"], "Keep-Alive": ["timeout=5"],
                           "Proxy-Authorization": ["Basic eA=="]}, None),
    ("GET", "/up/long", {"X-Long": ["v" * 8000], "x-lower-case": ["kept"]}, None),
    ("GET", "/up/chunked", {}, None),
    ("GET", "/up/204", {}, None),
    ("GET", "/up/304", {"If-None-Match": ['"v1"']}, None),
    ("POST", "/up/cookies", {}, b"form=1"),
    ("GET", "/up/gzip", {"Accept-Encoding": ["gzip"]}, None),
    ("GET", "/up/hop", {}, None),
    ("GET", "/up/status?s=404", {}, None),
    ("POST", "/up/status?s=500", {}, b"boom"),
    ("GET", "/up/status?s=302", {}, None),
    ("GET", "/up/pct/%2Fenc%20oded/~tilde", {}, None),
]


async def run_cases(sidecar_url: str) -> list[tuple]:
    from multidict import CIMultiDict

    from tests.support.sidecar import session

    out = []
    async with session() as s:
        for i, (method, path, hdrs, body) in enumerate(CASES):
            headers = CIMultiDict([("Host", "svc.local"), ("X-Request-ID", f"case-{i}")])
            for k, vs in hdrs.items():
                for v in vs:
                    headers.add(k, v)
            data = chunks() if body == "chunks" else body
            async with s.request(method, sidecar_url + path, headers=headers, data=data,
                                 allow_redirects=False, skip_auto_headers={"User-Agent", "Content-Type"}) as r:
                got = await r.read()
                rh = sorted((k.lower(), v) for k, v in r.raw_headers_decoded()) if hasattr(r, "raw_headers_decoded") \
                    else sorted((k.decode().lower(), v.decode("utf-8", "surrogateescape")) for k, v in r.raw_headers)
                rh = [(k, v) for k, v in rh if k != "date"]
                if r.headers.get("Content-Type") == "application/json" and got:
                    got = orjson.loads(got)
                out.append((method, path, r.status, r.reason, rh, got))
    # Bodiless requests with no framing at all (aiohttp's own client always
    # adds Content-Length: 0 to these, so they go over a raw socket).
    import asyncio
    from urllib.parse import urlparse

    u = urlparse(sidecar_url)
    for method in ("DELETE", "POST", "GET"):
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        writer.write(f"{method} /up/raw-{method} HTTP/1.1\r\nHost: svc.local\r\nX-Request-ID: raw\r\n"
                     "Connection: close\r\n\r\n".encode())
        raw = await reader.read()
        writer.close()
        lines = [ln for ln in raw.split(b"\r\n") if not ln.lower().startswith(b"date:")]
        out.append((method, "raw", b"\r\n".join(lines)))
    return out


def upstream_view(seen) -> list[tuple]:
    view = []
    for s in seen:
        hdrs = sorted((k.decode().lower(), v.decode("utf-8", "surrogateescape")) for k, v in s.raw_headers)
        view.append((s.method, s.path_qs, hdrs, s.body))
    return view


def seen_of(view, path):
    (hit,) = [v for v in view if v[1] == path]
    return hit[2]


@pytest.mark.parametrize("reps", [1])
async def test_fast_and_aiohttp_clients_agree(tmp_path, reps):
    up = await FakeUpstream(varied).start()
    try:
        results = {}
        for client in ("aiohttp", "fast"):
            sc = await start(tmp_path / client, {"p": f'route = "/up"\nupstream = "{up.url}"\n'},
                             f'client = "{client}"')
            try:
                assert sc.runtime.settings.outbound.client == client
                up.seen.clear()
                got = await run_cases(sc.url)
                results[client] = (got, upstream_view(up.seen))
            finally:
                await sc.sidecar.stop()
        (a_got, a_seen), (f_got, f_seen) = results["aiohttp"], results["fast"]
        assert len(a_seen) == len(f_seen) == len(CASES) + 3
        for a, f in zip(a_seen, f_seen):
            assert a == f, f"upstream saw different requests for {a[0]} {a[1]}"
        for a, f in zip(a_got, f_got):
            assert a == f, f"client got different responses for {a[0]} {a[1]}"
        assert ("content-length", "0") in seen_of(f_seen, "/raw-DELETE")
        assert not any(k == "content-length" for k, _ in seen_of(f_seen, "/raw-GET"))
        # The comparison means something only if the cases did what they say.
        by_path = {g[1]: g for g in f_got}
        assert by_path["/up/chunked"][5] == b"".join(b"part-%d;" % i for i in range(5))
        assert ("set-cookie", "b=2; HttpOnly") in by_path["/up/cookies"][4]
        assert by_path["/up/cookies"][3] == "Custom Reason"
        assert not any(k in ("x-secret-hop", "keep-alive", "proxy-authenticate") for k, _ in by_path["/up/hop"][4])
        seen = {s[1]: s for s in f_seen}
        hop = dict(seen["/hopreq"][2])
        assert "x-custom-hop" not in hop and "te" not in hop and "proxy-authorization" not in hop
        assert ("x-dup", "1") in seen["/a?x=1&y=%20z&e="][2] and ("x-dup", "2") in seen["/a?x=1&y=%20z&e="][2]
        assert dict(seen["/a?x=1&y=%20z&e="][2])["x-utf8"] == "h\u00e9llo \u2603"
        assert dict(seen["/stream"][2])["transfer-encoding"] == "chunked"
        assert seen["/stream"][3] == b"".join([b"chunk-%d-" % i * 100 for i in range(4)])
        assert len(seen["/p"][3]) == 70000
    finally:
        await up.stop()
