"""Exchange's header-editing API (has/set/remove/rename_header) on both
Exchange classes: on RawExchange (the fast server's, headers still bytes) the
edits must leave exactly what the same edits leave on the CIMultiDict, in the
same order, and the forwarded lines must be that mapping's lines."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from multidict import CIMultiDict

from proxy.chain import Exchange, ProxyResponse
from proxy.fastserver.head import FastHead
from proxy.http import HeaderLineBreak, message_head
from proxy.rawexchange import RawExchange, RawResponse
from tests.plugins.test_retry import script

# What a client sent (mixed case, a repeated header, hop-by-hop ones the head
# drops, Host and Content-Length that RawExchange keeps apart).
CLIENT = [(b"Host", b"svc.local"), (b"x-dup", b"1"), (b"Cookie", b"c=1"), (b"X-Dup", b"2"),
          (b"Authorization", b"Bearer client"), (b"Connection", b"X-Hop"), (b"X-Hop", b"gone"),
          (b"Content-Length", b"3"), (b"X-Utf8", "h\u00e9llo".encode()), (b"x-DUP", b"3"),
          (b"X-Raw", b"\xff\xfe")]
# What admission adds (proxy/admission.py).
EXTRA = [("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "http"), ("X-Request-ID", "rid")]


def raw_exchange(client=CLIENT) -> RawExchange:
    head = FastHead("POST", "/p/x", list(client), "10.0.0.1", "1.1", True, time.monotonic())
    return head.build(None, "/x", "", list(EXTRA), False, request_id="rid", started=0.0, max_body=1 << 20)


def mapped_exchange(client=CLIENT) -> Exchange:
    """The same request as the aiohttp server's Exchange (a CIMultiDict)."""
    ex = raw_exchange(client)
    h = CIMultiDict(ex.headers)
    return Exchange(None, "POST", "/x", "", h, request_id="rid", started=0.0, max_body=1 << 20)  # type: ignore[arg-type]


def lines_of(headers: CIMultiDict[str]) -> bytes:
    # What the fast client writes from a mapping, Host and Content-Length aside (it writes its own).
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items()
                   if k.lower() not in ("host", "content-length")).encode("utf-8", "surrogateescape")


def apply(ex: Exchange, ops: list[tuple]) -> list[bool]:
    seen = []
    for op, *args in ops:
        if op == "has":
            seen.append(ex.has_header(*args))
        else:
            getattr(ex, op + "_header")(*args)
    return seen


# (name, ops, stays bytes)
CASES = [
    ("set_new", [("has", "X-New"), ("set", "X-New", "v")], True),
    ("set_twice_sent_header", [("set", "X-DUP", "only")], True),
    ("set_first_in_extras", [("set", "x-request-id", "mine")], True),
    ("set_then_set_again", [("set", "X-New", "a"), ("set", "x-new", "b"), ("has", "X-NEW")], True),
    ("override_client_authorization", [("has", "authorization"), ("set", "Authorization", "Bearer s")], True),
    ("remove_twice_sent_header", [("remove", "X-Dup"), ("has", "x-dup")], True),
    ("remove_absent", [("remove", "X-Debug"), ("has", "X-Debug")], True),
    ("remove_extra", [("remove", "X-Forwarded-Proto")], True),
    ("remove_hop_by_hop_already_gone", [("has", "X-Hop"), ("remove", "Connection")], True),
    ("rename_twice_sent_header", [("rename", "X-Dup", "X-Was-Dup")], True),
    ("rename_same_name", [("rename", "x-dup", "X-Dup")], True),
    ("rename_absent", [("rename", "X-Old", "X-New")], True),
    ("rename_onto_existing", [("rename", "Cookie", "X-Dup")], True),
    ("rename_then_set_then_remove", [("rename", "X-Utf8", "X-U"), ("set", "x-u", "w"), ("remove", "Cookie"),
                                     ("set", "X-Late", "l")], True),
    ("raw_bytes_value_kept", [("remove", "Cookie"), ("set", "X-New", "v")], True),
    ("non_ascii_value", [("set", "X-Name", "J\u00fcrgen"), ("set", "X-Dup", "\u00e9")], True),
    ("has_host_and_length", [("has", "HOST"), ("has", "content-length"), ("has", "Transfer-Encoding")], True),
    # Kept apart or unsafe on bytes: edited on the mapping instead, same result.
    ("set_host", [("set", "Host", "other")], False),
    ("remove_content_length", [("remove", "Content-Length")], False),
    ("rename_to_host", [("rename", "X-Dup", "Host")], False),
    ("line_break_value", [("set", "X-Api-Key", "a\r\nX-Injected: 1")], False),
    ("lone_lf_value", [("set", "X-Dup", "a\nb")], False),
    ("non_token_name", [("set", "X Bad", "v")], False),
    ("surrogates_that_are_not_an_escape", [("set", "X-S", "\udcc3\udca9")], False),
]


@pytest.mark.parametrize("ops,stays", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_edits_on_bytes_equal_edits_on_the_mapping(ops, stays):
    raw, mapped, looked = raw_exchange(), mapped_exchange(), raw_exchange()
    looked.headers  # noqa: B018 -- built first: the RawExchange's own mapping path
    answers = apply(raw, ops)
    assert answers == apply(mapped, ops) == apply(looked, ops)
    assert (raw.raw_head() is not None) is stays
    if stays:
        assert raw.raw_head() == lines_of(mapped.headers)
    assert list(raw.headers.items()) == list(mapped.headers.items()) == list(looked.headers.items())


def test_random_edit_sequences_agree():
    # Deterministic (seeded): many mixed sequences over names present once,
    # twice, in the extras, kept apart, absent, in varied case.
    names = ["X-Dup", "x-dup", "Cookie", "authorization", "X-Forwarded-For", "x-request-id", "X-New", "x-new",
             "Host", "Content-Length", "X-Raw"]
    values = ["v", "", "Bearer t", "\u00e9t\u00e9", "a\r\nb"]
    rng = random.Random(10)
    for _ in range(400):
        ops: list[tuple] = []
        for _ in range(rng.randint(1, 6)):
            op = rng.choice(["has", "set", "remove", "rename"])
            if op == "has" or op == "remove":
                ops.append((op, rng.choice(names)))
            elif op == "set":
                ops.append((op, rng.choice(names), rng.choice(values)))
            else:
                ops.append((op, rng.choice(names), rng.choice(names)))
        raw, mapped = raw_exchange(), mapped_exchange()
        assert apply(raw, ops) == apply(mapped, ops), ops
        if raw.raw_head() is not None:
            assert raw.raw_head() == lines_of(mapped.headers), ops
        assert list(raw.headers.items()) == list(mapped.headers.items()), ops


@pytest.mark.parametrize("look_between", [False, True])
def test_save_and_restore_headers(look_between):
    # retry's use: save, let the inner filters edit (maybe build the
    # mapping), restore, edit again; both classes end the same.
    raw, mapped = raw_exchange(), mapped_exchange()
    for ex in (raw, mapped):
        ex.set_header("X-Outer", "o")
        saved = ex.save_headers()
        ex.set_header("Authorization", "Bearer 1")
        ex.remove_header("X-Dup")
        if look_between:
            ex.headers.add("X-Looked", "1")
        ex.restore_headers(saved)
        ex.set_header("Authorization", "Bearer 2")
        ex.restore_headers(saved)  # the snapshot is still good for another try
        ex.set_header("Authorization", "Bearer 3")
    assert raw.raw_head() == lines_of(mapped.headers)
    assert list(raw.headers.items()) == list(mapped.headers.items())
    assert ("Authorization", "Bearer 3") in mapped.headers.items() and "X-Looked" not in mapped.headers
    assert mapped.headers.getall("X-Dup") == ["1", "2", "3"]


def test_common_edits_stay_bytes_and_append():
    ex = raw_exchange([(b"Host", b"a"), (b"Accept", b"*/*")])
    before = ex.raw_head()
    assert not ex.has_header("Authorization")
    ex.set_header("Authorization", "Bearer t")
    ex.remove_header("X-Debug")
    ex.rename_header("X-Old", "X-New")
    ex.set_header("X-Sidecar", "bench")
    assert ex.raw_head() == before + b"Authorization: Bearer t\r\nX-Sidecar: bench\r\n"
    assert ex.has_header("authorization") and ex.has_header("X-SIDECAR")
    assert list(ex.headers.items())[-2:] == [("Authorization", "Bearer t"), ("X-Sidecar", "bench")]
    assert ex.raw_head() is None


def test_a_line_break_never_reaches_the_lines():
    # CWE-113: the value goes to the mapping, which the fast client refuses
    # to serialise (proxy.http.message_head); the bytes never hold it.
    ex = raw_exchange()
    ex.set_header("X-Api-Key", "a\r\nX-Injected: 1")
    assert ex.raw_head() is None
    assert ex.headers["X-Api-Key"] == "a\r\nX-Injected: 1"
    with pytest.raises(HeaderLineBreak):
        message_head("GET / HTTP/1.1", ex.headers)


# ---- end to end: auth + headers on the fast server, through real sockets -------

EDITS = '''
[headers.request]
set = {{ "X-Set" = "s", "X-Dup" = "replaced" }}
remove = ["X-Drop"]
rename = {{ "X-Old" = "X-New" }}
[auth]
type = "{type}"
{auth}
override = {override}
[peek]
read = {read}
'''
AUTH = {
    "bearer": 'secret = "env:EDIT_TOKEN"',
    "header": 'header = "X-Api-Key"\nprefix = "Key "\nsecret = "env:EDIT_TOKEN"',
    "basic": 'username = "user"\npassword = "env:EDIT_TOKEN"',
    "query": 'param = "key"\nsecret = "env:EDIT_TOKEN"',
}
SENT = [("X-Dup", "1"), ("x-drop", "a"), ("X-Old", "o1"), ("X-Keep", "k"), ("X-Drop", "b"), ("x-dup", "2"),
        ("X-Old", "o2"), ("X-Utf8", "h\u00e9llo")]


async def send(port: int, path: str, headers: list[tuple[str, str]]) -> tuple[int, dict[str, str]]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {path} HTTP/1.1\r\nHost: svc.local\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + \
        "Connection: close\r\n\r\n"
    w.write(head.encode("utf-8", "surrogateescape"))
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    lines = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    return int(lines[0].split()[1]), {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}


@pytest.mark.parametrize("kind", list(AUTH))
@pytest.mark.parametrize("override", ["true", "false"])
async def test_auth_and_headers_send_the_same_head_from_bytes(sidecar_factory, upstream, monkeypatch, kind, override):
    """Each static auth type with the headers plugin: the fast server keeps the
    head as bytes, and the upstream receives the same lines, in the same order,
    as when a filter made the mapping (fast server) and as on the aiohttp server."""
    monkeypatch.setenv("EDIT_TOKEN", "t0k")
    got: dict[str, list] = {}
    for server in ("fast", "aiohttp"):
        policies = {name: f'route = "/{name}"\nupstream = "{upstream.url}"\n'
                    + EDITS.format(type=kind, auth=AUTH[kind], override=override, read=read)
                    for name, read in (("r", "false"), ("m", "true"))}
        sc = await sidecar_factory(policies, outbound=f'server = "{server}"',
                                   sidecar='plugins = ["tests.support.peek"]')
        port = sc.sidecar.ports["outbound"]
        for name in ("r", "m"):
            for client_auth in ([], [("authorization", "Bearer own"), ("X-API-KEY", "own")]):
                upstream.seen.clear()
                status, headers = await send(port, f"/{name}/x?a=1&key=own", SENT + client_auth)
                assert status == 200
                seen = upstream.seen[0]
                got.setdefault(f"{name}{len(client_auth)}", []).append(
                    (server, headers["x-peek-raw"], seen.path_qs,
                     [(k.decode(), v.decode()) for k, v in seen.raw_headers if k.lower() != b"x-request-id"]))
        await sc.stop()
    for key, runs in got.items():
        (fast, fast_raw, fast_path, fast_lines), (_, slow_raw, slow_path, slow_lines) = runs
        assert fast_raw == ("1" if key.startswith("r") else "0") and slow_raw == "0"
        # (aiohttp's parser spells well-known names its own way: compared in lowercase)
        assert (fast_path, [(k.lower(), v) for k, v in fast_lines]) == \
            (slow_path, [(k.lower(), v) for k, v in slow_lines]), key
    for key in ("r0", "r2"):
        assert got[key][0][2:] == got["m" + key[1:]][0][2:]
    lines = got["r0"][0][3]
    names = [k.lower() for k, _ in lines]
    assert "x-drop" not in names and "x-old" not in names
    assert [v for k, v in lines if k == "X-New"] == ["o1", "o2"] and ("X-Set", "s") in lines
    assert [v for k, v in lines if k.lower() == "x-dup"] == ["replaced"]
    # Where the client sent its own credential, override = false keeps it.
    theirs = got["r2"][0][3]
    if kind in ("bearer", "basic", "header"):
        name = "authorization" if kind != "header" else "x-api-key"
        injected = [v for k, v in theirs if k.lower() == name]
        assert injected == (["Bearer own"] if name == "authorization" else ["own"]) if override == "false" \
            else len(injected) == 1 and "own" not in injected[0]


async def test_a_secret_with_a_line_break_is_never_sent(sidecar_factory, upstream, tmp_path):
    # CWE-113 on the fast server's byte path: the value goes to the mapping,
    # which the fast client refuses (502), and nothing reaches the upstream.
    secret = tmp_path / "evil"
    secret.write_text("a\r\nX-Injected: 1")
    for kind in ("bearer", "header"):
        auth = f'secret = "file:{secret.as_posix()}"' + ('\nheader = "X-Api-Key"' if kind == "header" else "")
        sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{upstream.url}"\n'
                                         f'[headers.request]\nset = {{ "X-Set" = "s" }}\n'
                                         f'[auth]\ntype = "{kind}"\n{auth}\n'})
        status, _ = await send(sc.sidecar.ports["outbound"], "/p/x", [])
        assert status == 502
        await sc.stop()
    assert upstream.seen == []


async def test_production_chain_keeps_the_head_bytes_across_retries(sidecar_factory, upstream, monkeypatch):
    """headers, auth, retry (a 503 then a 200) and unsampled tracing, as in
    bench/chain.toml: every try leaves from bytes and carries the same head."""
    monkeypatch.setenv("EDIT_TOKEN", "t0k")
    upstream.responder = script(503, 200)
    sc = await sidecar_factory({"p": f'''route = "/p"
upstream = "{upstream.url}"
[headers.request]
set = {{ "X-Sidecar" = "bench" }}
[auth]
type = "bearer"
secret = "env:EDIT_TOKEN"
[retry]
backoff = {{ base = "1ms", max = "5ms" }}
[tracing]
[peek]
'''}, '[tracing]\nexporter = "memory"\nsample_ratio = 0\n', sidecar='plugins = ["tests.support.peek"]')
    status, headers = await send(sc.sidecar.ports["outbound"], "/p/x", [("Authorization", "Bearer own")])
    assert status == 200
    assert headers["x-peek-raw"] == "1" and headers["x-sidecar-attempts"] == "2"
    first, second = upstream.seen
    assert first.raw_headers == second.raw_headers
    h = first.headers
    assert h.getall("Authorization") == ["Bearer t0k"] and h["X-Sidecar"] == "bench"
    version, _, _, flags = h["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1 == 0  # not sampled


def test_response_header_edits_on_bytes_are_the_mappings_in_random_sequences() -> None:
    """The express path sets the filters' ``response_headers`` over the
    upstream's fields in one pass (proxy/rawexchange.py ``set_fields``, which
    RawResponse.set_header uses too):
    the same fields, in the same order, as consecutive ``CIMultiDict``
    assignments, whatever the mix of names the upstream sent, names set
    twice, and spellings."""
    from proxy.rawexchange import set_fields

    rng = random.Random(7)
    names = ["RateLimit", "ratelimit", "X-RateLimit-Limit", "Server", "server", "X-New", "Date", "x-new"]
    for _ in range(400):
        pairs = [(rng.choice(names).encode(), f"u{i}".encode()) for i in range(rng.randint(0, 6))]
        pairs += [(b"Content-Type", b"application/json")]
        rng.shuffle(pairs)
        edits = [(rng.choice(names), f"e{i}") for i in range(rng.randint(0, 6))]
        expected = CIMultiDict([(k.decode(), v.decode()) for k, v in pairs])
        for k, v in edits:
            expected[k] = v
        got = set_fields(list(pairs), edits)
        assert got is not None
        assert [(k.decode(), v.decode()) for k, v in got] == list(expected.items()), (pairs, edits)
    assert set_fields([(b"A", b"1")], [("X-Bad", "a\r\nb")]) is None      # the mapping path's checks
    assert set_fields([(b"A", b"1")], [("X-\u00e9", "v")]) is None


def _slot_values(obj, cls) -> dict:
    """Every ``__slots__`` member of ``cls`` and its bases on ``obj``, read
    through the slot itself (AttributeError when one was never set)."""
    out = {}
    for klass in cls.__mro__:
        for name in klass.__dict__.get("__slots__", ()):
            out[name] = klass.__dict__[name].__get__(obj)
    return out


def test_the_fast_constructors_set_every_field_the_base_classes_do():
    """RawExchange.new and RawResponse.new (the only way either is made) set
    each field of Exchange(...) / ProxyResponse(...) to what the base class
    sets, and each of their own: a field added to a base class and not to
    ``new`` fails here."""
    ex = RawExchange.new("route", "POST", "/x", "a=1", b"X-A: 1\r\n", [(b"X-A", b"1")],
                         [("X-Request-ID", "rid")], b"svc.local", b"3", "rid", 1.5, 7, "/p/x?a=1", 3, "t",
                         "10.0.0.1", 9.5)
    base = Exchange("route", "POST", "/x", "a=1", None, request_id="rid", started=1.5,  # type: ignore[arg-type]
                    max_body=7, target="/p/x?a=1", body_length=3, tenant="t", client_ip="10.0.0.1",
                    deadline=9.5)
    got, want = _slot_values(ex, RawExchange), _slot_values(base, Exchange)
    assert len(want) > 15
    assert {k: got[k] for k in want} == want
    assert {k: v for k, v in got.items() if k not in want} == {
        "_lines": b"X-A: 1\r\n", "_pairs": [(b"X-A", b"1")], "_extra": [("X-Request-ID", "rid")],
        "_host": b"svc.local", "raw_length": b"3", "_names": None}
    assert ex.raw_head() == b"X-A: 1\r\n"
    assert list(ex.headers.items()) == [("Host", "svc.local"), ("X-A", "1"), ("Content-Length", "3"),
                                        ("X-Request-ID", "rid")]

    release = [].append
    resp = RawResponse.new(201, [(b"X-B", b"2")], b"body", "Created", release)
    base_resp = ProxyResponse(201, None, b"body", reason="Created", release=release, upstream=True)
    got, want = _slot_values(resp, RawResponse), _slot_values(base_resp, ProxyResponse)
    assert {k: got[k] for k in want} == {**want, "headers": None}
    assert got["_pairs"] == [(b"X-B", b"2")]
    assert list(resp.headers.items()) == [("X-B", "2")]
