"""The sidecar as a process: SIGTERM drain with a request in flight, workers = 2."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
from aiohttp import web

from tests.support.sidecar import SidecarProcess, free_port, write_config
from tests.support.upstream import ThreadedApp


def slow_app(delay: float) -> web.Application:
    async def slow(request):
        await asyncio.sleep(delay)
        return web.Response(text="finished")
    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    return app


def test_sigterm_drains_in_flight_requests(tmp_path):
    up = ThreadedApp(lambda: slow_app(1.5)).start()
    out, adm = free_port(), free_port()
    cfg = write_config(tmp_path, {"p": f'route = "/p"\nupstream = "{up.url}"\n'},
                       outbound_port=out, admin_port=adm)
    sc = SidecarProcess(cfg, out, adm).start()
    try:
        async def run():
            async with aiohttp.ClientSession() as s:
                task = asyncio.create_task(s.get(f"{sc.url}/p/slow"))
                await asyncio.sleep(0.5)  # the request is now in flight at the upstream
                sc.signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                # New connections are refused while draining...
                refused = False
                try:
                    async with aiohttp.ClientSession() as s2:
                        await s2.get(f"{sc.url}/p/slow", timeout=aiohttp.ClientTimeout(total=2))
                except aiohttp.ClientConnectorError:
                    refused = True
                # ...and the accepted one completes.
                resp = await task
                return resp.status, await resp.text(), refused
        status, text, refused = asyncio.run(run())
        assert (status, text) == (200, "finished")
        assert refused
        assert sc.wait(15) == 0
    finally:
        sc.kill()
        up.stop()


def test_two_workers_share_the_port_and_aggregate_metrics(tmp_path):
    up = ThreadedApp(lambda: slow_app(0)).start()
    out, adm = free_port(), free_port()
    cfg = write_config(tmp_path, {"p": f'route = "/p"\nupstream = "{up.url}"\n'},
                       outbound_port=out, admin_port=adm, workers=2)
    sc = SidecarProcess(cfg, out, adm).start(timeout=30)
    try:
        sc.wait_workers(2)

        async def run():
            # Many separate connections, so the kernel spreads them over both workers.
            for _ in range(60):
                async with aiohttp.ClientSession() as s:
                    async with s.get(f"{sc.url}/p/x") as r:
                        assert r.status == 200
            # A request is counted just after its last byte went out: poll.
            async with aiohttp.ClientSession() as s:
                for _ in range(100):
                    async with s.get(f"{sc.admin}/metrics") as r:
                        text = await r.text()
                    line = next(x for x in text.splitlines()
                                if x.startswith("sidecar_requests_total{") and 'status="200"' in x)
                    if float(line.rsplit(" ", 1)[1]) >= 60.0:
                        break
                    await asyncio.sleep(0.05)
            return float(line.rsplit(" ", 1)[1])
        assert asyncio.run(run()) == 60.0
        sc.signal(signal.SIGTERM)
        assert sc.wait(20) == 0
        # Both workers served: the kernel spread 60 connections over the two
        # SO_REUSEPORT listeners (all on one has probability 2**-59).
        import orjson
        lines = [orjson.loads(x) for x in (tmp_path / "access.log").read_bytes().splitlines()]
        assert len(lines) == 60
        assert {x["worker"] for x in lines} == {0, 1}
    finally:
        sc.kill()
        up.stop()
