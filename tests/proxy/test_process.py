"""The sidecar as a process: SIGTERM drain with a request in flight, workers = 2."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import aiohttp
from aiohttp import web

from tests.support.sidecar import SidecarProcess, free_port, write_config


def _slow_upstream(port: int, delay: float, stop: threading.Event, pids: list[str]) -> None:
    async def main() -> None:
        async def slow(request):
            await asyncio.sleep(delay)
            return web.Response(text="finished")

        async def who(request):
            pids.append(request.headers.get("X-Request-ID", ""))
            return web.Response(text="ok")
        app = web.Application()
        app.router.add_get("/slow", slow)
        app.router.add_get("/who", who)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await runner.cleanup()
    asyncio.run(main())


def start_upstream(delay: float = 1.5):
    port, stop, seen = free_port(), threading.Event(), []
    t = threading.Thread(target=_slow_upstream, args=(port, delay, stop, seen), daemon=True)
    t.start()
    time.sleep(0.3)
    return port, stop, t


def test_sigterm_drains_in_flight_requests(tmp_path):
    up_port, stop, t = start_upstream(delay=1.5)
    out, adm = free_port(), free_port()
    cfg = write_config(tmp_path, {"p": f'route = "/p"\nupstream = "http://127.0.0.1:{up_port}"\n'},
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
        stop.set()
        t.join(5)


def test_two_workers_share_the_port_and_aggregate_metrics(tmp_path):
    up_port, stop, t = start_upstream(delay=0)
    out, adm = free_port(), free_port()
    cfg = write_config(tmp_path, {"p": f'route = "/p"\nupstream = "http://127.0.0.1:{up_port}"\n'},
                       outbound_port=out, admin_port=adm, workers=2)
    sc = SidecarProcess(cfg, out, adm).start(timeout=30)
    try:
        import psutil

        assert len(psutil.Process(sc.proc.pid).children()) >= 2

        async def run():
            # Many separate connections, so the kernel spreads them over both workers.
            for _ in range(60):
                async with aiohttp.ClientSession() as s:
                    async with s.get(f"{sc.url}/p/who") as r:
                        assert r.status == 200
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{sc.admin}/metrics") as r:
                    return await r.text()
        text = asyncio.run(run())
        line = next(x for x in text.splitlines()
                    if x.startswith("sidecar_requests_total{") and 'status="200"' in x)
        assert float(line.rsplit(" ", 1)[1]) == 60.0
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
        stop.set()
        t.join(5)
