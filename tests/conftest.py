"""Shared fixtures: fake upstreams, sidecars on free ports, and a real Redis.

Redis: the suite uses the server at 127.0.0.1:6379 (or SIDECAR_TEST_REDIS_URL),
on database SIDECAR_TEST_REDIS_DB (default 13), flushed before each test that
asks for it. When none answers it starts a throwaway ``redis-server`` on a free
port. When neither is possible Redis tests are skipped with a loud reason,
unless SIDECAR_REQUIRE_REDIS=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator


import pytest

# The kit's fixtures (upstream, client, sidecar_factory): the project's tests
# use the same ones a third-party plugin's tests do.
from proxy.testing import client, sidecar_factory, upstream  # noqa: F401
from tests.support.redis import answers
from tests.support.sidecar import free_port

REDIS_DB = int(os.environ.get("SIDECAR_TEST_REDIS_DB", "13"))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[tuple[str, int]]:
    """(host, port) of a real Redis server for the whole session."""
    url = os.environ.get("SIDECAR_TEST_REDIS_URL")
    host, port = "127.0.0.1", 6379
    if url:
        from urllib.parse import urlparse

        u = urlparse(url)
        host, port = u.hostname or host, u.port or port
    if answers(port, host):
        yield host, port
        return
    binary = shutil.which("redis-server")
    reason = f"no Redis answers at {host}:{port} and no redis-server binary is on PATH"
    if binary is None:
        if os.environ.get("SIDECAR_REQUIRE_REDIS") == "1":
            pytest.fail(f"SIDECAR_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(f"REDIS TESTS SKIPPED: {reason}")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="sidecar-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if answers(port):
                break
            time.sleep(0.05)
        else:
            pytest.fail("started redis-server but it never answered")
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def redis_url(redis_server: tuple[str, int]) -> AsyncIterator[str]:
    """URL of this suite's own Redis database, flushed before the test."""
    import redis.asyncio as aioredis

    host, port = redis_server
    url = f"redis://{host}:{port}/{REDIS_DB}"
    r = aioredis.from_url(url)
    await r.flushdb()
    await r.aclose()
    yield url
