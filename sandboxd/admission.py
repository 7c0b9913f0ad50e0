"""Admission: how many runs at once, who waits, and who is turned away.

Daemon side, pure asyncio. A bounded number of slots; callers beyond it wait in a bounded queue for at most
`max_wait` seconds, then get Overloaded (RESOURCE_EXHAUSTED with a retry hint). Waiters are served round-robin
across principals, so one caller flooding the daemon with requests waits behind its own requests, not in front
of everyone else's.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from typing import AsyncIterator

from .errors import Overloaded, RateLimited


def default_max_concurrent() -> int:
    """Two runs per CPU, but no more than one per 256 MiB of memory (a run's default memory limit)."""
    cpus = len(os.sched_getaffinity(0)) or 1
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(2 * cpus, mem // (256 << 20)))


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int, max_wait: float, per_principal: int = 0,
                 max_queue_per_principal: int = 0):
        self.max_concurrent = max_concurrent or default_max_concurrent()
        self.max_queue, self.max_wait, self.per_principal = max_queue, max_wait, per_principal
        self.queue_share = max_queue_per_principal
        self.active: collections.Counter[str] = collections.Counter()
        self.limits: dict[str, int] = {}
        self.waiting: dict[str, collections.deque[asyncio.Future]] = collections.OrderedDict()
        self.closed: Exception | None = None
        self.keyed: dict[str, tuple[str, asyncio.Future]] = {}   # waiters a stop can name (run ids)

    def reconfigure(self, max_concurrent: int, max_queue: int, max_wait: float,
                    max_queue_per_principal: int = 0) -> None:
        """New limits apply to the next admission; runs already admitted keep their slots."""
        self.max_concurrent = max_concurrent or default_max_concurrent()
        self.max_queue, self.max_wait, self.queue_share = max_queue, max_wait, max_queue_per_principal
        self._grant()

    @property
    def running(self) -> int:
        return sum(self.active.values())

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def _limit(self, principal: str) -> int:
        return self.limits.get(principal, self.per_principal)

    def _may_run(self, principal: str) -> bool:
        limit = self._limit(principal)
        return self.running < self.max_concurrent and (not limit or self.active[principal] < limit)

    @contextlib.asynccontextmanager
    async def slot(self, principal: str = "", limit: int = 0, key: str = "") -> AsyncIterator[float]:
        """Hold a run slot for the body; yields the seconds spent waiting. `limit` caps this principal's
        concurrent runs (its policy's max_concurrent); waiting past it does not block other principals.
        A waiter given a `key` can be turned away by withdraw(key)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        if self.closed is not None:
            raise self.closed
        if limit:
            self.limits[principal] = limit
        # Waiters that could use a free slot are granted the moment it frees (see _grant), so anyone still
        # queued while a slot is free is held back by their own per-principal limit: no queue-jumping here.
        if not self.waiting.get(principal) and self._may_run(principal):
            self.active[principal] += 1
        else:
            if self.queued >= self.max_queue:
                raise Overloaded(f"too many runs: {self.running} running and {self.queued} queued "
                                 f"(max_concurrent {self.max_concurrent}, max_queue {self.max_queue})",
                                 retry_after=1.0)
            # One caller may hold only part of the queue, so a flood cannot leave others nowhere to wait.
            share = self.queue_share or max(1, self.max_queue // 2)
            mine = len(self.waiting.get(principal, ()))
            if mine >= share:
                raise Overloaded(f"principal {principal!r} already has {mine} runs queued (max_queue_per_principal "
                                 f"{share}) and {self.running} running", retry_after=1.0)
            fut = loop.create_future()
            self.waiting.setdefault(principal, collections.deque()).append(fut)
            if key:
                self.keyed[key] = (principal, fut)
            try:
                # asyncio.wait (unlike wait_for on 3.11) never swallows a cancellation that races the grant.
                await asyncio.wait({fut}, timeout=self.max_wait)
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._release(principal)  # granted just as the caller gave up: pass the slot on
                else:
                    fut.cancel()
                    self._forget(principal, fut)
                raise
            finally:
                self.keyed.pop(key, None)
            if fut.done() and fut.exception() is not None:
                raise fut.exception()
            if not fut.done():
                fut.cancel()
                self._forget(principal, fut)
                raise Overloaded(f"no run slot became free within {self.max_wait:g}s "
                                 f"({self.running} running, {self.queued} queued)", retry_after=2.0)
        try:
            yield loop.time() - start
        finally:
            self._release(principal)

    def _forget(self, principal: str, fut: asyncio.Future) -> None:
        q = self.waiting.get(principal)
        if q is not None:
            with contextlib.suppress(ValueError):
                q.remove(fut)
            if not q:
                del self.waiting[principal]
        self._tidy(principal)

    def _release(self, principal: str) -> None:
        self.active[principal] -= 1
        if self.active[principal] <= 0:
            del self.active[principal]
        self._tidy(principal)
        self._grant()

    def _tidy(self, principal: str) -> None:
        """Forget a principal's limit once it has nothing running or queued: callers come and go (every
        unmapped unix user or certificate is a principal), and a long-lived daemon must not keep them all."""
        if principal not in self.active and principal not in self.waiting:
            self.limits.pop(principal, None)

    def _grant(self) -> None:
        """Hand free slots to waiters, one principal at a time in rotation, until the slots are full or a
        whole round finds nobody who may run (several slots can free at once: a reload raising max_concurrent)."""
        skipped = 0
        while self.waiting and skipped < len(self.waiting) and self.running < self.max_concurrent:
            principal, q = next(iter(self.waiting.items()))
            self.waiting.move_to_end(principal)  # next grant goes to the next principal
            limit = self._limit(principal)
            if limit and self.active[principal] >= limit:
                skipped += 1
                continue
            skipped = 0
            fut = q.popleft()
            if not q:
                del self.waiting[principal]
            if not fut.done():
                self.active[principal] += 1
                fut.set_result(None)

    def withdraw(self, key: str, err: Exception) -> bool:
        """Turn one keyed waiter away with `err` (a stop); False when it is not waiting."""
        principal, fut = self.keyed.pop(key, ("", None))
        if fut is None or fut.done():
            return False
        fut.set_exception(err)
        self._forget(principal, fut)
        return True

    def close(self, err: Exception) -> None:
        """Shutdown: refuse every waiter (and every later request) with `err` instead of admitting it."""
        self.closed = err
        for principal, q in list(self.waiting.items()):
            for fut in q:
                if not fut.done():
                    fut.set_exception(err)
            del self.waiting[principal]
            self._tidy(principal)


class RateLimiter:
    """Runs per minute per principal, over a sliding window (one timestamp per accepted run)."""

    def __init__(self, window: float = 60.0):
        self.window = window
        self.seen: dict[str, collections.deque[float]] = {}

    def check(self, principal: str, per_minute: int, now: float) -> None:
        if not per_minute:
            return
        if len(self.seen) > 1024:  # drop callers with no run in the window, so the map stays bounded
            self.seen = {p: q for p, q in self.seen.items() if q and q[-1] > now - self.window}
        q = self.seen.setdefault(principal, collections.deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        if len(q) >= per_minute:
            retry = q[0] + self.window - now
            raise RateLimited(f"principal {principal!r} is limited to {per_minute} runs per minute; "
                              f"retry in {retry:.1f}s", retry_after=max(retry, 0.1))
        q.append(now)
