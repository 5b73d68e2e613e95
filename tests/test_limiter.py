"""The limiter's token buckets on a clock of the test's own: reservations, refills, pauses after 429s and the
leases that pay a shared limit's calls. The gateway's pacing over HTTP is in test_gateway.py."""
from __future__ import annotations

import asyncio

import pytest

from facets.llm import limiter as limiter_module
from facets.schemas.config import RateLimits


def test_server_headers_never_erase_the_tokens_of_replies_still_being_written():
    """The server charges output when it replies, so its remaining budget leaves out our unanswered calls."""
    clock = [0.0]
    limiter = limiter_module.Limiter(RateLimits(rpm=0, tpm=60_000, burst_s=1.0), clock=lambda: clock[0])
    first, _ = limiter.reserve(100, 400)
    second, _ = limiter.reserve(100, 400)  # both sent; the server has charged their inputs only
    assert limiter.tokens.level == 1000 - 1000
    # the first reply: the server has charged 200 input + 400 output; it says 400 remain
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "400"}, first)
    assert limiter.tokens.level == 0, "the second call's 400 output tokens are still owed"
    limiter.settle(first, 100, 400)
    limiter.settle(second, 100, 100)  # it wrote less than reserved: the difference comes back
    assert limiter.tokens.level == 300 and limiter.outstanding_output == 0


def test_a_queued_calls_wait_follows_its_place_when_the_calls_ahead_change():
    """A call waits for the bucket to refill up to its place, not for a time fixed when it reserved: a
    reply longer than reserved pushes the queue back, a call withdrawn before it was sent moves it up."""
    clock = [0.0]
    limiter = limiter_module.Limiter(RateLimits(rpm=0, tpm=60_000, burst_s=1.0), clock=lambda: clock[0])
    first, wait = limiter.reserve(500, 500)  # 1,000 tokens a second, a full bucket of 1,000
    assert wait == 0
    second, wait = limiter.reserve(250, 250)
    assert wait == pytest.approx(0.5)
    third, wait = limiter.reserve(250, 250)
    assert wait == pytest.approx(1.0)
    limiter.settle(first, 500, 1000)  # the first reply wrote 500 more than it reserved
    assert limiter.due_in(second) == pytest.approx(1.0) and limiter.due_in(third) == pytest.approx(1.5)
    limiter.withdraw(second)  # cancelled before it was sent: the third takes its place
    assert limiter.due_in(third) == pytest.approx(1.0)
    clock[0] = 1.0
    assert limiter.due_in(third) == 0


def test_calls_queued_through_a_pause_go_out_at_the_rate_after_it_not_at_once():
    """A pause (429s) holds the buckets' refill: the queue behind it resumes at the rate when it ends,
    instead of every call that fell due meanwhile going out together into the same limit."""
    clock = [0.0]
    limiter = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), clock=lambda: clock[0])  # 10/s, burst 10
    for _ in range(10):
        limiter.reserve(0, 0)  # the burst goes out
    queued = [limiter.reserve(0, 0)[0] for _ in range(20)]  # due at 0.1, 0.2, ... 2.0 s
    limiter.rate_limited(retry_after=1.0)  # a 429 at 0 s, with Retry-After 1 s
    clock[0] = 1.0
    assert [round(limiter.due_in(r), 6) for r in queued[:3]] == [0.1, 0.2, 0.3], "not ten at once at 1 s"
    clock[0] = 1.25
    assert sum(limiter.due_in(r) == 0 for r in queued) == 2


def test_a_paused_leased_limiter_takes_nothing_from_the_shared_bucket():
    clock = [0.0]
    limiter = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), clock=lambda: clock[0], leased=True)
    limiter.reserve(0, 0)
    assert limiter.owed(0.1, 0.1) == {"requests": 1.0}
    limiter.rate_limited(retry_after=2.0)
    assert limiter.owed(0.1, 0.1) == {"requests": 0.0}, "what it took now would all go out when the pause ends"
    assert limiter.factor == 1.0, "a dearer request would throw the shared budget away"
    clock[0] = 2.5
    assert limiter.owed(0.1, 0.1)["requests"] > 0


def test_a_leased_limiter_brakes_when_the_endpoint_says_it_is_nearly_empty():
    """Other processes' late sends drained the endpoint: hold sends (and leases) until it has refilled as
    much as Redis can hand out at once, rather than have every early call refused and its request burnt;
    no longer, or the brake would cost budget (Redis's bucket full, its refill lost)."""
    clock = [0.0]
    limiter = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), clock=lambda: clock[0], leased=True)
    limiter.observe_headers({"x-ratelimit-remaining-requests": "5"})  # half a second of the rate: go on
    assert limiter.pause_remaining() == 0
    limiter.reserve(0, 0)
    limiter.observe_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"})
    assert limiter.pause_remaining() == pytest.approx(limiter_module.SHARED_BURST)  # 5 requests at 10 a second
    assert limiter.owed(0.1, 0.1) == {"requests": 0.0}
    clock[0] = 0.6
    assert limiter.pause_remaining() == 0 and limiter.owed(0.1, 0.1) == {"requests": 1.0}


def test_a_call_under_a_shared_limit_goes_as_soon_as_a_lease_pays_for_it_not_when_its_guess_ends():
    """A paid call asleep until its guessed wait ends holds budget that no process uses (and a process
    may hold only its part paid and unsent): the lease thread that pays it wakes it, once."""
    import threading

    from facets.llm.gateway import _until_paid

    limiter = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), leased=True)
    first, _ = limiter.reserve(0, 0)
    second, _ = limiter.reserve(0, 0)
    woken = []
    assert limiter.wake_when_paid(second, lambda: woken.append("second"))
    limiter.credit({"requests": 1.5}, 0.1, {"requests": 1.5})
    assert woken == [], "the first call is paid, the second only half"
    limiter.credit({"requests": 0.5}, 0.1, {"requests": 0.5})
    limiter.credit({"requests": 1.0}, 0.1, {"requests": 1.0})
    assert woken == ["second"], "woken once, when paid in full"
    assert not limiter.wake_when_paid(first, lambda: woken.append("first")), "paid already: nothing to wait for"

    async def wait_for_a_lease() -> None:
        fresh = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), leased=True)
        call, _ = fresh.reserve(0, 0)
        waiting = asyncio.create_task(_until_paid(fresh, call, wait=3600.0))  # its guess: an hour
        await asyncio.sleep(0.05)
        assert not waiting.done(), "unpaid, it waits"
        pay = threading.Thread(target=fresh.credit, args=({"requests": 1.0}, 0.1, {"requests": 1.0}))
        pay.start()  # as the lease thread does
        await asyncio.wait_for(waiting, timeout=60)  # woken by the payment: it did not sleep its whole guess
        pay.join()
        assert fresh.due_in(call) == 0

    asyncio.run(wait_for_a_lease())


def test_a_leased_limiter_takes_no_more_than_it_sends():
    """Calls paid for but not sent (an event loop busy elsewhere) stop the leases: what a process saved
    while it could not send would otherwise go out at once later, past the endpoint's burst."""
    limiter = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), leased=True)  # 10/s: 1 in 0.1 s
    queued = [limiter.reserve(0, 0)[0] for _ in range(5)]
    assert limiter.owed(0.1, 0.3) == {"requests": 3.0}, "0.3 s of the rate, though it owes 5"
    limiter.credit({"requests": 3.0}, 0.1, {"requests": 3.0})
    assert [limiter.due_in(r) == 0 for r in queued] == [True, True, True, False, False]
    assert limiter.owed(0.1, 0.3) == {"requests": 0.0}, "three paid, none sent"
    limiter.sent(queued[0])
    limiter.sent(queued[1])
    assert limiter.owed(0.1, 0.3) == {"requests": 2.0}
    limiter.withdraw(queued[4])  # cancelled while it waited: it neither waits nor owes
    assert limiter.owed(0.1, 0.3) == {"requests": 1.0}


def test_a_call_paid_in_fractions_with_float_dust_goes_and_does_not_wait_for_a_lease_never_asked():
    """At 300 RPM a process holds at most 0.75 of a request paid and unsent, so leases pay a call in parts;
    ten tenths leave it 1e-16 short. It must count as paid both for going and for leasing: counted paid
    by one and short by the other, it waited for a payment that was never asked for (a build hung)."""
    limiter = limiter_module.Limiter(RateLimits(rpm=300, burst_s=1.0), leased=True)
    call, _ = limiter.reserve(0, 0)
    for _ in range(10):
        limiter.credit({"requests": 0.1}, 0.1, {"requests": 0.1})
    assert limiter.requests.level < 0, "the dust this test is about"
    assert limiter.due_in(call) == 0
    limiter.sent(call)
    assert limiter.owed(0.1, 0.15) == {"requests": 0.0}
    second, _ = limiter.reserve(0, 0)
    assert limiter.due_in(second) > 0 and limiter.owed(0.1, 0.15)["requests"] > 0.5, "the next call is asked for"


def test_a_leased_bucket_takes_no_more_while_its_calls_wait_for_another():
    """Calls held back by the token bucket keep the requests they were paid: the request bucket takes no
    more (else, when the tokens came, they would all go at once), while the token bucket goes on taking."""
    limiter = limiter_module.Limiter(RateLimits(rpm=600, tpm=6000, burst_s=1.0), leased=True)  # 10 and 100 a second
    queued = [limiter.reserve(50, 50)[0] for _ in range(5)]
    assert limiter.owed(0.1, 0.3) == {"requests": 3.0, "tokens": 30.0}
    limiter.credit({"requests": 3.0, "tokens": 30.0}, 0.1, {"requests": 3.0, "tokens": 30.0})
    assert limiter.due_in(queued[0]) > 0, "its 100 tokens are not all paid yet"
    assert limiter.owed(0.1, 0.3) == {"requests": 0.0, "tokens": 30.0}
