"""rate_limit: config validation, GCRA units, and end-to-end through real sockets.

Timing tests use short windows and poll or compare against the limiter's own
numbers; nothing asserts on a sleep alone.
"""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest
from pydantic import ValidationError

from plugins.rate_limit import Config
from plugins.rate_limit.gcra import LimitSpec, MemoryStore, SharedStore, decide

ROUTE = "/api"


def policy(upstream_url: str, table: str) -> str:
    return f'route = "{ROUTE}"\nupstream = "{upstream_url}"\n\n[rate_limit]\n{table}\n'


async def send(client: aiohttp.ClientSession, url: str, method: str = "GET", **kw) -> tuple[int, dict, bytes]:
    async with client.request(method, url, **kw) as r:
        return r.status, dict(r.headers), await r.read()


# ---- config validation --------------------------------------------------------

@pytest.mark.parametrize("table,needle", [
    ({}, "without limits"),
    ({"limits": [{"requests": 0, "per": "1s"}]}, "greater than or equal to 1"),
    ({"limits": [{"requests": 1, "per": "soon"}]}, "invalid duration"),
    ({"limits": [{"requests": 1, "per": "1s", "burst": 0}]}, "greater than or equal to 1"),
    ({"limits": [{"requests": 1, "per": "1s"}], "key": "cookie:x"}, "key must be"),
    ({"limits": [{"requests": 1, "per": "1s"}], "key": "header:"}, "valid header name"),
    ({"limits": [{"requests": 1, "per": "1s"}], "on_limit": "queue"}, "needs max_wait"),
    ({"limits": [{"requests": 1, "per": "1s"}], "max_wait": "1s"}, "only applies"),
    ({"limits": [{"requests": 1, "per": "1s"}, {"requests": 1, "per": "1s"}]}, "distinct names"),
    ({"limits": [{"requests": 1, "per": "1s", "name": 'a"b'}]}, "printable ASCII"),
    ({"overrides": [{"match": "POST v1*", "limits": [{"requests": 1, "per": "1s"}]}]}, "start with '/'"),
    ({"overrides": [{"match": "POST /a*b", "limits": [{"requests": 1, "per": "1s"}]}]}, "only allowed at the end"),
    ({"overrides": [{"match": "/a", "limits": []}]}, "at least 1"),
    ({"limits": [{"requests": 1, "per": "1s"}], "typo": 1}, "Extra inputs"),
])
def test_config_rejects(table, needle):
    with pytest.raises(ValidationError) as e:
        Config(**table)
    assert needle in str(e.value)


def test_config_accepts_the_issue_examples():
    c = Config(key="header:X-Tenant-ID", limits=[{"requests": 3, "per": "1s", "burst": 5},
                                                 {"requests": 10000, "per": "1d"}],
               overrides=[{"match": "POST /v1/embeddings*", "limits": [{"requests": 100, "per": "1m"}]}])
    assert [lim.label for lim in c.limits] == ["3/1s", "10000/1d"]
    assert c.overrides[0].parsed() == ("POST", "/v1/embeddings", True)
    assert Config(overrides=[{"match": "/x", "limits": [{"requests": 1, "per": 1}]}]).overrides[0].parsed() == (None, "/x", False)


async def test_bad_policy_is_reported_with_file_and_field(tmp_path, upstream):
    from proxy.errors import ConfigError
    from tests.support.sidecar import start_sidecar

    with pytest.raises(ConfigError) as e:
        await start_sidecar(tmp_path, {"bad": policy(upstream.url, 'limits = [{ requests = 5, per = "1 week" }]')})
    assert "bad.toml" in str(e.value) and "rate_limit.limits.0.per" in str(e.value)


# ---- GCRA units ----------------------------------------------------------------

def test_gcra_burst_then_smooth_refill():
    lim = (LimitSpec.make("x", 2, 1.0, 4),)   # 2/s, burst 4: T = 0.5s
    tats, now = [0.0], 100.0
    admitted = []
    for _ in range(6):
        d, new = decide(tats, now, lim, 0.0)
        admitted.append(d.admitted)
        if new:
            tats = new
    assert admitted == [True] * 4 + [False] * 2
    d, _ = decide(tats, now, lim, 0.0)
    assert d.wait == pytest.approx(0.5) and d.remaining == [0]
    d, new = decide(tats, now + 0.5, lim, 0.0)
    assert d.admitted and d.remaining == [0]
    d, _ = decide(new, now + 0.5 + 0.49, lim, 0.0)
    assert not d.admitted
    # Idle for the whole window: full burst again (reset says when).
    d, _ = decide(new, now + 0.5 + 2.0, lim, 0.0)
    assert d.admitted and d.remaining == [3] and d.reset == [pytest.approx(0.5)]


def test_gcra_multiple_limits_all_or_nothing():
    lims = (LimitSpec.make("fast", 10, 1.0, 10), LimitSpec.make("slow", 3, 60.0, 3))
    tats, now = [0.0, 0.0], 50.0
    for _ in range(3):
        d, tats = decide(tats, now, lims, 0.0)
        assert d.admitted
    d, new = decide(tats, now, lims, 0.0)
    assert not d.admitted and new is None and d.refused_by == 1
    # The refusal consumed nothing from "fast": 7 left there.
    assert d.remaining[0] == 7


def test_gcra_queue_reserves_in_order():
    lim = (LimitSpec.make("x", 1, 1.0, 1),)
    tats, now = [0.0], 10.0
    waits = []
    for _ in range(4):
        d, new = decide(tats, now, lim, 2.5)
        waits.append(d.wait if d.admitted else None)
        if new:
            tats = new
    assert waits == [0.0, pytest.approx(1.0), pytest.approx(2.0), None]


def test_memory_store_sweeps_expired_keys():
    s = MemoryStore()
    lim = (LimitSpec.make("x", 1000, 0.001, 1),)
    for i in range(5000):
        s.decide([f"k{i}"], lim, 0.0)
    time.sleep(0.01)
    for i in range(5000):
        s.decide([f"j{i}"], lim, 0.0)
    assert len(s._tats) < 10000


def test_shared_store_is_one_limit_across_handles(tmp_path):
    # Two handles on one file stand for two worker processes.
    a = SharedStore(str(tmp_path / "t"), slots=1024)
    b = SharedStore(str(tmp_path / "t"))
    assert b.slots == 1024
    lim = (LimitSpec.make("x", 5, 60.0, 5),)
    got = [(a if i % 2 else b).decide(["k"], lim, 0.0).admitted for i in range(8)]
    assert got == [True] * 5 + [False] * 3
    assert a.peek(["k"], lim)[0][0] == 0 and b.peek(["other"], lim)[0][0] == 5
    a.close()
    b.close()


def test_shared_store_is_exact_until_full_then_evicts_nearest_expiry(tmp_path, caplog):
    lim = (LimitSpec.make("x", 1, 60.0, 1),)
    roomy = SharedStore(str(tmp_path / "roomy"), slots=1024)
    for i in range(300):
        assert roomy.decide([f"k{i}"], lim, 0.0).admitted
    assert not any(roomy.decide([f"k{i}"], lim, 0.0).admitted for i in range(300))
    assert "full" not in caplog.text
    roomy.close()
    # 32 slots: one probe window covers the table, so the 33rd key must evict.
    s = SharedStore(str(tmp_path / "tiny"), slots=32)
    for i in range(32):
        assert s.decide([f"k{i}"], lim, 0.0).admitted
    assert s.decide(["new"], lim, 0.0).admitted
    assert "full" in caplog.text
    assert sum(s.peek([f"k{i}"], lim)[0][0] == 0 for i in range(32)) == 31
    assert s.peek(["k0"], lim)[0][0] == 1  # the one nearest expiry went first
    s.close()
