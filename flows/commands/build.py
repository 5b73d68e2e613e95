"""`facets build`: run `build-collection` in this process, on Prefect's embedded server.

Flags mirror BuildConfig (`--config FILE` loads one, flags override it). The endpoint comes from
OPENAI_BASE_URL / OPENAI_API_KEY like the openai client's; with neither set, the build runs against the
loopback simulator, which it starts itself and says so: simulated text, never real data.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path

from pydantic import ValidationError

from facets.flows.commands import shell
from facets.flows.commands.config_file import config_problem, read_config_file, section
from facets.flows.commands.stopping import StopSignals, Stopped, quiet_prefect_logs, report_stop, start_shielded

from facets.schemas.config import BuildConfig, RateLimits
from facets.schemas.profiles import profile_names

SIMULATOR_MODEL = "facets-sim"
SIMULATOR_RPM = 3000  # the demo's simulated endpoint limit, unless --rpm says otherwise


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", type=Path, help="a BuildConfig as JSON (or YAML); the flags below override it")
    add("--profile", choices=profile_names(),
        help="start from a named profile: `paper` has the paper's models, sampling, sets and source mix "
             "(schemas/profiles/paper.yaml); --config and the flags below override it")
    add("--source", action="append", dest="sources", metavar="NAME=PATH_OR_HUB_ID",
        help="instructions to ingest first (repeatable), as in `facets ingest`")
    add("--limit", type=int, help="accepted instructions wanted (default: every instruction in the data dir)")
    add("--seed", type=int, help="seed of the draw order, the preference sets and the pairs (default 0)")
    add("--data-dir", help="data directory, a path or fsspec URI (default ./data)")
    add("--shard-size", type=int, help="instructions per shard, roughly (default 256)")
    add("--sets", type=int, dest="sets_per_instruction", help="preference sets per instruction (default 3)")
    add("--concurrency", type=int, dest="max_concurrent_shards", help="shards in progress at once (default 8)")
    add("--tree-shards", type=int, dest="max_tree_shards",
        help="shards making preference trees at once (default 1: the others go on with later stages)")
    add("--model", help="the model of every stage (default: the config's, else gpt-4o-mini)")
    add("--rpm", type=float, help="the endpoint's requests per minute")
    add("--tpm", type=float, help="the endpoint's tokens per minute")
    add("--max-in-flight", type=int, help="concurrent requests at most")
    add("--structured-output", choices=["auto", "json_schema", "json_object", "guided_json", "prompt"],
        help="how structured output is asked for (default auto: the first the server answers, found by a probe)")
    add("--share-limits", dest="share_via", metavar="REDIS_URL",
        help="take --rpm/--tpm from one bucket in Redis that the other processes calling this endpoint share "
             "(redis://HOST:6379/0)")
    add("--shard-deployment", metavar="FLOW/DEPLOYMENT",
        help="run every shard as a flow run of this deployment (build-shard/default) on its pool's workers, "
             "on the Prefect server PREFECT_API_URL names; the data dir must be one they share (s3://...)")
    add("--max-cost", type=float, help="hard spend cap in USD; the build stops before it would pass it")
    add("--mode", choices=["online", "batch"], help="online calls, or the OpenAI Batch API at half price")
    add("--templates-dir", help="a directory whose <stage>.txt files replace the bundled prompt templates")
    add("--no-publish", dest="publish", action="store_false", default=None, help="build the stages, publish no release")
    add("--push-to-hub", metavar="REPO", help="push a new release to this hub dataset repo (needs HF_TOKEN)")
    add("--train-after", action="store_true", default=None,
        help="start the train deployment (train/sft, or the config's `train.deployment`) on a new release")
    add("--wait", action="store_true", dest="wait_for_lock", default=None,
        help="another build holds the data dir: wait for it to end, then build (default: stop at once, naming it)")
    add("--quiet", action="store_true", help="no progress bar")


def load_config(args: argparse.Namespace) -> BuildConfig:
    data = read_config_file(args.config)
    if args.profile:
        data["profile"] = args.profile
    for name in ("sources", "limit", "seed", "data_dir", "shard_size", "sets_per_instruction",
                 "max_concurrent_shards", "max_tree_shards", "mode", "templates_dir", "publish", "push_to_hub", "train_after",
                 "shard_deployment", "wait_for_lock"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    endpoint = section(data, "endpoint", args.config)
    limits = section(endpoint, "limits", args.config, "endpoint.")
    for flag, target, key in (("model", endpoint, "model"), ("max_cost", endpoint, "max_cost"),
                              ("structured_output", endpoint, "structured_output"), ("rpm", limits, "rpm"),
                              ("tpm", limits, "tpm"), ("max_in_flight", limits, "max_in_flight"),
                              ("share_via", limits, "share_via")):
        if getattr(args, flag) is not None:
            target[key] = getattr(args, flag)
    return BuildConfig.model_validate(data)


def progress_bar(progress) -> None:
    # `fraction`, not done/total: replacement shards grow the total, and the bar must not go back
    width = 30
    fraction = min(1.0, progress.fraction)
    filled = int(width * fraction)
    line = (f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}%  "
            f"{progress.done}/{progress.total} stage-shards  {progress.last:<32}")
    sys.stderr.write(line + ("\n" if progress.done == progress.total else ""))
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    from facets.llm.errors import RunAborted
    from facets.storage.errors import describe_storage_error, is_storage_error
    from facets.storage.lease import DataDirLocked
    from facets.ingest.pool import IngestError
    from facets.release.publish import ReleasePushError
    from facets.ingest.sources import SourceError

    try:
        config = load_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"facets build: error: {config_problem(exc, args.config)}", file=sys.stderr)
        return 2
    try:
        with ExitStack() as stack:
            stops = stack.enter_context(StopSignals(on_stop=quiet_prefect_logs))
            if not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL") or config.endpoint.base_url):
                config = _with_simulator(config, stack)
            try:
                report = _build(config, stops, quiet=args.quiet)
            except DataDirLocked as exc:
                hint = "" if config.wait_for_lock else "; `--wait` waits for it"
                print(f"facets build: error: {exc}{hint}", file=sys.stderr)
                return 2
            except (RunAborted, SourceError, IngestError, ReleasePushError, ValueError) as exc:
                print(f"facets build: error: {exc}", file=sys.stderr)
                return 2
    except Stopped as stop:  # SIGINT or SIGTERM: the calls in flight cancelled, the journal sealed
        return report_stop(stop, "facets build", config.data_dir, new_line=not args.quiet)
    except Exception as exc:  # a full disk, a read-only data dir: one line, not Prefect's traceback
        if not is_storage_error(exc):
            raise
        print(f"facets build: error: {describe_storage_error(exc, config.data_dir)}", file=sys.stderr)
        return 2
    _print_outcome(report, config)
    return 0 if report["accepted"] else 1


def _with_simulator(config: BuildConfig, stack: ExitStack) -> BuildConfig:
    from facets.simulator.server import SIMULATED_URL_ENV, SimulatorProcess

    rpm = SIMULATOR_RPM if config.endpoint.limits.rpm == RateLimits().rpm else config.endpoint.limits.rpm
    simulator = stack.enter_context(_started(SimulatorProcess(seed=config.seed, rpm=int(rpm), latency_ms=200, jitter_ms=100)))
    print(f"OPENAI_API_KEY and OPENAI_BASE_URL are not set: building against the loopback simulator at "
          f"{simulator.base_url} (simulated text, for trying the pipeline; set OPENAI_API_KEY for real data)",
          file=sys.stderr)
    os.environ[SIMULATED_URL_ENV] = simulator.base_url  # the release card then says the text is simulated
    limits = config.endpoint.limits.model_copy(update={"rpm": rpm})
    # simulated calls cost nothing, and saying so lets a config with max_cost run as it is
    prices = {**config.endpoint.prices, SIMULATOR_MODEL: (0.0, 0.0, 0.0)}
    endpoint = config.endpoint.model_copy(update={"base_url": simulator.base_url, "model": SIMULATOR_MODEL,
                                                  "limits": limits, "prices": prices})
    stages = {name: s.model_copy(update={"model": None}) for name, s in config.stages.items()}
    return config.model_copy(update={"endpoint": endpoint, "stages": stages})


class _started:
    def __init__(self, process):
        self.process = process

    def __enter__(self):
        return start_shielded(self.process.start)  # stopped by this process, not by a Ctrl-C of its own

    def __exit__(self, *exc):
        self.process.stop()


class _WithoutTraceback(logging.Filter):
    """Prefect logs a failed run with its traceback; the command prints the one-line cause instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _build(config: BuildConfig, stops: StopSignals, quiet: bool) -> dict:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the embedded server needs more than Prefect's default 20 s to start on a busy small machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from facets.flows import build
    from facets.pipeline.report import listening

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_WithoutTraceback())
    with listening(progress_bar) if not quiet else contextlib.nullcontext():
        return stops.run(build.build_collection(config))


def _print_outcome(report: dict, config: BuildConfig) -> None:
    from facets.storage import FAILURES, Store

    # a rerun of a complete build fails nothing new, yet earlier runs' failure rows stay in the data dir
    try:
        kept = f"{Store(config.data_dir).count(FAILURES)} kept"
    except Exception:  # the outcome line is a courtesy: the build itself has ended well
        kept = "earlier ones"
    print(f"accepted {report['accepted']} of {report['wanted']} instructions; failures: "
          f"{sum(report['failures'].values())} this run ({kept} in {config.data_dir}/failures)")
    release = report.get("release")
    if release:
        from facets.storage.store import dataset_call

        state = "new release" if release["is_new"] else "no change since the last release"
        print(f"release {release['version']} ({state}) at {release['path']}")
        python, facets = shell.command("python"), shell.command("facets")
        print(f"  open:  {python} -c \"import datasets; print(datasets.load_dataset('parquet', "
              f"{dataset_call(release['path'] + '/sft')}))\"")
        print(f"  card:  {release['path']}/README.md   sunburst: {release['path']}/sunburst.html")
        print(f"  query: {facets} inspect --data-dir {shlex.quote(config.data_dir)} \"select * from release_sft limit 5\"")
