"""`facets bench build | review | accept`: the Multifaceted Bench from benchmark prompts, as `releases/<version>/bench/`.

  build   the bench's stages on benchmark prompts; `--target-counts kaist-ai/Multifaceted-Bench` draws as
          many items of each benchmark as the published bench holds (its `source` column)
  review  the items of a bench as JSON lines, for people to read and accept
  accept  publish the items of an accept list (ids, or the review lines marked accepted) as a new bench

Runs the `build-bench` flow in this process on Prefect's embedded server. The endpoint comes from
OPENAI_BASE_URL / OPENAI_API_KEY like `facets build`; with neither set, it runs against the loopback
simulator, which it starts itself and says so (simulated text, for trying the pipeline).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from contextlib import ExitStack
from pathlib import Path

from pydantic import ValidationError

from facets.flows.commands.config_file import config_problem, read_config_file, section

SIMULATOR_MODEL = "facets-sim"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="build the bench: system messages, reference answers and rubrics for benchmark prompts",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = build.add_argument
    add("--config", type=Path, help="a BenchConfig as JSON (or YAML); the flags below override it")
    add("--source", action="append", dest="sources", metavar="NAME=PATH",
        help="benchmark prompts (repeatable): NAME is alpaca_eval, flask, koala, mt_bench or self_instruct; "
             "PATH the benchmark's file or a folder holding it under its published name")
    add("--data-dir", help="data directory (default ./data); its training prompts are left out of the bench")
    add("--against", action="append", metavar="DATA_DIR", help="another data dir whose training prompts to leave out")
    add("--per-benchmark", type=int, help="items drawn per benchmark, seeded (default: all)")
    add("--target-counts", metavar="BENCH",
        help="draw per benchmark as many items as BENCH holds: kaist-ai/Multifaceted-Bench (921 items), a local "
             "copy of it, or any bench folder (replaces --per-benchmark)")
    add("--seed", type=int, help="seed of the draw and of the preference sets (default 0)")
    add("--model", help="the model of every stage (default: the config's, else gpt-4o-mini)")
    add("--rpm", type=float, help="the endpoint's requests per minute")
    add("--max-in-flight", type=int, help="concurrent requests at most")
    add("--max-cost", type=float, help="hard spend cap in USD")
    add("--mode", choices=["online", "batch"], help="online calls, or the OpenAI Batch API at half price")
    add("--shard-size", type=int, help="items per shard, roughly (default 256)")
    add("--templates-dir", help="a directory whose <stage>.txt files replace the bundled prompt templates")
    add("--no-publish", dest="publish", action="store_false", default=None, help="run the stages, publish nothing")
    review = sub.add_parser("review", help="write a bench's items as JSON lines for human review",
                            description="Write one JSON line per bench item (item_id first) for people to read; "
                                        "return the ids to keep to `facets bench accept`.")
    review.add_argument("--bench", required=True, help="a bench folder, its release folder, or a data dir holding one")
    review.add_argument("--out", type=Path, required=True, help="the JSON-lines file to write")
    accepting = sub.add_parser("accept", help="publish only the accepted items of a bench as a new bench release",
                               description="Publish the items of an accept list (one item id a line, or review "
                                           "lines with \"accepted\": true/false) as a new bench release.")
    accepting.add_argument("--bench", required=True, help="the reviewed bench (folder, release folder or data dir)")
    accepting.add_argument("--accept", type=Path, required=True, help="the accept list")
    accepting.add_argument("--data-dir", default="data", help="where the new bench release goes (default ./data)")


def load_config(args: argparse.Namespace):
    from facets.schemas.evaluation import BenchConfig

    data = read_config_file(args.config)
    for name in ("sources", "data_dir", "against", "per_benchmark", "seed", "mode", "shard_size", "templates_dir", "publish"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    if args.target_counts:
        from facets.evaluation.published_bench import target_counts

        data["per_benchmark"] = target_counts(args.target_counts)
    endpoint = section(data, "endpoint", args.config)
    limits = section(endpoint, "limits", args.config, "endpoint.")
    for flag, target, key in (("model", endpoint, "model"), ("max_cost", endpoint, "max_cost"), ("rpm", limits, "rpm"),
                              ("max_in_flight", limits, "max_in_flight")):
        if getattr(args, flag) is not None:
            target[key] = getattr(args, flag)
    return BenchConfig.model_validate(data)


def no_endpoint(base_url: str | None = None) -> bool:
    return not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL") or base_url)


def start_simulator(stack: ExitStack, seed: int, why: str) -> str:
    """A loopback simulator for this command; its base URL."""
    from facets.simulator.server import SimulatorProcess

    simulator = SimulatorProcess(seed=seed, latency_ms=50, jitter_ms=25)
    simulator.start()
    stack.callback(simulator.stop)
    print(f"{why}: using the loopback simulator at {simulator.base_url} (simulated text, for trying the pipeline; "
          "set OPENAI_API_KEY for real data)", file=sys.stderr)
    return simulator.base_url


class _WithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def prefect_environment() -> None:
    """Before Prefect is imported: no telemetry, and time for the embedded server on a busy small machine."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def run_flow(flow_fn, config) -> dict:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_WithoutTraceback())
    return asyncio.run(flow_fn(config))


def review(args: argparse.Namespace) -> int:
    from facets.evaluation.bench_review import review_lines

    lines = review_lines(args.bench)
    args.out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"{len(lines)} items to review in {args.out}; keep the ids to accept (one a line, or add "
          f"\"accepted\": true/false to these lines), then: facets bench accept --bench {args.bench} --accept FILE")
    return 0


def accept(args: argparse.Namespace) -> int:
    from facets.evaluation.bench_review import accept as publish_accepted
    from facets.storage import Store

    release, left_out = publish_accepted(Store(args.data_dir), args.bench, args.accept)
    state = "new" if release.is_new else "unchanged"
    print(f"bench {release.version} ({state}): {release.rows} accepted items, {left_out} not accepted, at {release.path}/bench")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action in ("review", "accept"):
        from facets.evaluation.bench_release import BenchError

        try:
            return review(args) if args.action == "review" else accept(args)
        except (BenchError, ValueError, OSError) as exc:
            print(f"facets bench {args.action}: error: {exc}", file=sys.stderr)
            return 2
    return build(args)


def build(args: argparse.Namespace) -> int:
    prefect_environment()
    from facets.llm.errors import RunAborted
    from facets.storage.lease import DataDirLocked
    from facets.evaluation.bench_release import BenchError
    from facets.evaluation.sources import BenchSourceError

    try:
        config = load_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"facets bench build: error: {config_problem(exc, args.config)}", file=sys.stderr)
        return 2
    if isinstance(config.per_benchmark, dict):
        print("target counts per benchmark: " + ", ".join(f"{k} {v}" for k, v in config.per_benchmark.items()),
              file=sys.stderr)
    if not config.sources:
        print("facets bench build: name at least one --source NAME=PATH (alpaca_eval, flask, koala, mt_bench, "
              "self_instruct)", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        if no_endpoint(config.endpoint.base_url):
            url = start_simulator(stack, config.seed, "OPENAI_API_KEY and OPENAI_BASE_URL are not set")
            endpoint = config.endpoint.model_copy(update={"base_url": url, "model": SIMULATOR_MODEL})
            stages = {n: s.model_copy(update={"model": None}) for n, s in config.stages.items()}
            config = config.model_copy(update={"endpoint": endpoint, "stages": stages,
                                               "rubrics": config.rubrics.model_copy(update={"model": None})})
        from facets.flows.evaluate import build_bench

        try:
            report = run_flow(build_bench, config)
        except (RunAborted, BenchSourceError, BenchError, DataDirLocked, ValueError) as exc:
            print(f"facets bench build: error: {exc}", file=sys.stderr)
            return 2
    built = sum(report["built"].values())
    print(f"{built} bench items; left out as training prompts: {len(report['contaminated'])}; "
          f"left out by failed stages: {sum(report['left_out'].values())}")
    for item in report["contaminated"][:10]:
        print(f"  in training ({item['benchmark']}): {item['prompt'][:100]!r}")
    release = report.get("release")
    if release:
        from facets.storage.store import dataset_call

        state = "new" if release["is_new"] else "unchanged"
        print(f"bench {release['version']} ({state}) at {release['path']}/bench")
        print(f"  open:  python -c \"import datasets; print(datasets.load_dataset('parquet', {dataset_call(release['path'] + '/bench')}))\"")
        print(f"  next:  facets eval generate --bench {release['path']} --model NAME ...")
    return 0 if built else 1
