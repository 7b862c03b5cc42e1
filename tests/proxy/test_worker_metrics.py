"""A worker killed mid-request does not leave its requests in
``sidecar_inflight_requests`` (issue 11, item 8): the supervisor marks it
dead for prometheus-client's multiprocess files."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import aiohttp
import psutil

from tests.support.sidecar import SidecarProcess, free_port, write_config
from tests.support.upstream import ThreadedApp, held_app


def listeners(sc: SidecarProcess, port: int) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(sc.proc.pid).children():
        try:
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp")):
                out.append(child)
        except psutil.Error:
            continue
    return out


def established(proc: psutil.Process, port: int) -> int:
    return sum(1 for c in proc.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


async def inflight(session: aiohttp.ClientSession, admin: str) -> float:
    async with session.get(f"{admin}/metrics") as r:
        text = await r.text()
    return float(next(x for x in text.splitlines() if x.startswith("sidecar_inflight_requests "))
                 .rsplit(" ", 1)[1])


async def poll(check, timeout: float) -> bool:
    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


def test_killed_worker_leaves_no_inflight_requests_behind(tmp_path):
    release = threading.Event()
    up = ThreadedApp(lambda: held_app(release)).start()
    out, adm = free_port(), free_port()
    cfg = write_config(tmp_path, {"p": f'route = "/p"\nupstream = "{up.url}"\n'},
                       outbound_port=out, admin_port=adm, workers=2)
    sc = SidecarProcess(cfg, out, adm).start(timeout=30)
    try:
        sc.wait_workers(2)
        (admin_worker,) = listeners(sc, adm)
        (victim,) = [p for p in listeners(sc, out) if p.pid != admin_worker.pid]

        async def run():
            conns = []
            # New connections until the worker to be killed holds some (the
            # kernel spreads connections over SO_REUSEPORT listeners by hash).
            while len(conns) < 40 and (len(conns) < 4 or established(victim, out) < 2):
                r, w = await asyncio.open_connection("127.0.0.1", out)
                w.write(b"GET /p/held HTTP/1.1\r\nHost: x\r\n\r\n")
                await w.drain()
                conns.append((r, w))
                await asyncio.sleep(0.02)
            async with aiohttp.ClientSession() as s:
                async def all_in_flight():
                    return await inflight(s, sc.admin) == len(conns)
                assert await poll(all_in_flight, 20), await inflight(s, sc.admin)
                # Counted once every request is in flight (none left in a backlog).
                on_victim = established(victim, out)
                assert on_victim >= 1, "no connection reached the second worker"
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait(10)
                release.set()
                answered = 0
                for r, w in conns:
                    try:
                        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                        answered += head.startswith(b"HTTP/1.1 200")
                    except (asyncio.IncompleteReadError, ConnectionError):
                        pass
                    w.close()
                assert answered == len(conns) - on_victim

                async def back_to_zero():
                    return await inflight(s, sc.admin) == 0
                settled = await poll(back_to_zero, 20)
                return settled, await inflight(s, sc.admin)

        settled, left = asyncio.run(run())
        assert settled, f"sidecar_inflight_requests stuck at {left} after the worker died"
        sc.wait_workers(2)  # the supervisor replaced the dead worker
    finally:
        release.set()
        sc.kill()
        up.stop()
