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
from facets.llm.pricing import BATCH_DISCOUNT, PriceTable
from facets.llm.tokens import TokenEstimator
from facets.schemas.config import BuildConfig
from facets.schemas.stages import STAGES

INSTRUCTION_TOKENS = 150  # a typical instruction; each stage's typical reply is declared with it (schemas/stages.py)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=65_653, help="instructions (default: the paper's 65,653)")
    parser.add_argument("--sets", type=int, default=3, help="preference sets per instruction (default 3)")
    parser.add_argument("--model", default="gpt-4o-mini", help="model of every stage (default gpt-4o-mini)")
    parser.add_argument("--rpm", type=float, default=500, help="requests per minute (default 500)")
    parser.add_argument("--tpm", type=float, default=0, help="tokens per minute (default: not limited)")
    parser.add_argument("--mode", choices=["online", "batch"], default="online")
    parser.add_argument("--templates-dir", default=None)


def estimate(config: BuildConfig) -> list[dict]:
    from facets.tasks.stages import load_templates, module_of

    templates = load_templates(config)
    instruction = "x" * (INSTRUCTION_TOKENS * 4)
    n, sets = config.limit or 0, config.sets_per_instruction
    rows = []
    for stage in STAGES:
        if not stage.calls_llm:
            continue
        messages, extra_chars = module_of(stage).typical_prompt(templates[stage.name], instruction)
        calls = n if stage.rows == "one" else n * sets
        rows.append({"stage": stage.name, "calls": calls,
                     "input_tokens": calls * TokenEstimator().estimate(messages, extra_chars),
                     "output_tokens": calls * stage.typical_tokens, "model": config.model_of(stage.name)})
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
    replies = ", ".join(f"{stage.name} ~{stage.typical_tokens}" for stage in STAGES if stage.calls_llm)
    print(f"assumed per call: instruction ~{INSTRUCTION_TOKENS} tokens; replies: {replies} tokens")
    return 0
