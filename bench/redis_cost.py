"""Redis commands, bytes and memory per request, for each plugin that uses Redis.

Starts a throwaway redis-server on a free port (never touches another Redis),
runs an in-process sidecar on it with one policy at a time, sends N requests
through it, and reads the server's own counters around them: ``INFO
commandstats`` (calls per command), ``INFO stats`` (total_net_input_bytes /
total_net_output_bytes: bytes the sidecar sent and received) and ``DBSIZE`` /
``used_memory`` once the requests are done. Prints a Markdown table (the one
in docs/scaling.md).

    python bench/redis_cost.py [N]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from aiohttp import web  # noqa: E402

from tests.support.inbound import inbound_config, webhook_policy  # noqa: E402
from tests.support.redis import ThrowawayRedis  # noqa: E402
from tests.support.sidecar import start_sidecar  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402

SECRET = "whsec_bench"


async def counters(r: aioredis.Redis) -> tuple[dict[str, int], int, int]:
    stats = await r.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    net = await r.info("stats")
    return calls, int(net["total_net_input_bytes"]), int(net["total_net_output_bytes"])


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    # The measurement's own INFO calls are not the sidecar's.
    out.pop("info", None)
    return {k: v for k, v in out.items() if v}


async def cacheable(request: web.Request, seen) -> web.StreamResponse:  # noqa: ANN001
    return web.Response(body=b"x" * 1024, headers={"Cache-Control": "max-age=3600",
                                                    "Content-Type": "application/octet-stream"})


async def measure(name: str, policy: str, config: str, n: int, send, settle=None,  # noqa: ANN001
                  responder=None) -> dict:  # noqa: ANN001
    redis = ThrowawayRedis().start()
    up = await FakeUpstream().start()
    if responder is not None:
        up.responder = responder
    tmp = Path(tempfile.mkdtemp(prefix="redis-cost-"))
    r = aioredis.from_url(redis.url)
    try:
        sc = await start_sidecar(tmp, {"p": policy.replace("UPSTREAM", up.url)},
                                 config.replace("REDIS_URL", redis.url).replace("UPSTREAM", up.url))
        async with aiohttp.ClientSession() as client:
            await send(client, sc, up, 0)  # warm-up: script load, connections, first entry
            if settle:
                await settle(sc)
            keys0 = await r.dbsize()
            # What the measurement's own INFO calls add to the byte counters.
            _, a_in, a_out = await counters(r)
            _, b_in, b_out = await counters(r)
            own_in, own_out = b_in - a_in, b_out - a_out
            calls0, in0, out0 = await counters(r)
            for i in range(1, n + 1):
                await send(client, sc, up, i)
            if settle:
                await settle(sc)
            calls1, in1, out1 = await counters(r)
            keys1 = await r.dbsize()
            # A second pass under MONITOR (its stream would count as output
            # bytes in the first): what clients send; "lua" lines ran inside a script.
            sent = 0
            started = asyncio.Event()

            async def watch() -> None:
                nonlocal sent
                async with r.monitor() as m:
                    started.set()
                    while True:
                        cmd = await m.next_command()
                        if cmd["client_type"] != "lua" and not cmd["command"].upper().startswith("INFO"):
                            sent += 1

            watcher = asyncio.create_task(watch())
            await started.wait()
            await asyncio.sleep(0.1)
            for i in range(n + 1, 2 * n + 1):
                await send(client, sc, up, i)
            if settle:
                await settle(sc)
            await asyncio.sleep(0.1)
            watcher.cancel()
            usage = [await r.memory_usage(k) or 0 async for k in r.scan_iter(count=1000)]
        await sc.sidecar.stop()
    finally:
        await r.aclose()
        await up.stop()
        redis.cleanup()
    d = delta(calls0, calls1)
    d.pop("monitor", None)
    return {"name": name, "n": n, "commands": d, "sent": sent / n, "in": (in1 - in0 - own_in) / n,
            "out": (out1 - out0 - own_out) / n, "keys": (keys1 - keys0) / n,
            "per_key": sum(usage) / len(usage) if usage else 0}


async def plain_get(client, sc, up, i):  # noqa: ANN001
    async with client.get(f"{sc.url}/p/x", headers={"X-Tenant-ID": f"tenant-{i % 50}"}) as resp:
        await resp.read()


def new_urls(prefix: str):  # noqa: ANN201
    async def send(client, sc, up, i):  # noqa: ANN001
        async with client.get(f"{sc.url}/p/{prefix}{i}") as resp:
            await resp.read()
    return send


async def hook(client, sc, up, i):  # noqa: ANN001
    import stripe

    body = orjson.dumps({"id": f"evt_{i}", "type": "charge.succeeded", "data": {}})
    headers = {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET),
               "Content-Type": "application/json"}
    async with client.post(f"http://127.0.0.1:{sc.sidecar.ports['inbound']}/webhooks/stripe", data=body,
                           headers=headers) as resp:
        await resp.read()
        assert resp.status == 202, resp.status


def delivered(count: list[int]):  # noqa: ANN201
    async def settle(sc):  # noqa: ANN001
        svc = sc.runtime.services["webhook"]
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if svc.queue is not None:
                depth, _ = await svc.queue.stats("stripe")
                if depth == 0:
                    await asyncio.sleep(0.3)  # the delivery loop's idle polls are part of the cost
                    return
            await asyncio.sleep(0.05)
    return settle


async def main(n: int) -> None:
    os.environ["WH_SECRET"] = SECRET
    state = 'backend = "redis"\nurl = "REDIS_URL"\n'
    rl = 'route = "/p"\nupstream = "UPSTREAM"\n[rate_limit]\nkey = "header:X-Tenant-ID"\n'
    rows = [
        await measure("rate_limit, one limit", rl + 'limits = [{ requests = 100, per = "1h" }]\n',
                      "[state]\n" + state, n, plain_get),
        await measure("rate_limit, two limits", rl + 'limits = [{ requests = 100, per = "1h" }, '
                      '{ requests = 10000, per = "1d" }]\n', "[state]\n" + state, n, plain_get),
        await measure("circuit_breaker (closed, upstream healthy)",
                      'route = "/p"\nupstream = "UPSTREAM"\n[circuit_breaker]\n', "[state]\n" + state, n,
                      plain_get),
        await measure("cache, hit (1 KiB body)", 'route = "/p"\nupstream = "UPSTREAM"\n[cache]\n',
                      "[state]\n" + state, n, plain_get, responder=cacheable),
        await measure("cache, miss + store (1 KiB body)",
                      'route = "/p"\nupstream = "UPSTREAM"\n[cache]\n', "[state]\n" + state, n,
                      new_urls("u"), responder=cacheable),
        await measure("webhook, durable (accept + deliver, de-dup on)",
                      webhook_policy("/webhooks/stripe", "stripe", ["env:WH_SECRET"], forward_to="/hooks"),
                      inbound_config("UPSTREAM", extra="[state]\n" + state), n, hook, delivered([])),
    ]
    print(textwrap.dedent(f"""\
        Measured with bench/redis_cost.py: N = {n} requests per row through one
        sidecar, redis-server {await server_version()} on loopback. Sent: commands the
        sidecar sent (MONITOR, script-internal ones excluded); executed: INFO
        commandstats deltas (commands a script runs included); bytes: RESP on
        the wire per request (INFO stats net input/output); memory: MEMORY USAGE
        per key at the end.
        """))
    print("| request | sent | executed by Redis | bytes to Redis | bytes from Redis | new keys | memory per key |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for row in rows:
        cmds = ", ".join(f"{k.upper()} {v / row['n']:.2g}" for k, v in sorted(row["commands"].items()))
        total = sum(row["commands"].values()) / row["n"]
        print(f"| {row['name']} | {row['sent']:.2g} | {total:.2g}: {cmds or '-'} | {max(0.0, row['in']):.0f} | "
              f"{max(0.0, row['out']):.0f} | {row['keys']:.2g} | {row['per_key']:.0f} B |")


async def server_version() -> str:
    redis = ThrowawayRedis().start()
    r = aioredis.from_url(redis.url)
    try:
        return str((await r.info("server"))["redis_version"])
    finally:
        await r.aclose()
        redis.cleanup()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
