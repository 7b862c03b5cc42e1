"""headers plugin: config validation, filter unit tests, end to end."""

from __future__ import annotations

import pytest
from aiohttp import web
from multidict import CIMultiDict
from pydantic import ValidationError

from plugins.headers import Config, HeadersFilter, build
from proxy.chain import Exchange, ProxyResponse
from proxy.fastserver.head import FastHead
from tests.support.upstream import FakeUpstream


@pytest.mark.parametrize("table,reason", [
    ({"request": {"set": {"Connection": "x"}}}, "hop-by-hop"),
    ({"request": {"rename": {"X-A": "Transfer-Encoding"}}}, "hop-by-hop"),
    ({"response": {"set": {"Bad Name": "x"}}}, "not a valid header name"),
    ({"request": {"add": {"X": "y"}}}, "Extra inputs"),
    ({"request": {"remove": "X-Debug"}}, "valid list"),
    # RFC 9110 5.5: no control characters in a field value (CRLF would split
    # the message; aiohttp refuses the others when writing: a 500 per request).
    ({"response": {"set": {"X-A": "a\r\nX-B: b"}}}, "control character"),
    ({"request": {"set": {"X-A": "a\nb"}}}, "control character"),
    ({"response": {"set": {"X-A": "a\x01b"}}}, "control character"),
])
def test_config_rejects(table, reason):
    with pytest.raises(ValidationError) as e:
        Config(**table)
    assert reason in str(e.value)


def test_empty_config_stays_out_of_the_chain():
    assert build(Config(), None) is None


def exchange(kind: str, headers: list[tuple[str, str]]) -> Exchange:
    """The aiohttp server's Exchange (a CIMultiDict) or the fast server's
    RawExchange (the same headers as bytes)."""
    if kind == "mapping":
        return Exchange(None, "GET", "/", "", CIMultiDict(headers),  # type: ignore[arg-type]
                        request_id="r", started=0.0, max_body=1024)
    raw = [(b"Host", b"h")] + [(k.encode(), v.encode()) for k, v in headers]
    return FastHead("GET", "/", raw, None, "1.1", True, 0.0).build(None, "/", "", [], False, request_id="r",
                                                                   started=0.0, max_body=1024)


@pytest.mark.parametrize("kind", ["mapping", "raw"])
async def test_filter_rename_remove_set_in_that_order(kind):
    f = HeadersFilter(Config(request={"rename": {"X-Old": "X-New"}, "remove": ["X-Debug"], "set": {"X-New": "set"}},
                             response={"remove": ["Server"], "set": {"X-Served-By": "sidecar"}}))
    ex = exchange(kind, [("X-Old", "1"), ("X-Debug", "yes"), ("X-Keep", "k"), ("x-debug", "again")])
    stayed_raw = []

    async def upstream(ex):
        stayed_raw.append(kind == "raw" and ex.raw_head() is not None)
        assert [(k, v) for k, v in ex.headers.items() if k != "Host"] == [("X-Keep", "k"), ("X-New", "set")]
        return ProxyResponse(200, CIMultiDict({"Server": "nginx", "X-Other": "o"}))

    resp = await f.handle(ex, upstream)
    assert dict(resp.headers) == {"X-Other": "o", "X-Served-By": "sidecar"}
    # On the fast server's exchange the edits were made on the bytes.
    assert stayed_raw == [kind == "raw"]


async def test_end_to_end(sidecar_factory, client):
    async def answer(request, seen):
        return web.Response(text="ok", headers={"Server": "upstream/1.0", "X-Up": "1"})
    up = await FakeUpstream(answer).start()
    try:
        sc = await sidecar_factory({"p": f'''
route = "/p"
upstream = "{up.url}"
[headers]
request = {{ set = {{ "X-Env" = "prod" }}, remove = ["X-Debug"], rename = {{ "X-Old" = "X-New" }} }}
response = {{ set = {{ "X-Served-By" = "sidecar" }}, remove = ["Server"] }}
'''})
        async with client.get(f"{sc.url}/p/x", headers={"X-Debug": "1", "X-Old": "v"}) as r:
            assert r.status == 200
            assert r.headers["X-Served-By"] == "sidecar"
            assert "Server" not in r.headers  # removed, and the sidecar adds none of its own
            assert r.headers["X-Up"] == "1"
        seen = up.seen[-1].headers
        assert seen["X-Env"] == "prod"
        assert seen["X-New"] == "v"
        assert "X-Debug" not in seen and "X-Old" not in seen
    finally:
        await up.stop()
