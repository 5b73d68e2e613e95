"""build-collection spread over 1, 2 and 4 workers under one shared RPM/TPM budget (issue 7).

    python bench/scale.py --quick                       # N = 300 with 1 and 2 workers: a sanity run
    python bench/scale.py --n 65653 --workers 1,2,4 --rpm 20000 --shard-size 1024 --max-tree-shards 4 \
        --concurrency 10                                # the paper's size

For each worker count W, on loopback: a fresh PostgreSQL database behind a Prefect server and W process
workers of the cpu pool (`facets server --workers W`, flows/commands/server.py), the data dir on one
S3-compatible server (moto), the shared limit in Redis, and one simulator process with the RPM and TPM
(500 ms +- jitter latency). The build is `facets build --shard-deployment build-shard/default` in a
process of its own: every shard is a flow run that some worker takes, each paces at its share of the
limit (`share_via`).

At 65k, shards of 1024 make about 70 shard runs instead of 300: each run is a new Python process, and its
start-up costs CPU that the machine running every part of the bench does not have to spare.

Figures per W:
- wall / bound: bound = max(requests served / RPM, tokens served / TPM) from the simulator's counters;
  wall is the whole `facets build` command (ingest, shards, release). Target <= 1.1 at every W.
- the most requests the simulator admitted in any 60 s window, beside the RPM (the shared limit held?), and
  per 10 s the use of the RPM and the 429s (simulator.json in the run's folder with --keep has every one).
- peak RSS per worker: the worker and every flow run process it started, summed, sampled twice a second.
- endpoint connections per 1,000 LLM calls: the TCP connections the simulator's requests came on (a
  pool that shrinks and grows again costs a connect on both ends).
- Prefect API requests per 1,000 LLM calls: HTTP requests in the server's access log during the build
  (workers, flow runs and the build together; events travel over websockets and are not counted).
- S3 requests per shard: every request moto served during the build, over the shards.
- where the time went, from the server's flow and task runs: how long a shard run waited for a worker
  and took to start its first stage, how busy the tree slots were, how many shard runs ran at once on
  average; and how busy the machine's CPUs were (every process on it: server, workers, simulator, S3).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAPER_N = 65_653
REDIS = "redis://127.0.0.1:6379/0"
TARGET_RATIO = 1.1
QUICK = {"n": 300, "workers": "1,2", "rpm": 3000}
ACCESS = re.compile(r'"(?:GET|POST|PATCH|PUT|DELETE) /api/')


def _bench_build():
    spec = importlib.util.spec_from_file_location("facets_bench_build", Path(__file__).with_name("build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RssSampler(threading.Thread):
    """Peak RSS of each worker's process tree (the worker and the flow runs it started), summed."""

    def __init__(self, pids: list[int], every_s: float = 0.5):
        super().__init__(daemon=True)
        self.pids, self.every_s = pids, every_s
        self.peaks = [0.0] * len(pids)
        self.flow_run_peak = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._done.wait(self.every_s):
            for i, pid in enumerate(self.pids):
                try:
                    root = psutil.Process(pid)
                    family = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                sizes = []
                for proc in family:
                    try:
                        sizes.append(proc.memory_info().rss / 2**20)
                    except psutil.NoSuchProcess:
                        pass
                self.peaks[i] = max(self.peaks[i], sum(sizes))
                self.flow_run_peak = max(self.flow_run_peak, max(sizes[1:], default=0.0))

    def stop(self) -> None:
        self._done.set()
        self.join(5)


PARTS = [("simulator", "cli simulate"), ("prefect server", "prefect server"), ("worker", "prefect worker"),
         ("shard runs", "prefect.engine"), ("build", "cli build"), ("S3 (moto)", "moto.server"),
         ("postgres", "postgres"), ("redis", "redis-server")]


class CpuByPart(threading.Thread):
    """CPU seconds each part of the bench spent (every process on the machine, by its command line):
    where a saturated machine's time goes. A process is read until it exits; its last reading counts."""

    def __init__(self, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.every_s, self.seen, self.parts = every_s, {}, {}
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        while True:
            for proc in psutil.process_iter(["pid", "cmdline", "name", "cpu_times", "create_time"]):
                times = proc.info["cpu_times"]
                if times is None:
                    continue
                line = " ".join(proc.info["cmdline"] or [proc.info["name"] or ""])
                part = next((name for name, needle in PARTS if needle in line), "other")
                key = (proc.info["pid"], proc.info["create_time"])
                self.seen[key] = (part, times.user + times.system)
            if self._done.wait(self.every_s):
                break

    def start(self) -> None:
        super().start()
        time.sleep(self.every_s * 1.5)
        self.base = dict(self.seen)  # what processes alive before the build had spent already

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join(10)
        spent: Counter = Counter()
        for key, (part, seconds) in self.seen.items():
            spent[part] += seconds - self.base.get(key, (part, 0.0))[1]
        return dict(spent.most_common())


def run_workers(workers: int, args: argparse.Namespace, source: Path, scratch: Path, s3) -> dict:
    from facets.flows.commands.server import LocalPrefect, free_port
    from facets.testing.postgres import scratch_database
    from facets.simulator.server import SimulatorProcess

    home = scratch / f"w{workers}"
    home.mkdir(parents=True)
    database_url, drop_database = scratch_database()
    data_dir = f"{s3.make_bucket(f'scale-{workers}-{uuid.uuid4().hex[:6]}')}/data"
    sim = SimulatorProcess(rpm=args.rpm, tpm=args.tpm, latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
                           seed=args.seed, burst_s=1.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PREFECT_API_"))}
    env.update(s3.env(), PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_LOGGING_LEVEL="INFO",
               XDG_CACHE_HOME=str(home / "cache"), OPENAI_API_KEY="bench-key",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    limits = {"rpm": args.rpm, "tpm": args.tpm, "share_via": REDIS}
    config = {"sources": [f"mine={source}"], "limit": args.n, "shard_size": args.shard_size, "data_dir": data_dir,
              "max_concurrent_shards": args.concurrency,
              "max_tree_shards": args.max_tree_shards, "shard_deployment": "build-shard/default",
              "endpoint": {"model": "facets-sim", "limits": limits, "failure_window": args.failure_window}}
    (home / "config.json").write_text(json.dumps(config))
    try:
        with sim, LocalPrefect(ROOT, port=free_port(), database_url=database_url, pools=["cpu"],
                               cpu_workers=workers, worker_limit=args.worker_limit, log_dir=home / "logs",
                               env={**env, "OPENAI_BASE_URL": sim.base_url}) as stack:
            if args.endpoint_nice:  # the endpoint stands for a service on machines of its own
                os.setpriority(os.PRIO_PROCESS, sim.process.pid, args.endpoint_nice)
            sampler = RssSampler([w.process.pid for w in stack.workers])
            sampler.start()
            cpu_parts = CpuByPart()
            cpu_parts.start()
            api0 = _api_requests(stack.server_log)
            s3_0, sim0, log0 = sum(s3.requests().values()), sim.stats(), len(s3.log())
            started, cpu0 = time.perf_counter(), _cpu_busy()
            with open(home / "build.log", "wb") as log:
                done = subprocess.run([sys.executable, "-m", "facets.flows.cli", "build", "--config",
                                       str(home / "config.json"), "--quiet"],
                                      env={**env, "PREFECT_API_URL": stack.api_url, "OPENAI_BASE_URL": sim.base_url},
                                      stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            wall, cpu = time.perf_counter() - started, _cpu_busy() - cpu0
            sampler.stop()
            cpu_by_part = cpu_parts.stop()
            spent = timeline(stack.api_url, args.max_tree_shards)
            stats, s3_requests = sim.stats(timestamps=True), sum(s3.requests().values()) - s3_0
            (home / "simulator.json").write_text(json.dumps(stats))  # kept with --keep, for a closer look
            s3_kinds = _s3_kinds(s3.log()[log0:])
            api = _api_requests(stack.server_log) - api0
    finally:
        drop_database()
    text = (home / "build.log").read_text(errors="replace")
    if done.returncode != 0:
        raise SystemExit(f"the build with {workers} workers failed (exit {done.returncode}):\n{text[-4000:]}")
    shards = int(re.search(r"\((\d+) drawn, (\d+) shards\)", text)[2])
    served = stats["admitted"] - sim0["admitted"]
    tokens = stats["prompt_tokens"] + stats["completion_tokens"] - sim0["prompt_tokens"] - sim0["completion_tokens"]
    bound = max(served / args.rpm * 60, tokens / args.tpm * 60 if args.tpm else 0.0)
    return {"workers": workers, "wall_s": wall, "bound_s": bound, "ratio": wall / bound, "served": served,
            "tokens": tokens, "max_in_60s": stats["max_ok_in_window"], "rate_limited": stats["rate_limited"],
            "paid_twice": stats["paid_twice"], "shards": shards, "peak_rss_mb": sampler.peaks,
            "flow_run_peak_mb": sampler.flow_run_peak, "api_requests": api,
            "api_per_1000_calls": 1000 * api / max(1, stats["requests"] - sim0["requests"]),
            "s3_requests": s3_requests, "s3_per_shard": s3_requests / max(1, shards),
            "s3_kinds_per_shard": {k: n / max(1, shards) for k, n in s3_kinds.most_common(6)},
            "accepted": re.search(r"accepted (\d+) of (\d+)", text)[1], "timeline": spent,
            "limited_by": stats["rate_limited_by"], "use_by_10s": _use_by_10s(stats["admitted_timestamps"], args.rpm),
            "refused_by_10s": _refused_by_10s(stats["rate_limited_timestamps"], stats["admitted_timestamps"]),
            "cpu_busy": cpu / wall / (os.cpu_count() or 1), "cpu_by_part": cpu_by_part,
            "calls": stats["requests"] - sim0["requests"],
            "connections": stats["connections"] - sim0["connections"]}


def _runs(api_url: str, kind: str, body: dict) -> list[dict]:
    """Every flow or task run the server holds that matches `body`, page by page."""
    found: list[dict] = []
    while True:
        request = urllib.request.Request(f"{api_url}/{kind}/filter", method="POST",
                                         data=json.dumps({**body, "limit": 200, "offset": len(found)}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            page = json.load(reply)
        found += page
        if len(page) < 200:
            return found


def _at(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp).timestamp() if stamp else None


def _busy(spans: list[tuple[float, float]], start: float, end: float) -> float:
    """Mean number of the spans open at once over [start, end]."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans) / max(end - start, 1e-9)


def timeline(api_url: str, max_tree_shards: int) -> dict:
    """Where a build's time went, from the flow and task runs the server recorded."""
    shard_runs = [r for r in _runs(api_url, "flow_runs", {"flows": {"name": {"any_": ["build-shard"]}}})
                  if r.get("start_time") and r.get("end_time")]
    tasks = [t for t in _runs(api_url, "task_runs", {}) if t.get("start_time") and t.get("end_time")]
    first_task: dict[str, float] = {}
    for t in tasks:
        run = t.get("flow_run_id")
        first_task[run] = min(first_task.get(run, math.inf), _at(t["start_time"]))
    trees = [(_at(t["start_time"]), _at(t["end_time"])) for t in tasks if t["name"].startswith("preference_trees-")]
    runs = [(_at(r["start_time"]), _at(r["end_time"])) for r in shard_runs]
    if not runs:
        return {}
    start, end = min(a for a, _ in runs), max(b for _, b in runs)
    waits = [_at(r["start_time"]) - _at(r["expected_start_time"]) for r in shard_runs if r.get("expected_start_time")]
    starts = [first_task[r["id"]] - _at(r["start_time"]) for r in shard_runs if r["id"] in first_task]
    tree_seconds = [b - a for a, b in trees]
    return {"shard_runs": len(runs), "phase_s": end - start, "run_s": sum(b - a for a, b in runs) / len(runs),
            "wait_s": sum(waits) / max(1, len(waits)), "first_stage_s": sum(starts) / max(1, len(starts)),
            "tree_s": sum(tree_seconds) / max(1, len(tree_seconds)), "trees": len(trees),
            "tree_busy": _busy(trees, start, end) / max_tree_shards, "running": _busy(runs, start, end)}


def _use_by_10s(admitted: list[float], rpm: float) -> list[int]:
    """Requests the simulator admitted in each 10 s from the first to the last, as % of the RPM's 10 s worth."""
    if not admitted:
        return []
    first = admitted[0]
    counts = Counter(int((t - first) // 10) for t in admitted)
    return [round(100 * counts[i] / (rpm / 6)) for i in range(max(counts) + 1)]


def _refused_by_10s(refused: list[tuple[float, str]], admitted: list[float]) -> list[int]:
    """429s the simulator answered in each 10 s, on the same windows as `_use_by_10s`."""
    if not admitted:
        return []
    first = admitted[0]
    counts = Counter(int((t - first) // 10) for t, _ in refused if t >= first)
    return [counts[i] for i in range(int((admitted[-1] - first) // 10) + 1)]


def _cpu_busy() -> float:
    """Seconds of CPU the whole machine spent so far (all cores, every process)."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _s3_kinds(log: list[tuple[str, str, int]]) -> Counter:
    """S3 requests by method and what they touched: a listing, or the data dir's folder (journal segments,
    a stage, the instructions, the shard summaries)."""
    kinds: Counter = Counter()
    for method, path, _ in log:
        where, _, query = path.partition("?")
        parts = where.strip("/").split("/")[2:]  # past the bucket and the data dir's prefix
        if "list-type" in query or "prefix=" in query:
            area = "list"
        elif parts[:1] in (["journal"], ["stages"]):
            area = "/".join(parts[:2])
        else:
            area = parts[0] if parts else "(bucket)"
        kinds[f"{method} {area}"] += 1
    return kinds


def _api_requests(log: Path) -> int:
    try:
        return sum(1 for line in log.read_text(errors="replace").splitlines() if ACCESS.search(line))
    except OSError:
        return 0


def show(results: list[dict], args: argparse.Namespace) -> bool:
    print(f"\n{os.cpu_count()} CPUs; N = {args.n}; simulator {args.latency_ms:g} ms +- {args.jitter_ms:g} ms, "
          f"RPM {args.rpm:g}, TPM {args.tpm:g}; shard size {args.shard_size}; worker limit {args.worker_limit}; "
          f"{args.concurrency} shard runs in flight at most, "
          f"{args.max_tree_shards} making trees at once"
          + (f"; the simulator at niceness {args.endpoint_nice}" if args.endpoint_nice else ""))
    if args.n < PAPER_N:
        print(f"N = {args.n} is BELOW the paper's {PAPER_N:,}: {args.why_small}")
    ok = True
    for r in results:
        rss = ", ".join(f"{mb:.0f}" for mb in r["peak_rss_mb"])
        print(f"\n== {r['workers']} worker(s) ==")
        for label, value in [
            ("accepted", f"{r['accepted']} of {args.n}, {r['shards']} shards"),
            ("wall / bound", f"{r['ratio']:.3f} (wall {r['wall_s']:.1f} s, bound {r['bound_s']:.1f} s; "
                             f"target <= {TARGET_RATIO})"),
            ("most admitted in 60 s", f"{r['max_in_60s']} (RPM {args.rpm:g}); 429s {r['rate_limited']} "
                                      f"{r['limited_by'] or ''}, paid twice {r['paid_twice']}"),
            ("% of RPM by 10 s", " ".join(str(u) for u in r["use_by_10s"])),
            ("429s by 10 s", " ".join(str(n) for n in r["refused_by_10s"])),
            ("peak RSS per worker", f"{rss} MB (worker and its flow runs); one flow run at most "
                                    f"{r['flow_run_peak_mb']:.0f} MB"),
            ("endpoint connections", f"{r['connections']} = {1000 * r['connections'] / max(1, r['calls']):.0f} "
                                     "per 1,000 LLM calls"),
            ("Prefect API requests", f"{r['api_requests']} = {r['api_per_1000_calls']:.0f} per 1,000 LLM calls"),
            ("S3 requests", f"{r['s3_requests']} = {r['s3_per_shard']:.0f} per shard"),
            ("  per shard, the most", ", ".join(f"{k} {n:.0f}" for k, n in r["s3_kinds_per_shard"].items())),
            ("machine CPU busy", f"{100 * r['cpu_busy']:.0f}% of {os.cpu_count()} CPUs over the build"),
            ("  CPU-ms per LLM call", ", ".join(f"{part} {1000 * s / max(1, r['calls']):.1f}"
                                               for part, s in r["cpu_by_part"].items())),
            *_timeline_lines(r["timeline"]),
        ]:
            print(f"  {label:<24} {value}")
        ok &= r["ratio"] <= TARGET_RATIO
    print(f"\ntarget wall/bound <= {TARGET_RATIO} at every worker count: {'met' if ok else 'NOT met'}")
    return ok


def _timeline_lines(t: dict) -> list[tuple[str, str]]:
    if not t:
        return []
    return [("shard runs", f"{t['shard_runs']} over {t['phase_s']:.0f} s, {t['running']:.1f} running at once on "
                           f"average, {t['run_s']:.1f} s each"),
            ("  a run's start", f"{t['wait_s']:.1f} s for a worker, then {t['first_stage_s']:.1f} s to its first stage"),
            ("  tree slots busy", f"{100 * t['tree_busy']:.0f}% ({t['trees']} tree stages, {t['tree_s']:.1f} s each)")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=PAPER_N)
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--rpm", type=float, default=6000)
    parser.add_argument("--tpm", type=float, default=None, help="default 1,500 x RPM (as bench/build.py)")
    parser.add_argument("--latency-ms", type=float, default=500)
    parser.add_argument("--jitter-ms", type=float, default=150)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--worker-limit", type=int, default=None,
                        help="flow runs per worker at once (default: --concurrency, so one worker runs them all)")
    parser.add_argument("--concurrency", type=int, default=8, help="shard runs in flight at once (the default)")
    parser.add_argument("--max-tree-shards", type=int, default=1, help="shards making trees at once, all workers")
    parser.add_argument("--failure-window", type=int, default=5000, help="as bench/build.py's FAILURE_WINDOW")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--endpoint-nice", type=int, default=0,
                        help="the simulator's niceness (below 0 needs root): a real endpoint runs on machines of its "
                             "own, and one starved of CPU here answers late, then all at once, past its own bucket")
    parser.add_argument("--quick", action="store_true", help=f"N={QUICK['n']}, workers {QUICK['workers']}")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            if f"--{key}" not in sys.argv:
                setattr(args, key, value)
    if args.tpm is None:
        args.tpm = 1500 * args.rpm
    if args.worker_limit is None:
        args.worker_limit = args.concurrency
    args.why_small = "--quick sanity run" if args.quick else "the largest this machine ran in the time given"
    from facets.testing.s3_server import S3Server

    scratch = args.keep or Path(tempfile.mkdtemp(prefix="facets-scale-bench-"))
    source = scratch / "instructions.jsonl"
    scratch.mkdir(parents=True, exist_ok=True)
    _bench_build().write_instructions(source, args.n + max(10, math.ceil(args.n * 0.15)), seed=args.seed)
    try:
        with S3Server() as s3:
            results = []
            for workers in [int(w) for w in args.workers.split(",")]:
                results.append(run_workers(workers, args, source, scratch, s3))
                show(results[-1:], args)  # each run's figures as soon as it ends: a long bench may be stopped
        ok = show(results, args)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
