"""The stamp plugin through a real sidecar, with the kit from proxy.testing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sidecar_stamp import Config

POLICY = """
route = "/p"
upstream = "{url}"

[stamp]
value = "team-a"
"""


def test_config_is_validated_once_with_clear_errors():
    assert Config(value="x", max_age="2m").max_age == 120.0
    with pytest.raises(ValidationError, match="valeu"):
        Config(valeu="x")


async def test_stamps_requests_and_refuses_with_a_json_error(upstream, sidecar_factory):
    sc = await sidecar_factory(POLICY.format(url=upstream.url))
    assert sc.runtime.specs["stamp"].origin == "entry point (sidecar-example-plugin 1.0.0)"
    status, headers, _ = await sc.request("GET", "/p/hello")
    assert status == 200 and headers["X-Stamped"] == "1"
    assert upstream.seen[0].path_qs == "/hello"
    assert upstream.seen[0].headers["X-Stamp"] == "team-a;route=policy"
    status, headers, body = await sc.request("GET", "/p/x", headers={"X-No-Stamp": "1"})
    assert status == 403 and headers["X-Sidecar-Error"] == "stamp_refused"
    assert b'"stamp_refused"' in body
    assert len(upstream.seen) == 1
    (line, _) = await sc.wait_access_lines(2)
    assert line["decisions"]["stamp"] == "stamped"
