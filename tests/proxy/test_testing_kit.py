"""proxy.testing, used the way its docstring shows (the fixtures are used by every other test)."""

from __future__ import annotations

import socket

from proxy.testing import FakeUpstream, start_sidecar


async def test_context_managers_start_and_stop_a_sidecar_and_an_upstream(tmp_path):
    async with FakeUpstream() as up:
        async with await start_sidecar(tmp_path, f'''
                route = "/p"
                upstream = "{up.url}"
                [headers]
                request = {{ set = {{ "X-My" = "x" }} }}
                ''') as sc:
            port = sc.sidecar.ports["outbound"]
            status, headers, body = await sc.request("GET", "/p/hello?a=1")
            assert status == 200 and headers["X-Request-ID"]
            status, _, _ = await sc.request("GET", "/health", listener="admin")
            assert status == 200
        assert [(s.method, s.path_qs, s.headers["X-My"]) for s in up.seen] == [("GET", "/hello?a=1", "x")]
        assert (tmp_path / "policies" / "policy.toml").exists()
    with socket.socket() as s:   # stopped: nothing listens any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
