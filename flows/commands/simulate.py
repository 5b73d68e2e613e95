"""`facets simulate`: serve the loopback OpenAI-compatible simulator until interrupted.

Every SimulatorConfig field is a flag (`--latency-ms`, `--faults http_500=0.1,hang=0.01`, ...).
Once listening it prints `simulator listening on http://HOST:PORT/v1` and flushes, so a parent
process can read the URL (use `--port 0` for a free port).
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from pydantic import ValidationError

from facets.simulator.server import LISTENING, Simulator, SimulatorConfig


def configure(parser: argparse.ArgumentParser) -> None:
    for name, field in SimulatorConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if field.annotation is bool:  # a switch, off unless given
            parser.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None,
                                help=field.description)
            continue
        shown = default if default not in (None, (), {}) else "none"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar=name.upper(),
                            help=f"{field.description} (default: {shown})")


def run(args: argparse.Namespace) -> int:
    try:
        config = SimulatorConfig.model_validate({k: v for k, v in vars(args).items() if v is not None})
    except ValidationError as exc:
        print(f"facets simulate: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve(config))
    return 0


async def _serve(config: SimulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    simulator = Simulator(config)
    print(f"{LISTENING} {await simulator.start()}", flush=True)
    try:
        await stop.wait()
    finally:
        await simulator.close()
