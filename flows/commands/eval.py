"""`facets eval generate | judge | run`: models under test on the Multifaceted Bench, and the judge.

  generate  a response per bench item from one model: an OpenAI-compatible endpoint (--base-url, or
            OPENAI_BASE_URL / OpenAI) or a local transformers model (--local-model); journaled
  judge     absolute 1-5 grading of the stored responses on each item's 4 rubrics, N runs averaged;
            writes evals/<bench>/summary.{md,csv,png} and scores.parquet in the data dir
  run       both, for one model (or for every model of --config)

Each runs the `evaluate` flow in this process on Prefect's embedded server. The judge's endpoint comes
from OPENAI_BASE_URL / OPENAI_API_KEY (or --judge-base-url); with no endpoint anywhere, a loopback
simulator is started and said so (simulated text, for trying the pipeline).
"""
from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

from pydantic import ValidationError

from facets.flows.commands.bench import no_endpoint, prefect_environment, run_flow, start_simulator
from facets.flows.commands.config_file import config_problem, read_config_file, section


def _common(add) -> None:
    add("--config", type=Path, help="an EvalConfig as JSON (or YAML); the flags below override it")
    add("--bench", help="a bench folder, its release folder, or a data dir holding one (default: the data dir); "
                        "or the published bench: kaist-ai/Multifaceted-Bench (read with datasets), or a local copy "
                        "in its layout, scored beside the paper's Table 2")
    add("--data-dir", help="data directory for responses, judgments, journal and summary (default ./data)")
    add("--limit", type=int, help="only the first N bench items (a smoke run)")
    add("--seed", type=int, help="seed of local sampling and of the judge runs (default 0)")


def _model_flags(add, required: bool) -> None:
    add("--model", required=required, help="the model id the endpoint serves (for --local-model: its label)")
    add("--label", help="the model's name in the summary (default: --model)")
    add("--base-url", help="the model's OpenAI-compatible endpoint, e.g. a vLLM server's http://host:8000/v1")
    add("--api-key-env", help="environment variable with the model endpoint's key")
    add("--local-model", metavar="PATH", help="a local transformers model directory (needs torch and transformers)")
    add("--prompt-format", choices=["mistral", "chat", "openai"],
        help="mistral: raw [INST] {system}\\n{prompt} [/INST]; chat: the model's chat template; openai: system + "
             "user messages (default: openai for endpoints, chat for local models)")
    add("--no-system-role", dest="system_role", action="store_false", default=None,
        help="chat format: prepend the system message to the user turn (templates without a system role)")
    add("--max-tokens", type=int, help="generation max tokens (default 1024)")
    add("--temperature", type=float, help="generation temperature (default 1.0)")
    add("--top-p", type=float, help="generation top_p (default 0.9)")
    add("--rpm", type=float, help="the model endpoint's requests per minute")
    add("--max-in-flight", type=int, help="concurrent requests to the model endpoint at most")
    add("--batch-size", type=int, help="local model: prompts per batch (default 8)")
    add("--repetition-penalty", type=float,
        help="default 1.03 for open models (mistral, chat formats) as the paper, none for openai; a server that "
             "refuses the field is asked without it")
    add("--no-system-message", dest="system_message", action="store_false", default=None,
        help="the paper's ablation: the prompt alone, without the item's system message (label gets "
             "' (no system message)')")
    add("--best-of", type=int, metavar="N",
        help="sample N answers per item and keep the one --reward-model scores best (the paper: 64); all N "
             "scores go to evals/<bench>/candidates (label gets ' (best-of-N)')")
    add("--reward-model", metavar="DIR", help="best-of-N: a reward model directory (`facets train --method rm`)")


def _judge_flags(add) -> None:
    add("--judge-model", help="the judge model (default gpt-4-0125-preview, as the paper)")
    add("--judge-base-url", help="the judge's endpoint (default OPENAI_BASE_URL, else OpenAI)")
    add("--runs", type=int, help="judge runs averaged (default 3)")
    add("--mode", choices=["online", "batch"], help="judge online, or through the OpenAI Batch API at half price")
    add("--max-cost", type=float, help="the judge's spend cap in USD")
    add("--judge-rpm", type=float, help="the judge endpoint's requests per minute")
    add("--templates-dir", help="a directory whose judge.txt replaces the bundled judge prompt")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    generate = sub.add_parser("generate", help="a response per bench item from one model",
                              description="Generate a response per bench item from one model: an OpenAI-compatible "
                                          "endpoint or a local transformers model (journaled).")
    _common(generate.add_argument)
    _model_flags(generate.add_argument, required=False)
    judge = sub.add_parser("judge", help="grade stored responses on the rubrics and write the summary",
                           description="Grade the stored responses 1-5 on each bench item's rubrics with an LLM "
                                       "judge, N runs averaged, and write the summary to the data dir.")
    _common(judge.add_argument)
    judge.add_argument("--model", action="append", dest="models", metavar="LABEL",
                       help="a model (label) to judge, repeatable (default: every model with responses)")
    _judge_flags(judge.add_argument)
    both = sub.add_parser("run", help="generate, then judge",
                          description="Generate responses for a model (or every model of --config), then judge them.")
    _common(both.add_argument)
    _model_flags(both.add_argument, required=False)
    _judge_flags(both.add_argument)


def _set(target: dict, key: str, value) -> None:
    if value is not None:
        target[key] = value


def load_config(args: argparse.Namespace):
    from facets.schemas.evaluation import EvalConfig

    data = read_config_file(args.config)
    data["steps"] = {"generate": ["generate"], "judge": ["judge"], "run": ["generate", "judge"]}[args.action]
    data.setdefault("bench", args.data_dir or data.get("data_dir") or "data")
    for name in ("bench", "data_dir", "limit", "seed"):
        _set(data, name, getattr(args, name))
    if getattr(args, "model", None) and args.action != "judge":
        spec = {"name": args.model}
        for flag, key in (("label", "label"), ("base_url", "base_url"), ("api_key_env", "api_key_env"),
                          ("local_model", "local_model"), ("prompt_format", "prompt_format"),
                          ("system_role", "system_role"), ("batch_size", "batch_size"),
                          ("repetition_penalty", "repetition_penalty"), ("system_message", "system_message"),
                          ("best_of", "best_of"), ("reward_model", "reward_model")):
            _set(spec, key, getattr(args, flag))
        if args.local_model and not args.prompt_format:
            spec["prompt_format"] = "chat"
        limits: dict = {}
        _set(limits, "rpm", args.rpm)
        _set(limits, "max_in_flight", args.max_in_flight)
        if limits:
            spec["limits"] = limits
        data["models"] = [spec]
    if args.action == "judge" and args.models:
        data["models"] = [{"name": label} for label in args.models]
    if args.action != "judge":
        generation = section(data, "generation", args.config)
        for flag, key in (("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
            _set(generation, key, getattr(args, flag))
    if args.action != "generate":
        judge = section(data, "judge", args.config)
        endpoint = section(judge, "endpoint", args.config, "judge.")
        _set(endpoint, "model", args.judge_model)
        _set(endpoint, "base_url", args.judge_base_url)
        _set(endpoint, "max_cost", args.max_cost)
        if args.judge_rpm is not None:
            section(endpoint, "limits", args.config, "judge.endpoint.")["rpm"] = args.judge_rpm
        for flag, key in (("runs", "runs"), ("mode", "mode"), ("templates_dir", "templates_dir")):
            _set(judge, key, getattr(args, flag))
    return EvalConfig.model_validate(data)


def _simulated(config, stack: ExitStack):
    """Where nothing names an endpoint, a loopback simulator stands in for it (and says so)."""
    url = None
    models = []
    for spec in config.models:
        if "generate" in config.steps and not spec.local_model and no_endpoint(spec.base_url):
            url = url or start_simulator(stack, config.seed, f"no endpoint for model {spec.name!r}")
            spec = spec.model_copy(update={"base_url": url})
        models.append(spec)
    judge = config.judge
    if "judge" in config.steps and no_endpoint(judge.endpoint.base_url):
        url = url or start_simulator(stack, config.seed, "no endpoint for the judge")
        endpoint = judge.endpoint.model_copy(update={"base_url": url, "model": "facets-sim"})
        judge = judge.model_copy(update={"endpoint": endpoint})
    return config.model_copy(update={"models": models, "judge": judge})


def run(args: argparse.Namespace) -> int:
    prefect_environment()
    from facets.llm.errors import RunAborted
    from facets.evaluation.bench_release import BenchError

    name = f"facets eval {args.action}"
    try:
        config = load_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"{name}: error: {config_problem(exc, args.config)}", file=sys.stderr)
        return 2
    if args.action != "judge" and not config.models:
        print(f"{name}: name the model under test: --model NAME (with --base-url URL or --local-model PATH)", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        config = _simulated(config, stack)
        from facets.flows.evaluate import evaluate

        try:
            report = run_flow(evaluate, config)
        except (RunAborted, BenchError, ValueError, ImportError) as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            return 2
    code = 0
    for label, g in report["generated"].items():
        kept = f", each the best of {g['best_of']} by the reward model" if g.get("best_of", 1) > 1 else ""
        print(f"{label}: {g['reused'] + g['made']} of {g['items']} responses ({g['made']} new, {g['failed']} failed, "
              f"{g['truncated']} cut at max_tokens{kept})")
        for note in g.get("notes", []):
            print(f"  {label}: {note}")
        code = code or (1 if g["failed"] else 0)
    if report.get("judged") is not None:
        judged = report["judged"]
        print(f"judge: {judged['judged']} new judgments, {judged['reused']} reused, {judged['failed']} failed")
        print(report["markdown"])
        for kind, path in report["outputs"].items():
            print(f"  {kind}: {path}")
        code = code or (1 if any(row["coverage"] < 1 for row in report["summary"]) else 0)
    return code
