"""build-collection at scale against the simulator: wall time against the rate-limit bound, client CPU,
peak RSS, Prefect task runs and the incremental no-op rebuild (issue 4).

    python bench/build.py --quick                   # a small sanity run (N = 50 and 200)
    python bench/build.py --n 65653                 # the paper's size (and N/4), if the machine allows it
    python bench/build.py --n 2500 --rpm 4800 --tpm 7200000 --latency-ms 500 --jitter-ms 150

For each size (N/4, then N; N alone with --no-small) it writes N instructions (plus a 15 % reserve, so that the
flow can draw more when one fails: docs/ARCHITECTURE.md, decision 8) as a user source in JSON lines: prompts cut
from the bundled real records at realistic lengths (the generator of bench/ingest.py), every one kept by the
paper's rules. Then, in a fresh process with its own Prefect home, it runs `build_collection` against a
simulator process (500 ms +- jitter latency, the given RPM and TPM, burst of 1 s like the client's)
with `limit=N` and the source given as `mine=PATH`, then the same config again: the incremental no-op
rebuild, which must make zero requests (counted at the simulator).

Figures per size:
- bound: max(admitted requests / RPM, admitted tokens / TPM), with the requests and tokens the simulator
  actually served (7 per instruction plus repairs and the calls of instructions drawn beyond N);
  wall / bound should be <= 1.1. Wall is the whole flow call (ingest, stages, release), Prefect's
  temporary server already started (its start-up is printed apart: a fixed cost, not one per N).
- client CPU-s per instruction: user + system time of the process running the flow (the flow, Prefect's
  client side, the gateway, the release) over the cold build; the Prefect server that process starts as
  its child is counted apart (its CPU over the same span), the simulator never.
- peak RSS of the flow process after the cold build (ru_maxrss; target < 2 GB at 65k and flat in N),
  and the Prefect server child's own peak (VmHWM) beside it.
- Prefect task runs of each flow run, read back with the Prefect client: expected 5 per shard plus one
  ingest task, never one per call; the no-op only its ingest task (shards whose instructions are all
  complete run no stage).
- no-op rebuild: wall time (target < 60 s) and requests the simulator saw during it (must be 0: N
  instructions are complete, so the failures of the build are not asked again).

`--profile` runs the cold build of the largest size under cProfile and prints the top functions.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAPER_N = 65_653
MODEL = "facets-sim"
API_KEY = "bench-key"
REQUESTS_PER_INSTRUCTION = 7  # 1 tree + 3 system messages + 3 responses
# Extra instructions in the source, drawn only when some fail: the simulator's trees run near their
# 2,048-token cap, and about 6 % of them fail (cut by max_tokens, or repeated subdimensions).
RESERVE = 0.15
TARGET_RATIO = 1.1
TARGET_RSS_MB = 2048
TARGET_NOOP_S = 60.0
QUICK = {"n": 200, "rpm": 3000}
TOKENS_PER_REQUEST_LIMIT = 1500  # default TPM = this x RPM
# The gateway stops a run when most of its last `failure_window` calls failed. About 6 % of the simulator's
# trees fail (cut at max_tokens or repeated subdimensions) and each fails only after its two repairs, at the
# back of the limiter's queue, so a stage's failures all finish together, after its successes: past a few
# hundred instructions the default window of 50 sees nothing but them and stops the build. The bench
# widens the window (and says so) so that the figures are measured; --failure-window 0 keeps the default.
FAILURE_WINDOW = 5000


# --- instructions ------------------------------------------------------------------------------

def _ingest_bench():
    spec = importlib.util.spec_from_file_location("facets_bench_ingest", Path(__file__).with_name("ingest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_instructions(path: Path, count: int, seed: int = 0) -> None:
    """`count` distinct prompts that the paper's rules keep, as {"prompt": ...} lines."""
    import orjson

    from facets.ingest.filters import drop_reason

    generator = _ingest_bench()
    rng = random.Random(seed)
    cut = generator.TextCutter(generator.corpus(), rng)
    written = serial = 0
    with open(path, "wb") as out:
        while written < count:
            serial += 1
            text = cut.prompt(serial).strip()
            if drop_reason(text) is None:
                out.write(orjson.dumps({"prompt": text}) + b"\n")
                written += 1


# --- the measured process ----------------------------------------------------------------------

def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


def _children_cpu_s() -> float:
    total = 0.0
    for child in _children():
        try:
            times = child.cpu_times()
        except Exception:
            continue
        total += times.user + times.system
    return total


class RssTrace(threading.Thread):
    """This process's RSS four times a second, so a peak can be put down to the stages or to the release."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MB)
        self.started = time.perf_counter()
        self.finished = threading.Event()

    def run(self) -> None:
        while not self.finished.wait(0.25):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append((time.perf_counter() - self.started, int(line.split()[1]) / 1024))

    def peak_mb(self, after_s: float = 0.0, before_s: float = math.inf) -> float:
        return max((mb for t, mb in self.samples if after_s <= t < before_s), default=0.0)


def _children_peak_mb() -> float:
    """Peak RSS (VmHWM) of the largest live child: Prefect's temporary server."""
    peak = 0.0
    for child in _children():
        try:
            for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peak


def _sim_stats(url: str) -> dict:
    import urllib.request

    import orjson

    with urllib.request.urlopen(f"{url}/stats", timeout=60) as reply:
        return orjson.loads(reply.read())


async def _start_prefect() -> float:
    from prefect.client.orchestration import get_client

    started = time.perf_counter()
    async with get_client() as client:
        await client.hello()
    return time.perf_counter() - started


async def _task_runs_per_flow_run() -> list[dict]:
    """Task runs of every flow run in this Prefect home (fresh per size), oldest flow run first.
    Task runs reach the server as events, so the count is read until it stops changing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        flow_runs = await client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC)

        async def count(flow_run_id) -> tuple[int, dict[str, int]]:
            total, offset, names = 0, 0, {}
            while True:
                page = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200, offset=offset)
                for run in page:
                    prefix = run.name.split("-", 1)[0]
                    names[prefix] = names.get(prefix, 0) + 1
                total += len(page)
                offset += len(page)
                if len(page) < 200:
                    return total, names

        out, previous, stable = [], None, 0
        for _ in range(60):
            out = []
            for flow_run in flow_runs:
                total, names = await count(flow_run.id)
                out.append({"flow_run": flow_run.name, "state": flow_run.state_name, "task_runs": total, "by_name": names})
            totals = [r["task_runs"] for r in out]
            stable = stable + 1 if totals == previous else 0
            if stable >= 2:
                break
            previous = totals
            await asyncio.sleep(1.0)
        return out


def measure(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: cold build, no-op rebuild, task-run counts."""
    from facets.flows.build import build_collection
    from facets.schemas.config import BuildConfig, EndpointConfig, RateLimits, Retries

    endpoint = EndpointConfig(base_url=args.base_url, api_key=API_KEY, model=MODEL,
                              limits=RateLimits(rpm=args.rpm, tpm=args.tpm, max_in_flight=args.max_in_flight or None),
                              retries=Retries(), **({"failure_window": args.failure_window} if args.failure_window else {}))
    config = BuildConfig(sources=[f"mine={args.source}"], limit=args.n, shard_size=args.shard_size,
                         data_dir=str(args.data_dir), endpoint=endpoint, publish=True)
    out: dict = {"prefect_start_s": asyncio.run(_start_prefect())}

    sim0, cpu0, server0 = _sim_stats(args.sim_url), _cpu_s(), _children_cpu_s()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started, trace = time.perf_counter(), RssTrace()
    trace.start()
    report = asyncio.run(build_collection(config))
    wall = time.perf_counter() - started
    trace.finished.set()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    cpu, server_cpu = _cpu_s() - cpu0, _children_cpu_s() - server0
    sim1 = _sim_stats(args.sim_url)
    out["cold"] = {"wall_s": wall, "cpu_s": cpu, "server_cpu_s": server_cpu,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   # the report's seconds end where the stages do; the release is published after them
                   "peak_rss_stages_mb": trace.peak_mb(before_s=report["seconds"]),
                   "peak_rss_release_mb": trace.peak_mb(after_s=report["seconds"]),
                   "server_peak_rss_mb": _children_peak_mb(), "report": report,
                   "requests": sim1["requests"] - sim0["requests"], "served": sim1["admitted"] - sim0["admitted"],
                   "rate_limited": sim1["rate_limited"] - sim0["rate_limited"],
                   "paid_twice": sim1["paid_twice"] - sim0["paid_twice"],
                   "tokens": (sim1["prompt_tokens"] + sim1["completion_tokens"]
                              - sim0["prompt_tokens"] - sim0["completion_tokens"])}

    started, cpu0 = time.perf_counter(), _cpu_s()
    again = asyncio.run(build_collection(config))
    wall = time.perf_counter() - started
    sim2 = _sim_stats(args.sim_url)
    out["noop"] = {"wall_s": wall, "cpu_s": _cpu_s() - cpu0, "requests": sim2["requests"] - sim1["requests"],
                   "paid_twice": sim2["paid_twice"] - sim1["paid_twice"],
                   "stages": again["stages"], "release": again.get("release"), "accepted": again["accepted"]}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["task_runs"] = asyncio.run(_task_runs_per_flow_run())
    return out


# --- the driver --------------------------------------------------------------------------------

def run_size(n: int, args: argparse.Namespace, scratch: Path) -> dict:
    import psutil

    from facets.simulator.server import SimulatorProcess

    home = scratch / f"n{n}"
    home.mkdir(parents=True)
    source = home / "instructions.jsonl"
    drawn_max = n + max(10, math.ceil(n * RESERVE))
    write_instructions(source, drawn_max, seed=args.seed)
    sim = SimulatorProcess(rpm=args.rpm, tpm=args.tpm, latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
                           seed=args.seed, burst_s=args.burst_s)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PREFECT_API_"))}
    env.update(PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    out_file, log = home / "result.json", home / "flow.log"
    profile = str(home / "flow.prof") if args.profile else ""
    load0 = os.getloadavg()
    with sim:
        sim_proc = psutil.Process(sim.process.pid)
        sim_cpu0 = sum(sim_proc.cpu_times()[:2])
        command = [sys.executable, __file__, "--measure", "--n", str(n), "--rpm", str(args.rpm), "--tpm", str(args.tpm),
                   "--max-in-flight", str(args.max_in_flight), "--shard-size", str(args.shard_size),
                   "--failure-window", str(args.failure_window),
                   "--source", str(source), "--data-dir", str(home / "data"), "--base-url", sim.base_url,
                   "--sim-url", sim.url, "--out", str(out_file), "--profile-to", profile]
        with open(log, "wb") as sink:
            done = subprocess.run(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
        stats = sim.stats(timestamps=True)
        sim_cpu = sum(sim_proc.cpu_times()[:2]) - sim_cpu0
    if done.returncode != 0:
        raise SystemExit(f"the build of N={n} failed (exit {done.returncode}); log {log}:\n"
                         + log.read_text(errors="replace")[-4000:])
    result = json.loads(out_file.read_text())
    cold = result["cold"]
    report = cold["report"]
    admitted = stats.pop("admitted_timestamps")
    (home / "admitted.json").write_text(json.dumps(admitted))
    # the bound counts what the simulator served during the cold build only (the no-op's requests apart)
    served = cold["served"]
    tokens = cold["tokens"]
    admitted = admitted[:served]
    bound_requests = served / args.rpm * 60 if args.rpm else 0.0
    bound_tokens = tokens / args.tpm * 60 if args.tpm else 0.0
    bound = max(bound_requests, bound_tokens)
    shards = report["shards"]
    return {
        "n": n, "accepted": report["accepted"], "drawn": report["drawn"], "shards": shards,
        "requests_seen": cold["requests"], "served": served, "rate_limited": cold["rate_limited"],
        "paid_twice": cold["paid_twice"], "faults": sum(stats["faults"].values()),
        "rate_limited_by": stats["rate_limited_by"],
        "failed_calls": sum(c["failed"] for c in report["stages"].values()),
        "noop_paid_twice": result["noop"]["paid_twice"],
        "requests_per_instruction": served / max(1, report["accepted"]),
        "tokens": tokens, "tokens_per_request": tokens / max(1, served),
        "bound_requests_s": bound_requests, "bound_tokens_s": bound_tokens, "bound_s": bound,
        "binding": "RPM" if bound_requests >= bound_tokens else "TPM",
        "wall_s": cold["wall_s"], "stages_s": report["seconds"], "ratio": cold["wall_s"] / bound if bound else None,
        "served_span_s": admitted[-1] - admitted[0] if len(admitted) > 1 else 0.0,
        "cpu_s": cold["cpu_s"], "cpu_s_per_instruction": cold["cpu_s"] / max(1, report["accepted"]),
        "cpu_ms_per_request": 1000 * cold["cpu_s"] / max(1, served),
        "server_cpu_s": cold["server_cpu_s"], "sim_cpu_s": sim_cpu,
        "peak_rss_mb": cold["peak_rss_mb"], "peak_rss_mb_after_noop": result["peak_rss_mb"],
        "peak_rss_stages_mb": cold["peak_rss_stages_mb"], "peak_rss_release_mb": cold["peak_rss_release_mb"],
        "server_peak_rss_mb": cold["server_peak_rss_mb"],
        "task_runs": result["task_runs"], "expected_task_runs": 5 * shards + 1,
        "noop_wall_s": result["noop"]["wall_s"], "noop_requests": result["noop"]["requests"],
        "noop_cpu_s": result["noop"]["cpu_s"], "noop_release": result["noop"]["release"],
        "release": report.get("release"), "failures": report["failures"],
        "prefect_start_s": result["prefect_start_s"], "load_before": load0, "load_after": os.getloadavg(),
        "profile": profile,
    }


def show(results: list[dict], args: argparse.Namespace) -> bool:
    print(f"\n{os.cpu_count()} CPUs; simulator {args.latency_ms:g} ms +- {args.jitter_ms:g} ms, RPM {args.rpm:g}, "
          f"TPM {args.tpm:g} ({'unlimited' if not args.tpm else 'limited'}), burst {args.burst_s:g} s; "
          f"shard size {args.shard_size}, {args.max_in_flight or 'adaptive (RPM x latency)'} in flight")
    if args.failure_window:
        print(f"early-stop window widened from 50 to {args.failure_window} calls (FAILURE_WINDOW in this file says why)")
    largest = max(r["n"] for r in results)
    if largest < PAPER_N:
        print(f"N = {largest} is BELOW the paper's {PAPER_N:,}: {args.why_small}")
    ok = True
    for r in results:
        runs = r["task_runs"]
        cold_runs = runs[0]["task_runs"] if runs else None
        noop_runs = runs[1]["task_runs"] if len(runs) > 1 else None
        ratio = r["ratio"]
        lines = [
            ("N (accepted / wanted; drawn)", f"{r['accepted']} / {r['n']}; {r['drawn']} drawn, {r['shards']} shards"),
            ("requests served (seen, 429s)", f"{r['served']} ({r['requests_seen']} seen, {r['rate_limited']} x 429 "
                                              f"{r['rate_limited_by']}, "
                                              f"{r['faults']} faults, paid twice {r['paid_twice']}); "
                                              f"{r['requests_per_instruction']:.3f} per accepted instruction"),
            ("tokens served", f"{r['tokens']:,} ({r['tokens_per_request']:.0f} per request)"),
            ("bound = max(req/RPM, tok/TPM)", f"{r['bound_s']:.1f} s ({r['binding']}; requests {r['bound_requests_s']:.1f} s, "
                                               f"tokens {r['bound_tokens_s']:.1f} s)"),
            ("wall (flow call)", f"{r['wall_s']:.1f} s (stages {r['stages_s']:.1f} s; first to last served "
                                 f"request {r['served_span_s']:.1f} s; Prefect server start {r['prefect_start_s']:.1f} s, not in wall)"),
            ("wall / bound", f"{ratio:.3f}  (target <= {TARGET_RATIO})" if ratio else "n/a (no limit)"),
            ("client CPU-s per instruction", f"{r['cpu_s_per_instruction'] * 1000:.1f} ms ({r['cpu_s']:.1f} s in all, "
                                             f"{r['cpu_ms_per_request']:.2f} ms per request); Prefect server child "
                                             f"{r['server_cpu_s']:.1f} s apart; simulator {r['sim_cpu_s']:.1f} s, not counted"),
            ("peak RSS, flow process", f"{r['peak_rss_mb']:.0f} MB after the build, {r['peak_rss_mb_after_noop']:.0f} MB "
                                       f"after the no-op (target < {TARGET_RSS_MB}); Prefect server child {r['server_peak_rss_mb']:.0f} MB"),
            ("", f"sampled: {r['peak_rss_stages_mb']:.0f} MB at most during the stages, "
                 f"{r['peak_rss_release_mb']:.0f} MB while the release was published"),
            ("Prefect task runs", f"build {cold_runs} (expected 5 x {r['shards']} shards + 1 ingest = "
                                  f"{r['expected_task_runs']}), no-op {noop_runs} (expected 1: complete shards run no stage)"),
            ("no-op rebuild", f"{r['noop_wall_s']:.1f} s, {r['noop_requests']} requests, {r['noop_paid_twice']} of them "
                              f"answered before (target < {TARGET_NOOP_S:g} s and 0); new release: "
                              f"{bool(r['noop_release'] and r['noop_release']['is_new'])}"),
            ("", f"the build left {r['failed_calls']} failed calls; with N instructions complete the no-op asks "
                 "none of them again (a build short of N would, 1 + 2 repairs each)"),
            ("load average before / after", f"{' '.join(f'{x:.2f}' for x in r['load_before'])} / "
                                            f"{' '.join(f'{x:.2f}' for x in r['load_after'])}"),
        ]
        if r["failures"]:
            lines.append(("failures", ", ".join(f"{k} x{v}" for k, v in r["failures"].items())))
        print(f"\n== N = {r['n']} ==")
        for label, value in lines:
            print(f"  {label:<31} {value}")
        ok &= bool(ratio is None or ratio <= TARGET_RATIO) and r["noop_wall_s"] < TARGET_NOOP_S
        ok &= r["noop_requests"] == 0 and r["peak_rss_mb"] < TARGET_RSS_MB and r["accepted"] == r["n"]
        ok &= cold_runs == r["expected_task_runs"] and noop_runs == 1
    if len(results) > 1:
        small, big = sorted(results, key=lambda r: r["n"])[0], sorted(results, key=lambda r: r["n"])[-1]
        growth = big["peak_rss_mb"] / small["peak_rss_mb"]
        from facets.schemas.config import BuildConfig

        concurrent = BuildConfig.model_fields["max_concurrent_shards"].default  # the bench leaves it at its default
        in_flight = concurrent * args.shard_size
        print(f"\npeak RSS N={big['n']} / N={small['n']}: {growth:.2f} ({big['n'] / small['n']:.0f}x the instructions)")
        if small["n"] < in_flight:
            print(f"  note: a build holds the rows of the shards in flight ({concurrent} at once, about "
                  f"{in_flight} instructions at shard size {args.shard_size}); at N={small['n']} fewer are in flight, so "
                  f"this ratio mixes growth in N with growth in shards in flight: both sizes >= {in_flight} isolate N")
    print(f"\ntargets: wall/bound <= {TARGET_RATIO}, peak RSS < {TARGET_RSS_MB} MB, no-op < {TARGET_NOOP_S:g} s with 0 "
          f"requests, N accepted, task runs as expected: {'met' if ok else 'NOT all met'}")
    for r in results:
        if r["profile"]:
            print_profile(r["profile"])
    return ok


def print_profile(path: str, top: int = 30) -> None:
    import pstats

    print(f"\ncProfile of the cold build ({path}), top {top} by own time:")
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(top)
    print(f"top {top} by cumulative time:")
    stats.sort_stats("cumulative").print_stats(top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=PAPER_N, help="accepted instructions wanted (default: the paper's)")
    parser.add_argument("--rpm", type=float, default=6000, help="the simulator's and the client's requests per minute")
    parser.add_argument("--tpm", type=float, default=None,
                        help=f"tokens per minute, 0: not limited (default {TOKENS_PER_REQUEST_LIMIT} x RPM: requests "
                             "average about 1,200 tokens, so the token bound stays near 0.8 of the request bound)")
    parser.add_argument("--latency-ms", type=float, default=500)
    parser.add_argument("--jitter-ms", type=float, default=150)
    parser.add_argument("--burst-s", type=float, default=1.0, help="the simulator's bucket, in seconds of its limits")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--max-in-flight", type=int, default=0, help="0: the product default (RPM x latency seen)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--failure-window", type=int, default=FAILURE_WINDOW,
                        help="calls the gateway's early stop looks at (0: the product default, 50); see FAILURE_WINDOW")
    parser.add_argument("--no-small", action="store_true", help="skip the second size (N/4)")
    parser.add_argument("--quick", action="store_true", help=f"a small sanity run: N={QUICK['n']}, RPM {QUICK['rpm']}")
    parser.add_argument("--profile", action="store_true", help="cProfile the cold build of the largest size")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    # the measured process
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    for name in ("--source", "--data-dir", "--base-url", "--sim-url", "--out", "--profile-to"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        args.profile = args.profile_to or None
        Path(args.out).write_text(json.dumps(measure(args)))
        return 0
    if args.quick:
        for key, value in QUICK.items():
            if f"--{key}" not in sys.argv:
                setattr(args, key, value)
    if args.tpm is None:
        args.tpm = TOKENS_PER_REQUEST_LIMIT * args.rpm
    args.why_small = ("--quick sanity run" if args.quick else
                      "the largest this machine ran in the time given (the bound at this RPM grows with N)")
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="facets-build-bench-"))
    sizes = [args.n] if args.no_small else [max(1, args.n // 4), args.n]
    try:
        results = []
        for i, n in enumerate(sizes):
            keep_profile = args.profile and n == max(sizes)
            results.append(run_size(n, argparse.Namespace(**{**vars(args), "profile": keep_profile}), scratch))
            print(f"N={n}: wall {results[-1]['wall_s']:.1f} s, bound {results[-1]['bound_s']:.1f} s", file=sys.stderr)
        ok = show(results, args)
    finally:
        if not args.keep and not args.profile:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
