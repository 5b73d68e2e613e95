"""Gateway throughput and client cost against the simulator, beside two naive baselines (issue 3).

    python bench/gateway.py                  # 20,000 structured calls, RPM 6,000, 300 ms +- 100 ms, 64 in flight
    python bench/gateway.py --quick          # 2,000 calls: a short sanity run
    python bench/gateway.py --micro          # CPU only: 50 ms endpoint, 64 in flight, no RPM limit
    python bench/gateway.py --contenders lean,sdk --n 5000 --rpm 12000

Contenders, each on the same calls (same messages, same strict `json_schema` response format, the
reply validated with the same pydantic model), each in its own process against its own fresh
simulator process, so client CPU and peak RSS belong to that contender alone and the simulator's
own CPU is never counted:

    lean      the gateway, lean transport (aiohttp + orjson), journal and limiter on
    openai    the gateway, openai SDK transport, journal and limiter on
    sdk       naive baseline: AsyncOpenAI with its own retries (default max_retries) under an
              asyncio.Semaphore, no pacing
    prefect   naive baseline: one Prefect task per call (same SDK call inside), under a semaphore,
              in a flow on Prefect's temporary server (a smaller N by default: see --prefect-n)
    floor     optional reference, not a contender: bare aiohttp + orjson + the same validation,
              released on a fixed schedule at R; what any asyncio client pays per call on this
              machine at this rate (a paced client wakes up once or twice a call, and on small
              virtual machines a wake-up costs a sizeable part of a millisecond)

Figures per contender: achieved RPM / R counted at the endpoint after the first 10 s (target
>= 0.95), 429s received as a share of the requests the endpoint saw (target < 1 %), client CPU-ms
per call (user + system time of the client process over the calls; Prefect's server subprocess not
included), peak RSS of the client process (target <= 300 MB), ok calls/s (calls that returned a
validated reply, per second of the run), and ratios to each baseline.
The gateway's CPU target is <= 1.0 ms per call, journal and limiter included.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

MODEL = "facets-sim"
API_KEY = "bench-key"
WARMUP_S = 10.0  # RPM is judged after this much of the run
TARGET_RPM_SHARE = 0.95
TARGET_429_SHARE = 0.01
TARGET_CPU_MS = 1.0
TARGET_RSS_MB = 300
GATEWAYS = ("lean", "openai")
BASELINES = ("sdk", "prefect")
LABELS = {
    "lean": "gateway, lean transport",
    "openai": "gateway, openai transport",
    "sdk": "AsyncOpenAI + semaphore",
    "prefect": "Prefect task per call",
    "floor": "floor: bare aiohttp+orjson",
}

# A stage-like prompt: a system message of ~900 characters and a distinct instruction per call.
SYSTEM = (
    "You are a careful annotator of user preferences. For the instruction below, write one preference "
    "set: exactly one preference for each of the four dimensions style, background_knowledge, "
    "informativeness and harmlessness. For each, name a subdimension (for example clarity, conciseness, "
    "format, tone, vividness, novice, expert, creativity, depth, efficiency, practicality, relevance, "
    "accuracy, morality, safety, sensitivity or trustworthiness), state the preference in one short "
    "phrase, and describe in two or three sentences what a response that honours it looks like. The "
    "preferences must fit the instruction, must not contradict one another, and together must describe "
    "one plausible user. Write descriptions in the third person, concretely, without hedging, and never "
    "mention these rules. Reply with JSON only, following the given schema exactly."
)
TOPICS = (
    "how tides work", "a budget for a small bakery", "the causes of the French Revolution",
    "sorting a list in Python", "a haiku about autumn rain", "whether to lease or buy a car",
    "how vaccines train the immune system", "a polite complaint to a landlord", "recursion for beginners",
    "the ethics of self-driving cars", "planning a week of vegetarian meals", "how a transistor switches",
)


def messages(i: int) -> list[dict]:
    topic = TOPICS[i % len(TOPICS)]
    user = (f"Instruction #{i}: Explain {topic} to someone who asked about it today, and give one example "
            f"they can try themselves (variant {i * 7919 % 10007}).")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


SAMPLING = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 1024}


def reply_schema():
    from pydantic import BaseModel, Field

    from facets.schemas import Preference

    class PreferenceSetReply(BaseModel):
        """One preference set as the LLM writes it: four preferences, one per dimension."""

        preferences: list[Preference] = Field(min_length=4, max_length=4)

    return PreferenceSetReply


# --- contenders (each runs in its own process) ------------------------------------------------

class Meter:
    """Client CPU (user + system, all threads of this process) and wall time over the calls."""

    def __enter__(self) -> "Meter":
        self.cpu0, self.wall0 = _cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_s, self.wall_s = _cpu_s() - self.cpu0, time.perf_counter() - self.wall0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_gateway(args: argparse.Namespace, transport: str) -> dict:
    from facets.llm.gateway import Gateway, run_bounded
    from facets.llm.journal import Journal
    from facets.schemas.config import EndpointConfig, RateLimits, Retries, Sampling

    schema, sampling = reply_schema(), Sampling(**SAMPLING)
    endpoint = EndpointConfig(
        base_url=args.base_url, api_key=API_KEY, model=MODEL, transport=transport,
        limits=RateLimits(rpm=args.rpm, max_in_flight=args.in_flight), retries=Retries(),
    )
    journal = Journal(args.data_dir)
    async with Gateway(endpoint, journal) as gateway:

        async def one(i: int) -> bool:
            done = await gateway.parse(messages(i), schema, stage="bench", key=str(i), sampling=sampling)
            return done is not None

        with Meter() as meter:
            results = await run_bounded((lambda i=i: one(i) for i in range(args.n)), args.in_flight)
        usage = gateway.usage
    journal.close()
    return {"ok": sum(results), "meter": meter, "client_requests": usage.requests,
            "client_429s": usage.rate_limited, "journal_entries": len(journal)}


async def run_sdk(args: argparse.Namespace) -> dict:
    import openai

    schema = reply_schema()
    fmt = response_format(schema)
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=API_KEY)  # default max_retries
    semaphore = asyncio.Semaphore(args.in_flight)

    async def one(i: int) -> bool:
        async with semaphore:
            try:
                reply = await client.chat.completions.create(model=MODEL, messages=messages(i), response_format=fmt, **SAMPLING)
                schema.model_validate_json(reply.choices[0].message.content)
                return True
            except Exception:  # noqa: BLE001 - a naive caller counts the call as lost and moves on
                return False

    with Meter() as meter:
        results = await asyncio.gather(*(one(i) for i in range(args.n)))
    await client.close()
    return {"ok": sum(results), "meter": meter}


async def run_floor(args: argparse.Namespace) -> dict:
    """Not a contender: the least any client pays here. One aiohttp session, orjson, the same
    validation, calls released on a fixed schedule at R (no limiter, no journal, no retries)."""
    import aiohttp

    schema = reply_schema()
    fmt = response_format(schema)
    url, headers = f"{args.base_url}/chat/completions", {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    spacing = 60.0 / args.rpm if args.rpm else 0.0
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.in_flight))
    numbers = iter(range(args.n))
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for i in numbers:
            if spacing and (delay := start + i * spacing - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            body = {"model": MODEL, "messages": messages(i), "response_format": fmt, **SAMPLING}
            async with session.post(url, data=orjson.dumps(body), headers=headers) as reply:
                raw = await reply.read()
                status = reply.status
            if status == 200:
                schema.model_validate_json(orjson.loads(raw)["choices"][0]["message"]["content"])
                ok += 1

    with Meter() as meter:
        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.in_flight)))
    await session.close()
    return {"ok": ok, "meter": meter}


def run_prefect(args: argparse.Namespace) -> dict:
    import openai
    from prefect import flow, task

    schema = reply_schema()
    fmt = response_format(schema)

    @task
    async def call(i: int) -> bool:
        try:
            reply = await state["client"].chat.completions.create(
                model=MODEL, messages=messages(i), response_format=fmt, **SAMPLING)
            schema.model_validate_json(reply.choices[0].message.content)
            return True
        except Exception:  # noqa: BLE001 - same as the SDK baseline
            return False

    state: dict = {}

    @flow
    async def bench_calls(n: int, in_flight: int) -> int:
        state["client"] = openai.AsyncOpenAI(base_url=args.base_url, api_key=API_KEY)
        semaphore = asyncio.Semaphore(in_flight)

        async def one(i: int) -> bool:
            async with semaphore:
                return await call(i)

        results = await asyncio.gather(*(one(i) for i in range(n)))
        await state["client"].close()
        return sum(results)

    asyncio.run(bench_calls(0, args.in_flight))  # starts the temporary server: a fixed cost, not a per-call one
    server_cpu0 = _children_cpu_s()
    with Meter() as meter:
        ok = asyncio.run(bench_calls(args.n, args.in_flight))
    return {"ok": ok, "meter": meter, "server_cpu_s": _children_cpu_s() - server_cpu0}


def _children_cpu_s() -> float:
    """CPU of this process's live children (Prefect's temporary server runs as one)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def response_format(schema) -> dict:
    """The same strict format the gateway sends."""
    from facets.llm.gateway import json_schema_format

    return json_schema_format(schema)


def worker(args: argparse.Namespace) -> None:
    if args.worker in GATEWAYS:
        out = asyncio.run(run_gateway(args, args.worker))
    elif args.worker == "sdk":
        out = asyncio.run(run_sdk(args))
    elif args.worker == "floor":
        out = asyncio.run(run_floor(args))
    else:
        out = run_prefect(args)
    meter = out.pop("meter")
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    out.update(n=args.n, cpu_s=meter.cpu_s, wall_s=meter.wall_s, peak_rss_mb=self_usage.ru_maxrss / 1024)
    Path(args.out).write_bytes(orjson.dumps(out))


# --- the driver -------------------------------------------------------------------------------

def run_contender(name: str, n: int, args: argparse.Namespace, scratch: Path) -> dict:
    from facets.simulator.server import SimulatorProcess

    rpm = 0 if args.micro else args.rpm
    sim = SimulatorProcess(rpm=rpm, latency_ms=args.latency_ms, jitter_ms=args.jitter_ms, seed=args.seed)
    home = scratch / name
    home.mkdir()
    out, log = home / "result.json", home / "worker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PREFECT_API_"))}
    env.update(PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    command = [sys.executable, __file__, "--worker", name, "--n", str(n), "--rpm", str(rpm),
               "--in-flight", str(args.in_flight), "--out", str(out), "--data-dir", str(home / "data")]
    with sim:
        sim_proc = __import__("psutil").Process(sim.process.pid)
        sim_cpu0 = sum(sim_proc.cpu_times()[:2])
        with open(log, "wb") as sink:
            done = subprocess.run([*command, "--base-url", sim.base_url], env=env, stdout=sink, stderr=subprocess.STDOUT)
        stats = sim.stats(timestamps=True)
        sim_cpu = sum(sim_proc.cpu_times()[:2]) - sim_cpu0
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"contender {name} failed (exit {done.returncode}):\n{tail}")
    result = orjson.loads(out.read_bytes())
    admitted = stats.pop("admitted_timestamps")
    result.update(
        name=name,
        requests=stats["requests"],
        rate_limited=stats["rate_limited"],
        endpoint_ok=stats["ok"],
        rpm_share=rpm_share(admitted, rpm),
        server_cpu_ms_per_request=1000 * sim_cpu / max(1, stats["requests"]),
    )
    return result


def rpm_share(admitted: list[float], rpm: int) -> float | None:
    """Requests the endpoint admitted per minute after the first WARMUP_S seconds, over R."""
    if not rpm or len(admitted) < 2:
        return None
    start = admitted[0] + WARMUP_S
    later = [t for t in admitted if t >= start]
    span = admitted[-1] - start
    if span <= 1.0 or len(later) < 2:
        return None
    return len(later) / span * 60 / rpm


def show(results: list[dict], args: argparse.Namespace) -> None:
    rpm = 0 if args.micro else args.rpm
    print()
    header = f"{'contender':<28}{'N':>7}{'ok':>7}{'RPM/R':>8}{'429s':>8}{'CPU-ms/call':>13}{'peak RSS MB':>13}{'ok/s':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        share = "-" if r["rpm_share"] is None else f"{r['rpm_share']:.3f}"
        print(f"{LABELS[r['name']]:<28}{r['n']:>7}{r['ok']:>7}{share:>8}{pct(r):>8}{cpu_ms(r):>13.3f}"
              f"{r['peak_rss_mb']:>13.0f}{ok_rate(r):>9.1f}")
    print()
    for r in results:
        extra = f", its server subprocess {1000 * r['server_cpu_s'] / r['n']:.2f} CPU-ms/call more" if "server_cpu_s" in r else ""
        print(f"{LABELS[r['name']]}: {r['requests']} requests at the endpoint for {r['n']} calls, "
              f"{r['rate_limited']} 429s, wall {r['wall_s']:.1f} s, simulator {r['server_cpu_ms_per_request']:.2f} "
              f"CPU-ms/request{extra}")
    by_name = {r["name"]: r for r in results}
    gateways = [r for r in results if r["name"] in GATEWAYS]
    baselines = [by_name[b] for b in BASELINES if b in by_name]
    if gateways and baselines:
        print("\nratios, gateway / baseline (CPU and RSS: lower is better; ok/s: higher is better)")
        for g in gateways:
            for b in baselines:
                print(f"  {LABELS[g['name']]} / {LABELS[b['name']]}: CPU-ms/call x{cpu_ms(g) / cpu_ms(b):.2f}, "
                      f"peak RSS x{g['peak_rss_mb'] / b['peak_rss_mb']:.2f}, "
                      f"ok/s x{ok_rate(g) / ok_rate(b):.2f}, "
                      f"429s {pct(g)} vs {pct(b)}")
    if gateways:
        print("\ntargets (gateway, journal and limiter included)")
        for g in gateways:
            checks = [("CPU-ms/call <= 1.0", cpu_ms(g) <= TARGET_CPU_MS),
                      ("peak RSS <= 300 MB", g["peak_rss_mb"] <= TARGET_RSS_MB),
                      ("all calls ok", g["ok"] == g["n"])]
            if rpm:
                share = g["rpm_share"]
                checks += [("RPM/R >= 0.95", share is not None and share >= TARGET_RPM_SHARE),
                           ("429s < 1 %", g["rate_limited"] < TARGET_429_SHARE * max(1, g["requests"]))]
            line = ", ".join(f"{text} {'PASS' if ok else 'FAIL'}" for text, ok in checks)
            print(f"  {LABELS[g['name']]}: {line}")


def ok_rate(r: dict) -> float:
    return r["ok"] / r["wall_s"]


def cpu_ms(r: dict) -> float:
    return 1000 * r["cpu_s"] / r["n"]


def pct(r: dict) -> str:
    return f"{100 * r['rate_limited'] / max(1, r['requests']):.2f}%"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="calls per contender (default 20000; --quick 2000)")
    p.add_argument("--rpm", type=int, default=6000, help="the endpoint's RPM limit R, known to the gateway")
    p.add_argument("--latency-ms", type=float, default=None, help="endpoint latency (default 300; --micro 50)")
    p.add_argument("--jitter-ms", type=float, default=None, help="latency varies by +- this (default 100; --micro 0)")
    p.add_argument("--in-flight", type=int, default=64, help="concurrent calls per contender")
    p.add_argument("--prefect-n", type=int, default=None,
                   help="calls for the Prefect baseline (default N/5, at least 1000); compare per-call figures")
    p.add_argument("--contenders", default="lean,openai,sdk,prefect",
                   help="comma list of lean, openai, sdk, prefect; add floor for the least any client pays here")
    p.add_argument("--quick", action="store_true", help="a short sanity run: N=2000")
    p.add_argument("--micro", action="store_true", help="CPU only: 50 ms endpoint, no RPM limit (N default 5000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    p.add_argument("--worker", choices=list(LABELS), help=argparse.SUPPRESS)
    p.add_argument("--base-url", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    args.n = args.n or (2000 if args.quick else 5000 if args.micro else 20_000)
    args.latency_ms = args.latency_ms if args.latency_ms is not None else 50.0 if args.micro else 300.0
    args.jitter_ms = args.jitter_ms if args.jitter_ms is not None else 0.0 if args.micro else 100.0
    args.prefect_n = args.prefect_n or min(args.n, max(1000, args.n // 5))
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(names) - set(LABELS)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}; known: {', '.join(LABELS)}")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    limit = "no RPM limit" if args.micro else f"RPM limit R={args.rpm}"
    print(f"{args.n} structured calls per contender, endpoint {args.latency_ms:g} ms +- {args.jitter_ms:g} ms, "
          f"{limit}, {args.in_flight} in flight; {os.cpu_count()} CPUs")
    if "prefect" in args.names and args.prefect_n != args.n:
        print(f"the Prefect baseline makes N={args.prefect_n} calls (not {args.n}): compare its per-call figures")
    scratch = Path(tempfile.mkdtemp(prefix="facets-bench-gateway-"))
    results = []
    try:
        for name in args.names:
            n = args.prefect_n if name == "prefect" else args.n
            print(f"  running {LABELS[name]} (N={n}) ...", flush=True)
            results.append(run_contender(name, n, args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    show(results, args)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
