"""`facets estimate`: calls, tokens, cost and time of a build of N instructions, before spending anything.

Input tokens come from the real prompt templates rendered with a typical instruction; output tokens from
the lengths of the published collection (assumptions printed beside the figures). Time is the larger of
the request bound (calls / RPM) and the token bound (tokens / TPM): a build cannot beat its rate limits.
"""
from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from facets.flows.commands.config_file import config_problem
from facets.llm.gateway import json_schema_format
from facets.llm.pricing import BATCH_DISCOUNT, PriceTable
from facets.llm.tokens import TokenEstimator
from facets.schemas import PreferenceTreeBody
from facets.schemas.config import BuildConfig

# Typical lengths in tokens: an instruction, and the replies of each stage (trees as JSON with three or
# more branches per dimension; system messages ~1,000 characters; gold responses ~2,300 characters).
TYPICAL = {"instruction": 150, "preference_trees": 1400, "system_messages": 250, "responses": 600}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=65_653, help="instructions (default: the paper's 65,653)")
    parser.add_argument("--sets", type=int, default=3, help="preference sets per instruction (default 3)")
    parser.add_argument("--model", default="gpt-4o-mini", help="model of every stage (default gpt-4o-mini)")
    parser.add_argument("--rpm", type=float, default=500, help="requests per minute (default 500)")
    parser.add_argument("--tpm", type=float, default=0, help="tokens per minute (default: not limited)")
    parser.add_argument("--mode", choices=["online", "batch"], default="online")
    parser.add_argument("--templates-dir", default=None)


def estimate(config: BuildConfig) -> list[dict]:
    from facets.tasks.stages import load_templates
    from facets.tasks.preference_trees import seeds_text

    templates = load_templates(config)
    instruction = "x" * int(TYPICAL["instruction"] * 4)
    system = "y" * int(TYPICAL["system_messages"] * 4)
    prompts = {
        "preference_trees": (templates["preference_trees"].messages(seeds=seeds_text(), instruction=instruction),
                             len(str(json_schema_format(PreferenceTreeBody)))),
        "system_messages": (templates["system_messages"].messages(preferences="z" * 800, instruction=instruction), 0),
        "responses": (templates["responses"].messages(system_message=system, instruction=instruction), 0),
    }
    n, sets = config.limit or 0, config.sets_per_instruction
    rows = []
    for stage, (messages, extra) in prompts.items():
        calls = n if stage == "preference_trees" else n * sets
        rows.append({"stage": stage, "calls": calls, "input_tokens": calls * TokenEstimator().estimate(messages, extra),
                     "output_tokens": calls * TYPICAL[stage], "model": config.model_of(stage)})
    return rows


def duration(minutes: float) -> str:
    """A time bound in the unit that reads best: 42 s, 1.4 min, 3.2 h."""
    if minutes < 1:
        return f"{minutes * 60:,.0f} s"
    if minutes < 60:
        return f"{minutes:,.1f} min"
    return f"{minutes / 60:,.1f} h"


def flag_problem(args: argparse.Namespace) -> str | None:
    """Flags no estimate can use; the config alone would take --rpm 0 (it means no limit to a build)."""
    if args.rpm <= 0:
        return f"--rpm must be above 0 (the time is calls / RPM), got {args.rpm:g}"
    if args.limit <= 0:
        return f"--limit must be at least 1 instruction, got {args.limit}"
    return None


def run(args: argparse.Namespace) -> int:
    problem = flag_problem(args)
    if problem:
        print(f"facets estimate: error: {problem}", file=sys.stderr)
        return 2
    try:  # the endpoint reads OPENAI_BASE_URL, which may be refused (credentials in it)
        config = BuildConfig(limit=args.limit, sets_per_instruction=args.sets, mode=args.mode, templates_dir=args.templates_dir,
                             endpoint={"model": args.model, "limits": {"rpm": args.rpm, "tpm": args.tpm}})
    except ValidationError as exc:
        print(f"facets estimate: error: {config_problem(exc, None)}", file=sys.stderr)
        return 2
    rows = estimate(config)
    prices = PriceTable(config.endpoint.prices)
    total_cost: float | None = 0.0
    print(f"{'stage':<18}{'calls':>10}{'input tok':>14}{'output tok':>14}{'cost USD':>12}")
    for row in rows:
        price = prices.get(row["model"])
        cost = price.cost(row["input_tokens"], row["output_tokens"]) * (BATCH_DISCOUNT if args.mode == "batch" else 1) if price else None
        total_cost = None if cost is None or total_cost is None else total_cost + cost
        shown = "unknown" if cost is None else f"{cost:,.2f}"
        print(f"{row['stage']:<18}{row['calls']:>10,}{row['input_tokens']:>14,}{row['output_tokens']:>14,}{shown:>12}")
    calls = sum(r["calls"] for r in rows)
    tokens = sum(r["input_tokens"] + r["output_tokens"] for r in rows)
    minutes = max(calls / args.rpm if args.rpm else 0, tokens / args.tpm if args.tpm else 0)
    cost_text = "unknown (no price for the model)" if total_cost is None else f"${total_cost:,.2f}"
    print(f"total: {calls:,} calls, {tokens:,} tokens, {cost_text}; at least {duration(minutes)} at "
          f"{args.rpm:g} RPM" + (f" and {args.tpm:g} TPM" if args.tpm else "") + (" (batch: up to 24 h per batch)" if args.mode == "batch" else ""))
    print(f"assumed per call: instruction ~{TYPICAL['instruction']} tokens; replies: tree ~{TYPICAL['preference_trees']}, "
          f"system message ~{TYPICAL['system_messages']}, response ~{TYPICAL['responses']} tokens")
    return 0
