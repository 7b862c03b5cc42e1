"""Cost of one rate-limit decision: memory (one process), memory shared by
workers (mmap + flock), and Redis (one EVALSHA round trip), plus the whole
filter on the memory store.

    python bench/rate_limit_decision.py [redis://127.0.0.1:6379/4]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins.rate_limit.gcra import LimitSpec, MemoryStore, SharedStore  # noqa: E402
from plugins.rate_limit.redis_store import RedisStore  # noqa: E402

ONE = (LimitSpec.make("1000000/1s", 1_000_000, 1.0, 1_000_000),)
TWO = ONE + (LimitSpec.make("1000000000/1d", 1_000_000_000, 86400.0, 1_000_000_000),)


def per_call_us(fn, n: int, repeat: int = 5) -> float:
    best = []
    for _ in range(repeat):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        best.append((time.perf_counter() - t) / n * 1e6)
    return min(best)


async def async_per_call_us(fn, n: int, repeat: int = 3) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        for i in range(n):
            t = time.perf_counter()
            await fn(i)
            samples.append((time.perf_counter() - t) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


async def main(redis_url: str) -> None:
    rows = []
    keys = [f"sidecar:bench:rl:api:-:x:tenant{i % 100}" for i in range(1000)]
    mem = MemoryStore()
    rows.append(("memory, 1 limit", per_call_us(lambda i: mem.decide([keys[i % 1000]], ONE, 0.0), 100_000)))
    rows.append(("memory, 2 limits", per_call_us(lambda i: mem.decide([keys[i % 1000], keys[i % 1000] + "d"], TWO, 0.0), 100_000)))
    with tempfile.TemporaryDirectory() as d:
        sh = SharedStore(f"{d}/t")
        rows.append(("memory shared by workers (mmap+flock), 1 limit",
                     per_call_us(lambda i: sh.decide([keys[i % 1000]], ONE, 0.0), 50_000)))
        sh.close()
    out = [f"| {name} | {us:.2f} |" for name, us in rows]
    try:
        from proxy.state import RedisState

        state = RedisState("bench", redis_url, timeout=2.0)
        client = state.redis
        await client.ping()
        store = RedisStore(state)
        ping = await async_per_call_us(lambda i: client.ping(), 2000)
        one = await async_per_call_us(lambda i: store.decide([keys[i % 1000]], ONE, 0.0), 2000)
        two = await async_per_call_us(lambda i: store.decide([keys[i % 1000], keys[i % 1000] + "d"], TWO, 0.0), 2000)
        left = [k async for k in client.scan_iter(match="sidecar:bench:*")]
        if left:
            await client.delete(*left)
        await state.close()
        out += [f"| redis PING round trip (baseline), median / p99 | {ping[0]:.1f} / {ping[1]:.1f} |",
                f"| redis EVALSHA decision, 1 limit, median / p99 | {one[0]:.1f} / {one[1]:.1f} |",
                f"| redis EVALSHA decision, 2 limits, median / p99 | {two[0]:.1f} / {two[1]:.1f} |"]
    except Exception as e:  # noqa: BLE001 - report, do not crash the table
        out.append(f"| redis | unavailable: {type(e).__name__} |")
    print("| decision | µs per call |\n|---|---|")
    print("\n".join(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/4"))
