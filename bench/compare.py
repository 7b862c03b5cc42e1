"""Interleaved wrk comparison of checkouts (before/after a hot-path change).

    python -m bench.compare 3 8 /tmp/base=before .=after

For each checkout (a directory holding proxy/ and plugins/, e.g. from
``git archive``), starts two sidecars against one nginx upstream: no plugins
(access log off) and the production chain of bench/chain.toml (plus the JSON
access log to a file), then runs ``wrk -t1 -c32`` on each in turn for ROUNDS
rounds of DURATION seconds and prints req/s and CPU µs per request, median
and best. Interleaving matters on these shared VMs: a neighbour's load moves
absolute numbers 2x between minutes, so compare medians of one run only.
"""

from __future__ import annotations

import statistics as st
import sys
import tempfile
from pathlib import Path

from . import run as br


def main(argv: list[str]) -> int:
    dur, rounds, checkouts = float(argv[0]), int(argv[1]), argv[2:]
    work = Path(tempfile.mkdtemp(prefix="sidecar-compare-"))
    up, _ = br.start_upstream(work, True)
    chain, used, skipped, cfg = br.production_chain()
    print("chain:", ", ".join(used), "| skipped:", ", ".join(skipped) or "none", flush=True)
    procs: list[tuple[str, br.Proc]] = []
    try:
        for item in checkouts:
            repo, _, label = item.partition("=")
            br.REPO = Path(repo).resolve()
            label = label or br.REPO.name
            for kind in ("plain", "prod"):
                prod = kind == "prod"
                p = br.start_sidecar(work, f"{label}-{kind}", up.port, up.port, chain if prod else "",
                                     prod, "fast", cfg if prod else "")
                procs.append((f"{label}-{kind}", p))
        res: dict[str, list[tuple[float, float]]] = {}
        for _ in range(rounds):
            for name, p in procs:
                url = f"http://127.0.0.1:{p.port}/bench/json"
                br.run_wrk(url, 32, 1)
                c0 = p.cpu()
                w = br.run_wrk(url, 32, dur)
                cpu_us = (p.cpu() - c0) / max(w["requests"], 1) * 1e6
                res.setdefault(name, []).append((w["rps"], cpu_us))
                print(f"{name:20s} {w['rps']:8.0f} req/s {cpu_us:7.1f} us/req errors={w['errors']}", flush=True)
        print("--- req/s median (best), CPU us/request median (best)")
        for name, v in res.items():
            print(f"{name:20s} {st.median(x[0] for x in v):8.0f} ({max(x[0] for x in v):6.0f})"
                  f" {st.median(x[1] for x in v):7.1f} ({min(x[1] for x in v):6.1f})")
    finally:
        for _, p in procs:
            p.stop()
        up.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
