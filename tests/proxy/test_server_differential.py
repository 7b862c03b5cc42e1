"""Differential test: the same requests, well-formed and malformed, sent as raw
bytes to a sidecar on the fast server and one on the aiohttp server, must get
the same status, headers, body and connection fate, and the upstream must see
the same requests (issue 10)."""

from __future__ import annotations

import asyncio
import re

import orjson

from tests.support.upstream import FakeUpstream, varied


def req(line: str, *headers: str, body: bytes = b"") -> bytes:
    head = line + "\r\n" + "".join(h + "\r\n" for h in ("Host: svc.local", *headers)) + "\r\n"
    return head.encode("utf-8", "surrogateescape") + body


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


# (name, bytes sent, responses expected before the fate check)
CASES: list[tuple[str, bytes, int]] = [
    ("get_varied", req("GET /up/a?x=1&y=%20z&e= HTTP/1.1", "X-Request-ID: r1", "X-Dup: 1", "X-Dup: 2",
                       "X-Utf8: h\u00e9llo", "X-Empty:", "X-Trail: v  ", "Accept-Encoding: gzip",
                       "Cookie: c=1"), 1),
    ("head", req("HEAD /up/h HTTP/1.1", "X-Request-ID: r2"), 1),
    ("post_cl", req("POST /up/json HTTP/1.1", "X-Request-ID: r3", "Content-Type: application/json",
                    "Content-Length: 8", body=b'{"a": 1}'), 1),
    ("post_chunked", req("POST /up/stream HTTP/1.1", "X-Request-ID: r4", "Transfer-Encoding: chunked",
                         body=chunked(b"a" * 300, b"b" * 70000, b"c")), 1),
    ("chunked_trailers", req("POST /up/trailers HTTP/1.1", "X-Request-ID: r4b", "Transfer-Encoding: chunked",
                             body=b"3\r\nabc\r\n0\r\nX-Trailer: late\r\nAuthorization: Bearer sneaked\r\n\r\n"), 1),
    ("duplicate_host", req("GET /up/x HTTP/1.1", "X-Request-ID: r4c", "Host: other.example"), 1),
    ("duplicate_content_type", req("POST /up/x HTTP/1.1", "X-Request-ID: r4d", "Content-Type: a/b",
                                   "Content-Type: c/d", "Content-Length: 2", body=b"hi"), 1),
    ("duplicate_user_agent", req("GET /up/x HTTP/1.1", "X-Request-ID: r4e", "User-Agent: a", "User-Agent: b"), 1),
    ("no_host", b"GET /up/x HTTP/1.1\r\nX-Request-ID: r4f\r\n\r\n", 1),
    ("no_host_http10", b"GET /up/x HTTP/1.0\r\nX-Request-ID: r4g\r\n\r\n", 1),
    ("expect_continue", req("POST /up/e HTTP/1.1", "X-Request-ID: r4h", "Expect: 100-continue",
                            "Content-Length: 5", body=b"hello"), 2),
    ("url_too_long", req("GET /up/" + "a" * 70000 + " HTTP/1.1"), 1),
    ("te_gzip_chunked", req("POST /up/x HTTP/1.1", "X-Request-ID: r4i", "Transfer-Encoding: gzip, chunked",
                            body=chunked(b"abc")), 1),
    ("te_upper_case", req("POST /up/x HTTP/1.1", "X-Request-ID: r4j", "transfer-encoding: CHUNKED",
                          body=chunked(b"abc")), 1),
    ("options_asterisk", req("OPTIONS * HTTP/1.1", "X-Request-ID: r4k"), 1),
    ("put_empty", req("PUT /up/empty HTTP/1.1", "X-Request-ID: r5", "Content-Length: 0"), 1),
    ("delete_bare", req("DELETE /up/thing/1 HTTP/1.1", "X-Request-ID: r6"), 1),
    ("post_bare", req("POST /up/bare HTTP/1.1", "X-Request-ID: r6b"), 1),
    ("patch_big", req("PATCH /up/p HTTP/1.1", "X-Request-ID: r7", "Content-Length: 70000",
                      body=b"x" * 70000), 1),
    ("custom_method", req("PURGE /up/custom HTTP/1.1", "X-Request-ID: r8"), 1),
    ("hop_request", req("GET /up/hopreq HTTP/1.1", "X-Request-ID: r9", "Connection: keep-alive, X-Custom-Hop",
                        "X-Custom-Hop: gone", "TE: trailers", "Keep-Alive: timeout=5",
                        "Proxy-Authorization: Basic eA==", "Proxy-Connection: keep-alive"), 1),
    ("forwarded_replaced", req("GET /up/xff HTTP/1.1", "X-Request-ID: r10", "X-Forwarded-For: 6.6.6.6",
                               "X-Forwarded-Host: evil", "X-Forwarded-Proto: https"), 1),
    ("chunked_response", req("GET /up/chunked HTTP/1.1", "X-Request-ID: r11"), 1),
    ("no_content", req("GET /up/204 HTTP/1.1", "X-Request-ID: r12"), 1),
    ("not_modified", req("GET /up/304 HTTP/1.1", "X-Request-ID: r13", 'If-None-Match: "v1"'), 1),
    ("cookies_reason", req("POST /up/cookies HTTP/1.1", "X-Request-ID: r14", "Content-Length: 6",
                           body=b"form=1"), 1),
    ("gzip", req("GET /up/gzip HTTP/1.1", "X-Request-ID: r15", "Accept-Encoding: gzip"), 1),
    ("hop_response", req("GET /up/hop HTTP/1.1", "X-Request-ID: r16"), 1),
    ("status_404", req("GET /up/status?s=404 HTTP/1.1", "X-Request-ID: r17"), 1),
    ("status_500", req("POST /up/status?s=500 HTTP/1.1", "X-Request-ID: r18", "Content-Length: 4",
                       body=b"boom"), 1),
    ("redirect", req("GET /up/status?s=302 HTTP/1.1", "X-Request-ID: r19"), 1),
    ("pct_path", req("GET /up/pct/%2Fenc%20oded/~tilde HTTP/1.1", "X-Request-ID: r20"), 1),
    ("http10", req("GET /up/ten HTTP/1.0", "X-Request-ID: r21"), 1),
    ("http10_keepalive", req("GET /up/ten HTTP/1.0", "X-Request-ID: r22", "Connection: keep-alive"), 1),
    ("http10_stream", req("GET /up/chunked HTTP/1.0", "X-Request-ID: r23", "Connection: keep-alive"), 1),
    ("connection_close", req("GET /up/cc HTTP/1.1", "X-Request-ID: r24", "Connection: close"), 1),
    ("pipelined", req("GET /up/one HTTP/1.1", "X-Request-ID: r25")
        + req("POST /up/two HTTP/1.1", "X-Request-ID: r26", "Content-Length: 3", body=b"abc")
        + req("GET /up/three HTTP/1.1", "X-Request-ID: r27"), 3),
    ("pipelined_after_error", req("GET /nowhere HTTP/1.1", "X-Request-ID: r28")
        + req("GET /up/after HTTP/1.1", "X-Request-ID: r29"), 2),
    ("no_route", req("GET /nowhere HTTP/1.1", "X-Request-ID: r30"), 1),
    ("head_no_route", req("HEAD /nowhere HTTP/1.1", "X-Request-ID: r31"), 1),
    ("expect_other", req("GET /up/x HTTP/1.1", "X-Request-ID: r32", "Expect: magic"), 1),
    ("dot_segment", req("GET /up/../admin HTTP/1.1", "X-Request-ID: r33"), 1),
    ("encoded_dot", req("GET /up/%2e%2e%2fadmin HTTP/1.1", "X-Request-ID: r34"), 1),
    ("fragment", req("GET /up/..#x HTTP/1.1", "X-Request-ID: r35"), 1),
    ("fragment_plain", req("GET /up/a#x HTTP/1.1", "X-Request-ID: r35b"), 1),
    ("absolute_form", req("GET http://evil.example/up/a HTTP/1.1", "X-Request-ID: r36"), 1),
    ("websocket", req("GET /up/ws HTTP/1.1", "X-Request-ID: r37", "Connection: Upgrade", "Upgrade: websocket",
                      "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="), 1),
    ("h2c_upgrade", req("GET /up/h2 HTTP/1.1", "X-Request-ID: r37b", "Connection: Upgrade, HTTP2-Settings",
                        "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA"), 1),
    ("too_many_headers", req("GET /up/x HTTP/1.1", "X-Request-ID: r38", *[f"X-H{i}: v" for i in range(25)]), 1),
    ("headers_too_big", req("GET /up/x HTTP/1.1", "X-Request-ID: r39", "X-Big: " + "a" * 5000), 1),
    ("header_line_huge", req("GET /up/x HTTP/1.1", "X-Huge: " + "a" * 70000), 1),
    ("body_too_large", req("POST /up/x HTTP/1.1", "X-Request-ID: r40", "Content-Length: 200000",
                           body=b"q" * 10), 1),
    ("chunked_too_large", req("POST /up/x HTTP/1.1", "X-Request-ID: r41", "Transfer-Encoding: chunked",
                              body=chunked(*[b"q" * 30000] * 4)), 1),
    # Smuggling and malformed requests: 400 JSON, the upstream sees nothing.
    ("cl_and_te", req("POST /up/x HTTP/1.1", "Content-Length: 4", "Transfer-Encoding: chunked",
                      body=b"0\r\n\r\n"), 1),
    ("duplicate_cl", req("POST /up/x HTTP/1.1", "Content-Length: 4", "Content-Length: 5", body=b"abcde"), 1),
    ("non_numeric_cl", req("POST /up/x HTTP/1.1", "Content-Length: 4x", body=b"abcd"), 1),
    ("negative_cl", req("POST /up/x HTTP/1.1", "Content-Length: -1"), 1),
    ("obs_fold", req("GET /up/x HTTP/1.1", "X-A: a", "  folded"), 1),
    ("nul_in_value", req("GET /up/x HTTP/1.1", "X-A: a\x00b"), 1),
    ("cr_in_value", req("GET /up/x HTTP/1.1", "X-A: a\rb"), 1),
    ("te_not_chunked_last", req("POST /up/x HTTP/1.1", "Transfer-Encoding: chunked, identity",
                                body=b"0\r\n\r\n"), 1),
    ("space_before_colon", req("GET /up/x HTTP/1.1", "Content-Length : 0"), 1),
    ("http09", b"GET /up/x\r\n\r\n", 1),
    ("garbage_line", b"HELLO THERE\r\n\r\n", 1),
    ("bad_version", b"GET /up/x HTTP/7.3\r\nHost: a\r\n\r\n", 1),
    # A route with a filter that reads ex.headers (and one that edits them):
    # the fast server sends from the mapping it builds then, not from the raw bytes.
    ("edited_get", req("GET /uh/a?x=1 HTTP/1.1", "X-Request-ID: r43", "X-Dup: 1", "X-Dup: 2", "X-Drop: d",
                       "Connection: X-Custom-Hop", "X-Custom-Hop: gone", "X-Utf8: h\u00e9llo"), 1),
    ("edited_post_chunked", req("POST /uh/stream HTTP/1.1", "X-Request-ID: r44", "Transfer-Encoding: chunked",
                                body=chunked(b"a" * 300, b"b" * 7000)), 1),
    ("edited_post_cl", req("POST /uh/json HTTP/1.1", "X-Request-ID: r45", "Content-Length: 8", body=b'{"a": 1}'), 1),
    ("edited_delete_bare", req("DELETE /uh/x HTTP/1.1", "X-Request-ID: r46"), 1),
    # auth + headers edit through Exchange's header API: on the fast server
    # the head stays bytes (proxy/rawexchange.py).
    ("auth_edited", req("GET /ua/a HTTP/1.1", "X-Request-ID: r47", "X-Drop: 1", "x-dup: 1", "X-Old: o",
                        "X-DROP: 2", "X-Dup: 2", "X-Old: p"), 1),
    ("auth_edited_own_credential", req("POST /ua/b HTTP/1.1", "X-Request-ID: r48", "authorization: Bearer own",
                                       "Content-Length: 2", body=b"hi"), 1),
    # Filters that add response headers (rate_limit) or read only the status
    # (circuit_breaker): the fast server writes these answers from the
    # upstream's header bytes (proxy/rawexchange.py RawResponse).
    ("response_edits", req("GET /ur/a HTTP/1.1", "X-Request-ID: r60"), 1),
    ("response_edits_clash", req("GET /ur/clash HTTP/1.1", "X-Request-ID: r61"), 1),
    ("response_edits_cookies", req("GET /ur/cookies HTTP/1.1", "X-Request-ID: r63"), 1),
    ("response_edits_status", req("GET /ur/status?s=503 HTTP/1.1", "X-Request-ID: r62"), 1),
    ("pipelined_then_malformed", req("GET /up/ok HTTP/1.1", "X-Request-ID: r42")
        + b"GET /up/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 2),
]

# Where aiohttp's server is wrong and the fast one is not (asserted below):
KNOWN_DIFFERENCES = {
    # HTTP/1.0 + keep-alive, streamed answer of unknown length: aiohttp drops
    # keep-alive (the body ends with the connection) but never closes it, so
    # the client waits forever. The fast server closes after the body.
    "http10_stream",
    # A valid request followed by a malformed one in the same packet: aiohttp's
    # parser fails the whole read and the valid request is never answered; the
    # fast server answers it, then sends the 400 and closes (as nginx does).
    "pipelined_then_malformed",
    # WebSocket passthrough exists on the fast server only (the aiohttp one
    # answers 501); this upstream is no WebSocket server, so it answers 200.
    "websocket",
}

FOLLOW_UP = req("GET /up/follow HTTP/1.1", "X-Request-ID: follow")
_RID = re.compile(rb"[0-9a-f]{32}")


async def read_response(reader: asyncio.StreamReader, method: str) -> tuple:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head[:-4].split(b"\r\n")
    version, status, *reason = lines[0].split(b" ", 2)
    code = int(status)
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.append((k.strip().lower().decode(), v.strip().decode("utf-8", "surrogateescape")))
    h = dict(headers)
    if 100 <= code < 200:
        return (code, reason, None, b"interim")
    if method == "HEAD" or code in (204, 304):
        body = b""
    elif "content-length" in h:
        body = await asyncio.wait_for(reader.readexactly(int(h["content-length"])), 5)
    elif h.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).strip(), 16)
            data = await asyncio.wait_for(reader.readexactly(size + 2), 5)
            if size == 0:
                break
            parts.append(data[:-2])
        body = b"".join(parts)
    else:
        try:
            # Only aiohttp's HTTP/1.0 stream case waits this out (KNOWN_DIFFERENCES).
            body = await asyncio.wait_for(reader.read(), 1.5)
        except (TimeoutError, asyncio.TimeoutError):
            body = b"<no end of body within 1.5 s>"
    # Not compared: the Server header aiohttp puts on its own parse-error
    # answers, and Connection (the connection's fate is compared instead).
    keep = sorted((k, _RID.sub(b"<rid>", v.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape"))
                  for k, v in headers if k not in ("date", "server", "connection"))
    return (code, reason, keep, _RID.sub(b"<rid>", body))


async def run_case(port: int, data: bytes, responses: int) -> tuple:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = []
    try:
        writer.write(data)
        await writer.drain()
        for i in range(responses):
            # Only single-request cases use HEAD (its answer has no body).
            method = "HEAD" if i == 0 and data.startswith(b"HEAD ") else "GET"
            got.append(await read_response(reader, method))
        # Connection fate: a follow-up request is answered, or the connection is closed.
        try:
            writer.write(FOLLOW_UP)
            await writer.drain()
            nxt = await asyncio.wait_for(reader.read(12), 5)
        except (ConnectionError, OSError):
            nxt = b""
        fate = "open" if nxt.startswith(b"HTTP/1.1 200") else ("closed" if nxt == b"" else nxt)
    finally:
        writer.close()
    return tuple(got), fate


def upstream_view(seen) -> list[tuple]:
    return [(s.method, s.path_qs, sorted((k.decode().lower(), v.decode("utf-8", "surrogateescape"))
                                         for k, v in s.raw_headers), s.body) for s in seen]


POLICY = """route = "/up"
upstream = "{url}"
[limits]
max_headers = 20
max_header_size = "4KB"
max_request_body = "100KB"
"""


EDITING = """route = "/uh"
upstream = "{url}"
[headers.request]
set = {{ "X-Set" = "s" }}
remove = ["X-Drop"]
[peek]
read = true
report = false
"""


AUTH_EDITING = """route = "/ua"
upstream = "{url}"
[headers.request]
set = {{ "X-Set" = "s", "X-Dup" = "d" }}
remove = ["X-Drop"]
rename = {{ "X-Old" = "X-New" }}
[auth]
type = "bearer"
secret = "env:DIFF_TOKEN"
override = false
"""


RESPONSE_EDITS = """route = "/ur"
upstream = "{url}"
[rate_limit]
key = "client_ip"
limits = [{{ requests = 100000000, per = "1s" }}]
[circuit_breaker]
"""


async def test_fast_and_aiohttp_servers_agree(sidecar_factory, monkeypatch):
    monkeypatch.setenv("DIFF_TOKEN", "t0k")
    up = await FakeUpstream(varied).start()
    try:
        results: dict[str, dict[str, tuple]] = {}
        for server in ("aiohttp", "fast"):
            sc = await sidecar_factory({"up": POLICY.format(url=up.url), "uh": EDITING.format(url=up.url),
                                        "ua": AUTH_EDITING.format(url=up.url),
                                        "ur": RESPONSE_EDITS.format(url=up.url)},
                                       outbound=f'server = "{server}"', sidecar='plugins = ["tests.support.peek"]')
            assert sc.runtime.settings.outbound.server == server
            assert bool(sc.sidecar._fast) == (server == "fast")
            port = sc.sidecar.ports["outbound"]
            out = {}
            for name, data, n in CASES:
                up.seen.clear()
                try:
                    resp, fate = await run_case(port, data, n)
                except Exception as e:  # recorded, so both servers' differences show at once
                    resp, fate = (), f"failed: {type(e).__name__}"
                seen = upstream_view([s for s in up.seen if s.path_qs != "/follow"])
                out[name] = (resp, fate, seen)
            results[server] = out
            await sc.sidecar.stop()
        diffs = []
        for name, _data, _n in CASES:
            if name in KNOWN_DIFFERENCES:
                continue
            a, f = results["aiohttp"][name], results["fast"][name]
            if a != f:
                diffs.append(f"{name}:\n  aiohttp: {a}\n  fast:    {f}")
        assert not diffs, "\n".join(diffs)
        fast = results["fast"]
        # The rules themselves, not only agreement.
        for name in ("duplicate_host", "duplicate_content_type", "duplicate_user_agent", "no_host",
                     "cl_and_te", "duplicate_cl", "non_numeric_cl", "negative_cl", "obs_fold", "nul_in_value",
                     "cr_in_value", "te_not_chunked_last", "space_before_colon", "http09", "garbage_line",
                     "fragment", "fragment_plain", "dot_segment", "encoded_dot", "absolute_form"):
            (resp,), fate, seen = fast[name]
            assert resp[0] == 400, name
            assert ("x-sidecar-error", "bad_request") in resp[2], name
            assert seen == [], name
        for name in ("cl_and_te", "http09", "garbage_line", "obs_fold"):
            assert fast[name][1] == "closed", name
        (resp,), fate, seen = fast["websocket"]
        assert resp[0] == 200 and fate == "closed"
        assert ("upgrade", "websocket") in seen[0][2] and ("connection", "Upgrade") in seen[0][2]
        assert results["aiohttp"]["websocket"][0][0][0] == 501
        assert fast["h2c_upgrade"][0][0][0] == 501
        assert fast["too_many_headers"][0][0][0] == 431
        assert fast["headers_too_big"][0][0][0] == 431
        assert fast["header_line_huge"][0][0][0] == 431
        assert fast["body_too_large"][0][0][0] == 413
        assert fast["chunked_too_large"][0][0][0] == 413
        assert [r[0] for r in fast["pipelined"][0]] == [200, 200, 200]
        assert [orjson.loads(r[3])["path"] for r in fast["pipelined"][0]] == ["/one", "/two", "/three"]
        assert [s[3] for s in fast["pipelined"][2]] == [b"", b"abc", b""]
        assert fast["pipelined"][1] == "open"
        assert fast["connection_close"][1] == "closed"
        assert fast["http10"][1] == "closed" and fast["http10_keepalive"][1] == "open"
        assert fast["post_chunked"][2][0][3] == b"a" * 300 + b"b" * 70000 + b"c"
        (resp,), fate, _ = fast["http10_stream"]
        assert resp[3] == b"part-0;part-1;part-2;part-3;part-4;" and fate == "closed"
        (ok, bad), fate, seen = fast["pipelined_then_malformed"]
        assert ok[0] == 200 and bad[0] == 400 and fate == "closed" and len(seen) == 1
        interim, final = fast["expect_continue"][0]
        assert interim[0] == 100 and final[0] == 200 and fast["expect_continue"][2][0][3] == b"hello"
        assert ("expect", "100-continue") not in fast["expect_continue"][2][0][2]
        assert fast["url_too_long"][0][0][0] == 431
        # Trailer fields never become request headers.
        trailed = fast["chunked_trailers"][2][0]
        assert trailed[3] == b"abc" and not any(k in ("x-trailer", "authorization") for k, _ in trailed[2])
        edited = fast["edited_get"][2][0][2]
        assert ("x-set", "s") in edited and not any(k in ("x-drop", "x-custom-hop") for k, _ in edited)
        assert fast["edited_post_chunked"][2][0][3] == b"a" * 300 + b"b" * 7000
        authed = fast["auth_edited"][2][0][2]
        assert ("authorization", "Bearer t0k") in authed and ("x-set", "s") in authed
        assert [v for k, v in authed if k in ("x-dup", "x-new", "x-drop", "x-old")] == ["d", "o", "p"]
        assert ("authorization", "Bearer own") in fast["auth_edited_own_credential"][2][0][2]
        # Parser-level rejections carry a request id in the body and the header.
        (resp,), _, _ = fast["header_line_huge"]
        assert ("x-request-id", "<rid>") in resp[2] and b'"request_id":"<rid>"' in resp[3]
    finally:
        await up.stop()
