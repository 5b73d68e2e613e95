"""Call slots: how many calls are in flight (and reserving), who goes first when one is freed, and one set of
slots and one transport shared by the gateways of a run."""
from __future__ import annotations

import asyncio

import pytest

from facets.llm.gateway import Gateway, endpoint_transport
from facets.llm.slots import ADAPTIVE_MAX, CallSlots, Slots
from facets.schemas.config import RateLimits
from facets.simulator.server import run_simulator
from gateway_helpers import answered, endpoint, parse_all


def test_in_flight_follows_the_rpm_and_the_latency_unless_it_is_set():
    adaptive = CallSlots(RateLimits(rpm=12_000))  # 200/s
    for _ in range(200):
        adaptive.observe(0.5)
    assert adaptive.in_flight.size == 150 and adaptive.reserving.size == 300  # 200/s x 0.5 s x 1.5
    fixed = CallSlots(RateLimits(rpm=12_000, max_in_flight=64))
    fixed.observe(0.5)
    assert fixed.in_flight.size == 64
    huge = CallSlots(RateLimits(rpm=1_000_000))
    huge.observe(30.0)
    assert huge.in_flight.size == ADAPTIVE_MAX


def test_a_waiter_cancelled_just_before_a_slot_is_freed_is_cancelled_and_takes_nothing():
    """The freed slot skips the cancelled waiter: the waiter then finds its entry gone, and must still end
    cancelled (a timeout around it turns that into TimeoutError), not with a ValueError of its own."""
    async def main():
        slots = Slots(1)
        await slots.acquire()
        waiting = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        waiting.cancel()
        slots.release()  # before the cancelled waiter runs again
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert slots.used == 0 and not slots._waiters

    asyncio.run(main())


def test_slots_grow_to_let_waiters_in_and_a_cancelled_waiter_gives_its_slot_on():
    async def main():
        slots = Slots(1)
        await slots.acquire()
        waiting = [asyncio.create_task(slots.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(t.done() for t in waiting)
        slots.resize(3)  # two more may go
        await asyncio.sleep(0)
        assert [t.done() for t in waiting] == [True, True, False]
        waiting[2].cancel()
        await asyncio.gather(waiting[2], return_exceptions=True)
        slots.release()
        assert slots.used == 2 and not slots._waiters

    asyncio.run(main())


def test_slots_serve_waiters_by_priority_then_in_arrival_order():
    async def main():
        slots = Slots(1)
        await slots.acquire()
        order = []

        async def wait(name: str, priority: int) -> None:
            async with slots.slot(priority):
                order.append(name)

        waiting = [asyncio.create_task(wait(name, priority))
                   for name, priority in (("tree-1", 0), ("response-1", 2), ("tree-2", 0), ("system-1", 1),
                                          ("response-2", 2))]
        await asyncio.sleep(0)
        slots.release()
        await asyncio.gather(*waiting)
        assert order == ["response-1", "response-2", "system-1", "tree-1", "tree-2"]
        assert slots.used == 0 and not slots._waiters

    asyncio.run(main())


def test_gateways_of_one_run_share_one_connection_per_call_in_flight():
    """A build's stages share their call slots and one transport: however the stages take turns, the
    endpoint sees no more connections than calls in flight, and a stage closing leaves the others theirs."""
    with run_simulator(latency_ms=20) as sim:
        config = endpoint(sim, limits=RateLimits(rpm=0, max_in_flight=4))

        async def main():
            slots, transport = CallSlots(config.limits), endpoint_transport(config)
            stages = [Gateway(config, slots=slots, priority=p, transport=transport) for p in range(3)]
            results = []
            for gateway in stages:  # one after another, as a shard's stages finish
                results += await parse_all(gateway, 12)
                await gateway.aclose()
            await transport.close()
            return results

        results = asyncio.run(main())
        stats = sim.stats()
    assert answered(results) and stats["ok"] == 36
    assert stats["connections"] <= 4
