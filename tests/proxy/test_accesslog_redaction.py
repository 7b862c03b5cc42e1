"""One JSON access-log line per request; redaction happens in one place."""

from __future__ import annotations

import pytest

from proxy.redact import REDACTED, Redactor


@pytest.mark.parametrize("name", ["Authorization", "proxy-authorization", "Cookie", "Set-Cookie",
                                  "X-Api-Key", "X-Custom-Secret"])
def test_sensitive_headers_are_redacted(name):
    r = Redactor(headers=["X-Custom-Secret"])
    out = r.headers_dict({name: "s3cret-value", "Accept": "json"})
    assert out[name] == REDACTED
    assert out["Accept"] == "json"


def test_only_limits_the_names_kept():
    r = Redactor()
    assert r.headers_dict({"A": "1", "B": "2", "Authorization": "x"}, only=["a", "authorization"]) == {
        "A": "1", "Authorization": REDACTED}


def test_headers_added_later_are_redacted():
    r = Redactor()
    r.add(headers=["X-Later"])
    assert r.headers_dict({"x-later": "v"})["x-later"] == REDACTED


async def test_access_log_line(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{upstream.url}"\ntenant_header = "X-Org"\n'},
                               outbound="", config="",
                               logging='log_headers = ["Authorization", "User-Agent", "Cookie"]')
    async with client.get(f"{sc.url}/p/items?token=hide-me", headers={
            "Authorization": "Bearer top-secret", "Cookie": "sid=abc", "User-Agent": "t/1",
            "X-Org": "acme", "X-Request-ID": "rid-1"}) as r:
        assert r.status == 200
    async with client.get(f"{sc.url}/none") as r:
        assert r.status == 404
    lines = await sc.wait_access_lines(2)
    assert len(lines) == 2
    ok, missing = lines
    assert ok["request_id"] == "rid-1" and ok["route"] == "p" and ok["tenant"] == "acme"
    assert ok["method"] == "GET" and ok["path"] == "/p/items" and ok["status"] == 200
    assert ok["duration_ms"] >= ok["upstream_ms"] > 0
    assert ok["headers"] == {"Authorization": REDACTED, "Cookie": REDACTED, "User-Agent": "t/1"}
    raw = (sc.dir / "access.log").read_text()
    assert "top-secret" not in raw and "hide-me" not in raw and "sid=abc" not in raw
    assert missing["status"] == 404 and missing["error"] == "no_route" and missing["route"] == ""
