"""One RPM budget for several worker processes, two ways, counted at the simulator (issue 7, decision 14).

    python bench/shared_limit.py                      # 3 workers, 1,200 RPM, 400 calls each, both ways
    python bench/shared_limit.py --workers 4 --rpm 3000 --calls 600

- `lease`: one token bucket in Redis (`share_via`, llm/limit_share.py): each process queues its calls
  against local buckets and pays what they owe from the Redis bucket every 0.1 s, in one script.
- `prefect`: Prefect's own global concurrency limit with slot decay (`rate_limit(name, occupy=k)`), taken
  in blocks of `--block` calls (one server round trip per block, never one per call), the local limiter
  off. The limit holds `--block` x workers slots and decays at RPM / 60 a second.

Every worker is its own process with the gateway over HTTP to one simulator process (no limit of its
own: it counts arrivals). Printed per way: the most requests in any 60 s and any 10 s window beside the
budget, the share of the budget used from first to last request, and the server round trips.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIS = "redis://127.0.0.1:6379/0"

WORKER = r"""
import asyncio, json, sys, time
from facets.llm.gateway import Gateway
from facets.schemas.config import EndpointConfig, RateLimits, Sampling

way, base_url, rpm, calls, block, tag, name = sys.argv[1:8]
rpm, calls, block = float(rpm), int(calls), int(block)

async def main():
    limits = (RateLimits(rpm=rpm, burst_s=1.0, share_via=sys.argv[8]) if way == "lease"
              else RateLimits(rpm=0, max_in_flight=64))
    config = EndpointConfig(base_url=base_url, api_key="bench", model="facets-sim", limits=limits)
    trips = 0
    async with Gateway(config) as gateway:
        async def one(i):
            return await gateway.chat([{"role": "user", "content": f"{tag} {i}"}], stage="s", key=str(i),
                                      sampling=Sampling(max_tokens=1000))
        if way == "lease":
            await asyncio.gather(*(one(i) for i in range(calls)))
            trips = gateway.limiters.get(gateway.url, "facets-sim", limits).lease.trips
        else:
            from prefect.concurrency.asyncio import rate_limit
            pending = []
            for start in range(0, calls, block):
                await rate_limit(name, occupy=min(block, calls - start))
                trips += 1
                pending += [asyncio.create_task(one(i)) for i in range(start, min(calls, start + block))]
            await asyncio.gather(*pending)
    print(json.dumps({"trips": trips}), flush=True)

asyncio.run(main())
"""


def max_in_window(times: list[float], window: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def run_way(way: str, args: argparse.Namespace, api_url: str | None) -> dict:
    from facets.simulator.server import SimulatorProcess

    name = f"facets-bench-{uuid.uuid4().hex[:8]}"
    if way == "prefect":
        create_limit(api_url, name, limit=args.block * args.workers, decay=args.rpm / 60)
    env = {**os.environ, **({"PREFECT_API_URL": api_url} if api_url else {})}
    # --endpoint-limit: the endpoint keeps the RPM too, and its latency varies, as a real one's does
    enforced = {"rpm": int(args.rpm), "burst_s": 1.0, "jitter_ms": 0.3 * args.latency_ms} if args.endpoint_limit else {}
    with SimulatorProcess(latency_ms=args.latency_ms, **enforced) as sim:
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, way, sim.base_url, str(args.rpm), str(args.calls),
                                   str(args.block), f"{way}-{w}", name, REDIS],
                                  env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT) for w in range(args.workers)]
        trips = 0
        for proc in procs:
            out, _ = proc.communicate(timeout=1800)
            if proc.returncode:
                raise SystemExit(f"a {way} worker failed (exit {proc.returncode})")
            trips += json.loads(out.strip().splitlines()[-1])["trips"]
        stats = sim.stats(timestamps=True)
    times = sorted(stats["admitted_timestamps"])
    span = times[-1] - times[0]
    per_s = args.rpm / 60
    return {"way": way, "calls": len(times), "max_60s": max_in_window(times, 60.0),
            "max_10s": max_in_window(times, 10.0), "budget_used": (len(times) - 1) / span / per_s if span else 0.0,
            "span_s": span, "server_trips": trips, "rate_limited": stats["rate_limited"]}


def create_limit(api_url: str, name: str, limit: int, decay: float) -> None:
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    async def create():
        async with PrefectClient(api_url) as client:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit, slot_decay_per_second=decay))

    asyncio.run(create())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rpm", type=float, default=1200)
    parser.add_argument("--calls", type=int, default=400, help="calls per worker")
    parser.add_argument("--block", type=int, default=8, help="calls per Prefect rate_limit acquisition")
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--endpoint-limit", action="store_true",
                        help="the simulator enforces the RPM too (burst 1 s), answering 429 past it")
    parser.add_argument("--ways", default="lease,prefect")
    args = parser.parse_args()
    from facets.flows.commands.server import LocalPrefect, free_port

    results = []
    if "lease" in args.ways:
        results.append(run_way("lease", args, None))
    if "prefect" in args.ways:
        with LocalPrefect(ROOT, port=free_port(), pools=["cpu"], cpu_workers=0, deploy=False,
                          log_dir=Path(tempfile.mkdtemp(prefix="facets-limit-bench-")),
                          env={**os.environ, "PREFECT_HOME": tempfile.mkdtemp(prefix="facets-limit-home-")}) as stack:
            results.append(run_way("prefect", args, stack.api_url))
    budget_60, budget_10 = args.rpm, args.rpm / 6
    print(f"\n{args.workers} worker processes x {args.calls} calls, one budget of {args.rpm:g} RPM; simulator "
          f"{args.latency_ms:g} ms; Prefect blocks of {args.block}")
    print(f"{'way':<9}{'max in 60 s':>14}{'max in 10 s':>14}{'budget used':>13}{'span':>9}{'server trips':>14}"
          f"{'429s':>7}")
    for r in results:
        print(f"{r['way']:<9}{r['max_60s']:>8} / {budget_60:<5g}{r['max_10s']:>8} / {budget_10:<5g}"
              f"{100 * r['budget_used']:>12.1f}%{r['span_s']:>8.1f}s{r['server_trips']:>14}{r['rate_limited']:>7}")
    print("server trips: Redis leases (lease; at most ten a second per process with calls queued), "
          "Prefect API acquisitions (prefect)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
