"""Workers pinned to one CPU each ([sidecar] cpu_affinity, proxy/server.py
worker_cpus): the rule, and real worker processes carrying it."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import psutil
import pytest

from proxy.server import worker_cpus
from tests.support.sidecar import SidecarProcess, free_port, write_config
from tests.support.upstream import ThreadedApp


def listeners(sc: SidecarProcess, port: int) -> list[psutil.Process]:
    """The worker processes listening on ``port``."""
    return [c for c in psutil.Process(sc.proc.pid).children()
            if any(x.laddr.port == port and x.status == psutil.CONN_LISTEN for x in c.net_connections("tcp"))]


@pytest.mark.parametrize("mode,workers,allowed,want", [
    ("auto", 2, [0, 1], [0, 1]),                 # as many CPUs as workers: one each
    ("auto", 2, [3, 1], [1, 3]),                 # in CPU order, whatever the set's order
    ("auto", 2, [0, 1, 2, 3], [None, None]),     # more CPUs than workers: left to the scheduler
    ("auto", 4, [0, 1], [None] * 4),             # fewer CPUs than workers
    ("on", 3, [4, 5], [4, 5, 4]),                # round robin
    ("on", 2, [0, 1, 2, 3], [0, 1]),
    ("off", 2, [0, 1], [None, None]),
    ("on", 2, None, [None, None]),               # not Linux: unknown CPUs, never pinned
    ("on", 1, [0, 1], [None]),                   # one worker runs in the sidecar's own process
])
def test_worker_cpus(mode, workers, allowed, want):
    assert worker_cpus(mode, workers, allowed) == want


def _upstream_app():
    from aiohttp import web

    async def ok(request):
        return web.Response(text="ok")
    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    return app


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
@pytest.mark.parametrize("mode", ["on", "off"])
def test_workers_run_on_the_cpus_the_setting_gives(tmp_path, mode):
    allowed = sorted(os.sched_getaffinity(0))
    up = ThreadedApp(_upstream_app).start()
    out, adm = free_port(), free_port()
    cfg = write_config(tmp_path, {"p": f'route = "/p"\nupstream = "{up.url}"\n'},
                       outbound_port=out, admin_port=adm, workers=2, sidecar=f'cpu_affinity = "{mode}"')
    sc = SidecarProcess(cfg, out, adm).start(timeout=30)
    try:
        sc.wait_workers(2)
        workers = listeners(sc, out)
        assert len(workers) == 2
        got = sorted(tuple(w.cpu_affinity()) for w in workers)
        if mode == "on":
            assert got == sorted([(allowed[0],), (allowed[1 % len(allowed)],)])
        else:
            assert got == [tuple(allowed)] * 2
        # The supervisor itself is never pinned.
        assert sorted(psutil.Process(sc.proc.pid).cpu_affinity()) == allowed

        async def get() -> tuple[int, str]:
            async with aiohttp.ClientSession() as s, s.get(f"{sc.url}/p/x") as r:
                return r.status, await r.text()
        assert asyncio.run(get()) == (200, "ok")
    finally:
        sc.kill()
        up.stop()
