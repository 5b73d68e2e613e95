"""Server-side automations that let a build outlive a dead worker: runs whose worker is gone are Crashed.

A flow run started by a worker sends a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds
(at least 30; `facets server` and docker-compose.yml set 30), the first as it starts. When a worker's
machine dies, its runs stay `Running` (or `Pending`, if it died while starting them) with nobody behind
them. Two automations, Prefect's own recipe for "zombie" runs, mark such a run `Crashed`:
- a run whose last heartbeat is not followed by another (or by a final state) within `ZOMBIE_AFTER_S`;
- a run that went `Pending` and neither started, beat nor ended within `START_WITHIN_S`.
A run that never beats (a flow called in a process without PREFECT_FLOWS_HEARTBEAT_FREQUENCY) is left
alone once it is Running: only its own process could say it died. `facets` commands beat (flows/cli.py).
A build waiting on that shard run then starts it again, on whichever worker takes it.

    python -m facets.flows.automations [--after SECONDS]     # against the server PREFECT_API_URL names
"""
from __future__ import annotations

import argparse
import asyncio
from datetime import timedelta

NAME = "facets: crash runs that stopped beating"
START_NAME = "facets: crash runs that never started"
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the workers; Prefect's minimum
ZOMBIE_AFTER_S = 3 * HEARTBEAT_S
START_WITHIN_S = 300  # a loaded machine takes tens of seconds to start a run; a dead one never does
FINAL = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
         "prefect.flow-run.Crashed"}


def zombie_automations(after_s: float = ZOMBIE_AFTER_S, start_within_s: float = START_WITHIN_S) -> list:
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if after_s <= HEARTBEAT_S:
        raise ValueError(f"a run beats every {HEARTBEAT_S} s: crashing it after {after_s} s of silence would "
                         "crash live runs")

    def crash_when(name: str, after: str, seconds: float, why: str, also_alive: tuple[str, ...] = ()) -> AutomationCore:
        return AutomationCore(
            name=name,
            description=f"{why}: mark it Crashed, so whoever waits on it (a build waiting on a shard) "
                        "can start it again elsewhere.",
            trigger=EventTrigger(
                after={after}, expect={"prefect.flow-run.heartbeat", *also_alive, *FINAL},
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                within=timedelta(seconds=seconds)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"{why}: its worker is gone")])

    return [crash_when(NAME, "prefect.flow-run.heartbeat", after_s, f"no heartbeat for {after_s:.0f} s"),
            crash_when(START_NAME, "prefect.flow-run.Pending", start_within_s,
                       f"pending for {start_within_s:.0f} s without starting", ("prefect.flow-run.Running",))]


async def ensure_zombie_automations(api_url: str | None = None, after_s: float = ZOMBIE_AFTER_S,
                                    start_within_s: float = START_WITHIN_S) -> list[str]:
    """Creates the automations, replacing any of the same names (their timing may differ); returns their ids."""
    from prefect.client.orchestration import PrefectClient, get_client

    wanted = zombie_automations(after_s, start_within_s)
    async with (PrefectClient(api_url) if api_url else get_client()) as client:
        ids = []
        for automation in wanted:
            for old in await client.read_automations_by_name(automation.name):
                await client.delete_automation(old.id)
            ids.append(str(await client.create_automation(automation)))
        return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=float, default=ZOMBIE_AFTER_S,
                        help=f"seconds without a heartbeat before a run is marked Crashed (default {ZOMBIE_AFTER_S})")
    parser.add_argument("--start-within", type=float, default=START_WITHIN_S,
                        help=f"seconds a run may stay Pending without a heartbeat (default {START_WITHIN_S})")
    args = parser.parse_args(argv)
    ids = asyncio.run(ensure_zombie_automations(after_s=args.after, start_within_s=args.start_within))
    print(f"automations {NAME!r}, {START_NAME!r}: {', '.join(ids)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
