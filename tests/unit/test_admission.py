"""Admission.slot: bounded slots, a bounded queue with a wait limit, round-robin across principals.

Each test runs its own event loop with asyncio.run (pytest-asyncio is not installed).
"""
from __future__ import annotations

import asyncio

import pytest

from sandboxd.admission import Admission
from sandboxd.errors import Overloaded


async def _settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


class Holder:
    """A task that takes a slot and keeps it until released."""

    def __init__(self, adm: Admission, principal: str, log: list | None = None, tag=None):
        self.release = asyncio.Event()
        self.granted = asyncio.Event()
        self.waited: float | None = None
        self.error: BaseException | None = None

        async def body():
            try:
                async with adm.slot(principal) as waited:
                    self.waited = waited
                    if log is not None:
                        log.append(tag if tag is not None else principal)
                    self.granted.set()
                    await self.release.wait()
            except Overloaded as e:
                self.error = e

        self.task = asyncio.create_task(body())

    async def done(self) -> None:
        self.release.set()
        await self.task


def test_grant_immediately_below_max():
    async def main():
        adm = Admission(max_concurrent=2, max_queue=4, max_wait=1.0)
        async with adm.slot("a") as w1:
            assert w1 < 0.05
            assert adm.running == 1
            async with adm.slot("b") as w2:
                assert w2 < 0.05
                assert adm.running == 2 and adm.queued == 0
            assert adm.running == 1
        assert adm.running == 0 and not adm.active
    asyncio.run(main())


def test_slot_is_released_when_the_body_raises():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=0, max_wait=1.0)
        with pytest.raises(RuntimeError):
            async with adm.slot("a"):
                raise RuntimeError("boom")
        assert adm.running == 0
        async with adm.slot("a"):
            assert adm.running == 1
    asyncio.run(main())


def test_queue_then_grant_on_release():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=4, max_wait=5.0)
        first = Holder(adm, "a")
        await _settle()
        second = Holder(adm, "b")
        await _settle()
        assert first.granted.is_set() and not second.granted.is_set()
        assert adm.running == 1 and adm.queued == 1
        await asyncio.sleep(0.05)
        await first.done()
        await asyncio.wait_for(second.granted.wait(), 1.0)
        assert adm.running == 1 and adm.queued == 0
        assert second.waited >= 0.04           # the yielded value is the time spent waiting
        await second.done()
        assert adm.running == 0
    asyncio.run(main())


def test_overloaded_when_the_queue_is_full():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=2, max_wait=5.0)
        holders = [Holder(adm, "a")]
        await _settle()
        holders += [Holder(adm, "a"), Holder(adm, "b")]
        await _settle()
        assert adm.queued == 2
        with pytest.raises(Overloaded) as info:
            async with adm.slot("c"):
                pytest.fail("granted past a full queue")
        msg = str(info.value)
        assert "1 running and 2 queued" in msg
        assert "max_concurrent 1" in msg and "max_queue 2" in msg
        assert info.value.retry_after > 0
        assert adm.queued == 2                 # the refused caller took no place
        for h in holders:
            await h.done()
        assert adm.running == 0 and adm.queued == 0
    asyncio.run(main())


def test_zero_queue_refuses_at_once_when_full():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=0, max_wait=5.0)
        h = Holder(adm, "a")
        await _settle()
        with pytest.raises(Overloaded, match="max_queue 0"):
            async with adm.slot("b"):
                pass
        await h.done()
    asyncio.run(main())


def test_overloaded_after_max_wait():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=4, max_wait=0.05)
        h = Holder(adm, "a")
        await _settle()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(Overloaded) as info:
            async with adm.slot("b"):
                pytest.fail("granted while the slot was held")
        assert 0.04 <= loop.time() - start < 1.0
        assert "within 0.05s" in str(info.value)
        assert adm.queued == 0 and not adm.waiting   # the timed-out waiter left the queue
        assert adm.running == 1
        await h.done()
        assert adm.running == 0
    asyncio.run(main())


def test_cancelled_waiter_frees_its_queue_place():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=1, max_wait=5.0)
        h = Holder(adm, "a")
        await _settle()
        waiter = Holder(adm, "b")
        await _settle()
        assert adm.queued == 1
        waiter.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter.task
        assert adm.queued == 0 and not adm.waiting
        # The place is free again: a new caller queues instead of being refused, and gets the slot.
        late = Holder(adm, "c")
        await _settle()
        assert late.error is None and adm.queued == 1
        await h.done()
        await asyncio.wait_for(late.granted.wait(), 1.0)
        assert not waiter.granted.is_set()
        assert adm.running == 1                # the cancelled waiter holds nothing
        await late.done()
        assert adm.running == 0 and not adm.active
    asyncio.run(main())


async def _grant_then_cancel(adm: Admission) -> tuple[Holder, Holder]:
    """b is granted the slot by a's release, then cancelled before it gets to run; c waits behind it."""
    h = Holder(adm, "a")
    await _settle()
    unlucky = Holder(adm, "b")
    next_ = Holder(adm, "c")
    await _settle()
    assert adm.queued == 2
    h.release.set()
    await h.task                               # its release granted "b", which has not resumed yet
    assert adm.active["b"] == 1
    unlucky.task.cancel()
    await _settle()
    return unlucky, next_


def test_waiter_cancelled_as_it_is_granted_does_not_leak_the_slot():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=4, max_wait=5.0)
        unlucky, next_ = await _grant_then_cancel(adm)
        unlucky.release.set()                  # if the grant won the race, b ran and now gives the slot back
        await asyncio.gather(unlucky.task, return_exceptions=True)
        await asyncio.wait_for(next_.granted.wait(), 1.0)
        assert adm.running == 1 and adm.active["c"] == 1
        await next_.done()
        assert adm.running == 0 and adm.queued == 0
    asyncio.run(main())


def test_waiter_cancelled_as_it_is_granted_is_cancelled_and_passes_the_slot_on():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=4, max_wait=5.0)
        unlucky, next_ = await _grant_then_cancel(adm)
        ran, cancelled = unlucky.granted.is_set(), unlucky.task.cancelled()
        next_granted = next_.granted.is_set()
        unlucky.release.set()
        next_.release.set()
        await asyncio.gather(unlucky.task, next_.task, return_exceptions=True)
        assert not ran, "the cancelled caller ran its body"
        assert cancelled
        assert next_granted
    asyncio.run(main())


def test_round_robin_across_principals():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=20, max_wait=10.0)
        order: list = []
        holder = Holder(adm, "h", order)
        await _settle()
        waiters = []
        for i in range(10):
            waiters.append(Holder(adm, "a", order, ("a", i)))
            await _settle()
        waiters.append(Holder(adm, "b", order, ("b", 0)))
        await _settle()
        assert adm.queued == 11
        await holder.done()
        for w in waiters:                      # each runs in turn and finishes when granted
            w.release.set()
        await asyncio.wait_for(asyncio.gather(*(w.task for w in waiters)), 5.0)
        assert order[0] == "h"
        assert order[1] == ("a", 0)
        assert order[2] == ("b", 0)            # before a's second waiter, not after all ten
        assert order[3:] == [("a", i) for i in range(1, 10)]   # a's own waiters stay in order
        assert adm.running == 0 and adm.queued == 0
    asyncio.run(main())


def test_round_robin_with_three_principals():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=20, max_wait=10.0)
        order: list = []
        holder = Holder(adm, "h", order)
        await _settle()
        waiters = []
        for p, n in (("a", 3), ("b", 2), ("c", 1)):
            for i in range(n):
                waiters.append(Holder(adm, p, order, f"{p}{i}"))
                await _settle()
        await holder.done()
        for w in waiters:
            w.release.set()
        await asyncio.wait_for(asyncio.gather(*(w.task for w in waiters)), 5.0)
        assert order[1:] == ["a0", "b0", "c0", "a1", "b1", "a2"]
    asyncio.run(main())


def test_per_principal_limit_queues_the_principals_extra_runs():
    async def main():
        adm = Admission(max_concurrent=4, max_queue=10, max_wait=5.0, per_principal=1)
        first = Holder(adm, "a")
        await _settle()
        second = Holder(adm, "a")
        await _settle()
        assert first.granted.is_set()
        assert not second.granted.is_set()     # slots are free, but "a" is at its own limit
        assert adm.running == 1 and adm.queued == 1
        await first.done()
        await asyncio.wait_for(second.granted.wait(), 1.0)
        assert adm.active["a"] == 1
        await second.done()
        assert adm.running == 0
    asyncio.run(main())


def test_per_principal_limit_times_out_like_any_wait():
    async def main():
        adm = Admission(max_concurrent=4, max_queue=10, max_wait=0.05, per_principal=2)
        holders = [Holder(adm, "a"), Holder(adm, "a")]
        await _settle()
        with pytest.raises(Overloaded):
            async with adm.slot("a"):
                pass
        for h in holders:
            await h.done()
    asyncio.run(main())


def test_per_principal_waiter_does_not_block_other_waiters_in_grant():
    async def main():
        adm = Admission(max_concurrent=2, max_queue=10, max_wait=5.0, per_principal=1)
        order: list = []
        a1 = Holder(adm, "a", order, "a1")
        b1 = Holder(adm, "b", order, "b1")
        await _settle()
        a2 = Holder(adm, "a", order, "a2")     # queued: a at its limit, and no slot free
        await _settle()
        c1 = Holder(adm, "c", order, "c1")     # queued behind a2
        await _settle()
        assert adm.queued == 2
        await b1.done()                        # frees a slot "a" may not take: "c" gets it
        await asyncio.wait_for(c1.granted.wait(), 1.0)
        assert not a2.granted.is_set()
        await a1.done()
        await asyncio.wait_for(a2.granted.wait(), 1.0)
        await a2.done()
        await c1.done()
        assert order == ["a1", "b1", "c1", "a2"]
    asyncio.run(main())


def test_per_principal_waiter_does_not_block_other_principals_on_entry():
    async def main():
        adm = Admission(max_concurrent=4, max_queue=10, max_wait=0.2, per_principal=1)
        a1 = Holder(adm, "a")
        await _settle()
        a2 = Holder(adm, "a")                  # queued: "a" is at its own limit; 3 slots are free
        await _settle()
        assert adm.queued == 1
        b = Holder(adm, "b")
        await _settle()
        granted_at_once = b.granted.is_set()
        await b.done()
        await a1.done()
        await a2.done()
        assert granted_at_once, f"b waited although 3 slots were free ({b.error})"
    asyncio.run(main())


def test_max_concurrent_zero_means_derived_from_the_machine():
    adm = Admission(max_concurrent=0, max_queue=1, max_wait=1.0)
    assert adm.max_concurrent >= 1


def test_admission_forgets_principals_that_are_gone():
    async def main():
        adm = Admission(max_concurrent=2, max_queue=10, max_wait=5.0)
        for i in range(50):
            async with adm.slot(f"caller-{i}", limit=1):
                pass
        assert adm.limits == {} and not adm.active and not adm.waiting
    asyncio.run(main())


def test_rate_limiter_forgets_idle_callers():
    from sandboxd.admission import RateLimiter
    rl = RateLimiter(window=60.0)
    for i in range(2000):
        rl.check(f"caller-{i}", per_minute=5, now=float(i))   # each caller's one run expires 60s later
    assert len(rl.seen) <= 1100


def test_raising_max_concurrent_fills_every_new_slot_from_one_principals_queue():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=10, max_wait=5.0)
        holders = [Holder(adm, "a") for _ in range(4)]
        await _settle()
        assert adm.running == 1 and adm.queued == 3
        adm.reconfigure(max_concurrent=4, max_queue=10, max_wait=5.0)
        await _settle()
        assert adm.running == 4 and adm.queued == 0
        for h in holders:
            await h.done()
    asyncio.run(main())


def test_close_refuses_the_waiters_and_later_requests():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=10, max_wait=5.0)
        running, waiting = Holder(adm, "a"), Holder(adm, "b")
        await _settle()
        assert adm.queued == 1
        adm.close(Overloaded("shutting down"))
        await waiting.task
        assert str(waiting.error) == "shutting down" and not waiting.granted.is_set()
        assert adm.queued == 0 and adm.running == 1
        with pytest.raises(Overloaded, match="shutting down"):
            async with adm.slot("c"):
                pass
        await running.done()
        assert adm.running == 0
    asyncio.run(main())


def test_withdraw_turns_one_waiter_away_and_keeps_the_others():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=10, max_wait=5.0)
        running = Holder(adm, "a")
        errors = {}

        async def wait(key):
            try:
                async with adm.slot("b", key=key):
                    errors[key] = None
            except Overloaded as e:
                errors[key] = e
        first, second = asyncio.create_task(wait("r1")), asyncio.create_task(wait("r2"))
        await _settle()
        assert adm.queued == 2
        assert adm.withdraw("r1", Overloaded("stopped by root"))
        assert not adm.withdraw("nope", Overloaded("x"))
        await first
        assert str(errors["r1"]) == "stopped by root" and adm.queued == 1
        await running.done()
        await second
        assert errors["r2"] is None and adm.running == 0 and not adm.keyed
    asyncio.run(main())
