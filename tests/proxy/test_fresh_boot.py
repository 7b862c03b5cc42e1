"""'Never happened' must be -inf, not 0.0, wherever it is compared with
time.monotonic(): the monotonic clock counts from boot, so on a machine up for
less than the interval a 0.0 reads as 'just happened' (issue 11, item 9; the
jwt plugin's first JWKS fetch was the first case found).

Each test gives the module under test the clock of a machine booted a few
seconds ago (a new CI runner or VM): its ``time`` module with ``monotonic()``
shifted, everything else real.
"""

from __future__ import annotations

import logging
import time
from types import ModuleType

import pytest

import plugins.rate_limit.filter as rate_limit_filter
import plugins.rate_limit.gcra as gcra
import proxy.secrets as secrets
from plugins.rate_limit.gcra import LimitSpec, MemoryStore, SharedStore
from proxy.secrets import FileSecret
from tests.plugins.test_rate_limit_shared import own_redis, policy  # noqa: F401 (fixture)


class BootClock:
    """The ``time`` module as seen ``uptime`` seconds after boot."""

    def __init__(self, uptime: float) -> None:
        self._offset = time.monotonic() - uptime

    def monotonic(self) -> float:
        return time.monotonic() - self._offset

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def fresh_boot(monkeypatch):
    def boot(module: ModuleType, uptime: float) -> None:
        monkeypatch.setattr(module, "time", BootClock(uptime))
    return boot


def test_file_secret_is_read_on_first_use(tmp_path, fresh_boot):
    fresh_boot(secrets, 0.5)  # less than the 1 s check interval
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert FileSecret(f"file:{key}").get() == "s3cret"


def test_shared_rate_limit_table_warns_on_its_first_eviction(tmp_path, caplog, fresh_boot):
    fresh_boot(gcra, 5.0)  # less than the 60 s between warnings
    s = SharedStore(str(tmp_path / "tiny"), slots=32)
    lim = (LimitSpec.make("x", 1, 60.0, 1),)
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar"):
            for i in range(33):
                s.decide([f"k{i}"], lim, 0.0)
        assert "is full around a key" in caplog.text
    finally:
        s.close()


def test_memory_rate_limit_store_warns_on_its_first_eviction(caplog, fresh_boot):
    # A guard: this store started at -60.0, which worked; it is -inf now like the others.
    fresh_boot(gcra, 5.0)
    s = MemoryStore(max_keys=10)
    lim = (LimitSpec.make("x", 10, 3600.0, 10),)
    with caplog.at_level(logging.WARNING, logger="sidecar"):
        for i in range(5000):  # the store sweeps every 4096 writes
            s.decide([f"k{i}"], lim, 0.0)
    assert "evicted those nearest expiry" in caplog.text


async def test_rate_limit_backend_outage_is_logged_at_once(sidecar_factory, upstream, client, own_redis,  # noqa: F811
                                                           caplog, fresh_boot):
    sc = await sidecar_factory(
        {"api": policy(upstream.url, '[rate_limit]\nlimits = [{ requests = 5, per = "1m" }]\n')},
        f'[state]\nbackend = "redis"\nurl = "{own_redis.url}"\n')
    fresh_boot(rate_limit_filter, 5.0)  # less than the 10 s between warnings
    own_redis.stop()
    with caplog.at_level(logging.WARNING, logger="sidecar"):
        async with client.get(f"{sc.url}/api/x") as r:
            assert r.status == 200  # fail_open
    assert "rate-limit backend unavailable" in caplog.text
